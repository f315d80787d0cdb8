"""``mapjax evaluate RESULT --base BASE``: an aligned model's pool against the base model's (``mapjax.evaluate``)."""

from __future__ import annotations

import argparse
from typing import Any

from mapjax.cli.common import EXIT_OK, add_parser, check_palette, name_list, open_unit_interval, print_json


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(
        subparsers, "evaluate",
        help="realised levels, palette verdicts and win rates of an aligned model's pool against the base's",
        description="Compare an aligned model's scored samples (RESULT) with the base model's (BASE): per value, "
        "the realised level (mean, standard error, normal-approximation interval), its quantile in the base's "
        "rewards, whether each palette entry was met (its target is not above the interval's upper bound), "
        "and the win rate against the base (per prompt, the share of sample pairs where the result is strictly "
        "higher; prompts matched by text, else by row). The verdicts are in the output: the exit status is 0 "
        "whether or not the palette was met.",
    )
    command.add_argument("result", help="the aligned model's pool: .json (the authors' schema), .jsonl or .parquet")
    command.add_argument("--base", required=True, help="the base model's pool, same formats")
    command.add_argument("--palette",
                         help='levels to check, resolved on the base, e.g. "humor>=q0.7, gpt2-harmless>=mean"')
    command.add_argument("--confidence", type=open_unit_interval, default=0.95, help="interval level (default 0.95)")
    command.add_argument("--values", type=name_list,
                         help="comma-separated values to compare (default: all; the pools must then agree)")
    command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax.evaluate import evaluate
    from mapjax.pool import RewardPool

    if args.palette is not None:
        check_palette(args.palette, args.values)
    result = RewardPool.load(args.result)
    base = RewardPool.load(args.base)
    evaluation = evaluate(result, base, args.palette, confidence=args.confidence, values=args.values)
    if args.json:
        print_json({"result": str(args.result), "base": str(args.base), **evaluation.to_dict()})
    else:
        print(f"{args.result} against {args.base}")
        print(evaluation.table())
    return EXIT_OK
