"""RMSProp: per-coordinate step sizes from a moving average of squared gradients.

Book: chapter 4 (adaptive methods), RMSProp (Tieleman and Hinton 2012).
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
    check_unit_interval,
    group_by_device_and_dtype,
    real_view,
)

__all__ = ["RMSProp"]


class RMSProp(ValidatedOptimizer):
    r"""RMSProp without momentum, not centered.

    Update, elementwise, with v_0 = 0::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        v_t     <- alpha * v_{t-1} + (1 - alpha) * g_t^2
        x_{t+1} <- x_t - lr * g_t / (sqrt(v_t) + eps)

    Tieleman and Hinton (2012), COURSERA "Neural Networks for Machine Learning", lecture
    6.5. Unlike AdaGrad the accumulator forgets (time constant about 1 / (1 - alpha)
    steps), so step sizes can grow again; there is no bias correction, so the first steps
    are larger than lr by about 1 / sqrt(1 - alpha^t) (10x at t = 1 for alpha = 0.99).
    Step for step equal to ``torch.optim.RMSprop(params, lr, alpha=alpha, eps=eps,
    weight_decay=weight_decay, momentum=0, centered=False)``. Complex params are treated as
    pairs of reals.

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0.
        alpha: decay rate of the squared-gradient average, in [0, 1).
        eps: added to sqrt(v_t) (>= 0).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``state["square_avg"]`` holds v_t (shape of the param), ``state["step"]`` the
    number of updates this param received (int).
    """

    _checks = {
        "lr": check_lr,
        "alpha": partial(check_unit_interval, name="alpha"),
        "eps": partial(check_nonnegative, name="eps"),
        "weight_decay": partial(check_nonnegative, name="weight_decay"),
        "foreach": check_foreach,
    }

    def __init__(
        self,
        params: Any,
        lr: float,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        foreach: bool,
    ) -> None:
        lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
        avgs = []
        for p in params:
            avgs.append(real_view(self._zeros_state(p, "square_avg")))
            state = self.state[p]
            state["step"] = int(state.get("step", 0)) + 1
        params = [real_view(p) for p in params]
        grads = [real_view(g) for g in grads]

        if foreach:
            for ps, gs, vs in group_by_device_and_dtype(params, grads, avgs):
                if wd != 0:
                    gs = torch._foreach_add(gs, ps, alpha=wd)
                torch._foreach_mul_(vs, alpha)
                torch._foreach_addcmul_(vs, gs, gs, value=1 - alpha)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, gs, denom, value=-lr)
        else:
            for p, g, v in zip(params, grads, avgs, strict=True):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                denom = v.sqrt().add_(eps)
                p.addcdiv_(g, denom, value=-lr)
