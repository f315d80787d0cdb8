"""MAP-F on a tiny random GPT-2: the weighted and DPO losses against numpy, training, resume, errors, the CLI."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.finetune import FinetuneConfig, FinetuneError, dpo_loss, dpo_pairs, finetune, weighted_examples
from mapjax.finetune import examples as data_module
from mapjax.finetune.engine import Engine
from mapjax.finetune.offline import objective_for
from mapjax.finetune.weighted import weighted_loss
from mapjax.models import from_pretrained
from mapjax.pool import RewardPool

PROMPTS = ["w5 w17 w33", "w8", "w40 w41 w42 w43"]
LAM = np.array([1.5, 0.5])


def make_pool(with_texts: bool = True) -> RewardPool:
    rng = np.random.RandomState(0)
    generations = []
    for _ in range(len(PROMPTS)):
        generations.append(tuple(" ".join(f"w{rng.randint(3, 100)}" for _ in range(rng.randint(2, 7)))
                                 for _ in range(4)))
    rewards = rng.normal(size=(len(PROMPTS), 4, 2))
    if not with_texts:
        return RewardPool(rewards, np.ones((len(PROMPTS), 4), bool), ("a", "b"))
    return RewardPool(rewards, np.ones((len(PROMPTS), 4), bool), ("a", "b"), prompts=tuple(PROMPTS),
                      generations=tuple(generations))


@pytest.fixture(scope="module")
def setup(tiny_policy_folder, word_tokenizer):
    directory = tiny_policy_folder("gpt2")
    return directory, from_pretrained(directory), word_tokenizer(), make_pool()


_FORWARDS = {}


def model_logits(model, ids, width=32):
    """The model's logits [len(ids), vocab] from one jitted full forward (right-padded to a fixed width)."""
    from flax import nnx

    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        _FORWARDS[id(model)] = (jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).logits),
                                state)
    forward, state = _FORWARDS[id(model)]
    padded, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    return np.asarray(forward(state, jnp.asarray(padded), jnp.asarray(mask)), np.float64)[0, :len(ids)]


def numpy_logps(model, prompt_ids, cont_ids):
    """Log p of each continuation token with a numpy log-softmax of the model's logits."""
    ids = np.asarray([list(prompt_ids) + list(cont_ids)], np.int32)
    logits = model_logits(model, ids[0])
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    start = len(prompt_ids)
    return np.array([log_softmax[t - 1, ids[0, t]] for t in range(start, ids.shape[1])])


