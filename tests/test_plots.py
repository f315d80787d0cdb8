"""mapjax.plots: every plot writes a non-empty PNG, returns its path and refuses to overwrite unasked."""

from __future__ import annotations

import numpy as np
import pytest

from mapjax import RewardPool, adjust, solve
from mapjax.errors import OutputExistsError, PlotError
from mapjax.plots import (
    PNG_SIGNATURE,
    feasible_region,
    pareto_plot,
    radar,
    region_grid,
    reward_histograms,
    tilted_weights,
)


@pytest.fixture(scope="module")
def small_pool() -> RewardPool:
    """Three correlated values, 300 samples, one per prompt."""
    rng = np.random.default_rng(3)
    mixing = np.array([[1.0, 0.3, -0.2], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]])
    return RewardPool.from_array(rng.normal(size=(300, 3)) @ mixing, ("a", "b", "c"))


def assert_png(path, minimum: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > minimum


@pytest.mark.slow
def test_radar(tmp_path, small_pool):
    solution = solve(small_pool, "a>=q0.7, b>=mean")
    levels = dict(zip(small_pool.value_names, solution.realised))
    path = radar({"aligned": levels}, small_pool, tmp_path / "radar.png", targets={"a": solution.targets[0]})
    assert path == tmp_path / "radar.png"
    assert_png(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        radar({"aligned": levels}, small_pool, path)
    before = path.stat().st_mtime_ns
    radar({"aligned": levels}, small_pool, path, overwrite=True)
    assert_png(path)
    assert path.stat().st_mtime_ns >= before
    with pytest.raises(PlotError, match="three values"):
        radar({"aligned": levels}, small_pool, tmp_path / "two.png", values=["a", "b"])
    with pytest.raises(PlotError, match=".png"):
        radar({"aligned": levels}, small_pool, tmp_path / "radar.pdf")
    with pytest.raises(PlotError, match=r"values names \['a'\] more than once"):
        radar({"aligned": levels}, small_pool, tmp_path / "dup.png", values=["a", "b", "c", "a"])
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        radar({"aligned": levels}, small_pool, path, targets="a>=q0.7")
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "dup.png").exists()


@pytest.mark.slow
def test_reward_histograms(tmp_path, small_pool):
    solution = solve(small_pool, "a>=q0.7")
    weights = tilted_weights(small_pool, solution.lam)
    assert weights.sum() == pytest.approx(1.0)
    # Reweighting by p_λ reaches the palette: the weighted mean of a is its target.
    assert np.dot(weights, small_pool.flat()[:, 0]) == pytest.approx(solution.targets[0], abs=1e-6)
    shifted = RewardPool.from_array(small_pool.flat() + 0.5, small_pool.value_names)
    path = reward_histograms(small_pool, tmp_path / "hist.png", aligned={"shifted": shifted}, weights={"p_λ": weights})
    assert_png(path)
    with pytest.raises(FileExistsError):
        reward_histograms(small_pool, path)
    with pytest.raises(PlotError, match="weights"):
        reward_histograms(small_pool, tmp_path / "bad.png", weights={"w": np.ones(3)})


@pytest.mark.slow
def test_pareto_plot(tmp_path, small_pool):
    morl = adjust.random_morl_lambdas(small_pool, ["a", "b"], 40, seed=0)
    palettes, _ = adjust.random_palettes(small_pool, ["a", "b"], 20, seed=0)
    path = pareto_plot(small_pool, "a", "b", tmp_path / "pareto.png", morl=morl, map_palettes=palettes,
                       targets={"P": (0.3, 0.2)}, realised={"P": (0.31, 0.22)})
    assert_png(path)
    with pytest.raises(FileExistsError):
        pareto_plot(small_pool, "a", "b", path, morl=morl)


@pytest.mark.slow
def test_feasible_region(tmp_path, small_pool):
    grid = region_grid(small_pool, "a", "b", fixed={"c": "mean"}, points=8)
    assert grid.feasible.shape == (8, 8)
    # c0 is always reachable (λ = 0); the corner (max a, max b) is not (it is at most on the boundary).
    assert grid.feasible[0, 0] and not grid.feasible[-1, -1]
    # Palettes are downward closed: the frontier never rises as the x level rises.
    frontier = grid.frontier()
    finite = frontier[~np.isnan(frontier)]
    assert np.all(np.diff(finite) <= 1e-12)
    assert np.all(np.isnan(grid.colour("log_ess")[~grid.feasible]))
    path = feasible_region(small_pool, "a", "b", tmp_path / "region.png", grid=grid, colour="lambda_l1",
                           marks={"P": (0.2, 0.2)})
    assert_png(path)
    with pytest.raises(FileExistsError):
        feasible_region(small_pool, "a", "b", path, grid=grid)
    with pytest.raises(PlotError, match="'a' is an axis of the region"):
        region_grid(small_pool, "a", "b", fixed={"a": "mean"}, points=4)
    with pytest.raises(PlotError, match="'b' is an axis of the region"):
        region_grid(small_pool, "a", "b", fixed=[np.nan, 0.0, 0.0], points=4)
    with pytest.raises(PlotError, match="points must be a whole number of at least 2"):
        region_grid(small_pool, "a", "b", points=1)
    with pytest.raises(PlotError, match="colour must be one of"):
        feasible_region(small_pool, "a", "b", tmp_path / "other.png", grid=grid, colour="ess")


def test_region_grid_takes_fixed_levels_in_any_form(small_pool):
    by_spec = region_grid(small_pool, "a", "b", fixed={"c": "mean"}, points=4)
    c_mean = float(by_spec.fixed[2])
    assert c_mean == pytest.approx(small_pool.means()[2], rel=1e-12)
    by_vector = region_grid(small_pool, "a", "b", fixed=[np.nan, np.nan, c_mean], points=4)
    by_named_vector = region_grid(small_pool, "a", "b", fixed=[c_mean], values=["c"], points=4)
    for grid in (by_vector, by_named_vector):
        np.testing.assert_array_equal(grid.fixed, by_spec.fixed)
        np.testing.assert_array_equal(grid.feasible, by_spec.feasible)
