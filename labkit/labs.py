"""Glue between the lab notebooks and labkit: setup, result folders, and each lab's knobs.

Book: the labs (``labs/README.md``); lab 1 goes with chapter 4 (adaptive methods, seed 000),
lab 2 with chapters 6 and 7 (smoothing and graduated optimization, seeds 004 and 001).

A lab notebook shows the experiment; what it needs beyond that lives here, one section per lab,
so that the notebook's cells stay short and the tests can drive the same code:

- :func:`lab_setup`: the profile, the results folder, the data folder and the seeds;
- :func:`results_dir`: ``$LABKIT_RESULTS/<lab>/<profile>`` or ``labs/results/<lab>/<profile>``;
- per lab: the panel's controls, the defaults of each profile, the validation of the knobs,
  the grid the knobs ask for, the figures, and the reference values the figures overlay.

Lab 1, the optimizer zoo (seed 000 Fig. 1-2): Adam-type and AMSGrad-type Algorithm 3.1 with the
power eta in {1/3, 1/2, 1, 2, 3, 4} (:class:`labkit.optim.AdamEta`) on ResNet-44 / CIFAR-10,
with SGD, SHB, NSHB, AdaGrad and RMSProp as optional baselines.

Lab 2, seeing smoothing (seed 004 Fig. 3, seed 001): the smoothed function
``f_hat_delta(x) = E_u[f(x - delta u)]`` of Rastrigin, Ackley and Styblinski-Tang in 1-D and 2-D
(closed form where :mod:`labkit.smoothing` has one, Monte Carlo otherwise), and gradient descent,
noisy SGD and graduated optimization (:mod:`labkit.graduated`) from the same start.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from labkit import widgets as lk_widgets
from labkit.train import PROFILES, TrainConfig

__all__ = [
    "LAB1_ETAS",
    "LAB1_OPTIMIZERS",
    "LAB1_REFERENCE",
    "LAB2_FUNCTIONS",
    "Lab2Result",
    "LabSetup",
    "eta_label",
    "lab1_controls",
    "lab1_defaults",
    "lab1_figure",
    "lab1_grid",
    "lab1_label",
    "lab1_run_table",
    "lab1_validate",
    "lab2_controls",
    "lab2_defaults",
    "lab2_delta_table",
    "lab2_paper_figure",
    "lab2_panel",
    "lab2_reached",
    "lab2_run",
    "lab2_smoothed",
    "lab2_validate",
    "lab_setup",
    "parse_point",
    "results_dir",
    "results_root",
]

_LAB_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


# =========================================================================== every lab


def results_root() -> Path:
    """Where the labs keep their sweep folders.

    ``$LABKIT_RESULTS`` when set; else ``results/`` beside the notebook when the working
    directory is ``labs/`` (how Jupyter starts a lab's kernel), ``labs/results/`` when it is the
    repository root, and ``results/`` in the working directory otherwise. ``labs/results/`` is
    ignored by git.
    """
    env = os.environ.get("LABKIT_RESULTS", "").strip()
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd()
    if cwd.name == "labs":
        return cwd / "results"
    if (cwd / "labs").is_dir():
        return cwd / "labs" / "results"
    return cwd / "results"


def results_dir(lab_id: str, profile: str) -> Path:
    """The sweep folder of one lab and profile: ``<results_root()>/<lab_id>/<profile>``.

    Raises:
        ValueError: ``lab_id`` is not a lab's file name without ``.ipynb`` (lower-case letters,
            digits and ``_``, like ``"lab1_optimizer_zoo"``), or ``profile`` is not smoke, short
            or paper.
    """
    if not isinstance(lab_id, str) or not _LAB_ID.match(lab_id):
        raise ValueError(
            f"lab_id must be the lab's file name without .ipynb, like 'lab1_optimizer_zoo' "
            f"(lower-case letters, digits, _); got {lab_id!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    return results_root() / lab_id / profile


@dataclass(frozen=True)
class LabSetup:
    """What :func:`lab_setup` decided for a lab.

    Attributes:
        lab_id: the lab's file name without ``.ipynb``, e.g. ``"lab1_optimizer_zoo"`` (also the
            ``lab`` of the notebook's ``metadata.labkit`` and the prefix of its grade_ids).
        profile: the starting profile of the lab's panel.
        results_dir: the sweep folder of that profile (:func:`results_dir`).
        data_root: where CIFAR is read from (``$LABKIT_DATA`` or ``~/.cache/labkit/data``; the
            smoke profile generates its data under ``<data_root>/labkit-smoke``).
        device: ``"cuda"`` or ``"cpu"``.
        seed: the seed given to Python, numpy and torch.
        notes: remarks worth showing (an invalid ``$LABKIT_PROFILE``, say).
    """

    lab_id: str
    profile: str
    results_dir: Path
    data_root: Path
    device: str
    seed: int
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [
            f"lab {self.lab_id}: profile {self.profile!r} on {self.device}",
            f"results: {self.results_dir}",
            f"data:    {self.data_root}",
            f"seed:    {self.seed}",
        ]
        return "\n".join([*lines, *self.notes])


def lab_setup(lab_id: str, profile: str | None = None, *, seed: int = 0,
              show: bool = True) -> LabSetup:
    """Seed everything, pick the profile and the folders, and print them.

    The profile is ``profile`` if given, else :func:`labkit.widgets.default_profile`
    (``$LABKIT_PROFILE``, or smoke without CUDA and short with it). In the smoke profile on the
    CPU, torch is limited to one thread: the tiny smoke model trains faster on one thread than
    on two contended ones.

    Raises:
        ValueError: a bad ``lab_id``, ``profile`` or ``seed``.
    """
    import numpy as np
    import torch

    from labkit.data import default_data_root

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    notes: list[str] = []
    if profile is None:
        try:
            profile = lk_widgets.default_profile()
        except ValueError as e:
            profile = "short" if torch.cuda.is_available() else "smoke"
            notes.append(f"note: {e}; using {profile!r}")
    folder = results_dir(lab_id, profile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if profile == "smoke" and device == "cpu":
        torch.set_num_threads(1)
    setup = LabSetup(lab_id, profile, folder, default_data_root(), device, seed, tuple(notes))
    if show:
        print(setup.summary())
    return setup


def eta_label(eta: float) -> str:
    """The seed's name of a power eta: ``1/3``, ``1/2``, ``1``, ``2``, ``3``, ``4``."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (
        math.isfinite(eta) and eta > 0
    ):
        raise ValueError(f"eta must be a positive finite number; got {eta!r}")
    frac = Fraction(float(eta)).limit_denominator(12)
    if abs(float(frac) - eta) > 1e-12:
        return f"{eta:g}"
    return str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"


