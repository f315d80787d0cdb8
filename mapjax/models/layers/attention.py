"""Grouped-query attention with float32 logits and softmax: over a whole call (``dot_product_attention``) and over
the filled part of a KV cache, chunk by chunk (``cached_attention``), with an optional sliding window and logit
soft-cap; ``attend_with_cache`` writes a call's keys and values into the cache and attends."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.models.layers.cache import AttentionContext

Array = jax.Array
DType = Any

# A large negative logit rather than -inf: a query row whose keys are all masked
# (a pad query under left padding) then gets a uniform softmax instead of NaN,
# and NaNs never leak into gradients of the real rows.
MASKED_LOGIT = float(np.finfo(np.float32).min)


def _masked_logits(query: Array, key: Array, allowed: Array, scale: float, logit_softcap: float | None = None
                   ) -> Array:
    """float32 logits ``[b, kv_heads, groups, s, t]`` of grouped queries ``[b, kv_heads, groups, s, d]`` against
    keys ``[b, kv_heads, t, d]``; disallowed pairs get ``MASKED_LOGIT``. With ``logit_softcap`` the scaled
    logits pass through ``cap * tanh(logits / cap)`` first (Gemma 2)."""
    logits = jnp.einsum("bkgsd,bktd->bkgst", query, key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    return jnp.where(allowed[:, :, None, :, :], logits, MASKED_LOGIT)


def _within_window(query_slots: Array, key_slots: Array, sliding_window: int) -> Array:
    """``[s, t]`` bool: key slot within the ``sliding_window`` slots ending at each query's slot (itself
    included), transformers' ``kv_idx > q_idx - sliding_window``."""
    return key_slots[None, :] > query_slots[:, None] - sliding_window


def _group_queries(query: Array, kv_heads: int) -> Array:
    """``[b, s, heads, d]`` -> ``[b, kv_heads, groups, s, d]`` (the query heads that share one key/value head)."""
    batch, seq, heads, head_dim = query.shape
    return query.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def _ungroup(out: Array, dtype: DType) -> Array:
    """``[b, kv_heads, groups, s, d]`` -> ``[b, s, heads, d]``."""
    batch, kv_heads, groups, seq, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, kv_heads * groups, head_dim).astype(dtype)


def dot_product_attention(query: Array, key: Array, value: Array, allowed: Array, scale: float, *,
                          sliding_window: int | None = None, logit_softcap: float | None = None) -> Array:
    """Grouped-query attention with float32 logits and softmax.

    query ``[b, s, heads, d]``, key/value ``[b, t, kv_heads, d]``, allowed ``[b, 1, s, t]``.
    Returns ``[b, s, heads, d]`` in the query dtype.

    ``sliding_window`` (Mistral, Gemma's local layers): each query also sees only the keys within that many
    slots of its own, counting the queries as the last ``s`` of the ``t`` key slots. ``logit_softcap``: see
    ``_masked_logits``. Both default to off, which is plain attention.
    """
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    if sliding_window is not None:
        seq, total = query.shape[1], key.shape[2]
        allowed = allowed & _within_window(total - seq + jnp.arange(seq), jnp.arange(total), sliding_window)
    logits = _masked_logits(_group_queries(query, key.shape[1]), key, allowed, scale, logit_softcap)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return _ungroup(jnp.einsum("bkgst,bktd->bkgsd", probs, value), query.dtype)


# Cache slots attended per step of ``cached_attention``'s loop. 64 was the fastest of 32/64 on the 2-core CPU
# (SmolLM2, batch 64); it is also a multiple of every GPU's tile sizes.
ATTENTION_CHUNK = 64


