"""experiments/paper_lambdas.py: the λ table of MAP.md section 7 on the shipped pilot set."""

from __future__ import annotations

import json

from experiments import paper_lambdas
from experiments.common import CONFIGS, PILOT, PaletteSet, load_config


def test_paper_lambda_table(pilot):
    config = load_config(PaletteSet, CONFIGS / "opt_pilot_palettes.yaml")
    assert config.pool == PILOT and config.pool.is_file()
    palettes = config.named()
    assert set(palettes) == {"HHH-50", "HHH-60", "HHH-70", "HHH-80", "Humor-80", "Help-80", "Harm-80"}
    assert palettes["HHH-70"]["diversity"] == 0.876   # the maintained values are added to each HHH palette
    text = paper_lambdas.table(pilot, {k: palettes[k] for k in ("HHH-70", "HHH-80")}, config.values)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert "12.766, 1.526, 1.689" in rows["HHH-70"] and "12.759, 1.530, 1.692, 0.000" in rows["HHH-70"]
    assert "overflow: infeasible" in rows["HHH-80"] and rows["HHH-80"].rstrip().endswith("| feasible |")


def test_paper_lambdas_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "table"
    code = paper_lambdas.main(["--out", str(out), "--set", "palettes={HHH-70: {humor: 2.513, gpt2-helpful: -0.967, "
                               "gpt2-harmless: 0.937}}", "--set", "single={}"])
    assert code == 0
    written = (out / "paper_lambdas.md").read_text()
    assert written.startswith("| palette |") and "| HHH-70 |" in written and "HHH-80" not in written
    assert json.loads((out / "config.json").read_text())["pool"] == str(PILOT)
    assert "| HHH-70 |" in capsys.readouterr().out
