"""The exact solver: the paper's numbers, its properties, one verdict with the LP, and its entry points."""

import numpy as np
import pytest

from mapjax import RewardPool, evaluate_lambdas, solve, solve_many, solve_sequential
from mapjax.certificate import certify
from mapjax.errors import MapjaxError, PaletteError, SolverError
from mapjax.problem import DualProblem


def paper_lambda(solution, paper_values):
    by_name = solution.lam_by_name()
    return np.array([by_name[name] for name in paper_values])


def assert_kkt(solution, pool, tol=1e-6):
    """Primal feasibility, λ >= 0, complementary slackness, exact zeros on slack constraints."""
    assert solution.status == "optimal"
    scale = pool.flat().std(axis=0)
    constrained = solution.constrained
    gap = (solution.realised - solution.targets) / scale
    assert np.all(solution.lam >= 0)
    assert np.all(gap[constrained] >= -tol)
    active = solution.lam > 0
    assert np.all(np.abs(gap[active]) <= tol)
    assert np.all(solution.lam[~constrained] == 0.0)
    slack = constrained & (gap > 10 * tol)
    assert np.all(solution.lam[slack] == 0.0)


# ------------------------------------------------------------------ the numbers of MAP.md section 7


@pytest.mark.parametrize("name", ["HHH-50", "HHH-60", "HHH-70", "HHH-80"])
def test_exact_lambda_of_the_paper_palettes(pilot, paper_values, paper_hhh, name):
    solution = solve(pilot, paper_hhh[name]["levels"], values=paper_values)
    assert_kkt(solution, pilot, tol=1e-7)
    lam = paper_lambda(solution, paper_values)
    np.testing.assert_allclose(lam[:3], paper_hhh[name]["exact"], atol=6e-3 if name == "HHH-80" else 6e-4)
    # Diversity, coherence and perplexity are slack: exactly zero, where the reference gives 0.01-0.05.
    assert np.all(lam[3:] == 0.0)
    assert solution.certificate.feasible


def test_hhh80_is_feasible_with_small_ess(pilot, paper_values, paper_hhh):
    solution = solve(pilot, paper_hhh["HHH-80"]["levels"], values=paper_values)
    assert solution.status == "optimal"
    assert solution.ess == pytest.approx(24, abs=1.0)
    assert solution.kl > 0
    assert not solution.degenerate


@pytest.mark.parametrize("value, level, paper, exact", [
    ("humor", 2.534, 16.44, 16.43), ("gpt2-helpful", -0.613, 0.72, 0.721), ("gpt2-harmless", 1.268, 0.95, 0.952),
])
def test_single_value_palettes(pilot, value, level, paper, exact):
    reference = solve(pilot, {value: level}, method="reference")
    assert reference.lam_by_name()[value] == pytest.approx(paper, abs=0.005 + 1e-9)
    solution = solve(pilot, {value: level})
    assert solution.lam_by_name()[value] == pytest.approx(exact, abs=6e-3)
    assert_kkt(solution, pilot, tol=1e-7)


# ------------------------------------------------------------------ properties of the exact solver


def test_lambda_is_zero_when_palette_is_below_the_means(pilot):
    targets = pilot.means() - 0.1 * pilot.flat().std(axis=0)
    solution = solve(pilot, targets)
    assert np.all(solution.lam == 0.0)
    assert solution.iterations == 0
    assert solution.kl == pytest.approx(0.0, abs=1e-12)
    assert solution.ess == pytest.approx(pilot.num_samples)


