"""Prompts into a KV cache: the prefill program, length-grouped prefill of a batch, and the cache's layout on a mesh.

The prefill writes every prompt token but the last (the sampling loop's first input) into a fresh cache,
left-padded to a power-of-two length bucket, so the same few programs serve every batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mapjax.models.base import CausalLM
from mapjax.models.layers import KVCache
from mapjax.models.layers.cache import is_linear_layer, relayout_layer
from mapjax.models.padding import length_bucket, next_power_of_two, pad_rows
from mapjax.sampling.tracing import count_trace
from mapjax.sharding import as_mesh, logical_spec, round_up_rows, shard_rows
from mapjax.sharding import place as place_arrays

# Logical axes of a KV cache's ``[rows, kv_heads, slots, head_dim]`` arrays: rows split like every batch, and
# the kv heads over ``model`` where they divide it (as the key/value projections' outputs are).
CACHE_AXES = ("batch", "kv_heads", "length", "kv")

# Rows prefilled together when a batch mixes prompt lengths. A batch is padded to its longest prompt, so one
# long prompt makes every row pay for its length; prefilling length-sorted groups of this many rows, each
# padded to its own longest prompt, costs what the group's prompts cost (2.8x fewer prefill tokens on the
# pilot's first 64 prompts, whose lengths run from 4 to 85 tokens). A power of two, like every row count.
PREFILL_GROUP_ROWS = 16


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """The ``NamedSharding`` of each array of ``cache`` on ``mesh``: rows split, kv heads over ``model``."""
    rows = NamedSharding(mesh, logical_spec(("batch",), cache.token_count.shape, mesh))
    kv = tuple(NamedSharding(mesh, logical_spec(CACHE_AXES, array.shape, mesh)) for array in cache.keys)
    return KVCache(keys=kv, values=kv, slot_mask=rows, write_index=NamedSharding(mesh, PartitionSpec()),
                   token_count=rows)


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Inside jit: keep ``cache`` laid out as ``cache_shardings`` says; untouched without a mesh (so the traced
    program is the single-device one)."""
    if mesh is None:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, cache_shardings(cache, mesh))


def device_rows(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host batch on the device(s): split by rows on a mesh, else as ``jnp.asarray`` always put it."""
    return jnp.asarray(array) if mesh is None else shard_rows(array, mesh)


def _prefill(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, cache_len: int,
             mesh: Mesh | None = None) -> Any:
    """Write every prompt token but the last into a fresh cache.

    The logits of these positions are never needed (the last prompt token is the sampling loop's first
    input), so they are not returned and XLA drops the output head from this program. With a ``mesh`` the
    cache is created and returned split by rows.
    """
    count_trace("prefill")
    model = nnx.merge(graphdef, state)
    cache = constrain_cache(model.init_cache(ids.shape[0], cache_len), mesh)
    return constrain_cache(model(ids, mask, cache=cache).cache, mesh)


prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "cache_len", "mesh"))


def _place_rows(cache: KVCache, part: KVCache, first_row: jax.Array, first_slot: jax.Array,
                mesh: Mesh | None = None) -> KVCache:
    """``cache`` with ``part`` (a smaller cache: fewer rows, fewer slots) written at rows ``first_row...`` and slots
    ``first_slot...``; the slots left of it stay empty, i.e. left padding. A sliding-window layer's ring is laid
    into the cache's ring of that layer (``relayout_layer``), replacing those rows whole: they are fresh."""
    def place(full: jax.Array, piece: jax.Array) -> jax.Array:
        if is_linear_layer(piece, part.max_len) and is_linear_layer(full, cache.max_len):
            return jax.lax.dynamic_update_slice(full, piece.astype(full.dtype), (first_row, 0, first_slot, 0))
        placed = relayout_layer(piece.astype(full.dtype), part.write_index, full.shape[2], first_slot)
        return jax.lax.dynamic_update_slice(full, placed, (first_row, 0, 0, 0))

    return constrain_cache(dataclasses.replace(
        cache,
        keys=tuple(map(place, cache.keys, part.keys)),
        values=tuple(map(place, cache.values, part.values)),
        slot_mask=jax.lax.dynamic_update_slice(cache.slot_mask, part.slot_mask, (first_row, first_slot)),
        token_count=jax.lax.dynamic_update_slice(cache.token_count, part.token_count, (first_row,)),
    ), mesh)


_place_rows_jit = jax.jit(_place_rows, donate_argnames=("cache",), static_argnames=("mesh",))


def prefill_rows(graphdef: Any, state: Any, sequences: Sequence[Sequence[int]], width: int, pad_id: int,
                 cache_len: int, mesh: Mesh | None) -> KVCache:
    """One prefill call: every token but the last of each of ``sequences``, left-padded to ``width`` tokens, in
    a fresh cache of ``cache_len`` slots."""
    ids, mask = pad_rows(sequences, width, pad_id, side="left")
    return prefill_jit(graphdef, state, device_rows(ids[:, :-1], mesh), device_rows(mask[:, :-1], mesh),
                       cache_len=cache_len, mesh=mesh)


def prompt_slot_tokens(sequences: Sequence[Sequence[int]], width: int, pad_id: int, cache_len: int) -> np.ndarray:
    """int32 ``[rows, cache_len]``: the token id a prefill of ``sequences`` left-padded to ``width`` writes at each
    cache slot (every prompt token but the last, in slots ``0 ... width - 2``; ``pad_id`` elsewhere), the start
    of ``LoopState.slot_tokens``."""
    ids, _ = pad_rows(sequences, width, pad_id, side="left")
    slot_tokens = np.full((len(sequences), cache_len), pad_id, np.int32)
    slot_tokens[:, :width - 1] = ids[:, :-1]
    return slot_tokens


def distinct_prompts(sequences: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], np.ndarray]:
    """``(distinct, index)``: the distinct rows of ``sequences`` in order of first appearance, and for each row
    the position of its prompt in ``distinct``. A pool samples ``k`` continuations of each prompt, so a batch
    holds each prompt ``k`` times; prefilling it once and copying its cache rows saves ``k - 1`` prefills."""
    positions: dict[tuple[int, ...], int] = {}
    distinct: list[Sequence[int]] = []
    index = np.zeros((len(sequences),), np.int32)
    for row, ids in enumerate(sequences):
        if tuple(ids) not in positions:
            positions[tuple(ids)] = len(distinct)
            distinct.append(ids)
        index[row] = positions[tuple(ids)]
    return distinct, index


