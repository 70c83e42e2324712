"""labkit.labs.lab5 (implicit graduated optimization) and labkit.labs.lab6 (sharpness).

The schedules are checked against labkit.graduated and the seed's numbers, the panels are
driven from Python as a student would drive them, and the measurements of lab 6 against
labkit.experiments.measure_sharpness, labkit.noise and labkit.sharpness.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import matplotlib
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from labkit import data as lk_data
from labkit import graduated, noise, widgets
from labkit.experiments import load_results, measure_sharpness, run_sweep
from labkit.experiments.results import GRADIENT_STATS_FILE, SHARPNESS_FILE
from labkit.labs import lab5, lab6
from labkit.sharpness import adaptive_sharpness
from labkit.train import PROFILES, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread", "lab_data_env")

matplotlib.use("Agg")

PNG = b"\x89PNG"
SQRT_HALF = 2.0**-0.5


def lab5_values(profile="smoke", **kw):
    return {**lab5.defaults(profile), "profile": profile, **kw}


def lab6_values(profile="smoke", **kw):
    return {**lab6.defaults(profile), "profile": profile, **kw}


def lab5_panel(out, **kw):
    return widgets.ExperimentPanel(
        "Lab 5", controls=lab5.controls(), build_grid=lab5.grid, out_dir=out,
        validate=lab5.validate, defaults=lab5.defaults,
        curve_label=lab5.label, profile="smoke", background=False, **kw)


def lab6_panel(out, **kw):
    return widgets.ExperimentPanel(
        "Lab 6", controls=lab6.controls(), build_grid=lab6.grid, out_dir=out,
        validate=lab6.validate, defaults=lab6.defaults,
        curve_label=lab6.label, on_result=lab6.on_result, profile="smoke",
        background=False, **kw)


# =========================================================================== lab 5


@pytest.mark.parametrize("profile", PROFILES)
def test_lab5_defaults_are_valid_and_have_the_seeds_five_stages(profile):
    v = lab5_values(profile)
    assert lab5.validate(v) == []
    assert v["epochs"] // v["every"] == 5 and v["epochs"] % v["every"] == 0  # 200 / 40
    assert (v["lr0"], v["batch0"], v["powers"]) == (0.1, 32, (0.9,))
    panel = lab5_panel("unused")
    panel.set_values(profile=profile)
    assert {k: panel.values()[k] for k in v} == v


def test_lab5_defaults_reject_an_unknown_profile():
    with pytest.raises(ValueError,
                       match="profile must be one of smoke, cpu, short, paper; got 'x'"):
        lab5.defaults("x")


@pytest.mark.parametrize("knobs,message", [
    ({"schedules": ()}, "choose at least one schedule"),
    ({"schedules": ("warmup",)}, "unknown schedule(s) warmup; valid: constant, lr_step"),
    ({"powers": ()}, "choose at least one power p for the polynomial decay"),
    ({"powers": (0.0,)}, "every power p must be > 0"),
    ({"lr0": 0.0}, "initial lr η₀ must be > 0; got 0.0"),
    ({"lr0": math.nan}, "initial lr η₀ must be > 0; got nan"),
    ({"batch0": 0}, "initial batch size b₀ must be an integer >= 1; got 0"),
    ({"epochs": 1}, "epochs must be an integer >= 2"),
    ({"every": 0}, "stage length must be an integer >= 1 epoch; got 0"),
    ({"every": 5}, "stage length (5 epochs) must be shorter than the run (5 epochs)"),
    ({"seeds": 0}, "seeds must be an integer >= 1; got 0"),
])
def test_lab5_validate_explains_bad_knobs(knobs, message):
    msgs = lab5.validate(lab5_values(**knobs))
    assert any(message in m for m in msgs), msgs
    with pytest.raises(ValueError, match=re.escape(message)):
        lab5.grid(lab5_values(**knobs))


def test_lab5_long_stages_are_fine_without_step_schedules():
    assert lab5.validate(lab5_values(schedules=("constant", "poly"), every=5)) == []


def test_lab5_grid_is_the_seeds_experiment():
    v = lab5_values("paper", powers=(0.5, 0.9), seeds=2)
    runs = lab5.grid(v)
    assert len(runs) == (4 + 2) * 2  # constant, three steps, two powers; two seeds each
    keys = [lab5.schedule_key(c.lr_schedule, c.batch_schedule) for c in runs]
    assert keys == [k for k in ("constant", "lr_step", "batch_step", "hybrid_step",
                                "poly_p0.5", "poly_p0.9") for _ in range(2)]
    for c in runs:
        assert (c.dataset, c.optimizer, c.lr, c.batch_size, c.epochs, c.profile) == \
            ("cifar100", "sgd", 0.1, 32, 200, "paper")
        assert c.hparams == {} and c.weight_decay == 0.0  # plain SGD, no momentum
        assert c.resolved().model == "resnet18"
    assert [c.seed for c in runs[:2]] == [0, 1]


@pytest.mark.parametrize("key,mode", [("lr_step", "lr"), ("batch_step", "batch"),
                                      ("hybrid_step", "hybrid")])
def test_lab5_step_schedules_shrink_delta_by_one_over_sqrt2_per_stage(key, mode):
    v = lab5_values("paper", schedules=(key,))
    (config,) = lab5.grid(v)
    plan = lab5.epoch_plan(config)
    reference = graduated.step_schedule(0.1, 32, mode, epochs=200, every=40)
    assert plan["lr"] == reference.lrs and plan["batch_size"] == reference.batch_sizes
    assert plan["delta_ratio"] == pytest.approx(reference.delta_ratios, rel=1e-12)
    lag = 0 if mode == "lr" else 1  # the batch grows one epoch into a stage (authors' code)
    for e, r in enumerate(plan["delta_ratio"]):
        if lag and e % 40 == 0 and e:  # first epoch of a stage: only the lr has changed
            expected = SQRT_HALF ** (e // 40 - 1) * (1.0 if mode == "batch" else 3**0.5 / 2)
        else:
            expected = SQRT_HALF ** (max(e - lag, 0) // 40)
        assert r == pytest.approx(expected, rel=1e-12)
    assert lab5.label(config) == lab5.schedule_label(key)


def test_lab5_poly_is_the_per_epoch_polynomial_decay():
    (config,) = lab5.grid(lab5_values(schedules=("poly",), powers=(0.9,), epochs=7))
    plan = lab5.epoch_plan(config)
    assert plan["lr"] == pytest.approx([0.1 * (1 - e / 7) ** 0.9 for e in range(7)], rel=1e-12)
    assert plan["batch_size"] == [32] * 7
    assert plan["delta_ratio"] == pytest.approx([(1 - e / 7) ** 0.9 for e in range(7)])
    assert lab5.label(config) == "poly p = 0.9"
    assert lab5.label(TrainConfig(seed=2)) == "constant s2"


def test_lab5_schedule_key_reads_specs_and_json():
    assert lab5.schedule_key(None, None) == "constant"
    assert lab5.schedule_key('{"kind": "constant"}', math.nan) == "constant"
    hybrid = graduated.step_schedule(0.1, 32, "hybrid", epochs=10, every=2)
    assert lab5.schedule_key(json.dumps(hybrid.lr_schedule),
                             json.dumps(hybrid.batch_schedule)) == "hybrid_step"
    assert lab5.schedule_key({"kind": "poly", "power": 2.0}, None) == "poly_p2"
    assert lab5.schedule_key({"kind": "cosine"}, None) == "custom"
    assert lab5.schedule_key({"kind": "step", "factor": 0.5}, None) == "custom"
    assert lab5.schedule_key(None, {"kind": "step", "factor": 2.0, "max": 64}) == "custom"
    with pytest.raises(ValueError, match="lr_schedule must be a schedule spec dict or its JSON"):
        lab5.schedule_key("{not json", None)
    with pytest.raises(ValueError, match="unknown lr schedule kind 'warmup'"):
        lab5.schedule_key({"kind": "warmup"}, None)


def test_lab5_epoch_plan_errors():
    with pytest.raises(ValueError, match="run needs lr, batch_size, epochs"):
        lab5.epoch_plan({"lr": 0.1})
    with pytest.raises(ValueError, match="resolve the config first"):
        lab5.epoch_plan(TrainConfig())
    with pytest.raises(ValueError, match="needs the columns lr_schedule and batch_schedule"):
        lab5.add_schedule(pd.DataFrame({"lr": [0.1]}))


def test_lab5_stage_rows_are_the_seeds_schedules():
    rows = lab5.stage_rows()
    assert [(r["first_epoch"], r["last_epoch"]) for r in rows] == \
        [(1, 40), (41, 80), (81, 120), (121, 160), (161, 200)]
    assert [r["batch_epoch"] for r in rows] == [None, 42, 82, 122, 162]
    assert [r["batch_step"]["batch_size"] for r in rows] == [32, 64, 128, 256, 512]
    assert [r["hybrid_step"]["batch_size"] for r in rows] == [32, 48, 72, 108, 162]
    assert [r["lr_step"]["batch_size"] for r in rows] == [32] * 5
    for m, r in enumerate(rows):
        for key in ("lr_step", "batch_step", "hybrid_step"):
            assert r[key]["delta_ratio"] == pytest.approx(SQRT_HALF**m, rel=1e-12)
        assert r["lr_step"]["lr"] == pytest.approx(0.1 * SQRT_HALF**m)
        assert r["hybrid_step"]["lr"] == pytest.approx(0.1 * (3**0.5 / 2) ** m)
        assert r["poly"]["lr"] == pytest.approx(0.1 * (1 - 40 * m / 200) ** 0.9)
    with pytest.raises(ValueError, match="epochs must be an integer >= 2 and every"):
        lab5.stage_rows(every=0)


def test_lab5_panel_rejects_invalid_knobs_with_a_message(tmp_path):
    panel = lab5_panel(tmp_path / "sweep")
    panel.set_values(schedules=(), lr0=-1.0)
    panel.run_button.click()
    assert "choose at least one schedule" in panel.messages
    assert "initial lr η₀ must be > 0; got -1.0" in panel.messages
    assert panel.status_text.startswith("not started")
    # A batch that doubles past the 512 training images of the smoke data: caught before
    # anything trains, by the sweep's own check (5 one-epoch stages; the batch grows in epochs
    # 3, 4 and 5, as in the authors' code: 128 -> 1024).
    panel.set_values(schedules=("batch_step",), lr0=0.1, batch0=128)
    panel.run_button.click()
    assert ("its batch-size schedule grows b from 128 to 1024, which exceeds the 512 training "
            "images") in panel.messages
    assert "start from a smaller batch size (the schedule multiplies it by 8)" in panel.messages
    assert not (tmp_path / "sweep").exists()


def test_lab5_smoke_sweep_history_and_figure(tmp_path):
    panel = lab5_panel(tmp_path / "sweep")
    panel.set_values(schedules=("lr_step", "batch_step"), epochs=3)
    result = panel.run()
    assert [p.status for p in result.points] == ["finished", "finished"]
    runs = lab5.run_table(panel.results)
    assert list(runs["schedule"]) == ["lr_step", "batch_step"]
    plans = lab5.epoch_plans(panel.history)
    # one-epoch stages: the lr decays from epoch 2 on, the batch grows from epoch 3 on
    assert plans == {"lr_step": {"epoch": [1, 2, 3], "batch_size": [32, 32, 32],
                                 "lr": [0.1, pytest.approx(0.1 * SQRT_HALF), pytest.approx(0.05)]},
                     "batch_step": {"epoch": [1, 2, 3], "lr": [0.1, 0.1, 0.1],
                                    "batch_size": [32, 32, 64]}}
    # What the runs used is what the schedules say (the history's rows are what the notebook's
    # question 1 reads).
    hist = lab5.add_schedule(panel.history)
    for _, row in hist.iterrows():
        plan = lab5.epoch_plan(row)
        assert row["epoch_lr"] == pytest.approx(plan["lr"][row["epoch"] - 1])
        assert row["epoch_batch_size"] == plan["batch_size"][row["epoch"] - 1]
    fig = lab5.figure(panel.history)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels[:2] == ["lr × 1/√2", "b × 2"] and any(t.startswith("paper:") for t in labels)
    with pytest.raises(ValueError, match="history is empty"):
        lab5.figure(panel.history.iloc[:0])


# =========================================================================== lab 6


@pytest.mark.parametrize("profile", PROFILES)
def test_lab6_defaults_are_valid(profile):
    v = lab6_values(profile)
    assert lab6.validate(v) == []
    # On the digits the paper's C^2 (ResNet-18, CIFAR-100) means nothing: measured there.
    c2_source = "measured" if profile == "cpu" else "paper"
    assert (v["rho"], v["norm"], v["c2_source"], v["optimizers"]) == \
        (0.0002, "linf", c2_source, ("sgd",))
    assert set(v["lrs"]) <= set(lab6.LRS)
    assert set(v["batch_sizes"]) <= set(lab6.BATCH_SIZES)
    panel = lab6_panel("unused")
    panel.set_values(profile=profile)
    assert {k: panel.values()[k] for k in v} == v


@pytest.mark.parametrize("knobs,message", [
    ({"optimizers": ()}, "choose at least one optimizer"),
    ({"optimizers": ("adam",)}, "unknown optimizer(s) adam; valid: sgd, shb, nshb"),
    ({"lrs": ()}, "choose at least one learning rate"),
    ({"lrs": (-0.1,)}, "learning rates must be > 0"),
    ({"batch_sizes": ()}, "choose at least one batch size"),
    ({"optimizers": ("shb",), "beta": 1.0}, "β (SHB, NSHB) must be in [0, 1); got 1.0"),
    ({"epochs": 0}, "epochs must be an integer >= 1; got 0"),
    ({"n_iters": 0}, "sharpness ascent steps must be an integer >= 1; got 0"),
    ({"c2_source": "guess"}, "C² source must be one of paper, measured; got 'guess'"),
    ({"rho": 0.0}, "sharpness radius ρ must be > 0 (Sato & Iiduka 2024: 0.0002); got 0.0"),
    ({"norm": "l1"}, "sharpness ball must be 'linf' or 'l2'; got 'l1'"),
    ({"n_batches": 9, "sharpness_batch_size": 64},
     "sharpness batches × batch size = 9 × 64 = 576 exceeds the 512 training images"),
])
def test_lab6_validate_explains_bad_knobs(knobs, message):
    msgs = lab6.validate(lab6_values(**knobs))
    assert any(message in m for m in msgs), msgs
    with pytest.raises(ValueError):
        lab6.grid(lab6_values(**knobs))


def test_lab6_grid_and_labels():
    v = lab6_values("paper", optimizers=("sgd", "shb"), lrs=(0.1, 0.5), batch_sizes=(8, 32),
                    seeds=2, beta=0.8)
    runs = lab6.grid(v)
    assert len(runs) == 2 * 2 * 2 * 2
    assert {(c.optimizer, c.lr, c.batch_size, c.seed) for c in runs} == {
        (o, lr, b, s) for o in ("sgd", "shb") for lr in (0.1, 0.5) for b in (8, 32)
        for s in (0, 1)}
    for c in runs:
        assert c.hparams == ({"beta": 0.8} if c.optimizer == "shb" else {})
        assert (c.dataset, c.epochs, c.profile) == ("cifar100", 200, "paper")
    assert lab6.label(runs[0]) == "SGD η=0.1 b=8"
    assert lab6.label(runs[-1]) == "SHB η=0.5 b=32 β=0.8 s1"


def test_lab6_paper_delta_rows_follow_eq_12():
    rows = lab6.paper_delta_rows()
    assert [r["batch_size"] for r in rows] == [2**k for k in range(1, 14)]
    by_b = {r["batch_size"]: r for r in rows}
    # lr = 0.1, b = 128: 0.1 sqrt(1280 / 128) = 0.1 sqrt(10).
    assert by_b[128]["deltas"][2] == pytest.approx(0.1 * 10**0.5)
    for r in rows:
        for lr, d, good in zip((0.01, 0.05, 0.1, 0.5), r["deltas"], r["in_best_range"],
                               strict=True):
            assert d == pytest.approx(noise.delta_sgd(lr, r["batch_size"], 1280.0))
            assert good == (0.2 <= d <= 1.0)
    assert lab6.paper_delta_rows(c2=4.0, lrs=(1.0,), batch_sizes=(4,))[0]["deltas"] == [1.0]


def test_lab6_tiny_net_rescaling_keeps_the_function_and_the_adaptive_sharpness():
    x, y = lab6.tiny_problem()
    base = lab6.tiny_net(0.8, 1.5)
    values = {True: [], False: []}
    for a in (0.1, 1.0, 10.0):
        net = lab6.tiny_net(0.8 * a, 1.5 / a)
        assert torch.allclose(net(x), base(x), rtol=1e-12)
        for adaptive in (True, False):
            values[adaptive].append(adaptive_sharpness(net, F.mse_loss, [(x, y)], 0.05,
                                                       adaptive=adaptive, n_iters=20))
    assert max(values[True]) - min(values[True]) < 1e-9 * max(values[True])
    assert max(values[False]) > 2 * min(values[False])
    # The maximum over the l_inf box sits at a corner: the corner of the adaptive box.
    with torch.no_grad():
        corners = [float(F.mse_loss(lab6.tiny_net(0.8 * (1 + s * 0.05),
                                                  1.5 * (1 + t * 0.05))(x), y))
                   for s in (-1, 1) for t in (-1, 1)]
        center = float(F.mse_loss(base(x), y))
    assert values[True][1] == pytest.approx(max(corners) - center)


@pytest.fixture(scope="module")
def lab6_sweep(tmp_path_factory, lab_data_root):
    """SGD and SHB, one epoch each on the smoke data, as the lab's grid builds them."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LABKIT_DATA", str(lab_data_root))
    out = tmp_path_factory.mktemp("lab6") / "sweep"
    v = lab6_values(optimizers=("sgd", "shb"), lrs=(0.05,), batch_sizes=(32,), epochs=1)
    run_sweep(lab6.grid(v), out, progress=False)
    yield out, v
    mp.undo()


