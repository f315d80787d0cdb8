"""Issue 19, rows 1-4 and 10: no command destroys what the user gave it.

An output that is, holds or sits inside an input is refused (exit 2, one line, the user's files byte for byte
as they were), ``--overwrite`` replaces only what mapjax wrote and never the working folder, a killed
``--overwrite`` of a pool leaves the old pool *and its manifest* as they were, and a finetuning run that diverges
stops with exit 1, keeps its last finite checkpoint and exports nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.cli import EXIT_BAD_INPUT, EXIT_NOT_REACHED, main
from mapjax.errors import DivergenceError, OutputAliasError, OutputNotOursError

POLICY = "some-org/some-model"   # a hub id: looked up only when loaded, which the refusals below never reach
PROMPTS = ["w3 w4", "w5", "w6 w7 w8", "w9 w10"]
REPOSITORY = Path(__file__).resolve().parents[1]


def scored_pool(rows: int = 40) -> RewardPool:
    rng = np.random.default_rng(0)
    records = [{"prompt": f"w{3 + i // 4}", "generated": f"w{10 + i % 7} w{20 + i % 5}",
                "diversity": float(rng.uniform(0.3, 1.0)), "perplexity": float(rng.uniform(1, 9))}
               for i in range(rows)]
    return RewardPool.from_records(records)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (symlinks as their target's bytes) by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- row 1: decode onto its own pool
def test_decode_refuses_to_overwrite_its_own_input_pool(capsys, tmp_path, no_model):
    base = scored_pool().save(tmp_path / "base.jsonl")
    (tmp_path / "prompts.txt").write_text("w3 w4\nw5\n")
    (tmp_path / "alias.jsonl").symlink_to(base)   # the same file under another name
    before = snapshot(tmp_path)
    for out in (base, tmp_path / "alias.jsonl", tmp_path / "sub" / ".." / "base.jsonl"):
        code, err = run(capsys, "decode", "--policy", POLICY, "--prompts", tmp_path / "prompts.txt", "--pool", base,
                        "--palette", "perplexity>=q0.6", "--k", 4, "--count", 4, "--out", out, "--overwrite")
        line = one_line(err)
        assert code == EXIT_BAD_INPUT and "is the input --pool" in line, line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- row 2: pool onto its own prompts
def test_pool_refuses_to_overwrite_its_own_prompts_file(capsys, tmp_path, no_model):
    prompts = tmp_path / "pj.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in PROMPTS))
    before = snapshot(tmp_path)
    code, err = run(capsys, "pool", "--policy", POLICY, "--prompts", prompts, "--values", "diversity",
                    "--out", prompts, "--overwrite")
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "is the input --prompts" in line, line
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_mapjax_pool(capsys, tmp_path, no_model):
    (tmp_path / "prompts.txt").write_text("w3 w4\nw5\n")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "own notes"}\n')
    before = snapshot(tmp_path)
    code, err = run(capsys, "pool", "--policy", POLICY, "--prompts", tmp_path / "prompts.txt", "--values",
                    "diversity", "--out", notes, "--overwrite")
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "is not a mapjax pool or result" in line, line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- row 3: finetune --overwrite
@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with a policy folder holding a pool, as in the issue; the test runs inside it."""
    folder = tmp_path / "work"
    policy = folder / "policy"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text('{"model_type": "gpt2"}')
    (policy / "model.safetensors").write_bytes(b"weights")
    scored_pool().save(policy / "pool.jsonl")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("mine")
    monkeypatch.chdir(folder)
    return folder


def finetune_argv(out, *extra):
    return ["finetune", "--policy", "policy", "--pool", "policy/pool.jsonl", "--palette", "perplexity>=q0.6",
            "--steps", 2, "--eval-prompts", 0, "--out", out, *extra]


@pytest.mark.parametrize("out, message", [
    ("policy", "is the input --policy"),
    ("policy/run", "lies inside the input --policy"),
    (".", "is the current folder"),
    ("..", "holds the current folder"),
    ("notes", "holds files mapjax did not write"),
])
def test_finetune_overwrite_never_replaces_an_input_the_working_folder_or_a_foreign_folder(
        capsys, work, no_model, out, message):
    before = snapshot(work.parent)
    code, err = run(capsys, *finetune_argv(out, "--overwrite"))
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and message in line, line
    assert snapshot(work.parent) == before
    code, err = run(capsys, *finetune_argv(out))   # without --overwrite as well
    assert code == EXIT_BAD_INPUT and message in one_line(err)
    assert snapshot(work.parent) == before


