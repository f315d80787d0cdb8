"""DeBERTa-v2/v3 (``DebertaV2ForSequenceClassification``) in Flax NNX: disentangled attention.

DeBERTa's attention adds to the content-to-content score ``q_i . k_j`` two terms read from a table of
relative-position embeddings (``encoder.rel_embeddings``): content-to-position ``q_i . Kr[d(i, j)]`` ("c2p") and
position-to-content ``k_j . Qr[d(i, j)]`` ("p2c"), where ``d(i, j)`` is the bucketed distance ``i - j``
(linear up to ``position_buckets / 2``, logarithmic beyond) shifted and clamped into the table. All three are
divided by ``sqrt(head_dim * (1 + number of relative terms))``. DeBERTa-v3 (and most DeBERTa reward models,
e.g. OpenAssistant/reward-model-deberta-v3-large-v2) has no absolute position embeddings
(``position_biased_input=False``), shares the content projections with the position terms
(``share_att_key``), layer-norms the relative table (``norm_rel_ebd="layer_norm"``) and uses 256 buckets;
DeBERTa-v2-xlarge also has a convolution after the first layer (``conv_kernel_size``). All of these follow the
config.

The classifier pools the first token through ``pooler.dense`` and ``pooler_hidden_act`` and applies a linear
``classifier``: ``model(input_ids, attention_mask) -> float32 [batch, num_labels]``. With ``num_labels = k``
(e.g. ``problem_type="regression"`` and an ``id2label`` naming each output) it is a multi-objective reward
model: one forward pass, k named scores.

Differences from transformers, both about padding and both invisible under right padding (DeBERTa tokenizers'
default): absolute positions (where the config has them) count real tokens, and the pooler reads the first real
token rather than index 0, so left-padded rows score as they would unpadded. Relative distances are differences
of slots, the same with any padding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.base import HFParameter, PretrainedModel, register_model
from mapjax.models.encoder_layers import (
    base_config_dict,
    encoder_activation,
    first_real_token,
    label_pairs,
    linear_entries,
    norm_entries,
    prepare_inputs,
    source_config_json,
)
from mapjax.models.layers import (
    EMBED,
    HEADS,
    KV_HEADS,
    LABELS,
    MASKED_LOGIT,
    MLP,
    POSITION,
    Embedding,
    LayerNorm,
    Linear,
    param,
)

__all__ = ["DebertaV2Config", "DebertaV2ForSequenceClassification", "relative_position_index"]

RELATIVE_TERMS = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    """Hyperparameters of a DeBERTa-v2/v3 model (names follow ``transformers.DebertaV2Config``, with the
    ``getattr`` defaults transformers applies to the optional ones).

    ``max_relative_positions`` is resolved (``< 1`` means ``max_position_embeddings``); ``pos_att_type`` is a
    tuple of ``"c2p"`` / ``"p2c"``; ``num_labels`` is 0 for a bare encoder.
    """

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = 512
    position_buckets: int = -1
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: tuple[str, ...] = ("none",)
    position_biased_input: bool = True
    embedding_size: int | None = None
    attention_head_size: int | None = None
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    pad_token_id: int = 0
    num_labels: int = 0
    id2label: tuple[tuple[int, str], ...] = ()
    source_config_json: str = "{}"

    model_type = "deberta-v2"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pos_att_type) - set(RELATIVE_TERMS))
        if unknown:
            raise ModelError(f"unsupported pos_att_type entries {unknown}; supported: {list(RELATIVE_TERMS)}")
        if self.attention_head_size is None and self.hidden_size % self.num_attention_heads:
            raise ModelError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.pooler_hidden_size not in (None, self.hidden_size):
            raise ModelError(f"pooler_hidden_size {self.pooler_hidden_size} differs from hidden_size "
                             f"{self.hidden_size}; transformers' classifier cannot read such a pooler either")
        for name in (self.hidden_act, self.pooler_hidden_act, self.conv_act):
            encoder_activation(name)   # fail at construction, not at the first call

    @classmethod
    def from_hf(cls, hf_config: Any, *, classifier: bool = True) -> "DebertaV2Config":
        """Read a ``transformers.DebertaV2Config``."""
        def option(name: str, default: Any) -> Any:
            value = getattr(hf_config, name, None)
            return default if value is None else value

        pos_att_type = option("pos_att_type", ())
        if isinstance(pos_att_type, str):
            pos_att_type = [part.strip() for part in pos_att_type.lower().split("|")]
        max_relative = int(option("max_relative_positions", -1))
        num_labels = int(hf_config.num_labels) if classifier else 0
        return cls(
            vocab_size=int(hf_config.vocab_size), hidden_size=int(hf_config.hidden_size),
            num_hidden_layers=int(hf_config.num_hidden_layers),
            num_attention_heads=int(hf_config.num_attention_heads),
            intermediate_size=int(hf_config.intermediate_size), hidden_act=str(hf_config.hidden_act),
            max_position_embeddings=int(hf_config.max_position_embeddings),
            type_vocab_size=int(option("type_vocab_size", 0)), layer_norm_eps=float(hf_config.layer_norm_eps),
            relative_attention=bool(option("relative_attention", False)),
            max_relative_positions=max_relative if max_relative >= 1 else int(hf_config.max_position_embeddings),
            position_buckets=int(option("position_buckets", -1)),
            pos_att_type=tuple(str(term) for term in pos_att_type),
            share_att_key=bool(option("share_att_key", False)),
            norm_rel_ebd=tuple(part.strip() for part in str(option("norm_rel_ebd", "none")).lower().split("|")),
            position_biased_input=bool(option("position_biased_input", True)),
            embedding_size=option("embedding_size", None), attention_head_size=option("attention_head_size", None),
            conv_kernel_size=int(option("conv_kernel_size", 0)), conv_groups=int(option("conv_groups", 1)),
            conv_act=str(option("conv_act", "tanh")), pooler_hidden_size=option("pooler_hidden_size", None),
            pooler_hidden_act=str(option("pooler_hidden_act", "gelu")), pad_token_id=int(option("pad_token_id", 0)),
            num_labels=num_labels, id2label=label_pairs(hf_config) if classifier else (),
            source_config_json=source_config_json(hf_config),
        )

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        """The trained context (the tokenizers truncate there)."""
        return self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """Half the relative table: distances map into ``[0, 2 * span)``."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def labels(self) -> tuple[str, ...]:
        """The output names in order (``LABEL_i`` where the config names none)."""
        names = dict(self.id2label)
        return tuple(names.get(index, f"LABEL_{index}") for index in range(self.num_labels))

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = base_config_dict(self, architecture)
        values.update(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
            relative_attention=self.relative_attention, max_relative_positions=self.max_relative_positions,
            position_buckets=self.position_buckets, pos_att_type=list(self.pos_att_type),
            share_att_key=self.share_att_key, norm_rel_ebd="|".join(self.norm_rel_ebd),
            position_biased_input=self.position_biased_input, conv_kernel_size=self.conv_kernel_size,
            conv_groups=self.conv_groups, conv_act=self.conv_act, pooler_hidden_act=self.pooler_hidden_act,
            pad_token_id=self.pad_token_id)
        for name in ("embedding_size", "attention_head_size", "pooler_hidden_size"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return values


def relative_position_index(seq: int, bucket_size: int, max_position: int, span: int) -> np.ndarray:
    """``[seq, seq]`` int32 rows of the relative table each (query i, key j) pair reads: the distance
    ``i - j``, log-bucketed beyond ``bucket_size / 2`` when ``bucket_size > 0``, plus ``span``, clamped to
    ``[0, 2 * span)``. Computed in float32 as transformers' ``make_log_bucket_position`` does."""
    relative = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    if bucket_size > 0 and max_position > 0:
        mid = bucket_size // 2
        sign = np.sign(relative)
        absolute = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative))
        ratio = np.log(absolute.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
        log_position = np.ceil((ratio * np.float32(mid - 1)).astype(np.float32)) + mid
        relative = np.where(absolute <= mid, relative, log_position * sign).astype(np.int64)
    return np.clip(relative + span, 0, 2 * span - 1).astype(np.int32)


class DebertaEmbeddings(nnx.Module):
    """Word (+ absolute position) (+ token type) embeddings, optional projection, LayerNorm, padding zeroed."""

    def __init__(self, config: DebertaV2Config, *, dtype: Any, rngs: nnx.Rngs):
        width = config.embedding_size or config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, width, dtype=dtype, rngs=rngs)
        self.position_embeddings = (Embedding(config.max_position_embeddings, width, dtype=dtype, rngs=rngs,
                                              axes=(POSITION, EMBED)) if config.position_biased_input else None)
        self.token_type_embeddings = (Embedding(config.type_vocab_size, width, dtype=dtype, rngs=rngs,
                                                axes=(None, EMBED)) if config.type_vocab_size > 0 else None)
        self.embed_proj = (Linear(width, config.hidden_size, use_bias=False, dtype=dtype, rngs=rngs,
                                  axes=(None, EMBED)) if width != config.hidden_size else None)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None,
                 position_ids: jax.Array | None) -> jax.Array:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:   # real tokens counted, so padding on either side changes nothing
                position_ids = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(jnp.zeros_like(input_ids) if token_type_ids is None
                                               else token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x) * mask[..., None].astype(x.dtype)

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield f"{prefix}word_embeddings.weight", self.word_embeddings.weight, "linear"
        if self.position_embeddings is not None:
            yield f"{prefix}position_embeddings.weight", self.position_embeddings.weight, "linear"
        if self.token_type_embeddings is not None:
            yield f"{prefix}token_type_embeddings.weight", self.token_type_embeddings.weight, "linear"
        if self.embed_proj is not None:
            yield f"{prefix}embed_proj.weight", self.embed_proj.weight, "linear"
        yield from norm_entries(f"{prefix}LayerNorm", self.LayerNorm)


