"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``) in Flax NNX: a configuration of Llama with biased q/k/v projections.

Qwen2 differs from Llama in three places, all config (the layers and the forward are Llama's): q/k/v projections carry a bias (``o_proj`` does not),
the sliding window, when ``use_sliding_window`` is on, applies to layers ``max_window_layers`` and above
(transformers writes that out as ``layer_types``), and the rope base is large (1e6). Qwen2.5 checkpoints use
the same class; their long-context variants use ``yarn`` rope scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mapjax.models.base import register_model
from mapjax.models.llama import FULL_ATTENTION, LlamaForCausalLM
from mapjax.models.mistral import MistralConfig

__all__ = ["Qwen2Config", "Qwen2ForCausalLM"]


@dataclasses.dataclass(frozen=True)
class Qwen2Config(MistralConfig):
    """Hyperparameters of a Qwen2 model (names follow ``transformers.Qwen2Config``); ``attention_bias`` is the
    q/k/v bias, on by default."""

    attention_bias: bool = True
    rms_norm_eps: float = 1e-6

    model_type: ClassVar[str] = "qwen2"

    @property
    def output_projection_bias(self) -> bool:
        """Qwen2's ``o_proj`` has no bias whatever ``attention_bias`` says (that one is the q/k/v bias)."""
        return False

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = super().to_hf_dict(architecture)
        for name in ("attention_bias", "mlp_bias"):
            values.pop(name)   # fixed by the Qwen2 architecture; not fields of its config
        kinds = self.layer_kinds()
        sliding = [index for index, kind in enumerate(kinds) if kind != FULL_ATTENTION]
        values["use_sliding_window"] = self.sliding_window is not None
        values["max_window_layers"] = sliding[0] if sliding else self.num_hidden_layers
        values["layer_types"] = list(kinds)
        return values


@register_model
class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 language model: Llama's, built from a :class:`Qwen2Config`."""

    architecture = "Qwen2ForCausalLM"
    config_class = Qwen2Config
