"""Online MAP-F (GRPO, PPO): the pieces against hand-computed numbers, the KL-regularised optimum p0 exp(λᵀr)/Z
reached on a toy policy, exact resume, settings refused before any model is touched, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.errors import FinetuneError
from mapjax.finetune import OnlineConfig, finetune_online, grpo, ppo
from mapjax.pool import RewardPool


# ----------------------------------------------------------------------------------------------------------- #
# The pieces, by hand
# ----------------------------------------------------------------------------------------------------------- #
def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    # leave-one-out: R_i minus the mean of the other three
    expected = np.array([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [0, 0, 0, 0]])
    np.testing.assert_allclose(grpo.group_advantages(rewards), expected, atol=1e-12)
    np.testing.assert_allclose(grpo.group_advantages(rewards, leave_one_out=False)[0], [-2, -1, 0, 3])
    std = math.sqrt((4 + 1 + 0 + 9) / 4)
    np.testing.assert_allclose(grpo.group_advantages(rewards, leave_one_out=False, scale=True, eps=0.0)[0],
                               np.array([-2, -1, 0, 3]) / std)
    assert np.all(grpo.group_advantages(rewards, scale=True)[1] == 0)
    with pytest.raises(FinetuneError, match="G >= 2"):
        grpo.group_advantages(np.ones((3, 1)))


def test_kl_to_go_and_token_advantages_by_hand():
    kl = jnp.array([[9.0, 0.1, 0.2, 0.3, 9.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(grpo.kl_to_go(kl, mask), [[0.6, 0.5, 0.3, 0.0, 0.0]], atol=1e-6)
    advantages = grpo.token_advantages(jnp.array([2.0]), mask, kl, 0.5)
    np.testing.assert_allclose(advantages, [[0.0, 2.0 - 0.25, 2.0 - 0.15, 2.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(grpo.token_advantages(jnp.array([2.0]), mask), [[0, 2, 2, 2, 0]])


def test_clipped_objective_by_hand():
    old = jnp.zeros(4)
    logp = jnp.log(jnp.array([1.5, 1.5, 0.5, 0.5]))
    advantages = jnp.array([1.0, -1.0, 1.0, -1.0])
    loss, clipped = grpo.clipped_objective(logp, old, advantages, 0.2)
    # -min(ρA, clip(ρ, 0.8, 1.2) A)
    np.testing.assert_allclose(loss, [-1.2, 1.5, -0.5, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 0, 0, 1])
    # the gradient is cut exactly where the clipped term wins
    grads = jax.grad(lambda lp: jnp.sum(grpo.clipped_objective(lp, old, advantages, 0.2)[0]))(logp)
    np.testing.assert_allclose(grads, [0.0, 1.5, -0.5, 0.0], rtol=1e-6)


def test_kl_estimators_by_hand():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.25, 0.25, 0.5])
    exact = float(np.sum(p * np.log(p / q)))
    assert float(grpo.exact_kl(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)))) == pytest.approx(exact, rel=1e-6)
    per_token = np.asarray(grpo.k3(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))))
    np.testing.assert_allclose(per_token, q / p - np.log(q / p) - 1, rtol=1e-5, atol=1e-6)
    assert float(np.sum(p * per_token)) == pytest.approx(exact, rel=1e-6)   # unbiased under π


def test_loss_weights():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(grpo.loss_weights(mask, "token"), mask / 4)
    np.testing.assert_allclose(grpo.loss_weights(mask, "sequence"), [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]])


def test_gae_and_token_rewards_by_hand():
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)          # a prompt position, three generated tokens, padding
    values = np.array([[7.0, 0.5, -0.2, 0.3, 7.0]], np.float32)
    kl = np.array([[5.0, 0.1, -0.05, 0.2, 5.0]], np.float32)
    rewards = np.asarray(ppo.token_rewards(jnp.array([2.0]), jnp.asarray(kl), jnp.asarray(mask), 0.5))
    np.testing.assert_allclose(rewards, [[0, -0.05, 0.025, 2.0 - 0.1, 0]], atol=1e-6)
    gamma, lam = 0.9, 0.8
    r, v = rewards[0, 1:4], values[0, 1:4]
    a3 = r[2] - v[2]
    a2 = r[1] + gamma * v[2] - v[1] + gamma * lam * a3
    a1 = r[0] + gamma * v[1] - v[0] + gamma * lam * a2
    advantages, returns = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    np.testing.assert_allclose(advantages, [[0, a1, a2, a3, 0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, [[0, a1 + v[0], a2 + v[1], a3 + v[2], 0]], rtol=1e-5, atol=1e-6)
    # γ = λ = 1 and zero values: the advantage of a token is the sum of the rewards from it on
    plain, _ = ppo.gae(jnp.asarray(rewards), jnp.zeros_like(jnp.asarray(values)), jnp.asarray(mask), 1.0, 1.0)
    np.testing.assert_allclose(plain[0, 1:4], np.cumsum(r[::-1])[::-1], rtol=1e-6)


def test_whiten_value_loss_and_kl_controller_by_hand():
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    values = jnp.array([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    white = np.asarray(ppo.whiten(values, mask))
    kept = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(white[np.asarray(mask) > 0], (kept - 3) / kept.std(ddof=1), rtol=1e-5)
    assert white[0, 2] == 0
    loss, clipped = ppo.value_loss(jnp.array([1.5, 1.1]), jnp.array([1.0, 1.0]), jnp.array([2.0, 2.0]), 0.2)
    # V_clip = 1.2 for the first: 0.5 max(0.25, 0.64); the second is inside the clip: 0.5 · 0.81
    np.testing.assert_allclose(loss, [0.32, 0.405], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 0])
    assert ppo.adaptive_kl_update(0.2, 9.0, 6.0, 10000.0, 20) == pytest.approx(0.2 * (1 + 0.2 * 20 / 10000))
    assert ppo.adaptive_kl_update(0.2, 5.4, 6.0, 10000.0, 20) == pytest.approx(0.2 * (1 - 0.1 * 20 / 10000))


@pytest.mark.slow
def test_hidden_state_tap_leaves_the_logits_and_the_model_alone():
    """An untied ``lm_head`` here; the toy GPT-2 below trains PPO through a tied embedding's ``attend``."""
    from flax import nnx

    model = toy_policy(tie_word_embeddings=False)
    ids = jnp.array([[1, 5, 3, 7]])
    graphdef, state = nnx.split(model)
    plain = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, jnp.ones_like(ids)).logits)
    tapped = jax.jit(lambda s: ppo.hidden_and_logits(nnx.merge(graphdef, s), ids, jnp.ones_like(ids)))
    before = np.asarray(plain(state))
    hidden, logits = tapped(state)
    np.testing.assert_allclose(logits, before, atol=1e-5)
    assert hidden.shape == (1, 4, 16)
    np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(model.lm_head.weight[...]).T, before, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(plain(nnx.state(model))), before)   # the model itself is untouched
    assert np.all(np.asarray(ppo.ValueHead(hidden.shape[-1])(hidden)) == 0)


