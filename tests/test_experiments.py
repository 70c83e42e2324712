"""Sweeps, their results tables and the figure helpers (labkit.experiments)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from labkit import critical, noise
from labkit.data import make_fake_cifar
from labkit.experiments import (
    Grid,
    GridError,
    add_delta,
    expand_grid,
    load_history,
    load_results,
    load_spec,
    measure_sharpness,
    plan_sweep,
    plot_accuracy_curves,
    plot_accuracy_vs_batch_size,
    plot_accuracy_vs_delta,
    plot_delta_vs_batch_size,
    plot_sfo_vs_batch_size,
    plot_sharpness_vs_delta,
    run_sweep,
    sfo_curves,
    train_set_size,
)
from labkit.store import summarize_metrics
from labkit.train import SMOKE_SIZES, Callback, TrainConfig, config_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")

matplotlib.use("Agg")

N_TRAIN, N_TEST = 64, 32


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fake_cifar(root, "cifar10", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return str(root)


def base(data_root, **kw):
    d = {"profile": "short", "model": "tiny", "epochs": 1, "batch_size": 32, "device": "cpu",
         "data_root": data_root}
    d.update(kw)
    return d


# --------------------------------------------------------------------------- grid expansion


def test_cartesian_product_count_and_order():
    spec = {"base": {"profile": "smoke"},
            "grid": {"optimizer": ["shb", "nshb"], "lr": [0.1, 0.2, 0.3], "seed": [0, 1]}}
    grid = Grid.from_spec(spec)
    assert len(grid) == 12
    configs = expand_grid(spec)
    assert len(configs) == 12
    # The first axis varies slowest, the last fastest.
    assert [(c.optimizer, c.lr, c.seed) for c in configs[:3]] == [
        ("shb", 0.1, 0), ("shb", 0.1, 1), ("shb", 0.2, 0)]
    assert configs[-1].optimizer == "nshb" and configs[-1].lr == 0.3 and configs[-1].seed == 1
    # Resolved: the profile filled the model and epochs.
    assert all(c.model == "tiny" and c.epochs == 4 for c in configs)
    assert len({config_hash(c) for c in configs}) == 12


def test_zip_axes_vary_together():
    spec = {"base": {"profile": "smoke"}, "grid": {"seed": [0, 1]},
            "zip": {"lr": [0.1, 0.2, 0.4], "batch_size": [32, 64, 128]}}
    configs = expand_grid(spec)
    assert len(configs) == 6
    assert {(c.lr, c.batch_size) for c in configs} == {(0.1, 32), (0.2, 64), (0.4, 128)}
    # Two zip groups are two axes of the product.
    spec["zip"] = [{"lr": [0.1, 0.2], "batch_size": [32, 64]},
                   {"epochs": [1, 2], "weight_decay": [0.0, 5e-4]}]
    configs = expand_grid(spec)
    assert len(configs) == 2 * 2 * 2
    assert {(c.epochs, c.weight_decay) for c in configs} == {(1, 0.0), (2, 5e-4)}


def test_hyperparameter_axes():
    # A plain name applies to the optimizers that have it; the SGD points collapse into one.
    configs = expand_grid({"base": {"profile": "smoke"},
                           "grid": {"optimizer": ["sgd", "shb"], "beta": [0.9, 0.5]}})
    assert [(c.optimizer, c.hparams) for c in configs] == [
        ("sgd", {}), ("shb", {"beta": 0.9}), ("shb", {"beta": 0.5})]
    # hparams.NAME applies to every point.
    configs = expand_grid({"base": {"profile": "smoke"},
                           "grid": {"optimizer": ["shb", "nshb"], "hparams.beta": [0.99]}})
    assert all(c.hparams == {"beta": 0.99} for c in configs)
    with pytest.raises(GridError, match="unknown hyperparameter 'beta' for optimizer 'sgd'"):
        expand_grid({"base": {"profile": "smoke"},
                     "grid": {"optimizer": ["sgd", "shb"], "hparams.beta": [0.9]}})
    # eta of the power-eta Adam (the power-eta thesis), merged with base.hparams.
    configs = expand_grid({"base": {"profile": "smoke", "optimizer": "adam", "lr": 1e-3,
                                    "hparams": {"beta2": 0.99}},
                           "grid": {"eta": [1 / 3, 2, 4]}})
    assert [c.hparams for c in configs] == [{"beta2": 0.99, "eta": 1 / 3},
                                            {"beta2": 0.99, "eta": 2}, {"beta2": 0.99, "eta": 4}]
    # An hparams axis of dicts is merged too.
    configs = expand_grid({"base": {"profile": "smoke", "optimizer": "adam",
                                    "hparams": {"eta": 3}},
                           "grid": {"hparams": [{"beta1": 0.5}, {"eta": 1}]}})
    assert [c.hparams for c in configs] == [{"eta": 3, "beta1": 0.5}, {"eta": 1}]


@pytest.mark.parametrize("spec,match", [
    ({"base": {}, "grid": {"learning_rate": [0.1]}}, "unknown grid key 'learning_rate'"),
    ({"base": {}, "grid": {"eta": [2]}}, "unknown grid key 'eta'.*sgd"),
    ({"base": {}, "grid": {}}, "the grid is empty"),
    ({"base": {}}, "the grid is empty"),
    ({"base": {}, "grid": {"lr": []}}, r"grid.lr is an empty list"),
    ({"base": {}, "grid": {"lr": 0.1}}, r"grid.lr must be a list of values; got 0.1"),
    ({"base": {}, "grid": {"lr": [0.1]}, "extra": 1}, "unknown top-level key 'extra'"),
    ({"base": {"optimiser": "sgd"}, "grid": {"lr": [0.1]}}, "unknown key 'optimiser' in base"),
    ({"base": {"out": "x"}, "grid": {"lr": [0.1]}}, "base.out cannot be set"),
    ({"base": {}, "grid": {"out": ["a"]}}, "out cannot be an axis"),
    ({"base": {}, "grid": {"lr": [0.1]}, "zip": {"lr": [0.2]}}, "appears in both grid and zip"),
    ({"base": {}, "zip": {"lr": [0.1, 0.2], "seed": [0]}}, "equal lengths.*lr: 2, seed: 1"),
    ({"base": {"profile": "smoke"}, "grid": {"lr": [0.1, -1]}},
     r"grid point 2 of 2 \(lr=-1\): lr must be a positive finite number"),
    ({"base": {"profile": "smoke"}, "grid": {"optimizer": ["sgd", "adamw"]}},
     r"grid point 2 of 2 \(optimizer='adamw'\): optimizer must be one of"),
    ({"base": {"profile": "smoke", "optimizer": "shb"}, "grid": {"beta": [0.9, 1.5]}},
     r"grid point 2 of 2 \(beta=1.5\).*beta"),
    ({"base": {"profile": "fast"}, "grid": {"lr": [0.1]}}, "profile must be one of"),
    ({"grid": {"hparams": [1]}}, "grid.hparams values must be mappings"),
    ([1, 2], "a grid spec must be a mapping"),
])
def test_bad_specs_are_clear_errors(spec, match):
    with pytest.raises(GridError, match=match):
        expand_grid(spec)


def test_bad_input_fails_before_anything_runs(tmp_path, data_root):
    out = tmp_path / "sweep"
    with pytest.raises(GridError, match="grid point 2 of 2"):
        run_sweep({"base": base(data_root), "grid": {"lr": [0.1, float("nan")]}}, out,
                  progress=False)
    assert not out.exists()
    # A batch size larger than the (generated) training set: checked against the data.
    with pytest.raises(GridError, match=f"batch size 128 exceeds the {N_TRAIN} training images"):
        run_sweep({"base": base(data_root), "grid": {"batch_size": [32, 128]}}, out,
                  progress=False)
    assert not out.exists()
    # The smoke profile's generated set has SMOKE_SIZES["n_train"] images.
    n = SMOKE_SIZES["n_train"]
    spec = {"base": {"profile": "smoke", "data_root": str(tmp_path / "d")},
            "grid": {"batch_size": [64, n + 1]}}
    with pytest.raises(GridError, match=f"batch size {n + 1} exceeds the {n} training images"):
        plan_sweep(spec, out, check_data=True)
    # A batch schedule's largest batch counts.
    spec = {"base": {"profile": "smoke", "data_root": str(tmp_path / "d"), "epochs": 4,
                     "batch_schedule": {"kind": "step", "every": 1, "factor": 4}},
            "grid": {"batch_size": [16]}}
    with pytest.raises(GridError, match="schedule grows b from 16 to 1024, which exceeds"):
        plan_sweep(spec, out, check_data=True)
    assert not out.exists()
    assert train_set_size(TrainConfig(profile="smoke", data_root=str(tmp_path / "d"))) == n
    assert train_set_size(TrainConfig(**base(data_root))) == N_TRAIN


def test_configs_list_input_dedupes_and_validates(tmp_path, data_root):
    a = TrainConfig(**base(data_root, lr=0.1))
    points = plan_sweep([a, TrainConfig(**base(data_root, lr=0.1)), TrainConfig(**base(
        data_root, lr=0.2))], tmp_path / "s")
    assert [p.status for p in points] == ["pending", "pending"]
    assert points[0].folder.endswith(config_hash(a))
    with pytest.raises(GridError, match=r"configs\[1\].*lr must be"):
        plan_sweep([a, TrainConfig(**base(data_root, lr=-1.0))], tmp_path / "s")
    with pytest.raises(TypeError, match="spec_or_configs must be"):
        plan_sweep("grid.yaml", tmp_path / "s")
    with pytest.raises(TypeError, match="stop_event must be"):
        run_sweep([a], tmp_path / "s", stop_event=3, progress=False)


# --------------------------------------------------------------------------- YAML


def test_load_spec_reads_numbers_and_locates_errors(tmp_path):
    p = tmp_path / "grid.yaml"
    p.write_text("base:\n  profile: smoke\n  weight_decay: 5e-4\ngrid:\n  lr: [1e-3, 0.1]\n")
    spec = load_spec(p)
    assert spec["base"]["weight_decay"] == 5e-4
    assert [c.lr for c in expand_grid(spec)] == [1e-3, 0.1]

    p.write_text("base:\n  profile: smoke\ngrid:\n  lr: [0.1, 0.2\n  seed: [0]\n")
    with pytest.raises(ValueError, match=r"grid.yaml:\d+:\d+: YAML syntax error"):
        load_spec(p)
    p.write_text("base:\n  profile: smoke\ngrid:\n  lr: [0.1]\n  lr: [0.2]\n")
    with pytest.raises(ValueError, match=r"grid.yaml:5: duplicate key 'lr' in grid"):
        load_spec(p)
    p.write_text("base:\n  profile: smoke\ngrid:\n  seed: [0]\n  momentum: [0.9]\n")
    with pytest.raises(GridError, match=r"grid.yaml:5: unknown grid key 'momentum'"):
        expand_grid(load_spec(p))
    p.write_text("base:\n  profile: smoke\ngrid:\n  seed: [0]\n  lr: [0.1, -2]\n")
    with pytest.raises(GridError, match=r"grid.yaml:5: grid point 2 of 2 \(seed=0, lr=-2\)"):
        expand_grid(load_spec(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="grid.yaml:1: a grid spec must be a mapping"):
        load_spec(p)
    p.write_text("")
    with pytest.raises(ValueError, match="grid.yaml: the file is empty"):
        load_spec(p)
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        load_spec(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- a sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    """Three points: SGD, SHB, and SGD with a huge learning rate that diverges."""
    out = tmp_path_factory.mktemp("sweep")
    spec = {"base": base(data_root, batch_size=16),
            "zip": {"optimizer": ["sgd", "shb", "sgd"], "lr": [0.05, 0.05, 1e30]},
            "grid": {"beta": [0.9]}}
    seen = []
    result = run_sweep(spec, out, progress=False, on_run_end=seen.append)
    return spec, out, result, seen


def test_sweep_writes_index_and_run_folders(sweep):
    spec, out, result, seen = sweep
    assert [p.status for p in result.points] == ["finished", "finished", "diverged"]
    assert result.complete and not result.stopped
    assert result.counts() == {"finished": 2, "diverged": 1}
    assert [p.index for p in seen] == [0, 1, 2]  # on_run_end saw every point
    def no_nan(token):
        raise AssertionError(f"index.json holds {token}, which strict JSON forbids")

    index = json.loads((out / "index.json").read_text(), parse_constant=no_nan)
    assert set(index["points"]) == {p.hash for p in result.points}
    for p in result.points:
        entry = index["points"][p.hash]
        assert entry["status"] == p.status and entry["folder"] == f"runs/{p.hash}"
        assert entry["config"]["optimizer"] == p.config.optimizer
        assert entry["epochs_completed"] == 1
        folder = out / "runs" / p.hash
        assert (folder / "result.json").exists() and (folder / "checkpoint.pt").exists()
        assert p.hash == config_hash(p.config)
    assert index["points"][result.points[1].hash]["config"]["hparams"] == {"beta": 0.9}
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary files


def test_rerun_trains_nothing(sweep):
    spec, out, _, _ = sweep
    ckpts = sorted((out / "runs").glob("*/checkpoint.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    metrics = {p: (p.parent / "metrics.jsonl").read_text() for p in ckpts}
    again = run_sweep(spec, out, progress=False)
    assert all(p.loaded for p in again.points)
    assert [p.status for p in again.points] == ["finished", "finished", "diverged"]
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert {p: (p.parent / "metrics.jsonl").read_text() for p in ckpts} == metrics
    assert [p.status for p in plan_sweep(spec, out)] == ["finished", "finished", "diverged"]


def test_load_results_columns_and_values(sweep):
    _, out, result, _ = sweep
    df = load_results(out)
    assert len(df) == 3
    for col in ("run", "status", "optimizer", "lr", "batch_size", "seed", "beta", "epochs",
                "epochs_completed", "test_acc", "test_loss", "train_loss", "best_test_acc",
                "wall_time", "folder"):
        assert col in df.columns
    assert list(df["run"]) == [p.hash for p in result.points]
    assert list(df["status"]) == ["finished", "finished", "diverged"]
    assert list(df["optimizer"]) == ["sgd", "shb", "sgd"]
    assert list(df["lr"]) == [0.05, 0.05, 1e30]
    assert math.isnan(df["beta"][0]) and df["beta"][1] == 0.9  # SGD has no beta
    for i, p in enumerate(result.points):
        final = p.result.final
        assert df["epochs_completed"][i] == 1
        if p.status == "finished":
            assert df["test_acc"][i] == pytest.approx(final["test_acc"])
            assert df["train_loss"][i] == pytest.approx(final["train_loss"])
            assert df["best_test_acc"][i] == pytest.approx(final["test_acc"])
            assert 0 <= df["test_acc"][i] <= 1
        assert df["wall_time"][i] == pytest.approx(final["time"])
    assert math.isnan(df["train_loss"][2])  # the diverged run recorded no finite loss

    hist = load_history(out)
    assert len(hist) == 3 and list(hist["epoch"]) == [1, 1, 1]
    assert {"epoch_lr", "epoch_batch_size", "grad_norm", "diverged"} <= set(hist.columns)
    assert list(hist["diverged"]) == [False, False, True]
    # Without index.json the run folders are scanned.
    (out / "index.json").rename(out / "index.bak")
    try:
        scanned = load_results(out)
    finally:
        (out / "index.bak").rename(out / "index.json")
    assert sorted(scanned["run"]) == sorted(df["run"])
    assert sorted(scanned["status"]) == sorted(df["status"])
    # A single run folder (labkit train --out) reads as a sweep of one.
    one = load_results(out / "runs" / result.points[1].hash)
    assert list(one["run"]) == [result.points[1].hash] and list(one["optimizer"]) == ["shb"]
    assert len(load_history(out / "runs" / result.points[1].hash)) == 1
    pd.testing.assert_frame_equal(result.results(), df)


def test_summarize_metrics_keeps_json_strict():
    rows = [{"epoch": 1, "test_acc": 0.3, "test_loss": 2.0, "time": 1.5},
            {"epoch": 2, "test_acc": 0.5, "test_loss": float("nan"), "time": 2.0},
            {"epoch": 3, "test_acc": 0.4, "test_loss": float("inf"), "time": 1.0}]
    s = summarize_metrics(rows)
    assert s["final"] == {"epoch": 3, "test_acc": 0.4, "test_loss": None, "time": 1.0}
    assert (s["best_test_acc"], s["best_epoch"], s["epochs_completed"]) == (0.5, 2, 3)
    assert s["wall_time"] == pytest.approx(4.5)
    json.dumps(s, allow_nan=False)
    assert summarize_metrics([])["final"] == {} and summarize_metrics([])["best_epoch"] is None


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        load_results(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a labkit sweep index"):
        load_results(tmp_path)


class _SetOnEpoch(Callback):
    def __init__(self, event):
        self.event = event

    def on_epoch_end(self, state, metrics):
        self.event.set()


def test_stop_inside_a_run_and_between_runs_then_resume(tmp_path, data_root):
    # One run at a time (pack=False): "between runs" has a meaning.
    spec = {"base": base(data_root, epochs=2), "grid": {"lr": [0.05, 0.1]}}
    out = tmp_path / "sweep"
    # 1. The stop request arrives during the first run's first epoch.
    event = threading.Event()
    first = run_sweep(spec, out, progress=False, stop_event=event,
                      callbacks=[_SetOnEpoch(event)], pack=False)
    assert first.stopped and not first.complete
    assert [p.status for p in first.points] == ["stopped", "pending"]
    assert first.points[0].result.status == "stopped"
    df = load_results(out)
    assert list(df["status"]) == ["stopped", "pending"]
    assert list(df["epochs_completed"]) == [1, 0]
    # 2. A callable stop request, set when the first point ends: the sweep stops between runs.
    done = []
    second = run_sweep(spec, out, progress=False, stop_event=lambda: bool(done),
                       on_run_end=done.append, pack=False)
    assert second.stopped
    assert [p.status for p in second.points] == ["finished", "pending"]
    assert second.points[0].result.resumed_from == 1  # the first epoch was not redone
    assert len(done) == 1
    # 3. No stop request: the sweep completes, and the finished point is only loaded.
    third = run_sweep(spec, out, progress=False, pack=False)
    assert third.complete and not third.stopped
    assert [p.loaded for p in third.points] == [True, False]
    assert list(load_results(out)["epochs_completed"]) == [2, 2]


class _StopAtStep(Callback):
    step_interval = 1

    def __init__(self, event, step):
        self.event, self.step = event, step

    def on_step(self, state):
        if state.step == self.step:
            self.event.set()


def test_a_packed_sweep_equals_one_run_at_a_time_and_resumes(tmp_path, data_root):
    spec = {"base": base(data_root, epochs=2, batch_size=16, precision="fp64"),
            "zip": {"optimizer": ["sgd", "shb", "nshb", "adam"],
                    "lr": [0.05, 0.05, 0.2, 0.001], "seed": [0, 1, 2, 3]}}
    alone = run_sweep(spec, tmp_path / "alone", progress=False, pack=False)
    # The SGD/SHB/NSHB points train as one pack (adam alone); a stop request in the pack's
    # second epoch stops its three runs with their first epoch on disk.
    event = threading.Event()
    seen = []
    first = run_sweep(spec, tmp_path / "packed", progress=False, stop_event=event,
                      callbacks=[_StopAtStep(event, 6)], on_run_end=seen.append)
    assert first.stopped
    assert [p.status for p in first.points] == ["stopped"] * 3 + ["pending"]
    assert [p.index for p in seen] == [0, 1, 2]
    assert list(load_results(tmp_path / "packed")["epochs_completed"]) == [1, 1, 1, 0]
    packed = run_sweep(spec, tmp_path / "packed", progress=False)
    assert packed.complete
    assert [p.result.resumed_from for p in packed.points] == [1, 1, 1, 0]
    for p, a in zip(packed.points, alone.points, strict=True):
        assert p.hash == a.hash
        for row_p, row_a in zip(p.result.metrics, a.result.metrics, strict=True):
            for key in ("train_loss", "test_loss", "train_acc", "test_acc", "grad_norm"):
                assert row_p[key] == pytest.approx(row_a[key], rel=1e-10, abs=1e-12)
    got = load_results(tmp_path / "packed").drop(columns=["time", "wall_time"], errors="ignore")
    want = load_results(tmp_path / "alone").drop(columns=["time", "wall_time"], errors="ignore")
    assert list(got.columns) == list(want.columns)
    assert list(got["status"]) == list(want["status"]) == ["finished"] * 4


class _Interrupt(Callback):
    def on_epoch_end(self, state, metrics):
        raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_a_resumable_index(tmp_path, data_root):
    out = tmp_path / "sweep"
    spec = {"base": base(data_root, epochs=2), "grid": {"seed": [0]}}
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, progress=False, callbacks=[_Interrupt()])
    df = load_results(out)
    assert list(df["status"]) == ["stopped"] and list(df["epochs_completed"]) == [1]
    assert [p.status for p in plan_sweep(spec, out)] == ["stopped"]


class _FailFor(Callback):
    def __init__(self, lr):
        self.lr = lr

    def on_run_start(self, state):
        if state.config.lr == self.lr:
            raise RuntimeError("simulated CUDA out of memory")


def test_failed_point_is_recorded_and_retried(tmp_path, data_root):
    out = tmp_path / "sweep"
    spec = {"base": base(data_root), "grid": {"lr": [0.05, 0.1]}}
    nested = []

    def try_nested(point):
        try:
            run_sweep(spec, out, progress=False)
        except RuntimeError as e:
            nested.append(str(e))

    result = run_sweep(spec, out, progress=False, callbacks=[_FailFor(0.05)],
                       on_run_end=try_nested)
    assert [p.status for p in result.points] == ["failed", "finished"]
    assert "simulated CUDA out of memory" in result.points[0].error
    assert nested and all("is in use: process" in m for m in nested)
    df = load_results(out)
    assert list(df["status"]) == ["failed", "finished"]
    assert "RuntimeError: simulated CUDA out of memory" in df["error"][0]
    assert plan_sweep(spec, out)[0].status == "failed"
    retry = run_sweep(spec, out, progress=False)
    assert [p.status for p in retry.points] == ["finished", "finished"]
    assert retry.points[1].loaded and not retry.points[0].loaded
    assert load_results(out)["error"].isna().all()


def test_grid_can_grow(tmp_path, data_root):
    out = tmp_path / "sweep"
    run_sweep({"base": base(data_root), "grid": {"lr": [0.05]}}, out, progress=False)
    grown = run_sweep({"base": base(data_root), "grid": {"lr": [0.05, 0.1]}}, out,
                      progress=False)
    assert [p.loaded for p in grown.points] == [True, False]
    # A smaller grid leaves the earlier points in the index.
    run_sweep({"base": base(data_root), "grid": {"lr": [0.1]}}, out, progress=False)
    assert sorted(load_results(out)["lr"]) == [0.05, 0.1]


# --------------------------------------------------------------------------- SFO, delta


def test_add_delta_matches_the_formulas():
    df = pd.DataFrame({"optimizer": ["sgd", "shb", "nshb", "nshb", "adam"],
                       "lr": [0.1, 0.1, 0.1, 0.05, 1e-3], "batch_size": [64, 64, 64, 128, 64],
                       "beta": [None, 0.9, 0.9, None, None]})
    c2 = critical.PAPER_VALUES["c2_upper_bound"]
    out = add_delta(df, c2, k2={"shb": 1.77**2})
    assert out["delta"][0] == pytest.approx(0.1 * math.sqrt(1280 / 64))
    a = 0.9 * (0.81 - 0.9 + 1) / 0.01
    assert out["delta"][1] == pytest.approx(0.1 * math.sqrt((1 + a) * 25.318 / 64 + a * 1.77**2))
    assert out["delta"][2] == pytest.approx(noise.delta_nshb(0.1, 64, 0.9, 128.0))
    # The paper's C^2 make delta_SGD and delta_NSHB coincide (Sato & Iiduka (2024) §5.1).
    assert out["delta"][2] == pytest.approx(out["delta"][0])
    # A missing beta is the optimizer's default (0.9 for NSHB); other optimizers get NaN.
    assert out["delta"][3] == pytest.approx(noise.delta_nshb(0.05, 128, 0.9, 128.0))
    assert math.isnan(out["delta"][4])
    assert "delta" not in df.columns  # a copy
    with pytest.raises(ValueError, match="k2 .* is required for SHB"):
        add_delta(df, c2)
    with pytest.raises(ValueError, match="no delta formula for optimizer 'adam'"):
        add_delta(df, {"adam": 1.0})


# --------------------------------------------------------------------------- sharpness


def test_measure_sharpness_of_a_finished_run(sweep):
    _, out, result, _ = sweep
    run = out / "runs" / result.points[0].hash
    kw = {"n_batches": 2, "batch_size": 8, "n_iters": 3, "device": "cpu"}
    value = measure_sharpness(run, **kw)
    assert value >= 0 and math.isfinite(value)
    store = json.loads((run / "sharpness.json").read_text())
    assert store["records"][0]["sharpness"] == value
    assert store["records"][0]["settings"]["rho"] == 0.0002
    # Cached: same settings give the stored number; a larger radius is measured anew.
    mtime = (run / "sharpness.json").stat().st_mtime_ns
    assert measure_sharpness(run, **kw) == value
    assert (run / "sharpness.json").stat().st_mtime_ns == mtime
    bigger = measure_sharpness(run, rho=0.05, **kw)
    assert bigger >= value
    assert len(json.loads((run / "sharpness.json").read_text())["records"]) == 2
    with pytest.raises(ValueError, match="diverged"):
        measure_sharpness(out / "runs" / result.points[2].hash, **kw)
    with pytest.raises(ValueError, match="split must be one of train, test"):
        measure_sharpness(run, split="val")
    with pytest.raises(ValueError, match=r"exceeds the 32 images of the test split"):
        measure_sharpness(run, split="test", n_batches=5, batch_size=8, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        measure_sharpness(out)


def test_measure_sharpness_takes_the_authors_images(tmp_path, monkeypatch):
    """By default: the first 1024 training images in file order, in 8 batches of 128,
    normalized as in training and not augmented; rho 0.0002, l_inf, adaptive, 20 iterations
    (naoki-sato3/new-sigma-nice sharpness/main.py)."""
    import torch

    import labkit.sharpness as lk_sharpness
    from labkit.data import load_cifar, normalize
    from labkit.train import train

    root = tmp_path / "data"
    make_fake_cifar(root, "cifar10", n_train=1100, n_test=32, seed=1)
    run = tmp_path / "run"
    train(TrainConfig(dataset="cifar10", model="tiny", lr=0.05, batch_size=256, epochs=1,
                      data_root=str(root), device="cpu", out=str(run)), progress=False)
    calls = []

    def spy(model, loss_fn, batches, rho, **kw):
        calls.append({"batches": [(x.clone(), y.clone()) for x, y in batches], "rho": rho, **kw})
        return 0.125

    monkeypatch.setattr(lk_sharpness, "adaptive_sharpness", spy)
    assert measure_sharpness(run, device="cpu") == 0.125
    (call,) = calls
    assert (call["rho"], call["norm"], call["adaptive"], call["n_iters"]) == \
        (0.0002, "linf", True, 20)
    data = load_cifar("cifar10", root=root)
    assert len(call["batches"]) == 8
    for i, (x, y) in enumerate(call["batches"]):
        assert torch.equal(x, normalize(data.train_x[128 * i:128 * (i + 1)], data.mean,
                                        data.std))
        assert torch.equal(y, data.train_y[128 * i:128 * (i + 1)])
    settings = json.loads((run / "sharpness.json").read_text())["records"][0]["settings"]
    assert settings["selection"] == "first" and settings["batch_size"] == 128
    assert settings["seed"] is None  # the first images do not depend on a seed
    # selection="random": a fixed random subset of the split, the same for the same seed
    measure_sharpness(run, device="cpu", selection="random", seed=3, n_batches=2)
    measure_sharpness(run, device="cpu", selection="random", seed=3, n_batches=2, cache=False)
    first, again = calls[1]["batches"], calls[2]["batches"]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][1], data.train_y[:128])
    with pytest.raises(ValueError, match="selection must be one of first, random; got 'last'"):
        measure_sharpness(run, selection="last")


# --------------------------------------------------------------------------- plots


def _results():
    rows = []
    for opt, accs in {"sgd": [0.7, 0.65, 0.5], "shb": [0.66, 0.66, 0.64]}.items():
        for b, acc in zip([8, 64, 512], accs, strict=True):
            for seed, d in enumerate((-0.01, 0.01)):
                rows.append({"optimizer": opt, "lr": 0.1, "batch_size": b, "seed": seed,
                             "beta": 0.9 if opt == "shb" else None, "status": "finished",
                             "test_acc": acc + d})
    rows.append({"optimizer": "sgd", "lr": 0.1, "batch_size": 1024, "seed": 0, "beta": None,
                 "status": "diverged", "test_acc": None})
    return pd.DataFrame(rows)


def test_plot_accuracy_vs_batch_size():
    ax = plot_accuracy_vs_batch_size(_results())
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["SGD", "SHB"]
    assert list(lines[0].get_xdata()) == [8, 64, 512]  # the diverged run is left out
    assert list(lines[0].get_ydata()) == pytest.approx([70, 65, 50])  # percent, seed mean
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert len(ax.collections) == 2  # min-max bands over the seeds
    _, ax2 = plt.subplots()
    assert plot_accuracy_vs_batch_size(_results(), paper=True, ax=ax2) is ax2
    assert len(ax2.get_lines()) == 2 and len(ax2.patches) == 3  # the paper's three bands
    lo, hi = ax2.get_ylim()
    assert 45 < lo < 49 and 71 < hi < 75  # the bands do not stretch the axis off the data
    assert any(t.get_text().startswith("paper") for t in ax2.get_legend().get_texts())
    with pytest.raises(ValueError, match="needs the column"):
        plot_accuracy_vs_batch_size(_results().drop(columns="batch_size"))


def test_plot_delta_vs_batch_size():
    c2 = {"sgd": 100.0, "shb": 10.0, "nshb": 20.0}
    ax = plot_delta_vs_batch_size(c2, lr=0.1, beta=0.9, k2=1.0, batch_sizes=[8, 16, 32])
    lines = ax.get_lines()
    assert len(lines) == 3
    assert list(lines[0].get_ydata()) == pytest.approx(
        [noise.delta_sgd(0.1, b, 100.0) for b in (8, 16, 32)])
    assert ax.get_yscale() == "log"
    ax = plot_delta_vs_batch_size(paper=True)
    lines = ax.get_lines()
    assert len(lines) == 3 and all(ln.get_label().startswith("paper") for ln in lines)
    assert len(lines[0].get_xdata()) == 11  # 2^3 ... 2^13
    sgd, shb, nshb = (ln.get_ydata() for ln in lines)
    assert list(sgd) == pytest.approx(list(nshb))  # Sato & Iiduka (2024) Fig. 5: they coincide
    # SHB keeps a floor eta sqrt(a) K from its K^2 term; SGD's delta goes to 0 with b.
    assert min(shb) >= 0.1 * math.sqrt(noise.momentum_factor(0.9)) * 1.77 > 10 * sgd[-1]
    with pytest.raises(ValueError, match="k2 .* is required for SHB"):
        plot_delta_vs_batch_size({"shb": 1.0})
    with pytest.raises(ValueError, match="give c2"):
        plot_delta_vs_batch_size()


def test_plot_accuracy_vs_delta():
    c2 = {"sgd": 1280.0, "shb": 25.318}
    ax = plot_accuracy_vs_delta(_results(), c2, k2=1.77**2, paper=True)
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["SGD", "SHB"]
    x = list(lines[0].get_xdata())
    assert x == sorted(x) and x[0] == pytest.approx(0.1 * math.sqrt(1280 / 512))
    assert ax.get_xscale() == "log"
    assert len(ax.patches) == 4  # best-delta span + three accuracy bands


def test_plot_sfo_vs_batch_size_marks_b_star():
    sfo = {"sgd": {8: 4e6, 16: 3e6, 32: 2e6, 64: 2.5e6}, "shb": {8: 5e6, 16: 4e6, 32: math.inf}}
    ax = plot_sfo_vs_batch_size(sfo, paper=True)
    lines = ax.get_lines()
    # per optimizer: the curve and the ring at b*; then the paper's b* lines.
    assert len(lines) == 2 * 2 + 2
    ring_sgd = lines[1]
    assert list(ring_sgd.get_xdata()) == [32] and list(ring_sgd.get_ydata()) == [2e6]
    assert list(lines[2].get_xdata()) == [8, 16]  # SHB at b = 32 never reached eps
    assert list(lines[3].get_xdata()) == [16]
    assert [ln.get_xdata()[0] for ln in lines[4:]] == [512, 1024]
    assert ax.get_yscale() == "log" and ax.xaxis.get_transform().base == 2
    # From sfo_curves: the mean over seeds, with the band from the smallest to the largest T b.
    runs = pd.DataFrame({"optimizer": ["nshb"] * 4, "lr": 0.1, "beta": 0.9,
                         "batch_size": [8, 8, 16, 16], "steps": [10, 30, 8, 10],
                         "reached": True, "complete": True, "eps": 0.5})
    runs["sfo"] = runs["steps"] * runs["batch_size"]
    for col in ("run", "seed", "status", "epochs_completed", "first_step", "lowest_mean",
                "final_mean", "skip_epochs", "folder"):
        runs[col] = 0
    ax = plot_sfo_vs_batch_size(sfo_curves(runs))
    assert list(ax.get_lines()[0].get_ydata()) == [160.0, 144.0]
    assert list(ax.get_lines()[1].get_xdata()) == [16]
    (band,) = ax.collections
    assert band.get_paths()[0].vertices[:, 1].min() == 80.0  # b = 8: T b from 80 to 240
    assert band.get_paths()[0].vertices[:, 1].max() == 240.0
    with pytest.raises(TypeError, match="list of labkit.experiments.SFOCurve"):
        plot_sfo_vs_batch_size([1, 2])


def test_plot_sharpness_vs_delta():
    df = pd.DataFrame({"lr": [0.01, 0.01, 0.1, 0.1], "batch_size": [8, 64, 8, 64],
                       "delta": [0.2, 0.1, 2.0, 1.0], "sharpness": [0.1, 0.3, 0.01, 0.05]})
    ax = plot_sharpness_vs_delta(df)
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["lr = 0.01", "lr = 0.1"]
    assert list(lines[0].get_xdata()) == [0.1, 0.2]
    scatters = [c for c in ax.collections if c.get_offsets().shape[0] == 2]
    assert len(scatters) == 2
    ax = plot_sharpness_vs_delta(df, x="batch_size", colorbar=False)
    assert ax.xaxis.get_transform().base == 2
    with pytest.raises(ValueError, match="needs the column"):
        plot_sharpness_vs_delta(df.drop(columns="sharpness"))


def test_plot_accuracy_curves_per_eta():
    rows = [{"run": f"{eta}-{s}", "eta": eta, "epoch": e, "test_acc": 0.1 * e + s * 0.01,
             "status": "finished"} for eta in (1 / 3, 2.0, 4.0) for s in (0, 1) for e in (1, 2, 3)]
    ax = plot_accuracy_curves(pd.DataFrame(rows))
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["η = 1/3", "η = 2", "η = 4"]
    assert list(lines[0].get_xdata()) == [1, 2, 3]
    assert list(lines[0].get_ydata()) == pytest.approx([10.5, 20.5, 30.5])
    with pytest.raises(ValueError, match="needs the column"):
        plot_accuracy_curves(pd.DataFrame(rows), by="beta")


def test_plots_from_a_real_sweep(sweep):
    _, out, _, _ = sweep
    ax = plot_accuracy_vs_batch_size(load_results(out))
    assert [ln.get_label() for ln in ax.get_lines()] == ["SGD", "SHB"]
    ax = plot_accuracy_curves(load_history(out), by="optimizer")
    assert [ln.get_label() for ln in ax.get_lines()] == ["optimizer = sgd", "optimizer = shb"]


def test_pack_units_group_what_shares_a_step(data_root):
    from labkit.experiments.sweep import PointResult, pack_units
    from labkit.train_pack import CPU_PACK_SIZE

    def point(i, status="pending", **kw):
        cfg = TrainConfig(**base(data_root, **{"batch_size": 16, **kw})).resolved()
        return PointResult(i, config_hash(cfg), cfg, status, f"runs/{i}")

    points = [point(0, optimizer="sgd"), point(1, optimizer="adam", lr=1e-3),
              point(2, optimizer="shb", batch_size=8), point(3, optimizer="nshb"),
              point(4, optimizer="shb", status="finished"),
              *[point(5 + i, optimizer="sgd", seed=i + 1) for i in range(CPU_PACK_SIZE)],
              point(13, optimizer="sgd", batch_size=64), point(14, optimizer="shb", batch_size=64)]
    units = pack_units(points, {}, pack=True)
    got = [([p.index for p in unit], packed) for unit, packed in units]
    # sgd/nshb at b = 16 with the seeds' sgd runs: a pack of CPU_PACK_SIZE, then the rest;
    # adam alone; the b = 8 run alone (a group of one on the CPU trains with train());
    # a finished point is only loaded; at b = 64 the CPU does not pack.
    same_step = [0, 3, *range(5, 5 + CPU_PACK_SIZE)]
    assert got == [(same_step[:CPU_PACK_SIZE], True), (same_step[CPU_PACK_SIZE:], True),
                   ([1], False), ([2], False), ([4], False), ([13], False), ([14], False)]
    assert all(not packed for _, packed in pack_units(points, {}, pack=False))
# --------------------------------------------------------------------------- hardening (issue 15)


def test_a_damaged_result_marks_its_point_and_the_sweep_goes_on(tmp_path, data_root):
    out = tmp_path / "sweep"
    spec = {"base": base(data_root), "grid": {"lr": [0.05, 0.1]}}
    first = run_sweep(spec, out, progress=False)
    bad = Path(first.points[1].folder) / "result.json"
    bad.write_text('{"status": ')
    planned = plan_sweep(spec, out)
    assert [p.status for p in planned] == ["finished", "damaged"]
    assert planned[1].error.startswith(f"{bad} is damaged (not JSON")
    seen = []
    again = run_sweep(spec, out, progress=False, on_run_end=seen.append)
    assert [p.status for p in again.points] == ["finished", "damaged"] and len(seen) == 2
    assert again.points[0].loaded and "delete it and run again" in again.points[1].error
    df = load_results(out)
    assert list(df["status"]) == ["finished", "damaged"] and df["error"][1].startswith(str(bad))
    (out / "index.json").rename(out / "index.bak")  # read by scanning the run folders
    df = load_results(out)
    assert sorted(df["status"]) == ["damaged", "finished"]
    assert len(load_history(out)) == 2  # one epoch each
    (out / "index.bak").rename(out / "index.json")
    bad.unlink()  # what the message says to do
    assert [p.status for p in run_sweep(spec, out, progress=False).points] == ["finished"] * 2


_HOLD = """
import sys, time
from labkit import store
with store.writing(sys.argv[1], "a sweep"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_sweep_into_a_folder_is_refused(tmp_path, data_root):
    from labkit.store import FolderBusyError

    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=f"process {proc.pid} is writing a sweep"):
            run_sweep({"base": base(data_root), "grid": {"lr": [0.05]}}, out, progress=False)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "runs").exists()  # nothing was written


