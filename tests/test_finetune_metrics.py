"""The finetuning metrics trail: RUN/metrics.jsonl lines, resume, TensorBoard events and W&B calls (faked)."""

from __future__ import annotations

import json
import math
import struct
import sys
import types
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.errors import FinetuneError, MapjaxError
from mapjax.finetune.metrics import WALL_CLOCK_FIELDS, MetricsLog, read_metrics


def step_metrics(step: int) -> dict[str, Any]:
    """Deterministic training metrics of ``step``, plus wall-clock fields that differ on every call."""
    rng = np.random.default_rng()
    return {
        "loss": 1.0 / step,
        "learning_rate": 1e-5,
        "grad_norm": np.float32(0.5 * step),
        "levels": {"sentiment": 0.1 * step, "toxicity": -0.01 * step},
        "step_time": float(rng.uniform(0.1, 0.2)),
        "tokens_per_s": float(rng.uniform(1000, 2000)),
    }


def without_wall_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in record.items() if key not in WALL_CLOCK_FIELDS} for record in records]


def test_lines_round_trip(tmp_path: Path):
    with MetricsLog(tmp_path / "run") as metrics:
        metrics.log(1, {"loss": 0.5, "note": "warm-up", "levels": {"a": 1.5}, "counts": [1, 2, 3]})
        metrics.log(2, {"loss": 0.25})
    assert read_metrics(tmp_path / "run") == [
        {"step": 1, "loss": 0.5, "note": "warm-up", "levels": {"a": 1.5}, "counts": [1, 2, 3]},
        {"step": 2, "loss": 0.25},
    ]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["step"] == number for number, line in enumerate(lines, 1))
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == read_metrics(tmp_path / "run")


def test_values_are_made_json_safe(tmp_path: Path):
    with MetricsLog(tmp_path) as metrics:
        metrics.log(1, {
            "flag": True,
            "np_bool": np.bool_(False),
            "np_float": np.float32(0.25),
            "np_int": np.int64(7),
            "jnp_float": jnp.asarray(0.5, dtype=jnp.float32),
            "jnp_int": jnp.asarray(3, dtype=jnp.int32),
            "jnp_vector": jnp.arange(3),
            "nested": {"deeper": {"x": np.float64(2.0)}, "nan": float("nan")},
            "nan": np.float32("nan"),
            "inf": float("inf"),
            "minus_inf": -jnp.inf * jnp.ones(()),
            "list": [np.float32(1.0), float("nan")],
        })
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = read_metrics(tmp_path)
    assert record == {
        "step": 1, "flag": True, "np_bool": False, "np_float": 0.25, "np_int": 7, "jnp_float": 0.5, "jnp_int": 3,
        "jnp_vector": [0, 1, 2], "nested": {"deeper": {"x": 2.0}, "nan": None}, "nan": None, "inf": None,
        "minus_inf": None, "list": [1.0, None],
    }
    assert type(record["np_int"]) is int and type(record["jnp_int"]) is int and type(record["flag"]) is bool


def test_bad_values_and_steps_are_refused(tmp_path: Path):
    with MetricsLog(tmp_path) as metrics:
        with pytest.raises(FinetuneError, match="'blob'"):
            metrics.log(1, {"loss": 1.0, "blob": object()})
        with pytest.raises(FinetuneError, match="'step' field"):
            metrics.log(1, {"step": 3})
        with pytest.raises(FinetuneError, match="whole number"):
            metrics.log(1.5, {})
        metrics.log(1, {"loss": 1.0})
        with pytest.raises(FinetuneError, match="step 1 does not come after"):
            metrics.log(1, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]   # the refused lines left nothing behind
    with pytest.raises(FinetuneError, match="after close"):
        metrics.log(2, {})
    with pytest.raises(FinetuneError, match="resume_step"):
        MetricsLog(tmp_path, resume_step=-1)


def test_resume_drops_later_steps_and_partial_last_line(tmp_path: Path):
    with MetricsLog(tmp_path) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as file:
        file.write('{"step": 6, "loss": 6.')   # killed mid-write
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]   # readers skip it too

    with MetricsLog(tmp_path, resume_step=3):
        pass
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 3.0}\n'
    assert not [leftover for leftover in tmp_path.iterdir() if leftover.name.endswith(".tmp")]


