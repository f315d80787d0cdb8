"""MAP-F on a device mesh: a tiny random Llama trained on ``data=2,fsdp=4`` matches the one-device run, and its
sharded checkpoint resumes on 4 devices and on 1.

XLA fixes the device count when it starts, so the 8- and 4-device runs are subprocesses (``host_devices``)
that import this module for the one shared setup (:func:`train`) and write their results to ``.npz`` files; the
one-device runs happen in the test process. The 8-device process trains straight through, then again killed
after step 3 (checkpoint at step 2) and resumed on the same layout, and copies the killed run's folder for the
4-device process (``data=2,fsdp=2``) and for this process (no mesh) to resume.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import build_tiny_model, make_word_tokenizer

from mapjax.finetune import FinetuneConfig, finetune
from mapjax.pool import RewardPool

# Every test reads the runs of one module fixture that trains on 8, 4 and 1 devices: a minute or more.
pytestmark = pytest.mark.slow

PROMPTS = ["w5 w17 w33", "w8", "w40 w41 w42 w43", "w60 w61"]
LAM = np.array([1.5, 0.5])
# 16 examples per step in 2 micro-batches of 8 rows: one row per device of data=2,fsdp=4.
CONFIG = FinetuneConfig(batch_size=16, grad_accum=2, steps=4, save_every=2, learning_rate=1e-3, warmup_steps=1,
                        kl_coef=0.1, seed=3)
MESH8, MESH4 = "data=2,fsdp=4", "data=2,fsdp=2"


class Killed(RuntimeError):
    pass


def make_pool() -> RewardPool:
    rng = np.random.RandomState(0)
    generations = tuple(tuple(" ".join(f"w{rng.randint(3, 100)}" for _ in range(rng.randint(2, 7)))
                              for _ in range(4)) for _ in PROMPTS)
    return RewardPool(rng.normal(size=(len(PROMPTS), 4, 2)), np.ones((len(PROMPTS), 4), bool), ("a", "b"),
                      prompts=tuple(PROMPTS), generations=generations)


def train(mesh=None, out=None, kill_after: int | None = None):
    """The run every test compares: the weighted method on a tiny random Llama (a fresh copy each call)."""
    def callback(step, metrics):
        if step == kill_after:
            raise Killed

    return finetune(build_tiny_model("llama"), make_word_tokenizer(), make_pool(), LAM, config=CONFIG, out=out,
                    mesh=mesh, callback=callback, progress=False, export=False)


def save(result, path) -> None:
    leaves = jax.tree.leaves(jax.tree.map(np.asarray, result.model))
    np.savez(path, losses=np.asarray(result.losses), resumed_from=result.resumed_from,
             **{f"p{i:03d}": leaf for i, leaf in enumerate(leaves)})


def load(path) -> tuple[list[np.ndarray], np.ndarray, int]:
    with np.load(path) as saved:
        params = [saved[key] for key in sorted(saved.files) if key.startswith("p")]
        return params, saved["losses"], int(saved["resumed_from"])


EIGHT = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path
    import jax
    sys.path.insert(0, "tests")
    from test_finetune_sharded import LAM, MESH8, Killed, save, train
    from mapjax.finetune import FinetuneConfig, FinetuneError, finetune

    assert jax.device_count() == 8, jax.devices()
    work = Path(sys.argv[1])
    straight = train(MESH8)
    save(straight, work / "straight8.npz")
    matrices = [leaf for leaf in jax.tree.leaves(straight.model) if leaf.ndim == 2]
    facts = {"devices": len(matrices[0].sharding.device_set), "spec": str(matrices[0].sharding.spec)}
    try:  # 12 / 2 = 6 rows per micro-batch cannot be split over 8 devices; refused before the model is used
        finetune(None, None, None, LAM, config=FinetuneConfig(batch_size=12, grad_accum=2), mesh=MESH8)
    except FinetuneError as error:
        facts["error"] = str(error)
    try:
        train(MESH8, out=work / "run8", kill_after=3)
    except Killed:
        pass
    for name in ("run4", "run1"):
        shutil.copytree(work / "run8", work / name)
    save(train(MESH8, out=work / "run8"), work / "resumed8.npz")
    (work / "facts.json").write_text(json.dumps(facts))
''')

FOUR = textwrap.dedent('''
    import sys
    from pathlib import Path
    import jax
    sys.path.insert(0, "tests")
    from test_finetune_sharded import MESH4, save, train

    assert jax.device_count() == 4, jax.devices()
    work = Path(sys.argv[1])
    save(train(MESH4, out=work / "run4"), work / "resumed4.npz")
''')


def finish(process: subprocess.Popen, count: int, work: Path, timeout: float = 600) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    errors = (work / f"stderr-{count}.txt").read_text()
    assert process.returncode == 0, f"{count} devices:\n{errors[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, host_devices):
    """Every run's (params, losses, resumed_from) by name, and the 8-device process's facts. The one-device
    runs of this process overlap the subprocesses (each compiles its own step)."""
    work = tmp_path_factory.mktemp("finetune-sharded")
    eight = host_devices.start(["-c", EIGHT, str(work)], devices=8, stderr=work / "stderr-8.txt")
    try:
        save(train(), work / "single.npz")
    finally:
        finish(eight, 8, work)
    four = host_devices.start(["-c", FOUR, str(work)], devices=4, stderr=work / "stderr-4.txt")
    try:
        save(train(out=work / "run1"), work / "resumed1.npz")
    finally:
        finish(four, 4, work)
    results = {name: load(work / f"{name}.npz") for name in ("single", "straight8", "resumed8", "resumed4",
                                                              "resumed1")}
    return results, json.loads((work / "facts.json").read_text())


def assert_close(run, reference, name):
    params, losses, _ = run
    np.testing.assert_allclose(losses, reference[1], rtol=1e-5, atol=1e-5, err_msg=f"{name}: losses")
    assert len(params) == len(reference[0])
    for index, (ours, theirs) in enumerate(zip(params, reference[0])):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=f"{name}: parameter {index}")


def test_mesh_run_equals_one_device_run(runs):
    results, facts = runs
    assert_close(results["straight8"], results["single"], "data=2,fsdp=4")
    # the parameters really were split: a weight matrix spans all 8 devices, sharded over fsdp
    assert facts["devices"] == 8 and "fsdp" in facts["spec"]


def test_resume_on_the_same_layout_is_exact(runs):
    results, _ = runs
    params, losses, resumed_from = results["resumed8"]
    straight_params, straight_losses, _ = results["straight8"]
    assert resumed_from == 2
    np.testing.assert_array_equal(losses, straight_losses)
    for ours, theirs in zip(params, straight_params):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["resumed4", "resumed1"])
def test_checkpoint_saved_on_8_devices_continues_on_fewer(runs, name):
    results, _ = runs
    assert results[name][2] == 2
    # the first two losses come from the checkpoint, the rest were trained on the new layout
    np.testing.assert_array_equal(results[name][1][:2], results["straight8"][1][:2])
    assert_close(results[name], results["single"], name)


def test_micro_batch_that_does_not_split_over_the_mesh_is_refused_first(runs):
    _, facts = runs
    assert facts["error"] == ("a micro-batch of 6 rows (batch_size 12 / grad_accum 2) cannot be split over the 8 "
                              "devices of mesh data=2,fsdp=4's data x fsdp axes; make batch_size / grad_accum a "
                              "multiple of 8")
