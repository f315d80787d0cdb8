"""The benchmark suite (benchmarks/suite.py) runs end to end in ``--tiny`` mode on the GPU machine's package set.

The run is a subprocess from the checkout with ``PYTHONPATH=.``, with gguf, vaderSentiment, datasets, pyarrow
and matplotlib made unimportable (every import finder is wrapped so that it finds nothing under those names, as
on the GPU machine where they are not installed). It must produce every case with finite positive throughputs
and mapjax's outputs must match PyTorch's (float32, tiny models): sampled-token log-probabilities re-scored by
PyTorch, logits, losses of the same training steps, coherence cosines, converged solver results.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN_PACKAGES = ("gguf", "vaderSentiment", "datasets", "pyarrow", "matplotlib")

# Runs the script given as the first argument as __main__ after hiding HIDDEN_PACKAGES (passed in the
# environment): import raises ModuleNotFoundError and importlib.util.find_spec returns None, which is what
# transformers' availability checks look at.
RUNNER = """
import os, runpy, sys

hidden = set(os.environ["SUITE_TEST_HIDDEN"].split(","))


class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec is not None else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


assert not hidden & set(sys.modules), "a hidden package was imported before the runner"
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_suite(out: Path, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SUITE_TEST_HIDDEN": ",".join(HIDDEN_PACKAGES),
                   "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", RUNNER, "benchmarks/suite.py", "--device", "cpu", "--out", str(out), *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--device cpu --tiny`` run of every case: (results.json content, results.md text, process)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the suite compares against PyTorch, which is not installed")
    out = tmp_path_factory.mktemp("suite")
    # One PyTorch thread: on a small shared machine, more make PyTorch's tiny ops crawl (and the test slow).
    done = _run_suite(out, "--tiny", "--torch-threads", "1")
    assert (out / "results.json").is_file(), f"no results.json; stderr:\n{done.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), done


@pytest.mark.slow
def test_every_case_runs_and_agrees_without_the_missing_packages(tiny_run):
    from benchmarks.suite_cases import CASE_NAMES

    report, table, done = tiny_run
    assert done.returncode == 0, done.stderr[-6000:]
    assert [case["case"] for case in report["cases"]] == list(CASE_NAMES)
    for case in report["cases"]:
        assert case["status"] == "ok", f"{case['case']}: {case.get('error')}"
        assert case["rows"], case["case"]
        for row in case["rows"]:
            for field in ("mapjax", "pytorch", "ratio", "mapjax_first_call_s"):
                assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] > 0, (row, field)
            assert math.isfinite(row["mapjax_compile_s"]) and row["mapjax_compile_s"] >= 0, row
            assert row["agree"] is True, row
            assert f"| {case['case']} | {row['name']} |" in table
    assert report["settings"]["dtype"] == "float32" and report["settings"]["tiny"] is True
    assert report["machine"]["jax_device"].startswith("cpu")


@pytest.mark.slow
def test_mapjax_and_pytorch_compute_the_same_things(tiny_run):
    report, _, _ = tiny_run
    rows = {case["case"]: case["rows"] for case in report["cases"]}
    for name in ("generate-smollm2", "generate-llama1b"):
        for row in rows[name]:
            # PyTorch's full forward re-scores mapjax's KV-cache samples: same log-probabilities.
            assert row["checks"]["max_abs_logprob_difference"] < 1e-4, row
            assert row["checks"]["rows_rescored"] >= 1
    lengths = rows["generate-lengths"][0]
    # Both mapjax engines sampled the same rows (the summary the check wrote), and each engine's idle share
    # of slot-steps was measured.
    assert lengths["checks"]["engines"].startswith(f"{lengths['settings']['rows']}/{lengths['settings']['rows']} rows identical")
    assert set(lengths["settings"]["idle_fraction"]) == {"static", "continuous", "pytorch"}
    for name in ("forward-smollm2", "forward-gpt2", "forward-llama1b"):
        assert rows[name][0]["checks"]["relative_logits_difference_row0"] < 1e-5, rows[name]
    for name in ("train-smollm2", "train-gpt2", "train-llama1b"):
        checks = rows[name][0]["checks"]
        assert checks["steps"] >= 2
        assert checks["relative_loss_difference_first"] < 1e-5 and checks["relative_loss_difference_last"] < 1e-5
        assert checks["loss_last"][0] < checks["loss_first"][0]   # the steps did train
    assert rows["encoder-minilm"][0]["checks"]["max_abs_cosine_difference"] < 1e-5
    for row in rows["solver-palettes"]:
        assert row["checks"]["exact_not_converged"] == 0
        assert row["checks"]["reference_palettes_timed"] >= 1
    large = rows["solver-large"][0]["checks"]
    assert large["exact_status"] == "optimal" and large["exact_kkt_residual"] < 1e-6


def test_unknown_case_is_refused_before_any_work(capsys):
    from benchmarks import suite

    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "unused", "--only", "generate-smollm2,no-such-case"])
    assert "no-such-case" in capsys.readouterr().err


def test_an_error_in_one_case_is_recorded_and_the_table_says_so():
    from benchmarks import suite

    report = {
        "machine": {"device": "cpu"}, "settings": {"tiny": True, "dtype": "float32"}, "started": "now",
        "wall_s": 1.0,
        "cases": [{"case": "forward-gpt2", "status": "error", "rows": [], "wall_s": 0.5,
                   "error": "Traceback (most recent call last):\nRuntimeError: out of memory"},
                  {"case": "solver-large", "status": "skipped", "rows": [], "error": "skipped: budget spent"}],
    }
    table = suite.markdown(report)
    assert "| forward-gpt2 | error: RuntimeError: out of memory |" in table
    assert "| solver-large | skipped: budget spent |" in table


