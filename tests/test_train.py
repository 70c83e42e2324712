"""The training loop: metrics, run folders, exact resume, divergence, errors, profiles."""

from __future__ import annotations

import datetime
import json
import math
import os

import pytest
import torch

from labkit.data import make_fake_cifar
from labkit.train import Callback, TrainConfig, config_hash, load_run, resolve_device, train

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fake_cifar(root, "cifar10", n_train=256, n_test=128, seed=0)
    return root


def cfg(data_root, **kw) -> TrainConfig:
    base = dict(dataset="cifar10", model="tiny", optimizer="shb", lr=0.05, hparams={"beta": 0.9},
                batch_size=48, epochs=3, data_root=str(data_root), device="cpu", profile="short")
    base.update(kw)
    return TrainConfig(**base)


METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "batch_size",
               "steps", "total_steps", "grad_norm", "time"}


def test_run_folder_and_metrics(data_root, tmp_path):
    out = tmp_path / "run"
    res = train(cfg(data_root, out=str(out)), progress=False)
    assert res.status == "finished" and not res.loaded
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt",
                                               "result.json"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) == METRIC_KEYS
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["steps"] == math.ceil(256 / 48)  # the last partial batch is used
        assert r["grad_norm"] > 0
    assert rows[-1]["total_steps"] == 3 * math.ceil(256 / 48)
    stored = json.loads((out / "result.json").read_text())
    assert stored["status"] == "finished" and stored["final"] == rows[-1]
    assert json.loads((out / "config.json").read_text())["optimizer"] == "shb"
    # No stray temporary files from the atomic writes.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_learns_generated_data(data_root):
    res = train(cfg(data_root, epochs=6, lr=0.05), progress=False)
    first, last = res.metrics[0], res.metrics[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_acc"] > 0.3  # 10 classes: chance is 0.1


def test_finished_folder_is_loaded_not_retrained(data_root, tmp_path):
    out = tmp_path / "run"
    first = train(cfg(data_root, out=str(out)), progress=False)
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    again = train(cfg(data_root, out=str(out)), progress=False)
    assert again.loaded and again.metrics == first.metrics
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert load_run(out).metrics == first.metrics


class StopAfter(Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] >= self.epochs:
            state.stop = True


class StopMidEpoch(Callback):
    step_interval = 1

    def __init__(self, step: int):
        self.at = step

    def on_step(self, state):
        if state.step == self.at:
            state.stop = True


@pytest.mark.parametrize("optimizer,hparams,lr", [
    ("shb", {"beta": 0.9}, 0.05),
    ("adam", {"eta": 3.0}, 1e-3),
])
def test_resume_is_exact(data_root, tmp_path, optimizer, hparams, lr):
    """An interrupted run resumed in its folder gives exactly the uninterrupted numbers."""
    kw = dict(optimizer=optimizer, hparams=hparams, lr=lr, epochs=4,
              lr_schedule={"kind": "step", "every": 2, "factor": 0.5},
              batch_schedule={"kind": "step", "every": 2, "factor": 2})
    full = train(cfg(data_root, **kw), progress=False)
    out = tmp_path / "run"
    part = train(cfg(data_root, out=str(out), **kw), callbacks=[StopAfter(2)], progress=False)
    assert part.status == "stopped" and len(part.metrics) == 2
    assert not (out / "result.json").exists()
    # Interrupt again in the middle of epoch 3: that epoch is recomputed from the checkpoint.
    part = train(cfg(data_root, out=str(out), **kw), callbacks=[StopMidEpoch(14)],
                 progress=False)
    assert part.status == "stopped" and len(part.metrics) == 2
    resumed = train(cfg(data_root, out=str(out), **kw), progress=False)
    assert resumed.status == "finished" and resumed.resumed_from == 2

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    assert strip(resumed.metrics) == strip(full.metrics)
    assert [r["batch_size"] for r in full.metrics] == [48, 48, 96, 96]
    assert [r["lr"] for r in full.metrics] == [lr, lr, lr / 2, lr / 2]


def test_divergence_is_recorded_not_raised(data_root, tmp_path):
    out = tmp_path / "div"
    res = train(cfg(data_root, optimizer="sgd", hparams={}, lr=1e20, out=str(out)),
                progress=False)
    assert res.status == "diverged" and res.diverged
    assert res.metrics[-1]["diverged"] is True
    assert res.metrics[-1]["train_loss"] is None
    assert json.loads((out / "result.json").read_text())["status"] == "diverged"
    # Everything written is valid JSON (no NaN literals).
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_callbacks_see_every_epoch_and_step(data_root):
    seen = {"epochs": [], "steps": 0}

    class Spy(Callback):
        step_interval = 2

        def on_step(self, state):
            seen["steps"] += 1
            assert torch.isfinite(state.loss)

        def on_epoch_end(self, state, metrics):
            seen["epochs"].append(metrics["epoch"])

    train(cfg(data_root, epochs=2), callbacks=[Spy()], progress=False)
    steps = 2 * math.ceil(256 / 48)
    assert seen["epochs"] == [1, 2] and seen["steps"] == steps // 2


def test_folder_of_another_run_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out), epochs=1), progress=False)
    with pytest.raises(ValueError, match="different run.*lr"):
        train(cfg(data_root, out=str(out), epochs=1, lr=0.01), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out)), callbacks=[StopAfter(1)], progress=False)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        train(cfg(data_root, out=str(out)), progress=False)


