"""Issue 19's hostile inputs to the parsers, the numerics, the Python API and the explorer, one test (or a few)
per row of its table: each either gives the right answer or a named :class:`MapjaxError` (a 4xx in the
explorer), never a traceback, a 500 or a silently wrong result.

Rows 5-7: JSON and Parquet pools that Python's readers choke on; row 8: the verdict at any unit of the rewards;
row 11: palette strings too long to parse; row 12: pools with repeated prompt texts through every format;
row 13: bad arguments to the public functions; row 14: a client that goes away mid-body.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

import mapjax
from mapjax import RewardPool, as_pool
from mapjax.errors import InputError, MapjaxError, PaletteError, PoolError, SolverError
from mapjax.explore import ExploreSession
from mapjax.jsonio import loads
from mapjax.palette import MAX_LEVEL_CHARS, MAX_PALETTE_CHARS, palette_targets, parse
from mapjax.problem import DualProblem, tilt_weights

HUGE_INTEGER = "1" + "0" * 5000   # past Python's int-string limit (4300 digits)
DEEP_NESTING = "[" * 100_000 + "]" * 100_000


def small_pool(seed: int = 0, rows: int = 40) -> RewardPool:
    rng = np.random.default_rng(seed)
    return RewardPool.from_array(rng.normal(size=(rows, 2)), ["a", "b"])


# ------------------------------------------------------------------------ row 5: integers past the int limit
def test_a_huge_integer_in_a_json_pool_names_the_file_row_and_value(tmp_path):
    path = tmp_path / "huge.json"
    path.write_text(f'[{{"prompt": "p", "r": 1}}, {{"prompt": "q", "r": {HUGE_INTEGER}}}]')
    with pytest.raises(PoolError, match=r"huge\.json: row 1, value 'r' is an integer of 5001 digits"):
        RewardPool.load(path)


def test_a_huge_integer_in_a_jsonl_pool_names_the_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(f'{{"prompt": "p", "r": 1}}\n{{"prompt": "q", "r": {HUGE_INTEGER}}}\n')
    with pytest.raises(PoolError, match=r"huge\.jsonl: row 1, value 'r' is an integer of 5001 digits"):
        RewardPool.load(path)


def test_a_huge_integer_as_a_prompt_id_is_refused_by_row(tmp_path):
    path = tmp_path / "id.jsonl"
    path.write_text(f'{{"prompt_id": {HUGE_INTEGER}, "r": 1}}\n')
    with pytest.raises(PoolError, match=r"row 0, 'prompt_id' is an integer too long to read"):
        RewardPool.load(path)


def test_the_json_reader_refuses_a_huge_integer_naming_where_it_came_from():
    with pytest.raises(InputError, match="the body holds an integer of 5001 digits"):
        loads(HUGE_INTEGER, "the body")


# ------------------------------------------------------------------------ row 6: prompts that are not text
@pytest.mark.parametrize("field, value", [("prompt", ["a"]), ("prompt", {"x": 1}), ("prompt_id", [1, 2]),
                                          ("prompt_id", {"id": 3}), ("generated", ["text"])])
def test_a_prompt_or_id_that_is_a_list_or_object_is_a_pool_error(tmp_path, field, value):
    records = [{"prompt_id": 0, "prompt": "a", "generated": "g", "r": 1.0},
               {"prompt_id": 1, "prompt": "b", "generated": "h", "r": 2.0}]
    records[1][field] = value
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records))
    with pytest.raises(PoolError, match=rf"pool\.json: row 1, '{field}' is a (list|dict)"):
        RewardPool.load(path)
    with pytest.raises(PoolError, match=rf"row 1, '{field}' is a (list|dict)"):
        RewardPool.from_records(records)


def test_the_issue_reproduction_of_list_prompts(tmp_path):
    path = tmp_path / "lists.json"
    path.write_text('[{"prompt":["a"],"r":1},{"prompt":["b"],"r":2}]')
    with pytest.raises(PoolError, match=r"row 0, 'prompt' is a list"):
        RewardPool.load(path)


def test_a_parquet_pool_with_list_prompts_is_a_pool_error(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "lists.parquet"
    pq.write_table(pyarrow.Table.from_pylist([{"prompt": ["a"], "r": 1.0}, {"prompt": ["b"], "r": 2.0}]), path)
    with pytest.raises(PoolError, match=r"lists\.parquet: row 0, 'prompt' is a list"):
        RewardPool.load(path)


def test_a_parquet_pool_with_struct_ids_is_a_pool_error(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "structs.parquet"
    pq.write_table(pyarrow.Table.from_pylist([{"prompt_id": {"k": 1}, "r": 1.0}]), path)
    with pytest.raises(PoolError, match=r"row 0, 'prompt_id' is a dict"):
        RewardPool.load(path)


# ------------------------------------------------------------------------ row 7: deep nesting
def test_deeply_nested_json_is_a_pool_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP_NESTING)
    with pytest.raises(PoolError, match=r"deep\.json nests too deeply"):
        RewardPool.load(path)


def test_a_deeply_nested_jsonl_line_names_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "r": 1}\n' + DEEP_NESTING + "\n")
    with pytest.raises(PoolError, match=r"deep\.jsonl: line 2 nests too deeply"):
        RewardPool.load(path)


def test_a_corrupt_gzip_pool_is_a_pool_error(tmp_path):
    path = tmp_path / "broken.json.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"garbage that is no deflate stream")
    with pytest.raises(PoolError, match=r"broken\.json\.gz: cannot be read"):
        RewardPool.load(path)


# ------------------------------------------------------------------------ row 8: the verdict in any unit
SCALES = (1e-200, 1e-8, 1.0, 1e8, 1e200)
FEASIBLE, INFEASIBLE = "r0>=q0.7, r1>=mean", "r0>=q0.99, r1>=q0.99"


@pytest.fixture(scope="module")
def unit_rewards():
    """300 samples of N(0, 1), as 60 prompts of 5 samples with two values."""
    return np.random.default_rng(7).standard_normal((60, 5, 2))


@pytest.fixture(scope="module")
def unit_answers(unit_rewards):
    return {normaliser: mapjax.solve_many(unit_rewards, [FEASIBLE, INFEASIBLE], normaliser=normaliser, certify=True)
            for normaliser in ("pooled", "per_prompt")}


@pytest.mark.parametrize("normaliser", ["pooled", "per_prompt"])
@pytest.mark.parametrize("scale", SCALES)
def test_the_verdict_and_lambda_do_not_depend_on_the_units(unit_rewards, unit_answers, scale, normaliser):
    reference = unit_answers[normaliser]
    assert list(reference.status) == ["optimal", "infeasible"]
    scaled = mapjax.solve_many(unit_rewards * scale, [FEASIBLE, INFEASIBLE], normaliser=normaliser, certify=True)
    assert list(scaled.status) == list(reference.status)
    np.testing.assert_allclose(scaled.lam[0] * scale, reference.lam[0], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(scaled.realised[0] / scale, reference.realised[0], rtol=1e-9, atol=1e-12)
    for row in range(2):
        assert scaled.certificates[row].feasible == reference.certificates[row].feasible
        assert scaled.certificates[row].margin == pytest.approx(reference.certificates[row].margin, abs=1e-9)


def test_the_issue_reproduction_of_tiny_rewards_is_optimal(unit_rewards):
    solution = mapjax.solve(unit_rewards[..., :1].reshape(300, 1) * 1e-200, "r0>=q0.7")
    assert solution.status == "optimal" and solution.certificate.feasible


@pytest.mark.parametrize("scale", SCALES)
def test_the_pool_spread_survives_any_scale(unit_rewards, scale):
    pool = as_pool(unit_rewards * scale)
    flat = unit_rewards.reshape(-1, 2)
    np.testing.assert_allclose(pool.spread() / scale, flat.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pool.means() / scale, flat.mean(axis=0), rtol=1e-10)


def test_ordinary_rewards_keep_numpys_own_bits(unit_rewards):
    pool = as_pool(unit_rewards * 3.7 + 11.0)
    flat = pool.flat()
    assert np.array_equal(pool.spread(), flat.std(axis=0)) and np.array_equal(pool.means(), flat.mean(axis=0))
    problem = DualProblem.from_pool(pool)
    assert np.array_equal(problem.scaled[0], (flat - flat.mean(axis=0)) / flat.std(axis=0))


def test_a_spread_beyond_what_lambda_can_express_is_named(unit_rewards):
    with pytest.raises(SolverError, match=r"'r0' has a standard deviation of [\d.]+e-306 .* rescale the rewards"):
        mapjax.solve(unit_rewards * 1e-305, "r0>=q0.7")


def test_rewards_near_the_largest_float_are_standardised_without_overflow(unit_rewards, unit_answers):
    """Deviations of 1e300 square past float64's largest number; the spread and the verdict survive."""
    rewards = 1e305 + 1e300 * unit_rewards
    flat = unit_rewards.reshape(-1, 2)
    problem = DualProblem.from_pool(as_pool(rewards))
    np.testing.assert_allclose(problem.scaled[0], (flat - flat.mean(0)) / flat.std(0), atol=1e-8)
    solved = mapjax.solve_many(rewards, [FEASIBLE, INFEASIBLE])
    assert list(solved.status) == ["optimal", "infeasible"]
    np.testing.assert_allclose(solved.lam[0] * 1e300, unit_answers["pooled"].lam[0], rtol=1e-5)


