"""Online MAP-F: GRPO and PPO on the reward λᵀr, sampling from the policy being trained.

>>> from mapjax.finetune.online import OnlineConfig, finetune_online
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

One step (``steps`` of them, each checkpointable):

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
4. ``ppo_epochs`` passes over the batch in mini-batches of ``mini_batch_size`` rows, each one jitted optimizer
   step (AdamW, ``mapjax.finetune.train.optimizer`` at unit rate times the schedule's rate, an argument)
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
and puts it in place only when complete (as :func:`mapjax.finetune.train.finetune` does). An update whose loss
or parameters are not finite stops the run at once with :class:`mapjax.errors.DivergenceError`, before the
policy samples again or the step is saved: the last finite checkpoint stays and nothing is exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mapjax.dtypes import dtype_name, known_dtype_name
from mapjax.errors import FinetuneError
from mapjax.finetune import grpo as grpo_module
from mapjax.finetune import ppo as ppo_module
from mapjax.finetune.examples import collate, step_indices
from mapjax.finetune.train import (
    FinetuneResult,
    _check_finite,
    all_finite,
    kept_checkpoint,
    open_checkpoints,
    optimizer,
    restore_state,
    save_checkpoint,
    stop_if_diverged,
)
from mapjax.finetune.weighted import target_logprobs
from mapjax.jsonio import write_json
from mapjax.models.base import CausalLM
from mapjax.models.padding import length_bucket, pad_token_id
from mapjax.outputs import check_output_folder, replace_folder, staging_folder, write_run_marker

METHODS = ("grpo", "ppo")
DEFAULT_KL_ESTIMATOR = {"grpo": "k1", "ppo": "k1"}
KL_ESTIMATORS = {"grpo": grpo_module.KL_ESTIMATORS, "ppo": ppo_module.KL_ESTIMATORS}

__all__ = ["METHODS", "OnlineConfig", "OnlineResult", "finetune_online"]


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Settings of an online run (all part of the checkpoint fingerprint). Checked by :meth:`validate` before
    any model or reward is touched.

    Rollouts:
        steps: rollout steps (each: sample, score, ``ppo_epochs`` passes); ``None``: ``epochs`` passes over the
            prompts, ``ceil(epochs · len(prompts) / prompts_per_step)`` steps.
        prompts_per_step: prompts sampled per step. group_size: continuations per prompt (G; GRPO needs >= 2).
        max_new_tokens, top_k, top_p, temperature: the sampler's settings (defaults: the pool's, top-k 50).
            ``top_k=None`` samples the policy itself, which the ratio and KL arithmetic assume; top-k sampling (as
            the paper and the pool do) trains on the filtered policy's samples.
        generation_batch_size: rows per compiled sampling call.
    Optimisation:
        ppo_epochs: passes over each batch of samples. mini_batch_size: rows (samples) per optimizer step
            (``None``: the whole batch, ``prompts_per_step · group_size``); split into ``grad_accum`` micro-batches.
        learning_rate, warmup_steps, schedule, weight_decay, clip_norm: AdamW as in ``FinetuneConfig``; the
            schedule counts optimizer updates (``steps · ppo_epochs · batch / mini_batch_size``).
        clip_range: ε of the ratio clip. loss_aggregation: ``"token"`` or ``"sequence"`` (see ``grpo``).
    KL to the base model:
        kl_coef: β (1 targets p_λ). kl_estimator: GRPO ``"k1"`` (the sequence's log-ratio in its reward,
            default), ``"full"`` (exact token KL in the loss, its KL-to-go in the advantage) or ``"k3"``; PPO
            ``"k1"`` (TRL's ``"kl"``, default) or ``"full"`` (see :mod:`mapjax.finetune.grpo` and
            :mod:`mapjax.finetune.ppo`). kl_target, kl_horizon: PPO's adaptive controller (Ziegler et al.) toward
            ``kl_target`` nats per sequence; ``None``: β stays fixed.
    GRPO: leave_one_out: the baseline of a sample is the mean of the *other* samples of its prompt (RLOO; the
        plain group mean shrinks the reward against the KL term by (G − 1)/G). scale_advantages: divide each
        group's centred rewards by its standard deviation (DeepSeekMath; moves the optimum away from p_λ, so off
        by default).
    PPO: vf_coef, clip_range_value, gamma, gae_lambda, whiten_advantages: TRL's value loss weight and clip,
        GAE's γ and λ, whitening of the advantages over the batch.
    λ: lam_refresh_every: re-solve λ on the samples of the last this-many steps, every this-many steps (None:
        never). pilot_prompts, pilot_samples: when λ is a palette spec and no pool is given, the base model's
        pilot pool it is solved on (that many prompts from the start of ``prompts``, that many samples each).
    dtype: compute dtype of the training forward and backward (``"float32"`` or ``"bfloat16"``).
    save_every: checkpoint every N steps (and at the end). seed: data order and sampling.
    """

    steps: int | None = None
    epochs: float = 1.0
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 32
    top_k: int | None = 50
    top_p: float = 1.0
    temperature: float = 1.0
    generation_batch_size: int = 16
    ppo_epochs: int = 4
    mini_batch_size: int | None = None
    grad_accum: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    clip_range: float = 0.2
    loss_aggregation: str = "token"
    kl_coef: float = 1.0
    kl_estimator: str | None = None
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    leave_one_out: bool = True
    scale_advantages: bool = False
    vf_coef: float = 0.1
    clip_range_value: float = 0.2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    lam_refresh_every: int | None = None
    pilot_prompts: int = 64
    pilot_samples: int = 8
    dtype: str = "float32"
    save_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        name = known_dtype_name(self.dtype)   # kept by name: hashed (static jit argument) and written to JSON
        if name is not None:
            object.__setattr__(self, "dtype", name)

    @property
    def rows(self) -> int:
        """Samples per step: ``prompts_per_step · group_size``."""
        return self.prompts_per_step * self.group_size

    @property
    def mini_rows(self) -> int:
        return self.mini_batch_size or self.rows

    def estimator(self, method: str) -> str:
        """The KL estimator ``method`` uses (``kl_estimator`` or the method's default)."""
        return self.kl_estimator or DEFAULT_KL_ESTIMATOR[method]

    def validate(self, method: str) -> None:
        """Every setting in range for ``method``; a FinetuneError naming the first one that is not."""
        if method not in METHODS:
            raise FinetuneError(f"method must be one of {list(METHODS)} for online finetuning, got {method!r}")
        for name in ("prompts_per_step", "group_size", "ppo_epochs", "grad_accum", "save_every", "max_new_tokens",
                     "generation_batch_size", "pilot_prompts", "pilot_samples"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, None)
        for name in ("steps", "mini_batch_size", "lam_refresh_every", "top_k"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, none=True)
        if method == "grpo" and self.group_size < 2:
            raise FinetuneError(f"group_size must be >= 2 for GRPO (each sample is compared with the other samples "
                                f"of its prompt), got {self.group_size}")
        if self.mini_rows > self.rows or self.rows % self.mini_rows:
            raise FinetuneError(f"mini_batch_size {self.mini_rows} must divide the {self.rows} samples of a step "
                                f"(prompts_per_step {self.prompts_per_step} x group_size {self.group_size})")
        if self.mini_rows % self.grad_accum:
            raise FinetuneError(f"mini_batch_size {self.mini_rows} is not a multiple of grad_accum {self.grad_accum}")
        dtype_name(self.dtype, error=FinetuneError)
        if self.schedule not in ("constant", "cosine"):
            raise FinetuneError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.loss_aggregation not in ("token", "sequence"):
            raise FinetuneError(f"loss_aggregation must be 'token' or 'sequence', got {self.loss_aggregation!r}")
        allowed = KL_ESTIMATORS[method]
        if self.kl_estimator is not None and self.kl_estimator not in allowed:
            raise FinetuneError(f"kl_estimator must be one of {list(allowed)} for {method}, got {self.kl_estimator!r}")
        _check_finite("learning_rate", self.learning_rate, allow_zero=False)
        _check_finite("epochs", self.epochs, allow_zero=False)
        _check_finite("weight_decay", self.weight_decay, allow_zero=True)
        if self.clip_norm is not None:
            _check_finite("clip_norm", self.clip_norm, allow_zero=False)
        _check_finite("kl_coef", self.kl_coef, allow_zero=True)
        _check_finite("clip_range", self.clip_range, allow_zero=False)
        _check_finite("clip_range_value", self.clip_range_value, allow_zero=False)
        _check_finite("vf_coef", self.vf_coef, allow_zero=True)
        _check_finite("kl_horizon", self.kl_horizon, allow_zero=False)
        _check_finite("temperature", self.temperature, allow_zero=False)
        for name in ("gamma", "gae_lambda", "top_p"):
            value = getattr(self, name)
            _check_finite(name, value, allow_zero=name != "top_p")
            if value > 1:
                raise FinetuneError(f"{name} must lie in {'(0, 1]' if name == 'top_p' else '[0, 1]'}, got {value!r}")
        for name in ("leave_one_out", "scale_advantages", "whiten_advantages"):
            if not isinstance(getattr(self, name), bool):
                raise FinetuneError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kl_target is not None:
            _check_finite("kl_target", self.kl_target, allow_zero=False)
            if method != "ppo":
                raise FinetuneError("kl_target (the adaptive KL controller) is PPO's; GRPO keeps kl_coef fixed")
            if self.kl_coef == 0:
                raise FinetuneError("kl_target needs kl_coef > 0: the adaptive controller scales the coefficient")
        if self.lam_refresh_every is not None and self.group_size < 2:
            raise FinetuneError(f"lam_refresh_every needs group_size >= 2 (λ is re-solved with the per-prompt "
                                f"normaliser over each prompt's samples), got group_size {self.group_size}")
        if self.pilot_samples < 2:
            raise FinetuneError(f"pilot_samples must be >= 2 (the per-prompt normaliser), got {self.pilot_samples}")