@pytest.mark.parametrize("kw,match", [
    ({"lr": -0.1}, "lr must be a positive"),
    ({"lr": float("nan")}, "lr must be a positive"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"optimizer": "adamw"}, "optimizer must be one of .*nshb"),
    ({"model": "vgg"}, "model must be one of .*resnet18"),
    ({"dataset": "mnist"}, "dataset must be one of cifar10, cifar100"),
    ({"profile": "huge"}, "profile must be one of smoke, cpu, short, paper"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"hparams": {"beta": 1.5}}, "beta"),
    ({"hparams": {"gamma": 1}}, "gamma"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"device": "tpu"}, "device"),
    ({"lr_schedule": {"kind": "zigzag"}}, "zigzag"),
])
def test_bad_config_is_a_clear_error(data_root, kw, match):
    with pytest.raises(ValueError, match=match):
        train(cfg(data_root, **kw), progress=False)


def test_batch_larger_than_dataset(data_root):
    with pytest.raises(ValueError, match="batch_size 512 .* exceeds the 256 training images"):
        train(cfg(data_root, batch_size=512), progress=False)
    with pytest.raises(ValueError, match="batch_size 384 .*schedule"):
        train(cfg(data_root, batch_size=96, epochs=3,
                  batch_schedule={"kind": "step", "every": 1, "factor": 2}), progress=False)


def test_missing_data_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        train(cfg(tmp_path, epochs=1), progress=False)


def test_smoke_profile_generates_data(tmp_path):
    res = train(TrainConfig(profile="smoke", data_root=str(tmp_path), device="cpu"),
                progress=False)
    assert res.status == "finished" and len(res.metrics) == 4
    assert res.config["model"] == "tiny"
    assert (tmp_path / "labkit-smoke" / "cifar-10-batches-py" / "data_batch_1").exists()


def test_profiles_and_identity():
    c = TrainConfig(dataset="cifar100", profile="paper").resolved()
    assert (c.model, c.epochs) == ("resnet18", 200)
    assert TrainConfig(dataset="cifar10", profile="short").resolved().model == "resnet44"
    a = TrainConfig(profile="smoke", out="x", data_root="/a")
    b = TrainConfig(profile="smoke", out="y", data_root="/b")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(TrainConfig(profile="smoke", seed=1))
    assert TrainConfig.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_rotation_default_follows_the_papers_recipe():
    def rotate(**kw):
        return TrainConfig(profile="smoke", **kw).resolved().rotate

    assert rotate(dataset="cifar100") == 15.0  # Sato & Iiduka's RandomRotation(15)
    assert rotate(dataset="cifar10") == 0.0
    assert rotate(dataset="cifar100", augment=False) == 0.0
    assert rotate(dataset="cifar100", rotate=0) == 0.0
    assert rotate(dataset="cifar10", rotate=10) == 10.0
    for bad in (-1, 181, math.inf, True, "15"):
        with pytest.raises(ValueError, match=r"rotate must be None or a number of degrees in "
                                             r"\[0, 180\]; got"):
            rotate(rotate=bad)


