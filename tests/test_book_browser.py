"""A real browser reads the built book offline: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by `bash .ci/test`) opens the intro and chapters from a local
http.server and checks that every formula is typeset by MathJax, every image loads, figures are
shown at least as wide as book/figstyle.py assumes, nothing is requested from another host and
the console shows no error. The interactive figures of chapters 6 and 7 redraw when a reader
moves their slider or picks another option.

The book is built once per session by the `built_book` fixture in conftest.py.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# The pages to open, and whether each must have figures. All of them have math.
PAGES = {
    "book/intro.html": False,
    "book/ch01_learning.html": True,
    "book/ch03_sgd_momentum.html": True,
    "book/ch06_smoothing.html": True,
    "book/ch07_graduated.html": True,
    "book/ch08_momentum_noise.html": True,
    "book/appendix_convexity.html": True,
}
#: The pages with interactive figures (book/_static/labkit-interactive.js).
INTERACTIVE = ["book/ch06_smoothing.html", "book/ch07_graduated.html"]
#: book/figstyle.py's PAGE_WIDTH_IN in CSS pixels: the width at which its font-size check
#: assumes a figure is shown (narrower only if the figure itself is narrower).
PAGE_WIDTH_PX = 6.8 * 96

# Wait for MathJax's startup promise (it resolves after the first typesetting pass) and for
# the fonts it asked for, then count what it produced.
MATH_SCRIPT = """
const done = arguments[arguments.length - 1];
if (typeof MathJax === "undefined" || !MathJax.startup) { done({mathjax: false}); return; }
MathJax.startup.promise
  .then(() => document.fonts.ready)
  .then(() => done({
    mathjax: true,
    containers: document.querySelectorAll("mjx-container").length,
    math: document.querySelectorAll(".math").length,
    untypeset: [...document.querySelectorAll(".math")]
      .filter(e => !e.querySelector("mjx-container")).map(e => e.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 80)),
  }), e => done({mathjax: true, failed: String(e)}));
"""

# Bring every image into view (a lazy one would not load otherwise) and wait until each has
# either loaded or failed.
IMAGES_SCRIPT = """
const done = arguments[arguments.length - 1];
const images = [...document.images];
Promise.all(images.map(img => {
  img.scrollIntoView();
  return img.complete ? null : new Promise(r => {
    img.addEventListener("load", r); img.addEventListener("error", r); });
})).then(() => done(images.map(img => [img.getAttribute("src"), img.naturalWidth])));
"""


# The displayed and the natural width (CSS pixels) of every figure of a chapter.
FIGURE_WIDTHS_SCRIPT = """
return [...document.images].filter(img => img.src.includes("_images/"))
  .map(img => [img.getAttribute("src"), img.naturalWidth, img.getBoundingClientRect().width]);
