"""Online MAP-F: GRPO and PPO on the reward λᵀr, sampling from the policy being trained.

>>> from mapjax.finetune import OnlineConfig, finetune_online
>>> result = finetune_online(model, tokenizer, prompts, ["sentiment", "coherence"], "sentiment>=q0.7",
...                          method="grpo", pool=pool, out="runs/grpo",
...                          config=OnlineConfig(steps=40, prompts_per_step=8, group_size=4))
>>> result.model, result.history[-1]["levels"]

Why it targets p_λ. The KL-regularised objective ``E_{y~p(·|x)}[λᵀr(x, y)] − β KL(p(·|x) || p0(·|x))`` is
maximised, prompt by prompt, by ``p0 exp(λᵀr / β) / Z(x)``: with ``β = 1`` (``kl_coef``, the default) and the
KL taken to the frozen base model, that is MAP's aligned model p_λ (Theorems 1 and 2). Offline MAP-F
(``method="weighted"``) can only reweight the k samples the pool holds; the online methods sample from the
current policy, so they can go as far as p_λ itself.

The scale of the reward. λ comes from the solver in the rewards' own (raw) units: the solver standardises
each value internally and maps λ back (``mapjax.solver.lambda_for`` returns raw-unit λ), so ``λᵀr`` with the raw
scores is exactly the exponent of p_λ and nothing else may rescale it: a reward multiplied by ``s`` needs
``λ / s``. A constant shift of any value, or any per-prompt constant, changes nothing (it cancels in ``Z(x)``;
the group mean of GRPO and the batch mean of PPO's whitening are such baselines). The scale is sensible by
construction: for a moderate tilt ``KL(p_λ || p0) ≈ ½ Var_{p0}(λᵀr)`` per prompt, so λᵀr varies within a prompt
by about ``√(2 KL)`` nats, a unit or so. Solve the palette with the per-prompt normaliser (what is done here):
the RL optimum normalises per prompt, ``Z(x)``, while the pooled normaliser tilts the prompt distribution too,
which no policy can realise. GRPO's plain group mean (``leave_one_out=False``), its division by the group's
standard deviation (``scale_advantages``), the ``k3`` KL estimator and a KL coefficient other than 1 each move the
optimum away from p_λ (see :mod:`mapjax.finetune.grpo` and :mod:`mapjax.finetune.ppo`); the defaults do not.

One step (``steps`` of them, each checkpointable) is :func:`rollout` -> a :class:`Rollout` -> :func:`advantages`
-> :func:`update`, then the λ refresh:

1. ``prompts_per_step`` prompts (a seeded permutation per pass over ``prompts``, so the data position is the step
   number), each shown to the policy through ``format_prompt`` (the chat template, exactly as the pool build
   fed them), ``group_size`` continuations each from the *current* policy with the jitted sampler
   (``mapjax.generate.generate``). Row keys come from ``seed`` and the row's position in the stream of steps
   (``prompt_index_offset = step · prompts_per_step``), so a step's samples are a function of the seed, the step
   and the parameters: no sampler key needs storing.
2. Every value scores every continuation in this process (rewards built once, by name, with the registry;
   ``perplexity`` under the frozen base model, as the pool scored it); reward ``R = λᵀr``.
3. One scoring pass (jitted) gives the sampling policy's and the base model's token log-probabilities, the exact
   token KL and (PPO) the values; then the advantages (GRPO: group-relative; PPO: per-token rewards, GAE,
   whitening).
4. ``ppo_epochs`` passes over the batch in mini-batches of ``mini_batch_size`` rows, each one update of the
   engine (:mod:`mapjax.finetune.engine`: AdamW at unit rate times the schedule's rate, an argument)
   accumulating ``grad_accum`` micro-batches, in float32 or with a bfloat16 forward (``dtype``) while master
   weights and optimizer state stay float32. Rows are right-padded to a power-of-two length bucket, so the step
   compiles once per bucket, for runs of any length and learning rate. On a ``mesh`` the rows are split over its
   ``data`` x ``fsdp`` axes and the parameters laid out by their logical axes (``mapjax.sharding``).
5. PPO's adaptive KL controller moves β; every ``lam_refresh_every`` steps λ is refreshed (below).

Refreshing λ (Theorem 5's sequential picture). The policy after training with λ_t approximates
``p_t ∝ p0 exp(λ_tᵀr / β)``. Solving the palette's targets (resolved to numbers once, on the base model's pool:
a quantile level never drifts with the policy) on the recent samples of p_t gives Δλ >= 0 that would carry p_t to
the palette, i.e. ``p0 exp((λ_t/β + Δλ)ᵀr)``, so the reward becomes ``λ_{t+1} = λ_t + β Δλ``. The solver keeps
Δλ >= 0: a value the policy already overshoots is not pulled back (λ only grows), and a palette the recent
samples cannot reach leaves λ as it is (the step's ``refresh`` metric says which). Needs ``group_size >= 2``
(the per-prompt normaliser).

Checkpoints (``out/checkpoints``, Orbax): the policy's float32 parameters, the value head (PPO), the optimizer
state, and as JSON the step (= the data position), λ, β, the refresh buffer, the losses and the per-step
metrics. A run killed at any point and started again with the same call resumes from the latest checkpoint and
ends with the same parameters as an uninterrupted run, bit for bit. Another run's checkpoints (other model,
prompts, values, λ or settings: a fingerprint) are refused; ``overwrite=True`` builds the new run beside ``out``
and puts it in place only when complete (as every route does). An update whose loss
or parameters are not finite stops the run at once with :class:`mapjax.errors.DivergenceError`, before the
policy samples again or the step is saved: the last finite checkpoint stays and nothing is exported.
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.errors import FinetuneError
from mapjax.finetune import grpo as grpo_module
from mapjax.finetune import ppo as ppo_module
from mapjax.finetune.config import OnlineConfig
from mapjax.finetune.engine import Engine, FinetuneResult, Policy, RunFolder, export_policy, run_steps, stop_if_diverged
from mapjax.finetune.examples import collate, step_indices
from mapjax.finetune.weighted import target_logprobs
from mapjax.models.base import CausalLM
from mapjax.models.padding import length_bucket, pad_token_id

__all__ = ["OnlineResult", "Rollout", "advantages", "rollout", "train_online", "update"]


@dataclasses.dataclass
class OnlineResult(FinetuneResult):
    """:class:`FinetuneResult` (``losses``: each step's mean loss; ``examples``: samples drawn) plus each step's
    metrics (``history``: reward, KL, levels, ...), the final λ by value name, PPO's final β and value head."""

    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lam: dict[str, float] = dataclasses.field(default_factory=dict)
    kl_coef: float = 1.0
    value_head: Any = None


# --------------------------------------------------------------------------------------------------------- #
# The objectives and the scoring pass (compiled; the policy, objective and settings static)
# --------------------------------------------------------------------------------------------------------- #
def _pass(policy: Policy, frozen: Any, trainable: Any, ids: jax.Array, attention: jax.Array, with_values: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(token log-probs [rows, seq-1], log-softmax [rows, seq-1, vocab], values [rows, seq-1] or None)``."""
    model = policy.model(trainable, frozen)
    values = None
    if with_values:
        hidden, logits = ppo_module.hidden_and_logits(model, ids, attention)
        values = policy.value_head(trainable)(hidden)[:, :-1]
    else:
        logits = model(ids, attention).logits.astype(jnp.float32)
    picked, log_probs = target_logprobs(logits, ids)
    return picked, log_probs, values


def _score(policy, frozen, trainable, reference, ids, attention, *, need_full_kl, need_values):
    """The sampling policy's and the base model's token log-probs, the exact token KL, the values."""
    logp, log_probs, values = _pass(policy, frozen, trainable, ids, attention, need_values)
    ref_logp, ref_log_probs, _ = _pass(policy, frozen, reference, ids, attention, False)
    kl = grpo_module.exact_kl(log_probs, ref_log_probs) if need_full_kl else jnp.zeros_like(logp)
    if values is None:
        values = jnp.zeros_like(logp)
    return logp, ref_logp, kl, values


_score_jit = jax.jit(_score, static_argnames=("policy", "need_full_kl", "need_values"))


@dataclasses.dataclass(frozen=True)
class GrpoObjective:
    """GRPO's clipped token objective with the KL to the base by ``estimator`` (β is the dynamic argument)."""

    estimator: str
    clip_range: float

    def totals(self, batch):
        return None

    def __call__(self, policy: Policy, frozen, trainable, reference, micro, totals, kl_coef):
        logp, log_probs, _ = _pass(policy, frozen, trainable, micro["ids"], micro["attention"], False)
        if self.estimator == "full":
            _, ref_log_probs, _ = _pass(policy, frozen, reference, micro["ids"], micro["attention"], False)
            kl = grpo_module.exact_kl(log_probs, jax.lax.stop_gradient(ref_log_probs))
        elif self.estimator == "k3":
            kl = grpo_module.k3(logp, micro["ref_logp"])
        else:   # "k1": the KL is in the advantages already
            kl = jnp.zeros_like(logp)
        token, clipped = grpo_module.grpo_token_loss(logp, micro["old_logp"], micro["advantages"], kl, kl_coef,
                                                     self.clip_range)
        weight = micro["weight"]
        loss = jnp.sum(weight * token)
        return loss, {"loss": loss, "pg_loss": jnp.sum(weight * (token - kl_coef * kl)),
                      "kl_loss": jnp.sum(weight * kl), "clipfrac": jnp.sum(weight * clipped)}


@dataclasses.dataclass(frozen=True)
class PpoObjective:
    """PPO's clipped policy loss plus the value head's clipped loss (weight ``vf_coef``)."""

    clip_range: float
    clip_range_value: float
    vf_coef: float

    def totals(self, batch):
        return None

    def __call__(self, policy: Policy, frozen, trainable, reference, micro, totals, kl_coef):
        logp, _, values = _pass(policy, frozen, trainable, micro["ids"], micro["attention"], True)
        weight = micro["weight"]
        pg, clipped = ppo_module.policy_loss(logp, micro["old_logp"], micro["advantages"], self.clip_range)
        vf, vf_clipped = ppo_module.value_loss(values, micro["old_values"], micro["returns"], self.clip_range_value)
        loss = jnp.sum(weight * (pg + self.vf_coef * vf))
        return loss, {"loss": loss, "pg_loss": jnp.sum(weight * pg), "vf_loss": jnp.sum(weight * vf),
                      "vf_clipfrac": jnp.sum(weight * vf_clipped), "clipfrac": jnp.sum(weight * clipped)}


def objective_for(method: str, config: OnlineConfig) -> GrpoObjective | PpoObjective:
    if method == "grpo":
        return GrpoObjective(config.estimator(method), float(config.clip_range))
    return PpoObjective(float(config.clip_range), float(config.clip_range_value), float(config.vf_coef))


def _grpo_advantages(advantages, mask, kl, kl_coef):
    return grpo_module.token_advantages(advantages, mask, kl, kl_coef)


def _ppo_advantages(scores, penalty, values, mask, kl_coef, *, gamma, gae_lambda, whiten):
    """Per-token rewards, GAE and (optionally) whitening, in one compiled program."""
    rewards = ppo_module.token_rewards(scores, penalty, mask, kl_coef)
    advantages, returns = ppo_module.gae(rewards, values, mask, gamma, gae_lambda)
    if whiten:
        advantages = ppo_module.whiten(advantages, mask)
    return advantages, returns


_grpo_advantages_jit = jax.jit(_grpo_advantages)
_ppo_advantages_jit = jax.jit(_ppo_advantages, static_argnames=("gamma", "gae_lambda", "whiten"))


# --------------------------------------------------------------------------------------------------------- #
# The run's state besides the arrays, and what every step reads
# --------------------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class _Run:
    """What a checkpoint's JSON keeps besides the arrays: the step (= data position), λ, β, the refresh buffer
    (each recent step's rewards ``[rows, values]``), the losses and metrics so far."""

    lam: np.ndarray
    kl_coef: float
    step: int = 0
    buffer: list[list[list[float]]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "lam": [float(v) for v in self.lam], "kl_coef": self.kl_coef,
                "buffer": self.buffer, "losses": self.losses, "history": self.history}

    def load_json(self, meta: Mapping[str, Any]) -> None:
        self.step = int(meta["step"])
        self.lam = np.asarray(meta["lam"], np.float64)
        self.kl_coef = float(meta["kl_coef"])
        self.buffer = [list(map(list, rows)) for rows in meta["buffer"]]
        self.losses = [float(v) for v in meta["losses"]]
        self.history = list(meta["history"])


@dataclasses.dataclass
class _Context:
    model: Any
    tokenizer: Any
    prompts: list[str]
    shown: list[str]
    prompt_tokens: list[list[int]]
    rewards: list[Any]
    names: tuple[str, ...]
    targets: np.ndarray | None
    config: OnlineConfig
    method: str
    pad_id: int
    mesh: Any


@dataclasses.dataclass
class Rollout:
    """One step's samples from the current policy, scored: what the advantages and the update read."""

    ids: np.ndarray             # [rows, width] prompt + continuation, right-padded to a length bucket
    attention: np.ndarray       # [rows, width] 1 on real tokens
    mask: np.ndarray            # [rows, width - 1] 1 where the next token is a sampled continuation token
    scores: np.ndarray          # [rows, values] each value's score (float64)
    reward: np.ndarray          # [rows] λᵀr
    old_logp: np.ndarray        # [rows, width - 1] the sampling policy's log-probabilities of the tokens
    ref_logp: np.ndarray        # [rows, width - 1] the base model's
    token_kl: np.ndarray        # [rows, width - 1] exact token KL to the base ("full" estimator; else zeros)
    old_values: np.ndarray      # [rows, width - 1] PPO's values at sampling time (zeros for GRPO)
    sequence_kl: np.ndarray     # [rows] the KL each sequence's estimator measures

    @property
    def rows(self) -> int:
        return len(self.reward)


# --------------------------------------------------------------------------------------------------------- #
# One step: rollout -> advantages -> update, then the λ refresh
# --------------------------------------------------------------------------------------------------------- #
def _sample(policy: Any, tokenizer: Any, shown: list[str], config: OnlineConfig, samples: int, seed: int,
            offset: int, mesh: Any) -> Any:
    from mapjax.generate import generate

    options: dict[str, Any] = dict(num_samples=samples, max_new_tokens=config.max_new_tokens, top_k=config.top_k,
                                   top_p=config.top_p, temperature=config.temperature, seed=seed,
                                   batch_size=config.generation_batch_size, prompt_index_offset=offset)
    if mesh is not None:
        options["mesh"] = mesh
    return generate(policy, tokenizer, shown, **options)


def rollout(context: _Context, engine: Engine, run: _Run, step: int) -> Rollout:
    """Sample ``group_size`` continuations of this step's prompts from the current policy, score them with every
    value, and take the sampling policy's and the base's token log-probabilities in one compiled pass."""
    from mapjax.scoring import score_texts

    config, method = context.config, context.method
    indices = step_indices(len(context.prompts), config.seed, step, config.prompts_per_step)
    shown = [context.shown[i] for i in indices]
    raw = [context.prompts[i] for i in indices]
    generation = _sample(engine.sampling_model(), context.tokenizer, shown, config, config.group_size, config.seed,
                         step * config.prompts_per_step, context.mesh)
    rows = len(generation.texts)
    scores = score_texts(context.rewards, [raw[i] for i in generation.prompt_index], generation.texts)
    prompt_ids = [context.prompt_tokens[indices[i]] for i in generation.prompt_index]
    continuation_ids = [list(generation.row_tokens(row)) for row in range(rows)]
    width = length_bucket(max(len(p) + len(c) for p, c in zip(prompt_ids, continuation_ids)),
                          cap=context.model.max_positions)
    ids, attention, loss_mask = collate(prompt_ids, continuation_ids, width, context.pad_id)
    mask = loss_mask[:, 1:]
    estimator = config.estimator(method)
    micro = config.mini_rows // config.grad_accum
    parts = []
    for start in range(0, rows, micro):
        out = _score_jit(engine.policy, engine.state.frozen, engine.state.trainable, engine.reference,
                         engine.place_rows(ids[start:start + micro]), engine.place_rows(attention[start:start + micro]),
                         need_full_kl=estimator == "full", need_values=method == "ppo")
        parts.append(tuple(np.asarray(value) for value in jax.device_get(out)))
    old_logp, ref_logp, token_kl, old_values = (np.concatenate([part[i] for part in parts]) for i in range(4))
    shown_kl = token_kl if estimator == "full" else old_logp - ref_logp
    return Rollout(ids, attention, mask, scores, scores @ run.lam, old_logp, ref_logp, token_kl, old_values,
                   (shown_kl * mask).sum(axis=1))


def advantages(context: _Context, batch: Rollout, run: _Run) -> dict[str, np.ndarray]:
    """The update's rows ``{ids, attention, mask, old_logp, advantages, ...}``: GRPO's group-relative advantages
    (the "k1" KL in the reward), or PPO's per-token rewards, GAE and whitening."""
    config, method = context.config, context.method
    estimator = config.estimator(method)
    rows = {"ids": batch.ids, "attention": batch.attention, "mask": batch.mask, "old_logp": batch.old_logp}
    if method == "grpo":
        returns = batch.reward - run.kl_coef * batch.sequence_kl if estimator == "k1" else batch.reward
        grouped = grpo_module.group_advantages(returns.reshape(config.prompts_per_step, config.group_size),
                                               leave_one_out=config.leave_one_out,
                                               scale=config.scale_advantages).reshape(-1)
        rows["advantages"] = np.asarray(_grpo_advantages_jit(
            grouped.astype(np.float32), batch.mask, batch.token_kl if estimator == "full" else np.zeros_like(batch.mask),
            np.float32(run.kl_coef)))
        rows["ref_logp"] = batch.ref_logp
    else:
        penalty = batch.token_kl if estimator == "full" else batch.old_logp - batch.ref_logp
        advantage, returns = jax.device_get(_ppo_advantages_jit(
            batch.reward.astype(np.float32), penalty, batch.old_values, batch.mask, np.float32(run.kl_coef),
            gamma=config.gamma, gae_lambda=config.gae_lambda, whiten=config.whiten_advantages))
        rows.update(advantages=np.asarray(advantage), returns=np.asarray(returns),
                    old_values=batch.old_values * batch.mask)
    return rows


def update(context: _Context, engine: Engine, rows: dict[str, np.ndarray], run: _Run, step: int,
           kept: Callable[[], str]) -> dict[str, float]:
    """``ppo_epochs`` passes over ``rows`` in seeded mini-batches, one engine update each; the updates' mean
    metrics. A non-finite update stops the run at once (``kept`` names what stays)."""
    config = context.config
    count = len(rows["ids"])
    micro = config.mini_rows // config.grad_accum
    updates_per_step = config.ppo_epochs * (count // config.mini_rows)
    objective = objective_for(context.method, config)
    totals: dict[str, float] = {}
    done = 0
    for epoch in range(config.ppo_epochs):
        order = (np.random.default_rng([config.seed, step, epoch]).permutation(count) if config.mini_rows < count
                 else np.arange(count))
        for first in range(0, count, config.mini_rows):
            chosen = order[first:first + config.mini_rows]
            mini = {key: value[chosen] for key, value in rows.items() if key != "mask"}
            mini["weight"] = grpo_module.loss_weights(rows["mask"][chosen], config.loss_aggregation)
            mini = {key: value.reshape((config.grad_accum, micro) + value.shape[1:]) for key, value in mini.items()}
            metrics = engine.update(mini, objective, step * updates_per_step + done, jnp.float32(run.kl_coef))
            stop_if_diverged(metrics, f"rollout step {step + 1}, update {done + 1}", context.method, kept)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            done += 1
    return {key: value / done for key, value in totals.items()}


def _one_step(context: _Context, engine: Engine, run: _Run, step: int, kept: Callable[[], str]) -> dict[str, Any]:
    config = context.config
    batch = rollout(context, engine, run, step)
    means = update(context, engine, advantages(context, batch, run), run, step, kept)
    levels = {name: float(value) for name, value in zip(context.names, batch.scores.mean(axis=0))}
    record: dict[str, Any] = {"step": step + 1, "reward": float(batch.reward.mean()),
                              "kl": float(batch.sequence_kl.mean()), "kl_coef": run.kl_coef, "loss": means["loss"],
                              "levels": levels, "length": float(batch.mask.sum(axis=1).mean()),
                              **{key: value for key, value in means.items() if key != "loss"}}
    if context.method == "ppo" and config.kl_target is not None:
        # TRL's controller reads the batch's mean sequence KL, as its penalty measures it
        run.kl_coef = ppo_module.adaptive_kl_update(run.kl_coef, float(batch.sequence_kl.mean()), config.kl_target,
                                                    config.kl_horizon, batch.rows)
    if config.lam_refresh_every is not None:
        run.buffer = (run.buffer + [batch.scores.tolist()])[-config.lam_refresh_every:]
        if (step + 1) % config.lam_refresh_every == 0:
            record["refresh"], record["ess"] = _refresh(context, run)
    record["lam"] = [float(v) for v in run.lam]
    record["tokens"] = int(batch.mask.sum())
    run.losses.append(means["loss"])
    run.history.append({key: value for key, value in record.items() if key != "tokens"})
    return record


def _refresh(context: _Context, run: _Run) -> tuple[str, float | None]:
    """Re-solve the palette's targets on the buffered samples of the current policy: λ += β Δλ (module doc).
    Returns the solve's status and the effective sample size of its tilt."""
    from mapjax import solve
    from mapjax.pool import RewardPool

    group = context.config.group_size
    rewards = np.concatenate([np.asarray(rows, np.float64) for rows in run.buffer]).reshape(-1, group,
                                                                                          len(context.names))
    pool = RewardPool(rewards, np.ones(rewards.shape[:2], bool), context.names)
    solution = solve(pool, context.targets, normaliser="per_prompt")
    ess = getattr(solution, "ess", None)
    ess = float(ess) if ess is not None and np.isfinite(ess) else None
    if solution.status != "optimal":
        return solution.status, ess
    run.lam = run.lam + run.kl_coef * np.asarray(solution.lam, np.float64)
    return "optimal", ess


def _postfix(metrics: Mapping[str, Any]) -> str:
    levels = " ".join(f"{name[:10]} {value:.3g}" for name, value in metrics["levels"].items())
    return f"reward {metrics['reward']:.3g} kl {metrics['kl']:.3g} | {levels}"


def _pilot_pool(model: Any, tokenizer: Any, prompts: list[str], shown: list[str], rewards: Sequence[Any],
                config: OnlineConfig, mesh: Any = None) -> Any:
    """The base model's samples of the first ``pilot_prompts`` prompts, ``pilot_samples`` each, scored: the pool
    a palette spec is solved on when none is given (its own seed, so it does not repeat the first step's rows)."""
    from mapjax.pool import RewardPool
    from mapjax.scoring import score_texts

    count = min(config.pilot_prompts, len(prompts))
    seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0] % (2 ** 31))
    generation = _sample(model, tokenizer, shown[:count], config, config.pilot_samples, seed, 0, mesh)
    scores = score_texts(rewards, [prompts[i] for i in generation.prompt_index], generation.texts)
    names = tuple(value.name for value in rewards)
    return RewardPool(scores.reshape(count, config.pilot_samples, len(names)),
                      np.ones((count, config.pilot_samples), bool), names)


def _as_mesh(mesh: Any, config: OnlineConfig) -> Any:
    """``mesh`` coerced by ``mapjax.sharding.as_mesh`` (None stays None), refused before any work when a
    micro-batch's rows (``mini_batch_size / grad_accum``) cannot be split over its ``data`` x ``fsdp`` devices."""
    from mapjax.sharding import mesh_for_micro_batches

    micro = config.mini_rows // config.grad_accum
    return mesh_for_micro_batches(mesh, micro, f"mini_batch_size {config.mini_rows} / grad_accum {config.grad_accum}",
                                  "mini_batch_size / grad_accum", FinetuneError)


def _fingerprint(method, config, model, tokenizer, prompts, shown, identities, lam, targets) -> str:
    from mapjax.scoring import model_fingerprint, prompts_hash, tokenizer_fingerprint

    digest = hashlib.sha256()
    digest.update(json.dumps({"method": method, "config": dataclasses.asdict(config), "values": list(identities),
                              "lam": [float(v) for v in lam],
                              "targets": None if targets is None else [None if math.isnan(v) else float(v)
                                                                       for v in targets]},
                             sort_keys=True).encode())
    digest.update(model_fingerprint(model).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(prompts_hash(prompts).encode())
    digest.update(("raw" if shown is None else prompts_hash(shown)).encode())
    return digest.hexdigest()


def _hidden_features(model: Any) -> int:
    """Width of the policy's final hidden state (the input of its output head), from an abstract forward."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def hidden(state):
        ids = jnp.ones((1, 8), jnp.int32)
        return ppo_module.hidden_and_logits(nnx.merge(graphdef, state), ids, jnp.ones_like(ids))[0]

    return int(jax.eval_shape(hidden, state).shape[-1])


# --------------------------------------------------------------------------------------------------------- #
# λ: resolved once, kept with the palette's targets for refreshing
# --------------------------------------------------------------------------------------------------------- #
def _is_palette_spec(lam: Any) -> bool:
    from mapjax.palette import Palette

    return isinstance(lam, (str, Palette)) or (isinstance(lam, Mapping) and any(isinstance(v, str)
                                                                                for v in lam.values()))


def _solve_palette(pool: Any, palette: Any, where: str) -> Any:
    from mapjax import solve

    solution = solve(pool, palette, normaliser="per_prompt")
    if solution.status != "optimal":
        explanation = solution.certificate.explain() if solution.certificate is not None else ""
        raise FinetuneError(f"the palette {str(palette)!r} has no λ on {where} (status {solution.status}): "
                            f"{explanation}; mapjax.adjust finds the nearest reachable palette")
    return solution


def _lambda_and_targets(lam: Any, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """λ over ``names`` (raw reward units) and the palette's numeric targets over them (NaN where unconstrained;
    None when λ came as plain numbers, which carry no palette)."""
    from mapjax.pool import RewardPool
    from mapjax.solver import Solution, lambda_for

    frame = RewardPool(np.zeros((1, 1, len(names))), np.ones((1, 1), bool), tuple(names))
    vector = lambda_for(frame, lam)
    if not isinstance(lam, Solution):
        return vector, None
    targets = dict(zip(lam.value_names, np.asarray(lam.targets, np.float64)))
    return vector, np.array([targets.get(name, np.nan) for name in names], np.float64)


# --------------------------------------------------------------------------------------------------------- #
# The route
# --------------------------------------------------------------------------------------------------------- #
def train_online(model: CausalLM, tokenizer: Any, prompts: Sequence[str], values: Sequence[Any] | str, lam: Any, *,
                 method: str, config: OnlineConfig, out: Any, format_prompt: Callable[[str], str] | None, mesh: Any,
                 callback: Callable[[int, dict[str, Any]], None] | None, progress: bool, overwrite: bool,
                 reward_options: Mapping[str, Mapping[str, Any]] | None, dtype: Any, pool: Any, export: bool,
                 tensorboard: bool = False, wandb: str | None = None) -> OnlineResult:
    """GRPO and PPO (arguments: :func:`mapjax.finetune.finetune_online`, ``config`` and ``out`` already checked)."""
    from mapjax.generate import tokenize_prompts
    from mapjax.sampling.inputs import check_prompts
    from mapjax.scoring import resolve_values

    if jax.process_count() > 1:
        raise FinetuneError(f"method {method!r} runs in one process (a mesh over its devices); under "
                            "jax.distributed finetune with method 'weighted' or 'dpo'")
    prompts = check_prompts(prompts)
    device_mesh = _as_mesh(mesh, config)
    solved = None
    if _is_palette_spec(lam) and pool is not None:   # before any reward model is built
        solved = _solve_palette(pool, lam, "the pool")
    rewards = resolve_values(values, model, tokenizer, reward_options, dtype=dtype)
    names = tuple(value.name for value in rewards)
    shown = [format_prompt(prompt) for prompt in prompts] if format_prompt is not None else list(prompts)
    prompt_tokens = tokenize_prompts(tokenizer, shown, model)
    for index, ids in enumerate(prompt_tokens):
        if len(ids) + config.max_new_tokens > model.max_positions:
            raise FinetuneError(f"prompts[{index}] has {len(ids)} tokens; with max_new_tokens="
                                f"{config.max_new_tokens} that exceeds the model's {model.max_positions} positions")
    if _is_palette_spec(lam) and solved is None:
        pilot = _pilot_pool(model, tokenizer, prompts, shown, rewards, config, device_mesh)
        solved = _solve_palette(pilot, lam, f"the base model's pilot pool ({pilot.num_prompts} prompts x "
                                            f"{config.pilot_samples} samples)")
    lam_vector, targets = _lambda_and_targets(solved if solved is not None else lam, names)
    if config.lam_refresh_every is not None and targets is None:
        raise FinetuneError("lam_refresh_every re-solves the palette: pass λ as a palette spec or a Solution "
                            "(plain λ numbers carry no targets)")

    total_steps = config.steps or max(1, math.ceil(config.epochs * len(prompts) / config.prompts_per_step))
    updates_per_step = config.ppo_epochs * (config.rows // config.mini_rows)
    head = ppo_module.ValueHead(_hidden_features(model)) if method == "ppo" else None
    engine = Engine(model, config, total_steps * updates_per_step, device_mesh, value_head=head)
    fingerprint = _fingerprint(method, config, model, tokenizer, prompts, shown if format_prompt else None,
                               [value.identity for value in rewards], lam_vector, targets)
    run = _Run(lam=lam_vector, kl_coef=float(config.kl_coef))
    folder = RunFolder(out, overwrite=overwrite, method=method, fingerprint=fingerprint,
                       save_every=config.save_every, what="model, prompts, values, λ or settings", engine=engine,
                       tensorboard=tensorboard, wandb=wandb, config={"method": method, **dataclasses.asdict(config)})
    if folder.meta is not None:
        run.load_json(folder.meta["run"])
    context = _Context(model, tokenizer, prompts, shown, prompt_tokens, rewards, names, targets, config, method,
                       pad_token_id(tokenizer, model), device_mesh)

    def step(index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        metrics = _one_step(context, engine, run, index, folder.kept)
        run.step = index + 1
        return metrics, {"run": run.to_json()}

    run_steps(folder, total_steps, step, description=f"finetune ({method})", postfix=_postfix, callback=callback,
              progress=progress)
    trained = engine.plain_model()
    value_head = engine.value_head()
    lam_names = {name: float(value) for name, value in zip(names, run.lam)}

    def write(path: Path) -> None:
        from mapjax.jsonio import write_json

        write_json(path / "losses.json", {"method": method, "config": dataclasses.asdict(config),
                                          "losses": run.losses, "history": run.history, "lambda": lam_names,
                                          "kl_coef": run.kl_coef, "trainable_parameters": engine.trainable_count()})
        if export:
            export_policy(trained, tokenizer, path, engine)
            if value_head is not None:
                from safetensors.numpy import save_file

                save_file({"weight": np.asarray(value_head.weight.get_value()),
                           "bias": np.asarray(value_head.bias.get_value())}, str(path / "value_head.safetensors"))

    folder.finish(write)
    return OnlineResult(trained, list(run.losses), total_steps, folder.resume_step, folder.out,
                        total_steps * config.rows, engine.trainable_count(), history=list(run.history),
                        lam=lam_names, kl_coef=run.kl_coef, value_head=value_head)
