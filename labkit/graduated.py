"""Graduated optimization: explicit (on toy functions) and implicit (schedules for SGD).

Book: chapter 7 (graduated optimization), Hazan's algorithm and Algorithm 3 of
Sato & Iiduka (arXiv 2311.08745); chapter 6 for the smoothing degree delta = eta C / sqrt(b).

Explicit graduated optimization (Blake & Zisserman 1987; Hazan, Levy & Shalev-Shwartz,
ICML 2016, arXiv 1503.03712) minimizes a sequence of smoothed functions f_hat_delta_m
(see :mod:`labkit.smoothing`) with decreasing delta_m, each stage warm-started at the
previous stage's result; Hazan et al. halve delta after every stage.

Implicit graduated optimization (arXiv 2311.08745) notes that SGD with learning rate eta,
batch size b and stochastic-gradient variance C^2 behaves, in expectation, like gradient
descent on f smoothed with degree ``delta = eta C / sqrt(b)``. Shrinking delta, by decaying
eta or growing b, is then graduated optimization. Algorithm 3 multiplies delta after stage
m by ``gamma_m = ((M - m) / (M - m + 1)) ** p`` through ``eta_{m+1} = kappa_m eta_m`` and
``b_{m+1} = lambda_m b_m`` with ``kappa_m / sqrt(lambda_m) = gamma_m``.

Indexing. Sato & Iiduka's Algorithm 3 runs stages m = 1 .. M + 1 with gamma_m as above
for m <= M; its last factor gamma_M = 0 makes the final delta 0, i.e. eta = 0 in the
learning-rate form, which would stop training. We index stages from 0 and keep the M + 1
stages m = 0 .. M whose deltas are positive: stage m uses ``delta_m / delta_0 = prod_{k<m} gamma_k
= ((M + 1 - m) / (M + 1)) ** p`` with factors gamma_k, 0 <= k < M, all in (0, 1) as the
definition of new sigma-nice functions requires. This is their schedule with M + 1
in place of M, minus its delta = 0 stage, and it is what ``{"kind": "poly", "stages": M}``
in :mod:`labkit.schedules` computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from labkit import schedules
from labkit.smoothing import smooth_grad

__all__ = [
    "EpochSchedule",
    "Stage",
    "Trajectory",
    "default_deltas",
    "gamma",
    "gradient_descent",
    "graduated_optimization",
    "implicit_schedule",
    "implicit_specs",
    "poly_schedule",
    "sgd_noisy",
    "smoothing_degree",
    "step_schedule",
]

Function = Callable[[Tensor], Tensor]
MODES = ("lr", "batch", "hybrid")


# ------------------------------------------------------------------ explicit, toy functions


@dataclass
class Trajectory:
    """Iterates of an optimizer on a toy function.

    points: (T, ..., d) iterates, points[0] = x0 (x0 may hold several starts, (n, d)).
    values: (T, ...) f at each iterate (the original, unsmoothed f).
    stages: (T,) int64 stage index of each iterate (0 for x0 and single-stage methods).
    deltas: smoothing degree of each stage (for GD (0.0,); for noisy SGD its implied
        delta, see :func:`sgd_noisy`).
    """

    points: Tensor
    values: Tensor
    stages: Tensor
    deltas: tuple[float, ...] = field(default_factory=tuple)

    @property
    def final(self) -> Tensor:
        """The last iterate, shape (..., d)."""
        return self.points[-1]

    def numpy(self) -> dict:
        """The fields as numpy arrays (for plotting)."""
        return {
            "points": self.points.cpu().numpy(),
            "values": self.values.cpu().numpy(),
            "stages": self.stages.cpu().numpy(),
            "deltas": np.asarray(self.deltas, dtype=float),
        }


def _check_x0(x0: Tensor) -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (d,) or (n, d), got {type(x0)}")
    if x0.dim() < 1 or not x0.is_floating_point():
        raise ValueError(
            f"x0 must be a floating tensor of shape (d,) or (n, d), got shape "
            f"{tuple(x0.shape)} and dtype {x0.dtype}"
        )


def _check_positive(name: str, v, integer: bool = False, allow_zero: bool = False) -> None:
    ok_type = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok_type or not math.isfinite(v):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def _grad(f: Function, x: Tensor) -> Tensor:
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(y).sum(), y)
    return g


def _finish(f: Function, points: list[Tensor], stages: list[int], deltas) -> Trajectory:
    pts = torch.stack(points)
    with torch.no_grad():
        vals = f(pts)
    return Trajectory(
        pts, vals, torch.tensor(stages, dtype=torch.int64), tuple(float(d) for d in deltas)
    )


def gradient_descent(f: Function, x0: Tensor, lr: float, steps: int) -> Trajectory:
    """Plain gradient descent ``x <- x - lr grad f(x)`` for ``steps`` steps.

    ``f`` maps (..., d) to (...); ``x0`` is (d,) or (n, d) for n independent starts.
    Returns steps + 1 points.
    """
    _check_x0(x0)
    _check_positive("lr", lr)
    _check_positive("steps", steps, integer=True, allow_zero=True)
    x = x0.detach().clone()
    points = [x]
    for _ in range(steps):
        x = x - lr * _grad(f, x)
        points.append(x)
    return _finish(f, points, [0] * (steps + 1), (0.0,))


def sgd_noisy(
    f: Function,
    x0: Tensor,
    lr: float,
    steps: int,
    noise_std: float,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Gradient descent with additive Gaussian gradient noise, the "SGD" of the toy plots.

    ``x <- x - lr (grad f(x) + noise_std xi)``, xi ~ N(0, I_d) fresh at each step (and for
    each start). In the notation of arXiv 2311.08745 the search-direction noise has
    ``C^2 / b = E||noise_std xi||^2 = d noise_std^2``, so Kleinberg et al.'s view (ICML 2018)
    reads this as gradient descent on f smoothed with degree
    ``delta = lr sqrt(C^2 / b) = lr noise_std sqrt(d)``, reported in ``deltas``.
    """
    _check_x0(x0)
    _check_positive("lr", lr)
    _check_positive("steps", steps, integer=True, allow_zero=True)
    _check_positive("noise_std", noise_std, allow_zero=True)
    x = x0.detach().clone()
    gen_device = generator.device if generator is not None else x.device
    points = [x]
    for _ in range(steps):
        xi = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
        x = x - lr * (_grad(f, x) + noise_std * xi.to(x.device))
        points.append(x)
    d = x0.shape[-1]
    return _finish(f, points, [0] * (steps + 1), (lr * noise_std * math.sqrt(d),))


