"""OPT (``OPTForCausalLM``) in Flax NNX.

OPT's learned position table is offset by 2 (a fairseq legacy): position ``p`` of a
real token reads row ``p + 2``, padding (position -1) reads row 1.  Positions come
from the attention mask, as in transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models import layers
from mapjax.models.base import CausalLMBase, CausalLMOutput, HFParameter, register_model, rename_in_place
from mapjax.models.layers import KVCache

POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Hyperparameters of an OPT model (names follow ``transformers.OPTConfig``)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim if self.word_embed_proj_dim is not None else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, hf_config: Any) -> "OPTConfig":
        """Read the fields this port uses from a ``transformers.OPTConfig``."""
        values = {field.name: getattr(hf_config, field.name) for field in dataclasses.fields(cls)
                  if hasattr(hf_config, field.name)}
        values["remove_final_layer_norm"] = bool(getattr(hf_config, "_remove_final_layer_norm", False))
        return cls(**values)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["_remove_final_layer_norm"] = values.pop("remove_final_layer_norm")
        values["word_embed_proj_dim"] = self.embed_dim
        values.update(model_type="opt", architectures=[architecture])
        return values


class OPTDecoderLayer(nnx.Module):
    def __init__(self, config: OPTConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.do_layer_norm_before = config.do_layer_norm_before
        self.activation_name = config.activation_function
        bias = config.enable_bias
        affine = config.layer_norm_elementwise_affine
        embed, heads, kv_heads, mlp = layers.EMBED, layers.HEADS, layers.KV_HEADS, layers.MLP
        self.q_proj = layers.Linear(hidden, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(embed, heads))
        self.k_proj = layers.Linear(hidden, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(embed, kv_heads))
        self.v_proj = layers.Linear(hidden, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(embed, kv_heads))
        self.out_proj = layers.Linear(hidden, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(heads, embed))
        self.self_attn_layer_norm = layers.LayerNorm(hidden, use_scale=affine, use_bias=affine, dtype=dtype)
        self.fc1 = layers.Linear(hidden, config.ffn_dim, use_bias=bias, dtype=dtype, rngs=rngs, axes=(embed, mlp))
        self.fc2 = layers.Linear(config.ffn_dim, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(mlp, embed))
        self.final_layer_norm = layers.LayerNorm(hidden, use_scale=affine, use_bias=affine, dtype=dtype)

    def __call__(self, x: jax.Array, context: layers.AttentionContext,
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        batch, seq, _ = x.shape
        split = lambda t: t.reshape(batch, seq, self.num_heads, self.head_dim)  # noqa: E731
        residual = x
        if self.do_layer_norm_before:  # 125m, 1.3b, ...: pre-LN
            x = self.self_attn_layer_norm(x)
        # Scale the query before the product, in the same order as the reference.
        query = split(self.q_proj(x) * (self.head_dim ** -0.5))
        attended, layer_cache = layers.attend_with_cache(query, split(self.k_proj(x)), split(self.v_proj(x)),
                                                         context, layer_cache, 1.0)
        x = residual + self.out_proj(attended.reshape(batch, seq, -1))
        if not self.do_layer_norm_before:  # 350m: post-LN
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(layers.activation(self.activation_name)(self.fc1(x)))
        if not self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x, layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = getattr(self, name)
            yield f"{prefix}self_attn.{name}.weight", linear.weight, "linear"
            if linear.bias is not None:
                yield f"{prefix}self_attn.{name}.bias", linear.bias, "linear"
        for name in ("fc1", "fc2"):
            linear = getattr(self, name)
            yield f"{prefix}{name}.weight", linear.weight, "linear"
            if linear.bias is not None:
                yield f"{prefix}{name}.bias", linear.bias, "linear"
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            norm = getattr(self, name)
            if norm.weight is not None:
                yield f"{prefix}{name}.weight", norm.weight, "linear"
            if norm.bias is not None:
                yield f"{prefix}{name}.bias", norm.bias, "linear"


@register_model
class OPTForCausalLM(CausalLMBase, nnx.Module):
    """OPT language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits [b, s, vocab], cache)``.

    See ``layers.KVCache`` for the cache.
    """

    architecture = "OPTForCausalLM"

    def __init__(self, config: OPTConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = layers.Embedding(config.vocab_size, config.embed_dim, dtype=dtype, rngs=rngs)
        self.embed_positions = layers.Embedding(config.max_position_embeddings + POSITION_OFFSET,
                                                config.hidden_size, dtype=dtype, rngs=rngs,
                                                axes=(layers.POSITION, layers.EMBED))
        # Only when the word embeddings are narrower than the model (opt-350m).
        self.project_in = (layers.Linear(config.embed_dim, config.hidden_size, use_bias=False, dtype=dtype,
                                         rngs=rngs, axes=(None, layers.EMBED)) if config.has_projections else None)
        self.project_out = (layers.Linear(config.hidden_size, config.embed_dim, use_bias=False, dtype=dtype,
                                          rngs=rngs, axes=(layers.EMBED, None)) if config.has_projections else None)
        self.layers = nnx.List([OPTDecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        affine = config.layer_norm_elementwise_affine
        self.final_layer_norm = (layers.LayerNorm(config.hidden_size, use_scale=affine, use_bias=affine,
                                                  dtype=dtype) if config.has_final_layer_norm else None)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.embed_dim, config.vocab_size, use_bias=False, dtype=dtype, rngs=rngs,
                                      axes=(layers.EMBED, layers.VOCAB)))

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
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(context.positions + POSITION_OFFSET)
        x, new_cache = layers.run_layers(self.layers, x, cache, mask, lambda layer, h, c: layer(h, context, c))
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x, float32_output=True)
        return CausalLMOutput(logits, new_cache)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        decoder = f"{prefix}model.decoder."
        yield f"{decoder}embed_tokens.weight", self.embed_tokens.weight, "linear"
        yield f"{decoder}embed_positions.weight", self.embed_positions.weight, "linear"
        if self.project_in is not None:
            yield f"{decoder}project_in.weight", self.project_in.weight, "linear"
            yield f"{decoder}project_out.weight", self.project_out.weight, "linear"
        for index, layer in enumerate(self.layers):
            yield from layer.hf_parameters(f"{decoder}layers.{index}.")
        if self.final_layer_norm is not None:
            if self.final_layer_norm.weight is not None:
                yield f"{decoder}final_layer_norm.weight", self.final_layer_norm.weight, "linear"
            if self.final_layer_norm.bias is not None:
                yield f"{decoder}final_layer_norm.bias", self.final_layer_norm.bias, "linear"
        if self.lm_head is not None:
            yield f"{prefix}lm_head.weight", self.lm_head.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> OPTConfig:
        return OPTConfig.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: OPTConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        # Checkpoints saved from OPTModel lack the "model." prefix of the LM class.
        if not any(name.startswith("model.") for name in tensors):
            rename_in_place(tensors, {("model." + name if name.startswith("decoder.") else name): value
                                      for name, value in tensors.items()})
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)   # a tied copy some checkpoints still carry
        return {}
