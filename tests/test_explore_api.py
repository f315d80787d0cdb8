"""``mapjax explore``'s server through Starlette's test client, on the authors' OPT pilot: every answer matches the
library's own (solve, certificate, adjust, MAP-D weights), bad requests get a 4xx JSON error and never a
traceback, and concurrent requests are answered in arrival order without mixing. Also the ``mapjax explore``
command's refusals (a pool that does not load, a missing extra, a port in use)."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading

import numpy as np
import pytest

import mapjax
from mapjax import adjust
from mapjax.certificate import certify
from mapjax.cli import main
from mapjax.explore import ExploreSession, RequestError
from mapjax.explore.session import FifoLock
from mapjax.problem import DualProblem, tilt_weights

pytest.importorskip("starlette", reason="the explorer's server needs the explore extra: pip install -e '.[test]'")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx: pip install -e '.[test]'")
from starlette.testclient import TestClient  # noqa: E402

from mapjax.explore.server import LOOPBACK_HOSTS, MAX_BODY_BYTES, STATIC_DIR, create_app  # noqa: E402

HHH70 = "humor>=q0.7, gpt2-helpful>=q0.7, gpt2-harmless>=q0.7, diversity>=mean, coherence>=mean, perplexity>=mean"
UNREACHABLE = "humor>=q0.99, gpt2-harmless>=q0.99"


@pytest.fixture(scope="module")
def session(pilot, pilot_file):
    return ExploreSession(pilot, source=str(pilot_file))


@pytest.fixture(scope="module")
def client(session):
    with TestClient(create_app(session)) as test_client:
        yield test_client


def solve(client, palette, **options):
    response = client.post("/api/solve", json={"palette": palette, **options})
    assert response.status_code == 200, response.text
    return response.json()


def by_name(answer, key):
    return {value["name"]: value[key] for value in answer["values"]}


# ---------------------------------------------------------------------------------------------- the page
def test_pool_description_has_ticks_means_and_histograms(client, pilot):
    response = client.get("/api/pool")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    pool = response.json()
    assert [value["name"] for value in pool["values"]] == list(pilot.value_names)
    assert pool["prompts"] == pilot.num_prompts and pool["samples"] == pilot.num_samples and pool["has_texts"]
    for value, mean in zip(pool["values"], pilot.means()):
        levels = [tick["level"] for tick in value["quantiles"]]
        assert value["min"] <= levels[0] and levels == sorted(levels) and levels[-1] <= value["max"]
        assert value["mean"] == pytest.approx(mean) and value["base"] == pytest.approx(mean)
        assert sum(value["histogram"]["base"]) == pytest.approx(1.0)
        assert len(value["histogram"]["edges"]) == len(value["histogram"]["base"]) + 1
    assert pool["samples_per_prompt"] == {"min": 1, "max": 3}
    assert pilot.mask[pool["default_prompt"]].sum() == 3


def test_page_and_its_assets_are_served_from_here(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert references and all(reference.startswith("/static/") for reference in references)
    for reference in references:
        assert client.get(reference).status_code == 200, reference
    for asset in STATIC_DIR.iterdir():
        text = asset.read_text(encoding="utf-8")
        # The only absolute URL is the SVG namespace, a name that is never fetched.
        assert set(re.findall(r"https?://[^\s\"')]+", text)) <= {"http://www.w3.org/2000/svg"}, asset.name
        assert "@import" not in text and "@font-face" not in text, asset.name


# ------------------------------------------------------------------------------------------------ answers
def test_solve_matches_the_library(client, pilot):
    fast = solve(client, HHH70)
    expected = mapjax.solve(pilot, HHH70)
    assert fast["status"] == "optimal" and fast["verdict"] == "reachable" and fast["feasible"]
    np.testing.assert_allclose([by_name(fast, "lambda")[name] for name in pilot.value_names], expected.lam, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose([by_name(fast, "realised")[name] for name in pilot.value_names], expected.realised,
                               rtol=1e-9)
    assert fast["kl"] == pytest.approx(expected.kl, rel=1e-9) and fast["ess"] == pytest.approx(expected.ess, rel=1e-9)
    assert fast["ess_warning"] is None
    assert by_name(fast, "level")["humor"] == "q0.7" and by_name(fast, "level")["diversity"] == "mean"
    assert fast["palette"] == HHH70
    assert fast["commands"]["cli"].startswith("mapjax solve ") and "--palette 'humor>=q0.7," in fast["commands"]["cli"]
    assert f"mapjax.solve(pool, {HHH70!r})" in fast["commands"]["python"]

    full = solve(client, HHH70, certificate=True)
    assert full["certificate"]["source"] == "lp" and full["certificate"]["feasible"]
    assert full["certificate"]["margin_sd"] == pytest.approx(expected.certificate.margin, rel=1e-9)
    assert by_name(full, "lambda") == by_name(fast, "lambda")


def test_aligned_histograms_reweight_the_samples_by_p_lambda(client, pilot):
    answer = solve(client, HHH70)
    description = client.get("/api/pool").json()
    lam = np.array([by_name(answer, "lambda")[name] for name in pilot.value_names])
    weights = tilt_weights(pilot, lam, "pooled")
    for column, value in enumerate(description["values"]):
        edges = np.array(value["histogram"]["edges"])
        edges[-1] += 1e-9   # the top edge is the largest sample, which np.histogram puts in the last bin anyway
        expected, _ = np.histogram(pilot.flat()[:, column], bins=edges, weights=weights)
        np.testing.assert_allclose(answer["histograms"][column], expected, atol=1e-12)
        assert sum(answer["histograms"][column]) == pytest.approx(1.0)
    assert answer["histograms"][1] != description["values"][1]["histogram"]["base"]


def test_unreachable_palette_names_the_values_that_block(client, pilot):
    fast = solve(client, UNREACHABLE)
    assert fast["verdict"] == "unreachable" and not fast["feasible"]
    assert set(fast["certificate"]["blocking_values"]) == {"humor", "gpt2-harmless"}
    assert all(value is None for value in by_name(fast, "lambda").values()) and fast["histograms"] is None
    full = solve(client, UNREACHABLE, certificate=True)
    lp = certify(DualProblem.from_pool(pilot), mapjax.palette_targets(pilot, UNREACHABLE)[0])
    assert lp.margin < 0 and full["certificate"]["margin_sd"] == pytest.approx(lp.margin, rel=1e-9)
    assert full["certificate"]["blocking_values"] == ["humor", "gpt2-harmless"]
    assert "cannot be reached together" in full["certificate"]["explanation"]
    assert {name for name, blocks in by_name(full, "blocking").items() if blocks} == {"humor", "gpt2-harmless"}


def test_small_ess_is_warned_about(client, paper_hhh, paper_values):
    levels = paper_hhh["HHH-80"]["levels"]
    palette = ", ".join(f"{name}>={level}" for name, level in zip(paper_values, levels))
    answer = solve(client, palette)
    assert answer["verdict"] == "reachable" and answer["ess"] < 100
    assert "effective samples" in answer["ess_warning"]


def test_an_empty_palette_is_the_base_model(client, pilot):
    answer = solve(client, " , ")
    assert answer["verdict"] == "base model" and answer["kl"] == 0.0 and answer["ess"] == pytest.approx(pilot.num_samples)
    np.testing.assert_allclose([by_name(answer, "realised")[name] for name in pilot.value_names], pilot.means())
    assert all(value == 0.0 for value in by_name(answer, "lambda").values())


def test_nearest_reachable_by_priority_and_by_interpolation(client, pilot):
    greedy = client.post("/api/adjust", json={"palette": UNREACHABLE, "method": "greedy",
                                              "priority": ["gpt2-harmless", "humor"]}).json()
    expected = adjust.greedy(pilot, UNREACHABLE, ["gpt2-harmless", "humor"])
    assert greedy["verdict"] == "reachable" and greedy["certificate"]["feasible"]
    assert greedy["adjustment"]["moved"] == ["humor"] and greedy["adjustment"]["changed"]
    assert by_name(greedy, "level")["gpt2-harmless"] == "q0.99"   # a level that did not move keeps its text
    np.testing.assert_allclose([by_name(greedy, "target")[name] for name in ("humor", "gpt2-harmless")],
                               expected.palette[[pilot.index_of("humor"), pilot.index_of("gpt2-harmless")]], rtol=1e-11)
    # The adjusted palette, sent back as the page does, is reachable as it reads.
    assert solve(client, greedy["palette"], certificate=True)["certificate"]["feasible"]

    interpolated = client.post("/api/adjust", json={"palette": UNREACHABLE, "method": "interpolate"}).json()
    assert interpolated["verdict"] == "reachable"
    assert interpolated["adjustment"]["rho"] == pytest.approx(adjust.interpolate(pilot, UNREACHABLE).rho, rel=1e-12)
    assert set(interpolated["adjustment"]["moved"]) == {"humor", "gpt2-harmless"}


def test_samples_are_ranked_by_their_map_d_probability(client, pilot, session):
    prompt = session.default_prompt()
    answer = client.post("/api/samples", json={"palette": HHH70, "prompt": prompt}).json()
    lam = np.array([answer["lambda"][name] for name in pilot.value_names])
    weights = tilt_weights(pilot, lam, "per_prompt")[prompt][pilot.mask[prompt]]
    probabilities = [sample["probability"] for sample in answer["samples"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1.0)
    for sample in answer["samples"]:
        assert sample["probability"] == pytest.approx(weights[sample["sample"]], rel=1e-9)
        assert sample["text"] == pilot.generations[prompt][sample["sample"]]
        assert sample["base_probability"] == pytest.approx(1 / 3)
    assert answer["prompt_text"] == pilot.prompts[prompt] and answer["note"] is None

    unreachable = client.post("/api/samples", json={"palette": UNREACHABLE, "prompt": prompt}).json()
    assert "base model" in unreachable["note"]
    assert [sample["probability"] for sample in unreachable["samples"]] == pytest.approx([1 / 3] * 3)


def test_prompts_are_found_by_text(client, pilot):
    answer = client.post("/api/prompts", json={"query": "POISON", "limit": 5}).json()
    assert answer["prompts"] and len(answer["prompts"]) <= 5
    assert all("poison" in pilot.prompts[prompt["index"]].lower() for prompt in answer["prompts"])
    assert answer["total"] == sum("poison" in text.lower() for text in pilot.prompts)


def test_histogram_request_takes_its_own_bins(client):
    answer = client.post("/api/histogram", json={"palette": HHH70, "bins": 7}).json()
    for value in answer["values"]:
        assert len(value["edges"]) == 8 and len(value["base"]) == 7 and len(value["aligned"]) == 7
        assert sum(value["aligned"]) == pytest.approx(1.0) and sum(value["base"]) == pytest.approx(1.0)
    assert client.post("/api/histogram", json={"palette": UNREACHABLE}).json()["values"][0]["aligned"] is None


def test_per_prompt_session_on_a_pool_without_texts(ragged_pool):
    session = ExploreSession(ragged_pool, normaliser="per_prompt", source="ragged.jsonl")
    palette = "v0>=q0.6, v1>=mean"
    answer = session.solve({"palette": palette, "certificate": True})
    expected = mapjax.solve(ragged_pool, palette, normaliser="per_prompt")
    assert answer["status"] == expected.status == "optimal"
    np.testing.assert_allclose([by_name(answer, "lambda")[name] for name in ragged_pool.value_names], expected.lam,
                               rtol=1e-9, atol=1e-12)
    assert answer["ess"] == pytest.approx(expected.ess) and answer["ess_scale"]["unit"] == "samples per prompt"
    assert answer["commands"]["cli"].endswith("--per-prompt") and 'normaliser="per_prompt"' in answer["commands"]["python"]
    # The aligned histogram weighs each prompt 1/P and its samples by softmax(λᵀr) within it.
    weights = tilt_weights(ragged_pool, expected.lam, "per_prompt")[ragged_pool.mask] / ragged_pool.num_prompts
    column = ragged_pool.flat()[:, 0]
    edges = np.linspace(column.min(), column.max(), len(answer["histograms"][0]) + 1)
    edges[-1] += 1e-9
    np.testing.assert_allclose(answer["histograms"][0], np.histogram(column, bins=edges, weights=weights)[0],
                               atol=1e-12)
    assert not session.describe()["has_texts"]
    for request in (session.samples, session.prompts):
        with pytest.raises(RequestError, match="no generated texts") as refused:
            request({"palette": palette} if request == session.samples else {})
        assert refused.value.status == 404


# --------------------------------------------------------------------------------------------- bad requests
BAD_REQUESTS = [
    # (path, body, content type, status, words the error must hold)
    ("/api/solve", b"{not json", "application/json", 400, "not valid JSON"),
    ("/api/solve", b"\xff\xfe", "application/json", 400, "not UTF-8"),
    ("/api/solve", b'["humor>=1"]', "application/json", 400, "JSON object"),
    ("/api/solve", b"[" * 60000, "application/json", 400, "nests too deeply"),
    ("/api/solve", b"{}", "application/json", 400, "'palette' is missing"),
    ("/api/solve", b'{"palette": 3}', "application/json", 400, "must be a string"),
    ("/api/solve", b'{"palette": "humor>=1", "colour": 1}', "application/json", 400, "unknown field 'colour'"),
    ("/api/solve", b'{"palette": "humor>=1", "certificate": "yes"}', "application/json", 400, "true or false"),
    ("/api/solve", b'{"palette": "humor>=q2"}', "application/json", 422, "ambiguous"),
    ("/api/solve", b'{"palette": "humour>=1"}', "application/json", 422, "unknown value 'humour'"),
    ("/api/solve", b'{"palette": "humor>=9"}', "application/json", 422, "above its largest reward"),
    ("/api/solve", b'{"palette": "humor=1"}', "application/json", 422, "has no '>='"),
    ("/api/solve", b'{"palette": "humor>=1"}', "text/plain", 415, "application/json"),
    ("/api/solve", b'{"palette": "' + b"x" * 3000 + b'"}', "application/json", 413, "at most 2000"),
    ("/api/solve", b'{"palette": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}', "application/json", 413, "larger than"),
    ("/api/adjust", b'{"palette": "humor>=1", "method": "bisect"}', "application/json", 422, "unknown"),
    ("/api/adjust", b'{"palette": "humor>=1", "method": "interpolate", "priority": ["humor"]}', "application/json",
     422, "'greedy' only"),
    ("/api/adjust", b'{"palette": "humor>=1", "priority": ["diversity"]}', "application/json", 422,
     "does not constrain"),
    ("/api/adjust", b'{"palette": "humor>=1", "priority": "humor"}', "application/json", 400, "list of value names"),
    ("/api/adjust", b'{"palette": ""}', "application/json", 422, "nothing to adjust"),
    ("/api/samples", b'{"palette": "", "prompt": 99999}', "application/json", 422, "from 0 to 2177"),
    ("/api/samples", b'{"palette": "", "prompt": true}', "application/json", 400, "whole number"),
    ("/api/histogram", b'{"palette": "", "bins": 1}', "application/json", 422, "from 2 to 200"),
    ("/api/prompts", b'{"limit": 0}', "application/json", 422, "from 1 to 200"),
]


@pytest.mark.parametrize("path, body, content_type, status, words", BAD_REQUESTS,
                         ids=[f"{case[0]}-{case[3]}-{case[4][:24]}" for case in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error(client, path, body, content_type, status, words):
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert words in error and "Traceback" not in response.text


def test_an_oversized_body_without_a_length_is_refused(client):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = client.post("/api/solve", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/api/nothing").json() == {"error": "Not Found", "status": 404}
    response = client.get("/api/solve")
    assert response.status_code == 405 and response.json()["status"] == 405


def test_a_failure_inside_is_a_500_without_traceback(pilot, monkeypatch):
    session = ExploreSession(pilot, warm=False)

    def broken(targets):
        raise RuntimeError("a bug with a secret /home/path in it")

    monkeypatch.setattr(session, "_solution", broken)
    with TestClient(create_app(session), raise_server_exceptions=False) as broken_client:
        response = broken_client.post("/api/solve", json={"palette": "humor>=mean"})
    assert response.status_code == 500
    assert response.json()["error"] == "internal error (RuntimeError); the server's log has the details"
    assert "Traceback" not in response.text and "/home/path" not in response.text


def test_other_host_names_are_refused_on_loopback(session):
    app = create_app(session, allowed_hosts=list(LOOPBACK_HOSTS))
    with TestClient(app, base_url="http://127.0.0.1:8765") as local:
        assert local.get("/api/pool").status_code == 200
    with TestClient(app, base_url="http://attacker.example") as rebound:
        assert rebound.get("/api/pool").status_code == 400


# ------------------------------------------------------------------------------------------------- order
def test_concurrent_requests_are_answered_in_arrival_order_without_mixing(session, pilot, monkeypatch):
    import httpx

    app = create_app(session)
    dispatcher = app.state.dispatcher
    gate = threading.Event()
    solution = session._solution

    def held(targets):
        gate.wait(30)   # the first request holds the worker until every other one is queued behind it
        return solution(targets)

    monkeypatch.setattr(session, "_solution", held)
    palettes = [f"humor>={level:.3f}, gpt2-harmless>=q0.6" for level in np.linspace(2.2, 2.55, 6)] + [UNREACHABLE]

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as tab:
            sent = []
            for palette in palettes:
                sent.append(asyncio.create_task(tab.post("/api/solve", json={"palette": palette})))
                while dispatcher.received < len(sent):
                    await asyncio.sleep(0.001)
            gate.set()
            return await asyncio.gather(*sent)

    answers = [response.json() for response in asyncio.run(send_all())]
    served = [answer["served"] for answer in answers]
    assert served == sorted(served) and len(set(served)) == len(served)
    for palette, answer in zip(palettes, answers):
        expected = mapjax.solve(pilot, palette, certify=False)
        assert answer["palette"] == str(mapjax.parse_palette(palette)) and answer["status"] == expected.status
        if expected.feasible:
            np.testing.assert_allclose([by_name(answer, "lambda")[name] for name in pilot.value_names], expected.lam,
                                       rtol=1e-9, atol=1e-12)


def test_the_session_lock_is_granted_in_request_order():
    lock, order = FifoLock(), []
    lock.__enter__()

    def take(number):
        with lock:
            order.append(number)

    threads = []
    for number in range(5):
        threads.append(threading.Thread(target=take, args=(number,)))
        threads[-1].start()
        while lock.waiting < number + 2:   # this one is queued before the next one asks
            threading.Event().wait(0.001)
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4]


# -------------------------------------------------------------------------------------------- the command
def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explore_refuses_a_pool_that_does_not_load(capsys, tmp_path):
    code, _, err = run_cli(capsys, "explore", tmp_path / "missing.json")
    assert code == 2 and "mapjax explore: error:" in err and "missing.json: no such file" in err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", "generated": "b", "humor": 1.0}', encoding="utf-8")
    code, _, err = run_cli(capsys, "explore", broken)
    assert code == 2 and "not valid JSON" in err


def test_explore_without_the_extra_names_it(capsys, monkeypatch, pilot_file):
    monkeypatch.setitem(sys.modules, "uvicorn", None)   # importing it now raises ImportError
    code, _, err = run_cli(capsys, "explore", pilot_file)
    assert code == 2 and "pip install 'mapjax[explore]'" in err and "uvicorn" in err


def test_explore_refuses_a_port_in_use(capsys, pilot_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "explore", pilot_file, "--port", port)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    code, _, err = run_cli(capsys, "explore", pilot_file, "--port", "70000")
    assert code == 2 and "0-65535" in err
