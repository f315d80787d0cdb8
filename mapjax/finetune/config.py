"""The settings of a MAP-F run: :class:`FinetuneConfig` (offline: weighted, DPO), :class:`OnlineConfig` (GRPO,
PPO) and what they share, :class:`TrainingConfig` (the optimizer, its schedule, the compute dtype, checkpoints and
LoRA / QLoRA adapters), with the validators every route uses.

Every field is part of a run's checkpoint fingerprint: a resume with other settings is refused. Each config is
checked by ``validate(method)`` before any model, reward or file is touched, and a bad value is a
:class:`~mapjax.errors.FinetuneError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mapjax.dtypes import dtype_name, known_dtype_name
from mapjax.errors import FinetuneError

OFFLINE_METHODS = ("weighted", "dpo")
ONLINE_METHODS = ("grpo", "ppo")
METHODS = OFFLINE_METHODS + ONLINE_METHODS
DEFAULT_KL_ESTIMATOR = {"grpo": "k1", "ppo": "k1"}
KL_ESTIMATORS = {"grpo": ("full", "k1", "k3"), "ppo": ("k1", "full")}


def check_finite(name: str, value: Any, *, allow_zero: bool) -> None:
    """``value`` is a finite real number > 0 (>= 0 with ``allow_zero``), else a FinetuneError naming ``name``."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FinetuneError(f"{name} must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise FinetuneError(f"{name} must be a finite number {bound}, got {value!r}")


