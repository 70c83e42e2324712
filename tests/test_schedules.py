"""Tests for labkit.schedules: formulas, torch's schedulers as references, validation."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import schedules as S


def _torch_lrs(make_scheduler, lr0: float, epochs: int) -> list[float]:
    """Per-epoch learning rates of a torch scheduler stepped once per epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = make_scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ------------------------------------------------------------------------------ lr kinds


def test_constant_and_none():
    assert S.lr_at(None, 0.1, 7, 10) == 0.1
    assert S.lr_at({"kind": "constant"}, 0.1, 0, 1) == 0.1
    assert S.batch_size_at(None, 32, 9, 10) == 32
    assert S.validate_lr_schedule(None) == {"kind": "constant"}
    assert S.validate_batch_schedule(None) == {"kind": "constant"}


@pytest.mark.parametrize("every,factor", [(40, 2**-0.5), (3, 0.1), (1, 0.9), (7, 1.5)])
def test_step_matches_torch_steplr(every, factor):
    epochs, lr0 = 60, 0.1
    ours = S.lr_values({"kind": "step", "every": every, "factor": factor}, lr0, epochs)
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=every, gamma=factor), lr0, epochs
    )
    assert ours == pytest.approx(ref, rel=1e-12)
    assert ours[every] == pytest.approx(lr0 * factor)


@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_matches_torch(min_lr):
    epochs, lr0 = 50, 0.2
    ours = S.lr_values({"kind": "cosine", "min_lr": min_lr}, lr0, epochs)
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=min_lr),
        lr0,
        epochs,
    )
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert ours[0] == lr0
    assert ours[epochs // 2] == pytest.approx((lr0 + min_lr) / 2)


@pytest.mark.parametrize("power", [0.9, 0.5, 1.0, 2.0])
def test_poly_per_epoch_matches_torch_polynomiallr(power):
    epochs, lr0 = 40, 0.1
    ours = S.lr_values({"kind": "poly", "power": power}, lr0, epochs)
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=epochs, power=power),
        lr0,
        epochs,
    )
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours == pytest.approx([lr0 * (1 - e / epochs) ** power for e in range(epochs)])


@pytest.mark.parametrize("M,p", [(4, 0.9), (1, 0.5), (9, 1.0), (19, 2.0)])
def test_poly_stages_is_product_of_gammas(M, p):
    """lr_m = lr0 prod_{k<m} ((M-k)/(M-k+1))^p (Algorithm 3, arXiv 2311.08745)."""
    epochs, lr0 = 200, 0.1
    spec = {"kind": "poly", "power": p, "stages": M}
    length = epochs // (M + 1)
    for m in range(M + 1):
        prod = lr0
        for k in range(m):
            prod *= ((M - k) / (M - k + 1)) ** p
        for e in (m * length, (m + 1) * length - 1):
            assert S.lr_at(spec, lr0, e, epochs) == pytest.approx(prod, rel=1e-12)
            assert S.lr_at(spec, lr0, e, epochs) == pytest.approx(
                lr0 * ((M + 1 - m) / (M + 1)) ** p, rel=1e-12
            )


def test_poly_phase_layouts():
    lr0, epochs = 1.0, 200
    a = S.lr_values({"kind": "poly", "power": 1.0, "stages": 4}, lr0, epochs)
    b = S.lr_values({"kind": "poly", "power": 1.0, "every": 40}, lr0, epochs)
    c = S.lr_values({"kind": "poly", "power": 1.0, "stages": 4, "every": 40}, lr0, epochs)
    assert a == b == c
    assert sorted(set(a), reverse=True) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    # every longer than the stages: the last phase lasts to the end of the run
    d = S.lr_values({"kind": "poly", "power": 1.0, "stages": 2, "every": 30}, lr0, 100)
    assert d[:30] == [1.0] * 30 and d[30] == pytest.approx(2 / 3)
    assert d[60:] == pytest.approx([1 / 3] * 40)
    # only every, not dividing epochs: S = ceil(50 / 20) = 3 phases
    e = S.lr_values({"kind": "poly", "power": 1.0, "every": 20}, lr0, 50)
    assert e[0] == 1.0 and e[20] == pytest.approx(2 / 3) and e[49] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- batch kinds


