"""Lab 3, the critical batch size (``labs/lab3_critical_batch.ipynb``), and what lab 4 shares.

Reproduces Sato & Iiduka (2024) Fig. 4 and §4.3 ("Role of momentum in smoothing
objective function and generalizability of deep neural networks", arXiv:2402.02325): SGD, SHB
and NSHB over a grid of batch sizes b; T(b) is the first step at which the running mean of the
mini-batch gradient norms, (1/t) sum_{s<=t} ||grad f_{S_s}(x_{s-1})||, is <= eps, tested after
the first epochs as in the authors' code; the SFO complexity is T b and the critical batch size
b* = argmin_b T b. Theorem 4.4 read backwards turns b* into an upper bound on C^2, which the lab
sets beside C^2 measured directly at the runs' final weights
(:func:`labkit.noise.gradient_variance`). Book: chapter 8 (critical batch size, estimating C^2).

How T is measured: by :mod:`labkit.experiments.sfo`, the one path from the runs' per-step
gradient-norm logs to T, the SFO table, b* and the C^2 bound (:func:`sfo` applies it to a
panel's runs). The runs are ordinary sweep runs of a fixed number of epochs, trained in fp32
with TF32 off (the ``precision`` knob; :mod:`labkit.precision`); T is computed after training,
so changing eps or the skipped epochs trains nothing.

Lab 4 (:mod:`labkit.labs.lab4`) trains the same sweep and takes from here the methods and batch
sizes of Sato & Iiduka (2024) (:data:`OPTIMIZERS`, :data:`BATCH_SIZES`), the panel's optimizer and
batch-size selectors and their checks, the grid (:func:`grid`), the run names (:func:`label`) and
C^2 measured at the runs' final weights (:func:`gradient_stats_of_sweep`,
:func:`max_by_optimizer`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labkit import critical, store
from labkit import widgets as lk_widgets
from labkit.experiments import sfo as lk_sfo
from labkit.experiments.results import GRADIENT_STATS_FILE, measure_gradient_stats
from labkit.labs.setup import (
    check_profile,
    is_finite,
    is_int_at_least,
    is_positive,
    selection_messages,
)
from labkit.precision import MEASUREMENT_PRECISION
from labkit.train import TrainConfig

__all__ = [
    "BATCH_SIZES",
    "DATASETS",
    "GRADIENT_STATS_FILE",
    "LAB_ID",
    "OPTIMIZERS",
    "OPTIMIZER_LABELS",
    "PRECISIONS",
    "batch_size_selector",
    "controls",
    "defaults",
    "figure",
    "format_theorem_4_4_table",
    "gradient_stats_of_sweep",
    "grid",
    "label",
    "max_by_optimizer",
    "measure_gradient_stats",
    "on_result",
    "optimizer_selector",
    "run_table",
    "sfo",
    "sized_figure",
    "validate",
    "validate_sweep",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab3_critical_batch"

#: The three methods of Sato & Iiduka (2024), in its order.
OPTIMIZERS: tuple[str, ...] = ("sgd", "shb", "nshb")
OPTIMIZER_LABELS = {"sgd": "SGD", "shb": "SHB", "nshb": "NSHB"}
#: The paper's batch sizes, 2^3 ... 2^13.
BATCH_SIZES: tuple[int, ...] = tuple(critical.PAPER_VALUES["batch_sizes"])
#: The data set of each profile. The smoke profile uses the generated 10-class set: the
#: generated 100-class set has 5 images per class, which the tiny CNN does not learn in a few
#: epochs, so its gradient norms never fall and no batch size would reach eps.
#: The cpu profile trains on scikit-learn's handwritten digits (labkit.digits).
DATASETS = {"smoke": "cifar10", "cpu": "digits", "short": "cifar100", "paper": "cifar100"}
#: The cpu profile's threshold: the smallest eps (two decimals) that every run of its defaults
#: reaches after the 11 skipped epochs. Measured: the highest lowest running mean of the 21
#: runs was 1.170 (NSHB, b = 64); the lowest of SGD's runs, 1.143, also at b = 64.
CPU_EPS = 1.18
#: The ``precision`` knob: the runs are measurements, so fp32 with TF32 off by default.
PRECISIONS = {MEASUREMENT_PRECISION: "fp32, TF32 off (measurement)",
              "auto": "bf16 autocast on CUDA (faster; labkit 0.2's runs)"}


# =========================================================================== T and SFO of a panel


def sfo(panel: Any) -> Any:
    """:func:`labkit.experiments.sfo_of_sweep` of a lab 3 panel's runs, with the panel's eps
    and skipped epochs (``panel.values()["eps"]``, ``["skip_epochs"]``): one row per run with
    its T and T b."""
    values = panel.values()
    return lk_sfo.sfo_of_sweep(panel.out_dir, values["eps"], skip_epochs=values["skip_epochs"],
                               runs=list(panel.results["run"]))


def format_theorem_4_4_table() -> str:
    """Theorem 4.4 with the paper's values (eta = 0.1, beta = 0.9, eps = 0.5): the factor c of
    b* > c eta C^2 / eps^2, the measured b* and the C^2 bound, one line per optimizer."""
    pv = critical.PAPER_VALUES
    lines = ["optimizer | factor c |   b* | C^2 bound (formula) | C^2 bound (printed)"]
    for opt in OPTIMIZERS:
        beta = None if opt == "sgd" else pv["beta"]
        c = critical.theorem_4_4_factor(opt, beta)
        b = pv["critical_batch_size"][opt]
        bound = critical.c2_upper_bound(opt, critical_batch_size=b, lr=pv["lr"], eps=pv["eps"],
                                        beta=beta)
        lines.append(f"{OPTIMIZER_LABELS[opt]:>9} | {c:8.4f} | {b:4d} | {bound:19.4f} | "
                     f"{pv['c2_upper_bound'][opt]:g}")
    return "\n".join(lines)


# =========================================================================== measured C^2


def gradient_stats_of_sweep(folder: str | os.PathLike, *, runs: Sequence[str] | None = None,
                            n_images: int = 1024, seed: int = 0,
                            chunk_size: int = 64) -> Any:
    """:func:`measure_gradient_stats` of every finished run of a sweep folder.

    Returns a ``pandas.DataFrame``, one row per run: ``run``, ``optimizer``, ``batch_size``,
    ``seed``, ``status``, ``c2``, ``grad_norm_sq`` (||grad f||^2) and ``note`` (why a run has
    no values: not finished, or diverged). Each data set is loaded once.
    """
    import pandas as pd

    from labkit.experiments import load_results
    from labkit.train import prepare_data, resolve_device

    folder = Path(folder)
    results = load_results(folder)
    if runs is not None:
        results = results[results["run"].isin(list(runs))]
    datasets: dict[tuple, Any] = {}
    rows = []
    for _, r in results.iterrows():
        row = {"run": r["run"], "optimizer": r["optimizer"], "batch_size": int(r["batch_size"]),
               "seed": int(r["seed"]), "status": r["status"], "c2": math.nan,
               "grad_norm_sq": math.nan, "note": ""}
        run_folder = folder / str(r["folder"])
        if r["status"] != "finished":
            row["note"] = f"not measured: the run is {r['status']}"
            rows.append(row)
            continue
        cfg = TrainConfig.from_dict(json.loads((run_folder / "config.json").read_text()))
        cfg = cfg.resolved()
        key = (cfg.dataset, cfg.profile, cfg.data_root, cfg.device)
        if key not in datasets:
            datasets[key] = prepare_data(cfg, resolve_device(cfg.device))
        stats = measure_gradient_stats(run_folder, n_images=n_images, seed=seed,
                                       chunk_size=chunk_size, device=cfg.device,
                                       data=datasets[key])
        row.update(c2=stats.c2, grad_norm_sq=stats.full_grad_norm_sq)
        rows.append(row)
    columns = ["run", "optimizer", "batch_size", "seed", "status", "c2", "grad_norm_sq", "note"]
    return pd.DataFrame(rows, columns=columns)


def max_by_optimizer(stats: Any, column: str = "c2") -> dict[str, float]:
    """The largest finite ``column`` per optimizer (Sato & Iiduka's (2024) constants bound every
    iterate of
    every run, so the largest value measured is the best lower estimate)."""
    out: dict[str, float] = {}
    if column not in getattr(stats, "columns", ()):
        raise ValueError(f"stats has no column {column!r}; it has {', '.join(stats.columns)}")
    for opt in [o for o in OPTIMIZERS if o in set(stats["optimizer"])]:
        values = stats.loc[stats["optimizer"] == opt, column].astype(float)
        values = values[np.isfinite(values)]
        if len(values):
            out[opt] = float(values.max())
    return out


# =========================================================================== the panels' knobs
# Shared with lab 4 (labkit.labs.lab4 imports them).


def optimizer_selector() -> Any:
    """The multi-select of Sato & Iiduka's (2024) optimizers (SGD, SHB, NSHB), shared with lab 4."""
    return lk_widgets.multi_select(
        "optimizers", [("SGD", "sgd"), ("SHB (heavy ball)", "shb"),
                       ("NSHB (normalized heavy ball)", "nshb")])


