"""Lab 4, smoothing degree and generalization (``labs/lab4_smoothing_generalization.ipynb``).

Reproduces Sato & Iiduka (2024) Figs. 5-7 (arXiv:2402.02325, §5.1): test accuracy
against the batch size b and against the smoothing degree delta of eqs. (12)-(14)
(:func:`labkit.critical.smoothing_degree`), with C^2 (and K^2 for SHB) either measured at the
runs' final weights (in fp32, TF32 off) or the paper's C^2 bounds with the K of the authors' code.
Book: chapters 6 (smoothing) and 8 (smoothing degree and generalization).

Lab 4 trains the sweep of lab 3 (SGD, SHB and NSHB over a grid of batch sizes): its grid, run
names, selectors and C^2 measurement come from :mod:`labkit.labs.lab3`; what is lab 4's own is
here. Lab 4's runs are plain training (``precision="auto"``: bf16 autocast on CUDA); only lab
3's runs are measurements in fp32. Without CUDA "auto" trains in fp32 anyway, so there lab 4
asks for exactly lab 3's runs and copies those lab 3 has finished instead of training them
again (:func:`reuse`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from labkit import critical
from labkit import widgets as lk_widgets
from labkit.labs import lab3
from labkit.labs.lab3 import (
    BATCH_SIZES,
    OPTIMIZER_LABELS,
    OPTIMIZERS,
    batch_size_selector,
    gradient_stats_of_sweep,
    max_by_optimizer,
    optimizer_selector,
    sized_figure,
    validate_sweep,
)
from labkit.labs.setup import check_profile, is_finite
from labkit.train import TrainConfig

__all__ = [
    "LAB_ID",
    "accuracy_table",
    "best_batch_sizes",
    "constants",
    "controls",
    "defaults",
    "delta_table",
    "figure",
    "format_delta_table",
    "grid",
    "label",
    "on_result",
    "paper_delta_table",
    "reuse",
    "run_table",
    "validate",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab4_smoothing_generalization"

_C2_SOURCES = {"measured": "measured at your runs' final weights",
               "paper": "the paper's C² bounds, K of the authors' code (ResNet-18, CIFAR-100)"}

_DEFAULTS = {
    # CPU, generated 10-class data, tiny CNN: 12 runs of 3 epochs.
    "smoke": {"batch_sizes": (16, 32, 64, 128), "epochs": 3, "seeds": 1, "c2_images": 128},
    # CPU: the handwritten digits and the tiny CNN, b = 2^4 ... 2^10, 40 epochs. Measured:
    # 133 s of CPU time for the 21 runs (one core; 22 min wall on a shared 2-core machine).
    "cpu": {"batch_sizes": tuple(2**k for k in range(4, 11)), "epochs": 40, "seeds": 1,
            "c2_images": 1024},
    # One GPU: ResNet-18 on CIFAR-100, 5 batch sizes, 15 epochs.
    "short": {"batch_sizes": (128, 256, 512, 1024, 2048), "epochs": 15, "seeds": 1,
              "c2_images": 1024},
    # Sato & Iiduka (2024) Fig. 6: b = 2^3 ... 2^13, 200 epochs (the paper averages 7 seeds).
    "paper": {"batch_sizes": BATCH_SIZES, "epochs": 200, "seeds": 1, "c2_images": 2048},
}


def controls() -> dict[str, Any]:
    """The knobs of lab 4's panel. ``c2_source`` and ``c2_images`` only change the analysis."""
    W = lk_widgets
    return {
        "optimizers": optimizer_selector(),
        "batch_sizes": batch_size_selector(),
        "lr": W.float_text("learning rate η", 0.1),
        "beta": W.float_text("momentum β (SHB, NSHB)", 0.9),
        "epochs": W.int_slider("epochs", 1, 200, 3),
        "seeds": W.int_slider("seeds", 1, 7, 1),
        "c2_source": W.dropdown("C² and K²", [(v, k) for k, v in _C2_SOURCES.items()]),
        "c2_images": W.int_text("images for the measured C²", 1024),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (η = 0.1, β = 0.9, C^2 measured)."""
    check_profile(profile)
    return {"optimizers": OPTIMIZERS, "lr": 0.1, "beta": 0.9, "c2_source": "measured",
            **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 4's knobs cannot run, as messages (empty when they can)."""
    msgs = validate_sweep(values, max_seeds=7)
    if values.get("c2_source") not in _C2_SOURCES:
        msgs.append(f"C² source must be one of {', '.join(_C2_SOURCES)}; "
                    f"got {values.get('c2_source')!r}")
    return msgs


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 4's knobs ask for: optimizer x batch size x seed (as
    :func:`labkit.labs.lab3.grid`), trained with ``precision="auto"`` (plain training: bf16
    autocast on CUDA). Without CUDA that is fp32, so the runs are named as lab 3's fp32
    runs there (the same config, the same numbers), and :func:`reuse` finds them."""
    import torch

    from labkit.precision import MEASUREMENT_PRECISION

    precision = "auto" if torch.cuda.is_available() else MEASUREMENT_PRECISION
    return lab3.grid({**values, "precision": precision})


def reuse(profile: str) -> list[str]:
    """The sweep folders whose finished runs lab 4's panel copies instead of training them
    again (its ``reuse``): lab 3's results of ``profile``. Only a run with the very same
    config is copied; lab 3's defaults ask for the same runs as lab 4's."""
    from labkit.labs.setup import results_dir

    return [str(results_dir(lab3.LAB_ID, check_profile(profile)))]


def label(config: TrainConfig) -> str:
    """``"SGD b=64"``, ``"SHB b=512 s1"`` (as :func:`labkit.labs.lab3.label`)."""
    return lab3.label(config)


def run_table(results: Any) -> Any:
    """The columns of lab 4's runs that matter (from ``panel.results``), one row per run."""
    cols = ["optimizer", "batch_size", "seed", "lr", "beta", "epochs_completed", "status",
            "test_acc", "best_test_acc", "train_acc"]
    return results[[c for c in cols if c in results.columns]].reset_index(drop=True)


