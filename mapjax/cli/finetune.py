"""``mapjax finetune``: MAP-F from the command line, with an evaluation of the finetuned model at the end.

    mapjax finetune --policy ID --pool POOL --palette SPEC --method weighted|dpo --out DIR

solves the palette on the pool (per-prompt normaliser), finetunes the policy towards p_λ (resumable: the same
command after an interruption continues from the last checkpoint in DIR), exports DIR/model (HF format), then
samples the finetuned and the base model on the pool's first prompts, scores them with the pool's values
(perplexity under the base policy, as in the pool) and prints realised levels against the palette and the base
model. DIR/evaluation.json holds the numbers. Every setting is checked before the policy is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapjax.cli.common import (
    EXIT_NOT_REACHED,
    EXIT_OK,
    add_dtype_argument,
    add_parser,
    add_policy_argument,
    check_input_file,
    check_output_folder,
    check_palette,
    check_policy,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "finetune", help="MAP-F: finetune a policy towards a palette's p_λ "
                                                      "(reward-weighted likelihood or DPO; resumable)")
    add_policy_argument(command)
    command.add_argument("--pool", required=True, help="reward pool with prompt and generated texts")
    command.add_argument("--palette", required=True, help='e.g. "humor>=q0.8, diversity>=mean"')
    command.add_argument("--method", choices=("weighted", "dpo"), default="weighted")
    command.add_argument("--out", required=True, help="run folder: checkpoints/, model/, losses.json, "
                                                      "evaluation.json")
    command.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: --epochs passes)")
    command.add_argument("--epochs", type=positive_float, default=1.0)
    command.add_argument("--batch-size", type=positive_int, default=8)
    command.add_argument("--grad-accum", type=positive_int, default=1)
    command.add_argument("--lr", type=positive_float, default=1e-5)
    command.add_argument("--warmup", type=non_negative_int, default=0, help="warm-up steps")
    command.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    command.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    command.add_argument("--clip", type=non_negative_float, default=1.0, help="global gradient-norm clip (0: none)")
    command.add_argument("--kl", type=non_negative_float, default=0.0,
                         help="KL(p_θ||p0) penalty coefficient (weighted)")
    command.add_argument("--beta", type=positive_float, default=0.1, help="DPO β")
    command.add_argument("--normalize", choices=("token", "sequence"), default="token")
    add_dtype_argument(command, help="compute dtype of the training steps: parameters are cast to it for each "
                                     "step, the master weights and optimizer state stay float32, the loss is "
                                     "computed from float32 logits (default: float32). The evaluation scores "
                                     "with the reward models' dtype the pool's build recorded (else float32)")
    command.add_argument("--max-length", type=positive_int, default=None)
    command.add_argument("--save-every", type=positive_int, default=50)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--eval-prompts", type=non_negative_int, default=16,
                         help="prompts to evaluate on (0: no evaluation)")
    command.add_argument("--eval-samples", type=positive_int, default=2)
    command.add_argument("--max-new-tokens", type=positive_int, default=32, help="evaluation sample length")
    command.add_argument("--overwrite", action="store_true",
                         help="replace another run in --out (kept until the new run is complete)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(run=run)
    return command


def finetune_config(args: argparse.Namespace) -> Any:
    """The FinetuneConfig the arguments ask for, validated."""
    from mapjax.finetune.train import FinetuneConfig

    config = FinetuneConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps,
                            epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup,
                            schedule=args.schedule, weight_decay=args.weight_decay,
                            clip_norm=args.clip if args.clip > 0 else None, kl_coef=args.kl, beta=args.beta,
                            normalize=args.normalize, dtype=args.dtype, max_length=args.max_length,
                            save_every=args.save_every, seed=args.seed)
    config.validate(args.method)
    return config


def run(args: argparse.Namespace) -> int:
    from mapjax import solve
    from mapjax.build import recorded_dtype
    from mapjax.finetune.data import check_pool_texts
    from mapjax.finetune.evaluation import evaluate_finetuned, evaluation_table
    from mapjax.finetune.train import finetune
    from mapjax.generate import load_policy
    from mapjax.jsonio import write_json
    from mapjax.pool import RewardPool

    config = finetune_config(args)
    out = check_output_folder(args.out)
    check_policy(args.policy)
    check_input_file(args.pool, "--pool")
    check_palette(args.palette)
    pool = RewardPool.load(args.pool)
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
        print(f"warning: p_λ sits on about one sample per prompt (ESS {solution.ess:.2f}): the palette is at the "
              "edge of what the pool reaches, and finetuning will copy single samples")
    model, tokenizer = load_policy(args.policy)
    result = finetune(model, tokenizer, pool, solution, method=args.method, config=config, out=out,
                      progress=not args.quiet, overwrite=args.overwrite)
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"{args.method}: {result.steps} steps on {result.examples} "
          f"{'examples' if args.method == 'weighted' else 'pairs'}{resumed}; loss {first} -> {last}; "
          f"model in {Path(out) / 'model'}")
    if args.eval_prompts > 0:
        report = evaluate_finetuned(model, result.model, tokenizer, pool, args.palette,
                                    num_prompts=args.eval_prompts, samples=args.eval_samples,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed,
                                    dtype=recorded_dtype(args.pool))
        report["lambda"] = lam
        write_json(out / "evaluation.json", report)
        print(f"\nrealised levels on {report['prompts']} prompts x {report['samples']} samples "
              "(mean ± SE; met = target within the 95% interval):\n")
        print(evaluation_table(report))
    return EXIT_OK
