"""The exact λ kernel: projected Newton on MAP's dual for a batch of palettes, in pure JAX.

Minimise f(λ̃) = −g(λ̃) = Σ_g a_g log Σ_{k in g} p0_k exp(λ̃ᵀr̃_k) − λ̃ᵀc̃ over λ̃ >= 0 (the standardized frame of
:class:`mapjax.problem.DualProblem`):

- gradient ∇f = E_{p_λ} r̃ − c̃, Hessian Cov_{p_λ} r̃ (within-group covariances averaged for per-prompt);
- coordinates at zero whose gradient pushes them below zero are held at exactly zero (Bertsekas' projected
  Newton), the others take the Newton step; an Armijo backtracking search along the projection arc;
- every palette is a row of one batch: Z = Λ̃ R̃ᵀ is one product for the whole batch, the weighted covariances
  one more, and a convergence mask freezes rows that are done;
- a row stops when its KKT residual (|∇f| on positive coordinates, constraint violation on zero ones, in
  standard deviations of each value) is below ``tol``, or when its own iterate proves the palette
  infeasible: with d = λ̃/‖λ̃‖₁, Σ_g a_g max_k dᵀr̃_k <= dᵀc̃ means no model on these samples reaches c
  (a Farkas certificate, see :mod:`mapjax.certificate`), or when it stalls (no decrease, or ‖λ̃‖₁ beyond
  :data:`LAMBDA_LIMIT`): the driver then asks the LP.

The loop state, the line search's state and the result are typed pytrees (:class:`NewtonState`,
:class:`LineSearch`, :class:`NewtonResult`).

Every sum over samples (the log-sum-exp, the moments, the Hessian) is a reduction over the problem's group or
slot axis, so the same code runs on a pool sharded over a device mesh: the driver places the arrays with
``NamedSharding`` and the compiler inserts the cross-device reductions. The kernels are plain functions
(:func:`newton_kernel`, :func:`measure_kernel`, :func:`mean_kernel`), jitted once here for one device and by
the driver with replicated outputs for each mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mapjax.problem import Tilt, group_tilt
from mapjax.solver.solution import INFEASIBLE, NOT_CONVERGED, OPTIMAL

MAX_BACKTRACKS = 40
ARMIJO = 1e-4
# Largest [samples, values²] buffer of outer products worth keeping for the batched covariance.
OUTER_LIMIT = 1 << 24
# A scaled λ this large means the weights sit on one sample per group: the palette is on (or past) the boundary.
LAMBDA_LIMIT = 1e7


@struct.dataclass
class Iterate:
    """A batch of iterates and what the solver knows at them (leading axis: the palettes)."""

    lam: jax.Array  # [B, m] scaled λ̃ = λσ; >= 0 on movable coordinates, fixed elsewhere
    objective: jax.Array  # [B] f(λ̃) = −g(λ̃), the minimised objective
    mean: jax.Array  # [B, m] E_{p_λ} r̃ (per-prompt: averaged over prompts)
    covariance: jax.Array  # [B, m, m] Cov_{p_λ} r̃, the Hessian of f
    ess: jax.Array  # [B] effective sample size 1/Σw² (per group, averaged)
    gradient: jax.Array  # [B, m] ∇f = mean − c̃ on movable coordinates, 0 elsewhere
    residual: jax.Array  # [B] KKT residual in standard deviations
    worst_margin: jax.Array  # [B] Σ_g a_g max_k λ̃ᵀr̃ − λ̃ᵀc̃: at or below 0 it proves the palette infeasible


@struct.dataclass
class NewtonState:
    """The while-loop state of :func:`projected_newton`."""

    point: Iterate  # the current iterate of every row
    status: jax.Array  # [B] int32 status code (see mapjax.solver.solution); final once ``done``
    done: jax.Array  # [B] bool: the row is frozen (optimal, proved infeasible, or stalled)
    iterations: jax.Array  # [B] int32 Newton iterations the row has taken
    step: jax.Array  # [] int32 iterations of the loop so far


@struct.dataclass
class Trial:
    """λ̃ tried by the line search, and the exp pass at it (kept so the accepted one is not recomputed)."""

    lam: jax.Array  # [B, m] the trial point, projected onto λ̃ >= 0
    objective: jax.Array  # [B] f at the trial point
    tilt: Tilt  # p_λ at the trial point
    worst_margin: jax.Array  # [B] the Farkas margin at the trial point (see Iterate.worst_margin)


@struct.dataclass
class LineSearch:
    """The backtracking line search's while-loop state."""

    trial: Trial  # per row: the accepted trial, or the latest one while not accepted
    accepted: jax.Array  # [B] bool: Armijo holds (or the row was already done)
    alpha: jax.Array  # [B] step length of ``trial``
    tries: jax.Array  # [] int32 trials so far


