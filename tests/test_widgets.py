"""labkit.widgets: panels driven from Python as a student would drive them with the mouse."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import ipywidgets
import matplotlib
import pytest
import torch

from labkit import widgets
from labkit.labs import lab1
from labkit.train import Callback

pytestmark = pytest.mark.usefixtures("one_torch_thread", "lab_data_env")

matplotlib.use("Agg")

PNG = b"\x89PNG"


def lab1_panel(out, **kw):
    """Lab 1's panel, wired as the notebook wires it, writing into ``out``."""
    panel = widgets.ExperimentPanel(
        "Lab 1", controls=lab1.controls(), build_grid=lab1.grid, out_dir=out,
        validate=lab1.validate, defaults=lab1.defaults, curve_label=lab1.label,
        profile="smoke", **kw)
    # Two tiny runs: Adam with eta = 1/2 and eta = 4, two epochs each.
    panel.set_values(optimizers=("adam",), etas=(0.5, 4.0), epochs=2)
    return panel


# --------------------------------------------------------------------------- helpers


def test_default_profile(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert widgets.default_profile() == "smoke"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert widgets.default_profile() == "short"
    monkeypatch.setenv("LABKIT_PROFILE", "paper")
    assert widgets.default_profile() == "paper"
    monkeypatch.setenv("LABKIT_PROFILE", "huge")
    with pytest.raises(ValueError, match="LABKIT_PROFILE='huge' is not a profile"):
        widgets.default_profile()


def test_an_invalid_profile_variable_is_a_message_not_a_traceback(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "huge")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    panel = widgets.ControlPanel("p", {"n": widgets.int_text("n", 1)}, lambda v, p: v)
    assert panel.profile == "smoke"
    assert "LABKIT_PROFILE='huge' is not a profile" in panel.messages


def test_check_version(capsys):
    import labkit

    assert widgets.check_version(labkit.__version__) is True
    assert "the version this notebook was written for" in capsys.readouterr().out
    assert widgets.check_version("0.0.1") is False
    out = capsys.readouterr().out
    assert out.startswith("WARNING: labkit") and "written for labkit 0.0.1" in out
    with pytest.raises(ValueError, match="expected a version like '0.1.0'"):
        widgets.check_version("latest")
    with pytest.raises(TypeError, match="expected must be a version string"):
        widgets.check_version(1)


def test_format_value():
    assert widgets.format_value(1 / 3) == "1/3"
    assert widgets.format_value(0.5) == "0.5"
    assert widgets.format_value(1e-3) == "0.001"
    assert widgets.format_value(0.1) == "0.1"
    assert widgets.format_value((0.5, 2.0)) == "0.5, 2"
    assert widgets.format_value("adam") == "adam"


# --------------------------------------------------------------------------- the generic panel


def make_panel(calls, **kw):
    controls = {"lr": widgets.float_text("lr", 0.1), "kind": widgets.dropdown("kind", ["a", "b"]),
                "etas": widgets.multi_select("eta", [("1/2", 0.5), ("2", 2.0)], (0.5,))}

    def validate(v):
        msgs = []
        if v["lr"] <= 0:
            msgs.append(f"lr must be > 0; got {v['lr']}")
        if not v["etas"]:
            msgs.append("choose at least one eta")
        return msgs

    def task(values, panel):
        calls.append(values)
        if values["kind"] == "b":
            raise RuntimeError("kind b is broken")
        return len(calls)

    return widgets.ControlPanel("demo", controls, task, validate=validate, profile="smoke",
                                defaults=lambda p: {"lr": 0.5 if p == "paper" else 0.1}, **kw)


def test_invalid_input_shows_a_message_and_runs_nothing():
    calls = []
    panel = make_panel(calls)
    panel.set_values(lr=0.0, etas=())
    panel.run_button.click()
    assert calls == []
    assert "lr must be > 0; got 0.0" in panel.messages
    assert "choose at least one eta" in panel.messages
    assert panel.status_text.startswith("not started: invalid settings")
    assert panel.run() is None and calls == []


def test_valid_input_runs_the_task_with_the_knobs():
    calls = []
    panel = make_panel(calls)
    panel.set_values(etas=(2.0, 0.5))
    panel.run_button.click()
    assert calls == [{"lr": 0.1, "kind": "a", "etas": (0.5, 2.0), "profile": "smoke"}]
    assert panel.last_result == 1 and panel.messages == ""
    assert panel.run(lr=0.3) == 2 and calls[-1]["lr"] == 0.3
    assert not panel.running and not panel.run_button.disabled and panel.stop_button.disabled


def test_profile_change_applies_its_defaults():
    panel = make_panel([])
    panel.profile_selector.value = "paper"
    assert panel.values()["lr"] == 0.5
    panel.set_values(profile="smoke")
    assert panel.values()["lr"] == 0.1


def test_set_values_errors_name_the_knob():
    panel = make_panel([])
    with pytest.raises(ValueError, match="unknown control.*speed.*this panel has lr, kind, etas"):
        panel.set_values(speed=1)
    with pytest.raises(ValueError, match="control 'kind' cannot take the value 'c'"):
        panel.set_values(kind="c")
    with pytest.raises(ValueError, match="profile must be one of smoke, cpu, short, paper"):
        panel.set_values(profile="fast")
    # run() with a bad knob shows the message instead of raising.
    assert panel.run(kind="c") is None
    assert "control 'kind' cannot take the value 'c'" in panel.messages


def test_task_errors_are_shown_and_raised_by_run_only():
    calls = []
    panel = make_panel(calls)
    panel.set_values(kind="b")
    panel.run_button.click()  # a click never raises
    assert panel.error == "RuntimeError: kind b is broken"
    assert "kind b is broken" in panel.messages and panel.status_text == "failed"
    with pytest.raises(RuntimeError, match="kind b is broken"):
        panel.run()
    assert not panel.running


def test_stop_while_checking_the_settings_runs_nothing():
    calls, entered, release = [], threading.Event(), threading.Event()

    def slow_validate(values):
        entered.set()
        release.wait(30)
        return []

    panel = widgets.ControlPanel("t", {"n": widgets.int_text("n", 1)},
                                 lambda v, p: calls.append(v), validate=slow_validate,
                                 profile="smoke", background=True)
    panel.run_button.click()
    assert entered.wait(30) and panel.running and not panel.stop_button.disabled
    panel.stop_button.click()
    release.set()
    assert panel.wait(30)
    assert calls == [] and panel.status_text == "stopped before it started"
    assert not panel.running and not panel.run_button.disabled


def test_panel_construction_errors():
    task = lambda v, p: None  # noqa: E731
    with pytest.raises(ValueError, match="title must be a non-empty string"):
        widgets.ControlPanel("", {}, task)
    with pytest.raises(TypeError, match="control 'n' must be an ipywidgets widget"):
        widgets.ControlPanel("t", {"n": 3}, task)
    with pytest.raises(ValueError, match="identifiers other than 'profile'; got 'profile'"):
        widgets.ControlPanel("t", {"profile": widgets.int_text("p", 1)}, task)
    with pytest.raises(TypeError, match="task must be callable"):
        widgets.ControlPanel("t", {}, None)
    with pytest.raises(ValueError,
                       match="profile must be one of smoke, cpu, short, paper; got 'x'"):
        widgets.ControlPanel("t", {}, task, profile="x")
    with pytest.raises(TypeError, match="build_grid must be callable"):
        widgets.ExperimentPanel("t", {}, None, out_dir="x")
    with pytest.raises(TypeError, match="out_dir must be a folder or a function"):
        widgets.ExperimentPanel("t", {}, lambda v: [], out_dir=3)


def test_show_puts_a_png_in_the_panel():
    panel = make_panel([])
    fig = widgets.new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    panel.show(fig)
    assert bytes(panel.figure.value).startswith(PNG)
    assert isinstance(panel.widget, ipywidgets.VBox)
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


# --------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("knobs,message", [
    ({"optimizers": ()}, "choose at least one optimizer"),
    ({"lr": 0.0}, "α (lr of Adam, AMSGrad, RMSProp) must be > 0; got 0.0"),
    ({"lr": -1e-3}, "must be > 0; got -0.001"),
    ({"etas": ()}, "choose at least one η for Adam/AMSGrad"),
    ({"optimizers": ("sgd",), "lr_sgd": 0.0}, "lr of SGD, SHB, NSHB, AdaGrad must be > 0"),
    ({"batch_size": 0}, "batch size must be an integer >= 1; got 0"),
    ({"batch_size": 1024}, "batch size 1024 exceeds the 512 training images of cifar10"),
])
def test_experiment_panel_rejects_invalid_knobs(tmp_path, knobs, message):
    panel = lab1_panel(tmp_path / "sweep")
    panel.set_values(**knobs)
    panel.run_button.click()
    assert message in panel.messages
    assert panel.status_text.startswith("not started")
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was written
    with pytest.raises(ValueError, match=re.escape(message)):
        panel.plan()


