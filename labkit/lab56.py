"""Glue between labs 5 and 6 and labkit: each lab's knobs, grid, measurements and figures.

Book: lab 5 goes with chapter 7 (implicit graduated optimization, seed 001: Sato & Iiduka,
arXiv:2311.08745), lab 6 with chapter 8 (adaptive sharpness and the smoothing degree, seed 004
§5.3 and Fig. 8: Sato & Iiduka 2024, arXiv:2402.02325). The notebooks show the experiments; the
code they need lives here (as :mod:`labkit.labs` does for labs 1 and 2), so their cells stay
short and the tests drive the same code.

Lab 5, implicit graduated optimization. SGD with learning rate eta and batch size b smooths the
loss with degree ``delta = eta C / sqrt(b)`` (C^2 the stochastic-gradient variance), so lowering
eta or raising b during training is graduated optimization. Seed 001 trains ResNet-18 on
CIFAR-100 with plain SGD (no momentum), eta_0 = 0.1, b_0 = 32, 200 epochs, and compares a
constant schedule with three step schedules that each multiply delta by 1/sqrt(2) every 40
epochs (eta x 1/sqrt(2); b x 2; eta x sqrt(3)/2 with b x 1.5) and with the polynomial decay
``eta_e = eta_0 (1 - e / E)^p`` that Algorithm 3 makes optimal (p = 0.9 in the authors' runs).
The schedules are :mod:`labkit.schedules` specs made by :func:`labkit.graduated.step_schedule`
and :func:`labkit.graduated.poly_schedule`; "every" scales with the run (the smoke profile's
5 epochs have one-epoch stages).

Lab 6, sharpness vs smoothing. Train with several (eta, b) (SGD in the seed; SHB and NSHB as
options), measure the adaptive sharpness (Kwon et al. 2021, arXiv:2102.11600) of every final
model with rho = 0.0002 and the l_inf ball (:func:`labkit.experiments.measure_sharpness`), and
compute each run's delta (seed 004 eqs. (12)-(14)) from either the paper's C^2 bounds or C^2
measured at the run's final weights (:func:`labkit.noise.gradient_variance`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit import widgets as lk_widgets
from labkit.train import PROFILES, SMOKE_SIZES, TrainConfig

__all__ = [
    "LAB5_ID",
    "LAB5_PAPER",
    "LAB5_POWERS",
    "LAB5_SCHEDULES",
    "LAB6_BATCH_SIZES",
    "LAB6_C2_SOURCES",
    "LAB6_ID",
    "LAB6_LRS",
    "LAB6_OPTIMIZERS",
    "LAB6_PAPER",
    "lab5_add_schedule",
    "lab5_controls",
    "lab5_defaults",
    "lab5_epoch_plan",
    "lab5_epoch_plans",
    "lab5_figure",
    "lab5_grid",
    "lab5_label",
    "lab5_run_table",
    "lab5_schedule_key",
    "lab5_schedule_label",
    "lab5_stage_rows",
    "lab5_validate",
    "lab6_controls",
    "lab6_defaults",
    "lab6_figure",
    "lab6_gradient_variance",
    "lab6_grid",
    "lab6_label",
    "lab6_measure",
    "lab6_on_result",
    "lab6_paper_delta_rows",
    "lab6_records",
    "lab6_table",
    "lab6_tiny_net",
    "lab6_tiny_problem",
    "lab6_validate",
]

LAB5_ID = "lab5_implicit_graduated"
LAB6_ID = "lab6_sharpness"


def _check_profile(profile: Any) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")


def _positive(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def _int_at_least(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _train_set_size(profile: str) -> int:
    # The smoke profile generates SMOKE_SIZES images; CIFAR-100 has 50,000 training images.
    return SMOKE_SIZES["n_train"] if profile == "smoke" else 50_000


# =========================================================================== lab 5

#: Lab 5's schedule keys and their names. "poly" stands for one run per power p; its runs'
#: keys are ``poly_p<p>`` (e.g. ``poly_p0.9``).
LAB5_SCHEDULES: dict[str, str] = {
    "constant": "constant lr and b",
    "lr_step": "lr × 1/√2 per stage",
    "batch_step": "b × 2 per stage",
    "hybrid_step": "lr × √3/2 and b × 1.5 per stage",
    "poly": "polynomial lr decay (1 − e/E)^p",
}
_STEP_MODES = {"lr_step": "lr", "batch_step": "batch", "hybrid_step": "hybrid"}
_STEP_SHORT = {"constant": "constant", "lr_step": "lr × 1/√2", "batch_step": "b × 2",
               "hybrid_step": "lr × √3/2, b × 1.5"}
#: The powers p the panel offers for the polynomial decay.
LAB5_POWERS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 2.0)
#: Seed 001's experiment (Sato & Iiduka, arXiv:2311.08745).
LAB5_PAPER: dict[str, Any] = {
    "source": "Sato & Iiduka, arXiv:2311.08745 (seed 001)",
    "model": "resnet18", "dataset": "cifar100", "optimizer": "sgd (no momentum)",
    "lr0": 0.1, "batch0": 32, "epochs": 200, "every": 40, "p": 0.9,
    "stage_factor": 2.0**-0.5,
}

_LAB5_DEFAULTS = {
    # CPU, generated data, tiny CNN: five 5-epoch runs with one-epoch stages.
    "smoke": {"epochs": 5, "every": 1},
    # One GPU: ResNet-18 on CIFAR-100, 20 epochs, stages of 4 epochs.
    "short": {"epochs": 20, "every": 4},
    # Seed 001's scale: 200 epochs, stages of 40 epochs.
    "paper": {"epochs": 200, "every": 40},
}


def lab5_controls() -> dict[str, Any]:
    """The knobs of lab 5's panel."""
    W = lk_widgets
    return {
        "schedules": W.multi_select("schedules", [(v, k) for k, v in LAB5_SCHEDULES.items()]),
        "powers": W.multi_select("p (polynomial decay)", [(f"{p:g}", p) for p in LAB5_POWERS]),
        "lr0": W.float_text("initial lr η₀", 0.1),
        "batch0": W.int_text("initial batch size b₀", 32),
        "epochs": W.int_slider("epochs", 2, 300, 5),
        "every": W.int_slider("stage length (epochs)", 1, 100, 1),
        "seeds": W.int_slider("seeds", 1, 5, 1),
    }