def cached_attention(query: Array, keys: Array, values: Array, allowed: Array, used: Array, scale: float, *,
                     sliding_window: int | None = None, logit_softcap: float | None = None) -> Array:
    """Attention of ``query [b, s, heads, d]`` over the first ``used`` slots of a cache ``[b, kv_heads, T, d]``.

    The slots are visited ``ATTENTION_CHUNK`` at a time by a loop whose trip count is ``ceil(used / chunk)``
    (traced), merging the chunks' softmaxes by their running maximum and sum (the online softmax of
    flash-decoding), so a one-token step costs what the filled part of the cache costs, not its full length.
    ``allowed [b, 1, s, T]`` masks padding and the future within the used part. Returns ``[b, s, heads, d]``
    in the query dtype; equal to ``dot_product_attention`` over the whole cache up to float rounding.

    ``sliding_window``: the queries sit at slots ``used - s ... used - 1`` and each sees only the keys within
    that many slots of its own; the loop then starts at the first chunk any query can see, so a windowed
    one-token step costs the window, not the whole filled cache. ``logit_softcap``: see ``_masked_logits``.
    """
    batch, kv_heads, total, head_dim = keys.shape
    grouped = _group_queries(query, kv_heads)
    chunk = min(ATTENTION_CHUNK, total)
    # The last chunk may overrun the cache: it is read from ``total - chunk`` instead, and the slots an earlier
    # chunk already covered are masked out again so that no slot is counted twice.
    chunk_slots = jnp.arange(chunk)
    query_slots = used - query.shape[1] + jnp.arange(query.shape[1])

    def one_chunk(index, carry):
        running_max, running_sum, accumulated = carry
        nominal = index * chunk
        start = jnp.minimum(nominal, total - chunk)
        key = jax.lax.dynamic_slice_in_dim(keys, start, chunk, axis=2)
        value = jax.lax.dynamic_slice_in_dim(values, start, chunk, axis=2)
        slots = start + chunk_slots
        fresh = (slots >= nominal) & (slots < used)
        chunk_allowed = jax.lax.dynamic_slice_in_dim(allowed, start, chunk, axis=3) & fresh
        if sliding_window is not None:
            chunk_allowed = chunk_allowed & _within_window(query_slots, slots, sliding_window)
        logits = _masked_logits(grouped, key, chunk_allowed, scale, logit_softcap)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        probs = jnp.exp(logits - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + probs.sum(axis=-1)
        update = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(value.dtype), value,
                            preferred_element_type=jnp.float32)
        return new_max, running_sum, accumulated * rescale[..., None] + update

    stats_shape = grouped.shape[:-1]
    initial = (jnp.full(stats_shape, MASKED_LOGIT, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
               jnp.zeros(grouped.shape, jnp.float32))
    chunks = (used + chunk - 1) // chunk
    first_chunk = 0
    if sliding_window is not None:
        # Every slot left of the first query's window is masked for all queries: skip its chunks.
        first_chunk = jnp.maximum(used - query.shape[1] - sliding_window + 1, 0) // chunk
    _, running_sum, accumulated = jax.lax.fori_loop(first_chunk, chunks, one_chunk, initial)
    # Every query row has at least one visited slot (masked slots keep a finite logit), so the sum is >= 1.
    return _ungroup(accumulated / running_sum[..., None], query.dtype)


def attend_with_cache(query: Array, key: Array, value: Array, context: AttentionContext,
                      layer_cache: tuple[Array, Array] | None, scale: float, *,
                      sliding_window: int | None = None, logit_softcap: float | None = None
                      ) -> tuple[Array, tuple[Array, Array] | None]:
    """Write this call's keys/values ``[b, s, kv_heads, d]`` into the layer cache (if any) and attend.

    ``sliding_window`` and ``logit_softcap`` as in ``dot_product_attention``; the window counts cache slots
    (transformers counts cache positions), which equals counting tokens since a row's real tokens fill
    consecutive slots.
    """
    options = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    if layer_cache is None:
        return dot_product_attention(query, key, value, context.allowed, scale, **options), None
    cached_keys, cached_values = layer_cache
    slot = (0, 0, context.write_index, 0)
    cached_keys = jax.lax.dynamic_update_slice(cached_keys, key.transpose(0, 2, 1, 3).astype(cached_keys.dtype),
                                               slot)
    cached_values = jax.lax.dynamic_update_slice(cached_values,
                                                 value.transpose(0, 2, 1, 3).astype(cached_values.dtype), slot)
    used = context.write_index + query.shape[1]
    out = cached_attention(query, cached_keys.astype(query.dtype), cached_values.astype(query.dtype),
                           context.allowed, used, scale, **options)
    return out, (cached_keys, cached_values)