def test_the_grid_size_is_checked_before_expanding(data_root):
    ten = list(range(1, 11))
    spec = {"base": base(data_root), "grid": {k: ten for k in ("lr", "seed", "batch_size",
                                                                "epochs", "weight_decay")}}
    spec["grid"]["beta"] = [0.1 * i for i in range(10)]
    spec["base"]["optimizer"] = "shb"
    for call in (lambda: expand_grid(spec), lambda: plan_sweep(spec, "unused"),
                 lambda: run_sweep(spec, "unused", progress=False)):
        with pytest.raises(GridError, match=r"the grid has 1,000,000 points \(10 x 10 x 10 x 10 "
                           r"x 10 x 10\), more than the limit of 10,000"):
            call()
    small = {"base": base(data_root), "grid": {"lr": [0.1, 0.2], "seed": [0, 1]}}
    with pytest.raises(GridError, match="4 points"):
        expand_grid(small, max_points=3)
    assert len(expand_grid(small, max_points=4)) == 4
    assert len(Grid.from_spec(spec)) == 10**6
    with pytest.raises(ValueError, match="max_points must be None or an integer >= 1"):
        expand_grid(small, max_points=0)


def test_a_sweeps_leftover_temporary_files_are_cleaned(tmp_path, data_root):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / ".index.json.abc.tmp").write_text("half")
    run_sweep({"base": base(data_root), "grid": {"lr": [0.05]}}, out, progress=False)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
