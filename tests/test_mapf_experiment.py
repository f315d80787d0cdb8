"""experiments/mapf.py end to end on a tiny policy: pool build, then MAP-F and its evaluation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from tests.model_fixtures import CASES, build_torch_model, save_torch_model  # noqa: E402
from tests.test_generate import word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("mapf_experiment", ROOT / "experiments" / "mapf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mapf_experiment_tiny(tmp_path):
    policy = save_torch_model(build_torch_model(CASES["gpt2"]), tmp_path / "policy")
    word_tokenizer(policy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{3 + i} w{30 + i} w{50 + i}" for i in range(8)))
    config = {
        "policy": str(policy), "prompts": str(prompts), "values": ["diversity", "perplexity"], "samples": 4,
        "pool_options": {"max-new-tokens": 6, "batch-size": 8, "quiet": True},
        "palette": "diversity>=mean, perplexity>=mean",
        "finetune": {"steps": 3, "batch-size": 4, "lr": 1e-3, "eval-prompts": 2, "eval-samples": 1,
                     "max-new-tokens": 4, "save-every": 2, "quiet": True},
    }
    script = load_script()
    assert script.run(config, tmp_path / "run") == 0
    assert (tmp_path / "run" / "pool.jsonl").exists()
    assert (tmp_path / "run" / "finetune" / "model" / "config.json").exists()
    evaluation = json.loads((tmp_path / "run" / "finetune" / "evaluation.json").read_text())
    assert evaluation  # the finetuned and base levels against the palette


def test_mapf_configs_name_the_paper_setting():
    opt = yaml.safe_load((ROOT / "configs" / "mapf_opt_hh.yaml").read_text())
    assert opt["policy"] == "facebook/opt-1.3b" and opt["samples"] == 16 and opt["prompts"] == "hh-rlhf"
    demo = yaml.safe_load((ROOT / "configs" / "mapf_demo.yaml").read_text())
    assert demo["policy"] == "packaged-smollm2"
