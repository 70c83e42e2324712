"""labkit.optim: every optimizer step for step against torch or a hand-written reference.

The trajectories run in float64 for 60 steps on four tensors of different shapes (one a
scalar) split into two param groups with different learning rates; one tensor has no
gradient every third step (it must be skipped). Gradients depend on the iterate
(a noisy quadratic with a sine term), so any difference in an update changes all later
gradients too.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import optim as lo
from labkit.optim import NSHB, SGD, SHB, AdaGrad, AdamEta, AdamEtaThesis, Nesterov, RMSProp
from labkit.optim import _validation as val

DT = torch.float64
SHAPES = [(3, 4), (5,), (), (2, 3, 2)]
STEPS = 60
SKIPPED = 3  # index of the tensor whose gradient is None every third step
LR2 = {"sgd": 0.02, "shb": 0.01, "nshb": 0.05, "nesterov": 0.01, "adagrad": 0.05,
       "rmsprop": 0.002, "adam": 0.003, "amsgrad": 0.003, "adam_thesis": 0.003,
       "amsgrad_thesis": 0.003}
LR1 = {k: 2.5 * v for k, v in LR2.items()}


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=DT)) for s in SHAPES]


def grad_at(t: int, i: int, x: torch.Tensor) -> torch.Tensor:
    """Gradient at step t of tensor i: (0.5 + 0.2 i) x - b_t + 0.3 sin(3x), b_t ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(1000 * t + i)
    b = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return (0.5 + 0.2 * i) * x - b + 0.3 * torch.sin(3 * x)


def set_grads(params, t: int, skip: bool = True) -> None:
    for i, p in enumerate(params):
        if skip and i == SKIPPED and t % 3 == 2:
            p.grad = None
        else:
            p.grad = grad_at(t, i, p.detach())


def groups(params, lr2: float, **extra2):
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2, **extra2}]


def trajectory(make_opt, steps: int = STEPS, skip: bool = True, start: int = 0, params=None):
    """Run ``steps`` updates; returns (steps x n) flattened iterates, the optimizer, params."""
    params = make_params() if params is None else params
    made = make_opt(params)  # an optimizer, or (optimizer, hook to call after each step)
    opt, hook = made if isinstance(made, tuple) else (made, None)
    rows = []
    for t in range(start, start + steps):
        set_grads(params, t, skip)
        opt.step()
        if hook is not None:
            hook()
        rows.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
    return torch.stack(rows), opt, params


def assert_same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


# --- against torch -----------------------------------------------------------------------

def labkit_factory(name: str, wd: float, foreach: bool):
    extra = {"shb": {"beta": 0.8}, "nesterov": {"beta": 0.8}, "rmsprop": {"alpha": 0.9},
             "adam": {"beta1": 0.8, "beta2": 0.95}, "amsgrad": {"beta1": 0.8, "beta2": 0.95},
             "adam_thesis": {"beta1": 0.8, "beta2": 0.95},
             "amsgrad_thesis": {"beta1": 0.8, "beta2": 0.95},
             "adagrad": {"eps": 1e-10}}.get(name, {})
    return lambda ps: lo.build(name, groups(ps, LR2[name]), lr=LR1[name], weight_decay=wd,
                               foreach=foreach, **extra)


def torch_factory(name: str, wd: float, foreach: bool):
    o = torch.optim
    lr = LR1[name]
    make = {
        "sgd": lambda g: o.SGD(g, lr=lr, weight_decay=wd, foreach=foreach),
        "shb": lambda g: o.SGD(g, lr=lr, momentum=0.8, weight_decay=wd, foreach=foreach),
        "nesterov": lambda g: o.SGD(g, lr=lr, momentum=0.8, nesterov=True, weight_decay=wd,
                                    foreach=foreach),
        "adagrad": lambda g: o.Adagrad(g, lr=lr, eps=1e-10, weight_decay=wd, foreach=foreach),
        "rmsprop": lambda g: o.RMSprop(g, lr=lr, alpha=0.9, eps=1e-8, weight_decay=wd,
                                       foreach=foreach),
        "adam": lambda g: o.Adam(g, lr=lr, betas=(0.8, 0.95), weight_decay=wd,
                                 foreach=foreach),
        "amsgrad": lambda g: o.Adam(g, lr=lr, betas=(0.8, 0.95), weight_decay=wd,
                                    amsgrad=True, foreach=foreach),
    }[name]
    return lambda ps: make(groups(ps, LR2[name]))


