"""The critical batch size from training runs: one path from per-step gradient norms to C^2.

Book: chapter 8 (critical batch size, estimating C^2), Sato & Iiduka (2024) §4.3 and Fig. 4.
Lab 3, ``labkit critical`` and ``labkit critical measure`` all take this path:

1. **Log.** Every run with ``track_grad_norm`` and a folder keeps the mini-batch gradient norm
   ||grad f_{S_t}(x_{t-1})|| of each step t in ``grad-norms.f32``
   (:func:`labkit.train.train` writes it, :func:`labkit.store.read_grad_norms` reads it).
2. **T per run.** :func:`steps_to_threshold` applies the stopping rule below to the log, so T
   is exact to the step for any eps, computed after training (:func:`sfo_of_sweep`).
3. **SFO table.** :func:`sfo_curves` groups the runs by optimizer, learning rate and momentum;
   each :class:`SFOCurve` holds the SFO complexity T b per batch size, averaged over seeds
   (:func:`labkit.critical.sfo_table`), and its spread.
4. **b\\* and C^2.** :attr:`SFOCurve.critical_batch_size` is argmin_b T b
   (:func:`labkit.critical.critical_batch_size`) and :attr:`SFOCurve.c2_upper_bound`
   Theorem 4.4 read backwards (:func:`labkit.critical.c2_upper_bound`).

:func:`measure_sfo` trains one run per batch size into a folder, ends each run once its T is
known, and then takes the same path.

**The stopping rule.** The authors' code (GitHub ``naoki-sato3/sigma-nice-momentum``,
``main.py``, mode "critical") keeps the running mean of the mini-batch gradient norms of all steps
from the first, m_t = (1/t) sum_{s<=t} ||grad f_{S_s}(x_{s-1})||, and stops at the first step whose
m_t <= eps, testing only while ``epoch > 10`` with 0-based epochs: from the first step of the
12th epoch on, t >= 11 ceil(n / b) + 1. Sato & Iiduka (2024) print no such offset; their
figures come from the code, so labkit follows the code. ``skip_epochs`` is the number of whole
epochs the test skips (:data:`AUTHORS_SKIP_EPOCHS` = 11 by default; the test then applies from
step ``skip_epochs * ceil(n / b) + 1``); :func:`steps_to_threshold` takes any first step.
labkit 0.2 tested from the last step of epoch 10 instead (t >= 10 ceil(n / b)), one epoch and one
step earlier, which can change T and b*.

The lab profiles that train fewer epochs skip fewer (:data:`SKIP_EPOCHS`): the smoke profile
trains 3 epochs and skips 1, the short profile trains 15 and skips 2. Skipping 11 would leave
the smoke runs nothing to test, and in the short runs every batch size that reaches eps early
would pass at the same first tested step, so that T b would just grow with b.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labkit import critical, store
from labkit.train import Callback, RunState, TrainConfig

__all__ = [
    "AUTHORS_SKIP_EPOCHS",
    "SKIP_EPOCHS",
    "SFOCurve",
    "StopAtThreshold",
    "first_tested_step",
    "measure_sfo",
    "running_mean",
    "sfo_curves",
    "sfo_of_sweep",
    "steps_to_threshold",
]

#: Whole epochs the stopping test skips in the authors' code (``epoch > 10``, 0-based).
AUTHORS_SKIP_EPOCHS = 11
#: Epochs the test skips in each lab profile (the smoke and short runs are too short for 11).
SKIP_EPOCHS = {"smoke": 1, "cpu": AUTHORS_SKIP_EPOCHS, "short": 2, "paper": AUTHORS_SKIP_EPOCHS}
#: Columns of :func:`sfo_of_sweep`.
RUN_COLUMNS = ("run", "optimizer", "lr", "beta", "batch_size", "seed", "status",
               "epochs_completed", "steps", "sfo", "reached", "complete", "first_step",
               "lowest_mean", "final_mean", "eps", "skip_epochs", "folder")
# Files of a measurement folder written by labkit 0.2's measure_sfo.
_OLD_MEASUREMENT_FILE = "sfo-settings.json"


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
        math.isfinite(eps) and eps > 0
    ):
        raise ValueError(f"eps must be a positive finite number (a gradient norm); got {eps!r}")
    return float(eps)


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- the rule


def running_mean(norms: Any) -> np.ndarray:
    """m_t = (1/t) sum_{s<=t} norms_s for t = 1..len(norms), summed in float64 in order."""
    g = np.asarray(norms, dtype=np.float64).reshape(-1)
    return np.cumsum(g) / np.arange(1, g.size + 1, dtype=np.float64)


def first_tested_step(steps_per_epoch: int, skip_epochs: int = AUTHORS_SKIP_EPOCHS) -> int:
    """The first step (1-based) the stopping test applies to: the first step after
    ``skip_epochs`` whole epochs of ``steps_per_epoch`` steps, ``skip_epochs * spe + 1``.

    With the authors' 11 and b = 128 on CIFAR's 50000 images (391 steps an epoch) it is 4302.
    """
    spe = _check_count("steps_per_epoch", steps_per_epoch, 1)
    return _check_count("skip_epochs", skip_epochs, 0) * spe + 1


def _first_pass(mean: np.ndarray, eps: float, first_step: int) -> int | None:
    with np.errstate(invalid="ignore"):
        hit = np.nonzero(mean[first_step - 1:] <= eps)[0]
    return int(hit[0]) + first_step if hit.size else None


def steps_to_threshold(norms: Any, eps: float, first_step: int = 1) -> int | None:
    """T: the first step t >= ``first_step`` (1-based) whose running mean of the gradient norms
    of steps 1..t is <= ``eps``; None when no step of ``norms`` passes (a NaN never passes).

    ``first_step`` is :func:`first_tested_step` for the authors' rule.

    Raises:
        ValueError: ``eps`` is not a positive finite number, or ``first_step`` not an int >= 1.
    """
    eps = _check_eps(eps)
    first_step = _check_count("first_step", first_step, 1)
    return _first_pass(running_mean(norms), eps, first_step)


# --------------------------------------------------------------------------- T of every run


def _sweep_base(folder: Path) -> Path:
    """The folder that a results table's ``folder`` column is relative to."""
    if (folder / store.INDEX_FILE).exists() or (folder / store.RUNS_FOLDER).is_dir():
        return folder
    return folder.parent  # a single run folder