"""

# The state of every interactive figure: its frame, the curves it draws and its legend.
INTERACTIVE_STATE_SCRIPT = """
return [...document.querySelectorAll(".labkit-interactive")].map(fig => ({
  id: fig.id,
  frame: fig.getAttribute("data-frame"),
  paths: [...fig.querySelectorAll(".lk-frame-series path")].map(p => p.getAttribute("d")),
  legend: [...fig.querySelectorAll(".lk-legend-item")].map(e => e.textContent),
  readout: (fig.querySelector(".lk-readout") || {}).textContent,
  sliders: fig.querySelectorAll("input[type=range]").length,
  options: fig.querySelectorAll("input[type=radio]").length,
}));
"""

# Move the slider of figure arguments[0] to position arguments[1], as a reader's drag does.
MOVE_SLIDER_SCRIPT = """
const slider = document.getElementById(arguments[0]).querySelector("input[type=range]");
slider.value = String(arguments[1]);
slider.dispatchEvent(new Event("input", {bubbles: true}));
return Number(slider.max);
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves the site; records (status, path) of each request instead of printing it."""

    requests: list[tuple[int, str]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.requests.append((int(code) if isinstance(code, int) else 0, self.path))

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site(built_book) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """The built book on http://127.0.0.1:<free port>/, and the log of requests it served."""
    requests: list[tuple[int, str]] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(built_book.html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by Debian's chromedriver; nothing is downloaded."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash .ci/test`, which installs "
                    "Debian's chromium and chromium-driver", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1024",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 # Every host but the local server is unresolvable, also on machines with
                 # internet, so an external fetch always fails and shows up as a console error.
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


def _wait_until_loaded(browser, page: str, seconds: float = 60.0) -> None:
    """Wait for the page's load event: on a busy machine ``get`` can return while a long page
    (chapter 8's many figures) is still parsing."""
    deadline = time.monotonic() + seconds
    while browser.execute_script("return document.readyState") != "complete":
        assert time.monotonic() < deadline, f"{page}: not loaded after {seconds:g} s"
        time.sleep(0.2)


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_offline_in_chromium(site, browser, page):
    base, served = site
    for log in ("browser", "performance"):
        browser.get_log(log)  # drop what earlier pages left
    del served[:]
    browser.get(base + page)
    _wait_until_loaded(browser, page)

    math = browser.execute_async_script(MATH_SCRIPT)
    assert math["mathjax"], f"{page}: MathJax did not start"
    assert "failed" not in math, f"{page}: MathJax startup failed: {math.get('failed')}"
    assert math["containers"] > 0 and math["math"] > 0, f"{page}: no typeset math: {math}"
    assert not math["untypeset"], f"{page}: formulas left as TeX: {math['untypeset'][:5]}"
    assert not math["errors"], f"{page}: TeX errors: {math['errors'][:5]}"

    images = browser.execute_async_script(IMAGES_SCRIPT)
    broken = [src for src, width in images if width == 0]
    assert not broken, f"{page}: images that did not load: {broken}"
    if PAGES[page]:
        figures = [src for src, _ in images if "_images/" in src]
        assert figures, f"{page}: no figure (matplotlib output) on the page"
        shown = browser.execute_script(FIGURE_WIDTHS_SCRIPT)
        narrow = [(src, natural, width) for src, natural, width in shown
                  if width < min(natural, PAGE_WIDTH_PX) - 2]
        assert not narrow, f"{page}: figures shown narrower than the page width: {narrow}"

    requested = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert any(url.startswith(base) for url in requested)
    # chrome:// requests are the browser's own start page, not the network.
    outside = [url for url in requested if not url.startswith(base)
               and urlsplit(url).scheme in {"http", "https", "ws", "wss", "ftp"}]
    assert not outside, f"{page}: requests to other hosts: {outside}"
    # Every request succeeds, the icon included (the pages name it, so no /favicon.ico guess).
    assert not [(code, path) for code, path in served if code >= 400]

    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors:\n" + "\n".join(errors)


@pytest.mark.parametrize("page", INTERACTIVE)
def test_interactive_figure_redraws_when_the_slider_moves(site, browser, page):
    base, served = site
    browser.get_log("browser")
    del served[:]
    browser.get(base + page)
    _wait_until_loaded(browser, page)
    figures = browser.execute_script(INTERACTIVE_STATE_SCRIPT)
    assert len(figures) == 1, f"{page}: {len(figures)} interactive figures"
    before = figures[0]
    assert before["sliders"] == 1 and before["paths"] and before["legend"], before
    assert before["frame"] and all(p.startswith("M") for p in before["paths"])

    from selenium.webdriver.common.by import By

    top = browser.execute_script(MOVE_SLIDER_SCRIPT, before["id"], 0)
    states = []
    for position in (0, top // 2, top):
        browser.execute_script(MOVE_SLIDER_SCRIPT, before["id"], position)
        state = browser.execute_script(INTERACTIVE_STATE_SCRIPT)[0]
        assert state["frame"].endswith(f":{position}"), (position, state["frame"])
        states.append(state)
    for a, b in zip(states, states[1:], strict=False):
        assert a["paths"] != b["paths"], f"{page}: moving the slider did not change the figure"
        assert a["readout"] != b["readout"]

    # A reader's drag with the keyboard: the slider has the focus and the arrow key moves it.
    slider = browser.find_element(By.CSS_SELECTOR, f"#{before['id']} input[type=range]")
    slider.send_keys("\ue012")  # arrow left
    after_key = browser.execute_script(INTERACTIVE_STATE_SCRIPT)[0]
    assert after_key["frame"].endswith(f":{top - 1}") and after_key["paths"] != states[-1]["paths"]

    if before["options"]:
        radios = browser.find_elements(By.CSS_SELECTOR, f"#{before['id']} input[type=radio]")
        radios[1].click()
        picked = browser.execute_script(INTERACTIVE_STATE_SCRIPT)[0]
        assert picked["frame"].startswith("1:") and picked["paths"] != after_key["paths"]
        assert picked["legend"] != after_key["legend"]

    assert not [(code, path) for code, path in served if code >= 400]
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors:\n" + "\n".join(errors)