TORCH_TWINS = ["sgd", "shb", "nesterov", "adagrad", "rmsprop", "adam", "amsgrad"]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("name", TORCH_TWINS)
def test_matches_torch_step_for_step(name, wd, foreach):
    ours, opt, _ = trajectory(labkit_factory(name, wd, foreach))
    ref, _, _ = trajectory(torch_factory(name, wd, foreach))
    assert_same(ours, ref)
    # also against torch's other path: both of our paths agree with both of torch's
    ref_other, _, _ = trajectory(torch_factory(name, wd, not foreach))
    assert_same(ours, ref_other)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == LR2[name]


def test_amsgrad_max_is_active_in_the_comparison():
    """The test problem makes v decrease somewhere, so adam and amsgrad must differ."""
    a, _, _ = trajectory(labkit_factory("adam", 0.0, False))
    b, _, _ = trajectory(labkit_factory("amsgrad", 0.0, False))
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("foreach", [False, True])
def test_shb_momentum_buffer_matches_torch(foreach):
    params = make_params()
    ours = SHB(params, lr=0.01, beta=0.7, foreach=foreach)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.SGD(twins, lr=0.01, momentum=0.7)
    for t in range(5):
        set_grads(params, t, skip=False)
        set_grads(twins, t, skip=False)
        ours.step()
        ref.step()
    for p, q in zip(params, twins, strict=True):
        assert_same(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


# --- against hand-written references -------------------------------------------------------

def reference_trajectory(update, hp_of, steps: int = STEPS, skip: bool = True):
    """Iterates of ``update(x, g, state, **hp)`` with coupled weight decay, per tensor."""
    params = [p.detach().clone() for p in make_params()]
    states = [{} for _ in params]
    rows = []
    for t in range(steps):
        for i, x in enumerate(params):
            if skip and i == SKIPPED and t % 3 == 2:
                continue
            hp = dict(hp_of[i])
            g = grad_at(t, i, x) + hp.pop("weight_decay") * x
            params[i] = update(x, g, states[i], **hp)
        rows.append(torch.cat([x.reshape(-1) for x in params]))
    return torch.stack(rows)


def ref_nshb(x, g, st, lr, beta):
    d = st["d"] = (1 - beta) * g + beta * st.get("d", torch.zeros_like(x))
    return x - lr * d


def ref_adam_eta(x, g, st, lr, beta1, beta2, eta, eps, amsgrad):
    t = st["t"] = st.get("t", 0) + 1
    m = st["m"] = beta1 * st.get("m", torch.zeros_like(x)) + (1 - beta1) * g
    v = st["v"] = beta2 * st.get("v", torch.zeros_like(x)) + (1 - beta2) * g.abs() ** eta
    if amsgrad:
        v = st["vmax"] = torch.maximum(st.get("vmax", torch.zeros_like(x)), v)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return x - lr * m_hat / (v_hat ** (1 / eta) + eps)


def per_tensor(hp1: dict, hp2: dict) -> list[dict]:
    return [hp1, hp1, hp2, hp2]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_nshb_matches_hand_written_reference(wd, foreach):
    ours, opt, params = trajectory(
        lambda ps: NSHB(groups(ps, 0.05), lr=0.1, beta=0.8, weight_decay=wd, foreach=foreach))
    hp = per_tensor({"lr": 0.1, "beta": 0.8, "weight_decay": wd},
                    {"lr": 0.05, "beta": 0.8, "weight_decay": wd})
    assert_same(ours, reference_trajectory(ref_nshb, hp))
    assert set(opt.state[params[0]]) == {"momentum_buffer"}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("eta", [1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0])
def test_adam_eta_matches_the_formula(eta, amsgrad, foreach):
    common = {"beta1": 0.8, "beta2": 0.95, "eta": eta, "eps": 1e-8, "amsgrad": amsgrad}
    ours, _, _ = trajectory(lambda ps: AdamEta(
        groups(ps, 0.003, weight_decay=0.05), lr=0.01, betas=(0.8, 0.95), eta=eta,
        amsgrad=amsgrad, weight_decay=0.01, foreach=foreach))
    hp = per_tensor({"lr": 0.01, "weight_decay": 0.01, **common},
                    {"lr": 0.003, "weight_decay": 0.05, **common})
    assert_same(ours, reference_trajectory(ref_adam_eta, hp), rtol=1e-11)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_eta_2_is_torch_adam_with_default_hyperparameters(amsgrad):
    ours, _, _ = trajectory(lambda ps: AdamEta(ps, amsgrad=amsgrad))
    ref, _, _ = trajectory(lambda ps: torch.optim.Adam(ps, amsgrad=amsgrad))
    assert_same(ours, ref)


@pytest.mark.parametrize("beta2", [0.0, 0.9])
@pytest.mark.parametrize("eta", [0.5, 2.0, 3.0])
def test_torch_style_amsgrad_rescaled_is_seed_000_variant_3(eta, beta2):
    """Docstring claim: AdamEta(amsgrad=True, eps=0) with lr * (1 - beta2^t)^(-1/eta) is
    Algorithm 3.1 with preconditioner (3), h_n = (max_k v_k)^(1/eta), no bias correction."""

    def make(ps):
        opt = AdamEta(ps, lr=0.01, betas=(0.9, beta2), eta=eta, eps=0.0, amsgrad=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: (1 - beta2 ** (k + 1)) ** (-1 / eta))
        return opt, sched.step

    ours, _, _ = trajectory(make, steps=40, skip=False)

    def ref_variant_3(x, g, st, lr):
        n = st["n"] = st.get("n", 0) + 1
        m = st["m"] = 0.9 * st.get("m", torch.zeros_like(x)) + 0.1 * g
        v = st["v"] = beta2 * st.get("v", torch.zeros_like(x)) + (1 - beta2) * g.abs() ** eta
        h = st["h"] = torch.maximum(st.get("h", torch.zeros_like(x)), v ** (1 / eta))
        return x - lr * (m / (1 - 0.9**n)) / h

    hp = per_tensor({"lr": 0.01, "weight_decay": 0.0}, {"lr": 0.01, "weight_decay": 0.0})
    assert_same(ours, reference_trajectory(ref_variant_3, hp, steps=40, skip=False), 1e-10)


# --- the power-eta thesis's (2) and (3), as written ------------------------------------------

def ref_thesis_form(x, g, st, lr, beta1, beta2, eta, eps, form):
    """Algorithm 3.1, X = R^d, with preconditioner (2) or (3), one coordinate-wise step.

    n counts from 0 as in the thesis: mhat_n = m_n / (1 - beta1^(n+1)); (2) takes the running
    max of vbar_n = v_n / (1 - beta2^(n+1)), (3) the running max of v_n itself; H_n =
    diag(vhat_n^(1/eta)); x_{n+1} = x_n - lr H_n^{-1} mhat_n (+ eps on the diagonal)."""
    n = st["n"] = st.get("n", -1) + 1
    m = st["m"] = beta1 * st.get("m", torch.zeros_like(x)) + (1 - beta1) * g
    v = st["v"] = beta2 * st.get("v", torch.zeros_like(x)) + (1 - beta2) * g.abs() ** eta
    candidate = v / (1 - beta2 ** (n + 1)) if form == 2 else v
    vhat = st["vhat"] = torch.maximum(st.get("vhat", torch.zeros_like(x)), candidate)
    mhat = m / (1 - beta1 ** (n + 1))
    return x - lr * mhat / (vhat ** (1 / eta) + eps)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("form", [2, 3])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("eta", [1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0])
def test_thesis_forms_match_their_equations(eta, eps, form, foreach):
    common = {"beta1": 0.8, "beta2": 0.95, "eta": eta, "eps": eps, "form": form}
    ours, opt, params = trajectory(lambda ps: AdamEtaThesis(
        groups(ps, 0.003, weight_decay=0.05), lr=0.01, betas=(0.8, 0.95), eta=eta, eps=eps,
        amsgrad=form == 3, weight_decay=0.01, foreach=foreach))
    hp = per_tensor({"lr": 0.01, "weight_decay": 0.01, **common},
                    {"lr": 0.003, "weight_decay": 0.05, **common})
    assert_same(ours, reference_trajectory(ref_thesis_form, hp), rtol=1e-11)
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_thesis_forms_are_built_by_name_and_differ_from_torch_style():
    a = lo.build("adam_thesis", _p(), eta=3)
    b = lo.build("amsgrad_thesis", _p(), beta2=0.99)
    assert type(a) is type(b) is AdamEtaThesis
    assert (a.param_groups[0]["amsgrad"], a.param_groups[0]["eta"]) == (False, 3.0)
    assert (b.param_groups[0]["amsgrad"], b.param_groups[0]["betas"]) == (True, (0.9, 0.99))
    assert lo.hyperparameters("adam_thesis") == {
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eta": 2.0, "eps": 0.0,
        "weight_decay": 0.0, "foreach": None}
    # neither form is torch's Adam/AMSGrad at eta = 2, even without eps
    for form, torch_style in (("adam_thesis", "adam"), ("amsgrad_thesis", "amsgrad")):
        x, _, _ = trajectory(lambda ps, f=form: lo.build(f, groups(ps, 0.003), lr=0.01))
        y, _, _ = trajectory(lambda ps, t=torch_style: lo.build(t, groups(ps, 0.003), lr=0.01,
                                                                eps=0.0))
        assert (x - y).abs().max() > 1e-4


@pytest.mark.parametrize("eta", [0.5, 2.0, 3.0])
def test_form_3_is_torch_style_amsgrad_with_the_warm_up_undone(eta):
    """Docstring claim: (3) = AdamEta(amsgrad=True, eps=0) with lr * (1 - beta2^t)^(-1/eta)."""

    def torch_style(ps):
        opt = AdamEta(ps, lr=0.01, betas=(0.9, 0.9), eta=eta, eps=0.0, amsgrad=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: (1 - 0.9 ** (k + 1)) ** (-1 / eta))
        return opt, sched.step

    ours, _, _ = trajectory(lambda ps: AdamEtaThesis(ps, lr=0.01, betas=(0.9, 0.9), eta=eta,
                                                     amsgrad=True), steps=40, skip=False)
    ref, _, _ = trajectory(torch_style, steps=40, skip=False)
    assert_same(ours, ref, 1e-10)


def test_form_2_is_torch_style_adam_while_the_second_moment_grows():
    """While every coordinate's bias-corrected second moment is non-decreasing (gradients that
    grow in size), the running max of (2) is today's value: (2) = torch-style Adam (eps = 0)."""
    x1, x2 = (torch.nn.Parameter(torch.zeros(5, dtype=DT)) for _ in range(2))
    ours = AdamEtaThesis([x1], lr=0.01, betas=(0.9, 0.99), eta=3.0)
    ref = AdamEta([x2], lr=0.01, betas=(0.9, 0.99), eta=3.0, eps=0.0)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=DT)
    for t in range(1, 30):
        x1.grad = x2.grad = signs * 1.1**t * torch.arange(1, 6, dtype=DT)
        ours.step()
        ref.step()
        assert_same(x1.detach(), x2.detach())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["adam_thesis", "amsgrad_thesis"])
