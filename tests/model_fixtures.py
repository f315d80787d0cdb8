"""Tiny random Hugging Face models (PyTorch, the oracle) and padded batches for model tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

VOCAB = 100
PAD_ID = 0  # real tokens are drawn from 1..VOCAB-1 so the pad id never appears inside a row


@dataclasses.dataclass(frozen=True)
class TinyCase:
    """One tiny architecture variant: how to build the transformers config and model."""

    name: str
    hf_class: str            # class name in transformers
    config_factory: Callable[[], Any]
    is_classifier: bool = False
    is_decoder: bool = True


def _gpt2(**overrides: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import GPT2Config

        values = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD_ID,
                      bos_token_id=1, eos_token_id=2)
        values.update(overrides)
        return GPT2Config(**values)
    return make


def _opt(**overrides: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import OPTConfig

        values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                      max_position_embeddings=64, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
                      word_embed_proj_dim=32)
        values.update(overrides)
        return OPTConfig(**values)
    return make


def _llama(**overrides: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import LlamaConfig

        values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        values.update(overrides)
        return LlamaConfig(**values)
    return make


CASES: dict[str, TinyCase] = {case.name: case for case in [
    TinyCase("gpt2", "GPT2LMHeadModel", _gpt2()),
    TinyCase("gpt2_untied_scaled", "GPT2LMHeadModel",
             _gpt2(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)),
    TinyCase("gpt2_classifier", "GPT2ForSequenceClassification", _gpt2(num_labels=3), is_classifier=True),
    TinyCase("opt_pre_ln", "OPTForCausalLM", _opt()),
    TinyCase("opt_post_ln", "OPTForCausalLM", _opt(do_layer_norm_before=False)),
    TinyCase("opt_project_in_out", "OPTForCausalLM", _opt(word_embed_proj_dim=16)),
    TinyCase("llama", "LlamaForCausalLM", _llama()),
    TinyCase("llama_gqa_tied", "LlamaForCausalLM", _llama(num_key_value_heads=2, tie_word_embeddings=True)),
    TinyCase("llama_llama3_rope", "LlamaForCausalLM", _llama(
        num_key_value_heads=1, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                    original_max_position_embeddings=16))),
    TinyCase("llama_linear_rope_bias", "LlamaForCausalLM", _llama(
        attention_bias=True, mlp_bias=True, rope_parameters=dict(rope_type="linear", rope_theta=500.0,
                                                                 factor=2.0))),
]}


def build_torch_model(case: TinyCase, seed: int = 0) -> Any:
    """The transformers PyTorch model for ``case`` with seeded random weights, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, case.hf_class)(case.config_factory()).eval()
    # Fresh models have zero biases and unit norms; randomise every float parameter
    # so a mis-mapped bias or norm weight shows up in the comparison.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dtype.is_floating_point and ("bias" in name or "norm" in name or "ln" in name):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def save_torch_model(model: Any, directory: Path) -> Path:
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def padded_batch(lengths: list[int], seq: int, side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 with rows of ``lengths`` padded on ``side`` to ``seq``."""
    rng = np.random.RandomState(seed)
    ids = np.full((len(lengths), seq), PAD_ID, np.int32)
    mask = np.zeros((len(lengths), seq), np.int32)
    for row, length in enumerate(lengths):
        tokens = rng.randint(1, VOCAB, size=length)
        span = slice(seq - length, seq) if side == "left" else slice(0, length)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def torch_unpadded_outputs(model: Any, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per row, the oracle's output on that row alone without padding (logits [len, vocab] or [labels])."""
    import torch

    outputs = []
    with torch.inference_mode():
        for row in range(ids.shape[0]):
            tokens = torch.tensor(ids[row][mask[row].astype(bool)][None, :], dtype=torch.long)
            outputs.append(model(input_ids=tokens).logits[0].float().numpy())
    return outputs


def smollm2_gguf_path() -> Path | None:
    """Path of the packaged SmolLM2 GGUF, or None when the package is not installed."""
    from mapjax.models.packaged import smollm2_gguf_path as packaged_path

    try:
        return packaged_path()
    except FileNotFoundError:
        return None
