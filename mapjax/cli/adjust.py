"""``mapjax adjust POOL --palette SPEC``: the nearest reachable palette (the paper's Algorithms 2 and 3)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from mapjax.cli.common import (
    PALETTE_HELP,
    add_parser,
    check_palette,
    name_list,
    normaliser,
    positive_int,
    print_json,
    solution_status,
)
from mapjax.errors import InputError


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "adjust", help="the nearest reachable palette (Algorithms 2 and 3)")
    command.add_argument("pool")
    command.add_argument("--palette", required=True, help=PALETTE_HELP)
    command.add_argument("--method", choices=("interpolate", "greedy", "grid"), default=None,
                         help="default: greedy when --priority is given, else interpolate")
    command.add_argument("--priority", type=name_list, help="comma-separated values, most important first (greedy)")
    command.add_argument("--to-maximum", action="store_true", help="greedy: raise each value as far as feasible")
    command.add_argument("--points", type=positive_int, default=10, help="grid points (grid)")
    command.add_argument("--per-prompt", action="store_true")
    command.add_argument("--json", action="store_true")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax import adjust
    from mapjax.pool import RewardPool

    method = args.method or ("greedy" if args.priority else "interpolate")
    if method != "greedy" and (args.priority or args.to_maximum):
        raise InputError("--priority and --to-maximum apply to --method greedy only")
    check_palette(args.palette)
    pool = RewardPool.load(args.pool)
    kind = normaliser(args.per_prompt)
    if method == "greedy":
        result = adjust.greedy(pool, args.palette, args.priority, to_maximum=args.to_maximum, normaliser=kind)
    elif method == "grid":
        from mapjax.limits import check_grid_points

        check_grid_points(args.points, pool.num_samples, flag="--points")
        result = adjust.grid(pool, args.palette, points=args.points, normaliser=kind)
    else:
        result = adjust.interpolate(pool, args.palette, normaliser=kind)
    if args.json:
        print_json(result.to_dict())
        return solution_status(result.solution)
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
    return solution_status(result.solution)
