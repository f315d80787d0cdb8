"""The sampler, sequence log-probs and the perplexity reward on tiny random GPT-2 / Llama models.

Oracles: the model's own full forward (no cache); in the parity tests, transformers' PyTorch ``generate`` and
loss on a model with the same weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.errors import GenerationError
from mapjax.generate import generate, sequence_logprobs, trace_counts
from mapjax.models import from_pretrained

BOS, EOS, PAD = 1, 2, 0
PROMPTS = ["w5 w17 w33", "w8", "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50", "w90 w3 w3 w7 w61"]


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa_tied"])
def tiny(request, tiny_model, word_tokenizer):
    """(mapjax model, tokenizer) for a tiny random decoder built in JAX."""
    return tiny_model(request.param), word_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa_tied"])
def torch_pair(request, torch_tiny_model, word_tokenizer, tmp_path_factory):
    """(torch model, the same weights in mapjax, tokenizer): for the parity tests."""
    torch_model = torch_tiny_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(str(directory))
    return torch_model, from_pretrained(directory), word_tokenizer()


_FORWARDS = {}


def full_forward_logits(model, ids, width=32):
    """Logits [len(ids), vocab] from one full forward without a cache (right-padded to a fixed width, jitted)."""
    import jax
    from flax import nnx

    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        _FORWARDS[id(model)] = (jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).logits),
                                state)
    forward, state = _FORWARDS[id(model)]
    padded, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    return np.asarray(forward(state, jnp.asarray(padded), jnp.asarray(mask)))[0, :len(ids)]


@pytest.mark.slow
def test_greedy_is_stepwise_argmax(tiny):
    model, tokenizer = tiny
    result = generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=8, batch_size=4)
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert prompt_ids[0] == BOS
        # argmax of the model's own logits, one full forward (no cache) per step
        ids, expected = list(prompt_ids), []
        for _ in range(8):
            token = int(np.argmax(full_forward_logits(model, ids)[-1]))
            expected.append(token)
            ids.append(token)
            if token == EOS:
                break
        np.testing.assert_array_equal(result.row_tokens(row), expected)


@pytest.mark.slow
def test_greedy_matches_transformers(torch_pair):
    import torch

    torch_model, model, tokenizer = torch_pair
    result = generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=8, batch_size=4)
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            reference = torch_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                             dtype=torch.long), do_sample=False, max_new_tokens=8,
                                             eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt_ids):].numpy()
        np.testing.assert_array_equal(result.row_tokens(row), reference[:result.lengths[row]])


@pytest.mark.slow
def test_top_k_only_emits_top_k_tokens(tiny):
    model, tokenizer = tiny
    k = 3
    result = generate(model, tokenizer, PROMPTS[:2], top_k=k, max_new_tokens=6, num_samples=3, seed=1)
    for row in range(len(result.texts)):
        ids = list(result.prompt_tokens[result.prompt_index[row]])
        for token in result.row_tokens(row):
            logits = full_forward_logits(model, ids)[-1]
            kth_largest = np.sort(logits)[-k]
            assert logits[token] >= kth_largest - 1e-5
            ids.append(int(token))


@pytest.mark.slow
def test_top_p_keeps_the_nucleus(tiny):
    model, tokenizer = tiny
    result = generate(model, tokenizer, PROMPTS[:1], top_k=None, top_p=1e-4, max_new_tokens=4, num_samples=4)
    greedy = generate(model, tokenizer, PROMPTS[:1], greedy=True, max_new_tokens=4)
    # A nucleus smaller than the top probability keeps only the most likely token.
    for row in range(4):
        np.testing.assert_array_equal(result.row_tokens(row), greedy.row_tokens(0))


@pytest.mark.slow
def test_seeding_and_batch_size_invariance(tiny):
    model, tokenizer = tiny
    options = dict(max_new_tokens=6, num_samples=3, top_k=20)
    first = generate(model, tokenizer, PROMPTS, seed=7, batch_size=4, **options)
    again = generate(model, tokenizer, PROMPTS, seed=7, batch_size=2, **options)
    other = generate(model, tokenizer, PROMPTS, seed=8, batch_size=4, **options)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)
    # the samples of one prompt differ from each other
    assert len({tuple(first.tokens[row]) for row in range(3)}) > 1
    np.testing.assert_array_equal(first.prompt_index, np.repeat(np.arange(4), 3))
    np.testing.assert_array_equal(first.sample_index, np.tile(np.arange(3), 4))
    # a chunk of the prompt list with its offset samples what the whole list samples
    chunk = generate(model, tokenizer, PROMPTS[2:], seed=7, prompt_index_offset=2, **options)
    np.testing.assert_array_equal(chunk.tokens, first.tokens[6:])


@pytest.mark.slow
def test_eos_stops_rows_and_pads(tiny):
    model, tokenizer = tiny
    free = generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=6, eos_token_id=-5)
    assert (free.lengths == 6).all()
    stop = int(free.tokens[0, 2])   # make row 0's third token the end-of-sequence token
    stopped = generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=6, eos_token_id=stop)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[row] == stop)
        length = int(hits[0]) + 1 if hits.size else 6
        assert stopped.lengths[row] == length
        np.testing.assert_array_equal(stopped.tokens[row, :length], free.tokens[row, :length])
        assert (stopped.tokens[row, length:] == PAD).all()
        assert (stopped.logprobs[row, length:] == 0).all()
    assert stopped.lengths[0] <= 3 and stopped.texts[0].split()[-1] == f"w{stop}"


@pytest.mark.slow
def test_padding_and_bucketing_do_not_change_results(tiny):
    model, tokenizer = tiny
    alone = generate(model, tokenizer, [PROMPTS[1]], greedy=True, max_new_tokens=6)
    long_prompt = " ".join(f"w{3 + i}" for i in range(20))   # a 32-token bucket instead of 8
    together = generate(model, tokenizer, [long_prompt, PROMPTS[1], PROMPTS[0]], greedy=True, max_new_tokens=6)
    np.testing.assert_array_equal(alone.row_tokens(0), together.row_tokens(1))
    np.testing.assert_allclose(alone.logprobs[0], together.logprobs[1], atol=1e-5)


@pytest.mark.slow
def test_bucketing_reuses_compiled_programs(tiny):
    model, tokenizer = tiny
    # the static engine's prefill and loop, one program per length bucket (the continuous engine's own count is
    # tests/test_sampling_engine.py's)
    options = dict(max_new_tokens=5, batch_size=2, seed=3, engine="static")
    generate(model, tokenizer, ["w3 w4", "w5"], **options)                  # 3 and 2 tokens: bucket 8
    before = trace_counts()
    generate(model, tokenizer, ["w3 w4 w5 w6 w7", "w9 w10 w11"], **options)  # 6 and 4 tokens: bucket 8
    assert trace_counts() == before
    generate(model, tokenizer, [" ".join(["w3"] * 12), "w5"], **options)     # 13 tokens: bucket 16
    after = trace_counts()
    assert after["prefill"] == before["prefill"] + 1 and after["sample_loop"] == before["sample_loop"] + 1


@pytest.mark.slow
def test_sequence_logprobs_match_full_forward_and_sampler(tiny):
    model, tokenizer = tiny
    result = generate(model, tokenizer, PROMPTS, max_new_tokens=7, num_samples=2, seed=5, eos_token_id=-1)
    prompts = [PROMPTS[i] for i in result.prompt_index]
    scored = sequence_logprobs(model, tokenizer, prompts, [result.row_tokens(r) for r in range(len(prompts))],
                               batch_size=3)
    for row, values in enumerate(scored):
        np.testing.assert_allclose(values, result.logprobs[row, :result.lengths[row]], atol=1e-4)
        ids = list(result.prompt_tokens[result.prompt_index[row]]) + list(result.row_tokens(row))
        logits = full_forward_logits(model, ids).astype(np.float64)
        log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        start = len(result.prompt_tokens[result.prompt_index[row]])
        expected = [log_softmax[t - 1, ids[t]] for t in range(start, len(ids))]
        np.testing.assert_allclose(values, expected, atol=1e-4)
    # text continuations are encoded on their own, without special tokens
    text = sequence_logprobs(model, tokenizer, ["w5 w6"], ["w7 w8 w9"])[0]
    tokens = sequence_logprobs(model, tokenizer, ["w5 w6"], [[7, 8, 9]])[0]
    assert text.shape == (3,)
    np.testing.assert_allclose(text, tokens, atol=1e-6)
    assert sequence_logprobs(model, tokenizer, ["w5"], [""])[0].shape == (0,)


@pytest.mark.slow
def test_perplexity_reward_is_the_mean_token_logprob(tiny):
    from mapjax.rewards import get_reward

    model, tokenizer = tiny
    reward = get_reward("perplexity", model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["w5 w17 w33", "w8", ""]
    continuations = [" w9 w9 w12", " w50 w51 w52 w53 w54 w55", "w7"]
    scores = reward(prompts, continuations)
    for score, prompt, continuation in zip(scores, prompts, continuations):
        ids = tokenizer(prompt + continuation)["input_ids"]
        logits = full_forward_logits(model, ids).astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        expected = np.mean([log_softmax[t - 1, ids[t]] for t in range(1, len(ids))])
        assert score == pytest.approx(expected, abs=1e-4)
    # a text of one token (the BOS alone) is scored after a prepended BOS
    single = reward([""], [""])[0]
    logits = full_forward_logits(model, [BOS, BOS]).astype(np.float64)[0]
    assert single == pytest.approx(logits[BOS] - np.log(np.exp(logits - logits.max()).sum()) - logits.max(),
                                   abs=1e-4)


@pytest.mark.slow
def test_perplexity_reward_matches_transformers_loss(torch_pair):
    import torch

    from mapjax.rewards import get_reward

    torch_model, model, tokenizer = torch_pair
    reward = get_reward("perplexity", model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["w5 w17 w33", "w8", "w40 w41", ""]
    continuations = [" w9 w9 w12", " w50 w51 w52 w53 w54 w55", "", "w7"]
    scores = reward(prompts, continuations)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    for score, prompt, continuation in zip(scores, prompts, continuations):
        ids = torch.tensor([tokenizer(prompt + continuation)["input_ids"]])
        with torch.inference_mode():
            loss = torch_model(input_ids=ids, labels=ids).loss.item()
        assert score == pytest.approx(-loss, abs=1e-4)


def test_perplexity_reward_needs_the_model():
    from mapjax.rewards import RewardError, get_reward

    with pytest.raises(RewardError, match="generating model"):
        get_reward("perplexity")


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(top_k=0), r"top_k must be an integer >= 1, got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(num_samples=0), r"num_samples must be an integer >= 1"),
    (dict(batch_size=-1), r"batch_size must be an integer >= 1"),
])
def test_bad_options_are_named(tiny, options, message):
    model, tokenizer = tiny
    with pytest.raises(GenerationError, match=message):
        generate(model, tokenizer, PROMPTS, **options)


def test_bad_prompts_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"prompts\[1\] is a int"):
        generate(model, tokenizer, ["w3", 7])
    with pytest.raises(ValueError, match="single string"):
        generate(model, tokenizer, "w3 w4")
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        sequence_logprobs(model, tokenizer, ["w3", "w4"], ["w5"])


def test_prompt_longer_than_the_model_positions_is_refused(tiny):
    """Learned position tables (GPT-2) and rotary models (Llama, its trained context) share one limit."""
    model, tokenizer = tiny
    assert model.max_positions == 64
    with pytest.raises(GenerationError, match=r"prompts\[0\] has 61 tokens; with max_new_tokens=10 that exceeds the "
                                         r"model's 64 positions"):
        generate(model, tokenizer, [" ".join(["w3"] * 60)], max_new_tokens=10)


@pytest.mark.slow
def test_grouped_prefill_matches_rows_sampled_alone(tiny, monkeypatch):
    """A batch mixing short and long prompts is prefilled in length groups (each padded to its own bucket);
    every row still gets exactly what it gets sampled alone."""
    import mapjax.sampling.prefill as sampler

    model, tokenizer = tiny
    monkeypatch.setattr(sampler, "PREFILL_GROUP_ROWS", 2)
    prompts = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(length)) for i, length in
               enumerate([1, 2, 3, 9, 14, 20, 4, 25])]
    options = dict(max_new_tokens=5, top_k=20, seed=11)
    grouped = generate(model, tokenizer, prompts, batch_size=8, **options)
    greedy = generate(model, tokenizer, prompts, batch_size=8, greedy=True, max_new_tokens=5)
    for index, prompt in enumerate(prompts):
        alone = generate(model, tokenizer, [prompt], prompt_index_offset=index, **options)
        np.testing.assert_array_equal(grouped.tokens[index], alone.tokens[0])
        np.testing.assert_allclose(grouped.logprobs[index], alone.logprobs[0], atol=1e-5)
        ids = tokenizer(prompt)["input_ids"] + list(greedy.row_tokens(index))
        expected = full_forward_logits(model, ids[:-1], width=64)[len(ids) - 1 - 5:].argmax(-1)
        np.testing.assert_array_equal(greedy.row_tokens(index), expected)


@pytest.mark.slow
@pytest.mark.parametrize("total,used,chunk", [(20, 20, 64), (130, 67, 64), (130, 130, 64), (100, 37, 16),
                                              (100, 100, 16), (23, 9, 4)])
def test_cached_attention_over_used_slots_equals_full_attention(monkeypatch, total, used, chunk):
    """The chunked online softmax over the first ``used`` slots equals plain attention over the whole cache
    (slots past ``used`` hold garbage that must not leak), including a last chunk that overruns the cache and
    a query row whose every key is masked (which must stay finite)."""
    import jax

    from mapjax.models import layers

    monkeypatch.setattr(layers.attention, "ATTENTION_CHUNK", chunk)
    batch, seq, heads, kv_heads, dim = 3, 4, 6, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(total * 1000 + used), 4)
    query = jax.random.normal(keys[0], (batch, seq, heads, dim))
    cache_k = jax.random.normal(keys[1], (batch, kv_heads, total, dim)) * 3
    cache_v = jax.random.normal(keys[2], (batch, kv_heads, total, dim))
    allowed = jax.random.bernoulli(keys[3], 0.7, (batch, 1, seq, total)) & (jnp.arange(total) < used)
    allowed = allowed.at[1, 0, 2].set(False)   # a pad query: nothing to attend to
    chunked = layers.cached_attention(query, cache_k, cache_v, allowed, jnp.int32(used), 0.35)
    full = layers.dot_product_attention(query, cache_k.transpose(0, 2, 1, 3), cache_v.transpose(0, 2, 1, 3),
                                        allowed, 0.35)
    assert np.isfinite(np.asarray(chunked)).all()
    real = np.asarray(allowed.any(-1))[:, 0]   # rows with at least one key
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(full)[real], atol=2e-6, rtol=0)
