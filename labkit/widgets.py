"""Control panels for the lab notebooks (ipywidgets 8).

Book: the labs. Every lab shows one panel: the experiment's knobs, a profile selector (smoke /
short / paper), Run and Stop buttons, a status line and a message area where invalid settings
are explained (never a traceback). Two classes:

- :class:`ControlPanel`: the generic panel. Pressing Run (or calling :meth:`ControlPanel.run`)
  validates the knobs and calls ``task(values, panel)``; the task draws into the panel with
  :meth:`ControlPanel.show` (figures) and :meth:`ControlPanel.set_status`. Lab 2 uses it.
- :class:`ExperimentPanel`: a panel whose task is a sweep of training runs. ``build_grid``
  turns the knobs into a grid spec or a list of :class:`~labkit.train.TrainConfig`; the panel
  checks it (:func:`labkit.experiments.plan_sweep`, batch sizes against the training set
  included), runs it with :func:`labkit.experiments.run_sweep` into ``out_dir`` (finished runs
  reload instantly, interrupted ones resume), shows a progress bar over the sweep and one over
  the current run, a plot of every run's curve updated each epoch, and a table of the runs.
  With ``$LABKIT_RAY_ADDRESS`` set (e.g. ``ray://head:10001``), the sweep's points run as tasks
  on that Ray cluster (:mod:`labkit.experiments.ray_executor`); each curve then appears when
  its run ends.

Profiles: :func:`default_profile` is ``$LABKIT_PROFILE`` when set, else ``"short"`` with CUDA and
``"smoke"`` without. ``defaults(profile)`` (optional) gives the knob values of each profile; they
are applied when the panel is built and whenever the profile selector changes.

Running from a cell vs pressing Run. A kernel handles one message at a time: while a cell
runs Python code, the click of a button waits until the cell ends. So the labs' run cell reads
``result = await panel.run_async()``: the task runs in a worker thread while the cell awaits it,
and the kernel keeps handling widget messages, so the Stop button works during "Run All" too.
``panel.run()`` runs the task synchronously and returns its result (scripts, tests; in a
notebook the Stop button cannot be heard then, interrupt the kernel instead). Pressing Run runs
the task in a background thread (inside a kernel), so the notebook stays usable. Stop ends a
sweep after the current optimizer step and leaves a resumable state on disk; a kernel
interrupt does the same and says so in one line ("interrupted: run again to resume"), without a
traceback.

Example (a lab's panel cell; see labs/README.md for a whole lab)::

    from labkit import widgets as W
    from labkit.train import TrainConfig

    def build_grid(v):
        return [TrainConfig(profile=v["profile"], optimizer="adam", lr=v["lr"],
                            hparams={"eta": eta}, epochs=v["epochs"]) for eta in v["etas"]]

    panel = W.ExperimentPanel(
        "Adam with power eta",
        controls={"etas": W.multi_select("eta", [("1/2", 0.5), ("2", 2.0)], value=(0.5, 2.0)),
                  "lr": W.float_text("lr", 1e-3),
                  "epochs": W.int_slider("epochs", 1, 200, 3)},
        build_grid=build_grid,
        out_dir=lambda profile: f"results/demo/{profile}",
        validate=lambda v: [] if v["lr"] > 0 else [f"lr must be > 0; got {v['lr']}"],
        defaults=lambda profile: {"epochs": 3 if profile == "smoke" else 50},
    )
    panel             # shows the panel
    # next cell:
    sweep = await panel.run_async()   # runs the knobs; Stop works; returns the SweepResult
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

try:
    import ipywidgets as W
except ImportError as e:  # pragma: no cover - exercised only without the labs extra
    raise ImportError(
        "labkit.widgets needs ipywidgets 8: pip install 'labkit[labs]' (or ipywidgets>=8)"
    ) from e

from labkit.train import PROFILES, Callback, RunResult, RunState, TrainConfig

__all__ = [
    "PROFILES",
    "ControlPanel",
    "INTERRUPTED",
    "STOPPED",
    "ExperimentPanel",
    "Interrupted",
    "LivePlot",
    "CURVE_COLORS",
    "check_version",
    "curve_style",
    "default_label",
    "default_profile",
    "dropdown",
    "float_slider",
    "float_text",
    "format_value",
    "int_slider",
    "int_text",
    "multi_select",
    "new_figure",
    "COLUMN_HEADERS",
    "runs_table_html",
    "text",
]

_STYLE = {"description_width": "initial"}
_ERROR_COLOR = "#a94442"
_WARN_COLOR = "#8a6d3b"
#: The status line (and the one-line error) after a kernel interrupt during a run.
INTERRUPTED = "interrupted: run again to resume"
#: The one-line error of a run cell whose run the Stop button ended (so "Run All" halts there).
STOPPED = "stopped with the Stop button: press Run (or run this cell again) to resume"


class Interrupted(KeyboardInterrupt):
    """A kernel interrupt during a panel's run, or a Stop that ended the run a cell awaited
    (:meth:`ControlPanel.run_async`). IPython shows it as its one-line message (no traceback:
    the run stopped cleanly and resumes on the next run); "Run All" halts at that cell."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook for a custom traceback
        return [f"\x1b[0;31m{self}\x1b[0m"]


# --------------------------------------------------------------------------- profiles, version


def default_profile() -> str:
    """``$LABKIT_PROFILE`` when set, else ``"short"`` if CUDA is available, else ``"smoke"``.

    Raises:
        ValueError: ``$LABKIT_PROFILE`` is set to something other than smoke, cpu, short or paper.
    """
    env = os.environ.get("LABKIT_PROFILE", "").strip()
    if env:
        if env not in PROFILES:
            raise ValueError(
                f"LABKIT_PROFILE={env!r} is not a profile; valid: {', '.join(PROFILES)}"
            )
        return env
    import torch

    return "short" if torch.cuda.is_available() else "smoke"


def _hardware_profile() -> str:
    import torch

    return "short" if torch.cuda.is_available() else "smoke"