def test_resume_keeps_the_file_untouched_when_nothing_is_dropped(tmp_path: Path):
    with MetricsLog(tmp_path) as metrics:
        metrics.log(1, {"loss": 1.0})
        metrics.log(2, {"loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    inode = path.stat().st_ino
    with MetricsLog(tmp_path, resume_step=2) as metrics:
        with pytest.raises(FinetuneError, match="step 2 does not come after"):
            metrics.log(2, {"loss": 2.0})
        metrics.log(3, {"loss": 3.0})
    assert path.stat().st_ino == inode   # appended to, not rewritten
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]


def test_fresh_run_truncates_an_existing_file(tmp_path: Path):
    with MetricsLog(tmp_path) as metrics:
        metrics.log(1, {"loss": 1.0})
        metrics.log(2, {"loss": 2.0})
    with MetricsLog(tmp_path, resume_step=0) as metrics:
        metrics.log(1, {"loss": 9.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}]


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path: Path):
    total_steps, save_every = 7, 3
    with MetricsLog(tmp_path / "straight") as metrics:
        for step in range(1, total_steps + 1):
            metrics.log(step, step_metrics(step))

    # the killed run logs steps 1-5 (checkpoints at 3), dies while writing step 6, restarts from checkpoint 3
    with MetricsLog(tmp_path / "killed") as metrics:
        for step in range(1, 6):
            metrics.log(step, step_metrics(step))
    with open(tmp_path / "killed" / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 6, "lo')
    resume_step = 5 // save_every * save_every
    with MetricsLog(tmp_path / "killed", resume_step=resume_step) as metrics:
        for step in range(resume_step + 1, total_steps + 1):
            metrics.log(step, step_metrics(step))

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [record["step"] for record in resumed] == list(range(1, total_steps + 1))
    assert without_wall_clock(resumed) == without_wall_clock(straight)
    assert straight != resumed   # the wall-clock fields do differ, which is why they are excluded


def test_read_metrics_names_file_and_line_of_a_bad_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(MapjaxError, match=r"metrics\.jsonl, line 2"):
        read_metrics(tmp_path)
    with pytest.raises(FinetuneError, match="line 2"):   # resuming over a corrupt middle line refuses too
        MetricsLog(tmp_path, resume_step=1)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(FinetuneError, match="line 2 is not a JSON object"):
        read_metrics(tmp_path)
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(FinetuneError, match="line 1 has no whole-number 'step'"):
        read_metrics(tmp_path)
    with pytest.raises(FinetuneError, match="no metrics file"):
        read_metrics(tmp_path / "elsewhere")


def test_no_run_folder_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with MetricsLog(None) as metrics:
        assert metrics.path is None
        metrics.log(1, {"loss": 1.0})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FinetuneError, match="tensorboard=True needs a run folder"):
        MetricsLog(None, tensorboard=True)


# --- TensorBoard ---------------------------------------------------------------------------------------------

