"""Log-probabilities of given token sequences and of given continuations of prompts (temperature 1, unfiltered)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import GenerationError
from mapjax.models.base import CausalLM
from mapjax.models.padding import length_bucket, pad_rows, rows_per_batch
from mapjax.sampling.inputs import check_positive_int, check_prompts, tokenize_prompts
from mapjax.sampling.prefill import device_rows
from mapjax.sampling.tracing import count_trace
from mapjax.sharding import MeshLike, as_mesh, round_up_rows, shard_model_state


def _score(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``log p(ids[:, t+1] | ids[:, :t+1])`` for every t: float32 ``[rows, seq - 1]``."""
    count_trace("score")
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask).logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


_score_jit = jax.jit(_score, static_argnames=("graphdef",))


def token_logprobs(model: CausalLM, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                   progress: bool = False, mesh: MeshLike = None) -> list[np.ndarray]:
    """For each token sequence, the log-probability of each of its tokens after the first (``len - 1`` values).

    Sequences are sorted by length and left-padded into power-of-two buckets; one forward pass per batch. With a
    ``mesh`` (see ``generate``) each batch's rows are split over ``data`` x ``fsdp`` (a multiple of
    ``row_multiple(mesh)`` rows, filler rows padding it) and the parameters laid out by their logical axes.
    """
    mesh = as_mesh(mesh)
    batch_size = check_positive_int("batch_size", batch_size)
    sequences = [[int(t) for t in ids] for ids in sequences]
    limit = model.max_positions
    for index, ids in enumerate(sequences):
        if len(ids) > limit:
            raise GenerationError(f"sequence {index} has {len(ids)} tokens, more than the model's {limit} positions")
    results: list[np.ndarray] = [np.zeros((0,), np.float32)] * len(sequences)
    scored = [index for index, ids in enumerate(sequences) if len(ids) >= 2]
    if not scored:
        return results
    order = sorted(scored, key=lambda index: len(sequences[index]))
    rows_per_call = round_up_rows(rows_per_batch(len(order), batch_size), mesh)
    graphdef, state = nnx.split(model)
    state = shard_model_state(state, mesh)
    batches = [order[start:start + rows_per_call] for start in range(0, len(order), rows_per_call)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="score", unit="batch")
    for batch in batches:
        filled = batch + [batch[0]] * (rows_per_call - len(batch))
        rows = [sequences[index] for index in filled]
        width = length_bucket(max(len(ids) for ids in rows))
        ids, mask = pad_rows(rows, width, 0, side="left")
        values = np.asarray(jax.device_get(_score_jit(graphdef, state, device_rows(ids, mesh),
                                                      device_rows(mask, mesh))))
        for slot, index in enumerate(batch):
            length = len(sequences[index])
            results[index] = values[slot, width - length:].astype(np.float32)
    return results


def sequence_logprobs(model: CausalLM, tokenizer: Any, prompts: Sequence[str],
                      continuations: Sequence[str] | Sequence[Sequence[int]], *, batch_size: int = 16,
                      mesh: MeshLike = None) -> list[np.ndarray]:
    """Per-token log-probabilities of each continuation given its prompt (temperature 1, no filtering).

    Prompts are encoded as ``generate`` encodes them (special tokens included). A continuation is either a
    string, encoded on its own without special tokens, or a sequence of token ids (e.g. ``Generation.row_tokens``),
    used as is; token ids reproduce the sampler's ``logprobs`` exactly, while re-encoding text need not give
    back the sampled tokens. Returns one float32 array per pair, as long as the continuation's tokens.
    ``mesh``: as in ``token_logprobs``.
    """
    prompts = check_prompts(prompts)
    mesh = as_mesh(mesh)
    continuations = list(continuations)
    if len(continuations) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    prompt_tokens = tokenize_prompts(tokenizer, prompts, model)
    continuation_tokens = []
    for index, continuation in enumerate(continuations):
        if isinstance(continuation, str):
            continuation_tokens.append(
                [int(t) for t in tokenizer(continuation, add_special_tokens=False)["input_ids"]])
        else:
            try:
                continuation_tokens.append([int(t) for t in continuation])
            except (TypeError, ValueError):
                raise GenerationError(f"continuations[{index}] must be a string or a sequence of token ids, got "
                                      f"{type(continuation).__name__}") from None
    sequences = [p + c for p, c in zip(prompt_tokens, continuation_tokens)]
    per_sequence = token_logprobs(model, sequences, batch_size=batch_size, mesh=mesh)
    return [values[len(values) - len(cont):] if cont else np.zeros((0,), np.float32)
            for values, cont in zip(per_sequence, continuation_tokens)]