def test_thesis_forms_leave_coordinates_without_gradient_in_place(name, foreach):
    """eps = 0: a coordinate whose gradients have all been 0 has m = vhat = 0; it must not move
    (0/0 would be NaN)."""
    x = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    opt = lo.build(name, [x], lr=0.1, foreach=foreach)
    for _ in range(3):
        x.grad = torch.tensor([0.5, 0.0, -2.0])
        opt.step()
    x = x.detach()
    assert torch.isfinite(x).all() and float(x[1]) == 1.0 and float(x[0]) < 1 < float(x[2])


# --- NSHB, SHB and torch's dampening ---------------------------------------------------------

def test_torch_dampening_differs_from_nshb_by_a_geometric_transient():
    """Same gradients, x-independent: torch's dampened buffer - d_t = beta^(t+1) g_0."""
    beta = 0.7
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(4, generator=gen, dtype=DT) for _ in range(12)]
    p = torch.nn.Parameter(torch.zeros(4, dtype=DT))
    q = torch.nn.Parameter(torch.zeros(4, dtype=DT))
    ours = NSHB([p], lr=0.1, beta=beta)
    ref = torch.optim.SGD([q], lr=0.1, momentum=beta, dampening=beta)
    for t, g in enumerate(gs):
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        gap = ref.state[q]["momentum_buffer"] - ours.state[p]["momentum_buffer"]
        assert_same(gap, beta ** (t + 1) * gs[0])