def _display_html(text: str, fallback: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        print(fallback)
        return
    if get_ipython() is None:
        print(fallback)
    else:
        display(HTML(text))


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = v.split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected a version like '0.1.0' (numbers and dots); got {v!r}")
    return tuple(int(p) for p in parts)


def check_version(expected: str) -> bool:
    """Tell whether the installed labkit is the version a notebook was written for.

    Displays a one-line note: a confirmation, or (on a mismatch) what is installed, what the
    notebook expects and how to update, as a message rather than an error. Returns True when
    the versions are equal.

    Raises:
        TypeError / ValueError: ``expected`` is not a version string like ``"0.1.0"``.
    """
    from labkit import __version__

    if not isinstance(expected, str):
        raise TypeError(f"expected must be a version string like '0.1.0'; got {expected!r}")
    want = _version_tuple(expected)
    have = _version_tuple(__version__)
    if want == have:
        text = f"labkit {__version__}: the version this notebook was written for."
        _display_html(f"<span style='color:green'>&#10004; {html.escape(text)}</span>", text)
        return True
    newer = "newer" if have > want else "older"
    text = (
        f"labkit {__version__} is installed, but this notebook was written for labkit "
        f"{expected} (yours is {newer}). The lab may still work; if a cell fails, update the "
        "course repository (git pull) and reinstall labkit (pip install -e .) or ask your "
        "instructor for the matching version."
    )
    _display_html(
        f"<div style='color:{_WARN_COLOR};border:1px solid {_WARN_COLOR};padding:4px'>"
        f"&#9888; {html.escape(text)}</div>",
        "WARNING: " + text,
    )
    return False


# --------------------------------------------------------------------------- small widgets


def _fill(long: bool = False) -> W.Layout:
    """A knob's layout: as wide as its cell of the panel's grid; ``long`` spans both columns
    (options too long to read in one)."""
    layout = W.Layout(width="98%")
    if long:
        layout.grid_column = "1 / -1"
    return layout


def _longest_label(options: Sequence[Any]) -> int:
    return max((len(str(o[0] if isinstance(o, tuple) else o)) for o in options), default=0)


def dropdown(description: str, options: Sequence[Any], value: Any = None) -> W.Dropdown:
    """A labelled dropdown; ``options`` are values or ``(label, value)`` pairs. One with long
    option labels spans the panel's width, so that they are not cut."""
    kw = {"value": value} if value is not None else {}
    return W.Dropdown(description=description, options=list(options), style=_STYLE,
                      layout=_fill(_longest_label(options) + len(description) > 40), **kw)


def multi_select(
    description: str, options: Sequence[Any], value: Sequence[Any] = (), rows: int | None = None
) -> W.SelectMultiple:
    """A labelled multiple selection (ctrl/shift-click); its value is a tuple."""
    return W.SelectMultiple(
        description=description, options=list(options), value=tuple(value),
        rows=rows or min(len(options), 7), style=_STYLE,
        layout=_fill(_longest_label(options) + len(description) > 40),
    )


def int_slider(description: str, min: int, max: int, value: int, step: int = 1) -> W.IntSlider:
    """A labelled integer slider."""
    return W.IntSlider(description=description, min=min, max=max, value=value, step=step,
                       style=_STYLE, continuous_update=False, layout=_fill())


def float_slider(
    description: str, min: float, max: float, value: float, step: float
) -> W.FloatSlider:
    """A labelled float slider that reports its value when released."""
    return W.FloatSlider(description=description, min=min, max=max, value=value, step=step,
                         style=_STYLE, continuous_update=False, readout_format=".2f",
                         layout=_fill())


def float_text(description: str, value: float) -> W.FloatText:
    """A labelled number box (accepts 1e-3); validate its value in the panel's ``validate``."""
    return W.FloatText(description=description, value=value, style=_STYLE, layout=_fill())


def int_text(description: str, value: int) -> W.IntText:
    """A labelled integer box; validate its value in the panel's ``validate``."""
    return W.IntText(description=description, value=value, style=_STYLE, layout=_fill())


def text(description: str, value: str) -> W.Text:
    """A labelled text box (e.g. a point typed as ``2.2, -1.8``)."""
    return W.Text(description=description, value=value, style=_STYLE, layout=_fill())


def format_value(value: Any) -> str:
    """A short label for a knob value: 1/3 for 0.333..., 0.001 for 1e-3, lists joined."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        short = f"{value:g}"
        frac = Fraction(value).limit_denominator(12)
        if len(short) > 6 and frac.denominator != 1 and abs(float(frac) - value) < 1e-12:
            return f"{frac.numerator}/{frac.denominator}"  # 1/3 rather than 0.333333
        return short
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


#: Curve colours: 12 distinct ones (matplotlib's tab10, black, dark gold); after 12 curves the
#: line style and marker change too (:func:`curve_style`), so no two of 48 curves look alike.
CURVE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#b8860b")
_LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def curve_style(i: int) -> dict[str, Any]:
    """Matplotlib keyword arguments of the ``i``-th curve of a plot (0-based): a colour of
    :data:`CURVE_COLORS`, then a new line style and marker for every 12 curves."""
    ls, marker = _LINE_STYLES[(i // len(CURVE_COLORS)) % len(_LINE_STYLES)]
    return {"color": CURVE_COLORS[i % len(CURVE_COLORS)], "linestyle": ls, "marker": marker}


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def new_figure(figsize: tuple[float, float] = (6.4, 3.6), layout: str | None = "constrained"
               ) -> Any:
    """A matplotlib ``Figure`` made without pyplot, for :meth:`ControlPanel.show`: safe to draw
    from a worker thread, and never shown a second time by the notebook's inline backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout=layout)


# --------------------------------------------------------------------------- the generic panel


class ControlPanel:
    """Knobs, a profile selector, Run/Stop, a status line, messages and a figure area.

    Args:
        title: shown in bold at the top.
        controls: name -> widget with a ``value`` (see :func:`dropdown`, :func:`multi_select`,
            ...). :meth:`values` returns ``{name: value, ..., "profile": profile}``; the values
            of multiple selections come in the order of their options.
        task: ``task(values, panel)``, called by :meth:`run` with valid values; its return
            value is :attr:`last_result`. It may call :meth:`show`, :meth:`set_status` and poll
            :attr:`stop_requested`.
        validate: ``validate(values) -> list of messages`` (empty when the values are valid).
            A ValueError/TypeError it raises counts as one message.
        defaults: ``defaults(profile) -> {name: value}``, applied at construction and when the
            profile changes.
        profile: the initial profile; None means :func:`default_profile`.
        description: HTML shown under the title.
        background: run the task in a thread when Run is pressed (``run()`` always blocks);
            None means "when inside a Jupyter kernel".
        rerun_on_profile: after a run, changing the profile runs again with the new profile's
            defaults (all of them applied first).

    Attributes:
        widget: the ``ipywidgets.VBox`` that is displayed.
        status, message: ``ipywidgets.HTML`` of the status line and of the messages.
        run_button, stop_button, profile_selector: the standard widgets.
        figure: an ``ipywidgets.Image`` that :meth:`show` fills.
        last_result: what the last successful task returned.
        error: the message of the last failed task, else None.
    """

    def __init__(
        self,
        title: str,
        controls: Mapping[str, Any],
        task: Callable[[dict[str, Any], ControlPanel], Any],
        *,
        validate: Callable[[dict[str, Any]], Sequence[str]] | None = None,
        defaults: Callable[[str], Mapping[str, Any]] | None = None,
        profile: str | None = None,
        description: str = "",
        background: bool | None = None,
        rerun_on_profile: bool = False,
    ) -> None:
        if not isinstance(title, str) or not title:
            raise ValueError(f"title must be a non-empty string; got {title!r}")
        if not isinstance(controls, Mapping):
            raise TypeError(f"controls must be a mapping name -> widget; got {type(controls)}")
        for name, w in controls.items():
            if not isinstance(name, str) or not name.isidentifier() or name == "profile":
                raise ValueError(
                    f"control names must be identifiers other than 'profile'; got {name!r}"
                )
            if not isinstance(w, W.Widget) or not hasattr(w, "value"):
                raise TypeError(
                    f"control {name!r} must be an ipywidgets widget with a value; got "
                    f"{type(w).__name__}"
                )
        if not callable(task):
            raise TypeError(f"task must be callable as task(values, panel); got {task!r}")
        self.title = title
        self.controls: dict[str, Any] = dict(controls)
        self._task = task
        self._validate_fn = validate
        self._defaults = defaults
        self.background = _in_kernel() if background is None else bool(background)
        self.rerun_on_profile = bool(rerun_on_profile)
        self.last_result: Any = None
        self.last_values: dict[str, Any] | None = None
        self._rerun = False  # a run was requested while one ran (or while knobs were set)
        self._holding = 0  # > 0 while several knobs change together (a profile's defaults)
        self._invalid_shown = False
        self.error: str | None = None
        self._inputs_record: str | None = None
        self._inputs_display_id = f"labkit-inputs-{uuid.uuid4().hex}"
        self._results_id = f"labkit-results-{uuid.uuid4().hex}"
        self._displayed = False
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._running = False

        startup_notes = []
        if profile is None:
            try:
                profile = default_profile()
            except ValueError as e:
                profile = _hardware_profile()
                startup_notes.append(f"{e}; using {profile!r}")
        elif profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")

        self.profile_selector = W.ToggleButtons(
            options=list(PROFILES), value=profile, description="profile", style=_STYLE,
            tooltips=["CPU, generated data, tiny model: seconds",
                      "one GPU, the paper's model, fewer epochs: minutes",
                      "the paper's full scale: hours on a GPU"],
        )
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop",
                                    disabled=True)
        self.status = W.HTML(value="ready")
        self.status.add_class("labkit-status")  # found by the browser test
        self.message = W.HTML(value="")
        self.figure = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.figure.layout.display = "none"
        self.run_button.on_click(lambda _: self._on_run_clicked())
        self.stop_button.on_click(lambda _: self.stop())
        self.profile_selector.observe(self._on_profile_change, names="value")
        for w in self.controls.values():
            w.observe(self._on_knob_change, names="value")

        header = W.HTML(f"<b style='font-size:1.15em'>{html.escape(title)}</b>"
                        + (f"<div>{description}</div>" if description else ""))
        grid = W.GridBox(
            list(self.controls.values()),
            layout=W.Layout(grid_template_columns="repeat(2, minmax(280px, 1fr))",
                            grid_gap="4px 16px"),
        )
        buttons = W.HBox([self.run_button, self.stop_button, self.status],
                         layout=W.Layout(align_items="center"))
        self._body: list[Any] = [header, self.profile_selector, grid, buttons, self.message]
        self.widget = W.VBox(self._layout())
        self.apply_defaults(profile)
        if startup_notes:
            self._show_messages([], startup_notes)

    # ----------------------------------------------------------------- layout and display

    def _layout(self) -> list[Any]:
        return [*self._body, self.figure]

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # A widget shows only while its kernel runs (or from widget state saved in the notebook).
    # So below the panel, the results of the latest run are also ordinary outputs: each figure
    # as a PNG and the status line with the runs table as HTML, replaced in place after every
    # run. A saved notebook then shows them in nbviewer, in the book and to a grader.

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
        for display_id, bundle in self._result_bundles():
            display(bundle, raw=True, display_id=display_id)
        self._displayed = True

    def _result_images(self) -> list[Any]:
        """The image widgets whose pictures are results (the figure area)."""
        return [self.figure]

    def _result_html(self) -> str:
        return f"<div>{self.status.value}</div>{self.message.value}"

    def _result_bundles(self) -> list[tuple[str, dict[str, Any]]]:
        import base64

        out = []
        for k, image in enumerate(self._result_images()):
            png = bytes(image.value or b"")
            bundle: dict[str, Any] = {"text/plain": ""}
            if png and image.layout.display != "none":
                bundle = {"image/png": base64.b64encode(png).decode("ascii"),
                          "text/plain": f"<{self.title}: figure {k + 1}>"}
            out.append((f"{self._results_id}-{k}", bundle))
        text = self.status_text
        out.append((f"{self._results_id}-summary",
                    {"text/html": self._result_html() if text != "ready" else "",
                     "text/plain": text if text != "ready" else ""}))
        return out

    def publish_results(self) -> None:
        """Replace the panel's result outputs (below the panel, when it was displayed in a
        notebook) with the current figures, status line and table; done after every run."""
        if not self._displayed or not _in_kernel():
            return
        from IPython.display import update_display

        for display_id, bundle in self._result_bundles():
            update_display(bundle, raw=True, display_id=display_id)

    # ----------------------------------------------------------------- values

    @property
    def profile(self) -> str:
        """The selected profile."""
        return self.profile_selector.value

    def values(self) -> dict[str, Any]:
        """``{control name: value, ..., "profile": profile}``."""
        out = {}
        for name, w in self.controls.items():
            v = w.value
            if isinstance(w, W.SelectMultiple):
                order = [opt[1] if isinstance(opt, tuple) else opt for opt in w.options]
                v = tuple(sorted(v, key=order.index))
            out[name] = v
        out["profile"] = self.profile
        return out

    def set_values(self, **values: Any) -> None:
        """Set knobs (and ``profile``) from Python, as a student would with the mouse.

        Setting ``profile`` first applies that profile's defaults, then the other values.

        Raises:
            ValueError: an unknown knob name, or a value the widget refuses (e.g. not one of a
                dropdown's options); the message names the knob.
        """
        unknown = sorted(set(values) - set(self.controls) - {"profile"})
        if unknown:
            raise ValueError(
                f"unknown control(s) {', '.join(unknown)}; this panel has "
                f"{', '.join([*self.controls, 'profile'])}"
            )
        if "profile" in values:
            p = values["profile"]
            if p not in PROFILES:
                raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {p!r}")
            self.profile_selector.value = p
        for name, v in values.items():
            if name == "profile":
                continue
            try:
                self.controls[name].value = tuple(v) if isinstance(
                    self.controls[name], W.SelectMultiple) else v
            except Exception as e:  # traitlets raises TraitError for a refused value
                raise ValueError(f"control {name!r} cannot take the value {v!r}: {e}") from None

    def apply_defaults(self, profile: str | None = None) -> None:
        """Set the knobs to ``defaults(profile)`` (the selected profile when None). A run that
        a knob's observer requests meanwhile (:meth:`request_run`) starts once all are set."""
        if self._defaults is None:
            return
        vals = dict(self._defaults(profile or self.profile))
        vals.pop("profile", None)
        self._holding += 1
        try:
            self.set_values(**vals)
        finally:
            self._release()

    def _release(self) -> None:
        self._holding -= 1
        if not self._holding and self._rerun and not self._running:
            self._rerun = False
            self.press_run()

    def request_run(self) -> None:
        """Run with the current knobs as soon as possible: now when idle, else once the current
        run ends (several requests meanwhile make one run), and never with half-applied
        defaults. For observers that rerun on a knob's change (lab 2's δ slider)."""
        if self._holding or self._running:
            self._rerun = True
            return
        self.press_run()

    def _on_profile_change(self, change: dict[str, Any]) -> None:
        self._holding += 1
        try:
            self.apply_defaults(change["new"])
            self.message.value = ""
            self._clear_invalid()
            if self.rerun_on_profile and self.last_result is not None:
                self._rerun = True
        finally:
            self._release()

    def _clear_invalid(self) -> None:
        if self._invalid_shown and not self._running:
            self._invalid_shown = False
            self.set_status("ready")

    def _on_knob_change(self, _: Any) -> None:
        """After "not started: invalid settings", check the knobs again as they change: the
        messages follow, and the status line is cleared once they are valid."""
        if not self._invalid_shown or self._running or self._holding:
            return
        errors = self.validate()
        self._show_messages(errors)
        if not errors:
            self._clear_invalid()

    # ----------------------------------------------------------------- validation

    def validate(self, values: Mapping[str, Any] | None = None) -> list[str]:
        """Messages that explain what is wrong with ``values`` (the current knobs if None)."""
        values = dict(self.values() if values is None else values)
        if values.get("profile") not in PROFILES:
            return [f"profile must be one of {', '.join(PROFILES)}; got {values.get('profile')!r}"]
        if self._validate_fn is None:
            return []
        try:
            msgs = self._validate_fn(values)
        except (ValueError, TypeError) as e:
            return [str(e)]
        return [str(m) for m in (msgs or [])]

    def warnings(self, values: Mapping[str, Any]) -> list[str]:
        """Notes shown beside a valid run (nothing blocks it)."""
        return []

    def _show_messages(self, errors: Sequence[str], warnings: Sequence[str] = ()) -> None:
        parts = [f"<div style='color:{_ERROR_COLOR}'>&#10006; {html.escape(m)}</div>"
                 for m in errors]
        parts += [f"<div style='color:{_WARN_COLOR}'>&#9888; {html.escape(m)}</div>"
                  for m in warnings]
        self.message.value = "".join(parts)

    @property
    def messages(self) -> str:
        """The message area as plain text (for tests and for reading in a notebook)."""
        return html.unescape(_strip_tags(self.message.value))

    # ----------------------------------------------------------------- running

    @property
    def running(self) -> bool:
        """True while a task runs."""
        return self._running

    @property
    def stop_requested(self) -> bool:
        """True once Stop was pressed during the current run (tasks poll it)."""
        return self._stop_event.is_set()

    def set_status(self, text: str, *, html_text: str | None = None) -> None:
        """Set the status line (plain text, or ``html_text`` as given)."""
        self.status.value = html_text if html_text is not None else html.escape(text)

    @property
    def status_text(self) -> str:
        """The status line as plain text."""
        return html.unescape(_strip_tags(self.status.value))

    def show(self, fig: Any) -> None:
        """Draw a matplotlib figure into the panel's figure area (and close it if pyplot's)."""
        self.figure.value = _figure_png(fig)
        self.figure.layout.display = None
        if getattr(fig, "number", None) is not None:  # made by pyplot: do not show it twice
            import matplotlib.pyplot as plt

            plt.close(fig)

    def stop(self) -> None:
        """Ask the running task to stop (a sweep stops after the current optimizer step)."""
        if self._running:
            self._stop_event.set()
            self.set_status("stopping...")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background run to end; True when nothing is running any more."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def run(self, **values: Any) -> Any:
        """Validate the knobs (after setting ``values``) and run the task, blocking.

        Returns the task's result, or None when the knobs are invalid: then the panel shows
        why and nothing runs. Errors inside the task are shown in the panel and re-raised; a
        kernel interrupt stops the task and raises :class:`Interrupted` (one line). In a
        notebook prefer ``await`` :meth:`run_async`, during which the Stop button works.
        """
        self.wait()
        if not self._set_run_values(values):
            return None
        return self._execute(raise_errors=True)

    def _set_run_values(self, values: Mapping[str, Any]) -> bool:
        if values:
            try:
                self.set_values(**values)
            except ValueError as e:
                self._show_messages([str(e)])
                self.set_status("not started: invalid settings")
                self._invalid_shown = True
                return False
        return True

    async def run_async(self, **values: Any) -> Any:
        """:meth:`run` for a notebook cell: ``result = await panel.run_async()``.

        The task runs in a worker thread while the cell awaits it, so the kernel keeps
        handling widget messages: the Stop button stops the run, as it does after pressing
        Run. A kernel interrupt stops it too (after the current optimizer step, resumable) and
        raises :class:`Interrupted`, shown as the one line "interrupted: run again to resume".
        A run ended by Stop raises it too, with :data:`STOPPED`, so that "Run All" halts at
        this cell rather than in the next one, on missing results. Returns what :meth:`run`
        returns.
        """
        import asyncio

        while self._running:  # a run started with the Run button: let it end first
            await asyncio.sleep(0.05)
        if not self._set_run_values(values):
            return None
        self._claim()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = self._execute(raise_errors=True, claimed=True)
            except BaseException as e:  # handed to the awaiting cell below
                outcome["error"] = e

        thread = threading.Thread(target=work, daemon=True, name=f"labkit panel: {self.title}")
        self._thread = thread
        thread.start()
        interrupted = False
        while thread.is_alive():
            try:
                await asyncio.sleep(0.05)
            except (asyncio.CancelledError, KeyboardInterrupt):  # the kernel's interrupt
                interrupted = True
                self.stop()
        if interrupted:
            self.set_status(INTERRUPTED)
            raise Interrupted(INTERRUPTED)
        if "error" in outcome:
            raise outcome["error"]
        if self.stop_requested:
            raise Interrupted(STOPPED)
        return outcome["result"]

    def record_inputs(self, name: str = "inputs") -> None:
        """Record (:func:`labkit.record.record`) the knobs of the latest run (the current knobs
        if nothing ran yet) and keep that output up to date: every later run, from a cell or
        with the Run button, replaces it with its own knobs."""
        from labkit.record import record

        self._inputs_record = name
        record(name, self.last_values if self.last_values is not None else self.values(),
               display_id=self._inputs_display_id)

    def _update_inputs_record(self) -> None:
        if self._inputs_record is not None and self.last_values is not None:
            from labkit.record import record

            record(self._inputs_record, self.last_values, display_id=self._inputs_display_id,
                   update=True)

    def press_run(self) -> None:
        """What pressing Run does: validate and run (in a thread if ``background``); errors
        are shown in the panel, never raised."""
        self._on_run_clicked()

    def _on_run_clicked(self) -> None:
        if self._running or self._holding:
            return
        if self.background:
            self._claim()  # here, so that a second click is ignored and Stop works at once
            self._thread = threading.Thread(
                target=self._execute, kwargs={"raise_errors": False, "claimed": True},
                daemon=True, name=f"labkit panel: {self.title}",
            )
            self._thread.start()
        else:
            self._execute(raise_errors=False)

    def _prepare(self, values: dict[str, Any]) -> list[str]:
        """Validate; subclasses also plan the work here. Returns the error messages."""
        return self.validate(values)

    def _claim(self) -> None:
        self._stop_event.clear()
        self._running = True
        self.run_button.disabled = True
        self.stop_button.disabled = False
        self.profile_selector.disabled = True

    def _execute(self, raise_errors: bool, claimed: bool = False) -> Any:
        if not claimed:
            self._claim()
        try:
            self.set_status("checking the settings...")
            values = self.values()
            errors = self._prepare(values)
            if errors:
                self._show_messages(errors)
                self.set_status("not started: invalid settings (see below)")
                self._invalid_shown = True
                return None
            self._invalid_shown = False
            if self.stop_requested:
                self.set_status("stopped before it started")
                return None
            self._show_messages([], self.warnings(values))
            self.error = None
            self.last_values = values
            result = self._task(values, self)
        except KeyboardInterrupt:  # the kernel's interrupt: the run stopped, resumable
            self.error = INTERRUPTED
            self.set_status(INTERRUPTED)
            raise Interrupted(INTERRUPTED) from None
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            self.set_status("failed")
            self._show_messages([self.error])
            if raise_errors or not isinstance(e, Exception):
                raise
            return None
        finally:
            self._running = False
            self.run_button.disabled = False
            self.stop_button.disabled = True
            self.profile_selector.disabled = False
            rerun, self._rerun = self._rerun and not self.stop_requested, False
            self.publish_results()
        self.last_result = result
        self._update_inputs_record()
        if rerun:  # knobs changed during the run (request_run): run them now
            self.press_run()
        return result


