"""The benchmark suite's models: real configs with random weights, the same weights in both frameworks.

Nothing is downloaded and no model file is read: every model is built by mapjax from a transformers config with
seeded random weights (``from_config``), and transformers' PyTorch class receives mapjax's export of them
(``hf_config_dict()`` and ``hf_state_dict()``), so the two sides run the very same numbers. Prompts go through a
word-level tokenizer built in memory (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, word ``w<i>`` = id i for every
other id of the vocabulary), so that ``mapjax.generate.generate`` can take text and every sampled id decodes.

Everything heavy (jax, torch, transformers, tokenizers) is imported inside the functions: the suite sets the JAX
platform before the first jax import.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 3
_SPECIAL_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: its transformers architecture and config class, and the config's fields."""

    label: str
    architecture: str
    config_class: str
    fields: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.fields["vocab_size"])

    def hf_config(self) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(**self.fields)


# The real configs (sizes as in the published config.json of each checkpoint; special ids are the word
# tokenizer's, which changes no shape).
FULL_SPECS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("SmolLM2-135M", "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0), **_SPECIAL_IDS)),
    "llama1b": ModelSpec("Llama-3.2-1B-size", "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192), **_SPECIAL_IDS)),
    "gpt2": ModelSpec("GPT-2 small", "GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **_SPECIAL_IDS)),
    "minilm": ModelSpec("MiniLM-L6", "BertModel", "BertConfig", dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)),
}

# ``--tiny``: the same architectures and features (GQA, tied heads, llama3 rope scaling) at toy sizes.
TINY_SPECS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("SmolLM2-135M (tiny)", "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0), **_SPECIAL_IDS)),
    "llama1b": ModelSpec("Llama-3.2-1B-size (tiny)", "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=640, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16), **_SPECIAL_IDS)),
    "gpt2": ModelSpec("GPT-2 small (tiny)", "GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=576, n_positions=256, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **_SPECIAL_IDS)),
    "minilm": ModelSpec("MiniLM-L6 (tiny)", "BertModel", "BertConfig", dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)),
}


def model_spec(name: str, tiny: bool) -> ModelSpec:
    return (TINY_SPECS if tiny else FULL_SPECS)[name]


def jax_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_mapjax_model(spec: ModelSpec, dtype: str, seed: int = 0) -> Any:
    """mapjax's model for ``spec`` with seeded random weights (normal std 0.02, unit norms) in ``dtype``."""
    from mapjax.models import model_class

    cls = model_class(spec.architecture)
    options = {"add_pooling_layer": False} if spec.architecture == "BertModel" else {}
    return cls.from_config(cls.config_from_hf(spec.hf_config()), dtype=jax_dtype(dtype), seed=seed, **options)


def build_torch_twin(model: Any, spec: ModelSpec, device: str, dtype: str) -> Any:
    """transformers' PyTorch class for ``spec``, holding ``model``'s weights (mapjax's export), on ``device``.

    The config comes from mapjax's ``hf_config_dict()`` (dropout fields of ``spec`` kept: mapjax has no dropout).
    Raises ``RuntimeError`` if the export leaves any PyTorch parameter unset (other than a tied output head).
    """
    import torch
    import transformers

    fields = {key: value for key, value in model.hf_config_dict().items()
              if key not in ("architectures", "model_type")}
    fields.update({key: value for key, value in spec.fields.items() if key.endswith("pdrop")})
    hf_config = getattr(transformers, spec.config_class)(**fields)
    with torch.device(device):   # random init on the device: fast even for 1B parameters on a GPU
        options = {"add_pooling_layer": False} if spec.architecture == "BertModel" else {}
        torch_model = getattr(transformers, spec.architecture)(hf_config, **options)
    state = {name: torch.from_numpy(value) for name, value in model.hf_state_dict().items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"mapjax's export does not fit transformers' {spec.architecture}: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    del state
    torch_model.tie_weights()
    return torch_model.to(device=device, dtype=torch_dtype(dtype)).eval()


def word_tokenizer(vocab_size: int) -> Any:
    """A fast word-level tokenizer over every id of a ``vocab_size`` model (no download, no files).

    ``<pad>``/``<bos>``/``<eos>`` are ids 0/1/2, ``w<i>`` is id i; encoding prepends ``<bos>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID,
             **{f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def word_prompts(count: int, tokens: int, vocab_size: int, seed: int) -> list[str]:
    """``count`` prompts of random words that encode to exactly ``tokens`` ids (``<bos>`` included)."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(FIRST_WORD_ID, vocab_size, size=(count, tokens - 1))
    return [" ".join(f"w{i}" for i in row) for row in ids]