# =========================================================================== lab 1

#: The powers eta of seed 000's Fig. 1-2.
LAB1_ETAS: tuple[float, ...] = (1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
#: The optimizers of the zoo, with their names in the panel.
LAB1_OPTIMIZERS: dict[str, str] = {
    "sgd": "SGD", "shb": "SHB (momentum)", "nshb": "NSHB", "adagrad": "AdaGrad",
    "rmsprop": "RMSProp", "adam": "Adam-type (2)", "amsgrad": "AMSGrad-type (3)",
}
_ADAM_TYPE = ("adam", "amsgrad")
# Learning rates: "lr" (the seed's alpha) for the methods that divide by a running mean of
# squared gradients, "lr_sgd" for the plain-gradient methods and AdaGrad.
_USES_ALPHA = ("rmsprop", "adam", "amsgrad")
#: Reference accuracy for orientation (not seed 000's number: the seed gives curves only).
LAB1_REFERENCE = {"label": "He et al. 2016: ResNet-44 with SGD, 92.8%", "test_acc": 0.928}

_LAB1_DEFAULTS = {
    # CPU, generated data, tiny CNN: 6 runs x 4 epochs in seconds.
    "smoke": {"optimizers": ("adam", "amsgrad"), "etas": (1 / 2, 2.0, 4.0), "epochs": 4,
              "seeds": 1, "batch_size": 64},
    # One GPU: ResNet-44 on CIFAR-10, all six eta, 10 epochs (about 20 min on an H100).
    "short": {"optimizers": ("adam", "amsgrad"), "etas": LAB1_ETAS, "epochs": 10, "seeds": 1,
              "batch_size": 128},
    # Seed 000's scale: 200 epochs (about 6 h on an H100 for the 12 runs).
    "paper": {"optimizers": ("adam", "amsgrad"), "etas": LAB1_ETAS, "epochs": 200, "seeds": 1,
              "batch_size": 128},
}


def lab1_controls() -> dict[str, Any]:
    """The knobs of lab 1's panel."""
    W = lk_widgets
    return {
        "optimizers": W.multi_select(
            "optimizers", [(label, name) for name, label in LAB1_OPTIMIZERS.items()]),
        "etas": W.multi_select("η (Adam/AMSGrad)", [(eta_label(e), e) for e in LAB1_ETAS]),
        "lr": W.float_text("α = lr of Adam, AMSGrad, RMSProp", 1e-3),
        "lr_sgd": W.float_text("lr of SGD, SHB, NSHB, AdaGrad", 0.1),
        "beta1": W.dropdown("β₁ (Adam/AMSGrad)", [("0.9 (standard)", 0.9),
                                                   ("0.001 (seed 000 as printed)", 0.001)]),
        "epochs": W.int_slider("epochs", 1, 200, 3),
        "seeds": W.int_slider("seeds", 1, 5, 1),
        "batch_size": W.int_text("batch size", 64),
    }


def lab1_defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (lr 1e-3 as in seed 000, standard betas)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    return {"lr": 1e-3, "lr_sgd": 0.1, "beta1": 0.9, **_LAB1_DEFAULTS[profile]}


def _positive(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def lab1_validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 1's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    opts = tuple(values.get("optimizers") or ())
    if not opts:
        msgs.append("choose at least one optimizer")
    if any(o in _ADAM_TYPE for o in opts) and not values.get("etas"):
        msgs.append("choose at least one η for Adam/AMSGrad (or deselect them)")
    if any(o in _USES_ALPHA for o in opts) and not _positive(values.get("lr")):
        msgs.append(f"α (lr of Adam, AMSGrad, RMSProp) must be > 0; got {values.get('lr')}")
    if any(o not in _USES_ALPHA for o in opts) and not _positive(values.get("lr_sgd")):
        msgs.append(f"lr of SGD, SHB, NSHB, AdaGrad must be > 0; got {values.get('lr_sgd')}")
    b = values.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        msgs.append(f"batch size must be an integer >= 1; got {b}")
    for name in ("epochs", "seeds"):
        v = values.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msgs.append(f"{name} must be an integer >= 1; got {v}")
    return msgs


def lab1_grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 1's knobs ask for: optimizer x eta (Adam/AMSGrad only) x seed.

    CIFAR-10 with the profile's model (ResNet-44 in short/paper, seed 000's network; the tiny
    CNN in smoke), no weight decay, the standard augmentation, beta2 = 0.999.
    """
    runs = []
    for opt in values["optimizers"]:
        etas = values["etas"] if opt in _ADAM_TYPE else (None,)
        for eta in etas:
            hparams: dict[str, Any] = {}
            if eta is not None:
                hparams = {"eta": float(eta), "beta1": float(values["beta1"])}
            lr = values["lr"] if opt in _USES_ALPHA else values["lr_sgd"]
            for seed in range(values["seeds"]):
                runs.append(TrainConfig(
                    dataset="cifar10", optimizer=opt, lr=float(lr), hparams=hparams,
                    epochs=values["epochs"], batch_size=values["batch_size"], seed=seed,
                    profile=values["profile"],
                ))
    return runs


def lab1_label(config: TrainConfig) -> str:
    """``"Adam η=1/2"``, ``"SGD lr=0.1"``; `` s1`` etc. for seeds other than 0."""
    name = {"adam": "Adam", "amsgrad": "AMSGrad"}.get(config.optimizer,
                                                       LAB1_OPTIMIZERS.get(config.optimizer,
                                                                           config.optimizer))
    if "eta" in config.hparams:
        text = f"{name} η={eta_label(config.hparams['eta'])}"
    else:
        text = f"{name.split(' ')[0]} lr={config.lr:g}"
    return text + (f" s{config.seed}" if config.seed else "")


def lab1_run_table(results: Any) -> Any:
    """The columns of lab 1's runs that matter (from ``panel.results``), one row per run:
    optimizer, lr, eta and beta1 (Adam/AMSGrad only), seed, epochs done, status, final and
    best test accuracy."""
    cols = ["optimizer", "lr", "eta", "beta1", "seed", "epochs_completed", "status", "test_acc",
            "best_test_acc"]
    return results[[c for c in cols if c in results.columns]].reset_index(drop=True)


def lab1_figure(history: Any, profile: str = "smoke") -> Any:
    """Test accuracy per epoch, one panel per Adam-type / AMSGrad-type / other optimizers.

    Like seed 000's Fig. 1 (Adam-type, (2)) and Fig. 2 (AMSGrad-type, (3)): one line per eta
    (mean over seeds, band from min to max). Outside the smoke profile a dotted line marks
    :data:`LAB1_REFERENCE`. Returns the pyplot figure.

    Raises:
        ValueError: ``history`` has no epochs.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from labkit.experiments import plot_accuracy_curves

    if history is None or len(history) == 0:
        raise ValueError("history is empty: run the panel first (panel.run())")
    groups = [(opt, history[history["optimizer"] == opt]) for opt in _ADAM_TYPE]
    groups = [(opt, h) for opt, h in groups if len(h)]
    others = history[~history["optimizer"].isin(_ADAM_TYPE)]
    n = len(groups) + (1 if len(others) else 0)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), layout="constrained", squeeze=False)
    titles = {"adam": "Adam-type (2), seed 000 Fig. 1", "amsgrad": "AMSGrad-type (3), Fig. 2"}
    panels = [(titles[opt], h, "eta") for opt, h in groups]
    if len(others):
        panels.append(("other optimizers", others, "optimizer"))
    for ax, (title, h, by) in zip(axes[0], panels, strict=True):
        plot_accuracy_curves(h, by=by, ax=ax)
        if profile != "smoke":
            ax.axhline(100 * LAB1_REFERENCE["test_acc"], color="k", linestyle=":",
                       label=LAB1_REFERENCE["label"])
            ax.legend(fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# =========================================================================== lab 2


@dataclass(frozen=True)
class _Function:
    name: str
    f: Callable[..., Any]
    argmin: float  # global minimizer, the same in every coordinate
    x0: tuple[str, str]  # default start in 1-D and 2-D, as typed in the panel
    lr: float
    sgd_noise: float
    view: tuple[float, float]  # plotting range of each coordinate


def _functions() -> dict[str, _Function]:
    from labkit import smoothing as S

    return {
        "rastrigin": _Function("Rastrigin", S.rastrigin, 0.0, ("2.2", "2.2, -1.8"), 0.004,
                               100.0, (-3.5, 3.5)),
        "ackley": _Function("Ackley", S.ackley, 0.0, ("2.2", "2.2, -1.8"), 0.004, 25.0,
                             (-3.5, 3.5)),
        "styblinski_tang": _Function("Styblinski-Tang", S.styblinski_tang,
                                     S.STYBLINSKI_TANG_ARGMIN, ("2.2", "2.2, -1.8"), 0.01,
                                     50.0, (-4.5, 4.5)),
    }


#: name -> (label, global minimizer per coordinate, default lr) of lab 2's test functions.
LAB2_FUNCTIONS: dict[str, tuple[str, float, float]] = {
    k: (v.name, v.argmin, v.lr) for k, v in _functions().items()
}
_DIST_LABELS = {"gaussian": "Gaussian u ~ N(0, I/d) (seed 004)",
                "ball": "uniform on the unit ball (seed 001)"}
_LAB2_SAMPLES = {"smoke": 64, "short": 256, "paper": 1024}


def lab2_controls() -> dict[str, Any]:
    """The knobs of lab 2's panel."""
    W = lk_widgets
    return {
        "function": W.dropdown("function", [(v[0], k) for k, v in LAB2_FUNCTIONS.items()]),
        "dim": W.dropdown("dimension", [("1-D", 1), ("2-D", 2)]),
        "delta": W.float_slider("δ of the plotted f̂_δ", 0.0, 3.0, 0.4, 0.05),
        "dist": W.dropdown("noise u", [(v, k) for k, v in _DIST_LABELS.items()]),
        "x0": W.text("start x0", "2.2"),
        "lr": W.float_text("learning rate", 0.004),
        "steps": W.int_text("steps (each method)", 1000),
        "sgd_noise": W.float_text("SGD: gradient noise σ", 100.0),
        "delta0": W.float_text("graduated: δ₀", 2.0),
        "stages": W.int_slider("graduated: halvings M", 1, 8, 4),
        "n_samples": W.int_text("Monte-Carlo samples", 64),
        "seed": W.int_text("seed", 0),
    }


def lab2_defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (only the Monte-Carlo sample count differs)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    return {"function": "rastrigin", "dim": 1, "delta": 0.4, "dist": "gaussian", "x0": "2.2",
            "lr": 0.004, "steps": 1000, "sgd_noise": 100.0, "delta0": 2.0, "stages": 4,
            "n_samples": _LAB2_SAMPLES[profile], "seed": 0}


def parse_point(text: str, d: int) -> list[float]:
    """``"2.2, -1.8"`` -> ``[2.2, -1.8]``, checked to have ``d`` finite coordinates.

    Raises:
        ValueError: not ``d`` comma-separated finite numbers.
    """
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"x0 must be {d} comma-separated number(s) like {', '.join(['2.2'] * d)}; "
            f"got {text!r}"
        ) from None
    if len(values) != d or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"x0 must be {d} finite number(s) for a {d}-D function (e.g. "
            f"{', '.join(['2.2'] * d)}); got {text!r}"
        )
    return values


