"""Sliding-window layers keep a ring of ``window`` cache slots (Mistral, Gemma 2/3's local layers).

Oracles: the full forward (no cache), the cache that keeps every slot in every layer (what every layer kept
before the rings: ``CausalLMBase.init_cache``), and transformers' greedy ``generate``. Windows are 4 tokens and
generations run ~10x past them, through both engines, so the ring wraps many times, prompts longer than the
window are prefilled, and the continuous engine refills and rebases ring caches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax.models import from_pretrained, model_class
from mapjax.models.base import CausalLMBase
from mapjax.models.layers.cache import (
    KVCache,
    cache_bytes,
    fit_to_rings,
    relayout_layer,
    ring_length,
    ring_slots,
)
from mapjax.models.llama import LlamaForCausalLM
from mapjax.models.mistral import MistralConfig, MistralForCausalLM
from mapjax.sampling import generate

VOCAB, PAD, BOS, EOS = 100, 0, 1, 2
WINDOW = 4
TOLERANCE = 1e-5
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS,
             eos_token_id=EOS)
_GEMMA = dict(_BASE, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=12)
# name -> (HF architecture, transformers config class, config fields)
FAMILIES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_BASE, sliding_window=WINDOW, head_dim=16)),
    # local layer 0, global layer 1, soft-caps that bite
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_GEMMA, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=3.0)),
    # local layers 0 and 2 on their own rope base, global layer 1
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        _GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
}
# Query/key projections scaled up so that attention is far from uniform (the window then changes the logits).
SHARPEN = 4.0
# 1 to 17 words (plus BOS): length buckets 8, 16 and 32, most prompts longer than the window.
PROMPTS = [" ".join(f"w{3 + (index * 11 + word) % 90}" for word in range(length))
           for index, length in enumerate([6, 1, 11, 3, 17, 9])]
NEW_TOKENS = 40


def hf_config(name: str):
    import transformers

    _, config_class, fields = FAMILIES[name]
    return getattr(transformers, config_class)(**fields)


def native_model(name: str):
    """Tiny model ``name`` in JAX (no torch): random weights, 1-D parameters perturbed, q/k sharpened."""
    cls = model_class(FAMILIES[name][0])
    model = cls.from_config(cls.config_from_hf(hf_config(name)), seed=3)
    rng = np.random.default_rng(3)
    for parameter_name, parameter, _ in model.hf_parameters():
        value = np.asarray(parameter.get_value(), np.float32)
        if value.ndim == 1:
            value = value + 0.1 * rng.standard_normal(value.shape)
        if parameter_name.endswith(("q_proj.weight", "k_proj.weight")):
            value = value * SHARPEN
        parameter.set_value(jnp.asarray(value, jnp.float32))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Factory ``pair(name) -> (torch model, the same weights loaded by mapjax)``; skips without torch."""
    torch = pytest.importorskip("torch")
    import transformers

    built: dict[str, tuple] = {}

    def build(name: str):
        if name not in built:
            torch.manual_seed(0)
            torch_model = getattr(transformers, FAMILIES[name][0])(hf_config(name)).eval()
            with torch.no_grad():
                for parameter_name, parameter in torch_model.named_parameters():
                    if parameter.ndim == 1:
                        parameter.add_(torch.randn_like(parameter) * 0.1)
                    if parameter_name.endswith(("q_proj.weight", "k_proj.weight")):
                        parameter.mul_(SHARPEN)
            directory = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(str(directory))
            built[name] = (torch_model, from_pretrained(directory))
        return built[name]

    return build


def full_slot_cache(model, batch: int, max_len: int) -> KVCache:
    """The cache before the rings: every layer keeps ``max_len`` slots."""
    return CausalLMBase.init_cache(model, batch, max_len)


# --------------------------------------------------------------------------- #
# The ring's bookkeeping
# --------------------------------------------------------------------------- #
def test_ring_slots_name_the_last_slot_of_each_residue():
    np.testing.assert_array_equal(ring_slots(0, 4), [-4, -3, -2, -1])
    np.testing.assert_array_equal(ring_slots(2, 4), [0, 1, -2, -1])
    np.testing.assert_array_equal(ring_slots(7, 4), [4, 5, 6, 3])
    np.testing.assert_array_equal(ring_slots(3, 3), [0, 1, 2])   # a ring as long as the cache: slot order
    assert ring_length(None, 10) == 10 and ring_length(4, 10) == 4 and ring_length(16, 10) == 10


