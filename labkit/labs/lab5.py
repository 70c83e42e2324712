"""Lab 5, implicit graduated optimization (``labs/lab5_implicit_graduated.ipynb``).

Reproduces Sato & Iiduka's (2023) experiments "implicit graduated optimization" and "optimal
learning-rate
decay" (Sato & Iiduka, arXiv:2311.08745). Book: chapter 7 (graduated optimization).

SGD with learning rate eta and batch size b smooths the loss with degree
``delta = eta C / sqrt(b)`` (C^2 the stochastic-gradient variance), so lowering eta or raising b
during training is graduated optimization. Sato & Iiduka (2023) trains ResNet-18 on CIFAR-100 with
plain SGD
(no momentum), eta_0 = 0.1, b_0 = 32, 200 epochs, and compares a constant schedule with three
step schedules that each multiply delta by 1/sqrt(2) every 40 epochs (eta x 1/sqrt(2); b x 2;
eta x sqrt(3)/2 with b x 1.5) and with the polynomial decay ``eta_e = eta_0 (1 - e / E)^p`` that
Algorithm 3 makes optimal (p = 0.9 in the authors' runs). The schedules are
:mod:`labkit.schedules` specs made by :func:`labkit.graduated.step_schedule` and
:func:`labkit.graduated.poly_schedule`; "every" scales with the run (the smoke profile's
5 epochs have one-epoch stages).

The panel's interface is that of every lab that trains (:mod:`labkit.labs`): :func:`controls`,
:func:`defaults`, :func:`validate`, :func:`grid` and :func:`label`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from labkit import widgets as lk_widgets
from labkit.labs.setup import (
    check_profile,
    dataset_of,
    is_int_at_least,
    is_positive,
    selection_messages,
)
from labkit.train import TrainConfig

__all__ = [
    "LAB_ID",
    "PAPER",
    "POWERS",
    "SCHEDULES",
    "add_schedule",
    "controls",
    "defaults",
    "epoch_plan",
    "epoch_plans",
    "figure",
    "grid",
    "label",
    "run_table",
    "schedule_key",
    "schedule_label",
    "stage_rows",
    "validate",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab5_implicit_graduated"

#: Lab 5's schedule keys and their names. "poly" stands for one run per power p; its runs'
#: keys are ``poly_p<p>`` (e.g. ``poly_p0.9``).
SCHEDULES: dict[str, str] = {
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
POWERS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 2.0)
#: Sato & Iiduka's (2023, arXiv:2311.08745) experiment.
PAPER: dict[str, Any] = {
    "source": "Sato & Iiduka, arXiv:2311.08745",
    "model": "resnet18", "dataset": "cifar100", "optimizer": "sgd (no momentum)",
    "lr0": 0.1, "batch0": 32, "epochs": 200, "every": 40, "p": 0.9,
    "stage_factor": 2.0**-0.5,
}

_DEFAULTS = {
    # CPU, generated data, tiny CNN: five 5-epoch runs with one-epoch stages.
    "smoke": {"epochs": 5, "every": 1},
    # CPU: the handwritten digits and the tiny CNN, 40 epochs, stages of 8 epochs. Measured:
    # 37 s of CPU time for the 5 runs (one core; 6 min wall on a shared 2-core machine).
    "cpu": {"epochs": 40, "every": 8},
    # One GPU: ResNet-18 on CIFAR-100, 20 epochs, stages of 4 epochs.
    "short": {"epochs": 20, "every": 4},
    # Sato & Iiduka's (2023) scale: 200 epochs, stages of 40 epochs.
    "paper": {"epochs": 200, "every": 40},
}


def controls() -> dict[str, Any]:
    """The knobs of lab 5's panel."""
    W = lk_widgets
    return {
        "schedules": W.multi_select("schedules", [(v, k) for k, v in SCHEDULES.items()]),
        "powers": W.multi_select("p (polynomial decay)", [(f"{p:g}", p) for p in POWERS]),
        "lr0": W.float_text("initial lr η₀", 0.1),
        "batch0": W.int_text("initial batch size b₀", 32),
        "epochs": W.int_slider("epochs", 2, 300, 5),
        "every": W.int_slider("stage length (epochs)", 1, 100, 1),
        "seeds": W.int_slider("seeds", 1, 5, 1),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile: Sato & Iiduka's (2023) lr0 = 0.1, b0 = 32, all schedules, p
    = 0.9;
    five stages (epochs / every = 5, as 200 / 40 in the paper)."""
    check_profile(profile)
    return {"schedules": tuple(SCHEDULES), "powers": (0.9,), "lr0": 0.1, "batch0": 32,
            "seeds": 1, **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 5's knobs cannot run, as messages (empty when they can)."""
    schedules = tuple(values.get("schedules") or ())
    msgs = selection_messages(schedules, "schedule", tuple(SCHEDULES))
    if "poly" in schedules:
        powers = tuple(values.get("powers") or ())
        if not powers:
            msgs.append("choose at least one power p for the polynomial decay (or deselect it)")
        elif not all(is_positive(p) for p in powers):
            msgs.append(f"every power p must be > 0; got {', '.join(map(str, powers))}")
    if not is_positive(values.get("lr0")):
        msgs.append(f"initial lr η₀ must be > 0; got {values.get('lr0')}")
    if not is_int_at_least(values.get("batch0"), 1):
        msgs.append(f"initial batch size b₀ must be an integer >= 1; got {values.get('batch0')}")
    epochs, every = values.get("epochs"), values.get("every")
    if not is_int_at_least(epochs, 2):
        msgs.append(f"epochs must be an integer >= 2 (a schedule needs two epochs to change "
                    f"anything); got {epochs}")
    if not is_int_at_least(every, 1):
        msgs.append(f"stage length must be an integer >= 1 epoch; got {every}")
    elif (is_int_at_least(epochs, 2) and every >= epochs
          and any(s in _STEP_MODES for s in schedules)):
        msgs.append(f"stage length ({every} epochs) must be shorter than the run ({epochs} "
                    "epochs), or the step schedules never change δ; Sato & Iiduka 2023 use 40 "
                    "of 200")
    if not is_int_at_least(values.get("seeds"), 1):
        msgs.append(f"seeds must be an integer >= 1; got {values.get('seeds')}")
    return msgs


def _specs(key: str, values: Mapping[str, Any]) -> list[tuple[dict, dict]]:
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


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 5's knobs ask for: schedule (and p) x seed.

    CIFAR-100 with the profile's model (ResNet-18 in short/paper, Sato & Iiduka's (2023) network;
    the tiny
    CNN in smoke), plain SGD without momentum or weight decay, the augmentation of the authors'
    code (crop, flip and a random rotation of up to 15 degrees: ``TrainConfig.rotate``).

    Raises:
        ValueError: invalid knobs (:func:`validate`'s messages).
    """
    msgs = validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    runs = []
    for key in values["schedules"]:
        for lr_spec, batch_spec in _specs(key, values):
            for seed in range(values["seeds"]):
                runs.append(TrainConfig(
                    dataset=dataset_of(values["profile"], "cifar100"), optimizer="sgd",
                    lr=float(values["lr0"]),
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


def schedule_key(lr_schedule: Any, batch_schedule: Any) -> str:
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


def schedule_label(key: str) -> str:
    """A schedule key's name in figures: ``"b × 2"``, ``"poly p = 0.9"``, ..."""
    if key in _STEP_SHORT:
        return _STEP_SHORT[key]
    if key.startswith("poly_p"):
        return f"poly p = {key[len('poly_p'):]}"
    return key


def label(config: TrainConfig) -> str:
    """A run's name in the panel: its schedule (``"lr × 1/√2"``, ``"poly p = 0.9"``), with
    `` s1`` etc. for seeds other than 0."""
    key = schedule_key(config.lr_schedule, config.batch_schedule)
    return schedule_label(key) + (f" s{config.seed}" if config.seed else "")


def _field(run: Any, name: str) -> Any:
    return getattr(run, name) if isinstance(run, TrainConfig) else run[name]


def epoch_plan(run: TrainConfig | Mapping[str, Any]) -> dict[str, list]:
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


def add_schedule(df: Any) -> Any:
    """A copy of a results or history table with a ``schedule`` column (the schedule key)."""
    if df is None or not {"lr_schedule", "batch_schedule"} <= set(df.columns):
        raise ValueError("the table needs the columns lr_schedule and batch_schedule (use "
                         "panel.results or panel.history)")
    out = df.copy()
    out["schedule"] = [schedule_key(a, b)
                       for a, b in zip(out["lr_schedule"], out["batch_schedule"], strict=True)]
    return out


def run_table(results: Any) -> Any:
    """The columns of lab 5's runs that matter (from ``panel.results``), one row per run:
    schedule, seed, initial lr and batch size, epochs, epochs done, status, final and best test
    accuracy."""
    df = add_schedule(results)
    cols = ["run", "schedule", "seed", "lr", "batch_size", "epochs", "epochs_completed", "status",
            "test_acc", "best_test_acc"]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True)