def test_shift_invariance(pilot, paper_values, paper_hhh):
    palette = paper_hhh["HHH-60"]["levels"]
    base = solve(pilot, palette, values=paper_values)
    shifted_rewards = pilot.rewards + np.array([5.0, -2.0, 0.0, 1.0, 0.0, 3.0])
    shifted_pool = RewardPool(shifted_rewards, pilot.mask, pilot.value_names)
    shift_by_name = dict(zip(pilot.value_names, [5.0, -2.0, 0.0, 1.0, 0.0, 3.0]))
    shifted_palette = palette + np.array([shift_by_name[n] for n in paper_values])
    shifted = solve(shifted_pool, shifted_palette, values=paper_values)
    np.testing.assert_allclose(shifted.lam, base.lam, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_lambda_grows_with_its_level(pilot):
    levels = np.linspace(pilot.means()[pilot.index_of("humor")], 2.54, 12)
    palettes = [{"humor": float(c), "gpt2-harmless": 0.5} for c in levels]
    lam = solve_many(pilot, palettes).lam[:, pilot.index_of("humor")]
    assert np.all(np.diff(lam) >= -1e-9)
    assert lam[-1] > lam[0]


def test_batched_equals_one_at_a_time(pilot, paper_values):
    rng = np.random.default_rng(3)
    columns = [pilot.index_of(n) for n in paper_values[:3]]
    low, high = pilot.means()[columns], pilot.flat().max(axis=0)[columns]
    palettes = rng.uniform(low, low + 0.4 * (high - low), size=(12, 3))
    batch = solve_many(pilot, palettes, values=paper_values[:3])
    for row, palette in enumerate(palettes):
        single = solve(pilot, palette, values=paper_values[:3])
        assert single.status == batch[row].status
        if single.status == "optimal":
            np.testing.assert_allclose(single.lam, batch[row].lam, rtol=1e-7, atol=1e-10)
            np.testing.assert_allclose(single.realised, batch[row].realised, rtol=1e-9)


@pytest.mark.slow
def test_float32_agrees_with_float64(pilot, paper_values, paper_hhh):
    palette = paper_hhh["HHH-70"]["levels"]
    single = solve(pilot, palette, values=paper_values, dtype="float32")
    double = solve(pilot, palette, values=paper_values, dtype="float64")
    assert single.kkt_residual <= 1e-4
    np.testing.assert_allclose(single.lam, double.lam, rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_verdicts_agree_with_the_lp_on_random_palettes(pilot, paper_values):
    rng = np.random.default_rng(0)
    problem = DualProblem.from_pool(pilot)
    for m in (3, 6):
        columns = [pilot.index_of(n) for n in paper_values[:m]]
        low, high = pilot.means()[columns], pilot.flat().max(axis=0)[columns]
        palettes = rng.uniform(low, high, size=(80, m))
        solutions = solve_many(pilot, palettes, values=paper_values[:m])
        checked = 0
        for row, solution in enumerate(solutions):
            certificate = certify(problem, solution.targets)
            # One verdict: the solver's status is the LP's, on the boundary too.
            assert (solution.status == "optimal") == certificate.feasible, row
            if abs(certificate.margin) < 1e-6:
                continue  # on the boundary to within rounding: no KKT precision to check
            checked += 1
            if solution.status == "optimal":
                assert_kkt(solution, pilot, tol=1e-7)
        assert checked >= 70
        assert 0 < solutions.feasible.sum() < len(solutions)


@pytest.mark.slow
def test_per_prompt_normaliser_on_ragged_pool(ragged_pool):
    pool = ragged_pool
    rng = np.random.default_rng(1)
    low, high = pool.means(), pool.flat().max(axis=0)
    palettes = rng.uniform(low, low + 0.25 * (high - low), size=(40, 3))
    solutions = solve_many(pool, palettes, normaliser="per_prompt", certify=True)
    assert solutions.feasible.any() and not solutions.feasible.all()
    for row, solution in enumerate(solutions):
        assert (solution.status == "optimal") == solution.certificate.feasible, row
        if solution.status != "optimal":
            continue
        assert_kkt(solution, pool, tol=1e-7)
        # The realised level is the average over prompts of each prompt's softmax(λᵀr) mean.
        levels = []
        for prompt in range(pool.num_prompts):
            rewards = pool.rewards[prompt][pool.mask[prompt]]
            logits = rewards @ solution.lam
            weights = np.exp(logits - logits.max())
            levels.append((weights / weights.sum()) @ rewards)
        np.testing.assert_allclose(np.mean(levels, axis=0), solution.realised, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_per_prompt_with_one_sample_per_prompt_cannot_move(pilot):
    single = RewardPool.from_array(pilot.flat(), value_names=pilot.value_names)
    solution = solve(single, "humor>=q0.6", normaliser="per_prompt")
    assert solution.status == "infeasible"
    assert solution.certificate.blocking_values == ("humor",)
    # ... while the pooled normaliser reweights across prompts and reaches it.
    assert solve(single, "humor>=q0.6").status == "optimal"


def test_infeasible_palette_names_the_values_and_the_certificate_holds(pilot):
    solution = solve(pilot, "humor>=q0.99, gpt2-harmless>=q0.99, diversity>=mean")
    assert solution.status == "infeasible"
    assert np.all(np.isnan(solution.lam))
    certificate = solution.certificate
    assert not certificate.feasible and certificate.margin < 0
    assert set(certificate.blocking_values) == {"humor", "gpt2-harmless"}
    # Farkas: for the direction d, the best any reweighting can do falls short of dᵀc.
    problem = DualProblem.from_pool(pilot)
    scaled = problem.scaled[0]
    scaled_targets = problem.to_scaled_targets(np.nan_to_num(solution.targets))
    d = certificate.direction
    assert (scaled @ d).max() - d @ scaled_targets == pytest.approx(certificate.margin, abs=1e-7)
    assert "cannot be reached together" in certificate.explain()


def test_solver_certificate_without_lp(pilot):
    solutions = solve_many(pilot, ["humor>=q0.99, gpt2-harmless>=q0.99"], certify=False)
    assert solutions.status[0] == "infeasible"
    certificate = solutions[0].certificate
    problem = DualProblem.from_pool(pilot)
    d = certificate.direction
    scaled_targets = problem.to_scaled_targets(np.nan_to_num(solutions.targets[0]))
    assert (problem.scaled[0] @ d).max() - d @ scaled_targets <= 0


def test_unconverged_rows_get_the_lp_verdict(pilot):
    solutions = solve_many(pilot, ["humor>=q0.8, gpt2-harmless>=q0.8", "humor>=q0.99, gpt2-harmless>=q0.99"],
                           max_iter=1, dtype="float64")
    assert list(solutions.status) == ["not_converged", "infeasible"]
    assert solutions[0].certificate.feasible and not solutions[1].certificate.feasible


def test_sensitivity_matches_finite_differences(pilot, paper_values, paper_hhh):
    palette = paper_hhh["HHH-60"]["levels"]
    solution = solve(pilot, palette, values=paper_values, sensitivity=True)
    humor = pilot.index_of("humor")
    step = 1e-4
    up, down = palette.copy(), palette.copy()
    up[0] += step
    down[0] -= step
    numeric = (solve(pilot, up, values=paper_values).lam - solve(pilot, down, values=paper_values).lam) / (2 * step)
    np.testing.assert_allclose(solution.sensitivity[:, humor], numeric, rtol=1e-3, atol=1e-6)
    assert np.all(solution.sensitivity[pilot.index_of("diversity")] == 0)


def test_sequential_converges_to_the_joint_solution(pilot):
    spec = "humor>=q0.6, gpt2-helpful>=q0.6, gpt2-harmless>=q0.6"
    joint = solve(pilot, spec)
    rounds = solve_sequential(pilot, spec, rounds=40)
    first, last = rounds[0], rounds[-1]
    assert first.status == "not_converged" and first.violations().max() > 1e-3  # one round falls short
    errors = [np.abs(r.lam - joint.lam).max() for r in rounds]
    assert errors[-1] < 1e-3 * np.abs(joint.lam).max()
    assert errors[-1] < errors[4] < errors[0]
    assert last.realised[pilot.index_of("humor")] == pytest.approx(joint.realised[pilot.index_of("humor")], abs=1e-4)


def test_evaluate_lambdas_returns_the_palettes_they_solve(pilot):
    lam = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]])
    names = ["humor", "gpt2-helpful", "gpt2-harmless"]
    given = evaluate_lambdas(pilot, lam, values=names)
    again = solve_many(pilot, given.targets)
    np.testing.assert_allclose(again.lam, given.lam, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ one verdict at the boundary


@pytest.mark.slow
@pytest.mark.parametrize("normaliser", ["pooled", "per_prompt"])
def test_a_level_at_the_maximum_is_infeasible_everywhere(pilot, normaliser):
    humor = pilot.index_of("humor")
    raw_maximum = np.full(pilot.num_values, np.nan)
    raw_maximum[humor] = pilot.flat()[:, humor].max()
    problem = DualProblem.from_pool(pilot, normaliser)
    for palette in ("humor>=q1", raw_maximum):
        solution = solve(pilot, palette, normaliser=normaliser)
        assert solution.status == "infeasible"
        assert np.all(np.isnan(solution.lam)) and not solution.degenerate
        assert not solution.certificate.feasible and solution.certificate.margin <= 0
        assert not certify(problem, solution.targets).feasible
        for certified in (False, True):
            batch = solve_many(pilot, [palette] if isinstance(palette, str) else palette[None],
                               normaliser=normaliser, certify=certified)
            assert list(batch.status) == ["infeasible"]
            assert not batch[0].certificate.feasible
        for dtype in ("float32", "float64"):
            assert solve_many(pilot, [palette] if isinstance(palette, str) else palette[None],
                              normaliser=normaliser, dtype=dtype).status[0] == "infeasible"
    assert "only in the limit" in solve(pilot, "humor>=q1").certificate.explain()


@pytest.mark.slow
def test_a_palette_on_an_edge_of_the_samples_is_reached_only_in_the_limit():
    # Pooled, the reachable levels are the convex hull of the samples; (0.5, 0.5) is on its edge from (1, 0)
    # to (0, 1): reachable only by weights that leave every other sample, i.e. λ → ∞ along (1, 1).
    pool = RewardPool.from_array(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.3, 0.3], [0.2, 0.1]]))
    solution = solve_many(pool, np.array([[0.5, 0.5]]))[0]
    assert solution.status == "infeasible"
    certificate = solve(pool, np.array([0.5, 0.5])).certificate
    assert certificate.margin == 0.0 and set(certificate.blocking_values) == {"r0", "r1"}
    assert "together only in the limit" in certificate.explain()
    # ... while a point just inside is optimal, with weights on about two samples: degenerate, not infeasible.
    inside = solve(pool, np.array([0.5, 0.5 - 1e-4]))
    assert inside.status == "optimal" and inside.certificate.feasible
    assert inside.ess < 2.5


