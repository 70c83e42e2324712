"""Tests for labkit.noise: smoothing degrees (Sato & Iiduka (2024) eqs. (12)-(14)), the
stochastic-gradient
variance C^2 against explicit per-example loops and Monte Carlo, and search-direction noise
against reference optimizers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit.noise import (
    DirectionNoiseTracker,
    GradientStats,
    delta_nshb,
    delta_sgd,
    delta_shb,
    direction_noise,
    full_gradient,
    gradient_variance,
    k2_estimate,
    momentum_factor,
    smoothing_degree,
)

CE = nn.CrossEntropyLoss(reduction="none")

# Sato & Iiduka (2024) §4.3: eta = 0.1, beta = 0.9, C^2 bounds; K from the authors' code.
ETA, BETA = 0.1, 0.9
C2_SGD, C2_SHB, C2_NSHB = 1280.0, 25.318, 128.0
K_SHB = 1.77

lrs = st.floats(1e-4, 10.0)
batches = st.floats(1.0, 1e5)
betas = st.floats(0.0, 0.99)
variances = st.one_of(st.just(0.0), st.floats(1e-6, 1e4))


# ---------------------------------------------------------------------------- delta formulas


def test_delta_sgd_paper_constants_by_hand():
    # eta sqrt(C^2 / b) = 0.1 * sqrt(1280 / 512) = 0.1 * sqrt(2.5)
    assert delta_sgd(ETA, 512, C2_SGD) == pytest.approx(0.158113883008419, rel=1e-12)
    assert delta_sgd(0.5, 8, 2.0) == pytest.approx(0.25, rel=1e-12)


def test_delta_nshb_paper_constants_by_hand():
    # eta sqrt(C^2 / ((1 - beta) b)) = 0.1 * sqrt(128 / (0.1 * 512)) = 0.1 * sqrt(2.5)
    assert delta_nshb(ETA, 512, BETA, C2_NSHB) == pytest.approx(0.158113883008419, rel=1e-12)
    # Sato & Iiduka (2024) §5.1: with the estimated C^2, delta_NSHB and delta_SGD coincide at every
    # b
    b = np.array([8.0, 64.0, 1024.0, 8192.0])
    np.testing.assert_allclose(delta_nshb(ETA, b, BETA, C2_NSHB), delta_sgd(ETA, b, C2_SGD))


def test_delta_shb_paper_constants_by_hand():
    # a = 0.9 * (0.81 - 0.9 + 1) / 0.01 = 81.9
    assert momentum_factor(BETA) == pytest.approx(81.9, rel=1e-12)
    # 0.1 * sqrt(82.9 * 25.318 / 1024 + 81.9 * 1.77^2)
    expected = 0.1 * math.sqrt(82.9 * 25.318 / 1024 + 81.9 * 3.1329)
    assert expected == pytest.approx(1.6082107452606687, rel=1e-12)
    assert delta_shb(ETA, 1024, BETA, C2_SHB, K_SHB**2) == pytest.approx(expected, rel=1e-12)


def test_delta_shb_floor_independent_of_batch_size():
    floor = ETA * math.sqrt(81.9 * K_SHB**2)
    values = delta_shb(ETA, np.array([8.0, 2**13, 1e12]), BETA, C2_SHB, K_SHB**2)
    assert np.all(values > floor)
    assert values[-1] == pytest.approx(floor, rel=1e-9)
    # without the K^2 term SHB is SGD with an inflated variance (1 + a) C^2
    assert delta_shb(ETA, 64, BETA, 3.0, 0.0) == pytest.approx(
        delta_sgd(ETA, 64, 82.9 * 3.0), rel=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(lr=lrs, b=batches, c2=variances, k2=variances)
def test_beta_zero_reduces_to_sgd(lr, b, c2, k2):
    ref = delta_sgd(lr, b, c2)
    assert delta_shb(lr, b, 0.0, c2, k2) == pytest.approx(ref, rel=1e-12, abs=1e-300)
    assert delta_nshb(lr, b, 0.0, c2) == pytest.approx(ref, rel=1e-12, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(lr=lrs, b=batches, beta=betas, c2=variances)
def test_nshb_is_sgd_over_sqrt_one_minus_beta(lr, b, beta, c2):
    expected = delta_sgd(lr, b, c2) / math.sqrt(1 - beta)
    assert delta_nshb(lr, b, beta, c2) == pytest.approx(expected, rel=1e-12, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(lr=lrs, beta=betas, c2=st.floats(1e-3, 1e4), k2=variances)
def test_deltas_decrease_in_batch_size(lr, beta, c2, k2):
    b = np.array([1.0, 2.0, 8.0, 64.0, 512.0, 8192.0])
    for values in (
        delta_sgd(lr, b, c2),
        delta_shb(lr, b, beta, c2, k2),
        delta_nshb(lr, b, beta, c2),
    ):
        assert np.all(np.diff(values) < 0)
    # SHB smooths at least as much as NSHB, which smooths at least as much as SGD
    assert np.all(delta_shb(lr, b, beta, c2, k2) >= delta_nshb(lr, b, beta, c2) * (1 - 1e-12))
    assert np.all(delta_nshb(lr, b, beta, c2) >= delta_sgd(lr, b, c2) * (1 - 1e-12))


def test_momentum_factor_increases_in_beta():
    beta = np.linspace(0.0, 0.99, 50)
    assert np.all(np.diff(momentum_factor(beta)) > 0)
    assert momentum_factor(0.0) == 0.0


def test_vectorized_numpy_and_torch():
    b = np.array([8, 16, 32, 64])
    out = delta_shb(ETA, b, BETA, C2_SHB, 3.0)
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    for k, bk in enumerate(b):
        assert out[k] == pytest.approx(delta_shb(ETA, int(bk), BETA, C2_SHB, 3.0), rel=1e-12)
    assert isinstance(delta_sgd(ETA, 64, C2_SGD), float)
    assert isinstance(delta_sgd(ETA, [8, 64], C2_SGD), np.ndarray)

    bt = torch.tensor([8, 16, 32, 64])  # integer tensor
    for fn, args in (
        (delta_sgd, (C2_SGD,)),
        (delta_nshb, (BETA, C2_NSHB)),
        (delta_shb, (BETA, C2_SHB, 3.0)),
    ):
        t = fn(ETA, bt, *args)
        assert isinstance(t, torch.Tensor) and t.shape == (4,) and t.is_floating_point()
        np.testing.assert_allclose(t.numpy(), fn(ETA, b, *args), rtol=1e-6)
    t64 = delta_sgd(ETA, bt.double(), C2_SGD)
    assert t64.dtype == torch.float64
    # arrays broadcast in every argument, e.g. delta against the learning rate
    lr = np.array([0.01, 0.1, 1.0])
    np.testing.assert_allclose(delta_sgd(lr, 100, 4.0), lr * 0.2, rtol=1e-12)
    np.testing.assert_allclose(delta_sgd(torch.tensor(lr), 100, 4.0).numpy(), lr * 0.2)


def test_smoothing_degree_dispatch():
    kw = {"lr": ETA, "batch_size": 256, "c2": 10.0}
    assert smoothing_degree("sgd", **kw) == delta_sgd(ETA, 256, 10.0)
    assert smoothing_degree("SGD", beta=0.9, k2=1.0, **kw) == delta_sgd(ETA, 256, 10.0)
    assert smoothing_degree("nshb", beta=0.9, **kw) == delta_nshb(ETA, 256, 0.9, 10.0)
    assert smoothing_degree("shb", beta=0.9, k2=2.0, **kw) == delta_shb(ETA, 256, 0.9, 10.0, 2.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        smoothing_degree("adam", **kw)
    with pytest.raises(ValueError, match="beta is required"):
        smoothing_degree("nshb", **kw)
    with pytest.raises(ValueError, match="k2 .* is required"):
        smoothing_degree("shb", beta=0.9, **kw)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: delta_sgd(0.0, 8, 1.0), r"lr must be > 0 and finite, got 0\.0"),
        (lambda: delta_sgd(-0.1, 8, 1.0), r"lr must be > 0 and finite, got -0\.1"),
        (lambda: delta_sgd(float("inf"), 8, 1.0), "lr must be > 0 and finite"),
        (lambda: delta_sgd(0.1, 0.5, 1.0), r"batch_size must be >= 1 and finite, got 0\.5"),
        (lambda: delta_sgd(0.1, [8, 0], 1.0), r"batch_size must be >= 1.*got 0\.0 \(an element"),
        (lambda: delta_sgd(0.1, torch.tensor([0, 2]), 1.0), r"batch_size must be >= 1"),
        (lambda: delta_sgd(0.1, float("nan"), 1.0), "batch_size must be >= 1 and finite, got nan"),
        (lambda: delta_sgd(0.1, 8, -1.0), r"c2 must be >= 0 and finite, got -1\.0"),
        (lambda: delta_shb(0.1, 8, 1.0, 1.0, 1.0), r"beta must be in \[0, 1\), got 1\.0"),
        (lambda: delta_nshb(0.1, 8, -0.1, 1.0), r"beta must be in \[0, 1\), got -0\.1"),
        (lambda: delta_shb(0.1, 8, 0.9, 1.0, -2.0), r"k2 must be >= 0 and finite, got -2\.0"),
        (lambda: momentum_factor(1.5), r"beta must be in \[0, 1\), got 1\.5"),
    ],
)
def test_delta_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_delta_type_errors():
    with pytest.raises(TypeError, match="batch_size must be a real number"):
        delta_sgd(0.1, "64", 1.0)
    with pytest.raises(TypeError, match="lr must be a real number"):
        delta_sgd(object(), 64, 1.0)
    with pytest.raises(TypeError, match="c2 must be real"):
        delta_sgd(0.1, 64, torch.tensor(1 + 1j))


# ---------------------------------------------------------------------------- gradient variance


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_bn_cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def mlp_data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def cnn_data(n=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def per_example_grads(model, x, y, names=None):
    """Reference: one backward pass per example, model in eval mode; rows are flattened g_i."""
    was = model.training
    model.eval()
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(x.shape[0]):
        loss = CE(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.train(was)
    return torch.stack(rows).double()


def reference_stats(G):
    mean = G.mean(0)
    return {
        "c2": float(((G - mean) ** 2).sum(1).mean()),
        "full": float((mean**2).sum()),
        "mean_sq": float((G**2).sum(1).mean()),
    }


@pytest.mark.parametrize(
    ("make_model", "make_data"), [(make_mlp, mlp_data), (make_bn_cnn, cnn_data)]
)
def test_gradient_variance_matches_per_example_loop(make_model, make_data):
    model = make_model()
    x, y = make_data()
    ref = reference_stats(per_example_grads(model, x, y))
    stats = gradient_variance(model, CE, (x, y), chunk_size=7)
    assert isinstance(stats, GradientStats)
    assert stats.n == x.shape[0]
    assert stats.c2 == pytest.approx(ref["c2"], rel=1e-10)
    assert stats.full_grad_norm_sq == pytest.approx(ref["full"], rel=1e-10)
    assert stats.mean_sq_grad_norm == pytest.approx(ref["mean_sq"], rel=1e-10)
    assert stats.mean_sq_grad_norm == pytest.approx(stats.c2 + stats.full_grad_norm_sq, rel=1e-10)
    assert stats.c2 > 0 and stats.full_grad_norm_sq > 0


def test_full_gradient_matches_loop():
    model = make_bn_cnn()
    x, y = cnn_data()
    G = per_example_grads(model, x, y)
    full = full_gradient(model, CE, (x, y), chunk_size=5)
    assert [f.shape for f in full] == [p.shape for p in model.parameters()]
    assert all(f.dtype == torch.float64 for f in full)
    flat = torch.cat([f.reshape(-1) for f in full])
    torch.testing.assert_close(flat, G.mean(0), rtol=1e-10, atol=1e-13)
    stats = gradient_variance(model, CE, (x, y))
    assert float((flat**2).sum()) == pytest.approx(stats.full_grad_norm_sq, rel=1e-10)


def test_chunking_invariance():
    model = make_bn_cnn(seed=3)
    x, y = cnn_data(n=20)
    results = [gradient_variance(model, CE, (x, y), chunk_size=c) for c in (1, 7, 64)]
    for r in results[1:]:
        assert r.c2 == pytest.approx(results[0].c2, rel=1e-12)
        assert r.full_grad_norm_sq == pytest.approx(results[0].full_grad_norm_sq, rel=1e-12)
        assert r.mean_sq_grad_norm == pytest.approx(results[0].mean_sq_grad_norm, rel=1e-12)
        assert r.n == 20


def test_iterable_of_batches_equals_concatenation():
    model = make_mlp(seed=4)
    x, y = mlp_data(n=33)
    whole = gradient_variance(model, CE, (x, y))
    parts = [(x[:10], y[:10]), (x[10:11], y[10:11]), (x[11:], y[11:])]
    split = gradient_variance(model, CE, parts, chunk_size=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    from_loader = gradient_variance(model, CE, loader, chunk_size=3)
    for r in (split, from_loader):
        assert r.n == 33
        assert r.c2 == pytest.approx(whole.c2, rel=1e-12)
        assert r.full_grad_norm_sq == pytest.approx(whole.full_grad_norm_sq, rel=1e-12)
    torch.testing.assert_close(
        torch.cat([f.reshape(-1) for f in full_gradient(model, CE, parts, chunk_size=4)]),
        torch.cat([f.reshape(-1) for f in full_gradient(model, CE, (x, y))]),
        rtol=1e-12,
        atol=1e-15,
    )


def test_modes_restored_and_buffers_untouched():
    model = make_bn_cnn()
    model.train()
    model[4].eval()  # a mixed state: one batch-norm layer frozen
    before = {n: b.clone() for n, b in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    x, y = cnn_data()
    gradient_variance(model, CE, (x, y))
    full_gradient(model, CE, (x, y))
    assert [m.training for m in model.modules()] == flags
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert all(p.grad is None for p in model.parameters())


def test_params_subset():
    model = make_mlp(seed=5)
    x, y = mlp_data()
    names = ["2.weight", "2.bias"]
    ref = reference_stats(per_example_grads(model, x, y, names=names))
    by_name = gradient_variance(model, CE, (x, y), params=names)
    by_tensor = gradient_variance(model, CE, (x, y), params=[model[2].weight, model[2].bias])
    assert by_name.c2 == pytest.approx(ref["c2"], rel=1e-10)
    assert by_tensor.c2 == pytest.approx(ref["c2"], rel=1e-10)
    first_layer = gradient_variance(model, CE, (x, y), params=["0.weight"])
    first_grad = full_gradient(model, CE, (x, y), params=["0.weight"])
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    frozen = gradient_variance(model, CE, (x, y))
    assert frozen.c2 == pytest.approx(ref["c2"], rel=1e-10)
    assert len(full_gradient(model, CE, (x, y))) == 2
    # an explicitly named frozen parameter is still differentiated
    again = gradient_variance(model, CE, (x, y), params=["0.weight"])
    assert again.c2 == pytest.approx(first_layer.c2, rel=1e-12)
    torch.testing.assert_close(
        full_gradient(model, CE, (x, y), params=["0.weight"])[0], first_grad[0], rtol=1e-12,
        atol=0
    )


def test_float32_model_close_to_float64():
    model = make_bn_cnn(seed=6)
    x, y = cnn_data()
    ref = gradient_variance(model, CE, (x, y)).c2
    got = gradient_variance(model.float(), CE, (x.float(), y)).c2
    assert got == pytest.approx(ref, rel=1e-4)


def test_minibatch_variance_is_c2_over_b_monte_carlo():
    """Theorem 3.1 with equality: with replacement, E||grad f_S - grad f||^2 = C^2 / b."""
    torch.manual_seed(7)
    model = nn.Linear(3, 2).double()
    n, b, draws = 12, 3, 40000
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    G = per_example_grads(model, x, y)
    gbar = G.mean(0)
    c2 = gradient_variance(model, CE, (x, y)).c2

    # the mini-batch gradient of the training loss is the mean of the per-example rows
    idx = torch.randint(0, n, (draws, b), generator=g)
    for row in idx[:3]:
        loss = CE(model(x[row]), y[row]).mean()
        mb = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, model.parameters())])
        torch.testing.assert_close(mb, G[row].mean(0), rtol=1e-12, atol=1e-14)

    err = ((G[idx].mean(1) - gbar) ** 2).sum(1)
    se = float(err.std()) / math.sqrt(draws)
    assert abs(float(err.mean()) - c2 / b) < 4 * se
    # without replacement the finite-population correction (n - b) / (n - 1) applies
    idx_wo = torch.rand(draws, n, generator=g).argsort(1)[:, :b]
    err_wo = ((G[idx_wo].mean(1) - gbar) ** 2).sum(1)
    se_wo = float(err_wo.std()) / math.sqrt(draws)
    assert abs(float(err_wo.mean()) - c2 / b * (n - b) / (n - 1)) < 4 * se_wo
    assert abs(float(err_wo.mean()) - c2 / b) > 4 * se_wo  # the two really differ here


def test_gradient_variance_errors():
    model = make_mlp()
    x, y = mlp_data()
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        gradient_variance(model, CE, (x, y), chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        gradient_variance(model, CE, (x, y), chunk_size=2.5)
    with pytest.raises(ValueError, match="one loss per example"):
        gradient_variance(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="one loss per example"):
        full_gradient(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="same leading"):
        gradient_variance(model, CE, (x, y[:-1]))
    with pytest.raises(TypeError, match="data must be an"):
        gradient_variance(model, CE, x)
    with pytest.raises(TypeError, match="data batch 1 must be"):
        gradient_variance(model, CE, [(x, y), x])
    with pytest.raises(ValueError, match="data holds no examples"):
        gradient_variance(model, CE, [])
    with pytest.raises(ValueError, match="data holds no examples"):
        full_gradient(model, CE, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="'nope' is not a parameter name"):
        gradient_variance(model, CE, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        gradient_variance(model, CE, (x, y), params=[torch.zeros(2)])
    with pytest.raises(TypeError, match="params must hold"):
        gradient_variance(model, CE, (x, y), params=[3])
    with pytest.raises(ValueError, match="params is empty"):
        gradient_variance(model, CE, (x, y), params=[])
    with pytest.raises(ValueError, match="model has no parameters"):
        gradient_variance(nn.ReLU(), CE, (x, y))


# ---------------------------------------------------------------------------- K^2


def test_k2_estimate_models_and_state_dicts():
    x, y = mlp_data()
    models = [make_mlp(seed=s) for s in (10, 11, 12)]
    norms = [gradient_variance(m, CE, (x, y)).full_grad_norm_sq for m in models]
    assert k2_estimate(models, CE, (x, y)) == pytest.approx(max(norms), rel=1e-10)
    assert k2_estimate(models, CE, (x, y), reduce="mean") == pytest.approx(
        sum(norms) / 3, rel=1e-10
    )
    template = make_mlp(seed=99)
    snapshot = {k: v.clone() for k, v in template.state_dict().items()}
    states = [m.state_dict() for m in models]
    assert k2_estimate(states, CE, (x, y), model=template) == pytest.approx(max(norms), rel=1e-10)
    for k, v in template.state_dict().items():
        assert torch.equal(v, snapshot[k])  # the template is not modified
    sub = k2_estimate(models, CE, (x, y), params="2.bias")
    expected = max(float((full_gradient(m, CE, (x, y))[3] ** 2).sum()) for m in models)
    assert sub == pytest.approx(expected, rel=1e-10)


def test_k2_estimate_errors():
    x, y = mlp_data()
    m = make_mlp()
    with pytest.raises(ValueError, match="reduce must be 'max' or 'mean'"):
        k2_estimate([m], CE, (x, y), reduce="median")
    with pytest.raises(ValueError, match="points is empty"):
        k2_estimate([], CE, (x, y))
    with pytest.raises(TypeError, match="points must be a list"):
        k2_estimate(m, CE, (x, y))
    with pytest.raises(ValueError, match=r"points\[0\] is a state dict; pass model="):
        k2_estimate([m.state_dict()], CE, (x, y))
    with pytest.raises(TypeError, match=r"points\[1\] must be an nn.Module or a state dict"):
        k2_estimate([m, 3], CE, (x, y))
    with pytest.raises(TypeError, match="params as parameter names"):
        k2_estimate([m], CE, (x, y), params=[m[0].weight])


# ---------------------------------------------------------------------------- direction noise


def test_direction_noise_by_hand():
    d = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    g = [torch.tensor([1.0, 0.0]), torch.tensor([[-1.0]])]
    assert direction_noise(d, g) == pytest.approx(math.sqrt(4.0 + 16.0), rel=1e-15)
    with pytest.raises(ValueError, match="direction has 2 tensors but full_grad has 1"):
        direction_noise(d, g[:1])
    with pytest.raises(ValueError, match=r"tensor 1: direction has shape \(1, 1\)"):
        direction_noise(d, [g[0], torch.zeros(2)])


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def reference_full_grad(model, x, y):
    return per_example_grads(model, x, y).mean(0)


def minibatches(n, b, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (b,), generator=g) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_tracker_shb_matches_torch_sgd_momentum(weight_decay):
    model = make_mlp(seed=20)
    x, y = mlp_data(n=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=BETA, weight_decay=weight_decay)
    tracker = DirectionNoiseTracker(
        model, CE, (x, y), kind="shb", beta=BETA, weight_decay=weight_decay, chunk_size=10
    )
    for t, idx in enumerate(minibatches(32, 4, 6, seed=21)):
        opt.zero_grad()
        CE(model(x[idx]), y[idx]).mean().backward()
        g = flat(p.grad for p in model.parameters())
        w = flat(p.detach() for p in model.parameters())
        full = reference_full_grad(model, x, y) + weight_decay * w
        rec = tracker.step(measure=t % 2 == 0)
        opt.step()
        m = flat(opt.state[p]["momentum_buffer"] for p in model.parameters())
        torch.testing.assert_close(flat(tracker.direction), m, rtol=1e-13, atol=1e-15)
        if t % 2:
            assert rec is None
            continue
        assert rec.step == t
        assert rec.direction_noise == pytest.approx(float((m - full).norm()), rel=1e-9)
        assert rec.gradient_noise == pytest.approx(
            float((g + weight_decay * w - full).norm()), rel=1e-9
        )
        assert rec.full_grad_norm_sq == pytest.approx(float((full**2).sum()), rel=1e-9)
    assert tracker.steps == 6 and [r.step for r in tracker.records] == [0, 2, 4]
    assert tracker.k2() == pytest.approx(max(r.full_grad_norm_sq for r in tracker.records))
    assert tracker.k2("mean") == pytest.approx(
        sum(r.full_grad_norm_sq for r in tracker.records) / 3
    )


def test_tracker_nshb_matches_hand_loop():
    model = make_bn_cnn(seed=30)
    x, y = cnn_data(n=12)
    lr = 0.1
    tracker = DirectionNoiseTracker(model, CE, [(x[:9], y[:9]), (x[9:], y[9:])], kind="nshb",
                                    beta=BETA)
    d = None
    model.train()
    for idx in minibatches(12, 4, 3, seed=31):
        model.zero_grad()
        CE(model(x[idx]), y[idx]).mean().backward()  # train mode: batch statistics
        g = flat(p.grad for p in model.parameters())
        d = (1 - BETA) * g if d is None else (1 - BETA) * g + BETA * d
        full = reference_full_grad(model, x, y)  # eval mode: running statistics
        rec = tracker.step()
        assert model.training
        assert rec.direction_noise == pytest.approx(float((d - full).norm()), rel=1e-9)
        assert rec.gradient_noise == pytest.approx(float((g - full).norm()), rel=1e-9)
        with torch.no_grad():  # the NSHB step x <- x - lr d
            offset = 0
            for p in model.parameters():
                p.sub_(lr * d[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    torch.testing.assert_close(flat(tracker.direction), d, rtol=1e-13, atol=1e-15)


def test_tracker_sgd_direction_is_gradient_noise():
    model = make_mlp(seed=40)
    x, y = mlp_data(n=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = DirectionNoiseTracker(model, CE, (x, y))
    for idx in minibatches(20, 5, 3, seed=41):
        opt.zero_grad()
        CE(model(x[idx]), y[idx]).mean().backward()
        g = flat(p.grad for p in model.parameters())
        full = reference_full_grad(model, x, y)
        rec = tracker.step()
        opt.step()
        assert rec.direction_noise == rec.gradient_noise
        assert rec.direction_noise == pytest.approx(float((g - full).norm()), rel=1e-9)


def test_shb_noise_carries_gradient_bias():
    """Full-batch SHB (b = n): no sampling noise, yet omega_SHB = m_t - grad f(x_t) != 0."""
    model = make_mlp(seed=50)
    x, y = mlp_data(n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=BETA)
    shb = DirectionNoiseTracker(model, CE, (x, y), kind="shb", beta=BETA)
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).mean().backward()
        rec = shb.step()
        opt.step()
        assert rec.gradient_noise < 1e-12
    assert rec.direction_noise > 1.5 * math.sqrt(rec.full_grad_norm_sq)


def test_tracker_errors():
    model = make_mlp()
    x, y = mlp_data()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DirectionNoiseTracker(model, CE, (x, y), kind="adam")
    with pytest.raises(ValueError, match="beta is required for kind='shb'"):
        DirectionNoiseTracker(model, CE, (x, y), kind="shb")
    with pytest.raises(ValueError, match="kind='sgd' takes no momentum, got beta=0.9"):
        DirectionNoiseTracker(model, CE, (x, y), kind="sgd", beta=0.9)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got 1\.0"):
        DirectionNoiseTracker(model, CE, (x, y), kind="nshb", beta=1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        DirectionNoiseTracker(model, CE, (x, y), kind="nshb", beta=0.5, weight_decay=-1.0)
    tracker = DirectionNoiseTracker(model, CE, (x, y), kind="nshb", beta=0.5)
    with pytest.raises(ValueError, match="no measurement recorded yet"):
        tracker.k2()
    with pytest.raises(ValueError, match="parameter '0.weight' has no gradient"):
        tracker.step()
    CE(model(x), y).mean().backward()
    tracker.step(measure=False)
    with pytest.raises(ValueError, match="reduce must be 'max' or 'mean'"):
        tracker.k2("min")


def test_the_measurements_run_with_tf32_off():
    """C^2, grad f and K^2 are measurements: IEEE fp32 (labkit.precision.strict_fp32), and the
    previous settings come back afterwards."""
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    seen = set()

    def loss(out, target):
        seen.add((torch.backends.cudnn.conv.fp32_precision,
                  torch.backends.cuda.matmul.fp32_precision))
        return F.cross_entropy(out, target, reduction="none")

    model, data = make_mlp(), mlp_data()
    gradient_variance(model, loss, data)
    full_gradient(model, loss, data)
    k2_estimate([model], loss, data)
    assert seen == {("ieee", "ieee")}
    assert (torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == before


# ------------------------------------------------ gradient noise scale B_simple (McCandlish et al.)
# Names are imported inside the tests so that this section does not touch the import block above.


def test_noise_scale_matches_per_example_loop():
    from labkit.noise import NoiseScale, gradient_noise_scale

    model = make_mlp(seed=9)
    x, y = mlp_data()
    ref = reference_stats(per_example_grads(model, x, y))
    ns = gradient_noise_scale(model, CE, (x, y), chunk_size=7)
    assert isinstance(ns, NoiseScale)
    assert ns.trace_sigma == pytest.approx(ref["c2"], rel=1e-10)
    assert ns.grad_norm_sq == pytest.approx(ref["full"], rel=1e-10)
    assert ns.b_simple == pytest.approx(ref["c2"] / ref["full"], rel=1e-10)


def test_noise_scale_closed_form_least_squares():
    """f_i(w) = (a_i . w - y_i)^2 / 2 has g_i = r_i a_i with residual r_i = a_i . w - y_i, so
    tr(Sigma) = (1/n) sum_i ||r_i a_i - G||^2 and G = (1/n) sum_i r_i a_i in closed form."""
    from labkit.noise import gradient_noise_scale

    g = torch.Generator().manual_seed(10)
    n, d = 50, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    r = a @ model.weight.detach()[0] - y
    G = (r[:, None] * a).mean(0)
    trace = float(((r[:, None] * a - G) ** 2).sum(1).mean())

    def half_sq(out, target):
        return 0.5 * (out[:, 0] - target) ** 2

    ns = gradient_noise_scale(model, half_sq, (a, y), chunk_size=16)
    assert ns.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert ns.grad_norm_sq == pytest.approx(float(G @ G), rel=1e-12)
    assert ns.b_simple == pytest.approx(trace / float(G @ G), rel=1e-12)


def test_noise_scale_monte_carlo_two_batch_estimator():
    """E|g_B|^2 = |G|^2 + tr(Sigma)/B for batches drawn with replacement, and McCandlish et al.'s
    two-batch estimator recovers tr(Sigma), |G|^2 and B_simple from sampled mini-batch norms."""
    from labkit.noise import gradient_noise_scale, noise_scale_from_batch_norms

    torch.manual_seed(11)
    model = nn.Linear(3, 2).double()
    n, draws = 30, 60000
    g = torch.Generator().manual_seed(12)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    G = per_example_grads(model, x, y)
    exact = gradient_noise_scale(model, CE, (x, y))
    norms = {}
    for b in (2, 16):
        idx = torch.randint(0, n, (draws, b), generator=g)
        sq = (G[idx].mean(1) ** 2).sum(1)
        se = float(sq.std()) / math.sqrt(draws)
        assert abs(float(sq.mean()) - (exact.grad_norm_sq + exact.trace_sigma / b)) < 4 * se
        norms[b] = sq.numpy()
    est = noise_scale_from_batch_norms(norms[2], 2, norms[16], 16)
    assert est.trace_sigma == pytest.approx(exact.trace_sigma, rel=0.03)
    assert est.grad_norm_sq == pytest.approx(exact.grad_norm_sq, rel=0.03)
    assert est.b_simple == pytest.approx(exact.b_simple, rel=0.06)
    # exact expectations in, exact values out
    exp = {b: exact.grad_norm_sq + exact.trace_sigma / b for b in (2, 16)}
    exact_in = noise_scale_from_batch_norms(exp[2], 2, [exp[16], exp[16]], 16)
    assert exact_in.b_simple == pytest.approx(exact.b_simple, rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1e-3, 1e3))
def test_noise_scale_invariant_to_scaling_the_loss(scale):
    from labkit.noise import gradient_noise_scale

    model = make_mlp(seed=13)
    x, y = mlp_data()
    base = gradient_noise_scale(model, CE, (x, y))
    scaled = gradient_noise_scale(model, lambda out, t: scale * CE(out, t), (x, y))
    assert scaled.b_simple == pytest.approx(base.b_simple, rel=1e-9)
    assert scaled.trace_sigma == pytest.approx(scale**2 * base.trace_sigma, rel=1e-9)


def test_noise_scale_grows_as_the_gradient_vanishes():
    """On the segment w_t = w* + t (w0 - w*) towards a least-squares solution w*, G shrinks like
    t while the residuals, and so tr(Sigma), stay: B_simple grows like 1/t^2 and is inf at w*."""
    from labkit.noise import gradient_noise_scale

    g = torch.Generator().manual_seed(14)
    a = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()

    def half_sq(out, target):
        return 0.5 * (out[:, 0] - target) ** 2

    values = []
    for t in (1.0, 0.1, 0.01):
        with torch.no_grad():
            model.weight.copy_(w_star + t * (w0 - w_star))
        values.append(gradient_noise_scale(model, half_sq, (a, y)).b_simple)
    assert values[0] < values[1] < values[2]
    assert values[2] > 500 * values[0]


def test_noise_scale_errors_and_edge_cases():
    from labkit.noise import GradientStats, noise_scale, noise_scale_from_batch_norms

    with pytest.raises(TypeError, match="must be the GradientStats"):
        noise_scale({"c2": 1.0})
    with pytest.raises(ValueError, match="every per-example gradient is zero"):
        noise_scale(GradientStats(c2=0.0, full_grad_norm_sq=0.0, mean_sq_grad_norm=0.0, n=3))
    assert noise_scale(GradientStats(2.0, 0.0, 2.0, 3)).b_simple == math.inf
    assert noise_scale(GradientStats(2.0, 0.5, 2.5, 3)).b_simple == 4.0
    with pytest.raises(ValueError, match="big_batch must be larger than small_batch, got "
                                         "big_batch=4 and small_batch=8"):
        noise_scale_from_batch_norms(1.0, 8, 1.0, 4)
    with pytest.raises(ValueError, match="small_batch must be an int >= 1, got 0"):
        noise_scale_from_batch_norms(1.0, 0, 1.0, 4)
    with pytest.raises(ValueError, match="big_batch must be an int >= 1, got 2.5"):
        noise_scale_from_batch_norms(1.0, 1, 1.0, 2.5)
    with pytest.raises(ValueError, match=r"small_norm_sq must be >= 0 and finite, got -1\.0"):
        noise_scale_from_batch_norms([1.0, -1.0], 1, 1.0, 4)
    with pytest.raises(ValueError, match="big_norm_sq is empty"):
        noise_scale_from_batch_norms(1.0, 1, [], 4)
    # an estimate of |G|^2 <= 0 (too little averaging) gives an infinite B_simple
    assert noise_scale_from_batch_norms(4.0, 1, 0.5, 2).b_simple == math.inf