def _strip_tags(text: str) -> str:
    text = re.sub(r"<(br|/div|/p)\b[^>]*>", " ", text)  # block ends separate messages
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------- live plot


class LivePlot(Callback):
    """A :class:`~labkit.train.Callback` that redraws every run's curve after each epoch.

    Args:
        image: the ``ipywidgets.Image`` to draw into.
        metric: the per-epoch metric (``"test_acc"``, ``"train_loss"``, ...; accuracies are
            drawn in percent).
        label: ``label(config) -> str`` for a run's legend entry.
        min_interval: at least this many seconds between two redraws during a sweep, and at
            least four times what the last redraw took, so that drawing never costs more than
            a fifth of the time (the panel redraws once more when the sweep ends).
    """

    def __init__(
        self,
        image: Any,
        metric: str = "test_acc",
        label: Callable[[TrainConfig], str] | None = None,
        min_interval: float = 0.5,
    ) -> None:
        self.image = image
        self.metric = metric
        self.label = label or default_label
        self.min_interval = min_interval
        self.series: dict[str, tuple[str, list[tuple[int, float]]]] = {}
        self._current: str | None = None
        self._last_draw = -math.inf
        self._draw_cost = 0.0

    def clear(self) -> None:
        self.series.clear()
        self._current = None

    def add_run(self, key: str, config: TrainConfig, metrics: Sequence[Mapping[str, Any]]) -> None:
        """Add (or replace) a whole run's curve, e.g. one loaded from disk."""
        self.series[key] = (self.label(config), [
            (int(m["epoch"]), m.get(self.metric)) for m in metrics
            if m.get(self.metric) is not None
        ])

    def on_run_start(self, state: RunState) -> None:
        from labkit.train import config_hash

        self._current = config_hash(state.config)
        self.add_run(self._current, state.config, state.metrics)
        if state.metrics:  # a resumed run: show what is on disk
            self.draw(force=False)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        from labkit.train import config_hash

        # The run's own curve: the runs of a pack (labkit.train_pack) end epochs in turn.
        key = config_hash(state.config)
        if key not in self.series:
            return
        value = metrics.get(self.metric)
        if value is not None:
            self.series[key][1].append((int(metrics["epoch"]), value))
        self.draw(force=False)

    def draw(self, force: bool = True) -> None:
        """Redraw now, or, with ``force=False``, only if the last redraw is old enough."""
        now = time.monotonic()
        if not force and now - self._last_draw < max(self.min_interval, 4 * self._draw_cost):
            return
        from matplotlib.ticker import MaxNLocator

        curves = [(label, points) for label, points in self.series.values() if points]
        # The legend sits right of the plot, in as many columns as needed for at most 14
        # rows; the figure widens with it, so the plot keeps its size.
        ncols = max(1, math.ceil(len(curves) / 14))
        longest = max((len(label) for label, _ in curves), default=0)
        legend_width = ncols * (0.6 + 0.062 * longest) if curves else 0.0
        fig = new_figure((6.4 + legend_width, 3.6 + 0.1 * min(len(curves), 14) / ncols))
        ax = fig.add_subplot()
        scale = 100.0 if self.metric.endswith("_acc") else 1.0
        for i, (label, points) in enumerate(curves):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [y * scale for y in ys], markersize=3, lw=1.3, label=label,
                    **curve_style(i))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = self.metric.replace("_acc", " accuracy (%)").replace("_", " ")
        ax.set_ylabel(ylabel)
        ax.set_title(f"live: {ylabel} per epoch", fontsize="medium")
        ax.grid(True, alpha=0.3)
        if curves:
            fig.legend(loc="outside right upper", fontsize="x-small", ncols=ncols,
                       frameon=False)
        self.image.value = _figure_png(fig)
        self.image.layout.display = None
        self._last_draw = time.monotonic()
        self._draw_cost = self._last_draw - now


