"""``mapjax explore`` in a real headless Chromium, on the authors' OPT pilot.

The server is the command itself (``python -m mapjax.cli explore PILOT --port 0``); the browser is Debian's
``chromium`` driven by Selenium through Debian's ``chromium-driver`` (both from apt, named by path, so nothing is
downloaded). Without them, or without Selenium, these tests skip and say what to install.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed: pip install -e '.[test]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytest.importorskip("uvicorn", reason="the explorer's server needs the explore extra: pip install -e '.[test]'")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")
UNREACHABLE = "humor>=q0.99, gpt2-harmless>=q0.99"
SERVER_START_SECONDS = 180
WAIT_SECONDS = 30


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = next((path for name in DRIVERS if (path := shutil.which(name) or (Path(name).is_file() and name))), None)
    return (browser, driver) if browser and driver else None


def start_browser():
    found = find_chromium()
    if found is None:
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def chrome():
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(pilot_file, chrome):
    """The page's URL, served by ``mapjax explore`` in a child process (stopped after the module)."""
    process = subprocess.Popen([sys.executable, "-m", "mapjax.cli", "explore", str(pilot_file), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def drain():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=SERVER_START_SECONDS)
            if line is None:
                pytest.fail("mapjax explore stopped before serving:\n" + "".join(seen))
            seen.append(line)
            if match := re.search(r"serving (http://\S+)", line):
                break
        yield match.group(1)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


# ------------------------------------------------------------------------------------------------ helpers
def open_page(chrome, url, palette=None, **params):
    if palette is not None:
        params["palette"] = palette
    chrome.get(url + ("?" + urllib.parse.urlencode(params) if params else ""))
    settle(chrome)


def settle(chrome):
    """Wait until the page has its answer to the last change (and the certificate of it)."""
    WebDriverWait(chrome, WAIT_SECONDS).until(
        lambda driver: driver.execute_script(
            "return document.body.dataset.ready === '1' && document.body.dataset.pending === '0'"))


def text(chrome, element_id):
    return chrome.find_element(By.ID, element_id).text


def lambdas(chrome):
    return chrome.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.value-row')].map("
        "row => [row.dataset.value, row.querySelector('.lambda').dataset.value]))")


def sliders(chrome):
    return chrome.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.value-row')].map("
        "row => [row.dataset.value, row.querySelector('.slider').value]))")


def row(chrome, name):
    return chrome.find_element(By.CSS_SELECTOR, f'.value-row[data-value="{name}"]')


def palette_in_url(chrome):
    return urllib.parse.parse_qs(urllib.parse.urlparse(chrome.current_url).query).get("palette", [""])[0]


def type_palette(chrome, palette):
    field = chrome.find_element(By.ID, "palette-input")
    field.clear()
    field.send_keys(palette + Keys.ENTER)
    settle(chrome)


def severe_console_messages(chrome):
    """Errors the page logged (a script error, a resource refused by the content security policy), less the
    422 answers to palettes typed wrong on purpose, which Chromium logs as failed loads."""
    return [entry["message"] for entry in chrome.get_log("browser")
            if entry["level"] == "SEVERE" and "status of 422" not in entry["message"]]


# -------------------------------------------------------------------------------------------------- tests
def test_a_slider_move_changes_lambda_then_the_verdict(chrome, server):
    open_page(chrome, server, "humor>=q0.5, gpt2-harmless>=q0.5")
    assert text(chrome, "verdict") == "Reachable"
    before = lambdas(chrome)
    assert float(before["humor"]) > 0 and float(before["diversity"]) == 0
    assert "q0.5" in row(chrome, "humor").find_element(By.CSS_SELECTOR, ".target").text

    slider = row(chrome, "humor").find_element(By.CSS_SELECTOR, ".slider")
    slider.send_keys(Keys.ARROW_RIGHT * 5)       # five slider steps up: a higher humor level, still reachable
    settle(chrome)
    after = lambdas(chrome)
    assert text(chrome, "verdict") == "Reachable" and float(after["humor"]) > float(before["humor"])
    assert palette_in_url(chrome).startswith("humor>=2.")
    assert "q0.5" not in palette_in_url(chrome).split(",")[0]

    slider.send_keys(Keys.END)                   # humor's largest sample: reachable only in the limit
    settle(chrome)
    assert text(chrome, "verdict") == "Unreachable" and "humor" in text(chrome, "blocking")
    assert lambdas(chrome)["humor"] == ""        # no λ for an unreachable palette
    assert "blocking" in row(chrome, "humor").get_attribute("class")
    assert severe_console_messages(chrome) == []


