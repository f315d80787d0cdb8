import numpy as np
import pytest

from mapjax import RewardPool, evaluate_lambdas, solve, solve_many, solve_sequential
from mapjax.certificate import certify
from mapjax.dual import reference_lambdas
from mapjax.problem import DualProblem

from conftest import PAPER_VALUES, make_ragged_pool

MAINTAINED = (0.876, 0.434, -3.337)  # diversity, coherence, perplexity at their pilot means
HHH = {  # MAP.md section 7: palette (humor, helpful, harmless), the paper's λ, the exact λ
    "HHH-50": ((2.460, -1.471, 0.354), (2.53, 0.23, 0.28, 0.02, 0.05, 0.05), (2.543, 0.240, 0.284)),
    "HHH-60": ((2.492, -1.278, 0.675), (6.30, 0.83, 0.93, 0.01, 0.03, 0.03), (6.301, 0.838, 0.933)),
    "HHH-70": ((2.513, -0.967, 0.937), (12.77, 1.53, 1.69, 0.01, 0.02, 0.02), (12.759, 1.530, 1.692)),
    "HHH-80": ((2.534, -0.613, 1.268), None, (29.70, 2.586, 3.055)),
}


def paper_palette(levels):
    return np.array(list(levels) + list(MAINTAINED))


def paper_lambda(solution):
    by_name = solution.lam_by_name()
    return np.array([by_name[name] for name in PAPER_VALUES])


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


@pytest.mark.parametrize("name", list(HHH))
def test_exact_lambda_of_the_paper_palettes(pilot, name):
    levels, _, exact = HHH[name]
    solution = solve(pilot, paper_palette(levels), values=PAPER_VALUES)
    assert_kkt(solution, pilot, tol=1e-7)
    lam = paper_lambda(solution)
    np.testing.assert_allclose(lam[:3], exact, atol=6e-3 if name == "HHH-80" else 6e-4)
    # Diversity, coherence and perplexity are slack: exactly zero, where the reference gives 0.01-0.05.
    assert np.all(lam[3:] == 0.0)
    assert solution.certificate.feasible


def test_hhh80_is_feasible_with_small_ess(pilot):
    solution = solve(pilot, paper_palette(HHH["HHH-80"][0]), values=PAPER_VALUES)
    assert solution.status == "optimal"
    assert solution.ess == pytest.approx(24, abs=1.0)
    assert solution.kl > 0


@pytest.mark.parametrize("name", ["HHH-50", "HHH-60", "HHH-70"])
def test_reference_reproduces_the_paper_lambda(pilot, name):
    levels, paper, _ = HHH[name]
    solution = solve(pilot, paper_palette(levels), values=PAPER_VALUES, method="reference")
    assert solution.status == "optimal"
    np.testing.assert_allclose(paper_lambda(solution), paper, atol=0.005 + 1e-9)
    # The reference never reaches exact zeros and leaves its palette violated.
    assert np.all(paper_lambda(solution)[3:] > 0)
    assert solution.kkt_residual > 1e-2


def test_reference_calls_hhh80_infeasible_by_overflow(pilot):
    palette = paper_palette(HHH["HHH-80"][0])
    reference = solve(pilot, palette, values=PAPER_VALUES, method="reference")
    assert reference.status == "infeasible"
    assert reference.certificate.feasible  # ... while the LP proves it feasible on the sample


@pytest.mark.parametrize("value, level, paper, exact", [
    ("humor", 2.534, 16.44, 16.43), ("gpt2-helpful", -0.613, 0.72, 0.721), ("gpt2-harmless", 1.268, 0.95, 0.952),
])
def test_single_value_palettes(pilot, value, level, paper, exact):
    reference = solve(pilot, {value: level}, method="reference")
    assert reference.lam_by_name()[value] == pytest.approx(paper, abs=0.005 + 1e-9)
    solution = solve(pilot, {value: level})
    assert solution.lam_by_name()[value] == pytest.approx(exact, abs=6e-3)
    assert_kkt(solution, pilot, tol=1e-7)


def test_reference_sequential_multiround_matches_the_authors(pilot):
    # The authors' comment on their HHH-70 example: 5 rounds give
    # [12.5645, 1.4927, 1.6635, 0.0195, 0.0201, 0.0252].
    spec = dict(zip(PAPER_VALUES, paper_palette(HHH["HHH-70"][0])))
    rounds = solve_sequential(pilot, spec, rounds=5, method="reference")
    np.testing.assert_allclose(paper_lambda(rounds[-1]), [12.5645, 1.4927, 1.6635, 0.0195, 0.0201, 0.0252], atol=0.01)


# ------------------------------------------------------------------ properties of the exact solver


def test_lambda_is_zero_when_palette_is_below_the_means(pilot):
    targets = pilot.means() - 0.1 * pilot.flat().std(axis=0)
    solution = solve(pilot, targets)
    assert np.all(solution.lam == 0.0)
    assert solution.iterations == 0
    assert solution.kl == pytest.approx(0.0, abs=1e-12)
    assert solution.ess == pytest.approx(pilot.num_samples)


def test_shift_invariance(pilot):
    palette = paper_palette(HHH["HHH-60"][0])
    base = solve(pilot, palette, values=PAPER_VALUES)
    shifted_rewards = pilot.rewards + np.array([5.0, -2.0, 0.0, 1.0, 0.0, 3.0])
    shifted_pool = RewardPool(shifted_rewards, pilot.mask, pilot.value_names)
    shift_by_name = dict(zip(pilot.value_names, [5.0, -2.0, 0.0, 1.0, 0.0, 3.0]))
    shifted_palette = palette + np.array([shift_by_name[n] for n in PAPER_VALUES])
    shifted = solve(shifted_pool, shifted_palette, values=PAPER_VALUES)
    np.testing.assert_allclose(shifted.lam, base.lam, rtol=1e-6, atol=1e-9)


