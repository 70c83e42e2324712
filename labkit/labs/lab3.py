"""Lab 3, the critical batch size (``labs/lab3_critical_batch.ipynb``), and what lab 4 shares.

Reproduces Sato & Iiduka (2024) Fig. 4 and §4.3 ("Role of momentum in smoothing
objective function and generalizability of deep neural networks", arXiv:2402.02325): SGD, SHB
and NSHB over a grid of batch sizes b; T(b) is the first step at which the running mean of the
mini-batch gradient norms, (1/t) sum_{s<=t} ||grad f_{S_s}(x_{s-1})||, is <= eps (the test of
the authors' code); the SFO complexity is T b and the critical batch size b* = argmin_b T b.
Theorem 4.4 read backwards turns b* into an upper bound on C^2
(:func:`labkit.critical.c2_upper_bound`), which the lab sets beside C^2 measured directly at the
runs' final weights (:func:`labkit.noise.gradient_variance`). Book: chapter 8 (critical batch
size, estimating C^2).

How T is measured. The runs of a lab are ordinary sweep runs (:func:`labkit.experiments.run_sweep`)
of a fixed number of epochs. :class:`GradNormLog` keeps the mini-batch gradient norm of every step
in the run folder (4 bytes a step), so T is exact to the step for *any* eps and any first tested
epoch, computed after training: changing eps re-reads the logs and trains nothing. On the same run
it gives the T of :func:`labkit.critical.measure_sfo` (which stops each run at T instead, and so
measures one eps per training). A run trained without the log falls back to
:func:`labkit.experiments.sfo_from_history` (T rounded up to an epoch end; ``exact`` is False).

Lab 4 (:mod:`labkit.labs.lab4`) trains the same sweep and takes from here the methods and batch
sizes of Sato & Iiduka (2024) (:data:`OPTIMIZERS`, :data:`BATCH_SIZES`), the panel's optimizer and
batch-size
selectors and their checks, the grid (:func:`grid`), the run names (:func:`label`) and C^2
measured at the runs' final weights (:func:`gradient_stats_of_sweep`, :func:`max_by_optimizer`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit import critical
from labkit import widgets as lk_widgets
from labkit.experiments.results import GRADIENT_STATS_FILE, measure_gradient_stats
from labkit.labs.setup import (
    check_profile,
    is_finite,
    is_int_at_least,
    is_positive,
    selection_messages,
)
from labkit.train import Callback, RunResult, RunState, TrainConfig

__all__ = [
    "BATCH_SIZES",
    "DATASETS",
    "GRADIENT_STATS_FILE",
    "GRAD_NORMS_FILE",
    "LAB_ID",
    "OPTIMIZERS",
    "OPTIMIZER_LABELS",
    "GradNormLog",
    "batch_size_selector",
    "c2_bounds",
    "controls",
    "critical_batch_sizes",
    "defaults",
    "figure",
    "format_theorem_4_4_table",
    "gradient_stats_of_sweep",
    "grid",
    "label",
    "load_grad_norms",
    "max_by_optimizer",
    "measure_gradient_stats",
    "on_result",
    "optimizer_selector",
    "run_table",
    "running_mean",
    "sfo",
    "sfo_of_sweep",
    "sfo_table",
    "sized_figure",
    "steps_to_threshold",
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
DATASETS = {"smoke": "cifar10", "short": "cifar100", "paper": "cifar100"}
#: File of a run folder with the mini-batch gradient norm of every step (little-endian float32).
GRAD_NORMS_FILE = "grad-norms.f32"


# =========================================================================== the gradient-norm log


def _constant_batch(config: TrainConfig) -> bool:
    s = config.batch_schedule
    return s is None or (isinstance(s, Mapping) and s.get("kind") == "constant")


class GradNormLog(Callback):
    """Keeps the mini-batch gradient norm of every step in ``<run folder>/grad-norms.f32``.

    The norm of step t is ||grad f_{S_t}(x_{t-1})||, the gradient of the mean mini-batch loss
    (``state.grad_norm`` of :func:`labkit.train.train`), stored as little-endian float32, one
    value per step in order. The values wait on the device and are written once per epoch, at
    its last step (before the epoch's checkpoint), so the log never falls behind a checkpoint.
    A resumed run truncates the log to the checkpoint's step count and goes on, so the log of
    an interrupted run equals that of an uninterrupted one. A run resumed from a checkpoint the
    log does not cover (trained without this callback) keeps no log: an incomplete log would
    give a wrong T. Runs without a folder, without ``track_grad_norm`` or with a batch-size
    schedule are not logged.

    Pass one instance to every run (``ExperimentPanel(callbacks=[GradNormLog()])``).
    """

    step_interval = 1

    def __init__(self) -> None:
        self._path: Path | None = None
        self._pending: list[torch.Tensor] = []

    def on_run_start(self, state: RunState) -> None:
        self._path = None
        self._pending = []
        cfg = state.config
        if cfg.out is None or not cfg.track_grad_norm or not _constant_batch(cfg):
            return
        path = Path(cfg.out) / GRAD_NORMS_FILE
        have = path.stat().st_size // 4 if path.exists() else 0
        if have < state.step:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:  # creates the file; then cut it back to the checkpoint
            f.truncate(4 * state.step)
        self._path = path

    def on_step(self, state: RunState) -> None:
        if self._path is None or state.grad_norm is None:
            return
        self._pending.append(state.grad_norm.detach().float().reshape(()))
        if state.steps_per_epoch and state.step % state.steps_per_epoch == 0:
            self._flush()

    def on_run_end(self, state: RunState, result: RunResult) -> None:
        if self._path is not None:
            self._flush()
        self._path = None

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack(self._pending).cpu().numpy().astype("<f4")
        self._pending = []
        with open(self._path, "ab") as f:
            f.write(values.tobytes())
            f.flush()
            os.fsync(f.fileno())


def load_grad_norms(run: str | os.PathLike) -> np.ndarray | None:
    """The per-step mini-batch gradient norms a run folder logged (float32, one per step), or
    None when the run kept no log (:class:`GradNormLog`)."""
    path = Path(run) / GRAD_NORMS_FILE
    if not path.exists():
        return None
    return np.fromfile(path, dtype="<f4")


def running_mean(norms: Any) -> np.ndarray:
    """m_t = (1/t) sum_{s<=t} norms_s for t = 1..len(norms), summed in float64 in order.

    The sum is sequential in float64, as in :class:`labkit.critical.SFOCallback`, so the
    threshold test gives the same T bit for bit.
    """
    g = np.asarray(norms, dtype=np.float64).reshape(-1)
    return np.cumsum(g) / np.arange(1, g.size + 1, dtype=np.float64)


def steps_to_threshold(norms: Any, eps: float, first_step: int = 1) -> int | None:
    """T: the first step t >= ``first_step`` (1-based) at which the running mean of the
    gradient norms of steps 1..t is <= ``eps``; None when no logged step passes.

    Raises:
        ValueError: ``eps`` is not a positive finite number, or ``first_step`` not an int >= 1.
    """
    if not is_positive(eps):
        raise ValueError(f"eps must be a positive finite number (a gradient norm); got {eps!r}")
    if not is_int_at_least(first_step, 1):
        raise ValueError(f"first_step must be an integer >= 1; got {first_step!r}")
    m = running_mean(norms)
    hit = np.nonzero(m[first_step - 1:] <= eps)[0]
    return int(hit[0]) + first_step if hit.size else None


# =========================================================================== SFO from a sweep


def sfo_of_sweep(folder: str | os.PathLike, eps: float, *, min_epochs: int = 0,
                 runs: Sequence[str] | None = None) -> Any:
    """T and the SFO complexity T b of every run of a sweep folder, for threshold ``eps``.

    The test of Sato & Iiduka (2024) §4.3 as in the authors' code: T is the first step t from the
    last step
    of epoch ``min_epochs`` on (t >= min_epochs * ceil(n / b), and t >= 1) at which the running
    mean of the mini-batch gradient norms of steps 1..t is <= eps. Exact from the run's
    :class:`GradNormLog`; from the per-epoch means (:func:`labkit.experiments.sfo_from_history`,
    T rounded up to an epoch end) for a run without one.

    Args:
        folder: the sweep folder (``panel.out_dir``).
        eps: the threshold, > 0 (gradient-norm units).
        min_epochs: the epoch from whose end on the test applies (the authors' code: 10).
        runs: the run hashes to keep (``panel.results["run"]``); None keeps all.

    Returns:
        A ``pandas.DataFrame``, one row per run: ``run``, ``optimizer``, ``batch_size``,
        ``seed``, ``lr``, ``beta``, ``status``, ``epochs_completed``, ``steps`` (T; <NA>
        where eps was not reached), ``sfo`` (T b; ``inf`` where eps was not reached),
        ``reached``, ``complete`` (the run
        finished or diverged, so a miss is final), ``exact`` (T from the step log),
        ``lowest_mean`` (the smallest running mean at the tested steps: the smallest eps the
        run reaches), ``final_mean`` (the running mean at the last step) and ``folder``.

    Raises:
        ValueError: a bad ``eps`` or ``min_epochs``.
        FileNotFoundError: ``folder`` is not a sweep folder.
    """
    import pandas as pd

    from labkit.experiments import load_history, load_results, sfo_from_history

    if not is_positive(eps):
        raise ValueError(f"eps must be a positive finite number (a gradient norm); got {eps!r}")
    if not is_int_at_least(min_epochs, 0):
        raise ValueError(f"min_epochs must be an integer >= 0; got {min_epochs!r}")
    folder = Path(folder)
    results = load_results(folder)
    if runs is not None:
        results = results[results["run"].isin(list(runs))]
    history = load_history(folder) if len(results) else None
    rows = []
    for _, r in results.iterrows():
        b = int(r["batch_size"])
        run_folder = folder / str(r["folder"])
        h = history[history["run"] == r["run"]] if history is not None else None
        norms = load_grad_norms(run_folder)
        steps: int | None = None
        lowest = final = math.nan
        exact = norms is not None and norms.size > 0
        if exact:
            # Steps per epoch from the first finished epoch; before one finished, only a test
            # from the first step on (min_epochs = 0) can have been applied.
            spe = int(h["steps"].iloc[0]) if h is not None and len(h) else None
            first = 1 if min_epochs == 0 else (min_epochs * spe if spe else norms.size + 1)
            m = running_mean(norms)
            tested = m[first - 1:]
            with np.errstate(invalid="ignore"):
                hit = np.nonzero(tested <= eps)[0]
            steps = int(hit[0]) + first if hit.size else None
            finite = tested[np.isfinite(tested)]
            lowest = float(finite.min()) if finite.size else math.nan
            final = float(m[-1])
        elif h is not None and len(h) and h["grad_norm"].notna().any():
            s = sfo_from_history(h, eps, min_epochs=min_epochs).iloc[0]
            steps = int(s["steps"]) if s["reached"] else None
            g = h.sort_values("epoch")
            means = (g["grad_norm"] * g["steps"]).cumsum() / g["steps"].cumsum()
            tested = means[g["epoch"] >= min_epochs]
            lowest = float(tested.min()) if len(tested) else math.nan
            final = float(means.iloc[-1])
        status = r["status"]
        beta = r.get("beta")
        rows.append({
            "run": r["run"], "optimizer": r["optimizer"], "batch_size": b,
            "seed": int(r["seed"]), "lr": float(r["lr"]),
            "beta": float(beta) if is_finite(beta) else None, "status": status,
            "epochs_completed": int(r["epochs_completed"] or 0), "steps": steps,
            "sfo": float(steps * b) if steps is not None else math.inf,
            "reached": steps is not None, "complete": status in ("finished", "diverged"),
            "exact": bool(exact), "lowest_mean": lowest, "final_mean": final,
            "folder": str(run_folder),
        })
    columns = ["run", "optimizer", "batch_size", "seed", "lr", "beta", "status",
               "epochs_completed", "steps", "sfo", "reached", "complete", "exact",
               "lowest_mean", "final_mean", "folder"]
    df = pd.DataFrame(rows, columns=columns)
    df["steps"] = pd.array([r["steps"] for r in rows], dtype="Int64")  # <NA> where not reached
    return df


def sfo(panel: Any) -> Any:
    """:func:`sfo_of_sweep` of a lab 3 panel's runs, with the panel's eps and first tested
    epoch (``panel.values()["eps"]``, ``["min_epochs"]``)."""
    values = panel.values()
    return sfo_of_sweep(panel.out_dir, values["eps"], min_epochs=values["min_epochs"],
                        runs=list(panel.results["run"]))


def sfo_table(sfo: Any) -> dict[str, dict[int, float]]:
    """``{optimizer: {batch size: SFO complexity}}`` from :func:`sfo_of_sweep`'s rows.

    Seeds are averaged; a batch size counts as reaching eps only if every one of its runs did
    (else its entry is ``inf``, which :func:`labkit.record` saves as null). Runs still missing
    epochs that have not reached eps yet are left out (their T is not known). Optimizers in the
    order SGD, SHB, NSHB, batch sizes ascending.
    """
    table: dict[str, dict[int, float]] = {}
    if len(sfo) == 0:
        return table
    known = sfo[sfo["reached"] | sfo["complete"]]
    order = [o for o in OPTIMIZERS if o in set(known["optimizer"])]
    order += sorted(set(known["optimizer"]) - set(order))
    for opt in order:
        g = known[known["optimizer"] == opt]
        row = {}
        for b, gb in sorted(g.groupby("batch_size"), key=lambda kv: kv[0]):
            row[int(b)] = float(gb["sfo"].mean()) if gb["reached"].all() else math.inf
        table[opt] = row
    return table


def critical_batch_sizes(table: Mapping[str, Mapping[int, float]]) -> dict[str, int | None]:
    """b* = argmin_b SFO(b) per optimizer (:func:`labkit.critical.critical_batch_size`; the
    smallest b on a tie), None for an optimizer none of whose batch sizes reached eps."""
    out: dict[str, int | None] = {}
    for opt, row in table.items():
        finite = {int(b): float(v) for b, v in row.items() if is_finite(v)}
        out[opt] = critical.critical_batch_size(finite) if finite else None
    return out


def c2_bounds(b_star: Mapping[str, int | None], *, lr: float, eps: float,
              beta: float) -> dict[str, float | None]:
    """Theorem 4.4 read backwards for each optimizer with a b*
    (:func:`labkit.critical.c2_upper_bound`); None where b* is None."""
    return {
        opt: None if b is None else critical.c2_upper_bound(
            opt, critical_batch_size=int(b), lr=lr, eps=eps, beta=None if opt == "sgd" else beta)
        for opt, b in b_star.items()
    }


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
    # CPU, generated 10-class data, tiny CNN: 12 runs of 3 epochs in about half a minute. With
    # eps = 1.3 every optimizer has a b* and SGD's SFO curve is U-shaped.
    "smoke": {"batch_sizes": (16, 32, 64, 128), "eps": 1.3, "min_epochs": 1, "epochs": 3,
              "c2_images": 128},
    # One GPU: ResNet-18 on CIFAR-100, the batch sizes around the paper's b*, 15 epochs. The
    # looser eps = 1 is reached within them (the paper's 0.5 needs longer runs).
    "short": {"batch_sizes": (128, 256, 512, 1024, 2048), "eps": 1.0, "min_epochs": 2,
              "epochs": 15, "c2_images": 1024},
    # Sato & Iiduka (2024) §4.3: b = 2^3 ... 2^13, eps = 0.5, the test from epoch 10 on (authors'
    # code).
    "paper": {"batch_sizes": BATCH_SIZES, "eps": 0.5, "min_epochs": 10, "epochs": 200,
              "c2_images": 2048},
}


def controls() -> dict[str, Any]:
    """The knobs of lab 3's panel. ``eps``, ``min_epochs`` and ``c2_images`` only change the
    analysis: changing them reloads the runs and trains nothing."""
    W = lk_widgets
    return {
        "optimizers": optimizer_selector(),
        "batch_sizes": batch_size_selector(),
        "lr": W.float_text("learning rate η", 0.1),
        "beta": W.float_text("momentum β (SHB, NSHB)", 0.9),
        "eps": W.float_text("threshold ε", 0.5),
        "min_epochs": W.int_text("test from the end of epoch", 0),
        "epochs": W.int_slider("epochs", 1, 200, 4),
        "seeds": W.int_slider("seeds", 1, 3, 1),
        "c2_images": W.int_text("images for the measured C²", 1024),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (η = 0.1 and β = 0.9 as in the paper)."""
    check_profile(profile)
    return {"optimizers": OPTIMIZERS, "lr": 0.1, "beta": 0.9, "seeds": 1,
            **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 3's knobs cannot run, as messages (empty when they can)."""
    msgs = validate_sweep(values, max_seeds=3)
    eps = values.get("eps")
    if not is_positive(eps):
        msgs.append(f"threshold ε must be > 0 (a gradient norm); got {eps}")
    m, e = values.get("min_epochs"), values.get("epochs")
    if not is_int_at_least(m, 0):
        msgs.append(f"the first tested epoch must be an integer >= 0; got {m}")
    elif is_int_at_least(e, 1) and m > e:
        msgs.append(f"the test starts after epoch {m} but the runs have only {e} epochs: the "
                    f"test would never be applied; use a first tested epoch <= {e}")
    return msgs


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 3's knobs ask for: optimizer x batch size x seed, each ``epochs`` long.

    CIFAR-100 with ResNet-18 in short/paper (the generated 10-class set and the tiny CNN in
    smoke, see :data:`DATASETS`), constant learning rate, no weight decay, the standard
    augmentation, gradient norms tracked. eps does not enter: T is computed afterwards.
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
                ))
    return runs


def run_table(sfo: Any) -> Any:
    """The columns of :func:`sfo_of_sweep` worth reading, one row per run."""
    cols = ["optimizer", "batch_size", "seed", "status", "epochs_completed", "steps", "sfo",
            "reached", "lowest_mean", "exact"]
    return sfo[cols].reset_index(drop=True)


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


def figure(sfo: Any, values: Mapping[str, Any], c2_measured: Mapping[str, float] | None = None,
           *, fig: Any = None) -> Any:
    """Sato & Iiduka (2024) Fig. 4 from your runs, and the C^2 bounds it implies.

    Top row, one panel per optimizer: the running mean of the mini-batch gradient norms
    against the examples processed t b, one line per batch size, with eps dashed; a line
    crosses eps at its SFO complexity T b (dot). Bottom left: SFO complexity against b with b*
    ringed and the paper's b* dotted (labelled as the paper's). Bottom right: C^2 per
    optimizer: your Theorem 4.4 bound from your b*, the value measured at your runs' final
    weights (``c2_measured``) and the paper's bound.

    Args:
        sfo: :func:`sfo_of_sweep` (with its ``folder`` column).
        values: the panel's values (``eps``, ``min_epochs``, ``lr``, ``beta``, ``profile``).
        c2_measured: optimizer -> measured C^2 (:func:`max_by_optimizer`).
        fig: a matplotlib ``Figure`` to draw into (e.g. :func:`labkit.widgets.new_figure`);
            None makes one with pyplot.

    Raises:
        ValueError: ``sfo`` has no runs.
    """
    import matplotlib as mpl

    from labkit.experiments import plot_sfo_vs_batch_size

    if sfo is None or len(sfo) == 0:
        raise ValueError("sfo has no runs: run the panel first (panel.run())")
    eps, lr, beta = float(values["eps"]), float(values["lr"]), float(values["beta"])
    opts = [o for o in OPTIMIZERS if o in set(sfo["optimizer"])]
    fig = sized_figure(fig, (4.4 * max(len(opts), 2) + 1, 7.6))
    mosaic = [opts, ["sfo"] * (len(opts) - 1) + ["c2"]] if len(opts) > 1 else \
        [[opts[0], "sfo", "c2"]]
    axes = fig.subplot_mosaic(mosaic)
    sizes = sorted(set(int(b) for b in sfo["batch_size"]))
    norm = mpl.colors.Normalize(math.log2(sizes[0]) - 0.5, math.log2(sizes[-1]) + 0.5)
    cmap = mpl.colormaps["viridis"]
    for opt in opts:
        ax = axes[opt]
        for _, r in sfo[sfo["optimizer"] == opt].sort_values("batch_size").iterrows():
            norms = load_grad_norms(r["folder"])
            if norms is None or norms.size == 0:
                continue
            m = running_mean(norms)
            idx = _thin(m.size)
            b = int(r["batch_size"])
            color = cmap(norm(math.log2(b)))
            label = f"b = {b}" + (f" s{r['seed']}" if r["seed"] else "")
            ax.plot((idx + 1) * b, m[idx], color=color, lw=1.2, label=label)
            if r["reached"]:
                ax.plot([r["sfo"]], [eps], "o", color=color, ms=6, markeredgecolor="k")
        ax.axhline(eps, color="k", ls="--", lw=1, label=f"ε = {eps:g}")
        ax.set_xscale("log")
        ax.set_xlabel("examples processed t·b")
        ax.set_ylabel("running mean of ‖∇f_S‖")
        ax.set_title(f"{OPTIMIZER_LABELS[opt]}: the test passes at T·b", fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    table = sfo_table(sfo)
    ax = axes["sfo"]
    if any(is_finite(v) for row in table.values() for v in row.values()):
        plot_sfo_vs_batch_size(table, paper=True, ax=ax)
    else:
        ax.text(0.5, 0.5, f"no batch size reached ε = {eps:g}:\nraise ε or train longer",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"SFO complexity T·b (Sato & Iiduka 2024, Fig. 4), ε = {eps:g}", fontsize="medium")
    b_star = critical_batch_sizes(table)
    bounds = c2_bounds(b_star, lr=lr, eps=eps, beta=beta)
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
        panel.set_status("", html_text=panel.status.value + " &middot; every finished run "
                         f"reaches ε &ge; {float(reach.max()):.3g}")