@pytest.mark.slow
def test_weighted_loss_matches_numpy(setup):
    _, model, tokenizer, pool = setup
    examples = weighted_examples(pool, tokenizer, LAM, model=model)
    assert len(examples) == 12
    scores = pool.rewards @ LAM
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    numerator = denominator = sequence_den = 0.0
    for i in range(len(examples)):
        w = weights[examples.prompt_row[i], examples.sample[i]]
        assert examples.weights[i] == pytest.approx(w, rel=1e-6)
        logps = numpy_logps(model, examples.prompt_ids[i], examples.continuation_ids[i])
        numerator -= w * logps.sum()
        denominator += w * len(logps)
        sequence_den += w
    for accum in (1, 2, 4):
        batch = data_module.weighted_batch(examples, np.arange(12), accum, pad_id=0)
        assert batch["ids"].shape[:2] == (accum, 12 // accum)
        assert weighted_loss(model, batch) == pytest.approx(numerator / denominator, rel=1e-5)
        assert weighted_loss(model, batch, normalize="sequence") == pytest.approx(numerator / sequence_den, rel=1e-5)
    # the KL penalty against the model itself is zero
    assert weighted_loss(model, batch, kl_coef=1.0, reference_model=model) == pytest.approx(
        numerator / denominator, rel=1e-5)


@pytest.mark.slow
def test_zero_lambda_gradient_is_plain_likelihood(setup):
    _, model, tokenizer, pool = setup
    examples = weighted_examples(pool, tokenizer, np.zeros(2), model=model)
    np.testing.assert_allclose(examples.weights, 0.25)
    batch = data_module.weighted_batch(examples, np.arange(12), 2, pad_id=0)
    config = FinetuneConfig(batch_size=12, grad_accum=2)
    engine = Engine(model, config, 1)
    grads, _ = engine.gradients(batch, objective_for("weighted", config))

    def plain(params):   # mean token NLL over all continuation tokens, no weights
        ids = batch["ids"].reshape(12, -1)
        logits = engine.policy.logits(params, engine.state.frozen, jnp.asarray(ids),
                                      jnp.asarray(batch["attention"].reshape(12, -1)))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        mask = jnp.asarray(batch["loss_mask"].reshape(12, -1))[:, 1:]
        return -jnp.sum(picked * mask) / jnp.sum(mask)

    expected = jax.grad(plain)(engine.state.trainable)
    assert set(grads) == set(expected)
    for key in grads:
        np.testing.assert_allclose(np.asarray(grads[key]), np.asarray(expected[key]), rtol=2e-4, atol=1e-6)


def _gap(model, pool, lam, tokenizer):
    """Mean over prompts of log p(highest-λᵀr sample) - log p(lowest)."""
    pairs = dpo_pairs(pool, tokenizer, lam, model=model)
    return np.mean([numpy_logps(model, p, c).sum() - numpy_logps(model, q, d).sum() for p, c, q, d in zip(
        pairs.chosen.prompt_ids, pairs.chosen.continuation_ids, pairs.rejected.prompt_ids,
        pairs.rejected.continuation_ids)])


@pytest.mark.slow
def test_weighted_training_favours_high_reward_samples(setup):
    _, model, tokenizer, pool = setup
    lam = np.array([4.0, 0.0])
    result = finetune(model, tokenizer, pool, lam, config=FinetuneConfig(
        batch_size=12, steps=12, learning_rate=3e-3, warmup_steps=2, clip_norm=1.0), progress=False)
    assert len(result.losses) == 12 and result.losses[-1] < result.losses[0]
    # the jitted train step's first loss is the weighted loss of the base model (one step = all 12 examples)
    examples = weighted_examples(pool, tokenizer, lam, model=model)
    batch = data_module.weighted_batch(examples, np.arange(12), 1, pad_id=0)
    assert result.losses[0] == pytest.approx(weighted_loss(model, batch), rel=1e-5)
    assert _gap(result.model, pool, lam, tokenizer) > _gap(model, pool, lam, tokenizer) + 1.0
    # the base model is untouched
    assert np.asarray(model.transformer.wte.weight[...]).sum() != np.asarray(
        result.model.transformer.wte.weight[...]).sum()


@pytest.mark.slow
def test_dpo_loss_matches_direct_computation_and_training_lowers_it(setup, tmp_path):
    _, model, tokenizer, pool = setup
    other = from_pretrained(setup[0])   # the reference: a perturbed copy of the base model
    pairs = dpo_pairs(pool, tokenizer, LAM, model=model)
    assert len(pairs) == 3
    scores = pool.rewards @ LAM
    np.testing.assert_array_equal(pairs.chosen.sample, scores.argmax(axis=1))
    np.testing.assert_array_equal(pairs.rejected.sample, scores.argmin(axis=1))
    reference = np.zeros((3, 2), np.float32)
    policy = np.zeros((3, 2))
    for i in range(3):
        for j, side in enumerate((pairs.chosen, pairs.rejected)):
            reference[i, j] = numpy_logps(other, side.prompt_ids[i], side.continuation_ids[i]).sum() - 0.3 * (j + i)
            policy[i, j] = numpy_logps(model, side.prompt_ids[i], side.continuation_ids[i]).sum()
    beta = 0.5
    margin = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    expected = np.mean(np.log1p(np.exp(-beta * margin)))
    batch = data_module.dpo_batch(pairs, reference, np.arange(3), 1, pad_id=0)
    assert dpo_loss(model, batch, beta=beta) == pytest.approx(expected, rel=1e-5)
    # at the start the policy is the reference: loss log 2; a few steps lower it
    result = finetune(model, tokenizer, pool, LAM, method="dpo", progress=False, out=tmp_path / "dpo",
                      config=FinetuneConfig(batch_size=3, steps=4, learning_rate=1e-2, beta=beta))
    assert result.losses[0] == pytest.approx(np.log(2), rel=1e-5)
    assert result.losses[-1] < result.losses[0]
    assert (tmp_path / "dpo" / "model" / "model.safetensors").exists()


def test_data_stream_visits_every_example_once_per_epoch():
    first = np.concatenate([data_module.step_indices(10, 7, step, 4) for step in range(5)])   # 2 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:])
    np.testing.assert_array_equal(data_module.step_indices(10, 7, 3, 4), first[12:16])


class Killed(RuntimeError):
    pass


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(setup, tmp_path):
    _, model, tokenizer, pool = setup
    config = FinetuneConfig(batch_size=4, grad_accum=2, steps=5, save_every=2, learning_rate=1e-2,
                            warmup_steps=2, kl_coef=0.1, seed=3)

    def run(out, callback=None):
        return finetune(model, tokenizer, pool, LAM, config=config, out=out, callback=callback, progress=False)

    straight = run(tmp_path / "straight")

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_after_3)
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 2
    assert resumed.losses == straight.losses
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, straight.model)),
                    jax.tree.leaves(jax.tree.map(np.asarray, resumed.model))):
        np.testing.assert_array_equal(a, b)
    # a finished run restarted does nothing more; the exported model is the trained one
    again = run(tmp_path / "killed")
    assert again.resumed_from == 5
    exported = from_pretrained(tmp_path / "killed" / "model")
    ids = jnp.asarray([[1, 5, 17, 33, 40]])
    np.testing.assert_allclose(np.asarray(exported(ids, jnp.ones_like(ids)).logits),
                               np.asarray(resumed.model(ids, jnp.ones_like(ids)).logits), atol=1e-5)
    # other settings on the same folder are refused
    with pytest.raises(FinetuneError, match="another run"):
        finetune(model, tokenizer, pool, LAM, config=FinetuneConfig(batch_size=4, steps=5, seed=4),
                 out=tmp_path / "killed", progress=False)