@struct.dataclass
class NewtonResult:
    """What :func:`projected_newton` returns, in the working dtype and the scaled frame."""

    lam: jax.Array  # [B, m] scaled λ̃ at the end
    mean: jax.Array  # [B, m] E_{p_λ} r̃
    covariance: jax.Array  # [B, m, m] Cov_{p_λ} r̃
    ess: jax.Array  # [B] effective sample size (per group, averaged)
    kl: jax.Array  # [B] KL(p_λ || p0) (per group, averaged)
    residual: jax.Array  # [B] KKT residual in standard deviations
    worst_margin: jax.Array  # [B] the Farkas margin (see Iterate.worst_margin)
    status: jax.Array  # [B] int32 status code
    done: jax.Array  # [B] bool: settled (a row not done ran out of iterations)
    iterations: jax.Array  # [B] int32 Newton iterations taken


def evaluate(scaled, log_base, group_weight, targets, lam) -> tuple[jax.Array, Tilt, jax.Array]:
    """f = −g at λ̃, p_λ (the exp pass, the expensive part, reused by the later steps) and the Farkas margin."""
    tilt = group_tilt(scaled, log_base, lam)
    objective = jnp.sum(tilt.log_normaliser * group_weight, axis=-1) - jnp.sum(lam * targets, axis=-1)
    # log p0 is constant within a group, so top − log p0 is max_k λ̃ᵀr̃ of the group.
    group_log_base = jnp.max(log_base, axis=-1)
    worst_margin = jnp.sum((tilt.top - group_log_base) * group_weight, axis=-1) - jnp.sum(lam * targets, -1)
    return objective, tilt, worst_margin


def outer_products(scaled):
    """[samples, values²] products r̃_i r̃_j, for the batched covariance as one matrix product."""
    num_groups, num_slots, num_values = scaled.shape
    return (scaled[..., :, None] * scaled[..., None, :]).reshape(num_groups * num_slots, num_values**2)


def moments(scaled, group_weight, tilt: Tilt, outer=None):
    """Mean, covariance (Hessian of f) and ESS of p_λ.

    With ``outer`` (see :func:`outer_products`, computed once per solve) the weighted second moments of every
    palette are one [palettes, samples] x [samples, values²] product, the fast shape for many palettes; without
    it, each palette's weighted samples are contracted with the samples, which needs no [samples, values²]
    buffer and suits a few palettes on a large pool.
    """
    weights = tilt.weights  # [B, G, K]
    group_mean = jnp.einsum("bgk,gkm->bgm", weights, scaled)
    mean = jnp.einsum("g,bgm->bm", group_weight, group_mean)
    num_batch = weights.shape[0]
    num_values = scaled.shape[-1]
    weighted = (weights * group_weight[:, None]).reshape(num_batch, -1)
    if outer is not None:
        second = (weighted @ outer).reshape(num_batch, num_values, num_values)
    else:
        flat = scaled.reshape(-1, num_values)
        second = jnp.einsum("bn,ni,nj->bij", weighted, flat, flat)
    covariance = second - jnp.einsum("g,bgi,bgj->bij", group_weight, group_mean, group_mean)
    ess = jnp.sum(group_weight / jnp.sum(weights**2, axis=-1), axis=-1)
    return mean, covariance, ess