def epoch_plans(history: Any) -> dict[str, dict[str, list]]:
    """What each schedule actually used, from ``panel.history``: schedule key ->
    ``{"epoch": [...], "lr": [...], "batch_size": [...]}`` (the first seed's run; seeds share
    their schedule). The data of question 1, recorded by the lab."""
    df = add_schedule(history)
    out = {}
    for key, g in df.groupby("schedule", sort=False):
        run = g[g["run"] == g["run"].iloc[0]].sort_values("epoch")
        out[key] = {"epoch": [int(e) for e in run["epoch"]],
                    "lr": [float(v) for v in run["epoch_lr"]],
                    "batch_size": [int(v) for v in run["epoch_batch_size"]]}
    return out


def stage_rows(lr0: float = 0.1, batch0: int = 32, epochs: int = 200, every: int = 40,
               p: float = 0.9) -> list[dict[str, Any]]:
    """Sato & Iiduka's (2023) schedules stage by stage (defaults: their lr0, b0, epochs and
    stages).

    One dict per stage m = 0, 1, ...: ``{"stage": m, "first_epoch": ..., "last_epoch": ...,
    "batch_epoch": ..., <key>: {"lr": ..., "batch_size": ..., "delta_ratio": ...}}`` for the
    keys ``lr_step``, ``batch_step``, ``hybrid_step`` and ``poly``. Epochs are 1-based, as in
    the runs' metrics. ``first_epoch`` .. ``last_epoch`` is where the learning rate of the stage
    holds. As in the authors' code (:func:`labkit.graduated.step_schedule`) the batch grows
    one epoch after the learning rate decays, so the step schedules' values are given from
    ``batch_epoch`` on, the stage's second epoch, where every change of the stage is made
    (None for stage 0; for one-epoch stages it is the stage's only epoch, whose batch is
    still the previous stage's). The polynomial decay (power ``p``) is given at the stage's
    first epoch.
    """
    from labkit import graduated as G

    if not is_int_at_least(every, 1) or not is_int_at_least(epochs, 2):
        raise ValueError(f"epochs must be an integer >= 2 and every an integer >= 1; got "
                         f"epochs={epochs!r}, every={every!r}")
    plans = {key: G.step_schedule(lr0, batch0, mode, epochs=epochs, every=every)
             for key, mode in _STEP_MODES.items()}
    poly = G.poly_schedule(lr0, batch0, epochs - 1, p, mode="lr", epochs=epochs)
    rows = []
    for m, start in enumerate(range(0, epochs, every)):
        last = min(start + every, epochs) - 1  # 0-based
        grown = min(start + 1, last) if m else start  # 0-based epoch of the stage's batch
        row: dict[str, Any] = {"stage": m, "first_epoch": start + 1, "last_epoch": last + 1,
                               "batch_epoch": grown + 1 if m else None}
        for key, s in plans.items():
            row[key] = {"lr": s.lrs[grown], "batch_size": s.batch_sizes[grown],
                        "delta_ratio": s.delta_ratios[grown]}
        row["poly"] = {"lr": poly.lrs[start], "batch_size": poly.batch_sizes[start],
                       "delta_ratio": poly.delta_ratios[start]}
        rows.append(row)
    return rows


