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


# ============================================================================ command line: mapjax decode


def add_decode_command(subparsers) -> None:
    """``mapjax decode``: solve a palette on a pool, then MAP-D on prompts with k candidates each."""
    command = subparsers.add_parser("decode", help="MAP-D: decode prompts toward a palette (k candidates each)")
    command.add_argument("--policy", required=True, help="a .gguf file, an HF model folder, or a cached hub id")
    command.add_argument("--prompts", required=True, help="hh-rlhf, imdb, or a .txt / .jsonl / .json file")
    command.add_argument("--palette", required=True, help='e.g. "humor>=q0.7, gpt2-harmless>=q0.7"')
    command.add_argument("--pool", required=True, help="the base model's reward pool the palette is solved on")
    command.add_argument("--k", type=int, default=16, help="candidates per prompt (the paper: 16)")
    command.add_argument("--out", required=True, help="result pool (.jsonl/.json/.parquet), one sample per prompt")
    command.add_argument("--values", help="rewards to score the candidates with (default: the pool's values)")
    command.add_argument("--count", type=int, help="use the first N prompts")
    command.add_argument("--rule", choices=("softmax", "argmax"), default="softmax", help="argmax = best-of-k")
    command.add_argument("--per-prompt", action="store_true", help="solve with the per-prompt normaliser")
    command.add_argument("--max-new-tokens", type=int, default=50)
    command.add_argument("--batch-size", type=int, default=16)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--overwrite", action="store_true")
    command.set_defaults(run=_decode_command)


def _decode_command(args) -> int:
    from pathlib import Path

    from mapjax.build import build_pool, read_prompts
    from mapjax.dual import solve
    from mapjax.generate import load_policy

    pool = RewardPool.load(args.pool)
    solution = solve(pool, args.palette, normaliser="per_prompt" if args.per_prompt else "pooled")
    print(solution.table())
    if not solution.feasible:
        print("\nthe palette is not reachable on this pool: try `mapjax adjust` for the nearest one that is")
        return 1
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite or choose another --out")
    values = [v.strip() for v in args.values.split(",")] if args.values else list(pool.value_names)
    prompts = read_prompts(args.prompts, args.count)
    policy, tokenizer = load_policy(args.policy)
    candidates = build_pool(policy, tokenizer, prompts, values, samples_per_prompt=args.k,
                            out=out.with_name(out.stem + ".candidates.jsonl"), max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, seed=args.seed, overwrite=args.overwrite)
    result = decode_pool(candidates, solution, rule=args.rule, seed=args.seed)
    result.result.save(out, overwrite=args.overwrite)
    print(f"\n{out}: {result.result.num_prompts} prompts; levels (realised, expected from the weights):")
    for name, realised, expected in zip(result.result.value_names, result.result.means(), result.expected):
        print(f"  {name:<16} {realised:10.4f} {expected:10.4f}")
    return 0
