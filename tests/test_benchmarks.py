"""The benchmark scripts run (tiny sizes) and report what they claim to measure.

Wall-clock times are printed by the scripts, never asserted here; what is asserted are the
counts that do not depend on the machine (host syncs per step).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_loop_quick(capsys):
    row = load("bench_loop").main(["--quick"])
    assert row["labkit_s_per_epoch"] > 0 and row["naive_s_per_epoch"] > 0
    assert "ratio labkit/naive" in capsys.readouterr().out


def test_bench_augment_quick(capsys):
    row = load("bench_augment").main(["--quick", "--device", "cpu"])
    assert row["n"] == 512 and row["crop_flip_s"] > 0 and row["rotation_s"] > 0
    assert "ratio rotation / (crop + flip)" in capsys.readouterr().out


def test_no_host_sync_per_training_step():
    out = load("bench_syncs").main(["--optimizers", "sgd", "shb", "nshb", "adam",
                                    "--steps", "4"])
    assert out["per_step"] == {"sgd": 0, "shb": 0, "nshb": 0, "adam": 0}


def test_sync_counter_sees_an_item_per_step(tmp_path):
    """Positive control: a callback that calls .item() each step is counted once per step."""
    from labkit.data import make_fake_cifar
    from labkit.train import Callback

    class ItemEachStep(Callback):
        step_interval = 1

        def on_step(self, state):
            state.loss.item()

    bench = load("bench_syncs")
    make_fake_cifar(tmp_path, "cifar10", n_train=128, n_test=32, seed=0)
    cpu = __import__("torch").device("cpu")
    n = bench.count_syncs(tmp_path, "shb", 128, 32, cpu, callbacks=[ItemEachStep()])
    assert n >= 4  # 4 steps, at least one sync op each


def test_bench_gpu_without_cuda_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: bench_gpu measures for real there (see benchmarks/)")
    assert load("bench_gpu").main([]) == {}
    assert "no CUDA" in capsys.readouterr().out


def test_bench_labs_plan_counts_what_the_defaults_train():
    """The short plan, checked against the labs' documented defaults by hand arithmetic."""
    out = load("bench_labs").main(["--plan", "--profile", "short", "--labs", "lab2", "lab3",
                                   "lab5"])
    plans = {p["lab"]: p for p in out["plan"]}
    assert "rows" not in out  # --plan trains nothing
    assert plans["lab2_seeing_smoothing"]["runs"] == 0  # toy functions only
    lab3 = plans["lab3_critical_batch"]  # 3 optimizers x 5 batch sizes, 15 epochs
    assert (lab3["runs"], lab3["epochs"]) == (15, 225)
    assert lab3["epochs_by_batch"] == {128: 45, 256: 45, 512: 45, 1024: 45, 2048: 45}
    assert lab3["steps"] == 45 * (391 + 196 + 98 + 49 + 25)  # ceil(50000 / b) per epoch
    assert lab3["models"] == ["resnet18"]
    lab5 = plans["lab5_implicit_graduated"]  # five 20-epoch runs; b doubles in two of them
    assert (lab5["runs"], lab5["epochs"]) == (5, 100)
    assert sum(lab5["epochs_by_batch"].values()) == 100 and max(lab5["epochs_by_batch"]) > 32


def test_bench_labs_names_a_bad_lab_or_timeout(capsys):
    bench = load("bench_labs")
    for argv, needle in ((["--labs", "lab9"], "'lab9' matches no lab"),
                         (["--labs", "lab"], "'lab' matches 6 labs"),
                         (["--timeout", "-3"], "positive number of seconds; got '-3'")):
        with pytest.raises(SystemExit):
            bench.main(["--plan", *argv])
        assert needle in capsys.readouterr().err


def test_bench_labs_times_a_lab_and_its_reload(tmp_path):
    """Lab 1 in the smoke profile: trains its 6 runs, then the re-run loads them all."""
    out = load("bench_labs").main(["--profile", "smoke", "--labs", "lab1",
                                   "--workdir", str(tmp_path), "--json",
                                   str(tmp_path / "times.json")])
    (row,) = out["rows"]
    assert (row["status"], row["rerun_status"]) == ("ok", "ok"), row["detail"]
    assert row["runs_on_disk"] == out["plan"][0]["runs"] == 6
    assert row["first_s"] > 0 and row["rerun_s"] > 0
    assert __import__("json").loads((tmp_path / "times.json").read_text())["rows"] == [row]


def test_bench_labs_reports_a_failing_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    status, seconds, detail = load("bench_labs").execute(path, timeout=60)
    assert status == "error" and seconds > 0
    assert detail == f"cell 1 ({nb.cells[1].id}): ValueError: boom"


@pytest.mark.parametrize("profile", ["short", "paper"])
def test_bench_labs_runs_lab2_in_the_gpu_profiles(tmp_path, profile):
    """Lab 2 trains nothing, so its short and paper profiles run here too, top to bottom."""
    out = load("bench_labs").main(["--profile", profile, "--labs", "lab2",
                                   "--workdir", str(tmp_path)])
    (row,) = out["rows"]
    assert (row["status"], row["rerun_status"]) == ("ok", "ok"), row["detail"]
    assert out["data"] == "none needed" and not (tmp_path / "data").exists()


def test_bench_pack_quick(capsys):
    out = load("bench_pack").main(["--quick"])
    (row,) = out["rows"]
    assert row["batch_size"] == 8 and row["k"] == 3
    assert row["sequential_s"] > 0 and row["packed_s"] > 0 and row["ratio"] > 0
    assert "ratio packed/sequential speed" in capsys.readouterr().out


def test_bench_pack_gpu_mode_says_when_there_is_no_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the --gpu mode would run the real benchmark")
    assert load("bench_pack").main(["--gpu"]) == {}
    assert "no CUDA device here" in capsys.readouterr().out


def test_bench_labs_predicts_packed_gpu_time_from_a_measured_table(tmp_path, capsys):
    import json
    import math

    bench = load("bench_labs")
    # s per run-epoch halves when b doubles (slope -1 in log-log), and a pack of 3 halves it.
    times = {"model": "resnet18", "rows": [
        {"batch_size": 8, "single_eager_s": 9.0, "pack1_s_per_run": 8.0, "pack3_s_per_run": 4.0},
        {"batch_size": 32, "single_eager_s": 3.0, "pack1_s_per_run": 2.0, "pack3_s_per_run": 1.0},
    ]}
    assert bench.run_epoch_seconds(times, 16, 3) == pytest.approx(2.0)
    assert bench.run_epoch_seconds(times, 128, 3) == pytest.approx(0.25)  # extrapolated
    assert bench.run_epoch_seconds(times, 8, 2) == 8.0  # the largest measured K <= 2
    want = 200 * 3 * sum(32 / 2 ** e for e in range(3, 14))
    assert math.isclose(bench.predict_critical_figure(times), want, rel_tol=1e-12)
    path = tmp_path / "pack.json"
    path.write_text(json.dumps(times))
    out = bench.main(["--plan", "--profile", "short", "--labs", "lab1", "lab3",
                      "--step-times", str(path)])
    assert out["predicted_s"]["lab1_optimizer_zoo"] is None  # ResNet-44: not measured
    assert out["predicted_s"][next(k for k in out["predicted_s"] if k.startswith("lab3"))] > 0
    assert "critical-batch figure at paper scale" in capsys.readouterr().out