def test_lab6_measure_matches_labkit(lab6_sweep):
    out, v = lab6_sweep
    results = load_results(out)
    seen = []
    table = lab6.measure(results, out, v, progress=seen.append)
    assert list(table.columns) == ["run", "optimizer", "lr", "batch_size", "beta", "seed",
                                   "status", "epochs_completed", "test_acc", "c2", "k2",
                                   "delta", "sharpness"]
    assert list(table["optimizer"]) == ["sgd", "shb"] and len(seen) == 2
    assert seen[0] == "measuring sharpness 1/2: SGD η=0.05 b=32"
    for (_, row), (_, res) in zip(table.iterrows(), results.iterrows(), strict=True):
        fresh = measure_sharpness(out / res["folder"], rho=0.0002, norm="linf", n_batches=2,
                                  batch_size=64, n_iters=5, cache=False)
        assert row["sharpness"] == pytest.approx(fresh, rel=1e-6)
        assert row["test_acc"] == res["test_acc"]
    sgd, shb = table.iloc[0], table.iloc[1]
    assert sgd["c2"] == 1280.0 and math.isnan(sgd["k2"]) and math.isnan(sgd["beta"])
    assert sgd["delta"] == pytest.approx(0.05 * (1280.0 / 32) ** 0.5)
    assert (shb["c2"], shb["beta"]) == (25.318, 0.9)
    assert shb["k2"] == pytest.approx(1.77**2)
    assert shb["delta"] == pytest.approx(noise.delta_shb(0.05, 32, 0.9, 25.318, 1.77**2))
    records = lab6.records(table)
    assert records[0]["run"] == sgd["run"] and isinstance(records[0]["sharpness"], float)