def _constant_batch(schedule: Any) -> bool:
    if isinstance(schedule, str):
        schedule = json.loads(schedule)
    return schedule is None or (isinstance(schedule, Mapping)
                                and schedule.get("kind") == "constant")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def sfo_of_sweep(folder: str | os.PathLike, eps: float, *,
                 skip_epochs: int = AUTHORS_SKIP_EPOCHS,
                 runs: Sequence[str] | None = None) -> Any:
    """T and the SFO complexity T b of every run of a sweep folder, for threshold ``eps``.

    T comes from each run's per-step gradient-norm log with the stopping rule of the module
    docstring: the first step from :func:`first_tested_step` on whose running mean is <= eps.

    Args:
        folder: a sweep folder (``labkit sweep --out``, a lab panel's ``out_dir``), a
            measurement folder (``labkit critical measure --out``) or a single run folder.
        eps: the threshold, > 0 (gradient-norm units).
        skip_epochs: whole epochs the test skips (the authors' code: 11).
        runs: the run names to keep (``panel.results["run"]``); None keeps all.

    Returns:
        A ``pandas.DataFrame``, one row per run, columns :data:`RUN_COLUMNS`: ``steps`` (T;
        <NA> where eps was not reached), ``sfo`` (T b; inf where not reached), ``reached``,
        ``complete`` (the run finished or diverged, so a miss is final), ``first_step``,
        ``lowest_mean`` (the smallest running mean at the tested steps: the smallest eps the
        run reaches), ``final_mean`` (the running mean at the last step), the ``eps`` and
        ``skip_epochs`` used, and the run ``folder``.

    Raises:
        ValueError: a bad ``eps`` or ``skip_epochs``; a run that changes its batch size; runs
            with trained epochs but no complete gradient-norm log (the message lists them and
            says what to do).
        FileNotFoundError: ``folder`` is neither a sweep nor a run folder.
    """
    import pandas as pd

    from labkit import optim as lk_optim
    from labkit.experiments.results import load_results

    eps = _check_eps(eps)
    skip_epochs = _check_count("skip_epochs", skip_epochs, 0)
    folder = Path(folder)
    results = load_results(folder)
    if runs is not None:
        results = results[results["run"].isin(list(runs))]
    base = _sweep_base(folder)
    rows, unlogged = [], []
    for _, r in results.iterrows():
        b = int(r["batch_size"])
        run_folder = base / str(r["folder"])
        if not _constant_batch(r["batch_schedule"]):
            raise ValueError(
                f"run {r['run']} ({run_folder}) changes its batch size (batch_schedule "
                f"{r['batch_schedule']}): the SFO complexity T b needs a constant batch size")
        _, metrics = store.run_state(run_folder)
        total = int(metrics[-1]["total_steps"]) if metrics else 0
        norms = store.read_grad_norms(run_folder)
        if total and (norms is None or norms.size < total):
            why = ("it was trained without gradient norms (track_grad_norm=False)"
                   if metrics[-1].get("grad_norm") is None and not metrics[-1].get("diverged")
                   else "it was trained before labkit logged every step's gradient norm")
            unlogged.append(f"{run_folder} ({why})")
            continue
        norms = norms[:total] if norms is not None else np.zeros(0, dtype="<f4")
        if metrics:
            first = first_tested_step(int(metrics[0]["steps"]), skip_epochs)
        else:
            first = 1 if skip_epochs == 0 else None  # no epoch yet: steps per epoch unknown
        mean = running_mean(norms)
        steps = _first_pass(mean, eps, first) if first is not None else None
        tested = mean[first - 1:] if first is not None else mean[:0]
        tested = tested[np.isfinite(tested)]
        beta = r.get("beta")
        if r["optimizer"] == "sgd":
            beta = None
        elif not _finite(beta):  # the run did not set it: the optimizer's default
            beta = lk_optim.hyperparameters(r["optimizer"]).get("beta")
        status = r["status"]
        rows.append({
            "run": r["run"], "optimizer": r["optimizer"], "lr": float(r["lr"]),
            "beta": float(beta) if _finite(beta) else None,
            "batch_size": b, "seed": int(r["seed"]), "status": status,
            "epochs_completed": len(metrics), "steps": steps,
            "sfo": float(critical.sfo_complexity(steps, b)) if steps is not None else math.inf,
            "reached": steps is not None, "complete": status in ("finished", "diverged"),
            "first_step": first,
            "lowest_mean": float(tested.min()) if tested.size else math.nan,
            "final_mean": float(mean[-1]) if mean.size else math.nan,
            "eps": eps, "skip_epochs": skip_epochs, "folder": str(run_folder),
        })
    if unlogged:
        raise ValueError(
            "T needs the gradient norm of every step, and these runs have none logged: "
            + "; ".join(unlogged) + ". Delete their folders and run the same sweep (or panel, "
            "or `labkit critical measure`) again: only the deleted runs are trained, and "
            "labkit now logs every step")
    df = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    df["steps"] = pd.array([r["steps"] for r in rows], dtype="Int64")  # <NA> where not reached
    df["first_step"] = pd.array([r["first_step"] for r in rows], dtype="Int64")
    return df