def lab5_defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile: seed 001's lr0 = 0.1, b0 = 32, all schedules, p = 0.9;
    five stages (epochs / every = 5, as 200 / 40 in the seed)."""
    _check_profile(profile)
    return {"schedules": tuple(LAB5_SCHEDULES), "powers": (0.9,), "lr0": 0.1, "batch0": 32,
            "seeds": 1, **_LAB5_DEFAULTS[profile]}


def lab5_validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 5's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    schedules = tuple(values.get("schedules") or ())
    if not schedules:
        msgs.append("choose at least one schedule")
    unknown = [s for s in schedules if s not in LAB5_SCHEDULES]
    if unknown:
        msgs.append(f"unknown schedule(s) {', '.join(map(str, unknown))}; valid: "
                    f"{', '.join(LAB5_SCHEDULES)}")
    if "poly" in schedules:
        powers = tuple(values.get("powers") or ())
        if not powers:
            msgs.append("choose at least one power p for the polynomial decay (or deselect it)")
        elif not all(_positive(p) for p in powers):
            msgs.append(f"every power p must be > 0; got {', '.join(map(str, powers))}")
    if not _positive(values.get("lr0")):
        msgs.append(f"initial lr η₀ must be > 0; got {values.get('lr0')}")
    if not _int_at_least(values.get("batch0"), 1):
        msgs.append(f"initial batch size b₀ must be an integer >= 1; got {values.get('batch0')}")
    epochs, every = values.get("epochs"), values.get("every")
    if not _int_at_least(epochs, 2):
        msgs.append(f"epochs must be an integer >= 2 (a schedule needs two epochs to change "
                    f"anything); got {epochs}")
    if not _int_at_least(every, 1):
        msgs.append(f"stage length must be an integer >= 1 epoch; got {every}")
    elif (_int_at_least(epochs, 2) and every >= epochs
          and any(s in _STEP_MODES for s in schedules)):
        msgs.append(f"stage length ({every} epochs) must be shorter than the run ({epochs} "
                    "epochs), or the step schedules never change δ; seed 001 uses 40 of 200")
    if not _int_at_least(values.get("seeds"), 1):
        msgs.append(f"seeds must be an integer >= 1; got {values.get('seeds')}")
    return msgs


def _lab5_specs(key: str, values: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """(lr_schedule, batch_schedule) spec pairs of one schedule key (several for "poly")."""
    from labkit import graduated as G

    lr0, b0, epochs = float(values["lr0"]), int(values["batch0"]), int(values["epochs"])
    if key == "constant":
        return [({"kind": "constant"}, {"kind": "constant"})]
    if key in _STEP_MODES:
        s = G.step_schedule(lr0, b0, _STEP_MODES[key], epochs=epochs, every=int(values["every"]))
        return [(s.lr_schedule, s.batch_schedule)]
    out = []
    for p in values["powers"]:
        # M = epochs - 1 decays: one stage per epoch, lr0 (1 - e / E)^p (PolynomialLR).
        s = G.poly_schedule(lr0, b0, epochs - 1, float(p), mode="lr", epochs=epochs)
        out.append((s.lr_schedule, s.batch_schedule))
    return out


def lab5_grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 5's knobs ask for: schedule (and p) x seed.

    CIFAR-100 with the profile's model (ResNet-18 in short/paper, seed 001's network; the tiny
    CNN in smoke), plain SGD without momentum or weight decay, the standard augmentation.

    Raises:
        ValueError: invalid knobs (:func:`lab5_validate`'s messages).
    """
    msgs = lab5_validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    runs = []
    for key in values["schedules"]:
        for lr_spec, batch_spec in _lab5_specs(key, values):
            for seed in range(values["seeds"]):
                runs.append(TrainConfig(
                    dataset="cifar100", optimizer="sgd", lr=float(values["lr0"]),
                    batch_size=int(values["batch0"]), epochs=int(values["epochs"]),
                    lr_schedule=lr_spec, batch_schedule=batch_spec, seed=seed,
                    profile=values["profile"],
                ))
    return runs