def test_lab1_offers_torch_style_and_the_thesis_forms_with_honest_labels():
    import pandas as pd

    values = {**lab1.defaults("smoke"), "profile": "smoke", "etas": (0.5,),
              "optimizers": ("adam", "amsgrad", "adam_thesis", "amsgrad_thesis", "sgd")}
    assert lab1.validate(values) == []
    runs = lab1.grid(values)
    assert [c.optimizer for c in runs] == list(values["optimizers"])
    assert [lab1.label(c) for c in runs] == ["Adam η=1/2", "AMSGrad η=1/2", "(2) η=1/2",
                                             "(3) η=1/2", "SGD lr=0.1"]
    assert all(c.lr == 1e-3 and c.hparams["eta"] == 0.5 for c in runs[:4])
    assert "torch-style" in lab1.OPTIMIZERS["adam"]
    assert "(2), as the thesis writes it" in lab1.OPTIMIZERS["adam_thesis"]
    history = pd.DataFrame([
        {"run": c.optimizer, "optimizer": c.optimizer, "eta": c.hparams.get("eta"), "seed": 0,
         "epoch": e, "test_acc": 0.1 * e, "status": "finished"} for c in runs for e in (1, 2)])
    fig = lab1.figure(history)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["Adam, torch-style (cf. thesis Fig. 1)", "AMSGrad, torch-style (cf. Fig. 2)",
                      "(2) as written (cf. thesis Fig. 1)", "(3) as written (cf. Fig. 2)",
                      "other optimizers"]


