"""The pairwise Pareto plot and the feasible region of a two-value slice of palettes, on a reward pool.

- Pareto: the realised levels (E_{p_λ} r on the pool) of the MORL baseline's random λ (λ = s·Dirichlet(1),
  s ~ U(0, 6)) and of MAP's random feasible palettes (c_i ~ U(c0_i, max r_i), kept when feasible with
  ||λ||₁ < 6), with the paper's palettes (targets and realised levels) marked; and the navigation efficiency of
  each cloud on the pool (the share whose realised levels are at least c0 − tolerance in both values).
- Region: a grid over the two values' levels from c0 to the sample maximum, solved in one ``solve_many`` call;
  feasible cells coloured by log ESS (and, in a second plot, by ||λ||₁), infeasible grey, the frontier drawn.
- The paper's palettes' realised levels as base quantiles (the authors' realised c-levels table), a radar of
  them, and the reward histograms of the pool reweighted by their λ.

    python -m experiments.pareto_and_region [POOL] --out results/pareto_and_region [--count 500] [--points 40] [--force]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.common import (
    CONFIGS,
    PILOT,
    PILOT_PALETTES,
    add_config_arguments,
    add_output_arguments,
    load_config,
    palette_set,
    prepare_out,
    reports_errors,
)
from mapjax import RewardPool, adjust, solve
from mapjax.errors import ConfigError
from mapjax.evaluate import navigation_efficiency, quantile_table
from mapjax.plots import feasible_region, pareto_plot, radar, region_grid, reward_histograms, tilted_weights


@dataclasses.dataclass
class RegionConfig:
    points: int = 40   # grid points per axis
    fixed: dict[str, float | str] = dataclasses.field(default_factory=dict)   # other values' levels on the slice


@dataclasses.dataclass
class ParetoConfig:
    """configs/pareto_and_region.yaml: the two axes, the random clouds, the region grid, the marked palettes."""

    x: str
    y: str
    random_values: list[str]   # the values the random λ (MORL) and random palettes (MAP) run over
    pool: Path = PILOT
    palettes_config: Path = PILOT_PALETTES
    count: int = 500
    seed: int = 0
    max_l1: float = 6.0
    navigation_tolerances: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    region: RegionConfig = dataclasses.field(default_factory=RegionConfig)
    marks: list[str] = dataclasses.field(default_factory=list)   # the paper's palettes drawn on the plots

    def __post_init__(self) -> None:
        if self.count < 1 or self.region.points < 2:
            raise ConfigError(f"count must be >= 1 and region.points >= 2, got {self.count} and {self.region.points}")


def load_marks(config: ParetoConfig, pool: RewardPool) -> dict[str, dict[str, float]]:
    """The marked palettes (levels plus maintained values), keeping only values the pool has."""
    if not config.marks:
        return {}
    chosen = palette_set(config.palettes_config).pick(config.marks)
    return {name: {v: level for v, level in levels.items() if v in pool.value_names} for name, levels in chosen.items()}


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", nargs="?", type=Path, help="reward pool (default: the config's pool)")
    add_config_arguments(parser, CONFIGS / "pareto_and_region.yaml")
    add_output_arguments(parser)
    parser.add_argument("--count", type=int, help="random λ and random palettes each; the same as --set count=N")
    parser.add_argument("--points", type=int, help="grid points per axis; the same as --set region.points=N")
    parser.add_argument("--x", help="value on the x axis (the random clouds then run over x and y)")
    parser.add_argument("--y", help="value on the y axis (the random clouds then run over x and y)")
    parser.add_argument("--no-marks", action="store_true",
                        help="skip the paper's palettes (for pools without their values); the same as --set marks=[]")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for key, value in (("count", args.count), ("region.points", args.points), ("x", args.x), ("y", args.y)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_marks:
        overrides.append("marks=[]")
    config = load_config(ParetoConfig, args.config, overrides)
    if args.x or args.y:
        config.random_values = [config.x, config.y]
    if args.pool:
        config.pool = args.pool.resolve()
    pool = RewardPool.load(config.pool)
    x, y, random_values, count, seed = config.x, config.y, config.random_values, config.count, config.seed
    points, fixed = config.region.points, config.region.fixed or None
    marks = load_marks(config, pool)
    out = args.out
    prepare_out(out, force=args.force, config=config)
    force = args.force

    # Pareto: the two random clouds, the marked palettes.
    morl = adjust.random_morl_lambdas(pool, random_values, count, seed=seed, max_scale=config.max_l1)
    map_palettes, kept_share = adjust.random_palettes(pool, random_values, count, seed=seed,
                                                      max_l1=config.max_l1)
    solved = {name: solve(pool, palette) for name, palette in marks.items()}
    column_x, column_y = pool.index_of(x), pool.index_of(y)
    targets = {name: (palette[x], palette[y]) for name, palette in marks.items() if x in palette and y in palette}
    realised = {name: (s.realised[column_x], s.realised[column_y]) for name, s in solved.items() if s.feasible}
    written = [pareto_plot(pool, x, y, out / "pareto.png", morl=morl, map_palettes=map_palettes, targets=targets,
                           realised=realised, overwrite=force)]

    # Navigation efficiency of each cloud on the pool: realised levels against c0.
    c0 = {name: float(pool.means()[pool.index_of(name)]) for name in (x, y)}
    ne_rows = []
    for tolerance in config.navigation_tolerances:
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
        f"{config.max_l1}); MORL: {count} random λ.",
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
    raise SystemExit(main())
