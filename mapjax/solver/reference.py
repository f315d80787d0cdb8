"""The authors' λ solver, replicated in JAX (MAP.md section 2), and its one-value-at-a-time sequential variant.

Their solver: λ = exp(τ), τ = 0 at start (λ = 1), torch Adam (lr 0.1, default betas and eps), exactly 150 steps,
float32, loss log(mean(exp(λᵀr))) − λᵀc with a plain exp on raw rewards; a non-finite λ at the top of a step
ends the run as a failure ("infeasible"), and the λ returned is the one from the top of the last step.

The replica follows PyTorch's float32 arithmetic operation by operation, because near overflow the verdict
hangs on it (see ``benchmarks/torch_reference.py``, the PyTorch counterpart the tests compare against):

- the gradient is the one torch's autograd forms for that loss: d/dmean log = 1/mean, d/de mean = 1/n,
  d/dz exp = exp(z), so dL/dz_j = ((1/mean)/n)·exp(z_j). When only the sum overflows, 1/mean = 0 and the
  gradient is −c (the run goes on); when an exp(z_j) overflows, 0·inf = NaN (the run fails). For a large mean,
  (1/mean)/n is a subnormal float32: PyTorch keeps it, XLA flushes it to zero, which would turn a finite
  gradient into −c and send the run into overflow. The replica therefore forms that chain in float64 and rounds
  each result to float32 itself, subnormals included (:func:`_round_to_float32`);
- exp is computed in float64 and rounded (PyTorch's float32 exp is within an ulp of that); sums over samples
  are rounded from float64; λᵀr sums the values in their order, as PyTorch does for a [values, n] tensor;
- Adam is torch's single-tensor update: the first moment by ``lerp`` with weight 0.1, the second by
  ``mul(β2).addcmul(g, g, 1 − β2)``, the bias corrections in double precision and used as float32 scalars,
  then ``τ − step_size·m / (sqrt(v)/sqrt(bc2) + eps)``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.pool import RewardPool
from mapjax.problem import precision

# The authors' Adam settings (MAP.md section 2).
REFERENCE_STEPS = 150
REFERENCE_LEARNING_RATE = 0.1
REFERENCE_BETAS = (0.9, 0.999)
REFERENCE_EPS = 1e-8

_SMALLEST_NORMAL = 2.0**-126  # float32
_SUBNORMAL_STEP = 2.0**-149  # float32's smallest subnormal: the spacing of the subnormal range


def _round_to_float32(values: jax.Array) -> jax.Array:
    """float64 values rounded to float32's grid as IEEE arithmetic does, subnormals included (XLA's float32
    arithmetic flushes those to zero; PyTorch's does not). Returns float64 holding float32 values."""
    normal = values.astype(jnp.float32).astype(jnp.float64)
    subnormal = jnp.round(values / _SUBNORMAL_STEP) * _SUBNORMAL_STEP  # round half to even, as IEEE
    return jnp.where(jnp.abs(values) >= _SMALLEST_NORMAL, normal, subnormal)


def _exp32(values: jax.Array) -> jax.Array:
    """float32 exp, correctly rounded (inf beyond float32's range)."""
    return jnp.exp(values.astype(jnp.float64)).astype(jnp.float32)


def _sum32(values: jax.Array, axis: int) -> jax.Array:
    """A float32 sum, rounded once from float64 (inf when it passes float32's range)."""
    return jnp.sum(values.astype(jnp.float64), axis=axis).astype(jnp.float32)


def _torch_gradient(tau, rewards, target, start, movable):
    """dL/dτ as torch's autograd computes it in float32 for one palette; see the module docstring.

    rewards [n, m] float32; target, start [m] float32; movable [m] bool. Returns (λ at τ, dL/dτ).
    """
    lam = jnp.where(movable, _exp32(tau), start)
    num_samples = rewards.shape[0]
    # λᵀr summed over the values in order, as torch.sum(lam[:, None] * rewards, dim=0) does.
    scores = lam[0] * rewards[:, 0]
    for value in range(1, rewards.shape[1]):
        scores = scores + lam[value] * rewards[:, value]
    exps = _exp32(scores)  # inf where one sample overflows
    mean = _sum32(exps, 0) / jnp.float32(num_samples)  # inf where only the sum overflows
    # The chain 1/mean -> /n -> ·exp(z) in float64, each step rounded to float32 with subnormals kept.
    inverse = _round_to_float32(1.0 / mean.astype(jnp.float64))
    per_exp = _round_to_float32(inverse / num_samples)
    per_score = _round_to_float32(per_exp * exps.astype(jnp.float64))  # 0·inf = NaN where exp overflowed
    # dL/dλ = Σ_j (dL/dz_j) r_j − c; products of two float32 are exact in float64.
    gradient_lam = _sum32(per_score[:, None] * rewards.astype(jnp.float64), 0) - target
    return lam, jnp.where(movable, gradient_lam * lam, 0.0)


