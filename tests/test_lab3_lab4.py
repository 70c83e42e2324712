"""labkit.labs.lab3 and labkit.labs.lab4: C^2 measured and bounded, smoothing degrees, and the
knobs and figures of labs 3 and 4 (T, the SFO table and b* are labkit.experiments.sfo's, tested
in test_sfo.py)."""

from __future__ import annotations

import json
import math
import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from labkit import critical, noise, widgets
from labkit.experiments import run_sweep, sfo_of_sweep
from labkit.labs import lab3, lab4

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
    """Four smoke runs (SGD and SHB, b = 64 and 128, 2 epochs)."""
    values = _values(optimizers=("sgd", "shb"), batch_sizes=(64, 128), epochs=2)
    out = env / "sweep"
    result = run_sweep(lab3.grid(values), out, progress=False)
    assert result.complete
    return out, values, result


def test_the_theorem_table():
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


@pytest.mark.parametrize("profile", ["smoke", "cpu", "short", "paper"])
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
        # Lab 3's runs are measurements (fp32, TF32 off); lab 4's are plain training, which
        # without CUDA is fp32 too: there lab 4 asks for lab 3's very runs (and reuses them).
        plain = "auto" if torch.cuda.is_available() else "fp32"
        assert {cfg.precision for cfg in configs} == {"fp32" if lab is lab3 else plain}
    paper = lab3.defaults("paper")
    assert paper["eps"] == critical.PAPER_VALUES["eps"]
    assert paper["batch_sizes"] == critical.PAPER_VALUES["batch_sizes"]
    # The authors' test skips 11 epochs; the paper's Fig. 4 averages three runs.
    assert paper["skip_epochs"] == 11 and paper["seeds"] == 3
    assert lab3.defaults("smoke")["skip_epochs"] == 1 and lab3.defaults("short")["skip_epochs"] == 2
    # The precision knob can ask for labkit 0.2's bf16 runs.
    auto = lab3.grid({**_values(), "precision": "auto"})
    assert {cfg.precision for cfg in auto} == {"auto"}


def test_defaults_reject_unknown_profiles():
    for lab in (lab3, lab4):
        with pytest.raises(ValueError, match="profile must be one of smoke, cpu, short, paper"):
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
    ({"skip_epochs": -1}, "the epochs the test skips must be an integer >= 0; got -1"),
    ({"skip_epochs": 3, "epochs": 3}, "the test skips 3 epochs but the runs have only 3: no "
     "step would be tested"),
    ({"precision": "fp16"}, "precision must be one of fp32, auto; got 'fp16'"),
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
        metric="grad_norm", on_result=lab3.on_result,
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
    runs = lab3.sfo(panel)  # the panel's eps and skipped epochs
    assert runs.equals(sfo_of_sweep(out, 1.6, skip_epochs=1, runs=list(panel.results["run"])))
    assert len(runs) == 4 and set(lab3.run_table(runs).columns) >= {"steps", "sfo"}
    fig = lab3.figure(runs, panel.values(), {"sgd": 10.0})
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in
              ax.get_legend().get_texts()]
    assert "paper: b* (SHB) = 2^10" in labels and "paper's bound" in labels
    assert "ε = 1.6" in labels
    with pytest.raises(ValueError, match="runs is empty"):
        lab3.figure(runs.iloc[:0], panel.values())


def test_lab4_panel_constants_and_figure(env):
    out = env / "lab4"
    panel = _lab4_panel(out)
    panel.set_values(optimizers=("sgd", "shb"), batch_sizes=(64, 128), epochs=2, c2_images=64)
    result = panel.run()
    plain = "auto" if torch.cuda.is_available() else "fp32"
    assert len(result.points) == 4 and all(p.config.precision == plain for p in result.points)
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


# --------------------------------------------------------------------------- the cpu profile


def test_lab3_cpu_profile_on_the_digits_reduced(tmp_path):
    """Lab 3's cpu profile, cut down to run in CI (seconds): its grid trains the tiny CNN on the
    handwritten digits, and the authors' skip rule (11 epochs) and the SFO analysis apply."""
    values = {**lab3.defaults("cpu"), "profile": "cpu"}
    assert values["skip_epochs"] == 11 and values["eps"] == lab3.CPU_EPS
    assert lab3.validate(values) == []
    values.update(optimizers=("shb",), batch_sizes=(256, 1024), epochs=13)
    configs = lab3.grid(values)
    assert {(c.dataset, c.resolved().model) for c in configs} == {("digits", "tiny")}
    out = tmp_path / "lab3-cpu"
    result = run_sweep(configs, out, progress=False)
    assert result.complete
    runs = sfo_of_sweep(out, eps=100.0, skip_epochs=values["skip_epochs"])
    assert len(runs) == 2 and runs["reached"].all()
    # A generous eps is passed at the first tested step: the first step of epoch 12.
    steps_per_epoch = {256: 6, 1024: 2}  # 1,347 training images
    for _, r in runs.iterrows():
        assert r["steps"] == 11 * steps_per_epoch[int(r["batch_size"])] + 1
