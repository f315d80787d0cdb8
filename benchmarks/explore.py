"""``mapjax explore`` latency per slider move: on the OPT pilot (2,312 samples) and a synthetic pool of 200,000.

No PyTorch side: the authors have no explorer, so this times mapjax alone (absolute latencies, no ratio).

A slider move is answered in two steps (see ``mapjax/explore/session.py``): the fast answer (verdict, λ,
realised levels, KL, ESS, aligned histograms) and then the LP certificate (the margin in sd). For a sweep of
one value's level across its upper range (every move a new palette, so nothing comes from the cache) this
times, per move:

- ``session``: the session's own work (solve + histograms; then the LP), no HTTP;
- ``http``: a POST to a real uvicorn server on localhost and the JSON answer parsed (the server's solve, its
  JSON rendering and the HTTP stack), for the fast answer and for the certificate;
- ``browser``: in headless Chromium (Debian's chromium + chromium-driver, when present), from the slider's
  input event to the next painted frame with the answer on the page ("verdict shown"), and to the page idle
  with the margin shown ("margin shown").

    python benchmarks/explore.py                          # the table in RESULTS.md
    python benchmarks/explore.py --moves 10 --no-browser  # quicker
    python benchmarks/explore.py --screenshot docs/explore.png --no-benchmark   # the README's screenshot
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import jax

from benchmarks.machine import cpu_name
from mapjax import RewardPool
from mapjax.explore import ExploreSession
from mapjax.explore.server import LOOPBACK_HOSTS, bind, create_app

PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
PILOT_REST = "gpt2-helpful>=q0.6, gpt2-harmless>=q0.6, diversity>=mean, coherence>=mean, perplexity>=mean"
SYNTHETIC_REST = "v1>=q0.6, v2>=q0.6, v3>=mean, v4>=mean, v5>=mean"
SCREENSHOT_PALETTE = ("humor>=q0.7, gpt2-helpful>=q0.7, gpt2-harmless>=q0.7, diversity>=mean, coherence>=mean, "
                      "perplexity>=mean")
SCREENSHOT_PROMPT = 1827   # "I am thinking about starting intermittent fasting. What do I need to know?"


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {', '.join(map(str, jax.devices()))}"


def synthetic_pool(samples: int, samples_per_prompt: int = 16, values: int = 6, seed: int = 0) -> RewardPool:
    """Correlated rewards with per-prompt offsets, ``samples`` in all."""
    rng = np.random.default_rng(seed)
    prompts = samples // samples_per_prompt
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    rewards = rng.normal(size=(prompts, samples_per_prompt, values)) @ mixing
    rewards += rng.normal(scale=0.5, size=(prompts, 1, values))
    return RewardPool(rewards, np.ones((prompts, samples_per_prompt), bool), tuple(f"v{i}" for i in range(values)))


def sweep(pool: RewardPool, value: str, rest: str, moves: int) -> list[str]:
    """Palettes moving ``value`` from its 0.55- to its 0.95-quantile in ``moves`` steps, the others fixed."""
    low, high = np.quantile(pool.flat()[:, pool.index_of(value)], [0.55, 0.95])
    return [f"{value}>={level:.6f}, {rest}" for level in np.linspace(low, high, moves)]


def summary(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "max_ms": ordered[-1], "moves": len(ordered)}


# ---------------------------------------------------------------------------------------------- measures
def time_session(session: ExploreSession, palettes: list[str]) -> dict:
    fast, certificate = [], []
    for palette in palettes:
        fast.append(_session_move(session, {"palette": palette}))
        certificate.append(_session_move(session, {"palette": palette, "certificate": True, "histograms": False}))
    return {"session: fast answer": summary(fast), "session: + certificate": summary(certificate)}


def _session_move(session: ExploreSession, request: dict) -> float:
    start = time.perf_counter()
    session.solve(request)
    return (time.perf_counter() - start) * 1e3


def time_session_and_http(session: ExploreSession, url: str, direct: list[str], over_http: list[str]) -> dict:
    """The session alone and through HTTP, move by move in turn, so that the machine's other load (it is
    shared) falls on both alike."""
    import httpx

    times: dict[str, list[float]] = {name: [] for name in (
        "session: fast answer", "session: + certificate", "http: fast answer", "http: + certificate")}
    sizes = []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.get("/api/pool").raise_for_status()
        for palette, sent in zip(direct, over_http):
            times["session: fast answer"].append(_session_move(session, {"palette": palette}))
            times["session: + certificate"].append(
                _session_move(session, {"palette": palette, "certificate": True, "histograms": False}))
            start = time.perf_counter()
            response = client.post("/api/solve", json={"palette": sent})
            response.json()
            times["http: fast answer"].append((time.perf_counter() - start) * 1e3)
            sizes.append(len(response.content))
            start = time.perf_counter()
            client.post("/api/solve", json={"palette": sent, "certificate": True, "histograms": False}).json()
            times["http: + certificate"].append((time.perf_counter() - start) * 1e3)
    rows = {name: summary(values) for name, values in times.items()}
    rows["http: fast answer"]["bytes"] = int(np.median(sizes))
    return rows


class RunningServer:
    """uvicorn serving a session on a free localhost port, in a thread."""

    def __init__(self, session: ExploreSession):
        import uvicorn

        listener = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        app = create_app(session, allowed_hosts=list(LOOPBACK_HOSTS))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chromium():
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,1100", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


# Moves the value's slider one step (as the keyboard does), and reports when the answer is painted and when the
# page is idle again with the margin shown.
MOVE_SCRIPT = """
const [name, position, done] = arguments;
const slider = document.querySelector(`.value-row[data-value="${name}"] .slider`);
let shown = null;
const start = performance.now();
document.addEventListener("mapjax:answer", () => requestAnimationFrame(() => { shown = performance.now() - start; }),
                          { once: true });
