"""Optimizers of the course, as ``torch.optim.Optimizer`` subclasses.

Book: chapter 3 (SGD and momentum: ``SGD``, ``SHB``, ``NSHB``, ``Nesterov``) and chapter 4
(adaptive methods: ``AdaGrad``, ``RMSProp``, ``AdamEta`` = Adam/AMSGrad with the power eta
of the power-eta thesis in torch's conventions, ``AdamEtaThesis`` = the thesis's preconditioners
(2) and (3) as written). Each class docstring states its update rule and the paper it comes
from.

Every optimizer has a per-tensor path and a multi-tensor (``torch._foreach_*``) path,
``foreach=None`` picking like torch (multi-tensor on CUDA, per-tensor on CPU); supports
param groups, ``state_dict`` round trips and coupled weight decay (g <- g + wd x); skips
params whose gradient is None and rejects sparse gradients.

``build(name, params, **hparams)`` makes one by name (``OPTIMIZER_NAMES``), for configs
and command lines; ``hyperparameters(name)`` lists what ``build`` accepts and the defaults.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .adagrad import AdaGrad
from .adam_eta import AdamEta
from .adam_eta_thesis import AdamEtaThesis
from .momentum import NSHB, SHB, Nesterov
from .rmsprop import RMSProp
from .sgd import SGD

__all__ = [
    "NSHB",
    "OPTIMIZER_NAMES",
    "REQUIRED",
    "SGD",
    "SHB",
    "AdaGrad",
    "AdamEta",
    "AdamEtaThesis",
    "Nesterov",
    "RMSProp",
    "build",
    "hyperparameters",
]


class _Required:
    """Marker for a hyperparameter without a default (the learning rate of most methods)."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


#: Value that ``hyperparameters(name)`` gives a hyperparameter ``build`` cannot default.
REQUIRED = _Required()

# name -> (class, arguments fixed by the name)
_REGISTRY: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "shb": (SHB, {}),
    "nshb": (NSHB, {}),
    "nesterov": (Nesterov, {}),
    "adagrad": (AdaGrad, {}),
    "rmsprop": (RMSProp, {}),
    "adam": (AdamEta, {"amsgrad": False}),
    "amsgrad": (AdamEta, {"amsgrad": True}),
    # The power-eta thesis's preconditioners (2) and (3) as written (not torch's Adam/AMSGrad).
    "adam_thesis": (AdamEtaThesis, {"amsgrad": False}),
    "amsgrad_thesis": (AdamEtaThesis, {"amsgrad": True}),
}
_ADAM_FAMILY = (AdamEta, AdamEtaThesis)

#: The names ``build`` accepts, in the order of the book (chapter 3, then chapter 4).
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}"
        )
    return key


def hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters ``build(name, ...)`` accepts, mapped to their defaults.

    A value of ``REQUIRED`` means there is no default (``lr`` for all but the Adam family:
    adam, amsgrad, adam_thesis, amsgrad_thesis).
    ``foreach`` defaults to None (torch's rule). For the Adam family the betas appear flat,
    as ``beta1`` and ``beta2`` (``build`` also takes ``betas=(beta1, beta2)``). Scalar
    hyperparameters are floats. A new dict is returned each call.
    """
    key = _lookup(name)
    cls, fixed = _REGISTRY[key]
    out: dict[str, object] = {}
    for arg in list(inspect.signature(cls.__init__).parameters.values())[2:]:
        if arg.name in fixed:
            continue
        default = REQUIRED if arg.default is inspect.Parameter.empty else arg.default
        if arg.name == "betas":
            out["beta1"], out["beta2"] = (float(b) for b in default)
        elif isinstance(default, int) and not isinstance(default, bool):
            out[arg.name] = float(default)
        else:
            out[arg.name] = default
    return out


def build(name: str, params: Any, **hparams: Any) -> torch.optim.Optimizer:
    """Make the optimizer called ``name`` (one of ``OPTIMIZER_NAMES``) over ``params``.

    ``hparams`` are passed to the class; unknown ones raise ``ValueError`` listing the
    accepted ones (see ``hyperparameters``). ``lr`` is required except for the Adam family
    (default 1e-3). For the Adam family, ``beta1``/``beta2`` may replace ``betas``. ``adam`` and
    ``amsgrad`` are :class:`AdamEta` (torch's conventions); ``adam_thesis`` and
    ``amsgrad_thesis`` are :class:`AdamEtaThesis`, the power-eta thesis's (2) and (3).

    Example: ``build("adam", model.parameters(), lr=1e-3, eta=3, beta2=0.99)``.
    """
    key = _lookup(name)
    cls, fixed = _REGISTRY[key]
    accepted = hyperparameters(key)
    allowed = set(accepted) | ({"betas"} if cls in _ADAM_FAMILY else set())
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        listed = ", ".join(accepted) + (", betas" if cls in _ADAM_FAMILY else "")
        raise ValueError(
            f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)} for optimizer {key!r}; accepted: {listed}"
        )
    kwargs = dict(hparams)
    if accepted.get("lr") is REQUIRED and kwargs.get("lr") in (None, REQUIRED):
        raise ValueError(
            f"optimizer {key!r} needs a learning rate: pass lr=<finite number > 0> "
            "(it has no default)"
        )
    if cls in _ADAM_FAMILY:
        flat = {k: kwargs.pop(k) for k in ("beta1", "beta2") if k in kwargs}
        if flat:
            if "betas" in kwargs:
                raise ValueError(
                    f"give either betas={kwargs['betas']!r} or beta1/beta2 "
                    f"({', '.join(f'{k}={v!r}' for k, v in flat.items())}), not both"
                )
            kwargs["betas"] = (
                flat.get("beta1", accepted["beta1"]),
                flat.get("beta2", accepted["beta2"]),
            )
    kwargs.update(fixed)
    return cls(params, **kwargs)