def default_label(config: TrainConfig) -> str:
    """``"adam lr=0.001 eta=0.5 seed=0"``-style label of a run."""
    hp = " ".join(f"{k}={format_value(v)}" for k, v in sorted(config.hparams.items()))
    return f"{config.optimizer} lr={format_value(config.lr)}" + (f" {hp}" if hp else "") + \
        f" seed={config.seed}"


class _Progress(Callback):
    """Per-run progress bar, status line and stop hook of an :class:`ExperimentPanel`."""

    step_interval = 1

    def __init__(self, panel: ExperimentPanel) -> None:
        self.panel = panel
        self._epoch_start_step = 0

    def on_run_start(self, state: RunState) -> None:
        p = self.panel
        p.run_progress.max = state.config.epochs
        p.run_progress.value = len(state.metrics)
        self._epoch_start_step = state.step
        p._run_label = p.curve_label(state.config)
        p._update_status(state.config, len(state.metrics), None)

    def on_step(self, state: RunState) -> None:
        if state.steps_per_epoch <= 0:
            return
        frac = (state.step - self._epoch_start_step) / state.steps_per_epoch
        value = state.epoch + min(frac, 1.0)
        bar = self.panel.run_progress
        if value - bar.value >= 0.02 * bar.max or value < bar.value:
            bar.value = value

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        self._epoch_start_step = state.step
        self.panel.run_progress.value = metrics["epoch"]
        self.panel._update_status(state.config, metrics["epoch"], metrics)

    def on_run_end(self, state: RunState, result: RunResult) -> None:
        self.panel.run_progress.value = len(result.metrics)


