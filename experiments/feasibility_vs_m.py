"""Figure 11: the share of feasible random palettes, and the solve time, for m = 1..6 values.

For each m (the first m of the config's values) and each kind of palette ("aggressive": c_i ~ U(c0_i, max r_i);
"conservative": c_i ~ U(c0_i, a pilot quantile)), draw N palettes and solve them all in one ``solve_many`` call
with the exact solver (LP-certified verdicts) and with the authors' solver replicated in JAX (method="reference",
whose "feasible" means "λ did not overflow"); optionally time the authors' PyTorch solver one palette at a time on
a subset. Writes feasibility_vs_m.csv, feasibility_vs_m.md and feasibility_vs_m.png into --out.

    python experiments/feasibility_vs_m.py [POOL] --out results/feasibility_vs_m [--palettes 1000] [--force]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from mapjax import RewardPool, solve_many

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from common import ROOT, prepare_out  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "feasibility_vs_m.yaml"
COLUMNS = (
    "mode", "m", "palettes", "feasible_exact", "kept_l1", "feasible_reference", "reference_false_infeasible",
    "reference_false_feasible", "exact_first_call_s", "exact_s", "reference_jax_s", "reference_torch_s_per_palette",
    "reference_torch_projected_s",
)


def upper_levels(pool: RewardPool, columns: list[int], upper: str) -> np.ndarray:
    """Each column's upper end of the draw: the sample maximum ('max') or a quantile ('q0.8')."""
    if upper == "max":
        return pool.value_range()[1][columns]
    if upper.startswith("q"):
        fraction = float(upper[1:])
        if not 0.0 < fraction <= 1.0:
            raise SystemExit(f"upper {upper!r}: the quantile must lie in (0, 1]")
        return np.quantile(pool.flat()[:, columns], fraction, axis=0)
    raise SystemExit(f"upper {upper!r}: use 'max' or a quantile such as 'q0.8'")


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
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch
        import torch_reference
    except ImportError:
        return None
    rewards = torch.tensor(pool.flat()[:, [pool.index_of(name) for name in values]].T, dtype=torch.float32)
    seconds = []
    for row in palettes:
        start = time.perf_counter()
        torch_reference.reference_lambda(rewards, torch.tensor(row, dtype=torch.float32))
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def run(pool: RewardPool, config: dict, palettes: int, torch_palettes: int) -> list[dict]:
    """One row per (mode, m): shares and timings."""
    values = list(config["values"])
    rows = []
    for mode_index, (mode, settings) in enumerate(config["modes"].items()):
        for m in range(1, len(values) + 1):
            chosen = values[:m]
            seed = int(config.get("seed", 0)) + 1000 * mode_index + m
            targets = draw_palettes(pool, chosen, str(settings["upper"]), palettes, seed)
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
            kept = feasible & (np.nansum(exact.lam, axis=1) < float(config.get("max_l1", 6.0)))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", nargs="?", type=Path, help="reward pool (default: the config's, relative to the repository)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; refused if not empty)")
    parser.add_argument("--palettes", type=int, help="palettes per (mode, m) (default: the config's)")
    parser.add_argument("--torch-palettes", type=int, help="palettes timed with the PyTorch solver (0: skip)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    pool = RewardPool.load(args.pool or (ROOT / config["pool"]))
    palettes = int(args.palettes or config["palettes"])
    torch_palettes = int(config.get("torch_palettes", 0) if args.torch_palettes is None else args.torch_palettes)
    out = prepare_out(args.out, args.force)
    print(f"{pool.num_samples} samples, {palettes} random palettes per (mode, m)")
    rows = run(pool, config, palettes, min(torch_palettes, palettes))
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
    sys.exit(main())
