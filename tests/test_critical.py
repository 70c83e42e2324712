"""Tests for labkit.critical: SFO complexity, the measured critical batch size, and Theorem 4.4
of Sato & Iiduka (arXiv:2402.02325) against the paper's worked numbers (§4.3); the delta
formulas of eqs. (12)-(14) are tested in test_noise.py (labkit.noise re-exports them)."""

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.critical import (
    OPTIMIZERS,
    PAPER_VALUES,
    c2_upper_bound,
    critical_batch_size,
    critical_batch_size_lower_bound,
    delta_nshb,
    delta_sgd,
    sfo_complexity,
    sfo_table,
    theorem_4_4_factor,
)

PAPER = {"lr": 0.1, "eps": 0.5, "beta": 0.9}


# ---------------------------------------------------------------------------- SFO complexity


def test_sfo_complexity():
    assert sfo_complexity(100, 128) == 12800
    assert sfo_complexity(0, 8) == 0
    assert isinstance(sfo_complexity(3, 4), int)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        sfo_complexity(-1, 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        sfo_complexity(10, 0)
    with pytest.raises(TypeError, match="steps must be an int >= 0, got 2.5"):
        sfo_complexity(2.5, 8)
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, got True"):
        sfo_complexity(10, True)


def test_critical_batch_size_argmin_ignores_failed_runs():
    sfo = {8: 9000.0, 16: 7000.0, 32: 5000.0, 64: 6400.0, 128: math.inf, 256: math.nan}
    assert critical_batch_size(sfo) == 32
    # a U-shaped curve like Sato & Iiduka (2024) Fig. 4: the minimum of T b, not of T
    counts = [8000, 3600, 1700, 800, 380, 180, 85, 50, 30, 20, 12]
    steps = {2**k: t for k, t in zip(range(3, 14), counts, strict=True)}
    table = sfo_table(steps)
    assert critical_batch_size(table) == 512
    assert min(steps, key=steps.get) == 8192  # fewest steps is not fewest gradients


def test_critical_batch_size_ties_go_to_smallest():
    assert critical_batch_size({64: 100.0, 16: 100.0, 32: 100.0, 8: 200.0}) == 16


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.integers(1, 2**14),
        st.one_of(st.floats(0, 1e9), st.just(math.inf), st.just(math.nan)),
        min_size=1,
        max_size=12,
    )
)
def test_critical_batch_size_property(sfo):
    finite = {b: v for b, v in sfo.items() if math.isfinite(v)}
    if not finite:
        with pytest.raises(ValueError, match="no batch size reached the threshold"):
            critical_batch_size(sfo)
        return
    b = critical_batch_size(sfo)
    assert b in finite
    assert all(finite[b] < v or (finite[b] == v and b <= k) for k, v in finite.items())


def test_critical_batch_size_errors():
    with pytest.raises(ValueError, match="sfo is empty"):
        critical_batch_size({})
    with pytest.raises(ValueError, match=r"no batch size reached the threshold.*\[8, 16\]"):
        critical_batch_size({8: math.inf, 16: math.nan})
    with pytest.raises(ValueError, match="batch size .a key of sfo. must be >= 1, got 0"):
        critical_batch_size({0: 10.0})
    with pytest.raises(TypeError, match="batch size .a key of sfo. must be an int"):
        critical_batch_size({8.5: 10.0})
    with pytest.raises(ValueError, match="SFO complexity for batch size 8 must be >= 0"):
        critical_batch_size({8: -1.0})
    with pytest.raises(TypeError, match="SFO complexity for batch size 8 must be a number"):
        critical_batch_size({8: "10"})
    with pytest.raises(TypeError, match="sfo must be a mapping"):
        critical_batch_size([(8, 10.0)])


