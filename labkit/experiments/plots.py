"""One plot helper per paper figure the labs reproduce.

Book: chapter 4 (the power-eta thesis Fig. 1-2: test accuracy curves of Adam/AMSGrad with power
eta) and
chapter 8 (Sato & Iiduka 2024, arXiv:2402.02325: Fig. 4 SFO complexity vs batch size
with the critical batch size, Fig. 5 smoothing degree vs batch size, Fig. 6 test accuracy vs
batch size, Fig. 7 test accuracy vs smoothing degree, Fig. 8 sharpness vs smoothing degree).

Every helper takes tables (``pandas.DataFrame`` from :mod:`labkit.experiments.results`) or
dicts, never folders; draws on ``ax`` (a new figure when None) and returns the ``Axes``.
Where several runs share a point (seeds), the line is their mean and the shaded band spans
their minimum to maximum, as in the papers. ``paper=True`` overlays the published values of
:data:`labkit.critical.PAPER_VALUES`, labelled "paper". matplotlib is imported inside the
functions, so importing this module does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "OPTIMIZER_COLORS",
    "OPTIMIZER_LABELS",
    "plot_accuracy_curves",
    "plot_accuracy_vs_batch_size",
    "plot_accuracy_vs_delta",
    "plot_delta_vs_batch_size",
    "plot_sfo_vs_batch_size",
    "plot_sharpness_vs_delta",
]

OPTIMIZER_COLORS = {"sgd": "C0", "shb": "C1", "nshb": "C2", "nesterov": "C3", "adagrad": "C4",
                    "rmsprop": "C5", "adam": "C6", "amsgrad": "C7"}
OPTIMIZER_LABELS = {"sgd": "SGD", "shb": "SHB", "nshb": "NSHB", "nesterov": "Nesterov",
                    "adagrad": "AdaGrad", "rmsprop": "RMSProp", "adam": "Adam",
                    "amsgrad": "AMSGrad"}
# Sato & Iiduka (2024) Fig. 7's background: >= 70% high, >= 65% intermediate, < 65% poor
# generalization.
_PAPER_BANDS = ((70.0, 100.0, "tab:green", "high"), (65.0, 70.0, "tab:blue", "intermediate"),
                (0.0, 65.0, "tab:red", "poor"))


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    return ax


def _label(optimizer: Any) -> str:
    return OPTIMIZER_LABELS.get(optimizer, str(optimizer))


def _color(optimizer: Any) -> str | None:
    return OPTIMIZER_COLORS.get(optimizer)


def _require(df: Any, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} needs the column(s) {', '.join(missing)}; the table has "
            f"{', '.join(map(str, df.columns))}"
        )


def _filter_status(df: Any, statuses: Sequence[str] | None) -> Any:
    if statuses is None or "status" not in df.columns:
        return df
    return df[df["status"].isin(list(statuses))]


def _scale(metric: str) -> tuple[float, str]:
    """Accuracies are stored in [0, 1] and plotted in percent."""
    if metric.endswith("_acc"):
        return 100.0, f"{metric.replace('_acc', '').replace('_', ' ')} accuracy (%)"
    return 1.0, metric.replace("_", " ")


def _line_band(ax: Any, x: Any, mean: Any, lo: Any, hi: Any, **kw: Any) -> Any:
    (line,) = ax.plot(x, mean, **kw)
    if any(h > low for low, h in zip(lo, hi, strict=True)):
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def _summary(df: Any, x: str, y: str) -> Any:
    """mean / min / max of ``y`` per value of ``x`` (NaN and inf dropped), sorted by ``x``."""
    import numpy as np

    d = df[[x, y]].replace([np.inf, -np.inf], np.nan).dropna()
    return d.groupby(x)[y].agg(["mean", "min", "max"]).sort_index()


def _log2_axis(ax: Any, axis: str = "x") -> None:
    if axis == "x":
        ax.set_xscale("log", base=2)
    else:
        ax.set_yscale("log", base=2)


def _paper_accuracy_bands(ax: Any) -> None:
    # Shade the bands without letting them stretch the y axis away from the data.
    ylim = ax.get_ylim()
    for lo, hi, color, name in _PAPER_BANDS:
        ax.axhspan(lo, hi, color=color, alpha=0.08, linewidth=0,
                   label=f"paper: {name} ({lo:g}-{hi:g}%)")
    ax.set_ylim(ylim)


def plot_accuracy_vs_batch_size(
    results: Any,
    *,
    metric: str = "test_acc",
    by: str = "optimizer",
    statuses: Sequence[str] | None = ("finished",),
    paper: bool = False,
    ax: Any = None,
) -> Any:
    """Test accuracy vs batch size, one line per optimizer (Sato & Iiduka (2024) Fig. 6).

    Args:
        results: :func:`~labkit.experiments.load_results` (columns ``batch_size``, ``by``,
            ``metric``).
        metric: the accuracy column (plotted in percent).
        by: the column that makes the lines.
        statuses: keep only runs with these statuses (None: all).
        paper: shade the paper's generalization bands (>= 70% high, >= 65% intermediate).
        ax: the Axes to draw on.

    The x axis is log2, as in the paper.
    """
    _require(results, ["batch_size", by, metric], "plot_accuracy_vs_batch_size")
    df = _filter_status(results, statuses)
    if df.empty:
        raise ValueError(f"no runs to plot: none has a status in {statuses}")
    ax = _axes(ax)
    scale, ylabel = _scale(metric)
    for key, g in df.groupby(by, sort=False):
        s = _summary(g, "batch_size", metric) * scale
        _line_band(ax, s.index, s["mean"], s["min"], s["max"], marker="o",
                   color=_color(key) if by == "optimizer" else None,
                   label=_label(key) if by == "optimizer" else f"{by} = {key}")
    if paper:
        _paper_accuracy_bands(ax)
    _log2_axis(ax)
    ax.set_xlabel("batch size b")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_delta_vs_batch_size(
    c2: Mapping[str, float] | None = None,
    *,
    lr: float = 0.1,
    beta: float = 0.9,
    k2: Mapping[str, float] | float | None = None,
    batch_sizes: Sequence[int] | None = None,
    paper: bool = False,
    ax: Any = None,
) -> Any:
    """Smoothing degree delta vs batch size, one line per optimizer (Sato & Iiduka (2024) Fig. 5).

    delta from :func:`labkit.critical.smoothing_degree` (eqs. (12)-(14)).

    Args:
        c2: optimizer ("sgd", "shb", "nshb") -> estimated C^2 (e.g. from
            :func:`labkit.critical.c2_upper_bound`). None with ``paper=True`` draws only the
            paper's curves.
        lr: learning rate eta.
        beta: momentum of SHB and NSHB.
        k2: K^2 for SHB (a number or optimizer -> K^2).
        batch_sizes: default 2^3 ... 2^13 (the paper's grid).
        paper: add dashed curves from the paper's C^2 bounds and the K of the authors' code
            (labelled "paper").
        ax: the Axes to draw on.

    The x axis is log2 and the y axis log10.
    """
    import numpy as np

    from labkit import critical

    if c2 is None and not paper:
        raise ValueError("give c2 (optimizer -> C^2), or paper=True for the paper's curves")
    bs = np.asarray(batch_sizes if batch_sizes is not None else
                    critical.PAPER_VALUES["batch_sizes"], dtype=float)
    if bs.size == 0:
        raise ValueError("batch_sizes is empty; give at least one batch size")
    ax = _axes(ax)

    def draw(c2s: Mapping[str, float], lr_: float, beta_: float, k2s: Any, style: str,
             prefix: str) -> None:
        for opt, value in c2s.items():
            k2_opt = k2s.get(opt) if isinstance(k2s, Mapping) else k2s
            if opt == "shb" and k2_opt is None:
                raise ValueError(
                    "k2 (K^2) is required for SHB's delta (Sato & Iiduka 2024, eq. 13); "
                    "the authors' code uses K = 1.77 for ResNet-18 (k2=1.77**2)"
                )
            d = critical.smoothing_degree(opt, lr=lr_, batch_size=bs, c2=value, beta=beta_,
                                       k2=k2_opt)
            ax.plot(bs, d, style, color=_color(opt), marker="o" if not prefix else None,
                    label=f"{prefix}{_label(opt)} (C²={value:g})")

    if c2 is not None:
        draw(c2, lr, beta, k2, "-", "")
    if paper:
        pv = critical.PAPER_VALUES
        draw(pv["c2_upper_bound"], pv["lr"], pv["beta"],
             {opt: k**2 for opt, k in pv["k"].items()}, "--", "paper: ")
    _log2_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("batch size b")
    ax.set_ylabel("smoothing degree δ")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_accuracy_vs_delta(
    results: Any,
    c2: Mapping[str, float],
    *,
    k2: Mapping[str, float] | float | None = None,
    metric: str = "test_acc",
    statuses: Sequence[str] | None = ("finished",),
    paper: bool = False,
    ax: Any = None,
) -> Any:
    """Test accuracy vs smoothing degree, one line per optimizer (Sato & Iiduka (2024) Fig. 7
    right).

    Each run's delta comes from :func:`~labkit.experiments.add_delta` (its lr, batch size and
    beta with the given C^2 and K^2); runs with the same delta (seeds) are averaged.

    Args:
        results: :func:`~labkit.experiments.load_results`.
        c2: optimizer -> C^2 estimate; only these optimizers are drawn.
        k2: K^2 for SHB.
        metric: the accuracy column (plotted in percent).
        statuses: keep only runs with these statuses (None: all).
        paper: shade the paper's best range of delta (0.2 to 1) and its generalization bands.
        ax: the Axes to draw on.

    The x axis is log10, as in the paper.
    """
    from labkit import critical
    from labkit.experiments.results import add_delta

    _require(results, ["optimizer", "lr", "batch_size", metric], "plot_accuracy_vs_delta")
    df = _filter_status(results, statuses)
    df = add_delta(df[df["optimizer"].isin(list(c2))], c2, k2)
    if df.empty:
        raise ValueError(
            f"no runs to plot: none of optimizer {', '.join(c2)} with a status in {statuses}"
        )
    ax = _axes(ax)
    scale, ylabel = _scale(metric)
    for opt, g in df.groupby("optimizer", sort=False):
        s = _summary(g, "delta", metric) * scale
        _line_band(ax, s.index, s["mean"], s["min"], s["max"], marker="o", color=_color(opt),
                   label=_label(opt))
    if paper:
        lo, hi = critical.PAPER_VALUES["best_delta_range"]
        ax.axvspan(lo, hi, color="0.5", alpha=0.12, linewidth=0,
                   label=f"paper: best δ ≈ {lo:g}-{hi:g}")
        _paper_accuracy_bands(ax)
    ax.set_xscale("log")
    ax.set_xlabel("smoothing degree δ")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def _sfo_lines(sfo: Any) -> list[tuple[str, str, Any]]:
    """(optimizer, label, DataFrame indexed by batch size with mean, min, max) per line."""
    import pandas as pd

    lines = []
    if isinstance(sfo, Mapping):
        for opt, table in sfo.items():
            if not isinstance(table, Mapping):
                raise TypeError(
                    f"sfo[{opt!r}] must be a mapping batch size -> SFO complexity; got "
                    f"{type(table).__name__}"
                )
            s = pd.Series({int(b): float(v) for b, v in table.items()}, dtype=float).sort_index()
            lines.append((opt, _label(opt), pd.DataFrame({"mean": s, "min": s, "max": s})))
        return lines
    curves = list(sfo)
    for c in curves:
        if not all(hasattr(c, attr) for attr in ("optimizer", "lr", "beta", "sfo", "spread")):
            raise TypeError("sfo must be a mapping optimizer -> {batch size: SFO} or a list of "
                            f"labkit.experiments.SFOCurve; got an item {type(c).__name__}")
    many = {c.optimizer for c in curves if sum(d.optimizer == c.optimizer for d in curves) > 1}
    for c in curves:
        rows = {b: (v, *c.spread.get(b, (v, v))) for b, v in sorted(c.sfo.items())}
        df = pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "min", "max"],
                                    dtype=float)
        label = _label(c.optimizer)
        if c.optimizer in many:
            label += f" η={c.lr:g}" + ("" if c.beta is None else f" β={c.beta:g}")
        lines.append((c.optimizer, label, df))
    return lines


def plot_sfo_vs_batch_size(sfo: Any, *, paper: bool = False, ax: Any = None) -> Any:
    """SFO complexity T b vs batch size, with the critical batch size b* ringed (Sato & Iiduka
    (2024) Fig. 4).

    Args:
        sfo: a list of :class:`~labkit.experiments.SFOCurve` (:func:`~labkit.experiments.
            sfo_curves`; the line is the mean over seeds and the band spans their smallest to
            largest T b, as in the paper), or a mapping optimizer -> {batch size: SFO}. Batch
            sizes that did not reach eps (inf) are left out.
        paper: mark the paper's critical batch sizes (2^9, 2^10, 2^9) with dotted lines.
        ax: the Axes to draw on.

    b* is :func:`labkit.critical.critical_batch_size` of each line. x is log2, y log10.
    """
    import numpy as np

    from labkit import critical

    lines = _sfo_lines(sfo)
    if not lines:
        raise ValueError("sfo is empty: no SFO complexities to plot")
    ax = _axes(ax)
    for opt, label, t in lines:
        finite = t[np.isfinite(t["mean"])]
        if finite.empty:
            continue  # no batch size reached eps: nothing to draw
        line = _line_band(ax, finite.index, finite["mean"], finite["min"], finite["max"],
                          marker="o", color=_color(opt), label=label)
        b_star = critical.critical_batch_size(dict(zip(t.index, t["mean"], strict=True)))
        ax.plot([b_star], [t.loc[b_star, "mean"]], linestyle="none", marker="o", markersize=14,
                markerfacecolor="none", markeredgewidth=1.5, color=line.get_color(),
                label=f"b* ({label}) = {b_star}")
    tables = {opt for opt, _, _ in lines}
    if paper:
        for opt, b in critical.PAPER_VALUES["critical_batch_size"].items():
            if opt in tables:
                ax.axvline(b, linestyle=":", color=_color(opt),
                           label=f"paper: b* ({_label(opt)}) = 2^{int(math.log2(b))}")
    _log2_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("batch size b")
    ax.set_ylabel("SFO complexity T·b")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_sharpness_vs_delta(
    df: Any,
    *,
    x: str = "delta",
    y: str = "sharpness",
    by: str = "lr",
    colorbar: bool = True,
    ax: Any = None,
) -> Any:
    """Sharpness vs smoothing degree (Sato & Iiduka (2024) Fig. 8 (c); other panels via ``x`` and
    ``y``).

    One line per value of ``by`` (the learning rate in the paper) through the mean over seeds,
    with the min-max band, plus every run as a dot whose darkness grows with its batch size.
    ``x="batch_size"`` gives panel (a), ``x="lr"`` (b), ``x="sharpness", y="test_acc"`` (d),
    ``x="delta", y="test_acc"`` (e).

    Args:
        df: one row per run with columns ``x``, ``y``, ``by`` and ``batch_size`` (e.g.
            :func:`~labkit.experiments.add_delta` of the results with a ``sharpness`` column
            from :func:`~labkit.experiments.measure_sharpness`).
        colorbar: add a colorbar for log2 of the batch size.
        ax: the Axes to draw on.

    The x axis is log2 for ``batch_size``, log10 when all x values are positive, else linear.
    """
    import numpy as np

    _require(df, [x, y, by, "batch_size"], "plot_sharpness_vs_delta")
    if df.empty:
        raise ValueError("df is empty: no runs to plot")
    ax = _axes(ax)
    xs, xlabel = _scale(x)
    ys, ylabel = _scale(y)
    labels = {"delta": "smoothing degree δ", "lr": "learning rate η", "batch_size": "batch size b"}
    log_b = np.log2(df["batch_size"].astype(float))
    norm = (float(log_b.min()), float(log_b.max()) if log_b.max() > log_b.min()
            else float(log_b.min()) + 1)
    scatter = None
    for key, g in df.groupby(by, sort=True):
        s = _summary(g, x, y)
        _line_band(ax, s.index * xs, s["mean"] * ys, s["min"] * ys, s["max"] * ys,
                   label=f"{by} = {key:g}" if isinstance(key, (int, float)) else f"{by} = {key}")
        scatter = ax.scatter(g[x] * xs, g[y] * ys, c=np.log2(g["batch_size"].astype(float)),
                             cmap="Greys", vmin=norm[0] - 1, vmax=norm[1], edgecolors="k",
                             linewidths=0.3, s=22, zorder=3)
    if x == "batch_size":
        _log2_axis(ax)
    elif (df[x] > 0).all():
        ax.set_xscale("log")
    if colorbar and scatter is not None:
        ax.figure.colorbar(scatter, ax=ax, label="log2 batch size")
    ax.set_xlabel(labels.get(x, xlabel))
    ax.set_ylabel(labels.get(y, ylabel))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def _value_label(by: str, value: Any) -> str:
    name = {"eta": "η", "beta": "β", "lr": "lr"}.get(by, by)
    if isinstance(value, float) and math.isfinite(value):
        frac = Fraction(value).limit_denominator(12)
        if abs(float(frac) - value) < 1e-9 and frac.denominator != 1:
            return f"{name} = {frac.numerator}/{frac.denominator}"
        return f"{name} = {value:g}"
    return f"{name} = {value}"


def plot_accuracy_curves(
    history: Any,
    *,
    by: str = "eta",
    metric: str = "test_acc",
    statuses: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """Accuracy per epoch, one line per value of ``by`` (the power-eta thesis Fig. 1-2: eta).

    Args:
        history: :func:`~labkit.experiments.load_history` (columns ``epoch``, ``by``,
            ``metric``); runs with the same ``by`` value (seeds) are averaged per epoch.
        by: the column that makes the lines (``eta`` for the power-eta Adam/AMSGrad).
        metric: the per-epoch column (accuracies in percent).
        statuses: keep only runs with these statuses (None: all, including running ones).
        ax: the Axes to draw on.
    """
    _require(history, ["epoch", by, metric], "plot_accuracy_curves")
    df = _filter_status(history, statuses)
    if df.empty:
        raise ValueError("history is empty: no epochs to plot")
    ax = _axes(ax)
    scale, ylabel = _scale(metric)
    for key, g in df.groupby(by, sort=True):
        s = _summary(g, "epoch", metric) * scale
        _line_band(ax, s.index, s["mean"], s["min"], s["max"],
                   label=_value_label(by, key))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax
