"""The demo end to end at a tiny size: tiny random policy, word-level tokenizer, cheap rewards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mapjax.demo import DemoSettings, demo_prompts, run_demo, split_prompts
from mapjax.models import from_pretrained


class WordCount:
    name = "words"

    def __call__(self, prompts, continuations):
        return np.array([len(text.split()) for text in continuations], np.float32)


@pytest.fixture(scope="module")
def tiny_policy(tiny_policy_folder, word_tokenizer):
    return from_pretrained(tiny_policy_folder("gpt2")), word_tokenizer()


def test_demo_end_to_end_tiny(tiny_policy, tmp_path, capsys):
    model, tokenizer = tiny_policy
    prompts = [f"w{3 + i} w{20 + i}" + " w7" * (i % 3) for i in range(12)]
    settings = DemoSettings(out=tmp_path / "demo", palette="words>=q0.6, diversity>=mean",
                            values=("words", "diversity"), pool_prompts=8, heldout_prompts=4, k=4,
                            max_new_tokens=6, batch_size=8)
    summary = run_demo(settings, policy=model, tokenizer=tokenizer, rewards=[WordCount(), "diversity"],
                       prompts=prompts)
    out = capsys.readouterr().out
    assert "palette MET" in out or "palette NOT MET" in out
    assert summary["pool"] == {"prompts": 8, "samples": 32}
    assert summary["requested"]["status"] in ("optimal", "infeasible")
    assert set(summary["lambda"]) == {"words", "diversity"}
    assert (settings.out / "report.md").read_text().startswith("# mapjax demo report")
    assert json.loads((settings.out / "summary.json").read_text())["palette_met"] == summary["palette_met"]
    histogram = settings.out / "histograms.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and histogram.stat().st_size > 1000
    # a rerun with the same settings reuses the pools (resume) and writes the same verdict
    again = run_demo(settings, policy=model, tokenizer=tokenizer, rewards=[WordCount(), "diversity"], prompts=prompts)
    assert again["lambda"] == summary["lambda"]


def test_demo_prompts_and_split():
    prompts = demo_prompts()
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    pool, heldout = split_prompts(prompts, 32, 16, seed=0)
    assert len(pool) == 32 and len(heldout) == 16 and not set(pool) & set(heldout)
    with pytest.raises(ValueError, match="exceed"):
        split_prompts(prompts, 40, 40, seed=0)


def test_demo_rejects_a_palette_on_values_it_does_not_score(tmp_path):
    with pytest.raises(ValueError, match="does not score"):
        run_demo(DemoSettings(out=tmp_path, palette="humor>=q0.7"), policy=object(), tokenizer=object())
