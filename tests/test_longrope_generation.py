"""Phi-3 longrope generation across ``original_max_position_embeddings`` against transformers' ``generate``.

Transformers drops its cache at the step whose total length first passes ``original_max_position_embeddings``
and runs the whole sequence again with the long factors, so each of its greedy logits equals one forward over
the sequence so far. A cached mapjax decode matches it by making that step with ``call_recomputing_cache``
(chosen by ``stale_cache_rows``, inside jit through ``lax.cond``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

ORIGINAL_CONTEXT = 16
NEW_TOKENS = 10
CACHE_SLOTS = 32
FP32_TOLERANCE = 1e-4
_CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               original_max_position_embeddings=ORIGINAL_CONTEXT, rope_parameters=dict(
                   rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                   short_factor=[1.0, 1.5], long_factor=[3.0, 7.0]))


@pytest.fixture(scope="module")
def phi3_pair(tmp_path_factory):
    """(transformers Phi-3 with longrope switching at 16 tokens, the same weights in mapjax)."""
    torch = pytest.importorskip("torch")
    import transformers

    from mapjax.models import from_pretrained

    torch.manual_seed(0)
    torch_model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**_CONFIG)).eval()
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if parameter.ndim == 1:   # norm scales start at 1
                parameter.add_(torch.randn_like(parameter) * 0.1)
            if name == "lm_head.weight":
                parameter.mul_(20.0)   # logits of order 1, so the tolerance means something
    directory = tmp_path_factory.mktemp("phi3-longrope")
    torch_model.save_pretrained(str(directory))
    return torch_model, from_pretrained(directory)


def prompt_of(length: int, seed: int) -> list[int]:
    return [1] + list(np.random.RandomState(seed).randint(3, 100, size=length - 1))


@functools.lru_cache(maxsize=None)
def _transformers_greedy(torch_model, prompt: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    import torch

    with torch.inference_mode():
        out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[0, len(prompt):].tolist(), np.stack([step[0].numpy() for step in out.logits])


def _step(graphdef, state, slot_ids, token, cache, recompute: bool):
    """One greedy step of a cached decode; with ``recompute``, stale longrope rows take the recomputing call."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    ids, mask = token[:, None], jnp.ones((token.shape[0], 1), jnp.int32)
    if not recompute:
        output = model(ids, mask, cache=cache)
        return output.logits[:, -1], output.cache
    stale = model.stale_cache_rows(cache, ids, mask)
    output = jax.lax.cond(jnp.any(stale),
                          lambda: model.call_recomputing_cache(slot_ids, ids, mask, cache=cache),
                          lambda: model(ids, mask, cache=cache))
    return output.logits[:, -1], output.cache


_step_jit = jax.jit(_step, static_argnames=("graphdef", "recompute"))


def _prefill(graphdef, state, ids, mask):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return model(ids, mask, cache=model.init_cache(ids.shape[0], CACHE_SLOTS)).cache


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef",))


