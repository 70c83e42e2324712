"""A real browser reads the built book offline: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by `bash .ci/test`) opens the intro and chapters from a local
http.server and checks that every formula is typeset by MathJax, every image loads, nothing is
requested from another host and the console shows no error.

The book is built once per session by the `built_book` fixture in conftest.py.
"""

from __future__ import annotations

import functools
import json
import threading
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
}

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


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_offline_in_chromium(site, browser, page):
    base, served = site
    for log in ("browser", "performance"):
        browser.get_log(log)  # drop what earlier pages left
    del served[:]
    browser.get(base + page)
    assert browser.execute_script("return document.readyState") == "complete"

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