def batch_size_selector() -> Any:
    """The multi-select of the paper's batch sizes 2^3 ... 2^13, shared with lab 4."""
    return lk_widgets.multi_select("batch sizes b", [(str(b), b) for b in BATCH_SIZES], rows=6)


def label(config: TrainConfig) -> str:
    """``"SGD b=64"``, ``"SHB b=512 s1"`` (seeds other than 0 get a suffix)."""
    name = OPTIMIZER_LABELS.get(config.optimizer, config.optimizer)
    return f"{name} b={config.batch_size}" + (f" s{config.seed}" if config.seed else "")


def validate_sweep(values: Mapping[str, Any], max_seeds: int) -> list[str]:
    """Why the sweep knobs that labs 3 and 4 share cannot run, as messages (empty if they can):
    optimizers, batch sizes, learning rate, beta, epochs, seeds (at most ``max_seeds``)."""
    opts = tuple(values.get("optimizers") or ())
    msgs = selection_messages(opts, "optimizer", OPTIMIZERS)
    sizes = tuple(values.get("batch_sizes") or ())
    msgs += selection_messages(sizes, "batch size")
    if sizes and any(not is_int_at_least(b, 1) for b in sizes):
        msgs.append(f"batch sizes must be integers >= 1; got {sizes}")
    if not is_positive(values.get("lr")):
        msgs.append(f"learning rate η must be > 0; got {values.get('lr')}")
    beta = values.get("beta")
    beta_ok = (not isinstance(beta, bool) and isinstance(beta, (int, float))
               and math.isfinite(beta))
    if "shb" in opts and not (beta_ok and 0 < beta < 1):
        msgs.append(f"momentum β must be in (0, 1) for SHB (Theorem 4.4 and eq. (13) divide by "
                    f"β or 1 - β); got {beta}")
    elif "nshb" in opts and not (beta_ok and 0 <= beta < 1):
        msgs.append(f"momentum β must be in [0, 1) for NSHB; got {beta}")
    for name in ("epochs", "seeds"):
        v = values.get(name)
        if not is_int_at_least(v, 1):
            msgs.append(f"{name} must be an integer >= 1; got {v}")
    if is_int_at_least(values.get("seeds"), 1) and values["seeds"] > max_seeds:
        msgs.append(f"seeds must be at most {max_seeds}; got {values['seeds']}")
    n = values.get("c2_images")
    if not is_int_at_least(n, 2):
        msgs.append(f"images for the measured C² must be an integer >= 2; got {n}")
    return msgs