def lab2_validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 2's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    if values.get("function") not in LAB2_FUNCTIONS:
        msgs.append(f"function must be one of {', '.join(LAB2_FUNCTIONS)}; "
                    f"got {values.get('function')!r}")
    d = values.get("dim")
    if d not in (1, 2):
        msgs.append(f"dimension must be 1 or 2; got {d!r}")
    else:
        try:
            parse_point(values.get("x0", ""), d)
        except ValueError as e:
            msgs.append(str(e))
    checks = [("lr", "learning rate", _positive), ("delta0", "graduated δ₀", _positive)]
    for key, label, ok in checks:
        if not ok(values.get(key)):
            msgs.append(f"{label} must be > 0; got {values.get(key)}")
    delta = values.get("delta")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
        msgs.append(f"δ must be >= 0; got {delta}")
    noise = values.get("sgd_noise")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        msgs.append(f"SGD gradient noise σ must be >= 0; got {noise}")
    for key, label, low in (("steps", "steps", 1), ("stages", "graduated halvings M", 1),
                            ("n_samples", "Monte-Carlo samples", 1), ("seed", "seed", 0)):
        v = values.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            msgs.append(f"{label} must be an integer >= {low}; got {v}")
    steps, stages = values.get("steps"), values.get("stages")
    if isinstance(steps, int) and isinstance(stages, int) and 1 <= stages and 1 <= steps <= stages:
        msgs.append(f"steps ({steps}) must exceed the graduated halvings M ({stages}): the "
                    f"steps are shared by its M + 1 stages")
    if values.get("dist") not in _DIST_LABELS:
        msgs.append(f"noise must be one of {', '.join(_DIST_LABELS)}; got {values.get('dist')!r}")
    return msgs


