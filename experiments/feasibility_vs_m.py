"""Figure 11: the share of feasible random palettes, and the solve time, for m = 1..6 values.

For each m (the first m of the config's values) and each kind of palette ("aggressive": c_i ~ U(c0_i, max r_i);
"conservative": c_i ~ U(c0_i, a pilot quantile)), draw N palettes and solve them all in one ``solve_many`` call
with the exact solver (LP-certified verdicts) and with the authors' solver replicated in JAX (method="reference",
whose "feasible" means "λ did not overflow"); optionally time the authors' PyTorch solver one palette at a time on
a subset. Writes feasibility_vs_m.csv, feasibility_vs_m.md and feasibility_vs_m.png into --out.

    python -m experiments.feasibility_vs_m [POOL] --out results/feasibility_vs_m [--palettes 1000] [--set seed=1] [--force]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.common import (
    CONFIGS,
    PILOT,
    add_config_arguments,
    add_output_arguments,
    load_config,
    prepare_out,
    reports_errors,
)
from mapjax import RewardPool, solve_many
from mapjax.errors import ConfigError


@dataclasses.dataclass
class Mode:
    """One kind of random palette: c_i ~ U(c0_i, upper_i), upper ``max`` (the sample maximum) or ``qP``."""

    upper: str

    def __post_init__(self) -> None:
        if self.upper != "max":
            fraction = _quantile(self.upper)
            if fraction is None or not 0.0 < fraction <= 1.0:
                raise ConfigError(f"modes: upper {self.upper!r}: use 'max' or a quantile 'qP' with P in (0, 1]")


@dataclasses.dataclass
class FeasibilityConfig:
    """configs/feasibility_vs_m.yaml: the values (the first m of them for each m), the modes, the draws."""

    values: list[str]
    modes: dict[str, Mode]
    pool: Path = PILOT
    palettes: int = 1000
    seed: int = 0
    torch_palettes: int = 0   # palettes timed with the authors' PyTorch solver (0: skip)
    max_l1: float = 6.0

    def __post_init__(self) -> None:
        if self.palettes < 1 or self.torch_palettes < 0:
            raise ConfigError(f"palettes must be >= 1 and torch_palettes >= 0, got {self.palettes} and "
                              f"{self.torch_palettes}")
        if not self.values or not self.modes:
            raise ConfigError("values and modes must each name at least one entry")


def _quantile(upper: str) -> float | None:
    try:
        return float(upper[1:]) if upper.startswith("q") else None
    except ValueError:
        return None


COLUMNS = (
    "mode", "m", "palettes", "feasible_exact", "kept_l1", "feasible_reference", "reference_false_infeasible",
    "reference_false_feasible", "exact_first_call_s", "exact_s", "reference_jax_s", "reference_torch_s_per_palette",
    "reference_torch_projected_s",
)


def upper_levels(pool: RewardPool, columns: list[int], upper: str) -> np.ndarray:
    """Each column's upper end of the draw: the sample maximum ('max') or a quantile ('q0.8')."""
    if upper == "max":
        return pool.value_range()[1][columns]
    return np.quantile(pool.flat()[:, columns], _quantile(upper), axis=0)


def draw_palettes(pool: RewardPool, values: list[str], upper: str, count: int, seed: int) -> np.ndarray:
    """[count, m] palettes c_i ~ U(c0_i, upper_i)."""
    columns = [pool.index_of(name) for name in values]
    low = pool.means()[columns]
    high = np.maximum(upper_levels(pool, columns, upper), low)
    return np.random.default_rng(seed).uniform(low, high, size=(count, len(values)))