def _check_int(name: str, value: Any, low: int | None, *, none: bool = False) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (low is None or value >= low)
    if not ok:
        bound = "" if low is None else f" >= {low}"
        raise FinetuneError(f"{name} must be an integer{bound}{' or None' if none else ''}, got {value!r}")


@dataclasses.dataclass
class OnlineResult(FinetuneResult):
    """:class:`FinetuneResult` (``losses``: each step's mean loss; ``examples``: samples drawn) plus each step's
    metrics (``history``: reward, KL, levels, ...), the final λ by value name, PPO's final β and value head."""

    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lam: dict[str, float] = dataclasses.field(default_factory=dict)
    kl_coef: float = 1.0
    value_head: Any = None


# --------------------------------------------------------------------------------------------------------- #
# The compiled functions: module-level, the graph, tree structures and (frozen) settings static, so runs with
# the same model and settings share one compilation.
# --------------------------------------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class _Statics:
    graphdef: Any
    treedef: Any
    value_graphdef: Any
    value_treedef: Any
    dtype: str


def _policy(statics: _Statics, rest: Any, params: Sequence[jax.Array]) -> Any:
    compute = jnp.bfloat16 if statics.dtype == "bfloat16" else jnp.float32
    cast = [leaf.astype(compute) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for leaf in params]
    return nnx.merge(statics.graphdef, jax.tree.unflatten(statics.treedef, cast), rest)


