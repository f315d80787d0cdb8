"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``) in Flax NNX: Mistral's layer with biased q/k/v projections.

Qwen2 differs from Llama in three places, all config: q/k/v projections carry a bias (``o_proj`` does not),
the sliding window, when ``use_sliding_window`` is on, applies to layers ``max_window_layers`` and above
(transformers writes that out as ``layer_types``), and the rope base is large (1e6). Qwen2.5 checkpoints use
the same class; their long-context variants use ``yarn`` rope scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from mapjax.models import layers
from mapjax.models.base import register_model
from mapjax.models.mistral import FULL_ATTENTION, MistralConfig, MistralDecoderLayer, MistralForCausalLM

__all__ = ["Qwen2Config", "Qwen2DecoderLayer", "Qwen2ForCausalLM"]


@dataclasses.dataclass(frozen=True)
class Qwen2Config(MistralConfig):
    """Hyperparameters of a Qwen2 model (names follow ``transformers.Qwen2Config``); ``attention_bias`` is the
    q/k/v bias, on by default."""

    attention_bias: bool = True
    rms_norm_eps: float = 1e-6

    model_type: ClassVar[str] = "qwen2"

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


class Qwen2DecoderLayer(MistralDecoderLayer):
    """Mistral's layer with q/k/v biases and a bias-free output projection."""

    def __init__(self, config: Qwen2Config, layer_index: int, *, dtype: Any, rngs: nnx.Rngs):
        super().__init__(config, layer_index, dtype=dtype, rngs=rngs)
        self.o_proj = layers.Linear(self.num_heads * self.head_dim, config.hidden_size, use_bias=False,
                                    dtype=dtype, rngs=rngs, axes=(layers.HEADS, layers.EMBED))


@register_model
class Qwen2ForCausalLM(MistralForCausalLM):
    """Qwen2 / Qwen2.5 language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits, cache)``."""

    architecture = "Qwen2ForCausalLM"
    layer_class = Qwen2DecoderLayer

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> Qwen2Config:
        return Qwen2Config.from_hf(hf_config)
