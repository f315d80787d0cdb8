"""From a solved batch to :class:`Solutions`: one verdict per palette, certificates, sensitivity.

The verdict of the exact method is the LP's (see :mod:`mapjax.certificate`): a palette is feasible exactly when
some reweighting of the samples reaches it with room to spare (margin > ``MARGIN_TOLERANCE``). The kernel's
statuses are settled against it without solving the LP where the kernel already holds a proof:

- "infeasible" rows carry the kernel's own Farkas certificate (its λ direction has a negative margin);
- "optimal" rows must show room to spare: a reweighting p_λ' that clears every level by more than the
  tolerance, where λ' is the Newton step from the solution towards the levels raised by a little. A palette
  reachable only in the limit λ → ∞ (a level at a value's largest reward) has no such reweighting: the LP
  decides, and calls it infeasible;
- "not_converged" rows, and every row when ``certify`` is asked for, get the LP.
"""

from __future__ import annotations

import numpy as np

from mapjax.certificate import MARGIN_TOLERANCE, Certificate
from mapjax.certificate import certify as lp_certificate
from mapjax.problem import DualProblem
from mapjax.solver.driver import Solved, levels_at, measure
from mapjax.solver.placement import ONE_DEVICE, Placement
from mapjax.solver.solution import INFEASIBLE, NOT_CONVERGED, OPTIMAL, STATUSES, Solutions

# How far (in sd) the levels are raised for the room-to-spare check, tried in turn on the rows not yet shown to
# have room (a palette with less room than the last goes to the LP), and the Newton steps towards each, at most.
ROOM_STEPS = (1e-3, 1e-6)
ROOM_NEWTON_STEPS = 3


def assemble(
    problem: DualProblem,
    targets: np.ndarray,
    solved: Solved,
    method: str,
    dtype: str,
    want_sensitivity: bool,
    certify: bool,
    placement: Placement = ONE_DEVICE,
) -> Solutions:
    """Solutions for a solved batch; for method="exact" the statuses are settled as the module docstring says
    (the measurements that needs run on ``placement``, the solve's devices)."""
    status = solved.status.astype(int).copy()
    certificates: dict[int, Certificate] = {}
    if certify:
        for row in range(len(targets)):
            certificates[row] = lp_certificate(problem, targets[row])
    if method == "exact":
        _settle(problem, targets, solved, status, certificates, placement)
    infeasible = status == INFEASIBLE
    nan_rows = infeasible[:, None]
    lam = np.where(nan_rows, np.nan, solved.lam)
    realised = np.where(nan_rows, np.nan, problem.to_raw_levels(solved.mean))
    sensitivity = None
    if want_sensitivity:
        sensitivity = _sensitivity(problem, np.nan_to_num(lam), solved.covariance)
        sensitivity[infeasible] = np.nan
    return Solutions(
        value_names=problem.value_names,
        targets=targets,
        lam=lam,
        status=np.asarray(STATUSES)[status],
        realised=realised,
        kkt_residual=np.where(infeasible, np.nan, solved.residual),
        kl=np.where(infeasible, np.nan, solved.kl),
        ess=np.where(infeasible, np.nan, solved.ess),
        iterations=solved.iterations.astype(int),
        normaliser=problem.normaliser,
        method=method,
        dtype=dtype,
        sensitivity=sensitivity,
        certificates=certificates,
    )


def _settle(
    problem: DualProblem,
    targets: np.ndarray,
    solved: Solved,
    status: np.ndarray,
    certificates: dict,
    placement: Placement = ONE_DEVICE,
) -> None:
    """Settle the exact method's statuses in place (see the module docstring); add the certificates used."""
    optimal = np.flatnonzero((status == OPTIMAL) & ~np.isin(np.arange(len(targets)), list(certificates)))
    roomy = has_room(problem, targets[optimal], solved.scaled_lam[optimal], solved.mean[optimal],
                     solved.covariance[optimal], placement) if optimal.size else np.zeros(0, bool)
    needs_lp = set(np.flatnonzero(status == NOT_CONVERGED).tolist()) | set(optimal[~roomy].tolist())
    for row in range(len(targets)):
        if row in needs_lp and row not in certificates:
            certificates[row] = lp_certificate(problem, targets[row])
        if row in certificates:
            if not certificates[row].feasible:
                status[row] = INFEASIBLE
        elif status[row] == INFEASIBLE:
            certificates[row] = _solver_certificate(problem, solved.scaled_lam[row], solved.worst_margin[row])