@settings(max_examples=25, deadline=None)
@given(beta=st.floats(0.0, 0.99), lr=st.floats(1e-3, 0.5), wd=st.sampled_from([0.0, 0.05]),
       steps=st.integers(1, 25), foreach=st.booleans())
def test_nshb_equals_shb_with_lr_times_one_minus_beta(beta, lr, wd, steps, foreach):
    """d_t = (1 - beta) m_t from d_{-1} = m_{-1} = 0: identical iterates from the first step."""
    a, opt_a, pa = trajectory(
        lambda ps: NSHB(ps, lr=lr, beta=beta, weight_decay=wd, foreach=foreach), steps=steps)
    b, opt_b, pb = trajectory(
        lambda ps: SHB(ps, lr=lr * (1 - beta), beta=beta, weight_decay=wd, foreach=foreach),
        steps=steps)
    assert_same(a, b, rtol=1e-10)
    for p, q in zip(pa, pb, strict=True):
        assert_same(opt_a.state[p]["momentum_buffer"],
                    (1 - beta) * opt_b.state[q]["momentum_buffer"], rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(beta=st.floats(0.0, 0.99), lr=st.floats(1e-4, 1.0), wd=st.floats(0.0, 0.1),
       grads=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
                      min_size=1, max_size=12),
       foreach=st.booleans())
