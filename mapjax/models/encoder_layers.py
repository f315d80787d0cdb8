"""Pieces shared by the bidirectional encoders (BERT, DistilBERT, RoBERTa).

The three architectures differ only in tensor names, in whether they carry token-type
embeddings, in how position ids are derived and in their heads; the transformer body is
the same post-LayerNorm block.  This module holds that body, the configuration dataclass
the three share, and the tensor-name maps that load Hugging Face (PyTorch layout)
checkpoints and export them back.

Numerics: parameters may be float32 or bfloat16.  Matrix products run in the parameter
dtype; attention scores, softmax and layer norms run in float32 and are cast back, so a
bfloat16 model keeps its normalisation statistics exact enough to track the float32 one.

Padding: every model takes ``attention_mask`` (1 = real token, 0 = padding).  Padded keys
are masked out of attention, and positions/pooled tokens are derived from the mask, so
the hidden states at real tokens do not depend on how much padding surrounds them, on
either side.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.base import HFParameter
from mapjax.models.layers import (
    EMBED,
    HEADS,
    KV_HEADS,
    MASKED_LOGIT,
    MLP,
    POSITION,
    Embedding,
    LayerNorm,
    Linear,
    activation,
)

# ---------------------------------------------------------------------------------------
# Configuration and outputs.
# ---------------------------------------------------------------------------------------

POSITIONS_FROM_MASK = "from_mask"
"""BERT/DistilBERT: position of a token = number of real tokens before it."""
POSITIONS_AFTER_PADDING_IDX = "after_padding_idx"
"""RoBERTa: positions count from ``pad_token_id + 1`` over tokens that are not ``pad_token_id``."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static shape and behaviour of a BERT-family encoder (hashable, safe as a jit static).

    Attributes:
        model_type: ``"bert"``, ``"distilbert"`` or ``"roberta"``.
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size: transformer sizes.
        max_position_embeddings: rows of the position table.
        type_vocab_size: rows of the token-type table; 0 where the model has none (DistilBERT).
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_act: activation name of the feed-forward block (see ``layers.ACTIVATIONS``).
        pad_token_id: padding token id (RoBERTa also uses it to offset positions).
        position_scheme: ``POSITIONS_FROM_MASK`` or ``POSITIONS_AFTER_PADDING_IDX``.
        num_labels: classifier outputs (0 for a bare encoder).
        id2label: ``((index, label), ...)`` from the checkpoint, kept for export.
        source_config_json: the original ``config.json`` content, so an export keeps fields
            this port does not model (tokenizer ids, problem_type, ...).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    position_scheme: str = POSITIONS_FROM_MASK
    num_labels: int = 0
    id2label: tuple[tuple[int, str], ...] = ()
    source_config_json: str = "{}"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ModelError(
                f"hidden size {self.hidden_size} is not a multiple of the number of attention heads {self.num_heads}"
            )
        if self.position_scheme not in (POSITIONS_FROM_MASK, POSITIONS_AFTER_PADDING_IDX):
            raise ModelError(f"unknown position_scheme {self.position_scheme!r}")
        activation(self.hidden_act)  # fail at construction, not at the first call

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def max_positions(self) -> int:
        """Longest input the position table covers (RoBERTa loses ``pad_token_id + 1`` rows to its offset)."""
        if self.position_scheme == POSITIONS_AFTER_PADDING_IDX:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        """``config.json`` content for ``architecture``: the source config with this config's sizes written
        under the field names of its model type."""
        result = base_config_dict(self, architecture)
        names = _HF_FIELD_NAMES[self.model_type]
        result.update({hf_name: getattr(self, field) for field, hf_name in names.items()})
        if self.model_type != "distilbert":
            result["position_embedding_type"] = "absolute"
        return result


# transformers' config field of each EncoderConfig field, per model type.
_BERT_FIELD_NAMES = dict(
    vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
    num_heads="num_attention_heads", intermediate_size="intermediate_size",
    max_position_embeddings="max_position_embeddings", type_vocab_size="type_vocab_size",
    layer_norm_eps="layer_norm_eps", hidden_act="hidden_act", pad_token_id="pad_token_id")
