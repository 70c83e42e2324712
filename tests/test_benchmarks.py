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
