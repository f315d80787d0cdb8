"""MAP-D: realise p_λ by decoding. For each prompt draw k candidates from the base model, score them, and keep
one with probability softmax(λᵀr) over the k (or the best, for best-of-k).

Within a prompt's k samples from p0 the weights softmax(λᵀr) are exactly p_λ's importance weights, so the kept
sample is a draw from the self-normalised approximation of p_λ(·|x); the expected levels it realises are the
per-prompt reweighted means, which :func:`expected_levels` computes without sampling (the paper's numeric
estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, Union

import numpy as np

from mapjax.dual import Solution, evaluate_lambdas
from mapjax.pool import RewardPool

Rule = Literal["softmax", "argmax"]
LambdaLike = Union[Solution, Mapping[str, float], np.ndarray, Sequence[float]]


def lambda_for(pool: RewardPool, lam: LambdaLike) -> np.ndarray:
    """λ over the pool's values, from a Solution (matched by value name: it may come from another pool),
    a {value: λ} mapping (missing values get 0), or a vector in the pool's value order."""
    if isinstance(lam, Solution):
        lam = dict(zip(lam.value_names, lam.lam))
    if isinstance(lam, Mapping):
        vector = np.zeros(pool.num_values)
        for name, value in lam.items():
            if name in pool.value_names:
                vector[pool.index_of(name)] = value
            elif value != 0:
                raise ValueError(f"λ for {name!r} is {value} but the candidates were not scored for it; "
                                 f"they have {list(pool.value_names)}")
        lam = vector
    vector = np.asarray(lam, dtype=np.float64).reshape(-1)
    if vector.shape[0] != pool.num_values:
        raise ValueError(f"λ has {vector.shape[0]} entries for the pool's {pool.num_values} values "
                         f"{list(pool.value_names)}")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"λ must be finite, got {vector.tolist()} (an infeasible palette has no λ to decode with)")
    if np.any(vector < 0):
        raise ValueError(f"λ must be non-negative, got {vector.tolist()}")
    return vector


def selection_scores(pool: RewardPool, lam: LambdaLike) -> np.ndarray:
    """λᵀr of every candidate, [prompts, samples]; -inf on empty slots."""
    scores = pool.rewards @ lambda_for(pool, lam)
    return np.where(pool.mask, scores, -np.inf)


def selection_probabilities(pool: RewardPool, lam: LambdaLike) -> np.ndarray:
    """softmax(λᵀr) over each prompt's candidates, [prompts, samples] (0 on empty slots)."""
    scores = selection_scores(pool, lam)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def select(pool: RewardPool, lam: LambdaLike, *, rule: Rule = "softmax", seed: int = 0) -> np.ndarray:
    """The kept candidate of each prompt: a draw from softmax(λᵀr) (Gumbel-max, seeded) or the argmax."""
    scores = selection_scores(pool, lam)
    if rule == "argmax":
        return np.argmax(scores, axis=1)
    if rule != "softmax":
        raise ValueError(f"rule must be 'softmax' or 'argmax', got {rule!r}")
    gumbel = np.random.default_rng(seed).gumbel(size=scores.shape)
    return np.argmax(scores + gumbel, axis=1)


def selected(pool: RewardPool, choice: np.ndarray) -> RewardPool:
    """The pool of kept candidates: one sample per prompt."""
    choice = np.asarray(choice)
    if choice.shape != (pool.num_prompts,):
        raise ValueError(f"need one choice per prompt ({pool.num_prompts}), got shape {choice.shape}")
    rows = np.arange(pool.num_prompts)
    if not pool.mask[rows, choice].all():
        bad = int(np.flatnonzero(~pool.mask[rows, choice])[0])
        raise ValueError(f"choice {int(choice[bad])} of prompt row {bad} is an empty slot")
    generations = None
    if pool.generations is not None:
        # generations hold the valid samples in slot order; map the slot to its position among them.
        position = np.cumsum(pool.mask, axis=1)[rows, choice] - 1
        generations = tuple((pool.generations[i][position[i]],) for i in rows)
    return RewardPool(pool.rewards[rows, choice][:, None, :], np.ones((pool.num_prompts, 1), bool),
                      pool.value_names, pool.prompts, generations)


def expected_levels(pool: RewardPool, lam: LambdaLike) -> np.ndarray:
    """The levels MAP-D realises on these candidates in expectation (no sampling): the average over prompts of
    each prompt's softmax(λᵀr)-weighted mean reward."""
    vector = lambda_for(pool, lam)
    return evaluate_lambdas(pool, vector[None], normaliser="per_prompt").realised[0]


@dataclass(frozen=True)
class DecodeResult:
    """Candidates, the choice per prompt, and the kept samples as a pool."""

    candidates: RewardPool
    choice: np.ndarray
    result: RewardPool
    lam: np.ndarray
    rule: str

    @property
    def expected(self) -> np.ndarray:
        return expected_levels(self.candidates, self.lam)


def decode_pool(candidates: RewardPool, lam: LambdaLike, *, rule: Rule = "softmax", seed: int = 0) -> DecodeResult:
    """MAP-D on candidates already drawn and scored (a pool with k samples per prompt)."""
    vector = lambda_for(candidates, lam)
    choice = select(candidates, vector, rule=rule, seed=seed)
    return DecodeResult(candidates, choice, selected(candidates, choice), vector, rule)
