"""The bfloat16 path: one ``dtype`` setting ("float32" | "bfloat16", :mod:`mapjax.dtypes`) taken by every entry
point, and bf16 outputs within a stated tolerance of float32 on tiny models.

Tolerances (bf16 keeps 8 significant bits: each value is rounded by up to 2^-8 = 0.4%, compounded over layers):

- log-probabilities (log-softmax of causal-LM logits, ``sequence_logprobs``, a classifier's log p): every value
  within ``LOGPROB_TOLERANCE`` = 0.1 nats of float32, and the mean within ``MEAN_LOGPROB_TOLERANCE`` = 0.02 nats.
  The tiny models' 2-D weights are scaled by ``WEIGHT_SCALE`` so their logits spread (std ~0.5) like a trained
  model's rather than sitting near 0, where any dtype would pass. Measured: at most 0.006-0.023 nats, on average
  0.003-0.005, so the bounds have a margin of about 4x.
- cosine coherence (MiniLM): within ``COSINE_TOLERANCE`` = 0.01 (measured 0.0015).
- finetuning: the bf16 run's loss at every one of 5 steps within ``LOSS_TOLERANCE`` = 0.02 nats of the float32
  run's (measured 0.0024).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax import RewardPool
from mapjax.cli import EXIT_BAD_INPUT, EXIT_OK, main
from mapjax.dtypes import DTYPE_NAMES, dtype_name, resolve_dtype
from mapjax.errors import BuildError, FinetuneError, InputError, MapjaxError, RewardError
from mapjax.models import from_pretrained

LOGPROB_TOLERANCE = 0.1
MEAN_LOGPROB_TOLERANCE = 0.02
COSINE_TOLERANCE = 0.01
LOSS_TOLERANCE = 0.02
WEIGHT_SCALE = 5.0
BF16 = np.dtype(jnp.bfloat16)


@pytest.fixture(scope="module")
def scaled_folder(tmp_path_factory, tiny_policy_folder):
    """Factory ``scaled_folder(name)``: conftest's tiny model ``name`` with its word tokenizer, every matrix
    scaled by ``WEIGHT_SCALE`` (in the checkpoint's float32 tensors, so no model is built here)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folders = {}

    def folder(name: str):
        if name not in folders:
            directory = tmp_path_factory.mktemp(f"scaled-{name}")
            shutil.copytree(tiny_policy_folder(name), directory, dirs_exist_ok=True)
            tensors = load_file(directory / "model.safetensors")
            save_file({key: value * WEIGHT_SCALE if value.ndim == 2 else value for key, value in tensors.items()},
                      directory / "model.safetensors")
            folders[name] = directory
        return folders[name]

    return folder


def float_parameter_dtypes(model) -> set[np.dtype]:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {np.dtype(leaf.dtype) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)}


def assert_close_logprobs(float32: np.ndarray, bfloat16: np.ndarray) -> None:
    difference = np.abs(np.asarray(float32, np.float64) - np.asarray(bfloat16, np.float64))
    assert difference.max() <= LOGPROB_TOLERANCE, difference.max()
    assert difference.mean() <= MEAN_LOGPROB_TOLERANCE, difference.mean()
    assert difference.max() > 0   # the bf16 model really computed in bf16


# --------------------------------------------------------------------------------------- the one spelling
def test_resolve_dtype_accepts_names_and_jax_dtypes_and_names_a_bad_value():
    assert DTYPE_NAMES == ("float32", "bfloat16")
    assert resolve_dtype("float32") is jnp.float32 and resolve_dtype("bfloat16") is jnp.bfloat16
    assert resolve_dtype(jnp.bfloat16) is jnp.bfloat16 and dtype_name(np.dtype("float32")) == "float32"
    for bad in ("bf16", "float16", jnp.float16, "Float32", None, 32):
        with pytest.raises(InputError) as caught:
            resolve_dtype(bad)
        assert repr(bad) in str(caught.value) and "'float32' or 'bfloat16'" in str(caught.value)
    with pytest.raises(FinetuneError, match="my setting must be"):
        resolve_dtype("half", what="my setting", error=FinetuneError)


# --------------------------------------------------------------------------------------- causal LMs
def _forward(graphdef, state, ids, mask, cache):
    model = nnx.merge(graphdef, state)
    output = model(ids, mask, cache=cache)
    return jax.nn.log_softmax(output.logits.astype(jnp.float32), axis=-1), output.cache


_forward_jit = jax.jit(_forward, static_argnums=0)