def test_shb_equals_torch_sgd_momentum_for_any_gradients(beta, lr, wd, grads, foreach):
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=DT))
    q = torch.nn.Parameter(p.detach().clone())
    ours = SHB([p], lr=lr, beta=beta, weight_decay=wd, foreach=foreach)
    ref = torch.optim.SGD([q], lr=lr, momentum=beta, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g, dtype=DT)
        q.grad = torch.tensor(g, dtype=DT)
        ours.step()
        ref.step()
        assert_same(p.detach(), q.detach())


# --- state_dict, skipping, sparse, complex, foreach selection --------------------------------

@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", lo.OPTIMIZER_NAMES)
def test_state_dict_round_trip_continues_identically(name, foreach):
    make = labkit_factory(name, 0.01, foreach)
    full, _, _ = trajectory(make, steps=27)

    _, opt, params = trajectory(make, steps=7)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    del opt, params
    buf.seek(0)
    saved = torch.load(buf)
    fresh = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    # a fresh optimizer built with other hyperparameters takes the saved ones
    new = lo.build(name, groups(fresh, 0.5), lr=0.5, foreach=foreach)
    new.load_state_dict(saved["opt"])
    rest, _, _ = trajectory(lambda ps: new, steps=20, start=7, params=fresh)
    assert torch.equal(rest, full[7:])


@pytest.mark.parametrize("name", lo.OPTIMIZER_NAMES)
def test_params_without_gradient_are_skipped(name):
    a, b = torch.nn.Parameter(torch.ones(3, dtype=DT)), torch.nn.Parameter(torch.ones(2, dtype=DT))
    opt = lo.build(name, [a, b], lr=0.1)
    for _ in range(3):
        a.grad = torch.full((3,), 0.5, dtype=DT)
        opt.step()
    assert torch.equal(b.detach(), torch.ones(2, dtype=DT))
    assert len(opt.state[b]) == 0
    if name in ("adagrad", "rmsprop", "adam", "amsgrad", "adam_thesis", "amsgrad_thesis"):
        assert opt.state[a]["step"] == 3
    assert (a.detach() < 1).all()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", lo.OPTIMIZER_NAMES)
