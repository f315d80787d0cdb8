"""Multi-process runs: jax.distributed settings and their errors, the CLI's device flags, MAP-D's ``decode``, and
pool building on two localhost processes (CPU gloo collectives) and on an 8-device mesh, each giving the pool a
single process on one device gives.

The multi-process part runs ``mapjax pool`` in fresh Pythons (jax.distributed must start before the backend):
two processes build a pool while one of them is interrupted after its first chunk, then two processes resume it
(merging the parts) and, on a copy of the interrupted files, one process resumes both parts; all three pools are
byte for byte the single-process pool. An 8-device subprocess builds it with ``--mesh data=8``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.cli import main
from mapjax.distributed import (
    DistributedError,
    barrier,
    check_coordinator,
    check_settings,
    contiguous_share,
    detected_cluster,
    gather,
    initialize,
    is_primary,
    process_slice,
)
from mapjax.errors import DecodeError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"w{3 + i} w{20 + i}" + " w7" * (i % 4) for i in range(7)]
CLUSTER_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                     "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS", "MAPJAX_DISTRIBUTED")

# A worker that runs ``mapjax`` but raises KeyboardInterrupt (as a kill would stop it) when it starts scoring chunk
# number LIMIT + 1 of its own, i.e. after LIMIT chunks are safely on disk.
WORKER = r'''
import sys

import mapjax.scoring as scoring
from mapjax.cli import main

limit, scored = int(sys.argv[1]), [0]
score_chunk = scoring.score_chunk


def score_or_stop(*args, **kwargs):
    scored[0] += 1
    if scored[0] > limit:
        raise KeyboardInterrupt("simulated kill")
    return score_chunk(*args, **kwargs)


scoring.score_chunk = score_or_stop   # mapjax.build scores every chunk through scoring.score_chunk
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(autouse=True)
def _single_process_environment(monkeypatch):
    """No cluster launcher in the environment of the tests (a CI runner under SLURM would otherwise count)."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------- settings
def test_contiguous_share_covers_every_item_once_in_order():
    for count in range(0, 12):
        for parts in range(1, 6):
            shares = [contiguous_share(count, index, parts) for index in range(parts)]
            assert [i for share in shares for i in range(count)[share]] == list(range(count))
            sizes = [share.stop - share.start for share in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert contiguous_share(7, 1, 2) == slice(4, 7)
    with pytest.raises(DistributedError, match="cannot take part 2 of 2 of 5 items"):
        contiguous_share(5, 2, 2)


def test_explicit_settings_are_all_or_nothing_and_checked():
    assert check_settings(None, None, None) is None
    assert check_settings("10.0.0.1:1234", 2, 1) == ("10.0.0.1:1234", 2, 1)
    assert check_coordinator("[::1]:8476") == "[::1]:8476" and check_coordinator("node-7.cluster:80")
    with pytest.raises(DistributedError, match=r"num_processes=2 given without coordinator, process_id"):
        check_settings(None, 2, None)
    with pytest.raises(DistributedError, match="'node001' is not HOST:PORT"):
        check_settings("node001", 2, 0)
    with pytest.raises(DistributedError, match="port 70000 is not in 1..65535"):
        check_settings("node001:70000", 2, 0)
    with pytest.raises(DistributedError, match=r"process_id must be in 0..1 \(num_processes=2\), got 2"):
        check_settings("node001:1234", 2, 2)
    with pytest.raises(DistributedError, match="num_processes must be >= 1, got 0"):
        check_settings("node001:1234", 0, 0)
    with pytest.raises(DistributedError, match="process_id must be a whole number, got '1'"):
        check_settings("node001:1234", 2, "1")
    with pytest.raises(DistributedError, match=r"process_id must be in 0..1 \(num_processes=2\), got -1"):
        initialize("node001:1234", 2, -1)   # checked before JAX is touched


def test_cluster_detection_from_the_environment():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detected_cluster(slurm) == "slurm"
    assert detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None   # one task needs no coordinator
    assert detected_cluster({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert detected_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "tpu"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert detected_cluster({"MAPJAX_DISTRIBUTED": "1"}) == "env"
    assert detected_cluster({**slurm, "MAPJAX_DISTRIBUTED": "0"}) is None
    assert detected_cluster({}) is None


def test_single_process_helpers_and_a_late_start():
    import jax

    initialize()   # no cluster: nothing to start, and again
    initialize()
    assert not jax.distributed.is_initialized()
    jax.devices()   # the backend runs now: too late for jax.distributed
    assert process_slice(5) == slice(0, 5) and is_primary()
    barrier("nothing to wait for")
    np.testing.assert_array_equal(gather(np.int32(3)), [3])
    with pytest.raises(DistributedError, match="must be initialised before any other JAX call"):
        initialize("127.0.0.1:1234", 2, 0)


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2"], "--num-processes given without --coordinator, --process-id"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
    (["--coordinator", "nohost"], "'nohost' is not HOST:PORT"),
    (["--num-processes", "0"], "must be an integer >= 1"),
])
def test_device_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4\n")
    # a hub id that is not cached: loading it would fail, so an error about the flags came first
    status = main(["pool", "--policy", "nobody/no-such-model", "--prompts", str(prompts), "--values", "diversity",
                   "--out", str(tmp_path / "pool.jsonl"), *flags])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("pool.jsonl*"))