def test_missing_cifar_is_a_message_that_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "empty"))
    panel = lab1_panel(tmp_path / "sweep")
    panel.set_values(profile="short")  # the real CIFAR-10, which is not there
    panel.set_values(optimizers=("adam",), etas=(0.5,), epochs=1)
    panel.run_button.click()
    message = panel.messages
    assert message.startswith("✖ CIFAR-10 not found: searched ") and message.count("✖") == 1
    assert "`python -m labkit data --download cifar10`" in message and "LABKIT_DATA" in message
    assert message.endswith("Or choose the cpu profile (handwritten digits that come with "
                            "scikit-learn) or the smoke profile, which generates its own data.")
    assert not (tmp_path / "sweep").exists()


def test_bad_grids_are_messages(tmp_path):
    def bad_grid(values):
        return {"base": {"profile": values["profile"]}, "grid": {"learning_rate": [0.1]}}

    panel = widgets.ExperimentPanel("t", {"n": widgets.int_text("n", 1)}, bad_grid,
                                    out_dir=tmp_path, profile="smoke")
    panel.run_button.click()
    assert "unknown grid key 'learning_rate'" in panel.messages

    def raising_grid(values):
        raise ValueError("n must be even; got 1")

    panel = widgets.ExperimentPanel("t", {"n": widgets.int_text("n", 1)}, raising_grid,
                                    out_dir=tmp_path, profile="smoke")
    assert panel.run() is None and "n must be even; got 1" in panel.messages


