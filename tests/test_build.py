"""Pool building: generate, score, write in chunks; resume after an interruption exactly; refuse other settings."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.build import BuildError, build_pool
from mapjax.cli.pool import register as add_pool_command
from mapjax.models import from_pretrained
from mapjax.rewards.base import RewardError

PROMPTS = [f"w{3 + i} w{20 + i}" + " w7" * (i % 4) for i in range(7)]
OPTIONS = dict(samples_per_prompt=2, chunk_size=3, max_new_tokens=5, batch_size=4, seed=11, progress=False)


class WordCount:
    """A reward that counts the continuation's words; raises on a chosen call to simulate a crash."""

    name = "words"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, prompts, continuations):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated kill")
        return np.array([len(text.split()) for text in continuations], np.float32)


@pytest.fixture(scope="module")
def policy(tiny_policy_folder, word_tokenizer):
    """The tiny GPT-2 loaded from its HF folder (the path --policy takes), its tokenizer and the folder."""
    directory = tiny_policy_folder("gpt2")
    return from_pretrained(directory), word_tokenizer(), directory


@pytest.mark.slow
def test_interrupted_build_resumes_to_the_uninterrupted_pool(policy, tmp_path):
    model, tokenizer, _ = policy
    whole = build_pool(model, tokenizer, PROMPTS, [WordCount(), "perplexity"], out=tmp_path / "whole.jsonl",
                       **OPTIONS)
    target = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_pool(model, tokenizer, PROMPTS, [WordCount(fail_on_call=2), "perplexity"], out=target, **OPTIONS)
    manifest = json.loads((tmp_path / "resumed.jsonl.manifest.json").read_text())
    assert manifest["prompts_done"] == 3 and not manifest["complete"] and not target.exists()
    # a chunk cut off mid-write (bytes past the manifest's count) must not survive the resume
    with open(tmp_path / "resumed.jsonl.partial.jsonl", "ab") as handle:
        handle.write(b'{"prompt_id": 3, "prompt": "half a rec')
    resumed = build_pool(model, tokenizer, PROMPTS, [WordCount(), "perplexity"], out=target, **OPTIONS)

    assert target.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    np.testing.assert_array_equal(resumed.rewards, whole.rewards)
    assert resumed.generations == whole.generations and resumed.prompts == tuple(PROMPTS)
    assert resumed.value_names == ("words", "perplexity") and resumed.rewards.shape == (7, 2, 2)
    loaded = RewardPool.load(target)
    np.testing.assert_allclose(loaded.rewards, whole.rewards)
    # the same build in memory, without chunk files, gives the same pool
    in_memory = build_pool(model, tokenizer, PROMPTS, [WordCount(), "perplexity"], **OPTIONS)
    np.testing.assert_array_equal(in_memory.rewards, whole.rewards)
    # a rerun of the finished build returns the pool without generating again
    counter = WordCount(fail_on_call=1)
    again = build_pool(model, tokenizer, PROMPTS, [counter, "perplexity"], out=target, **OPTIONS)
    assert counter.calls == 0
    np.testing.assert_allclose(again.rewards, whole.rewards)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(policy, tmp_path):
    model, tokenizer, _ = policy
    target = tmp_path / "pool.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_pool(model, tokenizer, PROMPTS, [WordCount(fail_on_call=2)], out=target, **OPTIONS)
    with pytest.raises(BuildError, match=r"refusing to resume a build made with other settings \(seed: 11 then, "
                                         r"12 now\)"):
        build_pool(model, tokenizer, PROMPTS, [WordCount()], out=target, **dict(OPTIONS, seed=12))
    with pytest.raises(BuildError, match="prompts_sha256"):
        build_pool(model, tokenizer, PROMPTS[:-1] + ["w9"], [WordCount()], out=target, **OPTIONS)
    fresh = build_pool(model, tokenizer, PROMPTS, [WordCount()], out=target, overwrite=True,
                       **dict(OPTIONS, seed=12))
    assert fresh.num_samples == 14


@pytest.mark.slow
def test_existing_file_is_not_replaced_unasked(policy, tmp_path):
    model, tokenizer, _ = policy
    target = tmp_path / "pool.jsonl"
    target.write_text("mine\n")
    with pytest.raises(BuildError, match="exists and was not written by an unfinished build"):
        build_pool(model, tokenizer, PROMPTS, [WordCount()], out=target, **OPTIONS)
    assert target.read_text() == "mine\n"


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_other_pool_formats(policy, tmp_path, suffix):
    model, tokenizer, _ = policy
    pool = build_pool(model, tokenizer, PROMPTS[:3], [WordCount(), "diversity"], out=tmp_path / f"pool{suffix}",
                      **OPTIONS)
    loaded = RewardPool.load(tmp_path / f"pool{suffix}")
    assert loaded.value_names == ("words", "diversity")
    np.testing.assert_allclose(loaded.rewards, pool.rewards)
    assert not (tmp_path / f"pool{suffix}.partial.jsonl").exists()


def test_bad_build_input(policy, tmp_path):
    model, tokenizer, _ = policy
    with pytest.raises(ValueError, match="prompts is empty"):
        build_pool(model, tokenizer, [], [WordCount()], **OPTIONS)
    with pytest.raises(RewardError, match="unknown reward 'no-such-value'"):
        build_pool(model, tokenizer, PROMPTS, ["no-such-value"], **OPTIONS)
    with pytest.raises(BuildError, match="values is empty"):
        build_pool(model, tokenizer, PROMPTS, [], **OPTIONS)
    with pytest.raises(BuildError, match=r"the same reward twice: \['words'\]"):
        build_pool(model, tokenizer, PROMPTS, [WordCount(), WordCount()], **OPTIONS)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        build_pool(model, tokenizer, PROMPTS, [WordCount()], **dict(OPTIONS, max_new_tokens=0))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        build_pool(model, tokenizer, PROMPTS, [WordCount()], **dict(OPTIONS, top_k=0))
    with pytest.raises(BuildError, match="unknown pool format '.csv'"):
        build_pool(model, tokenizer, PROMPTS, [WordCount()], out=tmp_path / "pool.csv", **OPTIONS)


@pytest.mark.slow
def test_pool_command(policy, tmp_path, capsys):
    _, _, directory = policy
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:4]) + "\n\n")
    parser = argparse.ArgumentParser(prog="mapjax")
    add_pool_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.jsonl"
    args = parser.parse_args(["pool", "--policy", str(directory), "--prompts", str(prompts_file), "--values",
                              "diversity,perplexity", "--samples", "2", "--out", str(out), "--count", "3",
                              "--max-new-tokens", "4", "--seed", "1", "--quiet"])
    assert args.run(args) == 0
    assert "3 prompts, 6 samples, values ['diversity', 'perplexity']" in capsys.readouterr().out
    pool = RewardPool.load(out)
    assert pool.prompts == tuple(PROMPTS[:3]) and pool.rewards.shape == (3, 2, 2)
