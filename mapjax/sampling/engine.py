"""Running the rows of a ``generate`` call: static batches, or continuous batching over a fixed set of slots.

**Static** (``run_static``): rows sorted by prompt length are cut into batches; each batch is prefilled and
sampled until its last row ends, so a row that ends early idles until then.

**Continuous** (``run_continuous``): ``slots`` rows run at once. The jitted chunk takes at most ``chunk_steps``
steps and returns early once a few slots (``REFILL_SLOTS_DIVISOR``) finished while rows wait; between chunks
the host reads which slots finished, keeps their tokens, and refills them from the queue of waiting rows: each
distinct new prompt is prefilled once (grouped by length bucket, a power-of-two row count per call; a pool's
``k`` samples of a prompt share it) and copied into its rows' slots, right-aligned to the shared write slot,
with their own position ids (the cache's per-row ``token_count``). When the next chunk would run off the
cache's end, or a new prompt needs more room left of the write slot, the cache is first *rebased*: every row
is shifted along the slot axis so that the oldest live token sits at slot 0 (or far enough right for the new
prompts' bucket), which bounds the cache at ``longest bucket - 1 + max_new_tokens + chunk_steps`` slots
whatever the number of refills. Every shape is fixed by (slots, bucket, row count), so refills reuse compiled
programs.

Both ways prefill each distinct prompt of a batch once and copy its cache rows to its samples.

A row's tokens depend only on its key (seed, prompt index, sample index) and its own token count (see
``LoopState``), so both ways sample the same tokens for the same rows, to float rounding of the attention.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mapjax.models.base import CausalLM
from mapjax.models.layers import KVCache
from mapjax.models.layers.cache import is_linear_layer, relayout_layer
from mapjax.models.padding import length_bucket, next_power_of_two
from mapjax.sampling.filters import SamplingSettings
from mapjax.sampling.loop import sample_chunk_jit, sample_loop_jit
from mapjax.sampling.prefill import (
    PREFILL_GROUP_ROWS,
    cache_shardings,
    device_rows,
    prefill_cache,
    prefill_rows,
    prompt_slot_tokens,
    take_rows,
)
from mapjax.sampling.state import LoopState, constrain_state, initial_state, tracks_slot_tokens
from mapjax.sampling.tracing import count_trace
from mapjax.sharding import place as place_arrays
from mapjax.sharding import round_up_rows

# Steps per jitted chunk of the continuous engine: fewer means finished slots wait less for a refill, more
# means fewer host round trips and cache rebases.
DEFAULT_CHUNK_STEPS = 16
# A chunk returns to the host early, for a refill, once ``slots // REFILL_SLOTS_DIVISOR`` slots (at least one)
# finished while rows wait: a finished slot idles until then. Each return costs a host round trip and a
# prefill call, negligible next to a step on a CPU, not on a GPU; one slot in 16 keeps both small (measured
# on SmolLM2 at 32 slots on 2 cores: one slot or four per refill gave the same idle fraction within 4 points).
REFILL_SLOTS_DIVISOR = 16


@dataclasses.dataclass
class EngineStats:
    """What a run did, for measurements (not part of ``Generation``)."""

    slot_steps: int = 0       # rows (slots) x steps of every compiled loop call: the work paid for
    useful_tokens: int = 0    # new tokens of real rows, EOS included: the work that was wanted
    loop_calls: int = 0       # static batches or engine chunks
    prefill_calls: int = 0    # prefill programs run
    seconds: float = 0.0      # wall time of the run

    @property
    def idle_fraction(self) -> float:
        """Share of the slot-steps paid for that produced no wanted token."""
        return 1.0 - self.useful_tokens / self.slot_steps if self.slot_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.useful_tokens / self.seconds if self.seconds else 0.0


@dataclasses.dataclass
class RowResults:
    """Host arrays the runs fill, one row per work item."""

    tokens: np.ndarray     # int32 [rows, max_new_tokens]
    logprobs: np.ndarray   # float32 [rows, max_new_tokens]
    lengths: np.ndarray    # int32 [rows]

    @classmethod
    def empty(cls, rows: int, settings: SamplingSettings) -> "RowResults":
        return cls(tokens=np.full((rows, settings.max_new_tokens), settings.pad_token_id, np.int32),
                   logprobs=np.zeros((rows, settings.max_new_tokens), np.float32),
                   lengths=np.zeros((rows,), np.int32))


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="seq")


def _advance_bar(bar: Any, finished: int, stats: EngineStats, started: float) -> None:
    if bar is None:
        return
    bar.update(finished)
    elapsed = time.perf_counter() - started
    bar.set_postfix_str(f"{stats.useful_tokens / elapsed if elapsed else 0.0:.0f} tok/s")


# --------------------------------------------------------------------------- #
# Static batches
# --------------------------------------------------------------------------- #
def run_static(model: CausalLM, graphdef: Any, params: Any, settings: SamplingSettings,
               sequences: Sequence[Sequence[int]], keys: np.ndarray, rows_per_call: int, *,
               limits: np.ndarray, mesh: Mesh | None = None,
               progress: bool = False) -> tuple[RowResults, EngineStats]:
    """Sample every row of ``sequences`` (its prompt tokens; ``keys[row]`` its PRNG key; ``limits[row]`` its
    most new tokens) in static batches of ``rows_per_call`` rows (filler rows, starting done, complete the last
    one)."""
    started = time.perf_counter()
    total = len(sequences)
    results, stats = RowResults.empty(total, settings), EngineStats()
    # Sorting rows by prompt length keeps each batch's padding small; per-row keys make the order irrelevant.
    order = sorted(range(total), key=lambda row: len(sequences[row]))
    bar = _progress_bar(progress, total)
    for start in range(0, total, rows_per_call):
        batch = order[start:start + rows_per_call]
        filled = batch + [batch[0]] * (rows_per_call - len(batch))
        rows = [sequences[row] for row in filled]
        cache = prefill_cache(model, graphdef, params, rows, settings.pad_token_id, settings.max_new_tokens,
                              mesh=mesh)
        stats.prefill_calls += 1
        done = np.arange(rows_per_call) >= len(batch)
        last_tokens = np.asarray([ids[-1] for ids in rows], np.int32)
        slot_tokens = None
        if tracks_slot_tokens(model):
            width = cache.max_len - settings.max_new_tokens + 1
            slot_tokens = device_rows(prompt_slot_tokens(rows, width, settings.pad_token_id, cache.max_len), mesh)
        loop = initial_state(cache, device_rows(last_tokens, mesh), device_rows(keys[filled], mesh),
                             device_rows(done, mesh), settings.max_new_tokens, settings.pad_token_id, slot_tokens,
                             device_rows(limits[filled], mesh))
        loop = sample_loop_jit(graphdef, settings, params, loop, mesh=mesh)
        tokens, logprobs, lengths, steps = jax.device_get((loop.tokens, loop.logprobs, loop.lengths, loop.step))
        real = len(batch)
        results.tokens[batch] = tokens[:real]
        results.logprobs[batch] = logprobs[:real]
        results.lengths[batch] = lengths[:real]
        stats.slot_steps += int(steps) * rows_per_call
        stats.useful_tokens += int(lengths[:real].sum())
        stats.loop_calls += 1
        _advance_bar(bar, real, stats, started)
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - started
    return results, stats


# --------------------------------------------------------------------------- #
# Continuous batching: the device-side pieces
# --------------------------------------------------------------------------- #
def _rebase(loop: LoopState, shift: jax.Array, mesh: Mesh | None = None) -> LoopState:
    """Every row of the cache (and of ``slot_tokens``) shifted ``shift`` slots along the slot axis (negative:
    left), and the write slot with it.

    Slots that wrap around are masked out: the caller keeps every live token at slots ``>= -shift`` when
    shifting left, and slots at or right of the write slot are never live (nothing is written there yet).
    A sliding-window layer's ring rolls by the same shift (modulo its length), which keeps slot ``s`` at ring
    index ``s % ring_len`` for the shifted slots.
    """
    count_trace("rebase")
    cache = loop.cache
    write_index = cache.write_index + shift
    live = jnp.arange(cache.max_len) < write_index
    roll = lambda array, axis: jnp.roll(array, shift, axis=axis)   # noqa: E731  (one rule, five uses)
    cache = dataclasses.replace(
        cache,
        keys=tuple(roll(array, 2) for array in cache.keys),
        values=tuple(roll(array, 2) for array in cache.values),
        slot_mask=roll(cache.slot_mask, 1) & live[None, :],
        write_index=write_index,
    )
    slot_tokens = None if loop.slot_tokens is None else roll(loop.slot_tokens, 1)
    return constrain_state(loop.replace(cache=cache, slot_tokens=slot_tokens), mesh)


_rebase_jit = jax.jit(_rebase, donate_argnames=("loop",), static_argnames=("mesh",))


def _place_new_rows(loop: LoopState, part: KVCache, slot_ids: jax.Array, part_rows: jax.Array, current: jax.Array,
                    keys: jax.Array, limits: jax.Array, prompt_tokens: jax.Array | None, pad_token_id: int,
                    mesh: Mesh | None = None) -> LoopState:
    """``loop`` with rows ``part_rows`` of ``part`` (a prefilled cache of ``bucket - 1`` slots) in slots ``slot_ids``:
    their cache rows hold the prompt right-aligned to the write slot (nothing else), their positions continue
    from the prompt, and they start sampling from ``current`` with ``keys``, for at most ``limits`` new
    tokens. A slot id past the last slot marks a filler row, dropped. ``prompt_tokens`` (``[rows, bucket - 1]``, the ids ``part`` holds) goes into
    ``slot_tokens`` where the loop keeps them."""
    count_trace("place_new_rows")
    part = take_rows(part, part_rows)
    cache = loop.cache
    width = part.max_len
    first_slot = cache.write_index - width

    def rows_of(full: jax.Array, piece: jax.Array) -> jax.Array:
        if is_linear_layer(piece, width) and is_linear_layer(full, cache.max_len):
            blank = jnp.zeros((piece.shape[0], *full.shape[1:]), full.dtype)
            placed = jax.lax.dynamic_update_slice(blank, piece.astype(full.dtype), (0, 0, first_slot, 0))
        else:   # a sliding-window layer's ring: the prompt's slots laid into the slot ring at their new slots
            placed = relayout_layer(piece.astype(full.dtype), part.write_index, full.shape[2], first_slot)
        return full.at[slot_ids].set(placed, mode="drop")

    blank_mask = jnp.zeros((part.slot_mask.shape[0], cache.max_len), bool)
    cache = dataclasses.replace(
        cache,
        keys=tuple(map(rows_of, cache.keys, part.keys)),
        values=tuple(map(rows_of, cache.values, part.values)),
        slot_mask=cache.slot_mask.at[slot_ids].set(
            jax.lax.dynamic_update_slice(blank_mask, part.slot_mask, (0, first_slot)), mode="drop"),
        token_count=cache.token_count.at[slot_ids].set(part.token_count, mode="drop"),
    )
    slot_tokens = loop.slot_tokens
    if slot_tokens is not None:
        blank_tokens = jnp.full((slot_ids.shape[0], cache.max_len), pad_token_id, jnp.int32)
        slot_tokens = slot_tokens.at[slot_ids].set(
            jax.lax.dynamic_update_slice(blank_tokens, prompt_tokens.astype(jnp.int32), (0, first_slot)),
            mode="drop")
    steps = loop.tokens.shape[1]
    loop = loop.replace(
        slot_tokens=slot_tokens,
        cache=cache,
        current=loop.current.at[slot_ids].set(current, mode="drop"),
        keys=loop.keys.at[slot_ids].set(keys, mode="drop"),
        done=loop.done.at[slot_ids].set(False, mode="drop"),
        lengths=loop.lengths.at[slot_ids].set(0, mode="drop"),
        limits=loop.limits.at[slot_ids].set(limits, mode="drop"),
        tokens=loop.tokens.at[slot_ids].set(jnp.full((slot_ids.shape[0], steps), pad_token_id, jnp.int32),
                                            mode="drop"),
        logprobs=loop.logprobs.at[slot_ids].set(jnp.zeros((slot_ids.shape[0], steps), jnp.float32), mode="drop"),
    )
    return constrain_state(loop, mesh)


_place_new_rows_jit = jax.jit(_place_new_rows, donate_argnames=("loop",), static_argnames=("pad_token_id", "mesh"))


class _Refill:
    """Puts waiting rows into free slots: each distinct prompt is prefilled once (grouped by length bucket,
    up to ``group_rows`` prompts per call) and its cache rows copied into the slots of all its samples, which
    the queue holds next to each other; a prompt's prefill is kept until its last sample is placed."""

    def __init__(self, graphdef: Any, params: Any, settings: SamplingSettings, sequences: Sequence[Sequence[int]],
                 keys: np.ndarray, limits: np.ndarray, slots: int, group_rows: int, track_tokens: bool,
                 mesh: Mesh | None):
        self.graphdef, self.params, self.settings, self.sequences = graphdef, params, settings, sequences
        self.keys, self.limits, self.slots, self.group_rows = keys, limits, slots, group_rows
        self.track_tokens, self.mesh = track_tokens, mesh
        self.unplaced = collections.Counter(tuple(ids) for ids in sequences)   # samples not yet placed
        self.prefilled: dict[tuple[int, ...], tuple[KVCache, int]] = {}       # prompt -> (cache, its row)

    def _call_rows(self, count: int) -> int:
        return round_up_rows(next_power_of_two(count), self.mesh)

    def _prefill(self, prompts: list[tuple[int, ...]], stats: EngineStats) -> None:
        by_bucket: dict[int, list[tuple[int, ...]]] = collections.defaultdict(list)
        for prompt in prompts:
            by_bucket[length_bucket(len(prompt))].append(prompt)
        for bucket, group_prompts in by_bucket.items():
            for start in range(0, len(group_prompts), self.group_rows):
                group = group_prompts[start:start + self.group_rows]
                padded = group + [group[0]] * (self._call_rows(len(group)) - len(group))
                part = prefill_rows(self.graphdef, self.params, padded, bucket, self.settings.pad_token_id,
                                    bucket - 1, self.mesh)
                stats.prefill_calls += 1
                for index, prompt in enumerate(group):
                    self.prefilled[prompt] = (part, index)

    def place(self, loop: LoopState, assignments: list[tuple[int, int]], stats: EngineStats) -> LoopState:
        """``loop`` with row ``row`` started in slot ``slot`` for each of ``assignments``."""
        prompts = [tuple(self.sequences[row]) for _, row in assignments]
        self._prefill([prompt for prompt in dict.fromkeys(prompts) if prompt not in self.prefilled], stats)
        # Keyed by the prefilled cache's identity (its arrays are not hashable): the rows each one fills.
        by_part: dict[int, tuple[KVCache, list[tuple[int, int, int]]]] = {}
        for (slot, row), prompt in zip(assignments, prompts):
            part, index = self.prefilled[prompt]
            by_part.setdefault(id(part), (part, []))[1].append((slot, row, index))
            self.unplaced[prompt] -= 1
            if not self.unplaced[prompt]:
                del self.prefilled[prompt]
        pad_id = self.settings.pad_token_id
        for part, placed in by_part.values():
            bucket = part.max_len + 1
            for start in range(0, len(placed), self.group_rows):
                group = placed[start:start + self.group_rows]
                group = group + [(self.slots, *group[0][1:])] * (self._call_rows(len(group)) - len(group))
                slot_ids, row_ids, part_rows = (np.asarray(column, np.int32) for column in zip(*group))
                rows = [self.sequences[row] for row in row_ids]
                prompt_tokens = (jnp.asarray(prompt_slot_tokens(rows, bucket, pad_id, bucket - 1))
                                 if self.track_tokens else None)
                loop = _place_new_rows_jit(loop, part, jnp.asarray(slot_ids), jnp.asarray(part_rows),
                                           jnp.asarray([ids[-1] for ids in rows], jnp.int32),
                                           jnp.asarray(self.keys[row_ids]), jnp.asarray(self.limits[row_ids]),
                                           prompt_tokens, pad_token_id=pad_id, mesh=self.mesh)
        return loop


