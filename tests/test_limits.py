"""Issue 19, row 9: counts the machine cannot hold are refused up front, with the estimate in the message.

``pool --samples 1e20`` and ``decode --k 1e20`` used to fail with an OverflowError after the build's manifest and
partial files were written, ``pool --samples 100000000`` ran out of device memory, and ``adjust --method grid
--points 1000000`` tried to allocate 77 GB. Now each is a :class:`mapjax.errors.LimitError` (exit 2, one line)
before any file is written or any model loaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.cli import EXIT_BAD_INPUT, main
from mapjax.errors import LimitError
from mapjax.limits import check_fits, check_grid_points, check_sampled_rows, human_bytes, machine_memory

POLICY = "some-org/some-model"
HUGE = 10**20
MEMORY = 16 * 10**9   # the machine these tests pretend to run on


@pytest.fixture(autouse=True)
def sixteen_gigabytes(monkeypatch):
    """Every estimate is compared with 16 GB, whatever machine runs the tests."""
    monkeypatch.setenv("MAPJAX_MEMORY_BYTES", str(MEMORY))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"prompt": f"w{3 + i // 4}", "generated": f"w{10 + i % 7}", "diversity": float(rng.uniform(0.3, 1)),
                "perplexity": float(rng.uniform(1, 9))} for i in range(80)]
    RewardPool.from_records(records).save(tmp_path / "base.jsonl")
    (tmp_path / "prompts.txt").write_text("".join(f"w{3 + i} w{4 + i}\n" for i in range(8)))
    return tmp_path


def refusal(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def listing(folder):
    return sorted((path.name, path.read_bytes()) for path in folder.iterdir() if path.is_file())


@pytest.mark.parametrize("samples, message", [
    (HUGE, "more than this machine can handle"),
    (100_000_000, "needs about"),
])
def test_pool_refuses_a_sample_count_the_machine_cannot_hold_before_writing(capsys, files, no_model, samples,
                                                                              message):
    before = listing(files)
    code, line = refusal(capsys, "pool", "--policy", POLICY, "--prompts", files / "prompts.txt", "--values",
                         "diversity", "--samples", samples, "--out", files / "huge.jsonl")
    assert code == EXIT_BAD_INPUT and message in line and "--samples" in line, line
    assert listing(files) == before   # no pool, no manifest, no partial file


def test_the_memory_estimate_is_in_the_message(capsys, files, no_model):
    code, line = refusal(capsys, "pool", "--policy", POLICY, "--prompts", files / "prompts.txt", "--values",
                         "diversity", "--samples", 100_000_000, "--out", files / "huge.jsonl")
    assert code == EXIT_BAD_INPUT
    assert "800,000,000 rows" in line and "GB of memory" in line and human_bytes(MEMORY) in line, line


def test_decode_refuses_a_k_the_machine_cannot_hold_before_writing(capsys, files, no_model):
    before = listing(files)
    code, line = refusal(capsys, "decode", "--policy", POLICY, "--prompts", files / "prompts.txt", "--pool",
                         files / "base.jsonl", "--palette", "perplexity>=q0.6", "--k", HUGE, "--out",
                         files / "result.jsonl")
    assert code == EXIT_BAD_INPUT and "--k" in line, line
    assert listing(files) == before


@pytest.mark.parametrize("points, message", [(1_000_000, "needs about"), (3_000_000_000, "at most 2,147,483,647")])
def test_adjust_grid_refuses_points_the_machine_cannot_hold(capsys, pilot_file, points, message):
    code, line = refusal(capsys, "adjust", pilot_file, "--palette", "gpt2-harmless>=q0.9", "--method", "grid",
                         "--points", points)
    assert code == EXIT_BAD_INPUT and message in line and "--points" in line, line


def test_a_grid_that_fits_is_accepted(pilot):
    from mapjax import adjust

    assert adjust.grid(pilot, "gpt2-harmless>=q0.5", points=3).method == "grid"


def test_build_pool_refuses_before_any_file_is_written(tmp_path):
    from mapjax.build import build_pool

    with pytest.raises(LimitError, match="samples_per_prompt"):   # the policy is never touched
        build_pool(None, None, ["w3", "w4"], ["diversity"], samples_per_prompt=HUGE, out=tmp_path / "p.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_estimates():
    assert machine_memory() == MEMORY
    check_sampled_rows(1000, 16, max_new_tokens=50, values=6)   # the paper's scale fits easily
    check_grid_points(10, 2312)
    with pytest.raises(LimitError, match=r"needs about 17\.0 GB of memory, more than this machine's 16\.0 GB"):
        check_fits("this", 17e9)
    with pytest.raises(LimitError, match="--max-new-tokens"):
        check_sampled_rows(1, 1, max_new_tokens=HUGE, values=1)


def test_a_bad_memory_override_is_a_named_error(monkeypatch):
    monkeypatch.setenv("MAPJAX_MEMORY_BYTES", "lots")
    with pytest.raises(LimitError, match="MAPJAX_MEMORY_BYTES"):
        machine_memory()