def test_smoke_sweep_runs_reloads_and_shows_its_table(tmp_path):
    out = tmp_path / "sweep"
    panel = lab1_panel(out, background=False)
    panel.set_values(epochs=1)
    plan = panel.plan()
    assert list(plan["label"]) == ["Adam η=1/2", "Adam η=4"]
    assert set(plan["status"]) == {"pending"}

    first = panel.run()
    assert first.complete and not first.stopped
    assert [p.status for p in first.points] == ["finished", "finished"]
    assert not any(p.loaded for p in first.points)
    assert panel.status_text.startswith("done") and "2 trained" in panel.status_text
    assert panel.sweep_progress.value == 2 and panel.run_progress.value == 1
    assert "Adam η=1/2" in panel.table.value and "Adam η=4" in panel.table.value
    assert bytes(panel.plot.image.value).startswith(PNG)
    assert [len(pts) for _, pts in panel.plot.series.values()] == [1, 1]
    results = panel.results
    assert len(results) == 2 and set(results["status"]) == {"finished"}
    assert len(panel.history) == 2  # 2 runs x 1 epoch

    # The second run trains nothing: every point is loaded from disk.
    second = panel.run()
    assert all(p.loaded for p in second.points)
    assert "0 trained, 2 loaded from disk" in panel.status_text
    assert panel.run_progress.value == panel.run_progress.max == 1  # not left at 0%
    assert [len(pts) for _, pts in panel.plot.series.values()] == [1, 1]
    assert [p.result.final["test_acc"] for p in second.points] == \
        [p.result.final["test_acc"] for p in first.points]

    # The figure of the notebook; outside the smoke profile with the reference accuracy.
    def legend(fig):
        return {t.get_text() for ax in fig.axes if ax.get_legend()
                for t in ax.get_legend().get_texts()}

    assert lab1.REFERENCE["label"] not in legend(lab1.figure(panel.history))
    for profile in ("short", "paper"):
        assert lab1.REFERENCE["label"] in legend(lab1.figure(panel.history, profile))

    # A wider grid reuses the finished points and trains only the new one.
    third = panel.run(etas=(0.5, 2.0, 4.0))
    assert [p.loaded for p in third.points] == [True, False, True]
    assert len(panel.results) == 3


class _StopAfterFirstEpoch(Callback):
    def __init__(self, panel):
        self.panel = panel

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == 1:
            self.panel.stop()


def _run_folders(out: Path) -> list[Path]:
    return sorted((out / "runs").iterdir())


def test_stop_leaves_a_resumable_sweep(tmp_path):
    out = tmp_path / "sweep"
    panel = lab1_panel(out)
    panel._callbacks.append(_StopAfterFirstEpoch(panel))
    panel.set_values(etas=(0.5,))
    stopped = panel.run()
    assert stopped.stopped and stopped.points[0].status == "stopped"
    assert panel.status_text.startswith("stopped: press Run")
    (folder,) = _run_folders(out)
    assert (folder / "checkpoint.pt").exists() and not (folder / "result.json").exists()
    index = json.loads((out / "index.json").read_text())
    assert [e["status"] for e in index["points"].values()] == ["stopped"]

    panel._callbacks.clear()
    resumed = panel.run()
    (point,) = resumed.points
    assert point.status == "finished" and point.result.resumed_from == 1
    assert [m["epoch"] for m in point.result.metrics] == [1, 2]
    assert (folder / "result.json").exists()


class _Gate(Callback):
    """Holds the run after its first epoch until the test lets it go."""

    def __init__(self):
        self.reached = threading.Event()
        self.go = threading.Event()

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == 1:
            self.reached.set()
            self.go.wait(30)


def test_run_button_runs_in_the_background_and_stop_button_stops(tmp_path):
    out = tmp_path / "sweep"
    gate = _Gate()
    panel = lab1_panel(out, background=True, callbacks=[gate])
    panel.run_button.click()
    assert gate.reached.wait(60), "the background run did not reach its first epoch"
    assert panel.running and panel.run_button.disabled and not panel.stop_button.disabled
    panel.run_button.click()  # ignored while running
    panel.stop_button.click()
    assert panel.status_text == "stopping..."
    gate.go.set()
    assert panel.wait(60)
    assert not panel.running and panel.error is None
    result = panel.last_result
    assert result.stopped and [p.status for p in result.points] == ["stopped", "pending"]
    assert panel.status_text.startswith("stopped")
    # The numbers add up to the sweep's size.
    assert "2 runs: 0 trained, 0 loaded from disk, 1 stopped, 1 pending" in panel.status_text
    # Resume in the foreground: the stopped run continues, the pending one starts.
    gate.go.set()
    resumed = panel.run()
    assert resumed.complete and resumed.points[0].result.resumed_from == 1