def lab2_smoothed(function: str, x: Any, delta: float, dist: str = "gaussian",
                  n_samples: int = 256, seed: int = 0) -> tuple[Any, str]:
    """``f_hat_delta`` at the points ``x`` (shape (..., d)) and how it was computed.

    Exact for Rastrigin (Gaussian noise in any dimension, the ball for d <= 3) and
    Styblinski-Tang (Gaussian); a Monte-Carlo average of ``n_samples`` draws (the same draws
    at every point, so the curve is smooth) otherwise. Returns ``(values, "exact")`` or
    ``(values, "Monte Carlo, n = ...")``.
    """
    import torch

    from labkit import smoothing as S

    if function not in LAB2_FUNCTIONS:
        raise ValueError(f"function must be one of {', '.join(LAB2_FUNCTIONS)}; got {function!r}")
    if function == "rastrigin" and (dist == "gaussian" or x.shape[-1] <= 3):
        return S.smoothed_rastrigin(x, delta, dist=dist), "exact"
    if function == "styblinski_tang" and dist == "gaussian":
        return S.smoothed_styblinski_tang(x, delta), "exact"
    gen = torch.Generator().manual_seed(seed)
    f = _functions()[function].f
    return S.smooth(f, x, float(delta), n_samples, dist=dist, generator=gen), \
        f"Monte Carlo, n = {n_samples}"


