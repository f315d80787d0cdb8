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
    output = model(loop.current[:, None], jnp.ones((rows, 1), jnp.int32), cache=loop.cache)
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
    done = loop.done | jnp.isin(token, eos) | (lengths >= steps)
    return constrain_state(loop.replace(step=loop.step + 1, cache=output.cache, current=token, done=done,
                                        tokens=tokens, logprobs=logprobs, lengths=lengths), mesh)


def _run_steps(graphdef: Any, params: Any, settings: SamplingSettings, loop: LoopState, limit: int,
               mesh: Mesh | None) -> LoopState:
    """Steps until ``limit`` steps ran in this call or every row is done."""
    def keep_going(loop: LoopState) -> jax.Array:
        return (loop.step < limit) & ~jnp.all(loop.done)

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
                  mesh: Mesh | None = None) -> LoopState:
    """The engine's chunk: up to ``chunk_steps`` steps, stopping early once every slot is done."""
    count_trace("sample_chunk")
    return _run_steps(graphdef, params, settings, loop, chunk_steps, mesh)


# The state (and so the cache) is donated: the loop updates the prefill's buffers in place instead of copying
# them into its carry first.
sample_loop_jit = jax.jit(_sample_loop, static_argnames=("graphdef", "settings", "mesh"), donate_argnames=("loop",))
sample_chunk_jit = jax.jit(_sample_chunk, static_argnames=("graphdef", "settings", "chunk_steps", "mesh"),
                           donate_argnames=("loop",))