def test_sfo_table():
    table = sfo_table({16: 100, 8: None, 32: [40, 60], 64: [10, math.inf], 128: math.nan})
    assert list(table) == [8, 16, 32, 64, 128]
    assert table[16] == 1600.0
    assert table[32] == 32 * 50.0
    assert table[8] == math.inf and table[64] == math.inf and table[128] == math.inf
    assert critical_batch_size(table) == 16
    with pytest.raises(ValueError, match="steps for batch size 8 must be ints >= 0"):
        sfo_table({8: -3})
    with pytest.raises(ValueError, match="steps for batch size 8 must be ints >= 0"):
        sfo_table({8: [2.5]})
    with pytest.raises(ValueError, match="steps for batch size 8 is an empty list"):
        sfo_table({8: []})
    with pytest.raises(ValueError, match="batch size .a key of steps. must be >= 1"):
        sfo_table({0: 5})
    with pytest.raises(TypeError, match="steps must be a mapping"):
        sfo_table([5, 6])


# ---------------------------------------------------------------------------- Theorem 4.4


def test_c2_upper_bounds_reproduce_paper():
    """Sato & Iiduka (2024) §4.3: eta = 0.1, beta = 0.9, eps = 0.5, b* = 2^9, 2^10, 2^9."""
    sgd = c2_upper_bound("sgd", critical_batch_size=2**9, **PAPER)
    shb = c2_upper_bound("shb", critical_batch_size=2**10, **PAPER)
    nshb = c2_upper_bound("nshb", critical_batch_size=2**9, **PAPER)
    assert sgd == pytest.approx(1280.0, rel=1e-12)
    assert nshb == pytest.approx(128.0, rel=1e-12)
    # 1024 * 0.25 * 0.9 * 0.01 / (0.1 * 0.91) = 2.304 / 0.091 = 25.31868...; printed 25.318
    assert shb == pytest.approx(2.304 / 0.091, rel=1e-12)
    assert math.floor(shb * 1000) / 1000 == 25.318


