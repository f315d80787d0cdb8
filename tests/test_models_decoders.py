"""GPT-2, OPT and Llama ports: the cache, dtypes, export and gradients on tiny models built in JAX, and parity
with transformers' PyTorch classes (the tests that take a ``torch_*`` fixture; they skip without torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import CausalLM, CausalLMOutput, KVCache, export_pretrained, from_pretrained, layers

# Every tiny case of conftest.TINY_DECODERS.
CASE_NAMES = ["gpt2", "gpt2_untied_scaled", "gpt2_classifier", "opt_pre_ln", "opt_post_ln", "opt_project_in_out",
              "llama", "llama_gqa_tied", "llama_llama3_rope", "llama_linear_rope_bias"]
LANGUAGE_MODELS = [name for name in CASE_NAMES if name != "gpt2_classifier"]
FP32_TOLERANCE = 1e-4
LENGTHS = [7, 3, 5]
SEQ = 8


def _output_array(output):
    """Logits of a causal LM call, or a classifier's scores."""
    return output.logits if isinstance(output, CausalLMOutput) else output


# --------------------------------------------------------------------------- #
# Without torch: tiny models built in JAX
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_a_call_always_returns_a_causal_lm_output(tiny_model, padded_batch, name):
    model = tiny_model(name)
    assert isinstance(model, CausalLM)
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    plain = model(jnp.asarray(ids), jnp.asarray(mask))
    assert isinstance(plain, CausalLMOutput) and plain.cache is None
    assert plain.logits.shape == (3, SEQ, 100) and plain.logits.dtype == jnp.float32
    cached = model(jnp.asarray(ids), jnp.asarray(mask), cache=model.init_cache(batch=3, max_len=SEQ))
    assert isinstance(cached, CausalLMOutput) and isinstance(cached.cache, KVCache)
    np.testing.assert_allclose(np.asarray(cached.logits)[mask.astype(bool)],
                               np.asarray(plain.logits)[mask.astype(bool)], atol=1e-5)


@pytest.mark.parametrize("name, expected", [("gpt2", 64), ("opt_pre_ln", 64), ("llama", 64)])
def test_max_positions_is_the_configs_context(tiny_model, name, expected):
    """One answer for every decoder: GPT-2's n_positions, OPT's and Llama's max_position_embeddings (for Llama
    the trained context: its rotary positions have no table, but the sampler, the perplexity reward and the
    reward truncation all stop there)."""
    from mapjax.rewards.batching import truncation_length

    model = tiny_model(name)
    assert model.max_positions == expected

    class NoLimitTokenizer:
        model_max_length = int(1e30)   # transformers' "unset"

    assert truncation_length(NoLimitTokenizer(), model) == expected


DECODER_CACHE_CASES = ["gpt2", "opt_project_in_out", "llama_gqa_tied", "llama_llama3_rope"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODER_CACHE_CASES)
def test_kv_cache_decoding_matches_full_forward(tiny_model, padded_batch, name):
    """Left-padded prefill, then one token at a time, equals one forward over the whole sequence."""
    model = tiny_model(name)
    prompt_ids, prompt_mask = padded_batch([5, 2, 4], 6, "left", seed=2)
    continuation = np.random.RandomState(5).randint(1, 100, size=(3, 4)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    full_logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits)

    @jax.jit
    def step(graph_state, ids, mask, cache):
        output = nnx.merge(*graph_state)(ids, mask, cache=cache)
        return output.logits, output.cache

    graph_state = nnx.split(model)
    cache = model.init_cache(batch=3, max_len=12)
    logits, cache = step(graph_state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), cache)
    collected = [np.asarray(logits)]
    for position in range(continuation.shape[1]):
        token = jnp.asarray(continuation[:, position:position + 1])
        logits, cache = step(graph_state, token, jnp.ones_like(token), cache)
        collected.append(np.asarray(logits))
    cached_logits = np.concatenate(collected, axis=1)
    real = full_mask.astype(bool)
    np.testing.assert_allclose(cached_logits[real], full_logits[real], atol=FP32_TOLERANCE, rtol=0)
    assert int(cache.write_index) == 10
    np.testing.assert_array_equal(np.asarray(cache.token_count), full_mask.sum(1))


def test_kv_cache_overflow_is_reported(tiny_model):
    model = tiny_model("llama")
    cache = model.init_cache(batch=1, max_len=4)
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ModelError, match="KV cache overflow: writing 5 tokens at slot 0 exceeds max_len=4"):
        model(ids, jnp.ones_like(ids), cache=cache)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "opt_pre_ln", "llama_gqa_tied"])
def test_bfloat16_parameters_track_float32(tiny_policy_folder, padded_batch, name):
    directory = tiny_policy_folder(name)
    model32 = from_pretrained(directory)
    model16 = from_pretrained(directory, dtype=jnp.bfloat16)
    assert next(iter(model16.hf_parameters()))[1].get_value().dtype == jnp.bfloat16
    ids, mask = padded_batch(LENGTHS, SEQ, "left")
    logits32 = np.asarray(model32(jnp.asarray(ids), jnp.asarray(mask)).logits)
    logits16 = model16(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert logits16.dtype == jnp.float32   # the output head accumulates and returns float32 in any dtype
    real = mask.astype(bool)
    # bfloat16 keeps 8 mantissa bits: ~0.4% relative error per op on logits of size ~1.
    assert np.abs(np.asarray(logits16, np.float32)[real] - logits32[real]).max() < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_export_and_reload_give_the_same_model(tiny_model, padded_batch, tmp_path, name):
    """export_pretrained then from_pretrained: the same weights through the one name map, both directions."""
    model = tiny_model(name, seed=3)
    export_pretrained(model, tmp_path / "export")
    again = from_pretrained(tmp_path / "export")
    assert type(again) is type(model) and again.config == model.config
    ids, mask = padded_batch(LENGTHS, SEQ, "right", seed=1)
    np.testing.assert_array_equal(np.asarray(_output_array(again(jnp.asarray(ids), jnp.asarray(mask)))),
                                  np.asarray(_output_array(model(jnp.asarray(ids), jnp.asarray(mask)))))
    assert sorted(again.hf_state_dict()) == sorted(model.hf_state_dict())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_input_validation_names_the_problem(tiny_model, name):
    model = tiny_model(name)
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ModelError, match=r"attention_mask shape \(2, 3\) must equal input_ids shape \(2, 4\)"):
        model(ids, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ModelError, match=r"input_ids must be \[batch, seq\]"):
        model(jnp.ones((4,), jnp.int32), None)