def default_deltas(
    delta0: float, M: int, factor: float = 0.5, final_zero: bool = False
) -> tuple[float, ...]:
    """Geometric smoothing schedule ``delta0 * factor ** m`` for m = 0 .. M - 1.

    ``factor = 0.5`` is Hazan et al.'s halving. ``final_zero=True`` appends a last stage
    with delta = 0 (plain gradient descent on f) to polish the result.
    """
    _check_positive("delta0", delta0)
    _check_positive("M", M, integer=True)
    _check_positive("factor", factor)
    if factor >= 1:
        raise ValueError(f"factor must be in (0, 1) so that delta decreases, got {factor!r}")
    out = tuple(delta0 * factor**m for m in range(M))
    return out + (0.0,) if final_zero else out


def _per_stage(name: str, v, n: int, integer: bool, allow_zero: bool) -> list:
    if isinstance(v, np.ndarray | Tensor):
        v = v.tolist()
    vals = list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v] * n
    if len(vals) != n:
        raise ValueError(f"{name} must be one value or one per stage ({n}), got {len(vals)}")
    for x in vals:
        _check_positive(name, x, integer=integer, allow_zero=allow_zero)
    return vals


def graduated_optimization(
    f: Function,
    x0: Tensor,
    deltas: Sequence[float],
    steps_per_stage: int | Sequence[int],
    lr: float | Sequence[float],
    n_samples: int,
    dist: str = "ball",
    generator: torch.Generator | None = None,
    method: str = "autograd",
) -> Trajectory:
    """Explicit graduated optimization (Hazan, Levy & Shalev-Shwartz 2016, Algorithm 1 style).

    For each stage m, run ``steps_per_stage[m]`` steps of
    ``x <- x - lr[m] g`` where g is the :func:`labkit.smoothing.smooth_grad` estimate of
    grad f_hat_{deltas[m]}(x) from ``n_samples`` fresh noise draws (``dist`` "ball" as in
    Hazan et al., or "gaussian"; ``method`` "autograd" or "zeroth"). A stage with delta = 0
    uses the exact gradient. Stage m + 1 starts where stage m stopped.

    ``x0``: (d,) or (n, d) for n starts (they share the noise draws of each step).
    ``steps_per_stage`` and ``lr`` are one value or one per stage. Returns a
    :class:`Trajectory` whose ``stages`` give each point's stage.

    Which smoothing matters. Gaussian smoothing damps every ripple of Rastrigin by
    exp(-2 pi^2 delta^2 / d), monotonically in delta. The ball's damping factor oscillates
    in sign (sin(t)/t in 1-D, 2 J1(t)/t in 2-D, t = 2 pi delta): in 1-D the halving
    schedule 4, 2, 1, 0.5 hits its zeros exactly, but in 2-D at delta = 1 the origin is a
    local *maximum* of the ball-smoothed function, so with the halving schedule the ball
    version often ends in a local minimum where the Gaussian one does not.
    """
    _check_x0(x0)
    deltas = list(deltas)
    if not deltas:
        raise ValueError("deltas must list at least one stage")
    for dl in deltas:
        _check_positive("deltas[m]", dl, allow_zero=True)
    steps = _per_stage("steps_per_stage", steps_per_stage, len(deltas), True, True)
    lrs = _per_stage("lr", lr, len(deltas), False, False)
    x = x0.detach().clone()
    points, stages = [x], [0]
    for m, (dl, n_steps, eta) in enumerate(zip(deltas, steps, lrs, strict=True)):
        for _ in range(n_steps):
            if dl == 0:
                g = _grad(f, x)
            else:
                g = smooth_grad(f, x, dl, n_samples, dist, generator, method)
            x = x - eta * g
            points.append(x)
            stages.append(m)
    return _finish(f, points, stages, deltas)


