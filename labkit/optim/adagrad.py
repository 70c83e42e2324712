"""AdaGrad: per-coordinate step sizes from the sum of all past squared gradients.

Book: chapter 4 (adaptive methods), AdaGrad (Duchi, Hazan and Singer 2011).
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
    real_view,
)

__all__ = ["AdaGrad"]


class AdaGrad(ValidatedOptimizer):
    r"""AdaGrad with a diagonal preconditioner.

    Update, elementwise, with s_0 = 0::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        s_t     <- s_{t-1} + g_t^2
        x_{t+1} <- x_t - lr * g_t / (sqrt(s_t) + eps)

    Duchi, Hazan and Singer (2011), "Adaptive subgradient methods for online learning and
    stochastic optimization", JMLR 12. Coordinates with large past gradients get small
    steps; since s_t only grows, the step size of every coordinate is non-increasing (the
    monotone preconditioner of the power-eta thesis's assumption (A3) holds trivially). Step for
    step
    equal to ``torch.optim.Adagrad(params, lr, lr_decay=0, weight_decay=weight_decay,
    initial_accumulator_value=0, eps=eps)``. Complex params are treated as pairs of reals.

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0.
        eps: added to sqrt(s_t) (>= 0).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``state["sum"]`` holds s_t (shape of the param), ``state["step"]`` the number of
    updates this param received (int).
    """

    _checks = {
        "lr": check_lr,
        "eps": partial(check_nonnegative, name="eps"),
        "weight_decay": partial(check_nonnegative, name="weight_decay"),
        "foreach": check_foreach,
    }

    def __init__(
        self,
        params: Any,
        lr: float,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        foreach: bool,
    ) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        sums = []
        for p in params:
            sums.append(real_view(self._zeros_state(p, "sum")))
            state = self.state[p]
            state["step"] = int(state.get("step", 0)) + 1
        params = [real_view(p) for p in params]
        grads = [real_view(g) for g in grads]

        if foreach:
            for ps, gs, ss in group_by_device_and_dtype(params, grads, sums):
                if wd != 0:
                    gs = torch._foreach_add(gs, ps, alpha=wd)
                torch._foreach_addcmul_(ss, gs, gs, value=1)
                std = torch._foreach_sqrt(ss)
                torch._foreach_add_(std, eps)
                # Same operation order as torch's multi-tensor Adagrad: (-lr g) / std.
                numerator = torch._foreach_mul(gs, -lr)
                torch._foreach_addcdiv_(ps, numerator, std)
        else:
            for p, g, s in zip(params, grads, sums, strict=True):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                s.addcmul_(g, g, value=1)
                std = s.sqrt().add_(eps)
                p.addcdiv_(g, std, value=-lr)