def test_unknown_activation_is_a_model_error():
    with pytest.raises(ModelError, match=r"unsupported activation 'gelu_9'.*'gelu_new'"):
        layers.activation("gelu_9")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied"])
def test_gradients_flow_to_every_parameter(tiny_model, padded_batch, name):
    """The ports are differentiable end to end (MAP-F finetunes them)."""
    model = tiny_model(name)
    ids, mask = padded_batch([6, 3], 6, "left")

    def loss(model):
        logits = model(jnp.asarray(ids), jnp.asarray(mask)).logits
        return (jax.nn.log_softmax(logits)[..., 1] * mask).sum()

    grads = nnx.grad(loss)(model)
    for path, value in nnx.to_flat_state(grads):
        array = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        assert np.isfinite(array).all(), path
        assert np.abs(array).max() > 0, f"no gradient reaches {path}"


# --------------------------------------------------------------------------- #
# Parity with transformers' PyTorch classes
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module", params=CASE_NAMES)
def loaded(request, torch_tiny_model, tmp_path_factory):
    """(case name, torch model, the same weights in mapjax) for every tiny case."""
    torch_model = torch_tiny_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(str(directory))
    return request.param, torch_model, from_pretrained(directory)


def torch_unpadded_outputs(model, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per row, the oracle's output on that row alone without padding (logits [len, vocab] or [labels])."""
    import torch

    outputs = []
    with torch.inference_mode():
        for row in range(ids.shape[0]):
            tokens = torch.tensor(ids[row][mask[row].astype(bool)][None, :], dtype=torch.long)
            outputs.append(model(input_ids=tokens).logits[0].float().numpy())
    return outputs


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_reference(loaded, padded_batch, side):
    name, torch_model, model = loaded
    ids, mask = padded_batch(LENGTHS, SEQ, side)
    output = _output_array(model(jnp.asarray(ids), jnp.asarray(mask)))
    classifier = name == "gpt2_classifier"
    expected_shape = (len(LENGTHS), torch_model.config.num_labels) if classifier else \
        (len(LENGTHS), SEQ, torch_model.config.vocab_size)
    assert output.shape == expected_shape
    assert output.dtype == jnp.float32
    for row, reference in enumerate(torch_unpadded_outputs(torch_model, ids, mask)):
        if classifier:
            # Scores are read at the last non-pad token, which is the unpadded row's last token.
            np.testing.assert_allclose(np.asarray(output[row]), reference, atol=FP32_TOLERANCE, rtol=0)
        else:
            real = np.asarray(output[row])[mask[row].astype(bool)]
            assert real.shape == reference.shape
            np.testing.assert_allclose(real, reference, atol=FP32_TOLERANCE, rtol=0)


def test_classifier_matches_transformers_on_padded_batch(torch_tiny_model, padded_batch, tmp_path):
    """The GPT-2 score head picks the same token as transformers on a right-padded batch."""
    import torch

    torch_model = torch_tiny_model("gpt2_classifier")
    torch_model.save_pretrained(str(tmp_path))
    model = from_pretrained(tmp_path)
    ids, mask = padded_batch(LENGTHS, SEQ, "right", seed=3)
    with torch.inference_mode():
        reference = torch_model(input_ids=torch.tensor(ids).long(),
                                attention_mask=torch.tensor(mask).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), reference,
                               atol=FP32_TOLERANCE, rtol=0)


def test_export_round_trip_loads_in_transformers(loaded, padded_batch, tmp_path):
    import torch
    import transformers

    _, torch_model, model = loaded
    export_pretrained(model, tmp_path / "export")
    reloaded = getattr(transformers, model.architecture).from_pretrained(str(tmp_path / "export")).eval()
    ids, mask = padded_batch(LENGTHS, SEQ, "right", seed=1)
    with torch.inference_mode():
        before = torch_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
        after = reloaded(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
])
def test_rotary_frequencies_match_transformers(rope_parameters):
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=64,
                            rope_parameters=dict(rope_parameters))
    spec = layers.rope_spec_from_hf_config(hf_config, head_dim=128)
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        hf_config.standardize_rope_params()
        theta = hf_config.rope_parameters["rope_theta"]
        expected = 1.0 / theta ** (np.arange(0, 128, 2, dtype=np.float32) / 128)
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **({"seq_len": 100}
                                                                       if rope_type == "dynamic" else {}))[0].numpy()
    max_position = jnp.asarray(99) if rope_type == "dynamic" else None
    np.testing.assert_allclose(np.asarray(layers.rotary_inverse_frequencies(spec, max_position)), expected,
                               rtol=2e-6)
