"""The pool-only experiment scripts, end to end on a small synthetic pool written by the test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments import feasibility_vs_m, pareto_and_region, sequential_vs_joint
from mapjax import RewardPool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VALUES = ("humor", "gpt2-helpful", "gpt2-harmless")


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    """120 prompts, one sample each, three correlated values named as the pilot's, with prompt texts."""
    rng = np.random.default_rng(11)
    rewards = rng.normal(size=(120, 3)) @ np.array([[1.0, 0.2, -0.3], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    records = [
        {"prompt": f"prompt {i}", "generated": f"text {i}", **{name: float(v) for name, v in zip(VALUES, row)}}
        for i, row in enumerate(rewards)
    ]
    return RewardPool.from_records(records).save(tmp_path_factory.mktemp("pool") / "pool.json")


def write_configs(folder: Path, pool: RewardPool) -> dict[str, Path]:
    """Configs for the synthetic pool: palettes at its 50% and 70% quantiles, maintained nothing."""
    flat = pool.flat()
    palettes = {
        f"P-{int(q * 100)}": {name: round(float(np.quantile(flat[:, pool.index_of(name)], q)), 4) for name in VALUES}
        for q in (0.5, 0.7)
    }
    (folder / "palettes.yaml").write_text(yaml.safe_dump({"values": list(VALUES), "maintained": {}, "palettes": palettes}))
    paths = {
        "feasibility": folder / "feasibility.yaml",
        "sequential": folder / "sequential.yaml",
        "pareto": folder / "pareto.yaml",
    }
    paths["feasibility"].write_text(yaml.safe_dump({
        "pool": "unused.json", "values": list(VALUES), "palettes": 30, "seed": 1, "max_l1": 6.0, "torch_palettes": 0,
        "modes": {"aggressive": {"upper": "max"}, "conservative": {"upper": "q0.8"}},
    }))
    paths["sequential"].write_text(yaml.safe_dump({
        "pool": "unused.json", "palettes_config": str(folder / "palettes.yaml"), "palettes": list(palettes), "rounds": 3,
        "plot_rounds": [1, 3], "shown_values": list(VALUES),
    }))
    paths["pareto"].write_text(yaml.safe_dump({
        "pool": "unused.json", "palettes_config": str(folder / "palettes.yaml"), "x": "gpt2-helpful", "y": "gpt2-harmless",
        "random_values": ["gpt2-helpful", "gpt2-harmless"], "count": 30, "seed": 0, "max_l1": 6.0,
        "navigation_tolerances": [0.0, 0.06], "region": {"points": 6, "fixed": {"humor": "mean"}},
        "marks": list(palettes),
    }))
    return paths


@pytest.fixture(scope="module")
def configs(pool_file, tmp_path_factory) -> dict[str, Path]:
    return write_configs(tmp_path_factory.mktemp("configs"), RewardPool.load(pool_file))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


@pytest.mark.slow
def test_feasibility_vs_m(tmp_path, pool_file, configs, capsys):
    script = feasibility_vs_m
    out = tmp_path / "out"
    assert script.main([str(pool_file), "--config", str(configs["feasibility"]), "--out", str(out), "--palettes", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| aggressive | 3 |" in printed and f"wrote {out / 'feasibility_vs_m.csv'}" in printed
    rows = list(csv.DictReader((out / "feasibility_vs_m.csv").open()))
    assert [(row["mode"], int(row["m"])) for row in rows] == [(mode, m) for mode in ("aggressive", "conservative") for m in (1, 2, 3)]
    for row in rows:
        assert 0.0 <= float(row["feasible_exact"]) <= 1.0 and float(row["exact_s"]) > 0
    # --palettes is the same as --set palettes=N, and the resolved config is recorded beside the results.
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["palettes"] == 20 and recorded["pool"] == str(pool_file)
    # One value below its sample maximum is always reachable on the sample.
    assert float(rows[0]["feasible_exact"]) == 1.0
    assert_png(out / "feasibility_vs_m.png")
    # Never overwrites without --force; does with it.
    assert script.main([str(pool_file), "--config", str(configs["feasibility"]), "--out", str(out), "--palettes", "20"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert script.main([str(pool_file), "--config", str(configs["feasibility"]), "--out", str(out), "--palettes", "8",
                        "--force"]) == 0


def test_sequential_vs_joint(tmp_path, pool_file, configs, capsys):
    script = sequential_vs_joint
    out = tmp_path / "out"
    assert script.main([str(pool_file), "--config", str(configs["sequential"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| P-70 | exact | joint |" in printed and "| P-50 | reference | round 3 |" in printed
    rows = list(csv.DictReader((out / "sequential_vs_joint.csv").open()))
    assert len(rows) == 2 * 2 * (1 + 3)
    exact = [row for row in rows if row["palette"] == "P-70" and row["method"] == "exact"]
    joint = np.array([float(exact[0][f"lambda[{v}]"]) for v in VALUES])
    rounds = [np.array([float(row[f"lambda[{v}]"]) for v in VALUES]) for row in exact[1:]]
    # Theorem 5: coordinate ascent closes in on the joint λ round after round.
    gaps = [np.abs(lam - joint).max() for lam in rounds]
    assert gaps[-1] <= gaps[0] + 1e-12
    assert_png(out / "sequential_vs_joint.png")
    assert (out / "sequential_vs_joint.md").read_text().startswith("| palette |")
    assert script.main([str(pool_file), "--config", str(configs["sequential"]), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.slow
def test_pareto_and_region(tmp_path, pool_file, configs, capsys):
    script = pareto_and_region
    out = tmp_path / "out"
    assert script.main([str(pool_file), "--config", str(configs["pareto"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "navigation efficiency" in printed and "| MAP: random feasible palettes | 0 | 100.0% |" in printed
    for name in ("pareto.png", "region_log_ess.png", "region_lambda_l1.png", "radar.png", "histograms.png"):
        assert_png(out / name)
    frontier = list(csv.reader((out / "region_frontier.csv").open()))
    assert len(frontier) == 1 + 6
    assert script.main([str(pool_file), "--config", str(configs["pareto"]), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert script.main([str(pool_file), "--config", str(configs["pareto"]), "--out", str(out), "--force",
                        "--no-marks", "--count", "10", "--points", "4"]) == 0
