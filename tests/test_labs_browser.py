"""The labs in a real browser: JupyterLab on 127.0.0.1 driven by headless Chromium (Debian's
`chromium` and `chromium-driver`, installed by `bash .ci/test`, as for the book's browser
check).

JupyterLab serves a temporary copy of lab 2 and of lab 1 (a lab that trains) in the smoke
profile, with data and results in temporary folders: the instructor sources (labs/source), so
that "Run All" answers every question; the panel is the same in the student versions. For each
lab the browser runs all cells and checks that the panel rendered as widgets (no "Loading
widget", no "Error displaying widget"), that a plot image is shown, that the results are also
ordinary outputs, and that the console shows no error. Then it presses the panel's buttons as
a student would:

- lab 1: Stop while "Run All" is training (the run cell awaits the panel, so the kernel hears
  the click; Run All halts there with one line), then Run, which resumes and ends with "done";
  saved, the notebook holds the widget state and the results; reopened with a fresh kernel,
  the panel shows as saved;
- lab 2: Run, then Stop while a long computation of the paths runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit.widgets import STOPPED

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LAB1 = "lab1_optimizer_zoo.ipynb"
LAB2 = "lab2_seeing_smoothing.ipynb"

# The state of the open notebook arguments[0]: execution counts, errors, the kernel, widgets.
NOTEBOOK_STATE = """
const app = window.jupyterapp;
if (!app || !app.shell) { return null; }
const panel = [...app.shell.widgets("main")]
  .find(w => w.context && w.context.path === arguments[0]);
if (!panel || !panel.content || !panel.sessionContext) { return null; }
const cells = panel.content.widgets.filter(c => c.model.type === "code");
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
const text = panel.content.node.textContent;
return {
  kernel: kernel ? kernel.status : null,
  counts: cells.map(c => c.model.executionCount),
  errors: cells.flatMap(c => c.outputArea.model.toJSON())
    .filter(o => o.output_type === "error").map(o => o.ename + ": " + o.evalue),
  loading: text.includes("Loading widget"),
  widget_errors: text.includes("Error displaying widget"),
  buttons: panel.content.node.querySelectorAll(".jupyter-widgets button").length,
  widget_images: [...panel.content.node.querySelectorAll(".widget-image")]
    .filter(i => i.naturalWidth > 0).length,
  output_images: [...panel.content.node.querySelectorAll(".jp-RenderedImage img")]
    .filter(i => i.naturalWidth > 0).length,
  status: [...panel.content.node.querySelectorAll(".labkit-status")]
    .map(e => e.textContent.trim()).join(" | "),
};
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """JupyterLab on 127.0.0.1 with a token, serving copies of labs 1 and 2 (smoke profile).
    Yields (base URL, token, the served folder)."""
    root = tmp_path_factory.mktemp("labs-browser")
    served = root / "labs"
    served.mkdir()
    for name in (LAB1, LAB2):
        shutil.copy(ROOT / "labs" / "source" / name, served / name)  # with the answers
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
        env[var] = str(root / sub)  # nothing of the user's own Jupyter setup
    env.update(LABKIT_PROFILE="smoke", LABKIT_DATA=str(root / "data"),
               LABKIT_RESULTS=str(root / "results"), PYTHONUNBUFFERED="1")
    token, port = secrets.token_hex(16), _free_port()
    jupyter_lab = Path(sys.executable).with_name("jupyter-lab")
    log = open(root / "jupyterlab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(jupyter_lab), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
        cwd=served, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}api/status?token={token}", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n"
                                + (root / "jupyterlab.log").read_text()[-3000:], pytrace=False)
                time.sleep(0.5)
        yield base, token, served
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-lab')}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