# ------------------------------------------------------------- implicit, SGD schedules


def gamma(m: int, M: int, p: float) -> float:
    """Decay factor ``gamma_m = ((M - m) / (M - m + 1)) ** p`` of Algorithm 3.

    Valid for integers 0 <= m < M and p > 0, where gamma_m lies in (0, 1) (Sato &
    Iiduka's theory takes p in (0, 1]; larger p is allowed, it just decays faster). m = M would
    give 0 (delta = 0), which the module docstring explains we leave out.
    """
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be an integer >= 1, got {M!r}")
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < M:
        raise ValueError(f"m must be an integer with 0 <= m < M = {M}, got {m!r}")
    _check_positive("p", p)
    return ((M - m) / (M - m + 1)) ** p


def smoothing_degree(lr, batch_size, c2):
    """Smoothing degree of SGD, ``delta = lr * sqrt(c2 / batch_size)`` (arXiv 2311.08745).

    ``lr`` >= 0, ``batch_size`` > 0, ``c2`` >= 0 (the variance of one stochastic gradient,
    C^2). Numbers give a float; numpy arrays broadcast and give an array.
    """
    arrays = [np.asarray(v, dtype=float) for v in (lr, batch_size, c2)]
    for name, a, strict in zip(("lr", "batch_size", "c2"), arrays, (False, True, False),
                               strict=True):
        if not np.all(np.isfinite(a)) or (np.any(a <= 0) if strict else np.any(a < 0)):
            raise ValueError(f"{name} must be finite and {'> 0' if strict else '>= 0'}, got {a}")
    out = arrays[0] * np.sqrt(arrays[2] / arrays[1])
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Stage:
    """One stage of implicit graduated optimization.

    m: stage index (0-based). lr, batch_size: the stage's learning rate and (rounded)
    batch size. target_ratio: delta_m / delta_0 prescribed by Algorithm 3,
    prod_{k<m} gamma_k. delta_ratio: the realized (lr / lr0) * sqrt(b0 / batch_size),
    equal to target_ratio up to the rounding (or capping) of the batch size.
    """

    m: int
    lr: float
    batch_size: int
    delta_ratio: float
    target_ratio: float


