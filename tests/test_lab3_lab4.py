"""labkit.labs.lab3 and labkit.labs.lab4: the gradient-norm log, SFO and b* from a sweep, C^2
measured and bounded, smoothing degrees, and the knobs and figures of labs 3 and 4."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import critical, noise, widgets
from labkit.experiments import load_history, run_sweep, sfo_from_history
from labkit.labs import lab3, lab4
from labkit.train import Callback, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

matplotlib.use("Agg")

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Generated data in a temporary folder; no profile from the environment."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("lab3_lab4")
    mp.setenv("LABKIT_DATA", str(root / "data"))
    mp.delenv("LABKIT_PROFILE", raising=False)
    yield root
    mp.undo()


def _values(**kw):
    values = {**lab3.defaults("smoke"), "profile": "smoke"}
    values.update(kw)
    return values


@pytest.fixture(scope="module")
def sweep(env):
    """Four smoke runs (SGD and SHB, b = 64 and 128, 2 epochs) with the gradient-norm log."""
    values = _values(optimizers=("sgd", "shb"), batch_sizes=(64, 128), epochs=2)
    out = env / "sweep"
    result = run_sweep(lab3.grid(values), out, callbacks=[lab3.GradNormLog()],
                       progress=False)
    assert result.complete
    return out, values, result


def _config(**kw):
    base = dict(dataset="cifar10", optimizer="sgd", lr=0.1, batch_size=128, epochs=3,
                profile="smoke")
    base.update(kw)
    return TrainConfig(**base)


class _StopAfterEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == self.epoch:
            state.stop = True


class _Norms(Callback):
    step_interval = 1

    def __init__(self):
        self.values = []

    def on_step(self, state):
        self.values.append(float(state.grad_norm))


# --------------------------------------------------------------------------- the log


def test_the_log_holds_every_steps_gradient_norm(env, tmp_path):
    ref = _Norms()
    result = train(_config(out=str(tmp_path / "run")), [lab3.GradNormLog(), ref],
                   progress=False)
    norms = lab3.load_grad_norms(tmp_path / "run")
    assert norms.dtype == np.float32
    assert norms.tolist() == [float(np.float32(v)) for v in ref.values]
    assert len(norms) == result.metrics[-1]["total_steps"] == 3 * 4
    for k, m in enumerate(result.metrics):  # the epoch means of the log are the run's metrics
        chunk = norms[4 * k: 4 * (k + 1)].astype(np.float64)
        assert math.isclose(chunk.mean(), m["grad_norm"], rel_tol=1e-9)


def test_an_interrupted_log_equals_an_uninterrupted_one(env, tmp_path):
    train(_config(out=str(tmp_path / "a")), [lab3.GradNormLog()], progress=False)
    stopped = train(_config(out=str(tmp_path / "b")), [lab3.GradNormLog(), _StopAfterEpoch(1)],
                    progress=False)
    assert stopped.status == "stopped"
    log = tmp_path / "b" / lab3.GRAD_NORMS_FILE
    assert log.stat().st_size == 4 * 4
    with open(log, "ab") as f:  # steps written after the checkpoint, as a crash would leave
        f.write(np.ones(7, dtype="<f4").tobytes())
    resumed = train(_config(out=str(tmp_path / "b")), [lab3.GradNormLog()], progress=False)
    assert resumed.status == "finished" and resumed.resumed_from == 1
    assert log.read_bytes() == (tmp_path / "a" / lab3.GRAD_NORMS_FILE).read_bytes()


def test_no_log_where_it_would_be_incomplete_or_has_nowhere_to_go(env, tmp_path):
    # Resumed from a checkpoint trained without the log: no log rather than a wrong one.
    train(_config(out=str(tmp_path / "c")), [_StopAfterEpoch(1)], progress=False)
    train(_config(out=str(tmp_path / "c")), [lab3.GradNormLog()], progress=False)
    assert lab3.load_grad_norms(tmp_path / "c") is None
    # No folder, or no gradient norms: nothing is written and nothing fails.
    train(_config(epochs=1), [lab3.GradNormLog()], progress=False)
    train(_config(epochs=1, track_grad_norm=False, out=str(tmp_path / "d")),
          [lab3.GradNormLog()], progress=False)
    assert lab3.load_grad_norms(tmp_path / "d") is None


# --------------------------------------------------------------------------- the test


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=40),
       st.floats(0.01, 10.0), st.integers(1, 45))
def test_steps_to_threshold_is_the_first_passing_step(norms, eps, first):
    m = lab3.running_mean(norms)
    total = 0.0
    expected = None
    for t, g in enumerate(norms, start=1):
        total += float(g)
        assert m[t - 1] == total / t
        if expected is None and t >= first and total / t <= eps:
            expected = t
    assert lab3.steps_to_threshold(norms, eps, first) == expected


@pytest.mark.parametrize("kw,message", [
    ({"eps": 0.0}, "eps must be a positive finite number"),
    ({"eps": float("nan")}, "eps must be a positive finite number"),
    ({"eps": 1.0, "first_step": 0}, "first_step must be an integer >= 1; got 0"),
])
def test_steps_to_threshold_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        lab3.steps_to_threshold([1.0, 0.5], **kw)


@pytest.mark.parametrize("min_epochs", [0, 1])
def test_same_T_as_measure_sfo(sweep, min_epochs):
    """The log's T is the step-exact T of labkit.critical.measure_sfo on the same run."""
    out, _, result = sweep
    point = next(p for p in result.points if p.config.optimizer == "sgd"
                 and p.config.batch_size == 64)
    norms = lab3.load_grad_norms(point.folder)
    spe = 8  # 512 images / 64
    eps = float(lab3.running_mean(norms)[spe + spe // 2 - 1])  # reached by step 1.5 epochs
    first = max(1, min_epochs * spe)
    expected = lab3.steps_to_threshold(norms, eps, first)
    assert expected is not None and expected <= spe + spe // 2
    measured = critical.measure_sfo(dataclasses.replace(point.config, out=None), [64], eps,
                                    min_epochs=min_epochs, progress=False)
    (rec,) = measured.records
    assert rec.reached and rec.steps == expected and rec.sfo == expected * 64


# --------------------------------------------------------------------------- SFO of a sweep


def test_sfo_of_sweep_is_exact_and_falls_back_to_epochs(sweep, tmp_path):
    out, values, _ = sweep
    eps = 1.6
    df = lab3.sfo_of_sweep(out, eps, min_epochs=1)
    assert len(df) == 4 and df["exact"].all() and df["complete"].all()
    for _, r in df.iterrows():
        norms = lab3.load_grad_norms(r["folder"])
        spe = 512 // r["batch_size"]
        steps = lab3.steps_to_threshold(norms, eps, spe)
        assert (None if pd.isna(r["steps"]) else int(r["steps"])) == steps
        assert r["sfo"] == (steps * r["batch_size"] if steps else math.inf)
        assert r["reached"] == (steps is not None)
        m = lab3.running_mean(norms)
        assert math.isclose(r["lowest_mean"], m[spe - 1:].min())
        assert math.isclose(r["final_mean"], m[-1])
    # Without its log a run falls back to the per-epoch means: T rounded up to an epoch end.
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    run = df.iloc[0]
    (copy / "runs" / run["run"] / lab3.GRAD_NORMS_FILE).unlink()
    eps = float(df["final_mean"].max()) + 1e-6  # every run passes at its last step at the latest
    exact = lab3.sfo_of_sweep(out, eps).set_index("run")
    rounded = lab3.sfo_of_sweep(copy, eps).set_index("run")
    assert not rounded.loc[run["run"], "exact"] and rounded.drop(run["run"])["exact"].all()
    h = load_history(copy)
    want = sfo_from_history(h[h["run"] == run["run"]], eps).iloc[0]
    assert rounded.loc[run["run"], "steps"] == want["steps"]
    assert exact.loc[run["run"], "steps"] <= rounded.loc[run["run"], "steps"]
    # A subset of runs, and the errors.
    assert len(lab3.sfo_of_sweep(out, 1.0, runs=[run["run"]])) == 1
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        lab3.sfo_of_sweep(out, -1.0)
    with pytest.raises(ValueError, match="min_epochs must be an integer >= 0; got -1"):
        lab3.sfo_of_sweep(out, 1.0, min_epochs=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lab3.sfo_of_sweep(tmp_path / "nothing", 1.0)


def test_sfo_table_and_critical_batch_sizes():
    inf = math.inf
    rows = [  # optimizer, b, seed, sfo, reached, complete
        ("sgd", 16, 0, 100.0, True, True), ("sgd", 16, 1, 200.0, True, True),
        ("sgd", 32, 0, 90.0, True, True), ("sgd", 32, 1, inf, False, True),
        ("sgd", 64, 0, inf, False, False),  # still training: not known yet, left out
        ("sgd", 128, 0, 640.0, True, False),  # still training but already passed: kept
        ("shb", 16, 0, inf, False, True), ("nshb", 8, 0, 80.0, True, True),
        ("nshb", 16, 0, 80.0, True, True),
    ]
    df = pd.DataFrame(rows, columns=["optimizer", "batch_size", "seed", "sfo", "reached",
                                     "complete"])
    table = lab3.sfo_table(df)
    assert list(table) == ["sgd", "shb", "nshb"]
    assert table["sgd"] == {16: 150.0, 32: inf, 128: 640.0}
    assert table["shb"] == {16: inf}
    assert lab3.critical_batch_sizes(table) == {"sgd": 16, "shb": None, "nshb": 8}
    assert lab3.sfo_table(df.iloc[:0]) == {}


def test_c2_bounds_and_the_theorem_table():
    pv = critical.PAPER_VALUES
    bounds = lab3.c2_bounds({**pv["critical_batch_size"], "extra": None}, lr=0.1, eps=0.5,
                            beta=0.9)
    for opt in lab3.OPTIMIZERS:
        assert math.isclose(bounds[opt], pv["c2_upper_bound"][opt], rel_tol=1e-4)
    assert bounds["extra"] is None
    text = lab3.format_theorem_4_4_table()
    assert "25.3187" in text and "1280.0000" in text and "101.1111" in text


# --------------------------------------------------------------------------- smoothing degrees


def test_delta_table_follows_eqs_12_to_14():
    table = lab4.paper_delta_table()
    assert list(table) == ["sgd", "shb", "nshb"]
    assert list(table["sgd"]) == list(lab3.BATCH_SIZES)
    for b in lab3.BATCH_SIZES:
        assert math.isclose(table["sgd"][b], 0.1 * math.sqrt(1280 / b), rel_tol=1e-12)
        assert math.isclose(table["sgd"][b], table["nshb"][b], rel_tol=1e-12)  # C^2 (1 - beta)
        assert math.isclose(table["shb"][b], noise.delta_shb(0.1, b, 0.9, 25.318, 1.77**2))
        assert table["shb"][b] > 0.1 * math.sqrt(noise.momentum_factor(0.9)) * 1.77  # the floor
    text = lab4.format_delta_table(table)
    assert text.splitlines()[1] == "     8 |    1.2649 |    2.2780 |    1.2649"
    assert len(text.splitlines()) == 1 + len(lab3.BATCH_SIZES)
    with pytest.raises(ValueError, match="k2 .* is required for SHB"):
        lab4.delta_table(lr=0.1, beta=0.9, c2={"shb": 1.0}, k2=None, batch_sizes=[8])
    with pytest.raises(ValueError, match="lr must be > 0"):
        lab4.delta_table(lr=0.0, beta=0.9, c2={"sgd": 1.0}, k2=None, batch_sizes=[8])


# --------------------------------------------------------------------------- measured C^2


def test_measure_gradient_stats_is_gradient_variance_at_the_final_weights(sweep, monkeypatch):
    from labkit import data as lk_data
    from labkit import models
    from labkit.train import prepare_data

    out, _, result = sweep
    point = result.points[0]
    stats = lab3.measure_gradient_stats(point.folder, n_images=64, seed=3)
    # The same measurement by hand.
    cfg = point.config
    data = prepare_data(cfg, torch.device("cpu"))
    idx = torch.randperm(512, generator=torch.Generator().manual_seed(3))[:64]
    x = lk_data.normalize(data.train_x[idx], data.mean, data.std)
    model = models.build_model(cfg.model, data.num_classes)
    ckpt = torch.load(f"{point.folder}/checkpoint.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    want = noise.gradient_variance(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                   (x, data.train_y[idx]))
    assert stats.n == 64 and math.isclose(stats.c2, want.c2, rel_tol=1e-9)
    assert math.isclose(stats.full_grad_norm_sq, want.full_grad_norm_sq, rel_tol=1e-9)
    # Cached: the second call measures nothing.
    monkeypatch.setattr(noise, "gradient_variance", lambda *a, **k: pytest.fail("not cached"))
    assert lab3.measure_gradient_stats(point.folder, n_images=64, seed=3) == stats


def test_measure_gradient_stats_errors(sweep, env, tmp_path):
    out, _, result = sweep
    folder = result.points[0].folder
    with pytest.raises(ValueError, match="n_images must be an integer >= 2"):
        lab3.measure_gradient_stats(folder, n_images=1)
    with pytest.raises(ValueError, match="n_images=100000 exceeds the 512 training images"):
        lab3.measure_gradient_stats(folder, n_images=100000)
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        lab3.measure_gradient_stats(tmp_path)
    boom = tmp_path / "boom"  # a copy of the run, marked as diverged
    shutil.copytree(folder, boom)
    stored = json.loads((boom / "result.json").read_text())
    (boom / "result.json").write_text(json.dumps({**stored, "status": "diverged"}))
    with pytest.raises(ValueError, match="diverged"):
        lab3.measure_gradient_stats(boom, n_images=16)


def test_gradient_stats_of_sweep_and_max_by_optimizer(sweep):
    out, _, _ = sweep
    stats = lab3.gradient_stats_of_sweep(out, n_images=64)
    assert len(stats) == 4 and np.isfinite(stats["c2"]).all() and (stats["note"] == "").all()
    best = lab3.max_by_optimizer(stats)
    assert set(best) == {"sgd", "shb"}
    assert best["shb"] == stats.loc[stats["optimizer"] == "shb", "c2"].max()
    assert lab3.max_by_optimizer(stats, "grad_norm_sq")["sgd"] == \
        stats.loc[stats["optimizer"] == "sgd", "grad_norm_sq"].max()
    with pytest.raises(ValueError, match="stats has no column 'k2'"):
        lab3.max_by_optimizer(stats, "k2")


# --------------------------------------------------------------------------- accuracy


def test_accuracy_table_and_best_batch_sizes():
    nan = math.nan
    df = pd.DataFrame({
        "optimizer": ["sgd", "sgd", "sgd", "sgd", "shb", "nshb", "nshb"],
        "batch_size": [16, 16, 32, 64, 16, 16, 32],
        "status": ["finished", "finished", "finished", "stopped", "diverged", "finished",
                   "finished"],
        "test_acc": [0.5, 0.7, 0.6, 0.99, nan, 0.4, 0.4],
    })
    table = lab4.accuracy_table(df)
    assert table["sgd"] == {16: pytest.approx(0.6), 32: 0.6}  # stopped runs are left out
    assert math.isnan(table["shb"][16])
    assert lab4.best_batch_sizes(table) == {"sgd": 16, "shb": None, "nshb": 16}
    with pytest.raises(ValueError, match="results has no column 'best_acc'"):
        lab4.accuracy_table(df, "best_acc")


# --------------------------------------------------------------------------- knobs


@pytest.mark.parametrize("profile", ["smoke", "short", "paper"])
def test_each_profiles_defaults_are_valid_and_make_the_grid(profile):
    for lab in (lab3, lab4):
        values = {**lab.defaults(profile), "profile": profile}
        assert lab.validate(values) == []
        configs = lab.grid(values)
        assert len(configs) == 3 * len(values["batch_sizes"]) * values["seeds"]
        for cfg in configs:
            assert cfg.dataset == lab3.DATASETS[profile] and cfg.profile == profile
            assert cfg.hparams == ({} if cfg.optimizer == "sgd" else {"beta": 0.9})
            assert cfg.lr == 0.1 and cfg.weight_decay == 0.0 and cfg.track_grad_norm
            cfg.resolved()
    assert lab3.defaults("paper")["eps"] == critical.PAPER_VALUES["eps"]
    assert lab3.defaults("paper")["batch_sizes"] == critical.PAPER_VALUES["batch_sizes"]


def test_defaults_reject_unknown_profiles():
    for lab in (lab3, lab4):
        with pytest.raises(ValueError, match="profile must be one of smoke, short, paper"):
            lab.defaults("huge")


@pytest.mark.parametrize("knobs,message", [
    ({"optimizers": ()}, "choose at least one optimizer"),
    ({"batch_sizes": ()}, "choose at least one batch size"),
    ({"lr": 0.0}, "learning rate η must be > 0; got 0.0"),
    ({"beta": 1.0}, "momentum β must be in (0, 1) for SHB"),
    ({"beta": 0.0}, "momentum β must be in (0, 1) for SHB"),
    ({"optimizers": ("nshb",), "beta": -0.1}, "momentum β must be in [0, 1) for NSHB"),
    ({"epochs": 0}, "epochs must be an integer >= 1; got 0"),
    ({"seeds": 4}, "seeds must be at most 3; got 4"),
    ({"c2_images": 1}, "images for the measured C² must be an integer >= 2; got 1"),
    ({"eps": 0.0}, "threshold ε must be > 0"),
    ({"min_epochs": -1}, "the first tested epoch must be an integer >= 0; got -1"),
    ({"min_epochs": 5, "epochs": 3}, "the test starts after epoch 5 but the runs have only 3"),
])
def test_lab3_validate_messages(knobs, message):
    assert any(message in m for m in lab3.validate(_values(**knobs)))


def test_lab4_validate_messages():
    values = {**lab4.defaults("smoke"), "profile": "smoke"}
    assert lab4.validate(values) == []
    assert lab4.validate({**values, "optimizers": ("sgd",), "beta": 5.0}) == []  # unused
    msgs = lab4.validate({**values, "c2_source": "guess", "seeds": 8})
    assert "C² source must be one of measured, paper; got 'guess'" in msgs
    assert "seeds must be at most 7; got 8" in msgs


def _lab3_panel(out, **kw):
    return widgets.ExperimentPanel(
        "Lab 3", controls=lab3.controls(), build_grid=lab3.grid, out_dir=out,
        validate=lab3.validate, defaults=lab3.defaults, curve_label=lab3.label,
        metric="grad_norm", callbacks=[lab3.GradNormLog()], on_result=lab3.on_result,
        profile="smoke", background=False, **kw)


def _lab4_panel(out):
    return widgets.ExperimentPanel(
        "Lab 4", controls=lab4.controls(), build_grid=lab4.grid, out_dir=out,
        validate=lab4.validate, defaults=lab4.defaults, curve_label=lab4.label,
        on_result=lab4.on_result, profile="smoke", background=False)


def test_panels_take_every_profiles_defaults(env, tmp_path):
    for panel, defaults in ((_lab3_panel(tmp_path), lab3.defaults),
                            (_lab4_panel(tmp_path), lab4.defaults)):
        for profile in ("paper", "short", "smoke"):
            panel.set_values(profile=profile)
            values = panel.values()
            for name, value in defaults(profile).items():
                assert values[name] == (tuple(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("knobs,message", [
    ({"eps": 0.0}, "threshold ε must be > 0"),
    ({"optimizers": ()}, "choose at least one optimizer"),
    ({"batch_sizes": (1024,)}, "batch size 1024 exceeds the 512 training images"),
])
def test_the_lab3_panel_rejects_invalid_knobs_with_a_message(env, tmp_path, knobs, message):
    panel = _lab3_panel(tmp_path / "sweep")
    panel.set_values(**knobs)
    panel.run_button.click()
    assert message in panel.messages
    assert panel.status_text.startswith("not started")
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- panels and figures


def test_lab3_panel_and_figure(sweep):
    out, values, _ = sweep
    panel = _lab3_panel(out)
    panel.set_values(optimizers=("sgd", "shb"), batch_sizes=(64, 128), epochs=2, c2_images=64,
                     eps=1.6)
    result = panel.run()
    assert all(p.loaded for p in result.points)  # the sweep's runs: nothing trains
    assert bytes(panel.figure.value).startswith(PNG)
    assert "every finished run reaches ε ≥" in panel.status_text
    sfo = lab3.sfo(panel)
    assert len(sfo) == 4 and set(lab3.run_table(sfo).columns) >= {"steps", "sfo"}
    fig = lab3.figure(sfo, panel.values(), {"sgd": 10.0})
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in
              ax.get_legend().get_texts()]
    assert "paper: b* (SHB) = 2^10" in labels and "paper's bound" in labels
    assert "ε = 1.6" in labels
    with pytest.raises(ValueError, match="sfo has no runs"):
        lab3.figure(sfo.iloc[:0], panel.values())


def test_lab4_panel_constants_and_figure(sweep):
    out, _, _ = sweep
    panel = _lab4_panel(out)
    panel.set_values(optimizers=("sgd", "shb"), batch_sizes=(64, 128), epochs=2, c2_images=64)
    result = panel.run()
    assert all(p.loaded for p in result.points)
    assert bytes(panel.figure.value).startswith(PNG)
    measured = lab4.constants(panel)
    stats = lab3.gradient_stats_of_sweep(out, n_images=64)
    assert measured == {"source": "measured", "c2": lab3.max_by_optimizer(stats),
                        "k2": lab3.max_by_optimizer(stats, "grad_norm_sq")["shb"]}
    panel.set_values(c2_source="paper")
    paper = lab4.constants(panel)
    assert paper == {"source": "paper", "c2": {"sgd": 1280.0, "shb": 25.318},
                     "k2": pytest.approx(1.77**2)}
    results = panel.results
    assert lab4.accuracy_table(results).keys() == {"sgd", "shb"}
    assert len(lab4.run_table(results)) == 4
    fig = lab4.figure(results, panel.values(), paper)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in
              ax.get_legend().get_texts()]
    assert "paper: best δ ≈ 0.2-1" in labels and "paper: SHB (C²=25.318)" in labels
    # Outside the smoke profile the accuracy axes also carry the paper's accuracy bands.
    fig = lab4.figure(results, {**panel.values(), "profile": "short"}, paper)
    short = {t.get_text() for ax in fig.axes if ax.get_legend()
             for t in ax.get_legend().get_texts()}
    assert {"paper: high (70-100%)", "paper: intermediate (65-70%)"} <= short - set(labels)
    with pytest.raises(ValueError, match="no finished runs"):
        lab4.figure(results.iloc[:0], panel.values(), paper)


def test_unknown_optimizer_is_named_with_the_valid_ones():
    values = {**lab3.defaults("smoke"), "profile": "smoke", "optimizers": ("sgd", "adam")}
    assert "unknown optimizer(s) adam; valid: sgd, shb, nshb" in lab3.validate(values)
