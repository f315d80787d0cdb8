"""Outputs are replaced only once their successor is complete: an interrupted ``--overwrite`` of a pool or of a
finetuning run leaves the old one whole, and a finished one leaves only the new content."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.build import build_pool
from mapjax.finetune import FinetuneConfig, finetune

PROMPTS = ["w3 w4", "w5", "w6 w7 w8", "w9 w10"]


@pytest.fixture(scope="module")
def tiny_policy():
    """A tiny random GPT-2 built natively (no checkpoint, no torch) and a word-level tokenizer over its ids."""
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mapjax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config, rngs=nnx.Rngs(0)), tokenizer


class Words:
    """A cheap reward (the continuation's word count) that can be armed to interrupt the build it scores."""

    name = "words"

    def __init__(self):
        self.interrupt_after = None
        self.calls = 0

    def __call__(self, prompts, continuations):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt("interrupted mid-build")
        return np.array([len(text.split()) for text in continuations], np.float32)


def files_under(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_pool_overwrite_keeps_the_old_pool_until_the_new_one_is_complete(tiny_policy, tmp_path, suffix):
    model, tokenizer = tiny_policy
    out = tmp_path / f"pool{suffix}"
    options = dict(samples_per_prompt=2, out=out, max_new_tokens=4, chunk_size=1, progress=False)
    build_pool(model, tokenizer, PROMPTS, [Words(), "diversity"], seed=0, **options)
    old = out.read_bytes()

    words = Words()
    words.interrupt_after = 2   # the third chunk's scoring raises
    with pytest.raises(KeyboardInterrupt):
        build_pool(model, tokenizer, PROMPTS, [words], seed=1, overwrite=True, **options)
    assert out.read_bytes() == old
    assert RewardPool.load(out).value_names == ("words", "diversity")

    words.interrupt_after = None   # the same command again finishes the replacement
    new = build_pool(model, tokenizer, PROMPTS, [words], seed=1, overwrite=True, **options)
    assert RewardPool.load(out).value_names == ("words",) == new.value_names
    assert new.num_prompts == len(PROMPTS) and out.read_bytes() != old
    leftovers = sorted(path.name for path in tmp_path.iterdir())
    assert leftovers == sorted([out.name, out.name + ".manifest.json"])
    assert json.loads((tmp_path / (out.name + ".manifest.json")).read_text())["complete"] is True


def text_pool() -> RewardPool:
    rng = np.random.default_rng(0)
    records = [{"prompt": prompt, "generated": " ".join(f"w{rng.integers(3, 100)}" for _ in range(3)),
                "a": float(rng.normal()), "b": float(rng.normal())} for prompt in PROMPTS for _ in range(3)]
    return RewardPool.from_records(records)


@pytest.mark.slow
def test_finetune_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tiny_policy, tmp_path):
    model, tokenizer = tiny_policy
    pool, lam, out = text_pool(), np.array([1.0, 0.5]), tmp_path / "run"
    finetune(model, tokenizer, pool, lam, config=FinetuneConfig(steps=2, batch_size=4, save_every=1), out=out,
             progress=False)
    (out / "evaluation.json").write_text("{}")   # what `mapjax finetune` writes beside a run
    old = files_under(out)
    assert (out / "model" / "config.json").exists()
    assert len(json.loads((out / "losses.json").read_text())["losses"]) == 2

    config = FinetuneConfig(steps=3, batch_size=4, save_every=1, learning_rate=1e-3)

    def interrupt(step, metrics):
        if step == 2:
            raise KeyboardInterrupt("interrupted mid-run")

    with pytest.raises(KeyboardInterrupt):
        finetune(model, tokenizer, pool, lam, config=config, out=out, overwrite=True, callback=interrupt,
                 progress=False)
    assert files_under(out) == old   # the old run is whole: checkpoints, model, losses, evaluation

    result = finetune(model, tokenizer, pool, lam, config=config, out=out, overwrite=True, progress=False)
    assert result.resumed_from == 2 and result.out == out   # the replacement resumed where it stopped
    assert not (out / "evaluation.json").exists()            # nothing of the old run is left beside the new
    assert json.loads((out / "losses.json").read_text())["config"]["steps"] == 3
    assert (out / "model" / "config.json").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]   # no staging or retired folder

    again = finetune(model, tokenizer, pool, lam, config=config, out=out, progress=False)
    assert again.resumed_from == 3   # the moved checkpoints still resume in place
