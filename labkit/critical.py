"""Critical batch size and smoothing degree: the formulas of Sato & Iiduka (2024), torch-free.

Book: chapter 8 (critical batch size, estimating C^2, smoothing degree), following Sato & Iiduka
(2024), "Role of momentum in smoothing objective function and generalizability of deep neural
networks", arXiv:2402.02325 (§3-4).

Training with batch size b for T steps costs T b stochastic gradients (the SFO complexity). If T
is the number of steps until the stopping test with threshold eps passes, the critical batch size
b* = argmin_b T b is the batch size that reaches eps with the fewest gradients. Theorem 4.4
bounds it from below, with eta the learning rate, beta the momentum and C^2 the
stochastic-gradient variance:

    b*_SGD  > eta C^2 / eps^2,
    b*_SHB  > eta (beta^2 - beta + 1) C^2 / (beta (1 - beta)^2 eps^2),
    b*_NSHB > eta C^2 / ((1 - beta) eps^2).

Read backwards, a measured b* gives an upper bound on C^2 (§4.3), which the smoothing degrees of
eqs. (12)-(14) need (:func:`delta_sgd`, :func:`delta_shb`, :func:`delta_nshb`; with K^2 a bound
on E||grad f(x_t)||^2).

This module is the one home of these formulas: it imports neither torch nor the training code,
so ``labkit.grading`` checks students' answers with it. The measurement of T and b* from
training runs is :mod:`labkit.experiments.sfo`; :mod:`labkit.noise` re-exports the delta
formulas next to the C^2 and K^2 estimates.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "OPTIMIZERS",
    "PAPER_VALUES",
    "c2_upper_bound",
    "critical_batch_size",
    "critical_batch_size_lower_bound",
    "delta_nshb",
    "delta_sgd",
    "delta_shb",
    "momentum_factor",
    "sfo_complexity",
    "sfo_table",
    "smoothing_degree",
    "theorem_4_4_factor",
]

OPTIMIZERS = ("sgd", "shb", "nshb")

#: Published values for ResNet-18 on CIFAR-100 (labelled as the paper's values in the labs).
#:
#: From Sato & Iiduka (2024, arXiv:2402.02325) §4.3: learning rate eta = 0.1,
#: momentum beta = 0.9, stopping threshold eps = 0.5, batch sizes 2^3 ... 2^13, the measured
#: critical batch sizes and the C^2 upper bounds derived from them with Theorem 4.4 (the paper
#: prints 25.318 for SHB; the formula gives 25.3187, i.e. the paper truncates).
#: ``best_delta_range`` is §5.1's range of smoothing degrees that generalized best (test accuracy
#: against delta, Fig. 7).
#:
#: Not from the article but from the authors' published code (GitHub
#: ``naoki-sato3/sigma-nice-momentum``, ``main.py``; ``k_source`` says so, and the labs label
#: these as the authors' code): the gradient-norm bounds K = 1.77 (SHB) and 4.5 (NSHB) of
#: ResNet-18 that delta_SHB / delta_NSHB use (the article gives no value of K), and the critical
#: batch sizes of its SHB runs for three thresholds eps.
PAPER_VALUES: dict[str, Any] = {
    "source": "Sato & Iiduka (2024), arXiv:2402.02325, ResNet-18 on CIFAR-100",
    "lr": 0.1,
    "beta": 0.9,
    "eps": 0.5,
    "batch_sizes": tuple(2**k for k in range(3, 14)),
    "critical_batch_size": {"sgd": 2**9, "shb": 2**10, "nshb": 2**9},
    "c2_upper_bound": {"sgd": 1280.0, "shb": 25.318, "nshb": 128.0},
    "k": {"shb": 1.77, "nshb": 4.5},
    "k_source": "the authors' code (GitHub naoki-sato3/sigma-nice-momentum), not the article",
    "shb_critical_batch_size_by_eps": {0.5: 1024, 0.7: 512, 1.0: 256},
    "best_delta_range": (0.2, 1.0),
}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# SFO complexity and the measured critical batch size
# ---------------------------------------------------------------------------------------------


def sfo_complexity(steps: int, batch_size: int) -> int:
    """SFO complexity T b: stochastic gradients computed in ``steps`` steps of ``batch_size``."""
    return _check_int("steps", steps, 0) * _check_int("batch_size", batch_size, 1)


def _sfo_value(b: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SFO complexity for batch size {b} must be a number, got {value!r}")
    value = float(value)
    if value < 0:
        raise ValueError(f"SFO complexity for batch size {b} must be >= 0, got {value}")
    return value


def critical_batch_size(sfo: Mapping[int, float]) -> int:
    """The measured critical batch size b* = argmin_b SFO(b).

    Args:
        sfo: batch size -> SFO complexity T b. An entry that is inf or NaN marks a run that did
            not reach the threshold eps (or diverged) and is ignored.

    Returns:
        The batch size with the smallest finite SFO complexity; on a tie, the smallest such
        batch size (it reaches eps with as few gradients and fewer examples per step).

    Raises:
        ValueError: if ``sfo`` is empty or no entry is finite.
    """
    if not isinstance(sfo, Mapping):
        raise TypeError(f"sfo must be a mapping batch size -> SFO complexity, got {type(sfo)}")
    if not sfo:
        raise ValueError("sfo is empty; pass batch size -> SFO complexity for at least one run")
    finite: list[tuple[float, int]] = []
    for b, value in sfo.items():
        b = _check_int("batch size (a key of sfo)", b, 1)
        value = _sfo_value(b, value)
        if math.isfinite(value):
            finite.append((value, b))
    if not finite:
        raise ValueError(
            f"no batch size reached the threshold: every SFO value is inf or NaN "
            f"(batch sizes {sorted(sfo)}); train longer or loosen eps"
        )
    return min(finite)[1]


def sfo_table(
    steps: Mapping[int, int | float | None | Iterable[int | float | None]],
) -> dict[int, float]:
    """Turn steps-to-threshold per batch size into SFO complexities T b.

    Args:
        steps: batch size -> T (steps until the stopping test passed), or None / inf / NaN for a
            run that never passed it; or batch size -> a list of such values for repeated runs
            (seeds), whose SFO complexities are averaged. A batch size counts as having reached
            the threshold only if every one of its runs did; otherwise its entry is inf.

    Returns:
        batch size -> SFO complexity (float, inf where the threshold was not reached), sorted by
        batch size; ready for :func:`critical_batch_size`.
    """
    if not isinstance(steps, Mapping):
        raise TypeError(f"steps must be a mapping batch size -> steps, got {type(steps)}")
    table: dict[int, float] = {}
    for b in sorted(steps):
        value = steps[b]
        b = _check_int("batch size (a key of steps)", b, 1)
        runs = list(value) if isinstance(value, Iterable) else [value]
        if not runs:
            raise ValueError(f"steps for batch size {b} is an empty list")
        sfos = []
        for t in runs:
            if t is None or (isinstance(t, numbers.Real) and not math.isfinite(t)):
                sfos.append(math.inf)
                continue
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or t < 0 or t != int(t):
                raise ValueError(
                    f"steps for batch size {b} must be ints >= 0 (or None/inf for a run that "
                    f"did not reach the threshold), got {t!r}"
                )
            sfos.append(float(sfo_complexity(int(t), b)))
        table[b] = sum(sfos) / len(sfos)
    return table


# ---------------------------------------------------------------------------------------------
# Theorem 4.4 and its inverse (Sato & Iiduka (2024) §4.2-4.3)
# ---------------------------------------------------------------------------------------------


def _check_optimizer_beta(optimizer: Any, beta: Any) -> tuple[str, float]:
    """Validated (name, beta); beta is 0.0 for SGD, which has none."""
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    name = optimizer.lower()
    if beta is None:
        if name != "sgd":
            valid = "(0, 1)" if name == "shb" else "[0, 1)"
            raise ValueError(f"beta is required for optimizer={name!r}; pass a value in {valid}")
        return name, 0.0
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number in [0, 1), got {beta!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if name == "shb" and beta == 0:
        raise ValueError(
            "beta must be in (0, 1) for optimizer='shb': Theorem 4.4's SHB bound divides by "
            "beta, got beta=0"
        )
    return name, float(beta)


def theorem_4_4_factor(optimizer: str, beta: float | None = None) -> float:
    """The dimensionless factor c of Theorem 4.4, b* > c eta C^2 / eps^2.

    c = 1 for SGD, (beta^2 - beta + 1) / (beta (1 - beta)^2) for SHB (beta in (0, 1)) and
    1 / (1 - beta) for NSHB. ``beta`` is ignored for SGD.
    """
    name, beta = _check_optimizer_beta(optimizer, beta)
    if name == "sgd":
        return 1.0
    if name == "shb":
        return (beta**2 - beta + 1) / (beta * (1 - beta) ** 2)
    return 1.0 / (1.0 - beta)


def critical_batch_size_lower_bound(
    optimizer: str, *, c2: float, lr: float, eps: float, beta: float | None = None
) -> float:
    """Theorem 4.4: the critical batch size exceeds c eta C^2 / eps^2 (returns that bound).

    Args:
        optimizer: "sgd", "shb" or "nshb".
        c2: stochastic-gradient variance C^2 >= 0.
        lr: learning rate eta > 0.
        eps: stopping threshold eps > 0 (the test is on a gradient norm, in gradient units).
        beta: momentum in [0, 1) (in (0, 1) for SHB); required for shb and nshb, ignored for sgd.

    Returns:
        The real-valued lower bound on b* (in examples).
    """
    factor = theorem_4_4_factor(optimizer, beta)
    if isinstance(c2, bool) or not isinstance(c2, numbers.Real):
        raise TypeError(f"c2 must be a real number >= 0, got {c2!r}")
    if not (c2 >= 0 and math.isfinite(c2)):
        raise ValueError(f"c2 must be >= 0 and finite, got {c2!r}")
    lr = _check_positive("lr", lr)
    eps = _check_positive("eps", eps)
    return factor * lr * float(c2) / eps**2


def c2_upper_bound(
    optimizer: str,
    *,
    critical_batch_size: int,
    lr: float,
    eps: float,
    beta: float | None = None,
) -> float:
    """Theorem 4.4 read backwards (Sato & Iiduka (2024) §4.3): C^2 < b* eps^2 / (c eta).

    SGD: C^2 < b* eps^2 / eta; SHB: C^2 < b* beta (1 - beta)^2 eps^2 / (eta (beta^2 - beta + 1));
    NSHB: C^2 < b* (1 - beta) eps^2 / eta. With eta = 0.1, beta = 0.9, eps = 0.5 and the measured
    b* = 2^9, 2^10, 2^9 these are 1280, 25.3187 (printed 25.318) and 128.

    Args:
        optimizer: "sgd", "shb" or "nshb".
        critical_batch_size: measured b* (int >= 1), e.g. from :func:`critical_batch_size`.
        lr: learning rate eta > 0 used in the runs.
        eps: stopping threshold eps > 0 used in the runs.
        beta: momentum in [0, 1) (in (0, 1) for SHB); required for shb and nshb, ignored for sgd.

    Returns:
        The upper bound on C^2 (squared gradient units).
    """
    factor = theorem_4_4_factor(optimizer, beta)
    b = _check_int("critical_batch_size", critical_batch_size, 1)
    lr = _check_positive("lr", lr)
    eps = _check_positive("eps", eps)
    return b * eps**2 / (factor * lr)


# ---------------------------------------------------------------------------------------------
# Smoothing degrees, Sato & Iiduka (2024) eqs. (12)-(14)
# ---------------------------------------------------------------------------------------------
# The formulas take floats, numpy arrays or torch tensors (torch is imported only when a tensor
# is passed, so this module stays torch-free).


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    return torch.Tensor if torch is not None else None


def _is_tensor(value: Any) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(value, tensor)


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """``value`` as a float64 array for validation (tensors are copied to the CPU)."""
    if _is_tensor(value):
        import torch

        if value.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor")
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number or an array of them, got {value!r}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a real number or an array of them, got {type(value).__name__}"
        ) from err


def _check(name: str, value: Any, ok: Callable[[np.ndarray], np.ndarray], valid: str) -> None:
    arr = _to_numpy(name, value)
    good = ok(arr)  # NaN compares False, so NaN is always rejected
    if not np.all(good):
        bad = arr[~good].flat[0] if arr.ndim else arr.item()
        where = " (an element of the array)" if arr.ndim else ""
        raise ValueError(f"{name} must be {valid}, got {float(bad)!r}{where}")


def _check_lr(lr: Any) -> None:
    _check("lr", lr, lambda a: (a > 0) & np.isfinite(a), "> 0 and finite")


def _check_batch_size(batch_size: Any) -> None:
    _check("batch_size", batch_size, lambda a: (a >= 1) & np.isfinite(a), ">= 1 and finite")


def _check_beta(beta: Any) -> None:
    _check("beta", beta, lambda a: (a >= 0) & (a < 1), "in [0, 1)")


def _check_nonneg(name: str, value: Any) -> None:
    _check(name, value, lambda a: (a >= 0) & np.isfinite(a), ">= 0 and finite")


def _prepare(*values: Any) -> list[Any]:
    """Make the arguments broadcast together: tensors stay tensors, everything else is numpy."""
    tensors = [v for v in values if _is_tensor(v)]
    if tensors:
        import torch

        ref = tensors[0]
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    out: list[Any] = []
    for v in values:
        if _is_tensor(v):
            out.append(v if v.is_floating_point() else v.to(torch.get_default_dtype()))
        elif tensors:
            out.append(torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=dtype,
                                       device=ref.device))
        elif isinstance(v, numbers.Real):
            out.append(float(v))
        else:
            out.append(np.asarray(v, dtype=np.float64))
    return out


def _finish(result: Any) -> Any:
    if isinstance(result, (np.ndarray, np.floating)) and np.ndim(result) == 0:
        return float(result)
    return result


def momentum_factor(beta: Any) -> Any:
    """The factor a = beta (beta^2 - beta + 1) / (1 - beta)^2 of Sato & Iiduka (2024) eq. (13)
    (dimensionless).

    It is 0 at beta = 0, increases monotonically in beta and equals 81.9 at beta = 0.9.
    """
    _check_beta(beta)
    (beta,) = _prepare(beta)
    return _finish(beta * (beta**2 - beta + 1) / (1 - beta) ** 2)


def delta_sgd(lr: Any, batch_size: Any, c2: Any) -> Any:
    """Smoothing degree of SGD, Sato & Iiduka (2024) eq. (12): delta_SGD = eta sqrt(C^2 / b).

    Args:
        lr: learning rate eta > 0.
        batch_size: batch size b >= 1 (a float, or a numpy array / torch tensor to evaluate many
            batch sizes at once, e.g. for a plot of delta against b).
        c2: stochastic-gradient variance C^2 >= 0 (squared gradient units).

    Returns:
        delta in parameter units: a float when every argument is a scalar, otherwise an array
        (numpy, or a tensor when any argument is a tensor) broadcast over the arguments.
    """
    _check_lr(lr)
    _check_batch_size(batch_size)
    _check_nonneg("c2", c2)
    lr, b, c2 = _prepare(lr, batch_size, c2)
    return _finish(lr * (c2 / b) ** 0.5)


def delta_shb(lr: Any, batch_size: Any, beta: Any, c2: Any, k2: Any) -> Any:
    """Smoothing degree of stochastic heavy ball (SHB), Sato & Iiduka (2024) eq. (13).

    delta_SHB = eta sqrt((1 + a) C^2 / b + a K^2),  a = beta (beta^2 - beta + 1) / (1 - beta)^2.

    The K^2 term does not shrink with b: delta_SHB >= eta sqrt(a) K for every batch size, which is
    the paper's explanation of why SHB keeps generalizing at large b (§5.1). At beta = 0 it
    reduces to :func:`delta_sgd`.

    Args:
        lr: learning rate eta > 0.
        batch_size: batch size b >= 1 (scalar, numpy array or tensor).
        beta: momentum coefficient in [0, 1).
        c2: stochastic-gradient variance C^2 >= 0.
        k2: bound K^2 >= 0 on E||grad f(x_t)||^2 (assumption (A4)); the authors' code uses
            K = 1.77 for ResNet-18 (:data:`PAPER_VALUES`).

    Returns:
        delta (float, or array / tensor broadcast over the arguments).
    """
    _check_lr(lr)
    _check_batch_size(batch_size)
    _check_beta(beta)
    _check_nonneg("c2", c2)
    _check_nonneg("k2", k2)
    lr, b, beta, c2, k2 = _prepare(lr, batch_size, beta, c2, k2)
    a = beta * (beta**2 - beta + 1) / (1 - beta) ** 2
    return _finish(lr * ((1 + a) * c2 / b + a * k2) ** 0.5)


def delta_nshb(lr: Any, batch_size: Any, beta: Any, c2: Any) -> Any:
    """Smoothing degree of normalized stochastic heavy ball (NSHB), Sato & Iiduka (2024) eq. (14).

    delta_NSHB = eta sqrt(C^2 / ((1 - beta) b)) = delta_SGD / sqrt(1 - beta) at equal C^2.

    Args:
        lr: learning rate eta > 0.
        batch_size: batch size b >= 1 (scalar, numpy array or tensor).
        beta: momentum coefficient in [0, 1).
        c2: stochastic-gradient variance C^2 >= 0.

    Returns:
        delta (float, or array / tensor broadcast over the arguments).
    """
    _check_lr(lr)
    _check_batch_size(batch_size)
    _check_beta(beta)
    _check_nonneg("c2", c2)
    lr, b, beta, c2 = _prepare(lr, batch_size, beta, c2)
    return _finish(lr * (c2 / ((1 - beta) * b)) ** 0.5)


def smoothing_degree(
    optimizer: str,
    *,
    lr: Any,
    batch_size: Any,
    c2: Any,
    beta: Any = None,
    k2: Any = None,
) -> Any:
    """Dispatch to :func:`delta_sgd`, :func:`delta_shb` or :func:`delta_nshb` by name.

    ``optimizer`` is "sgd", "shb" or "nshb". ``beta`` is required for shb and nshb, ``k2`` for
    shb; arguments an optimizer does not use are ignored (so one call can loop over the three).
    """
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    name = optimizer.lower()
    if name == "sgd":
        return delta_sgd(lr, batch_size, c2)
    if beta is None:
        raise ValueError(f"beta is required for optimizer={name!r}; pass a value in [0, 1)")
    if name == "nshb":
        return delta_nshb(lr, batch_size, beta, c2)
    if k2 is None:
        raise ValueError("k2 (the bound K^2 on E||grad f||^2) is required for optimizer='shb'")
    return delta_shb(lr, batch_size, beta, c2, k2)
