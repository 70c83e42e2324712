"""Shared argument checks and the common step skeleton of the optimizers in `labkit.optim`.

Book: chapters 3 and 4 (every optimizer there takes these hyperparameters).

Each check returns the value as a Python float (or bool) so that a param group always
holds plain numbers, and raises ``TypeError`` for a value of the wrong type and
``ValueError`` for a value out of range. Messages name the hyperparameter, the value and
the valid range, e.g. ``"beta must be in [0, 1), got 1.2"``.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

try:  # torch's own rule for picking the multi-tensor path (present in torch 2.x)
    from torch.optim.optimizer import _default_to_fused_or_foreach as _torch_default
except ImportError:  # pragma: no cover - depends on the installed torch
    _torch_default = None

__all__ = [
    "ValidatedOptimizer",
    "check_betas",
    "check_bool",
    "check_foreach",
    "check_lr",
    "check_nonnegative",
    "check_positive",
    "check_unit_interval",
    "default_foreach",
    "group_by_device_and_dtype",
    "params_with_grads",
    "real_view",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (int or float), got {value!r} "
            f"of type {type(value).__name__}"
        )
    return float(value)


def check_lr(value: object, name: str = "lr") -> float:
    """Return ``value`` as a float; it must be finite and > 0."""
    x = _real(name, value)
    if not (math.isfinite(x) and x > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_unit_interval(value: object, name: str) -> float:
    """Return ``value`` as a float; it must lie in [0, 1) (momentum / decay rates)."""
    x = _real(name, value)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return x


def check_positive(value: object, name: str) -> float:
    """Return ``value`` as a float; it must be finite and > 0 (e.g. the power eta)."""
    x = _real(name, value)
    if not (math.isfinite(x) and x > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_nonnegative(value: object, name: str) -> float:
    """Return ``value`` as a float; it must be finite and >= 0 (eps, weight_decay)."""
    x = _real(name, value)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def check_betas(value: object, name: str = "betas") -> tuple[float, float]:
    """Return ``(beta1, beta2)`` as floats; each must lie in [0, 1)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    b1 = check_unit_interval(value[0], f"beta1 ({name}[0])")
    b2 = check_unit_interval(value[1], f"beta2 ({name}[1])")
    return (b1, b2)


def check_bool(value: object, name: str) -> bool:
    """Return ``value``; it must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_foreach(value: object) -> bool | None:
    """Return ``value``; it must be None (pick automatically), True or False."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"foreach must be None (pick like torch), True or False, got {value!r}"
        )
    return value


def default_foreach(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch would pick its multi-tensor (``foreach``) path for ``params``.

    This is torch's rule (``torch.optim.optimizer._default_to_fused_or_foreach`` with
    ``differentiable=False``): use it when every tensor is a plain ``torch.Tensor`` on a
    device with foreach kernels (CUDA, XPU, MTIA, a private-use backend); never on CPU.
    """
    if _torch_default is not None:
        return bool(_torch_default(list(params), False, use_fused=False)[1])
    if torch.jit.is_scripting():  # pragma: no cover - fallback for other torch versions
        return False
    devices = {"cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name()}
    plain = (torch.Tensor, torch.nn.Parameter)
    return all(type(p) in plain and p.device.type in devices for p in params)


def params_with_grads(
    group: dict[str, Any], optimizer: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The params of ``group`` that have a gradient, and those gradients.

    Params whose ``.grad`` is None are skipped (their state is left untouched). A sparse
    gradient raises ``TypeError``: these optimizers update dense tensors only.
    """
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        if g.layout != torch.strided:
            raise TypeError(
                f"{optimizer} does not support sparse gradients: param {i} of its group has a "
                f"gradient with layout {g.layout}; use dense gradients "
                "(e.g. nn.Embedding(..., sparse=False))"
            )
        params.append(p)
        grads.append(g)
    return params, grads


def real_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a real view (trailing dim 2) of a complex ``t``.

    The adaptive methods treat real and imaginary parts as separate coordinates, as torch
    does; updating the view updates the complex tensor in place.
    """
    return torch.view_as_real(t) if torch.is_complex(t) else t


def group_by_device_and_dtype(
    *lists: list[torch.Tensor],
) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists into runs that share the first list's (device, dtype).

    Foreach kernels only take their fast path when all tensors of a call share a device and
    a dtype, so the multi-tensor paths call them once per such run.
    """
    if len({(t.device, t.dtype) for t in lists[0]}) <= 1:
        return [tuple(lists)]
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(lists[0]):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in buckets.values()]


class ValidatedOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """``torch.optim.Optimizer`` that checks the hyperparameters of every param group.

    Subclasses set ``_checks``: a mapping from hyperparameter name to a function that
    returns the checked (and normalized) value or raises. The defaults are checked in the
    constructor and each group again when it is added (also by ``add_param_group``), so a
    group such as ``{"params": ..., "lr": -1}`` fails with the same message.

    ``step`` is shared: for each group it collects the params that have a gradient, picks
    the per-tensor or the multi-tensor path (``group["foreach"]``, None = torch's rule) and
    calls the subclass's ``_update_group(group, params, grads, foreach)``.
    """

    _checks: dict[str, Callable[[object], object]] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        defaults = self._check_hparams(defaults)
        super().__init__(params, defaults)

    @classmethod
    def _check_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        out = dict(hparams)
        for key, check in cls._checks.items():
            if key in out:
                out[key] = check(out[key])
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        checked = self._check_hparams({k: v for k, v in param_group.items() if k != "params"})
        param_group.update(checked)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one update; ``closure`` (optional) re-evaluates the model, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            params, grads = params_with_grads(group, name)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = default_foreach(params)
            self._update_group(group, params, grads, foreach)
        return loss

    @abc.abstractmethod
    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        foreach: bool,
    ) -> None:
        """Update ``params`` in place from ``grads`` with the hyperparameters of ``group``."""

    def _zeros_state(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """``self.state[p][key]``, created as zeros shaped like ``p`` on first use."""
        state = self.state[p]
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return buf