def _pass(statics: _Statics, rest: Any, params: Any, value_params: Any, ids: jax.Array, attention: jax.Array,
          with_values: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(token log-probs [rows, seq-1], log-softmax [rows, seq-1, vocab], values [rows, seq-1] or None)``."""
    model = _policy(statics, rest, params)
    values = None
    if with_values:
        hidden, logits = ppo_module.hidden_and_logits(model, ids, attention)
        head = nnx.merge(statics.value_graphdef, jax.tree.unflatten(statics.value_treedef, value_params))
        values = head(hidden)[:, :-1]
    else:
        logits = model(ids, attention).logits.astype(jnp.float32)
    picked, log_probs = target_logprobs(logits, ids)
    return picked, log_probs, values


def _score(statics, rest, params, reference, value_params, ids, attention, *, need_full_kl, need_values):
    """The sampling policy's and the base model's token log-probs, the exact token KL, the values."""
    logp, log_probs, values = _pass(statics, rest, params, value_params, ids, attention, need_values)
    ref_logp, ref_log_probs, _ = _pass(statics, rest, reference, None, ids, attention, False)
    kl = grpo_module.exact_kl(log_probs, ref_log_probs) if need_full_kl else jnp.zeros_like(logp)
    if values is None:
        values = jnp.zeros_like(logp)
    return logp, ref_logp, kl, values


_score_jit = jax.jit(_score, static_argnames=("statics", "need_full_kl", "need_values"))


def _micro_loss(trainable, rest, reference, micro, kl_coef, *, statics, method, config):
    params, value_params = trainable
    ppo = method == "ppo"
    logp, log_probs, values = _pass(statics, rest, params, value_params, micro["ids"], micro["attention"], ppo)
    weight = micro["weight"]
    metrics = {}
    if ppo:
        pg, clipped = ppo_module.policy_loss(logp, micro["old_logp"], micro["advantages"], config.clip_range)
        vf, vf_clipped = ppo_module.value_loss(values, micro["old_values"], micro["returns"],
                                               config.clip_range_value)
        loss = jnp.sum(weight * (pg + config.vf_coef * vf))
        metrics.update(pg_loss=jnp.sum(weight * pg), vf_loss=jnp.sum(weight * vf),
                       vf_clipfrac=jnp.sum(weight * vf_clipped))
    else:
        estimator = config.estimator(method)
        if estimator == "full":
            _, ref_log_probs, _ = _pass(statics, rest, reference, None, micro["ids"], micro["attention"], False)
            kl = grpo_module.exact_kl(log_probs, jax.lax.stop_gradient(ref_log_probs))
        elif estimator == "k3":
            kl = grpo_module.k3(logp, micro["ref_logp"])
        else:   # "k1": the KL is in the advantages already
            kl = jnp.zeros_like(logp)
        token, clipped = grpo_module.grpo_token_loss(logp, micro["old_logp"], micro["advantages"], kl, kl_coef,
                                                     config.clip_range)
        loss = jnp.sum(weight * token)
        metrics.update(pg_loss=jnp.sum(weight * (token - kl_coef * kl)), kl_loss=jnp.sum(weight * kl))
    metrics.update(clipfrac=jnp.sum(weight * clipped), loss=loss)
    return loss, metrics


def _update(trainable, opt_state, rest, reference, batch, kl_coef, learning_rate, *, statics, method, config):
    """One optimizer step on a mini-batch ``[accum, micro, ...]``: a scan over micro-batches summing gradients
    (each micro-batch's loss already carries its share of the mini-batch's token weights), then AdamW at unit
    learning rate scaled by this update's ``learning_rate`` (see :func:`_unit_optimizer_config`)."""
    grad_fn = jax.value_and_grad(
        lambda t, micro: _micro_loss(t, rest, reference, micro, kl_coef, statics=statics, method=method,
                                     config=config), has_aux=True)

    def body(summed, micro):
        (_, metrics), grads = grad_fn(trainable, micro)
        return jax.tree.map(jnp.add, summed, grads), metrics

    grads, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable), batch)
    metrics = jax.tree.map(lambda values: jnp.sum(values, axis=0), metrics)
    updates, opt_state = optimizer(config, 0).update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda update: learning_rate * update, updates)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = all_finite(trainable)
    return trainable, opt_state, metrics


