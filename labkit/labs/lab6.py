"""Lab 6, sharpness vs smoothing (``labs/lab6_sharpness.ipynb``).

Reproduces Sato & Iiduka (2024, arXiv:2402.02325) §5.3 and Fig. 8 (a), (c), (d), (e).
Book: chapter 8 (adaptive sharpness and the smoothing degree).

Train with several (eta, b) (SGD in the paper; SHB and NSHB as options), measure the adaptive
sharpness (Kwon et al. 2021, arXiv:2102.11600) of every final model with rho = 0.0002 and the
l_inf ball on the first 1024 training images in batches of 128, as the authors' code does
(:func:`labkit.experiments.measure_sharpness`), and compute each run's delta (Sato &
Iiduka (2024)
eqs. (12)-(14)) from either the paper's C^2 bounds or C^2 measured at the run's final weights
(:func:`labkit.noise.gradient_variance`).

The panel's interface is that of every lab that trains (:mod:`labkit.labs`): :func:`controls`,
:func:`defaults`, :func:`validate`, :func:`grid`, :func:`label` and :func:`on_result` (which
measures every run with :func:`table` and draws :func:`figure` into the panel).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit import widgets as lk_widgets
from labkit.digits import N_TRAIN as N_DIGITS_TRAIN
from labkit.labs.setup import (
    check_profile,
    dataset_of,
    is_int_at_least,
    is_positive,
    selection_messages,
)
from labkit.precision import strict_fp32
from labkit.train import PROFILES, SMOKE_SIZES, TrainConfig

__all__ = [
    "BATCH_SIZES",
    "C2_SOURCES",
    "LAB_ID",
    "LRS",
    "OPTIMIZERS",
    "PAPER",
    "controls",
    "defaults",
    "figure",
    "gradient_variance",
    "grid",
    "label",
    "measure",
    "on_result",
    "paper_delta_rows",
    "records",
    "table",
    "tiny_net",
    "tiny_problem",
    "validate",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab6_sharpness"

#: The optimizers of lab 6 (Sato & Iiduka's (2024) Fig. 8 uses SGD).
OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "shb": "SHB", "nshb": "NSHB"}
#: Learning rates offered (Sato & Iiduka (2024) Fig. 8: 0.01, 0.05, 0.1, 0.5).
LRS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
#: Batch sizes offered (Sato & Iiduka (2024) Fig. 8: 2^1 ... 2^13).
BATCH_SIZES: tuple[int, ...] = tuple(2**k for k in range(1, 14))
#: Where the C^2 of delta comes from.
C2_SOURCES: dict[str, str] = {
    "paper": "Sato & Iiduka's (2024) C² bounds 1280 / 25.318 / 128; K = 1.77 (SHB) from the "
             "authors' code",
    "measured": "measured: gradient variance at each run's final weights",
}
#: Sato & Iiduka (2024, arXiv:2402.02325) §5.3 / Fig. 8.
PAPER: dict[str, Any] = {
    "source": "Sato & Iiduka (2024), arXiv:2402.02325, §5.3 and Fig. 8",
    "optimizer": "sgd", "lrs": (0.01, 0.05, 0.1, 0.5),
    "batch_sizes": tuple(2**k for k in range(1, 14)), "epochs": 200, "seeds": 7,
    "rho": 0.0002, "norm": "linf",
    "findings": (
        "larger batch sizes give sharper solutions (Fig. 8a)",
        "larger learning rates give flatter solutions (Fig. 8b)",
        "the larger delta, the smaller the sharpness (Fig. 8c)",
        "no clear correlation between sharpness and test accuracy (Fig. 8d)",
        "test accuracy is a concave function of delta, best for delta of about 0.2-1 (Fig. 8e)",
    ),
}

_DEFAULTS = {
    # CPU, generated data, tiny CNN: 2 lr x 2 b, 3 epochs; sharpness on 2 x 64 images.
    "smoke": {"lrs": (0.05, 0.2), "batch_sizes": (16, 64), "epochs": 3, "n_batches": 2,
              "sharpness_batch_size": 64, "n_iters": 5},
    # CPU: the handwritten digits and the tiny CNN, 3 lr x 4 b, 30 epochs; sharpness on the
    # first 512 training images in 4 batches of 128, 20 ascent steps. Measured: 91 s of CPU
    # time for the 12 runs and 14 s for sharpness and C^2 (one core; 20 min wall on a shared
    # 2-core machine).
    # delta from C^2 measured at the runs' final weights (the paper's C^2 is ResNet-18's).
    "cpu": {"lrs": (0.05, 0.1, 0.5), "batch_sizes": (8, 32, 128, 512), "epochs": 30,
            "n_batches": 4, "sharpness_batch_size": 128, "n_iters": 20,
            "c2_source": "measured"},
    # One GPU: ResNet-18 on CIFAR-100, 3 lr x 3 b, 15 epochs. Sharpness as the authors' code
    # measures it: the first 1024 training images in 8 batches of 128, 20 ascent steps.
    "short": {"lrs": (0.05, 0.1, 0.5), "batch_sizes": (32, 128, 512), "epochs": 15,
              "n_batches": 8, "sharpness_batch_size": 128, "n_iters": 20},
    # Sato & Iiduka's (2024) scale (200 epochs, its four learning rates), every other batch size
    # 2^3..2^13.
    "paper": {"lrs": (0.01, 0.05, 0.1, 0.5), "batch_sizes": (8, 32, 128, 512, 2048, 8192),
              "epochs": 200, "n_batches": 8, "sharpness_batch_size": 128, "n_iters": 20},
}


def _train_set_size(profile: str) -> int:
    # The smoke profile generates SMOKE_SIZES images; the cpu profile's digits have a fixed
    # split; CIFAR-100 has 50,000 training images.
    return {"smoke": SMOKE_SIZES["n_train"], "cpu": N_DIGITS_TRAIN}.get(profile, 50_000)


def controls() -> dict[str, Any]:
    """The knobs of lab 6's panel."""
    W = lk_widgets
    return {
        "optimizers": W.multi_select("optimizers",
                                     [(v, k) for k, v in OPTIMIZERS.items()]),
        "lrs": W.multi_select("learning rates η", [(f"{v:g}", v) for v in LRS]),
        "batch_sizes": W.multi_select("batch sizes b", [(str(b), b) for b in BATCH_SIZES]),
        "beta": W.float_text("β (SHB, NSHB)", 0.9),
        "epochs": W.int_slider("epochs", 1, 300, 3),
        "seeds": W.int_slider("seeds", 1, 7, 1),
        "c2_source": W.dropdown("C² for δ", [(v, k) for k, v in C2_SOURCES.items()]),
        "rho": W.float_text("sharpness radius ρ", 0.0002),
        "norm": W.dropdown("sharpness ball", [("ℓ∞ (Sato & Iiduka (2024))", "linf"), ("ℓ2", "l2")]),
        "n_batches": W.int_text("sharpness: batches", 2),
        "sharpness_batch_size": W.int_text("sharpness: batch size", 64),
        "n_iters": W.int_text("sharpness: ascent steps", 5),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (SGD, Sato & Iiduka's (2024) rho = 0.0002 and l_inf ball, the
    paper's C^2)."""
    check_profile(profile)
    return {"optimizers": ("sgd",), "beta": 0.9, "seeds": 1, "c2_source": "paper",
            "rho": 0.0002, "norm": "linf", **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 6's knobs cannot run, as messages (empty when they can)."""
    opts = tuple(values.get("optimizers") or ())
    msgs = selection_messages(opts, "optimizer", OPTIMIZERS)
    lrs = tuple(values.get("lrs") or ())
    msgs += selection_messages(lrs, "learning rate")
    if lrs and not all(is_positive(v) for v in lrs):
        msgs.append(f"learning rates must be > 0; got {', '.join(map(str, lrs))}")
    bss = tuple(values.get("batch_sizes") or ())
    msgs += selection_messages(bss, "batch size")
    if bss and not all(is_int_at_least(b, 1) for b in bss):
        msgs.append(f"batch sizes must be integers >= 1; got {', '.join(map(str, bss))}")
    if any(o in ("shb", "nshb") for o in opts):
        beta = values.get("beta")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            msgs.append(f"β (SHB, NSHB) must be in [0, 1); got {beta}")
    for key, label in (("epochs", "epochs"), ("seeds", "seeds"), ("n_batches", "sharpness "
                       "batches"), ("sharpness_batch_size", "sharpness batch size"),
                       ("n_iters", "sharpness ascent steps")):
        if not is_int_at_least(values.get(key), 1):
            msgs.append(f"{label} must be an integer >= 1; got {values.get(key)}")
    if values.get("c2_source") not in C2_SOURCES:
        msgs.append(f"C² source must be one of {', '.join(C2_SOURCES)}; got "
                    f"{values.get('c2_source')!r}")
    if not is_positive(values.get("rho")):
        msgs.append("sharpness radius ρ must be > 0 (Sato & Iiduka 2024: 0.0002); "
                    f"got {values.get('rho')}")
    if values.get("norm") not in ("linf", "l2"):
        msgs.append(f"sharpness ball must be 'linf' or 'l2'; got {values.get('norm')!r}")
    nb, sb = values.get("n_batches"), values.get("sharpness_batch_size")
    if is_int_at_least(nb, 1) and is_int_at_least(sb, 1) and values.get("profile") in PROFILES:
        n = _train_set_size(values["profile"])
        if nb * sb > n:
            msgs.append(f"sharpness batches × batch size = {nb} × {sb} = {nb * sb} exceeds the "
                        f"{n} training images of the {values['profile']} profile")
    return msgs


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 6's knobs ask for: optimizer x lr x batch size x seed on CIFAR-100 (the
    profile's model), no weight decay, the augmentation of the authors' code (crop, flip and a
    random rotation of up to 15 degrees: ``TrainConfig.rotate``); SHB and NSHB with ``beta``.

    Raises:
        ValueError: invalid knobs (:func:`validate`'s messages).
    """
    msgs = validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    runs = []
    for opt, lr, b, seed in itertools.product(values["optimizers"], values["lrs"],
                                              values["batch_sizes"], range(values["seeds"])):
        hparams = {"beta": float(values["beta"])} if opt in ("shb", "nshb") else {}
        runs.append(TrainConfig(dataset=dataset_of(values["profile"], "cifar100"),
                                optimizer=opt, lr=float(lr),
                                batch_size=int(b), hparams=hparams, epochs=values["epochs"],
                                seed=seed, profile=values["profile"]))
    return runs


def label(config: TrainConfig) -> str:
    """``"SGD η=0.1 b=128"`` (`` s1`` etc. for seeds other than 0)."""
    name = OPTIMIZERS.get(config.optimizer, config.optimizer)
    text = f"{name} η={config.lr:g} b={config.batch_size}"
    if "beta" in config.hparams:
        text += f" β={config.hparams['beta']:g}"
    return text + (f" s{config.seed}" if config.seed else "")


def _load_run_model(folder: Path, device: Any) -> tuple[Any, Any, Any]:
    """(model with the run's last weights, its resolved config, its data on ``device``)."""
    from labkit.experiments.results import final_model
    from labkit.train import prepare_data

    cfg = TrainConfig.from_dict(json.loads((folder / "config.json").read_text())).resolved()
    data = prepare_data(cfg, device)
    return final_model(folder, cfg, data.num_classes, device,
                       int(data.train_x.shape[1])), cfg, data


def gradient_variance(run: str | Path, *, n_examples: int = 512, seed: int = 0,
                      device: str = "auto", cache: bool = True,
                      stored_only: bool = False) -> dict[str, float] | None:
    """C^2 and ||grad f||^2 at a run's last weights, over ``n_examples`` training images.

    :func:`labkit.experiments.results.measure_gradient_stats` (per-example gradients of the
    cross-entropy at the weights of ``<run>/checkpoint.pt``, model in eval mode, on a fixed
    random subset (``seed``) of the training split, normalized as in training and not
    augmented), as ``{"c2": C^2, "k2": ||grad f||^2, "n": n_examples}``. The C^2 of
    Sato & Iiduka (2024) bounds the variance at every iterate of a run; one point gives a lower
    bound on it, and the end of training is where the noise acted last. Cached in
    ``<run>/gradient-stats.json``; ``stored_only=True`` returns what is stored there (None if
    nothing) without measuring.

    Raises:
        FileNotFoundError: the folder has no ``config.json`` or ``checkpoint.pt``.
        ValueError: bad ``n_examples``, or more examples than the training split holds.
    """
    from labkit.experiments.results import measure_gradient_stats

    if not is_int_at_least(n_examples, 2):
        raise ValueError(f"n_examples must be an integer >= 2; got {n_examples!r}")
    stats = measure_gradient_stats(run, n_images=n_examples, seed=seed,
                                   chunk_size=min(64, n_examples), device=device, cache=cache,
                                   stored_only=stored_only)
    if stats is None:
        return None
    return {"c2": float(stats.c2), "k2": float(stats.full_grad_norm_sq), "n": n_examples}


_COLUMNS = ("run", "optimizer", "lr", "batch_size", "beta", "seed", "status",
                 "epochs_completed", "test_acc", "c2", "k2", "delta", "sharpness")


@strict_fp32()  # the sharpness and C^2 are measurements: IEEE fp32, TF32 off
def measure(
    results: Any,
    sweep_dir: str | Path,
    values: Mapping[str, Any],
    *,
    progress: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "auto",
) -> Any:
    """Sharpness and smoothing degree of every finished run, as a ``pandas.DataFrame``.

    Args:
        results: :func:`labkit.experiments.load_results` of the sweep (``panel.results``).
        sweep_dir: the sweep folder (the ``folder`` column is relative to it).
        values: the panel's knobs: ``rho``, ``norm``, ``n_batches``, ``sharpness_batch_size``,
            ``n_iters`` (the sharpness) and ``c2_source``.
        progress: called with a short status text before each measurement.
        should_stop: polled before each run; once True, the remaining runs get only what
            is already stored in their folders (NaN where nothing is).
        device: where to measure.

    Returns one row per run with the columns ``run, optimizer, lr, batch_size, beta, seed,
    status, epochs_completed, test_acc, c2, k2, delta, sharpness``: ``sharpness`` from
    :func:`labkit.experiments.measure_sharpness` on the first ``n_batches`` x
    ``sharpness_batch_size`` training images, as the authors' code (cached in the run folder,
    so a second call is instant); ``delta`` from :func:`labkit.noise.smoothing_degree`
    with the C^2 (and K^2 for SHB) of ``c2_source``: the paper's C^2 bounds
    (:data:`labkit.critical.PAPER_VALUES`) with K = 1.77 for SHB from the authors' code (not
    the article), or
    :func:`gradient_variance` at the run's weights. Runs that did not finish (diverged,
    stopped, failed) get NaN sharpness (and NaN delta with measured C^2).

    Raises:
        ValueError: invalid ``values`` (:func:`validate`) or a table without the columns
            of :func:`labkit.experiments.load_results`.
    """
    import pandas as pd

    from labkit import critical, noise
    from labkit import optim as lk_optim
    from labkit.experiments import measure_sharpness

    needed = {"run", "optimizer", "lr", "batch_size", "seed", "status", "test_acc", "folder"}
    missing = sorted(needed - set(results.columns))
    if missing:
        raise ValueError(f"results lacks the column(s) {', '.join(missing)}; pass "
                         "panel.results (labkit.experiments.load_results)")
    for key in ("rho", "norm", "n_batches", "sharpness_batch_size", "n_iters", "c2_source"):
        if key not in values:
            raise ValueError(f"values lacks the knob {key!r}; pass panel.values()")
    sweep_dir = Path(sweep_dir)
    paper = critical.PAPER_VALUES
    rows = []
    n = len(results)
    stopped = False
    for i, (_, r) in enumerate(results.iterrows()):
        opt = r["optimizer"]
        beta = r["beta"] if "beta" in results.columns else None
        if beta is None or (isinstance(beta, float) and math.isnan(beta)):
            beta = lk_optim.hyperparameters(opt).get("beta") if opt in OPTIMIZERS else None
        row = {"run": r["run"], "optimizer": opt, "lr": float(r["lr"]),
               "batch_size": int(r["batch_size"]),
               "beta": float(beta) if opt in ("shb", "nshb") else math.nan,
               "seed": int(r["seed"]), "status": r["status"],
               "epochs_completed": int(r.get("epochs_completed") or 0),
               "test_acc": float(r["test_acc"]) if pd.notna(r["test_acc"]) else math.nan,
               "c2": math.nan, "k2": math.nan, "delta": math.nan, "sharpness": math.nan}
        finished = r["status"] == "finished"
        stopped = stopped or (should_stop is not None and should_stop())
        folder = sweep_dir / str(r["folder"])
        if finished:
            if progress is not None and not stopped:
                progress(f"measuring sharpness {i + 1}/{n}: {OPTIMIZERS.get(opt, opt)} "
                         f"η={row['lr']:g} b={row['batch_size']}")
            row["sharpness"] = measure_sharpness(
                folder, rho=float(values["rho"]), norm=values["norm"],
                n_batches=int(values["n_batches"]),
                batch_size=int(values["sharpness_batch_size"]), n_iters=int(values["n_iters"]),
                device=device, stored_only=stopped)
        if opt in noise.OPTIMIZERS:
            if values["c2_source"] == "paper":
                row["c2"] = float(paper["c2_upper_bound"][opt])
                row["k2"] = float(paper["k"]["shb"]) ** 2 if opt == "shb" else math.nan
            elif finished:
                stats = gradient_variance(
                    folder, n_examples=int(values["n_batches"])
                    * int(values["sharpness_batch_size"]), device=device, stored_only=stopped)
                if stats is not None:
                    row["c2"] = stats["c2"]
                    row["k2"] = stats["k2"] if opt == "shb" else math.nan
            if math.isfinite(row["c2"]):
                row["delta"] = float(noise.smoothing_degree(
                    opt, lr=row["lr"], batch_size=row["batch_size"], c2=row["c2"],
                    beta=None if math.isnan(row["beta"]) else row["beta"],
                    k2=None if math.isnan(row["k2"]) else row["k2"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=list(_COLUMNS))


def table(panel: Any, *, device: str = "auto") -> Any:
    """:func:`measure` of an :class:`~labkit.widgets.ExperimentPanel`'s last sweep, with
    the panel's knobs, progress in its status line (restored afterwards) and its Stop button
    honoured."""
    before = panel.status.value
    try:
        return measure(panel.results, panel.out_dir, panel.values(),
                       progress=panel.set_status,
                       should_stop=lambda: panel.stop_requested, device=device)
    finally:
        panel.status.value = before


def records(table: Any) -> list[dict[str, Any]]:
    """The rows of :func:`measure`'s table as plain dicts (what the lab records as
    ``sharpness_by_run``; NaN becomes None when recorded)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in table.to_dict("records")]


# Sato & Iiduka (2024) Fig. 7's background: >= 70% high, >= 65% intermediate, < 65% poor
# generalization.
_PAPER_BANDS = ((70.0, 100.0, "tab:green", "high"), (65.0, 70.0, "tab:blue", "intermediate"),
                (0.0, 65.0, "tab:red", "poor"))


def _accuracy_bands(ax: Any) -> None:
    ylim = ax.get_ylim()  # shade without stretching the axis away from the data
    for lo, hi, color, name in _PAPER_BANDS:
        ax.axhspan(lo, hi, color=color, alpha=0.08, linewidth=0,
                   label=f"paper: {name} ({lo:g}-{hi:g}%)")
    ax.set_ylim(ylim)


def _plain_log_ticks(axis: Any) -> None:
    """Ticks at 1, 2, 5 x 10^k labelled as plain numbers (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _draw(fig: Any, table: Any, profile: str) -> Any:
    from labkit import critical
    from labkit.experiments import plot_sharpness_vs_delta

    df = table[table["sharpness"].notna() & table["test_acc"].notna()].copy()
    if df.empty:
        raise ValueError("no finished run has a sharpness: run the panel first (panel.run())")
    by = "lr"
    if df["optimizer"].nunique() > 1:
        by = "setting"
        df["setting"] = [f"{OPTIMIZERS.get(o, o)} η={lr:g}"
                         for o, lr in zip(df["optimizer"], df["lr"], strict=True)]
    has_delta = df["delta"].notna().all() and (df["delta"] > 0).all()
    axes = fig.subplots(2, 2).ravel()
    panels = [("batch_size", "sharpness", "(a) sharpness vs batch size"),
              ("delta", "sharpness", "(c) sharpness vs δ"),
              ("sharpness", "test_acc", "(d) test accuracy vs sharpness"),
              ("delta", "test_acc", "(e) test accuracy vs δ")]
    lo, hi = critical.PAPER_VALUES["best_delta_range"]
    for ax, (x, y, title) in zip(axes, panels, strict=True):
        if x == "delta" and not has_delta:
            ax.text(0.5, 0.5, "δ unavailable (C² not measured)", ha="center",
                    transform=ax.transAxes)
            ax.set_title(title, fontsize="medium")
            continue
        plot_sharpness_vs_delta(df, x=x, y=y, by=by, colorbar=(x == "batch_size"), ax=ax)
        if x == "delta":
            ax.axvspan(lo, hi, color="0.5", alpha=0.15, linewidth=0,
                       label=f"paper: best δ ≈ {lo:g}-{hi:g}")
        paper_scale = profile in ("short", "paper")  # the bands are CIFAR-100 accuracies
        if y == "test_acc" and paper_scale:
            _accuracy_bands(ax)
        if x == "delta" or (y == "test_acc" and paper_scale):
            ax.legend(fontsize="x-small")
        if ax.get_xscale() == "log" and x != "batch_size":
            _plain_log_ticks(ax.xaxis)
        ax.set_title(title, fontsize="medium")
    fig.suptitle("Sato & Iiduka (2024) Fig. 8 from your runs: adaptive sharpness (the paper: ρ = "
                 f"{PAPER['rho']:g}, ℓ∞ ball) and smoothing degree δ", fontsize="medium")
    return fig


def figure(table: Any, profile: str = "smoke") -> Any:
    """Sato & Iiduka (2024) Fig. 8 (a), (c), (d), (e) from :func:`measure`'s table.

    (a) sharpness vs batch size, (c) sharpness vs delta, (d) test accuracy vs sharpness,
    (e) test accuracy vs delta; one line per learning rate (per optimizer and learning rate
    when several optimizers ran) through the mean over seeds, every run a dot darker for larger
    batches (:func:`labkit.experiments.plot_sharpness_vs_delta`). The paper's best range of
    delta (0.2-1) is shaded on the delta axes, and outside the smoke profile the paper's
    accuracy bands (>= 70% high, >= 65% intermediate). Returns the pyplot figure.

    Raises:
        ValueError: no finished run has a sharpness.
    """
    import matplotlib.pyplot as plt

    check_profile(profile)
    fig = plt.figure(figsize=(11.5, 8.0), layout="constrained")
    try:
        return _draw(fig, table, profile)
    except ValueError:
        plt.close(fig)
        raise


def on_result(panel: Any) -> None:
    """After a sweep: measure every run (:func:`table`) and draw Fig. 8 in the panel. After
    Stop only the values already stored are shown; the status line says how many runs lack
    one and why."""
    done = panel.sweep_status
    runs = table(panel)
    measured = int(runs["sharpness"].notna().sum())
    note = f"sharpness of {measured}/{len(runs)} runs"
    unfinished = int((runs["status"] != "finished").sum())
    missing = len(runs) - measured - unfinished
    reasons = ([f"{unfinished} not finished"] if unfinished else []) + \
        ([f"{missing} not measured (stopped): press Run to measure"] if missing else [])
    if reasons:
        note += " (" + "; ".join(reasons) + ")"
    if measured:
        fig = lk_widgets.new_figure((11.5, 8.0))
        _draw(fig, runs, panel.profile)
        panel.show(fig)
    panel.set_status("", html_text=f"{done} &middot; {note}")


def paper_delta_rows(c2: float | None = None,
                     lrs: Sequence[float] = PAPER["lrs"],
                     batch_sizes: Sequence[int] = PAPER["batch_sizes"]
                     ) -> list[dict[str, Any]]:
    """delta_SGD = lr sqrt(C^2 / b) (Sato & Iiduka (2024) eq. (12)) over Sato & Iiduka (2024) Fig.
    8's grid.

    ``c2`` defaults to the paper's bound C^2_SGD = 1280 (which it derived at lr = 0.1; the
    paper estimated C^2 for each learning rate of Fig. 8 but does not print those values).
    One dict per batch size: ``{"batch_size": b, "deltas": [delta for each lr],
    "in_best_range": [0.2 <= delta <= 1 for each lr]}``.
    """
    from labkit import critical, noise

    c2 = critical.PAPER_VALUES["c2_upper_bound"]["sgd"] if c2 is None else c2
    lo, hi = critical.PAPER_VALUES["best_delta_range"]
    rows = []
    for b in batch_sizes:
        deltas = [float(noise.delta_sgd(float(lr), float(b), float(c2))) for lr in lrs]
        rows.append({"batch_size": int(b), "deltas": deltas,
                     "in_best_range": [lo <= d <= hi for d in deltas]})
    return rows


def tiny_problem() -> tuple[Any, Any]:
    """The two examples of lab 6's tiny ReLU network: inputs (2, 1) and targets (2, 1),
    float64: x = (1, 2), y = (3, 1)."""
    import torch

    return (torch.tensor([[1.0], [2.0]], dtype=torch.float64),
            torch.tensor([[3.0], [1.0]], dtype=torch.float64))


def tiny_net(w: float, v: float) -> Any:
    """The network x -> v relu(w x) (two 1 x 1 linear layers without bias, float64), for the
    rescaling question: (w, v) -> (a w, v / a) with a > 0 leaves its function unchanged."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))
    net = net.to(torch.float64)
    with torch.no_grad():
        net[0].weight.fill_(float(w))
        net[2].weight.fill_(float(v))
    return net
