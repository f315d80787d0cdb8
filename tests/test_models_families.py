"""Qwen2, Mistral, Phi-3, Gemma 2/3 policies; decoder sequence classifiers; DeBERTa-v2/v3 (multi-output) classifiers.

Tiny random configs from transformers' config classes; the PyTorch classes are the oracle (tests taking the
``pair`` fixture, and the rope test, skip without torch). Sequences run past every sliding window (4 or 5
tokens), so the windows, the soft-caps and the alternating local/global layers all shape the outputs checked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import export_pretrained, from_pretrained, layers, model_class

VOCAB, PAD, BOS, EOS = 100, 0, 1, 2
FP32_TOLERANCE = 1e-4
WINDOW = 4
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
             eos_token_id=EOS)
_GEMMA = dict(_BASE, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=12)
_DEBERTA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=PAD, layer_norm_eps=1e-7, relative_attention=True)
OBJECTIVES = {0: "helpfulness", 1: "correctness", 2: "verbosity"}

# name -> (HF architecture, transformers config class, config fields)
FAMILIES = {
    # layer 0 full, layer 1 sliding (max_window_layers=1); q/k/v biases
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_BASE, use_sliding_window=True, sliding_window=WINDOW,
                                                        max_window_layers=1, tie_word_embeddings=False)),
    # every layer slides; head_dim 16 differs from hidden / heads
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_BASE, sliding_window=WINDOW, head_dim=16)),
    # fused projections, half the head rotated, longrope (long factors for sequences past 32), window 5
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
        _BASE, sliding_window=WINDOW + 1, original_max_position_embeddings=32, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
            short_factor=[1.0, 1.5], long_factor=[3.0, 7.0]))),
    # local layer 0, global layer 1; attention and final soft-caps small enough to bite
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_GEMMA, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=3.0)),
    # q/k norms, local layers on their own rope base, global ones linearly scaled
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        _GEMMA, sliding_window_pattern=2, final_logit_softcapping=3.0, rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    "llama_classifier": ("LlamaForSequenceClassification", "LlamaConfig", dict(_BASE, num_labels=3,
                                                                               id2label=OBJECTIVES)),
    "qwen2_classifier": ("Qwen2ForSequenceClassification", "Qwen2Config", dict(
        _BASE, num_labels=1, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma2_classifier": ("Gemma2ForSequenceClassification", "Gemma2Config", dict(_GEMMA, num_labels=2)),
    "mistral_classifier": ("MistralForSequenceClassification", "MistralConfig", dict(_BASE, sliding_window=WINDOW,
                                                                                     num_labels=1)),
    "phi3_classifier": ("Phi3ForSequenceClassification", "Phi3Config", dict(_BASE, partial_rotary_factor=0.5,
                                                                            num_labels=2)),
    # DeBERTa-v3 shape: no absolute positions, shared keys, normed relative table, log buckets past distance 4;
    # a 3-output regression head with a name per output
    "deberta_v3_regression": ("DebertaV2ForSequenceClassification", "DebertaV2Config", dict(
        _DEBERTA, position_biased_input=False, pos_att_type=["p2c", "c2p"], share_att_key=True,
        norm_rel_ebd="layer_norm", position_buckets=8, num_labels=3, id2label=OBJECTIVES,
        problem_type="regression")),
    # DeBERTa-v2-xlarge shape: absolute positions, separate position projections, the convolution, token types,
    # a factorised embedding and a clamped (unbucketed) relative span
    "deberta_v2_conv": ("DebertaV2ForSequenceClassification", "DebertaV2Config", dict(
        _DEBERTA, position_biased_input=True, pos_att_type="c2p|p2c", share_att_key=False, conv_kernel_size=3,
        conv_act="gelu", max_relative_positions=6, type_vocab_size=2, embedding_size=24, num_labels=1)),
}
CAUSAL = ["qwen2", "mistral", "phi3", "gemma2", "gemma3"]
DECODER_CLASSIFIERS = ["llama_classifier", "qwen2_classifier", "gemma2_classifier", "mistral_classifier",
                       "phi3_classifier"]
DEBERTAS = ["deberta_v3_regression", "deberta_v2_conv"]
LENGTHS = [11, 3, 7]    # longer than every window
# Query/key projections are scaled up so that attention logits reach the range where soft-capping and the
# windows change the result (at the usual 0.02 init, attention is nearly uniform and tanh nearly linear).
SHARPEN = 10.0
SHARPENED = ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_proj.weight", "key_proj.weight")
SEQ = 12
PROMPTS = ["w5 w17 w33", "w8", "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50", "w90 w3 w3 w7 w61 w12"]


def hf_config(name: str):
    import transformers

    _, config_class, fields = FAMILIES[name]
    return getattr(transformers, config_class)(**fields)


def padded(lengths: list[int], seq: int, side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` with random real tokens (3..99) padded with ``PAD`` on ``side``."""
    rng = np.random.RandomState(seed)
    ids, mask = np.full((len(lengths), seq), PAD, np.int32), np.zeros((len(lengths), seq), np.int32)
    for row, length in enumerate(lengths):
        span = slice(seq - length, seq) if side == "left" else slice(0, length)
        ids[row, span], mask[row, span] = rng.randint(3, VOCAB, size=length), 1
    return ids, mask