# Parameter counts of the published checkpoints (MiniLM without its pooler, which coherence scoring never uses).
PUBLISHED_PARAMETERS = {"smollm2": 134_515_008, "llama1b": 1_235_814_400, "gpt2": 124_439_808,
                        "minilm": 22_565_376}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_full_configs_have_the_real_models_sizes(name):
    """The GPU rows time the real architectures: mapjax builds each full config (shapes only, nothing
    allocated) with exactly the published checkpoint's number of parameters."""
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.suite_models import model_spec
    from mapjax.models import model_class
    from mapjax.models.base import build_abstract

    spec = model_spec(name, tiny=False)
    cls = model_class(spec.architecture)
    config = cls.config_from_hf(spec.hf_config())
    options = {"add_pooling_layer": False} if spec.architecture == "BertModel" else {}
    model = build_abstract(lambda: cls(config, rngs=nnx.Rngs(0), **options))
    count = sum(int(np.prod(value.shape)) for value in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == PUBLISHED_PARAMETERS[name]


# The agreement checks the stand-alone benchmarks run before timing (benchmarks/models.py, generate.py, solver.py).
def test_model_benchmark_agreement_check_refuses_different_outputs():
    import numpy as np
    import torch

    from benchmarks.models import Disagreement, assert_agreement

    logits = np.linspace(-5.0, 5.0, 24, dtype=np.float32).reshape(2, 3, 4)
    close = assert_agreement("row", logits + 1e-5, torch.tensor(logits), tolerance=1e-3)
    assert 0 < close["max_abs_difference"] < 2e-5 and close["max_abs_value"] == 5.0
    shifted = logits.copy()
    shifted[1, 2, 3] += 0.1   # 0.1 is 2e-2 of the largest |value|
    with pytest.raises(Disagreement, match=r"SmolLM2 row: max \|mapjax - PyTorch\| = 0\.1"):
        assert_agreement("SmolLM2 row", shifted, torch.tensor(logits), tolerance=1e-3)
    with pytest.raises(Disagreement, match="shape"):
        assert_agreement("row", logits[:, :2], logits, tolerance=1e-3)
    with pytest.raises(Disagreement, match="non-finite"):
        assert_agreement("row", np.full_like(logits, np.nan), logits, tolerance=1e-3)


def test_generate_benchmark_sample_check_refuses_wrong_logprobs_and_tokens_outside_top_k():
    import numpy as np

    from benchmarks.generate import check_samples
    from benchmarks.models import Disagreement

    tokens = np.array([[5, 7, 9]])
    picked = np.array([[-1.0, -2.0, -3.0]])
    kth = np.array([[-4.0, -4.0, -4.0]])
    result = check_samples("mapjax's samples", tokens, picked, kth, picked + 1e-4, tolerance=2e-3)
    assert result == {"max_abs_logprob_difference": pytest.approx(1e-4), "tokens_checked": 3}
    with pytest.raises(Disagreement, match=r"row 0, new token 1 \(id 7\): log-probability"):
        check_samples("mapjax's samples", tokens, picked, kth, picked + np.array([[0.0, 0.01, 0.0]]), 2e-3)
    below = np.array([[-1.0, -4.5, -3.0]])   # the second token is not among the top k
    with pytest.raises(Disagreement, match=r"new token 1 \(id 7\) is outside PyTorch's top-50"):
        check_samples("PyTorch's samples", tokens, below, kth, below, 2e-3)


def test_solver_benchmark_compares_verdicts_and_lambdas():
    import numpy as np

    from benchmarks.solver import compare_solvers, misses_in_sd, quality, realised_levels
    from mapjax import RewardPool

    feasible = np.array([True, True, False, False])
    other = np.array([True, False, True, False])
    lam = np.array([[1.0, 2.0], [1.0, 1.0], [np.nan, np.nan], [np.nan, np.nan]])
    other_lam = np.array([[1.0, 2.5], [np.nan, np.nan], [3.0, 4.0], [np.nan, np.nan]])
    result = compare_solvers(feasible, lam, other, other_lam)
    assert result["verdict_agreement"] == 0.5
    assert result["infeasible_where_other_feasible"] == 1 and result["feasible_where_other_infeasible"] == 1
    assert result["both_feasible"] == 1 and result["max_abs_lambda_difference"] == 0.5
    assert result["median_relative_lambda_difference"] == pytest.approx(0.5 / np.hypot(1.0, 2.5))

    rewards = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    pool = RewardPool.from_array(rewards)
    realised = realised_levels(pool, np.array([[0.0, 0.0], [np.nan, np.nan]]))
    np.testing.assert_allclose(realised[0], rewards.mean(axis=0))   # λ = 0 reaches the base model's means
    assert np.isnan(realised[1]).all()
    misses = misses_in_sd(np.array([[3.0, 4.0]]), realised[:1], np.array([2.0, 1.0]))
    np.testing.assert_allclose(misses, [0.5])   # (3 - 2) / 2 = 0.5 sd beats (4 - 4) / 1 = 0
    assert quality(np.array([True]), misses)["share_violating_1e-3sd"] == 1.0


def test_pytorch_is_timed_at_one_thread_and_at_every_core_unless_pinned():
    from benchmarks.models import torch_thread_counts

    assert torch_thread_counts("cpu") == sorted({1, os.cpu_count() or 1})
    assert torch_thread_counts("cpu", requested=3) == [3]
    assert torch_thread_counts("cuda") == [None]   # on a GPU the thread count is left alone
