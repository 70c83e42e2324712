"""Smoothing a function with noise: test functions, exact and Monte-Carlo smoothing.

Book: chapter 6 (smoothing): the smoothed function f_hat_delta(x) = E_u[f(x - delta u)]
(Def. 2.1 of arXiv 2402.02325), its Rastrigin figure (Fig. 3 there) and Lemma 2.1;
chapter 7 uses the same estimators for graduated optimization.

Definition (Sato & Iiduka, arXiv 2402.02325, Def. 2.1): the smoothing of f with degree
delta >= 0 is ``f_hat_delta(x) = E_u[f(x - delta u)]``. Two noise distributions:

- ``"gaussian"``: ``u ~ N(0, (1/d) I_d)``, i.e. each coordinate of ``u`` has standard
  deviation ``1/sqrt(d)``, so ``E||u||^2 = 1`` and in 1-D ``u ~ N(0, 1)``. The paper writes
  the covariance as ``(1/sqrt(d)) I_d``; we read it as variance ``1/d`` per coordinate,
  which is the reading under which its Lemma 2.1 proof step ``E||u|| <= 1`` holds for
  every d (by Jensen, ``E||u|| <= sqrt(E||u||^2) = 1``). Both readings agree in 1-D.
- ``"ball"``: ``u`` uniform on the closed unit ball ``B(0; 1)``, the smoothing of
  Hazan, Levy & Shalev-Shwartz (ICML 2016, arXiv 1503.03712) used in the sigma-nice theory
  and in Sato & Iiduka (arXiv 2311.08745).

For either distribution ``||u|| <= 1`` in mean, so for an L-Lipschitz f,
``|f_hat_delta(x) - f(x)| <= E|f(x - delta u) - f(x)| <= L delta E||u|| <= L delta``
(Lemma 2.1 of arXiv 2402.02325).

All functions take points as a ``(..., d)`` tensor and return ``(...)``; they work on
CPU and CUDA, in float32 and float64, and are differentiable with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DISTRIBUTIONS",
    "ackley",
    "plot_rastrigin_smoothing",
    "quadratic",
    "rastrigin",
    "rastrigin_convexity_threshold",
    "rastrigin_figure_data",
    "sample_noise",
    "smooth",
    "smooth_grad",
    "smoothed_quadratic",
    "smoothed_rastrigin",
    "smoothed_styblinski_tang",
    "styblinski_tang",
    "STYBLINSKI_TANG_ARGMIN",
]

DISTRIBUTIONS = ("gaussian", "ball")
# Coordinate of the global minimizer of the 1-D Styblinski-Tang function, the root of
# 4x^3 - 32x + 5 = 0 near -2.9.
STYBLINSKI_TANG_ARGMIN = -2.903534027771178

Function = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- test functions


def _check_points(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., d), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., d) with d >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def rastrigin(x: Tensor, A: float = 10.0) -> Tensor:
    """Rastrigin function ``A d + sum_i (x_i^2 - A cos(2 pi x_i))`` of ``x`` with shape (..., d).

    In 1-D: ``x^2 - 10 cos(2 pi x) + 10`` (arXiv 2402.02325, eq. (3)). Global minimum 0 at
    x = 0; local minima near every integer point. Returns shape (...).
    """
    _check_points(x)
    d = x.shape[-1]
    return A * d + (x.square() - A * torch.cos(2 * math.pi * x)).sum(-1)


def ackley(x: Tensor, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Tensor:
    """Ackley function of ``x`` with shape (..., d); global minimum 0 at x = 0.

    ``-a exp(-b sqrt(mean_i x_i^2)) - exp(mean_i cos(c x_i)) + a + e``. The norm is taken
    with ``torch.linalg.vector_norm`` whose autograd gradient at 0 is 0 (a subgradient), so
    gradients are finite everywhere.
    """
    _check_points(x)
    d = x.shape[-1]
    r = torch.linalg.vector_norm(x, dim=-1) / math.sqrt(d)
    return -a * torch.exp(-b * r) - torch.exp(torch.cos(c * x).mean(-1)) + a + math.e


def styblinski_tang(x: Tensor) -> Tensor:
    """Styblinski-Tang function ``0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)``, shape (..., d) -> (...).

    Each coordinate is an asymmetric double well with minima near -2.90 (global) and
    2.75 (local). Global minimizer ``x_i = STYBLINSKI_TANG_ARGMIN`` (about -2.9035) for all i,
    minimum about ``-39.166 d``.
    """
    _check_points(x)
    return 0.5 * (x.pow(4) - 16 * x.square() + 5 * x).sum(-1)


def quadratic(x: Tensor, scales: Sequence[float] | Tensor) -> Tensor:
    """Ill-conditioned quadratic ``0.5 sum_i scales_i x_i^2``; minimum 0 at x = 0.

    ``scales`` (length d, all > 0) are the Hessian eigenvalues; their ratio is the
    condition number.
    """
    _check_points(x)
    s = torch.as_tensor(scales, dtype=x.dtype, device=x.device)
    if s.shape != (x.shape[-1],):
        raise ValueError(f"scales must have length d = {x.shape[-1]}, got shape {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise ValueError(f"scales must all be > 0, got {s.tolist()}")
    return 0.5 * (s * x.square()).sum(-1)


# ------------------------------------------------------------------- exact smoothing


def _check_delta(delta: float | Tensor) -> None:
    if isinstance(delta, Tensor):
        if bool((delta < 0).any()) or not bool(torch.isfinite(delta).all()):
            raise ValueError(f"delta must be finite and >= 0, got {delta}")
    elif isinstance(delta, bool) or not isinstance(delta, int | float) or not (
        math.isfinite(delta) and delta >= 0
    ):
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")


def _check_dist(dist: str) -> None:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")


def _coord_noise(delta: float | Tensor, x: Tensor, dist: str) -> tuple[Tensor, Tensor]:
    """Return (E[(delta u_i)^2], E[cos(2 pi delta u_i)]) for one coordinate, shape (..., 1).

    Gaussian, u_i ~ N(0, 1/d): second moment s^2 = delta^2 / d and, from
    E[cos(t z)] = exp(-t^2 / 2) for z ~ N(0, 1), cosine factor exp(-2 pi^2 s^2).
    Ball in d = 1, 2, 3: E[u_i^2] = 1 / (d + 2), and E[cos(t u_i)] is the characteristic
    function of one coordinate of the uniform ball: sin(t)/t (d = 1), 2 J1(t)/t (d = 2),
    3 (sin t - t cos t)/t^3 (d = 3), with t = 2 pi delta.
    """
    d = x.shape[-1]
    delta = torch.as_tensor(delta, dtype=x.dtype, device=x.device).unsqueeze(-1)
    if dist == "gaussian":
        s2 = delta.square() / d
        return s2, torch.exp(-2 * math.pi**2 * s2)
    if d > 3:
        raise ValueError(
            f"the exact ball smoothing is implemented for d in (1, 2, 3), got d = {d}; "
            "use dist='gaussian' or the Monte-Carlo smooth()"
        )
    s2 = delta.square() / (d + 2)
    t = 2 * math.pi * delta
    small = t.abs() < 1e-3
    ts = torch.where(small, torch.ones_like(t), t)  # avoid 0/0; series used below
    if d == 1:
        phi = torch.sin(ts) / ts
        series = 1 - t.square() / 6
    elif d == 2:
        phi = 2 * torch.special.bessel_j1(ts) / ts
        series = 1 - t.square() / 8
    else:
        phi = 3 * (torch.sin(ts) - ts * torch.cos(ts)) / ts.pow(3)
        series = 1 - t.square() / 10
    return s2, torch.where(small, series, phi)


def smoothed_rastrigin(
    x: Tensor, delta: float | Tensor, A: float = 10.0, dist: str = "gaussian"
) -> Tensor:
    """Exact smoothing ``E_u[rastrigin(x - delta u)]`` of the Rastrigin function.

    ``x``: (..., d); ``delta``: a number >= 0 or a tensor broadcastable to x.shape[:-1].
    Returns (...). ``dist="gaussian"`` (any d) uses u ~ N(0, (1/d) I_d) as in Def. 2.1 of
    arXiv 2402.02325; ``dist="ball"`` (d <= 3) uses u uniform on the unit ball.

    Derivation (Gaussian). Each coordinate of delta u is s z with z ~ N(0, 1) and
    s^2 = delta^2 / d. Then ``E[(x_i - s z)^2] = x_i^2 + s^2`` and, writing
    cos(a - b z) = Re exp(i a) exp(-i b z) with E[exp(-i b z)] = exp(-b^2/2) and
    b = 2 pi s, ``E[cos(2 pi (x_i - s z))] = cos(2 pi x_i) exp(-2 pi^2 s^2)``. Hence::

        f_hat(x) = A d + sum_i (x_i^2 + s^2 - A cos(2 pi x_i) exp(-2 pi^2 s^2)).

    The smoothing keeps the quadratic bowl, adds the constant d s^2 = delta^2, and damps
    the ripples by exp(-2 pi^2 delta^2 / d). In 1-D the second derivative is
    ``2 + 4 pi^2 A cos(2 pi x) exp(-2 pi^2 delta^2)``, so f_hat is convex iff
    ``4 pi^2 A exp(-2 pi^2 delta^2) <= 2``; see :func:`rastrigin_convexity_threshold`.
    For the ball the same holds with E[u_i^2] = 1/(d+2) and the ball's cosine factor
    (sin(2 pi delta)/(2 pi delta) in 1-D).
    """
    _check_points(x)
    _check_delta(delta)
    _check_dist(dist)
    s2, damp = _coord_noise(delta, x, dist)
    d = x.shape[-1]
    return A * d + (x.square() + s2 - A * torch.cos(2 * math.pi * x) * damp).sum(-1)


def smoothed_styblinski_tang(x: Tensor, delta: float | Tensor) -> Tensor:
    """Exact Gaussian smoothing of :func:`styblinski_tang` (u ~ N(0, (1/d) I_d)).

    With s^2 = delta^2 / d the Gaussian moments E[(x - s z)^2] = x^2 + s^2 and
    E[(x - s z)^4] = x^4 + 6 s^2 x^2 + 3 s^4 give, per coordinate,
    ``0.5 (x^4 + (6 s^2 - 16) x^2 + 5 x + 3 s^4 - 16 s^2)``, which is convex once
    s^2 >= 8/3: the two wells merge into one, near the global minimizer -2.9 only for
    small s.
    """
    _check_points(x)
    _check_delta(delta)
    s2, _ = _coord_noise(delta, x, "gaussian")
    return 0.5 * (x.pow(4) + (6 * s2 - 16) * x.square() + 5 * x + 3 * s2.square() - 16 * s2).sum(-1)


def smoothed_quadratic(
    x: Tensor, delta: float | Tensor, scales: Sequence[float] | Tensor, dist: str = "gaussian"
) -> Tensor:
    """Exact smoothing of :func:`quadratic`: ``f(x) + 0.5 sum_i scales_i E[(delta u_i)^2]``.

    E[(delta u_i)^2] is delta^2/d (Gaussian) or delta^2/(d+2) (ball, any d). Smoothing a
    quadratic only shifts it, so the minimizer does not move.
    """
    _check_delta(delta)
    _check_dist(dist)
    f = quadratic(x, scales)
    d = x.shape[-1]
    s = torch.as_tensor(scales, dtype=x.dtype, device=x.device)
    delta = torch.as_tensor(delta, dtype=x.dtype, device=x.device)
    second = delta.square() / (d if dist == "gaussian" else d + 2)
    return f + 0.5 * s.sum() * second


def rastrigin_convexity_threshold(A: float = 10.0, d: int = 1, dist: str = "gaussian") -> float:
    """Smallest delta at which the Gaussian-smoothed Rastrigin function is convex.

    From the Hessian diagonal 2 + 4 pi^2 A cos(2 pi x_i) exp(-2 pi^2 delta^2 / d) >= 0 for
    all x: ``delta* = sqrt(d ln(2 pi^2 A) / (2 pi^2))`` (about 0.5175 for A = 10, d = 1, so
    the curves for delta = 0.7, 1.0 and 3.0 of the book's figure are convex and those for
    delta = 0.2, 0.4 are not). Only ``dist="gaussian"`` has a threshold: the ball factor
    sin(t)/t oscillates in sign, so convexity comes and goes with delta.
    """
    if dist != "gaussian":
        raise ValueError(f"only dist='gaussian' has a convexity threshold, got {dist!r}")
    if not A > 0:
        raise ValueError(f"A must be > 0, got {A!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    k = 2 * math.pi**2 * A
    return math.sqrt(d * math.log(k) / (2 * math.pi**2)) if k > 1 else 0.0


# -------------------------------------------------------------- Monte-Carlo smoothing


def sample_noise(
    n: int,
    d: int,
    dist: str = "gaussian",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` noise vectors, shape (n, d).

    ``"gaussian"``: N(0, (1/d) I_d). ``"ball"``: uniform on the unit ball, as
    ``z / ||z|| * U^(1/d)`` with z ~ N(0, I), U ~ U(0, 1), so P(||u|| <= r) = r^d.
    ``"sphere"``: uniform on the unit sphere ``z / ||z||``. Samples are drawn on the
    generator's device (CPU if none) and moved to ``device``.
    """
    if dist not in ("gaussian", "ball", "sphere"):
        raise ValueError(f"dist must be one of ('gaussian', 'ball', 'sphere'), got {dist!r}")
    for name, v in (("n", n), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    gen_device = generator.device if generator is not None else device
    z = torch.randn(n, d, generator=generator, device=gen_device, dtype=dtype)
    if dist == "gaussian":
        u = z / math.sqrt(d)
    else:
        u = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-30)
        if dist == "ball":
            r = torch.rand(n, 1, generator=generator, device=gen_device, dtype=dtype)
            u = u * r.pow(1.0 / d)
    return u.to(device) if device is not None else u