def test_levels_just_below_the_maximum_follow_the_lp(pilot):
    humor = pilot.index_of("humor")
    top = pilot.flat()[:, humor].max()
    scale = pilot.spread()[humor]
    palettes = np.full((4, pilot.num_values), np.nan)
    palettes[:, humor] = top - scale * np.array([1e-12, 1e-10, 1e-6, 1e-3])
    problem = DualProblem.from_pool(pilot)
    solutions = solve_many(pilot, palettes)
    verdicts = [certify(problem, row).feasible for row in palettes]
    assert verdicts == [False, False, True, True]
    assert list(solutions.feasible) == verdicts
    # Feasible but with p_λ on about one sample: a Solution says so, for decode and finetune to refuse or warn.
    assert solutions.degenerate.tolist() == [False, False, True, True]
    assert solutions[2].to_dict()["degenerate"] is True
    assert "warning" in solutions[2].table()


# ------------------------------------------------------------------ entry points: any data, any palette


@pytest.mark.slow
def test_plain_array_input():
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=(500, 2))
    solution = solve(rewards, np.array([0.3, np.nan]))
    assert solution.value_names == ("r0", "r1")
    assert solution.realised[0] == pytest.approx(0.3 if rewards[:, 0].mean() < 0.3 else rewards[:, 0].mean(), abs=1e-8)
    assert solution.lam[1] == 0.0


