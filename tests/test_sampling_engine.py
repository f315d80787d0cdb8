"""The continuous-batching engine against the static path, on tiny random models.

Oracle: the static path (``engine="static"``), itself checked against full forwards and transformers in
tests/test_generate.py. A row's tokens depend only on (seed, prompt index, sample index), so every slot count
and chunk length must give the static path's tokens, and its log-probabilities to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from mapjax.errors import GenerationError
from mapjax.sampling import generate, last_run_stats, trace_counts

# Mixed lengths: length buckets 8, 16 and 32, so refills prefill several buckets and rebase the cache both ways.
PROMPTS = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(length))
           for i, length in enumerate([1, 2, 3, 9, 14, 20, 4, 25])]
# Many end ids, so that rows end after different numbers of tokens (random weights rarely pick the real EOS).
OPTIONS = dict(max_new_tokens=12, top_k=20, seed=5, num_samples=2, eos_token_id=list(range(3, 20)))


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model, word_tokenizer):
    return tiny_model("llama_gqa_tied"), word_tokenizer()


@pytest.fixture(scope="module")
def static_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **OPTIONS)
    return result, last_run_stats()


@pytest.mark.slow
def test_engine_samples_the_static_paths_rows_on_one_bucket(tiny_model, word_tokenizer):
    """The quick check (one length bucket, few programs); the slow tests below mix buckets."""
    model, tokenizer = tiny_model("gpt2"), word_tokenizer()
    prompts, options = PROMPTS[:3], dict(OPTIONS, max_new_tokens=6)
    expected = generate(model, tokenizer, prompts, batch_size=8, engine="static", **options)
    result = generate(model, tokenizer, prompts, batch_size=2, engine="continuous", chunk_steps=2, **options)
    assert last_run_stats().loop_calls > 3
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_engine_samples_the_static_paths_rows(model_and_tokenizer, static_rows, slots):
    model, tokenizer = model_and_tokenizer
    expected, _ = static_rows
    assert len(set(expected.lengths.tolist())) > 2   # rows end at different steps: slots really get refilled
    result = generate(model, tokenizer, PROMPTS, batch_size=slots, engine="continuous", chunk_steps=3, **OPTIONS)
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    assert result.texts == expected.texts
    np.testing.assert_array_equal(result.prompt_index, expected.prompt_index)
    np.testing.assert_array_equal(result.sample_index, expected.sample_index)


@pytest.mark.slow
def test_greedy_rows_match_and_refills_reuse_compiled_programs(model_and_tokenizer):
    """Chunks and refills compile once per shape: a second call with other prompts in the same buckets traces
    nothing, and within one call the chunk is traced once however many refills it takes."""
    model, tokenizer = model_and_tokenizer
    options = dict(max_new_tokens=10, batch_size=4, engine="continuous", chunk_steps=5,
                   eos_token_id=list(range(3, 30)))
    before = trace_counts()
    first = generate(model, tokenizer, PROMPTS[:6], greedy=True, **options)
    warm = trace_counts()
    assert last_run_stats().loop_calls > 2                                   # several chunks, with refills
    assert warm.get("sample_chunk", 0) == before.get("sample_chunk", 0) + 1
    assert warm.get("rebase", 0) <= before.get("rebase", 0) + 1
    others = [" ".join(f"w{40 + j}" for j in range(len(prompt.split()))) for prompt in PROMPTS[:6]]
    generate(model, tokenizer, others, greedy=True, **options)
    assert trace_counts() == warm
    static = generate(model, tokenizer, PROMPTS[:6], greedy=True, **{**options, "engine": "static"})
    np.testing.assert_array_equal(first.tokens, static.tokens)


@pytest.mark.slow
def test_continuous_slots_idle_less_than_static_batches(model_and_tokenizer, static_rows):
    model, tokenizer = model_and_tokenizer
    _, static_stats = static_rows
    generate(model, tokenizer, PROMPTS, batch_size=4, engine="continuous", chunk_steps=3, **OPTIONS)
    continuous_stats = last_run_stats()
    assert continuous_stats.useful_tokens == static_stats.useful_tokens
    assert continuous_stats.idle_fraction < static_stats.idle_fraction


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_stop_lengths_cut_each_row_where_told(model_and_tokenizer, engine):
    """A row ends at its EOS or its stop length, whichever is first, with the uncapped row's tokens up to there
    (its keys do not depend on the cap), in both engines."""
    model, tokenizer = model_and_tokenizer
    options = dict(OPTIONS, eos_token_id=[3, 4, 5])   # few end ids: some rows end by EOS, most by their cap
    expected = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **options)
    rows = len(expected.lengths)
    stop = 1 + np.random.RandomState(0).randint(0, OPTIONS["max_new_tokens"], size=rows)
    result = generate(model, tokenizer, PROMPTS, batch_size=3, engine=engine, chunk_steps=2, stop_lengths=stop,
                      **options)
    lengths = np.minimum(expected.lengths, stop)
    assert (lengths < expected.lengths).sum() > rows // 2   # the cap binds on most rows ...
    assert (expected.lengths < stop).sum() >= 2             # ... and EOS comes first on some
    np.testing.assert_array_equal(result.lengths, lengths)
    for row in range(rows):
        np.testing.assert_array_equal(result.row_tokens(row), expected.tokens[row, :lengths[row]])
        np.testing.assert_allclose(result.logprobs[row, :lengths[row]], expected.logprobs[row, :lengths[row]],
                                   atol=1e-5, rtol=0)
    assert last_run_stats().useful_tokens == int(lengths.sum())


@pytest.mark.parametrize("stop_lengths,message", [
    ([3, 4], r"stop_lengths must hold one integer per row \(4 = prompts x num_samples\), got int64 of shape \(2,\)"),
    ([3.0, 4.0, 1.0, 2.0], r"stop_lengths must hold one integer per row"),
    ([3, 0, 2, 2], r"stop_lengths\[1\] = 0 is outside 1 \.\.\. max_new_tokens=12"),
    ([3, 2, 13, 2], r"stop_lengths\[2\] = 13 is outside 1 \.\.\. max_new_tokens=12"),
])
def test_bad_stop_lengths_are_named(model_and_tokenizer, stop_lengths, message):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(GenerationError, match=message):
        generate(model, tokenizer, PROMPTS[:2], stop_lengths=np.asarray(stop_lengths), **OPTIONS)


@pytest.mark.parametrize("options,message", [
    (dict(engine="dynamic"), r"engine must be one of 'static', 'continuous', got 'dynamic'"),
    (dict(engine="continuous", chunk_steps=0), r"chunk_steps must be an integer >= 1, got 0"),
])
def test_bad_engine_options_are_named(model_and_tokenizer, options, message):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(GenerationError, match=message):
        generate(model, tokenizer, PROMPTS[:1], **options)


FOUR_DEVICES = '''
import numpy as np
from conftest import build_tiny_model, make_word_tokenizer
from test_sampling_engine import OPTIONS, PROMPTS
from mapjax.sampling import generate

RESULT = {}
tokenizer = make_word_tokenizer()
for name in ("gpt2", "llama_gqa_tied"):
    model = build_tiny_model(name)
    plain = generate(model, tokenizer, PROMPTS, batch_size=4, engine="static", **OPTIONS)
    for mesh, slots in (("data=4", 3), ("data=2,fsdp=2", 5), ("data=2,model=2", 2)):
        got = generate(model, tokenizer, PROMPTS, batch_size=slots, engine="continuous", chunk_steps=3, mesh=mesh,
                       **OPTIONS)
        RESULT[f"{name} {mesh}"] = dict(
            tokens=bool(np.array_equal(got.tokens, plain.tokens) and np.array_equal(got.lengths, plain.lengths)),
            logprobs=float(np.abs(got.logprobs - plain.logprobs).max()))
'''


@pytest.mark.slow
def test_engine_on_a_mesh_samples_the_unsharded_rows(host_devices):
    """Slots split over ``data`` x ``fsdp`` (rounded up to a multiple of it), heads over ``model``: the rows
    of the static path without a mesh."""
    results = host_devices.result(FOUR_DEVICES, devices=4)
    assert len(results) == 6
    for layout, result in results.items():
        assert result["tokens"], f"{layout}: the tokens differ from the unsharded static path"
        assert result["logprobs"] <= 1e-5, f"{layout}: log-probabilities off by {result['logprobs']}"


def test_distinct_prompts_are_prefilled_once_and_mapped_back():
    from mapjax.sampling.prefill import distinct_prompts

    rows = [[1, 5], [1, 5], [1, 7, 8], [1, 5], [1, 7, 8], [2]]
    distinct, index = distinct_prompts(rows)
    assert distinct == [[1, 5], [1, 7, 8], [2]]
    assert index.tolist() == [0, 0, 1, 0, 1, 2]
    assert [distinct[i] for i in index] == rows