def test_finetune_api_refuses_the_working_folder_before_any_work(work):
    from mapjax.finetune import finetune

    with pytest.raises(OutputAliasError, match="is the current folder"):
        finetune(None, None, scored_pool(), np.array([1.0, 0.0]), out=".", overwrite=True)


def test_a_mapjax_run_folder_is_recognised_and_a_foreign_one_is_not(tmp_path):
    from mapjax.outputs import RUN_MARKER, check_output_folder, is_mapjax_folder, write_run_marker

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_run_marker(ours, "finetune")
    (ours / "losses.json").write_text("{}")
    theirs.mkdir()
    (theirs / "losses.json").write_text("[1, 2]")
    assert is_mapjax_folder(ours) and (ours / RUN_MARKER).is_file()
    assert not is_mapjax_folder(theirs)
    assert check_output_folder(ours, overwrite=True) == ours
    with pytest.raises(OutputNotOursError, match="holds files mapjax did not write"):
        check_output_folder(theirs, overwrite=True)


def test_experiment_force_writes_only_into_a_mapjax_folder(tmp_path):
    from experiments.common import prepare_out

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(OutputNotOursError):
        prepare_out(foreign, force=True)
    assert snapshot(foreign) == {"mine.txt": b"keep"}
    made = tmp_path / "made"
    prepare_out(made, force=False)
    (made / "table.csv").write_text("old")
    assert prepare_out(made, force=True) is False   # its own folder: --force may write into it


# --------------------------------------------------------------------------- row 4: a killed --overwrite
class Words:
    """A cheap reward (the continuation's word count) that can interrupt the build it scores."""

    name = "words"

    def __init__(self, interrupt_after=None):
        self.interrupt_after, self.calls = interrupt_after, 0

    def __call__(self, prompts, continuations):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt("interrupted mid-build")
        return np.array([len(text.split()) for text in continuations], np.float32)


@pytest.fixture(scope="module")
def tiny_policy():
    from conftest import build_tiny_model, make_word_tokenizer

    return build_tiny_model("gpt2"), make_word_tokenizer()


@pytest.mark.slow
def test_an_interrupted_overwrite_leaves_the_old_pool_and_its_manifest_as_they_were(tiny_policy, tmp_path):
    from mapjax.build import build_pool, recorded_dtype

    model, tokenizer = tiny_policy
    out = tmp_path / "ow.jsonl"
    manifest = tmp_path / "ow.jsonl.manifest.json"
    options = dict(samples_per_prompt=2, out=out, max_new_tokens=4, chunk_size=1, progress=False)
    build_pool(model, tokenizer, PROMPTS, [Words()], seed=5, dtype="float32", **options)
    old_pool, old_manifest = out.read_bytes(), manifest.read_bytes()

    with pytest.raises(KeyboardInterrupt):   # part-way: the third chunk's scoring stops the rebuild
        build_pool(model, tokenizer, PROMPTS, [Words(interrupt_after=2)], seed=6, dtype="bfloat16",
                   overwrite=True, **options)
    assert out.read_bytes() == old_pool and manifest.read_bytes() == old_manifest
    assert recorded_dtype(out) == "float32"

    untouched = Words(interrupt_after=0)   # the old settings are accepted: the old pool, nothing rebuilt
    again = build_pool(model, tokenizer, PROMPTS, [untouched], seed=5, dtype="float32", **options)
    assert untouched.calls == 0 and again.num_prompts == len(PROMPTS)
    assert out.read_bytes() == old_pool and manifest.read_bytes() == old_manifest

    build_pool(model, tokenizer, PROMPTS, [Words()], seed=6, dtype="bfloat16", overwrite=True, **options)
    assert json.loads(manifest.read_text())["settings"]["seed"] == 6 and recorded_dtype(out) == "bfloat16"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ow.jsonl", "ow.jsonl.manifest.json"]


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import build_tiny_model, make_word_tokenizer
    from mapjax.build import build_pool

    class Words:
        name = "words"
        def __init__(self, kill_after):
            self.kill_after, self.calls = kill_after, 0
        def __call__(self, prompts, continuations):
            self.calls += 1
            if self.kill_after is not None and self.calls > self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: as `kill -9`
            return np.array([len(t.split()) for t in continuations], np.float32)

    seed, overwrite, kill_after = int(sys.argv[1]), sys.argv[2] == "overwrite", sys.argv[3]
    reward = Words(None if kill_after == "never" else int(kill_after))
    build_pool(build_tiny_model("gpt2"), make_word_tokenizer(), {prompts!r}, [reward], seed=seed,
               samples_per_prompt=2, out=sys.argv[4], max_new_tokens=4, chunk_size=1, progress=False,
               overwrite=overwrite, dtype="float32" if seed == 5 else "bfloat16")
    print("calls", reward.calls)
