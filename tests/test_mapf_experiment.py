"""experiments/mapf.py end to end on a tiny policy: pool build, then MAP-F and its evaluation."""

from __future__ import annotations

import json
import math

import pytest

from experiments import mapf
from experiments.common import CONFIGS, load_config


@pytest.mark.slow
def test_mapf_experiment_tiny(tmp_path, tiny_policy_folder):
    policy = tiny_policy_folder("gpt2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{3 + i} w{30 + i} w{50 + i}" for i in range(8)))
    config = {
        "policy": str(policy), "prompts": str(prompts), "values": ["diversity", "perplexity"], "samples": 4,
        "pool_options": {"max-new-tokens": 6, "batch-size": 8, "quiet": True},
        "palette": "diversity>=mean, perplexity>=mean",
        "finetune": {"steps": 3, "batch-size": 4, "lr": 1e-3, "eval-prompts": 2, "eval-samples": 1,
                     "max-new-tokens": 4, "save-every": 2, "quiet": True},
    }
    assert mapf.run(config, tmp_path / "run") == 0
    assert (tmp_path / "run" / "pool.jsonl").exists()
    assert (tmp_path / "run" / "finetune" / "model" / "config.json").exists()
    evaluation = json.loads((tmp_path / "run" / "finetune" / "evaluation.json").read_text())
    # the finetuned and base levels of each value against the palette
    assert [row["value"] for row in evaluation["levels"]] == ["diversity", "perplexity"]
    for row in evaluation["levels"]:
        assert isinstance(row["target"], float) and isinstance(row["met"], bool)
        assert all(math.isfinite(row[key]) for key in ("finetuned", "base"))


def test_mapf_configs_name_the_paper_setting():
    opt = load_config(mapf.MapfConfig, CONFIGS / "mapf_opt_hh.yaml")
    assert opt.policy == "facebook/opt-1.3b" and opt.samples == 16 and opt.prompts == "hh-rlhf"
    demo = load_config(mapf.MapfConfig, CONFIGS / "mapf_demo.yaml")
    assert demo.policy == "packaged-smollm2"
