"""The jitted token loops: one sampling step, the static loop (a batch until every row ends) and the engine's
chunk (at most ``chunk_steps`` steps, then back to the host to refill finished slots).

Both loops run the same step, so a row's tokens and log-probabilities do not depend on which of them ran it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mapjax.sampling.filters import SamplingSettings, choose_tokens
from mapjax.sampling.state import LoopState, constrain_state
from mapjax.sampling.tracing import count_trace


def sample_step(graphdef: Any, params: Any, settings: SamplingSettings, loop: LoopState,
                mesh: Mesh | None) -> LoopState:
    """Feed every row's current token, draw its next one, and record it in the row's own next column."""
    rows, steps = loop.tokens.shape
    model = nnx.merge(graphdef, params)
    output = _decode_call(model, loop)
    logits = output.logits[:, -1].astype(jnp.float32)
    step_keys = jax.vmap(jax.random.fold_in)(loop.keys, loop.lengths.astype(jnp.uint32))
    token = choose_tokens(logits, step_keys, settings)
    token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    token = jnp.where(loop.done, settings.pad_token_id, token)
    # A done row writes nowhere: its column points past the end. An elementwise select rather than a scatter
    # keeps the update split by rows on a mesh.
    column = jnp.where(loop.done, steps, loop.lengths)
    here = jnp.arange(steps)[None, :] == column[:, None]
    tokens = jnp.where(here, token[:, None], loop.tokens)
    logprobs = jnp.where(here, token_logprob[:, None], loop.logprobs)
    lengths = loop.lengths + (~loop.done).astype(jnp.int32)
    eos = jnp.asarray(settings.eos_token_ids or (-1,), jnp.int32)
    done = loop.done | jnp.isin(token, eos) | (lengths >= loop.limits)
    slot_tokens = loop.slot_tokens
    if slot_tokens is not None:   # this step's input now sits at the slot it was written to
        slot_tokens = jax.lax.dynamic_update_slice(slot_tokens, loop.current[:, None], (0, loop.cache.write_index))
    return constrain_state(loop.replace(step=loop.step + 1, cache=output.cache, current=token, done=done,
                                        tokens=tokens, logprobs=logprobs, lengths=lengths,
                                        slot_tokens=slot_tokens), mesh)


def _decode_call(model: Any, loop: LoopState) -> Any:
    """The model's cached call on every row's current token.

    A model that keeps ``slot_tokens`` (Phi-3 longrope) makes the call that transformers' ``generate`` makes:
    where a row's call crosses ``original_max_position_embeddings`` its cache is rebuilt from the tokens
    (``call_recomputing_cache``). That costs a forward over every cache slot, so it runs only on the steps
    where some row crosses (``lax.cond``), and only the crossing rows take its result.
    """
    ids, mask = loop.current[:, None], jnp.ones((loop.current.shape[0], 1), jnp.int32)
    if loop.slot_tokens is None:
        return model(ids, mask, cache=loop.cache)
    stale = model.stale_cache_rows(loop.cache, ids, mask) & ~loop.done

    def cached() -> Any:
        return model(ids, mask, cache=loop.cache)

    def recomputed() -> Any:
        plain, rebuilt = cached(), model.call_recomputing_cache(loop.slot_tokens, ids, mask, cache=loop.cache)
        def pick(new: jax.Array, old: jax.Array) -> jax.Array:   # per row; scalars (the write slot) agree
            return new if new.ndim == 0 else jnp.where(stale.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return jax.tree.map(pick, rebuilt, plain)

    return jax.lax.cond(jnp.any(stale), recomputed, cached)


def _run_steps(graphdef: Any, params: Any, settings: SamplingSettings, loop: LoopState, limit: int,
               mesh: Mesh | None, stop_when_done: jax.Array | int | None = None) -> LoopState:
    """Steps until ``limit`` steps ran in this call or ``stop_when_done`` rows are done (default: every row)."""
    rows = loop.done.shape[0]
    stop_when_done = rows if stop_when_done is None else stop_when_done

    def keep_going(loop: LoopState) -> jax.Array:
        return (loop.step < limit) & (jnp.sum(loop.done, dtype=jnp.int32) < stop_when_done)

    def one_step(loop: LoopState) -> LoopState:
        return sample_step(graphdef, params, settings, loop, mesh)

    return jax.lax.while_loop(keep_going, one_step, constrain_state(loop.replace(step=jnp.zeros((), jnp.int32)),
                                                                      mesh))


def _sample_loop(graphdef: Any, settings: SamplingSettings, params: Any, loop: LoopState,
                 mesh: Mesh | None = None) -> LoopState:
    """A static batch: up to ``max_new_tokens`` steps, stopping early once every row is done."""
    count_trace("sample_loop")
    return _run_steps(graphdef, params, settings, loop, settings.max_new_tokens, mesh)


def _sample_chunk(graphdef: Any, settings: SamplingSettings, chunk_steps: int, params: Any, loop: LoopState,
                  stop_when_done: jax.Array, mesh: Mesh | None = None) -> LoopState:
    """The engine's chunk: up to ``chunk_steps`` steps, stopping early once ``stop_when_done`` slots (an int32
    scalar, traced: it changes from chunk to chunk without recompiling) are done, so that a finished slot
    is refilled soon while work waits."""
    count_trace("sample_chunk")
    return _run_steps(graphdef, params, settings, loop, chunk_steps, mesh, stop_when_done)


# The state (and so the cache) is donated: the loop updates the prefill's buffers in place instead of copying
# them into its carry first.
sample_loop_jit = jax.jit(_sample_loop, static_argnames=("graphdef", "settings", "mesh"), donate_argnames=("loop",))
sample_chunk_jit = jax.jit(_sample_chunk, static_argnames=("graphdef", "settings", "chunk_steps", "mesh"),
                           donate_argnames=("loop",))