# ----------------------------------------------------------------------------------- building on several processes
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _outside_any_cluster() -> dict[str, str]:
    """This process's environment without the variables from which jax.distributed would detect a cluster."""
    return {key: value for key, value in os.environ.items() if key not in CLUSTER_VARIABLES}


def _pool_arguments(policy: Path, prompts: Path, out: Path) -> list[str]:
    return ["pool", "--policy", str(policy), "--prompts", str(prompts), "--values", "diversity,perplexity",
            "--samples", "2", "--out", str(out), "--max-new-tokens", "4", "--chunk-size", "2", "--seed", "3",
            "--quiet"]


def _run_processes(host_devices, worker: Path, arguments: list[str], limits: list[int], timeout: float = 300
                   ) -> list[subprocess.CompletedProcess]:
    """``mapjax`` on ``len(limits)`` localhost processes joined by jax.distributed; process i stops after
    ``limits[i]`` chunks."""
    coordinator = f"127.0.0.1:{_free_port()}"
    environment = host_devices.environment(1, _outside_any_cluster())
    running = [subprocess.Popen([sys.executable, str(worker), str(limit), *arguments, "--coordinator", coordinator,
                                 "--num-processes", str(len(limits)), "--process-id", str(index)],
                                cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for index, limit in enumerate(limits)]
    try:
        return [subprocess.CompletedProcess(process.args, process.wait(timeout), *process.communicate())
                for process in running]
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def single(tiny_policy_folder, tmp_path_factory):
    """The pool one process builds on one device (in this process), and the files the builds read."""
    folder = tmp_path_factory.mktemp("distributed")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    policy = tiny_policy_folder("gpt2")
    out = folder / "single" / "pool.jsonl"
    assert main(_pool_arguments(policy, prompts, out)) == 0
    return policy, prompts, out


@pytest.mark.slow
def test_two_processes_interrupted_then_resumed_build_the_single_process_pool(single, tmp_path, host_devices):
    policy, prompts, reference = single
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "two" / "pool.jsonl"
    arguments = _pool_arguments(policy, prompts, out)

    # 7 prompts in chunks of 2: process 0 builds chunks 0-1 (prompts 0-3), process 1 chunks 2-3 (prompts 4-6) and is
    # stopped after its first; process 0 learns it and stops too, without hanging on a barrier.
    first, second = _run_processes(host_devices, worker, arguments, [100, 1])
    assert "simulated kill" in second.stderr, second.stderr[-3000:]
    assert first.returncode == 2, first.stderr[-3000:]
    assert "process(es) [1] of 2 stopped while building its part" in first.stderr
    parts = {index: json.loads((out.parent / f"pool.jsonl.part-{index}-of-2.jsonl.manifest.json").read_text())
             for index in (0, 1)}
    assert parts[0]["complete"] and parts[0]["prompts_done"] == 4
    assert not parts[1]["complete"] and parts[1]["prompts_done"] == 2
    assert parts[1]["part"] == {"index": 1, "count": 2, "first_prompt": 4, "end_prompt": 7}
    assert not out.exists() and not (out.parent / "pool.jsonl.manifest.json").exists()
    copy = tmp_path / "copy"
    shutil.copytree(out.parent, copy)

    # two processes resume: process 1 builds its last chunk, process 0 (nothing left) merges
    done = _run_processes(host_devices, worker, arguments, [100, 100])
    assert [run.returncode for run in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert "7 prompts, 14 samples" in done[0].stdout and "samples" not in done[1].stdout   # process 0 speaks
    manifest = json.loads((out.parent / "pool.jsonl.manifest.json").read_text())
    assert manifest["complete"] and manifest["parts"] == 2
    assert sorted(path.name for path in out.parent.iterdir()) == ["pool.jsonl", "pool.jsonl.manifest.json"]

    # one process resumes the two-process files: it builds what part 1 lacks and merges
    assert main(_pool_arguments(policy, prompts, copy / "pool.jsonl")) == 0
    assert (copy / "pool.jsonl").read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_pool_on_an_eight_device_mesh_is_the_one_device_pool(single, tmp_path, host_devices):
    policy, prompts, reference = single
    out = tmp_path / "mesh" / "pool.jsonl"
    done = host_devices.run(["-m", "mapjax.cli", *_pool_arguments(policy, prompts, out), "--mesh", "data=8"],
                            devices=8, env=_outside_any_cluster(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded, one = RewardPool.load(out), RewardPool.load(reference)
    assert sharded.generations == one.generations and sharded.prompts == one.prompts
    np.testing.assert_allclose(sharded.rewards, one.rewards, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- MAP-D
@pytest.mark.slow
def test_decode_draws_scores_and_chooses_like_the_pool_route(tiny_model, word_tokenizer, tmp_path):
    from mapjax.build import build_pool
    from mapjax.decode import decode, decode_pool

    model, tokenizer = tiny_model("gpt2"), word_tokenizer()
    lam = {"diversity": 1.5}
    options = dict(max_new_tokens=4, batch_size=8, seed=5, progress=False)
    with pytest.raises(DecodeError, match="rule must be 'softmax' or 'argmax'"):
        decode(model, tokenizer, PROMPTS, lam, rule="best")
    with pytest.raises(DecodeError, match="values is needed with λ given as a vector"):
        decode(model, tokenizer, PROMPTS, [1.0])
    with pytest.raises(DecodeError, match="k \\(candidates per prompt\\) must be an integer >= 1, got 0"):
        decode(model, tokenizer, PROMPTS, lam, k=0)
    result = decode(model, tokenizer, PROMPTS[:3], lam, k=3, candidates_out=tmp_path / "candidates.jsonl", **options)
    candidates = build_pool(model, tokenizer, PROMPTS[:3], ["diversity"], samples_per_prompt=3, **options)
    expected = decode_pool(candidates, lam, seed=5)
    np.testing.assert_array_equal(result.choice, expected.choice)
    assert result.result.generations == expected.result.generations
    assert RewardPool.load(tmp_path / "candidates.jsonl").generations == candidates.generations


# ------------------------------------------------------------------------------------------------ MAP-F, 2 processes
def _finetune_arguments(policy: Path, pool: Path, out: Path) -> list[str]:
    return ["finetune", "--policy", str(policy), "--pool", str(pool), "--palette", "perplexity>=mean",
            "--method", "weighted", "--out", str(out), "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
            "--eval-prompts", "0", "--quiet"]


@pytest.mark.slow
def test_two_process_finetuning_trains_the_one_process_model(single, tmp_path, host_devices):
    """``mapjax finetune --mesh data=2`` over two localhost processes (one device each, gloo collectives): one
    program whose batch rows are split across the processes; the model both end with, exported by process 0 alone,
    is the one a single process trains."""
    from safetensors.numpy import load_file

    policy, _, pool = single
    one = tmp_path / "one"
    assert main(_finetune_arguments(policy, pool, one)) == 0
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    two = tmp_path / "two"
    runs = _run_processes(host_devices, worker, _finetune_arguments(policy, pool, two) + ["--mesh", "data=2"], [100, 100])
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    expected, got = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    assert np.abs(got["transformer.h.0.mlp.c_fc.weight"] - load_file(Path(policy) / "model.safetensors")[
        "transformer.h.0.mlp.c_fc.weight"]).max() > 1e-4   # it trained