def raw_output(output) -> jax.Array:
    """A causal LM's logits or a classifier's scores."""
    return output.logits if hasattr(output, "logits") else output


def output_array(output) -> np.ndarray:
    return np.asarray(raw_output(output))


def comparable(config):
    """A config without the source ``config.json`` text it keeps for export (which transformers rewrites)."""
    return dataclasses.replace(config, source_config_json="{}") if hasattr(config, "source_config_json") else config


_MODELS: dict[str, object] = {}


def native_model(name: str, dtype=jnp.float32):
    """Tiny model ``name`` built in JAX (no torch), 1-D parameters perturbed so a mis-mapped norm shows."""
    key = (name, jnp.dtype(dtype).name)
    if key not in _MODELS:
        cls = model_class(FAMILIES[name][0])
        model = cls.from_config(cls.config_from_hf(hf_config(name)), dtype=dtype, seed=1)
        rng = np.random.default_rng(1)
        for parameter_name, parameter, _ in model.hf_parameters():
            value = parameter.get_value().astype(jnp.float32)
            if value.ndim == 1:
                value = value + 0.1 * rng.standard_normal(value.shape)
            if parameter_name.endswith(SHARPENED):
                value = value * SHARPEN
            parameter.set_value(value.astype(dtype))
        _MODELS[key] = model
    return _MODELS[key]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Factory ``pair(name) -> (torch model, the same weights loaded by mapjax, folder)``; skips without torch."""
    torch = pytest.importorskip("torch")
    import transformers

    built: dict[str, tuple] = {}

    def build(name: str):
        if name not in built:
            torch.manual_seed(0)
            torch_model = getattr(transformers, FAMILIES[name][0])(hf_config(name)).eval()
            with torch.no_grad():
                for parameter_name, parameter in torch_model.named_parameters():
                    if parameter.ndim == 1:   # biases and norm scales start at 0 or 1
                        parameter.add_(torch.randn_like(parameter) * 0.1)
                    if parameter_name.startswith(("score.", "classifier.", "pooler.")):
                        parameter.mul_(30.0)   # scores of order 1, so the tolerance means something
                    if parameter_name.endswith(SHARPENED):
                        parameter.mul_(SHARPEN)
            directory = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(str(directory))
            built[name] = (torch_model, from_pretrained(directory), directory)
        return built[name]

    return build


def torch_outputs(torch_model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.inference_mode():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask).long()}
        return torch_model(input_ids=torch.tensor(ids).long(), **kwargs).logits.float().numpy()


# --------------------------------------------------------------------------- #
# Parity with transformers
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL + DECODER_CLASSIFIERS + DEBERTAS)
def test_padded_batches_match_each_row_unpadded(pair, name):
    """Left- and right-padded batches give every row what PyTorch gives it alone, unpadded."""
    torch_model, model, _ = pair(name)
    for side in ("left", "right"):
        ids, mask = padded(LENGTHS, SEQ, side, seed=3)
        output = output_array(model(jnp.asarray(ids), jnp.asarray(mask)))
        assert output.dtype == np.float32
        for row in range(len(LENGTHS)):
            real = mask[row].astype(bool)
            reference = torch_outputs(torch_model, ids[row][real][None])[0]
            got = output[row][real] if output.ndim == 3 else output[row]
            np.testing.assert_allclose(got, reference, atol=FP32_TOLERANCE, rtol=0, err_msg=f"{side} row {row}")


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODER_CLASSIFIERS + DEBERTAS)
def test_classifier_scores_match_transformers_on_the_padded_batch(pair, name):
    """The same padded batch through both: the score head reads the same token as transformers'.

    Decoder classifiers on left and right padding (transformers finds the last non-pad token either way);
    DeBERTa on right padding, its tokenizers' (transformers pools index 0, padding under left padding)."""
    torch_model, model, _ = pair(name)
    sides = ("right",) if name in DEBERTAS else ("left", "right")
    for side in sides:
        ids, mask = padded(LENGTHS, SEQ, side, seed=4)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
                                   torch_outputs(torch_model, ids, mask), atol=FP32_TOLERANCE, rtol=0)
        assert np.abs(torch_outputs(torch_model, ids, mask)).max() > 0.1   # the head is not a near-zero map