def take_rows(cache: KVCache, rows: jax.Array, mesh: Mesh | None = None) -> KVCache:
    """``cache`` with row ``i`` a copy of its row ``rows[i]`` (every per-row array; the write slot is shared)."""
    take = lambda array: jnp.take(array, rows, axis=0)   # noqa: E731  (one rule, four fields)
    return constrain_cache(dataclasses.replace(
        cache, keys=tuple(map(take, cache.keys)), values=tuple(map(take, cache.values)),
        slot_mask=take(cache.slot_mask), token_count=take(cache.token_count)), mesh)


take_rows_jit = jax.jit(take_rows, static_argnames=("mesh",))


def prefill_cache(model: CausalLM, graphdef: Any, state: Any, sequences: Sequence[Sequence[int]], pad_id: int,
                  new_tokens: int, mesh: Mesh | None = None) -> KVCache:
    """A cache holding every token but the last of each row of ``sequences`` (best sorted by length, so that
    groups are short), left-padded to the batch's length bucket, with room for ``new_tokens`` more: the cache
    one left-padded prefill of the whole batch would give, computed group by group (``PREFILL_GROUP_ROWS``)
    where the groups' lengths differ, each distinct prompt once (``distinct_prompts``).

    With a ``mesh`` (a ``Mesh``, already coerced), ``len(sequences)`` is a multiple of ``row_multiple(mesh)``
    and the cache comes back split by rows; groups hold a multiple of it too."""
    mesh = as_mesh(mesh)
    distinct, index = distinct_prompts(sequences)
    if len(distinct) == len(sequences):
        return _prefill_every_row(model, graphdef, state, sequences, pad_id, new_tokens, mesh)
    # A power-of-two count of distinct rows (fillers repeat the first), so that the programs repeat.
    count = round_up_rows(next_power_of_two(len(distinct)), mesh)
    distinct = list(distinct) + [distinct[0]] * (count - len(distinct))
    cache = _prefill_every_row(model, graphdef, state, distinct, pad_id, new_tokens, mesh)
    return take_rows_jit(cache, jnp.asarray(index), mesh=mesh)


def _prefill_every_row(model: CausalLM, graphdef: Any, state: Any, sequences: Sequence[Sequence[int]],
                       pad_id: int, new_tokens: int, mesh: Mesh | None) -> KVCache:
    """``prefill_cache`` without looking for repeated prompts."""
    width = length_bucket(max(len(ids) for ids in sequences))
    cache_len = width - 1 + new_tokens
    rows = len(sequences)
    group_rows = min(rows, round_up_rows(PREFILL_GROUP_ROWS, mesh))
    groups = [sequences[start:start + group_rows] for start in range(0, rows, group_rows)]
    widths = [length_bucket(max(len(ids) for ids in group)) for group in groups]
    if len(set(widths)) == 1:
        return prefill_rows(graphdef, state, sequences, width, pad_id, cache_len, mesh)
    cache = model.init_cache(rows, cache_len)
    cache = dataclasses.replace(cache, write_index=jnp.asarray(width - 1, jnp.int32))
    if mesh is not None:
        cache = place_arrays(cache, cache_shardings(cache, mesh))
    for index, (group, group_width) in enumerate(zip(groups, widths)):
        part = prefill_rows(graphdef, state, group, group_width, pad_id, group_width - 1, mesh)
        cache = _place_rows_jit(cache, part, jnp.asarray(index * group_rows, jnp.int32),
                                jnp.asarray(width - group_width, jnp.int32), mesh=mesh)
    return cache
