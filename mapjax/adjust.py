"""Palette adjustment (the paper's Algorithms 2 and 3) and the random palettes of its baselines.

Each adjustment returns the palette it settles on together with the Solution whose λ solves that palette.
Feasibility is decided exactly, by the LP of :mod:`mapjax.certificate`: the largest feasible step along a
direction is itself one LP, so the adjusted palette lies ``tol`` inside the boundary, found in a single solve
rather than by bisection. (A palette exactly on the boundary is reachable only as λ → ∞.)

Tolerances are in standard deviations of each value over the pool (the solver's scaled frame), so the same
data in other units gives the same adjustment, in those units. Every function takes a RewardPool or a plain
reward array (see :func:`mapjax.pool.as_pool`) and a palette in any form (see
:func:`mapjax.palette.palette_targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mapjax.certificate import certify, largest_step
from mapjax.errors import InputError, SolverError
from mapjax.limits import check_grid_points
from mapjax.palette import Palettes, is_spec, one_palette_targets, parse
from mapjax.pool import PoolLike, RewardPool, as_pool, unique_names
from mapjax.problem import DualProblem, Normaliser
from mapjax.solver import Solution, Solutions, concatenate, evaluate_lambdas, solve_many

# How far inside the boundary an adjusted palette stays, in standard deviations of each value (Euclidean for
# interpolation, per value for greedy). The authors stop their bisection at ||Δc|| < 1e-3 and their greedy
# search at 0.05, in raw reward units, which ties the answer to the rewards' units.
INTERPOLATION_TOLERANCE = 1e-3
GREEDY_TOLERANCE = 1e-3


class TooFewPalettes(InputError, RuntimeError):
    """Fewer random palettes passed the ||λ||₁ bound than were asked for (raise ``max_l1`` or ``max_draws``).

    Also a RuntimeError, as this condition was before errors had their own classes.
    """


@dataclass(frozen=True)
class Adjustment:
    """A reachable palette near the requested one.

    Attributes:
        requested: the palette asked for (NaN where unconstrained), over the pool's values.
        palette: the adjusted palette, the same layout.
        solution: λ that solves ``palette`` and what it realises.
        method: "interpolate", "greedy" or "grid".
        rho: for interpolate and grid, the share of the way from the safe anchor min(c, c0) to c.
    """

    requested: np.ndarray
    palette: np.ndarray
    solution: Solution
    method: str
    rho: float | None = None

    @property
    def changed(self) -> bool:
        # Exact: an adjustment that keeps a level returns it bit for bit, so no tolerance (in some unit) is needed.
        both = ~np.isnan(self.requested)
        return not np.array_equal(self.requested[both], self.palette[both])

    def to_dict(self) -> dict:
        names = self.solution.value_names
        return {
            "method": self.method,
            "rho": self.rho,
            "requested": {n: float(v) for n, v in zip(names, self.requested) if not np.isnan(v)},
            "palette": {n: float(v) for n, v in zip(names, self.palette) if not np.isnan(v)},
            "solution": self.solution.to_dict(),
        }


def _one_palette(pool: RewardPool, palette: Palettes, values: Sequence[str] | None) -> np.ndarray:
    """The requested targets over the pool's values: an adjustment starts from exactly one palette."""
    return one_palette_targets(pool, palette, values, refusal="an adjustment starts from", error=InputError)


def _tolerance(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"tol must be a finite number >= 0 (standard deviations), got {tol!r}")
    return float(tol)


def _safe_anchor(pool: RewardPool, requested: np.ndarray) -> np.ndarray:
    """min(c, c0) on the constrained values: feasible, because c0 is (λ = 0) and palettes are downward closed."""
    return np.where(np.isnan(requested), np.nan, np.minimum(requested, pool.means()))


def _solve_one(pool, palette, normaliser) -> Solution:
    return solve_many(pool, palette[None], normaliser=normaliser, certify=True)[0]