_HF_FIELD_NAMES = {
    "bert": _BERT_FIELD_NAMES,
    "roberta": _BERT_FIELD_NAMES,
    "distilbert": dict(
        vocab_size="vocab_size", hidden_size="dim", num_layers="n_layers", num_heads="n_heads",
        intermediate_size="hidden_dim", max_position_embeddings="max_position_embeddings",
        hidden_act="activation", pad_token_id="pad_token_id"),
}


def label_pairs(hf_config: Any) -> tuple[tuple[int, str], ...]:
    """``hf_config.id2label`` as a sorted, hashable tuple of ``(index, label)`` pairs."""
    id2label = getattr(hf_config, "id2label", None) or {}
    return tuple(sorted((int(index), str(label)) for index, label in id2label.items()))


def source_config_json(hf_config: Any) -> str:
    """Serialise a transformers config (or a plain dict) for ``EncoderConfig.source_config_json``."""
    as_dict = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    return json.dumps(as_dict, sort_keys=True, default=str)


def base_config_dict(config: EncoderConfig, architecture: str) -> dict[str, Any]:
    """Start of an exported ``config.json``: the source config with architecture and labels set."""
    result = json.loads(config.source_config_json)
    result["architectures"] = [architecture]
    result["model_type"] = config.model_type
    if config.num_labels:
        # A randomly initialised classifier may have no label names; transformers' defaults then.
        pairs = config.id2label or tuple((index, f"LABEL_{index}") for index in range(config.num_labels))
        result["id2label"] = {str(index): label for index, label in pairs}
        result["label2id"] = {label: index for index, label in pairs}
    # transformers writes these itself; stale values would only confuse.
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        result.pop(key, None)
    return result