def _spec_dict(spec: Any, what: str) -> dict:
    from labkit import schedules as S

    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise ValueError(f"{what} must be a schedule spec dict or its JSON; got {spec!r}") \
                from None
    if isinstance(spec, float) and math.isnan(spec):  # an empty table cell
        spec = None
    return S.validate_lr_schedule(spec) if what == "lr_schedule" else \
        S.validate_batch_schedule(spec)


def lab5_schedule_key(lr_schedule: Any, batch_schedule: Any) -> str:
    """The lab-5 name of a (lr_schedule, batch_schedule) pair of spec dicts (or their JSON, as in
    :func:`labkit.experiments.load_results`): ``constant``, ``lr_step``, ``batch_step``,
    ``hybrid_step``, ``poly_p<p>`` (e.g. ``poly_p0.9``), or ``custom`` for anything else."""
    from labkit.graduated import STEP_FACTORS

    lr, b = _spec_dict(lr_schedule, "lr_schedule"), _spec_dict(batch_schedule, "batch_schedule")
    if lr["kind"] == "constant" and b["kind"] == "constant":
        return "constant"
    if lr["kind"] == "poly" and b["kind"] == "constant":
        return f"poly_p{lr['power']:g}"
    kinds = (lr["kind"], b["kind"])
    if kinds in (("step", "constant"), ("constant", "step"), ("step", "step")):
        kappa = lr["factor"] if lr["kind"] == "step" else 1.0
        lam = b["factor"] if b["kind"] == "step" else 1.0
        same_every = lr["kind"] != "step" or b["kind"] != "step" or lr["every"] == b["every"]
        for key, mode in _STEP_MODES.items():
            k0, l0 = STEP_FACTORS[mode]
            if same_every and math.isclose(kappa, k0, rel_tol=1e-12) and \
                    math.isclose(lam, l0, rel_tol=1e-12) and b.get("max") is None:
                return key
    return "custom"


def lab5_schedule_label(key: str) -> str:
    """A schedule key's name in figures: ``"b × 2"``, ``"poly p = 0.9"``, ..."""
    if key in _STEP_SHORT:
        return _STEP_SHORT[key]
    if key.startswith("poly_p"):
        return f"poly p = {key[len('poly_p'):]}"
    return key


def lab5_label(config: TrainConfig) -> str:
    """A run's name in the panel: its schedule (``"lr × 1/√2"``, ``"poly p = 0.9"``), with
    `` s1`` etc. for seeds other than 0."""
    key = lab5_schedule_key(config.lr_schedule, config.batch_schedule)
    return lab5_schedule_label(key) + (f" s{config.seed}" if config.seed else "")


def _field(run: Any, name: str) -> Any:
    return getattr(run, name) if isinstance(run, TrainConfig) else run[name]


def lab5_epoch_plan(run: TrainConfig | Mapping[str, Any]) -> dict[str, list]:
    """The per-epoch plan of one run, computed from its schedules.

    ``run`` is a :class:`~labkit.train.TrainConfig` or a row of
    :func:`labkit.experiments.load_results` (``lr``, ``batch_size``, ``epochs``,
    ``lr_schedule``, ``batch_schedule``). Returns ``{"lr": [...], "batch_size": [...],
    "delta_ratio": [...]}`` with one entry per epoch, where ``delta_ratio[e] = delta_e /
    delta_0 = (lr_e / lr_0) sqrt(b_0 / b_e)`` (C cancels).

    Raises:
        ValueError: missing fields or invalid schedules.
    """
    from labkit import schedules as S

    try:
        lr0, b0, epochs = (_field(run, k) for k in ("lr", "batch_size", "epochs"))
        lr_spec = _spec_dict(_field(run, "lr_schedule"), "lr_schedule")
        b_spec = _spec_dict(_field(run, "batch_schedule"), "batch_schedule")
    except (KeyError, AttributeError) as e:
        raise ValueError(f"run needs lr, batch_size, epochs, lr_schedule and batch_schedule; "
                         f"missing {e}") from None
    if lr0 is None or b0 is None or epochs is None:
        raise ValueError("run has no lr, batch_size or epochs: resolve the config first "
                         "(TrainConfig.resolved())")
    lr0, b0, epochs = float(lr0), int(b0), int(epochs)
    lrs = S.lr_values(lr_spec, lr0, epochs)
    bss = S.batch_sizes(b_spec, b0, epochs)
    ratios = [(lr / lr0) * math.sqrt(b0 / b) for lr, b in zip(lrs, bss, strict=True)]
    return {"lr": lrs, "batch_size": bss, "delta_ratio": ratios}