def test_sparse_gradient_is_a_clear_error(name, foreach):
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = lo.build(name, [p], lr=0.1, foreach=foreach)
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2),
                                     check_invariants=True)
    with pytest.raises(TypeError, match="does not support sparse gradients.*sparse_coo"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", TORCH_TWINS)
def test_complex_params_match_torch(name, foreach):
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 2, dtype=torch.complex128, generator=gen)
    gs = [torch.randn(3, 2, dtype=torch.complex128, generator=gen) for _ in range(10)]
    p, q = torch.nn.Parameter(z0.clone()), torch.nn.Parameter(z0.clone())
    ours = labkit_factory(name, 0.01, foreach)([p, p.new_zeros(()).requires_grad_()])
    ref = torch_factory(name, 0.01, foreach)([q, q.new_zeros(()).requires_grad_()])
    for g in gs:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert_same(p.detach(), q.detach())


def _count_foreach_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for attr in dir(torch):
        if attr.startswith("_foreach_"):
            fn = getattr(torch, attr)

            def spy(*args, _fn=fn, _attr=attr, **kwargs):
                calls.append(_attr)
                return _fn(*args, **kwargs)

            monkeypatch.setattr(torch, attr, spy)
    return calls


@pytest.mark.parametrize("name", lo.OPTIMIZER_NAMES)
def test_foreach_flag_picks_the_path(name, monkeypatch):
    calls = _count_foreach_calls(monkeypatch)
    for foreach, expect_calls in [(True, True), (False, False), (None, False)]:
        calls.clear()
        params = make_params()
        opt = lo.build(name, params, lr=0.01, foreach=foreach)
        set_grads(params, 0, skip=False)
        opt.step()
        assert bool(calls) == expect_calls, (foreach, calls)


def test_default_foreach_follows_torch_rule_on_cpu(monkeypatch):
    cpu = [torch.zeros(2), torch.nn.Parameter(torch.zeros(3))]
    from torch.optim.optimizer import _default_to_fused_or_foreach

    assert val.default_foreach(cpu) is _default_to_fused_or_foreach(cpu, False)[1] is False
    monkeypatch.setattr(val, "_torch_default", None)  # the reproduction of the rule
    assert val.default_foreach(cpu) is False
    assert val.default_foreach([torch.zeros(2, device="meta")]) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
