"""Tests for labkit.sharpness: closed forms, a grid search, the first-order limit, rescaling
invariance, monotonicity in rho, exact restoration of the model, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit.sharpness import (
    NORMS,
    SharpnessResult,
    adaptive_sharpness,
    adaptive_sharpness_result,
    checkpoint_iterations,
)

F64 = torch.float64


def _mlp(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).to(F64)


def _mlp_batches(seed: int = 0, n_batches: int = 2, batch_size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n_batches * batch_size,), generator=g)
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


# --------------------------------------------------------------------------------------
# Closed form: linear model, squared loss, one example per batch
# --------------------------------------------------------------------------------------


def _closed_form(weight, bias, batches, rho, norm, adaptive):
    """max over ||delta / c||_p <= rho of (r + delta . xa)^2 - r^2 = (|r| + rho ||c xa||_q)^2 - r^2
    with xa = (x, 1), r = w . x + b - y, q the dual norm of p (1 for linf, 2 for l2)."""
    w = torch.cat([weight.flatten(), bias.flatten()]).detach()
    c = w.abs() if adaptive else torch.ones_like(w)
    values = []
    for x, y in batches:
        xa = torch.cat([x.flatten(), torch.ones(1, dtype=F64)])
        r = float(w @ xa - y.flatten())
        k = float((c * xa).abs().sum() if norm == "linf" else (c * xa).norm())
        values.append((abs(r) + rho * k) ** 2 - r**2)
    return values


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dim=st.integers(1, 6),
    n_batches=st.integers(1, 3),
    rho=st.floats(1e-4, 0.5),
    norm=st.sampled_from(NORMS),
    adaptive=st.booleans(),
)
def test_linear_squared_loss_closed_form(seed, dim, n_batches, rho, norm, adaptive):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, 1).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(1, generator=g, dtype=F64))
    batches = [
        (torch.randn(1, dim, generator=g, dtype=F64), torch.randn(1, 1, generator=g, dtype=F64))
        for _ in range(n_batches)
    ]
    result = adaptive_sharpness_result(
        model, F.mse_loss, batches, rho, norm=norm, adaptive=adaptive, n_iters=5
    )
    expected = _closed_form(model.weight, model.bias, batches, rho, norm, adaptive)
    assert result.per_batch == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.sharpness == pytest.approx(sum(expected) / n_batches, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------------------
# Grid search: a two-parameter nonconvex model
# --------------------------------------------------------------------------------------


class _TwoParam(nn.Module):
    """f(x) = b tanh(a x)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = nn.Parameter(torch.tensor(b, dtype=F64))

    def forward(self, x):
        return self.b * torch.tanh(self.a * x)


def _two_param_problem(seed):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(8, generator=g, dtype=F64)
    y = torch.sin(2 * x) + 0.1 * torch.randn(8, generator=g, dtype=F64)
    a0, b0 = (1.5 * torch.randn(2, generator=g, dtype=F64)).tolist()
    return _TwoParam(a0, b0), x, y


def _grid_sharpness(model, x, y, rho, adaptive, points=801):
    """Max over a grid of the box |delta_i| <= rho c_i (vertices included) minus L(w)."""
    a0, b0 = model.a.item(), model.b.item()
    ca, cb = (abs(a0), abs(b0)) if adaptive else (1.0, 1.0)
    ga = torch.linspace(a0 - rho * ca, a0 + rho * ca, points, dtype=F64)
    gb = torch.linspace(b0 - rho * cb, b0 + rho * cb, points, dtype=F64)
    a, b = torch.meshgrid(ga, gb, indexing="ij")
    losses = ((b[..., None] * torch.tanh(a[..., None] * x) - y) ** 2).mean(-1)
    base = ((b0 * torch.tanh(a0 * x) - y) ** 2).mean()
    return float(losses.max() - base)


# Seeds 0 and 2 have their maximum at a corner of the box, seed 26 on an edge (one coordinate
# interior), where the sign ascent needs the step halving to converge. The ascent is a local
# method: for some other seeds it stops at a corner that is only a local maximum.
@pytest.mark.parametrize("seed", [0, 2, 26])
@pytest.mark.parametrize("adaptive, rho", [(True, 0.5), (False, 0.8)])
def test_two_parameter_model_matches_grid_search(seed, adaptive, rho):
    model, x, y = _two_param_problem(seed)
    s = adaptive_sharpness(model, F.mse_loss, [(x, y)], rho, adaptive=adaptive, n_iters=30)
    grid = _grid_sharpness(model, x, y, rho, adaptive)
    assert s == pytest.approx(grid, rel=5e-3)