# ------------------------------------------------------------------------ row 11: palettes too long to parse
def test_a_megabyte_palette_is_refused_by_its_length():
    with pytest.raises(PaletteError, match=rf"1000000 characters long, more than {MAX_PALETTE_CHARS}"):
        parse("humor>=" + "1" * (1_000_000 - 8) + "x")


def test_the_issue_reproduction_of_a_long_garbage_level_is_refused_by_its_length():
    with pytest.raises(PaletteError, match=rf"level of 'humor' is 64001 characters long, more than {MAX_LEVEL_CHARS}"):
        parse("humor>=" + "1" * 64000 + "x")
    with pytest.raises(PaletteError, match="characters long"):
        parse({"humor": "q" + "1" * 64000})


def test_garbage_levels_under_the_cap_are_named():
    with pytest.raises(PaletteError, match="cannot read level"):
        parse("humor>=" + "1" * (MAX_LEVEL_CHARS - 1) + "x")


def test_a_palette_of_many_entries_is_read_whole():
    spec = ",".join(f"v{i}>=q0.5" for i in range(5000))
    assert len(spec) < MAX_PALETTE_CHARS and len(parse(spec).entries) == 5000
    with pytest.raises(PaletteError, match=r"names \['v1'\] more than once"):
        parse(spec + ",v1>=mean")