# ----------------------------------------------------------------------------------------------------------- #
# A toy policy: one new token from an 8-token vocabulary, so p_λ is known exactly
# ----------------------------------------------------------------------------------------------------------- #
TABLE = {"": (0.0, 0.0), "w3": (1.5, 0.0), "w4": (0.0, 1.0), "w5": (-1.0, 2.0), "w6": (0.5, -1.0),
         "w7": (2.0, 1.0)}   # ids 0, 1, 2 (pad, bos, eos) decode to ""
TOY_LAM = np.array([1.0, 0.5])
TOY_PROMPTS = ["w3 w4", "w6"]


class TableReward:
    """A value of the continuation's text, read off TABLE (a Reward: a callable with a name)."""

    def __init__(self, column: int, name: str):
        self.column, self.name = column, name

    def __call__(self, prompts, continuations):
        return np.array([TABLE[text.strip()][self.column] for text in continuations], np.float32)


TOY_REWARDS = [TableReward(0, "a"), TableReward(1, "b")]


def toy_policy(**options):
    """A one-layer GPT-2 over 8 tokens (pad, bos, eos, w3..w7), random weights: p0 is close to uniform."""
    import transformers

    from mapjax.models import model_class

    cls = model_class("GPT2LMHeadModel")
    hf = transformers.GPT2Config(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, **options)
    return cls.from_config(cls.config_from_hf(hf), seed=0)


