import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_lambda_table(pilot):
    script = load_script("paper_lambdas")
    config = yaml.safe_load((ROOT / "configs" / "opt_pilot_palettes.yaml").read_text())
    palettes = script.named_palettes(ROOT / "configs" / "opt_pilot_palettes.yaml")
    assert set(palettes) == {"HHH-50", "HHH-60", "HHH-70", "HHH-80", "Humor-80", "Help-80", "Harm-80"}
    text = script.table(pilot, {k: palettes[k] for k in ("HHH-70", "HHH-80")}, config["values"])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert "12.766, 1.526, 1.689" in rows["HHH-70"] and "12.759, 1.530, 1.692, 0.000" in rows["HHH-70"]
    assert "overflow: infeasible" in rows["HHH-80"] and rows["HHH-80"].rstrip().endswith("| feasible |")