_update_jit = jax.jit(_update, donate_argnums=(0, 1),
                      static_argnames=("statics", "method", "config"))


def _unit_optimizer_config(config: OnlineConfig) -> OnlineConfig:
    """``config`` at learning rate 1, constant: ``mapjax.finetune.train.optimizer`` of it is AdamW whose update,
    times the schedule's learning rate of the step, is AdamW's update at that rate (``adamw = scale_by_adam,
    add_decayed_weights, scale_by_learning_rate``). The rate is then an argument of the compiled update, not a
    constant in it, so runs of any length and learning rate share one compilation."""
    return dataclasses.replace(config, learning_rate=1.0, schedule="constant", warmup_steps=0)


def learning_rate_schedule(config: OnlineConfig, total_updates: int) -> Callable[[int], float]:
    """The learning rate of each optimizer update, as ``mapjax.finetune.train.optimizer`` schedules it: linear
    warm-up over ``warmup_steps`` updates, then constant, or cosine decay to 0 at ``total_updates``."""
    warmup = min(config.warmup_steps, total_updates)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warmup, 1) if warmup else 0,
                                                      max(total_updates, warmup + 1))
    elif warmup:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                         optax.constant_schedule(config.learning_rate)], [warmup])
    else:
        schedule = optax.constant_schedule(config.learning_rate)
    return lambda index: float(np.float32(schedule(index)))


