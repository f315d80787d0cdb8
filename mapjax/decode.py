"""MAP-D: realise p_λ by decoding. For each prompt draw k candidates from the base model, score them, and keep
one with probability softmax(λᵀr) over the k (or the best, for best-of-k).

Within a prompt's k samples from p0 the weights softmax(λᵀr) are exactly p_λ's importance weights, so the kept
sample is a draw from the self-normalised approximation of p_λ(·|x); the expected levels it realises are the
per-prompt reweighted means, which :func:`expected_levels` computes without sampling (the paper's numeric
estimate).

Every function but :func:`decode` takes the candidates as a RewardPool or a plain reward array ([prompts, k,
values], or [n, values] for one candidate each; ``values`` names its columns), see :func:`mapjax.pool.as_pool`.
:func:`decode` draws and scores the candidates itself (with :func:`mapjax.build.build_pool`, so a ``mesh``
shards the sampling and the reward models, and several ``jax.distributed`` processes share the prompts), then
chooses among them; the choice is per-prompt numpy, the same on every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from mapjax.errors import DecodeError
from mapjax.pool import PoolLike, RewardPool, as_pool
from mapjax.problem import tilt_weights
from mapjax.solver import Solution, evaluate_lambdas
from mapjax.solver.lambdas import LambdaLike, lambda_for, solution_lambda

Rule = Literal["softmax", "argmax"]
RULES: tuple[str, ...] = ("softmax", "argmax")


def selection_scores(pool: PoolLike, lam: LambdaLike, *, values: Sequence[str] | None = None) -> np.ndarray:
    """λᵀr of every candidate, [prompts, samples]; -inf on empty slots."""
    pool = as_pool(pool, values)
    scores = pool.rewards @ lambda_for(pool, lam)
    return np.where(pool.mask, scores, -np.inf)


def selection_probabilities(pool: PoolLike, lam: LambdaLike, *, values: Sequence[str] | None = None) -> np.ndarray:
    """softmax(λᵀr) over each prompt's candidates, [prompts, samples] (0 on empty slots)."""
    pool = as_pool(pool, values)
    return tilt_weights(pool, lambda_for(pool, lam), "per_prompt")  # p_λ's weights, computed as the solver does


def select(
    pool: PoolLike, lam: LambdaLike, *, rule: Rule = "softmax", seed: int = 0, values: Sequence[str] | None = None
) -> np.ndarray:
    """The kept candidate of each prompt: a draw from softmax(λᵀr) (Gumbel-max, seeded) or the argmax."""
    if rule not in RULES:
        raise DecodeError(f"rule must be 'softmax' or 'argmax', got {rule!r}")
    scores = selection_scores(pool, lam, values=values)
    if rule == "argmax":
        return np.argmax(scores, axis=1)
    gumbel = np.random.default_rng(seed).gumbel(size=scores.shape)
    return np.argmax(scores + gumbel, axis=1)


def selected(pool: PoolLike, choice: np.ndarray, *, values: Sequence[str] | None = None) -> RewardPool:
    """The pool of kept candidates: one sample per prompt."""
    pool = as_pool(pool, values)
    choice = np.asarray(choice)
    if choice.shape != (pool.num_prompts,) or not np.issubdtype(choice.dtype, np.integer):
        raise DecodeError(f"need one whole-number choice per prompt ({pool.num_prompts}), got "
                          f"shape {choice.shape} of {choice.dtype}")
    if np.any((choice < 0) | (choice >= pool.mask.shape[1])):
        bad = int(np.flatnonzero((choice < 0) | (choice >= pool.mask.shape[1]))[0])
        raise DecodeError(f"choice {int(choice[bad])} of prompt row {bad} is not a slot (0..{pool.mask.shape[1] - 1})")
    rows = np.arange(pool.num_prompts)
    if not pool.mask[rows, choice].all():
        bad = int(np.flatnonzero(~pool.mask[rows, choice])[0])
        raise DecodeError(f"choice {int(choice[bad])} of prompt row {bad} is an empty slot")
    generations = None
    if pool.generations is not None:
        # generations hold the valid samples in slot order; map the slot to its position among them.
        position = np.cumsum(pool.mask, axis=1)[rows, choice] - 1
        generations = tuple((pool.generations[i][position[i]],) for i in rows)
    return RewardPool(pool.rewards[rows, choice][:, None, :], np.ones((pool.num_prompts, 1), bool),
                      pool.value_names, pool.prompts, generations)


