"""The LP certificate's two formulations agree; p_λ's weights are computed in one place."""

import numpy as np
import pytest

from mapjax import RewardPool, solve
from mapjax.certificate import certify, largest_step
from mapjax.errors import InputError, SolverError
from mapjax.problem import DualProblem, tilt_weights


def random_targets(pool: RewardPool, rng, count: int) -> np.ndarray:
    """Levels between the mean and the maximum, each value constrained with probability 0.6."""
    low, high = pool.means(), pool.flat().max(axis=0)
    targets = rng.uniform(low, high, size=(count, pool.num_values))
    keep = rng.random(targets.shape) < 0.6
    keep[~keep.any(axis=1), 0] = True
    return np.where(keep, targets, np.nan)


@pytest.mark.slow
@pytest.mark.parametrize("normaliser", ["pooled", "per_prompt"])
def test_decomposed_lp_equals_the_primal_lp(pilot, ragged_pool_factory, normaliser):
    pools = [ragged_pool_factory(seed=seed, prompts=40 + 25 * seed, max_samples=3 + seed) for seed in range(4)]
    rng = np.random.default_rng(11)
    verdicts = []
    for pool in pools + [pilot]:
        problem = DualProblem.from_pool(pool, normaliser)
        for targets in random_targets(pool, rng, 12):
            fast = certify(problem, targets)
            primal = certify(problem, targets, formulation="primal")
            assert fast.feasible == primal.feasible
            assert fast.margin == pytest.approx(primal.margin, abs=1e-7)
            verdicts.append(fast.feasible)
            # The direction is a Farkas certificate for the margin it reports.
            scaled_targets = problem.to_scaled_targets(np.nan_to_num(targets))
            best = np.where(np.isfinite(problem.log_base), problem.scaled @ fast.direction, -np.inf).max(axis=1)
            bound = problem.group_weight @ best - fast.direction @ scaled_targets
            if fast.margin != 0.0:
                assert bound == pytest.approx(fast.margin, abs=1e-7)
            # largest_step along one value, the others held (as adjust.greedy asks), and along a span.
            constrained = ~np.isnan(targets)
            base = problem.to_scaled_targets(np.nan_to_num(np.minimum(targets, pool.means())))
            for step in (np.eye(pool.num_values)[np.flatnonzero(constrained)[0]], np.abs(scaled_targets - base)):
                if not np.any(step[constrained] > 0):
                    continue
                fast_step, _ = largest_step(problem, base, step, constrained)
                primal_step, _ = largest_step(problem, base, step, constrained, formulation="primal")
                assert fast_step == pytest.approx(primal_step, abs=1e-7)
    assert any(verdicts) and not all(verdicts)


def test_certify_names_a_bad_formulation(pilot):
    with pytest.raises(SolverError, match="formulation"):
        certify(DualProblem.from_pool(pilot), np.full(pilot.num_values, 0.0), formulation="dense")
    with pytest.raises(SolverError, match="constrains no value"):
        certify(DualProblem.from_pool(pilot), np.full(pilot.num_values, np.nan))


# ------------------------------------------------------------------ p_λ's weights


def test_tilt_weights_per_prompt_and_pooled(ragged_pool):
    pool = ragged_pool
    lam = np.array([0.7, 0.0, 0.3])
    per_prompt = tilt_weights(pool, lam)
    assert per_prompt.shape == pool.mask.shape
    assert np.all(per_prompt[~pool.mask] == 0.0)
    np.testing.assert_allclose(per_prompt.sum(axis=1), 1.0, rtol=1e-12)
    for prompt in range(pool.num_prompts):
        scores = pool.rewards[prompt][pool.mask[prompt]] @ lam
        expected = np.exp(scores - scores.max())
        np.testing.assert_allclose(per_prompt[prompt][pool.mask[prompt]], expected / expected.sum(), rtol=1e-12)
    pooled = tilt_weights(pool, lam, "pooled")
    scores = pool.flat() @ lam
    expected = np.exp(scores - scores.max())
    np.testing.assert_allclose(pooled, expected / expected.sum(), rtol=1e-12)
    # A problem brings its own normaliser.
    np.testing.assert_array_equal(tilt_weights(DualProblem.from_pool(pool, "pooled"), lam), pooled)


@pytest.mark.parametrize("normaliser", ["pooled", "per_prompt"])
def test_tilt_weights_reach_what_the_solver_reports(ragged_pool, normaliser):
    solution = solve(ragged_pool, "v0>=q0.6, v1>=mean", normaliser=normaliser)
    assert solution.status == "optimal"
    weights = tilt_weights(ragged_pool, solution.lam, normaliser)
    if normaliser == "pooled":
        levels = weights @ ragged_pool.flat()
    else:
        levels = np.einsum("pk,pkv->v", weights, ragged_pool.rewards) / ragged_pool.num_prompts
    np.testing.assert_allclose(levels, solution.realised, rtol=1e-10, atol=1e-12)


def test_tilt_weights_reject_bad_input(ragged_pool):
    with pytest.raises(InputError, match="λ has shape"):
        tilt_weights(ragged_pool, np.ones(2))
    with pytest.raises(InputError, match="finite"):
        tilt_weights(ragged_pool, np.array([np.inf, 0.0, 0.0]))
    with pytest.raises(InputError, match="normaliser"):
        tilt_weights(DualProblem.from_pool(ragged_pool, "pooled"), np.zeros(3), "per_prompt")
    with pytest.raises(SolverError, match="normaliser"):
        tilt_weights(ragged_pool, np.zeros(3), "global")