def accuracy_table(results: Any, metric: str = "test_acc") -> dict[str, dict[int, float]]:
    """``{optimizer: {batch size: mean final test accuracy over seeds}}`` of the finished runs
    (accuracies in [0, 1]; a diverged run's NaN makes its entry NaN, saved as null)."""
    if metric not in results.columns:
        raise ValueError(f"results has no column {metric!r}")
    done = results[results["status"].isin(["finished", "diverged"])]
    table: dict[str, dict[int, float]] = {}
    for opt in [o for o in OPTIMIZERS if o in set(done["optimizer"])]:
        g = done[done["optimizer"] == opt]
        table[opt] = {int(b): float(gb[metric].astype(float).mean(skipna=False))
                      for b, gb in sorted(g.groupby("batch_size"), key=lambda kv: kv[0])}
    return table


def best_batch_sizes(table: Mapping[str, Mapping[int, float]]) -> dict[str, int | None]:
    """The batch size with the highest accuracy per optimizer (the smallest on a tie; None
    when no entry is finite)."""
    out: dict[str, int | None] = {}
    for opt, row in table.items():
        finite = [(float(v), int(b)) for b, v in row.items() if is_finite(v)]
        out[opt] = max(finite, key=lambda t: (t[0], -t[1]))[1] if finite else None
    return out


def constants(panel: Any) -> dict[str, Any]:
    """C^2 per optimizer and K^2 (for SHB's delta) as the panel's ``c2_source`` asks.

    ``"measured"``: the largest C^2 and ||grad f||^2 measured at the final weights of each
    optimizer's finished runs (:func:`labkit.labs.lab3.gradient_stats_of_sweep`; lower
    estimates of the paper's constants, which bound every iterate). ``"paper"``: the C^2 bounds
    of Sato & Iiduka (2024) §4.3 and K = 1.77 for SHB from the authors' code, not the article
    (upper bounds, for ResNet-18 on CIFAR-100).

    Returns:
        ``{"source": ..., "c2": {optimizer: C^2}, "k2": K^2 or None (no SHB run)}``.
    """
    values = panel.values()
    opts = list(values["optimizers"])
    if values["c2_source"] == "paper":
        pv = critical.PAPER_VALUES
        return {"source": "paper", "c2": {o: float(pv["c2_upper_bound"][o]) for o in opts},
                "k2": float(pv["k"]["shb"]) ** 2 if "shb" in opts else None}
    stats = gradient_stats_of_sweep(panel.out_dir, runs=list(panel.results["run"]),
                                    n_images=values["c2_images"])
    c2 = max_by_optimizer(stats, "c2")
    k2 = max_by_optimizer(stats, "grad_norm_sq").get("shb")
    return {"source": "measured", "c2": c2, "k2": k2}


def delta_table(*, lr: float, beta: float, c2: Mapping[str, float], k2: float | None,
                batch_sizes: Sequence[int]) -> dict[str, dict[int, float]]:
    """``{optimizer: {batch size: delta}}``, Sato & Iiduka (2024) eqs. (12)-(14)
    (:func:`labkit.critical.smoothing_degree`), for each optimizer of ``c2``.

    Raises:
        ValueError: SHB without ``k2``, or a bad lr / beta / C^2 / batch size.
    """
    out: dict[str, dict[int, float]] = {}
    for opt in [o for o in OPTIMIZERS if o in c2]:
        if opt == "shb" and k2 is None:
            raise ValueError("k2 (K^2, a bound on E||grad f||^2) is required for SHB's delta "
                             "(Sato & Iiduka (2024) eq. (13)); the authors' code uses K = 1.77")
        out[opt] = {int(b): float(critical.smoothing_degree(
            opt, lr=lr, batch_size=int(b), c2=float(c2[opt]), beta=beta, k2=k2))
            for b in sorted(batch_sizes)}
    return out


