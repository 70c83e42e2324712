"""labkit.store: what run and sweep folders hold, written atomically and read back safely."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from labkit import store


def test_read_jsonl_skips_blank_lines_and_stops_at_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert store.read_jsonl(path) == []
    path.write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epoch": 3, "train_lo')
    assert store.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    store.write_jsonl(path, [{"a": 1}])
    store.append_jsonl(path, {"b": 2})
    assert store.read_jsonl(path) == [{"a": 1}, {"b": 2}]


def test_run_state_reads_the_status_from_the_files(tmp_path):
    run = tmp_path / "run"
    assert store.run_state(run) == ("pending", [])
    run.mkdir()
    store.write_jsonl(run / store.METRICS_FILE, [{"epoch": 1}])
    assert store.run_state(run) == ("pending", [])  # no checkpoint: nothing to resume from
    (run / store.CHECKPOINT_FILE).write_bytes(b"")
    assert store.run_state(run) == ("stopped", [{"epoch": 1}])
    store.atomic_write_json(run / store.RESULT_FILE, {"status": "diverged"})
    assert store.run_state(run) == ("diverged", [{"epoch": 1}])
    (run / store.RESULT_FILE).write_text("{")
    with pytest.raises(store.DamagedFileError, match=r"result\.json is damaged \(not JSON.*"
                       "delete it and run again: the run resumes from its checkpoint"):
        store.run_state(run)


def test_the_gradient_norm_log_keeps_exactly_the_checkpoints_steps(tmp_path):
    assert store.read_grad_norms(tmp_path) is None
    assert store.keep_grad_norms(tmp_path, 0)  # a fresh run starts an empty log
    store.append_grad_norms(tmp_path, [1.5, 0.25, 2.0])
    assert store.read_grad_norms(tmp_path).tolist() == [1.5, 0.25, 2.0]
    assert store.read_grad_norms(tmp_path).dtype == np.dtype("<f4")
    assert store.keep_grad_norms(tmp_path, 2)  # cut back to a checkpoint at step 2
    assert store.read_grad_norms(tmp_path).tolist() == [1.5, 0.25]
    assert not store.keep_grad_norms(tmp_path, 5)  # does not cover the checkpoint: removed
    assert store.read_grad_norms(tmp_path) is None


def test_atomic_writes_leave_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a" / "x.json"
    store.atomic_write_json(path, {"v": 1})

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.atomic_replace(path, boom)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_the_sweep_index(tmp_path):
    index = store.SweepIndex(tmp_path)
    index.set("abc", 0, {"lr": 0.1}, "finished", [{"epoch": 1, "test_acc": 0.5,
                                                     "train_loss": float("nan")}])
    index.save()
    points = store.read_index(tmp_path)
    assert points["abc"]["folder"] == "runs/abc" and points["abc"]["best_test_acc"] == 0.5
    assert points["abc"]["final"]["train_loss"] is None  # strict JSON
    (tmp_path / store.INDEX_FILE).write_text("[]")
    with pytest.raises(ValueError, match="is not a labkit sweep index"):
        store.read_index(tmp_path)
    assert store.SweepIndex(tmp_path).points == {}  # a corrupt index is rebuilt


def test_store_loads_no_torch():
    code = "import sys, labkit.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