@pytest.mark.slow
def test_every_entry_point_takes_an_array_and_any_palette_form(ragged_pool):
    pool = RewardPool.from_array(ragged_pool.flat(), value_names=("a", "b", "c"))
    array = pool.flat()
    spec = "a>=q0.6, b>=mean"
    vector = np.array([np.quantile(array[:, 0], 0.6), array[:, 1].mean(), np.nan])
    expected = solve(pool, spec)
    for data, values in ((pool, None), (array, ["a", "b", "c"])):
        for palette in (spec, {"a": "q0.6", "b": "mean"}, vector):
            assert np.allclose(solve(data, palette, values=values).lam, expected.lam, rtol=1e-12, atol=0)
        many = solve_many(data, np.stack([vector, vector]), values=values)
        assert len(many) == 2 and np.allclose(many.lam, expected.lam, rtol=1e-12, atol=0)
        rounds = solve_sequential(data, vector, values=values, rounds=2)
        assert np.allclose(rounds[-1].lam, solve_sequential(pool, spec, rounds=2)[-1].lam, rtol=1e-12, atol=0)
        given = evaluate_lambdas(data, expected.lam, values=values)
        np.testing.assert_allclose(given.realised[0], expected.realised, rtol=1e-9)
    # A palette array over named values of a pool, for the sequential variant too.
    over_ab = solve_sequential(pool, vector[:2], values=["a", "b"], rounds=2)
    assert np.allclose(over_ab[-1].lam, solve_sequential(pool, spec, rounds=2)[-1].lam, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 4)), "4 columns"),
    (np.full((1, 6), np.nan), "constrains no value"),
    (np.zeros((0, 6)), "no palettes given"),
    ([], "no palettes given"),
])
def test_bad_palette_arrays(pilot, bad, message):
    with pytest.raises(PaletteError, match=message):
        solve_many(pilot, bad)