def paper_delta_table() -> dict[str, dict[int, float]]:
    """:func:`delta_table` with the paper's values: eta = 0.1, beta = 0.9, the C^2 bounds
    1280 / 25.318 / 128, b = 2^3 ... 2^13 (Sato & Iiduka (2024) Fig. 5), and K = 1.77 for SHB
    from the authors' code (the article gives no K)."""
    pv = critical.PAPER_VALUES
    return delta_table(lr=pv["lr"], beta=pv["beta"], c2=pv["c2_upper_bound"],
                       k2=pv["k"]["shb"] ** 2, batch_sizes=pv["batch_sizes"])


def format_delta_table(table: Mapping[str, Mapping[int, float]], digits: int = 4) -> str:
    """A delta table as fixed-precision text: one line per batch size, one column per
    optimizer."""
    opts = list(table)
    sizes = sorted({int(b) for row in table.values() for b in row})
    lines = ["     b | " + " | ".join(f"{OPTIMIZER_LABELS.get(o, o):>9}" for o in opts)]
    for b in sizes:
        cells = [f"{table[o][b]:9.{digits}f}" if b in table[o] else " " * 9 for o in opts]
        lines.append(f"{b:6d} | " + " | ".join(cells))
    return "\n".join(lines)


def figure(results: Any, values: Mapping[str, Any], constants: Mapping[str, Any],
           *, fig: Any = None) -> Any:
    """Sato & Iiduka (2024) Fig. 7 from your runs: delta against b, test accuracy against b, and
    test
    accuracy against delta.

    delta comes from each run's lr, b and beta with ``constants`` (:func:`constants`).
    Paper overlays, labelled as the paper's: the delta curves of its C^2 bounds with the K of
    the authors' code (dashed),
    its range of delta that generalized best (0.2 to 1, shaded) and, outside the smoke profile,
    its accuracy bands (>= 70% high, >= 65% intermediate).

    Raises:
        ValueError: no finished runs.
    """
    from labkit.experiments import (
        plot_accuracy_vs_batch_size,
        plot_accuracy_vs_delta,
        plot_delta_vs_batch_size,
    )

    done = results[results["status"] == "finished"]
    if len(done) == 0:
        raise ValueError("no finished runs to plot: run the panel first (panel.run())")
    c2 = {o: v for o, v in constants["c2"].items() if is_finite(v)}
    k2 = constants.get("k2")
    if "shb" in c2 and k2 is None:
        c2.pop("shb")
    paper_scale = values["profile"] in ("short", "paper")  # CIFAR-100 numbers
    fig = sized_figure(fig, (15.0, 4.4))
    ax_d, ax_b, ax_a = fig.subplots(1, 3)
    sizes = sorted(set(int(b) for b in done["batch_size"]) | set(BATCH_SIZES))
    plot_delta_vs_batch_size(c2 or None, lr=float(values["lr"]), beta=float(values["beta"]),
                             k2={"shb": k2} if k2 is not None else None, batch_sizes=sizes,
                             paper=True, ax=ax_d)
    ax_d.set_title(f"δ against b (Fig. 5), C² {constants['source']}", fontsize="medium")
    plot_accuracy_vs_batch_size(done, paper=paper_scale, ax=ax_b)
    ax_b.set_title("test accuracy against b (Fig. 6)", fontsize="medium")
    if c2:
        plot_accuracy_vs_delta(done, c2, k2={"shb": k2} if k2 is not None else None,
                               paper=paper_scale, ax=ax_a)
    if not paper_scale or not c2:
        lo, hi = critical.PAPER_VALUES["best_delta_range"]
        ax_a.axvspan(lo, hi, color="0.5", alpha=0.12, linewidth=0,
                     label=f"paper: best δ ≈ {lo:g}-{hi:g}")
        ax_a.set_xscale("log")
        ax_a.legend(fontsize="small")
    ax_a.set_title("test accuracy against δ (Fig. 7 right)", fontsize="medium")
    return fig


def on_result(panel: Any) -> None:
    """After each sweep of lab 4's panel: draw :func:`figure` into the panel."""
    results = panel.results
    if not (results["status"] == "finished").any():
        return
    fig = lk_widgets.new_figure((15.0, 4.4))
    panel.show(figure(results, panel.values(), constants(panel), fig=fig))
