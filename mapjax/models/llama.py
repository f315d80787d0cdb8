"""Llama (``LlamaForCausalLM``) in Flax NNX: RMSNorm, rotary positions, grouped-query attention.

Covers SmolLM2, TinyLlama, Llama 2/3(.1/.2) and other checkpoints with the same
tensor names; rope scaling types ``default``, ``linear``, ``dynamic``, ``llama3``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models import layers
from mapjax.models.layers import KVCache, RopeSpec
from mapjax.models.loading import (Layout, build_abstract, check_fully_loaded, export_parameters, load_parameters,
                                   register_architecture)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model (names follow ``transformers.LlamaConfig``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec(rotary_dim=128)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "LlamaConfig":
        """Read the fields this port uses from a ``transformers.LlamaConfig``."""
        skip = {"rope", "head_dim", "num_key_value_heads"}
        values = {field.name: getattr(hf_config, field.name) for field in dataclasses.fields(cls)
                  if field.name not in skip and getattr(hf_config, field.name, None) is not None}
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        values["head_dim"] = int(head_dim)
        values["num_key_value_heads"] = int(getattr(hf_config, "num_key_value_heads", None)
                                            or hf_config.num_attention_heads)
        values["rope"] = layers.rope_spec_from_hf_config(hf_config, head_dim)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(name), list):
                values[name] = values[name][0]
        return cls(**values)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("rope")
        values["rope_parameters"] = layers.rope_spec_to_hf(self.rope)
        # transformers v4 reads these two; v5 reads rope_parameters.
        values["rope_theta"] = self.rope.theta
        values["rope_scaling"] = (None if self.rope.rope_type == "default"
                                  else dict(layers.rope_spec_to_hf(self.rope), type=self.rope.rope_type))
        values.update(model_type="llama", architectures=[architecture])
        return values


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.rope = config.rope
        self.activation_name = config.hidden_act
        attn_bias, mlp_bias = config.attention_bias, config.mlp_bias
        self.q_proj = layers.Linear(hidden, self.num_heads * head_dim, use_bias=attn_bias, dtype=dtype, rngs=rngs)
        self.k_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs)
        self.v_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs)
        self.o_proj = layers.Linear(self.num_heads * head_dim, hidden, use_bias=attn_bias, dtype=dtype, rngs=rngs)
        self.gate_proj = layers.Linear(hidden, config.intermediate_size, use_bias=mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = layers.Linear(hidden, config.intermediate_size, use_bias=mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = layers.Linear(config.intermediate_size, hidden, use_bias=mlp_bias, dtype=dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(hidden, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = layers.RMSNorm(hidden, eps=config.rms_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, context: layers.AttentionContext, cos_sin: tuple[jax.Array, jax.Array],
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        batch, seq, _ = x.shape
        normed = self.input_layernorm(x)
        cos, sin = cos_sin
        query = layers.apply_rotary(self.q_proj(normed).reshape(batch, seq, self.num_heads, self.head_dim),
                                    cos, sin)
        key = layers.apply_rotary(self.k_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim),
                                  cos, sin)
        value = self.v_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        attended, layer_cache = layers.attend_with_cache(query, key, value, context, layer_cache,
                                                         self.head_dim ** -0.5)
        x = x + self.o_proj(attended.reshape(batch, seq, -1))
        normed = self.post_attention_layernorm(x)
        gated = layers.activation(self.activation_name)(self.gate_proj(normed)) * self.up_proj(normed)
        return x + self.down_proj(gated), layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[tuple[str, nnx.Variable, Layout]]:
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(self, name)
                yield f"{prefix}{group}.{name}.weight", linear.weight, "linear"
                if linear.bias is not None:
                    yield f"{prefix}{group}.{name}.bias", linear.bias, "linear"
        yield f"{prefix}input_layernorm.weight", self.input_layernorm.weight, "linear"
        yield f"{prefix}post_attention_layernorm.weight", self.post_attention_layernorm.weight, "linear"


class LlamaForCausalLM(nnx.Module):
    """Llama language model: ``model(input_ids, attention_mask) -> logits [b, s, vocab]``.

    With ``cache=`` it returns ``(logits, new_cache)``; see ``layers.KVCache``.
    """

    architecture = "LlamaForCausalLM"

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      rngs=rngs))

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        return KVCache.create(num_layers=self.config.num_hidden_layers, batch=batch, max_len=max_len,
                              kv_heads=self.config.num_key_value_heads, head_dim=self.config.head_dim,
                              dtype=dtype or self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None):
        """Logits ``[batch, seq, vocab]``, or ``(logits, new_cache)`` when ``cache`` is given.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: 1 for real tokens, 0 for padding (left or right); ``None`` = all real.
          cache: a ``KVCache`` from ``init_cache``; this call's tokens are written at
            ``cache.write_index`` and attend to everything cached before them.
          positions: explicit position ids ``[batch, seq]``; by default they count real
            tokens (``cumsum(mask) - 1``, continuing from ``cache.token_count``).
        """
        context, mask = layers.attention_context(input_ids, attention_mask, cache, positions)
        x = self.embed_tokens(input_ids)
        cos_sin = layers.rotary_cos_sin(self.config.rope, context.positions, x.dtype)
        x, new_cache = layers.run_layers(self.layers, x, cache, mask,
                                         lambda layer, h, c: layer(h, context, cos_sin, c))
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits if cache is None else (logits, new_cache)

    def hf_parameters(self) -> Iterator[tuple[str, nnx.Variable, Layout]]:
        yield "model.embed_tokens.weight", self.embed_tokens.weight, "linear"
        for index, layer in enumerate(self.layers):
            yield from layer.hf_parameters(f"model.layers.{index}.")
        yield "model.norm.weight", self.norm.weight, "linear"
        if self.lm_head is not None:
            yield "lm_head.weight", self.lm_head.weight, "linear"

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Tensors named and laid out as transformers' ``LlamaForCausalLM`` expects."""
        return export_parameters(self.hf_parameters())

    def hf_config_dict(self) -> dict[str, Any]:
        return self.config.to_hf_dict(self.architecture)