def expected_levels(pool: PoolLike, lam: LambdaLike, *, values: Sequence[str] | None = None) -> np.ndarray:
    """The levels MAP-D realises on these candidates in expectation (no sampling): the average over prompts of
    each prompt's softmax(λᵀr)-weighted mean reward."""
    pool = as_pool(pool, values)
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


def decode_pool(
    candidates: PoolLike,
    lam: LambdaLike,
    *,
    rule: Rule = "softmax",
    seed: int = 0,
    values: Sequence[str] | None = None,
) -> DecodeResult:
    """MAP-D on candidates already drawn and scored (a pool with k samples per prompt)."""
    candidates = as_pool(candidates, values)
    vector = lambda_for(candidates, lam)
    choice = select(candidates, vector, rule=rule, seed=seed)
    return DecodeResult(candidates, choice, selected(candidates, choice), vector, rule)


def first_samples(candidates: PoolLike, *, values: Sequence[str] | None = None) -> RewardPool:
    """The base model's output for each prompt: its first candidate, a plain draw from p0 (what MAP-D's result
    is compared with)."""
    pool = as_pool(candidates, values)
    return selected(pool, np.zeros(pool.num_prompts, dtype=int))


def decode(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    lam: LambdaLike,
    values: Sequence[Any] | str | None = None,
    *,
    k: int = 16,
    rule: Rule = "softmax",
    seed: int = 0,
    candidates_out: Any = None,
    max_new_tokens: int = 50,
    top_k: int | None = 50,
    top_p: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 16,
    chunk_size: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    format_prompt: Callable[[str], str] | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    mesh: Any = None,
) -> DecodeResult:
    """MAP-D from prompts: draw ``k`` candidates per prompt from ``policy``, score them, keep one per prompt.

    Args:
        policy, tokenizer, prompts: the base model, its tokenizer and the prompt texts.
        lam: λ as a Solution (its values are scored unless ``values`` is given), a ``{value: λ}`` mapping or a
            vector in ``values``' order.
        values: rewards to score the candidates with (names or Reward instances, as
            :func:`mapjax.build.build_pool` takes them); default the Solution's or the mapping's value names.
        k: candidates per prompt (the paper: 16).
        rule: ``"softmax"`` draws from softmax(λᵀr) with ``seed``; ``"argmax"`` is best-of-k.
        seed: seeds both the sampling and the choice.
        candidates_out: a pool file to keep the candidates in (a rerun resumes their build); None: in memory.
        max_new_tokens, top_k, top_p, temperature, batch_size, chunk_size, eos_token_id, reward_options,
        format_prompt, dtype, overwrite, progress: as for :func:`mapjax.build.build_pool`.
        mesh: a ``jax.sharding.Mesh`` or spec (``"data=8"``) the sampling and reward models are sharded over;
            the result does not depend on it. Several processes (``jax.distributed``) need ``candidates_out``.

    Raises:
        DecodeError: a bad rule or k, an infeasible Solution, or λ that does not fit the values.
    """
    from mapjax.build import build_pool

    if rule not in RULES:
        raise DecodeError(f"rule must be 'softmax' or 'argmax', got {rule!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DecodeError(f"k (candidates per prompt) must be an integer >= 1, got {k!r}")
    if isinstance(lam, Solution):   # refused when infeasible, before any sampling
        lam = solution_lambda(lam)
    if values is None:
        if not isinstance(lam, Mapping):
            raise DecodeError("values is needed with λ given as a vector: name the rewards its entries weight")
        values = list(lam)
    candidates = build_pool(policy, tokenizer, prompts, values, samples_per_prompt=k, out=candidates_out,
                            chunk_size=chunk_size, seed=seed, max_new_tokens=max_new_tokens, top_k=top_k,
                            top_p=top_p, temperature=temperature, batch_size=batch_size, eos_token_id=eos_token_id,
                            reward_options=reward_options, progress=progress, overwrite=overwrite,
                            format_prompt=format_prompt, dtype=dtype, mesh=mesh)
    return decode_pool(candidates, lam, rule=rule, seed=seed)