# --------------------------------------------------------------------------- #
# Continuous batching: the host-side scheduler
# --------------------------------------------------------------------------- #
def run_continuous(model: CausalLM, graphdef: Any, params: Any, settings: SamplingSettings,
                   sequences: Sequence[Sequence[int]], keys: np.ndarray, slots: int, *, limits: np.ndarray,
                   chunk_steps: int = DEFAULT_CHUNK_STEPS, mesh: Mesh | None = None,
                   progress: bool = False) -> tuple[RowResults, EngineStats]:
    """Sample every row of ``sequences`` (its prompt tokens; ``keys[row]`` its PRNG key; ``limits[row]`` its
    most new tokens) on ``slots`` slots (a multiple of ``row_multiple(mesh)``), refilling finished slots every
    ``chunk_steps`` steps."""
    started = time.perf_counter()
    total = len(sequences)
    results, stats = RowResults.empty(total, settings), EngineStats()
    max_new = settings.max_new_tokens
    buckets = [length_bucket(len(ids)) for ids in sequences]
    cache_len = max(buckets) - 1 + max_new + chunk_steps
    # Shortest prompts first, as the static path does: neighbours in the queue share a bucket, so a refill
    # needs few prefill calls.
    waiting = collections.deque(sorted(range(total), key=lambda row: len(sequences[row])))
    group_rows = round_up_rows(min(PREFILL_GROUP_ROWS, next_power_of_two(slots)), mesh)
    refill_rows = max(1, slots // REFILL_SLOTS_DIVISOR)

    cache = model.init_cache(slots, cache_len)
    if mesh is not None:
        cache = place_arrays(cache, cache_shardings(cache, mesh))
    track_tokens = tracks_slot_tokens(model)
    loop = initial_state(cache, device_rows(np.zeros((slots,), np.int32), mesh),
                         device_rows(np.zeros((slots, *keys.shape[1:]), keys.dtype), mesh),
                         device_rows(np.ones((slots,), bool), mesh), max_new, settings.pad_token_id,
                         device_rows(np.full((slots, cache_len), settings.pad_token_id, np.int32), mesh)
                         if track_tokens else None)
    refill = _Refill(graphdef, params, settings, sequences, keys, limits, slots, group_rows, track_tokens, mesh)
    slot_row = np.full((slots,), -1)          # the work item each slot holds, -1 when idle
    extent = np.zeros((slots,), np.int64)     # live slots of each busy row: its prompt and new tokens so far
    write_index = 0                           # the cache's write slot, tracked on the host
    bar = _progress_bar(progress, total)

    while True:
        free = np.flatnonzero(slot_row < 0)
        new_rows = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        busy = slot_row >= 0
        if not new_rows and not busy.any():
            break
        # Rebase (shift every row left so that the oldest live token sits at slot 0, or right where a new
        # prompt's bucket needs room left of the write slot) only when the next chunk would run off the cache's
        # end or a new prompt needs that room: a rebase moves the whole cache.
        room_needed = max([buckets[row] - 1 for row in new_rows], default=0)
        if write_index < room_needed or write_index + chunk_steps > cache_len:
            target = max([int(extent[busy].max()) if busy.any() else 0, room_needed])
            loop = _rebase_jit(loop, jnp.asarray(target - write_index, jnp.int32), mesh=mesh)
            write_index = target
        for slot, row in zip(free, new_rows):
            slot_row[slot] = row
            extent[slot] = len(sequences[row]) - 1
        loop = refill.place(loop, [(int(slot), row) for slot, row in zip(free, new_rows)], stats)
        # Back to the host once enough slots finished to be worth a refill (or every slot, with nothing left to
        # refill them from): a slot that ends mid-chunk would otherwise idle until the chunk's end.
        idle = int(np.sum(slot_row < 0))
        stop_when_done = idle + min(len(waiting), refill_rows) if waiting else slots
        loop = sample_chunk_jit(graphdef, settings, chunk_steps, params, loop,
                                jnp.asarray(stop_when_done, jnp.int32), mesh=mesh)
        steps, done, lengths = jax.device_get((loop.step, loop.done, loop.lengths))
        steps = int(steps)
        write_index += steps
        stats.loop_calls += 1
        stats.slot_steps += steps * slots
        busy = slot_row >= 0
        extent[busy] += steps
        finished = np.flatnonzero(busy & done)
        if len(finished):
            tokens, logprobs = jax.device_get((loop.tokens, loop.logprobs))
            rows = slot_row[finished]
            results.tokens[rows] = tokens[finished]
            results.logprobs[rows] = logprobs[finished]
            results.lengths[rows] = lengths[finished]
            stats.useful_tokens += int(lengths[finished].sum())
            slot_row[finished] = -1
            extent[finished] = 0
            _advance_bar(bar, len(finished), stats, started)
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - started
    return results, stats
