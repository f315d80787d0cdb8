"""Mistral (``MistralForCausalLM``) in Flax NNX: Llama whose layers may attend through a sliding window.

This module is also the base of the other Llama-shaped ports (Qwen2, Phi-3, Gemma 2/3) and of the decoder
sequence classifiers. It extends ``llama.py`` rather than copying it:

- :class:`MistralConfig` is a ``LlamaConfig`` with ``sliding_window`` and per-layer ``layer_types``;
- :class:`MistralDecoderLayer` is Llama's layer split into overridable steps (``project_qkv``,
  ``self_attention``, ``feed_forward``) that passes its window (and, for Gemma 2, a logit soft-cap) to
  ``layers.attend_with_cache``, so the window is honoured in the full forward and in cached decoding alike;
- :class:`MistralForCausalLM` splits the forward into ``hidden_states`` (the sequence classifiers reuse it)
  and ``logits_from_hidden``, and gives each layer the rotary table of its own ``RopeSpec`` (Gemma 3's local
  layers use another base than its global ones).

With a plain ``LlamaConfig`` (no window) every piece here computes exactly Llama.

The window counts cache slots as transformers counts cache positions: a query at slot ``i`` sees slots
``i - sliding_window + 1 ... i``. The sampler fills a row's real tokens into consecutive slots, so this is
also the last ``sliding_window`` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import CausalLMOutput, register_model
from mapjax.models.layers import KVCache
from mapjax.models.llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM

__all__ = ["LAYER_TYPES", "MistralConfig", "MistralDecoderLayer", "MistralForCausalLM", "layer_sliding_window"]

# transformers' names for a layer's attention span.
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """A ``LlamaConfig`` plus the attention span of each layer.

    Attributes:
        sliding_window: keys a query sees in a sliding layer (itself included); ``None``: no layer slides.
        layer_types: ``"full_attention"`` / ``"sliding_attention"`` per layer; empty means every layer slides
            (Mistral) when ``sliding_window`` is set.
    """

    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    model_type: ClassVar[str] = "mistral"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_attention_spans()

    def _check_attention_spans(self) -> None:
        # transformers configs hold a list; the config must stay hashable (it is static under jit).
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ModelError(f"sliding_window must be a positive number of tokens or None, got "
                             f"{self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} "
                                 "layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ModelError(f"unsupported layer types {unknown} in layer_types; supported: {list(LAYER_TYPES)}")

    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's attention span as transformers names it (what ``layer_types`` means in effect)."""
        return tuple(FULL_ATTENTION if layer_sliding_window(self, index) is None else SLIDING_ATTENTION
                     for index in range(self.num_hidden_layers))

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        values["model_type"] = self.model_type
        values["layer_types"] = list(self.layer_types)
        if not self.layer_types:
            values.pop("layer_types")   # Mistral's config has no per-layer types (it warns about them)
        return values


