"""Tests for labkit.graduated: explicit graduated optimization on Rastrigin, Algorithm 3."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import graduated as G
from labkit import schedules
from labkit.smoothing import rastrigin

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy loops run thousands of tiny ops; intra-op threads only add overhead there
    (and stall badly when the CI cores are shared), so use one thread and restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------- explicit, toy functions


def test_gradient_descent_matches_hand_loop_and_stalls():
    x0 = torch.tensor([3.3], dtype=F64)
    tr = G.gradient_descent(rastrigin, x0, lr=0.002, steps=500)
    x = 3.3
    for _ in range(500):
        x -= 0.002 * (2 * x + 20 * math.pi * math.sin(2 * math.pi * x))
    assert tr.final.item() == pytest.approx(x, rel=1e-12)
    assert tr.points.shape == (501, 1) and tr.values.shape == (501,)
    assert tr.stages.tolist() == [0] * 501 and tr.deltas == (0.0,)
    assert torch.allclose(tr.values, rastrigin(tr.points))
    assert abs(tr.final.item()) >= 0.9  # stuck in the local minimum near 3
    assert tr.final.item() == pytest.approx(2.98, abs=0.01)


def run_graduated(x0, dist, seed):
    """Halving deltas; larger steps while f_hat is flat, 0.002 (stable for f) at the end.

    With these settings all of 20 seeds succeed for 1-D (ball and Gaussian) and 2-D/3-D
    Gaussian smoothing (checked when writing the test); the test runs 3 of them.
    """
    deltas = G.default_deltas(4.0, 6, final_zero=True)  # 4, 2, 1, 0.5, 0.25, 0.125, 0
    lrs = [0.05, 0.02, 0.005, 0.002, 0.002, 0.002, 0.002]
    return G.graduated_optimization(
        rastrigin, x0, deltas, steps_per_stage=200, lr=lrs, n_samples=64, dist=dist,
        generator=gen(seed),
    )


@pytest.mark.parametrize("dist", ["ball", "gaussian"])
def test_graduated_beats_gd_on_1d_rastrigin(dist):
    starts = torch.linspace(-5, 5, 21, dtype=F64).unsqueeze(-1)
    gd = G.gradient_descent(rastrigin, starts, lr=0.002, steps=1400)
    stuck = gd.final.abs() >= 0.9
    assert stuck.sum() >= 16  # only the starts within 0.5 of 0 reach the global minimum
    for seed in range(3):
        tr = run_graduated(starts, dist, seed)
        assert tr.final.abs().max() < 0.1, tr.final.flatten().tolist()
        assert tr.values[-1].max() < rastrigin(torch.full((1,), 0.1, dtype=F64)).item()
    tr = run_graduated(torch.tensor([3.3], dtype=F64), dist, 0)
    assert abs(tr.final.item()) < 0.1
    assert tr.points.shape == (1 + 7 * 200, 1)
    assert tr.stages.tolist() == [0] + [m for m in range(7) for _ in range(200)]
    assert tr.deltas == (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0)


def test_graduated_beats_gd_on_2d_rastrigin():
    starts = torch.rand(12, 2, dtype=F64, generator=gen(1)) * 10 - 5
    gd = G.gradient_descent(rastrigin, starts, lr=0.002, steps=1400)
    assert (torch.linalg.vector_norm(gd.final, dim=-1) >= 0.9).all()
    for seed in range(3):
        tr = run_graduated(starts, "gaussian", seed)
        assert torch.linalg.vector_norm(tr.final, dim=-1).max() < 0.1
        assert tr.points.shape == (1401, 12, 2) and tr.values.shape == (1401, 12)


def test_graduated_is_deterministic_and_numpy_friendly():
    x0 = torch.tensor([[2.2], [-4.1]], dtype=F64)
    a = G.graduated_optimization(rastrigin, x0, [1.0, 0.5], 20, 0.01, 16, generator=gen(7))
    b = G.graduated_optimization(rastrigin, x0, [1.0, 0.5], 20, 0.01, 16, generator=gen(7))
    assert torch.equal(a.points, b.points)
    c = G.graduated_optimization(rastrigin, x0, [1.0, 0.5], 20, 0.01, 16, generator=gen(8))
    assert not torch.equal(a.points, c.points)
    arr = a.numpy()
    assert isinstance(arr["points"], np.ndarray) and arr["points"].shape == (41, 2, 1)
    assert arr["deltas"].tolist() == [1.0, 0.5] and arr["stages"].max() == 1


def test_graduated_per_stage_settings_and_zeroth_order():
    x0 = torch.tensor([3.3], dtype=F64)
    tr = G.graduated_optimization(
        rastrigin, x0, [2.0, 1.0, 0.5, 0.0], [300, 300, 300, 100],
        np.array([0.01, 0.01, 0.005, 0.002]),
        64, dist="ball", generator=gen(), method="zeroth",
    )
    assert tr.points.shape == (1001, 1)
    assert abs(tr.final.item()) < 0.1
    # a delta = 0 stage is exact gradient descent
    gd = G.gradient_descent(rastrigin, tr.points[900], 0.002, 100)
    assert torch.allclose(gd.points, tr.points[900:])


def test_sgd_noisy():
    x0 = torch.tensor([[3.3, -1.2]], dtype=F64)
    gd = G.gradient_descent(rastrigin, x0, 0.002, 50)
    zero = G.sgd_noisy(rastrigin, x0, 0.002, 50, noise_std=0.0, generator=gen())
    assert torch.allclose(zero.points, gd.points, rtol=0, atol=1e-15)
    a = G.sgd_noisy(rastrigin, x0, 0.002, 50, noise_std=5.0, generator=gen(3))
    b = G.sgd_noisy(rastrigin, x0, 0.002, 50, noise_std=5.0, generator=gen(3))
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, gd.points)
    assert a.deltas == pytest.approx((0.002 * 5.0 * math.sqrt(2),))
    # one step by hand: x1 = x0 - lr (grad f(x0) + noise_std xi)
    xi = torch.randn(x0.shape, generator=gen(3), dtype=F64)
    x1 = gd.points[1] - 0.002 * 5.0 * xi
    assert torch.allclose(a.points[1], x1)


def test_default_deltas():
    assert G.default_deltas(2.0, 4) == (2.0, 1.0, 0.5, 0.25)
    assert G.default_deltas(1.0, 2, final_zero=True) == (1.0, 0.5, 0.0)
    assert G.default_deltas(9.0, 3, factor=1 / 3) == pytest.approx((9.0, 3.0, 1.0))
    with pytest.raises(ValueError, match=r"factor must be in \(0, 1\).*got 1.0"):
        G.default_deltas(1.0, 3, factor=1.0)
    with pytest.raises(ValueError, match=r"delta0 must be > 0, got 0"):
        G.default_deltas(0, 3)
    with pytest.raises(ValueError, match=r"M must be an integer, got 2.5"):
        G.default_deltas(1.0, 2.5)


def test_explicit_argument_errors():
    x0 = torch.tensor([1.0])
    with pytest.raises(TypeError, match=r"x0 must be a torch.Tensor"):
        G.gradient_descent(rastrigin, [1.0], 0.1, 3)
    with pytest.raises(ValueError, match=r"x0 must be a floating tensor.*torch.int64"):
        G.gradient_descent(rastrigin, torch.tensor([1]), 0.1, 3)
    with pytest.raises(ValueError, match=r"lr must be > 0, got -0.1"):
        G.gradient_descent(rastrigin, x0, -0.1, 3)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
        G.sgd_noisy(rastrigin, x0, 0.1, -1, 1.0)
    with pytest.raises(ValueError, match=r"noise_std must be >= 0, got -1"):
        G.sgd_noisy(rastrigin, x0, 0.1, 3, -1)
    with pytest.raises(ValueError, match=r"deltas must list at least one stage"):
        G.graduated_optimization(rastrigin, x0, [], 3, 0.1, 4)
    with pytest.raises(ValueError, match=r"deltas\[m\] must be >= 0, got -1"):
        G.graduated_optimization(rastrigin, x0, [1.0, -1.0], 3, 0.1, 4)
    with pytest.raises(ValueError, match=r"lr must be one value or one per stage \(2\), got 3"):
        G.graduated_optimization(rastrigin, x0, [1.0, 0.5], 3, [0.1, 0.1, 0.1], 4)
    with pytest.raises(ValueError, match=r"steps_per_stage must be an integer, got 1.5"):
        G.graduated_optimization(rastrigin, x0, [1.0], 1.5, 0.1, 4)
    with pytest.raises(ValueError, match=r"n_samples must be an integer >= 1, got 0"):
        G.graduated_optimization(rastrigin, x0, [1.0], 3, 0.1, 0)
    with pytest.raises(ValueError, match=r"dist must be one of .*got 'cube'"):
        G.graduated_optimization(rastrigin, x0, [1.0], 3, 0.1, 4, dist="cube")


# ------------------------------------------------------------------------- implicit, SGD


def test_gamma_values_and_domain():
    assert G.gamma(0, 4, 1.0) == pytest.approx(4 / 5)
    assert G.gamma(3, 4, 1.0) == pytest.approx(1 / 2)
    assert G.gamma(1, 4, 0.9) == pytest.approx((3 / 4) ** 0.9)
    assert all(0 < G.gamma(m, 10, 2.0) < 1 for m in range(10))
    with pytest.raises(ValueError, match=r"m must be an integer with 0 <= m < M = 4, got 4"):
        G.gamma(4, 4, 1.0)
    with pytest.raises(ValueError, match=r"m must be an integer with 0 <= m < M = 4, got -1"):
        G.gamma(-1, 4, 1.0)
    with pytest.raises(ValueError, match=r"M must be an integer >= 1, got 0"):
        G.gamma(0, 0, 1.0)
    with pytest.raises(ValueError, match=r"p must be > 0, got 0"):
        G.gamma(0, 4, 0)


@settings(max_examples=50, deadline=None)
@given(M=st.integers(1, 60), p=st.floats(0.05, 3.0), data=st.data())
def test_gamma_product_telescopes(M, p, data):
    m = data.draw(st.integers(0, M))
    prod = math.prod(G.gamma(k, M, p) for k in range(m))
    assert prod == pytest.approx(((M + 1 - m) / (M + 1)) ** p, rel=1e-12)
    assert prod == pytest.approx(schedules.poly_factor(m, M, p), rel=1e-12)


def test_smoothing_degree():
    # Sato & Iiduka (2023)/004: delta = eta sqrt(C^2 / b); e.g. eta = 0.1, b = 32, C^2 = 1280 ->
    # sqrt(40)/10
    assert G.smoothing_degree(0.1, 32, 1280.0) == pytest.approx(math.sqrt(40) / 10)
    assert G.smoothing_degree(0.1, 2**9, 1280.0) == pytest.approx(0.1 * math.sqrt(2.5))
    grid = G.smoothing_degree(np.array([[0.1], [0.05]]), np.array([32, 128]), 4.0)
    assert grid.shape == (2, 2) and grid[0, 1] == pytest.approx(0.1 * math.sqrt(4 / 128))
    # halving lr or quadrupling b halves delta
    assert G.smoothing_degree(0.05, 32, 2.0) == pytest.approx(G.smoothing_degree(0.1, 128, 2.0))
    with pytest.raises(ValueError, match=r"batch_size must be finite and > 0"):
        G.smoothing_degree(0.1, 0, 1.0)
    with pytest.raises(ValueError, match=r"c2 must be finite and >= 0"):
        G.smoothing_degree(0.1, 32, -1.0)
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0"):
        G.smoothing_degree(float("inf"), 32, 1.0)


@pytest.mark.parametrize("M,p", [(4, 0.9), (9, 0.5), (20, 1.0), (3, 2.0)])
def test_implicit_schedule(M, p):
    lr0, b0 = 0.1, 32
    gammas = [G.gamma(k, M, p) for k in range(M)]
    lr_st = G.implicit_schedule(lr0, b0, M, p, mode="lr")
    b_st = G.implicit_schedule(lr0, b0, M, p, mode="batch")
    h_st = G.implicit_schedule(lr0, b0, M, p, mode="hybrid", split=0.5)
    assert [s.m for s in lr_st] == list(range(M + 1))
    for m in range(M + 1):
        target = math.prod(gammas[:m])
        for st_ in (lr_st, b_st, h_st):
            assert st_[m].target_ratio == pytest.approx(target, rel=1e-12)
        # lr mode: exact; batch/hybrid: exact up to rounding b to an integer
        assert lr_st[m].delta_ratio == pytest.approx(target, rel=1e-12)
        assert lr_st[m].batch_size == b0 and lr_st[m].lr == pytest.approx(lr0 * target)
        assert b_st[m].lr == lr0
        assert b_st[m].batch_size == math.floor(b0 / target**2 + 0.5)
        for st_ in (b_st, h_st):
            assert st_[m].delta_ratio == pytest.approx(target, rel=0.5 / st_[m].batch_size)
        assert h_st[m].lr == pytest.approx(lr0 * math.sqrt(target))
    # Algorithm 3: kappa_m / sqrt(lambda_m) = gamma_m with kappa <= 1 and lambda >= 1
    for m in range(M):
        for st_ in (lr_st, h_st):
            kappa = st_[m + 1].lr / st_[m].lr
            assert 0 < kappa <= 1
        for st_ in (b_st, h_st):
            assert st_[m + 1].batch_size >= st_[m].batch_size
        kappa = h_st[m + 1].lr / h_st[m].lr
        assert kappa == pytest.approx(gammas[m] ** 0.5)


def test_lr_and_batch_modes_give_the_same_deltas():
    lr_st = G.implicit_schedule(0.1, 128, 4, 0.9, mode="lr")
    b_st = G.implicit_schedule(0.1, 128, 4, 0.9, mode="batch")
    a = [s.delta_ratio for s in lr_st]
    b = [s.delta_ratio for s in b_st]
    assert a == pytest.approx(b, rel=0.5 / 128)
    assert [s.target_ratio for s in lr_st] == [s.target_ratio for s in b_st]
    # the seed's numbers for 5 stages (200 epochs, every 40), p = 0.9:
    assert a == pytest.approx([1.0, 0.8**0.9, 0.6**0.9, 0.4**0.9, 0.2**0.9])


def test_implicit_schedule_cap_and_errors():
    capped = G.implicit_schedule(0.1, 32, 9, 1.0, mode="batch", max_batch=1000)
    assert max(s.batch_size for s in capped) == 1000
    assert capped[-1].delta_ratio > capped[-1].target_ratio  # the cap limits the decay
    with pytest.raises(ValueError, match=r"mode must be one of \('lr', 'batch', 'hybrid'\)"):
        G.implicit_schedule(0.1, 32, 4, 0.9, mode="momentum")
    with pytest.raises(ValueError, match=r"split must be a number in \[0, 1\], got 1.5"):
        G.implicit_schedule(0.1, 32, 4, 0.9, mode="hybrid", split=1.5)
    with pytest.raises(ValueError, match=r"batch0 must be an integer, got 32.5"):
        G.implicit_schedule(0.1, 32.5, 4, 0.9)
    with pytest.raises(ValueError, match=r"p must be > 0, got -1"):
        G.implicit_schedule(0.1, 32, 4, -1)
    with pytest.raises(ValueError, match=r"max_batch must be > 0, got 0"):
        G.implicit_schedule(0.1, 32, 4, 0.9, max_batch=0)


@pytest.mark.parametrize("mode", ["lr", "batch", "hybrid"])
@pytest.mark.parametrize("every", [None, 40])
def test_poly_specs_agree_with_implicit_schedule(mode, every):
    lr0, b0, M, p, epochs = 0.1, 32, 4, 0.9, 200
    stages = G.implicit_schedule(lr0, b0, M, p, mode=mode, split=0.4)
    lr_spec, batch_spec = G.implicit_specs(M, p, mode=mode, split=0.4, every=every)
    assert json.loads(json.dumps([lr_spec, batch_spec])) == [lr_spec, batch_spec]
    plan = G.poly_schedule(lr0, b0, M, p, mode=mode, epochs=epochs, split=0.4, every=every)
    for e in range(epochs):
        st_ = stages[e // 40]
        assert schedules.lr_at(lr_spec, lr0, e, epochs) == st_.lr
        assert schedules.batch_size_at(batch_spec, b0, e, epochs) == st_.batch_size
        assert plan.lrs[e] == st_.lr and plan.batch_sizes[e] == st_.batch_size
        assert plan.delta_ratios[e] == pytest.approx(st_.delta_ratio, rel=1e-12)
    if mode == "lr":
        assert batch_spec == {"kind": "constant"}
    if mode == "batch":
        assert lr_spec == {"kind": "constant"}


def test_per_epoch_poly_is_stagewise_with_one_epoch_per_stage():
    plan = G.poly_schedule(0.1, 32, M=99, p=0.9, mode="lr", epochs=100)
    assert plan.lrs == pytest.approx([0.1 * (1 - e / 100) ** 0.9 for e in range(100)])
    per_epoch = schedules.lr_values({"kind": "poly", "power": 0.9}, 0.1, 100)
    assert plan.lrs == pytest.approx(per_epoch, rel=1e-12)


@pytest.mark.parametrize("mode", ["lr", "batch", "hybrid"])
def test_step_schedules_of_the_seed(mode):
    """Every 40 of 200 epochs: lr x 1/sqrt(2), or b x 2, or lr x sqrt(3)/2 and b x 1.5."""
    plan = G.step_schedule(0.1, 32, mode)
    assert len(plan.lrs) == len(plan.batch_sizes) == len(plan.delta_ratios) == 200
    # from the second epoch of each stage on, once the batch has grown too (see the next test)
    ratios = [plan.delta_ratios[40 * k + 1] for k in range(5)]
    for k in range(4):
        assert ratios[k + 1] / ratios[k] == pytest.approx(2**-0.5, rel=1e-12)
        # constant within a stage, after its first epoch
        assert len(set(plan.delta_ratios[40 * k + 1: 40 * (k + 1)])) == 1
    assert ratios[0] == 1.0
    lrs = [plan.lrs[40 * k + 1] for k in range(5)]
    bs = [plan.batch_sizes[40 * k + 1] for k in range(5)]
    if mode == "lr":
        assert lrs == pytest.approx([0.1 * 2 ** (-k / 2) for k in range(5)], rel=1e-12)
        assert bs == [32] * 5
    elif mode == "batch":
        assert lrs == [0.1] * 5 and bs == [32, 64, 128, 256, 512]
    else:
        assert lrs == pytest.approx([0.1 * (3**0.5 / 2) ** k for k in range(5)], rel=1e-12)
        assert bs == [32, 48, 72, 108, 162]
    # the spec dicts reproduce the plan through the training loop's API
    for e in range(200):
        assert schedules.lr_at(plan.lr_schedule, 0.1, e, 200) == plan.lrs[e]
        assert schedules.batch_size_at(plan.batch_schedule, 32, e, 200) == plan.batch_sizes[e]
    assert json.loads(json.dumps(plan.lr_schedule)) == plan.lr_schedule
    with pytest.raises(ValueError, match=r"mode must be one of \('lr', 'batch', 'hybrid'\)"):
        G.step_schedule(0.1, 32, "cosine")
    with pytest.raises(ValueError, match=r"every must be > 0, got 0"):
        G.step_schedule(0.1, 32, mode, every=0)
    with pytest.raises(ValueError, match=r"batch_delay must be an integer >= 0 \(epochs\)"):
        G.step_schedule(0.1, 32, mode, batch_delay=-1)


def authors_step_loop(lr0, b0, mode, epochs, every):
    """The schedule of naoki-sato3/new-sigma-nice cifar.py, written out: torch's StepLR on a
    real optimizer, stepped after each epoch, and the batch replaced after epoch e when
    e % every == 0 and e != 0 (by int(b * factor)). Returns the (lr, b) of every epoch."""
    kappa, lam = {"lr": (0.707106781186548, None), "batch": (None, 2),
                  "hybrid": (0.866025403784439, 1.5)}[mode]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=kappa) if kappa else None
    batch, used = b0, []
    for epoch in range(epochs):
        used.append((opt.param_groups[0]["lr"], batch))  # what this epoch trains with
        opt.step()  # the epoch's training (no gradients here: nothing moves)
        if sched is not None:
            sched.step()
        if lam is not None and epoch % every == 0 and epoch != 0:
            batch = int(batch * lam)
    return used


@pytest.mark.parametrize("epochs,every", [(200, 40), (5, 1), (20, 4)])
@pytest.mark.parametrize("mode", ["lr", "batch", "hybrid"])
def test_step_schedules_follow_the_authors_loop(mode, epochs, every):
    plan = G.step_schedule(0.1, 32, mode, epochs=epochs, every=every)
    used = authors_step_loop(0.1, 32, mode, epochs, every)
    assert plan.batch_sizes == [b for _, b in used]
    # the code's factors are 1/sqrt(2) and sqrt(3)/2 to 15 digits
    assert plan.lrs == pytest.approx([lr for lr, _ in used], rel=1e-13)
    lr_changes = [e for e in range(1, epochs) if plan.lrs[e] != plan.lrs[e - 1]]
    b_changes = [e for e in range(1, epochs) if plan.batch_sizes[e] != plan.batch_sizes[e - 1]]
    stage_starts = list(range(every, epochs, every))  # 0-based: 40, 80, 120, 160
    assert lr_changes == ([] if mode == "batch" else stage_starts)
    assert b_changes == ([] if mode == "lr" else [e + 1 for e in stage_starts if e + 1 < epochs])
    if (epochs, every) == (200, 40):  # pinned: lr at 40, 80, ..., b one epoch later
        assert b_changes in ([], [41, 81, 121, 161]) and lr_changes in ([], [40, 80, 120, 160])
    # batch_delay=0 grows the batch together with the learning-rate decay
    now = G.step_schedule(0.1, 32, mode, epochs=epochs, every=every, batch_delay=0)
    assert [e for e in range(1, epochs) if now.batch_sizes[e] != now.batch_sizes[e - 1]] == \
        ([] if mode == "lr" else stage_starts)