# --------------------------------------------------------------------------- SFO, b*, C^2


@dataclass(frozen=True)
class SFOCurve:
    """The SFO complexity of one optimizer, learning rate and momentum against the batch size,
    and what Theorem 4.4 makes of it.

    Attributes:
        optimizer, lr, beta: the runs' settings (``beta`` None for SGD).
        eps: the stopping threshold.
        sfo: batch size -> SFO complexity T b, the mean over the runs (seeds) of that batch
            size; inf where a run never passed the test (:func:`labkit.critical.sfo_table`).
        spread: batch size -> (smallest, largest) T b over the runs, for the batch sizes where
            every run passed (the papers' band over seeds).
        runs: batch size -> the number of runs averaged.
    """

    optimizer: str
    lr: float
    beta: float | None
    eps: float
    sfo: dict[int, float]
    spread: dict[int, tuple[float, float]] = field(default_factory=dict)
    runs: dict[int, int] = field(default_factory=dict)

    @property
    def critical_batch_size(self) -> int | None:
        """b* = argmin_b T b over the batch sizes that reached eps (the smallest on a tie);
        None when none did."""
        finite = {b: v for b, v in self.sfo.items() if math.isfinite(v)}
        return critical.critical_batch_size(finite) if finite else None

    @property
    def c2_upper_bound(self) -> float | None:
        """Theorem 4.4 read backwards with b*, eta, beta and eps; None without b* or for an
        optimizer the theorem does not cover."""
        b = self.critical_batch_size
        if b is None or self.optimizer not in critical.OPTIMIZERS:
            return None
        return critical.c2_upper_bound(self.optimizer, critical_batch_size=b, lr=self.lr,
                                       eps=self.eps, beta=self.beta)

    @property
    def note(self) -> str | None:
        """What limits the reading of b* (None when nothing does)."""
        reached = sorted(b for b, v in self.sfo.items() if math.isfinite(v))
        b = self.critical_batch_size
        notes = []
        if b is None:
            notes.append(f"no batch size reached eps = {self.eps:g}: raise eps or train longer")
        elif len(reached) == 1:
            notes.append(f"only batch size {b} reached eps: b* is not located by a minimum; "
                         "measure more batch sizes")
        elif b in (reached[0], reached[-1]):
            notes.append(f"b* is at the edge of the batch sizes that reached eps ({reached[0]} "
                         f"to {reached[-1]}): the minimum may lie beyond; measure further "
                         "batch sizes")
        if self.optimizer not in critical.OPTIMIZERS:
            notes.append(f"Theorem 4.4 covers {', '.join(critical.OPTIMIZERS)} only: no C^2 "
                         f"bound for {self.optimizer}")
        return "; ".join(notes) or None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (SFO keys as strings, inf as None)."""
        return {
            "optimizer": self.optimizer, "lr": self.lr, "beta": self.beta, "eps": self.eps,
            "sfo": {str(b): v if math.isfinite(v) else None for b, v in sorted(self.sfo.items())},
            "critical_batch_size": self.critical_batch_size,
            "c2_upper_bound": self.c2_upper_bound, "note": self.note,
        }


def _optimizer_order(name: str) -> tuple[int, str]:
    order = critical.OPTIMIZERS
    return (order.index(name) if name in order else len(order), name)


def sfo_curves(runs: Any) -> list[SFOCurve]:
    """The :class:`SFOCurve` of each (optimizer, lr, beta) of :func:`sfo_of_sweep`'s rows.

    Runs still missing epochs that have not reached eps yet are left out (their T is not known
    yet); a batch size counts as reaching eps only if every one of its runs did. Curves come
    in the order SGD, SHB, NSHB (then other optimizers by name), then by lr and beta.

    Raises:
        ValueError: the rows lack columns of :func:`sfo_of_sweep`, or mix thresholds.
    """
    missing = sorted(set(RUN_COLUMNS) - set(runs.columns))
    if missing:
        raise ValueError(f"runs lacks the column(s) {', '.join(missing)}; pass "
                         "labkit.experiments.sfo_of_sweep(folder, eps)")
    known = runs[runs["reached"] | runs["complete"]]
    if known["eps"].nunique() > 1:
        raise ValueError(f"runs mix the thresholds {sorted(set(known['eps']))}; one eps at a "
                         "time")
    groups: dict[tuple[str, float, float | None], dict[int, list[int | None]]] = {}
    for _, r in known.iterrows():
        beta = None if r["beta"] is None or not _finite(r["beta"]) else float(r["beta"])
        key = (str(r["optimizer"]), float(r["lr"]), beta)
        steps = None if _isna(r["steps"]) else int(r["steps"])
        groups.setdefault(key, {}).setdefault(int(r["batch_size"]), []).append(steps)
    curves = []
    for key in sorted(groups, key=lambda k: (_optimizer_order(k[0]), k[1], k[2] or 0.0)):
        steps = groups[key]
        spread = {b: (min(t) * b, max(t) * b) for b, t in steps.items() if None not in t}
        curves.append(SFOCurve(
            optimizer=key[0], lr=key[1], beta=key[2], eps=float(known["eps"].iloc[0]),
            sfo=critical.sfo_table(steps),
            spread={b: (float(lo), float(hi)) for b, (lo, hi) in sorted(spread.items())},
            runs={b: len(t) for b, t in sorted(steps.items())}))
    return curves


def _isna(value: Any) -> bool:
    """True for None, NaN and pandas' <NA>."""
    import pandas as pd

    return bool(pd.isna(value))


