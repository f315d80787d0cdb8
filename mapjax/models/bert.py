"""BERT: ``BertModel`` (with its pooler) and ``BertForSequenceClassification``.

Loads Hugging Face checkpoints whose ``config.json`` names ``"BertModel"`` or
``"BertForSequenceClassification"`` (e.g. sentence-transformers/all-MiniLM-L6-v2,
unitary/toxic-bert) through ``mapjax.models.loading.from_pretrained``; tensor names are
those of transformers' PyTorch classes, with or without the ``bert.`` prefix.

Inference only (no dropout).  Differences from transformers, both about padding:
positions are counted over real tokens, and the pooler/classifier read the first real
token rather than index 0.  Under right padding (BERT tokenizers' default) both are
exactly what transformers does; under left padding they keep results unchanged where
transformers would shift them.
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
    POSITIONS_AFTER_PADDING_IDX,
    POSITIONS_FROM_MASK,
    EncoderConfig,
    EncoderOutput,
    EncoderStack,
    bert_block_names,
    bert_embedding_names,
    first_real_token,
    label_pairs,
    linear_entries,
    mean_pool,
    prepare_inputs,
    source_config_json,
)
from mapjax.models.layers import EMBED, LABELS, Linear

__all__ = [
    "BertForSequenceClassification",
    "BertModel",
    "bert_config_from_hf",
    "mean_pool",
]


def bert_config_from_hf(hf_config: Any, *, classifier: bool = False, model_type: str = "bert") -> EncoderConfig:
    """Translate a transformers ``BertConfig``/``RobertaConfig`` into an ``EncoderConfig``.

    Raises ``ModelError`` for variants this port does not implement (relative position
    embeddings, decoder/cross-attention configurations).
    """
    position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ModelError(
            f"position_embedding_type={position_type!r} is not supported; only 'absolute' position embeddings are"
        )
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ModelError("decoder/cross-attention BERT configurations are not supported; this port is encoder-only")
    pad_token_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    return EncoderConfig(
        model_type=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        layer_norm_eps=float(hf_config.layer_norm_eps),
        hidden_act=hf_config.hidden_act,
        pad_token_id=int(pad_token_id),
        position_scheme=POSITIONS_AFTER_PADDING_IDX if model_type == "roberta" else POSITIONS_FROM_MASK,
        num_labels=int(hf_config.num_labels) if classifier else 0,
        id2label=label_pairs(hf_config) if classifier else (),
        source_config_json=source_config_json(hf_config),
    )


@register_model
class BertModel(PretrainedModel, nnx.Module):
    """The BERT encoder: embeddings, post-LN blocks and (optionally) the tanh pooler.

    Call ``model(input_ids, attention_mask, token_type_ids=None, position_ids=None)`` with
    integer ``[batch, seq]`` arrays; returns ``EncoderOutput(last_hidden_state,
    pooler_output)``.  ``attention_mask=None`` treats every token as real.
    """

    architecture = "BertModel"
    model_type = "bert"
    task_prefix = "bert."  # the prefix task models (and some checkpoints) put on these tensors

    def __init__(
        self,
        config: EncoderConfig,
        *,
        add_pooling_layer: bool = True,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.encoder = EncoderStack(config, dtype=dtype, rngs=rngs)
        self.pooler = (
            Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, None))
            if add_pooling_layer else None
        )

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
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = None
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(first_real_token(hidden, attention_mask)))
        return EncoderOutput(last_hidden_state=hidden, pooler_output=pooled)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """``(hf_name, parameter, layout)`` for every parameter, names prefixed by ``prefix``."""
        yield from self.encoder.hf_parameters(
            bert_embedding_names(prefix), lambda index: bert_block_names(prefix, index)
        )
        if self.pooler is not None:
            yield from linear_entries(f"{prefix}pooler.dense", self.pooler)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> EncoderConfig:
        return bert_config_from_hf(hf_config, model_type=cls.model_type)

    @classmethod
    def prepare_checkpoint(cls, config: EncoderConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accept the encoder's tensors with or without the task models' prefix; the pooler is optional, as in
        transformers."""
        rename_in_place(tensors, strip_prefix(tensors, cls.task_prefix))
        for buffer in bert_embedding_names("").buffers:
            tensors.pop(buffer, None)
        return {"add_pooling_layer": "pooler.dense.weight" in tensors}


@register_model
class BertForSequenceClassification(PretrainedModel, nnx.Module):
    """BERT with the pooler and a linear classifier; returns float32 logits ``[batch, num_labels]``."""

    architecture = "BertForSequenceClassification"

    def __init__(self, config: EncoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if config.num_labels < 1:
            raise ModelError(f"a sequence classifier needs num_labels >= 1; the config has {config.num_labels}")
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True, dtype=dtype, rngs=rngs)
        self.classifier = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs, axes=(EMBED, LABELS))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        # Logits leave the model in float32: rewards are computed from them.
        return self.classifier(pooled).astype(jnp.float32)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """Every parameter: the encoder's under ``bert.``, then ``classifier.*``."""
        yield from self.bert.hf_parameters(f"{prefix}{BertModel.task_prefix}")
        yield from linear_entries(f"{prefix}classifier", self.classifier)

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> EncoderConfig:
        return bert_config_from_hf(hf_config, classifier=True)

    @classmethod
    def prepare_checkpoint(cls, config: EncoderConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accept the encoder's tensors with or without ``bert.``."""
        rename_in_place(tensors, add_prefix_if_missing(tensors, BertModel.task_prefix, keep=("classifier",)))
        for buffer in bert_embedding_names(BertModel.task_prefix).buffers:
            tensors.pop(buffer, None)
        return {}
