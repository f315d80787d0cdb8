"""The static-shape KV cache and what one forward call derives from its inputs: positions and the attention mask.

Every row of the batch shares the same slot index (``write_index``); padding is tracked per slot in
``slot_mask`` and per row in ``token_count`` (the next position id), so a left-padded prefill followed by
one-token cached steps gives the same logits as one full forward.

A layer that attends only through a sliding window of ``w`` slots keeps a *ring* of ``min(w, max_len)`` slots
instead of ``max_len``: slot ``s`` lives at ring index ``s % ring_len``. Because every row writes the same slot,
the slot a ring index holds follows from ``write_index`` alone (``ring_slots``), and its padding from
``slot_mask``; so the masks need no stored positions, and a full layer is the ring whose length is ``max_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mapjax.errors import ModelError

Array = jax.Array
DType = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value cache for a whole decoder.

    keys, values: one array per layer, ``[batch, kv_heads, ring_len, head_dim]``: ``ring_len`` is ``max_len``
                  for a full-attention layer and ``min(window, max_len)`` for a sliding-window one (see the
                  module docstring). Kv-head major because the attention products batch over (row, kv head)
                  and contract over ``head_dim``: with the slot axis in the middle, XLA:CPU transposes the
                  whole cache on every call (7x slower cached attention at batch 64, measured).
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
               dtype: DType, windows: Sequence[int | None] | None = None) -> "KVCache":
        """An empty cache. ``windows``: each layer's sliding window (``None``: full attention); a windowed layer
        keeps ``ring_length(window, max_len)`` slots. Without ``windows`` every layer keeps ``max_len``."""
        windows = tuple(windows) if windows is not None else (None,) * num_layers
        if len(windows) != num_layers:
            raise ModelError(f"windows has {len(windows)} entries for num_layers={num_layers}; expected one per "
                             "layer (None for a full-attention layer)")
        shapes = [(batch, kv_heads, ring_length(window, max_len), head_dim) for window in windows]
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for shape in shapes),
            values=tuple(jnp.zeros(shape, dtype) for shape in shapes),
            slot_mask=jnp.zeros((batch, max_len), bool),
            write_index=jnp.zeros((), jnp.int32),
            token_count=jnp.zeros((batch,), jnp.int32),
        )


def ring_length(window: int | None, max_len: int) -> int:
    """Slots a layer keeps in a cache of ``max_len`` slots: all of them for full attention (``window`` None),
    else the last ``window`` (a query sees its own slot and the ``window - 1`` before it), at most ``max_len``."""
    return max_len if window is None else min(int(window), max_len)


def ring_slots(written: Array | int, ring_len: int) -> Array:
    """``[ring_len]`` int32: the cache slot each ring index holds once slots ``0 ... written - 1`` were written
    (index ``j`` holds the last such slot ``s`` with ``s % ring_len == j``); negative where none was written."""
    last = jnp.asarray(written, jnp.int32) - 1
    index = jnp.arange(ring_len, dtype=jnp.int32)
    return last - jnp.mod(last - index, ring_len)


def relayout_layer(piece: Array, piece_written: Array | int, ring_len: int, first_slot: Array | int) -> Array:
    """A layer's keys or values ``piece [rows, kv_heads, piece_ring, d]`` (a ring after ``piece_written`` slots
    were written) moved ``first_slot`` slots right and laid into a ring of ``ring_len`` slots (zeros where the
    piece holds nothing). Of the piece's slots, the last ``ring_len`` are kept; with equal, linear rings this is
    ``dynamic_update_slice`` at ``first_slot``."""
    piece_ring = piece.shape[2]
    held = ring_slots(piece_written, piece_ring)
    kept = (held >= 0) & (held >= jnp.asarray(piece_written, jnp.int32) - ring_len)
    target = jnp.where(kept, jnp.mod(held + first_slot, ring_len), ring_len)   # ring_len: dropped
    blank = jnp.zeros((*piece.shape[:2], ring_len, piece.shape[3]), piece.dtype)
    return blank.at[:, :, target].set(piece, mode="drop")


def fit_to_rings(cache: KVCache, ring_lengths: Sequence[int]) -> KVCache:
    """``cache`` (whose layers hold every slot) with layer ``i`` laid into a ring of ``ring_lengths[i]`` slots
    that holds the last of the ``cache.write_index`` written slots, as that layer of ``init_cache`` would."""
    def fit(layer: Array, ring_len: int) -> Array:
        return layer if ring_len == layer.shape[2] else relayout_layer(layer, cache.write_index, ring_len, 0)

    return dataclasses.replace(cache, keys=tuple(map(fit, cache.keys, ring_lengths)),
                               values=tuple(map(fit, cache.values, ring_lengths)))


def is_linear_layer(layer: Array, max_len: int) -> bool:
    """Whether a layer's keys or values ``[rows, kv_heads, slots, d]`` hold every slot of a ``max_len``-slot
    cache in order (a full-attention layer, or a ring as long as the cache), rather than a shorter ring."""
    return layer.shape[2] == max_len


def cache_bytes(model: Any, batch: int, max_len: int) -> int:
    """Bytes of the cache ``model.init_cache(batch, max_len)`` would allocate (every array: keys, values and the
    small per-slot bookkeeping), computed from shapes alone, so ``model`` may be abstract (``nnx.eval_shape``)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(shapes)))


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer of one forward call shares: positions, mask, cache slot."""

    positions: Array          # [batch, seq] int32, -1 on padding
    allowed: Array            # [batch, 1, seq, keys] bool
    write_index: Array | None  # None without a cache
    # [batch, max_len] bool with a cache: the slot mask once this call's slots are written (ring layers read
    # the padding of the slots they hold from it); None without a cache.
    key_valid: Array | None = None


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
    return AttentionContext(positions=positions, allowed=allowed, write_index=write_index,
                            key_valid=None if cache is None else key_valid), mask


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