def log_softmax(model, ids, mask, cache=None):
    """``(log-softmax of the logits in float32, cache)``, compiled (one program per shape, not one per op)."""
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, ids, mask, cache)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "opt_pre_ln", "llama"])
def test_bfloat16_causal_lm_log_softmax_and_cached_decode_stay_near_float32(scaled_folder, padded_batch, name):
    folder = scaled_folder(name)
    float32, bfloat16 = (from_pretrained(folder, resolve_dtype(dtype)) for dtype in DTYPE_NAMES)
    assert float_parameter_dtypes(bfloat16) == {BF16} and float_parameter_dtypes(float32) == {np.dtype("float32")}
    cache = bfloat16.init_cache(3, 16)
    assert {np.dtype(array.dtype) for array in cache.keys + cache.values} == {BF16}

    ids, mask = (jnp.asarray(array) for array in padded_batch([16, 11, 5], 16, "left", seed=1))
    reference, _ = log_softmax(float32, ids, mask)
    full, _ = log_softmax(bfloat16, ids, mask)
    real = np.asarray(mask, bool)
    assert_close_logprobs(np.asarray(reference)[real], np.asarray(full)[real])

    if name != "llama":   # the cache code is shared; one architecture (the GPU path's) covers it
        return
    # The bf16 KV cache: prefill all but the last token, then one decode step.
    _, prefill = log_softmax(bfloat16, ids[:, :-1], mask[:, :-1], cache)
    assert {np.dtype(array.dtype) for array in prefill.keys} == {BF16}
    step, _ = log_softmax(bfloat16, ids[:, -1:], mask[:, -1:], prefill)
    assert_close_logprobs(np.asarray(reference)[:, -1], np.asarray(step)[:, -1])


@pytest.mark.slow
def test_bfloat16_sequence_logprobs_stay_near_float32(scaled_folder):
    from mapjax.generate import load_policy, sequence_logprobs

    prompts = ["w3 w4 w5", "w10", "w20 w21 w22 w23 w24", "w7 w8"]
    continuations = [" w6 w7 w8 w9", " w11 w12", " w25", " w40 w41 w42 w43 w44 w45 w46"]
    results = {}
    for dtype in DTYPE_NAMES:
        model, tokenizer = load_policy(scaled_folder("llama"), resolve_dtype(dtype))
        results[dtype] = sequence_logprobs(model, tokenizer, prompts, continuations)
    for float32, bfloat16 in zip(results["float32"], results["bfloat16"]):
        assert float32.dtype == bfloat16.dtype == np.float32 and float32.shape == bfloat16.shape
    assert_close_logprobs(np.concatenate(results["float32"]), np.concatenate(results["bfloat16"]))


# --------------------------------------------------------------------------------------- rewards
@pytest.mark.slow
def test_bfloat16_classifier_reward_scores_stay_near_float32(scaled_folder):
    from mapjax.rewards import ClassifierReward

    prompts = ["w3 w4 w5", "w10", "w20 w21 w22", "w7"]
    continuations = [" w6 w7", " w11 w12 w13 w14", " w25", " w40 w41"]
    rewards = {dtype: ClassifierReward(scaled_folder("gpt2_classifier"), label=2, scale="log_prob", dtype=dtype)
               for dtype in ("float32", jnp.bfloat16)}   # the name and the JAX dtype are the same setting
    assert rewards[jnp.bfloat16].dtype == "bfloat16" and float_parameter_dtypes(rewards[jnp.bfloat16].model) == {BF16}
    scores = {dtype: reward(prompts, continuations) for dtype, reward in rewards.items()}
    assert scores["float32"].dtype == scores[jnp.bfloat16].dtype == np.float32
    assert_close_logprobs(scores["float32"], scores[jnp.bfloat16])


@pytest.mark.slow
def test_bfloat16_coherence_through_the_registry_stays_near_float32(tiny_model, word_tokenizer):
    from mapjax.models.packaged import minilm_path
    from mapjax.scoring import resolve_values

    try:
        minilm_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    prompts = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a joke about cats."]
    continuations = [" Mix flour, water, yeast and salt, knead, let it rise, then bake.", " Paris.",
                     " Bananas are yellow and grow on trees."]
    scores = {}
    for dtype in DTYPE_NAMES:
        # the run's dtype reaches the rewards built by name; perplexity is scored under the policy as given
        coherence, = resolve_values(["coherence"], tiny_model(), word_tokenizer(), None, dtype=dtype)
        assert coherence.reward.dtype == dtype and float_parameter_dtypes(coherence.reward.model) == {
            np.dtype(resolve_dtype(dtype))}
        assert coherence.identity == 'registry:coherence:{}'   # the dtype is a setting of the build, not here
        scores[dtype] = coherence.reward(prompts, continuations)
    assert scores["bfloat16"].dtype == np.float32
    difference = np.abs(scores["float32"] - scores["bfloat16"])
    assert 0 < difference.max() <= COSINE_TOLERANCE


