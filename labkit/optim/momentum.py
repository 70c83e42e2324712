"""SGD with momentum: stochastic heavy ball (SHB), normalized heavy ball (NSHB), Nesterov.

Book: chapter 3 (SGD and momentum), the SHB and NSHB updates of Sato & Iiduka (2024) (Algorithms 2.2
and 2.3 of Sato and Iiduka 2024, arXiv:2402.02325) and Nesterov's momentum in the form
that PyTorch ships.

The three differ only in how the buffer is built and what the step uses::

    SHB       m_t = g_t + beta m_{t-1}              x_{t+1} = x_t - lr m_t
    NSHB      d_t = (1 - beta) g_t + beta d_{t-1}   x_{t+1} = x_t - lr d_t
    Nesterov  m_t = g_t + beta m_{t-1}              x_{t+1} = x_t - lr (g_t + beta m_t)

with m_{-1} = d_{-1} = 0. All three keep the buffer in ``state["momentum_buffer"]``.
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
)

__all__ = ["NSHB", "SHB", "Nesterov"]

def _single_tensor_momentum(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    *,
    kind: str,
    lr: float,
    beta: float,
    weight_decay: float,
) -> None:
    for p, g, buf in zip(params, grads, bufs, strict=True):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if kind == "nshb":
            buf.mul_(beta).add_(g, alpha=1 - beta)
        else:
            buf.mul_(beta).add_(g)
        if kind == "nesterov":
            p.add_(g.add(buf, alpha=beta), alpha=-lr)
        else:
            p.add_(buf, alpha=-lr)


def _multi_tensor_momentum(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    *,
    kind: str,
    lr: float,
    beta: float,
    weight_decay: float,
) -> None:
    for ps, gs, bs in group_by_device_and_dtype(params, grads, bufs):
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        torch._foreach_mul_(bs, beta)
        if kind == "nshb":
            torch._foreach_add_(bs, gs, alpha=1 - beta)
        else:
            torch._foreach_add_(bs, gs)
        if kind == "nesterov":
            # Out of place: torch's foreach SGD writes g + beta m into p.grad; we leave it.
            direction = torch._foreach_add(gs, bs, alpha=beta)
            torch._foreach_add_(ps, direction, alpha=-lr)
        else:
            torch._foreach_add_(ps, bs, alpha=-lr)


class _Momentum(ValidatedOptimizer):
    """Shared constructor and step of SHB, NSHB and Nesterov (``_kind`` picks the rule)."""

    _kind = "shb"
    _checks = {
        "lr": check_lr,
        "beta": partial(check_unit_interval, name="beta"),
        "weight_decay": partial(check_nonnegative, name="weight_decay"),
        "foreach": check_foreach,
    }

    def __init__(
        self,
        params: Any,
        lr: float,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {"lr": lr, "beta": beta, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        foreach: bool,
    ) -> None:
        # The buffer starts at zero (m_{-1} = 0), so the first update makes it g_0 (SHB,
        # Nesterov) or (1 - beta) g_0 (NSHB) exactly.
        bufs = [self._zeros_state(p, "momentum_buffer") for p in params]
        fn = _multi_tensor_momentum if foreach else _single_tensor_momentum
        fn(
            params,
            grads,
            bufs,
            kind=self._kind,
            lr=group["lr"],
            beta=group["beta"],
            weight_decay=group["weight_decay"],
        )


class SHB(_Momentum):
    r"""Stochastic heavy ball: SGD with momentum as PyTorch and TensorFlow ship it.

    Update, elementwise, with m_{-1} = 0 (so m_0 = g_0)::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        m_t     <- g_t + beta * m_{t-1}
        x_{t+1} <- x_t - lr * m_t

    Polyak (1964), "Some methods of speeding up the convergence of iteration methods";
    Algorithm 2.2 of Sato and Iiduka (2024), arXiv:2402.02325. Step for step equal to
    ``torch.optim.SGD(params, lr, momentum=beta, weight_decay=weight_decay)``.

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0.
        beta: momentum coefficient in [0, 1).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``state["momentum_buffer"]`` holds m_t after the step (same shape as the param).
    """

    _kind = "shb"


class NSHB(_Momentum):
    r"""Normalized stochastic heavy ball: the buffer is a convex combination of gradients.

    Update, elementwise, with d_{-1} = 0 (so d_0 = (1 - beta) g_0)::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        d_t     <- (1 - beta) * g_t + beta * d_{t-1}
        x_{t+1} <- x_t - lr * d_t

    Gupal and Bazhenov (1972), "A stochastic analog of the conjugate gradient method";
    Algorithm 2.3 of Sato and Iiduka (2024), arXiv:2402.02325 (the "SGDM" of most
    convergence analyses, e.g. Gitman et al. 2019, arXiv:1910.13962).

    Relation to SHB. Both recursions are linear and start from zero, so by induction
    d_t = (1 - beta) m_t for every t >= 0, where m_t is SHB's buffer fed the same
    gradients: d_0 = (1 - beta) g_0 = (1 - beta) m_0, and if d_{t-1} = (1 - beta) m_{t-1}
    then d_t = (1 - beta) g_t + beta (1 - beta) m_{t-1} = (1 - beta) m_t. Equivalently
    SHB's m_t = d_t / (1 - beta). Hence NSHB with learning rate lr produces exactly the
    iterates of SHB with learning rate lr * (1 - beta) (same weight decay, same schedule
    shape), from the very first step, up to floating-point round-off. The two differ only
    where the start differs: ``torch.optim.SGD(momentum=beta, dampening=beta)`` also
    computes d_t = beta d_{t-1} + (1 - beta) g_t, but it sets its first buffer to g_0
    instead of (1 - beta) g_0, so on the same gradients its buffer exceeds NSHB's by
    beta^{t+1} g_0, a transient that decays geometrically. With beta = 0.9 and the same
    lr, NSHB takes steps 10 times shorter than SHB, which is why the two behave so
    differently in practice (Sato & Iiduka (2024): delta_NSHB = lr sqrt(C^2 / ((1 - beta) b))).

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0.
        beta: momentum coefficient in [0, 1).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``state["momentum_buffer"]`` holds d_t after the step.
    """

    _kind = "nshb"


class Nesterov(_Momentum):
    r"""SGD with Nesterov momentum, in PyTorch's formulation.

    Update, elementwise, with m_{-1} = 0::

        g_t     <- g_t + weight_decay * x_t          (coupled weight decay, if > 0)
        m_t     <- g_t + beta * m_{t-1}
        x_{t+1} <- x_t - lr * (g_t + beta * m_t)

    The step looks ahead along the momentum: Nesterov (1983); Sutskever, Martens, Dahl and
    Hinton (2013), "On the importance of initialization and momentum in deep learning",
    rewritten in terms of the gradient at the current iterate (Bengio, Boulanger-Lewandowski
    and Pascanu 2013, arXiv:1212.0901). Step for step equal to
    ``torch.optim.SGD(params, lr, momentum=beta, nesterov=True, weight_decay=weight_decay)``
    (unlike torch's multi-tensor path, p.grad is never overwritten).

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0.
        beta: momentum coefficient in [0, 1).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``state["momentum_buffer"]`` holds m_t after the step.
    """

    _kind = "nesterov"
