"""The pairwise Pareto plot and the feasible region of a two-value slice of palettes, on a reward pool.

- Pareto: the realised levels (E_{p_λ} r on the pool) of the MORL baseline's random λ (λ = s·Dirichlet(1),
  s ~ U(0, 6)) and of MAP's random feasible palettes (c_i ~ U(c0_i, max r_i), kept when feasible with
  ||λ||₁ < 6), with the paper's palettes (targets and realised levels) marked; and the navigation efficiency of
  each cloud on the pool (the share whose realised levels are at least c0 − tolerance in both values).
- Region: a grid over the two values' levels from c0 to the sample maximum, solved in one ``solve_many`` call;
  feasible cells coloured by log ESS (and, in a second plot, by ||λ||₁), infeasible grey, the frontier drawn.
- The paper's palettes' realised levels as base quantiles (the authors' realised c-levels table), a radar of
  them, and the reward histograms of the pool reweighted by their λ.

    python experiments/pareto_and_region.py [POOL] --out results/pareto_and_region [--count 500] [--points 40] [--force]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import yaml

from mapjax import RewardPool, adjust, solve
from mapjax.evaluate import navigation_efficiency, quantile_table
from mapjax.plots import feasible_region, pareto_plot, radar, region_grid, reward_histograms, tilted_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from common import ROOT, pick_palettes, prepare_out  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "pareto_and_region.yaml"


def load_marks(config: dict, config_path: Path, pool: RewardPool) -> dict[str, dict[str, float]]:
    """The marked palettes (levels plus maintained values), keeping only values the pool has."""
    names = config.get("marks") or []
    if not names:
        return {}
    chosen = pick_palettes(config_path.parent / config["palettes_config"], names)
    return {name: {v: level for v, level in levels.items() if v in pool.value_names} for name, levels in chosen.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", nargs="?", type=Path, help="reward pool (default: the config's, relative to the repository)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; refused if not empty)")
    parser.add_argument("--count", type=int, help="random λ and random palettes each (default: the config's)")
    parser.add_argument("--points", type=int, help="grid points per axis of the region (default: the config's)")
    parser.add_argument("--x", help="value on the x axis (default: the config's)")
    parser.add_argument("--y", help="value on the y axis (default: the config's)")
    parser.add_argument("--no-marks", action="store_true", help="skip the paper's palettes (for pools without their values)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    pool = RewardPool.load(args.pool or (ROOT / config["pool"]))
    x, y = args.x or config["x"], args.y or config["y"]
    random_values = [x, y] if (args.x or args.y) else list(config["random_values"])
    count = int(args.count or config["count"])
    points = int(args.points or config["region"]["points"])
    seed = int(config.get("seed", 0))
    fixed = config["region"].get("fixed") or None
    marks = {} if args.no_marks else load_marks(config, args.config, pool)
    out = prepare_out(args.out, args.force)
    force = args.force

    # Pareto: the two random clouds, the marked palettes.
    morl = adjust.random_morl_lambdas(pool, random_values, count, seed=seed, max_scale=float(config.get("max_l1", 6.0)))
    map_palettes, kept_share = adjust.random_palettes(pool, random_values, count, seed=seed,
                                                      max_l1=float(config.get("max_l1", 6.0)))
    solved = {name: solve(pool, palette) for name, palette in marks.items()}
    column_x, column_y = pool.index_of(x), pool.index_of(y)
    targets = {name: (palette[x], palette[y]) for name, palette in marks.items() if x in palette and y in palette}
    realised = {name: (s.realised[column_x], s.realised[column_y]) for name, s in solved.items() if s.feasible}
    written = [pareto_plot(pool, x, y, out / "pareto.png", morl=morl, map_palettes=map_palettes, targets=targets,
                           realised=realised, overwrite=force)]

    # Navigation efficiency of each cloud on the pool: realised levels against c0.
    c0 = {name: float(pool.means()[pool.index_of(name)]) for name in (x, y)}
    ne_rows = []
    for tolerance in config.get("navigation_tolerances", [0.0]):
        for label, batch in (("MORL: random λ", morl), ("MAP: random feasible palettes", map_palettes)):
            levels = [{x: row[column_x], y: row[column_y]} for row in batch.realised]
            ne = navigation_efficiency(levels, c0, (x, y), tolerance=float(tolerance))
            ne_rows.append((label, float(tolerance), ne.share, ne.count, ne.total))

    # Region: one solve_many call over the grid; two colourings of the same grid.
    grid = region_grid(pool, x, y, fixed=fixed, points=points)
    written.append(feasible_region(pool, x, y, out / "region_log_ess.png", grid=grid, colour="log_ess",
                                   marks=targets, overwrite=force))
    written.append(feasible_region(pool, x, y, out / "region_lambda_l1.png", grid=grid, colour="lambda_l1",
                                   marks=targets, overwrite=force))
    with (out / "region_frontier.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"c[{x}]", f"highest feasible c[{y}] on the grid"])
        for level, highest in zip(grid.x_levels, grid.frontier()):
            writer.writerow([f"{level:.6g}", "" if np.isnan(highest) else f"{highest:.6g}"])

    # The marked palettes: quantile table, radar, reweighted histograms.
    quantile_text = ""
    feasible_marks = {name: s for name, s in solved.items() if s.feasible}
    if feasible_marks:
        # The palettes' own order (the paper's: humor, helpful, harmless, then the maintained values) first.
        order = list(dict.fromkeys([*next(iter(marks.values())), *pool.value_names]))
        levels = {name: dict(zip(pool.value_names, s.realised)) for name, s in feasible_marks.items()}
        table = quantile_table({"original (c0)": dict(zip(pool.value_names, pool.means())), **levels}, pool, order)
        quantile_text = table.table()
        if len(pool.value_names) >= 3:
            written.append(radar(levels, pool, out / "radar.png", values=order, overwrite=force))
        written.append(reward_histograms(pool, out / "histograms.png", overwrite=force,
                                         weights={name: tilted_weights(pool, s.lam) for name, s in feasible_marks.items()}))

    lines = [
        f"# Pareto and feasible region on {pool.num_samples} samples ({x} vs {y})",
        "",
        f"MAP random palettes over {random_values}: {100 * kept_share:.1f}% of draws kept (feasible, ||λ||₁ < "
        f"{config.get('max_l1', 6.0)}); MORL: {count} random λ.",
        "",
        "| cloud | tolerance | navigation efficiency on the pool | count |",
        "|---|---|---|---|",
        *[f"| {label} | {tol:g} | {100 * share:.1f}% | {n}/{total} |" for label, tol, share, n, total in ne_rows],
        "",
        f"Region grid {points}x{points} over [c0, max] of {x} and {y}"
        + (f", holding {fixed}" if fixed else ", the other values unconstrained")
        + f": {100 * grid.feasible.mean():.1f}% feasible.",
    ]
    if quantile_text:
        lines += ["", "Realised levels of the paper's palettes (exact λ, on the pool) as quantiles of its rewards:",
                  "", quantile_text]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    print("wrote " + ", ".join(str(path) for path in written + [out / "region_frontier.csv", out / "summary.md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