@pytest.mark.slow
def test_multi_objective_head_gives_k_named_scores(pair):
    """A k-output regression DeBERTa: k scores per row from one forward pass, named by the config's id2label."""
    torch_model, model, directory = pair("deberta_v3_regression")
    assert model.config.num_labels == 3
    assert model.config.labels == ("helpfulness", "correctness", "verbosity")
    ids, mask = padded([9, 5], 10, "right", seed=6)
    scores = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, torch_outputs(torch_model, ids, mask), atol=FP32_TOLERANCE, rtol=0)
    decoder = pair("llama_classifier")[1]
    assert decoder.config.labels == ("helpfulness", "correctness", "verbosity")


@pytest.mark.slow
def test_longrope_switches_to_the_long_factors_past_the_original_context(pair):
    """Phi-3's longrope: a row longer than original_max_position_embeddings (32) uses the long factors, as
    transformers does for it alone; a shorter row in the same batch keeps the short ones."""
    torch_model, model, _ = pair("phi3")
    ids, mask = padded([40, 10], 40, "right", seed=7)
    output = output_array(model(jnp.asarray(ids), jnp.asarray(mask)))
    for row, length in enumerate([40, 10]):
        np.testing.assert_allclose(output[row, :length], torch_outputs(torch_model, ids[row:row + 1, :length])[0],
                                   atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generation_matches_transformers(pair, word_tokenizer, name):
    """mapjax's sampler (left-padded prefill, KV cache, one token per step) against transformers' generate,
    over prompts and continuations longer than the windows."""
    import torch

    from mapjax.generate import generate

    torch_model, model, _ = pair(name)
    tokenizer = word_tokenizer()
    result = generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=8, batch_size=4)
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            reference = torch_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
                1, len(prompt_ids), dtype=torch.long), do_sample=False, max_new_tokens=8, eos_token_id=EOS,
                pad_token_id=PAD)[0, len(prompt_ids):].numpy()
        np.testing.assert_array_equal(result.row_tokens(row), reference[:result.lengths[row]], err_msg=prompt)


@pytest.mark.parametrize("name", CAUSAL + DECODER_CLASSIFIERS + DEBERTAS)
def test_export_round_trip_loads_in_transformers(pair, tmp_path, name):
    """export_pretrained -> transformers loads it -> the same outputs; and mapjax reads it back unchanged."""
    import transformers

    torch_model, model, _ = pair(name)
    export_pretrained(model, tmp_path)
    reloaded = getattr(transformers, model.architecture).from_pretrained(str(tmp_path)).eval()
    ids, mask = padded(LENGTHS, SEQ, "right", seed=5)
    # Same weights, so equal up to PyTorch's own float32 rounding (it may pick other kernels for another instance).
    np.testing.assert_allclose(torch_outputs(reloaded, ids, mask), torch_outputs(torch_model, ids, mask),
                               atol=1e-6, rtol=1e-5)
    again = from_pretrained(tmp_path)
    assert type(again) is type(model) and comparable(again.config) == comparable(model.config)
    assert sorted(again.hf_state_dict()) == sorted(model.hf_state_dict())