def test_relayout_moves_each_slot_to_its_ring_index():
    # A ring of 3 after 5 slots holds slots 3, 4, 2 at indices 0, 1, 2 (values = slots); moved 6 slots right
    # they are slots 9, 10, 8, which a ring of 4 keeps at indices 1, 2, 0; index 3 stays empty.
    piece = jnp.asarray([3.0, 4.0, 2.0]).reshape(1, 1, 3, 1)
    np.testing.assert_array_equal(relayout_layer(piece, 5, 4, 6)[0, 0, :, 0], [2.0, 3.0, 4.0, 0.0])
    # a linear piece into a longer linear layout is a plain shift
    linear = jnp.arange(1.0, 4.0).reshape(1, 1, 3, 1)
    np.testing.assert_array_equal(relayout_layer(linear, 3, 6, 2)[0, 0, :, 0], [0, 0, 1, 2, 3, 0])
    # into a shorter ring only the newest slots stay
    np.testing.assert_array_equal(relayout_layer(linear, 3, 2, 0)[0, 0, :, 0], [3.0, 2.0])


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, ring_layers", [("mistral", [0, 1]), ("gemma2", [0]), ("gemma3", [0, 2])])
def test_sliding_layers_keep_window_slots(name, ring_layers):
    model = native_model(name)
    cache = model.init_cache(3, 50)
    lengths = [keys.shape[2] for keys in cache.keys]
    assert lengths == [WINDOW if index in ring_layers else 50 for index in range(len(lengths))]
    assert [values.shape for values in cache.values] == [keys.shape for keys in cache.keys]
    assert cache.max_len == 50
    # no longer than the cache: a short cache keeps every slot in every layer
    assert [keys.shape[2] for keys in model.init_cache(3, 3).keys] == [3] * len(lengths)
    config = model.config
    slot_bytes = 2 * config.num_kv_heads * config.head_dim * 4 * 3   # keys and values, float32, 3 rows
    other = 3 * 50 + 4 + 3 * 4                                         # slot_mask, write_index, token_count
    assert cache_bytes(model, 3, 50) == slot_bytes * sum(lengths) + other
    assert cache_bytes(model, 3, 50) < sum(leaf.nbytes for leaf in jax.tree.leaves(full_slot_cache(model, 3, 50)))


