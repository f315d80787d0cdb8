"""``mapjax levels POOL``: per-value mean, standard error and quantiles of a reward pool."""

from __future__ import annotations

import argparse
from typing import Any

from mapjax.cli.common import EXIT_OK, add_parser, print_json


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "levels", help="per-value mean, standard error and quantiles of a reward pool")
    command.add_argument("pool", help="pool file: .json (the authors' schema), .jsonl or .parquet (.gz too)")
    command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax.pool import RewardPool

    pool = RewardPool.load(args.pool)
    summary = pool.summary()
    if args.json:
        print_json({
            "pool": str(args.pool),
            "prompts": pool.num_prompts,
            "samples": pool.num_samples,
            "values": [{"name": s.name, "mean": s.mean, "standard_error": s.standard_error, "min": s.minimum,
                        "max": s.maximum, "quantiles": {f"{q:g}": v for q, v in s.quantiles.items()}}
                       for s in summary],
        })
        return EXIT_OK
    quantiles = list(summary[0].quantiles)
    width = max(8, *(len(s.name) for s in summary))
    print(f"{args.pool}: {pool.num_prompts} prompts, {pool.num_samples} samples")
    print(f"{'value':<{width}}  {'mean':>8}  {'se':>7}" + "".join(f"  {f'q{q * 100:g}':>8}" for q in quantiles))
    for s in summary:
        row = f"{s.name:<{width}}  {s.mean:8.3f}  {s.standard_error:7.4f}"
        print(row + "".join(f"  {s.quantiles[q]:8.3f}" for q in quantiles))
    return EXIT_OK
