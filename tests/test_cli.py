"""The command line: `labkit train`, `labkit info`, `python -m labkit`, bad flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from labkit.cli import main, parse_schedule, parse_value


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_smoke_then_reload(tmp_path, capsys):
    args = ["train", "--profile", "smoke", "--optimizer", "nshb", "--lr", "0.05",
            "--set", "beta=0.9", "--epochs", "2", "--data-root", str(tmp_path / "d"),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert "epoch    1/2" in out
    code, out, _ = run(capsys, *args)
    assert code == 0 and "already holds a finished run" in out


@pytest.mark.parametrize("argv,match", [
    (["train", "--optimizer", "adamw"], "invalid choice: 'adamw'"),
    (["train", "--batch-size", "0"], "expected a positive integer"),
    (["train", "--lr", "fast"], "expected a number"),
    (["train", "--set", "beta"], "expected KEY=VALUE"),
    (["train", "--profile", "smoke", "--lr", "-1"], "lr must be a positive"),
    (["train", "--profile", "smoke", "--set", "beta=2"], "beta"),
    (["train", "--profile", "smoke", "--set", "beta=0.9", "--set", "beta=0.5"], "given twice"),
    (["train", "--profile", "smoke", "--lr-schedule", "zigzag"], "zigzag"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data-root", str(tmp_path), "--epochs", "1",
                       "--device", "cpu")
    assert code == 1
    assert str(tmp_path) in err and "--download" in err


def test_info(tmp_path, capsys):
    code, out, _ = run(capsys, "info", "--data-root", str(tmp_path))
    assert code == 0
    for key in ("labkit", "torch", "torchvision", "device", "data_root", "datasets"):
        assert key in out
    assert "cifar10: missing" in out


def test_python_dash_m(tmp_path):
    p = subprocess.run([sys.executable, "-m", "labkit", "--version"], capture_output=True,
                       text=True, check=True)
    assert p.stdout.startswith("labkit ")


def test_value_parsing():
    assert parse_value("3") == 3 and parse_value("0.9") == 0.9 and parse_value("true") is True
    assert parse_value("[0.9, 0.99]") == [0.9, 0.99] and parse_value("abc") == "abc"
    assert parse_schedule("step:every=40,factor=0.7071") == {"kind": "step", "every": 40,
                                                             "factor": 0.7071}
    assert parse_schedule('{"kind": "cosine"}') == {"kind": "cosine"}
    assert parse_schedule("cosine") == {"kind": "cosine"}