@partial(jax.jit, static_argnames=("steps",))
def _reference_adam(rewards, targets, start, movable, step_sizes, bias2_roots, steps: int = REFERENCE_STEPS):
    """The authors' solver for a batch of palettes (vmapped); inputs float32, runs under x64 (see above).

    rewards [n, m] raw; targets, start [B, m]; movable [B, m] picks the coordinates Adam moves (from λ = 1), the
    others stay at ``start``; step_sizes, bias2_roots [steps] Adam's lr/(1 − β1^t) and sqrt(1 − β2^t), float32.
    Returns (λ from the top of the last step, failed).
    """
    beta1, beta2 = REFERENCE_BETAS
    first_weight = jnp.float32(1 - beta1)
    second_decay, second_weight = jnp.float32(beta2), jnp.float32(1 - beta2)
    eps = jnp.float32(REFERENCE_EPS)

    def one_palette(target, start_lam, movable_mask):
        def step(carry, schedule):
            tau, first, second, returned, failed = carry
            step_size, bias2_root = schedule
            lam, gradient = _torch_gradient(tau, rewards, target, start_lam, movable_mask)
            failed = failed | ~jnp.all(jnp.isfinite(lam))
            first_new = first + first_weight * (gradient - first)  # exp_avg.lerp_(grad, 1 − β1)
            second_new = second * second_decay + second_weight * gradient * gradient  # mul_(β2).addcmul_
            denominator = jnp.sqrt(second_new) / bias2_root + eps
            tau_new = jnp.where(movable_mask, tau + (-step_size) * first_new / denominator, tau)  # addcdiv_
            carry = (
                jnp.where(failed, tau, tau_new),
                jnp.where(failed, first, first_new),
                jnp.where(failed, second, second_new),
                jnp.where(failed, returned, lam),
                failed,
            )
            return carry, None

        zeros = jnp.zeros_like(start_lam)
        initial_lam = jnp.where(movable_mask, jnp.float32(1.0), start_lam)
        carry = (zeros, zeros, zeros, initial_lam, jnp.bool_(False))
        (_, _, _, returned, failed), _ = jax.lax.scan(step, carry, (step_sizes[:steps], bias2_roots[:steps]))
        return returned, failed

    return jax.vmap(one_palette)(targets, start, movable)


def _adam_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """torch Adam's per-step scalars, computed in double precision as torch does and used as float32."""
    beta1, beta2 = REFERENCE_BETAS
    count = np.arange(1, steps + 1, dtype=np.float64)
    step_sizes = REFERENCE_LEARNING_RATE / (1 - beta1**count)
    bias2_roots = (1 - beta2**count) ** 0.5
    return step_sizes.astype(np.float32), bias2_roots.astype(np.float32)


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
    A failed row's λ is NaN.
    """
    targets = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    constrained = ~np.isnan(targets)
    movable = constrained if movable is None else np.asarray(movable, dtype=bool)
    start = np.zeros(targets.shape) if start is None else np.asarray(start, dtype=np.float64)
    step_sizes, bias2_roots = _adam_schedule(int(steps))
    with precision("float64"):  # float64 only where torch's float32 keeps subnormals; the rest is float32
        lam, failed = _reference_adam(
            jnp.asarray(pool.flat(), jnp.float32),
            jnp.asarray(np.where(constrained, targets, 0.0), jnp.float32),
            jnp.asarray(start, jnp.float32),
            jnp.asarray(movable),
            jnp.asarray(step_sizes),
            jnp.asarray(bias2_roots),
            steps=int(steps),
        )
        failed = np.asarray(failed)
        lam = np.where(failed[:, None], np.nan, np.asarray(lam, dtype=np.float64))
    return lam, failed


def reference_sequential(
    pool: RewardPool, targets: np.ndarray, order: list[int], rounds: int
) -> list[tuple[np.ndarray, bool]]:
    """The authors' sequential variant on one palette: each step restarts Adam on one value (λ_i = 1), the
    others held, in ``order``; a round visits each once. Returns (λ [1, values], failed) after each round,
    stopping after the first failed round."""
    lam = np.zeros((1, pool.num_values))
    history: list[tuple[np.ndarray, bool]] = []
    for _ in range(rounds):
        failed = False
        for column in order:
            movable = np.zeros((1, pool.num_values), dtype=bool)
            movable[0, column] = True
            lam, step_failed = reference_lambdas(pool, targets, start=lam, movable=movable)
            failed = bool(step_failed[0])
            if failed:
                break
        history.append((lam, failed))
        if failed:
            break
    return history