def test_runs_table_html_columns():
    import pandas as pd

    df = pd.DataFrame({"run": ["a", "b"], "status": ["finished", "stopped"], "optimizer": "adam",
                       "eta": [0.5, 4.0], "epochs_completed": [2, 1], "test_acc": [0.5, None],
                       "best_test_acc": [0.6, None], "wall_time": [1.0, 0.5]})
    html = widgets.runs_table_html(df, labels={"a": "Adam η=1/2"})
    assert "Adam η=1/2" in html and "50.0%" in html and ">η</th>" in html
    assert ">1/2</td>" in html and ">4</td>" in html  # powers as the names write them
    assert ">epochs done</th>" in html and "epochs_completed" not in html
    assert "<th style='padding:1px 8px;white-space:nowrap;text-align:right'>test acc" in html
    assert "optimizer" not in html  # the same for every run: left out
    with pytest.raises(ValueError, match="table column\\(s\\) sharpness are not in the results"):
        widgets.runs_table_html(df, ["status", "sharpness"])


# --------------------------------------------------------------------------- every lab's module

LABS_DIR = Path(__file__).resolve().parent.parent / "labs"
TRAINING_LABS = ("lab1", "lab3", "lab4", "lab5", "lab6")


def _lab_module(name):
    import importlib

    return importlib.import_module(f"labkit.labs.{name}")


@pytest.mark.parametrize("name", ["lab1", "lab2", "lab3", "lab4", "lab5", "lab6"])
def test_each_lab_module_names_its_notebook(name):
    import nbformat

    mod = _lab_module(name)
    path = LABS_DIR / f"{mod.LAB_ID}.ipynb"
    assert mod.LAB_ID.startswith(f"{name}_") and path.exists()
    assert nbformat.read(path, as_version=4).metadata["labkit"]["lab"] == mod.LAB_ID
    assert (name in TRAINING_LABS) == hasattr(mod, "grid")  # lab 2 trains nothing


@pytest.mark.parametrize("name", TRAINING_LABS)
def test_each_training_lab_drives_a_panel_through_the_same_interface(name, tmp_path):
    from labkit.labs import results_dir
    from labkit.train import PROFILES, TrainConfig

    mod = _lab_module(name)
    panel = widgets.ExperimentPanel(
        name, controls=mod.controls(), build_grid=mod.grid,
        out_dir=lambda profile: results_dir(mod.LAB_ID, profile), validate=mod.validate,
        defaults=mod.defaults, curve_label=mod.label,
        on_result=getattr(mod, "on_result", None), profile="smoke", background=False)
    for profile in PROFILES:
        panel.set_values(profile=profile)
        values, defaults = panel.values(), mod.defaults(profile)
        assert {k: values[k] for k in defaults} == defaults
        assert mod.validate(values) == []
        configs = mod.grid(values)
        assert configs and all(isinstance(c, TrainConfig) for c in configs)
        assert all(isinstance(mod.label(c), str) and mod.label(c) for c in configs)
    with pytest.raises(ValueError, match="profile must be one of smoke, cpu, short, paper"):
        mod.defaults("huge")


