"""GPT-2, OPT and Llama ports against transformers' PyTorch classes on tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from mapjax.models import export_pretrained, from_pretrained, layers  # noqa: E402
from tests.model_fixtures import (CASES, build_torch_model, padded_batch, save_torch_model,  # noqa: E402
                                  torch_unpadded_outputs)

FP32_TOLERANCE = 1e-4
LENGTHS = [7, 3, 5]
SEQ = 8


@pytest.fixture(scope="module", params=sorted(CASES))
def loaded(request, tmp_path_factory):
    """(case, torch model, mapjax model) for every tiny case."""
    case = CASES[request.param]
    torch_model = build_torch_model(case)
    directory = save_torch_model(torch_model, tmp_path_factory.mktemp(case.name))
    return case, torch_model, from_pretrained(directory), directory


def _assert_rows_match(case, reference_rows, output, mask):
    for row, reference in enumerate(reference_rows):
        if case.is_classifier:
            # Scores are read at the last non-pad token, which is the unpadded row's last token.
            np.testing.assert_allclose(np.asarray(output[row]), reference, atol=FP32_TOLERANCE, rtol=0)
        else:
            real = np.asarray(output[row])[mask[row].astype(bool)]
            assert real.shape == reference.shape
            np.testing.assert_allclose(real, reference, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_reference(loaded, side):
    case, torch_model, model, _ = loaded
    ids, mask = padded_batch(LENGTHS, SEQ, side)
    output = model(jnp.asarray(ids), jnp.asarray(mask))
    expected_shape = (len(LENGTHS), case.config_factory().num_labels) if case.is_classifier else \
        (len(LENGTHS), SEQ, torch_model.config.vocab_size)
    assert output.shape == expected_shape
    assert output.dtype == jnp.float32
    _assert_rows_match(case, torch_unpadded_outputs(torch_model, ids, mask), output, mask)


def test_classifier_matches_transformers_on_padded_batch():
    """The GPT-2 score head picks the same token as transformers on a right-padded batch."""
    import torch

    case = CASES["gpt2_classifier"]
    torch_model = build_torch_model(case)
    model = from_pretrained_from_torch(torch_model)
    ids, mask = padded_batch(LENGTHS, SEQ, "right", seed=3)
    with torch.inference_mode():
        reference = torch_model(input_ids=torch.tensor(ids).long(),
                                attention_mask=torch.tensor(mask).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), reference,
                               atol=FP32_TOLERANCE, rtol=0)


def from_pretrained_from_torch(torch_model, dtype=jnp.float32):
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        return from_pretrained(directory, dtype=dtype)


def test_export_round_trip_loads_in_transformers(loaded, tmp_path):
    import torch
    import transformers

    case, torch_model, model, _ = loaded
    export_pretrained(model, tmp_path / "export")
    reloaded = getattr(transformers, case.hf_class).from_pretrained(str(tmp_path / "export")).eval()
    ids, mask = padded_batch(LENGTHS, SEQ, "right", seed=1)
    with torch.inference_mode():
        before = torch_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
        after = reloaded(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6, rtol=0)
    # and mapjax reloads its own export to the same weights
    again = from_pretrained(tmp_path / "export")
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))),
                               np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6, rtol=0)


DECODER_CACHE_CASES = ["gpt2", "opt_project_in_out", "llama_gqa_tied", "llama_llama3_rope"]


@pytest.mark.parametrize("name", DECODER_CACHE_CASES)
def test_kv_cache_decoding_matches_full_forward(name, tmp_path):
    """Left-padded prefill, then one token at a time, equals one forward over the whole sequence."""
    case = CASES[name]
    model = from_pretrained(save_torch_model(build_torch_model(case), tmp_path))
    prompt_ids, prompt_mask = padded_batch([5, 2, 4], 6, "left", seed=2)
    continuation = np.random.RandomState(5).randint(1, 100, size=(3, 4)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    full_logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))

    @jax.jit
    def step(graph_state, ids, mask, cache):
        from flax import nnx

        return nnx.merge(*graph_state)(ids, mask, cache=cache)

    from flax import nnx

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


def test_kv_cache_overflow_is_reported(tmp_path):
    model = from_pretrained(save_torch_model(build_torch_model(CASES["llama"]), tmp_path))
    cache = model.init_cache(batch=1, max_len=4)
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="KV cache overflow: writing 5 tokens at slot 0 exceeds max_len=4"):
        model(ids, jnp.ones_like(ids), cache=cache)


@pytest.mark.parametrize("name", ["gpt2", "opt_pre_ln", "llama_gqa_tied"])
def test_bfloat16_parameters_track_float32(name, tmp_path):
    directory = save_torch_model(build_torch_model(CASES[name]), tmp_path)
    model32 = from_pretrained(directory)
    model16 = from_pretrained(directory, dtype=jnp.bfloat16)
    assert model16.hf_parameters().__next__()[1].get_value().dtype == jnp.bfloat16
    ids, mask = padded_batch(LENGTHS, SEQ, "left")
    logits32 = np.asarray(model32(jnp.asarray(ids), jnp.asarray(mask)))
    logits16 = model16(jnp.asarray(ids), jnp.asarray(mask))
    assert logits16.dtype == jnp.bfloat16
    real = mask.astype(bool)
    # bfloat16 keeps 8 mantissa bits: ~0.4% relative error per op on logits of size ~1.
    assert np.abs(np.asarray(logits16, np.float32)[real] - logits32[real]).max() < 0.1


def test_input_validation_names_the_problem(loaded):
    case, _, model, _ = loaded
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 3\) must equal input_ids shape \(2, 4\)"):
        model(ids, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        model(jnp.ones((4,), jnp.int32), None)


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
])
def test_rotary_frequencies_match_transformers(rope_parameters):
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


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied"])
def test_gradients_flow_to_every_parameter(name, tmp_path):
    """The ports are differentiable end to end (MAP-F finetunes them)."""
    from flax import nnx

    model = from_pretrained(save_torch_model(build_torch_model(CASES[name]), tmp_path))
    ids, mask = padded_batch([6, 3], 6, "left")

    def loss(model):
        logits = model(jnp.asarray(ids), jnp.asarray(mask))
        return (jax.nn.log_softmax(logits)[..., 1] * mask).sum()

    grads = nnx.grad(loss)(model)
    for path, value in nnx.to_flat_state(grads):
        array = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        assert np.isfinite(array).all(), path
        assert np.abs(array).max() > 0, f"no gradient reaches {path}"