def test_a_7b_mistral_cache_for_32k_tokens_holds_the_window():
    """Mistral-7B's shape (32 layers, 8 kv heads of 128, bfloat16, window 4096): a 32k-token row's cache is
    the window's 0.5 GiB per row instead of 4 GiB."""
    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           max_position_embeddings=32768, sliding_window=4096)
    model = nnx.eval_shape(lambda: MistralForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    per_slot = 32 * 2 * 8 * 128 * 2                      # layers x (keys, values) x kv heads x head_dim x bf16
    bookkeeping = 32768 + 4 + 4                          # slot_mask, write_index, token_count
    assert cache_bytes(model, 1, 32768) == per_slot * 4096 + bookkeeping         # 512 MiB + 32 KiB
    full = jax.eval_shape(lambda: full_slot_cache(model, 1, 32768))
    assert sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(full)) == per_slot * 32768 + bookkeeping
    # a plain Llama config keeps every slot
    llama = nnx.eval_shape(lambda: LlamaForCausalLM(dataclasses.replace(config, sliding_window=None),
                                                    dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert cache_bytes(llama, 1, 32768) == per_slot * 32768 + bookkeeping


# --------------------------------------------------------------------------- #
# Exactness
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ring_decoding_equals_the_full_slot_cache_and_the_full_forward(name):
    """Left-padded prefill longer than the window, a 3-token call, then one token per step far past the window:
    the same logits as with every slot kept, and as one forward over the whole sequence."""
    model = native_model(name)
    rng = np.random.RandomState(4)
    lengths, prompt_width, steps = [9, 3, 6], 10, 30
    prompt_ids = np.full((3, prompt_width), PAD, np.int32)
    prompt_mask = np.zeros((3, prompt_width), np.int32)
    for row, length in enumerate(lengths):
        prompt_ids[row, -length:], prompt_mask[row, -length:] = rng.randint(3, VOCAB, size=length), 1
    continuation = rng.randint(3, VOCAB, size=(3, 3 + steps)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    expected = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits)

    graphdef, state = nnx.split(model)

    @jax.jit
    def call(state, ids, mask, cache):
        output = nnx.merge(graphdef, state)(ids, mask, cache=cache)
        return output.logits, output.cache

    def decode(cache):
        logits, cache = call(state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), cache)
        collected = [np.asarray(logits)]
        logits, cache = call(state, jnp.asarray(continuation[:, :3]), jnp.ones((3, 3), jnp.int32), cache)
        collected.append(np.asarray(logits))
        for position in range(3, continuation.shape[1]):
            token = jnp.asarray(continuation[:, position:position + 1])
            logits, cache = call(state, token, jnp.ones_like(token), cache)
            collected.append(np.asarray(logits))
        return np.concatenate(collected, axis=1), cache

    max_len = full_ids.shape[1] + 2
    ring, ring_cache = decode(model.init_cache(3, max_len))
    assert min(keys.shape[2] for keys in ring_cache.keys) == WINDOW
    every_slot, every_slot_cache = decode(full_slot_cache(model, 3, max_len))
    # the every-slot cache laid out in rings is the ring cache, at the real tokens' slots (a pad query's keys in
    # deeper layers depend on which masked keys it averaged over, and are never read)
    fitted = fit_to_rings(every_slot_cache, [keys.shape[2] for keys in ring_cache.keys])
    for mine, theirs in zip(fitted.keys + fitted.values, ring_cache.keys + ring_cache.values):
        held = np.asarray(ring_slots(ring_cache.write_index, theirs.shape[2]))
        real_slots = np.asarray(ring_cache.slot_mask)[:, np.maximum(held, 0)] & (held >= 0)
        np.testing.assert_allclose(np.asarray(mine).transpose(0, 2, 1, 3)[real_slots],
                                   np.asarray(theirs).transpose(0, 2, 1, 3)[real_slots], atol=TOLERANCE, rtol=0)
    real = full_mask.astype(bool)
    np.testing.assert_allclose(ring[real], every_slot[real], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ring[real], expected[real], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_long_greedy_generation_matches_transformers_on_both_engines(pair, word_tokenizer, name):
    """Greedy tokens 10x past the window equal transformers' ``generate(do_sample=False)``, and their
    log-probabilities its scores, through the static engine and the continuous one (2 slots, 3-step chunks:
    refills into ring caches and rebases of them)."""
    import torch

    torch_model, model = pair(name)
    tokenizer = word_tokenizer()
    options = dict(greedy=True, max_new_tokens=NEW_TOKENS, eos_token_id=EOS)
    static = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **options)
    continuous = generate(model, tokenizer, PROMPTS, batch_size=2, engine="continuous", chunk_steps=3, **options)
    np.testing.assert_array_equal(continuous.lengths, static.lengths)
    np.testing.assert_array_equal(continuous.tokens, static.tokens)
    np.testing.assert_allclose(continuous.logprobs, static.logprobs, atol=TOLERANCE, rtol=0)
    assert static.lengths.max() > 5 * WINDOW
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            reference = torch_model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
                output_scores=True, return_dict_in_generate=True)
        tokens = reference.sequences[0, len(prompt_ids):].numpy()
        length = int(static.lengths[row])
        np.testing.assert_array_equal(static.row_tokens(row), tokens[:length], err_msg=prompt)
        scores = torch.log_softmax(torch.stack(reference.scores)[:, 0].float(), dim=-1).numpy()
        expected = scores[np.arange(length), tokens[:length]]
        np.testing.assert_allclose(static.logprobs[row, :length], expected, atol=TOLERANCE, rtol=0, err_msg=prompt)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral"])
def test_sampled_rows_equal_the_full_slot_caches_on_both_engines(monkeypatch, word_tokenizer, name):
    """Sampling (top-k, 2 samples per prompt, rows ending at different steps) with ring caches gives the rows
    that caches keeping every slot give, on both engines."""
    model, tokenizer = native_model(name), word_tokenizer()
    options = dict(max_new_tokens=NEW_TOKENS, top_k=20, seed=7, num_samples=2, eos_token_id=list(range(3, 8)))
    static = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **options)
    continuous = generate(model, tokenizer, PROMPTS, batch_size=3, engine="continuous", chunk_steps=5, **options)
    # The compiled programs create their caches by tracing ``init_cache``: clear them around the swap.
    jax.clear_caches()
    monkeypatch.setattr(LlamaForCausalLM, "init_cache", full_slot_cache)
    try:
        every_slot = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **options)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert len(set(static.lengths.tolist())) > 2
    for result in (continuous, every_slot):
        np.testing.assert_array_equal(result.lengths, static.lengths)
        np.testing.assert_array_equal(result.tokens, static.tokens)
        np.testing.assert_allclose(result.logprobs, static.logprobs, atol=TOLERANCE, rtol=0)