@pytest.mark.parametrize("seed", range(12))
def test_two_parameter_model_never_above_grid_max(seed):
    model, x, y = _two_param_problem(seed)
    for adaptive, rho in ((True, 0.5), (False, 0.8)):
        s = adaptive_sharpness(model, F.mse_loss, [(x, y)], rho, adaptive=adaptive, n_iters=30)
        grid = _grid_sharpness(model, x, y, rho, adaptive, points=401)
        # The grid holds the vertices; between grid points the loss can exceed the grid max
        # only by O(spacing^2) near an interior or edge maximum.
        assert 0.0 <= s <= grid + 1e-6


def test_step_halving_refines_an_edge_maximum():
    """Seed 26's maximum lies on an edge: a constant step of 2 rho keeps jumping between
    corners; the halving schedule converges to the edge point."""
    model, x, y = _two_param_problem(26)
    grid = _grid_sharpness(model, x, y, 0.5, True)
    halving = adaptive_sharpness(model, F.mse_loss, [(x, y)], 0.5, n_iters=30)
    one_step = adaptive_sharpness(model, F.mse_loss, [(x, y)], 0.5, n_iters=1)
    assert one_step < grid - 1e-4 * grid
    assert abs(halving - grid) < abs(one_step - grid) / 10


# --------------------------------------------------------------------------------------
# Properties on a small MLP
# --------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    rho=st.floats(0.0, 1.0),
    norm=st.sampled_from(NORMS),
    adaptive=st.booleans(),
    random_start=st.booleans(),
)
def test_nonnegative(seed, rho, norm, adaptive, random_start):
    model = _mlp(seed)
    result = adaptive_sharpness_result(
        model,
        F.cross_entropy,
        _mlp_batches(seed),
        rho,
        norm=norm,
        adaptive=adaptive,
        n_iters=4,
        random_start=random_start,
        generator=torch.Generator().manual_seed(seed),
    )
    assert result.sharpness >= 0.0
    assert all(v >= 0.0 for v in result.per_batch)
    assert all(p >= b for p, b in zip(result.perturbed_losses, result.base_losses, strict=True))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("adaptive", [True, False])
def test_first_order_limit(norm, adaptive):
    """For small rho, S = rho * ||c * grad L||_q + O(rho^2) (q dual to p), batch by batch."""
    model, batches = _mlp(), _mlp_batches()
    params = list(model.parameters())
    scales = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
    expected = []
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        cg = torch.cat([(g * c).flatten() for g, c in zip(grads, scales, strict=True)])
        expected.append(float(cg.abs().sum() if norm == "linf" else cg.norm()))
    mean_dual_norm = sum(expected) / len(expected)
    rho = 1e-6
    s = adaptive_sharpness(model, F.cross_entropy, batches, rho, norm=norm, adaptive=adaptive)
    assert s == pytest.approx(rho * mean_dual_norm, rel=1e-4)
    assert adaptive_sharpness(model, F.cross_entropy, batches, 1e-8, norm=norm) < 1e-7
    assert adaptive_sharpness(model, F.cross_entropy, batches, 0.0, norm=norm) == 0.0


@pytest.mark.parametrize("norm", NORMS)
def test_nondecreasing_in_rho(norm):
    model, batches = _mlp(), _mlp_batches()
    rhos = [0.0, 1e-8, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3]
    values = [adaptive_sharpness(model, F.cross_entropy, batches, r, norm=norm) for r in rhos]
    assert values[0] == 0.0
    assert all(b >= a - 1e-12 for a, b in zip(values[:-1], values[1:], strict=True))
    assert values[-1] > 100 * values[2] > 0


@pytest.mark.parametrize("scale", [10.0, 0.1])
@pytest.mark.parametrize("norm", NORMS)
def test_rescaling_invariance(scale, norm):
    """Scaling layer 1 (weight and bias) by a and layer 2's weight by 1/a leaves a ReLU
    network's function unchanged: adaptive sharpness does not change, plain sharpness does."""
    batches = _mlp_batches()
    m1, m2 = _mlp(), _mlp()
    with torch.no_grad():
        m2[0].weight.mul_(scale)
        m2[0].bias.mul_(scale)
        m2[2].weight.div_(scale)
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(m1(x), m2(x), rtol=1e-12, atol=1e-12)

    s1 = adaptive_sharpness(m1, F.cross_entropy, batches, 0.05, norm=norm, adaptive=True)
    s2 = adaptive_sharpness(m2, F.cross_entropy, batches, 0.05, norm=norm, adaptive=True)
    assert s1 > 0
    assert s2 == pytest.approx(s1, rel=1e-9)

    p1 = adaptive_sharpness(m1, F.cross_entropy, batches, 0.05, norm=norm, adaptive=False)
    p2 = adaptive_sharpness(m2, F.cross_entropy, batches, 0.05, norm=norm, adaptive=False)
    assert abs(p2 - p1) > 0.2 * max(p1, p2)


