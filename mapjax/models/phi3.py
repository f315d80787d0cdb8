"""Phi-3 / Phi-3.5 / Phi-4-mini (``Phi3ForCausalLM``) in Flax NNX: Llama's layer with fused projections.

Phi-3 stores the query, key and value projections as one ``qkv_proj`` (rows: queries, then keys, then
values) and the gate and up projections as one ``gate_up_proj`` (rows: gate, then up). It may rotate only
part of each head (``partial_rotary_factor``, Phi-4-mini) and its long-context checkpoints use ``longrope``
(``short_factor`` / ``long_factor``, switched at ``original_max_position_embeddings``), with an optional
sliding window on every layer.

Longrope and the KV cache: each call picks short or long factors row by row from its own positions (a full
forward, hence scoring and ``sequence_logprobs``, equals transformers at any length). Transformers' ``generate``
drops its cache at the step whose total length first passes ``original_max_position_embeddings`` and runs the
whole sequence again, so every logit it returns is the one a single forward over the sequence so far gives
(checked token by token against transformers 5.25). Re-rotating the cached keys cannot reproduce that: from the
second layer on, the cached keys and values come from hidden states that went through short-factor attention.
A cached decode follows transformers across the switch by asking ``stale_cache_rows`` before a call and, where
a row is stale, making that call with ``call_recomputing_cache`` (which needs the token id of every cache slot;
static shapes, so it fits a ``lax.cond`` inside jit). Without that, cached keys keep the short factors and a
generation follows transformers only up to the crossing (4096 tokens for the 128k Phi-3 / 3.5 checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import CausalLMOutput, HFParameter, register_model
from mapjax.models.layers import KVCache
from mapjax.models.layers.rope import longrope_cache_is_stale
from mapjax.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from mapjax.models.mistral import MistralConfig

__all__ = ["Phi3Config", "Phi3DecoderLayer", "Phi3ForCausalLM"]


@dataclasses.dataclass(frozen=True)
class Phi3Config(MistralConfig):
    """Hyperparameters of a Phi-3 model (names follow ``transformers.Phi3Config``); ``rope.rotary_dim`` may be
    smaller than ``head_dim`` (partial rotation)."""

    rms_norm_eps: float = 1e-5

    model_type: ClassVar[str] = "phi3"

    def __post_init__(self) -> None:
        # Not LlamaConfig's checks: Phi-3 may rotate part of each head.
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope.rotary_dim > self.head_dim or self.rope.rotary_dim % 2:
            raise ModelError(f"rope.rotary_dim={self.rope.rotary_dim} must be even and at most head_dim="
                             f"{self.head_dim}")
        self._check_attention_spans()

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        for name in ("attention_bias", "mlp_bias", "head_dim"):
            values.pop(name)   # fixed by the Phi-3 architecture; not fields of its config
        partial = self.rope.rotary_dim / self.head_dim
        values["partial_rotary_factor"] = partial
        for key in ("rope_parameters", "rope_scaling"):
            if values.get(key) is not None:
                values[key] = dict(values[key], partial_rotary_factor=partial)
        # Phi-3 keeps the pretraining length beside the rope parameters, and transformers reads it from there.
        values["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        return values


class Phi3DecoderLayer(LlamaDecoderLayer):
    """Llama's layer with ``qkv_proj`` and ``gate_up_proj`` fused as Phi-3 stores them."""

    def build_projections(self, config: Phi3Config, *, dtype: Any, rngs: nnx.Rngs) -> None:
        hidden, head_dim = config.hidden_size, self.head_dim
        fused = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.qkv_proj = layers.Linear(hidden, fused, use_bias=False, dtype=dtype, rngs=rngs,
                                      axes=(layers.EMBED, layers.HEADS))
        self.o_proj = layers.Linear(self.num_heads * head_dim, hidden, use_bias=False, dtype=dtype, rngs=rngs,
                                    axes=(layers.HEADS, layers.EMBED))
        self.gate_up_proj = layers.Linear(hidden, 2 * config.intermediate_size, use_bias=False, dtype=dtype,
                                          rngs=rngs, axes=(layers.EMBED, layers.MLP))
        self.down_proj = layers.Linear(config.intermediate_size, hidden, use_bias=False, dtype=dtype, rngs=rngs,
                                       axes=(layers.MLP, layers.EMBED))

    def project_qkv(self, normed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, seq, _ = normed.shape
        query_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        fused = self.qkv_proj(normed)
        query = fused[..., :query_width].reshape(batch, seq, self.num_heads, self.head_dim)
        key = fused[..., query_width:query_width + kv_width].reshape(batch, seq, self.num_kv_heads, self.head_dim)
        value = fused[..., query_width + kv_width:].reshape(batch, seq, self.num_kv_heads, self.head_dim)
        return query, key, value

    def feed_forward(self, normed: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up_proj(normed), 2, axis=-1)
        return self.down_proj(up * layers.activation(self.activation_name)(gate))

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            yield f"{prefix}{name}.weight", getattr(self, name.split(".")[1]).weight, "linear"
        yield f"{prefix}input_layernorm.weight", self.input_layernorm.weight, "linear"
        yield f"{prefix}post_attention_layernorm.weight", self.post_attention_layernorm.weight, "linear"


@register_model
class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits, cache)``."""

    architecture = "Phi3ForCausalLM"
    config_class = Phi3Config
    layer_class = Phi3DecoderLayer

    @property
    def decode_recomputes_cache(self) -> bool:
        """Whether a cached decode must track each cache slot's token id and take ``call_recomputing_cache``
        where ``stale_cache_rows`` says so (the sampler asks this): only a ``longrope`` model does."""
        return self.config.rope.rope_type == "longrope"

    def stale_cache_rows(self, cache: KVCache, input_ids: jax.Array, attention_mask: jax.Array | None = None
                         ) -> jax.Array:
        """bool ``[batch]``: rows whose ``cache`` a call on ``input_ids`` (``attention_mask``) would read with
        the wrong longrope factors, i.e. rows to run through ``call_recomputing_cache`` to match transformers'
        ``generate`` (see the module docstring). All False unless the rope is ``longrope``."""
        call_tokens = (jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32) if attention_mask is None
                       else attention_mask.astype(jnp.int32).sum(axis=1))
        return longrope_cache_is_stale(self.config.rope, cache.token_count, call_tokens)

    def call_recomputing_cache(self, slot_ids: jax.Array, input_ids: jax.Array,
                               attention_mask: jax.Array | None = None, *, cache: KVCache) -> CausalLMOutput:
        """What ``self(input_ids, attention_mask, cache=cache)`` returns, computed as transformers' ``generate``
        does once a longrope row passes ``original_max_position_embeddings``: one forward over every token the
        cache holds and this call's tokens, into a fresh cache of the same layout.

        ``slot_ids`` (int ``[batch, cache.max_len]``) is the token id written at each cache slot; only the slots
        ``cache.slot_mask`` marks are read. The result has the call's logits ``[batch, seq, vocab]`` and a cache
        with the same ``max_len``, ``write_index`` advanced by ``seq`` and every cached entry recomputed. Shapes
        are static (the forward spans all ``max_len`` slots), so the call fits a ``lax.cond`` inside jit.
        Positions are the default ones (real tokens counted), as the sampler uses.
        """
        batch, seq = input_ids.shape
        call_mask = (jnp.ones((batch, seq), jnp.int32) if attention_mask is None
                     else attention_mask.astype(jnp.int32))
        write_index = cache.write_index
        if slot_ids.shape != cache.slot_mask.shape:
            raise ModelError(f"slot_ids shape {tuple(slot_ids.shape)} must equal the cache's [batch, max_len] "
                             f"{tuple(cache.slot_mask.shape)}")
        ids = jax.lax.dynamic_update_slice(slot_ids.astype(jnp.int32), input_ids.astype(jnp.int32),
                                           (0, write_index))
        # Slots at or right of the call's last one hold no token yet: masked out, so they neither count as
        # positions nor get attended to (later calls overwrite what this forward leaves there).
        real = jax.lax.dynamic_update_slice(cache.slot_mask.astype(jnp.int32), call_mask, (0, write_index))
        fresh = self.init_cache(batch, cache.max_len, dtype=cache.keys[0].dtype)
        hidden, rebuilt = self.hidden_states(ids, real, cache=fresh)
        hidden = jax.lax.dynamic_slice_in_dim(hidden, write_index, seq, axis=1)
        rebuilt = dataclasses.replace(rebuilt, write_index=write_index + seq)
        return CausalLMOutput(self.logits_from_hidden(hidden), rebuilt)