# =========================================================================== lab 3's panel

_DEFAULTS = {
    # CPU, generated 10-class data, tiny CNN: 12 runs of 3 epochs. The test skips 1 epoch
    # (labkit.experiments.sfo.SKIP_EPOCHS: 11 would leave nothing to test).
    "smoke": {"batch_sizes": (16, 32, 64, 128), "eps": 1.3, "epochs": 3, "seeds": 1,
              "c2_images": 128},
    # CPU: the handwritten digits (1,347 training images) and the tiny CNN; b = 2^4 ... 2^10,
    # 60 epochs, the test skips 11 as in the authors' code; eps measured so that every run of
    # the three optimizers reaches it. Measured: 210 s of CPU time for the 21 runs on one core
    # (16 min wall on a 2-core machine shared with five other jobs). b = 8 alone would cost
    # about as much CPU time as the seven batch sizes together.
    "cpu": {"batch_sizes": tuple(2**k for k in range(4, 11)), "eps": CPU_EPS, "epochs": 60,
            "seeds": 1, "c2_images": 1024},
    # One GPU: ResNet-18 on CIFAR-100, the batch sizes around the paper's b*, 15 epochs, the
    # test skips 2. The looser eps = 1 is reached within them (the paper's 0.5 needs longer).
    "short": {"batch_sizes": (128, 256, 512, 1024, 2048), "eps": 1.0, "epochs": 15,
              "seeds": 1, "c2_images": 1024},
    # Sato & Iiduka (2024) §4.3 and Fig. 4: b = 2^3 ... 2^13, eps = 0.5, three runs per batch
    # size (the figure plots their mean and spread), the test skips 11 epochs (authors' code).
    "paper": {"batch_sizes": BATCH_SIZES, "eps": 0.5, "epochs": 200, "seeds": 3,
              "c2_images": 2048},
}


