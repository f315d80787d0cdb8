"""``generate``: sample continuations of prompts, and ``Generation``, what it returns.

``generate`` follows the shape of tunix's sampler: prompts are tokenized and left-padded into power-of-two
length buckets so that compiled programs repeat; the prefill (every prompt token but the last, which only
fills the cache) and the sampling loop (a ``lax.while_loop``) are separate jitted functions; the model's state
is split from its graph (``nnx.split``) and passed as an argument. ``engine=`` picks how rows are scheduled
(see :mod:`mapjax.sampling.engine`): ``"static"`` batches, or ``"continuous"`` batching over fixed slots.

Randomness is per row: the key of sample ``s`` of prompt ``p`` is ``fold_in(fold_in(PRNGKey(seed), p), s)`` and
the row's ``t``-th new token uses ``fold_in(row_key, t)``. A row's samples therefore do not depend on the batch
size, on which other prompts share its batch or slots, on the engine, or on how a long prompt list is cut into
chunks (``mapjax.build`` relies on this to resume an interrupted pool build exactly).

With ``mesh=`` (see :mod:`mapjax.sharding`) a batch's rows, their keys and the KV cache are split over the
mesh's ``data`` x ``fsdp`` axes and the parameters laid out by their logical axes; each compiled call then
holds a multiple of ``row_multiple(mesh)`` rows (filler rows pad it, as they pad to a power of two). Since a
row's keys depend only on the seed, its prompt and its sample index, the tokens are the ones sampled without
a mesh, and the log-probabilities agree to float rounding. ``mesh=None`` is the single-device path, unchanged.

>>> from mapjax.sampling import generate
>>> result = generate(model, tokenizer, ["Hello there"], num_samples=4, seed=0)   # top-k 50, 50 new tokens
>>> result.texts          # four continuations (text of the new tokens only)
>>> generate(model, tokenizer, prompts, mesh="data=8")    # the same rows, split over 8 devices
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import numpy as np
from flax import nnx

from mapjax.errors import GenerationError
from mapjax.models.base import CausalLM
from mapjax.models.padding import pad_token_id, rows_per_batch
from mapjax.sampling.engine import DEFAULT_CHUNK_STEPS, EngineStats, run_continuous, run_static
from mapjax.sampling.filters import SamplingSettings
from mapjax.sampling.inputs import (
    check_positive_int,
    check_prompts,
    continuation_text,
    eos_ids,
    row_keys,
    tokenize_prompts,
)
from mapjax.sharding import MeshLike, as_mesh, round_up_rows, shard_model_state

Engine = Literal["static", "continuous"]
ENGINES: tuple[str, ...] = ("static", "continuous")
# The engine ``generate`` (and so pools, MAP-D, rollouts and the demo) uses unless told otherwise. Static: on the
# realistic-length benchmark (SmolLM2 chat prompts, 96 rows on 32 slots, 2 CPU cores) continuous batching was
# 0.81-0.91x the static path at real EOS (most rows reach the cap, so there is little idle time to win back, and
# its chunks and cache rebases cost more per step) and 1.5x only where lengths spread widely; see
# docs/sampling.md. Both give the same tokens.
DEFAULT_ENGINE: Engine = "static"


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


# The statistics of the latest ``generate`` call in this process (idle slot-steps, useful tokens/s), for
# measurements; read it with ``last_run_stats()``.
_LAST_RUN_STATS: list[EngineStats] = [EngineStats()]


def last_run_stats() -> EngineStats:
    """What the latest ``generate`` call did: slot-steps paid for, useful tokens, loop and prefill calls, time."""
    return _LAST_RUN_STATS[0]


def generate(model: CausalLM, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 50, top_k: int | None = 50,
             top_p: float = 1.0, temperature: float = 1.0, greedy: bool = False, num_samples: int = 1,
             seed: int = 0, batch_size: int = 16, eos_token_id: int | Sequence[int] | None = None,
             progress: bool = False, prompt_index_offset: int = 0, mesh: MeshLike = None,
             engine: Engine | None = None, chunk_steps: int = DEFAULT_CHUNK_STEPS,
             stop_lengths: Sequence[int] | np.ndarray | None = None) -> Generation:
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
        seed: same seed, same samples, whatever the batch size or engine.
        batch_size: rows per compiled call (static) or slots (continuous); rounded up to a multiple of
            ``row_multiple(mesh)`` on a mesh.
        eos_token_id: id(s) that end a row; default the tokenizer's and the model config's EOS.
        progress: show a tqdm bar over finished sequences, with useful tokens/s.
        prompt_index_offset: index of ``prompts[0]`` in a longer list this call is a chunk of; the per-row keys
            use the global index, so chunk by chunk samples exactly what one call on the whole list samples.
        mesh: a device mesh (``Mesh``, ``"data=8"``, ``{"data": 2, "fsdp": 4}``; see :mod:`mapjax.sharding`):
            rows, keys and KV cache split over ``data`` x ``fsdp``, parameters by their logical axes. The same
            tokens as without one. Place the model once with ``mapjax.sharding.shard_model`` when calling
            repeatedly, or each call lays the weights out again.
        engine: ``"static"`` (batches run until their longest row ends) or ``"continuous"`` (``batch_size``
            slots, a finished row's slot refilled every ``chunk_steps`` steps); None: ``DEFAULT_ENGINE``. The
            same tokens either way (see :mod:`mapjax.sampling.engine`).
        chunk_steps: the continuous engine's steps between refills.
        stop_lengths: optional cap on each row's new tokens (one per row, prompt-major like the result, each in
            ``1 ... max_new_tokens``): a row ends at its EOS or its stop length, whichever comes first. It
            replays a length distribution where EOS cannot (random weights never emit it: the benchmarks).

    Returns:
        A ``Generation`` with ``len(prompts) * num_samples`` rows, prompt-major.
    """
    prompts = check_prompts(prompts)
    mesh = as_mesh(mesh)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    chunk_steps = check_positive_int("chunk_steps", chunk_steps)
    engine = DEFAULT_ENGINE if engine is None else engine
    if engine not in ENGINES:
        raise GenerationError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if top_k is not None:
        top_k = check_positive_int("top_k", top_k)
    if not (0.0 < float(top_p) <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if not greedy and not float(temperature) > 0.0:
        raise GenerationError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature!r}")
    if isinstance(prompt_index_offset, bool) or not isinstance(prompt_index_offset, (int, np.integer)) \
            or prompt_index_offset < 0:
        raise GenerationError(f"prompt_index_offset must be an integer >= 0, got {prompt_index_offset!r}")
    pad_id = pad_token_id(tokenizer, model)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, top_k=None if greedy else top_k,
                                top_p=1.0 if greedy else float(top_p),
                                temperature=1.0 if greedy else float(temperature), greedy=bool(greedy),
                                eos_token_ids=eos_ids(model, tokenizer, eos_token_id), pad_token_id=pad_id)

    prompt_tokens = tokenize_prompts(tokenizer, prompts, model)
    limit = model.max_positions
    for index, ids in enumerate(prompt_tokens):
        if len(ids) + max_new_tokens > limit:
            raise GenerationError(f"prompts[{index}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                                  f"that exceeds the model's {limit} positions")

    limits = _row_limits(stop_lengths, len(prompts) * num_samples, max_new_tokens)
    prompt_index = np.repeat(np.arange(len(prompts)), num_samples)
    sample_index = np.tile(np.arange(num_samples), len(prompts))
    keys = np.asarray(row_keys(seed, prompt_index + int(prompt_index_offset), sample_index))
    sequences = [prompt_tokens[prompt] for prompt in prompt_index]
    total = len(sequences)
    rows_per_call = round_up_rows(rows_per_batch(total, batch_size), mesh)
    graphdef, params = nnx.split(model)
    params = shard_model_state(params, mesh)
    if engine == "continuous":
        results, stats = run_continuous(model, graphdef, params, settings, sequences, keys, rows_per_call,
                                        limits=limits, chunk_steps=chunk_steps, mesh=mesh, progress=progress)
    else:
        results, stats = run_static(model, graphdef, params, settings, sequences, keys, rows_per_call,
                                    limits=limits, mesh=mesh, progress=progress)
    _LAST_RUN_STATS[0] = stats
    texts = [continuation_text(tokenizer, sequences[row], results.tokens[row, :results.lengths[row]])
             for row in range(total)]
    return Generation(tokens=results.tokens, lengths=results.lengths, texts=texts, logprobs=results.logprobs,
                      prompt_index=prompt_index, sample_index=sample_index, prompt_tokens=prompt_tokens)


def _row_limits(stop_lengths: Sequence[int] | np.ndarray | None, rows: int, max_new_tokens: int) -> np.ndarray:
    """int32 ``[rows]``: each row's most new tokens (``stop_lengths`` checked, else ``max_new_tokens``)."""
    if stop_lengths is None:
        return np.full((rows,), max_new_tokens, np.int32)
    limits = np.asarray(stop_lengths)
    if limits.shape != (rows,) or not np.issubdtype(limits.dtype, np.integer):
        raise GenerationError(f"stop_lengths must hold one integer per row ({rows} = prompts x num_samples), got "
                              f"{limits.dtype} of shape {limits.shape}")
    outside = np.flatnonzero((limits < 1) | (limits > max_new_tokens))
    if len(outside):
        raise GenerationError(f"stop_lengths[{outside[0]}] = {int(limits[outside[0]])} is outside 1 ... "
                              f"max_new_tokens={max_new_tokens}")
    return limits.astype(np.int32)
