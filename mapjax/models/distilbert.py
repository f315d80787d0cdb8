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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models.encoder_layers import (
    POSITIONS_FROM_MASK,
    BlockNames,
    EmbeddingNames,
    EncoderConfig,
    EncoderOutput,
    EncoderStack,
    ParameterMap,
    base_config_dict,
    detect_prefix,
    first_real_token,
    label_pairs,
    linear_entries,
    load_from_hf,
    prepare_inputs,
    source_config_json,
)
from mapjax.models.layers import Linear
from mapjax.models.loading import export_parameters, register_architecture

__all__ = [
    "DistilBertForSequenceClassification",
    "DistilBertModel",
    "build_distilbert_classifier",
    "build_distilbert_model",
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


def distilbert_config_dict(config: EncoderConfig, architecture: str) -> dict[str, Any]:
    """``config.json`` content with transformers' DistilBERT field names."""
    result = base_config_dict(config, architecture)
    result.update(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        n_layers=config.num_layers,
        n_heads=config.num_heads,
        hidden_dim=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        activation=config.hidden_act,
        pad_token_id=config.pad_token_id,
    )
    return result


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


class DistilBertModel(nnx.Module):
    """The DistilBERT encoder; returns ``EncoderOutput`` with ``pooler_output=None``.

    Call ``model(input_ids, attention_mask, token_type_ids=None, position_ids=None)``;
    ``token_type_ids`` must stay ``None`` (accepted only for a uniform signature).
    """

    architecture = "DistilBertModel"
    task_prefix = "distilbert."

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.type_vocab_size:
            raise ValueError("DistilBERT has no token-type embeddings; the config must set type_vocab_size=0")
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

    def parameter_map(self, prefix: str = "") -> ParameterMap:
        """``(hf_name, parameter, layout)`` for every parameter, names prefixed by ``prefix``."""
        return self.encoder.parameter_map(
            distilbert_embedding_names(prefix), lambda index: distilbert_block_names(prefix, index)
        )

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Tensors as transformers' PyTorch ``DistilBertModel`` names them (float32, unprefixed)."""
        return export_parameters(self.parameter_map())

    def hf_config_dict(self) -> dict[str, Any]:
        """``config.json`` content for transformers' ``DistilBertModel``."""
        return distilbert_config_dict(self.config, self.architecture)


class DistilBertForSequenceClassification(nnx.Module):
    """DistilBERT with ``pre_classifier -> ReLU -> classifier`` on [CLS]; float32 logits ``[batch, num_labels]``."""

    architecture = "DistilBertForSequenceClassification"

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ValueError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
        self.config = config
        self.distilbert = DistilBertModel(config, dtype=dtype, rngs=rngs)
        self.pre_classifier = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.classifier = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs)

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

    def parameter_map(self, base_prefix: str = "distilbert.") -> ParameterMap:
        """Every parameter: the encoder's under ``base_prefix``, then the two head layers."""
        return [
            *self.distilbert.parameter_map(base_prefix),
            *linear_entries("pre_classifier", self.pre_classifier),
            *linear_entries("classifier", self.classifier),
        ]

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Tensors as transformers' PyTorch ``DistilBertForSequenceClassification`` names them (float32)."""
        return export_parameters(self.parameter_map())

    def hf_config_dict(self) -> dict[str, Any]:
        """``config.json`` content for transformers' ``DistilBertForSequenceClassification``."""
        return distilbert_config_dict(self.config, self.architecture)


# ---------------------------------------------------------------------------------------
# Builders for mapjax.models.loading.
# ---------------------------------------------------------------------------------------

_PROBE = "embeddings.word_embeddings.weight"


@register_architecture("DistilBertModel")
def build_distilbert_model(hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any) -> DistilBertModel:
    """Build a ``DistilBertModel`` from a checkpoint (``distilbert.`` prefix optional)."""
    config = distilbert_config_from_hf(hf_config)
    prefix = detect_prefix(tensors, _PROBE, DistilBertModel.task_prefix)
    return load_from_hf(
        lambda: DistilBertModel(config, dtype=dtype, rngs=nnx.Rngs(0)),
        lambda model: model.parameter_map(prefix),
        tensors,
        dtype,
        drop=distilbert_embedding_names(prefix).buffers,
    )


@register_architecture("DistilBertForSequenceClassification")
def build_distilbert_classifier(
    hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any
) -> DistilBertForSequenceClassification:
    """Build a ``DistilBertForSequenceClassification`` from a checkpoint."""
    config = distilbert_config_from_hf(hf_config, classifier=True)
    prefix = detect_prefix(tensors, _PROBE, DistilBertModel.task_prefix)
    return load_from_hf(
        lambda: DistilBertForSequenceClassification(config, dtype=dtype, rngs=nnx.Rngs(0)),
        lambda model: model.parameter_map(prefix),
        tensors,
        dtype,
        drop=distilbert_embedding_names(prefix).buffers,
    )
