"""GGUF (llama.cpp) files: a Llama-architecture model and its tokenizer from one ``.gguf`` file.

The tensors are renamed to transformers' ``LlamaForCausalLM`` names, dequantised to float32 and loaded through
the same name map as a safetensors checkpoint.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mapjax.errors import ModelError
from mapjax.models.errors import CheckpointError, ModelNotFoundError, UnexpectedTensorsError
from mapjax.models.layers import RopeSpec
from mapjax.models.llama import LlamaConfig, LlamaForCausalLM

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which interleaves the two rotary halves of each head's rows.

    The converter maps rows ``[head, half, i]`` to ``[head, i, half]`` so that GGML's
    rope (adjacent pairs) matches HF's rope (split halves); this is the inverse.
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_field(reader: Any, key: str, default: Any = None, *, required: bool = False, path: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise CheckpointError(f"{path}: GGUF metadata is missing {key!r}")
        return default
    return field.contents()


def read_gguf_llama(path: Any) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """``(LlamaConfig, HF-named float32 tensors)`` from a Llama-architecture GGUF file."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    architecture = _gguf_field(reader, "general.architecture", required=True, path=path)
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: ['llama']")
    field = lambda name, default=None, required=False: _gguf_field(  # noqa: E731
        reader, f"llama.{name}", default, required=required, path=path)
    hidden = int(field("embedding_length", required=True))
    num_heads = int(field("attention.head_count", required=True))
    num_kv_heads = int(field("attention.head_count_kv", num_heads))
    head_dim = int(field("attention.key_length", hidden // num_heads))
    max_positions = int(field("context_length", 2048))
    scaling_type = field("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise CheckpointError(f"{path}: GGUF rope scaling type {scaling_type!r} is not supported "
                              "(supported: none, linear)")

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name == "rope_freqs.weight":
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (Llama 3.1 rope scaling baked into GGUF) "
                                  "is not supported; load the original HF checkpoint with from_pretrained")
        if name in _GGUF_GLOBAL_NAMES:
            hf_name = _GGUF_GLOBAL_NAMES[name]
        else:
            parts = name.split(".", 2)
            if parts[0] != "blk" or len(parts) != 3 or parts[2] not in _GGUF_LAYER_NAMES:
                raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r}")
            hf_name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # GGUF lists dims fastest-first
        if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
            array = _unpermute_rotary_rows(array, num_heads)
        elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
            array = _unpermute_rotary_rows(array, num_kv_heads)
        tensors[hf_name] = array

    vocab_size = int(field("vocab_size", 0)) or tensors["model.embed_tokens.weight"].shape[0]
    rope_type = "linear" if scaling_type == "linear" else "default"
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(field("feed_forward_length", required=True)),
        num_hidden_layers=int(field("block_count", required=True)),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=RopeSpec(rotary_dim=int(field("rope.dimension_count", head_dim)),
                      theta=float(field("rope.freq_base", 10000.0)), rope_type=rope_type,
                      factor=float(field("rope.scaling.factor", 1.0) or 1.0),
                      max_position_embeddings=max_positions),
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        tie_word_embeddings="lm_head.weight" not in tensors,
        pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    return config, tensors


def _tokenizer_from_gguf_vocab(path: Any) -> Any:
    """Byte-level BPE tokenizer built from the GGUF vocab/merges (fallback when transformers cannot)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(path))
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: cannot build a tokenizer for GGUF tokenizer model {kind!r} without "
                         "transformers' GGUF support (only byte-level BPE 'gpt2' is built by hand)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(merge.split(" ", 1)) for merge in _gguf_field(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = lambda key: (None if _gguf_field(reader, key) is None  # noqa: E731
                           else tokens[int(_gguf_field(reader, key))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special("tokenizer.ggml.bos_token_id"),
                                   eos_token=special("tokenizer.ggml.eos_token_id"),
                                   unk_token=special("tokenizer.ggml.unknown_token_id"),
                                   pad_token=special("tokenizer.ggml.padding_token_id"),
                                   chat_template=_gguf_field(reader, "tokenizer.chat_template"))


def tokenizer_from_gguf(path: Any) -> Any:
    """The tokenizer stored in a GGUF file: transformers' GGUF support, else built from the vocab (with a warning
    that names why transformers could not: the hand-built one has no normaliser or added-token handling)."""
    path = Path(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:  # noqa: BLE001 - any failure there (old transformers, no tokenizers backend) falls back
        warnings.warn(f"{path}: transformers could not load the GGUF tokenizer ({type(error).__name__}: {error}); "
                      "using a byte-level BPE tokenizer built from the file's vocab and merges instead, without "
                      "transformers' normaliser and added-token handling; compare its output before relying on it",
                      UserWarning, stacklevel=2)
        return _tokenizer_from_gguf_vocab(path)


def from_gguf(path: str | os.PathLike, dtype: Any = jnp.float32, *, with_tokenizer: bool = True,
              mesh: Any = None) -> tuple[LlamaForCausalLM, Any]:
    """Load a Llama-architecture GGUF file; returns ``(model, tokenizer)`` (``tokenizer`` is ``None`` when
    ``with_tokenizer=False``).

    Quantised tensors are dequantised to float32 with ``gguf.quants.dequantize``; see ``read_gguf_llama`` for
    the name map and the q/k row permutation. ``mesh``: load each weight straight onto a device mesh (see
    ``mapjax.models.from_pretrained``).
    """
    from mapjax.dtypes import resolve_dtype
    from mapjax.sharding import as_mesh, loading_onto

    dtype = resolve_dtype(dtype, error=ModelError)
    mesh = as_mesh(mesh)
    if not Path(path).is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    config, tensors = read_gguf_llama(path)
    with loading_onto(mesh):
        model = LlamaForCausalLM.from_hf_tensors(config, tensors, dtype)
    if tensors:
        raise UnexpectedTensorsError(f"{path}: unexpected tensors {sorted(tensors)[:10]}")
    return model, (tokenizer_from_gguf(path) if with_tokenizer else None)