def test_batch_step():
    sizes = S.batch_sizes({"kind": "step", "every": 40, "factor": 2.0}, 32, 200)
    assert [sizes[e] for e in (0, 39, 40, 80, 120, 160, 199)] == [32, 32, 64, 128, 256, 512, 512]
    sizes = S.batch_sizes({"kind": "step", "every": 40, "factor": 1.5}, 32, 200)
    assert [sizes[40 * k] for k in range(5)] == [32, 48, 72, 108, 162]
    capped = S.batch_sizes({"kind": "step", "every": 40, "factor": 2.0, "max": 100}, 32, 200)
    assert max(capped) == 100
    shrink = S.batch_sizes({"kind": "step", "every": 1, "factor": 0.1}, 4, 5)
    assert shrink == [4, 1, 1, 1, 1]  # never below 1
    assert all(isinstance(b, int) for b in sizes)


def test_batch_step_delay_grows_the_batch_later():
    """delay = 1: the growth of Sato & Iiduka's cifar.py, one epoch after the lr's StepLR."""
    spec = {"kind": "step", "every": 40, "factor": 2.0, "delay": 1}
    sizes = S.batch_sizes(spec, 32, 200)
    assert [e for e in range(1, 200) if sizes[e] != sizes[e - 1]] == [41, 81, 121, 161]
    assert [sizes[e] for e in (0, 40, 41, 80, 81, 199)] == [32, 32, 64, 64, 128, 512]
    assert S.batch_sizes({**spec, "every": 1}, 2, 5) == [2, 2, 4, 8, 16]
    assert S.batch_sizes({**spec, "delay": 3}, 32, 200)[42:45] == [32, 64, 64]
    # delay is part of the normalized spec only when it is not 0: specs written before it
    # existed keep their form (and run folders their hashes)
    assert S.validate_batch_schedule(spec)["delay"] == 1
    assert S.validate_batch_schedule(S.validate_batch_schedule(spec)) == \
        S.validate_batch_schedule(spec)
    assert "delay" not in S.validate_batch_schedule({**spec, "delay": 0})
    assert S.validate_batch_schedule({"kind": "step"}) == {
        "kind": "step", "every": 40, "factor": 2.0, "max": None}
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match=r"'delay' must be an integer >= 0 \(epochs\), got"):
            S.validate_batch_schedule({**spec, "delay": bad})
    assert S.describe(spec, of="batch") == "batch x 2 every 40 epochs (first at epoch 41, 0-based)"


@pytest.mark.parametrize("M,p", [(4, 0.9), (4, 0.5), (9, 1.0)])
def test_batch_poly_follows_lr_poly(M, p):
    """delta ~ lr / sqrt(b): growing b by 1/g_m^2 shrinks delta by exactly g_m."""
    b0, epochs = 32, 200
    bspec = {"kind": "poly", "power": p, "stages": M}
    lspec = {"kind": "poly", "power": p, "stages": M}
    for e in range(epochs):
        b = S.batch_size_at(bspec, b0, e, epochs)
        m = e * (M + 1) // epochs
        exact = b0 / (((M + 1 - m) / (M + 1)) ** p) ** 2
        assert b == math.floor(exact + 0.5)
        ratio_lr = S.lr_at(lspec, 1.0, e, epochs)
        assert math.sqrt(b0 / b) == pytest.approx(ratio_lr, rel=0.5 / b)
    cap = S.batch_sizes({"kind": "poly", "power": p, "stages": M, "max": 50}, b0, epochs)
    assert max(cap) == 50 and cap[0] == b0


@settings(max_examples=60, deadline=None)
@given(
    p=st.floats(0.0, 3.0),
    stages=st.one_of(st.none(), st.integers(1, 9)),
    every=st.one_of(st.none(), st.integers(1, 30)),
    b0=st.integers(1, 512),
)
def test_poly_monotone_and_consistent(p, stages, every, b0):
    epochs = 20
    spec = {"kind": "poly", "power": p, "stages": stages, "every": every}
    lrs = S.lr_values(spec, 0.5, epochs)
    bs = S.batch_sizes(spec, b0, epochs)
    assert lrs[0] == 0.5 and bs[0] == b0
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(a <= b for a, b in zip(bs, bs[1:], strict=False))
    assert all(lr > 0 for lr in lrs) and all(isinstance(b, int) and b >= 1 for b in bs)
    for lr, b in zip(lrs, bs, strict=True):
        assert math.sqrt(b0 / b) == pytest.approx(lr / 0.5, rel=0.5 / b + 1e-12)


