"""Sweeps on a Ray cluster (labkit.experiments.ray_executor), on a local two-CPU cluster.

One cluster (``ray.init(num_cpus=2)``, loopback only, a small object store, its files in a
temporary folder) serves the whole module and is shut down at the end; every process it
started is checked to be gone. The points train the tiny model on the CPU.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray  # labkit[ray]: requirements.txt pins it, so .ci/setup installs it

from labkit import cli
from labkit.data import make_fake_cifar
from labkit.experiments import load_results, plan_sweep, run_sweep
from labkit.experiments import ray_executor as rx
from labkit.store import METRICS_FILE, RESULT_FILE, read_jsonl

N_TRAIN, N_TEST = 256, 128
# The kill test needs epochs long enough to be killed in the middle of one.
N_TRAIN_SLOW = 3072


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, not yet reaped
    except psutil.NoSuchProcess:
        return False


def _ray_temp_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "labkit-ray-*")))


@pytest.fixture(scope="module")
def cluster():
    """The module's cluster: ``connected("local")`` (what ``--ray local`` runs) with 2 CPUs,
    no dashboard and an 80 MB object store. Leaving it must stop every process it started and
    remove its temporary folder."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    temps = _ray_temp_dirs()
    stack = contextlib.ExitStack()
    try:
        for attempt in range(3):
            try:
                stack.enter_context(rx.connected("local", num_cpus=2,
                                                 object_store_memory=80 * 1024**2))
                break
            except rx.ClusterError as e:
                # Ray 2.60's raylet gives its agents a fixed 15 s to start; on a machine whose
                # CPUs are busy with other work that can pass. Anything else is a failure.
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
        assert ray.is_initialized() and len(_ray_temp_dirs() - temps) == 1
        yield
    finally:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        stack.close()  # ray.shutdown(): stops the processes of the cluster
        _, alive = psutil.wait_procs(started, timeout=30)
        for p in alive:  # stragglers of a slow shutdown: by pid, only what was started here
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        alive = [p for p in alive if _running(p)]
        assert not alive, f"processes of the cluster still run: {[p.pid for p in alive]}"
        assert not ray.is_initialized()
        assert _ray_temp_dirs() == temps, "the local cluster's temporary folder is left"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fake_cifar(root, "cifar10", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return str(root)


def base(data_root, **kw):
    d = {"profile": "short", "model": "tiny", "epochs": 2, "batch_size": 32, "device": "cpu",
         "data_root": data_root}
    d.update(kw)
    return d


def _curves(out):
    """run hash -> per-epoch metrics without the wall time (the only number that may differ)."""
    df = load_results(out)
    return {h: [{k: v for k, v in m.items() if k != "time"}
                for m in read_jsonl(Path(out) / "runs" / h / METRICS_FILE)]
            for h in df["run"]}


def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray tasks (one CPU each)
    return n


def test_sweep_on_ray_equals_the_local_sweep(cluster, data_root, tmp_path):
    import torch

    spec = {"base": base(data_root), "grid": {"optimizer": ["sgd", "shb"], "lr": [0.05, 0.1]}}
    n = _one_thread()
    try:
        local = run_sweep(spec, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(n)
    seen = []
    remote = run_sweep(spec, tmp_path / "ray", progress=False, on_run_end=seen.append,
                       executor=rx.RayExecutor("auto"))
    assert local.complete and remote.complete
    assert len(remote.points) == 4 and len(seen) == 4
    assert [p.hash for p in remote.points] == [p.hash for p in local.points]
    assert _curves(tmp_path / "ray") == _curves(tmp_path / "local")  # bit for bit
    for p in remote.points:  # trained by a Ray worker, not by this process
        worker = json.loads((Path(p.folder) / rx.WORKER_FILE).read_text())
        assert worker["pid"] != os.getpid()
    df = load_results(tmp_path / "ray")
    assert list(df["status"]) == ["finished"] * 4
    assert not (tmp_path / "ray" / rx.MARKER_FILE).exists()
    # A second call trains nothing: every point is loaded by the driver.
    again = run_sweep(spec, tmp_path / "ray", progress=False, executor=rx.RayExecutor("auto"))
    assert all(p.loaded for p in again.points)


def test_a_pack_of_runs_is_one_ray_task_and_equals_the_local_packed_sweep(cluster, data_root,
                                                                          tmp_path):
    """Points that pack (SGD/SHB/NSHB at b = 8 on CPUs) run as one task, one pack, as the local
    executor trains them; the numbers equal the local packed sweep and the runs trained alone."""
    import torch

    spec = {"base": base(data_root, batch_size=8, epochs=1),
            "grid": {"optimizer": ["sgd", "shb", "nshb"], "lr": [0.05]}}
    n = _one_thread()
    try:
        local = run_sweep(spec, tmp_path / "local", progress=False)
        alone = run_sweep(spec, tmp_path / "alone", progress=False, pack=False)
    finally:
        torch.set_num_threads(n)
    remote = run_sweep(spec, tmp_path / "ray", progress=False, executor=rx.RayExecutor("auto"))
    assert local.complete and alone.complete and remote.complete
    pids = {json.loads((Path(p.folder) / rx.WORKER_FILE).read_text())["pid"]
            for p in remote.points}
    assert len(pids) == 1 and os.getpid() not in pids  # one task trained the three runs
    assert _curves(tmp_path / "ray") == _curves(tmp_path / "local")
    for h, rows in _curves(tmp_path / "alone").items():  # packed = alone (fp32: to rounding)
        for a, b in zip(rows, _curves(tmp_path / "ray")[h], strict=True):
            assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_cli_sweep_on_ray(cluster, data_root, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {json.dumps(base(data_root, epochs=1))}\n"
                    "grid: {lr: [0.05, 0.1]}\n")
    argv = ["sweep", str(grid), "--out", str(tmp_path / "out"), "--ray", "auto"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert [ln.split()[2] for ln in lines[:2]] == ["finished", "finished"]  # a line per point
    assert json.loads(lines[-1])["counts"] == {"finished": 2}
    for h in load_results(tmp_path / "out")["run"]:
        worker = json.loads((tmp_path / "out" / "runs" / h / rx.WORKER_FILE).read_text())
        assert worker["pid"] != os.getpid()
    assert ray.is_initialized()  # the CLI used this process's connection and kept it
    assert cli.main(argv) == 0 and " loaded " in capsys.readouterr().out


def test_lab_panel_runs_on_ray_when_the_address_is_set(cluster, lab_data_env, monkeypatch,
                                                       tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from labkit import widgets
    from labkit.labs import lab1

    monkeypatch.setenv(rx.ENV_ADDRESS, "auto")
    panel = widgets.ExperimentPanel(
        "Lab 1", controls=lab1.controls(), build_grid=lab1.grid, out_dir=tmp_path / "sweep",
        validate=lab1.validate, defaults=lab1.defaults, curve_label=lab1.label,
        profile="smoke", background=False)
    panel.set_values(optimizers=("adam",), etas=(0.5, 4.0), epochs=1)
    result = panel.run()
    assert result.complete
    assert panel.status_text.startswith("done") and "2 trained" in panel.status_text
    assert [len(pts) for _, pts in panel.plot.series.values()] == [1, 1]  # drawn as runs end
    for p in result.points:
        worker = json.loads((Path(p.folder) / rx.WORKER_FILE).read_text())
        assert worker["pid"] != os.getpid()


def test_killed_worker_is_retried_and_resumes(cluster, tmp_path_factory, tmp_path):
    import psutil
    import torch

    root = tmp_path_factory.mktemp("slow-data")
    make_fake_cifar(root, "cifar10", n_train=N_TRAIN_SLOW, n_test=N_TEST, seed=0)
    spec = {"base": base(str(root), batch_size=64), "grid": {"lr": [0.05]}}
    out = tmp_path / "ray"
    box = {}

    def sweep():
        try:
            box["result"] = run_sweep(spec, out, progress=False, executor=rx.RayExecutor("auto"))
        except BaseException as e:  # reported by the test below
            box["error"] = e

    thread = threading.Thread(target=sweep)
    thread.start()
    (point,) = plan_sweep(spec, out)
    folder = Path(point.folder)
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        if len(read_jsonl(folder / METRICS_FILE)) >= 1 and (folder / rx.WORKER_FILE).exists():
            pid = json.loads((folder / rx.WORKER_FILE).read_text())["pid"]
            assert not (folder / RESULT_FILE).exists(), "the run ended before it could be killed"
            os.kill(pid, signal.SIGKILL)  # the worker in the middle of epoch 2
            killed = pid
            break
        time.sleep(0.02)
    thread.join(timeout=150)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    assert killed is not None and not psutil.pid_exists(killed)
    result = box["result"]
    assert result.complete
    (p,) = result.points
    assert p.status == "finished" and p.result.resumed_from >= 1  # resumed from its checkpoint
    assert json.loads((folder / rx.WORKER_FILE).read_text())["pid"] != killed  # a retry
    n = _one_thread()
    try:
        reference = run_sweep(spec, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(n)
    assert reference.points[0].result.resumed_from == 0
    assert _curves(out) == _curves(tmp_path / "local")


def test_failing_point_is_recorded_and_only_it_is_retried(cluster, data_root, tmp_path, capsys):
    spec = {"base": base(data_root, epochs=1), "grid": {"lr": [0.05, 0.1, 0.2, 0.3]}}
    out = tmp_path / "ray"
    bad = plan_sweep(spec, out)[1]
    Path(bad.folder).mkdir(parents=True)
    (Path(bad.folder) / "config.json").write_text("{not json")  # training it raises
    first = run_sweep(spec, out, progress=True, executor=rx.RayExecutor("auto"))
    assert [p.status for p in first.points] == ["finished", "failed", "finished", "finished"]
    shown = capsys.readouterr()
    # The bar counts done / running / failed points; a summary line per finished point.
    assert "4/4" in shown.err and "failed=1" in shown.err and "running=0" in shown.err
    assert f"[2/4] {bad.hash} failed     ValueError: " in shown.out
    assert sum(f"[{i}/4] " in shown.out for i in (1, 3, 4)) == 3
    assert "is not a valid labkit run config" in first.points[1].error
    df = load_results(out)
    assert list(df["status"]) == ["finished", "failed", "finished", "finished"]
    assert "not a valid labkit run config" in df["error"][1]
    tokens = {p.hash: (Path(p.folder) / rx.WORKER_FILE).read_text() for p in first.points}

    (Path(bad.folder) / "config.json").unlink()  # the cause is fixed: a rerun retries it
    retry = run_sweep(spec, out, progress=False, executor=rx.RayExecutor("auto"))
    assert retry.complete
    assert [p.loaded for p in retry.points] == [True, False, True, True]
    for p in retry.points:
        now = (Path(p.folder) / rx.WORKER_FILE).read_text()
        assert (now != tokens[p.hash]) == (p.hash == bad.hash)  # only it ran again
    assert load_results(out)["error"].isna().all()


def test_stop_request_cancels_the_tasks_and_leaves_runs_resumable(cluster, data_root, tmp_path):
    spec = {"base": base(data_root, epochs=30), "grid": {"lr": [0.05, 0.1, 0.2]}}
    out = tmp_path / "ray"
    stop = threading.Event()

    def on_start_check():
        # Stop once a point has a finished epoch on disk (it is in the middle of the next).
        while not stop.is_set():
            for p in plan_sweep(spec, out):
                if len(read_jsonl(Path(p.folder) / METRICS_FILE)) >= 1:
                    stop.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=on_start_check)
    watcher.start()
    try:
        result = run_sweep(spec, out, progress=False, stop_event=stop,
                           executor=rx.RayExecutor("auto"))
    finally:
        stop.set()
        watcher.join()
    assert result.stopped and not result.complete
    statuses = [p.status for p in result.points]
    assert "stopped" in statuses and set(statuses) <= {"stopped", "pending", "finished"}
    assert list(load_results(out)["status"]) == statuses
    # Nothing keeps training after the stop: the run folders no longer change.
    sizes = [len(read_jsonl(Path(p.folder) / METRICS_FILE)) for p in result.points]
    time.sleep(1.0)
    assert [len(read_jsonl(Path(p.folder) / METRICS_FILE)) for p in result.points] == sizes
    assert [p.status for p in plan_sweep(spec, out)] == statuses


def test_ctrl_c_cancels_the_tasks_and_leaves_runs_resumable(cluster, data_root, tmp_path):
    spec = {"base": base(data_root), "zip": {"epochs": [1, 12, 12], "lr": [0.05, 0.1, 0.2]}}
    out = tmp_path / "ray"

    def ctrl_c(point):  # Ctrl-C arrives while the driver waits for the other tasks
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, progress=False, on_run_end=ctrl_c, executor=rx.RayExecutor("auto"))
    df = load_results(out)
    statuses = list(df["status"])
    assert statuses[0] == "finished" and statuses != ["finished"] * 3, statuses
    assert set(statuses) <= {"finished", "stopped", "pending"}
    sizes = [len(read_jsonl(Path(p.folder) / METRICS_FILE)) for p in plan_sweep(spec, out)]
    time.sleep(1.0)  # the cancelled tasks no longer train
    assert [len(read_jsonl(Path(p.folder) / METRICS_FILE))
            for p in plan_sweep(spec, out)] == sizes
    assert [p.status for p in plan_sweep(spec, out)] == statuses
    assert not (out / rx.MARKER_FILE).exists()


def test_points_wait_for_gpus_the_cluster_lacks(cluster, data_root, tmp_path, capsys):
    spec = {"base": base(data_root, epochs=1), "grid": {"lr": [0.05, 0.1]}}
    out = tmp_path / "ray"
    polls = []

    def stop():  # the queued tasks can never start here (no GPU): stop after a few polls
        polls.append(1)
        return len(polls) > 8

    result = run_sweep(spec, out, progress=False, stop_event=stop,
                       executor=rx.RayExecutor("auto", gpus_per_point=0.5))
    assert "the Ray cluster has no GPU now; the points, 0.5 GPU each, wait" in \
        capsys.readouterr().err
    assert result.stopped and [p.status for p in result.points] == ["pending", "pending"]
    assert list(load_results(out)["status"]) == ["pending", "pending"]
    assert not any((Path(p.folder) / rx.WORKER_FILE).exists() for p in result.points)

# --------------------------------------------------------------------------- clear errors


def test_unreachable_address_is_one_clear_line(capsys, cluster, tmp_path):
    with pytest.raises(rx.ClusterError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        rx.check_address("127.0.0.1:9")
    with pytest.raises(ValueError, match="invalid Ray address 'nohost'.*auto, local"):
        rx.RayExecutor("nohost")
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {profile: smoke, device: cpu, epochs: 1}\ngrid: {lr: [0.1]}\n")
    code = cli.main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--ray",
                     "ray://127.0.0.1:9", "--quiet", "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "cannot reach the Ray cluster at ray://127.0.0.1:9" in err
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--ray", "host:port"])
    assert "--ray: invalid Ray address 'host:port'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--gpus-per-point", "1"])
    assert "--gpus-per-point needs --ray ADDRESS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--ray", "auto",
                  "--gpus-per-point", "-1"])
    assert "gpus_per_point must be >= 0" in capsys.readouterr().err


