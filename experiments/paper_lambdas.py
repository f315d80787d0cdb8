"""Reproduce the λ table of MAP.md section 7: the paper's palettes on the OPT-1.3B pilot set, solved by the
authors' solver (reference replica) and by mapjax's exact solver, with ESS, KKT residual and the LP verdict.

    python -m experiments.paper_lambdas [--config configs/opt_pilot_palettes.yaml] [--pool PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.common import (
    PILOT_PALETTES,
    PaletteSet,
    add_config_arguments,
    load_config,
    prepare_out,
    reports_errors,
)
from mapjax import RewardPool, solve


def table(pool: RewardPool, palettes: dict[str, dict[str, float]], values: list[str]) -> str:
    header = "| palette | reference λ (" + ", ".join(values) + ") | reference verdict | exact λ | ESS | KKT (sd) | LP |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, palette in palettes.items():
        reference = solve(pool, palette, method="reference")
        exact = solve(pool, palette)

        def show(solution):
            if solution.status == "infeasible":
                return "-"
            lam = solution.lam_by_name()
            return ", ".join(f"{lam[v]:.3f}" for v in values)

        ess = f"{exact.ess:.1f}" if np.isfinite(exact.ess) else "-"
        lines.append(
            f"| {name} | {show(reference)} | {'overflow: infeasible' if reference.status == 'infeasible' else 'success'} "
            f"| {show(exact)} | {ess} | {exact.kkt_residual:.1e} | {'feasible' if exact.certificate.feasible else 'infeasible'} |"
        )
    return "\n".join(lines)


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, PILOT_PALETTES)
    parser.add_argument("--pool", type=Path, help="reward pool (default: the config's pool, the shipped pilot)")
    parser.add_argument("--out", type=Path, help="also write paper_lambdas.md into this folder (refused if not "
                                                 "empty unless --force)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    args = parser.parse_args(argv)
    config = load_config(PaletteSet, args.config, args.overrides)
    if args.pool:
        config.pool = args.pool.resolve()
    pool = RewardPool.load(config.pool)
    if args.out:
        prepare_out(args.out, force=args.force, config=config)
    text = table(pool, config.named(), config.values)
    print(text)
    if args.out:
        (args.out / "paper_lambdas.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