def torch_timing(pool: RewardPool, values: list[str], palettes: np.ndarray) -> float | None:
    """Seconds per palette of the authors' PyTorch solver (one palette at a time), or None without torch.

    The median over the palettes: robust to other work on a shared machine slowing a few of them down.
    """
    try:
        import torch

        from benchmarks.torch_reference import reference_lambda
    except ImportError:
        return None
    rewards = torch.tensor(pool.flat()[:, [pool.index_of(name) for name in values]].T, dtype=torch.float32)
    seconds = []
    for row in palettes:
        start = time.perf_counter()
        reference_lambda(rewards, torch.tensor(row, dtype=torch.float32))
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def run(pool: RewardPool, config: FeasibilityConfig) -> list[dict]:
    """One row per (mode, m): shares and timings."""
    values, palettes = config.values, config.palettes
    torch_palettes = min(config.torch_palettes, palettes)
    rows = []
    for mode_index, (mode, settings) in enumerate(config.modes.items()):
        for m in range(1, len(values) + 1):
            chosen = values[:m]
            seed = config.seed + 1000 * mode_index + m
            targets = draw_palettes(pool, chosen, settings.upper, palettes, seed)
            start = time.perf_counter()
            solve_many(pool, targets, values=chosen)
            first_call = time.perf_counter() - start
            # Later calls: the compiled program, as a user solving batch after batch sees it (best of 3, since
            # other work on a shared machine only ever adds time).
            exact_seconds = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                exact = solve_many(pool, targets, values=chosen)
                exact_seconds = min(exact_seconds, time.perf_counter() - start)
            start = time.perf_counter()
            reference = solve_many(pool, targets, values=chosen, method="reference")
            reference_seconds = time.perf_counter() - start
            feasible = exact.feasible
            kept = feasible & (np.nansum(exact.lam, axis=1) < config.max_l1)
            ref_ok = reference.feasible
            per_palette = torch_timing(pool, chosen, targets[:torch_palettes]) if torch_palettes > 0 else None
            rows.append({
                "mode": mode,
                "m": m,
                "palettes": palettes,
                "feasible_exact": float(feasible.mean()),
                "kept_l1": float(kept.mean()),
                "feasible_reference": float(ref_ok.mean()),
                "reference_false_infeasible": int(np.sum(feasible & ~ref_ok)),
                "reference_false_feasible": int(np.sum(~feasible & ref_ok)),
                "exact_first_call_s": first_call,
                "exact_s": exact_seconds,
                "reference_jax_s": reference_seconds,
                "reference_torch_s_per_palette": per_palette,
                "reference_torch_projected_s": None if per_palette is None else per_palette * palettes,
            })
            print(f"  {mode:<12} m={m}: feasible {rows[-1]['feasible_exact']:.3f} (reference "
                  f"{rows[-1]['feasible_reference']:.3f}), exact {exact_seconds:.2f} s, reference {reference_seconds:.2f} s",
                  flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| palettes | m | feasible (exact, LP-certified) | feasible and ‖λ‖₁ < 6 | \"feasible\" (reference: no overflow) "
        "| reference wrong (says infeasible / says feasible) | exact solve_many (s) | first call incl. compile (s) "
        "| reference, JAX batch (s) | reference, PyTorch one at a time (s, median × palettes) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        torch_cell = "-" if row["reference_torch_projected_s"] is None else f"{row['reference_torch_projected_s']:.1f}"
        lines.append(
            f"| {row['mode']} | {row['m']} | {100 * row['feasible_exact']:.1f}% | {100 * row['kept_l1']:.1f}% "
            f"| {100 * row['feasible_reference']:.1f}% | {row['reference_false_infeasible']} / "
            f"{row['reference_false_feasible']} | {row['exact_s']:.3f} | {row['exact_first_call_s']:.2f} "
            f"| {row['reference_jax_s']:.2f} | {torch_cell} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, mode in enumerate(dict.fromkeys(row["mode"] for row in rows)):
        mine = [row for row in rows if row["mode"] == mode]
        ms = [row["m"] for row in mine]
        color = f"C{index}"
        left.plot(ms, [100 * row["feasible_exact"] for row in mine], marker="o", color=color, label=f"{mode}: exact")
        left.plot(ms, [100 * row["feasible_reference"] for row in mine], marker="x", linestyle="--", color=color,
                  label=f"{mode}: reference (no overflow)")
        right.plot(ms, [row["exact_s"] for row in mine], marker="o", color=color, label=f"{mode}: exact solve_many")
        right.plot(ms, [row["reference_jax_s"] for row in mine], marker="x", linestyle="--", color=color,
                   label=f"{mode}: reference (JAX batch)")
        torch_times = [row["reference_torch_projected_s"] for row in mine]
        if all(value is not None for value in torch_times):
            right.plot(ms, torch_times, marker="s", linestyle=":", color=color, label=f"{mode}: reference (PyTorch)")
    left.set_xlabel("number of values m")
    left.set_ylabel("feasible palettes (%)")
    left.set_ylim(0, 105)
    left.legend(fontsize=8)
    left.set_title("share of feasible random palettes")
    right.set_xlabel("number of values m")
    right.set_ylabel(f"seconds for {rows[0]['palettes']} palettes")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title("solve time")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", nargs="?", type=Path, help="reward pool (default: the config's pool)")
    add_config_arguments(parser, CONFIGS / "feasibility_vs_m.yaml")
    add_output_arguments(parser)
    parser.add_argument("--palettes", type=int, help="palettes per (mode, m); the same as --set palettes=N")
    parser.add_argument("--torch-palettes", type=int, help="palettes timed with the PyTorch solver (0: skip); "
                        "the same as --set torch_palettes=N")
    args = parser.parse_args(argv)
    shortcuts = {"palettes": args.palettes, "torch_palettes": args.torch_palettes}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in shortcuts.items() if value is not None)]
    config = load_config(FeasibilityConfig, args.config, overrides)
    if args.pool:
        config.pool = args.pool.resolve()
    pool = RewardPool.load(config.pool)
    out = args.out
    prepare_out(out, force=args.force, config=config)
    palettes = config.palettes
    print(f"{pool.num_samples} samples, {palettes} random palettes per (mode, m)")
    rows = run(pool, config)
    with (out / "feasibility_vs_m.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (out / "feasibility_vs_m.md").write_text(table + "\n")
    plot(rows, out / "feasibility_vs_m.png")
    print(table)
    print(f"wrote {out / 'feasibility_vs_m.csv'}, {out / 'feasibility_vs_m.md'}, {out / 'feasibility_vs_m.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
