"""The authors' solver replicated in JAX: the paper's λ, and agreement with their PyTorch code near overflow."""

import numpy as np
import pytest

from mapjax import RewardPool, solve, solve_sequential
from mapjax.solver import reference_lambdas
from mapjax.solver.reference import _round_to_float32


def paper_lambda(solution, paper_values):
    by_name = solution.lam_by_name()
    return np.array([by_name[name] for name in paper_values])


@pytest.mark.parametrize("name", ["HHH-50", "HHH-60", "HHH-70"])
def test_reference_reproduces_the_paper_lambda(pilot, paper_values, paper_hhh, name):
    solution = solve(pilot, paper_hhh[name]["levels"], values=paper_values, method="reference")
    assert solution.status == "optimal"
    np.testing.assert_allclose(paper_lambda(solution, paper_values), paper_hhh[name]["paper"], atol=0.005 + 1e-9)
    # The reference never reaches exact zeros and leaves its palette violated.
    assert np.all(paper_lambda(solution, paper_values)[3:] > 0)
    assert solution.kkt_residual > 1e-2


def test_reference_calls_hhh80_infeasible_by_overflow(pilot, paper_values, paper_hhh):
    reference = solve(pilot, paper_hhh["HHH-80"]["levels"], values=paper_values, method="reference")
    assert reference.status == "infeasible"
    assert reference.certificate.feasible  # ... while the LP proves it feasible on the sample


def test_reference_sequential_multiround_matches_the_authors(pilot, paper_values, paper_hhh):
    # The authors' comment on their HHH-70 example: 5 rounds give
    # [12.5645, 1.4927, 1.6635, 0.0195, 0.0201, 0.0252].
    spec = dict(zip(paper_values, paper_hhh["HHH-70"]["levels"]))
    rounds = solve_sequential(pilot, spec, rounds=5, method="reference")
    np.testing.assert_allclose(paper_lambda(rounds[-1], paper_values),
                               [12.5645, 1.4927, 1.6635, 0.0195, 0.0201, 0.0252], atol=0.01)


def test_subnormals_are_kept_as_pytorch_keeps_them():
    # (1/mean)/n for a mean near 4e34 is a subnormal float32; XLA's float32 arithmetic flushes it to zero.
    inverse = np.float32(1.0) / np.float32(3.83e34)
    expected = inverse / np.float32(2312)  # numpy keeps subnormals, as PyTorch does
    assert 0 < expected < np.finfo(np.float32).tiny
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        rounded = float(_round_to_float32(jnp.float64(inverse) / 2312))
    assert rounded == float(expected)


def test_a_large_mean_does_not_end_the_run(pilot, paper_values):
    # On this HHH-like palette the run passes a step where mean(exp(λᵀr)) is about 4e34: PyTorch's gradient stays
    # finite there and the run ends without overflow; with the gradient flushed to zero it would overflow.
    pool = pilot.select(paper_values)
    flat = pool.flat()
    levels = np.maximum(np.quantile(flat[:, :3], np.linspace(0.70, 0.84, 40)[21], axis=0), flat[:, :3].mean(axis=0))
    palette = np.concatenate([levels, [0.876, 0.434, -3.337]])[None]
    lam, failed = reference_lambdas(pool, palette)
    assert not failed[0] and np.all(np.isfinite(lam))


# ------------------------------------------------------------------ against the authors' PyTorch code


def near_overflow_palettes(pool: RewardPool, paper_values) -> np.ndarray:
    """Palettes where the authors' run brushes float32 overflow: HHH-like quantile palettes between HHH-70 and
    HHH-84 (their verdict flips from finite to overflow in there), and random palettes with large levels."""
    flat = pool.select(paper_values).flat()
    means = flat.mean(axis=0)
    rows = []
    for q in np.linspace(0.70, 0.84, 40)[::2].tolist() + [np.linspace(0.70, 0.84, 40)[21]]:
        rows.append(np.concatenate([np.maximum(np.quantile(flat[:, :3], q, axis=0), means[:3]), [0.876, 0.434, -3.337]]))
    rng = np.random.default_rng(5)
    rows.extend(rng.uniform(np.quantile(flat, 0.55, axis=0), np.quantile(flat, 0.85, axis=0), size=(20, 6)))
    return np.array(rows)


@pytest.mark.slow
def test_reference_matches_pytorch_near_overflow(pilot, paper_values):
    pytest.importorskip("torch")
    from benchmarks.torch_reference import reference_lambdas as torch_lambdas

    pool = pilot.select(paper_values)
    palettes = near_overflow_palettes(pilot, paper_values)
    jax_lam, jax_failed = reference_lambdas(pool, palettes)
    torch_lam, torch_ok = torch_lambdas(pool.flat(), palettes)
    np.testing.assert_array_equal(jax_failed, ~torch_ok)
    assert 0 < jax_failed.sum() < len(palettes)  # both verdicts occur
    np.testing.assert_allclose(jax_lam[~jax_failed], torch_lam[torch_ok], rtol=1e-4)


def test_reference_matches_pytorch_when_only_the_sum_overflows():
    pytest.importorskip("torch")
    from benchmarks.torch_reference import reference_lambdas as torch_lambdas

    # At λ = 1 every exp(λr) is finite but their sum is not: PyTorch's gradient is then −c (not NaN) and the run
    # goes on; with a level below the rewards it settles at a small λ.
    rewards = np.concatenate([np.full(10, 88.0), np.full(40, -1.0)])[:, None]
    pool = RewardPool.from_array(rewards)
    targets = np.array([[-0.5], [-0.9], [10.0]])
    jax_lam, jax_failed = reference_lambdas(pool, targets)
    torch_lam, torch_ok = torch_lambdas(rewards, targets)
    np.testing.assert_array_equal(jax_failed, ~torch_ok)
    assert list(jax_failed) == [False, False, True]
    np.testing.assert_allclose(jax_lam[:2], torch_lam[:2], rtol=1e-4)


@pytest.mark.slow
def test_jax_reference_matches_the_pytorch_original(pilot, paper_values, paper_hhh):
    pytest.importorskip("torch")
    from benchmarks.torch_reference import reference_lambdas as torch_lambdas

    pool = pilot.select(paper_values)
    palettes = np.stack([paper_hhh[name]["levels"] for name in ("HHH-50", "HHH-70", "HHH-80")])
    jax_lam, jax_failed = reference_lambdas(pool, palettes)
    torch_lam, torch_ok = torch_lambdas(pool.flat(), palettes)
    np.testing.assert_array_equal(jax_failed, ~torch_ok)
    np.testing.assert_allclose(jax_lam[~jax_failed], torch_lam[torch_ok], atol=1e-3)