def test_result_dataclass_and_float_api_agree():
    model, batches = _mlp(), _mlp_batches(n_batches=3)
    result = adaptive_sharpness_result(model, F.cross_entropy, batches, 0.02, n_iters=6)
    assert isinstance(result, SharpnessResult)
    assert len(result.per_batch) == 3
    assert result.sharpness == pytest.approx(sum(result.per_batch) / 3, rel=1e-12)
    for x, y in batches:  # base losses are the plain eval-mode batch losses
        assert any(abs(b - F.cross_entropy(model(x), y).item()) < 1e-12 for b in result.base_losses)
    assert (result.rho, result.norm, result.adaptive, result.n_iters) == (0.02, "linf", True, 6)
    s = adaptive_sharpness(model, F.cross_entropy, batches, 0.02, n_iters=6)
    assert s == result.sharpness


def test_batches_may_be_a_generator():
    model, batches = _mlp(), _mlp_batches()
    s_list = adaptive_sharpness(model, F.cross_entropy, batches, 0.01)
    s_gen = adaptive_sharpness(model, F.cross_entropy, (b for b in batches), 0.01)
    assert s_gen == s_list


def test_random_start_is_reproducible_with_a_generator():
    model, batches = _mlp(), _mlp_batches()

    def run(seed, norm):
        gen = torch.Generator().manual_seed(seed)
        return adaptive_sharpness(
            model, F.cross_entropy, batches, 0.3, norm=norm, n_iters=3,
            random_start=True, generator=gen,
        )  # fmt: skip

    for norm in NORMS:
        assert run(0, norm) == run(0, norm)
        assert run(0, norm) != run(1, norm)


def test_unused_parameter_is_allowed():
    model = _mlp()
    model.unused = nn.Parameter(torch.ones(3, dtype=F64))
    s = adaptive_sharpness(model, F.cross_entropy, _mlp_batches(), 0.01)
    assert s > 0
    assert torch.equal(model.unused, torch.ones(3, dtype=F64))


# --------------------------------------------------------------------------------------
# Eval mode, restoration of weights, modes and gradients
# --------------------------------------------------------------------------------------


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    )
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 1.5)
    return net


def _image_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_uses_eval_mode_and_restores_everything():
    net = _bn_net()
    net.train()
    net[3].eval()  # a mixed mode must come back as it was
    modes = [m.training for m in net.modules()]
    before = _snapshot(net)
    grads_before = [p.grad for p in net.parameters()]
    batches = _image_batches()

    s_train_mode = adaptive_sharpness(net, F.cross_entropy, batches, 0.01, n_iters=5)
    assert [m.training for m in net.modules()] == modes
    after = _snapshot(net)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # BN stats untouched too
    assert [p.grad for p in net.parameters()] == grads_before  # all None: .grad untouched

    # Eval mode is used regardless of the caller's mode: same value, deterministic despite
    # dropout, and identical to the value for a model already in eval mode.
    assert adaptive_sharpness(net, F.cross_entropy, batches, 0.01, n_iters=5) == s_train_mode
    net.eval()
    assert adaptive_sharpness(net, F.cross_entropy, batches, 0.01, n_iters=5) == s_train_mode
    assert not net.training
    assert s_train_mode > 0


def test_restores_weights_and_mode_when_loss_fn_raises():
    net = _bn_net().train()
    before = _snapshot(net)
    calls = 0

    def flaky_loss(output, target):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("boom")
        return F.cross_entropy(output, target)

    with pytest.raises(RuntimeError, match="boom"):
        adaptive_sharpness(net, flaky_loss, _image_batches(), 0.5, n_iters=5)
    assert calls == 4
    assert net.training and all(m.training for m in net.modules())
    after = _snapshot(net)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_grad_enabled_inside_no_grad_context():
    model, batches = _mlp(), _mlp_batches()
    expected = adaptive_sharpness(model, F.cross_entropy, batches, 0.02)
    with torch.no_grad():
        assert adaptive_sharpness(model, F.cross_entropy, batches, 0.02) == expected


def test_frozen_parameters_are_not_perturbed():
    """Freezing every layer but the last gives the sharpness of the last layer alone, which
    for a linear last layer is the closed form of the logits' perturbation."""
    model, batches = _mlp(), _mlp_batches()
    full = adaptive_sharpness(model, F.cross_entropy, batches, 0.05)
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)
    last_only = adaptive_sharpness(model, F.cross_entropy, batches, 0.05)
    assert 0 < last_only < full
    assert all(p.requires_grad is False for p in model[0].parameters())


