"""Tests for labkit.smoothing: closed forms against Monte Carlo, Lemma 2.1, samplers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import smoothing as S

F64 = torch.float64
Z = 5.0  # tolerance in standard errors for Monte-Carlo comparisons


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    y = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(y).sum(), y)
    return g


def norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


# ------------------------------------------------------------------------ test functions


def test_rastrigin_values_and_minimizer():
    x = torch.tensor([[0.0], [1.0], [0.5], [-2.0]], dtype=F64)
    expected = x[:, 0] ** 2 - 10 * torch.cos(2 * math.pi * x[:, 0]) + 10
    assert torch.allclose(S.rastrigin(x), expected)
    assert S.rastrigin(x)[:2].tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    assert S.rastrigin(x)[2].item() == pytest.approx(20.25)
    pts = torch.randn(6, 4, dtype=F64, generator=gen())
    per_coord = S.rastrigin(pts.reshape(-1, 1)).reshape(6, 4)
    assert torch.allclose(S.rastrigin(pts), per_coord.sum(-1))
    assert (S.rastrigin(pts) > 0).all()
    assert grad_of(S.rastrigin, torch.zeros(3, dtype=F64)).abs().max() == 0


def test_ackley():
    assert S.ackley(torch.zeros(2, dtype=F64)).item() == pytest.approx(0.0, abs=1e-12)
    g = grad_of(S.ackley, torch.zeros(1, 2, dtype=F64))
    assert torch.isfinite(g).all() and g.abs().max() == 0
    pts = torch.rand(100, 2, dtype=F64, generator=gen()) * 10 - 5
    assert (S.ackley(pts) > 0).all()
    # known value: f(1, 1) = -20 exp(-0.2) - exp(cos 2 pi) + 20 + e = 3.6253849...
    assert S.ackley(torch.ones(2, dtype=F64)).item() == pytest.approx(3.6253849384403627)


def test_styblinski_tang_minimizer():
    xstar = torch.full((3,), S.STYBLINSKI_TANG_ARGMIN, dtype=F64)
    assert grad_of(S.styblinski_tang, xstar).abs().max() < 1e-9
    assert S.styblinski_tang(xstar).item() == pytest.approx(-39.16616570377142 * 3, rel=1e-12)
    grid = torch.linspace(-5, 5, 100001, dtype=F64).unsqueeze(-1)
    assert grid[S.styblinski_tang(grid).argmin(), 0].item() == pytest.approx(
        S.STYBLINSKI_TANG_ARGMIN, abs=1e-4
    )


def test_quadratic_and_errors():
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    assert S.quadratic(x, [1.0, 100.0]).item() == pytest.approx(0.5 + 200.0)
    with pytest.raises(ValueError, match=r"scales must have length d = 2, got shape \(3,\)"):
        S.quadratic(x, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"scales must all be > 0"):
        S.quadratic(x, [1.0, 0.0])
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \(\.\.\., d\)"):
        S.rastrigin([0.0, 1.0])
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64"):
        S.rastrigin(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., d\) with d >= 1, got \(\)"):
        S.rastrigin(torch.tensor(1.0))


# ---------------------------------------------------------------------- exact smoothing


@pytest.mark.parametrize("dist", ["gaussian", "ball"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_smoothed_rastrigin_at_zero_delta_is_f(dist, d):
    x = torch.randn(10, d, dtype=F64, generator=gen(d))
    assert torch.equal(S.smoothed_rastrigin(x, 0.0, dist=dist), S.rastrigin(x))
    m = S.smooth(S.rastrigin, x, 0.0, 5, dist=dist, generator=gen())
    assert torch.allclose(m, S.rastrigin(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dist,d", [("gaussian", 1), ("gaussian", 3), ("gaussian", 8), ("ball", 1), ("ball", 2),
               ("ball", 3)]
)
@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
def test_smoothed_rastrigin_closed_form_vs_monte_carlo(dist, d, delta):
    x = torch.randn(6, d, dtype=F64, generator=gen(1)) * 2
    mean, se = S.smooth(S.rastrigin, x, delta, 100_000, dist=dist, generator=gen(2),
                        return_std=True)
    exact = S.smoothed_rastrigin(x, delta, dist=dist)
    assert ((mean - exact).abs() <= Z * se + 1e-9).all(), ((mean - exact) / se).tolist()
    assert (se > 0).all()


def test_gaussian_convention_per_coordinate_variance():
    """u ~ N(0, (1/d) I): in d = 4, smoothing x_1^2 adds delta^2 / 4 (not delta^2 / 2)."""
    x = torch.zeros(1, 4, dtype=F64)
    delta = 2.0
    m = S.smooth(lambda y: y[..., 0] ** 2, x, delta, 200_000, generator=gen())
    assert m.item() == pytest.approx(delta**2 / 4, rel=0.02)
    exact = S.smoothed_rastrigin(x, delta) - S.rastrigin(x)
    # d s^2 = delta^2 from the quadratic, the cosines lose 10 d (1 - exp(-2 pi^2 delta^2 / d))
    assert exact.item() == pytest.approx(delta**2 + 40 * (1 - math.exp(-2 * math.pi**2)))


def test_tensor_delta_broadcasts():
    x = torch.linspace(-1, 1, 5, dtype=F64).unsqueeze(-1)
    deltas = torch.tensor([0.0, 0.2, 0.4, 0.7, 1.0], dtype=F64)
    out = S.smoothed_rastrigin(x, deltas)
    for i in range(5):
        assert out[i].item() == pytest.approx(S.smoothed_rastrigin(x[i], float(deltas[i])).item())
    with pytest.raises(ValueError, match=r"delta must be finite and >= 0"):
        S.smoothed_rastrigin(x, torch.tensor([-1.0]))


def second_derivative_1d(delta: float, xs: torch.Tensor) -> torch.Tensor:
    x = xs.clone().requires_grad_(True)
    f = S.smoothed_rastrigin(x.unsqueeze(-1), delta)
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    return h


def test_smoothed_rastrigin_convexity_in_1d():
    """f_hat'' = 2 + 40 pi^2 cos(2 pi x) exp(-2 pi^2 delta^2): convex at delta = 1, not 0.2."""
    xs = torch.linspace(-5, 5, 2001, dtype=F64)
    for delta in (0.2, 0.4, 0.7, 1.0, 3.0):
        h = second_derivative_1d(delta, xs)
        ref = 2 + 40 * math.pi**2 * torch.cos(2 * math.pi * xs) * math.exp(
            -2 * math.pi**2 * delta**2
        )
        assert torch.allclose(h, ref, rtol=1e-10, atol=1e-10)
    assert second_derivative_1d(1.0, xs).min() >= 0
    assert second_derivative_1d(0.2, xs).min() < 0
    assert second_derivative_1d(0.4, xs).min() < 0
    # the threshold delta* separates the two regimes
    ds = S.rastrigin_convexity_threshold()
    assert ds == pytest.approx(math.sqrt(math.log(20 * math.pi**2) / (2 * math.pi**2)))
    assert ds == pytest.approx(0.5174, abs=1e-3)
    assert second_derivative_1d(ds + 1e-4, xs).min() >= 0
    assert second_derivative_1d(ds - 1e-3, xs).min() < 0
    assert S.rastrigin_convexity_threshold(d=4) == pytest.approx(2 * ds)


def test_ball_smoothing_is_not_monotone_in_delta():
    """The ball's cosine factor changes sign: in 2-D at delta = 1 the origin becomes a local
    maximum of the ball-smoothed Rastrigin, while the Gaussian smoothing is convex there."""
    x0 = torch.zeros(2, dtype=F64)

    def hess_diag(delta, dist):
        return torch.autograd.functional.hessian(
            lambda z: S.smoothed_rastrigin(z, delta, dist=dist), x0
        ).diagonal()

    assert (hess_diag(1.0, "ball") < 0).all()
    assert (hess_diag(0.5, "ball") > 0).all()
    assert (hess_diag(1.0, "gaussian") > 0).all()
    # 1-D ball: sin(2 pi delta) = 0 at half-integers, the ripples vanish exactly
    x = torch.linspace(-3, 3, 61, dtype=F64).unsqueeze(-1)
    flat = S.smoothed_rastrigin(x, 1.5, dist="ball")
    assert torch.allclose(flat, x[:, 0] ** 2 + 1.5**2 / 3 + 10)


def test_smoothed_quadratic_and_styblinski_tang_vs_monte_carlo():
    x = torch.randn(5, 3, dtype=F64, generator=gen(3)) * 2
    scales = [1.0, 10.0, 100.0]
    for dist in ("gaussian", "ball"):
        m, se = S.smooth(lambda y: S.quadratic(y, scales), x, 0.8, 50_000, dist=dist,
                         generator=gen(4), return_std=True)
        exact = S.smoothed_quadratic(x, 0.8, scales, dist=dist)
        assert ((m - exact).abs() <= Z * se).all()
    m, se = S.smooth(S.styblinski_tang, x, 1.5, 50_000, generator=gen(5), return_std=True)
    assert ((m - S.smoothed_styblinski_tang(x, 1.5)).abs() <= Z * se).all()
    # smoothing merges the two wells: one minimum per coordinate once s^2 >= 8/3
    grid = torch.linspace(-5, 5, 2001, dtype=F64).unsqueeze(-1)
    vals = S.smoothed_styblinski_tang(grid, 2.0)  # d = 1, s^2 = 4
    diffs = vals[1:] - vals[:-1]
    assert ((diffs[1:] > 0) & (diffs[:-1] < 0)).sum() == 1
    vals = S.smoothed_styblinski_tang(grid, 0.5)
    diffs = vals[1:] - vals[:-1]
    assert ((diffs[1:] > 0) & (diffs[:-1] < 0)).sum() == 2


# ----------------------------------------------------------------------------- Lemma 2.1


def expected_norm(d: int, dist: str) -> float:
    if dist == "ball":
        return d / (d + 1)  # E||u|| for u uniform in the unit ball
    # chi distribution with d degrees of freedom, scaled by 1/sqrt(d)
    return math.sqrt(2 / d) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@pytest.mark.parametrize("dist", ["gaussian", "ball"])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_lemma_bound_is_tight_for_the_norm(dist, d):
    """f = ||x|| is 1-Lipschitz; at x = 0, f_hat(0) - f(0) = delta E||u|| <= delta."""
    delta = 0.7
    m, se = S.smooth(norm, torch.zeros(1, d, dtype=F64), delta, 100_000, dist=dist,
                     generator=gen(d), return_std=True)
    exact = delta * expected_norm(d, dist)
    assert abs(m.item() - exact) <= Z * se.item()
    assert exact <= delta


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 6),
    delta=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
)
def test_lemma_bound_for_lipschitz_functions(d, delta, seed, scale):
    """|f_hat_delta(x) - f(x)| <= delta L for L-Lipschitz f (Lemma 2.1, arXiv 2402.02325).

    f(x) = ||x|| + sum_i |sin x_i| is Lipschitz with L = 1 + sqrt(d). For the ball every
    sample satisfies the bound, so the Monte-Carlo mean does too; for the Gaussian we allow
    the sampling error.
    """
    lip = 1 + math.sqrt(d)

    def f(y):
        return norm(y) + torch.sin(y).abs().sum(-1)

    x = torch.randn(4, d, dtype=F64, generator=gen(seed)) * scale
    m = S.smooth(f, x, delta, 2000, dist="ball", generator=gen(seed + 1))
    assert ((m - f(x)).abs() <= delta * lip + 1e-12).all()
    m, se = S.smooth(f, x, delta, 2000, dist="gaussian", generator=gen(seed + 2),
                     return_std=True)
    assert ((m - f(x)).abs() <= delta * lip + Z * se + 1e-12).all()


# ------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("d", [1, 2, 3, 10])
def test_ball_samples_radial_distribution(d):
    n = 40_000
    u = S.sample_noise(n, d, "ball", generator=gen(d), dtype=F64)
    r = norm(u)
    assert u.shape == (n, d) and (r <= 1).all()
    for q in (0.25, 0.5, 0.75, 0.9, 0.99):
        p = q**d
        emp = (r <= q).double().mean().item()
        assert abs(emp - p) <= Z * math.sqrt(p * (1 - p) / n) + 1e-12
    # isotropic: E[u] = 0, E[u u^T] = I / (d + 2)
    assert u.mean(0).abs().max() <= Z * math.sqrt(1 / (d + 2) / n)
    cov = u.T @ u / n
    assert torch.allclose(cov, torch.eye(d, dtype=F64) / (d + 2), atol=0.01)


def test_gaussian_and_sphere_samples():
    d, n = 5, 50_000
    u = S.sample_noise(n, d, "gaussian", generator=gen(), dtype=F64)
    assert torch.allclose(u.T @ u / n, torch.eye(d, dtype=F64) / d, atol=0.01)
    assert (u.square().sum(-1).mean() - 1).abs() < 0.02
    v = S.sample_noise(n, d, "sphere", generator=gen(), dtype=F64)
    assert torch.allclose(norm(v), torch.ones(n, dtype=F64))
    with pytest.raises(ValueError, match=r"dist must be one of .*got 'cube'"):
        S.sample_noise(3, 2, "cube")
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        S.sample_noise(0, 2)
    with pytest.raises(ValueError, match=r"d must be an integer >= 1, got 1.5"):
        S.sample_noise(3, 1.5)


def test_deterministic_with_generator_and_batched_shapes():
    x = torch.randn(5, 7, 2, dtype=F64, generator=gen())
    a = S.smooth(S.rastrigin, x, 0.5, 300, generator=gen(9))
    b = S.smooth(S.rastrigin, x, 0.5, 300, generator=gen(9))
    assert a.shape == (5, 7) and torch.equal(a, b)
    g = S.smooth_grad(S.rastrigin, x, 0.5, 300, generator=gen(9))
    assert g.shape == (5, 7, 2)
    # common random numbers: the flattened batch gives the same numbers
    flat = S.smooth(S.rastrigin, x.reshape(-1, 2), 0.5, 300, generator=gen(9))
    assert torch.allclose(flat.reshape(5, 7), a)
    # float32 inputs stay float32
    x32 = x.float()
    assert S.smooth(S.rastrigin, x32, 0.5, 100, generator=gen()).dtype == torch.float32
    assert S.smooth_grad(S.rastrigin, x32, 0.5, 100, generator=gen(),
                         method="zeroth").dtype == torch.float32


def test_chunking_gives_the_same_estimate():
    x = torch.randn(60, 3, dtype=F64, generator=gen())
    n = 30_000  # 60 * 30000 * 3 numbers > the 2^22 chunk budget: two chunks
    assert len(S._chunks(n, 60, 3)) == 2
    one = S.smooth(S.rastrigin, x, 0.4, n, generator=gen(1))
    u = S.sample_noise(n, 3, "gaussian", generator=gen(1), dtype=F64)
    ref = S.rastrigin(x.unsqueeze(-2) - 0.4 * u).mean(-1)
    assert torch.allclose(one, ref, rtol=1e-12)


# ------------------------------------------------------------------- gradient estimators


@pytest.mark.parametrize(
    "dist,d", [("gaussian", 1), ("gaussian", 3), ("ball", 1), ("ball", 2), ("ball", 3)]
)
@pytest.mark.parametrize("method", ["autograd", "zeroth"])
def test_smooth_grad_matches_closed_form_gradient(dist, d, method):
    delta = 0.6
    x = torch.randn(4, d, dtype=F64, generator=gen(11)) * 2
    exact = grad_of(lambda y: S.smoothed_rastrigin(y, delta, dist=dist), x)
    est, se = S.smooth_grad(S.rastrigin, x, delta, 50_000, dist=dist, generator=gen(12),
                            method=method, return_std=True)
    if method == "zeroth" and dist == "ball" and d == 1:
        # the unit sphere in 1-D is {-1, 1}: the two-point estimator is exact
        assert torch.allclose(est, exact, rtol=1e-9, atol=1e-9)
        assert torch.allclose(
            est[:, 0], (S.rastrigin(x + delta) - S.rastrigin(x - delta)) / (2 * delta)
        )
    else:
        assert ((est - exact).abs() <= Z * se + 1e-9).all(), ((est - exact) / se).tolist()


def test_zeroth_estimator_exact_in_mean_for_quadratics():
    """(d/(2 delta)) E[(f(x+dv) - f(x-dv)) v] = d E[v v^T] x = x for f = ||x||^2 / 2."""
    x = torch.randn(3, 4, dtype=F64, generator=gen())
    est, se = S.smooth_grad(lambda y: 0.5 * y.square().sum(-1), x, 0.5, 40_000, dist="ball",
                            generator=gen(1), method="zeroth", return_std=True)
    assert ((est - x).abs() <= Z * se).all()


def test_smooth_grad_at_zero_delta_is_grad_f():
    x = torch.randn(6, 3, dtype=F64, generator=gen())
    est = S.smooth_grad(S.rastrigin, x, 0.0, 3, generator=gen())
    assert torch.allclose(est, grad_of(S.rastrigin, x), rtol=1e-12)
    assert not est.requires_grad


def test_monte_carlo_argument_errors():
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"delta must be a finite number >= 0, got -0.1"):
        S.smooth(S.rastrigin, x, -0.1, 10)
    with pytest.raises(ValueError, match=r"n_samples must be an integer >= 1, got 0"):
        S.smooth(S.rastrigin, x, 0.1, 0)
    with pytest.raises(ValueError, match=r"one of \('gaussian', 'ball'\), got 'sphere'"):
        S.smooth(S.rastrigin, x, 0.1, 10, dist="sphere")
    with pytest.raises(ValueError, match=r"delta must be a finite number >= 0, got -1"):
        S.smooth_grad(S.rastrigin, x, -1, 10)
    with pytest.raises(ValueError, match=r"n_samples must be an integer >= 1, got 2.0"):
        S.smooth_grad(S.rastrigin, x, 0.1, 2.0)
    with pytest.raises(ValueError, match=r"dist must be one of .*got 'uniform'"):
        S.smooth_grad(S.rastrigin, x, 0.1, 10, dist="uniform")
    with pytest.raises(ValueError, match=r"method must be 'autograd' or 'zeroth', got 'fd'"):
        S.smooth_grad(S.rastrigin, x, 0.1, 10, method="fd")
    with pytest.raises(ValueError, match=r"method='zeroth' needs delta > 0"):
        S.smooth_grad(S.rastrigin, x, 0.0, 10, method="zeroth")
    with pytest.raises(TypeError, match=r"delta must be a Python number"):
        S.smooth(S.rastrigin, x, torch.tensor(0.1), 10)
    with pytest.raises(ValueError, match=r"delta must be a finite number >= 0, got nan"):
        S.smoothed_rastrigin(x, float("nan"))
    with pytest.raises(ValueError, match=r"dist must be one of .*got 'Gaussian'"):
        S.smoothed_rastrigin(x, 0.1, dist="Gaussian")
    with pytest.raises(ValueError, match=r"exact ball smoothing is implemented for d in"):
        S.smoothed_rastrigin(torch.zeros(1, 4), 0.1, dist="ball")
    with pytest.raises(ValueError, match=r"only dist='gaussian' has a convexity threshold"):
        S.rastrigin_convexity_threshold(dist="ball")
    with pytest.raises(ValueError, match=r"d must be an integer >= 1, got 0"):
        S.rastrigin_convexity_threshold(d=0)


# ---------------------------------------------------------------------------- the figure


def test_rastrigin_figure_data():
    data = S.rastrigin_figure_data()
    x = data["x"]
    assert data["deltas"] == (0.2, 0.4, 0.7, 1.0, 3.0)
    assert x.shape == (601,) and x[0] == -3 and x[-1] == 3
    assert data["f"] == pytest.approx(x**2 - 10 * torch.cos(2 * math.pi * torch.from_numpy(x))
                                      .numpy() + 10)
    assert data["convex"] == {0.2: False, 0.4: False, 0.7: True, 1.0: True, 3.0: True}
    # delta = 3: the ripples are gone (factor exp(-18 pi^2)), f_hat = x^2 + 9 + 10
    assert data["smoothed"][3.0] == pytest.approx(x**2 + 19, abs=1e-12)
    # the curves are the Monte-Carlo smoothing of f (the figure comes from Def. 2.1)
    xs = torch.from_numpy(x[::20]).unsqueeze(-1)
    for i, delta in enumerate(data["deltas"]):
        m, se = S.smooth(S.rastrigin, xs, delta, 40_000, generator=gen(i), return_std=True)
        diff = (m.numpy() - data["smoothed"][delta][::20])
        assert (abs(diff) <= Z * se.numpy()).all()
    # Lemma 2.1 picture: the gap to f grows with delta
    gaps = [abs(data["smoothed"][dl] - data["f"]).mean() for dl in data["deltas"]]
    assert gaps == sorted(gaps)
    custom = S.rastrigin_figure_data(deltas=(0.5,), xs=[0.0, 1.0], dist="ball")
    assert custom["x"].tolist() == [0.0, 1.0] and set(custom["smoothed"]) == {0.5}
    with pytest.raises(ValueError, match=r"xs must contain at least one point"):
        S.rastrigin_figure_data(xs=[])
    with pytest.raises(ValueError, match=r"delta must be a finite number >= 0, got -0.2"):
        S.rastrigin_figure_data(deltas=(-0.2,))


def test_plot_rastrigin_smoothing():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = S.plot_rastrigin_smoothing()
    assert len(ax.get_lines()) == 6
    ys = ax.get_lines()[0].get_ydata()
    assert ys == pytest.approx(S.rastrigin_figure_data()["f"])
    plt.close("all")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(8, 3, dtype=F64, generator=gen())
    dev = torch.device("cuda")
    exact = S.smoothed_rastrigin(x.to(dev), 0.7)
    assert exact.device.type == "cuda"
    assert torch.allclose(exact.cpu(), S.smoothed_rastrigin(x, 0.7))
    # a CPU generator drives sampling; results land on x's device and match CPU
    a = S.smooth(S.rastrigin, x.to(dev), 0.7, 1000, dist="ball", generator=gen(1))
    b = S.smooth(S.rastrigin, x, 0.7, 1000, dist="ball", generator=gen(1))
    assert a.device.type == "cuda" and torch.allclose(a.cpu(), b)
    g = S.smooth_grad(S.rastrigin, x.to(dev), 0.7, 1000, generator=gen(1), method="zeroth")
    assert torch.allclose(g.cpu(), S.smooth_grad(S.rastrigin, x, 0.7, 1000, generator=gen(1),
                                                 method="zeroth"))
    m = S.smooth(S.rastrigin, x.to(dev), 0.7, 1000, generator=torch.Generator(dev).manual_seed(0))
    assert m.device.type == "cuda"
