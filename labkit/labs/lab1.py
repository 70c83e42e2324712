"""Lab 1, the optimizer zoo (``labs/lab1_optimizer_zoo.ipynb``): the panel's knobs, grid and figure.

Reproduces the power-eta thesis Fig. 1-2: Adam-type and AMSGrad-type Algorithm 3.1 with the power
eta in {1/3, 1/2, 1, 2, 3, 4} on ResNet-44 / CIFAR-10, in two versions: torch-style
(:class:`labkit.optim.AdamEta`, exactly torch's Adam/AMSGrad at eta = 2; the default) and the
thesis's preconditioners (2) and (3) as written (:class:`labkit.optim.AdamEtaThesis`), with SGD,
SHB, NSHB, AdaGrad and RMSProp as optional baselines. The thesis's code is not published, so
which version produced its figures is not known. Book: chapter 4 (adaptive methods, the
power-eta thesis).

The panel's interface is that of every lab that trains (:mod:`labkit.labs`): :func:`controls`,
:func:`defaults`, :func:`validate`, :func:`grid` and :func:`label`; :func:`run_table` and
:func:`figure` show the runs, :func:`eta_label` names a power eta as the thesis does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from labkit import widgets as lk_widgets
from labkit.labs.setup import check_profile, dataset_of, is_positive
from labkit.train import TrainConfig

__all__ = [
    "ETAS",
    "LAB_ID",
    "OPTIMIZERS",
    "REFERENCE",
    "controls",
    "defaults",
    "eta_label",
    "figure",
    "grid",
    "label",
    "run_table",
    "validate",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab1_optimizer_zoo"


def eta_label(eta: float) -> str:
    """The thesis's name of a power eta: ``1/3``, ``1/2``, ``1``, ``2``, ``3``, ``4``."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (
        math.isfinite(eta) and eta > 0
    ):
        raise ValueError(f"eta must be a positive finite number; got {eta!r}")
    frac = Fraction(float(eta)).limit_denominator(12)
    if abs(float(frac) - eta) > 1e-12:
        return f"{eta:g}"
    return str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"