def controls() -> dict[str, Any]:
    """The knobs of lab 3's panel. ``eps``, ``skip_epochs`` and ``c2_images`` only change the
    analysis: changing them reloads the runs and trains nothing."""
    W = lk_widgets
    return {
        "optimizers": optimizer_selector(),
        "batch_sizes": batch_size_selector(),
        "lr": W.float_text("learning rate η", 0.1),
        "beta": W.float_text("momentum β (SHB, NSHB)", 0.9),
        "eps": W.float_text("threshold ε", 0.5),
        "skip_epochs": W.int_text("epochs the test skips", lk_sfo.AUTHORS_SKIP_EPOCHS),
        "epochs": W.int_slider("epochs", 1, 200, 4),
        "seeds": W.int_slider("seeds", 1, 3, 1),
        "c2_images": W.int_text("images for the measured C²", 1024),
        "precision": W.dropdown("precision", [(v, k) for k, v in PRECISIONS.items()]),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (η = 0.1 and β = 0.9 as in the paper; the skipped
    epochs of :data:`labkit.experiments.sfo.SKIP_EPOCHS`; fp32 runs)."""
    check_profile(profile)
    return {"optimizers": OPTIMIZERS, "lr": 0.1, "beta": 0.9,
            "skip_epochs": lk_sfo.SKIP_EPOCHS[profile], "precision": MEASUREMENT_PRECISION,
            **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 3's knobs cannot run, as messages (empty when they can)."""
    msgs = validate_sweep(values, max_seeds=3)
    eps = values.get("eps")
    if not is_positive(eps):
        msgs.append(f"threshold ε must be > 0 (a gradient norm); got {eps}")
    m, e = values.get("skip_epochs"), values.get("epochs")
    if not is_int_at_least(m, 0):
        msgs.append(f"the epochs the test skips must be an integer >= 0; got {m}")
    elif is_int_at_least(e, 1) and m >= e:
        msgs.append(f"the test skips {m} epochs but the runs have only {e}: no step would be "
                    f"tested; skip fewer than {e} epochs or train longer")
    if values.get("precision", MEASUREMENT_PRECISION) not in PRECISIONS:
        msgs.append(f"precision must be one of {', '.join(PRECISIONS)}; "
                    f"got {values.get('precision')!r}")
    return msgs


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 3's knobs ask for: optimizer x batch size x seed, each ``epochs`` long.

    CIFAR-100 with ResNet-18 in short/paper (the generated 10-class set and the tiny CNN in
    smoke, see :data:`DATASETS`), constant learning rate, no weight decay, the standard
    augmentation, gradient norms tracked, the ``precision`` knob (default fp32 with TF32 off: the
    runs are measurements). eps and the skipped epochs do not enter: T is computed afterwards.
    """
    profile = check_profile(values["profile"])
    runs = []
    for opt in values["optimizers"]:
        hparams = {} if opt == "sgd" else {"beta": float(values["beta"])}
        for b in values["batch_sizes"]:
            for seed in range(values["seeds"]):
                runs.append(TrainConfig(
                    dataset=DATASETS[profile], optimizer=opt, lr=float(values["lr"]),
                    hparams=hparams, batch_size=int(b), epochs=values["epochs"], seed=seed,
                    weight_decay=0.0, track_grad_norm=True, profile=profile,
                    precision=values.get("precision", MEASUREMENT_PRECISION),
                ))
    return runs


def run_table(runs: Any) -> Any:
    """The columns of :func:`sfo`'s rows worth reading, one row per run."""
    cols = ["optimizer", "batch_size", "seed", "status", "epochs_completed", "first_step",
            "steps", "sfo", "reached", "lowest_mean"]
    return runs[cols].reset_index(drop=True)


def _thin(n: int, keep: int = 1500) -> np.ndarray:
    """Indices 0..n-1 to draw: all when few, else about ``keep`` spread evenly on a log axis."""
    if n <= keep:
        return np.arange(n)
    idx = np.unique(np.geomspace(1, n, keep).astype(np.int64) - 1)
    return np.union1d(idx, [n - 1])


def sized_figure(fig: Any, size: tuple[float, float]) -> Any:
    """``fig`` resized to ``size`` (inches), or a new constrained-layout figure of that size."""
    if fig is not None:
        fig.set_size_inches(*size)
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size, layout="constrained")


