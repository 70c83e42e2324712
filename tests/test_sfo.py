"""labkit.experiments.sfo: the one path from per-step gradient norms to T, the SFO table, b* and
the C^2 bound (Sato & Iiduka 2024, §4.3; the stopping rule of the authors' code), and
`labkit critical measure`.

The stopping rule is pinned on hand-made logs (where the authors' rule and labkit 0.2's give
different T); T on real smoke runs is checked against a brute-force recomputation from the
logged norms.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import critical, store
from labkit.cli import main
from labkit.data import load_cifar, make_fake_cifar
from labkit.experiments import run_sweep
from labkit.experiments.sfo import (
    AUTHORS_SKIP_EPOCHS,
    SKIP_EPOCHS,
    SFOCurve,
    first_tested_step,
    measure_sfo,
    running_mean,
    sfo_curves,
    sfo_of_sweep,
    steps_to_threshold,
)
from labkit.train import Callback, TrainConfig, config_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TRAIN = 64  # a small generated CIFAR-10 training set: an epoch of the tiny CNN is ~0.1 s


def brute_force(norms, eps, first):
    """T by the definition: the first t >= first whose mean of norms[:t] is <= eps."""
    total = 0.0
    for t, g in enumerate(norms, start=1):
        total += float(g)
        if t >= first and total / t <= eps:
            return t
    return None


# --------------------------------------------------------------------------- the rule


def test_the_authors_rule_tests_from_the_first_step_of_epoch_12():
    # main.py: `if norm_ave <= args.eps and epoch > 10` with 0-based epochs.
    assert AUTHORS_SKIP_EPOCHS == 11 and SKIP_EPOCHS["paper"] == 11
    assert first_tested_step(391) == 11 * 391 + 1 == 4302  # b = 128 on CIFAR's 50000 images
    assert first_tested_step(4, 0) == 1 and first_tested_step(4, 1) == 5
    with pytest.raises(ValueError, match="skip_epochs must be an integer >= 0; got -1"):
        first_tested_step(4, -1)
    with pytest.raises(ValueError, match="steps_per_epoch must be an integer >= 1; got 0"):
        first_tested_step(0)


def hand_made_log():
    """4 steps an epoch, eps = 1. Steps 1-39 have norm 1 and step 40 norm 0: the running mean
    is 39/40 <= 1 at step 40, the last step of epoch 10. Steps 41-44 have norm 3 (means 42/41
    ... 51/44 > 1) and then 0, so the sum stays 51 and the mean is 51/t: <= 1 from t = 51 on."""
    return np.array([1.0] * 39 + [0.0] + [3.0] * 4 + [0.0] * 8, dtype="<f4")


def test_the_authors_rule_and_labkit_0_2s_give_different_T_on_a_hand_made_log():
    norms, spe = hand_made_log(), 4
    assert len(norms) == 13 * spe
    # labkit 0.2 tested from the end of epoch 10: t >= 10 * 4 = 40.
    assert steps_to_threshold(norms, 1.0, 10 * spe) == 40
    # The authors' code tests while epoch > 10 (0-based): t >= 11 * 4 + 1 = 45, and passes at 51.
    assert steps_to_threshold(norms, 1.0, first_tested_step(spe)) == 51
    assert steps_to_threshold(norms, 1.0) == 1  # no epoch skipped: the mean is 1 at step 1
    m = running_mean(norms)
    assert m[39] == 39 / 40 and m[44] == 51 / 45 and m[50] == 1.0 and m[49] == 51 / 50


def write_run(root, cfg, norms, *, steps_per_epoch, status="finished", name=None):
    """A run folder written by hand: config, per-epoch metrics, result and the per-step log."""
    cfg = cfg.resolved()
    folder = root / "runs" / (name or config_hash(cfg))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    rows = []
    for e in range(len(norms) // steps_per_epoch):
        chunk = norms[e * steps_per_epoch:(e + 1) * steps_per_epoch]
        rows.append({"epoch": e + 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                     "test_acc": 0.5, "lr": cfg.lr, "batch_size": cfg.batch_size,
                     "steps": steps_per_epoch, "total_steps": (e + 1) * steps_per_epoch,
                     "grad_norm": float(np.mean(chunk, dtype=np.float64)), "time": 0.1})
    store.write_jsonl(folder / "metrics.jsonl", rows)
    if status in ("finished", "diverged"):
        (folder / "result.json").write_text(json.dumps({"status": status,
                                                        "config": cfg.to_dict()}))
    else:
        (folder / "checkpoint.pt").write_bytes(b"")
    if norms is not None:
        store.append_grad_norms(folder, norms)
    return folder


def test_sfo_of_sweep_uses_the_authors_rule_by_default(tmp_path):
    cfg = TrainConfig(profile="paper", dataset="cifar100", optimizer="sgd", lr=0.1,
                      batch_size=16, epochs=13)
    write_run(tmp_path, cfg, hand_made_log(), steps_per_epoch=4)
    (row,) = sfo_of_sweep(tmp_path, 1.0).to_dict("records")
    assert row["first_step"] == 45 and row["steps"] == 51 and row["sfo"] == 51 * 16
    assert row["reached"] and row["complete"] and row["skip_epochs"] == 11
    assert row["lowest_mean"] == row["final_mean"] == 51 / 52
    (other,) = sfo_of_sweep(tmp_path, 1.0, skip_epochs=0).to_dict("records")
    assert other["first_step"] == 1 and other["steps"] == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=40),
       st.floats(0.01, 10.0), st.integers(1, 45))
def test_steps_to_threshold_is_the_first_passing_step(norms, eps, first):
    m = running_mean(norms)
    total = 0.0
    for t, g in enumerate(norms, start=1):
        total += float(g)
        assert m[t - 1] == total / t  # summed in float64, in order
    assert steps_to_threshold(norms, eps, first) == brute_force(norms, eps, first)


@pytest.mark.parametrize("kw,message", [
    ({"eps": 0.0}, "eps must be a positive finite number"),
    ({"eps": float("nan")}, "eps must be a positive finite number"),
    ({"eps": True}, "eps must be a positive finite number"),
    ({"eps": 1.0, "first_step": 0}, "first_step must be an integer >= 1; got 0"),
])
def test_steps_to_threshold_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        steps_to_threshold([1.0, 0.5], **kw)


def test_a_nan_never_passes():
    assert steps_to_threshold([0.1, float("nan"), 0.1], 1.0) == 1
    assert steps_to_threshold([2.0, float("nan"), 0.1], 1.0) is None


# --------------------------------------------------------------------------- SFO of a sweep


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """A data root whose smoke profile finds a small generated CIFAR-10 set."""
    root = tmp_path_factory.mktemp("data")
    make_fake_cifar(root / "labkit-smoke", "cifar10", n_train=N_TRAIN, n_test=16, seed=0)
    return root


@pytest.fixture(scope="module")
def data(smoke_root):
    return load_cifar("cifar10", root=smoke_root / "labkit-smoke", device="cpu")


def shb(smoke_root, **kw) -> TrainConfig:
    base = {"profile": "smoke", "dataset": "cifar10", "optimizer": "shb", "lr": 0.05,
            "hparams": {"beta": 0.9}, "device": "cpu", "precision": "fp32",
            "data_root": str(smoke_root)}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sweep(smoke_root, tmp_path_factory):
    """Four smoke runs: SGD and SHB, b = 16 and 32, 3 epochs."""
    out = tmp_path_factory.mktemp("sweep")
    configs = [shb(smoke_root, optimizer=opt, hparams={} if opt == "sgd" else {"beta": 0.9},
                   batch_size=b, epochs=3) for opt in ("sgd", "shb") for b in (16, 32)]
    assert run_sweep(configs, out, progress=False).complete
    return out


def test_sfo_of_sweep_is_the_rule_applied_to_each_runs_log(sweep):
    runs = sfo_of_sweep(sweep, 1.6, skip_epochs=1)
    assert len(runs) == 4 and runs["complete"].all()
    for r in runs.to_dict("records"):
        norms = store.read_grad_norms(r["folder"])
        spe = N_TRAIN // r["batch_size"]
        assert len(norms) == 3 * spe  # train() logged every step
        assert r["first_step"] == spe + 1
        steps = brute_force(norms, 1.6, spe + 1)
        assert (None if pd.isna(r["steps"]) else r["steps"]) == steps
        assert r["sfo"] == (steps * r["batch_size"] if steps else math.inf)
        m = running_mean(norms)
        assert r["lowest_mean"] == m[spe:].min() and r["final_mean"] == m[-1]
    assert len(sfo_of_sweep(sweep, 1.6, runs=[runs["run"][0]])) == 1
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        sfo_of_sweep(sweep, -1.0)
    with pytest.raises(ValueError, match="skip_epochs must be an integer >= 0; got -1"):
        sfo_of_sweep(sweep, 1.0, skip_epochs=-1)


def test_runs_without_a_complete_log_get_a_message_saying_what_to_do(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    run = sfo_of_sweep(copy, 1.6).iloc[0]
    log = copy / "runs" / run["run"] / store.GRAD_NORMS_FILE
    # A log longer than the checkpoint (labkit 0.2's lab 3 flushed a stopped epoch) is cut.
    want = sfo_of_sweep(copy, 1.6)
    store.append_grad_norms(log.parent, np.zeros(5))
    pd.testing.assert_frame_equal(sfo_of_sweep(copy, 1.6).drop(columns="folder"),
                                  want.drop(columns="folder"))
    # A run trained before every step was logged: T cannot be known.
    log.unlink()
    with pytest.raises(ValueError, match=r"these runs have none logged: .*"
                       + run["run"] + r".*trained before labkit logged every step.*Delete "
                       r"their folders and run the same sweep"):
        sfo_of_sweep(copy, 1.6)
    assert len(sfo_of_sweep(copy, 1.6, runs=[r for r in want["run"] if r != run["run"]])) == 3


def test_a_run_with_a_batch_size_schedule_is_refused(tmp_path):
    cfg = TrainConfig(profile="short", dataset="cifar100", batch_size=16, epochs=2,
                      batch_schedule={"kind": "step", "every": 1, "factor": 2})
    write_run(tmp_path, cfg, np.ones(8), steps_per_epoch=4)
    with pytest.raises(ValueError, match="changes its batch size .*needs a constant batch size"):
        sfo_of_sweep(tmp_path, 1.0, skip_epochs=0)


# --------------------------------------------------------------------------- SFO, b*, C^2


def rows(*items):
    """sfo_of_sweep-like rows from (optimizer, lr, beta, b, seed, steps, complete)."""
    out = []
    for opt, lr, beta, b, seed, steps, complete in items:
        out.append({"run": f"{opt}{b}{seed}{lr}", "optimizer": opt, "lr": lr, "beta": beta,
                    "batch_size": b, "seed": seed, "status": "finished" if complete
                    else "stopped", "epochs_completed": 3, "steps": steps,
                    "sfo": steps * b if steps is not None else math.inf,
                    "reached": steps is not None, "complete": complete, "first_step": 1,
                    "lowest_mean": 1.0, "final_mean": 1.0, "eps": 0.5, "skip_epochs": 0,
                    "folder": "x"})
    df = pd.DataFrame(out)
    df["steps"] = pd.array([r["steps"] for r in out], dtype="Int64")
    return df


def test_sfo_curves_average_seeds_keep_the_spread_and_group_by_lr_and_beta():
    df = rows(
        ("sgd", 0.1, None, 16, 0, 10, True), ("sgd", 0.1, None, 16, 1, 20, True),
        ("sgd", 0.1, None, 32, 0, 3, True), ("sgd", 0.1, None, 32, 1, None, True),
        ("sgd", 0.1, None, 64, 0, None, False),  # still training: not known yet, left out
        ("sgd", 0.1, None, 128, 0, 5, False),  # still training but already passed: kept
        ("shb", 0.1, 0.9, 16, 0, None, True),
        ("nshb", 0.1, 0.9, 8, 0, 10, True), ("nshb", 0.1, 0.9, 16, 0, 5, True),
        ("nshb", 0.05, 0.9, 8, 0, 30, True),
    )
    curves = sfo_curves(df)
    assert [(c.optimizer, c.lr, c.beta) for c in curves] == [
        ("sgd", 0.1, None), ("shb", 0.1, 0.9), ("nshb", 0.05, 0.9), ("nshb", 0.1, 0.9)]
    sgd, shb, nshb_05, nshb = curves
    assert sgd.sfo == {16: 240.0, 32: math.inf, 128: 640.0}  # (160 + 320) / 2
    assert sgd.spread == {16: (160.0, 320.0), 128: (640.0, 640.0)}
    assert sgd.runs == {16: 2, 32: 2, 128: 1}
    assert sgd.critical_batch_size == 16 and sgd.c2_upper_bound == pytest.approx(16 * 0.25 / 0.1)
    assert shb.critical_batch_size is None and shb.c2_upper_bound is None
    assert "no batch size reached eps = 0.5" in shb.note
    assert nshb.sfo == {8: 80.0, 16: 80.0} and nshb.critical_batch_size == 8  # a tie: smaller
    assert nshb.c2_upper_bound == pytest.approx(critical.c2_upper_bound(
        "nshb", critical_batch_size=8, lr=0.1, eps=0.5, beta=0.9))
    assert "at the edge" in nshb.note and "only batch size 8 reached" in nshb_05.note
    assert sgd.to_dict() == {"optimizer": "sgd", "lr": 0.1, "beta": None, "eps": 0.5,
                             "sfo": {"16": 240.0, "32": None, "128": 640.0},
                             "critical_batch_size": 16, "c2_upper_bound": 40.0,
                             "note": sgd.note}
    assert sfo_curves(df.iloc[:0]) == []
    with pytest.raises(ValueError, match="runs lacks the column"):
        sfo_curves(df.drop(columns="eps"))


def test_an_sfo_curve_outside_theorem_4_4_has_no_bound():
    curve = SFOCurve("adam", 1e-3, None, 0.5, {8: 10.0, 16: 5.0, 32: 9.0})
    assert curve.critical_batch_size == 16 and curve.c2_upper_bound is None
    assert curve.note == "Theorem 4.4 covers sgd, shb, nshb only: no C^2 bound for adam"


# --------------------------------------------------------------------------- measuring


class Spy(Callback):
    """Records the batch size of each run started and the step it resumed from."""

    def __init__(self):
        self.started: list[tuple[int, int]] = []

    def on_run_start(self, state):
        self.started.append((state.config.batch_size, state.step))


class Interrupt(Callback):
    step_interval = 1

    def __init__(self, batch_size, step):
        self.batch_size, self.step = batch_size, step

    def on_step(self, state):
        if state.config.batch_size == self.batch_size and state.step == self.step:
            raise KeyboardInterrupt


def test_measure_sfo_stops_each_run_once_T_is_known_and_resumes(smoke_root, data, sweep,
                                                               tmp_path):
    out = tmp_path / "m"
    kw = {"skip_epochs": 1, "max_epochs": 3, "data": data, "progress": False}
    cfg = shb(smoke_root)
    with pytest.raises(KeyboardInterrupt):  # b = 16 has 4 steps per epoch: stop in epoch 2
        measure_sfo(cfg, [32, 16], 1.6, out=out, callbacks=[Interrupt(16, 6)], **kw)
    spy = Spy()
    seen = []
    runs = measure_sfo(cfg, [32, 16], 1.6, out=out, callbacks=[spy],
                       on_run=lambda row, loaded: seen.append((row["batch_size"], loaded)), **kw)
    assert spy.started == [(16, 4)]  # b = 32 is done; b = 16 resumes after its first epoch
    assert seen == [(32, True), (16, False)]
    # The same T as the full 3-epoch runs of the same config in the sweep: one path.
    full = sfo_of_sweep(sweep, 1.6, skip_epochs=1).set_index(["optimizer", "batch_size"])
    assert list(runs["batch_size"]) == [16, 32]
    for r in runs.to_dict("records"):
        want = full.loc[("shb", r["batch_size"]), "steps"]
        assert (pd.isna(want) and pd.isna(r["steps"])) or r["steps"] == want
        if r["reached"]:  # the run ended at the end of the epoch in which it passed
            assert r["epochs_completed"] == math.ceil(r["steps"] / (N_TRAIN // r["batch_size"]))
    # Everything is on disk: nothing trains; a stricter eps trains only what it needs.
    spy = Spy()
    again = measure_sfo(cfg, [16, 32], 1.6, out=out, callbacks=[spy], **kw)
    assert spy.started == [] and again.equals(runs)
    stricter = measure_sfo(cfg, [16, 32], 0.5, out=out, callbacks=[spy], **kw)
    assert not stricter["reached"].any() and stricter["complete"].all()
    short = runs[runs["epochs_completed"] < 3]["batch_size"]
    assert {b for b, _ in spy.started} == set(short)
    # The folder reads as a sweep folder: labkit critical --results works on it.
    assert sfo_of_sweep(out, 0.5, skip_epochs=1)["run"].tolist() == ["b16", "b32"]


def test_measure_sfo_refuses_other_settings_and_old_folders_before_training(smoke_root, data,
                                                                           tmp_path):
    out = tmp_path / "m"
    kw = {"skip_epochs": 1, "max_epochs": 2, "data": data, "progress": False}
    measure_sfo(shb(smoke_root), [32], 2.0, out=out, **kw)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(differing: lr\)"):
        measure_sfo(shb(smoke_root, lr=0.1), [32], 2.0, out=out, **kw)
    with pytest.raises(ValueError, match=r"differing: epochs"):
        measure_sfo(shb(smoke_root), [32], 2.0, out=out, **{**kw, "max_epochs": 3})
    old = tmp_path / "old"
    old.mkdir()
    (old / "sfo-settings.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a measurement of labkit 0.2 .*Measure into "
                       "another folder"):
        measure_sfo(shb(smoke_root), [32], 2.0, out=old, **kw)


def test_diverged_runs_are_recorded_and_the_measurement_goes_on(smoke_root, data, tmp_path):
    cfg = shb(smoke_root, optimizer="sgd", hparams={}, lr=1e30)
    runs = measure_sfo(cfg, [16, 32], 0.5, out=tmp_path / "m", skip_epochs=0, max_epochs=2,
                       data=data, progress=False)
    assert list(runs["status"]) == ["diverged", "diverged"]
    assert not runs["reached"].any() and (runs["sfo"] == math.inf).all()
    (curve,) = sfo_curves(runs)
    assert curve.critical_batch_size is None


class Stopper(Callback):
    step_interval = 1

    def on_step(self, state):
        if state.config.batch_size == 16 and state.step == 2:
            state.stop = True


def test_a_run_stopped_by_another_callback_ends_the_measurement(smoke_root, data, tmp_path):
    runs = measure_sfo(shb(smoke_root), [32, 16, 8], 1e-6, out=tmp_path / "m", skip_epochs=0,
                       max_epochs=1, data=data, progress=False, callbacks=[Stopper()])
    assert list(runs["batch_size"]) == [32]


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("cfg", [8], 0.5), {"skip_epochs": 2}, ValueError,
     "skip_epochs=2 leaves no epoch to test in runs of 2 epochs"),
    (("cfg", [8], 0.0), {}, ValueError, "eps must be a positive finite number"),
    (("cfg", [8, 8], 0.5), {}, ValueError, "batch_sizes lists batch size 8 twice"),
    (("cfg", [], 0.5), {}, ValueError, "batch_sizes is empty"),
    (("cfg", "8", 0.5), {}, TypeError, "batch_sizes must be a sequence"),
    (("cfg", [0], 0.5), {}, ValueError, "must be an integer >= 1; got 0"),
    (("cfg", [128], 0.5), {}, ValueError, "batch size(s) 128 exceed the 64 training images"),
    (("nograd", [8], 0.5), {}, ValueError, "set track_grad_norm=True"),
    (("sched", [8], 0.5), {}, ValueError, "config.batch_schedule must be None"),
    (("out", [8], 0.5), {}, ValueError, "config.out must be None"),
    (({}, [8], 0.5), {}, TypeError, "config must be a labkit.train.TrainConfig"),
])
def test_measure_sfo_bad_inputs_fail_before_anything_runs(smoke_root, data, tmp_path, args,
                                                          kwargs, exc, match):
    configs = {"cfg": shb(smoke_root), "nograd": shb(smoke_root, track_grad_norm=False),
               "sched": shb(smoke_root, batch_schedule={"kind": "step", "every": 1,
                                                        "factor": 2}),
               "out": shb(smoke_root, out=str(tmp_path / "x"))}
    config = configs.get(args[0], args[0]) if isinstance(args[0], str) else args[0]
    out = tmp_path / "m"
    with pytest.raises(exc, match=re_escape(match)):
        measure_sfo(config, *args[1:], out=out, **{"skip_epochs": 1, "max_epochs": 2,
                                                   "data": data, "progress": False, **kwargs})
    assert not (out / "runs").exists()


def re_escape(text):
    import re

    return re.escape(text)


# --------------------------------------------------------------------------- command line


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def measure_argv(root, out, *extra):
    return ["critical", "measure", "--profile", "smoke", "--dataset", "cifar10",
            "--optimizer", "shb", "--lr", "0.05", "--set", "beta=0.9", "--batch-sizes", "8",
            "16", "32", "--max-epochs", "2", "--skip-epochs", "1", "--data-root", root,
            "--device", "cpu", "--out", out, *extra]


def test_cli_measure_prints_table_b_star_and_bound(smoke_root, tmp_path, capsys):
    out = tmp_path / "m"
    code, text, _ = run(capsys, *measure_argv(smoke_root, out, "--eps", "2.5"))
    assert code == 0
    res = json.loads(text.strip().splitlines()[-1])
    assert res["precision"] == "fp32" and res["skip_epochs"] == 1 and res["max_epochs"] == 2
    runs = sfo_of_sweep(out, 2.5, skip_epochs=1).set_index("batch_size")
    assert [r["batch_size"] for r in res["runs"]] == [8, 16, 32]
    for r in res["runs"]:
        b = r["batch_size"]
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  b = {b:>6}"))
        if r["reached"]:
            assert r["steps"] == runs.loc[b, "steps"]
            assert f"T = {r['steps']:>8}  SFO = {r['steps'] * b:<10.6g}" in line
        else:
            assert "SFO = inf" in line and res["sfo"][str(b)] is None
    (curve,) = sfo_curves(runs.reset_index())
    assert res["critical_batch_size"] == curve.critical_batch_size is not None
    b_star = curve.critical_batch_size
    assert f"critical batch size b* = {b_star} (2^{b_star.bit_length() - 1})" in text
    c2 = critical.c2_upper_bound("shb", critical_batch_size=b_star, lr=0.05, eps=2.5, beta=0.9)
    assert res["c2_upper_bound"] == pytest.approx(c2) and f"C^2 < {c2:.6g}  (Theorem 4.4)" in text
    # The runs are measurements: fp32.
    cfg = json.loads((out / "runs" / "b8" / "config.json").read_text())
    assert cfg["precision"] == "fp32"

    # The same command again loads every batch size and trains nothing.
    mtime = (out / "runs" / "b8" / "checkpoint.pt").stat().st_mtime_ns
    code, again, _ = run(capsys, *measure_argv(smoke_root, out, "--eps", "2.5"))
    assert code == 0 and again.count("(saved)") == 3
    assert json.loads(again.strip().splitlines()[-1]) == res
    assert (out / "runs" / "b8" / "checkpoint.pt").stat().st_mtime_ns == mtime
    # labkit critical --results reads the measurement folder the same way.
    code, text, _ = run(capsys, "critical", "--results", out, "--eps", "2.5", "--skip-epochs",
                        "1")
    (group,) = json.loads(text.strip().splitlines()[-1])["groups"]
    assert group["sfo"] == res["sfo"] and group["critical_batch_size"] == b_star


def test_cli_measure_nothing_reached_is_exit_1(smoke_root, tmp_path, capsys):
    code, text, err = run(capsys, *measure_argv(smoke_root, tmp_path / "m", "--eps", "1e-6",
                                               "--batch-sizes", "32"))
    assert code == 1 and "no batch size reached the threshold eps = 1e-06" in err
    res = json.loads(text.strip().splitlines()[-1])
    assert res["critical_batch_size"] is None and res["sfo"] == {"32": None}
    assert "did not reach eps within 2 epochs" in text


@pytest.mark.parametrize("extra,match", [
    (["--eps", "0"], "--eps must be a positive finite number; got 0.0"),
    (["--eps", "0.5", "--batch-sizes", "8", "128"],
     f"batch size(s) 128 exceed the {N_TRAIN} training images of cifar10"),
    (["--eps", "0.5", "--batch-sizes", "0"], "expected a positive integer, got '0'"),
    (["--eps", "0.5", "--set", "beta=0.8"], "--set beta given twice"),
    (["--eps", "0.5", "--skip-epochs", "2"], "skip_epochs=2 leaves no epoch to test in runs of "
     "2 epochs"),
    (["--eps", "0.5", "--skip-epochs", "-1"], "--skip-epochs must be >= 0; got -1"),
    (["--eps", "0.5", "--criterion", "full"], "unrecognized arguments: --criterion full"),
])
def test_cli_measure_bad_flags(smoke_root, tmp_path, capsys, extra, match):
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in measure_argv(smoke_root, out, *extra)])
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_cli_measure_default_is_the_authors_rule(smoke_root, tmp_path, capsys):
    argv = [a for a in measure_argv(smoke_root, tmp_path / "m", "--eps", "0.5")]
    i = argv.index("--skip-epochs")
    del argv[i:i + 2]
    with pytest.raises(SystemExit):
        main([str(a) for a in argv])
    assert "skip_epochs=11 leaves no epoch to test in runs of 2 epochs" in capsys.readouterr().err


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