def lab5_add_schedule(df: Any) -> Any:
    """A copy of a results or history table with a ``schedule`` column (the schedule key)."""
    if df is None or not {"lr_schedule", "batch_schedule"} <= set(df.columns):
        raise ValueError("the table needs the columns lr_schedule and batch_schedule (use "
                         "panel.results or panel.history)")
    out = df.copy()
    out["schedule"] = [lab5_schedule_key(a, b)
                       for a, b in zip(out["lr_schedule"], out["batch_schedule"], strict=True)]
    return out


def lab5_run_table(results: Any) -> Any:
    """The columns of lab 5's runs that matter (from ``panel.results``), one row per run:
    schedule, seed, initial lr and batch size, epochs, epochs done, status, final and best test
    accuracy."""
    df = lab5_add_schedule(results)
    cols = ["run", "schedule", "seed", "lr", "batch_size", "epochs", "epochs_completed", "status",
            "test_acc", "best_test_acc"]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True)


def lab5_epoch_plans(history: Any) -> dict[str, dict[str, list]]:
    """What each schedule actually used, from ``panel.history``: schedule key ->
    ``{"epoch": [...], "lr": [...], "batch_size": [...]}`` (the first seed's run; seeds share
    their schedule). The data of question 1, recorded by the lab."""
    df = lab5_add_schedule(history)
    out = {}
    for key, g in df.groupby("schedule", sort=False):
        run = g[g["run"] == g["run"].iloc[0]].sort_values("epoch")
        out[key] = {"epoch": [int(e) for e in run["epoch"]],
                    "lr": [float(v) for v in run["epoch_lr"]],
                    "batch_size": [int(v) for v in run["epoch_batch_size"]]}
    return out


def lab5_stage_rows(lr0: float = 0.1, batch0: int = 32, epochs: int = 200, every: int = 40,
                    p: float = 0.9) -> list[dict[str, Any]]:
    """Seed 001's schedules stage by stage (defaults: the seed's lr0, b0, epochs and stages).

    One dict per stage m = 0, 1, ...: ``{"stage": m, "first_epoch": ..., "last_epoch": ...,
    <key>: {"lr": ..., "batch_size": ..., "delta_ratio": ...}}`` for the keys ``lr_step``,
    ``batch_step``, ``hybrid_step`` and ``poly`` (the polynomial decay with power ``p`` at the
    stage's first epoch). Epochs are 1-based, as in the runs' metrics.
    """
    from labkit import graduated as G

    if not _int_at_least(every, 1) or not _int_at_least(epochs, 2):
        raise ValueError(f"epochs must be an integer >= 2 and every an integer >= 1; got "
                         f"epochs={epochs!r}, every={every!r}")
    plans = {key: G.step_schedule(lr0, batch0, mode, epochs=epochs, every=every)
             for key, mode in _STEP_MODES.items()}
    plans["poly"] = G.poly_schedule(lr0, batch0, epochs - 1, p, mode="lr", epochs=epochs)
    rows = []
    for m, start in enumerate(range(0, epochs, every)):
        row: dict[str, Any] = {"stage": m, "first_epoch": start + 1,
                               "last_epoch": min(start + every, epochs)}
        for key, s in plans.items():
            row[key] = {"lr": s.lrs[start], "batch_size": s.batch_sizes[start],
                        "delta_ratio": s.delta_ratios[start]}
        rows.append(row)
    return rows