def test_lab6_measured_c2_is_the_gradient_variance_at_the_final_weights(lab6_sweep):
    out, v = lab6_sweep
    results = load_results(out)
    table = lab6.measure(results, out, dict(v, c2_source="measured"))
    folder = out / results["folder"].iloc[0]
    stats = lab6.gradient_variance(folder, n_examples=128, cache=False)
    assert table["c2"].iloc[0] == pytest.approx(stats["c2"], rel=1e-9)
    assert math.isnan(table["k2"].iloc[0])  # K^2 only for SHB
    assert table["k2"].iloc[1] > 0
    # Independently: per-example gradients of the same 128 images, by a loop.
    model, _, data = lab6._load_run_model(folder, torch.device("cpu"))
    idx = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:128]
    xs = lk_data.normalize(data.train_x[idx], data.mean, data.std)
    ref = noise.gradient_variance(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                  (xs, data.train_y[idx])).c2
    assert stats["c2"] == pytest.approx(ref, rel=1e-6)
    assert table["delta"].iloc[0] == pytest.approx(0.05 * (stats["c2"] / 32) ** 0.5)
    stored = json.loads((folder / GRADIENT_STATS_FILE).read_text())["records"]
    assert {"n_images": 128, "seed": 0, "epochs": 1} in [r["settings"] for r in stored]