# --------------------------------------------------------------------------- #
# Without torch: tiny models built in JAX
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL)
def test_kv_cache_decoding_matches_full_forward(name):
    """Left-padded prefill then one token per step (jitted) equals one forward over the whole sequence, past
    the windows."""
    model = native_model(name)
    prompt_ids, prompt_mask = padded([5, 2, 4], 6, "left", seed=2)
    continuation = np.random.RandomState(5).randint(3, VOCAB, size=(3, 6)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    full_logits = output_array(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))

    @jax.jit
    def step(state, ids, mask, cache):
        output = nnx.merge(graphdef, state)(ids, mask, cache=cache)
        return output.logits, output.cache

    graphdef, state = nnx.split(model)
    logits, cache = step(state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), model.init_cache(3, 16))
    collected = [np.asarray(logits)]
    for position in range(continuation.shape[1]):
        token = jnp.asarray(continuation[:, position:position + 1])
        logits, cache = step(state, token, jnp.ones_like(token), cache)
        collected.append(np.asarray(logits))
    real = full_mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(collected, axis=1)[real], full_logits[real], atol=FP32_TOLERANCE,
                               rtol=0)
    assert int(cache.write_index) == 12


@pytest.mark.slow
@pytest.mark.parametrize("name, field", [("mistral", "sliding_window"), ("gemma2", "attn_logit_softcapping"),
                                         ("gemma2", "final_logit_softcapping")])
def test_windows_and_soft_caps_change_the_outputs_where_they_should(name, field):
    """Switching a window or a soft-cap off changes the logits (so the parity tests above test them); a window
    leaves the first ``sliding_window`` positions alone."""
    model = native_model(name)
    unlimited = type(model).from_config(dataclasses.replace(model.config, **{field: None}), seed=0)
    nnx.update(unlimited, nnx.state(model))
    ids = jnp.asarray(np.random.RandomState(8).randint(3, VOCAB, size=(1, 10)), jnp.int32)
    limited, free = output_array(model(ids))[0], output_array(unlimited(ids))[0]
    # A window first drops a key at position WINDOW; the first position attends to itself alone, capped or not.
    first_unaffected = {"sliding_window": WINDOW, "attn_logit_softcapping": 1}.get(field, 0)
    np.testing.assert_allclose(limited[:first_unaffected], free[:first_unaffected], atol=1e-6)
    # every later position changes
    assert np.abs(limited[first_unaffected:] - free[first_unaffected:]).max(axis=-1).min() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("used, seq", [(40, 1), (40, 6), (13, 13), (7, 1), (48, 3)])
