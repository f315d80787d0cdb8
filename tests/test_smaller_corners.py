"""Small behaviours: module names that say what they hold, one decoder for the Llama family, warnings where a
fallback used to be silent, and messages that print numbers with the precision their comparison needs."""

from __future__ import annotations

import importlib
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from mapjax import RewardPool
from mapjax.solver.solution import below_threshold_text

# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("old_module", ["mapjax.data", "mapjax.finetune.data", "mapjax.finetune.evaluation"])
def test_renamed_modules_are_gone_without_a_shim(old_module):
    """Prompt sources are ``mapjax.prompts``, finetuning's examples ``mapjax.finetune.examples``, and the
    finetuned-against-base report ``mapjax.finetune.against_base``; the old names do not linger."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old_module)


def test_lambda_for_lives_in_the_solver_package():
    import mapjax.decode
    import mapjax.solver
    from mapjax.solver.lambdas import lambda_for

    assert mapjax.solver.lambda_for is lambda_for
    assert not hasattr(mapjax.decode, "_solution_lambda")
    pool = RewardPool(np.zeros((2, 1, 2)), np.ones((2, 1), bool), ("a", "b"))
    np.testing.assert_array_equal(lambda_for(pool, {"b": 0.5}), [0.0, 0.5])


def test_the_token_loop_no_longer_says_decode():
    """"decode" means MAP-D; the sampler's jitted loop is the sampling loop."""
    import mapjax.generate

    assert not [name for name in vars(mapjax.generate) if "decode" in name.lower()]


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("value, threshold, text", [
    (1.99, 2.0, "1.99"),
    (1.9996, 2.0, "1.9996"),        # "{:.3g}" would print 2 and contradict "< 2"
    (1.99999999, 2.0, "1.99999999"),
    (0.5, 2.0, "0.5"),
    (1.234567, 2.0, "1.23"),        # at least three significant digits, no more than needed
])
def test_below_threshold_text_never_rounds_up_to_the_threshold(value, threshold, text):
    assert below_threshold_text(value, threshold) == text
    assert float(below_threshold_text(value, threshold)) < threshold


def test_degenerate_lambda_warning_prints_an_ess_below_the_threshold():
    from mapjax.solver import Solution, lambda_for

    pool = RewardPool(np.zeros((3, 2, 2)), np.ones((3, 2), bool), ("a", "b"))
    edge = Solution(value_names=("a", "b"), targets=np.array([0.1, np.nan]), lam=np.array([4.0, 0.0]),
                    status="optimal", realised=np.array([0.1, 0.0]), kkt_residual=0.0, kl=0.6,
                    ess=1.9996, iterations=5, normaliser="per_prompt", method="exact", dtype="float64")
    assert edge.degenerate   # but only just

    with pytest.warns(UserWarning, match=r"effective sample size \(ESS\) is 1\.9996 < 2,"):
        lambda_for(pool, edge)
    assert "(ESS 1.9996 < 2)" in edge.table()


# --------------------------------------------------------------------------- #
# Fallbacks that now say so
# --------------------------------------------------------------------------- #


def _tiny_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>", "</s>"])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow   # imports transformers' tokenizers
def test_gguf_tokenizer_fallback_warns_and_still_tokenizes(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import transformers

    from mapjax.models.gguf import tokenizer_from_gguf

    path = _tiny_gguf(tmp_path / "tiny.gguf")

    def no_gguf_support(*args, **kwargs):
        raise ValueError("this transformers cannot read GGUF tokenizers")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf_support)
    with pytest.warns(UserWarning, match=r"tiny\.gguf: transformers could not load the GGUF tokenizer \(ValueError: "
                                         r"this transformers cannot read GGUF tokenizers\); using a byte-level BPE"):
        tokenizer = tokenizer_from_gguf(path)
    assert tokenizer("ab").input_ids == [2]


def test_uncached_hub_id_offline_names_the_download_command(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from mapjax.errors import ModelError
    from mapjax.models import from_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"'nobody/no-such-model' is neither a local folder nor in the Hugging Face "
                                         r"cache, and HF_HUB_OFFLINE is set .*`hf download nobody/no-such-model`"):
        from_pretrained("nobody/no-such-model")


def test_a_pool_without_its_build_manifest_warns_that_prompts_are_shown_raw(tmp_path):
    from mapjax.finetune.against_base import pool_prompt_format

    pool = RewardPool(np.zeros((2, 1, 1)), np.ones((2, 1), bool), ("a",), prompts=("p0", "p1"),
                      generations=(("g0",), ("g1",)))
    path = pool.save(tmp_path / "elsewhere.jsonl")
    with pytest.warns(UserWarning, match=r"elsewhere\.jsonl has no build manifest .* the prompts are shown to the "
                                         r"models raw"):
        assert pool_prompt_format(path, tokenizer=None) is None
    # a manifest that records raw prompts is known, not guessed: no warning
    path.with_name(path.name + ".manifest.json").write_text('{"settings": {"formatted_prompts_sha256": null}}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pool_prompt_format(path, tokenizer=None) is None


# --------------------------------------------------------------------------- #
# One decoder for the Llama family
# --------------------------------------------------------------------------- #


def test_every_llama_shaped_family_runs_llamas_attention():
    """A fix to decoder attention in llama.py reaches every family: none overrides the attention step, and
    Mistral and Qwen2 are configurations of Llama (no layer or model code of their own)."""
    from mapjax.models import model_class
    from mapjax.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    for name in ("MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM"):
        cls = model_class(name)
        assert issubclass(cls, LlamaForCausalLM), name
        assert cls.layer_class.self_attention is LlamaDecoderLayer.self_attention, name
    for name in ("MistralForCausalLM", "Qwen2ForCausalLM"):
        assert model_class(name).layer_class is LlamaDecoderLayer
        assert model_class(name).hidden_states is LlamaForCausalLM.hidden_states


@pytest.mark.slow   # three eager forwards
def test_mistral_without_a_window_is_llama_and_qwen2_has_no_output_bias():
    from mapjax.models import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    from mapjax.models.layers import RopeSpec

    shape = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=4, rope=RopeSpec(rotary_dim=4))
    llama = LlamaForCausalLM(LlamaConfig(**shape), rngs=nnx.Rngs(0))
    mistral = MistralForCausalLM(MistralConfig(**shape), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 40)
    np.testing.assert_array_equal(np.asarray(llama(ids).logits), np.asarray(mistral(ids).logits))
    # a window narrower than the sequence changes the logits: the window reaches Llama's layer
    windowed = MistralForCausalLM(MistralConfig(**shape, sliding_window=2), rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(windowed(ids).logits), np.asarray(llama(ids).logits))

    qwen2_layer = Qwen2ForCausalLM(Qwen2Config(**shape), rngs=nnx.Rngs(0)).layers[0]
    assert qwen2_layer.q_proj.bias is not None and qwen2_layer.o_proj.bias is None


def test_layers_package_keeps_its_names_and_the_chunk_lives_with_attention():
    """Importers keep ``layers.X``; the cached loop's chunk is set on the attention module (a patch on the
    package would not reach the loop, so the package does not offer the name)."""
    from mapjax.models import layers

    for name in ("Linear", "Embedding", "RMSNorm", "LayerNorm", "KVCache", "RopeSpec", "attend_with_cache",
                 "attention_context", "run_layers", "activation", "EMBED", "MASKED_LOGIT"):
        assert hasattr(layers, name), name
    assert isinstance(layers.attention.ATTENTION_CHUNK, int)
    assert not hasattr(layers, "ATTENTION_CHUNK")