def test_lab6_measure_leaves_unfinished_and_stopped_runs_unmeasured(lab6_sweep, tmp_path):
    out, v = lab6_sweep
    measured = lab6.measure(load_results(out), out, v)  # stores every finished run's value
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    results = load_results(copy)
    (copy / results["folder"].iloc[0] / SHARPNESS_FILE).unlink()
    stopped = lab6.measure(results, copy, v, should_stop=lambda: True)
    # After Stop nothing is measured, but what is stored is still shown.
    assert math.isnan(stopped["sharpness"].iloc[0])
    assert stopped["sharpness"].iloc[1] == measured["sharpness"].iloc[1]
    assert not (copy / results["folder"].iloc[0] / SHARPNESS_FILE).exists()
    assert stopped["delta"].notna().all()  # the paper's C^2 needs no weights
    diverged = results.copy()
    diverged.loc[0, "status"] = "diverged"
    table = lab6.measure(diverged, out, dict(v, c2_source="measured"))
    assert math.isnan(table["sharpness"].iloc[0]) and math.isnan(table["delta"].iloc[0])
    assert table["sharpness"].notna().iloc[1]


def test_lab6_measures_in_fp32_with_tf32_off(lab6_sweep, monkeypatch):
    """Sharpness and C^2 are measurements: lab 6 takes them in IEEE fp32 (TF32 off)."""
    import torch

    import labkit.experiments

    out, v = lab6_sweep
    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.conv.fp32_precision,
                     torch.backends.cuda.matmul.fp32_precision))
        return 0.5

    monkeypatch.setattr(labkit.experiments, "measure_sharpness", spy)
    lab6.measure(load_results(out), out, v)
    assert seen == [("ieee", "ieee")] * 2


