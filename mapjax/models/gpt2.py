"""GPT-2 in Flax NNX: ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification``.

Hugging Face stores GPT-2's projections as ``Conv1D`` (``weight [in, out]``); the
port keeps ``Linear`` layers in ``[out, in]`` and transposes when loading/exporting.
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
from mapjax.models.base import (
    CausalLMBase,
    CausalLMOutput,
    HFParameter,
    PretrainedModel,
    add_prefix_if_missing,
    register_model,
    rename_in_place,
)
from mapjax.models.layers import KVCache


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model (names follow ``transformers.GPT2Config``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    num_labels: int = 2
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_kv_heads(self) -> int:
        return self.n_head

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPT2Config":
        """Read the fields this port uses from a ``transformers.GPT2Config``."""
        values = {field.name: getattr(hf_config, field.name) for field in dataclasses.fields(cls)
                  if hasattr(hf_config, field.name)}
        values["num_labels"] = int(getattr(hf_config, "num_labels", 2))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(name), list):  # multiple ids: keep the first, as generation does
                values[name] = values[name][0]
        return cls(**values)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        num_labels = values.pop("num_labels")
        values.update(model_type="gpt2", architectures=[architecture])
        if architecture == "GPT2ForSequenceClassification":
            values["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            values["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return values


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_index: int, *, dtype: Any, rngs: nnx.Rngs):
        embed = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_index + 1
        self.scale = scale
        self.activation_name = config.activation_function
        self.ln_1 = layers.LayerNorm(embed, eps=config.layer_norm_epsilon, dtype=dtype)
        self.c_attn = layers.Linear(embed, 3 * embed, dtype=dtype, rngs=rngs, axes=(layers.EMBED, layers.HEADS))
        self.attn_c_proj = layers.Linear(embed, embed, dtype=dtype, rngs=rngs, axes=(layers.HEADS, layers.EMBED))
        self.ln_2 = layers.LayerNorm(embed, eps=config.layer_norm_epsilon, dtype=dtype)
        self.c_fc = layers.Linear(embed, config.inner_dim, dtype=dtype, rngs=rngs, axes=(layers.EMBED, layers.MLP))
        self.mlp_c_proj = layers.Linear(config.inner_dim, embed, dtype=dtype, rngs=rngs,
                                        axes=(layers.MLP, layers.EMBED))

    def __call__(self, x: jax.Array, context: layers.AttentionContext,
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        batch, seq, _ = x.shape
        qkv = self.c_attn(self.ln_1(x)).reshape(batch, seq, 3, self.num_heads, self.head_dim)
        attended, layer_cache = layers.attend_with_cache(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], context,
                                                         layer_cache, self.scale)
        x = x + self.attn_c_proj(attended.reshape(batch, seq, -1))
        hidden = layers.activation(self.activation_name)(self.c_fc(self.ln_2(x)))
        x = x + self.mlp_c_proj(hidden)
        return x, layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield f"{prefix}ln_1.weight", self.ln_1.weight, "linear"
        yield f"{prefix}ln_1.bias", self.ln_1.bias, "linear"
        yield f"{prefix}attn.c_attn.weight", self.c_attn.weight, "transpose"
        yield f"{prefix}attn.c_attn.bias", self.c_attn.bias, "linear"
        yield f"{prefix}attn.c_proj.weight", self.attn_c_proj.weight, "transpose"
        yield f"{prefix}attn.c_proj.bias", self.attn_c_proj.bias, "linear"
        yield f"{prefix}ln_2.weight", self.ln_2.weight, "linear"
        yield f"{prefix}ln_2.bias", self.ln_2.bias, "linear"
        yield f"{prefix}mlp.c_fc.weight", self.c_fc.weight, "transpose"
        yield f"{prefix}mlp.c_fc.bias", self.c_fc.bias, "linear"
        yield f"{prefix}mlp.c_proj.weight", self.mlp_c_proj.weight, "transpose"
        yield f"{prefix}mlp.c_proj.bias", self.mlp_c_proj.bias, "linear"


class GPT2Model(nnx.Module):
    """The GPT-2 trunk: embeddings, blocks, final LayerNorm -> hidden states."""

    def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.wte = layers.Embedding(config.vocab_size, config.n_embd, dtype=dtype, rngs=rngs)
        self.wpe = layers.Embedding(config.n_positions, config.n_embd, dtype=dtype, rngs=rngs,
                                    axes=(layers.POSITION, layers.EMBED))
        self.h = nnx.List([GPT2Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = layers.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """``(hidden states [b, s, n_embd], the advanced cache or None)``."""
        context, mask = layers.attention_context(input_ids, attention_mask, cache, positions)
        # Padding rows carry position -1; any valid index works since they are masked out.
        x = self.wte(input_ids) + self.wpe(jnp.maximum(context.positions, 0))
        x, new_cache = layers.run_layers(self.h, x, cache, mask, lambda block, h, c: block(h, context, c))
        return self.ln_f(x), new_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield f"{prefix}wte.weight", self.wte.weight, "linear"
        yield f"{prefix}wpe.weight", self.wpe.weight, "linear"
        for index, block in enumerate(self.h):
            yield from block.hf_parameters(f"{prefix}h.{index}.")
        yield f"{prefix}ln_f.weight", self.ln_f.weight, "linear"
        yield f"{prefix}ln_f.bias", self.ln_f.bias, "linear"


@register_model
class GPT2LMHeadModel(CausalLMBase, nnx.Module):
    """GPT-2 language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits [b, s, vocab], cache)``.

    See ``layers.KVCache`` for the cache.
    """

    architecture = "GPT2LMHeadModel"

    def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.transformer = GPT2Model(config, dtype=dtype, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.n_embd, config.vocab_size, use_bias=False, dtype=dtype, rngs=rngs,
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
        hidden, new_cache = self.transformer(input_ids, attention_mask, cache=cache, positions=positions)
        logits = self.transformer.wte.attend(hidden) if self.lm_head is None else self.lm_head(hidden, float32_output=True)
        return CausalLMOutput(logits, new_cache)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield from self.transformer.hf_parameters(f"{prefix}transformer.")
        if self.lm_head is not None:
            yield f"{prefix}lm_head.weight", self.lm_head.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> GPT2Config:
        return GPT2Config.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: GPT2Config, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        _normalise_gpt2_checkpoint(tensors)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)   # a tied copy some checkpoints still carry
        return {}


@register_model
class GPT2ForSequenceClassification(PretrainedModel, nnx.Module):
    """GPT-2 with a linear ``score`` head read at the last non-padding token.

    As in transformers, "padding" means ``input_ids == config.pad_token_id`` (not the
    attention mask), and the rightmost non-pad token is used, so left and right
    padding both work.  Returns ``[b, num_labels]``.
    """

    architecture = "GPT2ForSequenceClassification"

    def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, dtype=dtype, rngs=rngs)
        self.score = layers.Linear(config.n_embd, config.num_labels, use_bias=False, dtype=dtype, rngs=rngs,
                                   axes=(layers.EMBED, layers.LABELS))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        hidden, _ = self.transformer(input_ids, attention_mask)
        logits = self.score(hidden)
        batch = input_ids.shape[0]
        if self.config.pad_token_id is None:
            if batch != 1:
                raise ModelError("GPT2ForSequenceClassification needs config.pad_token_id to find the last "
                                 "token of each row when batch size > 1")
            last = jnp.full((batch,), input_ids.shape[1] - 1)
        else:
            last = layers.last_token_index((input_ids != self.config.pad_token_id).astype(jnp.int32))
        return logits[jnp.arange(batch), last]

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield from self.transformer.hf_parameters(f"{prefix}transformer.")
        yield f"{prefix}score.weight", self.score.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> GPT2Config:
        return GPT2Config.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: GPT2Config, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        _normalise_gpt2_checkpoint(tensors)
        return {}


def _normalise_gpt2_checkpoint(tensors: dict[str, np.ndarray]) -> None:
    """Bring the hub's original ``gpt2`` layout to transformers' current one (in place).

    Those files have no ``transformer.`` prefix and store the causal-mask buffers ``h.N.attn.bias`` /
    ``h.N.attn.masked_bias``, which carry no weights.
    """
    rename_in_place(tensors, add_prefix_if_missing(tensors, "transformer.", keep=("lm_head", "score")))
    for key in [key for key in tensors if key.endswith((".attn.bias", ".attn.masked_bias"))]:
        del tensors[key]
