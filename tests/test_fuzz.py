"""Property-based fuzzing (Hypothesis) of what reads user input: the palette grammar, the pool readers and the
solver's entry points. Whatever the text or array, each gives its documented result or a
:class:`~mapjax.errors.MapjaxError`, never another exception (issue 19, build item 8).

Example counts are modest so that the file stays in the fast tier; the solver properties draw from a few shapes
so that JAX compiles each program once.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import mapjax  # noqa: E402
from mapjax import RewardPool  # noqa: E402
from mapjax.errors import MapjaxError  # noqa: E402
from mapjax.jsonio import loads  # noqa: E402
from mapjax.palette import Level, Palette, palette_targets, parse, parse_level  # noqa: E402
from mapjax.solver import STATUSES  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SOLVER = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of the palette grammar, so that the fuzzer reaches deep into it rather than failing at the first '>='.
GRAMMAR_PIECES = ["a", "b", "humor", ">=", ">", "=", ",", ";", " ", "q", "q0.", "%", "mean", "max(", "mean,", ")",
                  "(", "+", "-", "log(1+", "1", "0", ".", "5", "e", "e-", "9", "nan", "inf", "\u00e9", "\n", "\x00"]
grammar_text = st.lists(st.sampled_from(GRAMMAR_PIECES), max_size=24).map("".join)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(
    max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["prompt", "prompt_id", "generated", "r", "s", "records"]) | st.text(max_size=4), inner,
    max_size=5), max_leaves=20)
record_fields = st.sampled_from(["prompt", "prompt_id", "generated", "r", "s"])
records = st.lists(st.dictionaries(record_fields, json_scalars | st.lists(json_scalars, max_size=2), max_size=5),
                   max_size=6)


# --------------------------------------------------------------------------------------------- palettes
def check_palette(result) -> None:
    """What :func:`parse` documents: a Palette of named levels, each name once."""
    assert isinstance(result, Palette) and result.entries
    names = result.names
    assert len(set(names)) == len(names) and all(isinstance(name, str) and name for name in names)
    for _, level in result.entries:
        assert isinstance(level, Level) and level.kind in {"raw", "quantile", "max_mean_quantile", "mean", "mean_log1p"}
        assert math.isfinite(level.number)
        if level.kind in ("quantile", "max_mean_quantile"):
            assert 0.0 <= level.number <= 1.0


@FUZZ
@given(st.text(max_size=200) | grammar_text)
def test_any_palette_text_parses_or_is_a_mapjax_error(text):
    try:
        result = parse(text)
    except MapjaxError:
        return
    check_palette(result)


@FUZZ
@given(st.text(max_size=60) | grammar_text | st.floats() | st.integers() | st.booleans() | st.none())
def test_any_level_parses_or_is_a_mapjax_error(level):
    try:
        result = parse_level(level, "v")
    except MapjaxError:
        return
    assert isinstance(result, Level) and math.isfinite(result.number)


@FUZZ
@given(st.dictionaries(st.text(max_size=6) | st.integers(), json_values, max_size=4))
def test_any_dict_palette_parses_or_is_a_mapjax_error(spec):
    try:
        result = parse(spec)
    except MapjaxError:
        return
    check_palette(result)


# --------------------------------------------------------------------------------------------- pools
def check_pool(pool) -> None:
    """What a pool documents: finite float64 rewards [prompts, samples, values], a mask with a sample in every
    prompt row, a name per column."""
    assert isinstance(pool, RewardPool)
    assert pool.rewards.dtype == np.float64 and pool.rewards.ndim == 3 and np.all(np.isfinite(pool.rewards))
    assert pool.mask.shape == pool.rewards.shape[:2] and pool.mask.any(axis=1).all()
    assert len(pool.value_names) == pool.rewards.shape[2]


def load_text(text: str | bytes, suffix: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"pool{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return RewardPool.load(path)


def loads_as_a_pool_or_refuses(text: str | bytes, suffix: str) -> None:
    """The property of every pool file: it loads as a documented pool, or it is refused with a MapjaxError."""
    try:
        pool = load_text(text, suffix)
    except MapjaxError:
        return
    check_pool(pool)


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=200), st.sampled_from([".json", ".jsonl"]))
def test_any_text_as_a_pool_file_loads_or_is_a_mapjax_error(text, suffix):
    loads_as_a_pool_or_refuses(text, suffix)


@FUZZ
@given(json_values, st.sampled_from([".json", ".jsonl"]))
def test_any_json_value_as_a_pool_loads_or_is_a_mapjax_error(value, suffix):
    text = json.dumps(value) if suffix == ".json" else "\n".join(json.dumps(item) for item in
                                                                   (value if isinstance(value, list) else [value]))
    loads_as_a_pool_or_refuses(text, suffix)


@FUZZ
@given(records, st.none() | st.lists(st.sampled_from(["r", "s", "prompt", "t"]), max_size=3))
def test_any_records_make_a_pool_or_a_mapjax_error(rows, value_names):
    try:
        pool = RewardPool.from_records(rows, value_names=value_names)
    except MapjaxError:
        return
    check_pool(pool)
    assert pool.num_samples == len(rows)


@settings(max_examples=40, deadline=None, database=None)
@given(records)
def test_any_records_through_parquet_load_or_are_a_mapjax_error(rows):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    try:
        table = pyarrow.Table.from_pylist(rows)
    except (pyarrow.ArrowException, TypeError, ValueError, OverflowError):
        return   # records pyarrow itself cannot store: nothing to read back
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pool.parquet"
        pq.write_table(table, path)
        try:
            pool = RewardPool.load(path)
        except MapjaxError:
            return
    check_pool(pool)


@FUZZ
@given(st.text(max_size=100) | st.binary(max_size=100))
def test_the_json_reader_parses_or_is_a_mapjax_error(text):
    try:
        loads(text, "the text")
    except MapjaxError as error:
        assert str(error).startswith("the text")


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.int64, np.bool_, np.complex128]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=3),
    elements=None,
)
nested = st.recursive(st.floats() | st.integers() | st.complex_numbers() | st.text(max_size=2) | st.none(),
                      lambda inner: st.lists(inner, max_size=3), max_leaves=12)


@FUZZ
@given(arrays | nested)
def test_any_array_makes_a_pool_or_a_mapjax_error(data):
    try:
        pool = mapjax.as_pool(data)
    except MapjaxError:
        return
    check_pool(pool)


# --------------------------------------------------------------------------------------------- the solver
# A few shapes, so that JAX compiles each solver program once for the whole property.
solver_pools = st.sampled_from([(12, 2), (3, 4, 2)]).flatmap(lambda shape: hnp.arrays(
    np.float64, shape, elements=st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([0.0, 1.0, np.nan])))
solver_palettes = (grammar_text.map(lambda text: text.replace("a", "r0").replace("b", "r1"))
                   | st.sampled_from(["r0>=q0.5", "r0>=mean, r1>=q0.9", "r1>=max(mean,q0.7)", "r0>=q1"])
                   | hnp.arrays(np.float64, st.sampled_from([(2,), (1, 2), (2, 2), (3,)]),
                                elements=st.floats(-3, 3) | st.just(np.nan))
                   | st.none() | st.integers() | st.lists(st.floats(-2, 2) | st.text(max_size=3), max_size=3))


@FUZZ_SOLVER
@given(solver_pools, solver_palettes)
def test_solve_gives_a_solution_or_a_mapjax_error(rewards, palette):
    try:
        solution = mapjax.solve(rewards, palette)
    except MapjaxError:
        return
    assert solution.status in STATUSES and solution.lam.shape == (2,)
    if solution.status == "optimal":
        assert np.all(solution.lam >= 0) and np.all(np.isfinite(solution.lam))


@FUZZ_SOLVER
@given(solver_pools, st.lists(st.sampled_from(["r0>=q0.5", "r1>=mean", "r0>=q0.99, r1>=q0.99", "r0>=x"]),
                              max_size=3))
def test_solve_many_gives_solutions_or_a_mapjax_error(rewards, palettes):
    try:
        solutions = mapjax.solve_many(rewards, palettes)
    except MapjaxError:
        return
    assert len(solutions) == len(palettes) and set(solutions.status) <= set(STATUSES)


@FUZZ_SOLVER
@given(st.floats(-1e6, 1e6) | st.none() | st.text(max_size=3) | st.booleans(), st.integers(-2, 3) | st.none()
       | st.floats(), st.sampled_from(["pooled", "per_prompt", "other", None]),
       st.sampled_from(["exact", "reference", 3]), st.sampled_from(["float32", "float64", "half"]))
def test_solver_settings_are_checked_with_mapjax_errors(tol, max_iter, normaliser, method, dtype):
    rewards = np.random.default_rng(0).normal(size=(3, 4, 2))
    try:
        solution = mapjax.solve(rewards, "r0>=q0.6", tol=tol, max_iter=max_iter, normaliser=normaliser,
                                method=method, dtype=dtype)
    except MapjaxError:
        return
    assert solution.status in STATUSES


@FUZZ_SOLVER
@given(hnp.arrays(st.sampled_from([np.float64, np.complex128, np.int64]), hnp.array_shapes(min_dims=0, max_dims=3,
                                                                                          max_side=3)))
def test_palette_level_arrays_resolve_or_are_a_mapjax_error(levels):
    pool = mapjax.as_pool(np.random.default_rng(1).normal(size=(20, 2)))
    try:
        targets = palette_targets(pool, levels)
    except MapjaxError:
        return
    assert targets.ndim == 2 and targets.shape[1] == 2
