"""Jitted sampling with a KV cache, and per-token log-probabilities of given continuations.

``generate`` follows the shape of tunix's sampler: prompts are tokenized, sorted by length and left-padded
into power-of-two length buckets so that compiled programs repeat; the prefill (every prompt token but the
last, which only fills the cache) and the sampling loop (a ``lax.while_loop`` that stops once every row has
emitted EOS or ``max_new_tokens`` tokens) are two jitted functions; the model's state is split from its graph
(``nnx.split``) and passed as an argument.

Randomness is per row: the key of sample ``s`` of prompt ``p`` is ``fold_in(fold_in(PRNGKey(seed), p), s)`` and
step ``t`` uses ``fold_in(row_key, t)``. A row's samples therefore do not depend on the batch size, on which
other prompts share its batch, or on how a long prompt list is cut into chunks (``mapjax.build`` relies on
this to resume an interrupted pool build exactly).

With ``mesh=`` (see :mod:`mapjax.sharding`) a batch's rows, their keys and the KV cache are split over the
mesh's ``data`` x ``fsdp`` axes and the parameters laid out by their logical axes; each compiled call then
holds a multiple of ``row_multiple(mesh)`` rows (filler rows pad it, as they pad to a power of two). Since a
row's keys depend only on the seed, its prompt and its sample index, the tokens are the ones sampled without
a mesh, and the log-probabilities agree to float rounding. ``mesh=None`` is the single-device path, unchanged.

>>> from mapjax.generate import generate
>>> result = generate(model, tokenizer, ["Hello there"], num_samples=4, seed=0)   # top-k 50, 50 new tokens
>>> result.texts          # four continuations (text of the new tokens only)
>>> generate(model, tokenizer, prompts, mesh="data=8")    # the same rows, split over 8 devices
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mapjax.errors import GenerationError
from mapjax.models.base import CausalLM
from mapjax.models.layers import KVCache
from mapjax.models.padding import length_bucket, pad_rows, pad_token_id, rows_per_batch
from mapjax.sharding import (
    MeshLike,
    as_mesh,
    constrain_rows,
    logical_spec,
    round_up_rows,
    shard_model_state,
    shard_rows,
)
from mapjax.sharding import place as place_arrays

# How often each jitted function was traced (= compiled), by name. Tests read it through
# ``trace_counts()`` to check that bucketing reuses programs.
_TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def trace_counts() -> dict[str, int]:
    """How many times ``prefill``, ``sample_loop`` and ``score`` were traced (each trace is one compilation)."""
    return dict(_TRACE_COUNTS)


@dataclasses.dataclass(frozen=True)
class Generation:
    """Samples for a list of prompts, one row per (prompt, sample), prompt-major.

    Attributes:
        tokens: int32 ``[rows, max_new_tokens]``; new tokens only, padded with ``pad_token_id`` after a row ends.
        lengths: int32 ``[rows]``; new tokens per row, counting the EOS token when one was emitted.
        texts: the decoded new tokens of each row (special tokens such as EOS skipped).
        logprobs: float32 ``[rows, max_new_tokens]``; log-probability of each sampled token under the model's
            own distribution at temperature 1 without top-k/top-p filtering (the quantity ``sequence_logprobs``
            returns), 0 after a row ends.
        prompt_index: int ``[rows]``; index into the prompt list of each row.
        sample_index: int ``[rows]``; which sample of its prompt each row is (0..num_samples-1).
        prompt_tokens: the token ids each prompt was fed as (special tokens included).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    logprobs: np.ndarray
    prompt_index: np.ndarray
    sample_index: np.ndarray
    prompt_tokens: list[list[int]]

    def row_tokens(self, row: int) -> np.ndarray:
        """The new tokens of ``row`` without the padding."""
        return self.tokens[row, : self.lengths[row]]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything the sampling loop's program is specialised on (hashable: a static jit argument)."""

    max_new_tokens: int
    top_k: int | None
    top_p: float
    temperature: float
    greedy: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