# --------------------------------------------------------------------------- sweeps


class ExperimentPanel(ControlPanel):
    """A :class:`ControlPanel` whose task is a sweep of training runs.

    Args:
        title, controls, validate, defaults, profile, description: as for
            :class:`ControlPanel`.
        build_grid: ``build_grid(values)`` -> a grid spec dict (see
            :mod:`labkit.experiments.sweep`) or a list of :class:`~labkit.train.TrainConfig`.
        out_dir: the sweep folder, or ``out_dir(profile) -> folder``.
        metric: the per-epoch metric of the live plot.
        curve_label: ``curve_label(config) -> str``, a run's name in the plot, table and status.
        table_columns: columns of the runs table (default: status, the config columns that
            vary, epochs done, final and best test accuracy, wall time).
        on_result: ``on_result(panel)`` after each sweep (draw a summary figure with
            :meth:`show`, say); :attr:`sweep_status` is the sweep's summary line then.
        reuse: ``reuse(profile) -> folders``: other sweep folders whose finished runs of the
            very same config (same :func:`~labkit.train.config_hash`) are copied into this
            sweep instead of being trained again (lab 4 reuses lab 3's runs).
        callbacks: extra :class:`~labkit.train.Callback` objects for every run.
        background: run in a thread when Run is pressed; None means "when inside a Jupyter
            kernel" (``run()`` always blocks).

    Attributes (besides :class:`ControlPanel`'s):
        sweep_progress, run_progress: the two progress bars (runs of the sweep; epochs of the
            current run).
        plot: the :class:`LivePlot`; table: an ``ipywidgets.HTML`` with the runs table.
        last_result: the :class:`~labkit.experiments.SweepResult` of the last run.
        sweep_status: the HTML summary of the last sweep ("done · 12 runs: ...").
    """

    def __init__(
        self,
        title: str,
        controls: Mapping[str, Any],
        build_grid: Callable[[dict[str, Any]], Any],
        *,
        out_dir: str | os.PathLike | Callable[[str], str | os.PathLike],
        validate: Callable[[dict[str, Any]], Sequence[str]] | None = None,
        defaults: Callable[[str], Mapping[str, Any]] | None = None,
        profile: str | None = None,
        description: str = "",
        metric: str = "test_acc",
        curve_label: Callable[[TrainConfig], str] | None = None,
        table_columns: Sequence[str] | None = None,
        on_result: Callable[[ExperimentPanel], None] | None = None,
        callbacks: Sequence[Callback] = (),
        background: bool | None = None,
        reuse: Callable[[str], Sequence[str | os.PathLike]] | None = None,
    ) -> None:
        if not callable(build_grid):
            raise TypeError(
                f"build_grid must be callable as build_grid(values); got {build_grid!r}"
            )
        if not (callable(out_dir) or isinstance(out_dir, (str, os.PathLike))):
            raise TypeError(
                f"out_dir must be a folder or a function profile -> folder; got {out_dir!r}"
            )
        self._build_grid = build_grid
        self._out_dir = out_dir
        self.curve_label = curve_label or default_label
        self.table_columns = list(table_columns) if table_columns is not None else None
        self._on_result = on_result
        self._reuse = reuse
        self.sweep_status = ""
        self._callbacks = list(callbacks)
        self._plan: list[Any] | None = None
        self._grid_value: Any = None
        self._plan_out: Path | None = None
        self._run_label = ""
        self._t0 = 0.0
        self._n_points = 0
        self._done = 0
        if background is None:
            background = _in_kernel()
        self.sweep_progress = W.IntProgress(value=0, min=0, max=1, description="sweep",
                                            style=_STYLE)
        self.run_progress = W.FloatProgress(value=0, min=0, max=1, description="run",
                                            style=_STYLE)
        self.table = W.HTML(value="")
        plot_image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        plot_image.layout.display = "none"
        self.plot = LivePlot(plot_image, metric=metric, label=self.curve_label)
        super().__init__(title, controls, self._run_sweep, validate=validate, defaults=defaults,
                         profile=profile, description=description, background=background)

    def _layout(self) -> list[Any]:
        bars = W.HBox([self.sweep_progress, self.run_progress])
        return [*self._body, bars, self.plot.image, self.table, self.figure]

    def _result_images(self) -> list[Any]:
        return [self.plot.image, self.figure]

    def _result_html(self) -> str:
        return super()._result_html() + self.table.value

    # ----------------------------------------------------------------- where and what

    @property
    def out_dir(self) -> Path:
        """The sweep folder of the selected profile."""
        out = self._out_dir(self.profile) if callable(self._out_dir) else self._out_dir
        return Path(out)

    def grid(self, values: Mapping[str, Any] | None = None) -> Any:
        """What ``build_grid`` makes of ``values`` (the current knobs if None)."""
        return self._build_grid(dict(self.values() if values is None else values))

    def _prepare(self, values: dict[str, Any]) -> list[str]:
        errors = self.validate(values)
        if errors:
            return errors
        from labkit.data import DatasetError
        from labkit.experiments import plan_sweep

        out = self.out_dir
        try:
            grid = self._build_grid(dict(values))
            plan = plan_sweep(grid, out, check_data=True)
        except (ValueError, TypeError) as e:  # GridError and DatasetError are ValueErrors
            prefix = "the data set is unusable: " if isinstance(e, DatasetError) else ""
            return [prefix + str(e)]
        except FileNotFoundError as e:
            return [f"{e}. Or choose the cpu profile (handwritten digits that come with "
                    "scikit-learn) or the smoke profile, which generates its own data."]
        self._grid_value, self._plan, self._plan_out = grid, plan, out
        return []

    def warnings(self, values: Mapping[str, Any]) -> list[str]:
        import torch

        notes = []
        if values.get("profile") not in ("smoke", "cpu") and not torch.cuda.is_available():
            notes.append(
                f"profile {values.get('profile')!r} without a CUDA GPU: the paper's model on "
                "the CPU takes hours per run; the cpu profile (handwritten digits) runs in "
                "minutes, the smoke profile in seconds"
            )
        return notes

    def plan(self, values: Mapping[str, Any] | None = None) -> Any:
        """The runs the knobs ask for and their status on disk, as a ``pandas.DataFrame``.

        Raises:
            ValueError: the knobs are invalid (the message lists why).
        """
        import pandas as pd

        values = dict(self.values() if values is None else values)
        errors = self._prepare(values)
        if errors:
            raise ValueError("; ".join(errors))
        rows = []
        for p in self._plan or []:
            c = p.config
            rows.append({"run": p.hash, "label": self.curve_label(c), "status": p.status,
                         "optimizer": c.optimizer, "lr": c.lr,
                         **{k: v for k, v in sorted(c.hparams.items())},
                         "batch_size": c.batch_size, "epochs": c.epochs, "seed": c.seed,
                         "model": c.model, "dataset": c.dataset})
        return pd.DataFrame(rows)

    def _hashes(self) -> list[str] | None:
        return [p.hash for p in self._plan] if self._plan is not None else None

    @property
    def results(self) -> Any:
        """One row per run of the last planned sweep (:func:`labkit.experiments.load_results`).

        Raises:
            FileNotFoundError: nothing was run into the sweep folder yet.
        """
        from labkit.experiments import load_results

        out = self._plan_out or self.out_dir
        df = load_results(out)
        hashes = self._hashes()
        if hashes is not None:
            df = df[df["run"].isin(hashes)].reset_index(drop=True)
        return df

    @property
    def history(self) -> Any:
        """One row per (run, epoch) of the last planned sweep
        (:func:`labkit.experiments.load_history`)."""
        from labkit.experiments import load_history

        out = self._plan_out or self.out_dir
        df = load_history(out)
        hashes = self._hashes()
        if hashes is not None:
            df = df[df["run"].isin(hashes)].reset_index(drop=True)
        return df

    # ----------------------------------------------------------------- the sweep

    def _update_status(self, config: TrainConfig, epoch: int, metrics: Mapping | None) -> None:
        elapsed = time.monotonic() - self._t0
        parts = [f"run {min(self._done + 1, self._n_points)}/{self._n_points}",
                 html.escape(self._run_label), f"epoch {epoch}/{config.epochs}"]
        if metrics and metrics.get("test_acc") is not None:
            parts.append(f"test acc {100 * metrics['test_acc']:.1f}%")
        parts.append(f"{elapsed:.0f} s")
        self.set_status("", html_text="<b>running</b> &middot; " + " &middot; ".join(parts))

    def _reuse_runs(self, plan: Sequence[Any]) -> dict[str, str]:
        """Copy the finished runs of the ``reuse`` folders that this sweep still lacks.
        Returns hash -> the folder each came from."""
        import shutil

        from labkit.experiments.sweep import RUNS_FOLDER
        from labkit.store import run_state

        if self._reuse is None:
            return {}
        sources = [Path(f) for f in self._reuse(self.profile)]
        copied = {}
        for p in plan:
            if p.status != "pending" or Path(p.folder).exists():
                continue
            for src_sweep in sources:
                src = src_sweep / RUNS_FOLDER / p.hash
                if not src.is_dir() or run_state(src)[0] not in ("finished", "diverged"):
                    continue
                dst = Path(p.folder)
                tmp = dst.with_name(dst.name + ".copying")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                tmp.rename(dst)  # atomic: a half-copied run never looks finished
                copied[p.hash] = str(src_sweep)
                break
        return copied

    def _run_sweep(self, values: dict[str, Any], panel: ControlPanel) -> Any:
        from labkit.experiments import run_sweep
        from labkit.experiments.ray_executor import executor_from_env

        executor = executor_from_env()  # $LABKIT_RAY_ADDRESS: the points run on a Ray cluster
        plan = self._plan or []
        self._n_points = len(plan)
        self._done = 0
        self._t0 = time.monotonic()
        self.sweep_progress.max = max(1, len(plan))
        self.sweep_progress.value = 0
        self.run_progress.value = 0
        self.plot.clear()
        self.table.value = ""
        self.sweep_status = ""
        copied = self._reuse_runs(plan)
        on_disk = sum(p.status in ("finished", "diverged") for p in plan) + len(copied)
        self.set_status(f"preparing {len(plan)} runs ({on_disk} on disk): loading the data...")
        trained: set[str] = set()

        def on_run_end(point: Any) -> None:
            self._done += 1
            self.sweep_progress.value = self._done
            if point.result is not None and point.loaded:
                self.plot.add_run(point.hash, point.config, point.result.metrics)
                self.plot.draw(force=False)
                self.run_progress.max = max(1, point.config.epochs)
                self.run_progress.value = len(point.result.metrics)
                label = html.escape(self.curve_label(point.config))
                self.set_status("", html_text=f"<b>running</b> &middot; run {self._done}/"
                                f"{self._n_points} &middot; {label} &middot; loaded from disk")
            elif point.status in ("finished", "diverged"):
                trained.add(point.hash)
                if executor is not None and point.result is not None:  # no live curve remotely
                    self.plot.add_run(point.hash, point.config, point.result.metrics)
                    self.plot.draw(force=False)
            self._refresh_table()

        result = run_sweep(self._grid_value, self._plan_out, callbacks=[
            *self._callbacks, self.plot, _Progress(self)], progress=False,
            stop_event=self._stop_event, on_run_end=on_run_end, executor=executor)
        self.plot.draw(force=True)
        self._refresh_table()
        elapsed = time.monotonic() - self._t0
        c = result.counts()
        # Every run in exactly one group, so that the numbers add up to the sweep's size.
        n_trained = sum(p.hash in trained and p.status == "finished" for p in result.points)
        n_loaded = sum(p.hash not in trained and p.status == "finished" for p in result.points)
        summary = [f"{n_trained} trained", f"{n_loaded} loaded from disk"]
        n_copied = sum(p.hash in copied and p.status == "finished" for p in result.points)
        if n_copied:
            names = sorted({Path(copied[h]).parent.name for h in copied})
            summary[-1] += f" ({n_copied} of them copied from {', '.join(names)})"
        for status in ("diverged", "failed", "damaged", "stopped", "pending"):
            if c.get(status):
                summary.append(f"{c[status]} {status}")
        where = html.escape(str(self._plan_out))
        if result.stopped:
            head = "<b>stopped</b>: press Run (or run the cell again) to resume"
        elif c.get("failed") or c.get("damaged"):
            head = "<b style='color:#a94442'>finished with failures</b>"
            errors = [f"{p.config.optimizer}: {p.error}" for p in result.points if p.error]
            self._show_messages(errors)
        else:
            head = "<b>done</b>"
        n = len(result.points)
        self.sweep_status = (f"{head} &middot; {n} run{'s' if n != 1 else ''}: "
                             + ", ".join(summary)
                             + f" &middot; {elapsed:.1f} s &middot; <code>{where}</code>")
        if self._on_result is not None:
            working = self.sweep_status + " &middot; analysing the runs..."
            self.set_status("", html_text=working)
            self._on_result(self)
            if self.status.value == working:
                self.set_status("", html_text=self.sweep_status)
        else:
            self.set_status("", html_text=self.sweep_status)
        return result

    def _refresh_table(self) -> None:
        try:
            df = self.results
        except FileNotFoundError:
            return
        if df.empty:
            return
        labels = {p.hash: self.curve_label(p.config) for p in self._plan or []}
        self.table.value = runs_table_html(df, self.table_columns, labels)