def test_importing_labkit_labs_loads_no_lab_module():
    import subprocess
    import sys

    code = ("import sys, labkit.labs as labs; "
            "assert not [m for m in sys.modules if m.startswith('labkit.labs.lab')], sys.modules; "
            "assert callable(labs.lab_setup) and callable(labs.results_dir)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- inside a kernel

_KERNEL_SETUP = """
import time
from labkit import widgets
steps = []

def task(values, panel):
    # Ends when Stop is pressed, else after 60 s.
    t0 = time.monotonic()
    while not panel.stop_requested and time.monotonic() - t0 < 60:
        steps.append(1)
        time.sleep(0.01)
    return "stopped" if panel.stop_requested else "timed out"

panel = widgets.ControlPanel("t", {"n": widgets.int_text("n", 1)}, task, profile="smoke")
print(panel.stop_button.model_id)
"""


@pytest.fixture
def kernel():
    """A live IPython kernel (what JupyterLab talks to) and a client for it."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _execute(kc, code, timeout=60):
    """Run ``code``; returns (reply content, stdout text, error outputs)."""
    msg_id = kc.execute(code)
    out, errors = [], []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append(content)
        elif kind == "status" and content["execution_state"] == "idle":
            break
    return kc.get_shell_msg(timeout=timeout)["content"], "".join(out), errors


def _click(kc, model_id):
    """What the browser sends when a button is clicked."""
    msg = kc.session.msg("comm_msg", {"comm_id": model_id,
                                      "data": {"method": "custom", "content": {"event": "click"}}})
    kc.shell_channel.send(msg)


def test_stop_button_works_while_a_cell_awaits_the_run(kernel):
    _, kc = kernel
    reply, out, _ = _execute(kc, _KERNEL_SETUP)
    assert reply["status"] == "ok", reply
    stop_id = out.strip()
    msg_id = kc.execute("r = await panel.run_async()")
    threading.Event().wait(1.0)  # the task runs; the cell is busy awaiting it
    _click(kc, stop_id)
    errors = []
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            errors.append(msg["content"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    # One line, so that Run All halts at the run cell, not on missing results later.
    (error,) = errors
    assert [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error["traceback"]] == \
        [widgets.STOPPED]
    reply, out, _ = _execute(kc, "print(len(steps) < 2000, panel.running, "
                                 "panel.last_result)")
    assert out.split() == ["True", "False", "stopped"]  # stopped within ~1 s, not 60


@pytest.mark.parametrize("call", ["await panel.run_async()", "panel.run()"])
def test_a_kernel_interrupt_is_one_line(kernel, call):
    km, kc = kernel
    reply, _, _ = _execute(kc, _KERNEL_SETUP)
    assert reply["status"] == "ok", reply
    msg_id = kc.execute(call)
    threading.Event().wait(1.5)
    km.interrupt_kernel()
    errors = []
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            errors.append(msg["content"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    (error,) = errors
    assert error["ename"] == "Interrupted"
    assert [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error["traceback"]] == \
        ["interrupted: run again to resume"]
    reply, out, _ = _execute(kc, "print(panel.status_text, '|', panel.running)")
    assert out.strip() == "interrupted: run again to resume | False"


# --------------------------------------------------------------------------- lab 2's panel


def test_lab2_reports_progress_and_stops():
    from labkit.labs import lab2

    panel = lab2.panel(profile="smoke")
    seen = []
    panel.status.observe(lambda c: seen.append(c["new"]), names="value")
    original = panel.set_status

    def stop_after_first_report(text, **kw):
        original(text, **kw)
        if text.startswith("computing the paths: "):
            panel.stop()

    panel.set_status = stop_after_first_report
    assert panel.run() is None and panel.last_result is None
    assert "computing the paths: 100/3000 steps (GD)" in seen
    assert panel.status_text == "stopped: press Run to compute the paths"
    panel.set_status = original
    result = panel.run()
    assert set(result.trajectories) == {"gd", "sgd", "graduated"}
    assert [len(t.points) for t in result.trajectories.values()] == [1001, 1001, 1001]


def test_lab2_profile_change_reruns_once_with_all_defaults():
    from labkit.labs import lab2

    panel = lab2.panel(profile="smoke")
    runs = []
    task = panel._task
    panel._task = lambda values, p: runs.append(dict(values)) or task(values, p)
    panel.run()
    panel.set_values(dist="ball", delta=1.0)  # δ reruns (1 run): the knobs as set
    assert [r["dist"] for r in runs] == ["gaussian", "ball"]
    panel.set_values(profile="short")  # one rerun, with every default of the profile
    assert len(runs) == 3
    assert {k: runs[-1][k] for k in ("dist", "delta", "n_samples", "profile")} == \
        {"dist": "gaussian", "delta": 0.4, "n_samples": 256, "profile": "short"}
    assert panel.last_values == runs[-1]


def test_a_stale_invalid_settings_status_clears_when_the_knobs_are_fixed():
    panel = make_panel([])
    panel.set_values(lr=0.0)
    panel.run_button.click()
    assert panel.status_text.startswith("not started: invalid settings")
    panel.set_values(lr=-1.0)  # still invalid: the message follows the knob
    assert "got -1.0" in panel.messages and panel.status_text.startswith("not started")
    panel.set_values(lr=0.2)
    assert panel.messages == "" and panel.status_text == "ready"
    panel.set_values(lr=0.0)
    panel.run_button.click()
    panel.set_values(profile="paper")  # a profile's defaults clear it as well
    assert panel.messages == "" and panel.status_text == "ready"


def test_curves_look_different_beyond_ten():
    styles = [widgets.curve_style(i) for i in range(24)]
    assert len({s["color"] for s in styles[:12]}) == 12 > 10
    assert len({tuple(sorted(s.items())) for s in styles}) == 24
    assert styles[1]["color"] != styles[11]["color"]  # lab 1's 2nd and 12th curve


def test_record_inputs_follows_the_latest_run():
    from labkit.record import recorded

    panel = make_panel([])
    panel.run()
    panel.record_inputs()
    assert recorded()["inputs"]["value"]["lr"] == 0.1
    panel.set_values(lr=0.3)
    panel.run_button.click()  # a later Run replaces the record with its own knobs
    assert recorded()["inputs"]["value"]["lr"] == 0.3


def test_lab4_reuses_lab3s_finished_runs(tmp_path):
    from labkit.labs import lab3, lab4

    knobs = {"optimizers": ("sgd",), "batch_sizes": (64,), "epochs": 2}

    def lab_panel(mod, out, **kw):
        panel = widgets.ExperimentPanel(
            mod.LAB_ID, controls=mod.controls(), build_grid=mod.grid, out_dir=out,
            validate=mod.validate, defaults=mod.defaults, curve_label=mod.label,
            profile="smoke", background=False, **kw)
        panel.set_values(**knobs)
        return panel

    lab3_dir = tmp_path / lab3.LAB_ID / "smoke"
    lab3_panel = lab_panel(lab3, lab3_dir)
    assert lab3_panel.run().complete
    panel = lab_panel(lab4, tmp_path / "lab4", reuse=lambda profile: [lab3_dir])
    result = panel.run()
    assert [p.loaded for p in result.points] == [True]  # nothing trained
    assert "1 run: 0 trained, 1 loaded from disk (1 of them copied from lab3_critical_batch)" \
        in panel.status_text
    assert list(panel.results["test_acc"]) == list(lab3_panel.results["test_acc"])
    assert lab4.reuse("smoke")[0].endswith("lab3_critical_batch/smoke")


def test_results_are_ordinary_outputs_too(kernel):
    """Below the displayed panel: one output per figure and one with the status line (and the
    runs table), replaced after every run, so a saved notebook shows them without widgets."""
    _, kc = kernel
    setup = """
from labkit import widgets

def task(values, panel):
    fig = widgets.new_figure()
    fig.add_subplot().plot([0, 1], [1, values["n"]])
    panel.show(fig)
    panel.set_status(f"drew n = {values['n']}")
    return values["n"]

panel = widgets.ControlPanel("t", {"n": widgets.int_text("n", 1)}, task, profile="smoke")
"""
    assert _execute(kc, setup)[0]["status"] == "ok"

    def outputs(code):
        msg_id = kc.execute(code)
        got = []
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            kind = msg["msg_type"]
            if kind in ("display_data", "update_display_data"):
                got.append((kind, msg["content"]["transient"].get("display_id", ""),
                            msg["content"]["data"]))
            if (kind == "status" and msg["parent_header"].get("msg_id") == msg_id
                    and msg["content"]["execution_state"] == "idle"):
                return got

    shown = outputs("panel")
    assert [k for k, _, _ in shown] == ["display_data"] * 3
    assert "application/vnd.jupyter.widget-view+json" in shown[0][2]
    figure_id, summary_id = shown[1][1], shown[2][1]
    assert figure_id and summary_id and shown[1][2] == {"text/plain": ""}
    updates = outputs("r = await panel.run_async(n=3)")
    final = {display_id: data for kind, display_id, data in updates
             if kind == "update_display_data"}
    assert final[figure_id]["image/png"].startswith("iVBOR")  # a PNG, base64
    assert "drew n = 3" in final[summary_id]["text/html"]
    assert final[summary_id]["text/plain"] == "drew n = 3"