@dataclass
class Lab2Result:
    """What lab 2's panel computed.

    Attributes:
        function, dim, x0: the problem.
        trajectories: ``{"gd": ..., "sgd": ..., "graduated": ...}``
            (:class:`labkit.graduated.Trajectory`; ``points[-1]`` is the final iterate).
        sgd_delta: the smoothing degree implied by the SGD noise, lr * sigma * sqrt(d).
        graduated_deltas: the graduated stages' deltas (the last is 0: plain GD).
        argmin: the global minimizer.
    """

    function: str
    dim: int
    x0: list[float]
    trajectories: dict[str, Any]
    sgd_delta: float
    graduated_deltas: tuple[float, ...]
    argmin: list[float] = field(default_factory=list)


def lab2_run(values: Mapping[str, Any]) -> Lab2Result:
    """GD, noisy SGD and graduated optimization from ``x0`` with the panel's knobs.

    Each method gets ``steps`` iterations; graduated optimization shares them among its
    M + 1 stages with deltas delta0, delta0/2, ..., delta0/2^(M-1), 0.

    Raises:
        ValueError: invalid knobs (:func:`lab2_validate`'s messages).
    """
    import torch

    from labkit import graduated as G

    msgs = lab2_validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    spec = _functions()[values["function"]]
    d = values["dim"]
    x0 = torch.tensor(parse_point(values["x0"], d), dtype=torch.float64)
    lr, steps = float(values["lr"]), values["steps"]
    gd = G.gradient_descent(spec.f, x0, lr, steps)
    sgd = G.sgd_noisy(spec.f, x0, lr, steps, float(values["sgd_noise"]),
                      generator=torch.Generator().manual_seed(values["seed"]))
    deltas = G.default_deltas(float(values["delta0"]), values["stages"], 0.5, final_zero=True)
    grad = G.graduated_optimization(
        spec.f, x0, deltas, steps // len(deltas), lr, values["n_samples"], dist=values["dist"],
        generator=torch.Generator().manual_seed(values["seed"]),
    )
    return Lab2Result(values["function"], d, x0.tolist(),
                      {"gd": gd, "sgd": sgd, "graduated": grad}, sgd.deltas[0], tuple(deltas),
                      [spec.argmin] * d)