# --------------------------------------------------------------------------------------------------------- #
# The trainer's state
# --------------------------------------------------------------------------------------------------------- #
class _Trainer:
    """The policy split into graph, float32 trainable leaves and the rest; the frozen base; the value head (PPO);
    the optimizer state; λ, β and the refresh buffer."""

    def __init__(self, model: CausalLM, method: str, config: OnlineConfig, total_updates: int, mesh: Any = None):
        self.method, self.config, self.total_updates, self.mesh = method, config, total_updates, mesh
        graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        leaves, treedef = jax.tree.flatten(params)
        self.param_dtypes = [leaf.dtype for leaf in leaves]
        # copies: the update donates its parameters, and the caller's model must stay intact
        policy = [jnp.array(leaf, jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype,
                            copy=True) for leaf in leaves]
        self.reference = [jnp.array(leaf, copy=True) for leaf in policy]
        value_graphdef = value_treedef = None
        value_leaves: list[jax.Array] = []
        if method == "ppo":
            features = _hidden_features(graphdef, treedef, self.rest, policy)
            value_graphdef, value_state = nnx.split(ppo_module.ValueHead(features))
            value_leaves, value_treedef = jax.tree.flatten(value_state)
        self.statics = _Statics(graphdef, treedef, value_graphdef, value_treedef, config.dtype)
        self.trainable = (policy, value_leaves)
        self.learning_rate = learning_rate_schedule(config, total_updates)
        self.tx = optimizer(_unit_optimizer_config(config), 0)
        self.opt_state = self.tx.init(self.trainable)
        # The compiled update reads the unit-rate AdamW settings, the clips and (GRPO) the KL estimator, (PPO)
        # the value loss; the rest is normalised away so that runs differing only there share one compilation.
        defaults = OnlineConfig()
        self.step_config = dataclasses.replace(
            _unit_optimizer_config(defaults), weight_decay=config.weight_decay, clip_norm=config.clip_norm,
            clip_range=config.clip_range, dtype=config.dtype,
            kl_estimator=config.estimator(method) if method == "grpo" else None,
            vf_coef=config.vf_coef if method == "ppo" else defaults.vf_coef,
            clip_range_value=config.clip_range_value if method == "ppo" else defaults.clip_range_value)
        self._update = _update_jit
        if mesh is not None:
            self._lay_out(params, mesh)

    def _lay_out(self, params: Any, mesh: Any) -> None:
        """Place everything on ``mesh``: the policy's parameters and the frozen base by their logical axes
        (``mapjax.sharding.parameter_sharding``, read off the ``Param`` variables), Adam's moments like their
        parameters, the value head, step counts and the rest of the model replicated; the update is jitted with
        those as its output shardings, so the layout never drifts (the compiler reduces the gradients)."""
        from jax.sharding import NamedSharding, PartitionSpec

        from mapjax.sharding import parameter_sharding, place, replicate

        replicated = NamedSharding(mesh, PartitionSpec())
        policy = jax.tree.leaves(parameter_sharding(params, mesh), is_leaf=lambda node: isinstance(node, NamedSharding))
        if len(policy) != len(self.trainable[0]):
            raise FinetuneError(f"the mesh layout covers {len(policy)} of the model's {len(self.trainable[0])} "
                                "parameter arrays")
        shardings = (policy, [replicated] * len(self.trainable[1]))
        structure = jax.tree.structure(self.trainable)
        like_trainable = lambda node: jax.tree.structure(node) == structure  # noqa: E731
        opt_shardings = jax.tree.map(lambda node: shardings if like_trainable(node) else replicated,
                                     jax.eval_shape(self.tx.init, self.trainable), is_leaf=like_trainable)
        self.trainable = place(self.trainable, shardings)
        self.reference = place(self.reference, policy)
        self.rest = replicate(self.rest, mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(self.trainable)
        self._update = jax.jit(_update, donate_argnums=(0, 1), static_argnames=("statics", "method", "config"),
                               out_shardings=(shardings, opt_shardings, replicated))

    def model(self, copy: bool = True) -> Any:
        """A model holding the current policy parameters (in the model's original dtypes). ``copy=False`` shares
        the float32 ones with the trainer: for sampling before the next update, which donates them."""
        leaves = [jnp.array(leaf, dtype, copy=copy) for leaf, dtype in zip(self.trainable[0], self.param_dtypes)]
        return nnx.merge(self.statics.graphdef, jax.tree.unflatten(self.statics.treedef, leaves), self.rest)

    def value_head(self) -> Any:
        if self.method != "ppo":
            return None
        return nnx.merge(self.statics.value_graphdef,
                         jax.tree.unflatten(self.statics.value_treedef, list(self.trainable[1])))

    def score(self, ids: np.ndarray, attention: np.ndarray, need_full_kl: bool, mesh: Any = None
              ) -> tuple[np.ndarray, ...]:
        rows = {"ids": ids, "attention": attention}
        rows = _shard_rows(rows, mesh, axis=0) if mesh is not None else {k: jnp.asarray(v) for k, v in rows.items()}
        out = _score_jit(self.statics, self.rest, self.trainable[0], self.reference, self.trainable[1],
                         rows["ids"], rows["attention"], need_full_kl=need_full_kl, need_values=self.method == "ppo")
        return tuple(np.asarray(value) for value in jax.device_get(out))

    def update(self, batch: dict[str, np.ndarray], kl_coef: float, index: int) -> dict[str, float]:
        """Optimizer update number ``index`` (from 0 over the run: it sets the learning rate) on ``batch``."""
        batch = {key: jnp.asarray(value) for key, value in batch.items()}
        self.trainable, self.opt_state, metrics = self._update(
            self.trainable, self.opt_state, self.rest, self.reference, batch, jnp.float32(kl_coef),
            jnp.float32(self.learning_rate(index)), statics=self.statics, method=self.method,
            config=self.step_config)
        return {key: float(value) for key, value in metrics.items()}

    # checkpoint trees: flat dicts of arrays with fixed-width string keys
    def state_tree(self) -> dict[str, dict[str, Any]]:
        return {"trainable": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(self.trainable))},
                "opt": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(self.opt_state))}}

    def restore_target(self) -> dict[str, dict[str, Any]]:
        """Shapes and dtypes of :meth:`state_tree` (on a mesh with its shardings, so that each device reads its
        own shards)."""
        def target(leaf):
            sharding = leaf.sharding if self.mesh is not None else None
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return jax.tree.map(target, self.state_tree())

    def load_state_tree(self, tree: dict[str, dict[str, Any]]) -> None:
        leaves, structure = jax.tree.flatten(self.trainable)
        self.trainable = jax.tree.unflatten(structure, [jnp.asarray(tree["trainable"][f"{i:05d}"])
                                                        for i in range(len(leaves))])
        opt_leaves, opt_def = jax.tree.flatten(self.opt_state)
        self.opt_state = jax.tree.unflatten(opt_def, [jnp.asarray(tree["opt"][f"{i:05d}"])
                                                     for i in range(len(opt_leaves))])


