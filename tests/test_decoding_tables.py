"""experiments/decoding_tables.py: each table's pipeline end to end on the tiny config (a tiny random policy,
word-level prompts, cheap rewards), the early error for a model missing from the cache, and the real configs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import decoding_tables as tables
from experiments.common import CONFIGS, apply_override, load_yaml
from mapjax.errors import ConfigError, OutputExistsError
from mapjax.rewards import register_reward, unregister_reward

TINY_CONFIG = CONFIGS / "tiny_decoding.yaml"
# A cheap registry reward: the sum of the continuation's word ids ("w17" counts 17). Not its word count: with 8 new
# tokens most continuations have 8 words, so every quantile of that is its maximum, a level no palette reaches.
WORDS = "tiny-words"


@pytest.fixture(scope="module", autouse=True)
def words_reward():
    register_reward(WORDS, lambda prompts, continuations: [sum(int(word[1:]) for word in text.split()
                                                               if word[1:].isdigit()) for text in continuations],
                    overwrite=True)
    yield
    unregister_reward(WORDS)


@pytest.fixture(scope="module")
def tiny_setup(tiny_policy_folder, tmp_path_factory):
    """A tiny random GPT-2 folder with a word-level tokenizer, and a file of 16 distinct word prompts."""
    folder = tiny_policy_folder("gpt2")
    prompts = tmp_path_factory.mktemp("tiny-prompts") / "prompts.txt"
    prompts.write_text("\n".join(f"w{3 + i} w{30 + 2 * i}" + " w7" * (i % 3) for i in range(16)) + "\n")
    return folder, prompts


def tiny_config(setup, *overrides: str) -> dict:
    folder, prompts = setup
    return load_yaml(TINY_CONFIG, [
        f"policy={folder}", f"prompts.source={prompts}", f"values=[diversity, {WORDS}, perplexity]",
        f"navigation.values=[diversity, {WORDS}]", f"navigation.random_values=[diversity, {WORDS}]",
        f"palettes={{Words-60: '{WORDS}>=max(mean,q0.6)'}}", *overrides])


LEVEL_PALETTES = {
    # Table 1 / 4 shape: quantile palettes, one raising two values, one a single value, and one whose level
    # lies above every pilot sample (reported and skipped like an infeasible palette).
    "table1": (f"palettes={{Two-60: {{quantile: 0.6, raise: [diversity, {WORDS}], maintain: [perplexity]}}, "
               f"Words-70: {{quantile: 0.7, raise: [{WORDS}]}}, "
               f"Impossible: {{{WORDS}: 1000}}}}"),
    # Table 2 shape: "make it (1 + κ) times as likely", κ = 0.2 and 0.25.
    "table2": (f"palettes={{K-20: '{WORDS}>=mean+log(1+0.2)', K-25: '{WORDS}>=mean+log(1+0.25)', "
               f"Impossible: {{{WORDS}: 1000}}}}"),
    "table4": (f"palettes={{Two-60: {{quantile: 0.6, raise: [diversity, {WORDS}], maintain: [perplexity]}}, "
               f"Impossible: {{{WORDS}: 1000}}}}"),
}


def _finite_numbers(node) -> list[float]:
    if isinstance(node, dict):
        return [number for value in node.values() for number in _finite_numbers(value)]
    if isinstance(node, list):
        return [number for value in node for number in _finite_numbers(value)]
    return [node] if isinstance(node, float) else []


@pytest.mark.slow
@pytest.mark.parametrize("table", ["table1", "table2", "table4"])
def test_level_tables_end_to_end(tiny_setup, tmp_path, capsys, table):
    out = tmp_path / table
    config = tiny_config(tiny_setup, LEVEL_PALETTES[table])
    summary = tables.run_table(config, out, table=table)

    markdown = (out / f"{table}.md").read_text()
    document = json.loads((out / f"{table}.json").read_text())   # valid JSON: no NaN
    assert document == summary
    for name in ("pilot_pool.jsonl", "eval_candidates.jsonl", "config.json"):
        assert (out / name).is_file()
    palettes = list(config["palettes"])
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for row_name in ["Original", *palettes]:
        assert any(line.startswith(f"| {row_name} |") for line in table_rows), row_name
    assert table_rows[0].startswith("| model | diversity | tiny-words | perplexity |")
    assert "| Original |" in capsys.readouterr().out

    assert summary["pilot"] == {**summary["pilot"], "prompts": 8, "samples": 32}
    assert summary["candidates"]["prompts"] == 4 and summary["candidates"]["samples"] == 16
    assert all(math.isfinite(level["mean"]) for level in summary["original"]["values"])
    rows = summary["palettes"]
    assert rows["Impossible"]["status"] == "invalid" and "lam" not in rows["Impossible"]
    assert "above its largest reward" in rows["Impossible"]["reason"] and "invalid: skipped" in markdown
    solved = [name for name in palettes if rows[name]["status"] == "optimal"]
    assert solved, rows
    for name in solved:
        row = rows[name]
        assert row["verdicts"] and set(row["verdicts"]) <= {"diversity", WORDS, "perplexity"}
        assert isinstance(row["palette_met"], bool)
        assert all(math.isfinite(value) for value in row["lam"].values())
        assert all(math.isfinite(value) for value in row["expected"].values())
        assert all(0.0 <= rate["win_rate"] <= 1.0 for rate in row["win_rates"]["values"])
        assert _finite_numbers(row["realised"]) and all(math.isfinite(v) for v in _finite_numbers(row["realised"]))
        assert (out / "decoded" / f"{name}.jsonl").is_file()


@pytest.mark.slow
def test_navigation_table_end_to_end(tiny_setup, tmp_path):
    out = tmp_path / "table3"
    summary = tables.run_table(tiny_config(tiny_setup), out, table="table3")
    markdown = (out / "table3.md").read_text()
    json.loads((out / "table3.json").read_text())
    for row_name in ("Original", "MAP-D", "MORL-D"):
        assert f"| {row_name} |" in markdown
    morl = summary["navigation"]["MORL-D"]
    assert morl["models"] == 4
    for method in ("MAP-D", "MORL-D"):
        result = summary["navigation"][method]
        if not result["models"]:   # too few random palettes kept on a tiny pilot: reported, not raised
            assert result["note"]
            continue
        for ne in result["navigation_efficiency"].values():
            assert 0.0 <= ne["navigation_efficiency"] <= 1.0
            assert ne["values"] == ["diversity", WORDS] and ne["total"] == result["models"]


@pytest.mark.slow
def test_rerun_resumes_and_other_config_needs_force(tiny_setup, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_setup, LEVEL_PALETTES["table4"])
    first = tables.run_table(config, out, table="table1")
    again = tables.run_table(config, out, table="table1")
    assert again["resumed"] and not first["resumed"]
    assert again["palettes"]["Two-60"]["lam"] == first["palettes"]["Two-60"]["lam"]
    changed = tiny_config(tiny_setup, LEVEL_PALETTES["table4"], "k=3")
    with pytest.raises(OutputExistsError, match="not empty"):
        tables.run_table(changed, out, table="table1")
    forced = tables.run_table(changed, out, table="table1", force=True)
    assert forced["candidates"]["samples"] == 12


def test_a_hub_id_missing_from_the_cache_fails_early_and_clearly(tiny_setup, tmp_path):
    out = tmp_path / "never"
    config = tiny_config(tiny_setup, "policy=mapjax-tests/no-such-model")
    with pytest.raises(tables.ModelNotCachedError) as error:
        tables.run_table(config, out, table="table1")
    message = str(error.value)
    assert "'mapjax-tests/no-such-model'" in message
    assert "huggingface-cli download mapjax-tests/no-such-model" in message
    assert "local Hugging Face cache" in message and not out.exists()
    # a reward model missing from the cache is caught as early
    config = tiny_config(tiny_setup, "values=[diversity, {name: fun, reward: humor, options: {model: nobody/absent}}]",
                         "palettes={P: 'fun>=mean'}")
    with pytest.raises(tables.ModelNotCachedError, match="reward model of 'fun'.*nobody/absent"):
        tables.run_table(config, out, table="table1")


def test_the_real_configs_from_the_command_line_name_the_missing_model(tmp_path, capsys):
    try:
        tables.require_local_model("facebook/opt-1.3b", "policy", "policy")
    except tables.ModelNotCachedError:
        pass
    else:
        pytest.skip("facebook/opt-1.3b is in this machine's cache")
    assert tables.main(["table1", "--out", str(tmp_path / "t1")]) == 2
    error = capsys.readouterr().err
    assert "facebook/opt-1.3b" in error and "huggingface-cli download facebook/opt-1.3b" in error
    assert not (tmp_path / "t1").exists()


def test_the_real_configs_parse_and_name_the_papers_models_and_palettes():
    configs = {name: tables.resolve_config(load_yaml(path), name) for name, (_, path) in tables.TABLES.items()}
    paper_values = ["humor", "gpt2-helpful", "gpt2-harmless", "diversity", "coherence", "perplexity"]
    hhh = ["HHH-50", "HHH-60", "HHH-70", "HHH-80", "Humor-80", "Help-80", "Harm-80"]
    for name in ("table1", "table4"):
        config = configs[name]
        assert tables.value_names(config.values) == paper_values
        assert list(config.palettes) == hhh
        palette = tables.palette_spec("HHH-70", config.palettes["HHH-70"])
        assert str(palette) == ("humor>=max(mean,q0.7), gpt2-helpful>=max(mean,q0.7), gpt2-harmless>=max(mean,q0.7), "
                                "diversity>=mean, coherence>=mean, perplexity>=mean")
        assert str(tables.palette_spec("Harm-80", config.palettes["Harm-80"])) == "gpt2-harmless>=max(mean,q0.8)"
        assert config.prompts.source == "hh-rlhf" and config.prompts.split == "test"
    assert configs["table1"].policy == "facebook/opt-1.3b"
    assert configs["table4"].policy == "meta-llama/Llama-2-7b-chat-hf"
    table2 = configs["table2"]
    assert table2.prompts.source == "imdb" and table2.policy == "facebook/opt-1.3b"
    levels = [str(tables.palette_spec(name, spec)) for name, spec in table2.palettes.items()]
    assert "positive>=mean+log(1+0.2)" in levels and "positive>=mean+log(1+0.25)" in levels
    table3 = configs["table3"]
    assert table3.navigation.values == ["gpt2-helpful", "gpt2-harmless"] and table3.navigation.count >= 100
    for config in configs.values():
        assert config.k == 16 and config.seed == 0
        assert config.sampling.top_k == 50 and config.sampling.temperature == 1.0
        assert config.sampling.max_new_tokens == 50
        assert config.pilot == tables.PilotConfig(samples_per_prompt=1, normaliser="pooled")
        assert config.prompts.pilot_count + config.prompts.eval_count <= 2312 or config is table2
    tiny = tables.resolve_config(load_yaml(TINY_CONFIG))
    assert tiny.k == 4 and tiny.prompts.pilot_count + tiny.prompts.eval_count <= 16


def test_overrides_and_config_errors():
    config = {"a": {"b": 1}}
    apply_override(config, "a.c=[x, y]")
    apply_override(config, "k=8")
    assert config == {"a": {"b": 1, "c": ["x", "y"]}, "k": 8}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(config, "k")
    base = load_yaml(TINY_CONFIG)
    with pytest.raises(ConfigError, match="does not score"):
        tables.resolve_config({**base, "palettes": {"P": "humor>=q0.7"}}, "table1")
    with pytest.raises(ConfigError, match="choose one of"):
        tables.resolve_config(base, "table9")
    with pytest.raises(ConfigError, match="eval_count"):
        tables.resolve_config({**base, "prompts": {"eval_count": 0}}, "table1")
    with pytest.raises(ConfigError, match="navigation.values"):
        tables.resolve_config({**base, "navigation": {"values": ["humor"]}}, "table3")


@pytest.mark.slow
def test_an_infeasible_palette_is_reported_not_solved():
    from mapjax import RewardPool

    # Two samples, each high in one value only: no reweighting reaches 0.9 in both.
    pool = RewardPool.from_array(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), value_names=["a", "b"])
    solved = tables.solve_palettes(pool, {"Both": "a>=0.9, b>=0.9", "One": "a>=0.6"}, "pooled")
    assert solved["Both"]["status"] == "infeasible" and "infeasible" in solved["Both"]["reason"]
    assert solved["One"]["status"] == "optimal" and solved["One"]["solution"].feasible


def test_prompt_split_is_disjoint_and_seeded(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["same"] * 3 + [f"p{i}" for i in range(10)]))
    config = tables.resolve_config({"policy": "x", "values": ["diversity"], "palettes": {"P": "diversity>=mean"},
                                    "prompts": {"source": str(prompts), "pilot_count": 6, "eval_count": 5}}, "table1")
    pilot, evaluation, info = tables.read_prompt_split(config)
    assert len(pilot) == 6 and len(evaluation) == 5 and not set(pilot) & set(evaluation)
    assert info["distinct"] == 11 and tables.read_prompt_split(config)[0] == pilot
    config.prompts.eval_count = 6
    with pytest.raises(ConfigError, match="exceed"):
        tables.read_prompt_split(config)


def test_the_papers_prompt_sources_read_from_local_copies(tmp_path):
    """hh-rlhf (first human turn) and IMDB (review openings) through prompts.data_files, split disjointly."""
    hh = tmp_path / "harmless-test.jsonl"
    hh.write_text("\n".join(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}",
                                        "rejected": "x"}) for i in range(12)) + "\n")
    config = tables.resolve_config({"policy": "x", "values": ["diversity"], "palettes": {"P": "diversity>=mean"},
                                    "prompts": {"source": "hh-rlhf", "split": "test", "data_files": {"test": str(hh)},
                                                "pilot_count": 7, "eval_count": 5}}, "table1")
    pilot, evaluation, _ = tables.read_prompt_split(config)
    assert sorted(pilot + evaluation) == sorted(f"question {i}?" for i in range(12))
    imdb = tmp_path / "imdb-train.jsonl"
    imdb.write_text("\n".join(json.dumps({"text": f"Review {i}: this film was long and slow, and then it got better "
                                                  "in the end", "label": i % 2}) for i in range(40)) + "\n")
    config.prompts = dataclasses.replace(config.prompts, source="imdb", split="train",
                                         data_files={"train": str(imdb)}, pilot_count=10, eval_count=10)
    pilot, evaluation, _ = tables.read_prompt_split(config)
    assert len(pilot) == len(evaluation) == 10 and not set(pilot) & set(evaluation)
    assert all(text.startswith("Review") and len(text) <= 30 for text in pilot + evaluation)
