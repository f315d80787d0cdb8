"""Every public entry point reads its inputs through one coercion: a RewardPool or a plain reward array, and a
palette as a spec or a vector of levels, give the same result (``mapjax.pool.as_pool`` and
``mapjax.palette.palette_targets``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

import mapjax
from mapjax import adjust, decode, evaluate, plots
from mapjax.palette import palette_targets
from mapjax.pool import RewardPool

NAMES = ("a", "b", "c")
SPEC = "a>=q0.7, b>=mean"  # written in the pool's value order, so greedy's default priority is the same for both
REGION_SPEC = "c>=mean"


@pytest.fixture(scope="module")
def pool() -> RewardPool:
    """30 prompts with 4 samples each (no empty slots, so the plain array holds exactly the same rewards)."""
    rng = np.random.default_rng(7)
    mixing = np.array([[1.0, 0.3, -0.2], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]])
    return RewardPool(rng.normal(size=(30, 4, 3)) @ mixing, np.ones((30, 4), bool), NAMES)


def palette_in(form: str, pool: RewardPool, spec: str = SPEC) -> Any:
    """The palette as written, or as the vector of levels it resolves to (NaN where unconstrained)."""
    return spec if form == "spec" else palette_targets(pool, spec)[0]


def lambda_in(form: str, pool: RewardPool) -> Any:
    """λ as the Solution of the palette, or as a plain vector."""
    solution = mapjax.solve(pool, SPEC)
    return solution if form == "spec" else np.array(solution.lam)


def comparable(result: Any) -> Any:
    """Plain dicts, lists and arrays that np.testing.assert_equal compares (NaN equal to NaN)."""
    if isinstance(result, RewardPool):
        return {"rewards": result.rewards, "mask": result.mask, "values": result.value_names}
    if isinstance(result, evaluate.Evaluation):
        return {**result.to_dict(), "levels": comparable(result.levels)}
    if isinstance(result, evaluate.LevelReport):
        # The palette's text is how it was written ("a>=q0.7" or "a>=0.159"); its resolved targets must agree.
        return {key: value for key, value in result.to_dict().items() if key != "palette"}
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, decode.DecodeResult):
        return {"choice": result.choice, "result": comparable(result.result), "lam": result.lam,
                "expected": result.expected}
    if isinstance(result, plots.RegionGrid):
        return {"fixed": result.fixed, "feasible": result.feasible, "lam": result.solutions.lam,
                "levels": (result.x_levels, result.y_levels)}
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    if isinstance(result, tuple):
        return [comparable(item) for item in result]
    return result


def png(path) -> bytes:
    return path.read_bytes()


# Each entry point as a call (data, form, values, output path) -> a result; ``values`` names an array's columns.
Call = Callable[[Any, str, Any, Any, RewardPool], Any]
ENTRY_POINTS: dict[str, Call] = {
    # solver
    "solve": lambda data, form, values, out, pool: mapjax.solve(data, palette_in(form, pool), values=values),
    "solve_many": lambda data, form, values, out, pool: mapjax.solve_many(
        data, [palette_in(form, pool)] * 2 if form == "spec" else np.stack([palette_in(form, pool)] * 2),
        values=values),
    "evaluate_lambdas": lambda data, form, values, out, pool: mapjax.evaluate_lambdas(
        data, np.nan_to_num(lambda_in("vector", pool))[None], values=values),
    # adjust
    "adjust.interpolate": lambda data, form, values, out, pool: adjust.interpolate(
        data, palette_in(form, pool, "a>=q0.95, b>=q0.95, c>=q0.9"), values=values),
    "adjust.greedy": lambda data, form, values, out, pool: adjust.greedy(
        data, palette_in(form, pool, "a>=q0.95, b>=q0.95, c>=q0.9"), values=values),
    "adjust.grid": lambda data, form, values, out, pool: adjust.grid(
        data, palette_in(form, pool, "a>=q0.95, b>=q0.95, c>=q0.9"), values=values, points=5),
    "adjust.random_palettes": lambda data, form, values, out, pool: adjust.random_palettes(
        data, NAMES, 5, seed=1)[0],
    "adjust.random_morl_lambdas": lambda data, form, values, out, pool: adjust.random_morl_lambdas(
        data, NAMES, 5, seed=1),
    # decode
    "solver.lambda_for": lambda data, form, values, out, pool: mapjax.solver.lambda_for(
        data, lambda_in(form, pool), values=values),
    "decode.selection_scores": lambda data, form, values, out, pool: decode.selection_scores(
        data, lambda_in(form, pool), values=values),
    "decode.selection_probabilities": lambda data, form, values, out, pool: decode.selection_probabilities(
        data, lambda_in(form, pool), values=values),
    "decode.select": lambda data, form, values, out, pool: decode.select(
        data, lambda_in(form, pool), seed=2, values=values),
    "decode.selected": lambda data, form, values, out, pool: decode.selected(
        data, decode.select(pool, lambda_in(form, pool), seed=2), values=values),
    "decode.expected_levels": lambda data, form, values, out, pool: decode.expected_levels(
        data, lambda_in(form, pool), values=values),
    "decode.first_samples": lambda data, form, values, out, pool: decode.first_samples(data, values=values),
    "decode.decode_pool": lambda data, form, values, out, pool: decode.decode_pool(
        data, lambda_in(form, pool), seed=2, values=values),
    # evaluate (the data against itself shifted, matched by prompt row)
    "evaluate.realised_levels": lambda data, form, values, out, pool: evaluate.realised_levels(
        data, palette_in(form, pool), base=data, values=values),
    "evaluate.evaluate": lambda data, form, values, out, pool: evaluate.evaluate(
        np.asarray(pool.rewards) + 0.1 if values is not None else RewardPool(pool.rewards + 0.1, pool.mask, NAMES),
        data, palette_in(form, pool), values=values),
    "evaluate.resolve_targets": lambda data, form, values, out, pool: evaluate.resolve_targets(
        palette_in(form, pool), data, values),
    "evaluate.win_rates": lambda data, form, values, out, pool: evaluate.win_rates(data, pool, values=values),
    "evaluate.shared_values": lambda data, form, values, out, pool: evaluate.shared_values(data, pool, values),
    "evaluate.match_prompts": lambda data, form, values, out, pool: evaluate.match_prompts(data, pool),
    "evaluate.base_quantile": lambda data, form, values, out, pool: evaluate.base_quantile(
        data, "b", 0.25, values=values),
    "evaluate.quantile_table": lambda data, form, values, out, pool: evaluate.quantile_table(
        {"m": {"a": 0.5, "b": 0.1, "c": -0.2}}, data, values),
    # plots
    "plots.tilted_weights": lambda data, form, values, out, pool: plots.tilted_weights(
        data, lambda_in(form, pool), values=values),
    "plots.region_grid": lambda data, form, values, out, pool: plots.region_grid(
        data, "a", "b", fixed=palette_in(form, pool, REGION_SPEC), points=4, values=values),
    "plots.feasible_region": lambda data, form, values, out, pool: png(plots.feasible_region(
        data, "a", "b", out, fixed=palette_in(form, pool, REGION_SPEC), points=4, values=values)),
    "plots.radar": lambda data, form, values, out, pool: png(plots.radar(
        {"m": {"a": 0.5, "b": 0.1, "c": -0.2}}, data, out, targets=palette_in(form, pool), values=values)),
    "plots.reward_histograms": lambda data, form, values, out, pool: png(plots.reward_histograms(
        data, out, aligned={"shifted": pool.rewards + 0.5}, values=values)),
    "plots.pareto_plot": lambda data, form, values, out, pool: png(plots.pareto_plot(
        data, "a", "b", out, morl=adjust.random_morl_lambdas(pool, ["a", "b"], 5, seed=0), values=values)),
}


# Entry points that take seconds each (many palettes solved per call; a grid of solves drawn to a figure), so
# they run with the slow tier.
SLOW_ENTRY_POINTS = {"adjust.random_palettes", "plots.feasible_region"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_ENTRY_POINTS else name
                                  for name in sorted(ENTRY_POINTS)])
def test_pool_or_array_and_spec_or_vector_give_the_same_result(name, pool, tmp_path):
    call = ENTRY_POINTS[name]
    array = np.array(pool.rewards)  # [prompts, samples, values], a plain array
    results = {}
    for data_kind, data, values in (("pool", pool, None), ("array", array, list(NAMES))):
        for form in ("spec", "vector"):
            results[data_kind, form] = comparable(call(data, form, values, tmp_path / f"{data_kind}-{form}.png", pool))
    reference = results["pool", "spec"]
    for key, result in results.items():
        np.testing.assert_equal(result, reference, err_msg=f"{name}: {key} differs from (pool, spec)")


def test_every_public_entry_point_is_covered():
    """A new public function of these modules that takes a pool or a palette must join ENTRY_POINTS."""
    not_entry_points = {
        "adjust": set(),
        "decode": {"decode"},   # decode() samples a policy on prompts: no pool to coerce
        "evaluate": {"navigation_efficiency"},  # takes levels, not a pool
        "plots": set(),
    }
    for module in (adjust, decode, evaluate, plots):
        short = module.__name__.rsplit(".", 1)[1]
        public = {
            name for name, value in vars(module).items()
            if callable(value) and not isinstance(value, type) and not name.startswith("_")
            and getattr(value, "__module__", None) == module.__name__
        }
        missing = public - not_entry_points[short] - {key.split(".", 1)[1] for key in ENTRY_POINTS
                                                      if key.startswith(short + ".")}
        assert not missing, f"{short}: {sorted(missing)} not covered"
