"""Adam-type (2) and AMSGrad-type (3) preconditioners with power eta, as the thesis writes them.

Book: chapter 4 (adaptive methods), equations (eq-ch4-adam-eta) and (eq-ch4-ams-eta) and the
section "labkit.optim.AdamEta and Algorithm 3.1": Algorithm 3.1 of the power-eta thesis (after
Iiduka, arXiv:2002.09647) for X = R^d with a constant learning rate, with the preconditioners
(2) and (3) taken literally. Chapter 4 compares them with the
torch-style family of :class:`labkit.optim.AdamEta`, which is exactly torch's Adam/AMSGrad at
eta = 2 but is not (2) or (3).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ._validation import (
    ValidatedOptimizer,
    check_betas,
    check_bool,
    check_foreach,
    check_lr,
    check_nonnegative,
    check_positive,
    group_by_device_and_dtype,
    real_view,
)

__all__ = ["AdamEtaThesis"]


def _single_tensor_adam_eta_thesis(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eta: float,
    eps: float,
    amsgrad: bool,
    weight_decay: float,
) -> None:
    for p, g, m, v, vmax, t in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True
    ):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        if eta == 2.0:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            power = g.abs() if eta == 1.0 else g.abs().pow_(eta)
            v.mul_(beta2).add_(power, alpha=1 - beta2)
        # (3): running max of the raw v; (2): running max of the bias-corrected v.
        torch.maximum(vmax, v if amsgrad else v / (1 - beta2**t), out=vmax)
        if eta == 2.0:
            denom = vmax.sqrt()
        elif eta == 1.0:
            denom = vmax.clone()
        else:
            denom = vmax.pow(1 / eta)
        denom.add_(eps).clamp_min_(torch.finfo(denom.dtype).tiny)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def _multi_tensor_adam_eta_thesis(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eta: float,
    eps: float,
    amsgrad: bool,
    weight_decay: float,
) -> None:
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]
    for ps, gs, ms, vs, vmaxs, ts in group_by_device_and_dtype(*lists):
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        if eta == 2.0:
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        else:
            power = torch._foreach_abs(gs)
            if eta != 1.0:
                torch._foreach_pow_(power, eta)
            torch._foreach_add_(vs, power, alpha=1 - beta2)
            del power
        if amsgrad:
            torch._foreach_maximum_(vmaxs, vs)
        else:
            torch._foreach_maximum_(vmaxs, torch._foreach_div(vs, [1 - beta2**t for t in ts]))
        if eta == 2.0:
            denom = torch._foreach_sqrt(vmaxs)
        elif eta == 1.0:
            denom = [v.clone() for v in vmaxs]
        else:
            denom = torch._foreach_pow(vmaxs, 1 / eta)
        torch._foreach_add_(denom, eps)
        torch._foreach_maximum_(denom, torch.finfo(denom[0].dtype).tiny)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - beta1**t) for t in ts])


class AdamEtaThesis(ValidatedOptimizer):
    r"""Algorithm 3.1 of the power-eta thesis with preconditioner (2) or (3), as written.

    Update, elementwise, t = 1, 2, ... counting this param's updates (the thesis's n = t - 1),
    m_0 = v_0 = vhat_0 = 0::

        g_t     <- g_t + weight_decay * x_t                  (coupled weight decay, if > 0)
        m_t     <- beta1 * m_{t-1} + (1 - beta1) * g_t
        v_t     <- beta2 * v_{t-1} + (1 - beta2) * |g_t|^eta
        (2), amsgrad=False:  vhat_t <- max(vhat_{t-1}, v_t / (1 - beta2^t))
        (3), amsgrad=True:   vhat_t <- max(vhat_{t-1}, v_t)          (no bias correction)
        x_{t+1} <- x_t - lr * (m_t / (1 - beta1^t)) / (vhat_t^(1/eta) + eps)

    This is Algorithm 3.1 with X = R^d (the projection is the identity), alpha_n = lr,
    beta_n = gamma = beta1 and the thesis's delta = beta2: x_{n+1} = x_n - alpha H_n^{-1}
    mhat_n with H_n = diag(vhat_n^(1/eta)). The running maximum makes H_n non-decreasing,
    assumption (A3), by construction. The thesis writes the coordinate-wise power of G; we use
    |G| so that fractional eta (1/3, 1/2) is defined; for even eta the two agree.

    What differs from :class:`labkit.optim.AdamEta` (torch's conventions), per coordinate
    and with eps = 0: torch-style Adam keeps no maximum, so its denominator (vbar_t)^(1/eta)
    with vbar_t = v_t / (1 - beta2^t) can fall; torch-style AMSGrad takes the maximum of the
    raw v and then divides by today's 1 - beta2^t, which is (3) times (1 - beta2^t)^(-1/eta).
    The denominators are ordered (3) <= torch AMSGrad <= (2) and torch Adam <= torch AMSGrad.
    Neither (2) nor (3) is torch's Adam or AMSGrad at eta = 2, although the thesis calls them
    Adam and AMSGrad. Without bias correction, (3) starts with large steps: at t = 1 its
    denominator is (1 - beta2)^(1/eta) |g_1|, so the first step is lr (1 - beta2)^(-1/eta)
    per coordinate, 32 lr at eta = 2 and 10^9 lr at eta = 1/3 for beta2 = 0.999.

    ``eps`` defaults to 0, as in the thesis. A coordinate whose gradients have all been 0 has
    m = 0 and vhat = 0; the denominator is floored at the smallest positive normal number of the
    dtype, so such a coordinate does not move (instead of 0/0). The floor changes nothing else
    unless vhat^(1/eta) is below it, i.e. unless |g|^eta underflows (float32: |g| below about
    1e-10 at eta = 4): give ``eps > 0`` where gradients can be that small.

    Args:
        params: tensors or param groups (dicts).
        lr: the learning rate alpha, finite and > 0 (default 1e-3).
        betas: (beta1, beta2), each in [0, 1): decay rates of the first and second moment.
        eta: power of |g| in the second moment, finite and > 0 (default 2).
        eps: added to vhat^(1/eta) (>= 0; default 0, as in the thesis).
        amsgrad: False for the Adam-type preconditioner (2), True for the AMSGrad-type (3).
        weight_decay: coupled L2 coefficient (>= 0).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State: ``"step"`` (int t), ``"exp_avg"`` (m), ``"exp_avg_sq"`` (v) and ``"max_exp_avg_sq"``
    (vhat: the running max of the bias-corrected v for (2), of the raw v for (3)); tensors
    have the param's shape. Complex params are treated as pairs of reals.
    """

    _checks = {
        "lr": check_lr,
        "betas": check_betas,
        "eta": partial(check_positive, name="eta"),
        "eps": partial(check_nonnegative, name="eps"),
        "amsgrad": partial(check_bool, name="amsgrad"),
        "weight_decay": partial(check_nonnegative, name="weight_decay"),
        "foreach": check_foreach,
    }

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eta: float = 2.0,
        eps: float = 0.0,
        amsgrad: bool = False,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eta": eta,
            "eps": eps,
            "amsgrad": amsgrad,
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
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            exp_avgs.append(real_view(self._zeros_state(p, "exp_avg")))
            exp_avg_sqs.append(real_view(self._zeros_state(p, "exp_avg_sq")))
            max_exp_avg_sqs.append(real_view(self._zeros_state(p, "max_exp_avg_sq")))
            state = self.state[p]
            state["step"] = int(state.get("step", 0)) + 1
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        fn = _multi_tensor_adam_eta_thesis if foreach else _single_tensor_adam_eta_thesis
        fn(
            [real_view(p) for p in params],
            [real_view(g) for g in grads],
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eta=group["eta"],
            eps=group["eps"],
            amsgrad=group["amsgrad"],
            weight_decay=group["weight_decay"],
        )
