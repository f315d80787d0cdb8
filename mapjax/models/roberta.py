"""RoBERTa: ``RobertaModel`` and ``RobertaForSequenceClassification``.

The body is BERT's; what differs is the position ids and the classification head.

* Positions follow transformers (and fairseq): a token that is not ``pad_token_id`` gets
  ``pad_token_id + (number of non-pad tokens up to and including it)``, a pad token gets
  ``pad_token_id``.  This is computed from ``input_ids``, exactly as transformers does, so
  left and right padding give the same positions to real tokens.
* The classifier reads the ``<s>`` token (the first real token; index 0 under right
  padding, as in transformers) through ``dense -> tanh -> out_proj``; there is no pooler.

Checkpoint tensors may carry the ``roberta.`` prefix or not.  Inference only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models.bert import BertModel, bert_config_dict, bert_config_from_hf
from mapjax.models.encoder_layers import (
    EncoderConfig,
    ParameterMap,
    bert_embedding_names,
    detect_prefix,
    first_real_token,
    linear_entries,
    load_from_hf,
)
from mapjax.models.layers import Linear
from mapjax.models.loading import export_parameters, register_architecture

__all__ = [
    "RobertaForSequenceClassification",
    "RobertaModel",
    "build_roberta_classifier",
    "build_roberta_model",
    "roberta_config_from_hf",
]


def roberta_config_from_hf(hf_config: Any, *, classifier: bool = False) -> EncoderConfig:
    """Translate a transformers ``RobertaConfig`` into an ``EncoderConfig`` (positions offset by the pad id)."""
    return bert_config_from_hf(hf_config, classifier=classifier, model_type="roberta")


class RobertaModel(BertModel):
    """The RoBERTa encoder: BERT's body with pad-offset positions; returns ``EncoderOutput``.

    ``pooler_output`` is ``None`` when the checkpoint has no pooler.
    """

    architecture = "RobertaModel"
    task_prefix = "roberta."


class RobertaClassificationHead(nnx.Module):
    """``out_proj(tanh(dense(x)))`` applied to the ``<s>`` token's hidden state."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs)

    def __call__(self, start_token: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(start_token)))


class RobertaForSequenceClassification(nnx.Module):
    """RoBERTa with the dense-tanh-out_proj head; returns float32 logits ``[batch, num_labels]``."""

    architecture = "RobertaForSequenceClassification"

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ValueError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
        self.config = config
        # transformers builds this encoder without a pooler; the head has its own dense layer.
        self.roberta = RobertaModel(config, add_pooling_layer=False, dtype=dtype, rngs=rngs)
        self.classifier = RobertaClassificationHead(config, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        hidden = self.roberta(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.classifier(first_real_token(hidden, jnp.asarray(attention_mask)))
        return logits.astype(jnp.float32)  # rewards are computed from these: keep float32

    def parameter_map(self, base_prefix: str = "roberta.") -> ParameterMap:
        """Every parameter: the encoder's under ``base_prefix``, then ``classifier.dense``/``classifier.out_proj``."""
        return [
            *self.roberta.parameter_map(base_prefix),
            *linear_entries("classifier.dense", self.classifier.dense),
            *linear_entries("classifier.out_proj", self.classifier.out_proj),
        ]

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Tensors as transformers' PyTorch ``RobertaForSequenceClassification`` names them (float32)."""
        return export_parameters(self.parameter_map())

    def hf_config_dict(self) -> dict[str, Any]:
        """``config.json`` content for transformers' ``RobertaForSequenceClassification``."""
        return bert_config_dict(self.config, self.architecture)


# ---------------------------------------------------------------------------------------
# Builders for mapjax.models.loading.
# ---------------------------------------------------------------------------------------

_PROBE = "embeddings.word_embeddings.weight"


@register_architecture("RobertaModel")
def build_roberta_model(hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any) -> RobertaModel:
    """Build a ``RobertaModel`` from a checkpoint; the pooler is optional, as in transformers."""
    config = roberta_config_from_hf(hf_config)
    prefix = detect_prefix(tensors, _PROBE, RobertaModel.task_prefix)
    has_pooler = f"{prefix}pooler.dense.weight" in tensors
    return load_from_hf(
        lambda: RobertaModel(config, add_pooling_layer=has_pooler, dtype=dtype, rngs=nnx.Rngs(0)),
        lambda model: model.parameter_map(prefix),
        tensors,
        dtype,
        drop=bert_embedding_names(prefix).buffers,
    )


@register_architecture("RobertaForSequenceClassification")
def build_roberta_classifier(
    hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any
) -> RobertaForSequenceClassification:
    """Build a ``RobertaForSequenceClassification`` from a checkpoint.

    A pooler some older checkpoints still carry is dropped: transformers' classifier has
    none and ignores it too.
    """
    config = roberta_config_from_hf(hf_config, classifier=True)
    prefix = detect_prefix(tensors, _PROBE, RobertaModel.task_prefix)
    unused_pooler = (f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias")
    return load_from_hf(
        lambda: RobertaForSequenceClassification(config, dtype=dtype, rngs=nnx.Rngs(0)),
        lambda model: model.parameter_map(prefix),
        tensors,
        dtype,
        drop=(*bert_embedding_names(prefix).buffers, *unused_pooler),
    )
