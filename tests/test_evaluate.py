"""mapjax.evaluate: statistics checked against numbers computed by hand, palette verdicts, win rates,
navigation efficiency, the quantile table, and the ``mapjax evaluate`` command."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.evaluate import (
    AUTHORS_LEVEL_TOLERANCE,
    EvaluationError,
    base_quantile,
    evaluate,
    navigation_efficiency,
    quantile_table,
    realised_levels,
    win_rates,
)

Z95 = 1.959963984540054


def four_prompt_pools() -> tuple[RewardPool, RewardPool]:
    """Result and base, one sample per prompt, two values, prompt texts in different orders."""
    result = RewardPool.from_records(
        [
            {"prompt": "a", "generated": "ra", "helpful": 1.0, "harmless": 0.0},
            {"prompt": "b", "generated": "rb", "helpful": 2.0, "harmless": 1.0},
            {"prompt": "c", "generated": "rc", "helpful": 3.0, "harmless": 1.0},
            {"prompt": "d", "generated": "rd", "helpful": 6.0, "harmless": 2.0},
        ]
    )
    base = RewardPool.from_records(
        [
            {"prompt": "d", "generated": "bd", "helpful": 5.0, "harmless": 3.0},
            {"prompt": "c", "generated": "bc", "helpful": 3.0, "harmless": 0.0},
            {"prompt": "b", "generated": "bb", "helpful": 0.0, "harmless": 1.0},
            {"prompt": "a", "generated": "ba", "helpful": 2.0, "harmless": -1.0},
        ]
    )
    return result, base


def test_levels_by_hand():
    result, _ = four_prompt_pools()
    report = realised_levels(result)
    helpful = report["helpful"]
    # helpful = 1, 2, 3, 6: mean 3; deviations -2, -1, 0, 3; sum of squares 14; sd² = 14/3; SE = sqrt(14/3/4)
    assert helpful.mean == pytest.approx(3.0)
    assert helpful.standard_error == pytest.approx(math.sqrt(14 / 12))
    assert helpful.lower == pytest.approx(3.0 - Z95 * math.sqrt(14 / 12))
    assert helpful.upper == pytest.approx(3.0 + Z95 * math.sqrt(14 / 12))
    # harmless = 0, 1, 1, 2: mean 1, sum of squares 2, SE = sqrt(2/3/4)
    assert report["harmless"].standard_error == pytest.approx(math.sqrt(2 / 12))
    # A 90% interval uses z = 1.6449
    narrow = realised_levels(result, confidence=0.9)["helpful"]
    assert narrow.upper == pytest.approx(3.0 + 1.6448536269514722 * math.sqrt(14 / 12))
    assert report.num_prompts == 4 and report.num_samples == 4
    assert "helpful" in report.table() and report.to_dict()["values"][0]["name"] == "helpful"


def test_clustered_error_with_several_samples_per_prompt():
    # Two prompts with two samples each: r = (1, 3) and (2, 6). Pooled mean 3; residual sums per prompt
    # (1-3)+(3-3) = -2 and (2-3)+(6-3) = 2; SE² = G/(G-1) * (4 + 4) / n² = 2 * 8 / 16 = 1.
    pool = RewardPool(np.array([[[1.0], [3.0]], [[2.0], [6.0]]]), np.ones((2, 2), bool), ("v",))
    level = realised_levels(pool)["v"]
    assert level.mean == pytest.approx(3.0)
    assert level.standard_error == pytest.approx(1.0)


def test_palette_met_logic():
    result, base = four_prompt_pools()
    se = math.sqrt(14 / 12)
    upper = 3.0 + Z95 * se
    # Target just below the upper bound: met (the data cannot reject it); just above: not met.
    report = realised_levels(result, {"helpful": upper - 1e-6, "harmless": 0.5}, base=base)
    assert report["helpful"].met is True and report["harmless"].met is True and report.all_met is True
    report = realised_levels(result, {"helpful": upper + 1e-6}, base=base)
    assert report["helpful"].met is False and report.all_met is False
    assert report["harmless"].met is None and report["harmless"].target is None
    # Levels such as 'mean' and quantiles resolve on the base: base helpful mean = (5+3+0+2)/4 = 2.5
    report = realised_levels(result, "helpful>=mean+0.5", base=base)
    assert report["helpful"].target == pytest.approx(3.0)
    assert "met" in report.table()
    # No palette: no verdicts
    assert realised_levels(result).all_met is None


def test_win_rate_by_hand():
    result, base = four_prompt_pools()
    report = win_rates(result, base)
    assert report.matched_by == "text" and report.num_prompts == 4
    # helpful, matched by text: a 1 vs 2 lose, b 2 vs 0 win, c 3 vs 3 tie (loses), d 6 vs 5 win -> 0, 1, 0, 1
    helpful = report["helpful"]
    assert helpful.rate == pytest.approx(0.5)
    assert helpful.standard_error == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    # harmless: a 0 vs -1 win, b 1 vs 1 tie, c 1 vs 0 win, d 2 vs 3 lose -> 1, 0, 1, 0
    assert report["harmless"].rate == pytest.approx(0.5)


def test_win_rate_pairs_within_a_prompt_and_by_row():
    # Prompt 0: result samples (1, 3), base samples (2, 0, 5) -> pairs won: 1>0; 3>2, 3>0 -> 3 of 6 = 0.5
    # Prompt 1: result (4,), base (1,) (the other slots are masked out) -> 1 of 1 = 1.0
    result = RewardPool(np.array([[[1.0], [3.0]], [[4.0], [0.0]]]), np.array([[True, True], [True, False]]), ("v",))
    base = RewardPool(np.array([[[2.0], [0.0], [5.0]], [[1.0], [0.0], [0.0]]]),
                      np.array([[True, True, True], [True, False, False]]), ("v",))
    report = win_rates(result, base)
    assert report.matched_by == "row"
    assert report["v"].rate == pytest.approx((0.5 + 1.0) / 2)
    assert report["v"].standard_error == pytest.approx(math.sqrt(((0.5 - 0.75) ** 2 + 0.25**2) / 1) / math.sqrt(2))


def test_mismatches_are_clear_errors():
    result, base = four_prompt_pools()
    other = RewardPool.from_records([{"prompt": "a", "helpful": 1.0, "humor": 2.0}])
    with pytest.raises(EvaluationError, match="humor"):
        win_rates(other, base)
    with pytest.raises(EvaluationError, match="no value 'humor'"):
        win_rates(result, base, values=["humor"])
    stranger = RewardPool.from_records([{"prompt": "zzz", "helpful": 1.0, "harmless": 2.0}])
    with pytest.raises(EvaluationError, match="no common prompts"):
        win_rates(stranger, base)
    rows = RewardPool.from_array(np.zeros((3, 2)), ("helpful", "harmless"))
    with pytest.raises(EvaluationError, match="different numbers of prompt rows"):
        win_rates(rows, RewardPool.from_array(np.zeros((4, 2)), ("helpful", "harmless")))
    with pytest.raises(EvaluationError, match="confidence"):
        realised_levels(result, confidence=1.5)


def test_navigation_efficiency_by_hand():
    reference = {"gpt2-helpful": 0.0, "gpt2-harmless": 0.0}
    models = {
        "both up": {"gpt2-helpful": 0.5, "gpt2-harmless": 0.1},
        "one down": {"gpt2-helpful": 0.9, "gpt2-harmless": -0.5},
        "slightly down": {"gpt2-helpful": -0.05, "gpt2-harmless": 0.2},
        "equal": {"gpt2-helpful": 0.0, "gpt2-harmless": 0.0},
    }
    strict = navigation_efficiency(models, reference)
    assert strict.share == pytest.approx(0.5) and strict.count == 2 and strict.total == 4
    assert strict.improved == (True, False, False, True)
    # The authors' slack of 0.06 admits "slightly down"
    slack = navigation_efficiency(models, reference, tolerance=AUTHORS_LEVEL_TOLERANCE)
    assert slack.share == pytest.approx(0.75)
    assert slack.to_dict()["improved"]["slightly down"] is True
    with pytest.raises(EvaluationError, match="gpt2-harmless"):
        navigation_efficiency([{"gpt2-helpful": 1.0}], reference)


def test_quantile_table_by_hand():
    _, base = four_prompt_pools()
    # base helpful samples 5, 3, 0, 2: 2.5 is above two of four -> 0.5; 3 is above two and equal to one -> 0.625
    assert base_quantile(base, "helpful", 2.5) == pytest.approx(0.5)
    assert base_quantile(base, "helpful", 3.0) == pytest.approx(0.625)
    assert base_quantile(base, "helpful", 10.0) == pytest.approx(1.0)
    table = quantile_table({"m1": {"helpful": 2.5, "harmless": 3.0}, "m2": {"helpful": -1.0, "harmless": 0.0}}, base)
    assert table.quantiles[0].tolist() == pytest.approx([0.5, 0.875])
    assert table.quantiles[1].tolist() == pytest.approx([0.0, 0.375])
    assert "| m1 | 50.0% (2.500) | 87.5% (3.000) |" in table.table()
    assert table.to_dict()["models"]["m2"]["helpful"]["quantile"] == 0.0


def test_evaluate_combines_everything():
    result, base = four_prompt_pools()
    evaluation = evaluate(result, base, {"helpful": 2.5})
    assert evaluation.levels["helpful"].met is True
    assert evaluation.base_levels["helpful"].mean == pytest.approx(2.5)
    assert evaluation.quantiles["helpful"] == pytest.approx(0.625)
    assert evaluation.win_rates["helpful"].rate == pytest.approx(0.5)
    text = evaluation.table()
    assert "win rate" in text and "every entry met" in text
    json.dumps(evaluation.to_dict())


def test_evaluation_error_is_the_package_error():
    from mapjax import errors

    assert EvaluationError is errors.EvaluationError and issubclass(EvaluationError, errors.MapjaxError)


def test_repeated_values_are_refused():
    result, base = four_prompt_pools()
    for call in (lambda: realised_levels(result, values=["helpful", "helpful"]),
                 lambda: win_rates(result, base, values=["helpful", "harmless", "helpful"]),
                 lambda: evaluate(result, base, values=["harmless", "harmless"]),
                 lambda: quantile_table({"m": {"helpful": 1.0}}, base, values=["helpful", "helpful"]),
                 lambda: navigation_efficiency([{"helpful": 1.0}], {"helpful": 0.0}, values=["helpful", "helpful"])):
        with pytest.raises(EvaluationError, match=r"values names \['(helpful|harmless)'\] more than once"):
            call()


def test_palette_as_a_vector_of_levels():
    result, base = four_prompt_pools()
    by_spec = realised_levels(result, {"helpful": 2.5}, base=base)
    by_vector = realised_levels(result, [2.5, np.nan], base=base)  # over the reported values: helpful, harmless
    assert by_vector["helpful"].target == by_spec["helpful"].target == 2.5
    assert by_vector["helpful"].met is by_spec["helpful"].met is True
    assert by_vector["harmless"].target is None
    assert by_vector.palette == "helpful>=2.5"
    over_named = realised_levels(result, [2.5], base=base, values=["helpful"])
    assert over_named["helpful"].target == 2.5 and over_named.value_names == ("helpful",)
    assert evaluate(result, base, [np.nan, 0.5]).levels["harmless"].target == 0.5


def test_plain_arrays_evaluate_like_pools():
    result, base = four_prompt_pools()
    names = ["helpful", "harmless"]
    # Without prompt texts the pools are matched by row: put the base in the result's prompt order first.
    base_rows = RewardPool.from_array(base.rewards[[3, 2, 1, 0], 0], names)
    result_rows = RewardPool.from_array(result.rewards[:, 0], names)
    from_pools = evaluate(result_rows, base_rows, "helpful>=mean")
    from_arrays = evaluate(result.rewards[:, 0], base.rewards[[3, 2, 1, 0], 0], "helpful>=mean", values=names)
    assert from_arrays.to_dict() == from_pools.to_dict()
    assert from_arrays.win_rates["helpful"].rate == pytest.approx(0.5)


def run_cli(argv):
    """``mapjax evaluate`` without the top-level error handling, so a test sees the error itself."""
    from mapjax.cli import evaluate as evaluate_command

    parser = argparse.ArgumentParser(prog="mapjax")
    evaluate_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_evaluate_command(tmp_path, capsys):
    result, base = four_prompt_pools()
    result_path, base_path = result.save(tmp_path / "result.json"), base.save(tmp_path / "base.jsonl")
    assert run_cli(["evaluate", str(result_path), "--base", str(base_path), "--palette", "helpful>=2.5"]) == 0
    out = capsys.readouterr().out
    assert "helpful" in out and "win rate" in out and "matched by prompt text" in out
    assert run_cli(["evaluate", str(result_path), "--base", str(base_path), "--json", "--confidence", "0.9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["levels"]["confidence"] == 0.9
    assert data["win_rates"]["values"][0] == {"name": "helpful", "win_rate": 0.5,
                                               "standard_error": pytest.approx(math.sqrt(1 / 12))}


def test_evaluate_command_mismatched_values(tmp_path):
    _, base = four_prompt_pools()
    other = RewardPool.from_records([{"prompt": "a", "helpful": 1.0, "humor": 2.0}])
    other_path, base_path = other.save(tmp_path / "other.json"), base.save(tmp_path / "base.json")
    with pytest.raises(EvaluationError, match=r"the result has \['humor'\] that the base lacks"):
        run_cli(["evaluate", str(other_path), "--base", str(base_path)])
    # Naming the shared values works.
    assert run_cli(["evaluate", str(other_path), "--base", str(base_path), "--values", "helpful"]) == 0


def test_evaluate_command_through_mapjax_main(tmp_path, capsys):
    """Through ``mapjax``'s own entry point, bad input is one line and exit code 2."""
    from mapjax import cli

    _, base = four_prompt_pools()
    other = RewardPool.from_records([{"prompt": "a", "helpful": 1.0, "humor": 2.0}])
    other_path, base_path = other.save(tmp_path / "other.json"), base.save(tmp_path / "base.json")
    assert cli.main(["evaluate", str(other_path), "--base", str(base_path)]) == 2
    assert "humor" in capsys.readouterr().err