# ---------------------------------------------------------------------------- validation


@settings(max_examples=40, deadline=None)
@given(
    spec=st.one_of(
        st.just({"kind": "constant"}),
        st.fixed_dictionaries(
            {"kind": st.just("step")},
            optional={"every": st.integers(1, 100), "factor": st.floats(0.01, 4.0)},
        ),
        st.fixed_dictionaries(
            {"kind": st.just("cosine")}, optional={"min_lr": st.floats(0.0, 0.1)}
        ),
        st.fixed_dictionaries(
            {"kind": st.just("poly")},
            optional={"power": st.floats(0.0, 3.0), "stages": st.integers(1, 9)},
        ),
    )
)
def test_validate_normalizes_idempotent_json(spec):
    out = S.validate_lr_schedule(spec)
    assert set(out) == {"kind", *S.LR_KINDS[spec["kind"]]}
    assert S.validate_lr_schedule(out) == out
    assert json.loads(json.dumps(out)) == out
    for key, value in spec.items():
        assert out[key] == value


def test_defaults_filled():
    assert S.validate_lr_schedule({"kind": "step"}) == {
        "kind": "step", "every": 40, "factor": 2**-0.5
    }
    assert S.validate_batch_schedule({"kind": "poly"}) == {
        "kind": "poly", "power": 0.9, "stages": None, "every": None, "max": None
    }
    assert S.validate_lr_schedule({"kind": "cosine"}) == {"kind": "cosine", "min_lr": 0.0}


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"kind": "linear"}, r"unknown lr schedule kind 'linear'; valid kinds: constant, step"),
        ({"every": 3}, r"has no 'kind'"),
        ({"kind": "step", "evry": 3}, r"unknown key\(s\) 'evry'.*valid keys: every, factor"),
        ({"kind": "constant", "factor": 2}, r"unknown key\(s\) 'factor'.*valid keys: none"),
        ({"kind": "step", "every": 0}, r"'every' must be an integer >= 1, got 0"),
        ({"kind": "step", "every": 2.5}, r"'every' must be an integer >= 1, got 2.5"),
        ({"kind": "step", "every": None}, r"'every' must be an integer >= 1, got None"),
        ({"kind": "step", "factor": 0}, r"'factor' must be > 0, got 0"),
        ({"kind": "step", "factor": "big"}, r"'factor' must be a finite number"),
        ({"kind": "step", "factor": float("nan")}, r"'factor' must be a finite number"),
        ({"kind": "poly", "power": -0.5}, r"'power' must be >= 0, got -0.5"),
        ({"kind": "poly", "stages": 0}, r"'stages' must be an integer >= 1, got 0"),
        ({"kind": "poly", "max": 64}, r"unknown key\(s\) 'max'"),
        ({"kind": "cosine", "min_lr": -1.0}, r"'min_lr' must be >= 0"),
    ],
)
def test_lr_validation_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        S.validate_lr_schedule(spec)
    with pytest.raises(ValueError, match=match):
        S.lr_at(spec, 0.1, 0, 10)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"kind": "cosine"}, r"unknown batch schedule kind 'cosine'; valid kinds: constant"),
        ({"kind": "step", "factor": -2.0}, r"'factor' must be > 0, got -2.0"),
        ({"kind": "poly", "max": 0}, r"'max' must be an integer >= 1 or None, got 0"),
        ({"kind": "poly", "every": True}, r"'every' must be an integer >= 1, got True"),
        ({"kind": "poly", "min_lr": 0.0}, r"valid keys: power, stages, every, max"),
    ],
)
def test_batch_validation_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        S.validate_batch_schedule(spec)
    with pytest.raises(ValueError, match=match):
        S.batch_size_at(spec, 32, 0, 10)


