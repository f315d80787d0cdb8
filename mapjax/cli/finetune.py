"""``mapjax finetune``: MAP-F from the command line, with an evaluation of the finetuned model at the end.

    mapjax finetune --policy ID --pool POOL --palette SPEC --method weighted|dpo|grpo|ppo --out DIR

solves the palette on the pool (per-prompt normaliser), finetunes the policy towards p_λ (resumable: the same
command after an interruption continues from the last checkpoint in DIR), exports DIR/model (HF format), then
samples the finetuned and the base model on the pool's first prompts, scores them with the pool's values
(perplexity under the base policy, as in the pool) and prints realised levels against the palette and the base
model. DIR/evaluation.json holds the numbers. Every setting is checked before the policy is loaded.

``weighted`` and ``dpo`` train on the pool's own samples (offline). ``grpo`` and ``ppo`` sample the policy as it
trains (online, :mod:`mapjax.finetune.online`): on the pool's prompts (or ``--prompts``), scoring the pool's values
in process, with reward λᵀr and a KL penalty to the base model (``--kl 1``, the default for them, targets p_λ
itself). The policy sees each prompt as the pool's build fed it: through the tokenizer's chat template when the
pool's build manifest records one (``--chat-template auto``), for training and evaluation alike. ``--mesh SPEC``
(``data=8``, ``data=2,fsdp=4``) shards the training over a device mesh (:mod:`mapjax.sharding`); results do not
depend on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapjax.cli.common import (
    EXIT_NOT_REACHED,
    EXIT_OK,
    add_dtype_argument,
    add_mesh_arguments,
    add_parser,
    add_policy_argument,
    check_input_file,
    check_output_folder,
    check_palette,
    check_policy,
    check_prompt_source,
    check_reward_names,
    half_open_unit_interval,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    setup_devices,
)
from mapjax.errors import InputError

OFFLINE_METHODS = ("weighted", "dpo")
ONLINE_METHODS = ("grpo", "ppo")


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "finetune", help="MAP-F: finetune a policy towards a palette's p_λ "
                                                      "(reward-weighted likelihood, DPO, GRPO or PPO; resumable)")
    add_policy_argument(command)
    command.add_argument("--pool", required=True, help="reward pool with prompt and generated texts (the online "
                                                       "methods use its prompts and value names)")
    command.add_argument("--palette", required=True, help='e.g. "humor>=q0.8, diversity>=mean"')
    command.add_argument("--method", choices=OFFLINE_METHODS + ONLINE_METHODS, default="weighted",
                         help="weighted / dpo: offline, on the pool's samples; grpo / ppo: online, on the policy's "
                              "own samples")
    command.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/, adapter/ "
                                                      "(LoRA), losses.json, evaluation.json")
    command.add_argument("--steps", type=positive_int, default=None,
                         help="optimizer steps (online: rollout steps; default: --epochs passes)")
    command.add_argument("--epochs", type=positive_float, default=1.0,
                         help="passes over the examples (online: over the prompts)")
    command.add_argument("--batch-size", type=positive_int, default=8, help="examples or pairs per step (offline)")
    command.add_argument("--grad-accum", type=positive_int, default=1)
    command.add_argument("--lr", type=positive_float, default=1e-5)
    command.add_argument("--warmup", type=non_negative_int, default=0, help="warm-up steps (online: updates)")
    command.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    command.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    command.add_argument("--clip", type=non_negative_float, default=1.0, help="global gradient-norm clip (0: none)")
    command.add_argument("--kl", type=non_negative_float, default=None,
                         help="KL(p_θ||p0) coefficient (default: 0 for weighted; 1 for grpo/ppo, which makes their "
                              "optimum p_λ itself)")
    command.add_argument("--beta", type=positive_float, default=0.1, help="DPO β")
    command.add_argument("--normalize", choices=("token", "sequence"), default="token",
                         help="weighted: token- or sequence-level NLL")
    add_dtype_argument(command, help="compute dtype of the training steps: parameters are cast to it for each "
                                     "step, the master weights and optimizer state stay float32, the loss is "
                                     "computed from float32 logits (default: float32). The reward models (online "
                                     "scoring and the evaluation) use the dtype the pool's build recorded (else "
                                     "float32)")
    command.add_argument("--max-length", type=positive_int, default=None)
    command.add_argument("--save-every", type=positive_int, default=50)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--chat-template", choices=("auto", "yes", "no"), default="auto",
                         help="feed prompts through the tokenizer's chat template: auto (as the pool's build "
                              "manifest records it; raw without a manifest), yes or no")
    online = command.add_argument_group("online methods (grpo, ppo)")
    online.add_argument("--prompts", default=None,
                        help="prompt source to train on: hh-rlhf, imdb, or a .txt / .jsonl / .json file "
                             "(default: the pool's prompts)")
    online.add_argument("--count", type=positive_int, default=None, help="use the first N prompts")
    online.add_argument("--rollouts-per-step", type=positive_int, default=8, help="prompts sampled per step")
    online.add_argument("--group-size", type=positive_int, default=4,
                        help="continuations per prompt (G; GRPO needs >= 2)")
    online.add_argument("--mini-batch-size", type=positive_int, default=None,
                        help="samples per optimizer update (default: the whole step's samples)")
    online.add_argument("--ppo-epochs", type=positive_int, default=4, help="passes over each step's samples")
    online.add_argument("--rollout-tokens", type=positive_int, default=None,
                        help="new tokens per training sample (default: --max-new-tokens)")
    online.add_argument("--top-k", type=non_negative_int, default=50,
                        help="top-k of the training sampler, as the pool's (0: sample the policy itself)")
    online.add_argument("--top-p", type=half_open_unit_interval, default=1.0)
    online.add_argument("--temperature", type=positive_float, default=1.0)
    online.add_argument("--generation-batch-size", type=positive_int, default=16,
                        help="rows per compiled sampling call")
    online.add_argument("--kl-estimator", choices=("full", "k3", "k1"), default=None,
                        help="k1 (default): the sampled tokens' log-ratio in the reward (PPO: per token, TRL's "
                             "'kl'; GRPO: summed over the sequence); full: the exact token KL over the vocabulary; "
                             "k3 (grpo): DeepSeekMath's estimator in the loss")
    online.add_argument("--target-kl", type=positive_float, default=None,
                        help="ppo: adapt the KL coefficient toward this KL per sequence (Ziegler et al.; TRL's "
                             "adaptive controller); default: a fixed coefficient")
    online.add_argument("--kl-horizon", type=positive_float, default=10000.0, help="ppo: the controller's horizon")
    online.add_argument("--clip-range", type=positive_float, default=0.2, help="ratio clip ε")
    online.add_argument("--clip-range-value", type=positive_float, default=0.2, help="ppo: value clip")
    online.add_argument("--vf-coef", type=non_negative_float, default=0.1, help="ppo: value loss weight")
    online.add_argument("--gamma", type=non_negative_float, default=1.0, help="ppo: discount")
    online.add_argument("--gae-lambda", type=non_negative_float, default=0.95, help="ppo: GAE λ")
    online.add_argument("--no-whiten", action="store_true", help="ppo: do not whiten the advantages")
    online.add_argument("--scale-advantages", action="store_true",
                        help="grpo: divide by the group's standard deviation (DeepSeekMath; not p_λ's optimum)")
    online.add_argument("--group-mean", action="store_true",
                        help="grpo: baseline the group mean including the sample itself (instead of the others')")
    online.add_argument("--loss-aggregation", choices=("token", "sequence"), default="token")
    online.add_argument("--lam-refresh-every", type=positive_int, default=None,
                        help="re-solve λ on the policy's samples of the last N steps, every N steps")
    adapters = command.add_argument_group("LoRA / QLoRA (every method; default: train every weight)")
    adapters.add_argument("--lora-rank", type=positive_int, default=None,
                          help="train rank-R LoRA adapters over the frozen base (only they are optimized and saved)")
    adapters.add_argument("--lora-alpha", type=positive_float, default=16.0, help="adapter scale alpha / rank")
    adapters.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                          help="projections to adapt, comma-separated from q,k,v,o,gate,up,down (mapped per "
                               "architecture; a fused projection is adapted when any of its parts is named)")
    adapters.add_argument("--lora-dropout", type=non_negative_float, default=0.0,
                          help="dropout on the adapters' input while training")
    adapters.add_argument("--quantize-base", choices=("none", "int8", "int4"), default="none",
                          help="store the frozen base quantized (QLoRA; needs --lora-rank)")
    trail = command.add_argument_group("metrics (always: OUT/metrics.jsonl, one line per step)")
    trail.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard events to OUT/tensorboard (pip install 'mapjax[tensorboard]')")
    trail.add_argument("--wandb", metavar="PROJECT", default=None,
                       help="also log each step to this W&B project (pip install 'mapjax[wandb]'; "
                            "WANDB_MODE=offline works without a network)")
    command.add_argument("--eval-prompts", type=non_negative_int, default=16,
                         help="prompts to evaluate on (0: no evaluation)")
    command.add_argument("--eval-samples", type=positive_int, default=2)
    command.add_argument("--max-new-tokens", type=positive_int, default=32, help="evaluation sample length")
    command.add_argument("--overwrite", action="store_true",
                         help="replace another run in --out (kept until the new run is complete)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_arguments(command)
    command.set_defaults(run=run)
    return command


def finetune_config(args: argparse.Namespace) -> Any:
    """The FinetuneConfig (offline methods) or OnlineConfig (grpo, ppo) the arguments ask for, validated."""
    if args.method in ONLINE_METHODS:
        return online_config(args)
    from mapjax.finetune import FinetuneConfig

    config = FinetuneConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps,
                            epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup,
                            schedule=args.schedule, weight_decay=args.weight_decay,
                            clip_norm=args.clip if args.clip > 0 else None,
                            kl_coef=args.kl if args.kl is not None else 0.0, beta=args.beta,
                            normalize=args.normalize, dtype=args.dtype, max_length=args.max_length,
                            save_every=args.save_every, seed=args.seed, **adapter_settings(args))
    config.validate(args.method)
    return config


def adapter_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA / QLoRA fields every config shares, from their flags."""
    return dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                lora_dropout=args.lora_dropout, quantize_base=args.quantize_base)