document.addEventListener("mapjax:idle", () => requestAnimationFrame(() => done([shown, performance.now() - start])),
                          { once: true });
slider.value = String(position);
slider.dispatchEvent(new Event("input", { bubbles: true }));
"""


def time_browser(driver, url: str, value: str, start_palette: str, moves: int) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "?" + urllib.parse.urlencode({"palette": start_palette}))
    idle = "return document.body.dataset.ready === '1' && document.body.dataset.pending === '0'"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(idle))
    driver.set_script_timeout(60)
    steps = driver.execute_script("return window.mapjaxExplore.state.pool.slider_steps")
    first = int(driver.execute_script(
        f"return document.querySelector('.value-row[data-value=\"{value}\"] .slider').value"))
    shown, margin = [], []
    for position in np.linspace(first + 1, min(steps, first + steps // 4), moves).astype(int):
        painted, settled = driver.execute_async_script(MOVE_SCRIPT, value, int(position))
        shown.append(painted)
        margin.append(settled)
    return {"browser: verdict shown": summary(shown), "browser: margin shown": summary(margin)}


def screenshot(driver, url: str, path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(1440, 1100)
    driver.get(url + "?" + urllib.parse.urlencode({"palette": SCREENSHOT_PALETTE, "prompt": SCREENSHOT_PROMPT}))
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.body.dataset.pending === '0' && Number(document.body.dataset.samples || 0) > 0"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    chrome_height = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1440, height + chrome_height)
    time.sleep(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path} (1440 x {height})")


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=30, help="slider moves per measure")
    parser.add_argument("--samples", type=int, default=200_000, help="samples of the synthetic pool")
    parser.add_argument("--per-prompt", action="store_true", help="also time the per-prompt normaliser (session)")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-benchmark", action="store_true", help="only the screenshot")
    parser.add_argument("--screenshot", type=Path, help="save a full-page screenshot of the pilot here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    driver = None if args.no_browser and not args.screenshot else chromium()
    if driver is None and not args.no_browser:
        print("browser: no chromium + chromedriver found; browser round trips skipped")
    pilot = RewardPool.load(PILOT)
    cases = [("pilot", pilot, "humor", PILOT_REST)]
    if not args.no_benchmark:
        cases.append((f"synthetic {args.samples:,}", synthetic_pool(args.samples), "v0", SYNTHETIC_REST))
    results: dict = {"machine": machine(), "moves": args.moves, "pools": {}}
    try:
        for label, pool, value, rest in cases:
            start = time.perf_counter()
            session = ExploreSession(pool, source=str(PILOT.relative_to(REPO_ROOT)) if label == "pilot" else label)
            print(f"\n{label}: {pool.num_prompts:,} prompts x {pool.mask.shape[1]} slots, {pool.num_samples:,} "
                  f"samples, {pool.num_values} values; session ready in {time.perf_counter() - start:.1f} s "
                  f"(warm-up {session.warm_seconds:.1f} s)")
            server = RunningServer(session)
            try:
                if args.screenshot and label == "pilot" and driver is not None:
                    screenshot(driver, server.url, args.screenshot)
                if args.no_benchmark:
                    continue
                rows = {}
                # Each measure gets its own sweep (shifted a little), so that no answer comes from the cache.
                rows.update(time_session_and_http(session, server.url, sweep(pool, value, rest, args.moves),
                                                  sweep(pool, value, rest.replace("q0.6", "q0.61"), args.moves)))
                if driver is not None and not args.no_browser:
                    rows.update(time_browser(driver, server.url, value, rest.replace("q0.6", "q0.62"), args.moves))
                if args.per_prompt:
                    per_prompt = ExploreSession(pool, normaliser="per_prompt", source=label)
                    timed = time_session(per_prompt, sweep(pool, value, rest, max(3, args.moves // 6)))
                    rows.update({f"per-prompt {key}": row for key, row in timed.items()})
                results["pools"][label] = {"samples": pool.num_samples, "rows": rows}
                print(f"{'measure':<32} {'median ms':>10} {'p90 ms':>9} {'max ms':>9} {'moves':>6}")
                for name, row in rows.items():
                    print(f"{name:<32} {row['median_ms']:10.1f} {row['p90_ms']:9.1f} {row['max_ms']:9.1f} "
                          f"{row['moves']:6d}")
            finally:
                server.stop()
    finally:
        if driver is not None:
            driver.quit()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (a 2-core machine shared with other work is noisy)")
    results["load_average"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