""")


@pytest.mark.slow
def test_sigkill_during_pool_overwrite_leaves_the_old_pool_and_manifest_byte_identical(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD.format(tests=str(REPOSITORY / "tests"), prompts=PROMPTS))
    out = tmp_path / "ow.jsonl"
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def build(*argv):
        return subprocess.run([sys.executable, str(script), *map(str, argv), str(out)], capture_output=True,
                              text=True, env=environment, cwd=tmp_path, timeout=300)

    first = build(5, "fresh", "never")
    assert first.returncode == 0, first.stderr
    old_pool, old_manifest = out.read_bytes(), (tmp_path / "ow.jsonl.manifest.json").read_bytes()
    killed = build(6, "overwrite", 2)
    assert killed.returncode == -9, killed.stderr
    assert out.read_bytes() == old_pool
    assert (tmp_path / "ow.jsonl.manifest.json").read_bytes() == old_manifest
    rerun = build(5, "fresh", 0)   # the settings that built the pool: accepted, and nothing is scored
    assert rerun.returncode == 0 and "calls 0" in rerun.stdout, rerun.stderr
    assert out.read_bytes() == old_pool


# --------------------------------------------------------------------------- row 10: divergence
@pytest.mark.slow
def test_a_diverging_finetune_raises_keeps_the_last_finite_checkpoint_and_exports_nothing(tiny_policy, tmp_path):
    import orbax.checkpoint as ocp

    from mapjax.finetune import FinetuneConfig, finetune

    model, tokenizer = tiny_policy
    out = tmp_path / "f4"
    finite_steps = []   # the callback sees only steps that passed the check
    with pytest.raises(DivergenceError, match="diverged at step") as raised:
        finetune(model, tokenizer, scored_pool(48), np.array([1.0, 0.0]), out=out, progress=False,
                 callback=lambda step, metrics: finite_steps.append(step),
                 config=FinetuneConfig(steps=6, batch_size=4, save_every=1, learning_rate=1e30))
    assert f"step {len(finite_steps) + 1}:" in str(raised.value)
    assert not (out / "model").exists() and not (out / "losses.json").exists()
    manager = ocp.CheckpointManager((out / "checkpoints").absolute())
    try:
        assert list(manager.all_steps()) == finite_steps[-2:]   # the diverged step was never saved
        for step in manager.all_steps():
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            assert all(np.isfinite(np.asarray(leaf)).all() for leaf in state["trainable"].values())
    finally:
        manager.close()


@pytest.mark.slow
def test_finetune_command_with_a_diverging_learning_rate_exits_1_and_exports_nothing(
        capsys, tiny_policy_folder, tmp_path):
    policy = tiny_policy_folder("gpt2")
    pool_file = scored_pool(48).save(tmp_path / "ref.jsonl")
    before = snapshot(policy), pool_file.read_bytes()
    code, err = run(capsys, "finetune", "--policy", policy, "--pool", pool_file, "--palette", "perplexity>=q0.6",
                    "--steps", 4, "--batch-size", 4, "--lr", 1e30, "--eval-prompts", 0, "--out", tmp_path / "f4",
                    "--quiet")
    line = one_line(err)
    assert code == EXIT_NOT_REACHED and "diverged" in line and "non-finite" in line, line
    assert not (tmp_path / "f4" / "model").exists() and not (tmp_path / "f4" / "evaluation.json").exists()
    assert (snapshot(policy), pool_file.read_bytes()) == before


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_finetuning_stops_when_it_diverges(tiny_policy, tmp_path, method):
    from mapjax.finetune import OnlineConfig, finetune_online

    model, tokenizer = tiny_policy

    class Length:
        name = "length"

        def __call__(self, prompts, continuations):
            return np.array([len(text.split()) for text in continuations], np.float32)

    config = OnlineConfig(steps=4, prompts_per_step=2, group_size=2, max_new_tokens=4, learning_rate=1e30,
                          save_every=1)
    out = tmp_path / method
    with pytest.raises(DivergenceError, match="diverged at rollout step"):
        finetune_online(model, tokenizer, PROMPTS, [Length()], np.array([1.0]), method=method, config=config,
                        out=out, progress=False)
    assert not (out / "model").exists() and not (out / "losses.json").exists()