@flax.struct.dataclass
class EncoderOutput:
    """What a base encoder returns.

    Attributes:
        last_hidden_state: ``[batch, seq, hidden]`` in the parameter dtype.  Rows at padding
            positions are defined but meaningless.
        pooler_output: ``[batch, hidden]`` (``tanh(dense(first real token))``) or ``None``
            where the architecture or checkpoint has no pooler.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None


# ---------------------------------------------------------------------------------------
# Tensor naming.  Each architecture says where its tensors live in a checkpoint; the
# modules below turn those names into ``(hf_name, parameter, layout)`` entries, the one
# map (``hf_parameters``) that both loading and export walk (see ``mapjax.models.base``).
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmbeddingNames:
    """Checkpoint names of the embedding tensors (full names, prefix included)."""

    word: str
    position: str
    token_type: str | None
    norm: str
    # Non-persistent buffers that older checkpoints still carry; dropped on load.
    buffers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BlockNames:
    """Checkpoint name prefixes (before ``.weight``/``.bias``) of one encoder block."""

    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    intermediate: str
    output: str
    output_norm: str


def bert_block_names(prefix: str, index: int) -> BlockNames:
    """Names used by BERT and RoBERTa: ``{prefix}encoder.layer.{index}.attention.self.query`` ..."""
    layer = f"{prefix}encoder.layer.{index}"
    return BlockNames(
        query=f"{layer}.attention.self.query",
        key=f"{layer}.attention.self.key",
        value=f"{layer}.attention.self.value",
        attention_output=f"{layer}.attention.output.dense",
        attention_norm=f"{layer}.attention.output.LayerNorm",
        intermediate=f"{layer}.intermediate.dense",
        output=f"{layer}.output.dense",
        output_norm=f"{layer}.output.LayerNorm",
    )


def bert_embedding_names(prefix: str) -> EmbeddingNames:
    """Names used by BERT and RoBERTa: ``{prefix}embeddings.word_embeddings.weight`` ..."""
    return EmbeddingNames(
        word=f"{prefix}embeddings.word_embeddings.weight",
        position=f"{prefix}embeddings.position_embeddings.weight",
        token_type=f"{prefix}embeddings.token_type_embeddings.weight",
        norm=f"{prefix}embeddings.LayerNorm",
        buffers=(f"{prefix}embeddings.position_ids", f"{prefix}embeddings.token_type_ids"),
    )


def linear_entries(prefix: str, linear: Linear) -> Iterator[HFParameter]:
    """``{prefix}.weight`` / ``{prefix}.bias`` of a PyTorch ``nn.Linear`` (same ``[out, in]`` layout)."""
    yield f"{prefix}.weight", linear.weight, "linear"
    yield f"{prefix}.bias", linear.bias, "linear"


def norm_entries(prefix: str, norm: LayerNorm) -> Iterator[HFParameter]:
    """``{prefix}.weight`` / ``{prefix}.bias`` of a PyTorch ``nn.LayerNorm``."""
    yield f"{prefix}.weight", norm.weight, "linear"
    yield f"{prefix}.bias", norm.bias, "linear"


# ---------------------------------------------------------------------------------------
# Encoder body.  Constructors take ``rngs`` so a random model (tests, dummies) is one call;
# checkpoint loading (``PretrainedModel.from_hf_tensors``) never materialises the random init.
# ---------------------------------------------------------------------------------------


def attention_allowed(attention_mask: jax.Array) -> jax.Array:
    """``[batch, 1, 1, keys]`` booleans: which keys every query may attend to."""
    return (attention_mask != 0)[:, None, None, :]


# ---------------------------------------------------------------------------------------
# Activation.  BERT-family checkpoints name the exact (erf) GELU "gelu"; the tanh approximation is an opt-in
# (``use_approximate_gelu``), never the default.  (Computing the exact GELU as ``x * (1 + erf(x / sqrt 2)) / 2``
# rather than ``jax.nn.gelu``'s erfc form was measured too: no difference inside the model once it runs in row
# blocks, so the shared ``layers`` activation stays.)
# ---------------------------------------------------------------------------------------

EXACT_GELU_NAMES = ("gelu", "gelu_python")
APPROXIMATE_GELU = "gelu_pytorch_tanh"


def encoder_activation(name: str, *, approximate_gelu: bool = False) -> Callable[[jax.Array], jax.Array]:
    """The feed-forward activation ``name``; an exact GELU becomes the tanh one when ``approximate_gelu``."""
    if approximate_gelu and name in EXACT_GELU_NAMES:
        return activation(APPROXIMATE_GELU)
    return activation(name)


# ---------------------------------------------------------------------------------------
# Working set.  XLA:CPU runs each operation over the whole batch and writes its result to memory before the
# next one reads it.  At MiniLM's 64 x 128 tokens the attention scores are 64 x 12 x 128 x 128 floats (50 MB)
# and the feed-forward activations 8192 x 1536 floats (50 MB): past the caches (1 MB L2 per core and a
# shared 32 MB L3 on the 2-core AMD EPYC this was measured on), so every elementwise pass (mask, max, exp,
# sum, GELU, LayerNorm) streams from DRAM.  On CPU the stack therefore runs a few sequences at a time
# (``lax.map`` over blocks of rows, ``ENCODER_BLOCK_TOKENS`` tokens per block).  Rows never interact in an
# encoder, so the result is the same; the matrix products keep >= 1024 rows, enough for YNNPACK.  Measured
# (MiniLM, float32, interleaved with PyTorch, load < 2): 64 x 128 tokens 1.57 s -> 1.18 s per forward
# (0.89x -> 1.19x PyTorch), 16 x 512 tokens 2.42 s -> 1.56 s (0.64x -> 1.00x); blocks of 512 or 2048 tokens
# were 3-4% slower than 1024.  On accelerators the whole batch runs at once.
#
# Attention divides the [.., heads, head_dim] context by the softmax denominator instead of normalising the
# [.., queries, keys] weights: one pass over the scores fewer.  It matters when the scores do not fit in
# cache (16 x 512 tokens, whole batch: 2.42 s -> 2.21 s; under load, in blocks of 2048 tokens: 4.1 s -> 3.0 s)
# and is neutral otherwise.
# ---------------------------------------------------------------------------------------

ENCODER_BLOCK_TOKENS = 1024
"""Tokens per block of rows that runs through the whole stack at once on CPU (0: the whole batch)."""


def rows_per_block(batch: int, row_size: int, budget: int) -> int:
    """Rows of a batch to process together: all of them off CPU or for a budget <= 0, else the largest
    divisor of ``batch`` whose rows (``row_size`` each) fit in ``budget`` (at least 1)."""
    if budget <= 0 or jax.default_backend() != "cpu":
        return batch
    fitting = max(1, budget // row_size)
    return next(rows for rows in range(min(fitting, batch), 0, -1) if batch % rows == 0)


def map_row_blocks(function: Callable[..., jax.Array], rows: int, *arrays: jax.Array) -> jax.Array:
    """``function(*arrays)`` computed ``rows`` rows (leading axis) at a time; ``rows`` must divide the batch."""
    batch = arrays[0].shape[0]
    if rows >= batch:
        return function(*arrays)
    blocks = tuple(array.reshape(batch // rows, rows, *array.shape[1:]) for array in arrays)
    result = jax.lax.map(lambda block: function(*block), blocks)
    return result.reshape(batch, *result.shape[2:])


def encoder_attention(query: jax.Array, key: jax.Array, value: jax.Array, key_allowed: jax.Array,
                      scale: float) -> jax.Array:
    """Bidirectional multi-head attention with float32 logits: query/key/value ``[batch, seq, heads,
    head_dim]``, ``key_allowed`` ``[batch, seq]`` booleans; returns ``[batch, seq, heads, head_dim]`` in the
    query dtype.  A row whose keys are all masked gets uniform weights (not NaN), as in
    ``layers.dot_product_attention``."""
    logits = jnp.einsum("bshd,bthd->bhst", query, key, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(key_allowed[:, None, None, :], logits, MASKED_LOGIT)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    context = jnp.einsum("bhst,bthd->bshd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    denominator = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]  # [b, s, h, 1], each >= 1
    return (context / denominator).astype(query.dtype)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention with its output projection."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.query = Linear(hidden, hidden, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
        self.key = Linear(hidden, hidden, dtype=dtype, rngs=rngs, axes=(EMBED, KV_HEADS))
        self.value = Linear(hidden, hidden, dtype=dtype, rngs=rngs, axes=(EMBED, KV_HEADS))
        self.output = Linear(hidden, hidden, dtype=dtype, rngs=rngs, axes=(HEADS, EMBED))

    def __call__(self, hidden: jax.Array, allowed: jax.Array) -> jax.Array:
        batch, seq, width = hidden.shape
        head_dim = width // self.num_heads
        heads = (batch, seq, self.num_heads, head_dim)
        context = encoder_attention(
            self.query(hidden).reshape(heads),
            self.key(hidden).reshape(heads),
            self.value(hidden).reshape(heads),
            allowed.reshape(batch, -1),
            scale=1.0 / math.sqrt(head_dim),
        )
        return self.output(context.reshape(batch, seq, width))


class EncoderBlock(nnx.Module):
    """Post-LayerNorm transformer block: ``h = LN(x + attn(x))``, then ``LN(h + ffn(h))``."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden, inner, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.hidden_act = config.hidden_act
        self.approximate_gelu = False  # opt-in only, see ``use_approximate_gelu``
        self.attention = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.attention_norm = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.intermediate = Linear(hidden, inner, dtype=dtype, rngs=rngs, axes=(EMBED, MLP))
        self.output = Linear(inner, hidden, dtype=dtype, rngs=rngs, axes=(MLP, EMBED))
        self.output_norm = LayerNorm(hidden, eps=eps, dtype=dtype)

    def hf_parameters(self, names: BlockNames) -> Iterator[HFParameter]:
        """This block's parameters under the checkpoint names ``names`` gives."""
        yield from linear_entries(names.query, self.attention.query)
        yield from linear_entries(names.key, self.attention.key)
        yield from linear_entries(names.value, self.attention.value)
        yield from linear_entries(names.attention_output, self.attention.output)
        yield from norm_entries(names.attention_norm, self.attention_norm)
        yield from linear_entries(names.intermediate, self.intermediate)
        yield from linear_entries(names.output, self.output)
        yield from norm_entries(names.output_norm, self.output_norm)

    def __call__(self, hidden: jax.Array, allowed: jax.Array) -> jax.Array:
        hidden = self.attention_norm(hidden + self.attention(hidden, allowed))
        act = encoder_activation(self.hidden_act, approximate_gelu=self.approximate_gelu)
        feed_forward = self.output(act(self.intermediate(hidden)))
        return self.output_norm(hidden + feed_forward)


