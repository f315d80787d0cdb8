"""Llama (``LlamaForCausalLM``) in Flax NNX: RMSNorm, rotary positions, grouped-query attention.

Covers SmolLM2, TinyLlama, Llama 2/3(.1/.2) and other checkpoints with the same
tensor names; rope scaling types ``default``, ``linear``, ``dynamic``, ``llama3``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import CausalLMBase, CausalLMOutput, HFParameter, register_model
from mapjax.models.layers import KVCache, RopeSpec


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model (names follow ``transformers.LlamaConfig``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec(rotary_dim=128)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope.rotary_dim != self.head_dim:
            raise ModelError(f"rope.rotary_dim={self.rope.rotary_dim} must equal head_dim={self.head_dim} (Llama "
                             f"rotates whole heads); pass rope=RopeSpec(rotary_dim={self.head_dim}, ...)")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def max_positions(self) -> int:
        """The trained context. Rotary positions have no table to run out of, but past this length the model
        reads positions it never saw in training; raise ``max_position_embeddings`` to go further."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Any) -> "LlamaConfig":
        """Read the fields this port uses from a ``transformers.LlamaConfig``."""
        skip = {"rope", "head_dim", "num_key_value_heads"}
        values = {field.name: getattr(hf_config, field.name) for field in dataclasses.fields(cls)
                  if field.name not in skip and getattr(hf_config, field.name, None) is not None}
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        values["head_dim"] = int(head_dim)
        values["num_key_value_heads"] = int(getattr(hf_config, "num_key_value_heads", None)
                                            or hf_config.num_attention_heads)
        values["rope"] = layers.rope_spec_from_hf_config(hf_config, head_dim)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(name), list):
                values[name] = values[name][0]
        return cls(**values)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("rope")
        values["rope_parameters"] = layers.rope_spec_to_hf(self.rope)
        # transformers v4 reads these two; v5 reads rope_parameters.
        values["rope_theta"] = self.rope.theta
        values["rope_scaling"] = (None if self.rope.rope_type == "default"
                                  else dict(layers.rope_spec_to_hf(self.rope), type=self.rope.rope_type))
        values.update(model_type="llama", architectures=[architecture])
        return values


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.rope = config.rope
        self.activation_name = config.hidden_act
        attn_bias, mlp_bias = config.attention_bias, config.mlp_bias
        embed, heads, kv_heads, mlp = layers.EMBED, layers.HEADS, layers.KV_HEADS, layers.MLP
        self.q_proj = layers.Linear(hidden, self.num_heads * head_dim, use_bias=attn_bias, dtype=dtype, rngs=rngs,
                                    axes=(embed, heads))
        self.k_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs, axes=(embed, kv_heads))
        self.v_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs, axes=(embed, kv_heads))
        self.o_proj = layers.Linear(self.num_heads * head_dim, hidden, use_bias=attn_bias, dtype=dtype, rngs=rngs,
                                    axes=(heads, embed))
        self.gate_proj = layers.Linear(hidden, config.intermediate_size, use_bias=mlp_bias, dtype=dtype, rngs=rngs,
                                       axes=(embed, mlp))
        self.up_proj = layers.Linear(hidden, config.intermediate_size, use_bias=mlp_bias, dtype=dtype, rngs=rngs,
                                     axes=(embed, mlp))
        self.down_proj = layers.Linear(config.intermediate_size, hidden, use_bias=mlp_bias, dtype=dtype, rngs=rngs,
                                       axes=(mlp, embed))
        self.input_layernorm = layers.RMSNorm(hidden, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = layers.RMSNorm(hidden, eps=config.rms_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, context: layers.AttentionContext, cos_sin: tuple[jax.Array, jax.Array],
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        batch, seq, _ = x.shape
        normed = self.input_layernorm(x)
        cos, sin = cos_sin
        query = layers.apply_rotary(self.q_proj(normed).reshape(batch, seq, self.num_heads, self.head_dim),
                                    cos, sin)
        key = layers.apply_rotary(self.k_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim),
                                  cos, sin)
        value = self.v_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        attended, layer_cache = layers.attend_with_cache(query, key, value, context, layer_cache,
                                                         self.head_dim ** -0.5)
        x = x + self.o_proj(attended.reshape(batch, seq, -1))
        normed = self.post_attention_layernorm(x)
        gated = layers.activation(self.activation_name)(self.gate_proj(normed)) * self.up_proj(normed)
        return x + self.down_proj(gated), layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(self, name)
                yield f"{prefix}{group}.{name}.weight", linear.weight, "linear"
                if linear.bias is not None:
                    yield f"{prefix}{group}.{name}.bias", linear.bias, "linear"
        yield f"{prefix}input_layernorm.weight", self.input_layernorm.weight, "linear"
        yield f"{prefix}post_attention_layernorm.weight", self.post_attention_layernorm.weight, "linear"


@register_model
class LlamaForCausalLM(CausalLMBase, nnx.Module):
    """Llama language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits [b, s, vocab], cache)``.

    See ``layers.KVCache`` for the cache.
    """

    architecture = "LlamaForCausalLM"

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      rngs=rngs, axes=(layers.EMBED, layers.VOCAB)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]``, and the advanced cache when ``cache`` is given.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: 1 for real tokens, 0 for padding (left or right); ``None`` = all real.
          cache: a ``KVCache`` from ``init_cache``; this call's tokens are written at
            ``cache.write_index`` and attend to everything cached before them.
          positions: explicit position ids ``[batch, seq]``; by default they count real
            tokens (``cumsum(mask) - 1``, continuing from ``cache.token_count``).
        """
        context, mask = layers.attention_context(input_ids, attention_mask, cache, positions)
        x = self.embed_tokens(input_ids)
        cos_sin = layers.rotary_cos_sin(self.config.rope, context.positions, x.dtype)
        x, new_cache = layers.run_layers(self.layers, x, cache, mask,
                                         lambda layer, h, c: layer(h, context, cos_sin, c))
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x, float32_output=True)
        return CausalLMOutput(logits, new_cache)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield f"{prefix}model.embed_tokens.weight", self.embed_tokens.weight, "linear"
        for index, layer in enumerate(self.layers):
            yield from layer.hf_parameters(f"{prefix}model.layers.{index}.")
        yield f"{prefix}model.norm.weight", self.norm.weight, "linear"
        if self.lm_head is not None:
            yield f"{prefix}lm_head.weight", self.lm_head.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> LlamaConfig:
        return LlamaConfig.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)   # a tied copy some checkpoints still carry
        return {}