# --------------------------------------------------------------------------- measuring


class StopAtThreshold(Callback):
    """Ends a run after the epoch in which its stopping test passed (T is then known).

    Reads the run's gradient-norm log at each epoch end; the run stops with its checkpoint on
    disk, so a later call with a smaller eps resumes it. Runs without a folder or without
    ``track_grad_norm`` keep no log and are not stopped.
    """

    def __init__(self, eps: float, skip_epochs: int = AUTHORS_SKIP_EPOCHS) -> None:
        self.eps = _check_eps(eps)
        self.skip_epochs = _check_count("skip_epochs", skip_epochs, 0)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        if state.config.out is None:
            return
        if _passed(Path(state.config.out), self.eps, self.skip_epochs):
            state.stop = True


def _passed(folder: Path, eps: float, skip_epochs: int) -> bool:
    """Whether a run folder's log already shows T (the test passed at a logged step)."""
    _, metrics = store.run_state(folder)
    norms = store.read_grad_norms(folder)
    if not metrics or norms is None:
        return False
    norms = norms[: int(metrics[-1]["total_steps"])]
    first = first_tested_step(int(metrics[0]["steps"]), skip_epochs)
    return _first_pass(running_mean(norms), eps, first) is not None


def _check_batch_sizes(batch_sizes: Any) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
        raise TypeError(
            f"batch_sizes must be a sequence of ints >= 1 (e.g. [8, 16, 32]), got {batch_sizes!r}"
        )
    sizes: list[int] = []
    for b in batch_sizes:
        b = _check_count("a batch size (an entry of batch_sizes)", b, 1)
        if b in sizes:
            raise ValueError(f"batch_sizes lists batch size {b} twice")
        sizes.append(b)
    if not sizes:
        raise ValueError("batch_sizes is empty; pass at least one batch size, e.g. [8, 16, 32]")
    return sizes