def build_llama_from_config(config: LlamaConfig, tensors: dict[str, np.ndarray], dtype: Any) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` whose weights come from HF-named ``tensors`` (consumed)."""
    model = build_abstract(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load_parameters(model.hf_parameters(), tensors, dtype)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    check_fully_loaded(model)
    return model


@register_architecture("LlamaForCausalLM")
def build_llama_lm(hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any) -> LlamaForCausalLM:
    return build_llama_from_config(LlamaConfig.from_hf(hf_config), tensors, dtype)


# --------------------------------------------------------------------------- #
# GGUF (llama.cpp) files
# --------------------------------------------------------------------------- #
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
            raise ValueError(f"{path}: GGUF metadata is missing {key!r}")
        return default
    return field.contents()


def read_gguf_llama(path: Any) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """``(LlamaConfig, HF-named float32 tensors)`` from a Llama-architecture GGUF file."""
    import gguf
    from gguf.quants import dequantize

    from mapjax.models.loading import CheckpointError

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
        raise ValueError(f"{path}: cannot build a tokenizer for GGUF tokenizer model {kind!r} without "
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
    """The tokenizer stored in a GGUF file: transformers' GGUF support, else built from the vocab."""
    from pathlib import Path

    path = Path(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # noqa: BLE001 - any failure there (old transformers, no tokenizers backend) falls back
        return _tokenizer_from_gguf_vocab(path)


def llama_from_gguf(path: Any, dtype: Any = jnp.float32, *, with_tokenizer: bool = True
                    ) -> tuple[LlamaForCausalLM, Any]:
    """``(LlamaForCausalLM, tokenizer or None)`` from a Llama GGUF file (see ``loading.from_gguf``)."""
    from pathlib import Path

    from mapjax.models.loading import UnexpectedTensorsError

    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    config, tensors = read_gguf_llama(path)
    model = build_llama_from_config(config, tensors, dtype)
    if tensors:
        raise UnexpectedTensorsError(f"{path}: unexpected tensors {sorted(tensors)[:10]}")
    return model, (tokenizer_from_gguf(path) if with_tokenizer else None)
