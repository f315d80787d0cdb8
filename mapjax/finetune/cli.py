"""``mapjax finetune``: MAP-F from the command line, with an evaluation of the finetuned model at the end.

    mapjax finetune --policy ID --pool POOL --palette SPEC --method weighted|dpo --out DIR

solves the palette on the pool (per-prompt normaliser), finetunes the policy towards p_λ (resumable: the same
command after an interruption continues from the last checkpoint in DIR), exports DIR/model (HF format), then
samples the finetuned and the base model on the pool's first prompts, scores them with the pool's values
(``mapjax.rewards.get_reward`` by name; perplexity under the base policy, as in the pool) and prints realised
levels against the palette and the base model. DIR/evaluation.json holds the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mapjax.finetune.data import FinetuneError


def score_samples(model: Any, tokenizer: Any, prompts: Sequence[str], rewards: Sequence[Any], *, samples: int,
                  max_new_tokens: int, seed: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Sample ``samples`` continuations per prompt and score them: ``{value: [prompts, samples]}``."""
    from mapjax.generate import generate

    generation = generate(model, tokenizer, list(prompts), num_samples=samples, max_new_tokens=max_new_tokens,
                          seed=seed, batch_size=batch_size)
    row_prompts = [prompts[i] for i in generation.prompt_index]
    return {value.name: np.asarray(value.reward(row_prompts, generation.texts), np.float64).reshape(
        len(prompts), samples) for value in rewards}


def evaluate_finetuned(base_model: Any, model: Any, tokenizer: Any, pool: Any, palette: Any, *,
                       num_prompts: int = 16, samples: int = 2, max_new_tokens: int = 32, seed: int = 0,
                       reward_options: dict | None = None) -> dict[str, Any]:
    """Realised levels (mean ± standard error over prompts) of ``model`` and ``base_model`` on the pool's first
    ``num_prompts`` prompts, with the palette's targets resolved on the pool."""
    from mapjax.build import _resolve_values
    from mapjax.evaluate import resolve_targets

    prompts = list(pool.prompts[:num_prompts])
    rewards = _resolve_values(list(pool.value_names), base_model, tokenizer, reward_options)
    targets = resolve_targets(palette, pool) if palette is not None else {}
    scores = {label: score_samples(m, tokenizer, prompts, rewards, samples=samples, max_new_tokens=max_new_tokens,
                                   seed=seed) for label, m in (("finetuned", model), ("base", base_model))}
    rows = []
    for name in pool.value_names:
        row = {"value": name, "target": targets.get(name)}
        for label in ("finetuned", "base"):
            per_prompt = scores[label][name].mean(axis=1)
            error = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
            row[label] = float(per_prompt.mean())
            row[f"{label}_se"] = float(error)
        if row["target"] is not None:
            row["met"] = bool(row["target"] <= row["finetuned"] + 1.96 * np.nan_to_num(row["finetuned_se"]))
        rows.append(row)
    return {"prompts": len(prompts), "samples": samples, "max_new_tokens": max_new_tokens, "levels": rows}


def evaluation_table(report: dict[str, Any]) -> str:
    lines = ["| value | target | finetuned | base | met |", "|---|---|---|---|---|"]
    for row in report["levels"]:
        target = "-" if row["target"] is None else f"{row['target']:.3f}"
        met = "-" if "met" not in row else ("yes" if row["met"] else "no")
        lines.append(f"| {row['value']} | {target} | {row['finetuned']:.3f} ± {row['finetuned_se']:.3f} | "
                     f"{row['base']:.3f} ± {row['base_se']:.3f} | {met} |")
    return "\n".join(lines)