def measure_sfo(
    config: TrainConfig,
    batch_sizes: Sequence[int],
    eps: float,
    *,
    out: str | os.PathLike,
    skip_epochs: int = AUTHORS_SKIP_EPOCHS,
    max_epochs: int | None = None,
    progress: bool = True,
    data: Any = None,
    callbacks: Sequence[Callback] = (),
    on_run: Callable[[dict[str, Any], bool], None] | None = None,
) -> Any:
    """Measure T and the SFO complexity T b for each batch size by training (Sato & Iiduka
    (2024) §4.3, the authors' stopping rule; see the module docstring).

    One run per batch size b, in ``out/runs/b<b>/``: ``config`` with ``batch_size=b`` and
    ``epochs=max_epochs``, ended by :class:`StopAtThreshold` after the epoch in which its test
    passed (up to one epoch past T, which the log gives exactly). The paper's grid is
    ``[2**k for k in range(3, 14)]`` with eta = 0.1, beta = 0.9, eps = 0.5 on ResNet-18 and
    CIFAR-100; ``sfo_curves(measure_sfo(...))[0]`` holds b* and the C^2 bound.

    Calling again with the same arguments trains nothing; an interrupted run resumes from its
    last epoch; another eps re-reads the logs and trains only the runs that stopped before
    reaching it. The folder is a sweep folder: ``labkit critical --results`` reads it too.

    Args:
        config: the run (optimizer, lr, hparams, dataset, model, profile, device, precision,
            ...): its ``batch_size`` is replaced by each entry of ``batch_sizes``; ``out`` must
            be None, ``batch_schedule`` None and ``track_grad_norm`` True. The measurement
            runs of labkit use ``precision="fp32"`` (:mod:`labkit.precision`).
        batch_sizes: ints >= 1, at most the number of training images, no repeats.
        eps: the threshold (gradient-norm units), > 0.
        out: the measurement folder.
        skip_epochs: whole epochs the test skips (the authors' code: 11); must be below the
            runs' epochs.
        max_epochs: epochs after which a run that has not passed counts as not reached;
            default ``config.epochs`` (or the profile's).
        progress: show a progress bar per run.
        data: a :class:`labkit.data.CifarData` to train on (default: the config's data set,
            loaded once for all batch sizes).
        callbacks: further :class:`labkit.train.Callback` objects for every run. One that
            stops a run before its test passed ends the measurement there.
        on_run: called as ``on_run(row, loaded)`` with each run's row of
            :func:`sfo_of_sweep` as soon as it is known; ``loaded`` is True when nothing was
            trained for it now.

    Returns:
        :func:`sfo_of_sweep` of the measured runs, sorted by batch size (batch sizes left
        unmeasured by a stopping callback are absent).

    Raises:
        ValueError / TypeError: a bad argument (before anything is trained), or an ``out``
            folder that holds runs of other settings.
        FileNotFoundError / labkit.data.DatasetError: the data set is missing or corrupt.
    """
    from labkit.train import prepare_data, resolve_device, train

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a labkit.train.TrainConfig, got {type(config).__name__}")
    eps = _check_eps(eps)
    skip_epochs = _check_count("skip_epochs", skip_epochs, 0)
    if max_epochs is not None:
        max_epochs = _check_count("max_epochs", max_epochs, 1)
    sizes = _check_batch_sizes(batch_sizes)
    if config.out is not None:
        raise ValueError(f"config.out must be None (got {config.out!r}): measure_sfo puts the "
                         "run of batch size b in out/runs/b<b>; pass out= instead")
    if not _constant_batch(config.batch_schedule):
        raise ValueError("config.batch_schedule must be None: the SFO complexity T b needs a "
                         f"constant batch size; got {config.batch_schedule!r}")
    if not config.track_grad_norm:
        raise ValueError("the stopping test needs the gradient norm of every step: set "
                         "track_grad_norm=True in the config")
    base = dataclasses.replace(config, epochs=max_epochs or config.epochs).resolved()
    if skip_epochs >= base.epochs:
        raise ValueError(
            f"skip_epochs={skip_epochs} leaves no epoch to test in runs of {base.epochs} "
            f"epochs; use skip_epochs < {base.epochs} (lab 3's smoke profile skips "
            f"{SKIP_EPOCHS['smoke']}) or more epochs")
    out = store.check_folder(out, "a measurement")
    if (out / _OLD_MEASUREMENT_FILE).exists():
        raise ValueError(
            f"{out} holds a measurement of labkit 0.2 (its results are in {out}/sfo-b<b>.json), "
            "whose runs kept no per-step gradient-norm log; labkit now computes T from that "
            f"log. Measure into another folder, or delete {out} to measure again")
    configs = {b: dataclasses.replace(base, batch_size=b, out=str(out / store.RUNS_FOLDER /
                                                                   f"b{b}")).resolved()
               for b in sizes}
    for cfg in configs.values():  # refuse a folder of other settings before training
        path = Path(cfg.out) / store.CONFIG_FILE
        if path.exists():
            stored = TrainConfig.from_dict(json.loads(path.read_text())).identity()
            diff = sorted(k for k, v in cfg.identity().items() if stored.get(k) != v)
            if diff:
                raise ValueError(f"{path.parent} holds a run with other settings (differing: "
                                 f"{', '.join(diff)}); use another out folder or delete {out}")

    device = resolve_device(base.device)
    data = prepare_data(base, device) if data is None else data.to(device)
    n_train = int(data.train_y.shape[0])
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise ValueError(
            f"batch size(s) {', '.join(map(str, too_big))} exceed the {n_train} training images "
            f"of {base.dataset}; use batch sizes <= {n_train}")

    stop = StopAtThreshold(eps, skip_epochs)
    measured = []
    for b in sizes:
        cfg = configs[b]
        folder = Path(cfg.out)
        status, _ = store.run_state(folder)
        loaded = status in ("finished", "diverged") or _passed(folder, eps, skip_epochs)
        if not loaded:
            result = train(cfg, [stop, *callbacks], progress=progress, data=data)
            if result.status == "stopped" and not _passed(folder, eps, skip_epochs):
                break  # stopped by another callback: measured up to here
        measured.append(folder.name)
        if on_run is not None:
            row = sfo_of_sweep(out, eps, skip_epochs=skip_epochs, runs=[folder.name])
            on_run(row.iloc[0].to_dict(), loaded)
    runs = sfo_of_sweep(out, eps, skip_epochs=skip_epochs, runs=measured)
    return runs.sort_values("batch_size").reset_index(drop=True)
