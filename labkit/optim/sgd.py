"""Plain stochastic gradient descent (no momentum).

Book: chapter 3 (SGD and momentum), the SGD update x_{t+1} = x_t - eta g_t (Sato & Iiduka (2024),
Algorithm 2.1; Robbins and Monro 1951).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ._validation import (
    ValidatedOptimizer,
    check_foreach,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
)

__all__ = ["SGD"]


class SGD(ValidatedOptimizer):
    r"""Stochastic gradient descent without momentum.

    Update, for every parameter tensor x with gradient g (elementwise)::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        x_{t+1} <- x_t - lr * g_t

    This is Algorithm 2.1 of Sato and Iiduka (2024), arXiv:2402.02325, the stochastic
    approximation method of Robbins and Monro (1951). It equals
    ``torch.optim.SGD(params, lr, momentum=0, weight_decay=weight_decay)`` step for step.

    Args:
        params: tensors or param groups (dicts), as for any ``torch.optim.Optimizer``.
        lr: learning rate, finite and > 0 (no default: choose one).
        weight_decay: coupled L2 coefficient (>= 0), added to the gradient before the step.
        foreach: True = multi-tensor ``torch._foreach_*`` path, False = per-tensor loop,
            None = torch's rule (multi-tensor when all params are on CUDA-like devices).

    State: none. Params whose ``.grad`` is None are skipped; sparse gradients raise.
    """

    _checks = {
        "lr": check_lr,
        "weight_decay": partial(check_nonnegative, name="weight_decay"),
        "foreach": check_foreach,
    }

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        foreach: bool,
    ) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if foreach:
            for ps, gs in group_by_device_and_dtype(params, grads):
                if wd != 0:
                    gs = torch._foreach_add(gs, ps, alpha=wd)
                torch._foreach_add_(ps, gs, alpha=-lr)
        else:
            for p, g in zip(params, grads, strict=True):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                p.add_(g, alpha=-lr)
