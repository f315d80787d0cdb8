"""Training data for MAP-F from a reward pool: weighted examples and DPO pairs, batched into length buckets.

Every sample of a pool is a (prompt, continuation) pair. Its weight is softmax(λᵀr) over its prompt's samples
(``mapjax.decode.selection_probabilities``): p_λ's self-normalised importance weights, which sum to 1 within a
prompt. A DPO pair is the highest- and the lowest-λᵀr sample of a prompt.

Prompts are tokenized as the pool's policy saw them when it sampled: ``format_prompt`` (e.g. the tokenizer's chat
template, as ``build_pool(format_prompt=...)`` applied it; ``mapjax.finetune.against_base.pool_prompt_format`` reads
it from the pool's manifest) is applied before tokenizing, so the model learns p(y | x) on the very context y was
sampled in. The pool keeps the raw prompts, which are what the rewards saw.

Batches are right-padded to a power-of-two length bucket (``mapjax.models.padding.length_bucket``) so the
jitted train step compiles once per bucket. ``loss_mask[i, t]`` is 1 where ``ids[i, t]`` is a continuation token
(a target of the loss); prompt tokens and padding are 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from mapjax.errors import FinetuneError
from mapjax.models.base import CausalLM
from mapjax.models.padding import length_bucket, pad_rows
from mapjax.pool import RewardPool

__all__ = ["Examples", "FinetuneError", "Pairs", "check_pool_texts", "collate", "dpo_batch", "dpo_pairs",
           "order", "step_indices", "weighted_batch", "weighted_examples"]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Token sequences to train on, one per kept pool sample.

    ``prompt_ids[i] + continuation_ids[i]`` is the sequence; ``weights[i]`` its weight; ``prompt_row[i]`` and
    ``sample[i]`` where it came from in the pool.
    """

    prompt_ids: list[list[int]]
    continuation_ids: list[list[int]]
    weights: np.ndarray
    prompt_row: np.ndarray
    sample: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """DPO pairs: ``chosen`` and ``rejected`` are aligned Examples (weights 1), one pair per prompt kept."""

    chosen: Examples
    rejected: Examples

    def __len__(self) -> int:
        return len(self.chosen)


def check_pool_texts(pool: RewardPool, source: str = "the pool") -> None:
    if pool.prompts is None or pool.generations is None:
        missing = " and ".join(name for name, value in (("prompts", pool.prompts), ("generations", pool.generations))
                               if value is None)
        raise FinetuneError(f"{source} has no {missing} texts: finetuning needs each sample's prompt and generated "
                            "text (a pool file with 'prompt' and 'generated' columns, e.g. from `mapjax pool`)")


def _encode(tokenizer: Any, pool: RewardPool, model: CausalLM | None, max_length: int | None,
            format_prompt: Callable[[str], str] | None = None
            ) -> tuple[list[list[int]], list[list[list[int]]], list[np.ndarray]]:
    """Prompt token ids per prompt row (of ``format_prompt(prompt)`` when given: the context the samples were
    drawn in); continuation token ids per valid sample; the valid sample indices."""
    from mapjax.generate import tokenize_prompts

    shown = list(pool.prompts) if format_prompt is None else [format_prompt(prompt) for prompt in pool.prompts]
    prompt_ids = tokenize_prompts(tokenizer, shown, model)
    limit = model.max_positions if model is not None else None
    if max_length is not None:
        limit = max_length if limit is None else min(limit, max_length)
    continuations, valid = [], []
    for row, texts in enumerate(pool.generations):
        samples = np.flatnonzero(pool.mask[row])
        if limit is not None and len(prompt_ids[row]) >= limit:
            raise FinetuneError(f"prompt row {row} has {len(prompt_ids[row])} tokens, leaving no room for a "
                                f"continuation within the {limit}-token limit (max_length / the model's positions)")
        encoded = []
        for text in texts:
            ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
            if limit is not None:
                ids = ids[: limit - len(prompt_ids[row])]
            encoded.append(ids)
        continuations.append(encoded)
        valid.append(samples)
    return prompt_ids, continuations, valid


def weighted_examples(pool: RewardPool, tokenizer: Any, lam: Any, *, model: CausalLM | None = None,
                      max_length: int | None = None, min_weight: float = 0.0,
                      format_prompt: Callable[[str], str] | None = None) -> Examples:
    """Every sample of ``pool`` with weight softmax(λᵀr) within its prompt (λ: Solution, mapping or vector).

    Samples whose continuation encodes to no tokens are dropped (they carry no loss); so are samples with
    weight ≤ ``min_weight`` when it is positive. Continuations are cut to fit ``max_length`` tokens with their
    prompt (and the model's position limit, when ``model`` is given). ``format_prompt``: how the pool's policy
    saw each prompt when it sampled (None: raw), applied before tokenizing.
    """
    from mapjax.decode import selection_probabilities

    check_pool_texts(pool)
    probabilities = selection_probabilities(pool, lam)
    prompt_ids, continuations, valid = _encode(tokenizer, pool, model, max_length, format_prompt)
    out_prompt, out_cont, weights, rows, samples = [], [], [], [], []
    for row in range(pool.num_prompts):
        for ids, sample in zip(continuations[row], valid[row]):
            weight = float(probabilities[row, sample])
            if not ids or (min_weight > 0 and weight <= min_weight):
                continue
            out_prompt.append(prompt_ids[row])
            out_cont.append(ids)
            weights.append(weight)
            rows.append(row)
            samples.append(int(sample))
    if not out_prompt:
        raise FinetuneError("no sample of the pool has a continuation with tokens to train on")
    return Examples(out_prompt, out_cont, np.asarray(weights, np.float32), np.asarray(rows), np.asarray(samples))


