"""Exact feasibility of a palette on the sample: a linear program and its Farkas certificate.

A palette c has a finite optimal λ exactly when some reweighting of the samples reaches every constrained level
with room to spare (Slater's condition for the sample problem). The margin LP measures that room in units of each
value's spread:

    t* = max t  subject to  Σ_g a_g Σ_{k in g} w_gk r̃_gk ≥ c̃ + t,   w_g in the simplex for every group g.

t* > 0: feasible with a finite λ. t* <= 0: no finite λ; the LP's dual gives a direction d >= 0, Σ d = 1, with
Σ_g a_g max_{k in g} dᵀr̃_gk − dᵀc̃ = t*: every model on these samples has dᵀE r̃ <= dᵀc̃ + t*, so the values
with d_i > 0 cannot be reached together. (A nonnegative combination of rewards that is constant over the
samples makes the boundary degenerate; such pools are not treated specially.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.optimize
import scipy.sparse

from mapjax.errors import SolverError
from mapjax.problem import DualProblem

MARGIN_TOLERANCE = 1e-9
Formulation = Literal["decomposed", "primal"]
FORMULATIONS: tuple[str, ...] = ("decomposed", "primal")
# Column generation: passes at most, the gap at which its d is optimal, and the gap at which it is close
# enough to centre the exact trust-region step on.
COLUMN_PASSES = 200
EXACT_GAP = 1e-13
CENTRE_GAP = 1e-6
# d is normalised by dᵀstep = 1; the master LP bounds it (a column generation safeguard only).
MASTER_BOUND = 1e6
# The first trust region's half-width (relative to the centre's largest entry), and how many regions at most.
TRUST_RADIUS = 1e-3
TRUST_STEPS = 12


@dataclass(frozen=True)
class Certificate:
    """The LP verdict on one palette.

    Attributes:
        feasible: a finite λ reaches the palette (margin > tolerance). A palette reachable only in the limit
            λ → ∞ (margin 0, e.g. a level at a value's largest reward) is infeasible.
        margin: t*, in units of each value's standard deviation over the pool.
        direction: [values] the Farkas direction d (zero where unconstrained); for a feasible palette, the
            constraint combination that limits the margin.
        blocking_values: names of values with d_i > 0: for an infeasible palette, those that cannot be reached
            together.
    """

    feasible: bool
    margin: float
    direction: np.ndarray
    blocking_values: tuple[str, ...]

    def explain(self) -> str:
        """One sentence for a person."""
        if self.feasible:
            return f"feasible: every level is reachable with {self.margin:.4g} standard deviations to spare"
        together = " and ".join(self.blocking_values)
        if self.margin == 0:
            if len(self.blocking_values) == 1:
                return (f"infeasible: {together} reaches its level only in the limit (λ → ∞), on its best "
                        "samples alone")
            return f"infeasible: {together} reach their levels together only in the limit (λ → ∞)"
        if len(self.blocking_values) == 1:
            return f"infeasible: {together} cannot reach its level on these samples (short by {-self.margin:.4g} sd)"
        return f"infeasible: {together} cannot be reached together (short by {-self.margin:.4g} sd)"


def certify(problem: DualProblem, targets: np.ndarray, *, formulation: Formulation = "decomposed") -> Certificate:
    """Solve the margin LP for one palette; ``targets`` over all values, NaN where unconstrained.

    ``formulation``: see :func:`largest_step`.
    """
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (problem.num_values,):
        raise SolverError(f"targets of shape {targets.shape} do not match the {problem.num_values} values")
    constrained = ~np.isnan(targets)
    if not constrained.any():
        raise SolverError("the palette constrains no value")
    scaled_targets = problem.to_scaled_targets(np.nan_to_num(targets))
    margin, direction = largest_step(
        problem, scaled_targets, constrained.astype(np.float64), constrained, formulation=formulation
    )
    feasible = margin > MARGIN_TOLERANCE
    if abs(margin) <= MARGIN_TOLERANCE:
        margin = 0.0
    blocking = tuple(problem.value_names[i] for i in np.flatnonzero(direction > 1e-9))
    return Certificate(feasible, margin, direction, blocking)


def largest_step(
    problem: DualProblem,
    base: np.ndarray,
    step: np.ndarray,
    constrained: np.ndarray,
    *,
    formulation: Formulation = "decomposed",
) -> tuple[float, np.ndarray]:
    """max s such that some reweighting reaches base + s·step on the constrained values (scaled units).

    With step = 1 this is the margin t*; with step = c − c_low it is the largest feasible ρ of the palette
    interpolation; with step = e_i it is how far value i can rise holding the others. Returns s* and the
    normalised LP dual direction d (zero on unconstrained values).

    ``formulation`` picks how the LP is solved; both give the same s* (to the LP's accuracy):

    - "decomposed" (default): the LP's dual, min over d of F(d) = Σ_g a_g max_k dᵀr̃_gk − dᵀbase with
      d >= 0, dᵀstep = 1, is only as big as the number of values. Column generation on it (each column is the
      levels of the reweighting that picks every group's best sample for some d) finds a near-optimal d in a few
      dozen passes over the samples; a trust-region LP around it, holding only the samples that can become
      their group's best inside the region, then solves it exactly. Seconds where the primal takes minutes
      on large per-prompt pools; it falls back to the primal LP if it does not settle.
    - "primal": the LP over the weights of every sample, n + 1 variables (the definition).
    """
    if formulation not in FORMULATIONS:
        raise SolverError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    constrained = np.asarray(constrained, dtype=bool)
    base = np.asarray(base, dtype=np.float64)
    step = np.asarray(step, dtype=np.float64)
    if formulation == "decomposed":
        found = _DecomposedLP(problem, base, step, constrained).solve()
        if found is not None:
            return found
    return _primal_lp(problem, base, step, constrained)


def _primal_lp(
    problem: DualProblem, base: np.ndarray, step: np.ndarray, constrained: np.ndarray
) -> tuple[float, np.ndarray]:
    """The LP over sample weights: maximise s subject to the levels, one simplex of weights per group."""
    columns = np.flatnonzero(constrained)
    valid = np.isfinite(problem.log_base)
    group_of_sample = np.nonzero(valid)[0]
    samples = problem.scaled[valid][:, columns]  # [n, m_c]
    weight = problem.group_weight[group_of_sample]  # a_g of each sample
    n = samples.shape[0]
    num_groups = problem.log_base.shape[0]

    # Variables: w (n), then s. Minimise -s subject to -Σ a w r̃_i + s·step_i <= -base_i.
    objective = np.zeros(n + 1)
    objective[-1] = -1.0
    upper = np.hstack([-(samples * weight[:, None]).T, step[columns, None]])
    equality = scipy.sparse.csr_matrix((np.ones(n), (group_of_sample, np.arange(n))), shape=(num_groups, n + 1))
    result = scipy.optimize.linprog(
        objective,
        A_ub=upper,
        b_ub=-base[columns],
        A_eq=equality,
        b_eq=np.ones(num_groups),
        bounds=[(0.0, None)] * n + [(None, None)],
        method="highs",
    )
    if result.status != 0:
        raise SolverError(f"the feasibility LP did not solve: {result.message}")
    direction = np.zeros(problem.num_values)
    direction[columns] = np.maximum(-result.ineqlin.marginals, 0.0)
    total = direction.sum()
    if total > 0:
        direction /= total
    return float(-result.fun), direction


class _DecomposedLP:
    """min over d >= 0, dᵀstep = 1 of F(d) = Σ_g a_g max_k dᵀr̃_gk − dᵀbase (the LP's dual), exactly.

    F is convex, piecewise linear and positively homogeneous; at every d it is the level gap of the
    reweighting that puts each group's weight on its best sample under d (a "column" s(d), F(d) = s(d)ᵀd).
    """

    def __init__(self, problem: DualProblem, base: np.ndarray, step: np.ndarray, constrained: np.ndarray):
        columns = np.flatnonzero(constrained)
        self.num_values = problem.num_values
        self.columns = columns
        self.samples = np.ascontiguousarray(problem.scaled[:, :, columns])  # [G, K, m_c]
        self.valid = np.isfinite(problem.log_base)  # [G, K]
        self.weight = problem.group_weight  # [G]
        self.base = base[columns]
        self.step = step[columns]
        self.rows = np.arange(self.samples.shape[0])

    def solve(self) -> tuple[float, np.ndarray] | None:
        """(s*, direction), or None when it does not settle (the caller then solves the primal LP)."""
        if not np.any(self.step > 0):
            return None  # no d with dᵀstep = 1: the primal decides (it is unbounded or infeasible)
        center = self._generate_columns()
        if center is None:
            return None
        if isinstance(center, tuple):
            return self._answer(*center)
        return self._trust_region(center)

    # -- pieces

    def _scores(self, d: np.ndarray) -> np.ndarray:
        return np.where(self.valid, self.samples @ d, -np.inf)

    def _price(self, d: np.ndarray) -> tuple[np.ndarray, float]:
        """(column s(d), F(d)): the levels (minus base) of each group's best sample under d, and F at d."""
        scores = self._scores(d)
        best = np.argmax(scores, axis=1)
        return self.weight @ self.samples[self.rows, best] - self.base, float(
            self.weight @ scores[self.rows, best] - d @ self.base
        )

    def _answer(self, d: np.ndarray, value: float) -> tuple[float, np.ndarray]:
        direction = np.zeros(self.num_values)
        direction[self.columns] = np.maximum(d, 0.0)
        total = direction.sum()
        return value, direction / total if total > 0 else direction

    def _generate_columns(self):
        """Column generation on min_d max_j s_jᵀd: returns (d, F(d)) once the bounds meet, else the best d
        found (a centre for the exact step), or None if the master LP fails."""
        num = len(self.columns)
        columns = [self._price(np.eye(num)[j])[0] for j in range(num)]
        objective = np.zeros(num + 1)
        objective[-1] = 1.0
        best_d, upper = None, np.inf
        for _ in range(COLUMN_PASSES):
            table = np.hstack([np.asarray(columns), -np.ones((len(columns), 1))])
            result = scipy.optimize.linprog(
                objective, A_ub=table, b_ub=np.zeros(len(columns)), A_eq=np.append(self.step, 0.0)[None],
                b_eq=[1.0], bounds=[(0.0, MASTER_BOUND)] * num + [(None, None)], method="highs",
            )
            if result.status != 0:
                return None
            d, lower = result.x[:num], result.x[-1]
            column, value = self._price(d)
            if value < upper:
                best_d, upper = d, value
            if upper - lower <= EXACT_GAP * (1.0 + abs(upper)) and np.all(best_d < MASTER_BOUND / 2):
                return best_d, upper  # the bounds meet: best_d is optimal
            if upper - lower <= CENTRE_GAP * (1.0 + abs(upper)):
                break
            columns.append(column)
        return best_d

    def _trust_region(self, center: np.ndarray):
        """Exact LPs on boxes around ``center``, each holding only the samples that can be their group's best
        inside the box (so that there the LP's objective is F itself), until the optimum is inside its box."""
        radius = TRUST_RADIUS * max(1.0, float(np.max(center)))
        for _ in range(TRUST_STEPS):
            solved = self._box_lp(center, radius)
            if solved is None:
                return None
            d, _ = solved
            low = np.maximum(center - radius, 0.0)
            inside = np.all(d < center + radius * (1 - 1e-9)) and np.all((d > low + radius * 1e-9) | (low == 0.0))
            if inside:
                value = self._price(d)[1]
                return self._answer(d, value)
            center, radius = d, radius * 4
        return None

    def _box_lp(self, center: np.ndarray, radius: float) -> tuple[np.ndarray, float] | None:
        num = len(self.columns)
        scores = self._scores(center)
        best = np.argmax(scores, axis=1)
        top = scores[self.rows, best]
        spread = np.abs(self.samples - self.samples[self.rows, best][:, None, :]).sum(axis=-1)  # [G, K]
        # Inside the box a sample can overtake its group's best only if its gap is within radius·‖Δr̃‖₁.
        candidate = self.valid & (top[:, None] - scores <= radius * spread + 1e-12 * (1.0 + np.abs(top[:, None])))
        split = candidate.sum(axis=1) > 1
        alone = ~split
        split_groups = np.flatnonzero(split)
        objective = np.concatenate([
            self.weight[alone] @ self.samples[self.rows[alone], best[alone]] - self.base,
            self.weight[split_groups],
        ])
        group_index, slot_index = np.nonzero(candidate[split_groups])
        count = group_index.size
        # Rows: r̃_gkᵀd − u_g <= 0 for every candidate of a split group.
        data = np.concatenate([self.samples[split_groups[group_index], slot_index].ravel(), -np.ones(count)])
        row_ids = np.concatenate([np.repeat(np.arange(count), num), np.arange(count)])
        column_ids = np.concatenate([np.tile(np.arange(num), count), num + group_index])
        table = scipy.sparse.csr_matrix((data, (row_ids, column_ids)), shape=(count, num + split_groups.size))
        bounds = [(max(0.0, c - radius), c + radius) for c in center] + [(None, None)] * split_groups.size
        result = scipy.optimize.linprog(
            objective, A_ub=table if count else None, b_ub=np.zeros(count) if count else None,
            A_eq=np.concatenate([self.step, np.zeros(split_groups.size)])[None], b_eq=[1.0], bounds=bounds,
            method="highs",
        )
        if result.status != 0:
            return None
        return result.x[:num], float(result.fun)
