"""The book's own measurements: the labs' ``cpu`` profile (scikit-learn's handwritten digits, the
tiny CNN, one CPU core), trained when the book is built.

Chapters 4, 7 and 8 call the functions below in their code cells. Each function trains the runs
of one lab's ``cpu`` profile, cut down where the chapter needs fewer points than the lab (the
cut is stated in each docstring and in the chapter), and returns tables; the figures are drawn
in the chapters. The runs are ordinary sweep runs (:func:`labkit.experiments.run_sweep`) kept
in ``.labkit-book-runs/`` at the repository's root (ignored by git), so a chapter that is
executed again loads them instead of training; Jupyter Book's execution cache (``_config.yml``)
skips executing a chapter at all while its code is unchanged.

Nothing here is tuned to resemble the papers' CIFAR results: the settings are the labs' cpu
defaults, and the chapters print what came out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit import critical
from labkit.experiments import load_history, load_results, run_sweep, sfo_curves, sfo_of_sweep
from labkit.labs import lab1, lab3, lab5

#: Where the book's runs live (one sweep folder per experiment).
RUNS = Path(__file__).resolve().parent.parent / ".labkit-book-runs"
#: Seeds of every experiment below.
SEEDS = 1
#: Chapter 8: lab 3's cpu grid as it is (b = 2^4 ... 2^10, 60 epochs) and its eps.
SFO_EPS = lab3.CPU_EPS
#: Chapter 7: three of lab 5's schedules.
SCHEDULES = ("constant", "lr_step", "batch_step")


def caption() -> str:
    """The words every figure of the book's own runs carries."""
    return f"handwritten digits (scikit-learn), CPU, {SEEDS} seed" + ("s" if SEEDS > 1 else "")


def _sweep(name: str, configs: list[Any]) -> Path:
    torch.set_num_threads(1)  # tiny models: one thread is the fastest on a shared machine
    out = RUNS / name
    result = run_sweep(configs, out, progress=False)
    if not result.complete:
        raise RuntimeError(f"the book's {name} runs did not all finish: {result.counts()}")
    return out


def eta_family() -> Any:
    """Chapter 4: lab 1's cpu grid, torch-style Adam only, every eta (15 epochs, b = 64).

    Returns the per-epoch history (:func:`labkit.experiments.load_history`): ``eta``,
    ``epoch``, ``test_acc``, ``train_loss``, ...
    """
    values = {**lab1.defaults("cpu"), "profile": "cpu", "optimizers": ("adam",),
              "seeds": SEEDS}
    return load_history(_sweep("ch4-eta", lab1.grid(values)))


def schedules() -> Any:
    """Chapter 7: lab 5's cpu grid (SGD, lr0 = 0.1, b0 = 32, 40 epochs, stages of 8 epochs) with
    a constant lr and batch size, lr x 1/sqrt(2) per stage, and b x 2 per stage.

    Returns the per-epoch history with a ``schedule`` column.
    """
    values = {**lab5.defaults("cpu"), "profile": "cpu", "schedules": SCHEDULES,
              "seeds": SEEDS}
    folder = _sweep("ch7-schedules", lab5.grid(values))
    history = load_history(folder)
    history["schedule"] = [_schedule_of(lr, b) for lr, b in
                           zip(history["lr_schedule"], history["batch_schedule"], strict=True)]
    return history


def _schedule_of(lr_spec: Any, batch_spec: Any) -> str:
    kinds = [(json.loads(s) if isinstance(s, str) else (s or {})).get("kind", "constant")
             for s in (lr_spec, batch_spec)]
    return {("constant", "constant"): "constant", ("step", "constant"): "lr_step",
            ("constant", "step"): "batch_step"}.get(tuple(kinds), "other")


def sfo_sweep() -> tuple[Any, Any, Any]:
    """Chapter 8: lab 3's cpu runs as they are (SGD, SHB, NSHB; eta = 0.1, beta = 0.9; fp32;
    b = 2^4 ... 2^10; 60 epochs), the authors' test (skips 11 epochs) at lab 3's cpu eps, and
    C^2 measured at each run's final weights (:func:`labkit.noise.gradient_variance` on 1024
    training images).

    Returns ``(runs, curves, stats)``: :func:`labkit.experiments.sfo_of_sweep`'s rows, the
    :class:`labkit.experiments.SFOCurve` of each optimizer (b*, C^2 bound), and one row per
    run with ``c2``, ``grad_norm_sq`` and the final ``test_acc``.
    """
    values = {**lab3.defaults("cpu"), "profile": "cpu", "seeds": SEEDS}
    folder = _sweep("ch8-sfo", lab3.grid(values))
    runs = sfo_of_sweep(folder, SFO_EPS, skip_epochs=values["skip_epochs"])
    curves = sfo_curves(runs)
    stats = lab3.gradient_stats_of_sweep(folder, n_images=values["c2_images"])
    final = load_results(folder)[["run", "test_acc"]]
    stats = stats.merge(final, on="run")
    return runs, curves, stats


def deltas(stats: Any, lr: float = 0.1, beta: float = 0.9) -> Any:
    """Each run's smoothing degree (Sato & Iiduka 2024, eqs. (12)-(14)) with the C^2 of its
    optimizer taken as the largest measured over its runs, and for SHB K^2 as the largest
    ||grad f||^2 (as lab 4 does with measured constants); adds a ``delta`` column."""
    out = stats.copy()
    c2 = lab3.max_by_optimizer(stats, "c2")
    k2 = lab3.max_by_optimizer(stats, "grad_norm_sq").get("shb")
    out["delta"] = [float(critical.smoothing_degree(
        o, lr=lr, batch_size=int(b), c2=c2[o], beta=beta, k2=k2))
        for o, b in zip(out["optimizer"], out["batch_size"], strict=True)]
    return out


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of two equally long sequences (average ranks for ties)."""
    import pandas as pd

    rx = pd.Series(np.asarray(x, dtype=float)).rank()
    ry = pd.Series(np.asarray(y, dtype=float)).rank()
    r = float(np.corrcoef(rx, ry)[0, 1])
    return r if math.isfinite(r) else float("nan")