def test_typed_palettes_priority_and_nearest_reachable(chrome, server):
    open_page(chrome, server, "humor>=q0.6")
    shown = text(chrome, "verdict"), lambdas(chrome), palette_in_url(chrome)

    type_palette(chrome, "humor>=q2, diversity>=mean")       # the parser's message, inline; nothing else moves
    error = chrome.find_element(By.ID, "palette-error")
    assert error.is_displayed() and "ambiguous" in error.text and "q0.02" in error.text
    assert (text(chrome, "verdict"), lambdas(chrome), palette_in_url(chrome)) == shown

    type_palette(chrome, UNREACHABLE)
    assert not error.is_displayed()
    assert text(chrome, "verdict") == "Unreachable"
    assert text(chrome, "blocking") == "humor, gpt2-harmless"
    assert text(chrome, "margin").startswith("-0.0147") and text(chrome, "margin").endswith("sd")
    assert "cannot be reached together" in text(chrome, "explanation")
    for name in ("humor", "gpt2-harmless"):
        assert "blocking" in row(chrome, name).get_attribute("class")

    # Put gpt2-harmless first (the arrows do what dragging does), then ask for the nearest reachable palette.
    priority = chrome.find_element(By.ID, "priority")
    assert [item.text.split("\n")[0] for item in priority.find_elements(By.CLASS_NAME, "priority-name")] == [
        "humor", "gpt2-harmless"]
    chrome.find_element(By.CSS_SELECTOR, '#priority li[data-value="gpt2-harmless"] .up').click()
    assert [item.get_attribute("data-value") for item in priority.find_elements(By.TAG_NAME, "li")] == [
        "gpt2-harmless", "humor"]
    chrome.find_element(By.ID, "nearest").click()
    WebDriverWait(chrome, WAIT_SECONDS).until(lambda driver: text(driver, "verdict") == "Reachable")
    settle(chrome)
    assert "Algorithm 3" in text(chrome, "adjust-note") and "moved humor" in text(chrome, "adjust-note")
    assert text(chrome, "blocking") == "none" and text(chrome, "margin").startswith("+")
    adjusted = palette_in_url(chrome)
    assert "gpt2-harmless>=q0.99" in adjusted and "humor>=q0.99" not in adjusted
    assert chrome.find_element(By.ID, "palette-input").get_attribute("value") == adjusted
    assert text(chrome, "command").startswith("mapjax solve ") and "--palette 'humor>=" in text(chrome, "command")

    # The samples the palette favours, most probable first.
    WebDriverWait(chrome, WAIT_SECONDS).until(lambda driver: driver.execute_script(
        "return Number(document.body.dataset.samples || 0) > 0"))
    probabilities = [float(item.text.split("=")[1]) for item in chrome.find_elements(By.CLASS_NAME, "sample-p")]
    assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 0.01
    assert severe_console_messages(chrome) == []


# HTML5 drag and drop as the browser delivers it (WebDriver's own mouse moves do not start a native drag).
DRAG_SCRIPT = """
const [from, to] = arguments;
const source = document.querySelector(`#priority li[data-value="${from}"]`);
const target = document.querySelector(`#priority li[data-value="${to}"]`);
const data = new DataTransfer();
source.dispatchEvent(new DragEvent("dragstart", { bubbles: true, dataTransfer: data }));
target.dispatchEvent(new DragEvent("dragover", { bubbles: true, cancelable: true, dataTransfer: data }));
target.dispatchEvent(new DragEvent("drop", { bubbles: true, cancelable: true, dataTransfer: data }));
source.dispatchEvent(new DragEvent("dragend", { bubbles: true, dataTransfer: data }));
"""


def priority_order(chrome):
    return [item.get_attribute("data-value") for item in chrome.find_elements(By.CSS_SELECTOR, "#priority li")]


def test_a_shared_url_gives_the_same_view(chrome, server):
    open_page(chrome, server, "humor>=2.5, gpt2-helpful>=q0.6, coherence>=mean", priority="coherence,humor,gpt2-helpful")
    row(chrome, "gpt2-harmless").find_element(By.CSS_SELECTOR, '.mode[data-mode="mean"]').click()
    settle(chrome)
    assert priority_order(chrome) == ["coherence", "humor", "gpt2-helpful", "gpt2-harmless"]
    chrome.execute_script(DRAG_SCRIPT, "gpt2-harmless", "humor")      # dragged up onto humor: takes its place
    assert priority_order(chrome) == ["coherence", "gpt2-harmless", "humor", "gpt2-helpful"]
    chrome.execute_script(DRAG_SCRIPT, "coherence", "gpt2-harmless")  # dragged down one place
    assert priority_order(chrome) == ["gpt2-harmless", "coherence", "humor", "gpt2-helpful"]
    view = (text(chrome, "verdict"), text(chrome, "margin"), text(chrome, "kl"), text(chrome, "ess"), lambdas(chrome),
            sliders(chrome), chrome.find_element(By.ID, "palette-input").get_attribute("value"))
    priority = priority_order(chrome)
    shared = chrome.current_url
    assert "priority=gpt2-harmless%2Ccoherence%2Chumor%2Cgpt2-helpful" in shared
    assert "gpt2-harmless>=mean" in palette_in_url(chrome)

    chrome.get("about:blank")
    chrome.get(shared)
    settle(chrome)
    assert (text(chrome, "verdict"), text(chrome, "margin"), text(chrome, "kl"), text(chrome, "ess"), lambdas(chrome),
            sliders(chrome), chrome.find_element(By.ID, "palette-input").get_attribute("value")) == view
    assert priority_order(chrome) == priority
    assert severe_console_messages(chrome) == []
