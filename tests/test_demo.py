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


@pytest.mark.slow
def test_demo_end_to_end_tiny(tiny_policy, tmp_path, capsys):
    model, tokenizer = tiny_policy
    prompts = [f"w{3 + i} w{20 + i}" + " w7" * (i % 3) for i in range(12)]
    settings = DemoSettings(out=tmp_path / "demo", palette="words>=q0.6, diversity>=mean",
                            values=("words", "diversity"), pool_prompts=8, heldout_prompts=4, k=4,
                            max_new_tokens=6, batch_size=8)
    summary = run_demo(settings, policy=model, tokenizer=tokenizer, rewards=[WordCount(), "diversity"],
                       prompts=prompts)
    out = capsys.readouterr().out
    # Every sample runs to max_new_tokens (6 words), so "words >= its 60% quantile" asks for 6 words on average:
    # reachable only in the limit. The demo moves to the nearest reachable palette, which MAP-D then meets.
    requested = summary["requested"]
    assert requested["status"] == "infeasible"
    assert requested["certificate"]["blocking_values"] == ["words"]
    assert summary["adjusted"] is not None and 0.9 < summary["adjusted"]["rho"] < 1
    assert "unreachable (infeasible: words reaches its level only in the limit" in out
    assert summary["palette_met"] is True
    assert "palette MET: every constrained value reached its target" in out and "NOT MET" not in out
    assert [value["met"] for value in summary["realised"]["values"]] == [True, True]
    assert summary["pool"] == {"prompts": 8, "samples": 32}
    assert summary["lambda"]["words"] > 0 and summary["lambda"]["diversity"] == 0   # diversity was met for free
    assert (settings.out / "report.md").read_text().startswith("# mapjax demo report")
    assert json.loads((settings.out / "summary.json").read_text())["palette_met"] == summary["palette_met"]
    histogram = settings.out / "histograms.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and histogram.stat().st_size > 1000
    # a rerun with the same settings reuses the pools (resume) and writes the same verdict
    again = run_demo(settings, policy=model, tokenizer=tokenizer, rewards=[WordCount(), "diversity"], prompts=prompts)
    assert again["lambda"] == summary["lambda"] and again["palette_met"] is True


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