def test_lab6_measure_errors(lab6_sweep, tmp_path):
    out, v = lab6_sweep
    results = load_results(out)
    with pytest.raises(ValueError, match="results lacks the column"):
        lab6.measure(results.drop(columns=["folder"]), out, v)
    with pytest.raises(ValueError, match="values lacks the knob 'rho'"):
        lab6.measure(results, out, {k: x for k, x in v.items() if k != "rho"})
    with pytest.raises(FileNotFoundError, match="is not a run folder with a trained model"):
        lab6.gradient_variance(tmp_path)
    folder = out / results["folder"].iloc[0]
    with pytest.raises(ValueError, match="n_examples must be an integer >= 2; got 1"):
        lab6.gradient_variance(folder, n_examples=1)
    with pytest.raises(ValueError, match="n_images=1000 exceeds the 512 training images"):
        lab6.gradient_variance(folder, n_examples=1000, cache=False)


def test_lab6_figure(lab6_sweep):
    out, v = lab6_sweep
    table = lab6.measure(load_results(out), out, v)
    fig = lab6.figure(table, "short")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["(a) sharpness vs batch size", "(c) sharpness vs δ",
                      "(d) test accuracy vs sharpness", "(e) test accuracy vs δ"]
    (ax_e,) = [ax for ax in fig.axes if ax.get_title() == "(e) test accuracy vs δ"]
    legend = [t.get_text() for t in ax_e.get_legend().get_texts()]
    assert "paper: best δ ≈ 0.2-1" in legend and "paper: high (70-100%)" in legend
    assert any("SHB η=0.05" in t for t in legend)  # two optimizers: one line per optimizer and lr
    with pytest.raises(ValueError, match="no finished run has a sharpness"):
        lab6.figure(table.assign(sharpness=math.nan))


def test_lab6_panel_rejects_invalid_knobs_and_measures_after_a_sweep(tmp_path):
    panel = lab6_panel(tmp_path / "sweep")
    panel.set_values(lrs=(), rho=-1.0)
    panel.run_button.click()
    assert "choose at least one learning rate" in panel.messages
    assert "sharpness radius ρ must be > 0" in panel.messages
    assert panel.status_text.startswith("not started")
    assert not (tmp_path / "sweep").exists()

    panel.set_values(lrs=(0.05,), batch_sizes=(64,), rho=0.0002, epochs=1)
    result = panel.run()
    assert [p.status for p in result.points] == ["finished"]
    assert "sharpness of 1/1 runs" in panel.status_text and panel.status_text.startswith("done")
    assert bytes(panel.figure.value).startswith(PNG)
    table = lab6.table(panel)
    assert table["sharpness"].notna().all()
    assert "sharpness of 1/1 runs" in panel.status_text  # the status is restored