def use_approximate_gelu(model: nnx.Module, enabled: bool = True) -> nnx.Module:
    """Opt in (or back out) of the tanh approximation of GELU in every block of a BERT-family ``model``.

    Off by default: the checkpoints were trained with the exact (erf) GELU, and the tanh form moves
    all-MiniLM-L6-v2's mean-pooled embeddings by up to 1.9e-3 and coherence scores by up to 1.0e-3 (ten times
    the parity tolerance with transformers) while saving nothing measurable on a 2-core CPU (accuracy table in
    ``benchmarks/RESULTS.md``).  It changes the model in place (and returns it); call it
    before splitting the model for ``jax.jit`` (e.g. before building a reward on it), since the switch is part
    of the static graph.  Raises ``ModelError`` when the model has no encoder blocks or its activation is not
    the exact GELU.
    """
    blocks = [node for _, node in nnx.iter_graph(model) if isinstance(node, EncoderBlock)]
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no BERT-family encoder blocks; nothing to approximate")
    if blocks[0].hidden_act not in EXACT_GELU_NAMES:
        raise ModelError(f"this encoder's activation is {blocks[0].hidden_act!r}, not the exact GELU "
                         f"({', '.join(EXACT_GELU_NAMES)}); there is no approximation to switch")
    for block in blocks:
        block.approximate_gelu = enabled
    return model


