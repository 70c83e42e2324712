"""Tests for the measuring part of labkit.critical: SFOCallback, measure_sfo, SFOResult and
`labkit critical measure` (Sato & Iiduka 2024, arXiv:2402.02325, §4.3).

The exactness of T is checked two ways: on synthetic gradient-norm sequences (hypothesis), where
the callback is driven step by step like labkit.train drives it, and on real smoke-sized runs,
against a brute-force recomputation from the norms a spy callback records at every step.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.cli import main
from labkit.critical import (
    CRITERIA,
    PROGRESS_FILE,
    SETTINGS_FILE,
    SFOCallback,
    SFORecord,
    SFOResult,
    c2_upper_bound,
    critical_batch_size,
    measure_sfo,
)
from labkit.data import load_cifar, make_fake_cifar, normalize
from labkit.noise import full_gradient
from labkit.train import Callback, RunResult, RunState, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TRAIN = 64  # small generated CIFAR-10 training set: an epoch of the tiny CNN is ~0.1 s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_fake_cifar(root, "cifar10", n_train=N_TRAIN, n_test=16, seed=0)
    return load_cifar("cifar10", root=root, device="cpu")


def shb(**kw) -> TrainConfig:
    base = {"profile": "smoke", "dataset": "cifar10", "optimizer": "shb", "lr": 0.05,
            "hparams": {"beta": 0.9}, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


class Spy(Callback):
    """Records float(state.grad_norm) at every step, per batch size, and the runs started."""

    step_interval = 1

    def __init__(self):
        self.norms: dict[int, list[float]] = {}
        self.first_step: dict[int, int] = {}
        self.started: list[int] = []

    def on_run_start(self, state):
        b = state.config.batch_size
        self.started.append(b)
        self.first_step[b] = state.step + 1
        self.norms[b] = []

    def on_step(self, state):
        self.norms[state.config.batch_size].append(float(state.grad_norm))


def brute_force(norms, eps, t_min):
    """(T, running mean at T) by the definition; (None, final mean) when never reached."""
    total = 0.0
    for t, g in enumerate(norms, start=1):
        total += g
        if t >= t_min and total / t <= eps:
            return t, total / t
    return None, total / len(norms) if norms else math.nan


# --------------------------------------------------------------------------- synthetic runs


def drive(cb, norms, *, n_train, batch_size, status="finished"):
    """Call the hooks the way labkit.train does, with the given mini-batch gradient norms."""
    cfg = TrainConfig(profile="smoke", batch_size=batch_size, device="cpu").resolved()
    state = RunState(cfg, model=None, optimizer=None, device=torch.device("cpu"),
                     n_train=n_train)
    cb.on_run_start(state)
    for g in norms:
        state.step += 1
        state.grad_norm = torch.tensor(g, dtype=torch.float32)
        cb.on_step(state)
        if state.stop:
            break
    cb.on_run_end(state, RunResult(status=status, config=cfg.to_dict(), metrics=[]))
    return state


@settings(max_examples=50, deadline=None)
@given(
    norms=st.lists(st.floats(0, 4, width=32), min_size=1, max_size=150),
    eps=st.floats(0.05, 3.0),
    sync_every=st.integers(1, 40),
    n_train=st.integers(1, 60),
    min_epochs=st.integers(0, 3),
    bad=st.one_of(st.none(), st.tuples(st.integers(0, 149), st.sampled_from([math.nan,
                                                                               math.inf]))),
    draw=st.data(),
)

def test_minibatch_T_is_exact_for_any_sequence(norms, eps, sync_every, n_train, min_epochs,
                                               bad, draw):
    b = draw.draw(st.integers(1, n_train), label="batch_size")
    if bad is not None and bad[0] < len(norms):
        norms[bad[0]] = bad[1]
    norms32 = [float(torch.tensor(g, dtype=torch.float32)) for g in norms]
    t_min = max(1, min_epochs * math.ceil(n_train / b))
    want_t, want_mean = brute_force(norms32, eps, t_min)

    cb = SFOCallback(eps, min_epochs=min_epochs, sync_every=sync_every)
    state = drive(cb, norms, n_train=n_train, batch_size=b)
    assert cb.steps == want_t
    assert cb.reached == (want_t is not None)
    if want_t is not None:
        assert cb.value == want_mean == cb.running_grad_norm  # bit for bit
        assert want_t <= cb.steps_run < want_t + sync_every
        # Stopped at the read that found T, or found by the last read as the run ended.
        assert state.stop or cb.steps_run == len(norms)
        assert not cb.diverged
    else:
        assert cb.diverged == any(not math.isfinite(g) for g in norms32)
        if not cb.diverged:
            assert cb.steps_run == len(norms) and cb.value == want_mean


def test_minibatch_reads_are_rare_and_T_exact():
    """The host reads the running sum only at steps where the mean can have reached eps."""
    cb = SFOCallback(0.5, sync_every=32)
    reads = []
    read = cb._read
    cb._read = lambda t: (reads.append(t), read(t))[1]
    # Norm 2 for 100 steps, then 0: the mean 200 / t reaches 0.5 at t = 400 exactly.
    drive(cb, [2.0] * 100 + [0.0] * 900, n_train=10_000, batch_size=1)
    # After reading S_32 = 64 no step before 64 / 0.5 = 128 can pass, after S_128 = 200 none
    # before 400: three reads for 400 steps, and no step trained past T.
    assert reads == [32, 128, 400]
    assert cb.steps == 400 and cb.steps_run == 400 and cb.value == 0.5

    cb = SFOCallback(0.5, sync_every=32)
    reads.clear()
    read = cb._read
    cb._read = lambda t: (reads.append(t), read(t))[1]
    drive(cb, [2.0] * 2000, n_train=10_000, batch_size=1)
    assert reads == [32, 128, 512]  # the next possible pass, 2048, lies beyond the run
    assert cb.steps is None and not cb.reached and cb.running_grad_norm == 2.0


# --------------------------------------------------------------------------- real runs


def test_minibatch_measure_matches_brute_force(data):
    # Calibrate eps on the runs themselves: first with an eps nothing reaches.
    spy = Spy()
    cfg = shb()
    never = measure_sfo(cfg, [4, 16, 32], 1e-6, max_epochs=3, min_epochs=1, data=data,
                        progress=False, callbacks=[spy])
    assert [r.batch_size for r in never.records] == [4, 16, 32]
    for r in never.records:
        assert not r.reached and r.sfo == math.inf and r.steps is None and r.examples is None
        assert r.status == "finished" and r.epochs == 3 and not r.diverged
        assert r.steps_run == 3 * math.ceil(N_TRAIN / r.batch_size)
        assert r.running_grad_norm == brute_force(spy.norms[r.batch_size], 1e-6, 10**9)[1]
    with pytest.raises(ValueError, match="no batch size reached the threshold"):
        _ = never.critical_batch_size

    def eligible_min(b):
        norms, t_min = spy.norms[b], math.ceil(N_TRAIN / b)
        return min(sum(norms[:t]) / t for t in range(t_min, len(norms) + 1))

    # Both b = 16 and b = 32 reach this eps within 3 epochs; b = 4 stays above it.
    eps = max(eligible_min(16), eligible_min(32))
    assert eligible_min(4) > eps

    spy = Spy()
    seen = []
    result = measure_sfo(cfg, [32, 4, 16], eps, max_epochs=3, min_epochs=1, sync_every=3,
                         data=data, progress=False, callbacks=[spy], on_record=seen.append)
    assert [r.batch_size for r in seen] == [32, 4, 16]  # in the order measured
    table = result.table()
    assert list(table) == [4, 16, 32]
    for r in result.records:
        b = r.batch_size
        spe = math.ceil(N_TRAIN / b)
        want_t, want_mean = brute_force(spy.norms[b], eps, spe)
        assert r.steps == want_t
        if b == 4:
            assert not r.reached and r.sfo == math.inf and table[4] == math.inf
            continue
        assert r.reached and r.sfo == want_t * b == table[b]
        assert r.value == want_mean == r.running_grad_norm <= eps
        assert want_t <= r.steps_run < want_t + 3 and r.steps_run == len(spy.norms[b])
        assert r.examples == (want_t // spe) * N_TRAIN + (want_t % spe) * b
        assert r.epochs == math.ceil(r.steps_run / spe)
        assert r.status in ("stopped", "finished") and r.folder is None
    # b = 4 never reached eps and is ignored by the argmin.
    finite = {b: v for b, v in table.items() if math.isfinite(v)}
    assert result.critical_batch_size == min(finite, key=lambda b: (finite[b], b))
    assert critical_batch_size(table) == result.critical_batch_size
    assert result.c2_upper_bound() == c2_upper_bound(
        "shb", critical_batch_size=result.critical_batch_size, lr=0.05, eps=eps, beta=0.9)


class FullSpy(Callback):
    """||grad f(x_t)|| over the training set at every multiple of `every`, with
    labkit.noise.full_gradient, and the model as the run ends (x_T after a stop)."""

    def __init__(self, data, every):
        self.step_interval = every
        x = normalize(data.train_x, data.mean, data.std)
        self.examples = (x, data.train_y)
        self.norms: dict[int, float] = {}

    def norm(self, model):
        grads = full_gradient(model, lambda o, y: F.cross_entropy(o, y, reduction="none"),
                              self.examples)
        return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))

    def on_step(self, state):
        self.norms[state.step] = self.norm(state.model)

    def on_run_end(self, state, result):
        self.final_step = state.step
        self.final_model = copy.deepcopy(state.model)


def test_full_gradient_criterion_against_full_gradient(data):
    cfg = TrainConfig(profile="smoke", dataset="cifar10", optimizer="sgd", lr=0.1,
                      device="cpu", augment=False)
    kw = {"criterion": "full", "check_every": 4, "min_epochs": 2, "max_epochs": 4,
          "data": data, "progress": False}
    spe = math.ceil(N_TRAIN / 8)  # 8 steps per epoch: tests at t = 16, 20, ..., 32
    # An eps no test passes: the run trains all epochs.
    spy = FullSpy(data, 4)
    never = measure_sfo(cfg, [8], 1e-9, callbacks=[spy], **kw)
    (r,) = never.records
    assert not r.reached and r.sfo == math.inf and r.steps_run == 4 * spe == spy.final_step
    assert r.value == pytest.approx(spy.norms[4 * spe], rel=1e-6)  # the last test
    assert r.status == "finished" and not r.diverged

    # Now an eps that the test at step t_j passes and every earlier test fails. (With batch
    # norm in eval mode the full-gradient norm first grows, then falls, on this data.)
    checks = [(t, v) for t, v in sorted(spy.norms.items()) if t >= 2 * spe]
    j = next((i for i in range(1, len(checks))
              if checks[i][1] < min(v for _, v in checks[:i])), None)
    assert j is not None, f"no test value falls below all earlier ones: {checks}"
    t_j = checks[j][0]
    eps = (checks[j][1] + min(v for _, v in checks[:j])) / 2
    spy = FullSpy(data, 4)
    result = measure_sfo(cfg, [8], eps, callbacks=[spy], **kw)
    (r,) = result.records
    assert r.reached and r.steps == t_j and r.sfo == 8 * t_j and r.examples == 8 * t_j
    assert r.steps_run == t_j == spy.final_step  # the run stops right after step T
    at_stop = spy.norm(spy.final_model)  # ||grad f(x_T)|| at the parameters the run ended with
    assert at_stop <= eps and r.value == pytest.approx(at_stop, rel=1e-6)
    assert all(v > eps for t, v in spy.norms.items() if 2 * spe <= t < t_j)
    assert r.value == pytest.approx(checks[j][1], rel=1e-6)  # the tests did not perturb training
    assert result.critical_batch_size == 8


def test_diverged_runs_are_recorded_and_the_measurement_goes_on(data):
    cfg = TrainConfig(profile="smoke", dataset="cifar10", optimizer="sgd", lr=1e30,
                      device="cpu")
    result = measure_sfo(cfg, [16, 32], 0.5, max_epochs=2, sync_every=2, data=data,
                         progress=False)
    assert [r.batch_size for r in result.records] == [16, 32]
    for r in result.records:
        assert r.diverged and not r.reached and r.sfo == math.inf and r.steps is None
        assert r.steps_run <= 2 * math.ceil(N_TRAIN / r.batch_size)
    assert result.table() == {16: math.inf, 32: math.inf}
    with pytest.raises(ValueError, match="no batch size reached the threshold"):
        _ = result.critical_batch_size


class Interrupt(Callback):
    step_interval = 1

    def __init__(self, batch_size, step):
        self.batch_size, self.step = batch_size, step

    def on_step(self, state):
        if state.config.batch_size == self.batch_size and state.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption(data, tmp_path):
    out = tmp_path / "sfo"
    cfg = shb()
    kw = {"max_epochs": 4, "sync_every": 2, "data": data, "progress": False}
    eps = 1.6
    spy1 = Spy()
    with pytest.raises(KeyboardInterrupt):  # b = 16 has 4 steps per epoch: stop in epoch 2
        measure_sfo(cfg, [32, 16], eps, out=out, callbacks=[spy1, Interrupt(16, 6)], **kw)
    assert (out / "sfo-b32.json").exists() and not (out / "sfo-b16.json").exists()
    assert (out / "runs" / "b16" / "checkpoint.pt").exists()
    assert (out / "runs" / "b16" / PROGRESS_FILE).exists() and (out / SETTINGS_FILE).exists()

    spy2 = Spy()
    result = measure_sfo(cfg, [32, 16], eps, out=out, callbacks=[spy2], **kw)
    assert spy2.started == [16]  # b = 32 is not recomputed
    assert spy2.first_step[16] == 5  # b = 16 resumed after its first epoch
    assert spy2.norms[16][:2] == spy1.norms[16][4:6]  # bit-for-bit the same steps 5 and 6
    norms = spy1.norms[16][:4] + spy2.norms[16]
    want_t, want_mean = brute_force(norms, eps, 1)
    rec = {r.batch_size: r for r in result.records}
    assert rec[16].steps == want_t and not rec[16].loaded
    assert rec[16].value == want_mean  # the running sum was restored exactly
    assert rec[32].loaded and rec[32].steps == brute_force(spy1.norms[32], eps, 1)[0]
    assert rec[16].folder == str(out / "runs" / "b16")

    # Everything is on disk now: nothing trains, the same numbers come back.
    spy3 = Spy()
    again = measure_sfo(cfg, [16, 32], eps, out=out, callbacks=[spy3], **kw)
    assert spy3.started == [] and all(r.loaded for r in again.records)
    assert again.table() == result.table()
    stored = json.loads((out / "sfo-b16.json").read_text())
    assert SFORecord.from_dict(stored) == dataclasses_replace_loaded(rec[16])

    # A record lost after its run ended (a crash in between) is rebuilt from the run folder.
    (out / "sfo-b16.json").unlink()
    (out / "sfo-b32.json").unlink()
    rebuilt = measure_sfo(cfg, [16, 32], eps, out=out, callbacks=[spy3], **kw)
    assert spy3.started == []
    assert [r.to_dict() for r in rebuilt.records] == [r.to_dict() for r in again.records]

    # Adding a batch size reuses the rest; other settings are refused before anything runs.
    with pytest.raises(ValueError, match=r"other settings \(differing: eps\)"):
        measure_sfo(cfg, [16, 32], 1.0, out=out, **kw)
    with pytest.raises(ValueError, match=r"differing: config\.epochs, max_epochs"):
        measure_sfo(cfg, [16, 32], eps, out=out, **{**kw, "max_epochs": 5})
    with pytest.raises(ValueError, match=r"differing: config\.lr"):
        measure_sfo(shb(lr=0.1), [16], eps, out=out, **kw)


def test_resume_without_progress_file_rebuilds_the_sum(data, tmp_path):
    """A run folder whose progress file is gone resumes from the per-epoch mean norms."""
    out, cfg, eps = tmp_path / "sfo", shb(), 1.6
    kw = {"max_epochs": 4, "data": data, "progress": False}
    spy1 = Spy()
    with pytest.raises(KeyboardInterrupt):
        measure_sfo(cfg, [16], eps, out=out, callbacks=[spy1, Interrupt(16, 6)], **kw)
    (out / "runs" / "b16" / PROGRESS_FILE).unlink()
    spy2 = Spy()
    (r,) = measure_sfo(cfg, [16], eps, out=out, callbacks=[spy2], **kw).records
    assert spy2.first_step[16] == 5
    want_t, want_mean = brute_force(spy1.norms[16][:4] + spy2.norms[16], eps, 1)
    assert r.steps == want_t and r.value == pytest.approx(want_mean, rel=1e-12)


def test_callback_with_train_recognizes_a_run_that_already_passed(data, tmp_path):
    from labkit.train import train

    cfg = shb(batch_size=16, epochs=4, out=str(tmp_path / "run"))
    cb = SFOCallback(1.6, sync_every=2)
    first = train(cfg, [cb], progress=False, data=data)
    assert cb.reached and first.status == "stopped"
    spy = Spy()
    again = SFOCallback(1.6, sync_every=2)
    train(cfg, [again, spy], progress=False, data=data)  # resumes from the last checkpoint
    assert again.reached and again.steps == cb.steps and again.value == cb.value
    assert len(spy.norms[16]) <= 1  # stopped at once: the progress file held the answer
    with pytest.raises(ValueError, match="was written by an SFO test with the settings"):
        train(cfg, [SFOCallback(1.0)], progress=False, data=data)


class Stopper(Callback):
    step_interval = 1

    def __init__(self, batch_size, step):
        self.batch_size, self.step = batch_size, step

    def on_step(self, state):
        if state.config.batch_size == self.batch_size and state.step == self.step:
            state.stop = True


def test_a_run_stopped_by_another_callback_ends_the_measurement(data, tmp_path):
    result = measure_sfo(shb(), [32, 16, 8], 1e-6, max_epochs=1, out=tmp_path / "sfo",
                         data=data, progress=False, callbacks=[Stopper(16, 2)])
    assert [r.batch_size for r in result.records] == [32]
    assert result.pending == [16, 8] and not result.complete
    assert not (tmp_path / "sfo" / "sfo-b16.json").exists()  # b = 16 resumes next time


def dataclasses_replace_loaded(record):
    import dataclasses

    return dataclasses.replace(record, loaded=False)


def test_result_table_bound_and_json_round_trip():
    # Sato & Iiduka (2024) Fig. 4 in shape: U-shaped SFO for SHB with its minimum at 2^10.
    records = [
        SFORecord(batch_size=b, steps=t, sfo=float(t * b), reached=True, diverged=False,
                  epochs=1, steps_run=t, examples=t * b, value=0.49, running_grad_norm=0.49,
                  status="stopped")
        for b, t in ((2**k, 2**24 // 2**k + 4000 * abs(k - 10) * 2**13 // 2**k)
                     for k in range(3, 14))
    ]
    records.append(SFORecord(batch_size=2**14, steps=None, sfo=math.inf, reached=False,
                             diverged=True, epochs=3, steps_run=7, examples=None,
                             value=math.inf, running_grad_norm=math.inf, status="diverged"))
    result = SFOResult(records=records, eps=0.5, criterion="minibatch", min_epochs=10,
                       max_epochs=200, check_every=None,
                       config={"optimizer": "shb", "lr": 0.1, "hparams": {}}, out=None)
    assert result.critical_batch_size == 1024 and result.complete
    assert result.beta() == 0.9  # SHB's default momentum
    assert result.c2_upper_bound() == pytest.approx(25.3187, rel=1e-5)  # the paper's value
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["sfo"]["16384"] is None and d["records"][-1]["value"] is None
    back = SFOResult.from_dict(d)
    assert back.table() == result.table() and back.critical_batch_size == 1024
    assert back.records[:-1] == result.records[:-1]
    assert math.isnan(back.records[-1].value)  # non-finite values come back as NaN
    sgd = SFOResult(records=records[:3], eps=0.5, criterion="minibatch", min_epochs=0,
                    max_epochs=1, check_every=None, config={"optimizer": "sgd", "lr": 0.1})
    assert sgd.c2_upper_bound() == pytest.approx(sgd.critical_batch_size * 0.25 / 0.1)
    with pytest.raises(ValueError, match="an SFO record needs the key"):
        SFORecord.from_dict({"batch_size": 8})


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((shb(), [8], 0), {}, ValueError, "eps must be > 0 and finite, got 0"),
    ((shb(), [8], math.nan), {}, ValueError, "eps must be > 0 and finite, got nan"),
    ((shb(), [8], "0.5"), {}, TypeError, "eps must be a positive real number, got '0.5'"),
    ((shb(), [8], 0.5), {"criterion": "fulll"}, ValueError,
     "criterion must be one of 'minibatch', 'full'; got 'fulll'"),
    ((shb(), [], 0.5), {}, ValueError, "batch_sizes is empty"),
    ((shb(), 8, 0.5), {}, TypeError, "batch_sizes must be a sequence of ints"),
    ((shb(), [8, 0], 0.5), {}, ValueError,
     r"batch size \(an entry of batch_sizes\) must be >= 1, got 0"),
    ((shb(), [8, 8.0], 0.5), {}, TypeError, "must be an int >= 1, got 8.0"),
    ((shb(), [8, 16, 8], 0.5), {}, ValueError, "batch_sizes lists batch size 8 twice"),
    ((shb(), [8, 128, 256], 0.5), {}, ValueError,
     f"batch size\\(s\\) 128, 256 exceed the {N_TRAIN} training images of cifar10"),
    ((shb(), [8], 0.5), {"min_epochs": -1}, ValueError, "min_epochs must be >= 0, got -1"),
    ((shb(), [8], 0.5), {"max_epochs": 0}, ValueError, "max_epochs must be >= 1, got 0"),
    ((shb(), [8], 0.5), {"min_epochs": 5, "max_epochs": 2}, ValueError,
     "min_epochs=5 exceeds max_epochs=2"),
    ((shb(), [8], 0.5), {"check_every": 2}, ValueError,
     "check_every applies to criterion='full' only"),
    ((shb(), [8], 0.5), {"criterion": "full", "check_every": 0}, ValueError,
     "check_every must be >= 1, got 0"),
    ((shb(), [8], 0.5), {"sync_every": 0}, ValueError, "sync_every must be >= 1, got 0"),
    ((shb(out="x"), [8], 0.5), {}, ValueError, "config.out must be None"),
    ((shb(batch_schedule={"kind": "step", "every": 1, "factor": 2}), [8], 0.5), {},
     ValueError, "config.batch_schedule must be None"),
    ((shb(track_grad_norm=False), [8], 0.5), {}, ValueError, "track_grad_norm=True"),
    ((shb(lr=-1.0), [8], 0.5), {}, ValueError, "lr must be a positive finite number"),
    (({"optimizer": "shb"}, [8], 0.5), {}, TypeError, "config must be a labkit.train"),
])
def test_measure_sfo_bad_inputs_fail_before_anything_runs(data, tmp_path, args, kwargs, exc,
                                                          match):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        measure_sfo(*args, out=out, data=data, progress=False, **kwargs)
    assert not out.exists()


def test_callback_errors(data):
    with pytest.raises(ValueError, match="criterion='full' needs data="):
        SFOCallback(0.5, criterion="full")
    with pytest.raises(TypeError, match="data must be a labkit.data.CifarData"):
        SFOCallback(0.5, criterion="full", data=(data.train_x, data.train_y))
    with pytest.raises(ValueError, match="criterion must be one of"):
        SFOCallback(0.5, criterion="mean")
    assert CRITERIA[0] == "minibatch"  # the documented default
    cb = SFOCallback(0.5)
    with pytest.raises(ValueError, match="needs the mini-batch gradient norms"):
        cfg = TrainConfig(profile="smoke", device="cpu", track_grad_norm=False).resolved()
        cb.on_run_start(RunState(cfg, None, None, torch.device("cpu"), 64))


# --------------------------------------------------------------------------- command line


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def smoke_root(tmp_path):
    # The smoke profile generates its data only where none exists: give it the small set.
    root = tmp_path / "data"
    make_fake_cifar(root / "labkit-smoke", "cifar10", n_train=N_TRAIN, n_test=16, seed=0)
    return root


def measure_argv(root, out, *extra):
    return ["critical", "measure", "--profile", "smoke", "--dataset", "cifar10",
            "--optimizer", "shb", "--lr", "0.05", "--set", "beta=0.9", "--batch-sizes", "4",
            "16", "32", "--max-epochs", "2", "--min-epochs", "1", "--data-root", root,
            "--device", "cpu", "--out", out, *extra]


def test_cli_measure_prints_table_b_star_and_bound(smoke_root, tmp_path, capsys):
    out = tmp_path / "m"
    code, text, _ = run(capsys, *measure_argv(smoke_root, out, "--eps", "2.5"))
    assert code == 0
    res = json.loads(text.strip().splitlines()[-1])
    records = {r["batch_size"]: r for r in res["records"]}
    assert sorted(records) == [4, 16, 32]
    reached = {b: r for b, r in records.items() if r["reached"]}
    assert reached, "eps = 2.5 is above the initial gradient norms of b = 16 and 32"
    for b, r in records.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  b = {b:>6}"))
        if r["reached"]:
            assert f"T = {r['steps']:>8}  SFO = {r['steps'] * b:<10.6g}" in line
        else:
            assert "SFO = inf" in line and res["sfo"][str(b)] is None
    b_star = min(reached, key=lambda b: (reached[b]["sfo"], b))
    assert res["critical_batch_size"] == b_star
    assert f"critical batch size b* = {b_star} (2^{b_star.bit_length() - 1})" in text
    c2 = c2_upper_bound("shb", critical_batch_size=b_star, lr=0.05, eps=2.5, beta=0.9)
    assert res["c2_upper_bound"] == pytest.approx(c2)
    assert f"C^2 < {c2:.6g}  (Theorem 4.4)" in text
    assert res["criterion"] == "minibatch" and res["min_epochs"] == 1
    assert res["max_epochs"] == 2 and res["beta"] == 0.9

    # The same command again loads every batch size and trains nothing.
    mtime = (out / "runs" / "b4" / "checkpoint.pt").stat().st_mtime_ns
    code, again, _ = run(capsys, *measure_argv(smoke_root, out, "--eps", "2.5"))
    assert code == 0 and again.count("(saved)") == 3
    assert json.loads(again.strip().splitlines()[-1]) == res
    assert (out / "runs" / "b4" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_cli_measure_nothing_reached_is_exit_1(smoke_root, tmp_path, capsys):
    code, text, err = run(capsys, *measure_argv(smoke_root, tmp_path / "m", "--eps", "1e-6",
                                               "--criterion", "full", "--batch-sizes", "32"))
    assert code == 1 and "no batch size reached the threshold" in err
    res = json.loads(text.strip().splitlines()[-1])
    assert res["critical_batch_size"] is None and res["sfo"] == {"32": None}
    assert res["criterion"] == "full" and "did not reach eps within 2 epochs" in text


@pytest.mark.parametrize("extra,match", [
    (["--eps", "0.5", "--check-every", "2"], "--check-every applies to --criterion full only"),
    (["--eps", "0"], "--eps must be a positive finite number; got 0.0"),
    (["--eps", "0.5", "--batch-sizes", "8", "128"],
     f"batch size(s) 128 exceed the {N_TRAIN} training images of cifar10"),
    (["--eps", "0.5", "--batch-sizes", "0"], "expected a positive integer, got '0'"),
    (["--eps", "0.5", "--set", "beta=0.8"], "--set beta given twice"),
    (["--eps", "0.5", "--min-epochs", "3"], "min_epochs=3 exceeds max_epochs=2"),
    (["--eps", "0.5", "--min-epochs", "-1"], "--min-epochs must be >= 0; got -1"),
    (["--eps", "0.5", "--criterion", "mean"], "invalid choice: 'mean'"),
])
def test_cli_measure_bad_flags(smoke_root, tmp_path, capsys, extra, match):
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in measure_argv(smoke_root, out, *extra)])
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["critical", "--results", "x", "measure", "--eps", "0.5", "--batch-sizes", "8", "--out",
      "o"], "--results belongs to `labkit critical`, not `labkit critical measure`"),
    (["critical", "--beta", "0.9", "measure", "--eps", "0.5", "--batch-sizes", "8", "--out",
      "o"], "(use --set beta=VALUE after measure)"),
    (["critical", "measure", "--eps", "0.5", "--batch-sizes", "8"],
     "the following arguments are required: --out"),
    (["critical", "measure", "--eps", "0.5", "--out", "o"],
     "the following arguments are required: --batch-sizes"),
    (["critical", "--sfo", "8:1"], "the following arguments are required: --eps"),
])
def test_cli_measure_mode_flags(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
