"""Plots of palettes, realised levels and reward distributions (matplotlib, Agg backend, PNG files).

Every function takes the output path, writes one PNG there and returns the path. It never replaces an existing
file unless called with ``overwrite=True``.

- :func:`radar`: realised levels of one or more models on quantile axes (each value mapped to its quantile in
  the base model's rewards, so values of different units share one scale).
- :func:`reward_histograms`: each value's reward distribution before and after alignment (an aligned pool, or
  the base samples reweighted by p_λ ∝ p0 exp(λᵀr)).
- :func:`pareto_plot`: two values' realised levels under the MORL baseline's random λ and under MAP's random
  feasible palettes, with optional targets and realised points.
- :func:`feasible_region`: a two-value slice of palette space, from c0 to the maximum of each value, the other
  values held at given levels; feasible vs infeasible, a colour for log ESS or ||λ||₁, and the frontier.
  :func:`region_grid` computes it (one ``solve_many`` call) for those who want the numbers.

Pools may be RewardPools or plain reward arrays (see :func:`mapjax.pool.as_pool`; ``values`` names an array's
columns), and palettes any form :func:`mapjax.palette.palette_targets` reads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from mapjax.errors import OutputExistsError, PlotError
from mapjax.evaluate import base_quantile, resolve_targets
from mapjax.palette import Palettes, one_palette_targets
from mapjax.pool import PoolLike, as_pool, unique_names
from mapjax.problem import tilt_weights
from mapjax.solver import Solutions, lambda_for, solve_many

RegionColour = Literal["log_ess", "lambda_l1", "kl"]
REGION_COLOURS: tuple[str, ...] = ("log_ess", "lambda_l1", "kl")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _output(path: str | os.PathLike, overwrite: bool) -> Path:
    """The PNG file a plot writes: ``overwrite`` replaces only a PNG (never a folder, nor a file of another
    kind that happens to end in .png; see :func:`mapjax.outputs.check_file_output`)."""
    from mapjax.outputs import check_file_output

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PlotError(f"{path}: plots are written as PNG; give a path ending in .png")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    path = check_file_output(path, overwrite=overwrite, flag="path", replaceable=_is_png, what="a PNG image")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _is_png(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _save(figure, path: Path) -> Path:
    # Write beside the target and rename, so an interrupted write never leaves a truncated PNG.
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    os.replace(partial, path)
    return path


# ============================================================================ radar


def radar(
    models: Mapping[str, Mapping[str, float]],
    base: PoolLike,
    path: str | os.PathLike,
    *,
    values: Sequence[str] | None = None,
    targets: Palettes | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Realised levels on quantile axes: each model's level of each value as its quantile in the base's rewards.

    Args:
        models: name -> {value: realised level (raw units)}.
        base: the base model's pool, which defines each axis' quantile scale; its own means are drawn too.
        path: the PNG to write.
        values: the axes (default: the first model's values that the base has); at least three.
        targets: an optional palette (a spec resolved on the base, a {value: level} dict, or a vector of levels
            over the axes), drawn dashed.
        title: the figure's title.
        overwrite: replace an existing file.
    """
    if not models:
        raise PlotError("radar needs at least one model")
    if values is not None:
        values = unique_names(values, "values", PlotError)
    base = as_pool(base, values)
    names = list(values) if values is not None else [v for v in next(iter(models.values())) if v in base.value_names]
    if len(names) < 3:
        raise PlotError(f"a radar needs at least three values, got {names}")
    for name in names:
        base.index_of(name)
    palette = resolve_targets(targets, base, names) if targets is not None else {}
    output = _output(path, overwrite)
    plt = _pyplot()
    angles = np.linspace(0.0, 2 * np.pi, len(names), endpoint=False)
    closed = np.append(angles, angles[0])
    figure, axes = plt.subplots(figsize=(6, 6), subplot_kw={"projection": "polar"})

    def draw(levels: Mapping[str, float], label: str, **style) -> None:
        missing = [name for name in names if name not in levels]
        if missing:
            raise PlotError(f"{label} has no level for {missing[0]!r}")
        radii = [base_quantile(base, name, float(levels[name])) for name in names]
        axes.plot(closed, radii + radii[:1], label=label, **style)
        if style.get("fill", True):
            axes.fill(closed, radii + radii[:1], alpha=0.08)

    means = base.means()
    draw({name: means[base.index_of(name)] for name in names}, "base (mean)", color="grey", linewidth=1)
    for label, levels in models.items():
        draw(levels, label, linewidth=2, marker="o")
    if palette:
        present = {name: palette[name] for name in names if name in palette}
        radii = [base_quantile(base, name, float(present[name])) if name in present else np.nan for name in names]
        axes.plot(closed, radii + radii[:1], linestyle="--", color="black", label="palette")
    axes.set_xticks(angles)
    axes.set_xticklabels(names)
    axes.set_ylim(0.0, 1.0)
    axes.set_yticks([0.25, 0.5, 0.75, 1.0])
    axes.set_yticklabels(["q25", "q50", "q75", "q100"], fontsize=8)
    axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    axes.set_title(title or "realised levels as quantiles of the base rewards", pad=20)
    return _save(figure, output)


