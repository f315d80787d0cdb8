"""Model soups (parameter interpolation), the pool's prompt formatting in finetuning's sampling and data, the
Table 3 pipeline (MAP-D, MAP-F, MORL-D, MORL-F, DPO(β), DPO-Soup) end to end, and the online MAP-F benchmark's
``--tiny`` mode, all on tiny random models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax.errors import FinetuneError, PoolError
from mapjax.finetune import soup, soup_from_folders
from mapjax.finetune.soup import save_soup

# A chat template over the word tokenizer's vocabulary: w97 <request> w98, then w99 opens the answer.
CHAT_TEMPLATE = ("{% for message in messages %}w97 {{ message['content'] }} w98 {% endfor %}"
                 "{% if add_generation_prompt %}w99{% endif %}")


def params(model) -> dict:
    return {path: np.asarray(leaf.get_value()) for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ============================================================================ soups


def test_soup_of_identical_models_is_the_model(tiny_model):
    model = tiny_model("gpt2", seed=0)
    before = params(model)
    for weights in (None, [0.25, 0.75], [1.0, 0.0]):
        mixed = soup([model, model], weights)
        assert mixed is not model and type(mixed) is type(model) and mixed.config == model.config
        after = params(mixed)
        assert after.keys() == before.keys()
        for path, value in before.items():
            np.testing.assert_allclose(after[path], value, rtol=1e-6, atol=1e-7)
    for path, value in params(model).items():   # the ingredients are untouched
        np.testing.assert_array_equal(value, before[path])


@pytest.mark.slow
def test_soup_weights_give_the_hand_computed_interpolation(tiny_model):
    first, second, third = (tiny_model("gpt2", seed=seed) for seed in (0, 1, 2))
    mixed = soup([first, second], (0.3, 0.7))
    a, b = params(first), params(second)
    for path, value in params(mixed).items():
        np.testing.assert_allclose(value, 0.3 * a[path] + 0.7 * b[path], rtol=1e-6, atol=1e-7)
    # unnormalised weights are divided by their sum on request
    c = params(third)
    mixed = soup([first, second, third], [1, 2, 1], normalize=True)
    for path, value in params(mixed).items():
        np.testing.assert_allclose(value, 0.25 * a[path] + 0.5 * b[path] + 0.25 * c[path], rtol=1e-6, atol=1e-7)
    # the soup is a working model
    ids = jnp.asarray([[1, 5, 6, 7]])
    assert np.isfinite(np.asarray(mixed(ids, jnp.ones_like(ids)).logits)).all()


def test_soup_of_bfloat16_models_keeps_their_dtype(tiny_model):
    first, second = tiny_model("gpt2", seed=0, dtype=jnp.bfloat16), tiny_model("gpt2", seed=1, dtype=jnp.bfloat16)
    mixed = soup([first, second], [0.5, 0.5])
    a, b = params(first), params(second)
    for path, value in params(mixed).items():
        assert value.dtype == jnp.bfloat16
        expected = (0.5 * a[path].astype(np.float32) + 0.5 * b[path].astype(np.float32)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(value, expected)


def _reshaped(model):
    model.transformer.h[0].c_attn.weight.set_value(jnp.zeros((96, 16)))
    return model


def _retyped(model):
    model.transformer.h[1].c_fc.bias.set_value(model.transformer.h[1].c_fc.bias.get_value().astype(jnp.bfloat16))
    return model


@pytest.mark.parametrize("other, message", [
    (lambda build: build("llama"), "model 1 is a LlamaForCausalLM, not a GPT2LMHeadModel"),
    (lambda build: build("gpt2_untied_scaled"), "model 1: config field 'scale_attn_by_inverse_layer_idx' is True"),
    (lambda build: _reshaped(build("gpt2", seed=1)),
     r"model 1: parameter transformer\.h\.0\.c_attn\.weight has shape \(96, 16\), not \(96, 32\)"),
    (lambda build: _retyped(build("gpt2", seed=1)),
     r"model 1: parameter transformer\.h\.1\.c_fc\.bias is bfloat16, not float32"),
])
def test_mismatched_models_are_refused_naming_the_difference(tiny_model, other, message):
    with pytest.raises(FinetuneError, match=message):
        soup([tiny_model("gpt2"), other(tiny_model)], [0.5, 0.5])


@pytest.mark.parametrize("weights, message", [
    ([0.5, 0.6], "sum to 1.1, not 1; pass normalize=True"),
    ([float("nan"), 1.0], "soup weight 0 is nan; weights must be finite"),
    ([-0.1, 1.1], "soup weight 0 is -0.1; weights must be >= 0"),
    ([1.0], "1 soup weights for 2 models"),
    ([0.5, "0.5"], "soup weight 1 is '0.5', not a number"),
    ("ab", "must be a sequence of numbers"),
])
def test_bad_weights_are_refused(tiny_model, weights, message):
    model = tiny_model("gpt2")
    with pytest.raises(FinetuneError, match=message):
        soup([model, model], weights)
    with pytest.raises(FinetuneError, match="normalize needs a positive sum"):
        soup([model, model], [0.0, 0.0], normalize=True)
    with pytest.raises(FinetuneError, match="at least one model"):
        soup([], [])


def test_soup_from_folders_round_trip(tiny_model, word_tokenizer, tmp_path):
    from mapjax.models import export_pretrained, from_pretrained

    models = [tiny_model("gpt2", seed=seed) for seed in (0, 1)]
    folders = [export_pretrained(model, tmp_path / f"model{index}") for index, model in enumerate(models)]
    from_disk = soup_from_folders(folders, [0.3, 0.7])
    in_memory = soup(models, [0.3, 0.7])
    expected = params(in_memory)
    for path, value in params(from_disk).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-7)
    saved = save_soup(from_disk, tmp_path / "soup", tokenizer=word_tokenizer(), sources=folders, weights=[0.3, 0.7])
    assert json.loads((saved / "soup.json").read_text()) == {"sources": [str(f) for f in folders],
                                                             "weights": [0.3, 0.7]}
    assert (saved / "tokenizer.json").exists()
    for path, value in params(from_pretrained(saved)).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-7)
    with pytest.raises(FinetuneError, match="not a model folder"):
        soup_from_folders([folders[0], tmp_path], [0.5, 0.5])
    export_pretrained(tiny_model("opt_pre_ln"), tmp_path / "opt")
    with pytest.raises(FinetuneError, match=r"model 1 is a OPTForCausalLM.*model 1 = .*opt"):
        soup_from_folders([folders[0], tmp_path / "opt"], [0.5, 0.5])


# ============================================================================ prompt formatting


@pytest.fixture(scope="module")
def chat_setup(tiny_policy_folder, word_tokenizer, tmp_path_factory):
    """A tiny policy, a word tokenizer with a chat template, and pools built raw, chat-formatted and with
    another formatter."""
    from mapjax.build import build_pool
    from mapjax.models import from_pretrained
    from mapjax.prompts import chat_formatter

    model = from_pretrained(tiny_policy_folder("gpt2"))
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("formatting")
    prompts = ["w5 w17 w33", "w8", "w40 w41 w42 w43"]
    options = dict(samples_per_prompt=3, max_new_tokens=5, batch_size=8, seed=3, progress=False)
    pools = {name: folder / f"{name}.jsonl" for name in ("raw", "chat", "other")}
    build_pool(model, tokenizer, prompts, ["diversity"], out=pools["raw"], **options)
    build_pool(model, tokenizer, prompts, ["diversity"], out=pools["chat"], format_prompt=chat_formatter(tokenizer),
               **options)
    build_pool(model, tokenizer, prompts, ["diversity"], out=pools["other"], format_prompt=lambda p: "w90 " + p,
               **options)
    return model, tokenizer, prompts, pools


@pytest.mark.slow
def test_pool_prompt_format_reads_the_manifest(chat_setup, tmp_path):
    from mapjax.finetune.against_base import pool_prompt_format
    from mapjax.pool import RewardPool

    _, tokenizer, prompts, pools = chat_setup
    assert pool_prompt_format(pools["raw"], tokenizer) is None
    formatter = pool_prompt_format(pools["chat"], tokenizer)
    assert formatter is not None
    assert [formatter(p) for p in prompts] == [f"w97 {p} w98 w99" for p in prompts]
    with pytest.raises(PoolError, match="formatted in a way this tokenizer cannot reproduce"):
        pool_prompt_format(pools["other"], tokenizer)
    with pytest.raises(PoolError, match="other prompts than"):
        pool_prompt_format(pools["chat"], tokenizer, prompts=prompts[:2])
    # a pool without a manifest (from elsewhere) is taken as sampled from raw prompts
    copy = RewardPool.load(pools["chat"]).save(tmp_path / "copy.jsonl")
    assert pool_prompt_format(copy, tokenizer) is None


@pytest.mark.slow
def test_evaluation_samples_with_the_pool_formatting(chat_setup):
    from mapjax.finetune.against_base import evaluate_finetuned, pool_prompt_format, sample_and_score
    from mapjax.generate import generate
    from mapjax.pool import RewardPool
    from mapjax.scoring import resolve_values

    model, tokenizer, prompts, pools = chat_setup
    formatter = pool_prompt_format(pools["chat"], tokenizer)
    seen = []

    class Recording:
        name = "recorded"

        def __call__(self, prompts_, continuations):
            seen.append((list(prompts_), list(continuations)))
            return np.zeros(len(prompts_))

    generation, scores = sample_and_score(model, tokenizer, prompts, [Recording()], samples=2, max_new_tokens=5,
                                          seed=7, format_prompt=formatter)
    expected = generate(model, tokenizer, [f"w97 {p} w98 w99" for p in prompts], num_samples=2, max_new_tokens=5,
                        seed=7)
    assert generation.texts == expected.texts
    assert seen == [([p for p in prompts for _ in range(2)], expected.texts)]   # the rewards see raw prompts
    assert scores["recorded"].shape == (3, 2)
    raw = generate(model, tokenizer, prompts, num_samples=2, max_new_tokens=5, seed=7)
    assert raw.texts != expected.texts   # the formatting matters
    # the pool's own samples are what the sampler gives on the formatted prompts (build_pool's seed and keys)
    pool = RewardPool.load(pools["chat"])
    built = generate(model, tokenizer, [formatter(p) for p in prompts], num_samples=3, max_new_tokens=5, seed=3)
    assert [text for row in pool.generations for text in row] == built.texts
    report = evaluate_finetuned(model, model, tokenizer, pool, "diversity>=mean", num_prompts=3, samples=2,
                                max_new_tokens=5, format_prompt=formatter)
    assert report["formatted_prompts"] is True
    assert report["kl_to_base"]["mean"] == 0.0   # the model against itself
    finetuned, base = report["levels"][0]["finetuned"], report["levels"][0]["base"]
    assert finetuned == base
    scored = resolve_values(["diversity"], model, tokenizer, None)
    direct = sample_and_score(model, tokenizer, prompts, scored, samples=2, max_new_tokens=5, seed=0,
                              format_prompt=formatter)[1]["diversity"]
    assert finetuned == pytest.approx(direct.mean(axis=1).mean())


@pytest.mark.slow
def test_training_data_tokenizes_the_formatted_prompts(chat_setup):
    from mapjax.finetune import dpo_pairs, weighted_examples
    from mapjax.finetune.against_base import pool_prompt_format
    from mapjax.generate import tokenize_prompts
    from mapjax.pool import RewardPool

    model, tokenizer, prompts, pools = chat_setup
    pool = RewardPool.load(pools["chat"])
    formatter = pool_prompt_format(pools["chat"], tokenizer)
    formatted_ids = tokenize_prompts(tokenizer, [formatter(p) for p in pool.prompts], model)
    examples = weighted_examples(pool, tokenizer, [1.0], model=model, format_prompt=formatter)
    assert examples.prompt_ids == [formatted_ids[row] for row in examples.prompt_row]
    raw = weighted_examples(pool, tokenizer, [1.0], model=model)
    assert raw.prompt_ids != examples.prompt_ids and raw.continuation_ids == examples.continuation_ids
    pairs = dpo_pairs(pool, tokenizer, [1.0], model=model, format_prompt=formatter)
    assert pairs.chosen.prompt_ids == [formatted_ids[row] for row in pairs.chosen.prompt_row]


# ============================================================================ the Table 3 pipeline


def word_level(prompts, continuations):
    """A toy value for word-token texts: the mean word id of the continuation, in hundreds (varies between any
    two samples, so DPO always has pairs)."""
    return [np.mean([int(word[1:]) for word in text.split() if word[1:].isdigit()] or [0.0]) / 100.0
            for text in continuations]


@pytest.fixture
def word_level_reward():
    from mapjax.rewards import register_reward, unregister_reward

    register_reward("word-level", word_level)
    yield "word-level"
    unregister_reward("word-level")


def tiny_table3_config(policy: Path, prompts: Path) -> dict:
    """Every column on a tiny random policy, one or two models each, one step of training each."""
    return {
        "policy": str(policy), "values": ["word-level", "perplexity"], "palette": "word-level>=mean",
        "pool_samples": 3, "k": 3, "seed": 0,
        "prompts": {"source": str(prompts), "pilot_count": 4, "eval_count": 2},
        "sampling": {"max_new_tokens": 4, "batch_size": 8, "chunk_size": 4},
        "navigation": {"values": ["word-level", "perplexity"], "tolerances": [0.0, 0.06], "random_palettes": 1,
                       "morl_draws": 1},
        "online": {"method": "ppo", "models": 1,
                   "config": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
                              "ppo_epochs": 1, "save_every": 1}},
        "dpo": {"betas": [0.1], "ratios": [0.0, 1.0], "config": {"steps": 1, "batch_size": 2, "save_every": 1}},
        "soup": {"weights": [0.5]},
        "evaluation": {"samples": 1, "batch_size": 8},
    }


@pytest.mark.slow
def test_table3_pipeline_runs_every_column(tiny_policy_folder, word_level_reward, tmp_path):
    from experiments import table3_mapf
    from mapjax.finetune.soup import soup_from_folders
    from mapjax.models import from_pretrained

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{3 + i} w{30 + i} w{50 + i}" for i in range(8)))
    config = tiny_table3_config(tiny_policy_folder("gpt2"), prompts)
    out = tmp_path / "run"
    summary = table3_mapf.run(config, out)
    columns = summary["columns"]
    assert list(columns) == list(table3_mapf.COLUMNS)
    assert {name: column["models"] for name, column in columns.items()} == {
        "MAP-D": 2, "MAP-F": 1, "MORL-D": 1, "MORL-F": 1, "DPO": 2, "DPO-Soup": 1}
    for column in columns.values():
        for tolerance in ("0", "0.06"):
            assert 0.0 <= column["navigation_efficiency"][tolerance]["navigation_efficiency"] <= 1.0
        for member in column["members"]:
            assert set(member["levels"]) == {"word-level", "perplexity"}
            assert all(math.isfinite(level["mean"]) for level in member["levels"].values())
            assert math.isfinite(member["kl"]["mean"])
            assert member["levels"]["word-level"]["target"] == pytest.approx(
                summary["palette"]["targets"]["word-level"])
    assert columns["MAP-F"]["members"][0]["setting"]["lambda"] == columns["MAP-D"]["members"][0]["setting"]["lambda"]
    assert columns["MAP-F"]["members"][0]["setting"]["method"] == "ppo"
    # the online and DPO runs left their exported models; the soup is the interpolation of the two DPO models
    models = out / "models"
    assert (models / "MAP-F_palette" / "model" / "config.json").exists()
    dpo_first, dpo_second = models / "dpo_β_0.1__ρ_1" / "model", models / "dpo_β_0.1__ρ_0" / "model"
    mixed = params(soup_from_folders([dpo_first, dpo_second], [0.5, 0.5]))
    a, b = params(from_pretrained(dpo_first)), params(from_pretrained(dpo_second))
    for path, value in mixed.items():
        np.testing.assert_allclose(value, 0.5 * a[path] + 0.5 * b[path], rtol=1e-6, atol=1e-7)
    table = (out / "table3.md").read_text()
    for column in table3_mapf.COLUMNS:
        assert f"| {column} |" in table
    assert json.loads((out / "table3.json").read_text())["columns"]["DPO"]["models"] == 2
    # a rerun of the same config resumes: every evaluation is read back from members/
    stamps = {path: path.stat().st_mtime_ns for path in (out / "members").iterdir()}
    assert len(stamps) == 8
    again = table3_mapf.run(config, out)
    assert again["columns"] == columns
    assert {path: path.stat().st_mtime_ns for path in (out / "members").iterdir()} == stamps


@pytest.mark.parametrize("change, message", [
    ({"columns": ["MAP-D", "PPO"]}, "columns: unknown column 'PPO'"),
    ({"palette": "humor>=q0.5"}, r"palette names \['humor'\], which the config does not score"),
    ({"dpo": {"config": {"beta": 0.2}}}, "dpo.config.beta: β comes from dpo.betas"),
    ({"dpo": {"config": {"stepz": 2}}}, "dpo.config.stepz: unknown setting"),
    ({"dpo": {"ratios": [0.5, 1.5]}}, r"dpo.ratios\[1\] must lie in \[0, 1\]"),
    ({"dpo": {"values": ["perplexity"]}}, "dpo.values must name two values"),
    ({"online": {"config": {"group_sizes": 2}}}, "online.config.group_sizes: unknown setting"),
    ({"online": {"method": "grpo", "config": {"group_size": 1}}}, "online.config: group_size must be >= 2 for GRPO"),
    ({"soup": {"weights": [0.5, 1.5]}}, r"soup.weights\[1\] must lie in \[0, 1\]"),
    ({"navigation": {"values": ["sentiment"]}}, r"navigation.values names \['sentiment'\]"),
    ({"k": 1}, "k must be a whole number >= 2"),
    ({"extra": 1}, "extra: unknown setting"),
])
def test_table3_config_errors_name_the_setting(tmp_path, change, message):
    from experiments import table3_mapf
    from mapjax.errors import ConfigError

    config = tiny_table3_config(tmp_path / "policy", tmp_path / "prompts.txt")
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    with pytest.raises(ConfigError, match=message):
        table3_mapf.resolve_config(config)


def test_table3_configs_load():
    from experiments import table3_mapf
    from experiments.common import CONFIGS, load_yaml

    demo = table3_mapf.resolve_config(load_yaml(CONFIGS / "table3_mapf_demo.yaml"))
    assert demo.policy == "packaged-smollm2" and demo.chat_template and demo.columns == list(table3_mapf.COLUMNS)
    opt = table3_mapf.resolve_config(load_yaml(CONFIGS / "table3_mapf_opt.yaml"))
    assert opt.policy == "facebook/opt-1.3b" and opt.online.method == "ppo" and opt.dpo.betas == [0.1, 0.5]
    assert opt.navigation.values == ["gpt2-helpful", "gpt2-harmless"]


# ============================================================================ the online MAP-F benchmark


@pytest.mark.slow
def test_online_mapf_benchmark_tiny(tmp_path):
    from benchmarks import online_mapf as benchmark

    out = tmp_path / "bench"
    # One offline and one online method: the other two take the same code paths (and every method runs in
    # `python benchmarks/online_mapf.py --tiny`); DPO and PPO are trained by the Table 3 test above.
    results = benchmark.main(["--tiny", "--budget", "0.5", "--probe-steps", "1", "--eval-samples", "2",
                              "--methods", "weighted,grpo", "--out", str(out), "--set", "grpo.clip_range=0.3"])
    rows = results["rows"]
    assert list(rows) == ["base", "weighted", "grpo"]
    assert rows["grpo"]["settings"]["clip_range"] == 0.3
    for method, row in rows.items():
        assert set(row["levels"]) == {"word-level", "perplexity"}
        assert all(math.isfinite(level["mean"]) for level in row["levels"].values())
        assert math.isfinite(row["kl"]["mean"])
        if method != "base":
            assert row["timing"]["steps"] >= 1 and row["timing"]["wall_s"] > 0
    assert rows["base"]["kl"]["mean"] == 0.0
    assert results["targets"]["word-level"] == rows["base"]["levels"]["word-level"]["target"]
    assert "| grpo |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["budget_s"] == 0.5
    for argv in (["--tiny", "--methods", "weighted,sft"], ["--tiny", "--set", "grpo.group_sizes=2"],
                 ["--tiny", "--set", "grpo.group_size"], ["--tiny", "--budget", "0"]):
        with pytest.raises(SystemExit):
            benchmark.main(argv)


@pytest.mark.slow
def test_pool_command_samples_through_the_chat_template(tiny_policy_folder, tmp_path, capsys):
    """``mapjax pool --chat-template`` builds what ``build_pool(format_prompt=chat_formatter(tokenizer))`` builds,
    and its manifest tells ``mapjax finetune`` so; a tokenizer without a template is refused."""
    import shutil

    from transformers import AutoTokenizer

    from mapjax.cli import main
    from mapjax.finetune.against_base import pool_prompt_format

    plain = tiny_policy_folder("gpt2")
    policy = tmp_path / "policy"
    shutil.copytree(plain, policy)
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(policy))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w17 w33\nw8\n")
    arguments = ["pool", "--prompts", str(prompts), "--values", "diversity", "--samples", "2",
                 "--max-new-tokens", "4", "--quiet", "--chat-template"]
    assert main(arguments + ["--policy", str(policy), "--out", str(tmp_path / "chat.jsonl")]) == 0
    formatter = pool_prompt_format(tmp_path / "chat.jsonl", AutoTokenizer.from_pretrained(str(policy)))
    assert formatter is not None and formatter("w8") == "w97 w8 w98 w99"
    assert main(arguments + ["--policy", str(plain), "--out", str(tmp_path / "raw.jsonl")]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert not (tmp_path / "raw.jsonl").exists()