def interpolate(
    data: PoolLike,
    palette: Palettes,
    *,
    values: Sequence[str] | None = None,
    tol: float = INTERPOLATION_TOLERANCE,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """Algorithm 2: the largest ρ in [0, 1] with c0' + ρ(c − c0') feasible, c0' = min(c, c0).

    The paper anchors at c0; anchoring at min(c, c0) keeps the levels asked below the mean where they were,
    and equals c0 when every level is above the mean. ρ is exact (one LP) and backed off so that the palette
    lies ``tol`` inside the boundary, measured in standard deviations of the values (Euclidean).
    ``values`` names the entries of a palette vector, or the columns of a plain reward array.
    """
    tol = _tolerance(tol)
    pool = as_pool(data, values)
    requested = _one_palette(pool, palette, values)
    anchor = _safe_anchor(pool, requested)
    problem = DualProblem.from_pool(pool, normaliser)
    constrained = ~np.isnan(requested)
    base = problem.to_scaled_targets(np.nan_to_num(anchor))
    span = np.where(constrained, np.nan_to_num(requested - anchor), 0.0)
    scaled_span = span / problem.scale
    distance = float(np.linalg.norm(scaled_span))
    if distance == 0.0:
        return Adjustment(requested, requested, _solve_one(pool, requested, normaliser), "interpolate", 1.0)
    largest, _ = largest_step(problem, base, scaled_span, constrained)
    rho = 1.0 if largest > 1.0 else max(0.0, largest - tol / distance)
    adjusted = requested if rho == 1.0 else np.where(constrained, anchor + rho * span, np.nan)
    return Adjustment(requested, adjusted, _solve_one(pool, adjusted, normaliser), "interpolate", rho)


def grid(
    data: PoolLike,
    palette: Palettes,
    *,
    values: Sequence[str] | None = None,
    points: int = 10,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """The grid variant of Algorithm 2: ρ on ``points`` evenly spaced values from 0 to 1, all solved in one
    batch; the palette is the last feasible one before the first infeasible ρ."""
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise InputError(f"points must be a whole number of at least 2, got {points!r}")
    pool = as_pool(data, values)
    check_grid_points(points, pool.num_samples)   # all points are solved at once: refuse what cannot fit
    requested = _one_palette(pool, palette, values)
    anchor = _safe_anchor(pool, requested)
    rhos = np.linspace(0.0, 1.0, points)
    candidates = anchor[None] + rhos[:, None] * (requested - anchor)[None]
    candidates[-1] = requested  # ρ = 1 is the request itself, not its rounding
    solutions = solve_many(pool, candidates, normaliser=normaliser)
    feasible = solutions.feasible
    last = int(np.argmin(feasible)) - 1 if not feasible.all() else points - 1
    if last < 0:
        # ρ = 0 is min(c, c0), feasible in theory; only a degenerate pool lands here.
        raise SolverError("even min(c, c0) was found infeasible; the pool's rewards may be degenerate")
    return Adjustment(requested, candidates[last], solutions[last], "grid", float(rhos[last]))


def greedy(
    data: PoolLike,
    palette: Palettes,
    priority: Sequence[str] | None = None,
    *,
    values: Sequence[str] | None = None,
    to_maximum: bool = False,
    tol: float = GREEDY_TOLERANCE,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """Algorithm 3: in priority order, raise each value's level as far as stays feasible, holding the others.

    Starts from c itself when c is feasible, else from min(c, c0). Each value rises to its requested level
    when that stays feasible, else to ``tol`` standard deviations below the highest feasible level (an exact
    LP); with ``to_maximum`` it rises as far as feasible whatever was requested (the paper's "enhance one
    value"). Values the priority list leaves out stay where they started. Default priority: the palette's
    order as written (the pool's value order for a vector of levels).
    """
    tol = _tolerance(tol)
    pool = as_pool(data, values)
    requested = _one_palette(pool, palette, values)
    if is_spec(palette):
        names = list(parse(palette).names)
    else:
        names = [pool.value_names[i] for i in np.flatnonzero(~np.isnan(requested))]
    priority = list(names if priority is None else unique_names(priority, "priority"))
    for name in priority:
        column = pool.index_of(name)
        if np.isnan(requested[column]):
            raise InputError(f"priority names {name!r}, which the palette does not constrain ({names})")
    problem = DualProblem.from_pool(pool, normaliser)
    constrained = ~np.isnan(requested)
    # Whether c itself is reachable is the LP's verdict alone; no λ is needed for the starting point.
    current = requested.copy() if certify(problem, requested).feasible else _safe_anchor(pool, requested)
    for name in priority:
        column = pool.index_of(name)
        base = problem.to_scaled_targets(np.nan_to_num(current))
        step = np.zeros(pool.num_values)
        step[column] = 1.0
        rise, _ = largest_step(problem, base, step, constrained)
        highest = current[column] + (rise - tol) * problem.scale[column]
        goal = highest if to_maximum else min(requested[column], highest)
        current[column] = max(current[column], goal)
    return Adjustment(requested, current, _solve_one(pool, current, normaliser), "greedy")


def _draw_values(data: PoolLike, values: Sequence[str], count: int) -> tuple[RewardPool, tuple[str, ...]]:
    """The pool and the named values random palettes or λ are drawn over."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise InputError(f"count must be a whole number of at least 1, got {count!r}")
    values = unique_names(values, "values")
    if not values:
        raise InputError("values names no value to draw over")
    pool = as_pool(data, values)
    for name in values:
        pool.index_of(name)
    return pool, values


def random_palettes(
    data: PoolLike,
    values: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    max_l1: float = 6.0,
    normaliser: Normaliser = "pooled",
    max_draws: int | None = None,
) -> tuple[Solutions, float]:
    """The paper's random MAP palettes: c_i ~ U(c0_i, max r_i), kept if feasible with ||λ||_1 < max_l1.

    Returns the kept Solutions (their ``targets`` are the palettes) and the share of draws kept. ``values``
    names the values drawn (for a plain reward array, its columns).
    """
    pool, values = _draw_values(data, values, count)
    if not max_l1 > 0:
        raise InputError(f"max_l1 must be positive, got {max_l1!r}")
    rng = np.random.default_rng(seed)
    columns = [pool.index_of(name) for name in values]
    low, high = pool.means()[columns], pool.value_range()[1][columns]
    max_draws = max_draws if max_draws is not None else 1000 * count
    kept: list[Solutions] = []
    num_kept = draws = 0
    while num_kept < count and draws < max_draws:
        batch = max(64, 2 * (count - num_kept))
        draws += batch
        candidates = rng.uniform(low, high, size=(batch, len(columns)))
        solutions = solve_many(pool, candidates, values=values, normaliser=normaliser)
        good = solutions.feasible & (np.nansum(solutions.lam, axis=1) < max_l1)
        kept.append(solutions.take(good))
        num_kept += int(good.sum())
    if num_kept < count:
        raise TooFewPalettes(f"only {num_kept} of {count} palettes kept after {draws} draws; raise max_l1")
    return concatenate(kept).take(np.arange(count)), num_kept / draws


def random_morl_lambdas(
    data: PoolLike,
    values: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    max_scale: float = 6.0,
    normaliser: Normaliser = "pooled",
) -> Solutions:
    """The paper's MORL baseline: λ = s·u with s ~ U(0, max_scale), u ~ Dirichlet(1); returned with the
    palettes they solve (c = E_{p_λ} r). ``values`` names the values λ is drawn over (for a plain reward
    array, its columns)."""
    pool, values = _draw_values(data, values, count)
    if not max_scale >= 0:
        raise InputError(f"max_scale must be >= 0, got {max_scale!r}")
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.0, max_scale, size=(count, 1))
    directions = rng.dirichlet(np.ones(len(values)), size=count)
    return evaluate_lambdas(pool, scales * directions, values=values, normaliser=normaliser)