def figure(runs: Any, values: Mapping[str, Any],
           c2_measured: Mapping[str, float] | None = None, *, fig: Any = None) -> Any:
    """Sato & Iiduka (2024) Fig. 4 from your runs, and the C^2 bounds it implies.

    Top row, one panel per optimizer: the running mean of the mini-batch gradient norms
    against the examples processed t b, one line per run, with eps dashed; a line crosses eps
    (after the skipped epochs) at its SFO complexity T b (dot). Bottom left: SFO complexity
    against b, the mean over seeds with their spread shaded, b* ringed and the paper's b*
    dotted (labelled as the paper's). Bottom right: C^2 per optimizer: your Theorem 4.4 bound
    from your b*, the value measured at your runs' final weights (``c2_measured``) and the
    paper's bound.

    Args:
        runs: :func:`sfo` (rows of :func:`labkit.experiments.sfo_of_sweep`).
        values: the panel's values (``eps``).
        c2_measured: optimizer -> measured C^2 (:func:`max_by_optimizer`).
        fig: a matplotlib ``Figure`` to draw into (e.g. :func:`labkit.widgets.new_figure`);
            None makes one with pyplot.

    Raises:
        ValueError: ``runs`` is empty.
    """
    import matplotlib as mpl

    from labkit.experiments import plot_sfo_vs_batch_size

    if runs is None or len(runs) == 0:
        raise ValueError("runs is empty: run the panel first (panel.run())")
    eps = float(values["eps"])
    opts = [o for o in OPTIMIZERS if o in set(runs["optimizer"])]
    fig = sized_figure(fig, (4.4 * max(len(opts), 2) + 1, 7.6))
    mosaic = [opts, ["sfo"] * (len(opts) - 1) + ["c2"]] if len(opts) > 1 else \
        [[opts[0], "sfo", "c2"]]
    axes = fig.subplot_mosaic(mosaic)
    sizes = sorted(set(int(b) for b in runs["batch_size"]))
    norm = mpl.colors.Normalize(math.log2(sizes[0]) - 0.5, math.log2(sizes[-1]) + 0.5)
    cmap = mpl.colormaps["viridis"]
    for opt in opts:
        ax = axes[opt]
        for _, r in runs[runs["optimizer"] == opt].sort_values("batch_size").iterrows():
            norms = store.read_grad_norms(r["folder"])
            if norms is None or norms.size == 0:
                continue
            m = lk_sfo.running_mean(norms)
            idx = _thin(m.size)
            b = int(r["batch_size"])
            color = cmap(norm(math.log2(b)))
            # One legend entry per batch size: its seeds share its colour.
            label = f"b = {b}" if not r["seed"] else "_seed"
            ax.plot((idx + 1) * b, m[idx], color=color, lw=1.2, label=label)
            if r["reached"]:
                ax.plot([r["sfo"]], [eps], "o", color=color, ms=6, markeredgecolor="k")
        ax.axhline(eps, color="k", ls="--", lw=1, label=f"ε = {eps:g}")
        ax.set_xscale("log")
        ax.set_xlabel("examples processed t·b")
        ax.set_ylabel("running mean of ‖∇f_S‖")
        ax.set_title(f"{OPTIMIZER_LABELS[opt]}: the test passes at T·b", fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", ncols=2 if len(sizes) > 6 else 1)
    curves = lk_sfo.sfo_curves(runs)
    ax = axes["sfo"]
    if any(c.critical_batch_size is not None for c in curves):
        plot_sfo_vs_batch_size(curves, paper=True, ax=ax)
    else:
        ax.text(0.5, 0.5, f"no batch size reached ε = {eps:g}:\nraise ε or train longer",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"SFO complexity T·b (Sato & Iiduka 2024, Fig. 4), ε = {eps:g}", fontsize="medium")
    bounds = {c.optimizer: c.c2_upper_bound for c in curves}
    _c2_bars(axes["c2"], opts, bounds, c2_measured or {})
    return fig


def _c2_bars(ax: Any, opts: Sequence[str], bounds: Mapping[str, float | None],
             measured: Mapping[str, float]) -> None:
    pv = critical.PAPER_VALUES["c2_upper_bound"]
    series = [("your bound (Thm 4.4, your b*)", bounds, "tab:blue"),
              ("measured at final weights", measured, "tab:orange"),
              ("paper's bound", pv, "0.55")]
    width = 0.8 / len(series)
    for k, (label, values, color) in enumerate(series):
        xs, ys = [], []
        for i, opt in enumerate(opts):
            v = values.get(opt)
            if is_finite(v) and v > 0:
                xs.append(i + (k - 1) * width)
                ys.append(float(v))
        if xs:
            bars = ax.bar(xs, ys, width=width, color=color, label=label)
            ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize="x-small")
    ax.set_xticks(range(len(opts)), [OPTIMIZER_LABELS[o] for o in opts])
    ax.set_yscale("log")
    ax.set_ylabel("C²")
    ax.set_title("C²: bounds and measurement", fontsize="medium")
    ax.legend(fontsize="x-small")
    ax.grid(True, axis="y", which="both", alpha=0.3)


def on_result(panel: Any) -> None:
    """After each sweep of lab 3's panel: draw :func:`figure` into the panel (measured
    C^2 included) and say in the status line which eps every run reaches."""
    values = panel.values()
    runs = sfo(panel)
    if len(runs) == 0:
        return
    stats = gradient_stats_of_sweep(panel.out_dir, runs=list(runs["run"]),
                                    n_images=values["c2_images"])
    fig = lk_widgets.new_figure((13.0, 7.6))
    panel.show(figure(runs, values, max_by_optimizer(stats), fig=fig))
    reach = runs[runs["complete"]]["lowest_mean"]
    if len(reach) and np.isfinite(reach).all():
        panel.set_status("", html_text=panel.sweep_status + " &middot; every finished run "
                         f"reaches ε &ge; {float(reach.max()):.3g}")

