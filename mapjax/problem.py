"""The sample version of MAP's dual, laid out for solvers: standardized rewards in groups.

Pooled normaliser: all n samples form one group, g(λ) = λᵀc − log (1/n) Σ_j exp(λᵀ r_j).
Per-prompt normaliser: each prompt's samples form a group, weighted 1/P,
g(λ) = λᵀc − (1/P) Σ_x log (1/k_x) Σ_{y in x} exp(λᵀ r(x, y)).

Solvers work in a shifted, scaled frame r̃ = (r − μ)/σ (μ, σ the pooled mean and spread of each value) for
conditioning; λ = λ̃/σ maps back exactly, and the dual changes only by a constant.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mapjax.pool import RewardPool

Normaliser = Literal["pooled", "per_prompt"]
# Problems already built, per pool (weakly held: they go with their pool).
_BUILT: "weakref.WeakKeyDictionary[RewardPool, dict[str, DualProblem]]" = weakref.WeakKeyDictionary()
NORMALISERS: tuple[str, ...] = ("pooled", "per_prompt")


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
            raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
        built = _BUILT.setdefault(pool, {})
        if normaliser not in built:
            built[normaliser] = cls._build(pool, normaliser)
        return built[normaliser]

    @classmethod
    def _build(cls, pool: RewardPool, normaliser: Normaliser) -> "DualProblem":
        flat = pool.flat()
        shift = pool.means()
        spread = pool.spread()
        # A constant column gets scale 1: it cannot be constrained (palette.check_levels says so), and any λ on
        # it only shifts every sample's score equally.
        scale = np.where(spread > 0, spread, 1.0)
        if normaliser == "pooled":
            scaled = ((flat - shift) / scale)[None]
            log_base = np.full((1, flat.shape[0]), -np.log(flat.shape[0]))
            group_weight = np.ones(1)
        else:
            scaled = np.where(pool.mask[:, :, None], (pool.rewards - shift) / scale, 0.0)
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
        return (np.asarray(targets, dtype=np.float64) - self.shift) / self.scale

    def to_raw_lambda(self, scaled_lambda: np.ndarray) -> np.ndarray:
        return np.asarray(scaled_lambda, dtype=np.float64) / self.scale

    def to_scaled_lambda(self, lam: np.ndarray) -> np.ndarray:
        return np.asarray(lam, dtype=np.float64) * self.scale

    def to_raw_levels(self, scaled_levels: np.ndarray) -> np.ndarray:
        return self.shift + self.scale * np.asarray(scaled_levels, dtype=np.float64)
