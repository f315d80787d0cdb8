"""Flax NNX ports of Hugging Face models, with loaders and checkpoints.

>>> from mapjax.models import from_pretrained
>>> model = from_pretrained("path/to/hf_folder")          # config.json + model.safetensors
>>> logits = model(input_ids, attention_mask).logits      # [batch, seq, vocab]

Layout: ``base`` (the HF name map, (de)serialisation, random init, the ``CausalLM`` protocol), ``layers``
(a package of shared layers, one module per concern: logical axes, linear, norms, activations, rope, the KV cache,
attention), ``padding`` (length buckets and padded batches), one module per
architecture, ``loading`` (safetensors folders and export), ``gguf`` (llama.cpp files), ``checkpoint`` (orbax),
``registry`` (architecture name -> builder), ``errors``.
"""

from mapjax.models.base import CausalLM, CausalLMOutput, PretrainedModel, register_model
from mapjax.models.checkpoint import restore_checkpoint, save_checkpoint
from mapjax.models.deberta_v2 import DebertaV2Config, DebertaV2ForSequenceClassification
from mapjax.models.errors import (
                                  CheckpointError,
                                  MissingConfigError,
                                  MissingTensorError,
                                  ModelNotFoundError,
                                  TensorShapeError,
                                  UnexpectedTensorsError,
                                  UnknownArchitectureError,
)
from mapjax.models.gemma import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from mapjax.models.gguf import from_gguf
from mapjax.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from mapjax.models.layers import KVCache
from mapjax.models.llama import LlamaConfig, LlamaForCausalLM
from mapjax.models.loading import export_pretrained, from_pretrained, to_hf_tensors
from mapjax.models.mistral import MistralConfig, MistralForCausalLM
from mapjax.models.opt import OPTConfig, OPTForCausalLM
from mapjax.models.phi3 import Phi3Config, Phi3ForCausalLM
from mapjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from mapjax.models.registry import model_class, register_architecture, supported_architectures
from mapjax.models.sequence_classification import (
                                  DecoderClassifierConfig,
                                  DecoderForSequenceClassification,
                                  Gemma2ForSequenceClassification,
                                  LlamaForSequenceClassification,
                                  MistralForSequenceClassification,
                                  Phi3ForSequenceClassification,
                                  Qwen2ForSequenceClassification,
)

__all__ = [
    "CausalLM", "CausalLMOutput", "CheckpointError", "DebertaV2Config", "DebertaV2ForSequenceClassification",
    "DecoderClassifierConfig", "DecoderForSequenceClassification", "GPT2Config", "GPT2ForSequenceClassification",
    "GPT2LMHeadModel", "Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma3ForCausalLM",
    "Gemma3TextConfig", "KVCache", "LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification",
    "MissingConfigError", "MissingTensorError", "MistralConfig", "MistralForCausalLM",
    "MistralForSequenceClassification", "ModelNotFoundError", "OPTConfig", "model_class", "OPTForCausalLM",
    "Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification", "PretrainedModel", "Qwen2Config",
    "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "TensorShapeError",
    "UnexpectedTensorsError", "UnknownArchitectureError", "export_pretrained", "from_gguf", "from_pretrained",
    "register_architecture", "register_model", "restore_checkpoint", "save_checkpoint",
    "supported_architectures", "to_hf_tensors",
]