def has_room(
    problem: DualProblem,
    targets: np.ndarray,
    scaled_lam: np.ndarray,
    mean: np.ndarray,
    covariance: np.ndarray,
    placement: Placement = ONE_DEVICE,
) -> np.ndarray:
    """[B] whether a reweighting is shown to clear every constrained level by more than the LP's tolerance.

    From a solution λ̃, whose levels sit at (or above) their targets, a few Newton steps on levels(λ') = goal,
    with goal the levels raised to target + ε where they are below it, are taken for each ε of
    :data:`ROOM_STEPS` in turn, measuring the levels exactly (float64) after each. Any reweighting that clears
    the levels proves the LP margin positive (any λ' gives one: it need not be optimal or non-negative), so a
    True is a proof; a False only means the LP must decide.
    """
    constrained = ~np.isnan(targets)
    scaled_targets = problem.to_scaled_targets(np.nan_to_num(targets))
    shown = np.zeros(len(targets), dtype=bool)
    for step in ROOM_STEPS:
        rows = np.flatnonzero(~shown)
        goal = np.where(constrained[rows], np.maximum(mean[rows], scaled_targets[rows] + step), mean[rows])
        lam, levels, moments = scaled_lam[rows], mean[rows], covariance[rows]
        for attempt in range(ROOM_NEWTON_STEPS):
            if not rows.size:
                break
            if attempt:  # the next step needs the moments where the last one landed
                levels, moments, _, _ = measure(problem, problem.to_raw_lambda(lam), placement)
            lam = lam + _newton_steps(moments, goal - levels, constrained[rows])
            finite = np.all(np.isfinite(lam), axis=1)
            reached = levels_at(problem, np.where(finite[:, None], lam, 0.0), placement)
            clearance = np.min(np.where(constrained[rows], reached - scaled_targets[rows], np.inf), axis=1)
            cleared = finite & (clearance > MARGIN_TOLERANCE)
            shown[rows[cleared]] = True
            going = finite & ~cleared
            rows, goal, lam = rows[going], goal[going], lam[going]
    return shown


def _newton_steps(covariance: np.ndarray, change: np.ndarray, constrained: np.ndarray) -> np.ndarray:
    """Per row, δ with Cov_CC δ_C = change_C on the constrained coordinates C (0 elsewhere); NaN if singular."""
    both = constrained[:, :, None] & constrained[:, None, :]
    # Unconstrained coordinates get an identity block and a zero right-hand side: their δ is 0.
    system = np.where(both, covariance, 0.0) + np.eye(change.shape[1]) * (~constrained)[:, None, :]
    right = np.where(constrained, change, 0.0)
    try:
        return np.linalg.solve(system, right[..., None])[..., 0]
    except np.linalg.LinAlgError:
        steps = np.full(change.shape, np.nan)
        for row in range(change.shape[0]):
            try:
                steps[row] = np.linalg.solve(system[row], right[row])
            except np.linalg.LinAlgError:
                pass  # singular: no step, the LP decides
        return steps


def _sensitivity(problem: DualProblem, lam: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """dλ/dc = Cov_FF⁻¹ on the coordinates with λ > 0 (raw units); zero elsewhere."""
    out = np.zeros(covariance.shape)
    for row in range(lam.shape[0]):
        free = np.flatnonzero(lam[row] > 0)
        if free.size and np.all(np.isfinite(covariance[row])):
            block = np.linalg.inv(covariance[row][np.ix_(free, free)])
            out[row][np.ix_(free, free)] = block / np.outer(problem.scale[free], problem.scale[free])
    return out


def _solver_certificate(problem: DualProblem, lam_scaled: np.ndarray, worst_margin: float) -> Certificate:
    """The kernel's own Farkas certificate: the direction of its diverging λ̃ (margin: an upper bound on t*)."""
    direction = np.maximum(lam_scaled, 0.0)
    total = direction.sum()
    direction = direction / total
    blocking = tuple(problem.value_names[i] for i in np.flatnonzero(direction > 1e-3))
    return Certificate(False, min(worst_margin / total, 0.0), direction, blocking)
