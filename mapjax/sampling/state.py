"""The sampling loop's state: one typed pytree carried through ``lax.while_loop`` and between the engine's chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from mapjax.models.layers import KVCache
from mapjax.sampling.prefill import constrain_cache
from mapjax.sharding import constrain_rows


@struct.dataclass
class LoopState:
    """Where every row of a batch (a slot, in the continuous engine) stands.

    Each row's ``t``-th new token is drawn with ``fold_in(keys[row], t)`` where ``t = lengths[row]``, its own
    token count, so a row samples the same tokens whichever batch, slot or chunk it runs in.
    """

    # int32 scalar: steps taken by the current call of the loop (the static loop runs once per batch, the
    # engine once per chunk), so the loop can stop after ``max_new_tokens`` or ``chunk_steps`` steps.
    step: jax.Array
    # Keys and values of each row's prompt and new tokens; every row writes the shared ``write_index`` slot.
    cache: KVCache
    # int32 [rows]: each row's last token, the next step's input (the prompt's last token at first).
    current: jax.Array
    # uint32 [rows, 2]: each row's raw PRNG key (``row_keys``: seed, prompt index, sample index).
    keys: jax.Array
    # bool [rows]: the row emitted an EOS id or its ``limits`` tokens, or holds no work (a filler row of a
    # static batch, an idle slot of the engine); a done row's step writes nothing to tokens or logprobs.
    done: jax.Array
    # int32 [rows, max_new_tokens]: the new tokens, ``pad_token_id`` after the row ends.
    tokens: jax.Array
    # float32 [rows, max_new_tokens]: log-probability of each new token at temperature 1, unfiltered; 0 after
    # the row ends.
    logprobs: jax.Array
    # int32 [rows]: new tokens so far: the column the row's next token goes to, and its key's step index.
    lengths: jax.Array
    # int32 [rows]: the new tokens a row may make at most (``max_new_tokens``, or the row's ``stop_lengths``).
    limits: jax.Array
    # int32 [rows, cache slots] or None: the token id written at each cache slot, kept only for a model whose
    # cached decode must sometimes rebuild its cache from the tokens (``decode_recomputes_cache``: Phi-3's
    # longrope, once a row crosses ``original_max_position_embeddings``); None for every other model.
    slot_tokens: jax.Array | None = None


def initial_state(cache: KVCache, current: np.ndarray | jax.Array, keys: np.ndarray | jax.Array,
                  done: np.ndarray | jax.Array, max_new_tokens: int, pad_token_id: int,
                  slot_tokens: np.ndarray | jax.Array | None = None,
                  limits: np.ndarray | jax.Array | None = None) -> LoopState:
    """A loop state with no token sampled yet (inside or outside jit); ``slot_tokens`` and ``limits`` (default:
    ``max_new_tokens`` for every row) as ``LoopState`` says."""
    rows = cache.token_count.shape[0]
    limits = jnp.full((rows,), max_new_tokens, jnp.int32) if limits is None else jnp.asarray(limits, jnp.int32)
    return LoopState(step=jnp.zeros((), jnp.int32), cache=cache, current=jnp.asarray(current, jnp.int32),
                     keys=jnp.asarray(keys), done=jnp.asarray(done, bool),
                     tokens=jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32),
                     logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
                     lengths=jnp.zeros((rows,), jnp.int32), limits=limits,
                     slot_tokens=None if slot_tokens is None else jnp.asarray(slot_tokens, jnp.int32))


def tracks_slot_tokens(model: object) -> bool:
    """Whether sampling ``model`` keeps ``LoopState.slot_tokens`` (see there)."""
    return bool(getattr(model, "decode_recomputes_cache", False))


def constrain_state(loop: LoopState, mesh: Mesh | None) -> LoopState:
    """Inside jit: keep the cache and every per-row field split by rows on ``mesh``; untouched without one."""
    if mesh is None:
        return loop
    current, keys, done, tokens, logprobs, lengths, limits, slot_tokens = constrain_rows(
        (loop.current, loop.keys, loop.done, loop.tokens, loop.logprobs, loop.lengths, loop.limits,
         loop.slot_tokens), mesh)
    return loop.replace(cache=constrain_cache(loop.cache, mesh), current=current, keys=keys, done=done,
                        tokens=tokens, logprobs=logprobs, lengths=lengths, limits=limits, slot_tokens=slot_tokens)