def test_paper_values_consistent():
    pv = PAPER_VALUES
    assert pv["batch_sizes"] == (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    for name in OPTIMIZERS:
        bound = c2_upper_bound(
            name,
            critical_batch_size=pv["critical_batch_size"][name],
            lr=pv["lr"],
            eps=pv["eps"],
            beta=pv["beta"],
        )
        assert bound == pytest.approx(pv["c2_upper_bound"][name], abs=1e-3)
        assert pv["critical_batch_size"][name] in pv["batch_sizes"]
    # Sato & Iiduka (2024) §5.1: with these bounds delta_SGD and delta_NSHB coincide
    assert delta_nshb(pv["lr"], 64, pv["beta"], pv["c2_upper_bound"]["nshb"]) == pytest.approx(
        delta_sgd(pv["lr"], 64, pv["c2_upper_bound"]["sgd"]), rel=1e-12
    )
    by_eps = pv["shb_critical_batch_size_by_eps"]
    assert [by_eps[e] for e in sorted(by_eps)] == [1024, 512, 256]  # smaller eps, larger b*
    assert pv["k"] == {"shb": 1.77, "nshb": 4.5}


def test_lower_bound_by_hand():
    # SGD: 0.1 * 1280 / 0.25 = 512; NSHB: 0.1 * 128 / (0.1 * 0.25) = 512
    assert critical_batch_size_lower_bound("sgd", c2=1280.0, **PAPER) == pytest.approx(512.0)
    assert critical_batch_size_lower_bound("nshb", c2=128.0, **PAPER) == pytest.approx(512.0)
    # SHB: 0.1 * 0.91 * 25.318 / (0.9 * 0.01 * 0.25) = 1023.97...
    expected = 0.1 * 0.91 * 25.318 / (0.9 * 0.01 * 0.25)
    assert critical_batch_size_lower_bound("shb", c2=25.318, **PAPER) == pytest.approx(expected)
    assert expected == pytest.approx(1024, abs=0.1)
    # halving eps quadruples the bound (smaller eps, larger critical batch size)
    assert critical_batch_size_lower_bound(
        "sgd", c2=1280.0, lr=0.1, eps=0.25
    ) == pytest.approx(4 * 512.0)


def test_theorem_4_4_factor():
    assert theorem_4_4_factor("sgd") == 1.0
    assert theorem_4_4_factor("sgd", 0.9) == 1.0
    assert theorem_4_4_factor("shb", 0.9) == pytest.approx(0.91 / (0.9 * 0.01))
    assert theorem_4_4_factor("nshb", 0.9) == pytest.approx(10.0)
    assert theorem_4_4_factor("nshb", 0.0) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(OPTIMIZERS),
    b=st.integers(1, 2**16),
    lr=st.floats(1e-4, 10.0),
    eps=st.floats(1e-3, 10.0),
    beta=st.floats(0.01, 0.99),
)
def test_bounds_are_inverse(name, b, lr, eps, beta):
    c2 = c2_upper_bound(name, critical_batch_size=b, lr=lr, eps=eps, beta=beta)
    back = critical_batch_size_lower_bound(name, c2=c2, lr=lr, eps=eps, beta=beta)
    assert back == pytest.approx(b, rel=1e-9)
    # the bound on C^2 grows with b* and shrinks with eta
    assert c2_upper_bound(name, critical_batch_size=2 * b, lr=lr, eps=eps, beta=beta) > c2
    assert c2_upper_bound(name, critical_batch_size=b, lr=2 * lr, eps=eps, beta=beta) < c2


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"optimizer": "adam"}, ValueError, "optimizer must be one of"),
        ({"optimizer": "shb", "beta": None}, ValueError, r"beta is required.*\(0, 1\)"),
        ({"optimizer": "nshb", "beta": None}, ValueError, r"beta is required.*\[0, 1\)"),
        ({"optimizer": "shb", "beta": 0.0}, ValueError, "divides by beta"),
        ({"optimizer": "nshb", "beta": 1.0}, ValueError, r"beta must be in \[0, 1\), got 1.0"),
        ({"optimizer": "sgd", "beta": -0.5}, ValueError, r"beta must be in \[0, 1\)"),
        ({"optimizer": "nshb", "beta": "0.9"}, TypeError, "beta must be a real number"),
        ({"eps": 0.0}, ValueError, "eps must be > 0 and finite, got 0.0"),
        ({"eps": math.inf}, ValueError, "eps must be > 0 and finite, got inf"),
        ({"lr": -0.1}, ValueError, r"lr must be > 0 and finite, got -0.1"),
        ({"lr": None}, TypeError, "lr must be a positive real number"),
    ],
)
def test_bound_errors(kwargs, exc, match):
    upper = {"optimizer": "nshb", "critical_batch_size": 512, **PAPER}
    lower = {"optimizer": "nshb", "c2": 128.0, **PAPER}
    for base, fn in ((upper, c2_upper_bound), (lower, critical_batch_size_lower_bound)):
        args = {**base, **kwargs}
        name = args.pop("optimizer")
        with pytest.raises(exc, match=match):
            fn(name, **args)


def test_bound_specific_errors():
    with pytest.raises(ValueError, match="critical_batch_size must be >= 1, got 0"):
        c2_upper_bound("sgd", critical_batch_size=0, lr=0.1, eps=0.5)
    with pytest.raises(TypeError, match="critical_batch_size must be an int"):
        c2_upper_bound("sgd", critical_batch_size=512.0, lr=0.1, eps=0.5)
    with pytest.raises(ValueError, match="c2 must be >= 0 and finite, got -1.0"):
        critical_batch_size_lower_bound("sgd", c2=-1.0, lr=0.1, eps=0.5)
    with pytest.raises(TypeError, match="c2 must be a real number"):
        critical_batch_size_lower_bound("sgd", c2="1", lr=0.1, eps=0.5)


@pytest.mark.parametrize("module", ["labkit.critical", "labkit.grading"])
def test_the_formulas_and_the_grader_load_no_torch(module):
    """The formulas' one home is torch-free, so the grader imports them instead of copies."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"

