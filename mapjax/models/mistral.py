"""Mistral (``MistralForCausalLM``) in Flax NNX: a configuration of Llama whose layers may attend through a sliding
window.

:class:`MistralConfig` is a ``LlamaConfig`` with ``sliding_window`` and per-layer ``layer_types``; the layers,
the forward and the cache are Llama's (:mod:`mapjax.models.llama`), which honour the window in the full forward
and in cached sampling alike. Qwen2, Phi-3 and Gemma 2/3 configs derive from :class:`MistralConfig` for the same
fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mapjax.errors import ModelError
from mapjax.models.base import register_model
from mapjax.models.llama import (
    FULL_ATTENTION,
    LAYER_TYPES,
    SLIDING_ATTENTION,
    LlamaConfig,
    LlamaForCausalLM,
    layer_sliding_window,
)

__all__ = ["MistralConfig", "MistralForCausalLM"]


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """A ``LlamaConfig`` plus the attention span of each layer.

    Attributes:
        sliding_window: keys a query sees in a sliding layer (itself included); ``None``: no layer slides.
        layer_types: ``"full_attention"`` / ``"sliding_attention"`` per layer; empty means every layer slides
            (Mistral) when ``sliding_window`` is set.
    """

    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    model_type: ClassVar[str] = "mistral"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_attention_spans()

    def _check_attention_spans(self) -> None:
        # transformers configs hold a list; the config must stay hashable (it is static under jit).
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ModelError(f"sliding_window must be a positive number of tokens or None, got "
                             f"{self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} "
                                 "layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ModelError(f"unsupported layer types {unknown} in layer_types; supported: {list(LAYER_TYPES)}")

    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's attention span as transformers names it (what ``layer_types`` means in effect)."""
        return tuple(FULL_ATTENTION if layer_sliding_window(self, index) is None else SLIDING_ATTENTION
                     for index in range(self.num_hidden_layers))

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        values["layer_types"] = list(self.layer_types)
        if not self.layer_types:
            values.pop("layer_types")   # Mistral's config has no per-layer types (it warns about them)
        return values


@register_model
class MistralForCausalLM(LlamaForCausalLM):
    """Mistral language model: Llama's, built from a :class:`MistralConfig`."""

    architecture = "MistralForCausalLM"
    config_class = MistralConfig