def online_config(args: argparse.Namespace) -> Any:
    """The OnlineConfig of ``--method grpo|ppo``, validated (a FinetuneError names the first bad setting)."""
    from mapjax.finetune import OnlineConfig

    config = OnlineConfig(
        steps=args.steps, epochs=args.epochs, prompts_per_step=args.rollouts_per_step, group_size=args.group_size,
        max_new_tokens=args.rollout_tokens or args.max_new_tokens, top_k=args.top_k or None, top_p=args.top_p,
        temperature=args.temperature, generation_batch_size=args.generation_batch_size, ppo_epochs=args.ppo_epochs,
        mini_batch_size=args.mini_batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
        warmup_steps=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
        clip_norm=args.clip if args.clip > 0 else None, clip_range=args.clip_range,
        loss_aggregation=args.loss_aggregation, kl_coef=args.kl if args.kl is not None else 1.0,
        kl_estimator=args.kl_estimator, kl_target=args.target_kl, kl_horizon=args.kl_horizon,
        leave_one_out=not args.group_mean, scale_advantages=args.scale_advantages, vf_coef=args.vf_coef,
        clip_range_value=args.clip_range_value, gamma=args.gamma, gae_lambda=args.gae_lambda,
        whiten_advantages=not args.no_whiten, lam_refresh_every=args.lam_refresh_every, dtype=args.dtype,
        save_every=args.save_every, seed=args.seed, **adapter_settings(args))
    config.validate(args.method)
    return config


