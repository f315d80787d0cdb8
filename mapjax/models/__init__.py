"""Flax NNX ports of Hugging Face models, with loaders and checkpoints.

>>> from mapjax.models import from_pretrained
>>> model = from_pretrained("path/to/hf_folder")          # config.json + model.safetensors
>>> logits = model(input_ids, attention_mask)             # [batch, seq, vocab]
"""

from mapjax.models.layers import KVCache
from mapjax.models.loading import (CheckpointError, MissingConfigError, MissingTensorError, TensorShapeError,
                                   UnexpectedTensorsError, UnknownArchitectureError, export_pretrained,
                                   from_gguf, from_pretrained, register_architecture, supported_architectures,
                                   to_hf_tensors)
from mapjax.models.checkpoint import restore_checkpoint, save_checkpoint
from mapjax.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from mapjax.models.llama import LlamaConfig, LlamaForCausalLM
from mapjax.models.opt import OPTConfig, OPTForCausalLM

__all__ = [
    "CheckpointError", "GPT2Config", "GPT2ForSequenceClassification", "GPT2LMHeadModel", "KVCache",
    "LlamaConfig", "LlamaForCausalLM", "MissingConfigError", "MissingTensorError", "OPTConfig", "OPTForCausalLM",
    "TensorShapeError", "UnexpectedTensorsError", "UnknownArchitectureError", "export_pretrained", "from_gguf",
    "from_pretrained", "register_architecture", "restore_checkpoint", "save_checkpoint",
    "supported_architectures", "to_hf_tensors",
]
