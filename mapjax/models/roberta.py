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

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.base import HFParameter, PretrainedModel, add_prefix_if_missing, register_model, rename_in_place
from mapjax.models.bert import BertModel, bert_config_from_hf
from mapjax.models.encoder_layers import EncoderConfig, bert_embedding_names, first_real_token, linear_entries
from mapjax.models.layers import EMBED, LABELS, Linear

__all__ = [
    "RobertaForSequenceClassification",
    "RobertaModel",
    "roberta_config_from_hf",
]


def roberta_config_from_hf(hf_config: Any, *, classifier: bool = False) -> EncoderConfig:
    """Translate a transformers ``RobertaConfig`` into an ``EncoderConfig`` (positions offset by the pad id)."""
    return bert_config_from_hf(hf_config, classifier=classifier, model_type="roberta")


@register_model
class RobertaModel(BertModel):
    """The RoBERTa encoder: BERT's body with pad-offset positions; returns ``EncoderOutput``.

    ``pooler_output`` is ``None`` when the checkpoint has no pooler.
    """

    architecture = "RobertaModel"
    model_type = "roberta"
    task_prefix = "roberta."


class RobertaClassificationHead(nnx.Module):
    """``out_proj(tanh(dense(x)))`` applied to the ``<s>`` token's hidden state."""

    def __init__(self, config: EncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, None))
        self.out_proj = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs, axes=(EMBED, LABELS))

    def __call__(self, start_token: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(start_token)))


@register_model
class RobertaForSequenceClassification(PretrainedModel, nnx.Module):
    """RoBERTa with the dense-tanh-out_proj head; returns float32 logits ``[batch, num_labels]``."""

    architecture = "RobertaForSequenceClassification"

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ModelError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
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

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """Every parameter: the encoder's under ``roberta.``, then ``classifier.dense``/``classifier.out_proj``."""
        yield from self.roberta.hf_parameters(f"{prefix}{RobertaModel.task_prefix}")
        yield from linear_entries(f"{prefix}classifier.dense", self.classifier.dense)
        yield from linear_entries(f"{prefix}classifier.out_proj", self.classifier.out_proj)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> EncoderConfig:
        return roberta_config_from_hf(hf_config, classifier=True)

    @classmethod
    def prepare_checkpoint(cls, config: EncoderConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accept the encoder's tensors with or without ``roberta.``; a pooler some older checkpoints still
        carry is dropped (transformers' classifier has none and ignores it too)."""
        prefix = RobertaModel.task_prefix
        rename_in_place(tensors, add_prefix_if_missing(tensors, prefix, keep=("classifier",)))
        for unused in (*bert_embedding_names(prefix).buffers, f"{prefix}pooler.dense.weight",
                       f"{prefix}pooler.dense.bias"):
            tensors.pop(unused, None)
        return {}