def prompt_formatter(args: argparse.Namespace, pool: Any, tokenizer: Any) -> Any:
    """How the policy is to see a prompt, for training and evaluation alike: ``--chat-template auto`` reads it
    from the pool's build manifest (:func:`mapjax.finetune.against_base.pool_prompt_format`: the tokenizer's chat
    template when the pool was sampled through it, else None, i.e. raw prompts), ``yes`` forces the template,
    ``no`` raw prompts."""
    from mapjax.finetune.against_base import pool_prompt_format
    from mapjax.prompts import chat_formatter

    if args.chat_template == "no":
        return None
    if args.chat_template == "yes":
        formatter = chat_formatter(tokenizer)
        if formatter is None:
            raise InputError("--chat-template yes: the policy's tokenizer has no chat template")
        return formatter
    return pool_prompt_format(args.pool, tokenizer, prompts=pool.prompts)


def _evaluate(base: Any, trained: Any, tokenizer: Any, pool: Any, args: argparse.Namespace, out: Path,
              lam: dict[str, float], format_prompt: Any) -> None:
    from mapjax.build import recorded_dtype
    from mapjax.finetune.against_base import evaluate_finetuned, evaluation_table
    from mapjax.jsonio import write_json

    report = evaluate_finetuned(base, trained, tokenizer, pool, args.palette, num_prompts=args.eval_prompts,
                                samples=args.eval_samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                dtype=recorded_dtype(args.pool), format_prompt=format_prompt)
    report["lambda"] = lam
    write_json(out / "evaluation.json", report)
    print(f"\nrealised levels on {report['prompts']} prompts x {report['samples']} samples "
          "(mean ± SE; met = target within the 95% interval):\n")
    print(evaluation_table(report))


