import json

import pytest

from mapjax.cli import main

PALETTE = "humor>=q0.7, gpt2-helpful>=q0.7, gpt2-harmless>=q0.7, diversity>=mean, coherence>=mean, perplexity>=mean"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_levels_table_and_json(capsys, pilot_file):
    code, out, _ = run(capsys, "levels", pilot_file)
    assert code == 0
    assert "2178 prompts, 2312 samples" in out and "q80" in out
    assert any(line.startswith("humor") and "2.070" in line for line in out.splitlines())
    code, out, _ = run(capsys, "levels", pilot_file, "--json")
    data = json.loads(out)
    humor = next(v for v in data["values"] if v["name"] == "humor")
    assert humor["quantiles"]["0.7"] == pytest.approx(2.513, abs=5e-4)


def test_solve_prints_table_and_verdict(capsys, pilot_file):
    code, out, _ = run(capsys, "solve", pilot_file, "--palette", PALETTE)
    assert code == 0
    assert "status        optimal" in out and "ESS" in out and "KKT residual" in out
    humor = next(line for line in out.splitlines() if line.startswith("humor"))
    assert float(humor.split()[-1]) == pytest.approx(12.76, abs=0.1)


def test_solve_json_and_reference(capsys, pilot_file):
    code, out, _ = run(capsys, "solve", pilot_file, "--palette", PALETTE, "--json", "--sensitivity")
    data = json.loads(out)
    assert code == 0 and data["status"] == "optimal" and data["certificate"]["feasible"]
    assert {v["name"]: v["lambda"] for v in data["values"]}["diversity"] == 0.0
    assert len(data["sensitivity"]) == 6
    code, out, _ = run(capsys, "solve", pilot_file, "--palette", PALETTE, "--json", "--method", "reference")
    data = json.loads(out)
    assert data["method"] == "reference" and {v["name"]: v["lambda"] for v in data["values"]}["diversity"] > 0


def test_solve_infeasible_says_which_values(capsys, pilot_file):
    code, out, _ = run(capsys, "solve", pilot_file, "--palette", "humor>=q0.99, gpt2-harmless>=q0.99")
    assert code == 0
    assert "infeasible" in out and "humor and gpt2-harmless cannot be reached together" in out


def test_adjust_interpolate_and_greedy(capsys, pilot_file):
    palette = "humor>=q0.9, gpt2-helpful>=q0.9, gpt2-harmless>=q0.9"
    code, out, _ = run(capsys, "adjust", pilot_file, "--palette", palette)
    assert code == 0 and "adjusted to a reachable palette (interpolate, rho = " in out
    code, out, _ = run(capsys, "adjust", pilot_file, "--palette", palette, "--priority", "gpt2-harmless", "--json")
    data = json.loads(out)
    assert data["method"] == "greedy" and data["solution"]["status"] == "optimal"
    assert data["palette"]["gpt2-harmless"] == pytest.approx(data["requested"]["gpt2-harmless"])


@pytest.mark.parametrize("argv, message", [
    (["solve", "{pool}", "--palette", "humour>=q0.8"], "unknown value 'humour'"),
    (["solve", "{pool}", "--palette", "humor>=7"], "above its largest reward"),
    (["solve", "missing.json", "--palette", "humor>=1"], "missing.json: no such file"),
    (["adjust", "{pool}", "--palette", "humor>=q0.9", "--method", "grid", "--priority", "humor"], "greedy only"),
])
def test_errors_are_one_clear_line(capsys, pilot_file, argv, message):
    code, out, err = run(capsys, *[a.format(pool=pilot_file) for a in argv])
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
