"""labkit.store: what run and sweep folders hold, written atomically and read back safely."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------- one writer

_HOLDER = """
import sys, time
from labkit import store
with store.writing(sys.argv[1], "a sweep"):
    print("held", flush=True)
    time.sleep(60)
"""


def _hold_in_another_process(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_dies(tmp_path):
    folder = tmp_path / "sweep"
    proc = _hold_in_another_process(folder)
    try:
        with pytest.raises(store.FolderBusyError) as e, store.writing(folder):
            pass
        msg = str(e.value)
        assert e.value.pid == proc.pid
        assert f"{folder} is in use: process {proc.pid} is writing a sweep there" in msg
        assert "give this one another folder" in msg and "\n" not in msg
    finally:
        proc.kill()  # SIGKILL: the operating system releases the lock
        proc.wait()
    assert (folder / store.WRITER_LOCK).read_text() == f"{proc.pid} a sweep\n"  # stale file
    with store.writing(folder):
        assert (folder / store.WRITER_LOCK).read_text() == f"{os.getpid()} a run\n"
    assert not (folder / store.WRITER_LOCK).exists()  # removed on exit


def test_two_writers_in_one_process_are_two_writers(tmp_path):
    with store.writing(tmp_path / "run"), pytest.raises(store.FolderBusyError,
                                                        match=f"process {os.getpid()}"):
        with store.writing(tmp_path / "run"):
            pass
    with store.writing(tmp_path / "run"):  # released after the outer block
        pass


def test_writing_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder; name a folder"):
        with store.writing(tmp_path / "f"):
            pass
    with pytest.raises(ValueError, match=f"{tmp_path / 'f' / 'x'} lies under the file "
                       f"{tmp_path / 'f'}, not a folder; .* to write a sweep into"):
        store.check_folder(tmp_path / "f" / "x", "a sweep")
    assert store.check_folder(tmp_path / "new" / "x") == tmp_path / "new" / "x"


def test_temporary_files_of_a_killed_writer_are_cleaned(tmp_path):
    for name in (".checkpoint.pt.abc123.tmp", ".result.json.x.tmp", "keep.tmp", "config.json"):
        (tmp_path / name).write_text("x")
    removed = store.clean_temporary_files(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.abc123.tmp", ".result.json.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "keep.tmp"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store.atomic_write_json(tmp_path / "x.json", {"v": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


# --------------------------------------------------------------------------- what a crash leaves


def test_read_jsonl_reads_nan_as_none_and_stops_at_garbage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "test_loss": NaN, "x": Infinity}\n[1, 2]\n{"epoch": 3}\n')
    assert store.read_jsonl(path) == [{"epoch": 1, "test_loss": None, "x": None}]
    path.write_bytes(b'{"epoch": 1}\n\xff\xfe\x00garbage')
    assert store.read_jsonl(path) == [{"epoch": 1}]
    path.write_bytes(b'{"epoch": 1}\n' + b"[" * 100_000)
    assert store.read_jsonl(path) == [{"epoch": 1}]


def _finished_run(folder, metrics):
    folder.mkdir()
    store.write_jsonl(folder / store.METRICS_FILE, metrics)
    store.atomic_write_json(folder / store.RESULT_FILE, {
        "status": "finished", "epochs_completed": len(metrics), "final": metrics[-1],
        "config": {}, "metrics": metrics})


def test_the_result_file_is_the_authority_for_a_finished_run(tmp_path):
    run = tmp_path / "run"
    rows = [{"epoch": e, "test_acc": e / 10} for e in range(1, 9)]
    _finished_run(run, rows)
    assert store.run_state(run) == ("finished", rows)
    # A damaged metrics.jsonl (8 epochs became 2): the result stands, and the disagreement
    # is reported naming both files.
    (run / store.METRICS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"epo')
    with pytest.warns(UserWarning) as w:
        assert store.run_state(run) == ("finished", rows)
    (msg,) = [str(x.message) for x in w]
    assert f"{run / 'metrics.jsonl'} (2 epochs) disagrees with {run / 'result.json'} (8 epochs)"\
        in msg


def test_an_old_result_without_metrics_still_detects_a_shortened_log(tmp_path):
    run = tmp_path / "run"
    rows = [{"epoch": e} for e in range(1, 5)]
    _finished_run(run, rows)
    stored = json.loads((run / store.RESULT_FILE).read_text())
    del stored["metrics"]
    store.atomic_write_json(run / store.RESULT_FILE, stored)
    assert store.run_state(run) == ("finished", rows)
    store.write_jsonl(run / store.METRICS_FILE, rows[:1])
    with pytest.warns(UserWarning, match=r"\(1 epochs\) disagrees with .*\(4 epochs\)"):
        store.run_state(run)


@pytest.mark.parametrize("content,problem", [
    ("", "not JSON"), ("[1]", "not a JSON object"), ('{"status": "running"}', "status 'running'"),
    ('{"status": "finished", "metrics": 3}', "metrics are not a list"), ("[" * 50_000, "not JSON"),
])
def test_a_damaged_result_names_the_file_and_what_to_do(tmp_path, content, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / store.RESULT_FILE).write_text(content)
    with pytest.raises(store.DamagedFileError) as e:
        store.run_state(run)
    assert str(e.value).startswith(f"{run / 'result.json'} is damaged (")
    assert problem in str(e.value) and "delete the run folder and run again" in str(e.value)


@pytest.mark.parametrize("index", [
    {"points": {"a": 1}}, {"points": {"a": {"config": {}, "folder": 3}}},
    {"points": {"a": {"config": [], "folder": "runs/a"}}},
    {"points": {"a": {"config": {}, "folder": "runs/a", "order": "first"}}}, {"points": []}, 7,
])
def test_an_index_of_the_wrong_shape_is_named(tmp_path, index):
    (tmp_path / store.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(store.DamagedFileError, match="is not a labkit sweep index .*delete it"):
        store.read_index(tmp_path)
    assert store.SweepIndex(tmp_path).points == {}  # a sweep starts afresh