class EncoderEmbeddings(nnx.Module):
    """Word + absolute position (+ token type) embeddings, then LayerNorm."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.word = Embedding(config.vocab_size, hidden, dtype=dtype, rngs=rngs)
        self.position = Embedding(config.max_position_embeddings, hidden, dtype=dtype, rngs=rngs,
                                  axes=(POSITION, EMBED))
        self.token_type = (
            Embedding(config.type_vocab_size, hidden, dtype=dtype, rngs=rngs, axes=(None, EMBED))
            if config.type_vocab_size else None
        )
        self.norm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=dtype)

    def hf_parameters(self, names: EmbeddingNames) -> Iterator[HFParameter]:
        """The embedding parameters under the checkpoint names ``names`` gives."""
        yield names.word, self.word.weight, "linear"
        yield names.position, self.position.weight, "linear"
        if self.token_type is not None:
            if names.token_type is None:
                raise ModelError("this encoder has token-type embeddings but its architecture names no tensor for them")
            yield names.token_type, self.token_type.weight, "linear"
        yield from norm_entries(names.norm, self.norm)

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array, token_type_ids: jax.Array | None) -> jax.Array:
        embedded = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            embedded = embedded + self.token_type(token_type_ids)
        return self.norm(embedded)


class EncoderStack(nnx.Module):
    """Embeddings followed by the blocks: the part BERT, DistilBERT and RoBERTa share."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = EncoderEmbeddings(config, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])

    def hf_parameters(self, embedding_names: EmbeddingNames, block_names: Callable[[int], BlockNames]
                      ) -> Iterator[HFParameter]:
        """Every parameter of the stack; ``block_names(i)`` names block ``i``'s tensors."""
        yield from self.embeddings.hf_parameters(embedding_names)
        for index, block in enumerate(self.blocks):
            yield from block.hf_parameters(block_names(index))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        if position_ids is None:
            position_ids = default_position_ids(self.config, input_ids, attention_mask)
        hidden = self.embeddings(input_ids, position_ids, token_type_ids)

        def run_blocks(hidden: jax.Array, allowed: jax.Array) -> jax.Array:
            for block in self.blocks:
                hidden = block(hidden, allowed)
            return hidden

        batch, seq = input_ids.shape
        rows = rows_per_block(batch, seq, ENCODER_BLOCK_TOKENS)
        return map_row_blocks(run_blocks, rows, hidden, attention_allowed(attention_mask))