def layer_sliding_window(config: Any, index: int) -> int | None:
    """The window of layer ``index`` under ``config`` (any ``LlamaConfig``; a plain one has none)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", ())
    if window is None or (layer_types and layer_types[index] != SLIDING_ATTENTION):
        return None
    return int(window)


class MistralDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer in overridable steps, attending through ``sliding_window`` when it has one.

    ``attention_scale`` (``head_dim ** -0.5``) and ``logit_softcap`` (None) are attributes so that Gemma's
    layer can change them; ``rope`` is the ``RopeSpec`` whose rotary table the model hands this layer.
    """

    def __init__(self, config: LlamaConfig, layer_index: int, *, dtype: Any, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.sliding_window = layer_sliding_window(config, layer_index)
        self.attention_scale = config.head_dim ** -0.5
        self.logit_softcap: float | None = None

    def project_qkv(self, normed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries ``[b, s, heads, d]`` and keys, values ``[b, s, kv_heads, d]`` before rotation."""
        batch, seq, _ = normed.shape
        query = self.q_proj(normed).reshape(batch, seq, self.num_heads, self.head_dim)
        key = self.k_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        value = self.v_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        return query, key, value

    def self_attention(self, normed: jax.Array, context: layers.AttentionContext,
                       cos_sin: tuple[jax.Array, jax.Array], layer_cache: tuple[jax.Array, jax.Array] | None
                       ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """The attention block's output (after ``o_proj``) and the updated layer cache."""
        batch, seq, _ = normed.shape
        query, key, value = self.project_qkv(normed)
        cos, sin = cos_sin
        query, key = layers.apply_rotary(query, cos, sin), layers.apply_rotary(key, cos, sin)
        attended, layer_cache = layers.attend_with_cache(query, key, value, context, layer_cache,
                                                         self.attention_scale, sliding_window=self.sliding_window,
                                                         logit_softcap=self.logit_softcap)
        return self.o_proj(attended.reshape(batch, seq, -1)), layer_cache

    def feed_forward(self, normed: jax.Array) -> jax.Array:
        """The gated MLP: ``down(act(gate(x)) * up(x))``."""
        return self.down_proj(layers.activation(self.activation_name)(self.gate_proj(normed)) * self.up_proj(normed))

    def __call__(self, x: jax.Array, context: layers.AttentionContext, cos_sin: tuple[jax.Array, jax.Array],
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        attended, layer_cache = self.self_attention(self.input_layernorm(x), context, cos_sin, layer_cache)
        x = x + attended
        return x + self.feed_forward(self.post_attention_layernorm(x)), layer_cache


@register_model
class MistralForCausalLM(LlamaForCausalLM):
    """Mistral language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits [b, s, vocab], cache)``.

    Subclasses choose their layer (``layer_class``) and may override ``embed``, ``logits_from_hidden`` and the
    norm (``make_norm``); the forward, the name map and the cache come from here and from Llama.
    """

    architecture = "MistralForCausalLM"
    layer_class: ClassVar[type[MistralDecoderLayer]] = MistralDecoderLayer

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([self.layer_class(config, index, dtype=dtype, rngs=rngs)
                                for index in range(config.num_hidden_layers)])
        self.norm = self.make_norm(config, dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      rngs=rngs, axes=(layers.EMBED, layers.VOCAB)))

    @staticmethod
    def make_norm(config: LlamaConfig, dtype: Any) -> nnx.Module:
        """The final norm."""
        return layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings ``[b, s, hidden]``."""
        return self.embed_tokens(input_ids)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      cache: KVCache | None = None, positions: jax.Array | None = None
                      ) -> tuple[jax.Array, KVCache | None]:
        """The final norm's output ``[b, s, hidden]`` and the advanced cache (arguments as ``__call__``)."""
        context, mask = layers.attention_context(input_ids, attention_mask, cache, positions)
        x = self.embed(input_ids)
        # One rotary table per distinct RopeSpec (Gemma 3: one for the local layers, one for the global ones).
        tables: dict[layers.RopeSpec, tuple[jax.Array, jax.Array]] = {}
        for layer in self.layers:
            if layer.rope not in tables:
                tables[layer.rope] = layers.rotary_cos_sin(layer.rope, context.positions, x.dtype)
        x, new_cache = layers.run_layers(self.layers, x, cache, mask,
                                         lambda layer, h, c: layer(h, context, tables[layer.rope], c))
        return self.norm(x), new_cache

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """float32 vocabulary logits from the final hidden states (the tied embedding or ``lm_head``, accumulated
        in float32 whatever the parameter dtype, as every mapjax output head)."""
        return self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden,
                                                                                          float32_output=True)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]``, and the advanced cache when ``cache`` is given.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: 1 for real tokens, 0 for padding (left or right); ``None`` = all real.
          cache: a ``KVCache`` from ``init_cache``; this call's tokens are written at
            ``cache.write_index`` and attend to everything cached before them (within each layer's window).
          positions: explicit position ids ``[batch, seq]``; by default they count real
            tokens (``cumsum(mask) - 1``, continuing from ``cache.token_count``).
        """
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, cache=cache, positions=positions)
        return CausalLMOutput(self.logits_from_hidden(hidden), new_cache)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> MistralConfig:
        return MistralConfig.from_hf(hf_config)