# --------------------------------------------------------------------------- #
# Validation and tokenization
# --------------------------------------------------------------------------- #
def _check_prompts(prompts: Sequence[str], field: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        raise GenerationError(f"{field} must be a list of strings, got a single string")
    prompts = list(prompts)
    if not prompts:
        raise GenerationError(f"{field} is empty: pass at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"{field}[{index}] is a {type(prompt).__name__}, expected a string")
    return prompts


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GenerationError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _eos_ids(model: CausalLM, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
        return tuple(int(i) for i in ids)
    found = []
    for candidate in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if candidate is not None and int(candidate) not in found:
            found.append(int(candidate))
    return tuple(found)


def bos_token_id(tokenizer: Any, model: CausalLM | None = None) -> int | None:
    """The id a text starts from: the tokenizer's BOS, else the model config's BOS, else the tokenizer's EOS."""
    config = getattr(model, "config", None)
    for candidate in (getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return None


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], model: CausalLM | None = None) -> list[list[int]]:
    """Token ids of each prompt as the model sees it (the tokenizer's special tokens, e.g. BOS, included).

    A prompt that tokenizes to nothing is fed as the BOS token (the model needs one token to condition on).
    """
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    result = []
    for index, ids in enumerate(encoded):
        ids = [int(i) for i in ids]
        if not ids:
            bos = bos_token_id(tokenizer, model)
            if bos is None:
                raise GenerationError(f"prompts[{index}] = {prompts[index]!r} tokenizes to no tokens and the tokenizer "
                                 "has no BOS token to start from")
            ids = [int(bos)]
        result.append(ids)
    return result


def row_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> jax.Array:
    """Raw uint32 PRNG keys ``[rows, 2]``: ``fold_in(fold_in(PRNGKey(seed), prompt), sample)`` per row."""
    base = jax.random.PRNGKey(seed)
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(prompt_index, jnp.uint32))
    return jax.vmap(jax.random.fold_in)(per_prompt, jnp.asarray(sample_index, jnp.uint32))


# --------------------------------------------------------------------------- #
# Cache layout on a mesh
# --------------------------------------------------------------------------- #
# Logical axes of a KV cache's ``[rows, kv_heads, slots, head_dim]`` arrays: rows split like every batch, and
# the kv heads over ``model`` where they divide it (as the key/value projections' outputs are).
_CACHE_AXES = ("batch", "kv_heads", "length", "kv")


def _cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """The ``NamedSharding`` of each array of ``cache`` on ``mesh``: rows split, kv heads over ``model``."""
    rows = NamedSharding(mesh, logical_spec(("batch",), cache.token_count.shape, mesh))
    kv = tuple(NamedSharding(mesh, logical_spec(_CACHE_AXES, array.shape, mesh)) for array in cache.keys)
    return KVCache(keys=kv, values=kv, slot_mask=rows, write_index=NamedSharding(mesh, PartitionSpec()),
                   token_count=rows)


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Inside jit: keep ``cache`` laid out as ``_cache_shardings`` says; untouched without a mesh (so the traced
    program is the single-device one)."""
    if mesh is None:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, _cache_shardings(cache, mesh))


# --------------------------------------------------------------------------- #
# The two compiled programs of the sampler
# --------------------------------------------------------------------------- #
def _prefill(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, cache_len: int,
             mesh: Mesh | None = None) -> Any:
    """Write every prompt token but the last into a fresh cache.

    The logits of these positions are never needed (the last prompt token is the sampling loop's first
    input), so they are not returned and XLA drops the output head from this program. With a ``mesh`` the
    cache is created and returned split by rows.
    """
    _TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = _constrain_cache(model.init_cache(ids.shape[0], cache_len), mesh)
    return _constrain_cache(model(ids, mask, cache=cache).cache, mesh)


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "cache_len", "mesh"))


def _place_rows(cache: KVCache, part: KVCache, first_row: jax.Array, first_slot: jax.Array,
                mesh: Mesh | None = None) -> KVCache:
    """``cache`` with ``part`` (a smaller cache: fewer rows, fewer slots) written at rows ``first_row...`` and slots
    ``first_slot...``; the slots left of it stay empty, i.e. left padding."""
    def place(full: jax.Array, piece: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(full, piece.astype(full.dtype), (first_row, 0, first_slot, 0))

    return _constrain_cache(dataclasses.replace(
        cache,
        keys=tuple(map(place, cache.keys, part.keys)),
        values=tuple(map(place, cache.values, part.values)),
        slot_mask=jax.lax.dynamic_update_slice(cache.slot_mask, part.slot_mask, (first_row, first_slot)),
        token_count=jax.lax.dynamic_update_slice(cache.token_count, part.token_count, (first_row,)),
    ), mesh)


_place_rows_jit = jax.jit(_place_rows, donate_argnames=("cache",), static_argnames=("mesh",))

# Rows prefilled together when a batch mixes prompt lengths. A batch is padded to its longest prompt, so one
# long prompt makes every row pay for its length; prefilling length-sorted groups of this many rows, each
# padded to its own longest prompt, costs what the group's prompts cost (2.8x fewer prefill tokens on the
# pilot's first 64 prompts, whose lengths run from 4 to 85 tokens). A power of two, like every row count.
PREFILL_GROUP_ROWS = 16


def _device_rows(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host batch on the device(s): split by rows on a mesh, else as ``jnp.asarray`` always put it."""
    return jnp.asarray(array) if mesh is None else shard_rows(array, mesh)


def prefill_cache(model: CausalLM, graphdef: Any, state: Any, sequences: Sequence[Sequence[int]], pad_id: int,
                  new_tokens: int, mesh: Mesh | None = None) -> KVCache:
    """A cache holding every token but the last of each row of ``sequences`` (best sorted by length, so that
    groups are short), left-padded to the batch's length bucket, with room for ``new_tokens`` more: the cache
    one left-padded prefill of the whole batch would give, computed group by group (``PREFILL_GROUP_ROWS``)
    where the groups' lengths differ.

    With a ``mesh`` (a ``Mesh``, already coerced), ``len(sequences)`` is a multiple of ``row_multiple(mesh)``
    and the cache comes back split by rows; groups hold a multiple of it too."""
    mesh = as_mesh(mesh)
    width = length_bucket(max(len(ids) for ids in sequences))
    cache_len = width - 1 + new_tokens
    rows = len(sequences)
    group_rows = min(rows, round_up_rows(PREFILL_GROUP_ROWS, mesh))
    groups = [sequences[start:start + group_rows] for start in range(0, rows, group_rows)]
    widths = [length_bucket(max(len(ids) for ids in group)) for group in groups]
    if len(set(widths)) == 1:
        ids, mask = pad_rows(sequences, width, pad_id, side="left")
        return _prefill_jit(graphdef, state, _device_rows(ids[:, :-1], mesh), _device_rows(mask[:, :-1], mesh),
                            cache_len=cache_len, mesh=mesh)
    cache = model.init_cache(rows, cache_len)
    cache = dataclasses.replace(cache, write_index=jnp.asarray(width - 1, jnp.int32))
    if mesh is not None:
        cache = place_arrays(cache, _cache_shardings(cache, mesh))
    for index, (group, group_width) in enumerate(zip(groups, widths)):
        ids, mask = pad_rows(group, group_width, pad_id, side="left")
        part = _prefill_jit(graphdef, state, _device_rows(ids[:, :-1], mesh), _device_rows(mask[:, :-1], mesh),
                            cache_len=group_width - 1, mesh=mesh)
        cache = _place_rows_jit(cache, part, jnp.asarray(index * group_rows, jnp.int32),
                                jnp.asarray(width - group_width, jnp.int32), mesh=mesh)
    return cache


def _top_p_filter(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter on logits sorted in descending order (transformers' TopPLogitsWarper rule).

    A token is kept when the probability mass strictly above it is below ``top_p``, so the most likely
    token is always kept.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(mass_above < top_p, sorted_logits, -jnp.inf)


def choose_tokens(logits: jax.Array, keys: jax.Array, settings: SamplingSettings) -> jax.Array:
    """Next token per row from float32 ``logits [rows, vocab]`` (temperature, then top-k, then top-p)."""
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / settings.temperature
    vocab = logits.shape[-1]
    if settings.top_k is not None and settings.top_k < vocab:
        # Sampling among the k largest (sorted) logits is the top-k distribution, and it keeps the
        # optional nucleus step to a k-sized sort instead of a vocabulary-sized one.
        candidates, candidate_ids = jax.lax.top_k(scaled, settings.top_k)
    elif settings.top_p < 1.0:
        candidate_ids = jnp.argsort(-scaled, axis=-1)
        candidates = jnp.take_along_axis(scaled, candidate_ids, axis=-1)
    else:
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    if settings.top_p < 1.0:
        candidates = _top_p_filter(candidates, settings.top_p)
    picked = jax.vmap(jax.random.categorical)(keys, candidates)
    return jnp.take_along_axis(candidate_ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _sample_loop(graphdef: Any, settings: SamplingSettings, state: Any, cache: Any, first_input: jax.Array,
            keys: jax.Array, done: jax.Array, mesh: Mesh | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """Sample up to ``max_new_tokens`` tokens per row; stops early once every row is done. With a ``mesh`` the
    loop's per-row state stays split by rows."""
    _TRACE_COUNTS["sample_loop"] += 1
    rows = first_input.shape[0]
    steps = settings.max_new_tokens
    eos = jnp.asarray(settings.eos_token_ids or (-1,), jnp.int32)

    def keep_going(carry):
        step, _, _, done, *_ = carry
        return (step < steps) & ~jnp.all(done)

    def one_step(carry):
        step, cache, current, done, tokens, logprobs, lengths = carry
        model = nnx.merge(graphdef, state)
        output = model(current[:, None], jnp.ones((rows, 1), jnp.int32), cache=cache)
        logits, cache = output.logits[:, -1].astype(jnp.float32), output.cache
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token = choose_tokens(logits, step_keys, settings)
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, settings.pad_token_id, token)
        token_logprob = jnp.where(done, 0.0, token_logprob)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, token_logprob[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        cache = _constrain_cache(cache, mesh)
        token, done, tokens, logprobs, lengths = constrain_rows((token, done, tokens, logprobs, lengths), mesh)
        return step + 1, cache, token, done, tokens, logprobs, lengths

    initial = (jnp.zeros((), jnp.int32), _constrain_cache(cache, mesh), first_input, done,
               *constrain_rows((jnp.full((rows, steps), settings.pad_token_id, jnp.int32),
                                jnp.zeros((rows, steps), jnp.float32), jnp.zeros((rows,), jnp.int32)), mesh))
    _, cache, _, _, tokens, logprobs, lengths = jax.lax.while_loop(keep_going, one_step, initial)
    return tokens, logprobs, lengths, cache


# The cache is donated and returned (then dropped), so the loop updates the prefill's buffers in place instead
# of copying them into its carry first.
_sample_loop_jit = jax.jit(_sample_loop, static_argnames=("graphdef", "settings", "mesh"), donate_argnames=("cache",))


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def generate(model: CausalLM, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 50, top_k: int | None = 50,
             top_p: float = 1.0, temperature: float = 1.0, greedy: bool = False, num_samples: int = 1,
             seed: int = 0, batch_size: int = 16, eos_token_id: int | Sequence[int] | None = None,
             progress: bool = False, prompt_index_offset: int = 0, mesh: MeshLike = None) -> Generation:
    """Sample ``num_samples`` continuations of each prompt (defaults: the paper's top-k 50, temperature 1, 50 tokens).

    Args:
        model: a mapjax causal LM (``GPT2LMHeadModel``, ``OPTForCausalLM``, ``LlamaForCausalLM``).
        tokenizer: its Hugging Face tokenizer; prompts are encoded with its special tokens (e.g. BOS).
        prompts: the prompt texts, fed raw.
        max_new_tokens: tokens to generate per row at most.
        top_k: sample among the k most likely tokens; ``None`` disables the filter.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        temperature: divides the logits before sampling (> 0).
        greedy: take the most likely token at every step (ignores top_k, top_p, temperature, seed).
        num_samples: continuations per prompt.
        seed: same seed, same samples, whatever the batch size.
        batch_size: rows per compiled call (rounded up to a multiple of ``row_multiple(mesh)`` on a mesh).
        eos_token_id: id(s) that end a row; default the tokenizer's and the model config's EOS.
        progress: show a tqdm bar over batches.
        prompt_index_offset: index of ``prompts[0]`` in a longer list this call is a chunk of; the per-row keys
            use the global index, so chunk by chunk samples exactly what one call on the whole list samples.
        mesh: a device mesh (``Mesh``, ``"data=8"``, ``{"data": 2, "fsdp": 4}``; see :mod:`mapjax.sharding`):
            rows, keys and KV cache split over ``data`` x ``fsdp``, parameters by their logical axes. The same
            tokens as without one. Place the model once with ``mapjax.sharding.shard_model`` when calling
            repeatedly, or each call lays the weights out again.

    Returns:
        A ``Generation`` with ``len(prompts) * num_samples`` rows, prompt-major.
    """
    prompts = _check_prompts(prompts)
    mesh = as_mesh(mesh)
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    num_samples = _check_positive_int("num_samples", num_samples)
    batch_size = _check_positive_int("batch_size", batch_size)
    if top_k is not None:
        top_k = _check_positive_int("top_k", top_k)
    if not (0.0 < float(top_p) <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if not greedy and not float(temperature) > 0.0:
        raise GenerationError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature!r}")
    eos_ids = _eos_ids(model, tokenizer, eos_token_id)
    pad_id = pad_token_id(tokenizer, model)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, top_k=None if greedy else top_k,
                                top_p=1.0 if greedy else float(top_p),
                                temperature=1.0 if greedy else float(temperature), greedy=bool(greedy),
                                eos_token_ids=eos_ids, pad_token_id=pad_id)

    prompt_tokens = tokenize_prompts(tokenizer, prompts, model)
    limit = model.max_positions
    for index, ids in enumerate(prompt_tokens):
        if len(ids) + max_new_tokens > limit:
            raise GenerationError(f"prompts[{index}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                                  f"that exceeds the model's {limit} positions")

    prompt_index = np.repeat(np.arange(len(prompts)), num_samples)
    sample_index = np.tile(np.arange(num_samples), len(prompts))
    if isinstance(prompt_index_offset, bool) or not isinstance(prompt_index_offset, (int, np.integer)) \
            or prompt_index_offset < 0:
        raise GenerationError(f"prompt_index_offset must be an integer >= 0, got {prompt_index_offset!r}")
    keys = np.asarray(row_keys(seed, prompt_index + int(prompt_index_offset), sample_index))
    total = len(prompt_index)
    # Sorting rows by prompt length keeps each batch's padding small; per-row keys make the order irrelevant.
    order = sorted(range(total), key=lambda row: len(prompt_tokens[prompt_index[row]]))
    rows_per_call = round_up_rows(rows_per_batch(total, batch_size), mesh)
    graphdef, state = nnx.split(model)
    state = shard_model_state(state, mesh)

    tokens = np.full((total, max_new_tokens), pad_id, np.int32)
    logprobs = np.zeros((total, max_new_tokens), np.float32)
    lengths = np.zeros((total,), np.int32)
    batches = [order[start:start + rows_per_call] for start in range(0, total, rows_per_call)]
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", unit="batch")
    for batch in iterator:
        filled = batch + [batch[0]] * (rows_per_call - len(batch))   # filler rows start done
        sequences = [prompt_tokens[prompt_index[row]] for row in filled]
        cache = prefill_cache(model, graphdef, state, sequences, pad_id, max_new_tokens, mesh=mesh)
        done = np.arange(rows_per_call) >= len(batch)
        last_tokens = np.asarray([ids[-1] for ids in sequences], np.int32)
        out_tokens, out_logprobs, out_lengths, _ = _sample_loop_jit(
            graphdef, settings, state, cache, _device_rows(last_tokens, mesh), _device_rows(keys[filled], mesh),
            _device_rows(done, mesh), mesh=mesh)
        out_tokens, out_logprobs, out_lengths = jax.device_get((out_tokens, out_logprobs, out_lengths))
        real = len(batch)
        tokens[batch] = out_tokens[:real]
        logprobs[batch] = out_logprobs[:real]
        lengths[batch] = out_lengths[:real]

    texts = [continuation_text(tokenizer, prompt_tokens[prompt_index[row]], tokens[row, :lengths[row]])
             for row in range(total)]
    return Generation(tokens=tokens, lengths=lengths, texts=texts, logprobs=logprobs, prompt_index=prompt_index,
                      sample_index=sample_index, prompt_tokens=prompt_tokens)


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """Text of ``new_ids`` as it reads after the prompt.

    Decoding prompt and continuation together and cutting the prompt's text off keeps the leading space that
    SentencePiece tokenizers drop when a continuation is decoded on its own.
    """
    new_ids = [int(i) for i in new_ids]
    prefix = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + new_ids, skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- #
# Log-probabilities of given text
# --------------------------------------------------------------------------- #
def _score(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``log p(ids[:, t+1] | ids[:, :t+1])`` for every t: float32 ``[rows, seq - 1]``."""
    _TRACE_COUNTS["score"] += 1
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
    batch_size = _check_positive_int("batch_size", batch_size)
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
        values = np.asarray(jax.device_get(_score_jit(graphdef, state, _device_rows(ids, mesh),
                                                      _device_rows(mask, mesh))))
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
    prompts = _check_prompts(prompts)
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


# --------------------------------------------------------------------------- #
# Loading a policy
# --------------------------------------------------------------------------- #
def load_policy(path_or_id: str | os.PathLike, dtype: Any = "float32", *, mesh: Any = None
                ) -> tuple[CausalLM, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file, an HF folder, or a hub id in the local HF cache.

    ``dtype`` (``"float32"`` or ``"bfloat16"``, or the JAX dtype) is the parameter dtype, and so the KV cache's
    when the model samples (see :mod:`mapjax.dtypes`). ``mesh`` (a mesh or its spec): each weight is loaded
    straight onto the mesh, laid out by its logical axes (``mapjax.sharding``), so a model larger than one device
    loads; None: one device.
    """
    from mapjax.dtypes import resolve_dtype
    from mapjax.sharding import as_mesh

    dtype = resolve_dtype(dtype, error=GenerationError)   # before the folder is even looked up
    mesh = as_mesh(mesh)
    path = Path(path_or_id).expanduser()
    if path.suffix.lower() == ".gguf":
        from mapjax.models import from_gguf

        return from_gguf(path, dtype, mesh=mesh)
    from transformers import AutoTokenizer

    from mapjax.models import from_pretrained
    from mapjax.models.loading import resolve_model_directory

    directory = resolve_model_directory(path_or_id)
    model = from_pretrained(directory, dtype, mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer
