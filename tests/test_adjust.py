import numpy as np
import pytest

from mapjax import RewardPool, adjust, solve
from mapjax.certificate import certify
from mapjax.errors import InputError, MapjaxError
from mapjax.problem import DualProblem

INFEASIBLE = "humor>=q0.9, gpt2-helpful>=q0.9, gpt2-harmless>=q0.9, diversity>=mean, coherence>=mean"


def assert_solves(adjustment, pool):
    """The returned λ solves the returned palette: optimal, and every level reached."""
    solution = adjustment.solution
    assert solution.status == "optimal"
    np.testing.assert_array_equal(solution.targets, adjustment.palette)
    constrained = ~np.isnan(adjustment.palette)
    scale = pool.flat().std(axis=0)
    assert np.all((solution.realised - adjustment.palette)[constrained] / scale[constrained] >= -1e-7)


@pytest.mark.slow
def test_interpolation_stops_just_inside_the_boundary(pilot):
    result = adjust.interpolate(pilot, INFEASIBLE)
    assert 0 < result.rho < 1 and result.changed
    assert_solves(result, pilot)
    problem = DualProblem.from_pool(pilot)
    anchor = np.minimum(result.requested, pilot.means())
    span = result.requested - anchor
    distance = np.linalg.norm(np.nan_to_num(span))
    # 2e-3 further along is past the boundary: the palette is within the 1e-3 tolerance of it.
    beyond = anchor + (result.rho + 2e-3 / distance) * span
    assert not certify(problem, beyond).feasible
    assert np.linalg.norm(np.nan_to_num(result.palette - anchor)) == pytest.approx(result.rho * distance)


def test_interpolation_leaves_a_feasible_palette_alone(pilot):
    result = adjust.interpolate(pilot, "humor>=q0.6, gpt2-harmless>=q0.6")
    assert result.rho == 1.0 and not result.changed
    assert_solves(result, pilot)


@pytest.mark.slow
def test_grid_stops_at_the_first_infeasible_point(pilot):
    result = adjust.grid(pilot, INFEASIBLE, points=10)
    assert_solves(result, pilot)
    exact = adjust.interpolate(pilot, INFEASIBLE)
    assert result.rho <= exact.rho < result.rho + 1 / 9 + 1e-12


def test_greedy_respects_priority(pilot):
    result = adjust.greedy(pilot, INFEASIBLE, priority=["gpt2-harmless", "humor"])
    assert_solves(result, pilot)
    c = dict(zip(pilot.value_names, result.palette))
    asked = dict(zip(pilot.value_names, result.requested))
    assert c["gpt2-harmless"] == pytest.approx(asked["gpt2-harmless"])  # first in line gets its level
    assert c["humor"] <= asked["humor"]
    # helpfulness was left out of the priority list: it stays at min(c, c0).
    assert c["gpt2-helpful"] == pytest.approx(min(asked["gpt2-helpful"], pilot.means()[pilot.index_of("gpt2-helpful")]))
    reversed_order = adjust.greedy(pilot, INFEASIBLE, priority=["humor", "gpt2-harmless"])
    assert dict(zip(pilot.value_names, reversed_order.palette))["humor"] >= c["humor"]


def test_greedy_to_maximum_reaches_the_edge(pilot):
    result = adjust.greedy(pilot, "humor>=mean, gpt2-harmless>=mean", to_maximum=True, tol=1e-3)
    assert_solves(result, pilot)
    c = dict(zip(pilot.value_names, result.palette))
    problem = DualProblem.from_pool(pilot)
    past = result.palette.copy()
    past[pilot.index_of("gpt2-harmless")] += 2e-3
    assert not certify(problem, past).feasible
    assert c["humor"] > 2.59


def test_greedy_priority_must_be_constrained(pilot):
    with pytest.raises(ValueError, match="does not constrain"):
        adjust.greedy(pilot, "humor>=q0.6", priority=["coherence"])


@pytest.mark.slow
def test_adjustment_with_per_prompt_normaliser(ragged_pool):
    pool = ragged_pool
    high = pool.flat().max(axis=0) - 0.05
    result = adjust.interpolate(pool, dict(zip(pool.value_names, high)), normaliser="per_prompt")
    assert result.solution.normaliser == "per_prompt"
    assert_solves(result, pool)


@pytest.mark.slow
def test_random_palettes_are_feasible_with_small_lambda(pilot):
    values = ["humor", "gpt2-helpful", "gpt2-harmless"]
    solutions, rate = adjust.random_palettes(pilot, values, 50, seed=1)
    assert len(solutions) == 50 and 0 < rate < 1
    assert solutions.feasible.all()
    assert np.all(np.nansum(solutions.lam, axis=1) < 6.0)
    columns = [pilot.index_of(n) for n in values]
    assert np.all(solutions.targets[:, columns] >= pilot.means()[columns])
    again, _ = adjust.random_palettes(pilot, values, 50, seed=1)
    np.testing.assert_array_equal(again.targets, solutions.targets)


