"""Experiments: grids of training runs, their results as tables, and the papers' figures.

Book: the labs (chapters 4, 7 and 8). :mod:`~labkit.experiments.sweep` runs a grid of
:func:`labkit.train.train` runs, resumably (here, or on a Ray cluster with
:mod:`~labkit.experiments.ray_executor`); :mod:`~labkit.experiments.results` reads them back
as ``pandas`` tables (and derives smoothing degree and sharpness);
:mod:`~labkit.experiments.sfo` measures T, the SFO complexity, the critical batch size and the
C^2 bound from the runs' per-step gradient norms; :mod:`~labkit.experiments.plots` draws
Sato & Iiduka (2024) Fig. 4-8 and the power-eta thesis Fig. 1-2.

Example::

    from labkit.experiments import run_sweep, load_results, plot_accuracy_vs_batch_size

    spec = {"base": {"profile": "smoke", "epochs": 2},
            "grid": {"optimizer": ["sgd", "shb"], "batch_size": [32, 64], "seed": [0, 1]}}
    run_sweep(spec, "runs/bs-sweep")          # re-running trains nothing new
    plot_accuracy_vs_batch_size(load_results("runs/bs-sweep"))
"""

from labkit.experiments.plots import (
    plot_accuracy_curves,
    plot_accuracy_vs_batch_size,
    plot_accuracy_vs_delta,
    plot_delta_vs_batch_size,
    plot_sfo_vs_batch_size,
    plot_sharpness_vs_delta,
)
from labkit.experiments.results import (
    add_delta,
    load_history,
    load_results,
    measure_sharpness,
)
from labkit.experiments.sfo import (
    SFOCurve,
    measure_sfo,
    sfo_curves,
    sfo_of_sweep,
    steps_to_threshold,
)
from labkit.experiments.sweep import (
    Grid,
    GridError,
    PointResult,
    SweepResult,
    expand_grid,
    load_spec,
    plan_sweep,
    run_sweep,
    train_set_size,
)

__all__ = [
    "Grid",
    "SFOCurve",
    "GridError",
    "PointResult",
    "SweepResult",
    "add_delta",
    "expand_grid",
    "load_history",
    "load_results",
    "load_spec",
    "measure_sfo",
    "measure_sharpness",
    "plan_sweep",
    "plot_accuracy_curves",
    "plot_accuracy_vs_batch_size",
    "plot_accuracy_vs_delta",
    "plot_delta_vs_batch_size",
    "plot_sfo_vs_batch_size",
    "plot_sharpness_vs_delta",
    "run_sweep",
    "sfo_curves",
    "sfo_of_sweep",
    "steps_to_threshold",
    "train_set_size",
]