def test_argument_errors():
    with pytest.raises(TypeError, match=r"lr schedule must be a dict.*got str"):
        S.validate_lr_schedule("cosine")
    with pytest.raises(TypeError, match=r"batch schedule must be a dict"):
        S.validate_batch_schedule(["step"])
    with pytest.raises(ValueError, match=r"epoch must be an integer in \[0, epochs\) = \[0, 10\)"):
        S.lr_at(None, 0.1, 10, 10)
    with pytest.raises(ValueError, match=r"epoch must be an integer.*got -1"):
        S.batch_size_at(None, 8, -1, 10)
    with pytest.raises(ValueError, match=r"epochs must be an integer >= 1, got 0"):
        S.lr_at(None, 0.1, 0, 0)
    with pytest.raises(ValueError, match=r"lr0 must be a finite number > 0, got 0"):
        S.lr_at(None, 0, 0, 10)
    with pytest.raises(ValueError, match=r"b0 must be an integer >= 1, got 0"):
        S.batch_size_at(None, 0, 0, 10)
    with pytest.raises(ValueError, match=r"b0 must be an integer >= 1, got 32.0"):
        S.batch_size_at(None, 32.0, 0, 10)
    with pytest.raises(ValueError, match=r"stages=9 needs stages \+ 1 <= epochs, got epochs=5"):
        S.lr_at({"kind": "poly", "stages": 9}, 0.1, 0, 5)
    with pytest.raises(ValueError, match=r"m must be an integer in \[0, M\] = \[0, 3\], got 4"):
        S.poly_factor(4, 3, 1.0)
    with pytest.raises(ValueError, match=r"power must be a finite number >= 0"):
        S.poly_factor(0, 3, -1.0)
    with pytest.raises(ValueError, match=r"batch size must be a finite number > 0, got 0"):
        S.round_batch_size(0)


def test_round_batch_size_half_up():
    assert [S.round_batch_size(x) for x in (0.2, 1.5, 2.5, 3.49, 4.5)] == [1, 2, 3, 3, 5]
    assert S.round_batch_size(1000.0, cap=512) == 512


def test_describe():
    assert S.describe(None) == "constant learning rate"
    assert S.describe({"kind": "step", "every": 40, "factor": 0.5}) == (
        "lr x 0.5 every 40 epochs"
    )
    assert "cosine" in S.describe({"kind": "cosine"})
    assert S.describe({"kind": "poly", "power": 0.9, "stages": 4}) == (
        "polynomial decay lr0 * (1 - m/S)^0.9, 5 equal phases"
    )
    assert S.describe({"kind": "poly"}).endswith("per epoch")
    assert S.describe({"kind": "step", "factor": 2.0, "max": 512}, of="batch") == (
        "batch x 2 every 40 epochs, at most 512"
    )
    assert "every 40 epochs" in S.describe({"kind": "poly", "every": 40}, of="batch")
    assert S.describe(None, of="batch") == "constant batch size"
    with pytest.raises(ValueError, match=r"of must be 'lr' or 'batch', got 'momentum'"):
        S.describe(None, of="momentum")
    with pytest.raises(ValueError, match=r"unknown batch schedule kind 'cosine'"):
        S.describe({"kind": "cosine"}, of="batch")


def test_a_step_schedule_that_overflows_is_a_clear_error_or_capped():
    spec = {"kind": "step", "every": 1, "factor": 1e300}
    assert S.batch_size_at(spec, 64, 1, 3) == round(64e300)
    with pytest.raises(ValueError, match="makes the batch size of epoch 3 overflow; use a "
                       "smaller factor or cap it with max"):
        S.batch_size_at(spec, 64, 2, 3)
    assert S.batch_size_at({**spec, "max": 4096}, 64, 2, 3) == 4096
    assert S.lr_at({"kind": "step", "every": 1, "factor": 1e300}, 0.1, 2, 3) == float("inf")
    with pytest.raises(ValueError, match=r"unknown lr schedule kind \[1\]; valid kinds"):
        S.lr_at({"kind": [1]}, 0.1, 0, 3)
