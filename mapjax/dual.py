"""The λ solver: MAP's dual, solved exactly and for many palettes at once; and a replica of the authors' solver.

Exact method. Maximise g(λ) = λᵀc − Σ_g a_g log Σ_{k in g} p0_k exp(λᵀ r_k) over λ >= 0 (see
:mod:`mapjax.problem` for the pooled and per-prompt forms) by projected Newton in the standardized frame:

- gradient ∇(−g) = E_{p_λ} r − c, Hessian Cov_{p_λ} r (within-group covariances averaged for per-prompt);
- coordinates at zero whose gradient pushes them below zero are held at exactly zero (Bertsekas' projected
  Newton), the others take the Newton step; an Armijo backtracking search along the projection arc;
- every palette is a row of one matrix: Z = Λ R̃ᵀ is one product for the whole batch, the weighted covariances
  one more, and a convergence mask freezes rows that are done;
- a row stops when its KKT residual (|∇| on positive coordinates, constraint violation on zero ones, in
  standard deviations of each value) is below ``tol``, or when its own iterate proves the palette
  infeasible: with d = λ̃/‖λ̃‖₁, Σ_g a_g max_k dᵀr̃_k <= dᵀc̃ means no model on these samples reaches c
  (a Farkas certificate, see :mod:`mapjax.certificate`).

Rows that do not converge in float32 are solved again in float64; rows that still do not converge get the LP's
verdict. Reference method: see :func:`reference_lambdas`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.certificate import Certificate
from mapjax.certificate import certify as lp_certificate
from mapjax.palette import Palette, PaletteSpec, check_levels, parse
from mapjax.pool import RewardPool
from mapjax.problem import DualProblem, Normaliser

Method = Literal["exact", "reference"]
DType = Literal["float32", "float64"]
STATUSES = ("optimal", "infeasible", "not_converged")
_OPTIMAL, _INFEASIBLE, _NOT_CONVERGED = 0, 1, 2
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
MAX_BACKTRACKS = 40
ARMIJO = 1e-4
# Largest [samples, values²] buffer of outer products worth keeping for the batched covariance.
OUTER_LIMIT = 1 << 24
# Pools up to this many rewards pad small batches to 8 rows, sharing one compiled program.
SMALL_POOL = 1 << 20
# A scaled λ this large means the weights sit on one sample per group: the palette is on (or past) the boundary.
LAMBDA_LIMIT = 1e7

# Reference method: the authors' Adam settings (MAP.md section 2).
REFERENCE_STEPS = 150
REFERENCE_LEARNING_RATE = 0.1
REFERENCE_BETAS = (0.9, 0.999)
REFERENCE_EPS = 1e-8


# ============================================================================ results


@dataclass(frozen=True)
class Solution:
    """λ for one palette and what it realises.

    Attributes:
        value_names: the pool's values; every array below is over them, in this order.
        targets: the palette c (NaN where a value is unconstrained).
        lam: λ >= 0, exactly 0 where a constraint is slack or a value is unconstrained.
        status: "optimal" (KKT residual <= tolerance), "infeasible" (no finite λ reaches c; see
            ``certificate``) or "not_converged". For method="reference" it is the authors' verdict:
            "optimal" when λ stayed finite, "infeasible" on overflow.
        realised: E_{p_λ} r, the levels the aligned model reaches on the pool.
        kkt_residual: largest KKT violation, in standard deviations of the value.
        kl: KL(p_λ || p0) on the pool (per prompt, averaged, for the per-prompt normaliser).
        ess: effective sample size 1/Σw² of p_λ's weights (per prompt, averaged, for per-prompt).
        iterations: Newton iterations (Adam steps for the reference).
        normaliser, method, dtype: how it was solved.
        sensitivity: dλ/dc (raw units, [values, values]) when asked for; zero rows and columns for values
            with λ = 0.
        certificate: the LP (or the solver's own Farkas) verdict when computed.
    """

    value_names: tuple[str, ...]
    targets: np.ndarray
    lam: np.ndarray
    status: str
    realised: np.ndarray
    kkt_residual: float
    kl: float
    ess: float
    iterations: int
    normaliser: str
    method: str
    dtype: str
    sensitivity: np.ndarray | None = None
    certificate: Certificate | None = None

    @property
    def feasible(self) -> bool:
        return self.status == "optimal"

    @property
    def constrained(self) -> np.ndarray:
        return ~np.isnan(self.targets)

    def violations(self) -> np.ndarray:
        """max(0, c − E_{p_λ} r) per value, raw units (0 where unconstrained)."""
        return _violations(self.targets, self.realised)

    def lam_by_name(self) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.value_names, self.lam)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out: dict[str, Any] = {
            "status": self.status,
            "method": self.method,
            "normaliser": self.normaliser,
            "dtype": self.dtype,
            "values": [
                {
                    "name": name,
                    "target": None if math.isnan(target) else float(target),
                    "realised": float(realised),
                    "lambda": float(lam),
                }
                for name, target, realised, lam in zip(self.value_names, self.targets, self.realised, self.lam)
            ],
            "kkt_residual": _json_float(self.kkt_residual),
            "kl": _json_float(self.kl),
            "ess": _json_float(self.ess),
            "iterations": int(self.iterations),
        }
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity.tolist()
        if self.certificate is not None:
            out["certificate"] = {
                "feasible": self.certificate.feasible,
                "margin": self.certificate.margin,
                "blocking_values": list(self.certificate.blocking_values),
                "explanation": self.certificate.explain(),
            }
        return out

    def table(self) -> str:
        """A table a person can read: value, target, realised, λ; then the verdict."""
        width = max(8, *(len(name) for name in self.value_names))
        lines = [f"{'value':<{width}}  {'target':>10}  {'realised':>10}  {'lambda':>10}"]
        for name, target, realised, lam in zip(self.value_names, self.targets, self.realised, self.lam):
            cells = ("-" if math.isnan(number) else f"{number:10.4f}" for number in (target, realised, lam))
            lines.append(f"{name:<{width}}  " + "  ".join(f"{cell:>10}" for cell in cells))
        lines.append("")
        lines.append(f"status        {self.status} ({self.method}, {self.normaliser} normaliser, {self.dtype})")
        if self.status != "infeasible":
            lines.append(f"KKT residual  {self.kkt_residual:.3g} sd")
            lines.append(f"KL(p_λ||p0)   {self.kl:.4f}")
            lines.append(f"ESS           {self.ess:.1f}")
        lines.append(f"iterations    {self.iterations}")
        if self.certificate is not None:
            lines.append(f"certificate   {self.certificate.explain()}")
        return "\n".join(lines)


def _violations(targets: np.ndarray, realised: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(targets), 0.0, np.maximum(targets - realised, 0.0))


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Solutions:
    """Solutions for a batch of palettes, as arrays with a leading palette axis; index it for a Solution."""

    value_names: tuple[str, ...]
    targets: np.ndarray
    lam: np.ndarray
    status: np.ndarray  # of str
    realised: np.ndarray
    kkt_residual: np.ndarray
    kl: np.ndarray
    ess: np.ndarray
    iterations: np.ndarray
    normaliser: str
    method: str
    dtype: str
    sensitivity: np.ndarray | None = None
    certificates: dict[int, Certificate] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lam.shape[0])

    def __getitem__(self, index: int) -> Solution:
        if not -len(self) <= index < len(self):
            raise IndexError(f"palette {index} of {len(self)}")
        index %= len(self)
        return Solution(
            value_names=self.value_names,
            targets=self.targets[index],
            lam=self.lam[index],
            status=str(self.status[index]),
            realised=self.realised[index],
            kkt_residual=float(self.kkt_residual[index]),
            kl=float(self.kl[index]),
            ess=float(self.ess[index]),
            iterations=int(self.iterations[index]),
            normaliser=self.normaliser,
            method=self.method,
            dtype=self.dtype,
            sensitivity=None if self.sensitivity is None else self.sensitivity[index],
            certificate=self.certificates.get(index),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def feasible(self) -> np.ndarray:
        return self.status == "optimal"

    def violations(self) -> np.ndarray:
        """[palettes, values] max(0, c − E_{p_λ} r), raw units."""
        return _violations(self.targets, self.realised)

    def take(self, rows: Sequence[int] | np.ndarray) -> "Solutions":
        """The solutions of the given rows (indices or a boolean mask), in that order."""
        rows = np.arange(len(self))[np.asarray(rows)]
        return concatenate([self], [rows])


def concatenate(batches: Sequence[Solutions], rows: Sequence[np.ndarray] | None = None) -> Solutions:
    """One Solutions from several solved alike (same pool values, normaliser, method, dtype)."""
    if not batches:
        raise ValueError("nothing to concatenate")
    first = batches[0]
    rows = [np.arange(len(batch)) for batch in batches] if rows is None else [np.asarray(r) for r in rows]
    for batch in batches[1:]:
        if (batch.value_names, batch.normaliser, batch.method, batch.dtype) != (
            first.value_names, first.normaliser, first.method, first.dtype
        ):
            raise ValueError("solutions of different pools or settings cannot be concatenated")

    def stack(name):
        return np.concatenate([getattr(batch, name)[index] for batch, index in zip(batches, rows)])

    certificates, offset = {}, 0
    for batch, index in zip(batches, rows):
        for new_row, old_row in enumerate(index):
            if int(old_row) in batch.certificates:
                certificates[offset + new_row] = batch.certificates[int(old_row)]
        offset += len(index)
    with_sensitivity = all(batch.sensitivity is not None for batch in batches)
    return Solutions(
        value_names=first.value_names,
        targets=stack("targets"),
        lam=stack("lam"),
        status=stack("status"),
        realised=stack("realised"),
        kkt_residual=stack("kkt_residual"),
        kl=stack("kl"),
        ess=stack("ess"),
        iterations=stack("iterations"),
        normaliser=first.normaliser,
        method=first.method,
        dtype=first.dtype,
        sensitivity=stack("sensitivity") if with_sensitivity else None,
        certificates=certificates,
    )


# ============================================================================ the batched Newton solver


def _group_log_base(log_base: jax.Array) -> jax.Array:
    """log p0 weight of each group's samples (constant within a group)."""
    return jnp.max(log_base, axis=-1)


def _evaluate(scaled, log_base, group_weight, targets, lam):
    """Objective f = −g at λ and the pieces later steps reuse (the exp pass is the expensive part)."""
    logits = jnp.einsum("gkm,bm->bgk", scaled, lam) + log_base
    top = jnp.max(logits, axis=-1)
    unnormalised = jnp.exp(logits - top[..., None])
    total = jnp.sum(unnormalised, axis=-1)
    log_normaliser = top + jnp.log(total)
    objective = jnp.sum(log_normaliser * group_weight, axis=-1) - jnp.sum(lam * targets, axis=-1)
    # Σ_g a_g max_k λᵀr̃ − λᵀc̃: at or below zero it proves the palette infeasible along λ's direction.
    worst_margin = jnp.sum((top - _group_log_base(log_base)) * group_weight, axis=-1) - jnp.sum(lam * targets, -1)
    return objective, unnormalised, total, worst_margin


def _outer_products(scaled):
    """[samples, values²] products r̃_i r̃_j, for the batched covariance as one matrix product."""
    num_groups, num_slots, num_values = scaled.shape
    return (scaled[..., :, None] * scaled[..., None, :]).reshape(num_groups * num_slots, num_values**2)


def _moments(scaled, group_weight, unnormalised, total, outer=None):
    """Mean, covariance (Hessian of −g) and ESS of p_λ from the exp pass.

    With ``outer`` (see :func:`_outer_products`, computed once per solve) the weighted second moments of every
    palette are one [palettes, samples] x [samples, values²] product, the fast shape for many palettes; without
    it, each palette's weighted samples are contracted with the samples, which needs no [samples, values²]
    buffer and suits a few palettes on a large pool.
    """
    weights = unnormalised / total[..., None]  # [B, G, K]
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


def _kkt_residual(lam, gradient, movable):
    per_value = jnp.where(lam > 0, jnp.abs(gradient), jnp.maximum(-gradient, 0.0))
    return jnp.max(jnp.where(movable, per_value, 0.0), axis=-1)


@jax.jit
def _projected_newton(scaled, log_base, group_weight, targets, movable, lam0, tol, max_iter):
    """Projected Newton on −g for a batch of palettes; see the module docstring."""
    dtype = scaled.dtype
    eps = jnp.finfo(dtype).eps
    targets = jnp.where(movable, targets, 0.0)
    lam0 = jnp.where(movable, jnp.maximum(lam0, 0.0), lam0)
    num_batch, num_values = lam0.shape
    identity = jnp.eye(num_values, dtype=dtype)

    # Many palettes: precompute the outer products once; few palettes or a big pool: skip that buffer.
    outer_size = scaled.shape[0] * scaled.shape[1] * num_values**2
    outer = _outer_products(scaled) if num_batch >= num_values and outer_size <= OUTER_LIMIT else None

    def measure(lam, unnormalised, total):
        mean, covariance, ess = _moments(scaled, group_weight, unnormalised, total, outer)
        gradient = jnp.where(movable, mean - targets, 0.0)
        return mean, covariance, ess, gradient

    objective, unnormalised, total, worst_margin = _evaluate(scaled, log_base, group_weight, targets, lam0)
    mean, covariance, ess, gradient = measure(lam0, unnormalised, total)
    residual = _kkt_residual(lam0, gradient, movable)
    state = dict(
        lam=lam0,
        objective=objective,
        mean=mean,
        covariance=covariance,
        ess=ess,
        gradient=gradient,
        residual=residual,
        worst_margin=worst_margin,
        status=jnp.where(residual <= tol, _OPTIMAL, _NOT_CONVERGED),
        done=residual <= tol,
        iterations=jnp.zeros(num_batch, jnp.int32),
        step=jnp.int32(0),
    )

    def direction(lam, gradient, covariance):
        # Coordinates at (or within a hair of) zero that the gradient pushes further down stay at zero.
        near_zero = lam <= 1e3 * eps * (1.0 + jnp.max(lam, axis=-1, keepdims=True))
        binding = movable & near_zero & (gradient > 0)
        free = movable & ~binding
        both_free = free[:, :, None] & free[:, None, :]
        diagonal = jnp.diagonal(covariance, axis1=1, axis2=2)
        damping = 100 * eps * jnp.max(jnp.where(free, diagonal, 0.0), axis=-1) + jnp.finfo(dtype).tiny
        system = jnp.where(both_free, covariance, 0.0) + identity * jnp.where(
            free, damping[:, None], 1.0
        )[:, None, :]
        newton = jnp.linalg.solve(system, jnp.where(free, -gradient, 0.0)[..., None])[..., 0]
        return jnp.where(free, newton, jnp.where(binding, -gradient, 0.0))

    def line_search(state, step_direction):
        lam, objective, gradient = state["lam"], state["objective"], state["gradient"]
        slack = 10 * eps * (1.0 + jnp.abs(objective))

        def trial(alpha):
            candidate = jnp.where(movable, jnp.maximum(lam + alpha[:, None] * step_direction, 0.0), lam)
            new_objective, unnormalised, total, worst_margin = _evaluate(
                scaled, log_base, group_weight, targets, candidate
            )
            decrease = jnp.sum(gradient * (candidate - lam), axis=-1)
            accepted = (new_objective <= objective + ARMIJO * decrease + slack) & jnp.isfinite(new_objective)
            return dict(
                lam=candidate,
                objective=new_objective,
                unnormalised=unnormalised,
                total=total,
                worst_margin=worst_margin,
                accepted=accepted,
            )

        first = trial(jnp.ones(num_batch, dtype))
        first["alpha"] = jnp.ones(num_batch, dtype)
        first["tries"] = jnp.int32(1)
        first["accepted"] = first["accepted"] | state["done"]

        def keep_trying(search):
            return (~jnp.all(search["accepted"])) & (search["tries"] < MAX_BACKTRACKS)

        def backtrack(search):
            alpha = jnp.where(search["accepted"], search["alpha"], search["alpha"] / 2)
            attempt = trial(alpha)
            keep = search["accepted"]
            merged = {
                key: _select_rows(keep, search[key], attempt[key])
                for key in ("lam", "objective", "unnormalised", "total", "worst_margin")
            }
            merged["accepted"] = keep | attempt["accepted"]
            merged["alpha"] = alpha
            merged["tries"] = search["tries"] + 1
            return merged

        return jax.lax.while_loop(keep_trying, backtrack, first)

    def keep_going(state):
        return (~jnp.all(state["done"])) & (state["step"] < max_iter)

    def iterate(state):
        step_direction = direction(state["lam"], state["gradient"], state["covariance"])
        search = line_search(state, step_direction)
        moved = search["accepted"] & ~state["done"]
        mean, covariance, ess, gradient = measure(search["lam"], search["unnormalised"], search["total"])
        new = dict(
            lam=search["lam"],
            objective=search["objective"],
            mean=mean,
            covariance=covariance,
            ess=ess,
            gradient=gradient,
            residual=_kkt_residual(search["lam"], gradient, movable),
            worst_margin=search["worst_margin"],
        )
        new = {key: _select_rows(moved, value, state[key]) for key, value in new.items()}
        scale = jnp.sum(jnp.abs(new["lam"]), axis=-1)
        optimal = new["residual"] <= tol
        infeasible = ~optimal & (scale > 0) & (new["worst_margin"] <= -1e3 * eps * scale)
        stalled = ~search["accepted"] | (scale > LAMBDA_LIMIT) | ~jnp.isfinite(new["objective"])
        status = jnp.where(optimal, _OPTIMAL, jnp.where(infeasible, _INFEASIBLE, _NOT_CONVERGED))
        new["status"] = jnp.where(state["done"], state["status"], status)
        new["done"] = state["done"] | optimal | infeasible | stalled
        new["iterations"] = state["iterations"] + (~state["done"]).astype(jnp.int32)
        new["step"] = state["step"] + 1
        return new

    final = jax.lax.while_loop(keep_going, iterate, state)
    log_normaliser_sum = final["objective"] + jnp.sum(final["lam"] * targets, axis=-1)
    kl = jnp.sum(final["lam"] * final["mean"], axis=-1) - log_normaliser_sum
    return dict(
        lam=final["lam"],
        mean=final["mean"],
        covariance=final["covariance"],
        ess=final["ess"],
        residual=final["residual"],
        status=final["status"],
        iterations=final["iterations"],
        kl=kl,
        worst_margin=final["worst_margin"],
        done=final["done"],
    )


def _select_rows(mask, if_true, if_false):
    """Per-palette select: mask [B] broadcast over the trailing axes."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (if_true.ndim - 1)), if_true, if_false)


@jax.jit
def _measure_at(scaled, log_base, group_weight, lam):
    """Mean, covariance, ESS and KL of p_λ for given scaled λ (no solving)."""
    zeros = jnp.zeros_like(lam)
    objective, unnormalised, total, _ = _evaluate(scaled, log_base, group_weight, zeros, lam)
    mean, covariance, ess = _moments(scaled, group_weight, unnormalised, total)
    kl = jnp.sum(lam * mean, axis=-1) - objective
    return mean, covariance, ess, kl


# ============================================================================ the reference replica


@partial(jax.jit, static_argnames=("steps",))
def _reference_adam(rewards, targets, start, movable, steps: int = REFERENCE_STEPS):
    """The authors' solver, replicated (MAP.md section 2), vmapped over a batch of palettes.

    rewards [n, m] raw, float32 as theirs; λ = exp(τ) on the movable coordinates with τ = 0 at start (λ = 1),
    the others held at ``start``; torch-style Adam, lr 0.1, default betas and eps; loss
    log(mean(exp(λᵀr))) − λᵀc with a plain exp, so an overflow turns the gradient into NaN and the next λ
    non-finite, which ends the run as a failure. The λ returned is the one computed at the top of the last step.
    """
    beta1, beta2 = REFERENCE_BETAS

    def one_palette(target, start_lam, movable_mask):
        def lam_of(tau):
            return jnp.where(movable_mask, jnp.exp(tau), start_lam)

        def loss(tau):
            lam = lam_of(tau)
            return jnp.log(jnp.mean(jnp.exp(jnp.sum(lam[:, None] * rewards.T, axis=0)))) - jnp.dot(lam, target)

        def step(carry, index):
            tau, first, second, returned, failed = carry
            lam = lam_of(tau)
            failed = failed | ~jnp.all(jnp.isfinite(lam))
            grad = jnp.where(movable_mask, jax.grad(loss)(tau), 0.0)
            count = (index + 1).astype(tau.dtype)
            first_new = beta1 * first + (1 - beta1) * grad
            second_new = beta2 * second + (1 - beta2) * grad * grad
            update = (REFERENCE_LEARNING_RATE / (1 - beta1**count)) * first_new / (
                jnp.sqrt(second_new) / jnp.sqrt(1 - beta2**count) + REFERENCE_EPS
            )
            tau_new = jnp.where(movable_mask, tau - update, tau)
            carry = (
                jnp.where(failed, tau, tau_new),
                jnp.where(failed, first, first_new),
                jnp.where(failed, second, second_new),
                jnp.where(failed, returned, lam),
                failed,
            )
            return carry, None

        zeros = jnp.zeros_like(start_lam)
        carry = (zeros, zeros, zeros, lam_of(zeros), jnp.bool_(False))
        (_, _, _, returned, failed), _ = jax.lax.scan(step, carry, jnp.arange(steps))
        return returned, failed

    return jax.vmap(one_palette)(targets, start, movable)


# ============================================================================ public API

PaletteBatch = Union[Sequence[PaletteSpec], np.ndarray]


@contextlib.contextmanager
def _precision(dtype: str):
    """float64 needs JAX's x64 mode; switch it on for the solve only, leaving the process default alone."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    with jax.enable_x64(dtype == "float64"):
        yield jnp.dtype(dtype)


def _is_spec(palette: Any) -> bool:
    return isinstance(palette, (str, Mapping, Palette))


def as_pool(data: Union[RewardPool, np.ndarray, Sequence[Sequence[float]]], values: Sequence[str] | None = None) -> RewardPool:
    """A RewardPool, or an array [n, values] of one sample each turned into one."""
    if isinstance(data, RewardPool):
        return data
    return RewardPool.from_array(np.asarray(data, dtype=np.float64), value_names=values)


def palette_targets(pool: RewardPool, palettes: PaletteBatch, values: Sequence[str] | None = None) -> np.ndarray:
    """[palettes, pool values] targets, NaN where unconstrained, range-checked.

    ``palettes`` is a list of palette specs (strings, dicts, Palettes), or an array: [palettes, len(values)]
    over the named ``values``, or [palettes, pool values] with NaN for unconstrained entries.
    """
    if _is_spec(palettes):
        palettes = [palettes]
    if not isinstance(palettes, np.ndarray) and all(_is_spec(spec) for spec in palettes):
        if len(palettes) == 0:
            raise ValueError("no palettes given")
        targets = np.stack([parse(spec).targets(pool, check_range=False) for spec in palettes])
    else:
        array = np.atleast_2d(np.asarray(palettes, dtype=np.float64))
        if array.ndim != 2:
            raise ValueError(f"palette array must be [palettes, values], got shape {np.shape(palettes)}")
        if values is None:
            if array.shape[1] != pool.num_values:
                raise ValueError(
                    f"palette array has {array.shape[1]} columns but the pool has {pool.num_values} values "
                    f"{list(pool.value_names)}; pass values=[...] to name the columns"
                )
            targets = array
        else:
            if array.shape[1] != len(values):
                raise ValueError(f"palette array has {array.shape[1]} columns for {len(values)} values {list(values)}")
            targets = np.full((array.shape[0], pool.num_values), np.nan)
            for column, name in enumerate(values):
                targets[:, pool.index_of(name)] = array[:, column]
    if np.isnan(targets).all(axis=1).any():
        row = int(np.flatnonzero(np.isnan(targets).all(axis=1))[0])
        raise ValueError(f"palette {row} constrains no value")
    check_levels(pool, targets)
    return targets


# Device copies of each problem's arrays, per dtype, so repeated solves on one pool transfer them once.
_ON_DEVICE: "weakref.WeakKeyDictionary[DualProblem, dict]" = weakref.WeakKeyDictionary()


def _scaled_inputs(problem: DualProblem, dtype):
    copies = _ON_DEVICE.setdefault(problem, {})
    key = jnp.dtype(dtype).name
    if key not in copies:
        copies[key] = tuple(jnp.asarray(array, dtype) for array in (problem.scaled, problem.log_base, problem.group_weight))
    return copies[key]


def _bucket(batch: int, pool_size: int) -> int:
    """Batch size to pad to: a power of two, at least 8 on small pools so that few programs get compiled;
    on a big pool the padding rows would cost more than a compile."""
    smallest = 8 if pool_size <= SMALL_POOL else 1
    return max(smallest, 1 << (batch - 1).bit_length())


# Iterations of the first round; each later round runs twice as many on the rows still going.
FIRST_ROUND = 2


def _newton_batch(
    problem: DualProblem,
    targets: np.ndarray,
    dtype: str,
    tol: float,
    max_iter: int,
    movable: np.ndarray | None = None,
    start: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Run the jitted solver on a batch; λ in, λ out in raw units.

    Most palettes of a random batch are settled in one or two iterations (an infeasible one is usually proved so
    by its first step), so the batch runs in rounds of growing length, and after each round only the rows still
    going are gathered into a smaller batch (padded to a power of two, so batches of similar size share one
    compiled program). Restarting a row from its λ costs one extra evaluation.
    """
    if movable is None:
        movable = ~np.isnan(targets)
    scaled_targets = np.where(movable, problem.to_scaled_targets(np.nan_to_num(targets)), 0.0)
    scaled_lam = np.zeros(targets.shape) if start is None else problem.to_scaled_lambda(start)
    out: dict[str, np.ndarray] = {}
    iterations = np.zeros(targets.shape[0], dtype=np.int64)
    remaining = np.arange(targets.shape[0])
    budget, round_length = int(max_iter), FIRST_ROUND
    with _precision(dtype) as jdtype:
        inputs = _scaled_inputs(problem, jdtype)
        while remaining.size:
            steps = min(round_length, budget)
            padding = _bucket(remaining.size, problem.scaled.size) - remaining.size
            rows = np.concatenate([remaining, np.repeat(remaining[:1], padding)])
            result = _projected_newton(
                *inputs,
                jnp.asarray(scaled_targets[rows], jdtype),
                jnp.asarray(movable[rows]),
                jnp.asarray(scaled_lam[rows], jdtype),
                jnp.asarray(tol, jdtype),
                jnp.asarray(steps, jnp.int32),
            )
            result = {key: np.asarray(value)[: remaining.size] for key, value in result.items()}
            for key, value in result.items():
                if key not in out:
                    out[key] = np.zeros((targets.shape[0],) + value.shape[1:], dtype=value.dtype)
                out[key][remaining] = value
            iterations[remaining] += result["iterations"]
            scaled_lam[remaining] = result["lam"]
            budget -= steps
            round_length *= 2
            remaining = remaining[~result["done"]] if budget > 0 else remaining[:0]
    out = {key: value.astype(np.float64) if value.dtype.kind == "f" else value for key, value in out.items()}
    out["iterations"] = iterations
    out["scaled_lam"] = out["lam"]
    out["lam"] = problem.to_raw_lambda(out["lam"])
    return out


def _measure_batch(problem: DualProblem, lam: np.ndarray) -> dict[str, np.ndarray]:
    """Mean (scaled), covariance (scaled), ESS, KL of p_λ for raw λ, in float64."""
    with _precision("float64") as jdtype:
        mean, covariance, ess, kl = _measure_at(
            *_scaled_inputs(problem, jdtype), jnp.asarray(problem.to_scaled_lambda(lam), jdtype)
        )
        return {"mean": np.asarray(mean), "covariance": np.asarray(covariance), "ess": np.asarray(ess), "kl": np.asarray(kl)}


def _residual(problem: DualProblem, targets: np.ndarray, lam: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """KKT residual in standard deviations (host-side twin of the solver's stopping test)."""
    constrained = ~np.isnan(targets)
    gradient = np.where(constrained, mean - problem.to_scaled_targets(np.nan_to_num(targets)), 0.0)
    per_value = np.where(lam > 0, np.abs(gradient), np.maximum(-gradient, 0.0))
    return np.max(np.where(constrained, per_value, 0.0), axis=-1)


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
    """The solver's own Farkas certificate: the direction of the diverging λ."""
    direction = np.maximum(lam_scaled, 0.0)
    total = direction.sum()
    direction = direction / total
    blocking = tuple(problem.value_names[i] for i in np.flatnonzero(direction > 1e-3))
    return Certificate(False, min(worst_margin / total, 0.0), direction, blocking)


def solve_many(
    pool: RewardPool,
    palettes: PaletteBatch,
    *,
    values: Sequence[str] | None = None,
    normaliser: Normaliser = "pooled",
    method: Method = "exact",
    dtype: DType = "float64",
    tol: float | None = None,
    max_iter: int = 100,
    sensitivity: bool = False,
    certify: bool = False,
) -> Solutions:
    """Solve MAP's dual for a batch of palettes, all as rows of one compiled program.

    Args:
        pool: the base model's rewards.
        palettes: palette specs, or an array of targets (see :func:`palette_targets`).
        values: names of the columns of a palette array over a subset of the pool's values.
        normaliser: "pooled" (the paper's g_n) or "per_prompt" (matches per-prompt decoding).
        method: "exact" (projected Newton, certified) or "reference" (the authors' Adam replica).
        dtype: working precision of the exact solve; float32 is about twice as fast, and its rows that miss
            ``tol`` are re-solved in float64.
        tol: KKT tolerance in standard deviations (default 1e-4 in float32, 1e-8 in float64).
        max_iter: Newton iterations at most.
        sensitivity: also return dλ/dc.
        certify: run the LP certificate on every palette (otherwise only where the solver could not decide).
    """
    if method not in ("exact", "reference"):
        raise ValueError(f"method must be 'exact' or 'reference', got {method!r}")
    if dtype not in DEFAULT_TOLERANCE:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    targets = palette_targets(pool, palettes, values)
    problem = DualProblem.from_pool(pool, normaliser)
    if method == "reference":
        return _reference_solutions(pool, problem, targets, sensitivity, certify)
    tol = DEFAULT_TOLERANCE[dtype] if tol is None else float(tol)
    out = _newton_batch(problem, targets, dtype, tol, max_iter)
    if dtype == "float32":
        # float32 rounding can stall a hard row short of tol; finish those in float64 from scratch.
        retry = np.flatnonzero(out["status"] == _NOT_CONVERGED)
        if retry.size:
            again = _newton_batch(problem, targets[retry], "float64", min(tol, DEFAULT_TOLERANCE["float64"] * 1e4), max_iter * 2)
            for key in out:
                out[key][retry] = again[key]
    return _assemble(problem, targets, out, "exact", dtype, sensitivity, certify)


def _assemble(problem, targets, out, method, dtype, want_sensitivity, certify) -> Solutions:
    status_codes = out["status"].astype(int)
    certificates: dict[int, Certificate] = {}
    for row in range(targets.shape[0]):
        code = status_codes[row]
        if certify or code == _NOT_CONVERGED:
            certificate = lp_certificate(problem, targets[row])
            certificates[row] = certificate
            if code == _NOT_CONVERGED and not certificate.feasible:
                status_codes[row] = _INFEASIBLE
        elif code == _INFEASIBLE and method == "exact":
            certificates[row] = _solver_certificate(problem, out["scaled_lam"][row], out["worst_margin"][row])
    infeasible = status_codes == _INFEASIBLE
    nan_rows = infeasible[:, None]
    lam = np.where(nan_rows, np.nan, out["lam"])
    realised = np.where(nan_rows, np.nan, problem.to_raw_levels(out["mean"]))
    sensitivity = None
    if want_sensitivity:
        sensitivity = _sensitivity(problem, np.nan_to_num(lam), out["covariance"])
        sensitivity[infeasible] = np.nan
    return Solutions(
        value_names=problem.value_names,
        targets=targets,
        lam=lam,
        status=np.asarray(STATUSES)[status_codes],
        realised=realised,
        kkt_residual=np.where(infeasible, np.nan, out["residual"]),
        kl=np.where(infeasible, np.nan, out["kl"]),
        ess=np.where(infeasible, np.nan, out["ess"]),
        iterations=out["iterations"].astype(int),
        normaliser=problem.normaliser,
        method=method,
        dtype=dtype,
        sensitivity=sensitivity,
        certificates=certificates,
    )



def solve(
    data: Union[RewardPool, np.ndarray],
    palette: Union[PaletteSpec, np.ndarray, Sequence[float]],
    *,
    values: Sequence[str] | None = None,
    normaliser: Normaliser = "pooled",
    method: Method = "exact",
    dtype: DType = "float64",
    tol: float | None = None,
    max_iter: int = 100,
    sensitivity: bool = False,
    certify: bool = True,
) -> Solution:
    """Solve MAP's dual for one palette.

    ``data`` is a RewardPool or a plain array [n, values] (one sample each); ``palette`` a spec (string,
    dict) or a vector of levels over ``values`` (or over all values, NaN where unconstrained). The LP
    certificate is attached by default. See :func:`solve_many` for the other arguments.
    """
    if isinstance(data, RewardPool):
        pool, palette_values = data, values
    else:
        # A plain array: its columns are the values, and a palette vector runs over all of them.
        pool, palette_values = as_pool(data, values), None
    batch = [palette] if _is_spec(palette) else np.atleast_2d(np.asarray(palette, dtype=np.float64))
    return solve_many(
        pool,
        batch,
        values=palette_values,
        normaliser=normaliser,
        method=method,
        dtype=dtype,
        tol=tol,
        max_iter=max_iter,
        sensitivity=sensitivity,
        certify=certify,
    )[0]


def _measured_solutions(problem, targets, lam, status_codes, iterations, method, dtype, want_sensitivity, certify) -> Solutions:
    """Solutions for λ found elsewhere (reference, sequential, given λ): measure p_λ exactly in float64."""
    finite = np.all(np.isfinite(lam), axis=1)
    measured = _measure_batch(problem, np.where(finite[:, None], lam, 0.0))
    out = {
        "lam": lam,
        "scaled_lam": problem.to_scaled_lambda(lam),
        "mean": measured["mean"],
        "covariance": measured["covariance"],
        "ess": measured["ess"],
        "kl": measured["kl"],
        "residual": _residual(problem, targets, np.nan_to_num(lam), measured["mean"]),
        "status": np.asarray(status_codes),
        "iterations": np.asarray(iterations),
        "worst_margin": np.zeros(len(lam)),
    }
    return _assemble(problem, targets, out, method, dtype, want_sensitivity, certify)


def reference_lambdas(
    pool: RewardPool,
    targets: np.ndarray,
    start: np.ndarray | None = None,
    movable: np.ndarray | None = None,
    steps: int = REFERENCE_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' λ for a batch of targets [palettes, values] (NaN = unconstrained): (λ, failed).

    Pooled normaliser, float32, raw rewards, exactly as their solver. ``movable`` picks the coordinates Adam
    moves (restarted at λ = 1); the others stay at ``start`` (default 0), as their sequential variant does.
    """
    targets = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    constrained = ~np.isnan(targets)
    movable = constrained if movable is None else np.asarray(movable, dtype=bool)
    start = np.zeros(targets.shape) if start is None else np.asarray(start, dtype=np.float64)
    with _precision("float32"):
        lam, failed = _reference_adam(
            jnp.asarray(pool.flat(), jnp.float32),
            jnp.asarray(np.where(constrained, targets, 0.0), jnp.float32),
            jnp.asarray(start, jnp.float32),
            jnp.asarray(movable),
            steps=int(steps),
        )
    failed = np.asarray(failed)
    lam = np.where(failed[:, None], np.nan, np.asarray(lam, dtype=np.float64))
    return lam, failed


def _reference_solutions(pool, problem, targets, want_sensitivity, certify) -> Solutions:
    if problem.normaliser != "pooled":
        raise ValueError("method='reference' replicates the authors' pooled solver; use normaliser='pooled'")
    lam, failed = reference_lambdas(pool, targets)
    codes = np.where(failed, _INFEASIBLE, _OPTIMAL)
    iterations = np.full(len(targets), REFERENCE_STEPS)
    return _measured_solutions(problem, targets, lam, codes, iterations, "reference", "float32", want_sensitivity, certify)


def solve_sequential(
    pool: RewardPool,
    palette: PaletteSpec,
    *,
    rounds: int = 5,
    method: Method = "exact",
    normaliser: Normaliser = "pooled",
    tol: float | None = None,
) -> list[Solution]:
    """Align one value at a time, each against the model the previous steps produced (Theorem 5).

    Each step re-solves one λ_i with the others fixed (coordinate ascent on g, exactly, for method="exact";
    the authors' 150 Adam steps restarted at λ_i = 1 for method="reference"), in the palette's written order;
    a round visits every constrained value once. Returns the solution after each round: with enough rounds the
    exact variant converges to the joint λ.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    parsed = parse(palette)
    targets = palette_targets(pool, [parsed])
    problem = DualProblem.from_pool(pool, normaliser)
    order = [pool.index_of(name) for name in parsed.names]
    lam = np.zeros((1, pool.num_values))
    tol = DEFAULT_TOLERANCE["float64"] if tol is None else float(tol)
    history: list[Solution] = []
    failed = False
    for round_number in range(1, rounds + 1):
        for column in order:
            movable = np.zeros((1, pool.num_values), dtype=bool)
            movable[0, column] = True
            if method == "reference":
                if normaliser != "pooled":
                    raise ValueError("method='reference' replicates the authors' pooled solver")
                lam, step_failed = reference_lambdas(pool, targets, start=lam, movable=movable)
                failed = bool(step_failed[0])
            elif method == "exact":
                lam = _newton_batch(problem, targets, "float64", tol, 100, movable=movable, start=lam)["lam"]
            else:
                raise ValueError(f"method must be 'exact' or 'reference', got {method!r}")
            if failed:
                break
        code = _INFEASIBLE if failed else _OPTIMAL
        solution = _measured_solutions(
            problem, targets, lam, [code], [round_number], method, "float32" if method == "reference" else "float64", False, False
        )[0]
        if method == "exact" and solution.kkt_residual > tol:
            # Coordinate ascent has not reached the joint optimum yet: say so rather than "optimal".
            solution = _replace(solution, status="not_converged")
        history.append(solution)
        if failed:
            break
    return history


def _replace(solution: Solution, **changes) -> Solution:
    import dataclasses

    return dataclasses.replace(solution, **changes)


def evaluate_lambdas(pool: RewardPool, lambdas: np.ndarray, *, values: Sequence[str] | None = None, normaliser: Normaliser = "pooled") -> Solutions:
    """The palettes that given λ solve: c = E_{p_λ} r for each row of ``lambdas`` (e.g. MORL's random λ).

    ``lambdas`` is [batch, len(values)] over the named values (default: all of the pool's values).
    """
    lambdas = np.atleast_2d(np.asarray(lambdas, dtype=np.float64))
    full = np.zeros((lambdas.shape[0], pool.num_values))
    names = pool.value_names if values is None else tuple(values)
    if lambdas.shape[1] != len(names):
        raise ValueError(f"lambdas have {lambdas.shape[1]} columns for {len(names)} values {list(names)}")
    for column, name in enumerate(names):
        full[:, pool.index_of(name)] = lambdas[:, column]
    if not np.all(np.isfinite(full)) or np.any(full < 0):
        raise ValueError("lambdas must be finite and non-negative")
    problem = DualProblem.from_pool(pool, normaliser)
    measured = _measure_batch(problem, full)
    targets = np.full(full.shape, np.nan)
    realised = problem.to_raw_levels(measured["mean"])
    constrained = np.zeros(full.shape, dtype=bool)
    for name in names:
        constrained[:, pool.index_of(name)] = True
    targets[constrained] = realised[constrained]
    codes = np.full(len(full), _OPTIMAL)
    return _measured_solutions(problem, targets, full, codes, np.zeros(len(full), int), "given", "float64", False, False)