def _finetune_command(args: argparse.Namespace) -> int:
    from mapjax import solve
    from mapjax.finetune.train import FinetuneConfig, finetune
    from mapjax.generate import load_policy
    from mapjax.pool import RewardPool

    pool = RewardPool.load(args.pool)
    from mapjax.finetune.data import check_pool_texts

    check_pool_texts(pool, f"pool {args.pool}")
    solution = solve(pool, args.palette, normaliser="per_prompt")
    if solution.status != "optimal":
        explanation = solution.certificate.explain() if solution.certificate is not None else ""
        raise FinetuneError(f"palette {args.palette!r} is not reachable on {args.pool} ({solution.status}) "
                            f"{explanation}; try `mapjax adjust`")
    lam = dict(zip(solution.value_names, (float(v) for v in solution.lam)))
    print("λ = " + ", ".join(f"{name} {value:.4g}" for name, value in lam.items()))
    model, tokenizer = load_policy(args.policy)
    config = FinetuneConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps,
                            epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup,
                            schedule=args.schedule, weight_decay=args.weight_decay,
                            clip_norm=args.clip if args.clip > 0 else None, kl_coef=args.kl, beta=args.beta,
                            normalize=args.normalize, dtype=args.dtype, max_length=args.max_length,
                            save_every=args.save_every, seed=args.seed)
    result = finetune(model, tokenizer, pool, solution, method=args.method, config=config, out=args.out,
                      progress=not args.quiet, overwrite=args.overwrite)
    out = Path(args.out)
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"{args.method}: {result.steps} steps on {result.examples} "
          f"{'examples' if args.method == 'weighted' else 'pairs'}{resumed}; loss {first} -> {last}; "
          f"model in {out / 'model'}")
    if args.eval_prompts > 0:
        report = evaluate_finetuned(model, result.model, tokenizer, pool, args.palette,
                                    num_prompts=args.eval_prompts, samples=args.eval_samples,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed)
        report["lambda"] = lam
        (out / "evaluation.json").write_text(json.dumps(report, indent=2))
        print(f"\nrealised levels on {report['prompts']} prompts x {report['samples']} samples "
              "(mean ± SE; met = target within the 95% interval):\n")
        print(evaluation_table(report))
    return 0


def add_finetune_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mapjax finetune`` to the ``mapjax`` command's subparsers."""
    command = subparsers.add_parser("finetune", help="MAP-F: finetune a policy towards a palette's p_λ "
                                                     "(reward-weighted likelihood or DPO; resumable)")
    command.add_argument("--policy", required=True, help="a .gguf file, an HF model folder, or a cached hub id")
    command.add_argument("--pool", required=True, help="reward pool with prompt and generated texts")
    command.add_argument("--palette", required=True, help='e.g. "humor>=q0.8, diversity>=mean"')
    command.add_argument("--method", choices=("weighted", "dpo"), default="weighted")
    command.add_argument("--out", required=True, help="run folder: checkpoints/, model/, losses.json, "
                                                      "evaluation.json")
    command.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    command.add_argument("--epochs", type=float, default=1.0)
    command.add_argument("--batch-size", type=int, default=8)
    command.add_argument("--grad-accum", type=int, default=1)
    command.add_argument("--lr", type=float, default=1e-5)
    command.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    command.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    command.add_argument("--weight-decay", type=float, default=0.0)
    command.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    command.add_argument("--kl", type=float, default=0.0, help="KL(p_θ||p0) penalty coefficient (weighted)")
    command.add_argument("--beta", type=float, default=0.1, help="DPO β")
    command.add_argument("--normalize", choices=("token", "sequence"), default="token")
    command.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    command.add_argument("--max-length", type=int, default=None)
    command.add_argument("--save-every", type=int, default=50)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--eval-prompts", type=int, default=16, help="prompts to evaluate on (0: no evaluation)")
    command.add_argument("--eval-samples", type=int, default=2)
    command.add_argument("--max-new-tokens", type=int, default=32, help="evaluation sample length")
    command.add_argument("--overwrite", action="store_true", help="discard checkpoints of another run in --out")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(run=_finetune_command)
    return command