def test_out_folder_not_visible_from_workers(cluster, data_root, tmp_path):
    from labkit.train import TrainConfig

    out = tmp_path / "sweep"
    out.mkdir()
    cfg = TrainConfig(**base(data_root), out=str(out / "runs" / "x"))
    with pytest.raises(rx.FolderNotVisibleError, match="not visible from the Ray worker"):
        rx.point_task(cfg, str(out), "token")  # no marker: the driver's folder is not here
    (out / rx.MARKER_FILE).write_text("another\n")
    task = ray.remote(rx.point_task).options(num_cpus=1)
    with pytest.raises(rx.FolderNotVisibleError) as e:
        ray.get(task.remote(cfg, str(out), "token"))  # through Ray, as the driver sees it
    assert f"the sweep folder {out} is not visible" in str(e.value)
    assert "belongs to another sweep" in str(e.value)
    assert not (out / "runs" / "x").exists()  # nothing was trained or written


def test_ray_not_installed_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(rx.ClusterError, match=r"pip install 'labkit\[ray\]'"):
        rx.import_ray()
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {profile: smoke, device: cpu, epochs: 1}\ngrid: {lr: [0.1]}\n")
    code = cli.main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--ray", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err == ("labkit sweep: error: Ray is not installed; running sweeps on a Ray cluster "
                   "needs it: pip install 'labkit[ray]'")
    assert not (tmp_path / "out").exists()


def test_executor_from_env():
    assert rx.executor_from_env({}) is None
    assert rx.executor_from_env({rx.ENV_ADDRESS: " "}) is None
    ex = rx.executor_from_env({rx.ENV_ADDRESS: "ray://head:10001"})
    assert isinstance(ex, rx.RayExecutor) and ex.address == "ray://head:10001"
    with pytest.raises(ValueError, match="gpus_per_point must be >= 0"):
        rx.RayExecutor("auto", gpus_per_point=-1)
