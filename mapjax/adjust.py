"""Palette adjustment (the paper's Algorithms 2 and 3) and the random palettes of its baselines.

Each adjustment returns the palette it settles on together with the Solution whose λ solves that palette.
Feasibility is decided exactly, by the LP of :mod:`mapjax.certificate`: the largest feasible step along a
direction is itself one LP, so the adjusted palette lies ``tol`` inside the boundary, found in a single solve
rather than by bisection. (A palette exactly on the boundary is reachable only as λ → ∞.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mapjax.certificate import certify, largest_step
from mapjax.dual import Normaliser, Solution, Solutions, concatenate, evaluate_lambdas, palette_targets, solve_many
from mapjax.palette import PaletteSpec, parse
from mapjax.pool import RewardPool
from mapjax.problem import DualProblem

# The authors' tolerances (MAP.md section 3): bisection to ||Δc|| < 1e-3, greedy to 0.05.
INTERPOLATION_TOLERANCE = 1e-3
GREEDY_TOLERANCE = 1e-3
REFERENCE_GREEDY_TOLERANCE = 0.05


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
        both = ~np.isnan(self.requested)
        return not np.allclose(self.requested[both], self.palette[both])

    def to_dict(self) -> dict:
        names = self.solution.value_names
        return {
            "method": self.method,
            "rho": self.rho,
            "requested": {n: float(v) for n, v in zip(names, self.requested) if not np.isnan(v)},
            "palette": {n: float(v) for n, v in zip(names, self.palette) if not np.isnan(v)},
            "solution": self.solution.to_dict(),
        }


def _requested(pool: RewardPool, palette: PaletteSpec | np.ndarray) -> np.ndarray:
    return palette_targets(pool, [palette] if not isinstance(palette, np.ndarray) else palette[None])[0]


def _safe_anchor(pool: RewardPool, requested: np.ndarray) -> np.ndarray:
    """min(c, c0) on the constrained values: feasible, because c0 is (λ = 0) and palettes are downward closed."""
    return np.where(np.isnan(requested), np.nan, np.minimum(requested, pool.means()))


def _solve_one(pool, palette, normaliser) -> Solution:
    return solve_many(pool, palette[None], normaliser=normaliser, certify=True)[0]


def interpolate(
    pool: RewardPool,
    palette: PaletteSpec | np.ndarray,
    *,
    tol: float = INTERPOLATION_TOLERANCE,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """Algorithm 2: the largest ρ in [0, 1] with c0' + ρ(c − c0') feasible, c0' = min(c, c0).

    The paper anchors at c0; anchoring at min(c, c0) keeps the levels asked below the mean where they were,
    and equals c0 when every level is above the mean. ρ is exact (one LP) and backed off so that the palette
    lies ``tol`` (Euclidean, raw units) inside the boundary.
    """
    requested = _requested(pool, palette)
    anchor = _safe_anchor(pool, requested)
    problem = DualProblem.from_pool(pool, normaliser)
    constrained = ~np.isnan(requested)
    base = problem.to_scaled_targets(np.nan_to_num(anchor))
    span = np.where(constrained, np.nan_to_num(requested - anchor), 0.0)
    distance = float(np.linalg.norm(span))
    if distance == 0.0:
        return Adjustment(requested, requested, _solve_one(pool, requested, normaliser), "interpolate", 1.0)
    largest, _ = largest_step(problem, base, span / problem.scale, constrained)
    rho = 1.0 if largest > 1.0 else max(0.0, largest - tol / distance)
    adjusted = np.where(constrained, anchor + rho * span, np.nan)
    return Adjustment(requested, adjusted, _solve_one(pool, adjusted, normaliser), "interpolate", rho)


def grid(
    pool: RewardPool,
    palette: PaletteSpec | np.ndarray,
    *,
    points: int = 10,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """The grid variant of Algorithm 2: ρ on ``points`` evenly spaced values from 0 to 1, all solved in one
    batch; the palette is the last feasible one before the first infeasible ρ."""
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    requested = _requested(pool, palette)
    anchor = _safe_anchor(pool, requested)
    rhos = np.linspace(0.0, 1.0, points)
    candidates = anchor[None] + rhos[:, None] * (requested - anchor)[None]
    solutions = solve_many(pool, candidates, normaliser=normaliser)
    feasible = solutions.feasible
    last = int(np.argmin(feasible)) - 1 if not feasible.all() else points - 1
    if last < 0:
        # ρ = 0 is min(c, c0), feasible in theory; only a degenerate pool lands here.
        raise RuntimeError("even min(c, c0) was found infeasible; the pool's rewards may be degenerate")
    return Adjustment(requested, candidates[last], solutions[last], "grid", float(rhos[last]))


def greedy(
    pool: RewardPool,
    palette: PaletteSpec | np.ndarray,
    priority: Sequence[str] | None = None,
    *,
    to_maximum: bool = False,
    tol: float = GREEDY_TOLERANCE,
    normaliser: Normaliser = "pooled",
) -> Adjustment:
    """Algorithm 3: in priority order, raise each value's level as far as stays feasible, holding the others.

    Starts from c itself when c is feasible, else from min(c, c0). Each value rises to its requested level
    when that stays feasible, else to ``tol`` below the highest feasible level (an exact LP); with
    ``to_maximum`` it rises as far as feasible whatever was requested (the paper's "enhance one value").
    Values the priority list leaves out stay where they started. Default priority: the palette's order.
    """
    requested = _requested(pool, palette)
    names = list(parse(palette).names) if not isinstance(palette, np.ndarray) else [
        pool.value_names[i] for i in np.flatnonzero(~np.isnan(requested))
    ]
    priority = list(names if priority is None else priority)
    for name in priority:
        column = pool.index_of(name)
        if np.isnan(requested[column]):
            raise ValueError(f"priority names {name!r}, which the palette does not constrain ({names})")
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
        highest = current[column] + rise * problem.scale[column] - tol
        goal = highest if to_maximum else min(requested[column], highest)
        current[column] = max(current[column], goal)
    return Adjustment(requested, current, _solve_one(pool, current, normaliser), "greedy")


def random_palettes(
    pool: RewardPool,
    values: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    max_l1: float = 6.0,
    normaliser: Normaliser = "pooled",
    max_draws: int | None = None,
) -> tuple[Solutions, float]:
    """The paper's random MAP palettes: c_i ~ U(c0_i, max r_i), kept if feasible with ||λ||_1 < max_l1.

    Returns the kept Solutions (their ``targets`` are the palettes) and the share of draws kept.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
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
        raise RuntimeError(f"only {num_kept} of {count} palettes kept after {draws} draws; raise max_l1")
    return concatenate(kept).take(np.arange(count)), num_kept / draws


def random_morl_lambdas(
    pool: RewardPool,
    values: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    max_scale: float = 6.0,
    normaliser: Normaliser = "pooled",
) -> Solutions:
    """The paper's MORL baseline: λ = s·u with s ~ U(0, max_scale), u ~ Dirichlet(1); returned with the
    palettes they solve (c = E_{p_λ} r)."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.0, max_scale, size=(count, 1))
    directions = rng.dirichlet(np.ones(len(values)), size=count)
    return evaluate_lambdas(pool, scales * directions, values=values, normaliser=normaliser)