#: Readable headers of the runs table's columns (others are shown with ``_`` as spaces).
COLUMN_HEADERS = {"name": "run", "lr": "lr", "eta": "η", "beta": "β", "beta1": "β₁",
                  "beta2": "β₂", "batch_size": "batch size", "epochs_completed": "epochs done",
                  "test_acc": "test acc", "best_test_acc": "best test acc",
                  "train_acc": "train acc", "wall_time": "time"}
_FRACTION_COLUMNS = ("eta",)  # powers written as 1/2, 1/3, as the runs' names do


def _cell_text(column: str, value: Any) -> str:
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if column.endswith("_acc"):
        return f"{100 * float(value):.1f}%"
    if column == "wall_time":
        return f"{float(value):.1f} s"
    if isinstance(value, float) and column in _FRACTION_COLUMNS:
        frac = Fraction(value).limit_denominator(12)
        if frac.denominator != 1 and abs(float(frac) - value) < 1e-12:
            return f"{frac.numerator}/{frac.denominator}"
    if isinstance(value, float):
        return format_value(value)
    return str(value)


def runs_table_html(df: Any, columns: Sequence[str] | None = None,
                    labels: Mapping[str, str] | None = None) -> str:
    """The runs table (:func:`labkit.experiments.load_results` rows) as compact HTML.

    ``labels`` maps a run's hash (the ``run`` column) to its name, shown in a first column.
    The default columns are the status, the config columns that vary between the runs, the
    epochs done, the final and best test accuracy and the wall time. Headers are readable
    (:data:`COLUMN_HEADERS`), numbers are right-aligned under right-aligned headers,
    accuracies in percent, and powers η as fractions (1/2), as the runs' names write them.

    Raises:
        ValueError: a column that the table does not have.
    """
    df = df.copy()
    if labels is not None and "run" in df.columns:
        df.insert(0, "name", [labels.get(r, r) for r in df["run"]])
    if columns is None:
        varying = [c for c in ("optimizer", "lr", "beta", "beta1", "beta2", "eta", "batch_size",
                               "seed", "epochs") if c in df.columns and df[c].nunique() > 1]
        columns = [*(["name"] if "name" in df.columns else []), "status", *varying,
                   "epochs_completed", "test_acc", "best_test_acc", "wall_time"]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"table column(s) {', '.join(missing)} are not in the results table; it has "
            f"{', '.join(map(str, df.columns))}"
        )
    cell = "padding:1px 8px;white-space:nowrap;text-align:"
    aligns = {c: "right" if df[c].dtype.kind in "iuf" else "left" for c in columns}
    head = "".join(f"<th style='{cell}{aligns[c]}'>"
                   f"{html.escape(COLUMN_HEADERS.get(c, c.replace('_', ' ')))}</th>"
                   for c in columns)
    rows = []
    for _, r in df[list(columns)].iterrows():
        rows.append("<tr>" + "".join(
            f"<td style='{cell}{aligns[c]}'>{html.escape(_cell_text(c, r[c]))}</td>"
            for c in columns) + "</tr>")
    return ("<div style='max-height:320px;overflow:auto'><table class='labkit-runs' "
            "style='border-collapse:collapse;font-size:0.9em'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None