def run(args: argparse.Namespace) -> int:
    from mapjax import solve
    from mapjax.finetune.examples import check_pool_texts
    from mapjax.generate import load_policy
    from mapjax.pool import RewardPool
    from mapjax.solver.solution import DEGENERATE_ESS, below_threshold_text

    online = args.method in ONLINE_METHODS
    config = finetune_config(args)
    out = check_output_folder(args.out, overwrite=args.overwrite,
                              inputs={"--policy": args.policy, "--pool": args.pool, "--prompts": args.prompts})
    check_policy(args.policy)
    check_input_file(args.pool, "--pool")
    check_palette(args.palette)
    if online and args.prompts is not None:
        check_prompt_source(args.prompts)
    mesh = setup_devices(args)   # before anything else uses JAX (the solver does)
    if online:
        import jax

        if jax.process_count() > 1:
            raise InputError(f"--method {args.method} runs in one process (a --mesh over its devices); "
                             "multi-process runs take --method weighted or dpo")
    pool = RewardPool.load(args.pool)
    if online:
        check_reward_names(pool.value_names, f"--pool {args.pool} values")
        if args.prompts is None and pool.prompts is None:
            raise InputError(f"--pool {args.pool} has no prompt texts to train on; pass --prompts")
    else:
        check_pool_texts(pool, f"pool {args.pool}")
    solution = solve(pool, args.palette, normaliser="per_prompt")
    if solution.status != "optimal":
        explanation = solution.certificate.explain() if solution.certificate is not None else ""
        print(f"the palette {args.palette!r} is not reachable on {args.pool} ({solution.status}) {explanation}; "
              "try `mapjax adjust` for the nearest one that is")
        return EXIT_NOT_REACHED
    lam = dict(zip(solution.value_names, (float(v) for v in solution.lam)))
    print("λ = " + ", ".join(f"{name} {value:.4g}" for name, value in lam.items()))
    if solution.degenerate:
        print(f"warning: p_λ sits on about one sample per prompt (ESS {below_threshold_text(solution.ess, DEGENERATE_ESS)} < {DEGENERATE_ESS:g}): the palette is at the "
              "edge of what the pool reaches, and finetuning will copy single samples")
    prompts = None
    if online:
        from mapjax.prompts import load_prompts

        prompts = load_prompts(args.prompts, count=args.count) if args.prompts is not None \
            else list(pool.prompts[:args.count] if args.count else pool.prompts)
    import jax

    from mapjax.distributed import is_primary

    # Under jax.distributed each process loads the whole policy and finetune lays it out over every process's
    # devices; one process alone loads straight onto its mesh.
    model, tokenizer = load_policy(args.policy, mesh=mesh if jax.process_count() == 1 else None)
    format_prompt = prompt_formatter(args, pool, tokenizer)
    if online:
        trained, lam = _run_online(args, config, model, tokenizer, pool, prompts, solution, out, format_prompt, mesh)
    else:
        trained = _run_offline(args, config, model, tokenizer, pool, solution, out, format_prompt, mesh)
    if args.eval_prompts > 0 and is_primary():   # the trained model is whole on every process: one evaluates
        _evaluate(model, trained, tokenizer, pool, args, out, lam, format_prompt)
    return EXIT_OK


def _run_offline(args: argparse.Namespace, config: Any, model: Any, tokenizer: Any, pool: Any, solution: Any,
                 out: Path, format_prompt: Any, mesh: Any) -> Any:
    from mapjax.finetune import finetune

    result = finetune(model, tokenizer, pool, solution, method=args.method, config=config, out=out,
                      progress=not args.quiet, overwrite=args.overwrite, format_prompt=format_prompt, mesh=mesh,
                      tensorboard=args.tensorboard, wandb=args.wandb)
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"{args.method}: {result.steps} steps on {result.examples} "
          f"{'examples' if args.method == 'weighted' else 'pairs'}{resumed}; loss {first} -> {last}; "
          f"model in {Path(out) / 'model'}")
    return result.model


def _run_online(args: argparse.Namespace, config: Any, model: Any, tokenizer: Any, pool: Any, prompts: list[str],
                solution: Any, out: Path, format_prompt: Any, mesh: Any) -> tuple[Any, dict[str, float]]:
    from mapjax.build import recorded_dtype
    from mapjax.finetune import finetune_online

    result = finetune_online(model, tokenizer, prompts, list(pool.value_names), solution, method=args.method,
                             config=config, out=out, format_prompt=format_prompt, mesh=mesh,
                             progress=not args.quiet, overwrite=args.overwrite, dtype=recorded_dtype(args.pool),
                             tensorboard=args.tensorboard, wandb=args.wandb)
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    summary = ""
    if result.history:
        first, last = result.history[0], result.history[-1]
        summary = f"; reward {first['reward']:.4g} -> {last['reward']:.4g}, KL to the base {last['kl']:.4g}"
    template = "chat template" if format_prompt is not None else "raw prompts"
    print(f"{args.method}: {result.steps} steps x {config.prompts_per_step} prompts x {config.group_size} samples "
          f"({template}){resumed}{summary}; model in {Path(out) / 'model'}")
    if config.lam_refresh_every is not None:
        print("λ after refreshing = " + ", ".join(f"{name} {value:.4g}" for name, value in result.lam.items()))
    return result.model, result.lam
