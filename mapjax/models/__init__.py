"""Flax NNX ports of Hugging Face models, with loaders and checkpoints.

>>> from mapjax.models import from_pretrained
>>> model = from_pretrained("path/to/hf_folder")          # config.json + model.safetensors
>>> logits = model(input_ids, attention_mask).logits      # [batch, seq, vocab]

Layout: ``base`` (the HF name map, (de)serialisation, random init, the ``CausalLM`` protocol), ``layers``
(shared layers, the KV cache, activations), ``padding`` (length buckets and padded batches), one module per
architecture, ``loading`` (safetensors folders and export), ``gguf`` (llama.cpp files), ``checkpoint`` (orbax),
``registry`` (architecture name -> builder), ``errors``.
"""

from mapjax.models.base import CausalLM, CausalLMOutput, PretrainedModel, register_model
from mapjax.models.checkpoint import restore_checkpoint, save_checkpoint
from mapjax.models.errors import (
                                  CheckpointError,
                                  MissingConfigError,
                                  MissingTensorError,
                                  ModelNotFoundError,
                                  TensorShapeError,
                                  UnexpectedTensorsError,
                                  UnknownArchitectureError,
)
from mapjax.models.gguf import from_gguf
from mapjax.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from mapjax.models.layers import KVCache
from mapjax.models.llama import LlamaConfig, LlamaForCausalLM
from mapjax.models.loading import export_pretrained, from_pretrained, to_hf_tensors
from mapjax.models.opt import OPTConfig, OPTForCausalLM
from mapjax.models.registry import model_class, register_architecture, supported_architectures

__all__ = [
    "CausalLM", "CausalLMOutput", "CheckpointError", "GPT2Config", "GPT2ForSequenceClassification",
    "GPT2LMHeadModel", "KVCache", "LlamaConfig", "LlamaForCausalLM", "MissingConfigError", "MissingTensorError",
    "ModelNotFoundError", "OPTConfig", "model_class", "OPTForCausalLM", "PretrainedModel", "TensorShapeError",
    "UnexpectedTensorsError", "UnknownArchitectureError", "export_pretrained", "from_gguf", "from_pretrained",
    "register_architecture", "register_model", "restore_checkpoint", "save_checkpoint",
    "supported_architectures", "to_hf_tensors",
]
