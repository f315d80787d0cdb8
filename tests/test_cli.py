import json

import pytest

from mapjax import RewardPool
from mapjax.cli import EXIT_NOT_REACHED, main

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
    assert code == EXIT_NOT_REACHED == 1   # the same status decode gives an unreachable palette
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


def strict_json(text):
    """json.loads that refuses the non-standard NaN / Infinity constants Python's json writes by default."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_levels_json_writes_null_for_an_undefined_standard_error(capsys, tmp_path):
    """One sample has no standard error: JSON gets null, not the bare NaN no strict reader accepts."""
    path = RewardPool.from_records([{"prompt": "a", "humor": 1.0}]).save(tmp_path / "one.json")
    code, out, _ = run(capsys, "levels", path, "--json")
    assert code == 0 and "NaN" not in out
    humor = strict_json(out)["values"][0]
    assert humor["standard_error"] is None and humor["mean"] == 1.0


def test_json_output_is_strict_for_solve_and_adjust(capsys, pilot_file):
    code, out, _ = run(capsys, "solve", pilot_file, "--palette", "humor>=q0.99, gpt2-harmless>=q0.99", "--json")
    data = strict_json(out)
    assert code == 1 and data["status"] == "infeasible"
    code, out, _ = run(capsys, "adjust", pilot_file, "--palette", "humor>=q0.9, gpt2-harmless>=q0.9", "--json")
    assert code == 0 and strict_json(out)["solution"]["status"] == "optimal"


def test_exit_statuses_are_in_every_help(capsys):
    for argv in (["--help"], ["solve", "--help"], ["decode", "--help"], ["finetune", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "exit status:" in out and "1  the palette cannot be reached" in out and "2  bad input" in out


def test_a_malformed_command_line_exits_2(capsys, pilot_file):
    code, _, err = run(capsys, "adjust", pilot_file, "--palette", "humor>=q0.9", "--points", "zero")
    assert code == 2 and "--points" in err
    code, _, err = run(capsys, "adjust", pilot_file, "--palette", "humor>=q0.9", "--priority", "humor,humor")
    assert code == 2 and "humor" in err and "more than once" in err


def test_an_unreadable_path_is_one_line_but_an_internal_error_keeps_its_traceback(capsys, pilot_file, monkeypatch,
                                                                                tmp_path):
    import mapjax.pool

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(pilot_file))

    monkeypatch.setattr(mapjax.pool.RewardPool, "load", denied)
    code, out, err = run(capsys, "levels", pilot_file)
    assert code == 2 and out == ""
    assert err.strip() == f"mapjax levels: error: {pilot_file}: Permission denied"

    def bug(*args, **kwargs):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(mapjax.pool.RewardPool, "load", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["levels", str(pilot_file)])