@pytest.mark.slow
def test_bfloat16_step_runs(setup):
    _, model, tokenizer, pool = setup
    result = finetune(model, tokenizer, pool, LAM, config=FinetuneConfig(batch_size=4, steps=2, dtype="bfloat16"),
                      progress=False)
    assert np.all(np.isfinite(result.losses))
    assert result.model.transformer.wte.weight[...].dtype == jnp.float32


def test_bad_input_is_a_clear_error(setup):
    _, model, tokenizer, pool = setup
    with pytest.raises(ValueError, match="humor"):
        finetune(model, tokenizer, pool, "humor>=1", progress=False)
    with pytest.raises(FinetuneError, match="no prompts and generations texts"):
        finetune(model, tokenizer, make_pool(with_texts=False), LAM, progress=False)
    with pytest.raises(FinetuneError, match="method"):
        finetune(model, tokenizer, pool, LAM, method="sft", progress=False)
    with pytest.raises(FinetuneError, match="takes an OnlineConfig"):
        finetune(model, tokenizer, pool, LAM, method="ppo", config=FinetuneConfig(), progress=False)
    with pytest.raises(FinetuneError, match="grad_accum"):
        finetune(model, tokenizer, pool, LAM, config=FinetuneConfig(batch_size=3, grad_accum=2), progress=False)
    with pytest.raises(ValueError, match="λ"):
        finetune(model, tokenizer, pool, {"c": 1.0}, progress=False)


@pytest.mark.parametrize("field, value", [
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("learning_rate", -1e-5),
    ("learning_rate", 0.0), ("clip_norm", float("nan")), ("clip_norm", -1.0), ("warmup_steps", -1),
    ("warmup_steps", 1.5), ("kl_coef", float("nan")), ("kl_coef", -0.1), ("beta", float("inf")), ("beta", 0.0),
    ("weight_decay", float("nan")), ("weight_decay", -0.01), ("epochs", float("nan")), ("epochs", 0.0),
    ("max_length", 1), ("learning_rate", "1e-5"),
])
def test_non_finite_or_negative_settings_are_refused_before_training(setup, field, value):
    """`finetune --lr nan` used to train a NaN model and exit 0: every setting is checked first."""
    _, model, tokenizer, pool = setup
    config = FinetuneConfig(batch_size=4, steps=1, **{field: value})
    with pytest.raises(FinetuneError, match=rf"^{field} must be .*, got {re.escape(repr(value))}$"):
        config.validate("weighted")
    steps = []
    with pytest.raises(FinetuneError, match=field):
        finetune(model, tokenizer, pool, LAM, config=config, progress=False,
                 callback=lambda step, metrics: steps.append(step))
    assert steps == []


def test_valid_edge_settings_are_accepted():
    FinetuneConfig(clip_norm=None, kl_coef=0.0, weight_decay=0.0, warmup_steps=0, max_length=2).validate("dpo")


@pytest.mark.slow
def test_finetune_command(setup, tmp_path, capsys):
    import argparse
    import json

    from mapjax.cli.finetune import register as add_finetune_command

    directory, _, _, pool = setup
    named = RewardPool(pool.rewards, pool.mask, ("diversity", "perplexity"), prompts=pool.prompts,
                       generations=pool.generations)
    pool_file = named.save(tmp_path / "pool.jsonl")
    parser = argparse.ArgumentParser(prog="mapjax")
    add_finetune_command(parser.add_subparsers(dest="command"))
    argv = ["finetune", "--policy", str(directory), "--pool", str(pool_file), "--palette", "diversity>=q0.6",
            "--method", "weighted", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
            "--eval-prompts", "2", "--eval-samples", "2", "--max-new-tokens", "4", "--quiet"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "weighted: 2 steps on 12 examples" in out and "| diversity |" in out
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert [row["value"] for row in report["levels"]] == ["diversity", "perplexity"]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    bad = parser.parse_args(argv[:6] + ["humor>=1"] + argv[7:])
    with pytest.raises(ValueError, match="humor"):
        bad.run(bad)