def test_lambda_grows_with_its_level(pilot):
    levels = np.linspace(pilot.means()[pilot.index_of("humor")], 2.54, 12)
    palettes = [{"humor": float(c), "gpt2-harmless": 0.5} for c in levels]
    lam = solve_many(pilot, palettes).lam[:, pilot.index_of("humor")]
    assert np.all(np.diff(lam) >= -1e-9)
    assert lam[-1] > lam[0]


def test_batched_equals_one_at_a_time(pilot):
    rng = np.random.default_rng(3)
    columns = [pilot.index_of(n) for n in PAPER_VALUES[:3]]
    low, high = pilot.means()[columns], pilot.flat().max(axis=0)[columns]
    palettes = rng.uniform(low, low + 0.4 * (high - low), size=(12, 3))
    batch = solve_many(pilot, palettes, values=PAPER_VALUES[:3])
    for row, palette in enumerate(palettes):
        single = solve(pilot, palette, values=PAPER_VALUES[:3])
        assert single.status == batch[row].status
        if single.status == "optimal":
            np.testing.assert_allclose(single.lam, batch[row].lam, rtol=1e-7, atol=1e-10)
            np.testing.assert_allclose(single.realised, batch[row].realised, rtol=1e-9)


def test_float32_agrees_with_float64(pilot):
    palette = paper_palette(HHH["HHH-70"][0])
    single = solve(pilot, palette, values=PAPER_VALUES, dtype="float32")
    double = solve(pilot, palette, values=PAPER_VALUES, dtype="float64")
    assert single.kkt_residual <= 1e-4
    np.testing.assert_allclose(single.lam, double.lam, rtol=2e-3, atol=1e-6)


def test_verdicts_agree_with_the_lp_on_random_palettes(pilot):
    rng = np.random.default_rng(0)
    problem = DualProblem.from_pool(pilot)
    for m in (3, 6):
        columns = [pilot.index_of(n) for n in PAPER_VALUES[:m]]
        low, high = pilot.means()[columns], pilot.flat().max(axis=0)[columns]
        palettes = rng.uniform(low, high, size=(80, m))
        solutions = solve_many(pilot, palettes, values=PAPER_VALUES[:m])
        checked = 0
        for row, solution in enumerate(solutions):
            certificate = certify(problem, solution.targets)
            if abs(certificate.margin) < 1e-6:
                continue  # on the boundary to within rounding; no verdict to compare
            checked += 1
            assert (solution.status == "optimal") == certificate.feasible, row
            if solution.status == "optimal":
                assert_kkt(solution, pilot, tol=1e-7)
        assert checked >= 70
        assert 0 < solutions.feasible.sum() < len(solutions)


def test_per_prompt_normaliser_on_ragged_pool():
    pool = make_ragged_pool()
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


def test_sensitivity_matches_finite_differences(pilot):
    palette = paper_palette(HHH["HHH-60"][0])
    solution = solve(pilot, palette, values=PAPER_VALUES, sensitivity=True)
    humor = pilot.index_of("humor")
    step = 1e-4
    up, down = palette.copy(), palette.copy()
    up[0] += step
    down[0] -= step
    numeric = (solve(pilot, up, values=PAPER_VALUES).lam - solve(pilot, down, values=PAPER_VALUES).lam) / (2 * step)
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


def test_plain_array_input():
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=(500, 2))
    solution = solve(rewards, np.array([0.3, np.nan]))
    assert solution.value_names == ("r0", "r1")
    assert solution.realised[0] == pytest.approx(0.3 if rewards[:, 0].mean() < 0.3 else rewards[:, 0].mean(), abs=1e-8)
    assert solution.lam[1] == 0.0


def test_jax_reference_matches_the_pytorch_original(pilot):
    torch_reference = pytest.importorskip("torch_reference", reason="benchmarks/ on sys.path")
    pool = pilot.select(PAPER_VALUES)
    palettes = np.stack([paper_palette(HHH[name][0]) for name in ("HHH-50", "HHH-70", "HHH-80")])
    jax_lam, jax_failed = reference_lambdas(pool, palettes)
    torch_lam, torch_ok = torch_reference.reference_lambdas(pool.flat(), palettes)
    np.testing.assert_array_equal(jax_failed, ~torch_ok)
    np.testing.assert_allclose(jax_lam[~jax_failed], torch_lam[torch_ok], atol=1e-3)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 4)), "4 columns but the pool has 6 values"),
    (np.full((1, 6), np.nan), "constrains no value"),
])
def test_bad_palette_arrays(pilot, bad, message):
    with pytest.raises(ValueError, match=message):
        solve_many(pilot, bad)


def test_bad_options(pilot):
    with pytest.raises(ValueError, match="normaliser must be one of"):
        solve(pilot, "humor>=mean", normaliser="global")
    with pytest.raises(ValueError, match="dtype must be"):
        solve(pilot, "humor>=mean", dtype="float16")
    with pytest.raises(ValueError, match="method must be"):
        solve(pilot, "humor>=mean", method="adam")
    with pytest.raises(ValueError, match="pooled"):
        solve(pilot, "humor>=mean", method="reference", normaliser="per_prompt")