def dpo_pairs(pool: RewardPool, tokenizer: Any, lam: Any, *, model: CausalLM | None = None,
              max_length: int | None = None, format_prompt: Callable[[str], str] | None = None) -> Pairs:
    """Per prompt, (highest λᵀr sample, lowest λᵀr sample); prompts whose samples all score alike (or with
    fewer than two non-empty samples) give no pair. ``format_prompt`` as in :func:`weighted_examples`."""
    from mapjax.decode import selection_scores

    check_pool_texts(pool)
    scores = selection_scores(pool, lam)
    prompt_ids, continuations, valid = _encode(tokenizer, pool, model, max_length, format_prompt)
    chosen, rejected = [], []
    for row in range(pool.num_prompts):
        candidates = [(float(scores[row, s]), int(s), ids) for ids, s in zip(continuations[row], valid[row]) if ids]
        if len(candidates) < 2:
            continue
        best = max(candidates, key=lambda item: item[0])      # first of ties
        worst = min(candidates, key=lambda item: item[0])
        if best[0] <= worst[0]:
            continue
        chosen.append((row, best))
        rejected.append((row, worst))
    if not chosen:
        raise FinetuneError("no prompt of the pool has two samples with different λᵀr: DPO has no pairs "
                            "(is λ zero, or one sample per prompt?)")

    def pack(items):
        return Examples([prompt_ids[row] for row, _ in items], [item[2] for _, item in items],
                        np.ones(len(items), np.float32), np.asarray([row for row, _ in items]),
                        np.asarray([item[1] for _, item in items]))

    return Pairs(pack(chosen), pack(rejected))


def collate(prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]], width: int,
            pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ``(ids, attention_mask, loss_mask)`` int32/int32/float32 ``[rows, width]``."""
    sequences = [list(prompt) + list(cont) for prompt, cont in zip(prompt_ids, continuation_ids)]
    ids, attention = pad_rows(sequences, width, pad_id, side="right")
    loss_mask = np.zeros((len(sequences), width), np.float32)
    for index, prompt in enumerate(prompt_ids):
        loss_mask[index, len(prompt):len(sequences[index])] = 1.0
    return ids, attention, loss_mask


def order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of ``epoch`` (a pure function of seed and epoch: resumable)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def step_indices(count: int, seed: int, step: int, per_step: int) -> np.ndarray:
    """Indices of the examples step ``step`` trains on: positions ``step*per_step ..`` of the stream of epochs
    (each epoch a fresh permutation), so the data position is the step number."""
    start = step * per_step
    positions = np.arange(start, start + per_step)
    epochs = positions // count
    result = np.empty(per_step, np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        result[chosen] = order(count, seed, int(epoch))[positions[chosen] % count]
    return result


def weighted_batch(examples: Examples, indices: np.ndarray, accum: int, pad_id: int = 0,
                   width: int | None = None) -> dict[str, np.ndarray]:
    """Batch ``{ids, attention, loss_mask: [accum, micro, width], weight: [accum, micro]}``."""
    prompt = [examples.prompt_ids[i] for i in indices]
    cont = [examples.continuation_ids[i] for i in indices]
    if width is None:
        width = length_bucket(max(len(p) + len(c) for p, c in zip(prompt, cont)))
    ids, attention, loss_mask = collate(prompt, cont, width, pad_id)
    micro = len(indices) // accum
    shape = (accum, micro, width)
    return {"ids": ids.reshape(shape), "attention": attention.reshape(shape), "loss_mask": loss_mask.reshape(shape),
            "weight": examples.weights[indices].reshape(accum, micro).astype(np.float32)}


def dpo_batch(pairs: Pairs, reference_logps: np.ndarray, indices: np.ndarray, accum: int, pad_id: int = 0,
              width: int | None = None) -> dict[str, np.ndarray]:
    """Batch ``{ids, attention, loss_mask: [accum, micro, 2, width], ref_logp: [accum, micro, 2],
    weight: [accum, micro]}`` (index 0 chosen, 1 rejected)."""
    chosen, rejected = pairs.chosen, pairs.rejected
    prompts, conts = [], []
    for i in indices:
        prompts += [chosen.prompt_ids[i], rejected.prompt_ids[i]]
        conts += [chosen.continuation_ids[i], rejected.continuation_ids[i]]
    if width is None:
        width = length_bucket(max(len(p) + len(c) for p, c in zip(prompts, conts)))
    ids, attention, loss_mask = collate(prompts, conts, width, pad_id)
    micro = len(indices) // accum
    shape = (accum, micro, 2, width)
    return {"ids": ids.reshape(shape), "attention": attention.reshape(shape), "loss_mask": loss_mask.reshape(shape),
            "ref_logp": reference_logps[indices].reshape(accum, micro, 2).astype(np.float32),
            "weight": np.ones((accum, micro), np.float32)}