class DisentangledSelfAttention(nnx.Module):
    """Content-to-content plus the configured relative terms (c2p, p2c), then the output dense + LayerNorm."""

    def __init__(self, config: DebertaV2Config, *, dtype: Any, rngs: nnx.Rngs):
        hidden, width = config.hidden_size, config.num_attention_heads * config.head_dim
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.relative_terms = config.pos_att_type if config.relative_attention else ()
        self.share_att_key = config.share_att_key
        self.query_proj = Linear(hidden, width, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
        self.key_proj = Linear(hidden, width, dtype=dtype, rngs=rngs, axes=(EMBED, KV_HEADS))
        self.value_proj = Linear(hidden, width, dtype=dtype, rngs=rngs, axes=(EMBED, KV_HEADS))
        separate = config.relative_attention and not config.share_att_key
        self.pos_key_proj = Linear(hidden, width, dtype=dtype, rngs=rngs, axes=(EMBED, KV_HEADS)) \
            if separate and "c2p" in config.pos_att_type else None
        self.pos_query_proj = Linear(hidden, width, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS)) \
            if separate and "p2c" in config.pos_att_type else None
        self.dense = Linear(width, hidden, dtype=dtype, rngs=rngs, axes=(HEADS, EMBED))
        self.LayerNorm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=dtype)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(self, hidden: jax.Array, key_allowed: jax.Array, relative_table: jax.Array | None,
                 relative_index: np.ndarray | None) -> jax.Array:
        query = self._heads(self.query_proj(hidden))
        key = self._heads(self.key_proj(hidden))
        value = self._heads(self.value_proj(hidden))
        scale = math.sqrt(self.head_dim * (1 + len(self.relative_terms)))
        scores = jnp.einsum("bshd,bthd->bhst", query, key, preferred_element_type=jnp.float32) / scale
        if "c2p" in self.relative_terms:
            position_key = self._heads((self.key_proj if self.share_att_key else self.pos_key_proj)(relative_table))
            by_distance = jnp.einsum("bshd,rhd->bhsr", query, position_key, preferred_element_type=jnp.float32)
            scores = scores + jnp.take_along_axis(by_distance, relative_index[None, None], axis=-1) / scale
        if "p2c" in self.relative_terms:
            position_query = self._heads((self.query_proj if self.share_att_key else self.pos_query_proj)(
                relative_table))
            by_distance = jnp.einsum("bthd,rhd->bhtr", key, position_query, preferred_element_type=jnp.float32)
            # Pair (i, j) reads key j's row at distance index(i, j): gather along [key, query], then transpose
            # (transformers' p2c gather; its index -d(j, i) equals d(i, j) since the buckets are odd).
            gathered = jnp.take_along_axis(by_distance, relative_index.T[None, None], axis=-1)
            scores = scores + jnp.swapaxes(gathered, -1, -2) / scale
        scores = jnp.where(key_allowed[:, None, None, :], scores, MASKED_LOGIT)
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhst,bthd->bshd", probs.astype(value.dtype), value)
        context = context.reshape(*hidden.shape[:-1], -1).astype(hidden.dtype)
        return self.LayerNorm(self.dense(context) + hidden)

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        for name in ("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj"):
            if getattr(self, name) is not None:
                yield from linear_entries(f"{prefix}self.{name}", getattr(self, name))
        yield from linear_entries(f"{prefix}output.dense", self.dense)
        yield from norm_entries(f"{prefix}output.LayerNorm", self.LayerNorm)