@pytest.fixture(scope="module")
def toy(word_tokenizer):
    return toy_policy(), word_tokenizer()


def next_token_distribution(model, tokenizer, prompt):
    ids = tokenizer(prompt)["input_ids"]
    logits = np.asarray(model(jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)).logits[0, -1], np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def distance_to_p_lambda(model, base, tokenizer):
    """Mean over the prompts of the total variation between the model's next-token distribution and
    p0 exp(λᵀr)/Z."""
    reward = np.array([np.array(TABLE["" if i < 3 else f"w{i}"]) @ TOY_LAM for i in range(8)])
    distances = []
    for prompt in TOY_PROMPTS:
        p0 = next_token_distribution(base, tokenizer, prompt)
        target = p0 * np.exp(reward) / np.sum(p0 * np.exp(reward))
        distances.append(0.5 * np.abs(next_token_distribution(model, tokenizer, prompt) - target).sum())
    return float(np.mean(distances))


TOY_SETTINGS = dict(prompts_per_step=2, group_size=16, max_new_tokens=1, top_k=None, ppo_epochs=4,
                    mini_batch_size=16, grad_accum=2, learning_rate=3e-2, clip_norm=None)


@pytest.mark.slow
@pytest.mark.parametrize("method, steps", [("grpo", 80), ("ppo", 80)])
def test_the_kl_regularised_optimum_p_lambda_is_reached(toy, method, steps):
    """With KL coefficient 1 to the frozen base, both methods' optimum is p0 exp(λᵀr)/Z: the learned
    distribution gets there in total variation (from 0.47)."""
    model, tokenizer = toy
    start = distance_to_p_lambda(model, model, tokenizer)
    assert start > 0.4
    config = OnlineConfig(steps=steps, schedule="cosine", **TOY_SETTINGS)
    result = finetune_online(model, tokenizer, TOY_PROMPTS, TOY_REWARDS, TOY_LAM, method=method, config=config,
                             progress=False)
    assert distance_to_p_lambda(result.model, model, tokenizer) < 0.05
    assert len(result.losses) == steps and result.examples == steps * 32
    assert result.history[-1]["levels"].keys() == {"a", "b"} and result.lam == {"a": 1.0, "b": 0.5}
    assert (result.value_head is not None) == (method == "ppo")
    assert distance_to_p_lambda(model, model, tokenizer) == start   # the base model is untouched


@pytest.mark.slow
def test_a_palette_without_a_pool_is_solved_on_the_base_models_own_samples(toy):
    model, tokenizer = toy
    config = OnlineConfig(steps=1, pilot_samples=16, **TOY_SETTINGS)   # the pilot samples like one step
    result = finetune_online(model, tokenizer, TOY_PROMPTS, TOY_REWARDS, "a>=mean+0.5", method="grpo",
                             config=config, progress=False)
    assert result.lam["a"] > 0 and result.lam["b"] == 0 and result.history[0]["lam"] == [result.lam["a"], 0.0]
    with pytest.raises(FinetuneError, match="no λ on the base model's pilot pool"):
        finetune_online(model, tokenizer, TOY_PROMPTS, TOY_REWARDS, "a>=1.9, b>=1.9", method="grpo", config=config,
                        progress=False)