def test_window_and_soft_cap_in_attention_equal_an_explicit_band_mask(monkeypatch, used, seq):
    """``sliding_window`` in the chunked cached attention (which skips the chunks left of every query's window)
    and in the full attention masks exactly the keys an explicit band mask does; ``logit_softcap`` likewise."""
    monkeypatch.setattr(layers.attention, "ATTENTION_CHUNK", 4)
    batch, heads, kv_heads, dim, total, window, cap = 2, 4, 2, 8, 48, 5, 1.5
    keys = jax.random.split(jax.random.PRNGKey(used * 10 + seq), 4)
    query = jax.random.normal(keys[0], (batch, seq, heads, dim))
    cache_k = jax.random.normal(keys[1], (batch, kv_heads, total, dim)) * 3
    cache_v = jax.random.normal(keys[2], (batch, kv_heads, total, dim))
    query_slots, slots = used - seq + np.arange(seq), np.arange(total)
    causal = (slots[None, :] <= query_slots[:, None]) & (slots[None, :] < used)
    allowed = jax.random.bernoulli(keys[3], 0.8, (batch, 1, seq, total)) & causal
    band = allowed & (slots[None, :] > query_slots[:, None] - window)
    used_keys, used_values = cache_k[:, :, :used].transpose(0, 2, 1, 3), cache_v[:, :, :used].transpose(0, 2, 1, 3)
    reference = layers.dot_product_attention(query, used_keys, used_values, band[..., :used], 0.3,
                                             logit_softcap=cap)
    chunked = layers.cached_attention(query, cache_k, cache_v, allowed, jnp.int32(used), 0.3,
                                      sliding_window=window, logit_softcap=cap)
    full = layers.dot_product_attention(query, used_keys, used_values, allowed[..., :used], 0.3,
                                        sliding_window=window, logit_softcap=cap)
    real = np.asarray(band.any(-1))[:, 0]   # rows with at least one key in their window
    assert real.any()
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(reference)[real], atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(full)[real], np.asarray(reference)[real], atol=2e-6, rtol=0)
    uncapped = layers.dot_product_attention(query, used_keys, used_values, band[..., :used], 0.3)
    assert np.abs(np.asarray(uncapped) - np.asarray(reference))[real].max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL)
