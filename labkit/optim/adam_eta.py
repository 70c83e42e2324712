"""Adam and AMSGrad with a power eta in the second moment (the power-eta thesis's family).

Book: chapter 4 (adaptive methods), Adam, AMSGrad and the power-eta family: Algorithm 3.1
of the power-eta thesis with the preconditioners (2) (Adam type) and (3) (AMSGrad type), where the
second moment averages |g|^eta and the preconditioner takes its 1/eta-th root. eta = 2 is
Adam (Kingma and Ba 2015) and AMSGrad (Reddi, Kale and Kumar 2018) as torch ships them.
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

__all__ = ["AdamEta"]


def _single_tensor_adam_eta(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eta: float,
    eps: float,
    weight_decay: float,
) -> None:
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        if eta == 2.0:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            power = g.abs() if eta == 1.0 else g.abs().pow_(eta)
            v.mul_(beta2).add_(power, alpha=1 - beta2)
        u = v
        if max_exp_avg_sqs is not None:
            u = torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
        bias_correction1 = 1 - beta1 ** steps[i]
        bias_correction2 = 1 - beta2 ** steps[i]
        step_size = lr / bias_correction1
        if eta == 2.0:  # torch's operation order: sqrt(v) / sqrt(bc2) + eps
            denom = (u.sqrt() / bias_correction2**0.5).add_(eps)
        elif eta == 1.0:
            denom = (u / bias_correction2).add_(eps)
        else:
            denom = (u.pow(1 / eta) / bias_correction2 ** (1 / eta)).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def _multi_tensor_adam_eta(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eta: float,
    eps: float,
    weight_decay: float,
) -> None:
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if max_exp_avg_sqs is not None:
        lists.append(max_exp_avg_sqs)
    for ps, gs, ms, vs, ts, *rest in group_by_device_and_dtype(*lists):
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
        us = vs
        if rest:
            us = rest[0]
            torch._foreach_maximum_(us, vs)
        step_size = [(lr / (1 - beta1**t)) * -1 for t in ts]
        bias_correction2 = [1 - beta2**t for t in ts]
        if eta == 2.0:
            denom = torch._foreach_sqrt(us)
            torch._foreach_div_(denom, [bc**0.5 for bc in bias_correction2])
        elif eta == 1.0:
            denom = torch._foreach_div(us, bias_correction2)
        else:
            denom = torch._foreach_pow(us, 1 / eta)
            torch._foreach_div_(denom, [bc ** (1 / eta) for bc in bias_correction2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, step_size)


class AdamEta(ValidatedOptimizer):
    r"""Adam / AMSGrad whose second moment averages |g|^eta (eta = 2: torch's Adam/AMSGrad).

    Update, elementwise, t = 1, 2, ... counting this param's updates, m_0 = v_0 = vmax_0 = 0::

        g_t     <- g_t + weight_decay * x_t                   (coupled weight decay, if > 0)
        m_t     <- beta1 * m_{t-1} + (1 - beta1) * g_t
        v_t     <- beta2 * v_{t-1} + (1 - beta2) * |g_t|^eta
        u_t     <- max(vmax_{t-1}, v_t) =: vmax_t   if amsgrad,   else   u_t <- v_t
        x_{t+1} <- x_t - lr * (m_t / (1 - beta1^t)) / ((u_t / (1 - beta2^t))^(1/eta) + eps)

    With eta = 2 this is exactly ``torch.optim.Adam(params, lr, betas, eps, weight_decay,
    amsgrad=amsgrad)`` (same operations in the same order, so float64 trajectories agree
    to round-off): Kingma and Ba (2015), "Adam: a method for stochastic optimization",
    arXiv:1412.6980; Reddi, Kale and Kumar (2018), "On the convergence of Adam and beyond",
    ICLR, arXiv:1904.09237. Other eta > 0 give the power-eta thesis's family (eta in {1/3, 1/2, 1,
    2,
    3, 4} in its CIFAR-10 experiments). Since the bias-corrected v is a weighted average
    of past |g|^eta with weights summing to 1, the denominator is a weighted power mean of
    past |g|: it grows with eta, from the geometric mean (eta -> 0) through the mean
    absolute value (eta = 1) and the root mean square (eta = 2) to the maximum
    (eta -> infinity); larger eta means smaller, more outlier-driven steps.

    Relation to the power-eta thesis's Algorithm 3.1 (analysed by Iiduka, arXiv:2002.09647). With
    X = R^d the projection is the identity and the algorithm reads
    x_{n+1} = x_n - alpha m_hat_n / h_n with the same m_hat_n = m_n / (1 - beta1^{n+1})
    (n counts from 0), and a diagonal preconditioner H_n = diag(h_n) that must be monotone,
    h_{n+1,i} >= h_{n,i} (assumption (A3)). Writing vbar_n = v_n / (1 - beta2^{n+1}), the
    thesis's two choices are (as we read them; the max keeps H monotone)::

        (2) Adam type:     h_n = (max_{k <= n} vbar_k)^(1/eta)
        (3) AMSGrad type:  h_n = (max_{k <= n} v_k)^(1/eta)        (no bias correction)

    and neither adds eps. The torch-style denominators implemented here are, per
    coordinate and without eps::

        amsgrad=False:  (vbar_t)^(1/eta)                           not monotone in t
        amsgrad=True:   (max_{s <= t} v_s / (1 - beta2^t))^(1/eta)  max of the RAW v, then
                                                                   today's bias correction

    Since 1 - beta2^s <= 1 - beta2^t for s <= t, each coordinate satisfies

        (3) <= torch AMSGrad <= (2),   and   torch Adam <= torch AMSGrad,

    so the torch-style AMSGrad takes larger steps than (2) and smaller than (3). Exactly:

    * torch AMSGrad = (3) times the factor (1 - beta2^t)^(-1/eta), the same for every
      coordinate. So ``AdamEta(amsgrad=True, eps=0)`` is Algorithm 3.1 with (3) run with
      the increasing step size alpha_t = lr (1 - beta2^t)^(1/eta) (a built-in warm-up;
      for beta2 = 0.999, eta = 2 the factor is 0.03 at t = 1, 0.80 at t = 1000 and within
      0.4% of 1 after 5000 steps). Multiplying lr by (1 - beta2^t)^(-1/eta), e.g. with
      ``LambdaLR(opt, lambda k: (1 - beta2 ** (k + 1)) ** (-1 / eta))`` stepped once per
      update, gives (3) exactly. The torch-style h_t itself is not monotone: while vmax
      stays put, 1 / (1 - beta2^t) shrinks, so (A3) fails literally and holds only after
      this rescaling.
    * torch AMSGrad = (2) at step t (for beta2 > 0 and v > 0) if and only if vbar_t is a
      running maximum, vbar_t = max_{s <= t} vbar_s; torch Adam also agrees there. Over a
      stretch where vbar is non-decreasing in every coordinate, Adam, torch AMSGrad and
      (2) coincide. When vbar drops, (2) keeps the old peak of the bias-corrected moment,
      torch AMSGrad keeps the peak of the raw moment divided by today's (larger) bias
      correction, and torch Adam forgets the peak.
    * beta2 = 0: no bias correction, v_t = |g_t|^eta, and torch AMSGrad, (2) and (3) all
      reduce to h_t = max_{s <= t} |g_s|.

    :class:`labkit.optim.AdamEtaThesis` implements (2) and (3) as written (``build`` names
    ``adam_thesis`` and ``amsgrad_thesis``).

    Args:
        params: tensors or param groups (dicts).
        lr: learning rate, finite and > 0 (default 1e-3).
        betas: (beta1, beta2), each in [0, 1): decay rates of the first and second moment.
        eta: power of |g| in the second moment, finite and > 0 (default 2 = Adam).
        eps: added to the root of the bias-corrected second moment (>= 0).
        amsgrad: keep the running max of the second moment (torch style, see above).
        weight_decay: coupled L2 coefficient (>= 0), as in torch's Adam (not AdamW).
        foreach: True / False / None (torch's rule: multi-tensor on CUDA).

    State (the keys of torch's Adam): ``"step"`` (int,
    this param's update count t), ``"exp_avg"`` (m), ``"exp_avg_sq"`` (v) and, with
    amsgrad, ``"max_exp_avg_sq"`` (vmax); tensors have the param's shape. Complex params
    are treated as pairs of reals.
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
        eps: float = 1e-8,
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
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        max_exp_avg_sqs: list[torch.Tensor] | None = [] if amsgrad else None
        for p in params:
            exp_avgs.append(real_view(self._zeros_state(p, "exp_avg")))
            exp_avg_sqs.append(real_view(self._zeros_state(p, "exp_avg_sq")))
            if max_exp_avg_sqs is not None:
                max_exp_avg_sqs.append(real_view(self._zeros_state(p, "max_exp_avg_sq")))
            state = self.state[p]
            # int() also accepts the 0-dim float tensor of a loaded torch Adam state.
            state["step"] = int(state.get("step", 0)) + 1
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        fn = _multi_tensor_adam_eta if foreach else _single_tensor_adam_eta
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
            weight_decay=group["weight_decay"],
        )
