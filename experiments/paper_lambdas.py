"""Reproduce the λ table of MAP.md section 7: the paper's palettes on the OPT-1.3B pilot set, solved by the
authors' solver (reference replica) and by mapjax's exact solver, with ESS, KKT residual and the LP verdict.

    python experiments/paper_lambdas.py [--config configs/opt_pilot_palettes.yaml] [--pool PATH] [--out table.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from mapjax import RewardPool, solve

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from common import ROOT, named_palettes  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "opt_pilot_palettes.yaml")
    parser.add_argument("--pool", type=Path, help="overrides the config's pool path (relative to the repository)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here (refuses to overwrite)")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    pool = RewardPool.load(args.pool or (ROOT / config["pool"]))
    text = table(pool, named_palettes(args.config), list(config["values"]))
    print(text)
    if args.out:
        if args.out.exists():
            raise SystemExit(f"{args.out} exists; choose another --out")
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