# --------------------------------------------------------------------------------------- finetuning
def finetune_pool() -> RewardPool:
    rng = np.random.default_rng(0)
    prompts = ["w3 w4", "w5", "w6 w7 w8", "w9 w10"]
    records = [{"prompt": prompt, "generated": " " + " ".join(f"w{rng.integers(3, 100)}" for _ in range(4)),
                "a": float(rng.normal()), "b": float(rng.normal())} for prompt in prompts for _ in range(3)]
    return RewardPool.from_records(records)


@pytest.mark.slow
def test_finetune_command_trains_in_bfloat16_along_the_float32_loss_trajectory(scaled_folder, word_tokenizer,
                                                                               tmp_path):
    from mapjax.finetune import FinetuneConfig, finetune

    pool = finetune_pool()
    # float32 through the Python API, bfloat16 through the command line: the same run otherwise
    config = FinetuneConfig(batch_size=4, steps=5, learning_rate=3e-3, dtype="float32")
    float32 = finetune(from_pretrained(scaled_folder("gpt2")), word_tokenizer(), pool, "a>=mean", config=config,
                       progress=False)
    assert main(["finetune", "--policy", str(scaled_folder("gpt2")), "--pool", str(pool.save(tmp_path / "pool.jsonl")),
                 "--palette", "a>=mean", "--out", str(tmp_path / "run"), "--steps", "5", "--batch-size", "4",
                 "--lr", "3e-3", "--eval-prompts", "0", "--quiet", "--dtype", "bfloat16"]) == EXIT_OK
    record = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert record["config"] == json.loads(json.dumps({**dataclasses.asdict(config), "dtype": "bfloat16"}))
    assert float_parameter_dtypes(from_pretrained(tmp_path / "run" / "model")) == {np.dtype("float32")}  # master
    losses = {"float32": np.asarray(float32.losses), "bfloat16": np.asarray(record["losses"])}
    assert losses["float32"][-1] < losses["float32"][0]   # it trains, so the trajectory means something
    difference = np.abs(losses["float32"] - losses["bfloat16"])
    assert 0 < difference.max() <= LOSS_TOLERANCE, (losses, difference)


def test_finetune_config_keeps_a_jax_dtype_by_name():
    from mapjax.finetune import FinetuneConfig

    config = FinetuneConfig(dtype=jnp.bfloat16)
    config.validate("weighted")
    assert config.dtype == "bfloat16" and hash(config) == hash(FinetuneConfig(dtype="bfloat16"))


# --------------------------------------------------------------------------------------- the command line
@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("w3 w4\nw5 w6 w7\nw8\n")
    return path


