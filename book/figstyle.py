"""The book's figures: one style for every chapter (SVG output, text no smaller than 9 pt at the
page width, mathematical labels, a legend on every panel), and interactive figures that need no
kernel.

Every chapter calls :func:`use` in its first (hidden) cell and ends each figure cell with
:func:`show`, which checks the figure and refuses to draw one that breaks the rules, so a
chapter with an illegible figure fails the build. ``tests/test_book.py`` checks that every
chapter does so, and ``tests/test_book_browser.py`` that the site displays figures at least
:data:`PAGE_WIDTH_IN` wide, the width the font-size check assumes.

:func:`interactive` writes the frames of an interactive figure, all computed when the book is
built, as JSON into the page; ``book/_static/labkit-interactive.js`` (served by the site, no
network) draws them and redraws on every move of the slider.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.text import Text

#: Width (inches at 96 CSS px per inch) of the text column in which a figure is displayed: the
#: article column of the book's theme in a 1280 px wide browser window (660 px). A wider figure
#: is scaled down to it, and its text with it.
PAGE_WIDTH_IN = 6.8
#: Smallest font size (points) of any text of a figure, as displayed at the page width.
MIN_FONT_PT = 9.0
#: Width (inches) of a figure that fills the page width.
WIDTH = PAGE_WIDTH_IN

STYLE = {
    "figure.figsize": (WIDTH, 3.0),
    "figure.dpi": 100,
    "savefig.dpi": 200,  # for raster elements inside the SVGs (and any PNG)
    "svg.fonttype": "path",  # text as outlines: the same look in every browser, offline
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "mathtext.fontset": "cm",
    "figure.constrained_layout.use": True,
}


def use() -> None:
    """Set the book's style and make the notebook's inline backend emit SVG."""
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    mpl.rcParams.update(STYLE)
    set_matplotlib_formats("svg")


def check(fig: Figure) -> list[str]:
    """What breaks the book's rules in ``fig``: text that is displayed smaller than
    :data:`MIN_FONT_PT` at the page width, and panels without a legend. Empty when it is fine.

    A panel is an axes that draws data; colour bars (and axes that are switched off) need no
    legend.
    """
    problems = []
    scale = min(1.0, PAGE_WIDTH_IN / fig.get_figwidth())
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        shown = text.get_fontsize() * scale
        if shown < MIN_FONT_PT - 1e-6:
            problems.append(f"text {text.get_text()!r} is {shown:.1f} pt at the page width "
                            f"(font size {text.get_fontsize():g} pt in a "
                            f"{fig.get_figwidth():g} in wide figure)")
    for k, ax in enumerate(fig.axes):
        if ax.get_label() == "<colorbar>" or not ax.axison or not ax.get_visible():
            continue
        if ax.get_legend() is None:
            title = ax.get_title() or ax.get_xlabel() or f"panel {k + 1}"
            problems.append(f"panel {title!r} has no legend")
    return problems


def show(fig: Figure) -> None:
    """Check ``fig`` (see :func:`check`) and draw it; raise ValueError listing what is wrong."""
    problems = check(fig)
    if problems:
        plt.close(fig)
        raise ValueError("the figure breaks the book's figure rules:\n- " + "\n- ".join(problems))
    plt.show()


def series(label: str | None, x: Sequence[float] | None, y: Sequence[float], color: str, *,
           width: float = 1.6, dash: str | None = None, markers: str | None = None,
           digits: int = 3) -> dict[str, Any]:
    """One curve of an interactive figure: points (x, y) in data units, rounded to ``digits``
    decimals (``x`` None: the figure's shared ``grid``); ``markers`` "all", "only" (no line),
    "ends" or None; ``dash`` an SVG dash array such as "5 3". ``label`` (HTML with <i>, <sub>,
    <sup>) appears in the legend; None for a curve without a legend entry."""
    ys = [float(v) for v in y]
    xs = ys if x is None else [float(v) for v in x]
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"series {label!r}: x and y need the same, non-zero length, got "
                         f"{len(xs)} and {len(ys)}")
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError(f"series {label!r}: every point must be finite")
    if markers not in (None, "all", "only", "ends"):
        raise ValueError(f"markers must be 'all', 'only', 'ends' or None, got {markers!r}")
    out = {"label": label, "color": color, "y": [round(v, digits) for v in ys], "width": width,
           "dash": dash, "markers": markers}
    if x is not None:
        out["x"] = [round(v, digits) for v in xs]
    return out


def interactive(name: str, *, xlabel: str, ylabel: str, xlim: Sequence[float],
                ylim: Sequence[float], slider_label: str, slider_values: Sequence[float],
                frames: Sequence[Sequence[Sequence[dict[str, Any]]]],
                options: Sequence[str] | None = None, option_label: str = "",
                static: Sequence[dict[str, Any]] = (), background: Sequence = (),
                notes: Sequence[Sequence[str]] | None = None, initial: int = 0,
                digits: int = 2, aspect: str = "auto", height: int = 300,
                grid: Sequence[float] | None = None) -> Any:
    """An interactive figure for the built book: a slider over ``slider_values`` (and, with
    ``options``, a choice between them), each combination one precomputed frame.

    ``frames[k][i]`` is the list of :func:`series` drawn for option ``k`` (0 without options)
    and slider position ``i``; ``static`` series are drawn in every frame, ``background`` is a
    list of (xs, ys) grey polylines (contour lines, say), ``grid`` the x values of every series
    given without its own. ``notes[k][i]`` is a line of text shown under the figure. Returns an
    ``IPython.display.HTML`` whose element has the id ``name``.
    """
    n_options = len(options) if options else 1
    if len(frames) != n_options or any(len(f) != len(slider_values) for f in frames):
        raise ValueError(f"{name}: frames must be one list per option ({n_options}) of one frame "
                         f"per slider value ({len(slider_values)})")
    every = [s for f in frames for frame in f for s in frame] + list(static)
    for s in every:
        if "x" not in s and (grid is None or len(grid) != len(s["y"])):
            raise ValueError(f"{name}: series {s['label']!r} has no x and no grid of its length")
    labels = [s["label"] for s in every]
    if not any(labels):
        raise ValueError(f"{name}: no series has a label, so the figure would have no legend")
    if notes is not None and [len(n) for n in notes] != [len(slider_values)] * n_options:
        raise ValueError(f"{name}: notes must have the shape of frames")
    spec = {
        "xlabel": xlabel, "ylabel": ylabel, "xlim": list(xlim), "ylim": list(ylim),
        "aspect": aspect, "height": height,
        "slider": {"label": slider_label, "values": [float(v) for v in slider_values],
                   "digits": digits, "initial": initial},
        "choice": ({"label": option_label, "options": list(options), "initial": 0}
                   if options else None),
        "background": [[[round(float(v), 3) for v in xs], [round(float(v), 3) for v in ys]]
                       for xs, ys in background],
        "static": list(static), "frames": [list(f) for f in frames], "notes": notes,
        "grid": None if grid is None else [round(float(v), 4) for v in grid],
    }
    # "</" would end the <script> element early; JSON allows the escaped form.
    payload = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    from IPython.display import HTML

    return HTML(f'<div class="labkit-interactive" id="{html.escape(name)}">'
                f'<script type="application/json">{payload}</script>'
                "<noscript>This interactive figure needs JavaScript.</noscript></div>")
