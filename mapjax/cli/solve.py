"""``mapjax solve POOL --palette SPEC``: λ for a palette, with its verdict, realised levels, KKT residual, KL, ESS."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from mapjax.cli.common import PALETTE_HELP, add_parser, check_palette, normaliser, print_json, solution_status


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "solve",
                         help="λ for a palette: feasibility, realised levels, KKT residual, KL, ESS")
    command.add_argument("pool")
    command.add_argument("--palette", required=True, help=PALETTE_HELP)
    command.add_argument("--per-prompt", action="store_true", help="per-prompt normaliser (matches MAP-D decoding)")
    command.add_argument("--method", choices=("exact", "reference"), default="exact")
    command.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    command.add_argument("--sensitivity", action="store_true", help="also print dλ/dc")
    command.add_argument("--json", action="store_true")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax import solve
    from mapjax.pool import RewardPool

    check_palette(args.palette)
    pool = RewardPool.load(args.pool)
    solution = solve(pool, args.palette, normaliser=normaliser(args.per_prompt), method=args.method,
                     dtype=args.dtype, sensitivity=args.sensitivity)
    if args.json:
        print_json(solution.to_dict())
    else:
        print(solution.table())
        if solution.sensitivity is not None:
            print("\nsensitivity dλ_i/dc_j (rows i, columns j):")
            print_matrix(solution.value_names, solution.sensitivity)
    return solution_status(solution)


def print_matrix(names: Sequence[str], matrix: np.ndarray) -> None:
    width = max(8, *(len(name) for name in names))
    print(" " * width + "".join(f"  {name[:10]:>10}" for name in names))
    for name, row in zip(names, matrix):
        print(f"{name:<{width}}" + "".join(f"  {value:10.4g}" for value in row))