def _wait(browser, name: str, what: str, predicate, timeout: float = 120.0):
    """Poll notebook ``name``'s state until ``predicate(state)``; returns that state."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = browser.execute_script(NOTEBOOK_STATE, name)
        if state is not None and predicate(state):
            return state
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last state: {state}")


def _open(browser, base: str, token: str, name: str) -> dict:
    browser.get(f"{base}lab/tree/{name}?reset&token={token}")
    return _wait(browser, name, "the notebook and its kernel",
                 lambda s: s["kernel"] == "idle", 120)


def _on_notebook(browser, name: str, action: str) -> None:
    """Run JavaScript ``action`` (a promise; ``panel`` is the notebook's panel, ``app`` the
    application) with the notebook activated, and wait for it."""
    error = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; const app = window.jupyterapp;"
        "const panel = [...app.shell.widgets('main')]"
        "  .find(w => w.context && w.context.path === arguments[0]);"
        "app.shell.activateById(panel.id);"
        f"Promise.resolve().then(() => {action}).then(() => done(null), e => done(String(e)));",
        name)
    assert error is None, f"{action}: {error}"


def _run_all(browser, name: str) -> None:
    """Start "Run All" (its promise ends with the last cell: not awaited)."""
    _on_notebook(browser, name, "void app.commands.execute('notebook:run-all-cells')")


def _press(browser, label: str) -> None:
    """Click the panel's button ``label`` as a user does (centred in view first, clear of the
    tab bar)."""
    from selenium.webdriver.common.by import By

    (button,) = [b for b in browser.find_elements(By.CSS_SELECTOR, ".jupyter-widgets button")
                 if b.get_attribute("title") == label]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()


def _all_ran(state: dict) -> bool:
    return state["kernel"] == "idle" and all(c is not None for c in state["counts"])


def _console_errors(browser) -> list[str]:
    # Chrome refuses JupyterLab's "leave the page?" prompt when the test navigates from one
    # notebook to the next; that notice is the browser's, not an error of the page.
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
            and "Blocked attempt to show a 'beforeunload' confirmation" not in e["message"]]


def _check_rendered(state: dict, name: str) -> None:
    assert not state["loading"], f"{name}: a widget is still 'Loading widget...'"
    assert not state["widget_errors"], f"{name}: 'Error displaying widget'"
    assert state["buttons"] >= 2, f"{name}: the panel's buttons did not render: {state}"
    assert state["widget_images"] >= 1, f"{name}: no plot image in the panel: {state}"
    assert state["output_images"] >= 1, f"{name}: no figure among the outputs: {state}"


def test_lab1_stop_during_run_all_then_run_to_done(lab_server, browser):
    base, token, served = lab_server
    _open(browser, base, token, LAB1)
    assert not _console_errors(browser)  # loading JupyterLab and the notebook
    _run_all(browser, LAB1)
    _wait(browser, LAB1, "training to start", lambda s: s["status"].startswith("running"), 180)
    _press(browser, "Stop")
    state = _wait(browser, LAB1, "Stop to end the run",
                  lambda s: s["status"].startswith("stopped"), 60)
    assert "stopped" in state["status"] and "pending" in state["status"], state["status"]
    # Run All halts at the run cell with one line (no traceback, no failing later cells).
    state = _wait(browser, LAB1, "Run All to halt", lambda s: s["kernel"] == "idle" and s["errors"])
    assert state["errors"] == ["Interrupted: " + STOPPED], state["errors"]

    _press(browser, "Run")  # resumes the stopped run, trains the rest
    state = _wait(browser, LAB1, "'done'", lambda s: s["status"].startswith("done"), 180)
    assert "6 runs: " in state["status"] and "pending" not in state["status"], state["status"]
    _check_rendered(state, LAB1)
    assert not _console_errors(browser)

    # Saved: the widget state and the results are in the file.
    _on_notebook(browser, LAB1, "panel.context.save()")
    nb = json.loads((served / LAB1).read_text())
    assert nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("done" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs)

    # Reopened with a fresh kernel: the saved panel shows, without widget errors.
    _on_notebook(browser, LAB1, "panel.sessionContext.shutdown()")
    _open(browser, base, token, LAB1)
    time.sleep(2)
    state = browser.execute_script(NOTEBOOK_STATE, LAB1)
    assert not state["widget_errors"] and state["buttons"] >= 2, state
    assert state["output_images"] >= 1, state
    assert not _console_errors(browser)


def test_lab2_run_and_stop(lab_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, token, _ = lab_server
    _open(browser, base, token, LAB2)
    assert not _console_errors(browser)
    _run_all(browser, LAB2)
    state = _wait(browser, LAB2, "Run All to end", _all_ran, 180)
    assert not state["errors"], state["errors"]
    assert "reached the global minimum" in state["status"] or "missed" in state["status"]
    _check_rendered(state, LAB2)

    _press(browser, "Run")
    state = _wait(browser, LAB2, "the run to end", lambda s: "global minimum" in s["status"], 120)

    # Many more steps: long enough to press Stop while the paths are computed.
    (steps,) = [w for w in browser.find_elements(By.CSS_SELECTOR, ".widget-inline-hbox")
                if w.text.strip().startswith("steps (each method)")]
    box = steps.find_element(By.CSS_SELECTOR, "input")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("200000", Keys.ENTER)
    _press(browser, "Run")
    _wait(browser, LAB2, "the computation to start", lambda s: s["status"].startswith("computing"))
    _press(browser, "Stop")
    state = _wait(browser, LAB2, "Stop to end it", lambda s: s["status"].startswith("stopped"), 30)
    assert state["status"] == "stopped: press Run to compute the paths"
    assert not _console_errors(browser)
