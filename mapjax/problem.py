"""The sample version of MAP's dual, laid out for solvers: standardized rewards in groups.

Pooled normaliser: all n samples form one group, g(λ) = λᵀc − log (1/n) Σ_j exp(λᵀ r_j).
Per-prompt normaliser: each prompt's samples form a group, weighted 1/P,
g(λ) = λᵀc − (1/P) Σ_x log (1/k_x) Σ_{y in x} exp(λᵀ r(x, y)).

Solvers work in a shifted, scaled frame r̃ = (r − μ)/σ (μ, σ the pooled mean and spread of each value) for
conditioning; λ = λ̃/σ maps back exactly, and the dual changes only by a constant. Every tolerance of the
solvers and the LP is in this frame, so a verdict does not depend on the rewards' units: μ and σ are computed
without overflow or underflow at any finite scale (:func:`mapjax.pool.scaled_moments`), and so is the frame
itself (:func:`standardise`). A spread so small or so large that λ = λ̃/σ could not be written as a float64
(outside [:data:`SMALLEST_SPREAD`, :data:`LARGEST_SPREAD`]) is refused with a named error.

The tilted distribution p_λ ∝ p0 exp(λᵀr), normalised within each group, is computed in one place,
:func:`group_tilt`: the Newton kernel uses it on device, and :func:`tilt_weights` gives its weights to numpy
callers (MAP-D's selection probabilities, reweighted histograms).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mapjax.errors import InputError, SolverError
from mapjax.pool import RewardPool, real_array

Normaliser = Literal["pooled", "per_prompt"]
# Problems already built, per pool (weakly held: they go with their pool).
_BUILT: "weakref.WeakKeyDictionary[RewardPool, dict[str, DualProblem]]" = weakref.WeakKeyDictionary()
NORMALISERS: tuple[str, ...] = ("pooled", "per_prompt")
DType = Literal["float32", "float64"]
DTYPES: tuple[str, ...] = ("float32", "float64")
# The spreads σ a pool's values may have: λ = λ̃/σ, with λ̃ up to the kernel's 1e7, must stay a finite float64
# (below about 1.8e308), and above σ = 2^1000 a λ that matters would fall among the subnormal floats (below
# about 2.2e-308). About 9.3e-302 and 1.1e301.
SMALLEST_SPREAD = 2.0**-1000
LARGEST_SPREAD = 2.0**1000


@dataclass(frozen=True, eq=False)
class DualProblem:
    """Standardized rewards in groups, with everything a solver needs.

    Attributes:
        scaled: [groups, slots, values] standardized rewards, 0 in empty slots.
        log_base: [groups, slots] log of p0's weight of each sample within its group; -inf in empty slots.
        group_weight: [groups] weight of each group's log-normaliser (1 pooled, 1/P per prompt).
        shift, scale: [values] μ and σ of the standardization.
        value_names: the pool's value names.
        normaliser: "pooled" or "per_prompt".
    """

    scaled: np.ndarray
    log_base: np.ndarray
    group_weight: np.ndarray
    shift: np.ndarray
    scale: np.ndarray
    value_names: tuple[str, ...]
    normaliser: str

    @classmethod
    def from_pool(cls, pool: RewardPool, normaliser: Normaliser = "pooled") -> "DualProblem":
        """The problem for a pool; built once per pool and normaliser (pools are immutable)."""
        if normaliser not in NORMALISERS:
            raise SolverError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
        built = _BUILT.setdefault(pool, {})
        if normaliser not in built:
            built[normaliser] = cls._build(pool, normaliser)
        return built[normaliser]

    @classmethod
    def _build(cls, pool: RewardPool, normaliser: Normaliser) -> "DualProblem":
        flat = pool.flat()
        shift = np.array(pool.means())
        spread = pool.spread()
        _check_spread(pool.value_names, spread)
        # A constant column gets scale 1: it cannot be constrained (palette.check_levels says so), and any λ on
        # it only shifts every sample's score equally.
        scale = np.where(spread > 0, spread, 1.0)
        if normaliser == "pooled":
            scaled = standardise(flat, shift, scale)[None]
            log_base = np.full((1, flat.shape[0]), -np.log(flat.shape[0]))
            group_weight = np.ones(1)
        else:
            scaled = np.where(pool.mask[:, :, None], standardise(pool.rewards, shift, scale), 0.0)
            counts = pool.mask.sum(axis=1, keepdims=True)
            log_base = np.where(pool.mask, -np.log(counts), -np.inf)
            group_weight = np.full(pool.num_prompts, 1.0 / pool.num_prompts)
        arrays = (scaled, log_base, group_weight, shift, scale)
        for array in arrays:
            array.flags.writeable = False  # shared by every solve on this pool
        return cls(*arrays, pool.value_names, normaliser)

    @property
    def num_values(self) -> int:
        return len(self.value_names)

    def to_scaled_targets(self, targets: np.ndarray) -> np.ndarray:
        return standardise(np.asarray(targets, dtype=np.float64), self.shift, self.scale)

    def to_raw_lambda(self, scaled_lambda: np.ndarray) -> np.ndarray:
        return np.asarray(scaled_lambda, dtype=np.float64) / self.scale

    def to_scaled_lambda(self, lam: np.ndarray) -> np.ndarray:
        return np.asarray(lam, dtype=np.float64) * self.scale

    def to_raw_levels(self, scaled_levels: np.ndarray) -> np.ndarray:
        return self.shift + self.scale * np.asarray(scaled_levels, dtype=np.float64)


def standardise(values: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(values − shift) / scale over the last axis, without overflow in the difference at any finite scale.

    Each column is first divided by a power of two at least its shift and scale, which is exact: on ordinary
    rewards the result is the same bits as the plain formula, and near float64's largest numbers the
    difference of two rewards cannot overflow.
    """
    exponent = np.frexp(np.maximum(np.abs(shift), scale))[1]
    return (np.ldexp(values, -exponent) - np.ldexp(shift, -exponent)) / np.ldexp(scale, -exponent)