def read_event_file(path: Path) -> list[Any]:
    """Every Event in one TFRecord file (each record: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 12
        events.append(Event.FromString(data[offset:offset + length]))
        offset += length + 4
    assert offset == len(data)
    return events


def read_event_files(folder: Path) -> list[Any]:
    """Every Event in the event files under ``folder``, file by file in name (time) order."""
    return [event for path in sorted(folder.glob("events.out.tfevents.*")) for event in read_event_file(path)]


def scalars_of(events: list[Any]) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow   # importing tensorboardX imports torch (about 5 s)
def test_tensorboard_events_are_written_and_readable(tmp_path: Path):
    pytest.importorskip("tensorboardX")
    with MetricsLog(tmp_path, tensorboard=True) as metrics:
        metrics.log(1, {"loss": 0.5, "levels": {"sentiment": np.float32(0.25)}, "note": "text", "hist": [1, 2],
                        "scalar_array": jnp.asarray(2.0), "flag": True})
        metrics.log(2, {"loss": 0.25, "levels": {"sentiment": 0.5}, "nan": float("nan")})
    scalars = scalars_of(read_event_files(tmp_path / "tensorboard"))
    assert set(scalars) == {"loss", "levels/sentiment", "scalar_array", "flag", "nan"}
    assert scalars["loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["levels/sentiment"] == [(1, 0.25), (2, 0.5)]
    assert scalars["scalar_array"] == [(1, 2.0)] and scalars["flag"] == [(1, 1.0)]
    assert math.isnan(scalars["nan"][0][1])


@pytest.mark.slow   # importing tensorboardX imports torch (about 5 s)
def test_tensorboard_resume_purges_from_the_next_step(tmp_path: Path):
    pytest.importorskip("tensorboardX")
    with MetricsLog(tmp_path, tensorboard=True) as metrics:
        for step in range(1, 5):
            metrics.log(step, {"loss": float(step)})
    with MetricsLog(tmp_path, resume_step=2, tensorboard=True) as metrics:
        metrics.log(3, {"loss": 30.0})
    first_file, resumed_file = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not [event for event in read_event_file(first_file) if event.HasField("session_log")]
    resumed_events = read_event_file(resumed_file)
    # TensorBoard's reader drops the earlier file's steps >= 3 when it meets this START marker
    assert [(event.step, event.session_log.status) for event in resumed_events if event.HasField("session_log")] \
        == [(3, 1)]
    assert scalars_of(resumed_events) == {"loss": [(3, 30.0)]}


def test_missing_tensorboardx_is_named_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(FinetuneError, match=r'pip install "mapjax\[tensorboard\]"'):
        MetricsLog(tmp_path, tensorboard=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'   # not truncated


# --- Weights & Biases (faked) --------------------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    """Records wandb.init and the run's log/finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logs: list[tuple[dict[str, float], int]] = []
        self.finishes: list[dict[str, Any]] = []

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data: dict[str, float], step: int) -> None:
                fake.logs.append((dict(data), step))

            def finish(self, **kwargs: Any) -> None:
                fake.finishes.append(kwargs)

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_wandb_logs_flat_scalars_and_reuses_its_id_on_resume(tmp_path: Path, fake_wandb: FakeWandb):
    config = {"learning_rate": 1e-5, "out": tmp_path, "values": ("a", "b")}
    with MetricsLog(tmp_path, wandb_project="proj", run_name="map-f", config=config) as metrics:
        metrics.log(1, {"loss": np.float32(0.5), "levels": {"sentiment": 0.25}, "note": "skip", "hist": [1.0]})
        metrics.log(2, {"loss": jnp.asarray(0.25)})
    first = fake_wandb.inits[0]
    run_id = (tmp_path / "wandb-id.txt").read_text().strip()
    assert first == {"project": "proj", "name": "map-f", "dir": str(tmp_path), "id": run_id, "resume": "allow",
                     "config": {"learning_rate": 1e-5, "out": str(tmp_path), "values": ["a", "b"]}}
    assert fake_wandb.logs == [({"loss": 0.5, "levels/sentiment": 0.25}, 1), ({"loss": 0.25}, 2)]
    assert fake_wandb.finishes == [{}]

    with MetricsLog(tmp_path, resume_step=1, wandb_project="proj", run_name="map-f") as metrics:
        metrics.log(2, {"loss": 0.125})
    assert fake_wandb.inits[1]["id"] == run_id   # the same W&B run continues
    assert fake_wandb.logs[-1] == ({"loss": 0.125}, 2)

    with MetricsLog(tmp_path, wandb_project="proj"):   # a fresh run in the folder is a new W&B run
        pass
    assert fake_wandb.inits[2]["id"] != run_id
    assert (tmp_path / "wandb-id.txt").read_text().strip() == fake_wandb.inits[2]["id"]


def test_wandb_without_run_folder_and_failed_run(tmp_path: Path, fake_wandb: FakeWandb,
                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with MetricsLog(None, wandb_project="proj") as metrics:
            metrics.log(1, {"loss": 1.0})
            raise RuntimeError("boom")
    assert fake_wandb.inits[0]["dir"] is None and fake_wandb.inits[0]["id"] is None
    assert fake_wandb.inits[0]["config"] == {}
    assert fake_wandb.logs == [({"loss": 1.0}, 1)]
    assert fake_wandb.finishes == [{"exit_code": 1}]
    assert list(tmp_path.iterdir()) == []


def test_wandb_init_failure_is_a_finetune_error(tmp_path: Path, fake_wandb: FakeWandb):
    def refuse(**kwargs: Any) -> Any:
        raise RuntimeError("api key not configured")

    fake_wandb.init = refuse
    with pytest.raises(FinetuneError, match="api key not configured.*WANDB_MODE=offline"):
        MetricsLog(tmp_path, wandb_project="proj")


def test_missing_wandb_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(FinetuneError, match=r'pip install "mapjax\[wandb\]"'):
        MetricsLog(tmp_path, wandb_project="proj")
    assert not (tmp_path / "metrics.jsonl").exists()