def _hidden_features(graphdef: Any, treedef: Any, rest: Any, params: Any) -> int:
    """Width of the policy's final hidden state (the input of its output head), from an abstract forward."""
    statics = _Statics(graphdef, treedef, None, None, "float32")

    def hidden(params):
        model = _policy(statics, rest, params)
        ids = jnp.ones((1, 8), jnp.int32)
        return ppo_module.hidden_and_logits(model, ids, jnp.ones_like(ids))[0]

    return int(jax.eval_shape(hidden, params).shape[-1])


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
# The public entry point
# --------------------------------------------------------------------------------------------------------- #
def finetune_online(model: CausalLM, tokenizer: Any, prompts: Sequence[str], values: Sequence[Any] | str, lam: Any, *,
                    method: str = "grpo", config: OnlineConfig | None = None, out: str | os.PathLike | None = None,
                    format_prompt: Callable[[str], str] | None = None, mesh: Any = None,
                    callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True,
                    overwrite: bool = False, reward_options: Mapping[str, Mapping[str, Any]] | None = None,
                    dtype: Any = None, pool: Any = None, export: bool = True) -> OnlineResult:
    """Train ``model`` toward p_λ ∝ p0 exp(λᵀr) with GRPO or PPO on its own samples; returns the trained model
    (a new module; ``model`` itself stays the frozen base).

    Args:
        model, tokenizer: the base policy (a mapjax causal LM) and its tokenizer.
        prompts: the training prompts (raw; the rewards see them as given).
        values: reward names (``mapjax.rewards.get_reward``; ``"perplexity"`` scores under the base model) or
            Reward instances, or a comma-separated string: the values λ weighs, in λ's order.
        lam: a Solution (its targets are kept for refreshing λ), a {value: λ} mapping, a λ vector over
            ``values``, or a palette spec (``"sentiment>=q0.7, coherence>=q0.7"``) solved with the per-prompt
            normaliser on ``pool``, or, without a pool, on a pilot pool sampled from the base model. An unreachable
            palette is an error before any training.
        method: ``"grpo"`` or ``"ppo"``. config: :class:`OnlineConfig`.
        out: run folder: ``checkpoints/`` (Orbax; resumed when present), ``model/`` (HF format) and, for PPO,
            ``value_head.safetensors`` at the end, ``losses.json`` (losses, metrics, λ). ``None``: no checkpoints.
        format_prompt: how the policy sees a prompt (e.g. ``mapjax.prompts.chat_formatter(tokenizer)``), exactly as
            the pool build used it.
        mesh: a device mesh (``mapjax.sharding.as_mesh`` spec): the rows of every batch are sharded over its
            data axes and the parameters placed by their logical axes. Results do not depend on it.
        callback: ``callback(step, metrics)`` after each step (from 1), once the step is checkpointed.
        progress: a tqdm bar with reward, KL and levels. overwrite: replace another run in ``out`` (see module).
        reward_options: keyword options per reward name. dtype: parameter dtype of the reward models built by
            name (None: float32).
        pool: a RewardPool of the base model's samples to solve a palette spec on (and resolve its quantiles).
        export: write ``out/model`` at the end.
    """
    from mapjax.build import model_fingerprint, prompts_hash, resolve_values
    from mapjax.generate import tokenize_prompts
    from mapjax.sampling.inputs import check_prompts

    config = config or OnlineConfig()
    config.validate(method)
    if out is not None:   # before any work: never the working folder, a file, or a folder of the user's
        check_output_folder(out, overwrite=overwrite, flag="out")
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
    trainer = _Trainer(model, method, config, total_steps * updates_per_step, device_mesh)
    fingerprint = _fingerprint(method, config, model, tokenizer, prompts, shown if format_prompt else None,
                               [value.identity for value in rewards], lam_vector, targets, model_fingerprint,
                               prompts_hash)
    run = _Run(lam=lam_vector, kl_coef=float(config.kl_coef))

    manager = None
    out = Path(out) if out is not None else None
    run_folder = out
    if out is not None:
        run_folder = staging_folder(out, overwrite)
        write_run_marker(run_folder, "finetune", method=method)
        manager = _open_checkpoints(run_folder, fingerprint, trainer, run, config, discard_other=run_folder != out)
    start = run.step
    context = _Context(model, tokenizer, prompts, shown, prompt_tokens, rewards, names, targets, config, method,
                       pad_token_id(tokenizer, model), device_mesh)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"finetune ({method})", unit="step")
    try:
        for step in range(start, total_steps):
            metrics = _one_step(context, trainer, run, step, lambda: kept_checkpoint(manager, run_folder))
            run.step = step + 1
            if manager is not None:
                _save(manager, run.step, trainer, fingerprint, run, force=run.step == total_steps)
            if bar is not None:
                bar.set_postfix_str(_postfix(metrics), refresh=False)
                bar.update(1)
            if callback is not None:
                callback(run.step, metrics)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    trained = trainer.model()
    head = trainer.value_head()
    lam_names = {name: float(value) for name, value in zip(names, run.lam)}
    if run_folder is not None:
        write_json(run_folder / "losses.json", {"method": method, "config": dataclasses.asdict(config),
                                                "losses": run.losses, "history": run.history, "lambda": lam_names,
                                                "kl_coef": run.kl_coef})
        if export:
            from mapjax.models import export_pretrained

            export_pretrained(trained, run_folder / "model")
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(run_folder / "model"))
            if head is not None:
                from safetensors.numpy import save_file

                save_file({"weight": np.asarray(head.weight.get_value()), "bias": np.asarray(head.bias.get_value())},
                          str(run_folder / "value_head.safetensors"))
        if run_folder != out:
            replace_folder(run_folder, out)
    return OnlineResult(trained, list(run.losses), total_steps, start, out, total_steps * config.rows,
                        history=list(run.history), lam=lam_names, kl_coef=run.kl_coef, value_head=head)


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


# --------------------------------------------------------------------------------------------------------- #
# One step
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


def _score_texts(rewards: Sequence[Any], prompts: list[str], texts: list[str]) -> np.ndarray:
    """``[rows, values]`` float64 scores (a multi-output reward scored once for all its columns)."""
    from mapjax.build import _score_chunk

    scores = _score_chunk(rewards, prompts, texts)
    return np.stack([np.asarray(scores[value.name], np.float64) for value in rewards], axis=1)