class Killed(RuntimeError):
    pass


def toy_pool():
    """The toy's continuations, each once per prompt, scored: a palette resolves and solves on it."""
    rewards = np.array([[TABLE[text] for text in TABLE] for _ in TOY_PROMPTS])
    return RewardPool(rewards, np.ones(rewards.shape[:2], bool), ("a", "b"))


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("grpo", dict(lam_refresh_every=2, kl_estimator="full")),   # λ and the refresh buffer; the exact token KL
    ("ppo", dict(kl_target=0.05, kl_coef=0.5)),                  # the value head, adaptive β
])
def test_kill_and_resume_equals_an_uninterrupted_run(toy, tmp_path, method, extra):
    model, tokenizer = toy
    settings = {**TOY_SETTINGS, "learning_rate": 1e-2, **extra}
    config = OnlineConfig(steps=5, save_every=2, **settings)

    def run(out, callback=None, config=config):
        return finetune_online(model, tokenizer, TOY_PROMPTS, TOY_REWARDS, "a>=q0.6, b>=mean", method=method,
                               config=config, out=out, callback=callback, progress=False, pool=toy_pool())

    straight = run(tmp_path / "straight")

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_after_3)
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 2
    assert resumed.history == straight.history and resumed.losses == straight.losses
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, straight.model)),
                    jax.tree.leaves(jax.tree.map(np.asarray, resumed.model))):
        np.testing.assert_array_equal(a, b)
    if method == "grpo":
        assert [record.get("refresh") for record in straight.history] == [None, "optimal", None, "optimal", None]
        assert straight.history[0]["lam"] != straight.history[-1]["lam"]     # λ refreshed, and kept across the kill
    else:
        assert straight.kl_coef != 0.5 and resumed.kl_coef == straight.kl_coef
        np.testing.assert_array_equal(np.asarray(resumed.value_head.weight[...]),
                                      np.asarray(straight.value_head.weight[...]))
        assert (tmp_path / "killed" / "value_head.safetensors").exists()
    assert json.loads((tmp_path / "killed" / "losses.json").read_text())["history"] == resumed.history
    again = run(tmp_path / "killed")
    assert again.resumed_from == 5 and again.losses == straight.losses
    # a longer run is another run: its checkpoints are refused
    with pytest.raises(FinetuneError, match="another run"):
        run(tmp_path / "killed", config=OnlineConfig(steps=6, save_every=2, **settings))


MESH_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
import test_finetune_online as T
from conftest import make_word_tokenizer

