"""Checking and tokenizing what the sampler is given, the end-of-sequence ids, and the per-row PRNG keys."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.errors import GenerationError
from mapjax.models.base import CausalLM


def check_prompts(prompts: Sequence[str], field: str = "prompts") -> list[str]:
    """``prompts`` as a list of strings; ``GenerationError`` naming ``field`` (and the index) otherwise."""
    if isinstance(prompts, str):
        raise GenerationError(f"{field} must be a list of strings, got a single string")
    prompts = list(prompts)
    if not prompts:
        raise GenerationError(f"{field} is empty: pass at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"{field}[{index}] is a {type(prompt).__name__}, expected a string")
    return prompts


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1; ``GenerationError`` naming ``name`` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GenerationError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def eos_ids(model: CausalLM, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """The ids that end a row: ``eos_token_id`` when given, else the tokenizer's and the model config's EOS."""
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
    """Raw uint32 PRNG keys ``[rows, 2]``: ``fold_in(fold_in(PRNGKey(seed), prompt), sample)`` per row.

    A row's ``t``-th new token is drawn with ``fold_in(row_key, t)``, so its tokens depend only on (seed, prompt
    index, sample index), never on the batch, the slot or the chunk it ran in.
    """
    base = jax.random.PRNGKey(seed)
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(prompt_index, jnp.uint32))
    return jax.vmap(jax.random.fold_in)(per_prompt, jnp.asarray(sample_index, jnp.uint32))


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
