"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3 text (``Gemma3ForCausalLM``) in Flax NNX.

What sets Gemma apart from Llama, each in one place below:

- its RMSNorm scales by ``1 + weight`` and casts after scaling (:class:`GemmaRMSNorm`);
- every layer norms the attention and MLP outputs too (``post_attention_layernorm``,
  ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``);
- embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the parameter dtype, as transformers does);
- attention logits are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
- local (sliding-window) and global layers alternate (``layer_types``);
- Gemma 2 soft-caps attention logits (``attn_logit_softcapping``) and final logits
  (``final_logit_softcapping``): ``cap * tanh(x / cap)``;
- Gemma 3 norms queries and keys per head (``q_norm``, ``k_norm``) and rotates its local layers with their own
  base (``rope_parameters["sliding_attention"]``, formerly ``rope_local_base_freq``). As in transformers,
  Gemma 3 does not soft-cap attention logits whatever its config says.

The window, soft-cap and per-layer rotary table come from :mod:`mapjax.models.llama`, so they hold in the
full forward and in cached sampling alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import HFParameter, register_model
from mapjax.models.layers import RopeSpec
from mapjax.models.llama import FULL_ATTENTION, SLIDING_ATTENTION, LlamaDecoderLayer, LlamaForCausalLM
from mapjax.models.mistral import MistralConfig

__all__ = ["Gemma2Config", "Gemma2DecoderLayer", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3TextConfig",
           "GemmaRMSNorm"]


@dataclasses.dataclass(frozen=True)
class Gemma2Config(MistralConfig):
    """Hyperparameters of a Gemma 2 model (names follow ``transformers.Gemma2Config``; ``hidden_act`` is its
    ``hidden_activation``)."""

    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 1

    model_type: ClassVar[str] = "gemma2"
    # Gemma 3 norms queries and keys; transformers' Gemma 3 ignores attn_logit_softcapping.
    qk_norm: ClassVar[bool] = False
    caps_attention_logits: ClassVar[bool] = True
    # Without explicit layer_types, every this-many-th layer is global, the others local (transformers' default).
    sliding_window_pattern: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if not self.layer_types:
            pattern = self.sliding_window_pattern
            object.__setattr__(self, "layer_types", tuple(
                SLIDING_ATTENTION if (index + 1) % pattern else FULL_ATTENTION
                for index in range(self.num_hidden_layers)))
        super().__post_init__()

    @classmethod
    def from_hf(cls, hf_config: Any) -> "Gemma2Config":
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ModelError(f"{cls.model_type} config with use_bidirectional_attention=True is an embedding model, "
                             "not a causal language model; mapjax does not port it")
        config = super().from_hf(hf_config)
        activation = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
        return dataclasses.replace(config, hidden_act=activation or config.hidden_act)

    @property
    def attention_softcap(self) -> float | None:
        """The attention logit soft-cap the layers apply."""
        return self.attn_logit_softcapping if self.caps_attention_logits else None

    def layer_rope(self, index: int) -> RopeSpec:
        """The rotary spec of layer ``index`` (Gemma 2: one for all)."""
        del index
        return self.rope

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        values["hidden_activation"] = values.pop("hidden_act")
        values.pop("mlp_bias")
        return values


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
    """Hyperparameters of a Gemma 3 text model (``transformers.Gemma3TextConfig``); ``local_rope`` rotates the
    sliding layers (``None``: the global ``rope``)."""

    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    local_rope: RopeSpec | None = None

    model_type: ClassVar[str] = "gemma3_text"
    qk_norm: ClassVar[bool] = True
    caps_attention_logits: ClassVar[bool] = False
    sliding_window_pattern: ClassVar[int] = 6

    @classmethod
    def from_hf(cls, hf_config: Any) -> "Gemma3TextConfig":
        config = super().from_hf(hf_config)
        local = layers.rope_spec_from_hf_config(hf_config, config.head_dim, layer_type=SLIDING_ATTENTION)
        return dataclasses.replace(config, local_rope=local)

    def layer_rope(self, index: int) -> RopeSpec:
        if self.local_rope is not None and self.layer_types and self.layer_types[index] == SLIDING_ATTENTION:
            return self.local_rope
        return self.rope

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        values.pop("local_rope")
        values.pop("rope_scaling")   # Gemma 3 would merge it into the global layers' parameters
        values.pop("rope_theta")
        values["rope_parameters"] = {
            FULL_ATTENTION: layers.rope_spec_to_hf(self.rope),
            SLIDING_ATTENTION: layers.rope_spec_to_hf(self.local_rope or self.rope),
        }
        return values


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``normalise(x) * (1 + weight)`` in float32, then cast to the input dtype (Llama casts
    before scaling; the order matters in bfloat16). The weight starts at zero."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = layers.param(jnp.zeros((features,), dtype), (layers.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(x.dtype)


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """Llama's layer with Gemma's norms (four per layer, plus per-head q/k norms in Gemma 3), scale and
    soft-cap."""

    def __init__(self, config: Gemma2Config, layer_index: int, *, dtype: Any, rngs: nnx.Rngs):
        super().__init__(config, layer_index, dtype=dtype, rngs=rngs)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps=eps, dtype=dtype)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps=eps, dtype=dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps, dtype=dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps, dtype=dtype)
        self.q_norm = GemmaRMSNorm(config.head_dim, eps=eps, dtype=dtype) if config.qk_norm else None
        self.k_norm = GemmaRMSNorm(config.head_dim, eps=eps, dtype=dtype) if config.qk_norm else None
        self.attention_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.logit_softcap = config.attention_softcap
        self.rope = config.layer_rope(layer_index)

    def project_qkv(self, normed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        query, key, value = super().project_qkv(normed)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        return query, key, value

    def __call__(self, x: jax.Array, context: layers.AttentionContext, cos_sin: tuple[jax.Array, jax.Array],
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        attended, layer_cache = self.self_attention(self.input_layernorm(x), context, cos_sin, layer_cache)
        x = x + self.post_attention_layernorm(attended)
        x = x + self.post_feedforward_layernorm(self.feed_forward(self.pre_feedforward_layernorm(x)))
        return x, layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield from super().hf_parameters(prefix)
        yield f"{prefix}pre_feedforward_layernorm.weight", self.pre_feedforward_layernorm.weight, "linear"
        yield f"{prefix}post_feedforward_layernorm.weight", self.post_feedforward_layernorm.weight, "linear"
        if self.q_norm is not None:
            yield f"{prefix}self_attn.q_norm.weight", self.q_norm.weight, "linear"
            yield f"{prefix}self_attn.k_norm.weight", self.k_norm.weight, "linear"


@register_model
class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits, cache)``; logits are
    soft-capped when the config says so."""

    architecture = "Gemma2ForCausalLM"
    config_class = Gemma2Config
    layer_class = Gemma2DecoderLayer

    @staticmethod
    def make_norm(config: Gemma2Config, dtype: Any) -> nnx.Module:
        return GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the parameter dtype first (sqrt(3072) = 55.43 becomes 55.5 in bf16).
        return x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        logits = super().logits_from_hidden(hidden)   # float32
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)


@register_model
class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text language model (``Gemma3ForCausalLM`` with a ``gemma3_text`` config)."""

    architecture = "Gemma3ForCausalLM"
    config_class = Gemma3TextConfig