run = T.mesh_run(T.toy_policy(), make_word_tokenizer(), "data=2")
np.savez({out!r}, *jax.tree.leaves(jax.tree.map(np.asarray, run.model)))
print(json.dumps([len(jax.devices()), [record["levels"] for record in run.history]]))
"""


def mesh_run(model, tokenizer, mesh):
    config = OnlineConfig(steps=2, **{**TOY_SETTINGS, "learning_rate": 1e-3})
    return finetune_online(model, tokenizer, TOY_PROMPTS, TOY_REWARDS, TOY_LAM, method="ppo", config=config,
                           progress=False, mesh=mesh)


@pytest.mark.slow
def test_a_mesh_changes_where_the_work_runs_not_what_it_computes(toy, tmp_path, host_devices):
    """PPO (value head replicated, parameters by their logical axes, rows split) on two devices (a subprocess:
    XLA fixes the device count when it starts) samples the same tokens and trains the same parameters, to
    rounding, as on one."""
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    script = MESH_SCRIPT.format(tests=tests, out=str(tmp_path / "mesh.npz"))
    result = host_devices.run(["-c", script], devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    devices, levels = json.loads(result.stdout.strip().splitlines()[-1])
    one = mesh_run(*toy, None)
    assert devices == 2 and levels == [record["levels"] for record in one.history]
    two = np.load(tmp_path / "mesh.npz")
    for index, leaf in enumerate(jax.tree.leaves(jax.tree.map(np.asarray, one.model))):
        np.testing.assert_allclose(two[f"arr_{index}"], leaf, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- #
# Settings refused before anything is touched
# ----------------------------------------------------------------------------------------------------------- #
class Untouchable:
    """Stands in for a model or tokenizer that must not be used: any attribute read fails the test."""

    def __getattr__(self, name):
        pytest.fail(f"the model was used ({name}) before the settings were checked")


@pytest.mark.parametrize("method, change, message", [
    ("grpo", dict(group_size=1), r"^group_size must be >= 2 for GRPO .*got 1$"),
    ("grpo", dict(kl_coef=-0.1), r"^kl_coef must be a finite number >= 0, got -0.1$"),
    ("ppo", dict(kl_coef=float("nan")), r"^kl_coef must be a finite number >= 0, got nan$"),
    ("ppo", dict(learning_rate=float("nan")), r"^learning_rate must be a finite number > 0, got nan$"),
    ("grpo", dict(learning_rate=float("inf")), r"^learning_rate must be a finite number > 0, got inf$"),
    ("grpo", dict(kl_target=6.0), "kl_target .* is PPO's"),
    ("ppo", dict(group_size=1, lam_refresh_every=2), "lam_refresh_every needs group_size >= 2"),
    ("ppo", dict(mini_batch_size=3), "mini_batch_size 3 must divide the 32 samples"),
    ("grpo", dict(kl_estimator="k2"), r"kl_estimator must be one of \['full', 'k1', 'k3'\] for grpo"),
    ("ppo", dict(kl_estimator="k3"), r"kl_estimator must be one of \['k1', 'full'\] for ppo"),
    ("ppo", dict(gamma=1.5), r"gamma must lie in \[0, 1\], got 1.5"),
    ("grpo", dict(prompts_per_step=0), "prompts_per_step must be an integer >= 1, got 0"),
    ("dpo", dict(), "method must be one of"),
])
def test_bad_settings_are_refused_before_any_model_is_touched(method, change, message):
    config = OnlineConfig(**{**dict(prompts_per_step=2, group_size=16), **change})
    with pytest.raises(FinetuneError, match=message):
        config.validate(method)
    with pytest.raises(FinetuneError, match=message):
        finetune_online(Untouchable(), Untouchable(), TOY_PROMPTS, TOY_REWARDS, TOY_LAM, method=method,
                        config=config, progress=False)


@pytest.mark.slow
def test_an_unreachable_palette_is_refused_before_any_reward_is_built():
    # "no-such-reward" would fail to build: the palette's verdict comes first
    with pytest.raises(FinetuneError, match="has no λ on the pool"):
        finetune_online(Untouchable(), Untouchable(), TOY_PROMPTS, ["no-such-reward"], "a>=2, b>=2", method="grpo",
                        config=OnlineConfig(prompts_per_step=2), pool=toy_pool(), progress=False)


# ----------------------------------------------------------------------------------------------------------- #
# The command line
# ----------------------------------------------------------------------------------------------------------- #
def cli_pool(tmp_path):
    rng = np.random.RandomState(0)
    prompts = ("w5 w17 w33", "w8", "w40 w41 w42 w43")
    generations = tuple(tuple(" ".join(f"w{rng.randint(3, 100)}" for _ in range(rng.randint(2, 7)))
                              for _ in range(4)) for _ in prompts)
    pool = RewardPool(rng.normal(size=(3, 4, 2)), np.ones((3, 4), bool), ("diversity", "perplexity"),
                      prompts=prompts, generations=generations)
    return pool.save(tmp_path / "pool.jsonl")


def parse(argv):
    from mapjax.cli.finetune import register

    parser = argparse.ArgumentParser(prog="mapjax")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args([str(a) for a in argv])


@pytest.mark.parametrize("extra, message", [
    (["--method", "grpo", "--group-size", "1"], "group_size must be >= 2"),
    (["--method", "grpo", "--target-kl", "6"], "is PPO's"),
    (["--method", "ppo", "--group-size", "1", "--lam-refresh-every", "3"], "lam_refresh_every needs group_size"),
    (["--method", "ppo", "--kl", "-1"], "--kl"),
    (["--method", "ppo", "--lr", "nan"], "--lr: must be a finite number"),
    (["--method", "grpo", "--gae-lambda", "2"], "gae_lambda must lie in"),
    (["--method", "grpo", "--prompts", "missing.txt"], "missing.txt"),
    (["--method", "grpo", "--mesh", "foo=2"], "unknown mesh axis 'foo'"),
    (["--method", "ppo", "--mesh", "data=2"], "data=2"),   # two devices asked of one
])
def test_cli_checks_online_settings_before_loading_a_model(tmp_path, capsys, monkeypatch, extra, message):
    import mapjax.generate
    from mapjax.cli import EXIT_BAD_INPUT, main

    monkeypatch.setattr(mapjax.generate, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["finetune", "--policy", "some-org/some-model", "--pool", cli_pool(tmp_path), "--palette",
            "diversity>=q0.6", "--out", tmp_path / "run", "--quiet", *extra]
    assert main([str(a) for a in argv]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_stops_at_an_unreachable_palette_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import mapjax.generate
    from mapjax.cli import EXIT_NOT_REACHED, main

    monkeypatch.setattr(mapjax.generate, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["finetune", "--policy", "some-org/some-model", "--pool", cli_pool(tmp_path), "--palette",
            "diversity>=q0.99, perplexity>=q0.99", "--out", tmp_path / "run", "--method", "ppo", "--quiet"]
    assert main([str(a) for a in argv]) == EXIT_NOT_REACHED
    assert "not reachable" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_grpo_smoke_run(tiny_policy_folder, tmp_path, capsys):
    directory = tiny_policy_folder("gpt2")
    args = parse(["finetune", "--policy", directory, "--pool", cli_pool(tmp_path), "--palette", "diversity>=q0.6",
                  "--method", "grpo", "--out", tmp_path / "run", "--steps", "2", "--rollouts-per-step", "2",
                  "--group-size", "2", "--ppo-epochs", "1", "--rollout-tokens", "4", "--lr", "1e-3",
                  "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--dtype", "bfloat16",
                  "--quiet"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "grpo: 2 steps x 2 prompts x 2 samples (raw prompts)" in out and "| diversity |" in out
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert [row["value"] for row in report["levels"]] == ["diversity", "perplexity"]
    losses = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert losses["method"] == "grpo" and len(losses["history"]) == 2
    assert all(math.isfinite(record["kl"]) and math.isfinite(record["reward"]) for record in losses["history"])
    assert (tmp_path / "run" / "model" / "config.json").exists()


@pytest.mark.parametrize("name", ["mapf_online_demo.yaml", "mapf_online_opt_ppo.yaml"])
def test_online_configs_are_valid_settings(name):
    from experiments import mapf
    from experiments.common import CONFIGS, load_config
    from mapjax.cli.finetune import online_config

    config = load_config(mapf.MapfConfig, CONFIGS / name)
    flags = mapf._flags("finetune", config.finetune, "finetune")
    args = parse(["finetune", "--policy", "p", "--pool", "pool.jsonl", "--palette", config.palette, "--out", "o",
                  *flags])
    online = online_config(args)   # validated
    assert args.method in ("grpo", "ppo")
    if name == "mapf_online_opt_ppo.yaml":   # the paper's PPO (TRL defaults, lr 1e-6, batch 20, one epoch)
        assert args.method == "ppo" and online.learning_rate == 1e-6 and online.rows == 20
        assert online.kl_coef == 0.2 and online.kl_target == 6 and online.ppo_epochs == 4
        assert online.vf_coef == 0.1 and online.gae_lambda == 0.95 and online.clip_norm is None
