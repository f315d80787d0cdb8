"""The ``mapjax`` command: ``levels``, ``solve`` and ``adjust`` on a reward pool file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from mapjax.palette import PaletteError
from mapjax.pool import RewardPool, PoolError


def _levels(args: argparse.Namespace) -> int:
    pool = RewardPool.load(args.pool)
    summary = pool.summary()
    if args.json:
        print(
            json.dumps(
                {
                    "pool": str(args.pool),
                    "prompts": pool.num_prompts,
                    "samples": pool.num_samples,
                    "values": [
                        {
                            "name": s.name,
                            "mean": s.mean,
                            "standard_error": s.standard_error,
                            "min": s.minimum,
                            "max": s.maximum,
                            "quantiles": {f"{q:g}": v for q, v in s.quantiles.items()},
                        }
                        for s in summary
                    ],
                },
                indent=2,
            )
        )
        return 0
    quantiles = list(summary[0].quantiles)
    width = max(8, *(len(s.name) for s in summary))
    header = f"{'value':<{width}}  {'mean':>8}  {'se':>7}" + "".join(f"  {f'q{q * 100:g}':>8}" for q in quantiles)
    print(f"{args.pool}: {pool.num_prompts} prompts, {pool.num_samples} samples")
    print(header)
    for s in summary:
        row = f"{s.name:<{width}}  {s.mean:8.3f}  {s.standard_error:7.4f}"
        row += "".join(f"  {s.quantiles[q]:8.3f}" for q in quantiles)
        print(row)
    return 0


def _solve(args: argparse.Namespace) -> int:
    from mapjax.dual import solve

    pool = RewardPool.load(args.pool)
    solution = solve(
        pool,
        args.palette,
        normaliser="per_prompt" if args.per_prompt else "pooled",
        method=args.method,
        dtype=args.dtype,
        sensitivity=args.sensitivity,
    )
    if args.json:
        print(json.dumps(solution.to_dict(), indent=2))
    else:
        print(solution.table())
        if solution.sensitivity is not None:
            print("\nsensitivity dλ_i/dc_j (rows i, columns j):")
            _print_matrix(solution.value_names, solution.sensitivity)
    return 0 if solution.status != "not_converged" else 1


def _adjust(args: argparse.Namespace) -> int:
    from mapjax import adjust

    pool = RewardPool.load(args.pool)
    normaliser = "per_prompt" if args.per_prompt else "pooled"
    if args.method == "greedy":
        priority = [name.strip() for name in args.priority.split(",")] if args.priority else None
        result = adjust.greedy(pool, args.palette, priority, to_maximum=args.to_maximum, normaliser=normaliser)
    elif args.priority or args.to_maximum:
        raise ValueError("--priority and --to-maximum apply to --method greedy only")
    elif args.method == "grid":
        result = adjust.grid(pool, args.palette, points=args.points, normaliser=normaliser)
    else:
        result = adjust.interpolate(pool, args.palette, normaliser=normaliser)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    names = result.solution.value_names
    width = max(8, *(len(name) for name in names))
    print(f"{'value':<{width}}  {'requested':>10}  {'adjusted':>10}")
    for name, asked, got in zip(names, result.requested, result.palette):
        if not np.isnan(asked):
            print(f"{name:<{width}}  {asked:10.4f}  {got:10.4f}")
    detail = f", rho = {result.rho:.4f}" if result.rho is not None else ""
    verdict = "unchanged: the palette is reachable" if not result.changed else "adjusted to a reachable palette"
    print(f"\n{verdict} ({result.method}{detail})\n")
    print(result.solution.table())
    return 0


def _print_matrix(names: Sequence[str], matrix: np.ndarray) -> None:
    width = max(8, *(len(name) for name in names))
    print(" " * width + "".join(f"  {name[:10]:>10}" for name in names))
    for name, row in zip(names, matrix):
        print(f"{name:<{width}}" + "".join(f"  {value:10.4g}" for value in row))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapjax", description="MAP: align a language model to a palette of values.")
    commands = parser.add_subparsers(dest="command", required=True)

    levels = commands.add_parser("levels", help="per-value mean, standard error and quantiles of a reward pool")
    levels.add_argument("pool", help="pool file: .json (the authors' schema), .jsonl or .parquet")
    levels.add_argument("--json", action="store_true", help="print JSON instead of a table")
    levels.set_defaults(run=_levels)

    palette_help = 'e.g. "humor>=q0.8, gpt2-helpful>=max(mean,q0.8), diversity>=mean"'
    solve = commands.add_parser("solve", help="λ for a palette: feasibility, realised levels, KKT residual, KL, ESS")
    solve.add_argument("pool")
    solve.add_argument("--palette", required=True, help=palette_help)
    solve.add_argument("--per-prompt", action="store_true", help="per-prompt normaliser (matches MAP-D decoding)")
    solve.add_argument("--method", choices=("exact", "reference"), default="exact")
    solve.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    solve.add_argument("--sensitivity", action="store_true", help="also print dλ/dc")
    solve.add_argument("--json", action="store_true")
    solve.set_defaults(run=_solve)

    adjust = commands.add_parser("adjust", help="the nearest reachable palette (Algorithms 2 and 3)")
    adjust.add_argument("pool")
    adjust.add_argument("--palette", required=True, help=palette_help)
    adjust.add_argument("--method", choices=("interpolate", "greedy", "grid"), default=None,
                        help="default: greedy when --priority is given, else interpolate")
    adjust.add_argument("--priority", help="comma-separated values, most important first (greedy)")
    adjust.add_argument("--to-maximum", action="store_true", help="greedy: raise each value as far as feasible")
    adjust.add_argument("--points", type=int, default=10, help="grid points (grid)")
    adjust.add_argument("--per-prompt", action="store_true")
    adjust.add_argument("--json", action="store_true")
    adjust.set_defaults(run=_adjust)

    from mapjax.build import add_pool_command
    from mapjax.decode import add_decode_command
    from mapjax.demo import add_demo_command
    from mapjax.evaluate import add_evaluate_command
    from mapjax.finetune.cli import add_finetune_command

    add_pool_command(commands)
    add_decode_command(commands)
    add_finetune_command(commands)
    add_evaluate_command(commands)
    add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "method", "") is None:
        args.method = "greedy" if args.priority else "interpolate"
    try:
        return args.run(args)
    except (PoolError, PaletteError, ValueError) as error:
        print(f"mapjax {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