@pytest.mark.parametrize("name", TORCH_TWINS)
def test_cuda_defaults_to_foreach_and_matches_torch(name, monkeypatch):
    cuda = [torch.zeros(2, device="cuda"), torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    assert val.default_foreach(cuda) is True
    monkeypatch.setattr(val, "_torch_default", None)
    assert val.default_foreach(cuda) is True
    monkeypatch.undo()

    def on_cuda(factory):
        def make(ps):
            for p in ps:
                p.data = p.data.cuda()
            return factory(ps)

        return make

    calls = _count_foreach_calls(monkeypatch)
    ours, _, _ = trajectory(on_cuda(labkit_factory(name, 0.01, None)))
    assert calls, "foreach=None on CUDA should take the multi-tensor path"
    ref, _, _ = trajectory(on_cuda(torch_factory(name, 0.01, None)))
    assert_same(ours, ref)


# --- hyperparameter validation ---------------------------------------------------------------

def _p():
    return [torch.nn.Parameter(torch.zeros(2))]


BAD = [
    (lambda: SGD(_p(), lr=0), ValueError, r"lr must be a finite number > 0, got 0"),
    (lambda: SGD(_p(), lr=-0.1), ValueError, r"lr must be a finite number > 0, got -0\.1"),
    (lambda: SHB(_p(), lr=math.inf), ValueError, r"lr must be a finite number > 0, got inf"),
    (lambda: AdaGrad(_p(), lr=math.nan), ValueError, r"lr must be .* > 0, got nan"),
    (lambda: SGD(_p(), lr="0.1"), TypeError, r"lr must be a real number .*'0\.1'.*str"),
    (lambda: SGD(_p(), lr=True), TypeError, r"lr must be a real number"),
    (lambda: SHB(_p(), lr=0.1, beta=1.2), ValueError, r"beta must be in \[0, 1\), got 1\.2"),
    (lambda: SHB(_p(), lr=0.1, beta=1.0), ValueError, r"beta must be in \[0, 1\), got 1\.0"),
    (lambda: NSHB(_p(), lr=0.1, beta=-0.1), ValueError, r"beta must be in \[0, 1\), got -0\.1"),
    (lambda: Nesterov(_p(), lr=0.1, beta=math.nan), ValueError, r"beta must be in \[0, 1\)"),
    (lambda: RMSProp(_p(), lr=0.1, alpha=1.0), ValueError, r"alpha must be in \[0, 1\), got 1"),
    (lambda: RMSProp(_p(), lr=0.1, alpha=-0.5), ValueError, r"alpha must be in \[0, 1\)"),
    (lambda: AdamEta(_p(), betas=(1.0, 0.999)), ValueError,
     r"beta1 \(betas\[0\]\) must be in \[0, 1\), got 1\.0"),
    (lambda: AdamEta(_p(), betas=(0.9, 1.5)), ValueError,
     r"beta2 \(betas\[1\]\) must be in \[0, 1\), got 1\.5"),
    (lambda: AdamEta(_p(), betas=0.9), TypeError, r"betas must be a pair \(beta1, beta2\)"),
    (lambda: AdamEta(_p(), betas=(0.9,)), TypeError, r"betas must be a pair"),
    (lambda: AdamEta(_p(), eta=0), ValueError, r"eta must be a finite number > 0, got 0"),
    (lambda: AdamEta(_p(), eta=-2), ValueError, r"eta must be a finite number > 0, got -2"),
    (lambda: AdamEta(_p(), eta=math.inf), ValueError, r"eta must be a finite number > 0"),
    (lambda: AdamEta(_p(), eps=-1e-8), ValueError, r"eps must be a finite number >= 0, got -1e-08"),
    (lambda: AdaGrad(_p(), lr=0.1, eps=-1.0), ValueError, r"eps must be a finite number >= 0"),
    (lambda: RMSProp(_p(), lr=0.1, eps=math.nan), ValueError, r"eps must be a finite number"),
    (lambda: AdamEta(_p(), amsgrad=1), TypeError, r"amsgrad must be True or False, got 1"),
    (lambda: SGD(_p(), lr=0.1, weight_decay=-1), ValueError,
     r"weight_decay must be a finite number >= 0, got -1"),
    (lambda: AdamEta(_p(), weight_decay=-0.5), ValueError, r"weight_decay must be .* got -0\.5"),
    (lambda: SHB(_p(), lr=0.1, foreach="yes"), TypeError,
     r"foreach must be None \(pick like torch\), True or False, got 'yes'"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_hyperparameter_raises(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "name,key,value,match",
    [("sgd", "lr", -1.0, r"lr must be a finite number > 0, got -1\.0"),
     ("shb", "beta", 1.5, r"beta must be in \[0, 1\), got 1\.5"),
     ("rmsprop", "alpha", 2.0, r"alpha must be in \[0, 1\), got 2\.0"),
     ("adam", "betas", (0.9, 1.0), r"beta2 \(betas\[1\]\) must be in \[0, 1\), got 1\.0"),
     ("amsgrad", "eta", 0.0, r"eta must be a finite number > 0, got 0\.0"),
     ("adagrad", "weight_decay", -1.0, r"weight_decay must be a finite number >= 0")])
def test_add_param_group_validates(name, key, value, match):
    opt = lo.build(name, _p(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _p(), key: value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": _p(), "lr": 3})  # an int is fine, stored as a float
    assert opt.param_groups[1]["lr"] == 3.0 and isinstance(opt.param_groups[1]["lr"], float)


# --- build / hyperparameters -----------------------------------------------------------------

def test_build_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'; valid names: "
                       "sgd, shb, nshb, nesterov, adagrad, rmsprop, adam, amsgrad, "
                       "adam_thesis, amsgrad_thesis"):
        lo.build("adamw", _p(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer name must be a str"):
        lo.build(SGD, _p(), lr=0.1)


def test_build_unknown_hyperparameter_is_named_with_accepted_list():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'momentum' for optimizer "
                       r"'sgd'; accepted: lr, weight_decay, foreach$"):
        lo.build("sgd", _p(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"unknown hyperparameters 'amsgrad', 'beta3' .*"
                       r"accepted: lr, beta1, beta2, eta, eps, weight_decay, foreach, betas"):
        lo.build("adam", _p(), beta3=0.1, amsgrad=True)


@pytest.mark.parametrize("name", ["sgd", "shb", "nshb", "nesterov", "adagrad", "rmsprop"])
def test_build_without_lr_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"optimizer '{name}' needs a learning rate: pass lr="):
        lo.build(name, _p())
    with pytest.raises(ValueError, match="needs a learning rate"):
        lo.build(name, _p(), lr=None)


def test_build_maps_names_and_flat_betas():
    opt = lo.build("adam", _p(), lr=1e-3, eta=3)
    assert isinstance(opt, AdamEta)
    g = opt.param_groups[0]
    assert (g["eta"], g["amsgrad"], g["betas"], g["lr"]) == (3.0, False, (0.9, 0.999), 1e-3)
    g = lo.build("amsgrad", _p(), beta2=0.99).param_groups[0]
    assert (g["amsgrad"], g["betas"], g["lr"]) == (True, (0.9, 0.99), 1e-3)
    assert lo.build("adam", _p(), betas=(0.5, 0.6)).param_groups[0]["betas"] == (0.5, 0.6)
    with pytest.raises(ValueError, match=r"either betas=\(0\.5, 0\.6\) or beta1/beta2 "
                       r"\(beta1=0\.1\), not both"):
        lo.build("adam", _p(), betas=(0.5, 0.6), beta1=0.1)
    with pytest.raises(ValueError, match=r"beta1 \(betas\[0\]\) must be in \[0, 1\), got 1\.1"):
        lo.build("adam", _p(), beta1=1.1)
    expected = {"sgd": SGD, "shb": SHB, "nshb": NSHB, "nesterov": Nesterov,
                "adagrad": AdaGrad, "rmsprop": RMSProp, "adam": AdamEta, "amsgrad": AdamEta,
                "adam_thesis": AdamEtaThesis, "amsgrad_thesis": AdamEtaThesis}
    for name, cls in expected.items():
        assert type(lo.build(name.upper(), _p(), lr=0.1)) is cls
    assert set(expected) == set(lo.OPTIMIZER_NAMES)


def test_hyperparameters_lists_defaults_that_build_accepts():
    assert lo.hyperparameters("shb") == {"lr": lo.REQUIRED, "beta": 0.9, "weight_decay": 0.0,
                                         "foreach": None}
    assert lo.hyperparameters("amsgrad") == {
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eta": 2.0, "eps": 1e-8,
        "weight_decay": 0.0, "foreach": None}
    assert lo.hyperparameters("adagrad")["eps"] == 1e-10
    assert lo.hyperparameters("rmsprop")["alpha"] == 0.99
    for name in lo.OPTIMIZER_NAMES:
        hp = lo.hyperparameters(name)
        kwargs = {k: v for k, v in hp.items() if v is not lo.REQUIRED}
        kwargs.setdefault("lr", 0.1)
        opt = lo.build(name, _p(), **kwargs)
        defaults = opt.defaults
        for k, v in kwargs.items():
            if k in ("beta1", "beta2"):
                assert defaults["betas"][("beta1", "beta2").index(k)] == v
            else:
                assert defaults[k] == v
    hp = lo.hyperparameters("sgd")
    hp["lr"] = 1.0  # callers get a copy
    assert lo.hyperparameters("sgd")["lr"] is lo.REQUIRED
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        lo.hyperparameters("lamb")


# --- sanity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", lo.OPTIMIZER_NAMES)
def test_converges_on_a_quadratic(name):
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0, 1.0], dtype=DT))
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=DT)
    lr = {"adagrad": 0.5, "rmsprop": 0.01, "adam": 0.05, "amsgrad": 0.05, "adam_thesis": 0.05,
          "amsgrad_thesis": 0.05}.get(name, 0.1)
    opt = lo.build(name, [x], lr=lr)
    for _ in range(400):
        x.grad = scale * x.detach()
        opt.step()
    assert x.detach().norm() < 0.05 * 3.742