class DebertaLayer(nnx.Module):
    """Disentangled attention, then the post-LayerNorm feed-forward block."""

    def __init__(self, config: DebertaV2Config, *, dtype: Any, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.hidden_act = config.hidden_act
        self.attention = DisentangledSelfAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = Linear(hidden, config.intermediate_size, dtype=dtype, rngs=rngs, axes=(EMBED, MLP))
        self.output = Linear(config.intermediate_size, hidden, dtype=dtype, rngs=rngs, axes=(MLP, EMBED))
        self.output_norm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, hidden: jax.Array, key_allowed: jax.Array, relative_table: jax.Array | None,
                 relative_index: np.ndarray | None) -> jax.Array:
        attended = self.attention(hidden, key_allowed, relative_table, relative_index)
        feed_forward = self.output(encoder_activation(self.hidden_act)(self.intermediate(attended)))
        return self.output_norm(feed_forward + attended)

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield from self.attention.hf_parameters(f"{prefix}attention.")
        yield from linear_entries(f"{prefix}intermediate.dense", self.intermediate)
        yield from linear_entries(f"{prefix}output.dense", self.output)
        yield from norm_entries(f"{prefix}output.LayerNorm", self.output_norm)


class DebertaConv(nnx.Module):
    """DeBERTa-v2's ``ConvLayer``: a 1-D convolution over the embeddings, added to the first layer's output."""

    def __init__(self, config: DebertaV2Config, *, dtype: Any, rngs: nnx.Rngs):
        hidden, kernel, groups = config.hidden_size, config.conv_kernel_size, config.conv_groups
        self.groups, self.conv_act = groups, config.conv_act
        self.weight = param((jax.random.normal(rngs.params(), (hidden, hidden // groups, kernel)) * 0.02
                             ).astype(dtype), (EMBED, None, None))
        self.bias = param(jnp.zeros((hidden,), dtype), (EMBED,))
        self.LayerNorm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, embedded: jax.Array, residual: jax.Array, mask: jax.Array) -> jax.Array:
        weight = self.weight.get_value()
        pad = (weight.shape[-1] - 1) // 2
        out = jax.lax.conv_general_dilated(embedded.astype(weight.dtype), weight, window_strides=(1,),
                                           padding=[(pad, pad)], dimension_numbers=("NWC", "OIW", "NWC"),
                                           feature_group_count=self.groups) + self.bias.get_value()
        real = (mask != 0)[..., None]
        out = encoder_activation(self.conv_act)(jnp.where(real, out, 0))
        return self.LayerNorm(residual + out) * real.astype(residual.dtype)

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield f"{prefix}conv.weight", self.weight, "linear"
        yield f"{prefix}conv.bias", self.bias, "linear"
        yield from norm_entries(f"{prefix}LayerNorm", self.LayerNorm)


class DebertaEncoder(nnx.Module):
    """Embeddings, the layers, the relative-position table (LayerNorm-ed where the config says) and the
    optional convolution: ``DebertaV2Model``'s body, returning the last hidden states."""

    def __init__(self, config: DebertaV2Config, *, dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = DebertaEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layer = nnx.List([DebertaLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
        relative = config.relative_attention
        self.rel_embeddings = (Embedding(2 * config.relative_span, config.hidden_size, dtype=dtype, rngs=rngs,
                                         axes=(POSITION, EMBED)) if relative else None)
        self.rel_norm = (LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
                         if relative and "layer_norm" in config.norm_rel_ebd else None)
        self.conv = DebertaConv(config, dtype=dtype, rngs=rngs) if config.conv_kernel_size > 0 else None

    def __call__(self, input_ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        config = self.config
        embedded = self.embeddings(input_ids, mask, token_type_ids, position_ids)
        relative_table = relative_index = None
        if self.rel_embeddings is not None:
            relative_table = self.rel_embeddings.weight.get_value()
            if self.rel_norm is not None:
                relative_table = self.rel_norm(relative_table)
            # Static: it depends on the sequence length only.
            relative_index = relative_position_index(input_ids.shape[1], config.position_buckets,
                                                     config.max_relative_positions, config.relative_span)
        key_allowed = mask != 0
        hidden = embedded
        for index, layer in enumerate(self.layer):
            hidden = layer(hidden, key_allowed, relative_table, relative_index)
            if index == 0 and self.conv is not None:
                hidden = self.conv(embedded, hidden, mask)
        return hidden

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        yield from self.embeddings.hf_parameters(f"{prefix}embeddings.")
        for index, layer in enumerate(self.layer):
            yield from layer.hf_parameters(f"{prefix}encoder.layer.{index}.")
        if self.rel_embeddings is not None:
            yield f"{prefix}encoder.rel_embeddings.weight", self.rel_embeddings.weight, "linear"
        if self.rel_norm is not None:
            yield from norm_entries(f"{prefix}encoder.LayerNorm", self.rel_norm)
        if self.conv is not None:
            yield from self.conv.hf_parameters(f"{prefix}encoder.conv.")


@register_model
class DebertaV2ForSequenceClassification(PretrainedModel, nnx.Module):
    """DeBERTa-v2/v3 with the context pooler and a linear classifier; returns float32 ``[batch, num_labels]``.

    Call ``model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)`` with integer
    ``[batch, seq]`` arrays (1 = real token in ``attention_mask``; left or right padding).
    """

    architecture = "DebertaV2ForSequenceClassification"

    def __init__(self, config: DebertaV2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ModelError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
        self.config = config
        self.deberta = DebertaEncoder(config, dtype=dtype, rngs=rngs)
        self.pooler = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, None))
        self.classifier = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs, axes=(EMBED, LABELS))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None) -> jax.Array:
        input_ids, attention_mask, token_type_ids, position_ids = prepare_inputs(
            self.config, input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.deberta(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = encoder_activation(self.config.pooler_hidden_act)(self.pooler(first_real_token(hidden,
                                                                                                  attention_mask)))
        # Scores leave the model in float32 (accumulated in float32 too): rewards are computed from them.
        return self.classifier(pooled, float32_output=True).astype(jnp.float32)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield from self.deberta.hf_parameters(f"{prefix}deberta.")
        yield from linear_entries(f"{prefix}pooler.dense", self.pooler)
        yield from linear_entries(f"{prefix}classifier", self.classifier)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> DebertaV2Config:
        return DebertaV2Config.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: DebertaV2Config, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Drop what DeBERTa checkpoints carry but this model does not use: the position table of models without
        absolute positions (transformers ignores it too) and pretraining heads."""
        if not config.position_biased_input:
            tensors.pop("deberta.embeddings.position_embeddings.weight", None)
        for name in [name for name in tensors if name.startswith(("lm_predictions.", "mask_predictions.", "cls."))]:
            del tensors[name]
        return {}