def test_hashes_of_configs_without_rotation_are_unchanged():
    # config_hash values computed before labkit had the rotate field (commit 3b4bad0): sweep
    # folders of runs that do not rotate keep their names, and their runs keep loading.
    assert config_hash(TrainConfig(profile="smoke")) == "81305a41e0e3"
    assert config_hash(TrainConfig(dataset="cifar100", augment=False, device="cpu")) == \
        "fa3a6117e611"
    assert config_hash(TrainConfig(dataset="cifar100", profile="smoke", rotate=0)) == \
        "07cce45850e7"
    # ... while a run that rotates is another experiment, with another hash.
    assert config_hash(TrainConfig(dataset="cifar100", profile="smoke")) != "07cce45850e7"
    # A config.json written before the field existed describes a run that did not rotate.
    stored = TrainConfig(dataset="cifar100", profile="smoke", rotate=0).resolved().to_dict()
    del stored["rotate"]
    legacy = TrainConfig.from_dict(stored)
    assert legacy.rotate == 0.0 and config_hash(legacy) == "07cce45850e7"
    assert "rotate" not in legacy.identity()
    assert TrainConfig(dataset="cifar100", profile="smoke").identity()["rotate"] == 15.0


def test_training_rotates_only_when_asked(data_root, monkeypatch):
    import labkit.data as lk_data

    calls = []
    original = lk_data.random_rotate

    def spy(x, generator, degrees=15.0):
        calls.append((x.shape[0], degrees))
        return original(x, generator, degrees)

    monkeypatch.setattr(lk_data, "random_rotate", spy)
    plain = train(cfg(data_root, epochs=2), progress=False)  # CIFAR-10: no rotation
    assert calls == [] and plain.config["rotate"] == 0.0
    turned = train(cfg(data_root, epochs=2, rotate=15), progress=False)
    assert calls == [(256, 15.0), (256, 15.0)]  # the whole training set, once per epoch
    assert turned.metrics[-1]["train_loss"] != plain.metrics[-1]["train_loss"]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- the gradient-norm log


class _Norms(Callback):
    step_interval = 1

    def __init__(self):
        self.values = []

    def on_step(self, state):
        self.values.append(float(state.grad_norm))


class _StopAfterEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == self.epoch:
            state.stop = True


def test_the_run_folder_logs_every_steps_gradient_norm(data_root, tmp_path):
    import numpy as np

    from labkit.store import read_grad_norms

    ref = _Norms()
    result = train(cfg(data_root, out=str(tmp_path / "run")), [ref], progress=False)
    norms = read_grad_norms(tmp_path / "run")
    assert norms.dtype == np.float32
    assert norms.tolist() == [float(np.float32(v)) for v in ref.values]
    spe = math.ceil(256 / 48)
    assert len(norms) == result.metrics[-1]["total_steps"] == 3 * spe
    for k, m in enumerate(result.metrics):  # the epoch means of the log are the run's metrics
        chunk = norms[spe * k: spe * (k + 1)].astype(np.float64)
        assert math.isclose(chunk.mean(), m["grad_norm"], rel_tol=1e-9)


def test_an_interrupted_log_equals_an_uninterrupted_one(data_root, tmp_path):
    import numpy as np

    from labkit.store import GRAD_NORMS_FILE

    spe = math.ceil(256 / 48)
    train(cfg(data_root, out=str(tmp_path / "a")), progress=False)
    stopped = train(cfg(data_root, out=str(tmp_path / "b")), [_StopAfterEpoch(1)],
                    progress=False)
    assert stopped.status == "stopped"
    log = tmp_path / "b" / GRAD_NORMS_FILE
    assert log.stat().st_size == 4 * spe
    with open(log, "ab") as f:  # steps written after the checkpoint, as a crash would leave
        f.write(np.ones(7, dtype="<f4").tobytes())
    resumed = train(cfg(data_root, out=str(tmp_path / "b")), progress=False)
    assert resumed.status == "finished" and resumed.resumed_from == 1
    assert log.read_bytes() == (tmp_path / "a" / GRAD_NORMS_FILE).read_bytes()


