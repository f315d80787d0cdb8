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

import numpy as np
import scipy.optimize
import scipy.sparse

from mapjax.problem import DualProblem

MARGIN_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Certificate:
    """The LP verdict on one palette.

    Attributes:
        feasible: a finite λ reaches the palette (margin > tolerance).
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
        if len(self.blocking_values) == 1:
            return f"infeasible: {together} cannot reach its level on these samples (short by {-self.margin:.4g} sd)"
        if self.margin == 0:
            return f"infeasible: {together} reach their levels together only in the limit (λ → ∞)"
        return f"infeasible: {together} cannot be reached together (short by {-self.margin:.4g} sd)"


def certify(problem: DualProblem, targets: np.ndarray) -> Certificate:
    """Solve the margin LP for one palette; ``targets`` over all values, NaN where unconstrained."""
    targets = np.asarray(targets, dtype=np.float64)
    constrained = ~np.isnan(targets)
    if not constrained.any():
        raise ValueError("the palette constrains no value")
    scaled_targets = problem.to_scaled_targets(np.nan_to_num(targets))
    margin, direction = largest_step(problem, scaled_targets, constrained.astype(np.float64), constrained)
    feasible = margin > MARGIN_TOLERANCE
    if abs(margin) <= MARGIN_TOLERANCE:
        margin = 0.0
    blocking = tuple(problem.value_names[i] for i in np.flatnonzero(direction > 1e-9))
    return Certificate(feasible, margin, direction, blocking)


def largest_step(
    problem: DualProblem, base: np.ndarray, step: np.ndarray, constrained: np.ndarray
) -> tuple[float, np.ndarray]:
    """max s such that some reweighting reaches base + s·step on the constrained values (scaled units).

    With step = 1 this is the margin t*; with step = c − c_low it is the largest feasible ρ of the palette
    interpolation; with step = e_i it is how far value i can rise holding the others. Returns s* and the
    normalised LP dual direction d (zero on unconstrained values).
    """
    constrained = np.asarray(constrained, dtype=bool)
    columns = np.flatnonzero(constrained)
    valid = np.isfinite(problem.log_base)
    group_of_sample = np.nonzero(valid)[0]
    samples = problem.scaled[valid][:, columns]  # [n, m_c]
    weight = problem.group_weight[group_of_sample]  # a_g of each sample
    n, num_constrained = samples.shape
    num_groups = problem.log_base.shape[0]

    # Variables: w (n), then s. Minimise -s subject to -Σ a w r̃_i + s·step_i <= -base_i.
    objective = np.zeros(n + 1)
    objective[-1] = -1.0
    upper = np.hstack([-(samples * weight[:, None]).T, np.asarray(step, dtype=np.float64)[columns, None]])
    equality = scipy.sparse.csr_matrix((np.ones(n), (group_of_sample, np.arange(n))), shape=(num_groups, n + 1))
    result = scipy.optimize.linprog(
        objective,
        A_ub=upper,
        b_ub=-np.asarray(base, dtype=np.float64)[columns],
        A_eq=equality,
        b_eq=np.ones(num_groups),
        bounds=[(0.0, None)] * n + [(None, None)],
        method="highs",
    )
    if result.status != 0:
        raise RuntimeError(f"the feasibility LP did not solve: {result.message}")
    direction = np.zeros(problem.num_values)
    direction[columns] = np.maximum(-result.ineqlin.marginals, 0.0)
    total = direction.sum()
    if total > 0:
        direction /= total
    return float(-result.fun), direction