def _one_step(context: _Context, trainer: _Trainer, run: _Run, step: int,
              kept: Callable[[], str] = lambda: "no checkpoint was saved") -> dict[str, Any]:
    config, method = context.config, context.method
    indices = step_indices(len(context.prompts), config.seed, step, config.prompts_per_step)
    shown = [context.shown[i] for i in indices]
    raw = [context.prompts[i] for i in indices]
    generation = _sample(trainer.model(copy=False), context.tokenizer, shown, config, config.group_size, config.seed,
                         step * config.prompts_per_step, context.mesh)
    rows = len(generation.texts)
    scores = _score_texts(context.rewards, [raw[i] for i in generation.prompt_index], generation.texts)
    reward = scores @ run.lam

    prompt_ids = [context.prompt_tokens[indices[i]] for i in generation.prompt_index]
    continuation_ids = [list(generation.row_tokens(row)) for row in range(rows)]
    width = length_bucket(max(len(p) + len(c) for p, c in zip(prompt_ids, continuation_ids)),
                          cap=context.model.max_positions)
    ids, attention, loss_mask = collate(prompt_ids, continuation_ids, width, context.pad_id)
    mask = loss_mask[:, 1:]
    estimator = config.estimator(method)
    micro = config.mini_rows // config.grad_accum
    parts = [trainer.score(ids[s:s + micro], attention[s:s + micro], estimator == "full", context.mesh)
             for s in range(0, rows, micro)]
    old_logp, ref_logp, token_kl, old_values = (np.concatenate([part[i] for part in parts]) for i in range(4))
    sampled_kl = old_logp - ref_logp
    shown_kl = token_kl if estimator == "full" else sampled_kl
    sequence_kl = (shown_kl * mask).sum(axis=1)

    batch = {"ids": ids, "attention": attention, "mask": mask, "old_logp": old_logp}
    if method == "grpo":
        # "k1": the sequence's log-ratio to the base model joins its reward (RLOO's KL in the reward)
        returns = reward - run.kl_coef * sequence_kl if estimator == "k1" else reward
        advantages = grpo_module.group_advantages(returns.reshape(config.prompts_per_step, config.group_size),
                                                  leave_one_out=config.leave_one_out,
                                                  scale=config.scale_advantages).reshape(-1)
        batch["advantages"] = np.asarray(_grpo_advantages_jit(
            advantages.astype(np.float32), mask, token_kl if estimator == "full" else np.zeros_like(mask),
            np.float32(run.kl_coef)))
        batch["ref_logp"] = ref_logp
    else:
        penalty = token_kl if estimator == "full" else sampled_kl
        advantages, returns = jax.device_get(_ppo_advantages_jit(
            reward.astype(np.float32), penalty, old_values, mask, np.float32(run.kl_coef), gamma=config.gamma,
            gae_lambda=config.gae_lambda, whiten=config.whiten_advantages))
        batch.update(advantages=np.asarray(advantages), returns=np.asarray(returns), old_values=old_values * mask)

    totals: dict[str, float] = {}
    updates = 0
    updates_per_step = config.ppo_epochs * (rows // config.mini_rows)
    for epoch in range(config.ppo_epochs):
        order = (np.random.default_rng([config.seed, step, epoch]).permutation(rows) if config.mini_rows < rows
                 else np.arange(rows))
        for first in range(0, rows, config.mini_rows):
            chosen = order[first:first + config.mini_rows]
            mini = {key: value[chosen] for key, value in batch.items()}
            mini["weight"] = grpo_module.loss_weights(mini.pop("mask"), config.loss_aggregation)
            mini = {key: value.reshape((config.grad_accum, micro) + value.shape[1:]) for key, value in mini.items()}
            if context.mesh is not None:
                mini = _shard_rows(mini, context.mesh, axis=1)
            metrics = trainer.update(mini, run.kl_coef, step * updates_per_step + updates)
            # at once, before the policy samples again or the step is saved (``kept`` names what stays)
            stop_if_diverged(metrics, f"rollout step {step + 1}, update {updates + 1}", context.method, kept)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    means = {key: value / updates for key, value in totals.items()}

    levels = {name: float(value) for name, value in zip(context.names, scores.mean(axis=0))}
    record: dict[str, Any] = {"step": step + 1, "reward": float(reward.mean()), "kl": float(sequence_kl.mean()),
                              "kl_coef": run.kl_coef, "loss": means["loss"], "levels": levels,
                              "length": float(mask.sum(axis=1).mean()),
                              **{key: value for key, value in means.items() if key != "loss"}}
    if method == "ppo" and config.kl_target is not None:
        # TRL's controller reads the batch's mean sequence KL, as its penalty measures it
        run.kl_coef = ppo_module.adaptive_kl_update(run.kl_coef, float(sequence_kl.mean()), config.kl_target,
                                                    config.kl_horizon, rows)
    if config.lam_refresh_every is not None:
        run.buffer = (run.buffer + [scores.tolist()])[-config.lam_refresh_every:]
        if (step + 1) % config.lam_refresh_every == 0:
            record["refresh"] = _refresh(context, run)
    record["lam"] = [float(v) for v in run.lam]
    run.losses.append(means["loss"])
    run.history.append(record)
    return record


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


def _refresh(context: _Context, run: _Run) -> str:
    """Re-solve the palette's targets on the buffered samples of the current policy: λ += β Δλ (module doc)."""
    from mapjax import solve
    from mapjax.pool import RewardPool

    group = context.config.group_size
    rewards = np.concatenate([np.asarray(rows, np.float64) for rows in run.buffer]).reshape(-1, group,
                                                                                          len(context.names))
    pool = RewardPool(rewards, np.ones(rewards.shape[:2], bool), context.names)
    solution = solve(pool, context.targets, normaliser="per_prompt")
    if solution.status != "optimal":
        return solution.status
    run.lam = run.lam + run.kl_coef * np.asarray(solution.lam, np.float64)
    return "optimal"


def _postfix(metrics: Mapping[str, Any]) -> str:
    levels = " ".join(f"{name[:10]} {value:.3g}" for name, value in metrics["levels"].items())
    return f"reward {metrics['reward']:.3g} kl {metrics['kl']:.3g} | {levels}"


def _pilot_pool(model: Any, tokenizer: Any, prompts: list[str], shown: list[str], rewards: Sequence[Any],
                config: OnlineConfig, mesh: Any = None) -> Any:
    """The base model's samples of the first ``pilot_prompts`` prompts, ``pilot_samples`` each, scored: the pool
    a palette spec is solved on when none is given (its own seed, so it does not repeat the first step's rows)."""
    from mapjax.pool import RewardPool

    count = min(config.pilot_prompts, len(prompts))
    seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0] % (2 ** 31))
    generation = _sample(model, tokenizer, shown[:count], config, config.pilot_samples, seed, 0, mesh)
    scores = _score_texts(rewards, [prompts[i] for i in generation.prompt_index], generation.texts)
    names = tuple(value.name for value in rewards)
    return RewardPool(scores.reshape(count, config.pilot_samples, len(names)),
                      np.ones((count, config.pilot_samples), bool), names)