def check_int(name: str, value: Any, low: int | None, *, none: bool = False) -> None:
    """``value`` is an integer (not a bool) >= ``low`` (any integer when ``low`` is None)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (low is None or value >= low)
    if not ok:
        bound = "" if low is None else f" >= {low}"
        raise FinetuneError(f"{name} must be an integer{bound}{' or None' if none else ''}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What every route shares.

    steps: optimizer steps (offline) or rollout steps (online); ``None``: ``epochs`` passes over the data.
    grad_accum: micro-batches each optimizer step's rows are split into (gradients summed, the same update).
    learning_rate, warmup_steps, schedule, weight_decay, clip_norm: AdamW with linear warm-up over
        ``warmup_steps`` optimizer updates, then constant (or cosine decay to 0 with ``schedule="cosine"``), after
        clipping the gradients to a global norm (None: no clipping).
    kl_coef: weight of the KL to the base model (weighted: token-level penalty; online: β, 1 targets p_λ).
    dtype: compute dtype of the forward and backward, ``"float32"`` or ``"bfloat16"`` (or the JAX dtype, kept by
        name): the trained parameters and the optimizer state stay float32, losses are computed in float32.
    lora_rank: None trains every weight; a rank R >= 1 freezes the base and trains LoRA adapters of rank R on the
        ``lora_targets`` projections (``q, k, v, o, gate, up, down``, mapped per architecture by
        :mod:`mapjax.finetune.lora`), scaled by ``lora_alpha / R``, with ``lora_dropout`` on their input while
        training. quantize_base: ``"int8"`` or ``"int4"`` stores the frozen base quantized (QLoRA; needs a rank).
    save_every: checkpoint every N steps (and at the end). seed: data order, sampling and adapter init.
    """

    steps: int | None = None
    epochs: float = 1.0
    grad_accum: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    kl_coef: float = 0.0
    dtype: str = "float32"
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    lora_dropout: float = 0.0
    quantize_base: str = "none"
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        # A JAX dtype is kept by its name: the config is hashed (a static argument of compiled steps) and
        # written to JSON (the fingerprint, losses.json). A bad value is left for validate to name.
        name = known_dtype_name(self.dtype)
        if name is not None:
            object.__setattr__(self, "dtype", name)
        if isinstance(self.lora_targets, str):   # "q,k,v" as the CLI spells it
            object.__setattr__(self, "lora_targets", tuple(part.strip() for part in self.lora_targets.split(",")
                                                           if part.strip()))
        elif isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def adapters(self) -> Any:
        """The run's :class:`mapjax.finetune.lora.LoraConfig`, or None for full finetuning."""
        if self.lora_rank is None:
            return None
        from mapjax.finetune.lora import LoraConfig

        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets,
                          dropout=self.lora_dropout, quantize_base=self.quantize_base)

    def validate_common(self) -> None:
        """The shared fields in range (each route's ``validate`` calls this)."""
        for name in ("grad_accum", "save_every"):
            check_int(name, getattr(self, name), 1)
        if self.steps is not None:
            check_int("steps", self.steps, 1, none=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, None)
        dtype_name(self.dtype, error=FinetuneError)
        if self.schedule not in ("constant", "cosine"):
            raise FinetuneError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        # A NaN or infinite setting would train a NaN model without any error: refuse it here.
        check_finite("learning_rate", self.learning_rate, allow_zero=False)
        check_finite("epochs", self.epochs, allow_zero=False)
        check_finite("weight_decay", self.weight_decay, allow_zero=True)
        if self.clip_norm is not None:
            check_finite("clip_norm", self.clip_norm, allow_zero=False)
        check_finite("kl_coef", self.kl_coef, allow_zero=True)
        if self.lora_rank is None:
            if self.quantize_base != "none":
                raise FinetuneError(f"quantize_base={self.quantize_base!r} quantizes the frozen base of a LoRA run: "
                                    "give lora_rank (--lora-rank) too")
        else:
            self.adapters.validate()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    """Offline MAP-F (``weighted``, ``dpo``) on a pool's samples; the shared fields are :class:`TrainingConfig`'s.

    batch_size: examples (weighted) or pairs (dpo) per optimizer step, split into ``grad_accum`` micro-batches.
    kl_coef: weight of the token-level KL(p_θ || p0) penalty (weighted method only).
    beta: DPO temperature.
    normalize: ``"token"`` (weighted token-level NLL) or ``"sequence"`` (weighted sequence NLL).
    max_length: cut sequences to this many tokens (None: the model's position limit).
    """

    batch_size: int = 8
    beta: float = 0.1
    normalize: str = "token"
    max_length: int | None = None

    def validate(self, method: str) -> None:
        if method not in OFFLINE_METHODS:
            raise FinetuneError(f"method must be one of {list(OFFLINE_METHODS)} (online: 'grpo', 'ppo'), "
                                f"got {method!r}")
        check_int("batch_size", self.batch_size, 1)
        self.validate_common()
        if self.batch_size % self.grad_accum:
            raise FinetuneError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.normalize not in ("token", "sequence"):
            raise FinetuneError(f"normalize must be 'token' or 'sequence', got {self.normalize!r}")
        if self.max_length is not None:
            check_int("max_length", self.max_length, 2, none=True)
        check_finite("beta", self.beta, allow_zero=False)


