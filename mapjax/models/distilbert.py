"""DistilBERT: ``DistilBertModel`` and ``DistilBertForSequenceClassification``.

DistilBERT is BERT's post-LN body without token types and without a pooler, with its
own tensor names (``transformer.layer.{i}.attention.q_lin`` ...) and LayerNorm epsilon
fixed at 1e-12 (transformers hard-codes it; the config has no field for it).  The
classifier reads the first real token ([CLS]; index 0 under right padding, as in
transformers) through ``pre_classifier -> ReLU -> classifier``.

Position embeddings are read from the checkpoint whether they were learned or sinusoidal
(``sinusoidal_pos_embds``): transformers stores both as a table.  Inference only.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.base import (
    HFParameter,
    PretrainedModel,
    add_prefix_if_missing,
    register_model,
    rename_in_place,
    strip_prefix,
)
from mapjax.models.encoder_layers import (
    POSITIONS_FROM_MASK,
    BlockNames,
    EmbeddingNames,
    EncoderConfig,
    EncoderOutput,
    EncoderStack,
    first_real_token,
    label_pairs,
    linear_entries,
    prepare_inputs,
    source_config_json,
)
from mapjax.models.layers import EMBED, LABELS, Linear

__all__ = [
    "DistilBertForSequenceClassification",
    "DistilBertModel",
    "distilbert_config_from_hf",
]

# transformers' DistilBERT builds every LayerNorm with eps=1e-12 regardless of the config.
DISTILBERT_LAYER_NORM_EPS = 1e-12


def distilbert_config_from_hf(hf_config: Any, *, classifier: bool = False) -> EncoderConfig:
    """Translate a transformers ``DistilBertConfig`` into an ``EncoderConfig``."""
    pad_token_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    return EncoderConfig(
        model_type="distilbert",
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.dim,
        num_layers=hf_config.n_layers,
        num_heads=hf_config.n_heads,
        intermediate_size=hf_config.hidden_dim,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=0,
        layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
        hidden_act=hf_config.activation,
        pad_token_id=int(pad_token_id),
        position_scheme=POSITIONS_FROM_MASK,
        num_labels=int(hf_config.num_labels) if classifier else 0,
        id2label=label_pairs(hf_config) if classifier else (),
        source_config_json=source_config_json(hf_config),
    )


def distilbert_embedding_names(prefix: str) -> EmbeddingNames:
    """``{prefix}embeddings.word_embeddings.weight`` ...; DistilBERT has no token types."""
    return EmbeddingNames(
        word=f"{prefix}embeddings.word_embeddings.weight",
        position=f"{prefix}embeddings.position_embeddings.weight",
        token_type=None,
        norm=f"{prefix}embeddings.LayerNorm",
        buffers=(f"{prefix}embeddings.position_ids",),
    )


def distilbert_block_names(prefix: str, index: int) -> BlockNames:
    """``{prefix}transformer.layer.{index}.attention.q_lin`` ... for one block."""
    layer = f"{prefix}transformer.layer.{index}"
    return BlockNames(
        query=f"{layer}.attention.q_lin",
        key=f"{layer}.attention.k_lin",
        value=f"{layer}.attention.v_lin",
        attention_output=f"{layer}.attention.out_lin",
        attention_norm=f"{layer}.sa_layer_norm",
        intermediate=f"{layer}.ffn.lin1",
        output=f"{layer}.ffn.lin2",
        output_norm=f"{layer}.output_layer_norm",
    )


@register_model
class DistilBertModel(PretrainedModel, nnx.Module):
    """The DistilBERT encoder; returns ``EncoderOutput`` with ``pooler_output=None``.

    Call ``model(input_ids, attention_mask, token_type_ids=None, position_ids=None)``;
    ``token_type_ids`` must stay ``None`` (accepted only for a uniform signature).
    """

    architecture = "DistilBertModel"
    task_prefix = "distilbert."

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.type_vocab_size:
            raise ModelError("DistilBERT has no token-type embeddings; the config must set type_vocab_size=0")
        self.config = config
        self.encoder = EncoderStack(config, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> EncoderOutput:
        input_ids, attention_mask, token_type_ids, position_ids = prepare_inputs(
            self.config, input_ids, attention_mask, token_type_ids, position_ids
        )
        hidden = self.encoder(input_ids, attention_mask, None, position_ids)
        return EncoderOutput(last_hidden_state=hidden, pooler_output=None)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """``(hf_name, parameter, layout)`` for every parameter, names prefixed by ``prefix``."""
        yield from self.encoder.hf_parameters(
            distilbert_embedding_names(prefix), lambda index: distilbert_block_names(prefix, index)
        )

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> EncoderConfig:
        return distilbert_config_from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: EncoderConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accept the encoder's tensors with or without ``distilbert.``."""
        rename_in_place(tensors, strip_prefix(tensors, cls.task_prefix))
        for buffer in distilbert_embedding_names("").buffers:
            tensors.pop(buffer, None)
        return {}


@register_model
class DistilBertForSequenceClassification(PretrainedModel, nnx.Module):
    """DistilBERT with ``pre_classifier -> ReLU -> classifier`` on [CLS]; float32 logits ``[batch, num_labels]``."""

    architecture = "DistilBertForSequenceClassification"

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ModelError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
        self.config = config
        self.distilbert = DistilBertModel(config, dtype=dtype, rngs=rngs)
        self.pre_classifier = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs,
                                     axes=(EMBED, None))
        self.classifier = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs, axes=(EMBED, LABELS))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        hidden = self.distilbert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        features = jax.nn.relu(self.pre_classifier(first_real_token(hidden, jnp.asarray(attention_mask))))
        return self.classifier(features).astype(jnp.float32)  # rewards are computed from these

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """Every parameter: the encoder's under ``distilbert.``, then the two head layers."""
        yield from self.distilbert.hf_parameters(f"{prefix}{DistilBertModel.task_prefix}")
        yield from linear_entries(f"{prefix}pre_classifier", self.pre_classifier)
        yield from linear_entries(f"{prefix}classifier", self.classifier)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> EncoderConfig:
        return distilbert_config_from_hf(hf_config, classifier=True)

    @classmethod
    def prepare_checkpoint(cls, config: EncoderConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accept the encoder's tensors with or without ``distilbert.``."""
        prefix = DistilBertModel.task_prefix
        rename_in_place(tensors, add_prefix_if_missing(tensors, prefix, keep=("pre_classifier", "classifier")))
        for buffer in distilbert_embedding_names(prefix).buffers:
            tensors.pop(buffer, None)
        return {}
