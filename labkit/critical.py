"""Critical batch size: SFO complexity, Theorem 4.4 of Sato & Iiduka, and the C^2 it implies.

Book: chapter 8 (critical batch size and estimating C^2), following Sato & Iiduka (2024), "Role of
momentum in smoothing objective function and generalizability of deep neural networks",
arXiv:2402.02325 (seed 004, §4.2-4.3).

Training with batch size b for T steps costs T b stochastic gradients (the SFO complexity). If T
is the number of steps until the stopping test with threshold eps passes, the critical batch size
b* = argmin_b T b is the batch size that reaches eps with the fewest gradients. Theorem 4.4 bounds
it from below, with eta the learning rate, beta the momentum and C^2 the stochastic-gradient
variance:

    b*_SGD  > eta C^2 / eps^2,
    b*_SHB  > eta (beta^2 - beta + 1) C^2 / (beta (1 - beta)^2 eps^2),
    b*_NSHB > eta C^2 / ((1 - beta) eps^2).

Read backwards, a measured b* gives an upper bound on C^2 (§4.3), which the smoothing degrees of
``labkit.noise`` need. This module holds the formulas; measuring T b for a grid of batch sizes
is the training part.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "OPTIMIZERS",
    "PAPER_VALUES",
    "c2_upper_bound",
    "critical_batch_size",
    "critical_batch_size_lower_bound",
    "sfo_complexity",
    "sfo_table",
    "theorem_4_4_factor",
]

OPTIMIZERS = ("sgd", "shb", "nshb")

#: Published values for ResNet-18 on CIFAR-100 (labelled as the paper's values in the labs).
#:
#: From seed 004 §4.3 (Sato & Iiduka 2024, arXiv:2402.02325): learning rate eta = 0.1,
#: momentum beta = 0.9, stopping threshold eps = 0.5, batch sizes 2^3 ... 2^13, the measured
#: critical batch sizes and the C^2 upper bounds derived from them with Theorem 4.4 (the paper
#: prints 25.318 for SHB; the formula gives 25.3187, i.e. the paper truncates). From the authors'
#: published code: the gradient-norm bounds K used for delta_SHB / delta_NSHB, and the critical
#: batch sizes of its SHB plot for three thresholds eps. ``best_delta_range`` is §5.1's range of
#: smoothing degrees that generalized best (test accuracy against delta, Fig. 7).
PAPER_VALUES: dict[str, Any] = {
    "source": "Sato & Iiduka (2024), arXiv:2402.02325, ResNet-18 on CIFAR-100",
    "lr": 0.1,
    "beta": 0.9,
    "eps": 0.5,
    "batch_sizes": tuple(2**k for k in range(3, 14)),
    "critical_batch_size": {"sgd": 2**9, "shb": 2**10, "nshb": 2**9},
    "c2_upper_bound": {"sgd": 1280.0, "shb": 25.318, "nshb": 128.0},
    "k": {"shb": 1.77, "nshb": 4.5},
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
# Theorem 4.4 and its inverse (seed 004 §4.2-4.3)
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
    """Theorem 4.4 read backwards (seed 004 §4.3): C^2 < b* eps^2 / (c eta).

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