#: The powers eta of the power-eta thesis's Fig. 1-2.
ETAS: tuple[float, ...] = (1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
#: The optimizers of the zoo, with their names in the panel.
OPTIMIZERS: dict[str, str] = {
    "sgd": "SGD", "shb": "SHB (momentum)", "nshb": "NSHB", "adagrad": "AdaGrad",
    "rmsprop": "RMSProp", "adam": "Adam, power η (torch-style)",
    "amsgrad": "AMSGrad, power η (torch-style)",
    "adam_thesis": "Adam-type (2), as the thesis writes it",
    "amsgrad_thesis": "AMSGrad-type (3), as the thesis writes it",
}
_ADAM_TYPE = ("adam", "amsgrad", "adam_thesis", "amsgrad_thesis")
# Short names in curve labels and figure titles.
_SHORT = {"adam": "Adam", "amsgrad": "AMSGrad", "adam_thesis": "(2)", "amsgrad_thesis": "(3)"}
# Learning rates: "lr" (the thesis's alpha) for the methods that divide by a running mean of
# squared gradients, "lr_sgd" for the plain-gradient methods and AdaGrad.
_USES_ALPHA = ("rmsprop", *_ADAM_TYPE)
#: Reference accuracy for orientation (not the power-eta thesis's number: the thesis gives
#: curves only).
REFERENCE = {"label": "He et al. 2016: ResNet-44 with SGD, 92.8%", "test_acc": 0.928}

_DEFAULTS = {
    # CPU, generated data, tiny CNN: 6 runs x 4 epochs in seconds.
    "smoke": {"optimizers": ("adam", "amsgrad"), "etas": (1 / 2, 2.0, 4.0), "epochs": 4,
              "seeds": 1, "batch_size": 64},
    # CPU: scikit-learn's handwritten digits, the tiny CNN; all six eta, 15 epochs. Measured:
    # 36 s of CPU time for the 12 runs (one core; 4 min wall on a shared 2-core machine).
    "cpu": {"optimizers": ("adam", "amsgrad"), "etas": ETAS, "epochs": 15, "seeds": 1,
            "batch_size": 64},
    # One GPU: ResNet-44 on CIFAR-10, all six eta, 10 epochs (about 20 min on an H100).
    "short": {"optimizers": ("adam", "amsgrad"), "etas": ETAS, "epochs": 10, "seeds": 1,
              "batch_size": 128},
    # the power-eta thesis's scale: 200 epochs (about 6 h on an H100 for the 12 runs).
    "paper": {"optimizers": ("adam", "amsgrad"), "etas": ETAS, "epochs": 200, "seeds": 1,
              "batch_size": 128},
}


def controls() -> dict[str, Any]:
    """The knobs of lab 1's panel."""
    W = lk_widgets
    return {
        "optimizers": W.multi_select(
            "optimizers", [(label, name) for name, label in OPTIMIZERS.items()]),
        "etas": W.multi_select("η (Adam/AMSGrad)", [(eta_label(e), e) for e in ETAS]),
        "lr": W.float_text("α = lr of Adam, AMSGrad, RMSProp", 1e-3),
        "lr_sgd": W.float_text("lr of SGD, SHB, NSHB, AdaGrad", 0.1),
        "beta1": W.dropdown("β₁ (Adam/AMSGrad)", [("0.9 (standard)", 0.9),
                                                   ("0.001 (the thesis as printed)", 0.001)]),
        "epochs": W.int_slider("epochs", 1, 200, 3),
        "seeds": W.int_slider("seeds", 1, 5, 1),
        "batch_size": W.int_text("batch size", 64),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (lr 1e-3 as in the power-eta thesis, standard betas)."""
    check_profile(profile)
    return {"lr": 1e-3, "lr_sgd": 0.1, "beta1": 0.9, **_DEFAULTS[profile]}


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 1's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    opts = tuple(values.get("optimizers") or ())
    if not opts:
        msgs.append("choose at least one optimizer")
    if any(o in _ADAM_TYPE for o in opts) and not values.get("etas"):
        msgs.append("choose at least one η for Adam/AMSGrad (or deselect them)")
    if any(o in _USES_ALPHA for o in opts) and not is_positive(values.get("lr")):
        msgs.append(f"α (lr of Adam, AMSGrad, RMSProp) must be > 0; got {values.get('lr')}")
    if any(o not in _USES_ALPHA for o in opts) and not is_positive(values.get("lr_sgd")):
        msgs.append(f"lr of SGD, SHB, NSHB, AdaGrad must be > 0; got {values.get('lr_sgd')}")
    b = values.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        msgs.append(f"batch size must be an integer >= 1; got {b}")
    for name in ("epochs", "seeds"):
        v = values.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msgs.append(f"{name} must be an integer >= 1; got {v}")
    return msgs


def grid(values: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs lab 1's knobs ask for: optimizer x eta (Adam/AMSGrad only) x seed.

    CIFAR-10 with the profile's model (ResNet-44 in short/paper, the power-eta thesis's network;
    the tiny CNN in smoke), or in the cpu profile the handwritten digits with the tiny CNN; no
    weight decay, random crops and flips (no rotation: CIFAR-10; 1-pixel shifts and no flip on
    the digits), beta2 = 0.999.
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
                    dataset=dataset_of(values["profile"], "cifar10"), optimizer=opt,
                    lr=float(lr), hparams=hparams, epochs=values["epochs"],
                    batch_size=values["batch_size"], seed=seed,
                    profile=values["profile"],
                ))
    return runs


def label(config: TrainConfig) -> str:
    """``"Adam η=1/2"`` (torch-style), ``"(2) η=1/2"`` (the thesis's form (2) as written),
    ``"SGD lr=0.1"``; `` s1`` etc. for seeds other than 0."""
    name = _SHORT.get(config.optimizer, OPTIMIZERS.get(config.optimizer, config.optimizer))
    if "eta" in config.hparams:
        text = f"{name} η={eta_label(config.hparams['eta'])}"
    else:
        text = f"{name.split(' ')[0]} lr={config.lr:g}"
    return text + (f" s{config.seed}" if config.seed else "")


def run_table(results: Any) -> Any:
    """The columns of lab 1's runs that matter (from ``panel.results``), one row per run:
    optimizer, lr, eta and beta1 (Adam/AMSGrad only), seed, epochs done, status, final and
    best test accuracy."""
    cols = ["optimizer", "lr", "eta", "beta1", "seed", "epochs_completed", "status", "test_acc",
            "best_test_acc"]
    return results[[c for c in cols if c in results.columns]].reset_index(drop=True)


def figure(history: Any, profile: str = "smoke") -> Any:
    """Test accuracy per epoch, one panel per Adam-family optimizer run, one for the others.

    Like the power-eta thesis's Fig. 1 (Adam-type) and Fig. 2 (AMSGrad-type): one line per eta
    (mean over seeds, band from min to max), in a panel for each of torch-style Adam and
    AMSGrad and the thesis's (2) and (3) as written. Outside the smoke profile a dotted line
    marks :data:`REFERENCE`. Returns the pyplot figure.

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
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), layout="constrained",
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    titles = {"adam": "Adam, torch-style (cf. thesis Fig. 1)",
              "amsgrad": "AMSGrad, torch-style (cf. Fig. 2)",
              "adam_thesis": "(2) as written (cf. thesis Fig. 1)",
              "amsgrad_thesis": "(3) as written (cf. Fig. 2)"}
    panels = [(titles[opt], h, "eta") for opt, h in groups]
    if len(others):
        panels.append(("other optimizers", others, "optimizer"))
    for ax, (title, h, by) in zip(axes.ravel()[:n], panels, strict=True):
        plot_accuracy_curves(h, by=by, ax=ax)
        if profile in ("short", "paper"):  # a CIFAR-10 number: not for the digits
            ax.axhline(100 * REFERENCE["test_acc"], color="k", linestyle=":",
                       label=REFERENCE["label"])
            ax.legend(fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig

