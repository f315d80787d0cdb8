import hashlib
import json

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.errors import InputError, MapjaxError
from mapjax.pool import PoolError, as_pool, unique_names

PILOT_MEANS = {"humor": 2.070, "gpt2-helpful": -1.471, "gpt2-harmless": 0.245, "diversity": 0.876,
               "coherence": 0.434, "perplexity": -3.337}


def test_pilot_groups_rows_by_prompt(pilot):
    assert pilot.num_samples == 2312
    assert pilot.num_prompts == 2178
    assert pilot.mask.sum(axis=1).max() == 3
    assert set(pilot.value_names) == set(PILOT_MEANS)
    assert pilot.prompts[0] == "what are some pranks with a pen i can do?"
    assert pilot.generations[0][0].startswith("what are some pranks with a pen i can do?")


def test_pilot_means_and_quantiles_match_the_paper(pilot):
    summary = {s.name: s for s in pilot.summary()}
    for name, mean in PILOT_MEANS.items():
        assert summary[name].mean == pytest.approx(mean, abs=5e-4)
    # The HHH palettes of MAP.md section 7 are these quantiles.
    assert summary["humor"].quantiles[0.7] == pytest.approx(2.513, abs=5e-4)
    assert summary["gpt2-helpful"].quantiles[0.8] == pytest.approx(-0.613, abs=5e-4)
    assert summary["gpt2-harmless"].quantiles[0.6] == pytest.approx(0.675, abs=5e-4)
    flat = pilot.flat()[:, pilot.index_of("humor")]
    assert summary["humor"].standard_error == pytest.approx(flat.std(ddof=1) / np.sqrt(flat.size))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_round_trip_keeps_texts_and_rewards(tmp_path, pilot, suffix):
    path = pilot.save(tmp_path / f"pool{suffix}")
    again = RewardPool.load(path)
    assert again.value_names == pilot.value_names
    np.testing.assert_array_equal(again.mask, pilot.mask)
    np.testing.assert_array_equal(again.rewards, pilot.rewards)
    assert again.prompts == pilot.prompts
    assert again.generations == pilot.generations


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_round_trip_without_texts_keeps_ragged_groups(tmp_path, suffix, ragged_pool):
    pool = ragged_pool
    again = RewardPool.load(pool.save(tmp_path / f"pool{suffix}"))
    np.testing.assert_array_equal(again.mask, pool.mask)
    np.testing.assert_array_equal(again.rewards, pool.rewards)
    assert again.prompts is None and again.generations is None


def test_save_never_overwrites_unasked(tmp_path, ragged_pool_factory):
    pool = ragged_pool_factory()
    path = pool.save(tmp_path / "pool.jsonl")
    before = path.read_bytes()
    with pytest.raises(PoolError, match="exists"):
        ragged_pool_factory(seed=1).save(path)
    assert path.read_bytes() == before
    ragged_pool_factory(seed=1).save(path, overwrite=True)
    assert path.read_bytes() != before


def test_loading_does_not_modify_the_input(pilot_file):
    digest = hashlib.sha256(pilot_file.read_bytes()).hexdigest()
    RewardPool.load(pilot_file)
    assert hashlib.sha256(pilot_file.read_bytes()).hexdigest() == digest


def test_summary_selection_and_views():
    pool = RewardPool.from_array(np.arange(12.0).reshape(4, 3), value_names=["a", "b", "c"])
    assert pool.num_prompts == 4 and pool.num_samples == 4
    np.testing.assert_allclose(pool.means(), [4.5, 5.5, 6.5])
    picked = pool.select(["c", "a"])
    assert picked.value_names == ("c", "a")
    np.testing.assert_array_equal(picked.flat()[:, 0], [2, 5, 8, 11])
    np.testing.assert_array_equal(pool.prompt_index(), [0, 1, 2, 3])


# ------------------------------------------------------------------ bad input


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nan_reward_names_row_and_value(tmp_path):
    rows = [{"prompt": "a", "generated": "x", "humor": 1.0}, {"prompt": "b", "generated": "y", "humor": float("nan")}]
    path = _write(tmp_path, "p.json", json.dumps(rows))
    with pytest.raises(PoolError, match=r"row 1, value 'humor' is nan"):
        RewardPool.load(path)


