"""The token filters: temperature, top-k and top-p (nucleus), and the choice of the next token per row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything the sampling programs are specialised on (hashable: a static jit argument)."""

    max_new_tokens: int
    top_k: int | None
    top_p: float
    temperature: float
    greedy: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def top_p_filter(sorted_logits: jax.Array, top_p: float) -> jax.Array:
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
        candidates = top_p_filter(candidates, settings.top_p)
    picked = jax.vmap(jax.random.categorical)(keys, candidates)
    return jnp.take_along_axis(candidate_ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)