@dataclasses.dataclass(frozen=True)
class OnlineConfig(TrainingConfig):
    """Online MAP-F (``grpo``, ``ppo``): the policy samples its own continuations at every step. The shared
    fields are :class:`TrainingConfig`'s (``steps`` counts rollout steps, ``epochs`` passes over the prompts,
    ``ceil(epochs · len(prompts) / prompts_per_step)`` steps; the schedule counts optimizer updates,
    ``steps · ppo_epochs · rows / mini_batch_size``).

    Rollouts:
        prompts_per_step: prompts sampled per step. group_size: continuations per prompt (G; GRPO needs >= 2).
        max_new_tokens, top_k, top_p, temperature: the sampler's settings (defaults: the pool's, top-k 50).
            ``top_k=None`` samples the policy itself, which the ratio and KL arithmetic assume; top-k sampling (as
            the paper and the pool do) trains on the filtered policy's samples.
        generation_batch_size: rows per compiled sampling call.
    Optimisation:
        ppo_epochs: passes over each batch of samples. mini_batch_size: rows (samples) per optimizer step
            (``None``: the whole batch, ``prompts_per_step · group_size``); split into ``grad_accum`` micro-batches.
        clip_range: ε of the ratio clip. loss_aggregation: ``"token"`` or ``"sequence"`` (see ``grpo``).
    KL to the base model:
        kl_coef: β (1, the default, targets p_λ). kl_estimator: GRPO ``"k1"`` (the sequence's log-ratio in its
            reward, default), ``"full"`` (exact token KL in the loss, its KL-to-go in the advantage) or ``"k3"``;
            PPO ``"k1"`` (TRL's ``"kl"``, default) or ``"full"`` (see :mod:`mapjax.finetune.grpo` and
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
    """

    kl_coef: float = 1.0
    save_every: int = 10
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 32
    top_k: int | None = 50
    top_p: float = 1.0
    temperature: float = 1.0
    generation_batch_size: int = 16
    ppo_epochs: int = 4
    mini_batch_size: int | None = None
    clip_range: float = 0.2
    loss_aggregation: str = "token"
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
        if method not in ONLINE_METHODS:
            raise FinetuneError(f"method must be one of {list(ONLINE_METHODS)} for online finetuning, got {method!r}")
        for name in ("prompts_per_step", "group_size", "ppo_epochs", "max_new_tokens", "generation_batch_size",
                     "pilot_prompts", "pilot_samples"):
            check_int(name, getattr(self, name), 1)
        self.validate_common()
        for name in ("mini_batch_size", "lam_refresh_every", "top_k"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, none=True)
        if method == "grpo" and self.group_size < 2:
            raise FinetuneError(f"group_size must be >= 2 for GRPO (each sample is compared with the other samples "
                                f"of its prompt), got {self.group_size}")
        if self.mini_rows > self.rows or self.rows % self.mini_rows:
            raise FinetuneError(f"mini_batch_size {self.mini_rows} must divide the {self.rows} samples of a step "
                                f"(prompts_per_step {self.prompts_per_step} x group_size {self.group_size})")
        if self.mini_rows % self.grad_accum:
            raise FinetuneError(f"mini_batch_size {self.mini_rows} is not a multiple of grad_accum {self.grad_accum}")
        if self.loss_aggregation not in ("token", "sequence"):
            raise FinetuneError(f"loss_aggregation must be 'token' or 'sequence', got {self.loss_aggregation!r}")
        allowed = KL_ESTIMATORS[method]
        if self.kl_estimator is not None and self.kl_estimator not in allowed:
            raise FinetuneError(f"kl_estimator must be one of {list(allowed)} for {method}, got {self.kl_estimator!r}")
        check_finite("clip_range", self.clip_range, allow_zero=False)
        check_finite("clip_range_value", self.clip_range_value, allow_zero=False)
        check_finite("vf_coef", self.vf_coef, allow_zero=True)
        check_finite("kl_horizon", self.kl_horizon, allow_zero=False)
        check_finite("temperature", self.temperature, allow_zero=False)
        for name in ("gamma", "gae_lambda", "top_p"):
            value = getattr(self, name)
            check_finite(name, value, allow_zero=name != "top_p")
            if value > 1:
                raise FinetuneError(f"{name} must lie in {'(0, 1]' if name == 'top_p' else '[0, 1]'}, got {value!r}")
        for name in ("leave_one_out", "scale_advantages", "whiten_advantages"):
            if not isinstance(getattr(self, name), bool):
                raise FinetuneError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kl_target is not None:
            check_finite("kl_target", self.kl_target, allow_zero=False)
            if method != "ppo":
                raise FinetuneError("kl_target (the adaptive KL controller) is PPO's; GRPO keeps kl_coef fixed")
            if self.kl_coef == 0:
                raise FinetuneError("kl_target needs kl_coef > 0: the adaptive controller scales the coefficient")
        if self.lam_refresh_every is not None and self.group_size < 2:
            raise FinetuneError(f"lam_refresh_every needs group_size >= 2 (λ is re-solved with the per-prompt "
                                f"normaliser over each prompt's samples), got group_size {self.group_size}")
        if self.pilot_samples < 2:
            raise FinetuneError(f"pilot_samples must be >= 2 (the per-prompt normaliser), got {self.pilot_samples}")