def test_infinite_reward_in_array_names_position():
    rewards = np.zeros((2, 1, 2))
    rewards[1, 0, 1] = np.inf
    with pytest.raises(PoolError, match=r"'r1' of prompt row 1, sample 0 is inf"):
        RewardPool.from_array(rewards)


def test_truncated_json_is_reported(tmp_path):
    path = _write(tmp_path, "p.json", '[{"prompt": "a", "humor": 1.0}, {"prompt": "b", "hu')
    with pytest.raises(PoolError, match="truncated"):
        RewardPool.load(path)


def test_truncated_jsonl_names_the_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "humor": 1.0}\n{"prompt": "b", "hu')
    with pytest.raises(PoolError, match="line 2"):
        RewardPool.load(path)


def test_unreadable_parquet(tmp_path):
    path = _write(tmp_path, "p.parquet", "not parquet at all")
    with pytest.raises(PoolError, match="not a readable Parquet"):
        RewardPool.load(path)


def test_empty_pool(tmp_path):
    with pytest.raises(PoolError, match="empty"):
        RewardPool.load(_write(tmp_path, "p.json", "[]"))
    with pytest.raises(PoolError, match="empty"):
        RewardPool(np.zeros((1, 2, 1)), np.zeros((1, 2), bool), ("a",))


def test_missing_and_non_numeric_values(tmp_path):
    rows = [{"prompt": "a", "humor": 1.0, "help": 2.0}, {"prompt": "b", "humor": 1.0}]
    with pytest.raises(PoolError, match=r"row 1 has no value 'help'"):
        RewardPool.load(_write(tmp_path, "p.json", json.dumps(rows)))
    rows = [{"prompt": "a", "humor": 1.0}, {"prompt": "b", "humor": "high"}]
    with pytest.raises(PoolError, match=r"row 1, value 'humor' is 'high'"):
        RewardPool.load(_write(tmp_path, "q.json", json.dumps(rows)))
    with pytest.raises(PoolError, match="no record has a numeric reward field"):
        RewardPool.load(_write(tmp_path, "r.json", json.dumps([{"prompt": "a"}])))


def test_unknown_value_lists_known_ones(pilot):
    with pytest.raises(PoolError, match=r"unknown value 'humour'.*'humor'"):
        pilot.index_of("humour")


def test_mismatched_shapes():
    with pytest.raises(PoolError, match="mask shape"):
        RewardPool(np.zeros((2, 3, 1)), np.ones((2, 2), bool), ("a",))
    with pytest.raises(PoolError, match="value names"):
        RewardPool(np.zeros((2, 3, 2)), np.ones((2, 3), bool), ("a",))
    with pytest.raises(PoolError, match="no samples"):
        RewardPool(np.zeros((2, 1, 1)), np.array([[True], [False]]), ("a",))


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(PoolError, match="unknown pool format"):
        RewardPool.load(_write(tmp_path, "p.csv", "a,b"))
    with pytest.raises(PoolError, match="no such file"):
        RewardPool.load(tmp_path / "absent.json")


# ------------------------------------------------------------------ every row alike


def _write_rows(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_value_missing_from_the_first_row_is_an_error_not_a_dropped_column(tmp_path, suffix):
    rows = [{"prompt": "a", "generated": "x", "humor": 1.0},
            {"prompt": "b", "generated": "y", "humor": 2.0, "help": 0.5}]
    with pytest.raises(PoolError, match=r"p" + suffix + r": row 0 has no value 'help'"):
        RewardPool.load(_write_rows(tmp_path, "p" + suffix, rows))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_string_in_the_first_row_is_an_error_not_a_dropped_column(tmp_path, suffix):
    rows = [{"prompt": "a", "generated": "x", "humor": 1.0, "help": "n/a"},
            {"prompt": "b", "generated": "y", "humor": 2.0, "help": 0.5}]
    with pytest.raises(PoolError, match=r"row 0, value 'help' is 'n/a', expected a number"):
        RewardPool.load(_write_rows(tmp_path, "p" + suffix, rows))
    rows[0]["help"] = None
    with pytest.raises(PoolError, match=r"row 0, value 'help' is None, expected a number"):
        RewardPool.load(_write_rows(tmp_path, "q" + suffix, rows))


def test_value_columns_come_from_every_row_in_first_appearance_order():
    rows = [{"prompt": "a", "humor": 1.0, "note": "x"}, {"prompt": "b", "note": "y", "help": 2.0, "humor": 3.0}]
    rows[0]["help"] = 4.0  # present in both rows, but only after 'humor' in the first
    pool = RewardPool.from_records(rows)
    assert pool.value_names == ("humor", "help")  # 'note' is text in every row: not a value
    np.testing.assert_array_equal(pool.flat(), [[1.0, 4.0], [3.0, 2.0]])


def test_texts_missing_from_some_rows_are_named():
    rows = [{"prompt": "a", "humor": 1.0}, {"prompt": "b", "generated": "y", "humor": 2.0}]
    with pytest.raises(PoolError, match=r"row 0 has no 'generated', which other rows have"):
        RewardPool.from_records(rows)


def test_a_huge_integer_reward_is_a_named_pool_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "a", "humor": 1}, {"prompt": "b", "humor": 1' + "0" * 400 + "}]")
    with pytest.raises(PoolError, match=r"row 1, value 'humor' is an integer of 401 digits, too large"):
        RewardPool.load(path)
    with pytest.raises(PoolError, match="too large for a float64"):
        RewardPool.from_array([[1.0], [10**400]])
    # An integer that fits is read exactly as a float.
    assert RewardPool.from_records([{"humor": 10**300}]).flat()[0, 0] == 1e300


def test_repeated_value_names_are_named():
    rows = [{"prompt": "a", "humor": 1.0, "help": 2.0}]
    with pytest.raises(PoolError, match=r"value_names names \['humor'\] more than once"):
        RewardPool.from_records(rows, value_names=["humor", "help", "humor"])
    with pytest.raises(PoolError, match=r"value names \['a'\] repeat"):
        RewardPool.from_array(np.zeros((2, 3)), value_names=["a", "b", "a"])
    with pytest.raises(InputError, match=r"values names \['b', 'a'\] more than once"):
        unique_names(["b", "a", "b", "a", "c"])
    assert issubclass(PoolError, MapjaxError)


# ------------------------------------------------------------------ as_pool


def test_as_pool_reads_pools_and_arrays(ragged_pool):
    assert as_pool(ragged_pool) is ragged_pool
    rows = np.arange(12.0).reshape(4, 3)
    for data in (rows, rows.tolist()):
        pool = as_pool(data)
        assert pool.value_names == ("r0", "r1", "r2") and pool.num_prompts == 4 and pool.num_samples == 4
        np.testing.assert_array_equal(pool.flat(), rows)
    named = as_pool(rows, ["a", "b", "c"])
    assert named.value_names == ("a", "b", "c")
    grouped = as_pool(rows.reshape(2, 2, 3), ["a", "b", "c"])
    assert grouped.num_prompts == 2 and grouped.num_samples == 4
    np.testing.assert_array_equal(grouped.flat(), rows)


@pytest.mark.parametrize(
    "data, values, error, message",
    [
        (np.zeros((4, 3)), ["a", "b"], PoolError, r"values names 2 columns \['a', 'b'\] but the reward array has 3"),
        (np.zeros((4, 2)), ["a", "a"], InputError, r"values names \['a'\] more than once"),
        ([[1.0, 2.0], [3.0]], None, PoolError, "numeric array"),
        ([["x", "y"]], None, PoolError, "numeric array"),
        (np.zeros((2, 2, 2, 2)), None, PoolError, "2 or 3 dimensions"),
        ([[1.0, np.nan]], None, PoolError, "must be finite"),
    ],
)
def test_as_pool_refuses_bad_arrays(data, values, error, message):
    with pytest.raises(error, match=message):
        as_pool(data, values)