def mapjax_greedy(model, prompts: list[list[int]], recompute: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens ``[rows, NEW_TOKENS]`` and logits ``[rows, NEW_TOKENS, vocab]``: prompts left-padded, every
    token but the last prefilled, then one token per step (the sampler's layout), keeping each slot's token id."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    width = max(len(prompt) for prompt in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    cache = _prefill_jit(graphdef, state, jnp.asarray(ids[:, :-1]), jnp.asarray(mask[:, :-1]))
    slot_ids = np.zeros((len(prompts), CACHE_SLOTS), np.int32)
    slot_ids[:, :width - 1] = ids[:, :-1]
    token, tokens, logits = ids[:, -1], [], []
    for step in range(NEW_TOKENS):
        step_logits, cache = _step_jit(graphdef, state, jnp.asarray(slot_ids), jnp.asarray(token), cache,
                                       recompute=recompute)
        slot_ids[:, width - 1 + step] = token
        token = np.asarray(jnp.argmax(step_logits, axis=-1), np.int32)
        tokens.append(token)
        logits.append(np.asarray(step_logits))
    return np.stack(tokens, axis=1), np.stack(logits, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [[10], [ORIGINAL_CONTEXT + 1], [20], [10, 13, ORIGINAL_CONTEXT]],
                         ids=["crosses-mid-generation", "crosses-at-the-first-step", "starts-above", "batch"])
def test_greedy_logits_match_transformers_across_the_switch(phi3_pair, lengths):
    """Every step's logits and token equal transformers' single-row ``generate``, before and after the total
    length passes original_max_position_embeddings (rows of a batch cross at different steps)."""
    torch_model, model = phi3_pair
    prompts = [prompt_of(length, seed) for seed, length in enumerate(lengths)]
    tokens, logits = mapjax_greedy(model, prompts)
    for row, prompt in enumerate(prompts):
        expected_tokens, expected_logits = _transformers_greedy(torch_model, tuple(prompt))
        assert tokens[row].tolist() == expected_tokens
        np.testing.assert_allclose(logits[row], expected_logits, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.slow
def test_without_recomputing_the_logits_leave_transformers_at_the_switch(phi3_pair):
    """The plain cached call keeps short-rotated keys past the switch: equal to transformers before it, not
    after (what ``call_recomputing_cache`` is for)."""
    torch_model, model = phi3_pair
    prompt = prompt_of(10, 0)
    _, logits = mapjax_greedy(model, [prompt], recompute=False)
    _, expected = _transformers_greedy(torch_model, tuple(prompt))
    gaps = np.abs(logits[0] - expected).max(axis=-1)
    crossing = ORIGINAL_CONTEXT - len(prompt) + 1   # first step whose input sits at position 16
    assert np.all(gaps[:crossing] <= FP32_TOLERANCE)
    assert np.all(gaps[crossing:] > 1e-3)


def _transformers_logprobs(torch_model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Transformers' greedy tokens and the log-probability of each under its step's logits."""
    tokens, logits = _transformers_greedy(torch_model, tuple(prompt))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return tokens, log_softmax[np.arange(len(tokens)), tokens]


@pytest.mark.slow
@pytest.mark.parametrize("engine,batch_size", [("static", 4), ("static", 1), ("continuous", 1),
                                               ("continuous", 2), ("continuous", 4)])
def test_generate_follows_transformers_across_the_switch(phi3_pair, word_tokenizer, engine, batch_size):
    """``generate`` (either engine, any slot count, refills and rebases mid-row with 3-step chunks) gives each
    row transformers' greedy tokens and their log-probabilities, before and after its crossing."""
    from mapjax.sampling import generate

    torch_model, model = phi3_pair
    lengths = [10, ORIGINAL_CONTEXT + 1, 13, 20, ORIGINAL_CONTEXT, 7]
    prompts = [prompt_of(length, seed) for seed, length in enumerate(lengths)]
    texts = [" ".join(f"w{token}" for token in prompt[1:]) for prompt in prompts]
    result = generate(model, word_tokenizer(), texts, greedy=True, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                      batch_size=batch_size, engine=engine, chunk_steps=3)
    assert result.prompt_tokens == prompts
    for row, prompt in enumerate(prompts):
        expected_tokens, expected_logprobs = _transformers_logprobs(torch_model, prompt)
        assert result.tokens[row].tolist() == expected_tokens
        np.testing.assert_allclose(result.logprobs[row], expected_logprobs, atol=FP32_TOLERANCE, rtol=0)


def test_only_a_longrope_model_makes_the_sampler_track_slot_tokens():
    import transformers

    from mapjax.models.phi3 import Phi3ForCausalLM
    from mapjax.sampling.state import tracks_slot_tokens

    longrope = Phi3ForCausalLM.config_from_hf(transformers.Phi3Config(**_CONFIG))
    plain = Phi3ForCausalLM.config_from_hf(transformers.Phi3Config(**{**_CONFIG, "rope_parameters": None}))
    assert tracks_slot_tokens(Phi3ForCausalLM.from_config(longrope, seed=0))
    assert not tracks_slot_tokens(Phi3ForCausalLM.from_config(plain, seed=0))


def test_stale_cache_rows_flags_the_crossing_call_only():
    """Stale: some tokens cached, at most original_max_position_embeddings of them, and the call passes it."""
    from mapjax.models.layers.rope import RopeSpec, longrope_cache_is_stale

    spec = RopeSpec(rotary_dim=4, rope_type="longrope", original_max_position_embeddings=ORIGINAL_CONTEXT,
                    short_factor=(1.0, 1.0), long_factor=(2.0, 2.0))
    cached = jnp.asarray([0, 10, 15, 16, 16, 17, 15])
    call = jnp.asarray([20, 1, 1, 1, 0, 1, 2])
    assert longrope_cache_is_stale(spec, cached, call).tolist() == [False, False, False, True, False, False, True]
    other = RopeSpec(rotary_dim=4)
    assert not longrope_cache_is_stale(other, cached, call).any()


@pytest.mark.slow
def test_call_recomputing_cache_refuses_mismatched_slot_ids():
    import transformers

    from mapjax.errors import ModelError
    from mapjax.models.phi3 import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_config(Phi3ForCausalLM.config_from_hf(transformers.Phi3Config(**_CONFIG)), seed=0)
    cache = model.init_cache(1, 8)
    with pytest.raises(ModelError, match=r"slot_ids shape \(1, 4\) must equal .* \(1, 8\)"):
        model.call_recomputing_cache(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 1), jnp.int32), cache=cache)