def test_number_patterns_have_no_ambiguous_runs_of_digits():
    """``\\d+\\.?\\d*`` lets two quantifiers share a run of digits: quadratic backtracking on a long
    non-matching run. The number pattern must split a run of digits one way only."""
    from mapjax import palette

    assert r"\d+\.?\d*" not in palette._NUMBER
    assert palette._RAW.match("12.5e-3") and palette._RAW.match(".5") and palette._RAW.match("7.")
    assert not palette._RAW.match("1" * 1000 + "x")


# ------------------------------------------------------------------------ row 12: every format, same pool
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_repeated_prompt_texts_round_trip_through_every_format(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    rewards = np.arange(24, dtype=float).reshape(4, 3, 2)
    prompts = ("same", "other", "same", "same")
    generations = tuple(tuple(f"g{row}{slot}" for slot in range(3)) for row in range(4))
    pool = RewardPool(rewards, np.ones((4, 3), bool), ("a", "b"), prompts, generations)
    again = RewardPool.load(pool.save(tmp_path / f"pool{suffix}"))
    assert again.rewards.shape == (4, 3, 2) and again.prompts == prompts and again.generations == generations
    np.testing.assert_array_equal(again.rewards, pool.rewards)
    np.testing.assert_array_equal(again.mask, pool.mask)


def test_saved_records_carry_the_prompt_row():
    pool = RewardPool(np.zeros((2, 1, 1)) + [[[1.0]], [[2.0]]], np.ones((2, 1), bool), ("a",), ("x", "x"))
    assert [record["prompt_id"] for record in pool.records()] == [0, 1]


# ------------------------------------------------------------------------ row 13: the Python API's promise
@pytest.mark.parametrize("palette, words", [
    (None, "got a NoneType"),
    (5, "got a int"),
    ([[1.0], [1.0, 2.0]], "palette levels must be a numeric array"),
    (["a>=1", [1.0, 1.0]], "either specs"),
    ([], "no palettes given"),
    (np.array([0.1 + 1j, 0.2]), "complex"),
    (b"a>=1", "got a bytes"),
])
def test_solve_refuses_what_is_no_palette_with_a_palette_error(palette, words):
    for entry in (mapjax.solve, mapjax.solve_many):
        with pytest.raises(PaletteError, match=words):
            entry(small_pool(), palette)


@pytest.mark.parametrize("call, error, words", [
    (lambda: RewardPool(np.array([[["x"]]]), np.ones((1, 1), bool), ("a",)), PoolError, "rewards must be a numeric"),
    (lambda: RewardPool(np.ones((1, 1, 1)), "yes", ("a",)), PoolError, "mask must be a numeric"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.full((1, 1), 2.0), ("a",)), PoolError, "mask must hold"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.ones((1, 1), bool), 5), PoolError, "value_names must be a list"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.ones((1, 1), bool), (7,)), PoolError, "holds a int"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.ones((1, 1), bool), ("a",), prompts=5), PoolError,
     "prompts must be a list"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.ones((1, 1), bool), ("a",), prompts=[["p"]]), PoolError,
     r"prompts\[0\] is a list"),
    (lambda: RewardPool(np.ones((1, 1, 1)), np.ones((1, 1), bool), ("a",), generations=[[3]]), PoolError,
     r"generations\[0\]\[0\] is a int"),
    (lambda: RewardPool.load(None), PoolError, "path must be a file path"),
    (lambda: RewardPool.load(3), PoolError, "path must be a file path"),
    (lambda: RewardPool.from_records(None), PoolError, "records must be a list"),
    (lambda: RewardPool.from_records({"prompt": "a", "r": 1}), PoolError, "records must be a list"),
    (lambda: RewardPool.from_records([{"prompt": "a", "r": 1}], value_names=3), PoolError, "must be a list"),
    (lambda: RewardPool.from_records([{"prompt": "a", "r": 2j}]), PoolError, "no record has a numeric"),
    (lambda: RewardPool.from_records([{"prompt": "a", "r": 1, "s": 2j}], ["r", "s"]), PoolError,
     r"value 's' is 2j, expected a number"),
    (lambda: as_pool(np.array([[1 + 2j, 3.0]])), PoolError, "complex"),
    (lambda: as_pool([[1.0, 2j]]), PoolError, "complex"),
    (lambda: as_pool(np.array([[1.0, 2.0]], dtype=object) * 1j), PoolError, "complex"),
    (lambda: as_pool(None), PoolError, "rewards must have 2 or 3 dimensions"),
    (lambda: as_pool(np.ones((3, 2)), values=5), InputError, "must be a list of value names"),
    (lambda: mapjax.solve(np.ones((3, 2)) * [[1], [2], [3]], "r0>=1", values=[1, 2]), InputError, "holds a int"),
    (lambda: mapjax.solve(small_pool(), "a>=mean", certify="no"), SolverError, "certify must be True or False"),
    (lambda: mapjax.solve_many(small_pool(), "a>=mean", sensitivity=1), SolverError, "sensitivity must be True"),
    (lambda: mapjax.evaluate_lambdas(small_pool(), np.array([[1j, 0.0]])), SolverError, "lambdas holds complex"),
    (lambda: tilt_weights(small_pool(), np.array([1j, 0.0])), InputError, "λ holds complex"),
    (lambda: palette_targets(small_pool(), np.array([[0.1j, 0.0]])), PaletteError, "complex"),
    (lambda: parse({3: "q0.5"}), PaletteError, "value names are texts"),
    (lambda: parse({"a": [0.5]}), PaletteError, "level of 'a' is a list"),
    (lambda: parse({"a": 10**400}), PaletteError, "too large for a float64"),
])
def test_bad_arguments_to_public_functions_are_named_mapjax_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_complex_rewards_are_never_truncated_to_their_real_part():
    rewards = np.random.default_rng(1).normal(size=(20, 2)) + 0j
    with pytest.raises(PoolError, match="complex"):
        mapjax.solve(rewards, "r0>=mean")