def test_works_on_the_tiny_cnn():
    from labkit.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    before = _snapshot(model)
    s = adaptive_sharpness(model, F.cross_entropy, [(x, y)], 2e-4, n_iters=3)
    assert 0 < s < 0.1
    after = _snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.training


# --------------------------------------------------------------------------------------
# Checkpoint schedule
# --------------------------------------------------------------------------------------


def test_checkpoint_iterations():
    # APGD fractions 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020).
    assert checkpoint_iterations(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    assert checkpoint_iterations(20) == (5, 9, 12, 14, 16, 18, 19)
    assert checkpoint_iterations(1) == ()
    for n in range(1, 200):
        ks = checkpoint_iterations(n)
        assert list(ks) == sorted(set(ks))
        assert all(0 < k < n for k in ks)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, r"rho must be >= 0, got rho=-0.1"),
        ({"rho": float("nan")}, r"rho must be a finite number >= 0, got rho=nan"),
        ({"rho": "0.1"}, r"rho must be a finite number >= 0, got rho='0.1'"),
        ({"norm": "l1"}, r"unknown norm='l1'; valid norms: linf, l2"),
        ({"norm": "inf"}, r"unknown norm='inf'; valid norms: linf, l2"),
        ({"n_iters": 0}, r"n_iters must be an int >= 1, got n_iters=0"),
        ({"n_iters": 2.5}, r"n_iters must be an int >= 1, got n_iters=2.5"),
        ({"step_size": 0.0}, r"step_size must be a finite number > 0 or None, got 0.0"),
        ({"step_size": -1.0}, r"step_size must be a finite number > 0 or None, got -1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"rho": 0.01} | kwargs
    with pytest.raises(ValueError, match=match):
        adaptive_sharpness(_mlp(), F.cross_entropy, _mlp_batches(), **args)


def test_empty_batches():
    with pytest.raises(ValueError, match=r"batches is empty"):
        adaptive_sharpness(_mlp(), F.cross_entropy, [], 0.01)


def test_no_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters with requires_grad=True"):
        adaptive_sharpness(model, F.cross_entropy, _mlp_batches(), 0.01)


def test_bad_batch_item():
    with pytest.raises(TypeError, match=r"batches must yield \(inputs, targets\) pairs; item 0"):
        adaptive_sharpness(_mlp(), F.cross_entropy, [torch.zeros(3, 4, dtype=F64)], 0.01)


def test_loss_fn_must_return_a_scalar():
    def per_example_loss(output, target):
        return F.cross_entropy(output, target, reduction="none")

    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor"):
        adaptive_sharpness(_mlp(), per_example_loss, _mlp_batches(), 0.01)


def test_non_finite_base_loss():
    model = _mlp()
    with torch.no_grad():
        model[4].bias.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"loss at the unperturbed weights is not finite"):
        adaptive_sharpness(model, F.cross_entropy, _mlp_batches(), 0.01)


def test_bad_types():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        adaptive_sharpness(lambda x: x, F.cross_entropy, _mlp_batches(), 0.01)
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        adaptive_sharpness(_mlp(), "cross_entropy", _mlp_batches(), 0.01)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        adaptive_sharpness(_mlp(), F.cross_entropy, _mlp_batches(), 0.01, generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, batches = _mlp(), _mlp_batches()
    kwargs = {"n_iters": 6, "random_start": True}
    expected = adaptive_sharpness(
        model, F.cross_entropy, batches, 0.05, generator=torch.Generator().manual_seed(0), **kwargs
    )
    device = torch.device("cuda")
    model_cuda = _mlp().to(device)
    batches_cuda = [(x.to(device), y.to(device)) for x, y in batches]
    before = _snapshot(model_cuda)
    # A CPU generator draws the same random start; it is moved to the parameters' device.
    s = adaptive_sharpness(
        model_cuda, F.cross_entropy, batches_cuda, 0.05,
        generator=torch.Generator().manual_seed(0), **kwargs,
    )  # fmt: skip
    assert s == pytest.approx(expected, rel=1e-9)
    after = _snapshot(model_cuda)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # A CUDA generator works too.
    s_gen = adaptive_sharpness(
        model_cuda, F.cross_entropy, batches_cuda, 0.05,
        generator=torch.Generator(device=device).manual_seed(0), **kwargs,
    )  # fmt: skip
    assert s_gen >= 0.0