def test_bad_options(pilot):
    with pytest.raises(SolverError, match="normaliser must be one of"):
        solve(pilot, "humor>=mean", normaliser="global")
    with pytest.raises(SolverError, match="dtype must be"):
        solve(pilot, "humor>=mean", dtype="float16")
    with pytest.raises(SolverError, match="method must be"):
        solve(pilot, "humor>=mean", method="adam")
    with pytest.raises(SolverError, match="pooled"):
        solve(pilot, "humor>=mean", method="reference", normaliser="per_prompt")
    with pytest.raises(SolverError, match="method must be"):
        solve_sequential(pilot, "humor>=mean", method="adam")


@pytest.mark.parametrize("setting, value", [
    ("tol", -1e-6), ("tol", float("nan")), ("tol", float("inf")), ("tol", 0.0), ("tol", "small"),
    ("max_iter", 0), ("max_iter", 2.5), ("max_iter", True),
])
def test_bad_settings_are_named(pilot, setting, value):
    with pytest.raises(SolverError, match=setting):
        solve_many(pilot, ["humor>=mean"], **{setting: value})


def test_bad_sequential_settings_are_named(pilot):
    with pytest.raises(SolverError, match="rounds"):
        solve_sequential(pilot, "humor>=mean", rounds=0)
    with pytest.raises(SolverError, match="tol"):
        solve_sequential(pilot, "humor>=mean", tol=-1.0)
    with pytest.raises(PaletteError, match="one palette"):
        solve_sequential(pilot, ["humor>=mean", "humor>=q0.6"])
    with pytest.raises(PaletteError, match="one palette"):
        solve(pilot, ["humor>=mean", "humor>=q0.6"])


def test_duplicate_value_names_are_named(pilot):
    with pytest.raises(MapjaxError, match="'humor'"):
        solve_many(pilot, np.zeros((1, 2)), values=["humor", "humor"])
    with pytest.raises(MapjaxError, match="'a'"):
        solve(np.zeros((10, 2)), np.array([0.0, np.nan]), values=["a", "a"])
    with pytest.raises(MapjaxError, match="'humor'"):
        evaluate_lambdas(pilot, np.zeros((1, 2)), values=["humor", "humor"])


def test_bad_lambdas_are_named(pilot):
    with pytest.raises(SolverError, match="non-negative"):
        evaluate_lambdas(pilot, -np.ones(pilot.num_values))
    with pytest.raises(SolverError, match="one column"):
        evaluate_lambdas(pilot, np.ones(3))