def test_api_errors_derive_from_mapjax_error():
    for error in (PoolError, PaletteError, SolverError, InputError):
        assert issubclass(error, MapjaxError)


# ------------------------------------------------------------------------ rows 5, 7 and 14: the explorer
@pytest.fixture(scope="module")
def running_explorer():
    """The explorer on a real uvicorn server in a thread (raw sockets need a real server), its log captured."""
    pytest.importorskip("starlette")
    uvicorn = pytest.importorskip("uvicorn")
    from mapjax.explore.server import bind, create_app

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("mapjax.explore", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    listener = bind("127.0.0.1", 0)
    port = listener.getsockname()[1]
    session = ExploreSession(small_pool(), warm=False)
    server = uvicorn.Server(uvicorn.Config(create_app(session), log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield port, records
    server.should_exit = True
    thread.join(timeout=30)
    for logger in loggers:
        logger.removeHandler(handler)


def raw_request(port: int, body: bytes, declared: int | None = None, read: bool = True) -> bytes:
    head = (f"POST /api/solve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode() + body)
        if not read:
            return b""
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_client_that_leaves_mid_body_is_not_an_error(running_explorer):
    port, records = running_explorer
    before = len(records)
    raw_request(port, b'{"palette"', declared=1000, read=False)
    time.sleep(1.0)   # let the server notice the closed connection
    # The server still answers, and nothing about the departed client reached the log.
    assert status_of(raw_request(port, b'{"palette": "a>=mean"}')) == 200
    logged = records[before:]
    assert not [record for record in logged if record.levelno >= logging.WARNING or record.exc_info], [
        record.getMessage() for record in logged]


@pytest.mark.parametrize("body, words", [
    (b'{"palette": "a>=1", "x": ' + HUGE_INTEGER.encode() + b"}", b"integer of 5001 digits"),
    (b'{"palette": ' + HUGE_INTEGER.encode() + b"}", b"integer of 5001 digits"),
    (b'{"palette": ' + b"[" * 30000 + b"]" * 30000 + b"}", b"nests too deeply"),
])
def test_request_bodies_python_cannot_read_are_a_400(running_explorer, body, words):
    port, records = running_explorer
    answer = raw_request(port, body)
    assert status_of(answer) == 400 and words in answer and b"Traceback" not in answer


@pytest.mark.parametrize("name, text, expected", [
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "nests too deeply"),
    ("huge.json", '[{"prompt": "a", "n": 1' + "0" * 5000 + "}]", "integer of 5001 digits"),
])
def test_prompt_files_with_hostile_json_are_named_errors(tmp_path, name, text, expected):
    """Rows 5 and 7 through the prompt reader (``mapjax pool --prompts``), not only the pool reader."""
    from mapjax.errors import PromptSourceError
    from mapjax.prompts import jsonl_prompts

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptSourceError, match=expected):
        jsonl_prompts(path)