def test_no_log_where_it_would_be_incomplete_or_has_nowhere_to_go(data_root, tmp_path):
    from labkit.store import GRAD_NORMS_FILE, read_grad_norms

    # Resumed from a checkpoint the log does not cover (trained before labkit logged every
    # step): no log rather than a wrong one.
    train(cfg(data_root, out=str(tmp_path / "c")), [_StopAfterEpoch(1)], progress=False)
    (tmp_path / "c" / GRAD_NORMS_FILE).unlink()
    train(cfg(data_root, out=str(tmp_path / "c")), progress=False)
    assert read_grad_norms(tmp_path / "c") is None
    # No gradient norms: nothing is written and nothing fails.
    train(cfg(data_root, epochs=1, track_grad_norm=False, out=str(tmp_path / "d")),
          progress=False)
    assert read_grad_norms(tmp_path / "d") is None


# --------------------------------------------------------------------------- precision


class _Precision(Callback):
    """Records cuDNN's and CUDA matmul's fp32 settings while the run trains."""

    def on_epoch_end(self, state, metrics):
        self.seen = (torch.backends.cudnn.conv.fp32_precision,
                     torch.backends.cuda.matmul.fp32_precision)


@pytest.mark.parametrize("precision,inside", [
    ("fp32", ("ieee", "ieee")),  # a measurement run: TF32 off
    ("auto", ("ieee", "ieee")),  # auto on the CPU is fp32 too
    ("bf16", None),  # autocast: the settings are left alone
])
def test_fp32_runs_turn_tf32_off_and_restore_it(data_root, precision, inside):
    from labkit.precision import autocast_dtype

    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    spy = _Precision()
    train(cfg(data_root, epochs=1, precision=precision), [spy], progress=False)
    assert spy.seen == (inside or before)
    assert (torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == before
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(precision, cpu) == (torch.bfloat16 if precision == "bf16" else None)
    assert autocast_dtype(precision, cuda) == (None if precision == "fp32" else torch.bfloat16)



def test_a_resolved_config_is_checked_once_and_read_only(data_root, tmp_path):
    import dataclasses
    from unittest import mock

    from labkit.experiments import plan_sweep, run_sweep
    from labkit.train import ResolvedConfig

    c = cfg(data_root).resolved()
    assert isinstance(c, ResolvedConfig) and c.resolved() is c
    with pytest.raises(AttributeError, match="read-only .*'lr'.*dataclasses.replace"):
        c.lr = 1.0
    with pytest.raises(ValueError, match="lr must be a positive finite number; got -1"):
        dataclasses.replace(c, lr=-1)  # a replaced field is checked again
    moved = c.relocated(out=str(tmp_path / "x"))
    assert moved.out == str(tmp_path / "x") and c.out is None and config_hash(moved) == \
        config_hash(c)

    configs = [cfg(data_root, epochs=1, lr=lr, optimizer="sgd", hparams={}) for lr in (0.1, 0.05)]
    check = TrainConfig.resolved  # the one place where a config is checked
    with mock.patch.object(TrainConfig, "resolved", autospec=True,
                           side_effect=check) as checks:
        plan_sweep(configs, tmp_path / "s")
        assert checks.call_count == 2  # once per config
        result = run_sweep(configs, tmp_path / "s", progress=False)
        assert result.complete
        # run_sweep checks each config once; config_hash, the index and train do not check.
        assert checks.call_count == 4
        fresh = result.points[0].config.relocated(out=str(tmp_path / "fresh"))
        checks.reset_mock()
        train(fresh, progress=False)
        assert checks.call_count == 0
# --------------------------------------------------------------------------- hardening (issue 15)


class PoisonAfterStep(Callback):
    """Sets the first weight to NaN after optimizer step ``step``: the epoch's training loss
    (computed before) stays finite, its test loss does not."""

    step_interval = 1

    def __init__(self, step: int):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            with torch.no_grad():
                next(state.model.parameters()).view(-1)[0] = float("nan")


def test_a_nan_test_loss_with_a_finite_training_loss_is_a_divergence(data_root, tmp_path):
    out = tmp_path / "run"
    res = train(cfg(data_root, out=str(out), epochs=2),
                callbacks=[PoisonAfterStep(math.ceil(256 / 48))], progress=False)
    assert res.status == "diverged" and len(res.metrics) == 1
    (row,) = res.metrics
    assert math.isfinite(row["train_loss"]) and row["test_loss"] is None and row["diverged"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    stored = json.loads((out / "result.json").read_text())
    assert stored["status"] == "diverged" and stored["metrics"] == res.metrics


def test_a_killed_runs_temporary_files_are_cleaned_at_its_next_start(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out), epochs=2), callbacks=[StopAfter(1)], progress=False)
    for name in (".checkpoint.pt.k1ll3d.tmp", ".metrics.jsonl.x.tmp"):
        (out / name).write_bytes(b"half a file")
    res = train(cfg(data_root, out=str(out), epochs=2), progress=False)
    assert res.status == "finished" and res.resumed_from == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_run_files_follow_the_umask(data_root, tmp_path):
    old = os.umask(0o002)  # a folder shared with a group
    try:
        train(cfg(data_root, out=str(tmp_path / "run"), epochs=1), progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {0o664}, modes


def test_a_damaged_metrics_log_does_not_shorten_a_finished_run(data_root, tmp_path):
    out = tmp_path / "run"
    full = train(cfg(data_root, out=str(out), epochs=2), progress=False).metrics
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    with pytest.warns(UserWarning, match="metrics.jsonl .*disagrees with .*result.json"):
        res = train(cfg(data_root, out=str(out), epochs=2), progress=False)
    assert res.loaded and res.metrics == full


def test_a_damaged_result_names_the_file_and_what_to_do(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out), epochs=1), progress=False)
    (out / "result.json").write_text("")
    with pytest.raises(ValueError, match=r"result\.json is damaged \(not JSON.*delete it and "
                       "run again: the run resumes from its checkpoint"):
        train(cfg(data_root, out=str(out), epochs=1), progress=False)
    (out / "result.json").unlink()
    res = train(cfg(data_root, out=str(out), epochs=1), progress=False)
    assert res.status == "finished" and res.resumed_from == 1