def _check_spread(value_names: tuple[str, ...], spread: np.ndarray) -> None:
    """Refuse values whose spread puts λ = λ̃/σ out of float64's reach (a constant value, spread 0, is fine)."""
    for name, sigma in zip(value_names, spread):
        if sigma > 0 and not SMALLEST_SPREAD <= sigma <= LARGEST_SPREAD:
            raise SolverError(
                f"{name!r} has a standard deviation of {sigma:.3g} over the pool, outside the "
                f"[{SMALLEST_SPREAD:.3g}, {LARGEST_SPREAD:.3g}] where λ (in 1/units of the reward) is a float64; "
                "rescale the rewards (multiply them by a power of ten) and solve again"
            )


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[jnp.dtype]:
    """Run JAX code on a problem in ``dtype``: float64 needs JAX's x64 mode, switched on for the block only so
    that the process default is left alone. Yields the JAX dtype."""
    if dtype not in DTYPES:
        raise SolverError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    with jax.enable_x64(dtype == "float64"):
        yield jnp.dtype(dtype)


@struct.dataclass
class Tilt:
    """p_λ on every group for a batch of λ, kept as the pieces the solver reuses (leading axis: the batch).

    Weights are stored unnormalised, relative to each group's largest, so that no exp overflows.
    """

    top: jax.Array  # [batch, groups] largest logit λ̃ᵀr̃ + log p0 of each group
    unnormalised: jax.Array  # [batch, groups, slots] exp(logit − top); 0 on empty slots
    total: jax.Array  # [batch, groups] Σ over the group's slots of ``unnormalised`` (>= 1)

    @property
    def weights(self) -> jax.Array:
        """[batch, groups, slots] p_λ's weights, summing to 1 within each group."""
        return self.unnormalised / self.total[..., None]

    @property
    def log_normaliser(self) -> jax.Array:
        """[batch, groups] log Σ_k p0_k exp(λ̃ᵀr̃_k) of each group."""
        return self.top + jnp.log(self.total)


def group_tilt(scaled: jax.Array, log_base: jax.Array, lam: jax.Array) -> Tilt:
    """p_λ within each group for scaled λ̃ [batch, values]: softmax over a group's slots of λ̃ᵀr̃ + log p0.

    ``scaled`` and ``log_base`` are a :class:`DualProblem`'s arrays (on device or not); empty slots have
    log p0 = -inf and get weight 0.
    """
    logits = jnp.einsum("gkm,bm->bgk", scaled, lam) + log_base
    top = jnp.max(logits, axis=-1)
    unnormalised = jnp.exp(logits - top[..., None])
    return Tilt(top=top, unnormalised=unnormalised, total=jnp.sum(unnormalised, axis=-1))


def tilt_weights(
    data: Union[RewardPool, DualProblem], lam: np.ndarray, normaliser: Normaliser | None = None
) -> np.ndarray:
    """p_λ's weights on the samples, for raw λ over the pool's values.

    Args:
        data: a RewardPool, or a DualProblem built from one (its own normaliser is then used).
        lam: [values] raw λ in the pool's value order (any finite numbers; decoding checks its own λ).
        normaliser: for a pool, "per_prompt" (the default: softmax(λᵀr) within each prompt's samples, as
            MAP-D selects) or "pooled" (one softmax over all samples, the paper's p_λ on the pool).

    Returns:
        float64 weights: [prompts, samples] for per_prompt, 0 on empty slots, each row summing to 1; [n] in
        :meth:`RewardPool.flat` order for pooled, summing to 1.
    """
    if isinstance(data, DualProblem):
        if normaliser is not None and normaliser != data.normaliser:
            raise InputError(f"normaliser {normaliser!r} given with a {data.normaliser!r} problem")
        problem = data
    elif isinstance(data, RewardPool):
        problem = DualProblem.from_pool(data, "per_prompt" if normaliser is None else normaliser)
    else:
        raise InputError(f"tilt_weights takes a RewardPool or a DualProblem, got {type(data).__name__}")
    vector = real_array(lam, "λ", InputError)
    if vector.shape != (problem.num_values,):
        raise InputError(
            f"λ has shape {vector.shape}; expected one entry per value {list(problem.value_names)}"
        )
    if not np.all(np.isfinite(vector)):
        raise InputError(f"λ must be finite, got {vector.tolist()}")
    with precision("float64") as dtype:
        tilt = group_tilt(
            jnp.asarray(problem.scaled, dtype),
            jnp.asarray(problem.log_base, dtype),
            jnp.asarray(problem.to_scaled_lambda(vector)[None], dtype),
        )
        weights = np.asarray(tilt.weights[0], dtype=np.float64)
    return weights[0] if problem.normaliser == "pooled" else weights