# ---------------------------------------------------------------------------------------
# Inputs: validation at the boundary, positions, pooled token.
# ---------------------------------------------------------------------------------------


def default_position_ids(config: EncoderConfig, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Position ids the way each architecture derives them, made independent of padding.

    * ``POSITIONS_FROM_MASK`` (BERT, DistilBERT): the number of real tokens before the
      token.  With right padding (the tokenizers' default) this is ``0, 1, 2, ...``
      exactly as transformers uses; with left padding it still starts at 0 on the first
      real token, where transformers would shift it.
    * ``POSITIONS_AFTER_PADDING_IDX`` (RoBERTa): transformers' rule, ``pad_token_id +
      cumulative count of non-pad tokens`` on non-pad tokens and ``pad_token_id`` on pads.
    """
    if config.position_scheme == POSITIONS_AFTER_PADDING_IDX:
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    real = (attention_mask != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)


def first_real_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``hidden[b, i_b]`` where ``i_b`` is row b's first real token ([CLS] / <s>).

    Transformers pools index 0, which is the same token under right padding; taking the
    first unmasked index keeps left-padded batches correct too.
    """
    index = jnp.argmax(attention_mask != 0, axis=1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0, :]


def mean_pool(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the hidden states over real tokens (sentence-transformers' pooling), float32."""
    weights = (attention_mask != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(last_hidden_state.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def _check_range(name: str, values: jax.Array, upper: int) -> None:
    # Only concrete arrays can be checked; under jit the caller validated already or
    # accepts clamped lookups.
    if isinstance(values, jax.core.Tracer) or values.size == 0:
        return
    low, high = int(jnp.min(values)), int(jnp.max(values))
    if low < 0 or high >= upper:
        raise ModelError(f"{name} must lie in [0, {upper}); got values from {low} to {high}")


def prepare_inputs(
    config: EncoderConfig,
    input_ids: Any,
    attention_mask: Any | None,
    token_type_ids: Any | None = None,
    position_ids: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Check shapes (and, outside jit, id ranges) and return int32 arrays.

    ``attention_mask=None`` means every token is real.  Raises ``ModelError`` naming the
    argument and the expected shape or range, so bad input never fails inside jit.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ModelError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ModelError(f"input_ids must be integers; got dtype {input_ids.dtype}")
    batch, seq = input_ids.shape
    if seq > config.max_positions:
        raise ModelError(
            f"sequence length {seq} exceeds this {config.model_type} model's maximum of "
            f"{config.max_positions} tokens"
        )
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    optional = {"token_type_ids": token_type_ids, "position_ids": position_ids}
    for name, value in (("attention_mask", attention_mask), *optional.items()):
        if value is not None and tuple(jnp.shape(value)) != (batch, seq):
            raise ModelError(f"{name} shape {tuple(jnp.shape(value))} does not match input_ids shape {(batch, seq)}")
    _check_range("input_ids", input_ids, config.vocab_size)
    if token_type_ids is not None:
        if config.type_vocab_size == 0:
            raise ModelError(f"{config.model_type} has no token-type embeddings; pass token_type_ids=None")
        token_type_ids = jnp.asarray(token_type_ids).astype(jnp.int32)
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size)
    if position_ids is not None:
        position_ids = jnp.asarray(position_ids).astype(jnp.int32)
        _check_range("position_ids", position_ids, config.max_position_embeddings)
    return input_ids.astype(jnp.int32), attention_mask.astype(jnp.int32), token_type_ids, position_ids