def test_resuming_with_another_rotation_or_precision_says_so(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out), precision="fp32", epochs=2), callbacks=[StopAfter(1)],
          progress=False)
    with pytest.raises(ValueError, match=r"holds a different run \(rotate 0\.0 there, 5\.0 here\)"
                       "; to resume it give the values it was started with"):
        train(cfg(data_root, out=str(out), precision="fp32", epochs=2, rotate=5), progress=False)
    with pytest.raises(ValueError, match="precision 'fp32' there, 'bf16' here"):
        train(cfg(data_root, out=str(out), precision="bf16", epochs=2), progress=False)
    # precision "auto" is bf16 on CUDA and fp32 on the CPU: a run moved between them is told.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["autocast"] == "fp32"
    ckpt["autocast"] = "bfloat16"
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.warns(UserWarning, match="was trained in bfloat16 for 1 epoch.* resumes in fp32"):
        train(cfg(data_root, out=str(out), precision="fp32", epochs=2), progress=False)


def test_a_foreign_checkpoint_gets_no_unsafe_advice(data_root, tmp_path):
    out = tmp_path / "run"
    train(cfg(data_root, out=str(out), epochs=2), callbacks=[StopAfter(1)], progress=False)
    torch.save({"model": datetime.date(2024, 1, 1)}, out / "checkpoint.pt")
    with pytest.raises(ValueError) as e:
        train(cfg(data_root, out=str(out), epochs=2), progress=False)
    msg = str(e.value)
    assert "cannot read the checkpoint" in msg and "delete it to restart" in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_a_second_writer_into_a_run_folder_is_refused(data_root, tmp_path):
    from labkit import store

    out = tmp_path / "run"
    with store.writing(out), pytest.raises(store.FolderBusyError, match="is in use"):
        train(cfg(data_root, out=str(out), epochs=1), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(cfg(data_root, out=str(tmp_path / "file"), epochs=1), progress=False)