@pytest.mark.slow
def test_pool_command_builds_in_bfloat16_and_refuses_to_resume_in_float32(tiny_policy_folder, prompts_file,
                                                                          tmp_path, capsys):
    out = tmp_path / "pool.jsonl"
    argv = ["pool", "--policy", str(tiny_policy_folder("gpt2")), "--prompts", str(prompts_file), "--values",
            "diversity,perplexity", "--samples", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet"]
    assert main([*argv, "--dtype", "bfloat16"]) == EXIT_OK
    settings = json.loads((tmp_path / "pool.jsonl.manifest.json").read_text())["settings"]
    assert settings["dtype"] == settings["policy_dtype"] == "bfloat16"
    pool = RewardPool.load(out)
    assert pool.num_samples == 6 and np.all(np.isfinite(pool.rewards)) and np.all(pool.rewards[..., 1] < 0)
    capsys.readouterr()
    assert main([*argv, "--dtype", "float32"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "refusing to resume" in error and "dtype: 'bfloat16' then, 'float32' now" in error
    assert "policy_dtype: 'bfloat16' then, 'float32' now" in error


@pytest.mark.slow
def test_build_pool_resumes_a_manifest_from_before_the_dtype_was_recorded(tiny_model, word_tokenizer, tmp_path):
    from mapjax.build import build_pool

    model, tokenizer, out = tiny_model(), word_tokenizer(), tmp_path / "pool.jsonl"
    options = dict(values=["diversity"], samples_per_prompt=2, max_new_tokens=3, out=out, progress=False)
    first = build_pool(model, tokenizer, ["w3 w4", "w5"], **options)
    manifest_path = tmp_path / "pool.jsonl.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"]["dtype"] == "float32"
    for key in ("dtype", "policy_dtype"):
        del manifest["settings"][key]
    manifest_path.write_text(json.dumps(manifest))
    again = build_pool(model, tokenizer, ["w3 w4", "w5"], **options)   # an older build: resumed, not refused
    np.testing.assert_array_equal(again.rewards, first.rewards)
    with pytest.raises(BuildError, match="dtype: 'float32' then, 'bfloat16' now"):
        build_pool(model, tokenizer, ["w3 w4", "w5"], dtype="bfloat16", **options)


def test_demo_command_passes_the_dtype_and_checks_it_before_loading(monkeypatch, tmp_path):
    import mapjax.demo
    import mapjax.models

    seen = {}
    monkeypatch.setattr(mapjax.demo, "run_demo", lambda settings: seen.setdefault("settings", settings))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--dtype", "bfloat16"]) == EXIT_OK
    assert seen["settings"].dtype == "bfloat16"
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        pytest.fail("the policy was loaded before the dtype was checked")

    monkeypatch.setattr(mapjax.models, "from_gguf", refuse)
    with pytest.raises(InputError, match="--dtype must be 'float32' or 'bfloat16'.*'fp16'"):
        mapjax.demo.run_demo(mapjax.demo.DemoSettings(out=tmp_path / "demo", dtype="fp16"))


@pytest.mark.parametrize("command", ["pool", "decode", "finetune", "demo"])
def test_every_model_command_rejects_a_bad_dtype_before_loading_a_model(monkeypatch, capsys, tmp_path, command):
    import mapjax.generate
    import mapjax.models

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before --dtype was checked")

    monkeypatch.setattr(mapjax.generate, "load_policy", refuse)
    monkeypatch.setattr(mapjax.models, "from_gguf", refuse)
    required = {"pool": ["--policy", "org/model", "--prompts", "hh-rlhf", "--values", "diversity", "--out", "p.jsonl"],
                "decode": ["--policy", "org/model", "--prompts", "hh-rlhf", "--palette", "diversity>=mean",
                           "--pool", "p.jsonl", "--out", "r.jsonl"],
                "finetune": ["--policy", "org/model", "--pool", "p.jsonl", "--palette", "diversity>=mean",
                             "--out", "run"],
                "demo": ["--out", str(tmp_path / "demo")]}[command]
    assert main([command, *required, "--dtype", "bf16"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "--dtype: invalid choice: 'bf16'" in error and "float32" in error and "bfloat16" in error
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------- the Python API
def test_python_entry_points_name_a_bad_dtype_before_loading_anything(tiny_model, word_tokenizer, monkeypatch):
    from mapjax.build import build_pool
    from mapjax.finetune import FinetuneConfig
    from mapjax.rewards import ClassifierReward, CoherenceReward, PairRewardModel, batching, get_reward
    from mapjax.rewards.perplexity import make_perplexity_reward

    def refuse(*args, **kwargs):
        pytest.fail("a model was looked up before the dtype was checked")

    monkeypatch.setattr(batching, "resolve_model_folder", refuse)
    monkeypatch.setattr(batching, "load_model", refuse)
    monkeypatch.setattr("mapjax.generate.load_policy", refuse)
    cases = [
        (lambda: ClassifierReward("org/model", dtype="half"), RewardError, "reward 'org/model': dtype"),
        (lambda: PairRewardModel("org/model", dtype="fp32"), RewardError, "reward 'org/model': dtype"),
        (lambda: CoherenceReward("org/model", dtype=jnp.float16), RewardError, "reward 'coherence': dtype"),
        (lambda: get_reward("humor", dtype="bf16"), RewardError, "reward 'humor': dtype"),
        (lambda: make_perplexity_reward(model_path="x.gguf", dtype="bf16"), RewardError, "reward 'perplexity'"),
        (lambda: build_pool(tiny_model(), word_tokenizer(), ["w3"], ["diversity"], dtype="bf16"), BuildError,
         "dtype must be"),
        (lambda: build_pool(tiny_model(), word_tokenizer(), ["w3"], ["coherence"],
                            reward_options={"coherence": {"dtype": "half"}}), BuildError,
         r"reward_options\['coherence'\]\['dtype'\]"),
        (lambda: FinetuneConfig(dtype="bf16").validate("weighted"), FinetuneError, "dtype must be"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            call()
        assert isinstance(caught.value, MapjaxError) and "'float32' or 'bfloat16'" in str(caught.value)
