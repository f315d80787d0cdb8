"""Figure 9: sequential alignment, one value at a time and cycling, against the joint MAP solution.

For each of the paper's HHH palettes, λ after each round of sequential alignment (Theorem 5: coordinate ascent
on the dual; each step aligns one value against the model the previous steps produced) and the joint λ, each
with its realised levels on the pilot (raw and as quantiles of the pilot's rewards). Both the exact solver and
the authors' solver replicated (method="reference": 150 Adam steps restarted at λ_i = 1 per step). Writes
sequential_vs_joint.csv (every value), sequential_vs_joint.md and sequential_vs_joint.png into --out.

    python -m experiments.sequential_vs_joint [POOL] --out results/sequential_vs_joint [--rounds 5] [--force]
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
from mapjax import RewardPool, Solution, solve, solve_sequential
from mapjax.errors import ConfigError
from mapjax.evaluate import base_quantile


@dataclasses.dataclass
class SequentialConfig:
    """configs/sequential_vs_joint.yaml: which named palettes, how many rounds, what the figure shows."""

    palettes: list[str]
    palettes_config: Path = PILOT_PALETTES
    pool: Path = PILOT
    rounds: int = 5
    plot_rounds: list[int] = dataclasses.field(default_factory=lambda: [1, 5])   # rounds drawn in the figure
    shown_values: list[str] | None = None   # values in the figure and the Markdown table (default: all)

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.palettes:
            raise ConfigError(f"rounds must be >= 1 and palettes name at least one, got {self.rounds} and "
                              f"{self.palettes}")


def record(pool: RewardPool, palette: str, method: str, stage: str, solution: Solution) -> dict:
    """One CSV row: λ, realised level and its quantile for every value, the largest shortfall, the verdict."""
    row = {"palette": palette, "method": method, "stage": stage, "status": solution.status,
           "kkt_residual": solution.kkt_residual, "max_shortfall": float(np.max(solution.violations()))
           if solution.status != "infeasible" else float("nan")}
    for column, name in enumerate(pool.value_names):
        row[f"lambda[{name}]"] = float(solution.lam[column])
        row[f"realised[{name}]"] = float(solution.realised[column])
        row[f"quantile[{name}]"] = (base_quantile(pool, name, float(solution.realised[column]))
                                    if np.isfinite(solution.realised[column]) else float("nan"))
    return row


def run(pool: RewardPool, palettes: dict[str, dict[str, float]], rounds: int) -> list[dict]:
    rows = []
    for name, palette in palettes.items():
        for method in ("exact", "reference"):
            rows.append(record(pool, name, method, "joint", solve(pool, palette, method=method)))
            history = solve_sequential(pool, palette, rounds=rounds, method=method)
            for round_number, solution in enumerate(history, start=1):
                rows.append(record(pool, name, method, f"round {round_number}", solution))
    return rows


def markdown(rows: list[dict], shown: list[str]) -> str:
    header = ("| palette | solver | stage | λ (" + ", ".join(shown) + ") | realised quantile ("
              + ", ".join(shown) + ") | largest shortfall (raw units) | KKT (sd) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lam = ", ".join(f"{row[f'lambda[{v}]']:.3f}" for v in shown)
        quantiles = ", ".join(f"{100 * row[f'quantile[{v}]']:.1f}%" for v in shown)
        lines.append(f"| {row['palette']} | {row['method']} | {row['stage']} | {lam} | {quantiles} "
                     f"| {row['max_shortfall']:.4f} | {row['kkt_residual']:.1e} |")
    return "\n".join(lines)


def plot(rows: list[dict], shown: list[str], plot_rounds: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    stages = ["joint"] + [f"round {r}" for r in plot_rounds]
    palettes = list(dict.fromkeys(row["palette"] for row in rows))
    figure, panels = plt.subplots(1, 2, figsize=(14, 4.6), sharey=True)
    width = 0.8 / len(stages)
    for panel, method in zip(panels, ("exact", "reference")):
        labels, positions = [], []
        for v_index, value in enumerate(shown):
            for p_index, palette in enumerate(palettes):
                centre = v_index * (len(palettes) + 1) + p_index
                labels.append(palette)
                positions.append(centre)
                for s_index, stage in enumerate(stages):
                    match = [row for row in rows if (row["palette"], row["method"], row["stage"]) == (palette, method, stage)]
                    if match:
                        panel.bar(centre + (s_index - (len(stages) - 1) / 2) * width, match[0][f"quantile[{value}]"],
                                  width, color=f"C{s_index}", label=stage if (v_index, p_index) == (0, 0) else None)
        panel.set_xticks(positions)
        panel.set_xticklabels(labels, fontsize=7)
        for v_index, value in enumerate(shown):
            # The value's name under its group of palettes.
            centre = v_index * (len(palettes) + 1) + (len(palettes) - 1) / 2
            panel.text(centre, -0.1, value, ha="center", va="top", fontsize=9, transform=panel.get_xaxis_transform())
        panel.set_title(f"{method} solver: joint MAP vs sequential rounds")
        panel.set_ylim(0.0, 1.0)
        panel.legend(fontsize=8)
    panels[0].set_ylabel("realised level (quantile of the pilot's rewards)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", nargs="?", type=Path, help="reward pool (default: the config's pool)")
    add_config_arguments(parser, CONFIGS / "sequential_vs_joint.yaml")
    add_output_arguments(parser)
    parser.add_argument("--rounds", type=int, help="sequential rounds; the same as --set rounds=N")
    parser.add_argument("--palettes", help="comma-separated palette names; the same as --set palettes=[A,B]")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"rounds={args.rounds}")
    if args.palettes:
        overrides.append(f"palettes=[{args.palettes}]")
    config = load_config(SequentialConfig, args.config, overrides)
    if args.pool:
        config.pool = args.pool.resolve()
    pool = RewardPool.load(config.pool)
    palettes = palette_set(config.palettes_config).pick(config.palettes)
    rounds = config.rounds
    shown = [name for name in (config.shown_values or pool.value_names) if name in pool.value_names]
    plot_rounds = [r for r in config.plot_rounds if r <= rounds] or [rounds]
    out = args.out
    prepare_out(out, force=args.force, config=config)
    rows = run(pool, palettes, rounds)
    with (out / "sequential_vs_joint.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, shown)
    (out / "sequential_vs_joint.md").write_text(table + "\n")
    plot(rows, shown, plot_rounds, out / "sequential_vs_joint.png")
    print(table)
    print(f"wrote {out / 'sequential_vs_joint.csv'}, {out / 'sequential_vs_joint.md'}, {out / 'sequential_vs_joint.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