def _mean_band(ax: Any, df: Any, x: str, y: str, scale: float = 1.0, **kw: Any) -> Any:
    agg = df.groupby(x)[y].agg(["mean", "min", "max"]).sort_index().dropna()
    (line,) = ax.plot(agg.index, agg["mean"] * scale, **kw)
    if (agg["max"] > agg["min"]).any():
        ax.fill_between(agg.index, agg["min"] * scale, agg["max"] * scale,
                        color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def lab5_figure(history: Any) -> Any:
    """Test accuracy per epoch and delta_e / delta_0 per epoch, one line per schedule.

    Left: test accuracy (mean over seeds, band from min to max). Right: the smoothing degree
    relative to the start, computed from each schedule (:func:`lab5_epoch_plan`), on a log
    axis, with seed 001's step schedules (delta x 1/sqrt(2) every 40 of 200 epochs) and its
    p = 0.9 decay drawn on the run's epoch axis, labelled as the paper's. Returns the pyplot
    figure.

    Raises:
        ValueError: ``history`` has no epochs.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    if history is None or len(history) == 0:
        raise ValueError("history is empty: run the panel first (panel.run())")
    df = lab5_add_schedule(history)
    fig, (ax_acc, ax_d) = plt.subplots(1, 2, figsize=(11.5, 4.0), layout="constrained")
    epochs = int(df["epochs"].max())
    for i, (key, g) in enumerate(df.groupby("schedule", sort=False)):
        color = f"C{i}"
        label = lab5_schedule_label(key)
        _mean_band(ax_acc, g, "epoch", "test_acc", 100.0, color=color, marker="o",
                   markersize=3, label=label)
        # Epoch e (1-based) is drawn over (e - 1, e]; thick lines first, so that schedules
        # with the same delta (the three step schedules) stay visible on top of each other.
        ratios = lab5_epoch_plan(g.iloc[0])["delta_ratio"]
        ax_d.step(np.arange(len(ratios) + 1), [*ratios, ratios[-1]], where="post",
                  color=color, lw=max(1.2, 5.0 - 0.9 * i), alpha=0.85, label=label)
    # Seed 001's schedules at its scale (200 epochs, stages of 40), mapped onto this run's
    # epochs: the paper's epoch e (0-based) is drawn over [e, e + 1) * epochs / 200.
    pe = np.arange(LAB5_PAPER["epochs"] + 1)
    x = pe * epochs / LAB5_PAPER["epochs"]
    stage = np.minimum(pe, LAB5_PAPER["epochs"] - 1) // LAB5_PAPER["every"]
    step = LAB5_PAPER["stage_factor"] ** stage
    poly = (1 - np.minimum(pe, LAB5_PAPER["epochs"] - 1) / LAB5_PAPER["epochs"]) \
        ** LAB5_PAPER["p"]
    ax_d.step(x, step, where="post", color="k", ls="--", lw=1,
              label="paper: δ × 1/√2 every 40 of 200 epochs")
    ax_d.step(x, poly, where="post", color="k", ls=":", lw=1,
              label="paper: poly p = 0.9 over 200 epochs")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("test accuracy per schedule (seed 001's experiment)", fontsize="medium")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize="small")
    ax_d.set_yscale("log")
    ax_d.set_xlabel("epoch (the paper's 200 epochs rescaled to your run)")
    ax_d.set_ylabel("δ_e / δ_0 = (η_e/η_0)·√(b_0/b_e)")
    ax_d.set_title("smoothing degree relative to the start", fontsize="medium")
    ax_d.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_d.grid(True, which="both", alpha=0.3)
    ax_d.legend(fontsize="x-small")
    return fig


# =========================================================================== lab 6

#: The optimizers of lab 6 (the seed's Fig. 8 uses SGD).
LAB6_OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "shb": "SHB", "nshb": "NSHB"}
#: Learning rates offered (seed 004 Fig. 8: 0.01, 0.05, 0.1, 0.5).
LAB6_LRS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
#: Batch sizes offered (seed 004 Fig. 8: 2^1 ... 2^13).
LAB6_BATCH_SIZES: tuple[int, ...] = tuple(2**k for k in range(1, 14))
#: Where the C^2 of delta comes from.
LAB6_C2_SOURCES: dict[str, str] = {
    "paper": "seed 004's bounds: C² = 1280 / 25.318 / 128, K = 1.77 (SHB)",
    "measured": "measured: gradient variance at each run's final weights",
}
#: Seed 004 §5.3 / Fig. 8 (Sato & Iiduka 2024, arXiv:2402.02325).
LAB6_PAPER: dict[str, Any] = {
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

_LAB6_DEFAULTS = {
    # CPU, generated data, tiny CNN: 2 lr x 2 b, 3 epochs; sharpness on 2 x 64 images.
    "smoke": {"lrs": (0.05, 0.2), "batch_sizes": (16, 64), "epochs": 3, "n_batches": 2,
              "sharpness_batch_size": 64, "n_iters": 5},
    # One GPU: ResNet-18 on CIFAR-100, 3 lr x 3 b, 15 epochs.
    "short": {"lrs": (0.05, 0.1, 0.5), "batch_sizes": (32, 128, 512), "epochs": 15,
              "n_batches": 4, "sharpness_batch_size": 256, "n_iters": 20},
    # Seed 004's scale (200 epochs, its four learning rates), every other batch size 2^3..2^13.
    "paper": {"lrs": (0.01, 0.05, 0.1, 0.5), "batch_sizes": (8, 32, 128, 512, 2048, 8192),
              "epochs": 200, "n_batches": 8, "sharpness_batch_size": 256, "n_iters": 20},
}


def lab6_controls() -> dict[str, Any]:
    """The knobs of lab 6's panel."""
    W = lk_widgets
    return {
        "optimizers": W.multi_select("optimizers",
                                     [(v, k) for k, v in LAB6_OPTIMIZERS.items()]),
        "lrs": W.multi_select("learning rates η", [(f"{v:g}", v) for v in LAB6_LRS]),
        "batch_sizes": W.multi_select("batch sizes b", [(str(b), b) for b in LAB6_BATCH_SIZES]),
        "beta": W.float_text("β (SHB, NSHB)", 0.9),
        "epochs": W.int_slider("epochs", 1, 300, 3),
        "seeds": W.int_slider("seeds", 1, 7, 1),
        "c2_source": W.dropdown("C² for δ", [(v, k) for k, v in LAB6_C2_SOURCES.items()]),
        "rho": W.float_text("sharpness radius ρ", 0.0002),
        "norm": W.dropdown("sharpness ball", [("ℓ∞ (seed 004)", "linf"), ("ℓ2", "l2")]),
        "n_batches": W.int_text("sharpness: batches", 2),
        "sharpness_batch_size": W.int_text("sharpness: batch size", 64),
        "n_iters": W.int_text("sharpness: ascent steps", 5),
    }


def lab6_defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (SGD, seed 004's rho = 0.0002 and l_inf ball, the
    paper's C^2)."""
    _check_profile(profile)
    return {"optimizers": ("sgd",), "beta": 0.9, "seeds": 1, "c2_source": "paper",
            "rho": 0.0002, "norm": "linf", **_LAB6_DEFAULTS[profile]}


def lab6_validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 6's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    opts = tuple(values.get("optimizers") or ())
    if not opts:
        msgs.append("choose at least one optimizer")
    bad = [o for o in opts if o not in LAB6_OPTIMIZERS]
    if bad:
        msgs.append(f"unknown optimizer(s) {', '.join(map(str, bad))}; valid: "
                    f"{', '.join(LAB6_OPTIMIZERS)}")
    lrs = tuple(values.get("lrs") or ())
    if not lrs:
        msgs.append("choose at least one learning rate")
    elif not all(_positive(v) for v in lrs):
        msgs.append(f"learning rates must be > 0; got {', '.join(map(str, lrs))}")
    bss = tuple(values.get("batch_sizes") or ())
    if not bss:
        msgs.append("choose at least one batch size")
    elif not all(_int_at_least(b, 1) for b in bss):
        msgs.append(f"batch sizes must be integers >= 1; got {', '.join(map(str, bss))}")
    if any(o in ("shb", "nshb") for o in opts):
        beta = values.get("beta")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            msgs.append(f"β (SHB, NSHB) must be in [0, 1); got {beta}")
    for key, label in (("epochs", "epochs"), ("seeds", "seeds"), ("n_batches", "sharpness "
                       "batches"), ("sharpness_batch_size", "sharpness batch size"),
                       ("n_iters", "sharpness ascent steps")):
        if not _int_at_least(values.get(key), 1):
            msgs.append(f"{label} must be an integer >= 1; got {values.get(key)}")
    if values.get("c2_source") not in LAB6_C2_SOURCES:
        msgs.append(f"C² source must be one of {', '.join(LAB6_C2_SOURCES)}; got "
                    f"{values.get('c2_source')!r}")
    if not _positive(values.get("rho")):
        msgs.append(f"sharpness radius ρ must be > 0 (seed 004: 0.0002); got {values.get('rho')}")
    if values.get("norm") not in ("linf", "l2"):
        msgs.append(f"sharpness ball must be 'linf' or 'l2'; got {values.get('norm')!r}")
    nb, sb = values.get("n_batches"), values.get("sharpness_batch_size")
    if _int_at_least(nb, 1) and _int_at_least(sb, 1) and values.get("profile") in PROFILES:
        n = _train_set_size(values["profile"])
        if nb * sb > n:
            msgs.append(f"sharpness batches × batch size = {nb} × {sb} = {nb * sb} exceeds the "
                        f"{n} training images of the {values['profile']} profile")
    return msgs


def lab6_grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 6's knobs ask for: optimizer x lr x batch size x seed on CIFAR-100 (the
    profile's model), no weight decay, the standard augmentation; SHB and NSHB with ``beta``.

    Raises:
        ValueError: invalid knobs (:func:`lab6_validate`'s messages).
    """
    msgs = lab6_validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    runs = []
    for opt, lr, b, seed in itertools.product(values["optimizers"], values["lrs"],
                                              values["batch_sizes"], range(values["seeds"])):
        hparams = {"beta": float(values["beta"])} if opt in ("shb", "nshb") else {}
        runs.append(TrainConfig(dataset="cifar100", optimizer=opt, lr=float(lr),
                                batch_size=int(b), hparams=hparams, epochs=values["epochs"],
                                seed=seed, profile=values["profile"]))
    return runs


def lab6_label(config: TrainConfig) -> str:
    """``"SGD η=0.1 b=128"`` (`` s1`` etc. for seeds other than 0)."""
    name = LAB6_OPTIMIZERS.get(config.optimizer, config.optimizer)
    text = f"{name} η={config.lr:g} b={config.batch_size}"
    if "beta" in config.hparams:
        text += f" β={config.hparams['beta']:g}"
    return text + (f" s{config.seed}" if config.seed else "")


def _load_run_model(folder: Path, device: Any) -> tuple[Any, Any, Any]:
    """(model with the run's last weights, its resolved config, its data on ``device``)."""
    from labkit.experiments.results import _final_model
    from labkit.train import prepare_data

    cfg = TrainConfig.from_dict(json.loads((folder / "config.json").read_text())).resolved()
    data = prepare_data(cfg, device)
    return _final_model(folder, cfg, data.num_classes, device), cfg, data


def lab6_gradient_variance(run: str | Path, *, n_examples: int = 512, seed: int = 0,
                           device: str = "auto", cache: bool = True) -> dict[str, float]:
    """C^2 and ||grad f||^2 at a run's last weights, over ``n_examples`` training images.

    :func:`labkit.experiments.results.measure_gradient_stats` (per-example gradients of the
    cross-entropy at the weights of ``<run>/checkpoint.pt``, model in eval mode, on a fixed
    random subset (``seed``) of the training split, normalized as in training and not
    augmented), as ``{"c2": C^2, "k2": ||grad f||^2, "n": n_examples}``. Seed 004's C^2 bounds
    the variance at every iterate of a run; one point gives a lower bound on it, and the end of
    training is where the noise acted last. Cached in ``<run>/gradient-stats.json``.

    Raises:
        FileNotFoundError: the folder has no ``config.json`` or ``checkpoint.pt``.
        ValueError: bad ``n_examples``, or more examples than the training split holds.
    """
    from labkit.experiments.results import measure_gradient_stats

    if not _int_at_least(n_examples, 2):
        raise ValueError(f"n_examples must be an integer >= 2; got {n_examples!r}")
    stats = measure_gradient_stats(run, n_images=n_examples, seed=seed,
                                   chunk_size=min(64, n_examples), device=device, cache=cache)
    return {"c2": float(stats.c2), "k2": float(stats.full_grad_norm_sq), "n": n_examples}


_LAB6_COLUMNS = ("run", "optimizer", "lr", "batch_size", "beta", "seed", "status",
                 "epochs_completed", "test_acc", "c2", "k2", "delta", "sharpness")


def lab6_measure(
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
        should_stop: polled before each run; True leaves the rest unmeasured (NaN).
        device: where to measure.

    Returns one row per run with the columns ``run, optimizer, lr, batch_size, beta, seed,
    status, epochs_completed, test_acc, c2, k2, delta, sharpness``: ``sharpness`` from
    :func:`labkit.experiments.measure_sharpness` on training batches (cached in the run
    folder, so a second call is instant); ``delta`` from :func:`labkit.noise.smoothing_degree`
    with the C^2 (and K^2 for SHB) of ``c2_source``: the paper's bounds
    (:data:`labkit.critical.PAPER_VALUES`, K = 1.77 for SHB) or
    :func:`lab6_gradient_variance` at the run's weights. Runs that did not finish (diverged,
    stopped, failed) get NaN sharpness (and NaN delta with measured C^2).

    Raises:
        ValueError: invalid ``values`` (:func:`lab6_validate`) or a table without the columns
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
            beta = lk_optim.hyperparameters(opt).get("beta") if opt in LAB6_OPTIMIZERS else None
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
        if finished and not stopped:
            if progress is not None:
                progress(f"measuring sharpness {i + 1}/{n}: {LAB6_OPTIMIZERS.get(opt, opt)} "
                         f"η={row['lr']:g} b={row['batch_size']}")
            row["sharpness"] = measure_sharpness(
                folder, rho=float(values["rho"]), norm=values["norm"],
                n_batches=int(values["n_batches"]),
                batch_size=int(values["sharpness_batch_size"]), n_iters=int(values["n_iters"]),
                device=device)
        if opt in noise.OPTIMIZERS:
            if values["c2_source"] == "paper":
                row["c2"] = float(paper["c2_upper_bound"][opt])
                row["k2"] = float(paper["k"]["shb"]) ** 2 if opt == "shb" else math.nan
            elif finished and not stopped:
                stats = lab6_gradient_variance(
                    folder, n_examples=int(values["n_batches"])
                    * int(values["sharpness_batch_size"]), device=device)
                row["c2"] = stats["c2"]
                row["k2"] = stats["k2"] if opt == "shb" else math.nan
            if math.isfinite(row["c2"]):
                row["delta"] = float(noise.smoothing_degree(
                    opt, lr=row["lr"], batch_size=row["batch_size"], c2=row["c2"],
                    beta=None if math.isnan(row["beta"]) else row["beta"],
                    k2=None if math.isnan(row["k2"]) else row["k2"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=list(_LAB6_COLUMNS))


def lab6_table(panel: Any, *, device: str = "auto") -> Any:
    """:func:`lab6_measure` of an :class:`~labkit.widgets.ExperimentPanel`'s last sweep, with
    the panel's knobs, progress in its status line (restored afterwards) and its Stop button
    honoured."""
    before = panel.status.value
    try:
        return lab6_measure(panel.results, panel.out_dir, panel.values(),
                            progress=panel.set_status,
                            should_stop=lambda: panel.stop_requested, device=device)
    finally:
        panel.status.value = before


def lab6_records(table: Any) -> list[dict[str, Any]]:
    """The rows of :func:`lab6_measure`'s table as plain dicts (what the lab records as
    ``sharpness_by_run``; NaN becomes None when recorded)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in table.to_dict("records")]


# Seed 004 Fig. 7's background: >= 70% high, >= 65% intermediate, < 65% poor generalization.
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


def _draw_lab6(fig: Any, table: Any, profile: str) -> Any:
    from labkit import critical
    from labkit.experiments import plot_sharpness_vs_delta

    df = table[table["sharpness"].notna() & table["test_acc"].notna()].copy()
    if df.empty:
        raise ValueError("no finished run has a sharpness: run the panel first (panel.run())")
    by = "lr"
    if df["optimizer"].nunique() > 1:
        by = "setting"
        df["setting"] = [f"{LAB6_OPTIMIZERS.get(o, o)} η={lr:g}"
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
        if y == "test_acc" and profile != "smoke":
            _accuracy_bands(ax)
        if x == "delta" or (y == "test_acc" and profile != "smoke"):
            ax.legend(fontsize="x-small")
        if ax.get_xscale() == "log" and x != "batch_size":
            _plain_log_ticks(ax.xaxis)
        ax.set_title(title, fontsize="medium")
    fig.suptitle("Seed 004 Fig. 8 from your runs: adaptive sharpness (the paper: ρ = "
                 f"{LAB6_PAPER['rho']:g}, ℓ∞ ball) and smoothing degree δ", fontsize="medium")
    return fig


def lab6_figure(table: Any, profile: str = "smoke") -> Any:
    """Seed 004 Fig. 8 (a), (c), (d), (e) from :func:`lab6_measure`'s table.

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

    _check_profile(profile)
    fig = plt.figure(figsize=(11.5, 8.0), layout="constrained")
    try:
        return _draw_lab6(fig, table, profile)
    except ValueError:
        plt.close(fig)
        raise


def lab6_on_result(panel: Any) -> None:
    """After a sweep: measure every run (:func:`lab6_table`) and draw Fig. 8 in the panel."""
    done = panel.status.value
    table = lab6_table(panel)
    measured = int(table["sharpness"].notna().sum())
    note = f"sharpness of {measured}/{len(table)} runs"
    if measured:
        fig = lk_widgets.new_figure((11.5, 8.0))
        _draw_lab6(fig, table, panel.profile)
        panel.show(fig)
    panel.set_status("", html_text=f"{done} &middot; {note}")


def lab6_paper_delta_rows(c2: float | None = None,
                          lrs: Sequence[float] = LAB6_PAPER["lrs"],
                          batch_sizes: Sequence[int] = LAB6_PAPER["batch_sizes"]
                          ) -> list[dict[str, Any]]:
    """delta_SGD = lr sqrt(C^2 / b) (seed 004 eq. (12)) over seed 004 Fig. 8's grid.

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


def lab6_tiny_problem() -> tuple[Any, Any]:
    """The two examples of lab 6's tiny ReLU network: inputs (2, 1) and targets (2, 1),
    float64: x = (1, 2), y = (3, 1)."""
    import torch

    return (torch.tensor([[1.0], [2.0]], dtype=torch.float64),
            torch.tensor([[3.0], [1.0]], dtype=torch.float64))


def lab6_tiny_net(w: float, v: float) -> Any:
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
