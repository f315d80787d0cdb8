"""Decoder reward models: ``LlamaForSequenceClassification``, ``MistralForSequenceClassification``,
``Qwen2ForSequenceClassification``, ``Phi3ForSequenceClassification`` and ``Gemma2ForSequenceClassification``.

transformers builds all of them from one generic class: the decoder body (``model.*`` tensors), a bias-free
linear ``score`` head over the hidden states, read at each row's last token. Here too: one class,
:class:`DecoderForSequenceClassification`, whose body is the matching causal LM's ``hidden_states`` (built
without its output head) and whose config wraps the causal LM's (:class:`DecoderClassifierConfig`).

The last token: transformers takes the rightmost token that is not ``pad_token_id`` (so left and right padding
both work, and a row ending in a pad-id token, e.g. an EOS used as pad, is read before it). mapjax takes the
rightmost token that is real in ``attention_mask`` and not ``pad_token_id``: the same token whenever
transformers' rule is defined, and still the right one when the config has no pad id (transformers then reads
the last column, which is padding in a right-padded batch).

Output: float32 scores ``[batch, num_labels]`` (rewards are computed from them). A head with ``num_labels = k``
and ``id2label`` names is a multi-objective reward model: one forward pass gives all k named scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import HFParameter, PretrainedModel, register_model
from mapjax.models.gemma import Gemma2ForCausalLM
from mapjax.models.llama import LlamaForCausalLM
from mapjax.models.mistral import MistralForCausalLM
from mapjax.models.phi3 import Phi3ForCausalLM
from mapjax.models.qwen2 import Qwen2ForCausalLM

__all__ = ["DecoderClassifierConfig", "DecoderForSequenceClassification", "Gemma2ForSequenceClassification",
           "LlamaForSequenceClassification", "MistralForSequenceClassification", "Phi3ForSequenceClassification",
           "Qwen2ForSequenceClassification", "label_names"]


def label_names(hf_config: Any, num_labels: int) -> tuple[tuple[int, str], ...]:
    """``((index, name), ...)`` from the config's ``id2label``; transformers' ``LABEL_i`` for missing names."""
    id2label = {int(index): str(name) for index, name in (getattr(hf_config, "id2label", None) or {}).items()}
    return tuple((index, id2label.get(index, f"LABEL_{index}")) for index in range(num_labels))


@dataclasses.dataclass(frozen=True)
class DecoderClassifierConfig:
    """A decoder classifier's config: the decoder's own (``decoder``) plus the head.

    Attributes:
        decoder: the causal LM's config (``LlamaConfig``, ``Qwen2Config``, ``Gemma2Config``, ...).
        num_labels: outputs of the ``score`` head (1 for a scalar reward model, k for k objectives).
        id2label: ``((index, name), ...)``, one per output: the names of a multi-objective model's scores.
        problem_type: transformers' ``problem_type`` (e.g. ``"regression"``), kept for export.
    """

    decoder: Any
    num_labels: int
    id2label: tuple[tuple[int, str], ...] = ()
    problem_type: str | None = None

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ModelError(f"a sequence classifier needs num_labels >= 1; the config has {self.num_labels}")
        if self.id2label and len(self.id2label) != self.num_labels:
            raise ModelError(f"id2label names {len(self.id2label)} labels but num_labels is {self.num_labels}")

    @classmethod
    def from_hf(cls, hf_config: Any, decoder: Any) -> "DecoderClassifierConfig":
        num_labels = int(getattr(hf_config, "num_labels", 0) or 0)
        return cls(decoder=decoder, num_labels=num_labels, id2label=label_names(hf_config, num_labels),
                   problem_type=getattr(hf_config, "problem_type", None))

    @property
    def labels(self) -> tuple[str, ...]:
        """The output names in order (``LABEL_i`` where the config names none)."""
        names = dict(self.id2label)
        return tuple(names.get(index, f"LABEL_{index}") for index in range(self.num_labels))

    @property
    def pad_token_id(self) -> int | None:
        return self.decoder.pad_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.decoder.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.decoder.eos_token_id

    @property
    def max_positions(self) -> int:
        return self.decoder.max_positions

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = self.decoder.to_hf_dict(architecture)
        values["id2label"] = {str(index): name for index, name in enumerate(self.labels)}
        values["label2id"] = {name: index for index, name in enumerate(self.labels)}
        if self.problem_type is not None:
            values["problem_type"] = self.problem_type
        return values


class DecoderForSequenceClassification(PretrainedModel, nnx.Module):
    """A decoder body plus a linear ``score`` head read at each row's last real token.

    ``model(input_ids, attention_mask) -> float32 [batch, num_labels]``. Subclasses name the causal LM class
    whose body they use (``backbone_class``).
    """

    backbone_class: ClassVar[type[LlamaForCausalLM]]

    def __init__(self, config: DecoderClassifierConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        # The body without an output head: a tied head is never built, and the classifier never calls it.
        body_config = dataclasses.replace(config.decoder, tie_word_embeddings=True)
        self.backbone = self.backbone_class(body_config, dtype=dtype, rngs=rngs)
        self.score = layers.Linear(config.decoder.hidden_size, config.num_labels, use_bias=False, dtype=dtype,
                                   rngs=rngs, axes=(layers.EMBED, layers.LABELS))

    def last_token_index(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """``[batch]`` index of each row's rightmost real, non-pad token."""
        real = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask != 0
        if self.config.pad_token_id is not None:
            real = real & (input_ids != self.config.pad_token_id)
        return layers.last_token_index(real.astype(jnp.int32))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Scores ``[batch, num_labels]`` in float32 for int ``input_ids [batch, seq]`` (1 = real token in
        ``attention_mask``, left or right padding)."""
        hidden, _ = self.backbone.hidden_states(input_ids, attention_mask)
        last = self.last_token_index(input_ids, attention_mask)
        return self.score(hidden[jnp.arange(input_ids.shape[0]), last], float32_output=True)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield from self.backbone.hf_parameters(prefix)
        yield f"{prefix}score.weight", self.score.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> DecoderClassifierConfig:
        return DecoderClassifierConfig.from_hf(hf_config, cls.backbone_class.config_from_hf(hf_config))

    @classmethod
    def prepare_checkpoint(cls, config: DecoderClassifierConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        tensors.pop("lm_head.weight", None)   # a classifier saved with its causal LM's head still attached
        return {}


@register_model
class LlamaForSequenceClassification(DecoderForSequenceClassification):
    """Llama reward models (Skywork-Reward-Llama-3.1, ArmoRM's body, ...)."""

    architecture = "LlamaForSequenceClassification"
    backbone_class = LlamaForCausalLM


@register_model
class MistralForSequenceClassification(DecoderForSequenceClassification):
    """Mistral reward models."""

    architecture = "MistralForSequenceClassification"
    backbone_class = MistralForCausalLM


@register_model
class Qwen2ForSequenceClassification(DecoderForSequenceClassification):
    """Qwen2 / Qwen2.5 reward models (Skywork-Reward-V2-Qwen, ...)."""

    architecture = "Qwen2ForSequenceClassification"
    backbone_class = Qwen2ForCausalLM


@register_model
class Phi3ForSequenceClassification(DecoderForSequenceClassification):
    """Phi-3 reward models."""

    architecture = "Phi3ForSequenceClassification"
    backbone_class = Phi3ForCausalLM


@register_model
class Gemma2ForSequenceClassification(DecoderForSequenceClassification):
    """Gemma 2 reward models (Skywork-Reward-Gemma-2-27B, ...). The final-logit soft-cap belongs to the language
    model head and does not apply to the scores, as in transformers."""

    architecture = "Gemma2ForSequenceClassification"
    backbone_class = Gemma2ForCausalLM