def test_morl_lambdas_follow_the_paper(pilot):
    values = ["humor", "gpt2-helpful", "gpt2-harmless"]
    solutions = adjust.random_morl_lambdas(pilot, values, 200, seed=0)
    totals = solutions.lam.sum(axis=1)
    assert np.all((totals >= 0) & (totals <= 6.0))
    assert solutions.feasible.all() and np.all(solutions.kkt_residual < 1e-9)
    # A handful of them, re-solved from the palettes they realise, give their λ back.
    check = solve(pilot, solutions.targets[0])
    np.testing.assert_allclose(check.lam, solutions.lam[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ units


@pytest.mark.slow
@pytest.mark.parametrize("factor", [1e-3, 1e-8, 1e3])
@pytest.mark.parametrize("method", ["interpolate", "greedy", "grid"])
def test_adjustment_does_not_depend_on_the_rewards_units(pilot, method, factor):
    """The same data in other units gives the same ρ and the same palette, in those units."""
    rescaled = RewardPool(pilot.rewards * factor, pilot.mask, pilot.value_names)
    adjust_with = getattr(adjust, method)
    here, there = adjust_with(pilot, INFEASIBLE), adjust_with(rescaled, INFEASIBLE)
    constrained = ~np.isnan(here.palette)
    np.testing.assert_array_equal(np.isnan(there.palette), ~constrained)
    np.testing.assert_allclose(there.palette[constrained], factor * here.palette[constrained], rtol=1e-9, atol=0)
    np.testing.assert_allclose(there.requested[constrained], factor * here.requested[constrained], rtol=1e-9, atol=0)
    if method != "greedy":
        assert there.rho == pytest.approx(here.rho, rel=1e-9, abs=1e-12)
        assert 0 < here.rho < 1
    assert there.changed and here.changed
    assert there.solution.status == here.solution.status == "optimal"
    np.testing.assert_allclose(there.solution.lam * factor, here.solution.lam, rtol=1e-6, atol=1e-9)


def test_interpolation_tolerance_is_in_standard_deviations(pilot):
    result = adjust.interpolate(pilot, INFEASIBLE, tol=0.05)
    problem = DualProblem.from_pool(pilot)
    anchor = np.minimum(result.requested, pilot.means())
    span = np.nan_to_num((result.requested - anchor) / problem.scale)
    distance = np.linalg.norm(span)  # standard deviations from the anchor to the request
    step = result.requested - anchor
    # 0.05 sd back from the boundary: 0.04 sd further is still feasible, 0.06 sd further is not.
    assert certify(problem, anchor + (result.rho + 0.04 / distance) * step).feasible
    assert not certify(problem, anchor + (result.rho + 0.06 / distance) * step).feasible


def test_greedy_tolerance_is_in_standard_deviations(pilot):
    result = adjust.greedy(pilot, "humor>=mean, gpt2-harmless>=mean", to_maximum=True, tol=0.05)
    problem = DualProblem.from_pool(pilot)
    column = pilot.index_of("gpt2-harmless")
    for extra, feasible in ((0.04, True), (0.06, False)):
        moved = result.palette.copy()
        moved[column] += extra * problem.scale[column]
        assert certify(problem, moved).feasible is feasible


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf"), "0.1"])
def test_tolerance_must_be_a_finite_non_negative_number(pilot, tol):
    with pytest.raises(InputError, match="tol must be a finite number >= 0"):
        adjust.interpolate(pilot, INFEASIBLE, tol=tol)
    with pytest.raises(InputError, match="tol must be a finite number >= 0"):
        adjust.greedy(pilot, INFEASIBLE, tol=tol)


def test_repeated_names_are_refused(pilot):
    with pytest.raises(InputError, match=r"priority names \['humor'\] more than once"):
        adjust.greedy(pilot, INFEASIBLE, priority=["humor", "gpt2-harmless", "humor"])
    with pytest.raises(InputError, match=r"values names \['humor'\] more than once"):
        adjust.random_palettes(pilot, ["humor", "humor"], 5)
    with pytest.raises(InputError, match=r"values names \['humor'\] more than once"):
        adjust.random_morl_lambdas(pilot, ["humor", "gpt2-helpful", "humor"], 5)
    with pytest.raises(MapjaxError, match=r"values names \['humor'\] more than once"):
        adjust.interpolate(pilot, [2.5, 2.5], values=["humor", "humor"])


def test_counts_and_points_are_checked(pilot):
    with pytest.raises(InputError, match="count must be a whole number of at least 1, got 0"):
        adjust.random_palettes(pilot, ["humor"], 0)
    with pytest.raises(InputError, match="count must be a whole number of at least 1, got 0"):
        adjust.random_morl_lambdas(pilot, ["humor"], 0)
    with pytest.raises(InputError, match="points must be a whole number of at least 2, got 1"):
        adjust.grid(pilot, INFEASIBLE, points=1)
    with pytest.raises(InputError, match="one palette, got 2"):
        adjust.interpolate(pilot, [INFEASIBLE, "humor>=q0.5"])


@pytest.mark.slow
def test_too_few_random_palettes_is_a_named_error(pilot):
    with pytest.raises(adjust.TooFewPalettes, match=r"only \d+ of 50 palettes kept after 100 draws; raise max_l1") as caught:
        adjust.random_palettes(pilot, ["humor", "gpt2-helpful", "gpt2-harmless"], 50, max_l1=0.05, max_draws=1)
    # Both the package's error and, as before, a RuntimeError.
    assert isinstance(caught.value, MapjaxError) and isinstance(caught.value, RuntimeError)