def lab2_reached(result: Lab2Result, tol: float = 0.5) -> dict[str, bool]:
    """Whether each method's final iterate lies within ``tol`` (Euclidean) of the global
    minimizer (0.5 is half the spacing of Rastrigin's local minima)."""
    out = {}
    for name, t in result.trajectories.items():
        final = [float(v) for v in t.points[-1].reshape(-1)]
        dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(final, result.argmin, strict=True)))
        out[name] = dist < tol
    return out


_METHOD_STYLE = {"gd": ("GD", "tab:red"), "sgd": ("noisy SGD", "tab:orange"),
                 "graduated": ("graduated", "tab:green")}


def _lab2_figure(values: Mapping[str, Any], result: Lab2Result) -> Any:
    import numpy as np
    import torch

    from labkit.widgets import new_figure

    spec = _functions()[values["function"]]
    delta, dist, d = float(values["delta"]), values["dist"], values["dim"]
    n_grid = {"smoke": 301, "short": 601, "paper": 601}[values["profile"]]
    lo, hi = spec.view
    fig = new_figure((11.0, 3.8))
    ax_f, ax_v = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    if d == 1:
        xs = torch.linspace(lo, hi, n_grid, dtype=torch.float64).unsqueeze(-1)
        fhat, how = lab2_smoothed(values["function"], xs, delta, dist, values["n_samples"],
                                  values["seed"])
        ax_f.plot(xs[:, 0], spec.f(xs), color="0.55", lw=1, label="f")
        ax_f.plot(xs[:, 0], fhat, color="tab:blue", lw=2, label=f"f̂_δ, δ = {delta:g} ({how})")
        for key, t in result.trajectories.items():
            label, color = _METHOD_STYLE[key]
            pts = t.points[:, 0].numpy()
            ax_f.plot(pts, t.values.numpy(), ".", color=color, ms=2, alpha=0.35)
            ax_f.plot(pts[-1], float(t.values[-1]), "o", color=color, ms=8,
                      markeredgecolor="k", label=f"{label}: x = {pts[-1]:.3f}")
        ax_f.plot(result.x0[0], float(spec.f(torch.tensor(result.x0, dtype=torch.float64))),
                  "k^", ms=8, label="start")
        f_lo, f_hi = float(spec.f(xs).min()), float(spec.f(xs).max())
        pad = 0.08 * (f_hi - f_lo)
        ax_f.set_ylim(f_lo - pad, f_hi + 3 * pad)  # noisy SGD may wander off the view
        ax_f.set_xlabel("x")
        ax_f.set_title("f and f̂_δ; the paths run on f", fontsize="medium")
    else:
        g = torch.linspace(lo, hi, int(math.sqrt(n_grid * 20)), dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([xx, yy], dim=-1)
        fhat, how = lab2_smoothed(values["function"], pts, delta, dist, values["n_samples"],
                                  values["seed"])
        cs = ax_f.contourf(xx.numpy(), yy.numpy(), np.asarray(fhat), levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax_f, label=f"f̂_δ, δ = {delta:g}")
        for key, t in result.trajectories.items():
            label, color = _METHOD_STYLE[key]
            p = t.points.numpy()
            ax_f.plot(p[:, 0], p[:, 1], "-", color=color, lw=1, alpha=0.8)
            ax_f.plot(p[-1, 0], p[-1, 1], "o", color=color, ms=8, markeredgecolor="k",
                      label=f"{label}: ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})")
        ax_f.plot(*result.x0, "w^", ms=8, markeredgecolor="k", label="start")
        ax_f.set_ylim(lo, hi)
        ax_f.set_xlabel("x₁")
        ax_f.set_ylabel("x₂")
        ax_f.set_title(f"f̂_δ ({how}); paths run on f", fontsize="medium")
    ax_f.set_xlim(lo, hi)
    ax_f.legend(fontsize="x-small", loc="upper center")
    for key, t in result.trajectories.items():
        label, color = _METHOD_STYLE[key]
        ax_v.plot(t.values.numpy(), color=color, lw=1, label=label)
    ax_v.set_xlabel("iteration")
    ax_v.set_ylabel("f(x_t)")
    ax_v.set_yscale("symlog", linthresh=1.0)
    ax_v.grid(True, alpha=0.3)
    ax_v.legend(fontsize="small")
    return fig


def _lab2_task(values: dict[str, Any], panel: Any) -> Lab2Result:
    key = tuple(sorted((k, v) for k, v in values.items() if k != "delta"))
    cache = panel.__dict__.setdefault("_lab2_cache", {})
    result = cache.get(key)
    if result is None:
        panel.set_status("computing the trajectories...")
        result = lab2_run(values)
        cache.clear()
        cache[key] = result
    panel.show(_lab2_figure(values, result))
    reached = lab2_reached(result)
    panel.set_status(
        f"{LAB2_FUNCTIONS[result.function][0]} {result.dim}-D from x0 = {values['x0']}: "
        + ", ".join(f"{_METHOD_STYLE[k][0]} {'reached' if r else 'missed'} the global minimum"
                    for k, r in reached.items())
        + f" · SGD noise acts like δ = {result.sgd_delta:.3g}"
    )
    return result


def lab2_panel(profile: str | None = None) -> lk_widgets.ControlPanel:
    """Lab 2's panel: f and f_hat_delta, and the three methods' paths on f.

    Moving the δ slider redraws at once; changing the function or the dimension resets the
    start, the learning rate and the SGD noise to that function's defaults.
    """
    panel = lk_widgets.ControlPanel(
        "Lab 2: seeing smoothing (seed 004 Fig. 3, seed 001)",
        controls=lab2_controls(),
        task=_lab2_task,
        validate=lab2_validate,
        defaults=lab2_defaults,
        profile=profile,
    )
    c = panel.controls

    def on_function(_: Any) -> None:
        spec = _functions()[c["function"].value]
        c["x0"].value = spec.x0[c["dim"].value - 1]
        c["lr"].value = spec.lr
        c["sgd_noise"].value = spec.sgd_noise

    def on_delta(_: Any) -> None:
        if panel.last_result is not None and not panel.running:
            panel.press_run()

    c["function"].observe(on_function, names="value")
    c["dim"].observe(on_function, names="value")
    c["delta"].observe(on_delta, names="value")
    return panel


def lab2_delta_table(deltas: Sequence[float] = (0.0, 0.2, 0.4, 0.7, 1.0, 3.0),
                     xs: Sequence[float] = (0.0, 0.5, 1.0, 2.0)) -> list[dict[str, Any]]:
    """Closed-form ``f_hat_delta(x)`` of 1-D Rastrigin (Gaussian noise) at a few points.

    One dict per delta: ``{"delta": ..., "values": [f_hat(x) for x in xs], "convex": bool}``
    (convex from the closed-form second derivative, as in seed 004 Fig. 3).
    """
    import torch

    from labkit import smoothing as S

    x = torch.tensor(list(xs), dtype=torch.float64).unsqueeze(-1)
    threshold = S.rastrigin_convexity_threshold()
    rows = []
    for dl in deltas:
        vals = S.smoothed_rastrigin(x, float(dl)).tolist()
        rows.append({"delta": float(dl), "values": vals, "convex": dl >= threshold})
    return rows


def lab2_paper_figure() -> Any:
    """Seed 004 Fig. 3 (Rastrigin and its smoothings) and the smallest curvature of
    f_hat_delta against delta, with the convexity threshold and, labelled as the paper's, the
    0.2-1 range of delta that generalized best in seed 004's CIFAR-100 experiments."""
    import matplotlib.pyplot as plt
    import numpy as np

    from labkit import critical
    from labkit import smoothing as S

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    S.plot_rastrigin_smoothing(ax=ax1)
    ax1.set_title("seed 004 Fig. 3: f and f̂_δ (Gaussian, closed form)", fontsize="medium")
    deltas = np.linspace(0, 1.5, 301)
    curvature = 2 - 4 * math.pi**2 * 10 * np.exp(-2 * math.pi**2 * deltas**2)
    ax2.plot(deltas, curvature, color="tab:blue", label="min over x of f̂_δ''(x)")
    ax2.axhline(0, color="k", lw=0.8)
    star = S.rastrigin_convexity_threshold()
    ax2.axvline(star, color="tab:red", ls="--", label=f"convex from δ* = {star:.4f}")
    lo, hi = critical.PAPER_VALUES["best_delta_range"]
    ax2.axvspan(lo, hi, color="0.5", alpha=0.15,
                label=f"paper: best δ for ResNet-18/CIFAR-100 ({lo:g}-{hi:g})")
    ax2.set_yscale("symlog", linthresh=1.0)
    ax2.set_xlabel("δ")
    ax2.set_ylabel("smallest curvature")
    ax2.legend(fontsize="x-small")
    ax2.grid(True, alpha=0.3)
    return fig