# --------------------------------------------------------------------------------------------------------- #
# Devices
# --------------------------------------------------------------------------------------------------------- #
def _as_mesh(mesh: Any, config: OnlineConfig) -> Any:
    """``mesh`` coerced by ``mapjax.sharding.as_mesh`` (None stays None), refused before any work when a
    micro-batch's rows (``mini_batch_size / grad_accum``) cannot be split over its ``data`` x ``fsdp`` devices."""
    from mapjax.sharding import mesh_for_micro_batches

    micro = config.mini_rows // config.grad_accum
    return mesh_for_micro_batches(mesh, micro, f"mini_batch_size {config.mini_rows} / grad_accum {config.grad_accum}",
                                  "mini_batch_size / grad_accum", FinetuneError)


def _shard_rows(batch: dict[str, np.ndarray], mesh: Any, axis: int) -> dict[str, Any]:
    """Arrays with their rows (dimension ``axis``: 0 for ``[rows, ...]``, 1 for ``[accum, micro, ...]``) split over
    the mesh's ``data`` x ``fsdp`` axes."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mapjax.sharding import place, rows_sharding

    sharding = NamedSharding(mesh, PartitionSpec(*([None] * axis), *rows_sharding(mesh).spec))
    return place(dict(batch), {key: sharding for key in batch})


# --------------------------------------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------------------------------------- #
def _fingerprint(method, config, model, tokenizer, prompts, shown, identities, lam, targets, model_fingerprint,
                 prompts_hash) -> str:
    from mapjax.build import _tokenizer_fingerprint

    digest = hashlib.sha256()
    digest.update(json.dumps({"method": method, "config": dataclasses.asdict(config), "values": list(identities),
                              "lam": [float(v) for v in lam],
                              "targets": None if targets is None else [None if math.isnan(v) else float(v)
                                                                       for v in targets]},
                             sort_keys=True).encode())
    digest.update(model_fingerprint(model).encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    digest.update(prompts_hash(prompts).encode())
    digest.update(("raw" if shown is None else prompts_hash(shown)).encode())
    return digest.hexdigest()


def _open_checkpoints(out: Path, fingerprint: str, trainer: _Trainer, run: _Run, config: OnlineConfig, *,
                      discard_other: bool = False) -> Any:
    """The checkpoint manager of ``out/checkpoints``, with ``trainer`` and ``run`` restored from its latest
    checkpoint (``mapjax.finetune.train.open_checkpoints`` refuses, or discards, another run's)."""
    manager, latest, meta = open_checkpoints(out, fingerprint, config.save_every, discard_other=discard_other,
                                             what="model, prompts, values, λ or settings")
    if latest is not None:
        trainer.load_state_tree(restore_state(manager, latest, trainer.restore_target()))
        run.load_json(meta["run"])
    return manager


def _save(manager: Any, step: int, trainer: _Trainer, fingerprint: str, run: _Run, force: bool) -> None:
    save_checkpoint(manager, step, trainer.state_tree(), {"fingerprint": fingerprint, "run": run.to_json()}, force)