def test_bfloat16_tracks_float32_and_samples(word_tokenizer, name):
    """The bf16 path: parameters in bfloat16, float32 logits (every output head accumulates and returns float32)
    near the float32 model's, and the sampler runs on it."""
    from mapjax.generate import generate

    model32 = native_model(name)
    model16 = type(model32).from_config(model32.config, dtype=jnp.bfloat16, seed=0)
    nnx.update(model16, jax.tree.map(lambda value: value.astype(jnp.bfloat16), nnx.state(model32, nnx.Param)))
    ids, mask = padded(LENGTHS, SEQ, "left", seed=9)
    assert next(iter(model16.hf_parameters()))[1].get_value().dtype == jnp.bfloat16
    logits16 = model16(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert logits16.dtype == jnp.float32
    real = mask.astype(bool)
    logits32 = output_array(model32(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(np.asarray(logits16, np.float32)[real] - logits32[real]).max() < 0.1
    result = generate(model16, word_tokenizer(), PROMPTS[:2], max_new_tokens=4, seed=0)
    assert result.tokens.shape == (2, 4) and np.isfinite(result.logprobs).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2_classifier", "deberta_v3_regression"])
def test_bfloat16_reward_models_give_float32_scores_near_float32(name):
    model32 = native_model(name)
    model16 = type(model32).from_config(model32.config, dtype=jnp.bfloat16, seed=0)
    nnx.update(model16, jax.tree.map(lambda value: value.astype(jnp.bfloat16), nnx.state(model32, nnx.Param)))
    ids, mask = padded(LENGTHS, SEQ, "right", seed=11)
    scores16 = model16(jnp.asarray(ids), jnp.asarray(mask))
    assert scores16.dtype == jnp.float32
    scores32 = np.asarray(model32(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(np.asarray(scores16) - scores32).max() < 0.05 * max(1.0, np.abs(scores32).max())


@pytest.mark.slow
def test_sequence_logprobs_are_the_full_forward_log_softmax(word_tokenizer):
    """sequence_logprobs on a soft-capped, windowed model: log-softmax of the full forward's logits."""
    from mapjax.generate import sequence_logprobs

    model, tokenizer = native_model("gemma2"), word_tokenizer()
    prompt, continuation = "w5 w6 w7", [9, 10, 11, 12, 13, 14]
    scored = sequence_logprobs(model, tokenizer, [prompt], [continuation])[0]
    ids = tokenizer(prompt)["input_ids"] + continuation
    logits = output_array(model(jnp.asarray([ids], jnp.int32)))[0].astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    start = len(ids) - len(continuation)
    np.testing.assert_allclose(scored, [log_softmax[t - 1, ids[t]] for t in range(start, len(ids))], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "phi3", "qwen2_classifier"])
def test_gradients_reach_every_parameter(name):
    """The ports are differentiable end to end (MAP-F finetunes policies; reward models may be trained)."""
    model = native_model(name)
    ids, mask = padded([9, 4], 9, "left", seed=10)

    def loss(model):
        return (raw_output(model(jnp.asarray(ids), jnp.asarray(mask))).astype(jnp.float32) ** 2).mean()

    for path, value in nnx.to_flat_state(nnx.grad(loss)(model)):
        array = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        assert np.isfinite(array).all() and np.abs(array).max() > 0, f"no gradient reaches {path}"


@pytest.mark.slow
def test_weighted_finetuning_lowers_the_loss(word_tokenizer):
    """MAP-F's weighted finetuning runs on a Gemma 3 policy (q/k norms, two rope bases, windows) and learns."""
    from mapjax import RewardPool
    from mapjax.finetune import FinetuneConfig, finetune

    rng = np.random.RandomState(0)
    generations = tuple(tuple(" ".join(f"w{rng.randint(3, VOCAB)}" for _ in range(6)) for _ in range(4))
                        for _ in PROMPTS)
    pool = RewardPool(rng.normal(size=(len(PROMPTS), 4, 2)), np.ones((len(PROMPTS), 4), bool), ("a", "b"),
                      prompts=tuple(PROMPTS), generations=generations)
    result = finetune(native_model("gemma3"), word_tokenizer(), pool, np.array([2.0, 0.0]), progress=False,
                      config=FinetuneConfig(batch_size=16, steps=6, learning_rate=3e-3, warmup_steps=1))
    assert np.isfinite(result.losses).all() and result.losses[-1] < result.losses[0]


# --------------------------------------------------------------------------- #
# Configs, rope variants and errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32),
    dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=16, beta_fast=16,
         beta_slow=2, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=16,
         short_factor=[1.0 + i / 8 for i in range(8)], long_factor=[2.0 + i for i in range(8)]),
])
def test_rope_variants_match_transformers(rope_parameters):
    """yarn and longrope frequencies and attention scaling (the factor on cos and sin) equal transformers'."""
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                     rope_parameters=dict(rope_parameters))
    spec = layers.rope_spec_from_hf_config(hf, head_dim=16)
    rope_type = rope_parameters["rope_type"]
    for seq_len, max_position in ((None, None), (40, 39)):
        expected, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)
        got = layers.rotary_inverse_frequencies(spec, None if max_position is None else jnp.asarray(max_position))
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=2e-6)
        assert layers.rotary_attention_scaling(spec) == pytest.approx(scaling, rel=1e-12)
    assert layers.rope_spec_from_hf_config(LlamaConfig(hidden_size=64, num_attention_heads=4,
                                                       max_position_embeddings=128,
                                                       rope_parameters=layers.rope_spec_to_hf(spec)), 16) == spec


def test_unsupported_rope_type_names_what_is_supported():
    with pytest.raises(ModelError, match=r"unsupported rope_type 'mrope'.*'yarn', 'longrope'"):
        layers.RopeSpec(rotary_dim=8, rope_type="mrope")


def test_config_errors_name_the_field():
    from mapjax.models.mistral import MistralConfig

    good = model_class("MistralForCausalLM").config_from_hf(hf_config("mistral"))
    with pytest.raises(ModelError, match="layer_types has 3 entries for 2 layers"):
        dataclasses.replace(good, layer_types=("full_attention",) * 3)
    with pytest.raises(ModelError, match=r"unsupported layer types \['chunked_attention'\]"):
        dataclasses.replace(good, layer_types=("full_attention", "chunked_attention"))
    with pytest.raises(ModelError, match="sliding_window must be a positive"):
        MistralConfig(sliding_window=0)
    gemma3 = hf_config("gemma3")
    gemma3.use_bidirectional_attention = True
    with pytest.raises(ModelError, match="embedding model"):
        model_class("Gemma3ForCausalLM").config_from_hf(gemma3)


def test_every_family_is_registered():
    from mapjax.models import supported_architectures

    for architecture, _, _ in FAMILIES.values():
        assert architecture in supported_architectures()