def _check_mode(mode: str, split: float) -> tuple[float, float]:
    """Return the powers of (lr, batch) factors: kappa = g ** a, lambda = g ** (-2 b)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(split, bool) or not isinstance(split, int | float) or not 0 <= split <= 1:
        raise ValueError(f"split must be a number in [0, 1], got {split!r}")
    return {"lr": (1.0, 0.0), "batch": (0.0, 1.0), "hybrid": (split, 1.0 - split)}[mode]


def implicit_schedule(
    lr0: float,
    batch0: int,
    M: int,
    p: float,
    mode: str = "lr",
    split: float = 0.5,
    max_batch: int | None = None,
) -> list[Stage]:
    """Stages m = 0 .. M of Algorithm 3 (arXiv 2311.08745) with gamma_k from :func:`gamma`.

    The smoothing degree must shrink by gamma_k from stage k to k + 1, i.e.
    ``kappa_k / sqrt(lambda_k) = gamma_k`` with ``lr_{k+1} = kappa_k lr_k`` and
    ``b_{k+1} = lambda_k b_k``:

    - ``mode="lr"``: kappa = gamma, lambda = 1 (polynomial learning-rate decay);
    - ``mode="batch"``: kappa = 1, lambda = 1 / gamma^2 (polynomial batch growth);
    - ``mode="hybrid"``: kappa = gamma^split, lambda = gamma^(-2 (1 - split)), so the
      learning rate carries the fraction ``split`` of log(delta) decrease and the batch
      the rest (split = 0.5: kappa = sqrt(gamma), lambda = 1 / gamma).

    The products telescope, so stage m has lr0 * g_m^split and b0 / g_m^(2 (1 - split))
    with g_m = ((M + 1 - m) / (M + 1))^p (computed with :func:`labkit.schedules.poly_factor`,
    the same code path as the "poly" schedule specs). Batch sizes are rounded half-up and
    capped at ``max_batch``; ``delta_ratio`` reports what that does to delta.
    """
    _check_positive("lr0", lr0)
    _check_positive("batch0", batch0, integer=True)
    _check_positive("M", M, integer=True)
    _check_positive("p", p)
    a, b = _check_mode(mode, split)
    if max_batch is not None:
        _check_positive("max_batch", max_batch, integer=True)
    out = []
    for m in range(M + 1):
        lr = lr0 * schedules.poly_factor(m, M, a * p)
        bs = schedules.round_batch_size(batch0 / schedules.poly_factor(m, M, b * p) ** 2,
                                        max_batch)
        out.append(Stage(
            m=m,
            lr=lr,
            batch_size=bs,
            delta_ratio=(lr / lr0) * math.sqrt(batch0 / bs),
            target_ratio=schedules.poly_factor(m, M, p),
        ))
    return out


def implicit_specs(
    M: int,
    p: float,
    mode: str = "lr",
    split: float = 0.5,
    every: int | None = None,
    max_batch: int | None = None,
) -> tuple[dict, dict]:
    """(lr_schedule, batch_schedule) spec dicts for :mod:`labkit.schedules` equivalent to
    :func:`implicit_schedule`: "poly" specs with ``stages = M`` and powers split * p
    (learning rate) and (1 - split) * p (batch), or "constant" where a power is 0.
    ``every`` fixes the stage length in epochs; otherwise the run is cut into M + 1 equal
    phases."""
    _check_positive("M", M, integer=True)
    _check_positive("p", p)
    a, b = _check_mode(mode, split)
    lr_spec: dict = {"kind": "constant"}
    batch_spec: dict = {"kind": "constant"}
    if a > 0:
        lr_spec = {"kind": "poly", "power": a * p, "stages": M, "every": every}
    if b > 0:
        batch_spec = {"kind": "poly", "power": b * p, "stages": M, "every": every,
                      "max": max_batch}
    return schedules.validate_lr_schedule(lr_spec), schedules.validate_batch_schedule(batch_spec)


@dataclass(frozen=True)
class EpochSchedule:
    """A per-epoch (lr, b) plan and its smoothing degree.

    lrs, batch_sizes, delta_ratios: one entry per epoch (delta_ratios[e] =
    delta_e / delta_0 = (lr_e / lr0) * sqrt(b0 / b_e)). lr_schedule, batch_schedule: the
    spec dicts that reproduce the plan through :func:`labkit.schedules.lr_at` and
    :func:`labkit.schedules.batch_size_at` (store them in a run's config).
    """

    lrs: list[float]
    batch_sizes: list[int]
    delta_ratios: list[float]
    lr_schedule: dict
    batch_schedule: dict


def _epoch_schedule(lr0: float, batch0: int, epochs: int, lr_spec: dict,
                    batch_spec: dict) -> EpochSchedule:
    lrs = schedules.lr_values(lr_spec, lr0, epochs)
    bss = schedules.batch_sizes(batch_spec, batch0, epochs)
    ratios = [(lr / lr0) * math.sqrt(batch0 / bs) for lr, bs in zip(lrs, bss, strict=True)]
    return EpochSchedule(lrs, bss, ratios, lr_spec, batch_spec)


STEP_FACTORS = {
    "lr": (2.0**-0.5, 1.0),
    "batch": (1.0, 2.0),
    "hybrid": (math.sqrt(3.0) / 2.0, 1.5),
}


def step_schedule(
    lr0: float, batch0: int, mode: str, epochs: int = 200, every: int = 40,
    batch_delay: int = 1,
) -> EpochSchedule:
    """The step schedules of the experiments of arXiv 2311.08745 (ResNet-18, CIFAR-100).

    Every ``every`` epochs: ``mode="lr"``: lr x 1/sqrt(2); ``"batch"``: b x 2;
    ``"hybrid"``: lr x sqrt(3)/2 and b x 1.5. Each shrinks delta = lr C / sqrt(b) by exactly
    1/sqrt(2) per stage (for the hybrid, (sqrt(3)/2) / sqrt(1.5) = 1/sqrt(2)) as long as the
    batch sizes stay integers (b0 = 32 as in Sato & Iiduka's runs: 32, 48, 72, 108, 162).

    Timing, as in the authors' code (naoki-sato3/new-sigma-nice ``cifar.py``, lines 115-133):
    the learning rate decays at the 0-based epochs every, 2 every, ... (``StepLR`` stepped
    after each epoch), but the batch grows ``batch_delay`` = 1 epoch later, at epochs
    every + 1, 2 every + 1, ..., because the loop replaces the data loader after training
    epoch e when ``e % every == 0 and e != 0``. So in the first epoch of each stage the batch
    schedule's delta has not changed yet, and the hybrid's has changed by sqrt(3)/2 only; the
    article describes the stages without this lag. ``batch_delay=0`` grows the batch together
    with the learning-rate decay. (The code also truncates each new batch size,
    ``int(b * factor)``, where labkit rounds ``b0 * factor^k``; the two agree whenever the
    products are integers, as for b0 = 32.)
    """
    if mode not in STEP_FACTORS:
        raise ValueError(f"mode must be one of {tuple(STEP_FACTORS)}, got {mode!r}")
    _check_positive("lr0", lr0)
    _check_positive("batch0", batch0, integer=True)
    _check_positive("epochs", epochs, integer=True)
    _check_positive("every", every, integer=True)
    if isinstance(batch_delay, bool) or not isinstance(batch_delay, int) or batch_delay < 0:
        raise ValueError(f"batch_delay must be an integer >= 0 (epochs), got {batch_delay!r}")
    kappa, lam = STEP_FACTORS[mode]
    lr_spec = {"kind": "constant"} if kappa == 1 else {"kind": "step", "every": every,
                                                        "factor": kappa}
    batch_spec = {"kind": "constant"} if lam == 1 else {"kind": "step", "every": every,
                                                         "factor": lam, "delay": batch_delay}
    return _epoch_schedule(lr0, batch0, epochs, schedules.validate_lr_schedule(lr_spec),
                           schedules.validate_batch_schedule(batch_spec))


def poly_schedule(
    lr0: float,
    batch0: int,
    M: int,
    p: float,
    mode: str = "lr",
    epochs: int = 200,
    split: float = 0.5,
    every: int | None = None,
    max_batch: int | None = None,
) -> EpochSchedule:
    """Per-epoch version of :func:`implicit_schedule` (the "optimal" polynomial decay of
    arXiv 2311.08745, p = 0.9 in the authors' runs) with its spec dicts.

    Stage m = 0 .. M covers epochs as described in :mod:`labkit.schedules` (``every``
    epochs each if given, else M + 1 equal phases). ``M = epochs - 1`` gives the
    per-epoch polynomial decay lr0 * (1 - e / epochs)^p in ``mode="lr"``.
    """
    _check_positive("lr0", lr0)
    _check_positive("batch0", batch0, integer=True)
    _check_positive("epochs", epochs, integer=True)
    lr_spec, batch_spec = implicit_specs(M, p, mode, split, every, max_batch)
    return _epoch_schedule(lr0, batch0, epochs, lr_spec, batch_spec)
