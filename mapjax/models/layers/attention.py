"""Grouped-query attention with float32 logits and softmax: over a whole call (``dot_product_attention``) and over
the filled part of a KV cache, chunk by chunk (``cached_attention``), with an optional sliding window and logit
soft-cap; ``attend_with_cache`` writes a call's keys and values into the cache and attends."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.models.layers.cache import AttentionContext, ring_slots

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


def _online_softmax(grouped: Array, keys: Array, values: Array, allowed: Array, used: Array, scale: float,
                    carry: tuple[Array, Array, Array], *, first_chunk: Array | int = 0,
                    query_slots: Array | None = None, sliding_window: int | None = None,
                    logit_softcap: float | None = None) -> tuple[Array, Array, Array]:
    """``carry`` (running max, running sum, weighted values) advanced over slots ``first_chunk * chunk ... used - 1``
    of ``keys``/``values [b, kv_heads, T, d]`` for grouped queries ``[b, kv_heads, groups, s, d]``, ``chunk`` slots
    at a time; ``allowed [b, 1, s, T]``. ``sliding_window`` masks keys outside each query's window, counting
    ``query_slots`` and the key indices as slots."""
    total = keys.shape[2]
    chunk = min(ATTENTION_CHUNK, total)
    # The last chunk may overrun the cache: it is read from ``total - chunk`` instead, and the slots an earlier
    # chunk already covered are masked out again so that no slot is counted twice.
    chunk_slots = jnp.arange(chunk)

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

    return jax.lax.fori_loop(first_chunk, (used + chunk - 1) // chunk, one_chunk, carry)


def _empty_softmax(grouped: Array) -> tuple[Array, Array, Array]:
    stats_shape = grouped.shape[:-1]
    return (jnp.full(stats_shape, MASKED_LOGIT, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(grouped.shape, jnp.float32))


def _finish_softmax(carry: tuple[Array, Array, Array], dtype: DType) -> Array:
    _, running_sum, accumulated = carry
    # Every query row has at least one visited slot (masked slots keep a finite logit), so the sum is >= 1.
    return _ungroup(accumulated / running_sum[..., None], dtype)


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
    grouped = _group_queries(query, keys.shape[1])
    chunk = min(ATTENTION_CHUNK, keys.shape[2])
    query_slots = used - query.shape[1] + jnp.arange(query.shape[1])
    first_chunk = 0
    if sliding_window is not None:
        # Every slot left of the first query's window is masked for all queries: skip its chunks.
        first_chunk = jnp.maximum(used - query.shape[1] - sliding_window + 1, 0) // chunk
    carry = _online_softmax(grouped, keys, values, allowed, used, scale, _empty_softmax(grouped),
                            first_chunk=first_chunk, query_slots=query_slots, sliding_window=sliding_window,
                            logit_softcap=logit_softcap)
    return _finish_softmax(carry, query.dtype)


def _ring_attention(query: Array, key: Array, value: Array, context: AttentionContext,
                    layer_cache: tuple[Array, Array], scale: float, sliding_window: int | None,
                    logit_softcap: float | None) -> tuple[Array, tuple[Array, Array]]:
    """``attend_with_cache`` for a layer whose cache is a ring shorter than the cache (a sliding-window layer):
    the queries attend to the slots the ring holds *before* this call (their padding read from
    ``context.key_valid`` at the slots ``ring_slots`` names) and to this call's own keys, in one online softmax;
    then the call's last ``ring_len`` keys and values overwrite the ring. So a prefill longer than the window
    still sees every key in each query's window, and the ring never holds more than the window."""
    ring_keys, ring_values = layer_cache
    batch, seq = query.shape[:2]
    ring_len = ring_keys.shape[2]
    write_index = context.write_index
    query_slots = write_index + jnp.arange(seq)
    grouped = _group_queries(query, ring_keys.shape[1])
    options = dict(logit_softcap=logit_softcap)

    # The slots held before this call: all older than every query (so causal), padded per row by the slot mask.
    held = ring_slots(write_index, ring_len)
    held_valid = jnp.take_along_axis(context.key_valid, jnp.broadcast_to(jnp.maximum(held, 0), (batch, ring_len)),
                                     axis=1) & (held >= 0)[None, :]
    held_allowed = jnp.broadcast_to(held_valid[:, None, None, :], (batch, 1, seq, ring_len))
    if sliding_window is not None:
        held_allowed = held_allowed & _within_window(query_slots, held, sliding_window)[None, None]
    carry = _online_softmax(grouped, ring_keys.astype(query.dtype), ring_values.astype(query.dtype), held_allowed,
                            jnp.minimum(write_index, ring_len), scale, _empty_softmax(grouped), **options)

    # This call's own keys: the call's columns of ``allowed`` (padding and causality) within the window, slots
    # counted from the call's first.
    fresh_keys, fresh_values = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    fresh_allowed = jax.lax.dynamic_slice_in_dim(context.allowed, write_index, seq, axis=3)
    carry = _online_softmax(grouped, fresh_keys.astype(query.dtype), fresh_values.astype(query.dtype),
                            fresh_allowed, seq, scale, carry, query_slots=jnp.arange(seq),
                            sliding_window=sliding_window, **options)
    out = _finish_softmax(carry, query.dtype)

    kept = min(seq, ring_len)
    if kept == 1:
        slot = (0, 0, jnp.mod(write_index + seq - 1, ring_len), 0)
        ring_keys = jax.lax.dynamic_update_slice(ring_keys, fresh_keys[:, :, -1:].astype(ring_keys.dtype), slot)
        ring_values = jax.lax.dynamic_update_slice(ring_values, fresh_values[:, :, -1:].astype(ring_values.dtype),
                                                   slot)
    else:
        target = jnp.mod(write_index + seq - kept + jnp.arange(kept), ring_len)
        ring_keys = ring_keys.at[:, :, target].set(fresh_keys[:, :, seq - kept:].astype(ring_keys.dtype))
        ring_values = ring_values.at[:, :, target].set(fresh_values[:, :, seq - kept:].astype(ring_values.dtype))
    return out, (ring_keys, ring_values)


def attend_with_cache(query: Array, key: Array, value: Array, context: AttentionContext,
                      layer_cache: tuple[Array, Array] | None, scale: float, *,
                      sliding_window: int | None = None, logit_softcap: float | None = None
                      ) -> tuple[Array, tuple[Array, Array] | None]:
    """Write this call's keys/values ``[b, s, kv_heads, d]`` into the layer cache (if any) and attend.

    ``sliding_window`` and ``logit_softcap`` as in ``dot_product_attention``; the window counts cache slots
    (transformers counts cache positions), which equals counting tokens since a row's real tokens fill
    consecutive slots. A layer cache shorter than the cache's ``max_len`` is a ring (a sliding-window layer's,
    see ``layers.cache``): see ``_ring_attention``.
    """
    options = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    if layer_cache is None:
        return dot_product_attention(query, key, value, context.allowed, scale, **options), None
    if layer_cache[0].shape[2] < context.key_valid.shape[1]:
        return _ring_attention(query, key, value, context, layer_cache, scale, **options)
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