# ============================================================================ histograms


def tilted_weights(pool: PoolLike, lam, *, values: Sequence[str] | None = None) -> np.ndarray:
    """Weights of the pool's samples (in :meth:`RewardPool.flat` order) under p_λ ∝ p0 exp(λᵀr), pooled.

    ``lam`` is a Solution, a {value: λ} mapping or a vector over the pool's values (see
    :func:`mapjax.solver.lambda_for`).
    """
    pool = as_pool(pool, values)
    return tilt_weights(pool, lambda_for(pool, lam), "pooled")  # p_λ's weights, computed as the solver does


def reward_histograms(
    base: PoolLike,
    path: str | os.PathLike,
    *,
    aligned: Mapping[str, PoolLike] | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    values: Sequence[str] | None = None,
    bins: int = 40,
    overwrite: bool = False,
) -> Path:
    """Each value's reward distribution before (the base pool) and after alignment, one panel per value.

    After alignment is either an aligned model's pool (``aligned``: label -> pool) or the base samples
    reweighted (``weights``: label -> weights over ``base.flat()``, e.g. from :func:`tilted_weights`).
    Dotted lines mark the means. A plain array for an aligned pool has the base's columns.
    """
    if values is not None:
        values = unique_names(values, "values", PlotError)
    base = as_pool(base, values)
    aligned = {label: as_pool(pool, base.value_names) for label, pool in (aligned or {}).items()}
    weights = dict(weights or {})
    names = list(values) if values is not None else list(base.value_names)
    for name in names:
        base.index_of(name)
        for label, pool in aligned.items():
            if name not in pool.value_names:
                raise PlotError(f"the aligned pool {label!r} has no value {name!r}")
    for label, weight in weights.items():
        if np.shape(weight) != (base.num_samples,):
            raise PlotError(f"weights {label!r} have shape {np.shape(weight)}; the base has {base.num_samples} samples")
    output = _output(path, overwrite)
    plt = _pyplot()
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    flat = base.flat()
    for panel, name in enumerate(names):
        axes = grid[panel // columns][panel % columns]
        samples = flat[:, base.index_of(name)]
        edges = np.histogram_bin_edges(samples, bins=bins)
        axes.hist(samples, bins=edges, density=True, alpha=0.45, color="grey", label="base")
        axes.axvline(samples.mean(), color="grey", linestyle=":")
        for index, (label, pool) in enumerate(aligned.items()):
            column = pool.flat()[:, pool.index_of(name)]
            color = f"C{index}"
            axes.hist(column, bins=edges, density=True, histtype="step", linewidth=1.6, color=color, label=label)
            axes.axvline(column.mean(), color=color, linestyle=":")
        for index, (label, weight) in enumerate(weights.items(), start=len(aligned)):
            color = f"C{index}"
            axes.hist(samples, bins=edges, weights=weight, density=True, histtype="step", linewidth=1.6,
                      color=color, label=label)
            axes.axvline(float(np.dot(weight, samples) / np.sum(weight)), color=color, linestyle=":")
        axes.set_title(name)
        if panel == 0:
            axes.legend(fontsize=8)
    for panel in range(len(names), rows * columns):
        grid[panel // columns][panel % columns].axis("off")
    figure.suptitle("reward distributions before and after alignment (dotted: means)")
    figure.tight_layout()
    return _save(figure, output)


# ============================================================================ pairwise Pareto plot


def pareto_plot(
    base: PoolLike,
    x: str,
    y: str,
    path: str | os.PathLike,
    *,
    morl: Solutions | None = None,
    map_palettes: Solutions | None = None,
    targets: Mapping[str, tuple[float, float]] | None = None,
    realised: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    values: Sequence[str] | None = None,
) -> Path:
    """Two values' realised levels: the MORL baseline's random-λ cloud and MAP's random feasible palettes.

    Args:
        base: the base model's pool (its means are drawn as the original model, and the quadrant it opens).
        x, y: the two values.
        morl: Solutions from :func:`mapjax.adjust.random_morl_lambdas` (their realised levels are drawn).
        map_palettes: Solutions from :func:`mapjax.adjust.random_palettes` (their realised levels are drawn).
        targets: label -> (x, y) palette targets, drawn as crosses.
        realised: label -> (x, y) realised levels, drawn as stars.
        title, overwrite: the title; replace an existing file.
        values: the names of a plain reward array's columns.
    """
    base = as_pool(base, values)
    columns = (base.index_of(x), base.index_of(y))
    for label, batch in (("morl", morl), ("map_palettes", map_palettes)):
        if batch is not None and tuple(batch.value_names) != tuple(base.value_names):
            raise PlotError(f"{label} were solved on a pool with values {list(batch.value_names)}, not this base")
    output = _output(path, overwrite)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    if morl is not None:
        points = morl.realised[:, columns]
        axes.scatter(points[:, 0], points[:, 1], s=10, marker="x", alpha=0.55, color="C0",
                     label=f"MORL: random λ ({len(morl)})")
    if map_palettes is not None:
        points = map_palettes.realised[:, columns]
        axes.scatter(points[:, 0], points[:, 1], s=12, alpha=0.6, color="C1",
                     label=f"MAP: random feasible palettes ({len(map_palettes)})")
    means = base.means()
    origin = (means[columns[0]], means[columns[1]])
    axes.scatter(*origin, s=110, color="red", zorder=5, label="original model (c0)")
    axes.axvline(origin[0], color="grey", linestyle="--", linewidth=0.8)
    axes.axhline(origin[1], color="grey", linestyle="--", linewidth=0.8)
    for index, (label, point) in enumerate((targets or {}).items()):
        axes.scatter(*point, marker="P", s=90, color=f"C{index + 2}", edgecolor="black", zorder=6,
                     label=f"{label} target")
    for index, (label, point) in enumerate((realised or {}).items()):
        axes.scatter(*point, marker="*", s=150, color=f"C{index + 2}", edgecolor="black", zorder=6,
                     label=f"{label} realised")
    axes.set_xlabel(f"{x} (expected reward)")
    axes.set_ylabel(f"{y} (expected reward)")
    axes.set_title(title or f"realised levels: {y} vs {x}")
    axes.legend(fontsize=8, loc="best")
    return _save(figure, output)


# ============================================================================ feasible region


@dataclass(frozen=True)
class RegionGrid:
    """A two-value slice of palette space, solved.

    Attributes:
        x, y: the two values.
        x_levels, y_levels: the grid's levels, from c0 to the sample maximum.
        fixed: the other values' levels (NaN where unconstrained), over the pool's values.
        solutions: one per grid point, row-major over (y, x): index = j * len(x_levels) + i.
    """

    x: str
    y: str
    x_levels: np.ndarray
    y_levels: np.ndarray
    fixed: np.ndarray
    solutions: Solutions

    @property
    def feasible(self) -> np.ndarray:
        """[y, x] booleans."""
        return self.solutions.feasible.reshape(len(self.y_levels), len(self.x_levels))

    def colour(self, kind: RegionColour) -> np.ndarray:
        """[y, x] log ESS, ||λ||₁ or KL, NaN where infeasible."""
        if kind == "log_ess":
            values = np.log(self.solutions.ess)
        elif kind == "lambda_l1":
            values = np.nansum(self.solutions.lam, axis=1)
        elif kind == "kl":
            values = self.solutions.kl
        else:
            raise PlotError(f"colour must be one of {REGION_COLOURS}, got {kind!r}")
        values = np.where(self.solutions.feasible, values, np.nan)
        return values.reshape(len(self.y_levels), len(self.x_levels))

    def frontier(self) -> np.ndarray:
        """For each x level, the highest feasible y level on the grid (NaN where none is)."""
        feasible = self.feasible
        highest = np.full(len(self.x_levels), np.nan)
        for i in range(len(self.x_levels)):
            rows = np.flatnonzero(feasible[:, i])
            if rows.size:
                highest[i] = self.y_levels[rows.max()]
        return highest


def region_grid(
    pool: PoolLike,
    x: str,
    y: str,
    *,
    fixed: Palettes | None = None,
    points: int = 30,
    normaliser: str = "pooled",
    values: Sequence[str] | None = None,
) -> RegionGrid:
    """Solve a points x points grid of palettes over (x, y) from c0 to each value's sample maximum, the values
    ``fixed`` holds at their levels (a palette in any form; a vector of levels runs over ``values`` or all of
    the pool's values, NaN where free), all in one ``solve_many`` call."""
    if x == y:
        raise PlotError(f"the two values must differ, got {x!r} twice")
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise PlotError(f"points must be a whole number of at least 2, got {points!r}")
    pool = as_pool(pool, values)
    x_column, y_column = pool.index_of(x), pool.index_of(y)
    held = np.full(pool.num_values, np.nan)
    if fixed is not None:
        held = one_palette_targets(pool, fixed, values, refusal="fixed holds", error=PlotError)
        clash = [name for name, column in ((x, x_column), (y, y_column)) if not np.isnan(held[column])]
        if clash:
            raise PlotError(f"{clash[0]!r} is an axis of the region; leave it out of the fixed levels")
    means, highest = pool.means(), pool.value_range()[1]
    x_levels = np.linspace(means[x_column], highest[x_column], points)
    y_levels = np.linspace(means[y_column], highest[y_column], points)
    grid_x, grid_y = np.meshgrid(x_levels, y_levels)  # [y, x]
    targets = np.repeat(held[None], points * points, axis=0)
    targets[:, x_column] = grid_x.ravel()
    targets[:, y_column] = grid_y.ravel()
    solutions = solve_many(pool, targets, normaliser=normaliser)
    return RegionGrid(x, y, x_levels, y_levels, held, solutions)


def feasible_region(
    pool: PoolLike,
    x: str,
    y: str,
    path: str | os.PathLike,
    *,
    fixed: Palettes | None = None,
    points: int = 30,
    colour: RegionColour = "log_ess",
    grid: RegionGrid | None = None,
    marks: Mapping[str, tuple[float, float]] | None = None,
    overwrite: bool = False,
    values: Sequence[str] | None = None,
) -> Path:
    """The feasible region of a two-value slice of palettes (see :func:`region_grid`; pass ``grid`` to reuse
    one already solved): feasible cells coloured by ``colour``, infeasible ones grey, the grid's frontier
    drawn, and optional ``marks`` (label -> (x, y) palettes)."""
    pool = as_pool(pool, values)
    if colour not in REGION_COLOURS:
        raise PlotError(f"colour must be one of {REGION_COLOURS}, got {colour!r}")
    if grid is None:
        grid = region_grid(pool, x, y, fixed=fixed, points=points, values=values)
    elif (grid.x, grid.y) != (x, y):
        raise PlotError(f"the grid is over ({grid.x}, {grid.y}), not ({x}, {y})")
    output = _output(path, overwrite)
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    figure, axes = plt.subplots(figsize=(6.6, 5.2))
    extent = _cell_edges(grid.x_levels), _cell_edges(grid.y_levels)
    axes.pcolormesh(extent[0], extent[1], np.where(grid.feasible, np.nan, 1.0),
                    cmap=ListedColormap(["#d9d9d9"]), shading="flat")
    mesh = axes.pcolormesh(extent[0], extent[1], grid.colour(colour), cmap="viridis", shading="flat")
    labels = {"log_ess": "log ESS of p_λ", "lambda_l1": "||λ||₁", "kl": "KL(p_λ || p0)"}
    figure.colorbar(mesh, ax=axes, label=labels[colour])
    axes.step(grid.x_levels, grid.frontier(), where="mid", color="red", linewidth=1.8, label="frontier (grid)")
    for index, (label, point) in enumerate((marks or {}).items()):
        axes.scatter(*point, marker="P", s=90, color=f"C{index + 1}", edgecolor="black", zorder=6, label=label)
    held = [f"{name}={level:.3g}" for name, level in zip(pool.value_names, grid.fixed) if not np.isnan(level)]
    share = grid.feasible.mean()
    axes.set_title(f"feasible palettes ({100 * share:.0f}% of the grid; grey: infeasible)"
                   + (f"\nheld: {', '.join(held)}" if held else ""), fontsize=10)
    axes.set_xlabel(f"c[{x}] (from c0 to the sample maximum)")
    axes.set_ylabel(f"c[{y}]")
    axes.legend(fontsize=8, loc="upper right")
    return _save(figure, output)


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells centred on evenly spaced levels."""
    step = centres[1] - centres[0]
    return np.concatenate([centres - step / 2, centres[-1:] + step / 2])
