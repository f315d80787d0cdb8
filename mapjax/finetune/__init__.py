"""MAP-F: finetune a policy towards p_λ ∝ p0 exp(λᵀr) in pure JAX.

- ``finetune(model, tokenizer, pool, λ, method="weighted" | "dpo" | "grpo" | "ppo", config=..., out=DIR)``: the
  one entry point and the only router between routes; ``finetune_online(model, tokenizer, prompts, values, λ,
  method="grpo" | "ppo", ...)`` for online training without a pool
- ``config``: :class:`FinetuneConfig` (offline), :class:`OnlineConfig` (online), with LoRA / QLoRA fields
- ``engine``: the one trainer (typed train state, optimizer, jitted update, checkpoints by parameter path, the
  run folder); ``offline`` (weighted, DPO) and ``online`` (GRPO, PPO) are loops on it
- ``lora``: adapters through qwix, merged and PEFT export; ``metrics``: ``metrics.jsonl``, TensorBoard, W&B
- losses: ``weighted.weighted_loss`` (reward-weighted token NLL, optional KL to p0), ``dpo.dpo_loss``
- examples: ``examples.weighted_examples`` / ``examples.dpo_pairs`` from a RewardPool, batches in length buckets
- ``soup(models, weights)``: linear interpolation of finetuned models' parameters (DPO-Soup, Rewarded Soups)
- ``against_base.evaluate_finetuned`` / ``against_base.pool_prompt_format``: levels of a finetuned policy against
  its base, sampled with the prompt formatting its pool was sampled with
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from mapjax.errors import FinetuneError
from mapjax.finetune.against_base import evaluate_finetuned, pool_prompt_format
from mapjax.finetune.config import METHODS, ONLINE_METHODS, FinetuneConfig, OnlineConfig
from mapjax.finetune.dpo import dpo_loss
from mapjax.finetune.engine import FinetuneResult
from mapjax.finetune.examples import Examples, Pairs, dpo_pairs, weighted_examples
from mapjax.finetune.online import OnlineResult
from mapjax.finetune.soup import save_soup, soup, soup_from_folders
from mapjax.finetune.weighted import weighted_loss

__all__ = ["Examples", "FinetuneConfig", "FinetuneError", "FinetuneResult", "METHODS", "OnlineConfig",
           "OnlineResult", "Pairs", "dpo_loss", "dpo_pairs", "evaluate_finetuned", "finetune", "finetune_online",
           "pool_prompt_format", "save_soup", "soup", "soup_from_folders", "weighted_examples", "weighted_loss"]


def finetune(model: Any, tokenizer: Any, pool: Any, lam: Any, *, method: str = "weighted",
             config: FinetuneConfig | OnlineConfig | None = None, out: str | os.PathLike | None = None,
             callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True,
             overwrite: bool = False, export: bool = True, mesh: Any = None,
             format_prompt: Callable[[str], str] | None = None, tensorboard: bool = False,
             wandb: str | None = None) -> FinetuneResult:
    """Finetune ``model`` towards p_λ on ``pool``; returns the trained model (a new module).

    Args:
        model, tokenizer: the base policy (a mapjax causal LM) and its tokenizer; ``model`` is not modified.
        pool: a RewardPool with prompt and generated texts, sampled from this policy.
        lam: a Solution, a {value: λ} mapping (numbers), a λ vector in the pool's value order, or a palette
            spec string such as ``"humor>=q0.8, diversity>=mean"`` (solved on the pool with the per-prompt
            normaliser; an unreachable palette is an error).
        method: ``"weighted"`` (reward-weighted likelihood), ``"dpo"`` (DPO on highest- vs lowest-λᵀr pairs),
            or an online route, ``"grpo"`` / ``"ppo"``: the policy samples the pool's prompts itself and is scored
            by the pool's values (reward names) at every step (:func:`finetune_online`, with ``config`` an
            :class:`OnlineConfig`).
        config: the run's settings (:class:`FinetuneConfig` offline, :class:`OnlineConfig` online); LoRA / QLoRA
            with ``lora_rank`` (and ``lora_alpha``, ``lora_targets``, ``lora_dropout``, ``quantize_base``).
        out: run folder: ``checkpoints/`` (Orbax, keyed by parameter path; resumed when present), ``metrics.jsonl``
            (one line per step), ``model/`` (HF format, adapters merged) and under LoRA ``adapter/`` (PEFT format)
            at the end, ``losses.json``. ``None``: no checkpoints and no files.
        callback: called as ``callback(step, metrics)`` after each step (step counts from 1).
        overwrite: replace another run in ``out`` instead of refusing to resume from its checkpoints. The new
            run is made in ``<out>.replacing`` beside it (resumed there after an interruption) and takes the
            place of ``out`` only once it is complete, so ``out`` never mixes the two runs and the old one
            survives an interrupted replacement. ``out`` must be new, empty or a mapjax run (its
            ``.mapjax-run.json`` marker): a folder of the user's, the working folder or a file is refused, with
            ``overwrite`` or without (:func:`mapjax.outputs.check_output_folder`).
        mesh: a device mesh (or its spec, e.g. ``"data=2,fsdp=4"``; None: one device): parameters and optimizer
            state sharded over its ``fsdp``/``model`` axes, each micro-batch's rows over ``data`` x ``fsdp``
            (``batch_size / grad_accum`` must be a multiple of their product). Checkpoints are saved sharded and
            restored onto this mesh, whatever mesh saved them.
        format_prompt: how the pool's policy saw each prompt when it sampled (e.g. its chat template;
            ``pool_prompt_format(pool_file, tokenizer)`` reads it from the pool's manifest): prompts are tokenized
            (and, online, sampled) through it. None: raw (the paper's setting).
        tensorboard: also write TensorBoard event files to ``out/tensorboard`` (needs ``mapjax[tensorboard]``).
        wandb: a W&B project to log each step to (needs ``mapjax[wandb]``; ``WANDB_MODE=offline`` works without a
            network).
    """
    if method in ONLINE_METHODS:
        if config is not None and not isinstance(config, OnlineConfig):
            raise FinetuneError(f"method {method!r} takes an OnlineConfig, got {type(config).__name__}")
        return finetune_online(model, tokenizer, list(pool.prompts), list(pool.value_names), lam, method=method,
                               config=config, out=out, format_prompt=format_prompt, mesh=mesh, callback=callback,
                               progress=progress, overwrite=overwrite, pool=pool, export=export,
                               tensorboard=tensorboard, wandb=wandb)
    if config is not None and not isinstance(config, FinetuneConfig):
        raise FinetuneError(f"method {method!r} takes a FinetuneConfig, got {type(config).__name__}")
    config = config or FinetuneConfig()
    config.validate(method)
    _check_out(out, overwrite, tensorboard)
    from mapjax.finetune import offline

    mesh = offline.check_mesh(config, mesh)
    return offline.train_offline(model, tokenizer, pool, lam, method=method, config=config, out=out,
                                 callback=callback, progress=progress, overwrite=overwrite, export=export, mesh=mesh,
                                 format_prompt=format_prompt, tensorboard=tensorboard, wandb=wandb)


def finetune_online(model: Any, tokenizer: Any, prompts: Sequence[str], values: Sequence[Any] | str, lam: Any, *,
                    method: str = "grpo", config: OnlineConfig | None = None, out: str | os.PathLike | None = None,
                    format_prompt: Callable[[str], str] | None = None, mesh: Any = None,
                    callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True,
                    overwrite: bool = False, reward_options: Mapping[str, Mapping[str, Any]] | None = None,
                    dtype: Any = None, pool: Any = None, export: bool = True, tensorboard: bool = False,
                    wandb: str | None = None) -> OnlineResult:
    """Train ``model`` toward p_λ ∝ p0 exp(λᵀr) with GRPO or PPO on its own samples; returns the trained model
    (a new module; ``model`` itself stays the frozen base). See :mod:`mapjax.finetune.online`.

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
        out: run folder: ``checkpoints/`` (resumed when present), ``metrics.jsonl``, ``model/`` (HF format) and,
            for PPO, ``value_head.safetensors`` at the end, ``losses.json`` (losses, metrics, λ). ``None``: no files.
        format_prompt: how the policy sees a prompt (e.g. ``mapjax.prompts.chat_formatter(tokenizer)``), exactly as
            the pool build used it.
        mesh: a device mesh (``mapjax.sharding.as_mesh`` spec): the rows of every batch are sharded over its
            data axes and the parameters placed by their logical axes. Results do not depend on it.
        callback: ``callback(step, metrics)`` after each step (from 1), once the step is checkpointed.
        progress: a tqdm bar with reward, KL and levels. overwrite: replace another run in ``out`` (see
            :func:`finetune`).
        reward_options: keyword options per reward name. dtype: parameter dtype of the reward models built by
            name (None: float32).
        pool: a RewardPool of the base model's samples to solve a palette spec on (and resolve its quantiles).
        export: write ``out/model`` at the end. tensorboard, wandb: as :func:`finetune`.
    """
    config = config or OnlineConfig()
    if not isinstance(config, OnlineConfig):
        raise FinetuneError(f"method {method!r} takes an OnlineConfig, got {type(config).__name__}")
    config.validate(method)
    _check_out(out, overwrite, tensorboard)
    from mapjax.finetune import online

    return online.train_online(model, tokenizer, prompts, values, lam, method=method, config=config, out=out,
                               format_prompt=format_prompt, mesh=mesh, callback=callback, progress=progress,
                               overwrite=overwrite, reward_options=reward_options, dtype=dtype, pool=pool,
                               export=export, tensorboard=tensorboard, wandb=wandb)


def _check_out(out: Any, overwrite: bool, tensorboard: bool) -> None:
    """Before any work: never the working folder, a file, or a folder of the user's; TensorBoard needs one."""
    if out is not None:
        from mapjax.outputs import check_output_folder

        check_output_folder(out, overwrite=overwrite, flag="out")
    elif tensorboard:
        raise FinetuneError("tensorboard=True (--tensorboard) writes under the run folder: give out (--out)")