def _check_mc(x: Tensor, delta: float, n_samples: int, dist: str) -> None:
    _check_points(x)
    if isinstance(delta, Tensor) or isinstance(delta, bool):
        raise TypeError(f"delta must be a Python number for Monte-Carlo smoothing, got {delta!r}")
    _check_delta(delta)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    _check_dist(dist)


def _chunks(n: int, batch: int, d: int, budget: int = 1 << 22) -> list[tuple[int, int]]:
    """Split n samples so that one chunk holds about ``budget`` numbers (memory bound)."""
    size = max(1, min(n, budget // max(1, batch * d)))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _mean_and_stderr(total: Tensor, total_sq: Tensor, n: int,
                     return_std: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The mean of n samples from their sum and sum of squares, and its standard error
    (the unbiased sample variance over n; 0 when n = 1) when ``return_std``."""
    mean = total / n
    if not return_std:
        return mean
    var = (total_sq / n - mean.square()).clamp_min(0) * n / max(1, n - 1)
    return mean, (var / n).sqrt()


def smooth(
    f: Function,
    x: Tensor,
    delta: float,
    n_samples: int,
    dist: str = "gaussian",
    generator: torch.Generator | None = None,
    return_std: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of ``f_hat_delta(x) = E_u[f(x - delta u)]``, shape (...).

    ``f`` maps (..., d) to (...). ``x``: (..., d). The same ``n_samples`` noise vectors
    are used for every point of ``x`` (common random numbers), so the estimate is itself a
    smooth function of x, which makes plotted curves smooth. With ``return_std=True``
    also returns the standard error of the mean, shape (...). ``delta = 0`` gives f(x)
    (standard error 0).
    """
    _check_mc(x, delta, n_samples, dist)
    u = sample_noise(n_samples, x.shape[-1], dist, generator, x.device, x.dtype)
    batch = x[..., 0].numel()
    total = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    total_sq = torch.zeros_like(total)
    for lo, hi in _chunks(n_samples, batch, x.shape[-1]):
        vals = f(x.unsqueeze(-2) - delta * u[lo:hi])  # (..., chunk)
        total = total + vals.sum(-1)
        if return_std:
            total_sq = total_sq + vals.square().sum(-1)
    return _mean_and_stderr(total, total_sq, n_samples, return_std)


def smooth_grad(
    f: Function,
    x: Tensor,
    delta: float,
    n_samples: int,
    dist: str = "gaussian",
    generator: torch.Generator | None = None,
    method: str = "autograd",
    return_std: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of ``grad f_hat_delta(x)``, shape (..., d) like ``x``.

    ``method="autograd"``: ``mean_j grad f(x - delta u_j)``, unbiased because the gradient
    passes under the expectation (f differentiable almost everywhere); needs autograd
    through f. With delta = 0 it is grad f(x).

    ``method="zeroth"``: derivative-free, needs delta > 0. For the ball (Hazan, Levy &
    Shalev-Shwartz 2016, Lemma 4.1, after Flaxman, Kalai & McMahan 2005),
    ``grad f_hat_delta(x) = (d / delta) E_v[f(x + delta v) v]`` with v uniform on the unit
    *sphere*. For the Gaussian u ~ N(0, (1/d) I), Stein's lemma gives the same formula
    ``(d / delta) E_u[f(x + delta u) u]`` with u Gaussian (Nesterov & Spokoiny 2017).
    Since E[f(x) v] = 0 and the noise is symmetric, we evaluate the equal expectation
    ``(d / (2 delta)) E[(f(x + delta v) - f(x - delta v)) v]`` (two-point, antithetic form),
    whose variance stays bounded as delta -> 0 for smooth f.

    The same noise vectors serve every point of ``x``. With ``return_std=True`` also
    returns the per-coordinate standard error, shape (..., d).
    """
    _check_mc(x, delta, n_samples, dist)
    if method not in ("autograd", "zeroth"):
        raise ValueError(f"method must be 'autograd' or 'zeroth', got {method!r}")
    if method == "zeroth" and delta == 0:
        raise ValueError("method='zeroth' needs delta > 0 (it divides by delta), got delta=0")
    d = x.shape[-1]
    noise = "sphere" if (method == "zeroth" and dist == "ball") else dist
    u = sample_noise(n_samples, d, noise, generator, x.device, x.dtype)
    x0 = x.detach()
    batch = x0[..., 0].numel()
    total = torch.zeros_like(x0)
    total_sq = torch.zeros_like(x0)
    for lo, hi in _chunks(n_samples, batch, d):
        uc = u[lo:hi]
        if method == "autograd":
            with torch.enable_grad():
                y = (x0.unsqueeze(-2) - delta * uc).requires_grad_(True)
                (g,) = torch.autograd.grad(f(y).sum(), y)  # (..., chunk, d)
        else:
            with torch.no_grad():
                y = x0.unsqueeze(-2)
                diff = f(y + delta * uc) - f(y - delta * uc)  # (..., chunk)
                g = (d / (2 * delta)) * diff.unsqueeze(-1) * uc
        total = total + g.sum(-2)
        if return_std:
            total_sq = total_sq + g.square().sum(-2)
    return _mean_and_stderr(total, total_sq, n_samples, return_std)


# ------------------------------------------------------------------- the book's figure


def rastrigin_figure_data(
    deltas: Sequence[float] = (0.2, 0.4, 0.7, 1.0, 3.0),
    xs: Tensor | Sequence[float] | None = None,
    dist: str = "gaussian",
    A: float = 10.0,
) -> dict:
    """Curves of the book's 1-D Rastrigin smoothing figure (arXiv 2402.02325, Fig. 3).

    Returns a dict of numpy arrays: ``"x"`` (N,) (default 601 points on [-3, 3]), ``"f"``
    (N,) the Rastrigin function, ``"deltas"`` the tuple of deltas, ``"smoothed"``
    {delta: (N,) array} the exact smoothings, and ``"convex"`` {delta: bool} whether each
    smoothed curve is convex on all of R (from the closed-form second derivative).
    """
    _check_dist(dist)
    for dl in deltas:
        _check_delta(dl)
    if xs is None:
        x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    else:
        x = torch.as_tensor(xs, dtype=torch.float64).reshape(-1)
        if x.numel() == 0:
            raise ValueError("xs must contain at least one point")
    pts = x.unsqueeze(-1)
    smoothed, convex = {}, {}
    # Minimum over x of the 1-D second derivative 2 + 4 pi^2 A cos(2 pi x) * damp.
    for dl in deltas:
        smoothed[dl] = smoothed_rastrigin(pts, dl, A, dist).numpy()
        _, damp = _coord_noise(dl, pts[:1], dist)
        convex[dl] = bool(2 - 4 * math.pi**2 * A * abs(float(damp)) >= 0)
    return {
        "x": x.numpy(),
        "f": rastrigin(pts, A).numpy(),
        "deltas": tuple(deltas),
        "smoothed": smoothed,
        "convex": convex,
    }


def plot_rastrigin_smoothing(ax=None, deltas: Sequence[float] = (0.2, 0.4, 0.7, 1.0, 3.0),
                             dist: str = "gaussian"):
    """Draw the Rastrigin smoothing figure on ``ax`` (a new figure if None); return ax."""
    import matplotlib.pyplot as plt  # lazy: plotting is optional

    data = rastrigin_figure_data(deltas, dist=dist)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.plot(data["x"], data["f"], color="black", lw=1.5, label="f(x)")
    for dl in data["deltas"]:
        ax.plot(data["x"], data["smoothed"][dl], lw=1.2, label=f"f_hat, delta = {dl:g}")
    ax.set_xlabel("x")
    ax.set_ylabel("value")
    ax.set_title(f"Rastrigin function and its {dist} smoothings")
    ax.legend(fontsize="small")
    return ax