def kkt_residual(lam, gradient, movable):
    """|∇f| where λ̃ > 0, the violation max(−∇f, 0) where λ̃ = 0; the largest over movable coordinates."""
    per_value = jnp.where(lam > 0, jnp.abs(gradient), jnp.maximum(-gradient, 0.0))
    return jnp.max(jnp.where(movable, per_value, 0.0), axis=-1)


def select_rows(mask, if_true, if_false):
    """Per-palette select of two pytrees alike: mask [B] broadcast over each leaf's trailing axes."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, if_true, if_false)


def newton_kernel(scaled, log_base, group_weight, targets, movable, lam0, tol, max_iter) -> NewtonResult:
    """Projected Newton on f for a batch of palettes; see the module docstring.

    Args:
        scaled, log_base, group_weight: the problem's arrays (see DualProblem), in the working dtype.
        targets: [B, m] scaled targets c̃ (anything on coordinates that are not movable).
        movable: [B, m] bool, the coordinates the solver moves; the others stay at ``lam0``.
        lam0: [B, m] scaled starting λ̃.
        tol: KKT tolerance in standard deviations; max_iter: iterations at most.
    """
    dtype = scaled.dtype
    eps = jnp.finfo(dtype).eps
    targets = jnp.where(movable, targets, 0.0)
    lam0 = jnp.where(movable, jnp.maximum(lam0, 0.0), lam0)
    num_batch, num_values = lam0.shape
    identity = jnp.eye(num_values, dtype=dtype)

    # Many palettes: precompute the outer products once; few palettes or a big pool: skip that buffer.
    outer_size = scaled.shape[0] * scaled.shape[1] * num_values**2
    outer = outer_products(scaled) if num_batch >= num_values and outer_size <= OUTER_LIMIT else None

    def measure(lam, objective, tilt, worst_margin) -> Iterate:
        mean, covariance, ess = moments(scaled, group_weight, tilt, outer)
        gradient = jnp.where(movable, mean - targets, 0.0)
        return Iterate(
            lam=lam,
            objective=objective,
            mean=mean,
            covariance=covariance,
            ess=ess,
            gradient=gradient,
            residual=kkt_residual(lam, gradient, movable),
            worst_margin=worst_margin,
        )

    def direction(point: Iterate):
        lam, gradient = point.lam, point.gradient
        # Coordinates at (or within a hair of) zero that the gradient pushes further down stay at zero.
        near_zero = lam <= 1e3 * eps * (1.0 + jnp.max(lam, axis=-1, keepdims=True))
        binding = movable & near_zero & (gradient > 0)
        free = movable & ~binding
        both_free = free[:, :, None] & free[:, None, :]
        diagonal = jnp.diagonal(point.covariance, axis1=1, axis2=2)
        damping = 100 * eps * jnp.max(jnp.where(free, diagonal, 0.0), axis=-1) + jnp.finfo(dtype).tiny
        system = jnp.where(both_free, point.covariance, 0.0) + identity * jnp.where(
            free, damping[:, None], 1.0
        )[:, None, :]
        newton = jnp.linalg.solve(system, jnp.where(free, -gradient, 0.0)[..., None])[..., 0]
        return jnp.where(free, newton, jnp.where(binding, -gradient, 0.0))

    def line_search(state: NewtonState, step_direction) -> LineSearch:
        point = state.point
        slack = 10 * eps * (1.0 + jnp.abs(point.objective))

        def trial(alpha) -> tuple[Trial, jax.Array]:
            candidate = jnp.where(movable, jnp.maximum(point.lam + alpha[:, None] * step_direction, 0.0), point.lam)
            objective, tilt, worst_margin = evaluate(scaled, log_base, group_weight, targets, candidate)
            decrease = jnp.sum(point.gradient * (candidate - point.lam), axis=-1)
            accepted = (objective <= point.objective + ARMIJO * decrease + slack) & jnp.isfinite(objective)
            return Trial(lam=candidate, objective=objective, tilt=tilt, worst_margin=worst_margin), accepted

        ones = jnp.ones(num_batch, dtype)
        first, accepted = trial(ones)
        search = LineSearch(trial=first, accepted=accepted | state.done, alpha=ones, tries=jnp.int32(1))

        def keep_trying(search: LineSearch):
            return (~jnp.all(search.accepted)) & (search.tries < MAX_BACKTRACKS)

        def backtrack(search: LineSearch) -> LineSearch:
            alpha = jnp.where(search.accepted, search.alpha, search.alpha / 2)
            attempt, accepted = trial(alpha)
            return LineSearch(
                trial=select_rows(search.accepted, search.trial, attempt),
                accepted=search.accepted | accepted,
                alpha=alpha,
                tries=search.tries + 1,
            )

        return jax.lax.while_loop(keep_trying, backtrack, search)

    def keep_going(state: NewtonState):
        return (~jnp.all(state.done)) & (state.step < max_iter)

    def iterate(state: NewtonState) -> NewtonState:
        search = line_search(state, direction(state.point))
        found = search.trial
        moved = search.accepted & ~state.done
        point = select_rows(moved, measure(found.lam, found.objective, found.tilt, found.worst_margin), state.point)
        size = jnp.sum(jnp.abs(point.lam), axis=-1)
        optimal = point.residual <= tol
        infeasible = ~optimal & (size > 0) & (point.worst_margin <= -1e3 * eps * size)
        stalled = ~search.accepted | (size > LAMBDA_LIMIT) | ~jnp.isfinite(point.objective)
        status = jnp.where(optimal, OPTIMAL, jnp.where(infeasible, INFEASIBLE, NOT_CONVERGED))
        return NewtonState(
            point=point,
            status=jnp.where(state.done, state.status, status),
            done=state.done | optimal | infeasible | stalled,
            iterations=state.iterations + (~state.done).astype(jnp.int32),
            step=state.step + 1,
        )

    objective, tilt, worst_margin = evaluate(scaled, log_base, group_weight, targets, lam0)
    start = measure(lam0, objective, tilt, worst_margin)
    settled = start.residual <= tol
    state = NewtonState(
        point=start,
        status=jnp.where(settled, OPTIMAL, NOT_CONVERGED),
        done=settled,
        iterations=jnp.zeros(num_batch, jnp.int32),
        step=jnp.int32(0),
    )
    final_state = jax.lax.while_loop(keep_going, iterate, state)
    final = final_state.point
    log_normaliser_sum = final.objective + jnp.sum(final.lam * targets, axis=-1)
    return NewtonResult(
        lam=final.lam,
        mean=final.mean,
        covariance=final.covariance,
        ess=final.ess,
        kl=jnp.sum(final.lam * final.mean, axis=-1) - log_normaliser_sum,
        residual=final.residual,
        worst_margin=final.worst_margin,
        status=final_state.status,
        done=final_state.done,
        iterations=final_state.iterations,
    )


def measure_kernel(scaled, log_base, group_weight, lam):
    """Mean, covariance, ESS and KL of p_λ at given scaled λ̃ [B, m] (no solving)."""
    objective, tilt, _ = evaluate(scaled, log_base, group_weight, jnp.zeros_like(lam), lam)
    mean, covariance, ess = moments(scaled, group_weight, tilt)
    kl = jnp.sum(lam * mean, axis=-1) - objective
    return mean, covariance, ess, kl


def mean_kernel(scaled, log_base, group_weight, lam):
    """E_{p_λ} r̃ at given scaled λ̃ [B, m]: the levels a reweighting reaches (cheaper than :func:`measure_at`)."""
    weights = group_tilt(scaled, log_base, lam).weights
    return jnp.einsum("g,bgm->bm", group_weight, jnp.einsum("bgk,gkm->bgm", weights, scaled))


# One device: the kernels jitted as they are (the arrays' placement decides where they run).
projected_newton = jax.jit(newton_kernel)
measure_at = jax.jit(measure_kernel)
mean_at = jax.jit(mean_kernel)
