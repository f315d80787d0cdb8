"""The static-shape KV cache and what one forward call derives from its inputs: positions and the attention mask.

Every row of the batch shares the same slot index (``write_index``); padding is tracked per slot in
``slot_mask`` and per row in ``token_count`` (the next position id), so a left-padded prefill followed by
one-token cached steps gives the same logits as one full forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mapjax.errors import ModelError

Array = jax.Array
DType = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value cache for a whole decoder.

    keys, values: one array per layer, ``[batch, kv_heads, max_len, head_dim]``. Kv-head major because the
                  attention products batch over (row, kv head) and contract over ``head_dim``: with the
                  slot axis in the middle, XLA:CPU transposes the whole cache on every call (7x slower
                  cached attention at batch 64, measured).
    slot_mask:    ``[batch, max_len]`` bool, True where a slot holds a real token.
    write_index:  int32 scalar, next slot to write (shared by all rows).
    token_count:  ``[batch]`` int32, real tokens seen per row = the next position id.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    slot_mask: Array
    write_index: Array
    token_count: Array

    @property
    def max_len(self) -> int:
        return self.slot_mask.shape[1]

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype: DType) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            slot_mask=jnp.zeros((batch, max_len), bool),
            write_index=jnp.zeros((), jnp.int32),
            token_count=jnp.zeros((batch,), jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer of one forward call shares: positions, mask, cache slot."""

    positions: Array          # [batch, seq] int32, -1 on padding
    allowed: Array            # [batch, 1, seq, keys] bool
    write_index: Array | None  # None without a cache


def _check_inputs(input_ids: Array, attention_mask: Array | None) -> Array:
    if input_ids.ndim != 2:
        raise ModelError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return jnp.ones(input_ids.shape, jnp.int32)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ModelError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.astype(jnp.int32)


def attention_context(input_ids: Array, attention_mask: Array | None, cache: KVCache | None,
                      positions: Array | None) -> tuple[AttentionContext, Array]:
    """Positions and the boolean attention mask for a call; returns ``(context, mask_int)``.

    Position ids count real tokens (``cumsum(mask) - 1``, continuing from the cache's
    ``token_count``), exactly what transformers derives from the attention mask, so
    left- and right-padded rows get the positions they would have unpadded.
    """
    mask = _check_inputs(input_ids, attention_mask)
    seq = input_ids.shape[1]
    start = jnp.zeros((input_ids.shape[0],), jnp.int32) if cache is None else cache.token_count
    if positions is None:
        positions = (start[:, None] + jnp.cumsum(mask, axis=1)) * mask - 1
    positions = positions.astype(jnp.int32)

    if cache is None:
        query_slots = jnp.arange(seq)
        key_slots = jnp.arange(seq)
        key_valid = mask.astype(bool)
        write_index = None
    else:
        if not isinstance(cache.write_index, jax.core.Tracer) and int(cache.write_index) + seq > cache.max_len:
            raise ModelError(f"KV cache overflow: writing {seq} tokens at slot {int(cache.write_index)} "
                             f"exceeds max_len={cache.max_len}; create the cache with a larger max_len")
        write_index = cache.write_index
        query_slots = write_index + jnp.arange(seq)
        key_slots = jnp.arange(cache.max_len)
        key_valid = jax.lax.dynamic_update_slice(cache.slot_mask, mask.astype(bool), (0, write_index))
    causal = key_slots[None, :] <= query_slots[:, None]
    allowed = (key_valid[:, None, :] & causal[None, :, :])[:, None, :, :]
    return AttentionContext(positions=positions, allowed=allowed, write_index=write_index), mask


def run_layers(stack: Any, x: Array, cache: KVCache | None, mask: Array,
               call: Callable[[Any, Array, tuple[Array, Array] | None], tuple[Array, tuple[Array, Array] | None]]
               ) -> tuple[Array, KVCache | None]:
    """Run a decoder's layers in order, each on its own slice of the cache.

    ``call(layer, x, layer_cache) -> (x, layer_cache)`` runs one layer. Returns the last hidden states and the
    advanced cache (None when there is no cache).
    """
    new_keys, new_values = [], []
    for index, layer in enumerate(stack):
        layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
        x, layer_cache = call(layer, x, layer_cache)
        if layer_cache is not None:
            new_keys.append(layer_cache[0])
            new_values.append(layer_cache[1])
    return x, (None if cache is None else advance_cache(cache, mask, new_keys, new_values))


def advance_cache(cache: KVCache, mask: Array, keys: list[Array], values: list[Array]) -> KVCache:
    """The cache after a call wrote ``mask.shape[1]`` slots."""
    seq = mask.shape[1]
    return KVCache(
        keys=tuple(keys),
        values=tuple(values),
        slot_mask=jax.lax.dynamic_update_slice(cache.slot_mask, mask.astype(bool), (0, cache.write_index)),
        write_index=cache.write_index + seq,
        token_count=cache.token_count + mask.sum(axis=1).astype(jnp.int32),
    )


def last_token_index(mask: Array) -> Array:
    """Index of the rightmost real token per row (works for left and right padding)."""
    seq = mask.shape[1]
    return jnp.argmax(jnp.arange(seq)[None, :] * mask, axis=1)