def _mean_band(ax: Any, df: Any, x: str, y: str, scale: float = 1.0, **kw: Any) -> Any:
    agg = df.groupby(x)[y].agg(["mean", "min", "max"]).sort_index().dropna()
    (line,) = ax.plot(agg.index, agg["mean"] * scale, **kw)
    if (agg["max"] > agg["min"]).any():
        ax.fill_between(agg.index, agg["min"] * scale, agg["max"] * scale,
                        color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def figure(history: Any) -> Any:
    """Test accuracy per epoch and delta_e / delta_0 per epoch, one line per schedule.

    Left: test accuracy (mean over seeds, band from min to max). Right: the smoothing degree
    relative to the start, computed from each schedule (:func:`epoch_plan`), on a log
    axis, with Sato & Iiduka's (2023) step schedules (delta x 1/sqrt(2) every 40 of 200 epochs) and
    its
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
    df = add_schedule(history)
    fig, (ax_acc, ax_d) = plt.subplots(1, 2, figsize=(11.5, 4.0), layout="constrained")
    epochs = int(df["epochs"].max())
    for i, (key, g) in enumerate(df.groupby("schedule", sort=False)):
        color = f"C{i}"
        name = schedule_label(key)
        _mean_band(ax_acc, g, "epoch", "test_acc", 100.0, color=color, marker="o",
                   markersize=3, label=name)
        # Epoch e (1-based) is drawn over (e - 1, e]; thick lines first, so that schedules
        # with the same delta (the three step schedules) stay visible on top of each other.
        ratios = epoch_plan(g.iloc[0])["delta_ratio"]
        ax_d.step(np.arange(len(ratios) + 1), [*ratios, ratios[-1]], where="post",
                  color=color, lw=max(1.2, 5.0 - 0.9 * i), alpha=0.85, label=name)
    # Sato & Iiduka's (2023) schedules at its scale (200 epochs, stages of 40), mapped onto this
    # run's
    # epochs: the paper's epoch e (0-based) is drawn over [e, e + 1) * epochs / 200.
    pe = np.arange(PAPER["epochs"] + 1)
    x = pe * epochs / PAPER["epochs"]
    stage = np.minimum(pe, PAPER["epochs"] - 1) // PAPER["every"]
    step = PAPER["stage_factor"] ** stage
    poly = (1 - np.minimum(pe, PAPER["epochs"] - 1) / PAPER["epochs"]) \
        ** PAPER["p"]
    ax_d.step(x, step, where="post", color="k", ls="--", lw=1,
              label="paper: δ × 1/√2 every 40 of 200 epochs")
    ax_d.step(x, poly, where="post", color="k", ls=":", lw=1,
              label="paper: poly p = 0.9 over 200 epochs")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("test accuracy per schedule (Sato & Iiduka 2023)", fontsize="medium")
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

