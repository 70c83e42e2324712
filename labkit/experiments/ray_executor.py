"""Run a sweep's points on a Ray cluster: one Ray task per point or pack, the results in the same
store.

Book: none of its own; it runs the grids of chapters 4, 7 and 8 (e.g. the critical-batch grid of
Sato & Iiduka (2024), tens of GPU-hours) on many GPUs instead of one.

:class:`RayExecutor` is an executor for :func:`labkit.experiments.run_sweep`. The points that
are not finished are grouped as the local executor groups them
(:func:`labkit.experiments.sweep.pack_units`): each pack of runs trained together, and each
point that trains alone, becomes a Ray task that requests ``gpus_per_point`` GPUs (a fraction
such as 0.25 lets four small tasks share a GPU; 0 on a CPU-only cluster) and calls
:func:`~labkit.experiments.sweep.run_pack` or :func:`~labkit.experiments.sweep.run_point`, the
functions the local executor calls, in ``<out>/runs/<hash>/``. The pack size is chosen on the
driver's device. The sweep folder must be on a filesystem that every worker sees at the
same path: the driver writes a marker file with a random token into it and each task checks it
before training. Tasks write only their run folder; the driver (the process that called
``run_sweep``) writes ``index.json`` as tasks finish.

Ray places the tasks and retries them: a task whose worker process or node dies is retried up to
``max_retries`` times and resumes from its run folder's last checkpoint. A point whose training
raises is recorded ``failed`` with its message and the others go on; Ctrl-C (or the stop request
of a lab panel) cancels the tasks, which leaves every run folder resumable.

On the CPU the numbers equal those of a local sweep bit for bit when torch uses as many threads
there as a task has CPUs (``cpus_per_point``, 1 by default): the thread count changes the order
of floating-point sums.

Ray is an optional dependency: ``pip install 'labkit[ray]'`` (on the driver and every node).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from labkit.data import default_data_root
from labkit.experiments.sweep import (
    PointOutcome,
    PointResult,
    SweepRun,
    pack_units,
    run_pack,
    run_point,
)
from labkit.store import RUNS_FOLDER, atomic_write_bytes, atomic_write_json
from labkit.train import TrainConfig

__all__ = [
    "ENV_ADDRESS",
    "MARKER_FILE",
    "WORKER_FILE",
    "ClusterError",
    "FolderNotVisibleError",
    "RayExecutor",
    "check_address",
    "check_marker",
    "connected",
    "executor_from_env",
    "import_ray",
    "point_task",
]

#: The environment variable that makes lab panels run their sweeps on a Ray cluster.
ENV_ADDRESS = "LABKIT_RAY_ADDRESS"
#: The marker the driver writes into the sweep folder; tasks check they can read it.
MARKER_FILE = ".labkit-ray-marker"
#: Written into a run folder by the task that trains it: the worker's pid, host and token.
WORKER_FILE = "ray-worker.json"

INSTALL_HINT = "pip install 'labkit[ray]'"
#: Seconds the driver waits for a ``host:port`` address to accept a connection.
CONNECT_TIMEOUT = 5.0
# Seconds between the driver's looks at its tasks (finished ones, started ones, a stop request).
_POLL = 0.25


class ClusterError(RuntimeError):
    """The Ray cluster cannot be used: Ray missing, an address that cannot be reached, a sweep
    folder the workers cannot see. The message is one line saying what to do."""


class FolderNotVisibleError(RuntimeError):
    """Raised inside a task whose worker cannot see the driver's sweep folder."""


# --------------------------------------------------------------------------- the task


def check_marker(out: str | os.PathLike, token: str) -> None:
    """Check, on a worker, that ``out`` is the driver's sweep folder (its marker holds ``token``).

    Raises:
        FolderNotVisibleError: the marker is missing or holds another token.
    """
    path = Path(out) / MARKER_FILE
    host = socket.gethostname()
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        what = "does not exist" if seen is None else "belongs to another sweep"
        raise FolderNotVisibleError(
            f"the sweep folder {out} is not visible from the Ray worker on {host} (its marker "
            f"{MARKER_FILE} {what} there): put --out on a filesystem shared by the driver and "
            "every node, mounted at the same path"
        )


def point_task(config: TrainConfig, out: str, token: str) -> PointOutcome:
    """The body of one point's Ray task: check the sweep folder, then
    :func:`~labkit.experiments.sweep.run_point` in ``config.out`` (resuming from its
    checkpoint when an earlier attempt left one).

    Raises:
        FolderNotVisibleError: this worker cannot see the driver's sweep folder.
    """
    return unit_task([config], out, token, packed=False)[0]


def unit_task(configs: list[TrainConfig], out: str, token: str,
              packed: bool) -> list[PointOutcome]:
    """The body of one Ray task: check the sweep folder, then train its points, a pack of runs
    trained together (:func:`~labkit.experiments.sweep.run_pack`) or one point
    (:func:`~labkit.experiments.sweep.run_point`), each in its ``config.out`` (resuming from
    its checkpoint when an earlier attempt left one).

    Raises:
        FolderNotVisibleError: this worker cannot see the driver's sweep folder.
    """
    check_marker(out, token)
    for config in configs:
        folder = Path(config.out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / WORKER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "token": token, "started": time.time()})
    if packed:
        return run_pack(configs, progress=False)
    return [run_point(config, progress=False) for config in configs]


# --------------------------------------------------------------------------- connecting


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ClusterError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ClusterError(
            f"Ray is not installed; running sweeps on a Ray cluster needs it: {INSTALL_HINT}"
        ) from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"invalid Ray address {address!r}; valid: auto, local, ray://HOST:PORT (Ray "
            "client, port 10001 by default) or HOST:PORT (the head's GCS, port 6379 by default)"
        )
    return host.strip("[]"), int(port)


def check_address(address: str) -> None:
    """Check an address's syntax and, for ``ray://HOST:PORT`` and ``HOST:PORT``, that it
    accepts a TCP connection within :data:`CONNECT_TIMEOUT` seconds (Ray itself would retry
    for a long time).

    Raises:
        ValueError: a malformed address.
        ClusterError: an address that cannot be reached.
    """
    if address in ("auto", "local"):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({reason}); start its head node "
            "(ray start --head) or check the host and port"
        ) from None


#: ``ray.init`` settings of a ``local`` cluster: the tasks exchange only configs and metrics,
#: so the object store (shared memory) stays small.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024**2


@contextlib.contextmanager
def connected(address: str, **init_kwargs: Any) -> Iterator[None]:
    """Connect this process to the cluster at ``address`` (``auto``, ``local``,
    ``ray://HOST:PORT``, ``HOST:PORT``) for the ``with`` block, unless it is connected already
    (then that connection is used and kept; the address is checked either way).

    ``local`` starts a cluster on this machine with its files in a temporary folder; leaving
    the block stops its processes and removes the folder. ``init_kwargs`` go to ``ray.init``
    (e.g. ``num_cpus`` or ``object_store_memory`` for ``local``).

    Raises:
        ValueError: a malformed address.
        ClusterError: Ray missing, or no cluster there (or a local one failed to start).
    """
    ray = import_ray()
    check_address(address)
    if ray.is_initialized():
        yield
        return
    # Quiet: the sweep reports each point itself; Ray's errors still raise.
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "error"}
    temp = None
    if address == "local":
        temp = tempfile.mkdtemp(prefix="labkit-ray-")
        kwargs.update(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                      _temp_dir=temp)
    kwargs.update(init_kwargs)
    try:
        try:
            if address == "local":
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError or a bare Exception
            ray.shutdown()
            text = " ".join(str(e).split())[:300]
            if address == "auto":
                raise ClusterError(
                    "no running Ray cluster found (--ray auto looks for one started on this "
                    "machine with ray start, or RAY_ADDRESS); start one, give its address "
                    f"ray://HOST:PORT, or use --ray local ({text})"
                ) from None
            if address == "local":
                raise ClusterError(f"could not start a local Ray cluster: {text}") from None
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {text}") from None
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------- the executor


def _summary(point: PointResult, n: int) -> str:
    final = point.result.final if point.result is not None else {}
    acc = final.get("test_acc")
    what = "loaded" if point.loaded else point.status
    extra = f"  test_acc {acc:.4f}" if isinstance(acc, float) else ""
    if point.error:
        extra = f"  {point.error}"
    return f"[{point.index + 1}/{n}] {point.hash} {what:<9}{extra}"


def _for_workers(point: PointResult, out: str) -> TrainConfig:
    """The point's config with absolute paths (a worker's working folder and environment
    differ from the driver's): its run folder, and the driver's data root."""
    cfg = point.config
    root = Path(cfg.data_root) if cfg.data_root else default_data_root()
    return dataclasses.replace(cfg, out=str(Path(out) / RUNS_FOLDER / point.hash),
                               data_root=str(root.expanduser().resolve()))


class RayExecutor:
    """Runs a sweep's points as Ray tasks (pass it as ``run_sweep(..., executor=...)``).

    Args:
        address: the cluster: ``"auto"`` (one started on this machine with ``ray start``, or
            ``RAY_ADDRESS``), ``"ray://HOST:PORT"`` (Ray client), ``"HOST:PORT"`` (the head's
            GCS) or ``"local"`` (start a cluster here for this sweep). Ignored when this
            process is connected already (``ray.init`` was called).
        gpus_per_point: GPUs each task requests; None: 1 when the cluster has GPUs, else 0.
            A fraction (e.g. 0.25) packs several small runs onto one GPU.
        cpus_per_point: CPUs each task requests (Ray sets the task's ``OMP_NUM_THREADS``, and
            so torch's thread count, from it).
        max_retries: how often Ray retries a task whose worker died; each retry resumes from
            the run folder's last checkpoint.
        init_kwargs: more ``ray.init`` arguments (e.g. ``num_cpus`` and
            ``object_store_memory`` for ``"local"``).
    """

    def __init__(self, address: str = "auto", *, gpus_per_point: float | None = None,
                 cpus_per_point: float = 1, max_retries: int = 3,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"invalid Ray address {address!r}; valid: auto, local, "
                               "ray://HOST:PORT or HOST:PORT")
        address = address.strip()
        if address not in ("auto", "local"):
            _host_port(address)
        if gpus_per_point is not None and not gpus_per_point >= 0:
            raise ValueError(f"gpus_per_point must be >= 0 (a fraction shares a GPU); got "
                             f"{gpus_per_point!r}")
        if not cpus_per_point > 0:
            raise ValueError(f"cpus_per_point must be > 0; got {cpus_per_point!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0; got {max_retries!r}")
        self.address = address
        self.gpus_per_point = gpus_per_point
        self.cpus_per_point = cpus_per_point
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})

    def __repr__(self) -> str:
        return (f"RayExecutor({self.address!r}, gpus_per_point={self.gpus_per_point!r}, "
                f"cpus_per_point={self.cpus_per_point!r}, max_retries={self.max_retries!r})")

    def __call__(self, sweep: SweepRun) -> bool:
        ray = import_ray()
        with connected(self.address, **self.init_kwargs):
            return self._run(ray, sweep)

    def _gpus(self, ray: Any) -> float:
        if self.gpus_per_point is not None:
            return float(self.gpus_per_point)
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def _run(self, ray: Any, sweep: SweepRun) -> bool:
        n = len(sweep.points)
        write_line = sweep.bar.write if sweep.bar is not None and sweep.on_run_end is None \
            else None

        def done(point: PointResult, outcome: PointOutcome) -> None:
            sweep.finished(point, outcome)
            if write_line is not None:
                write_line(_summary(point, n))

        # Finished points are loaded here, as the local loop does; nothing runs for them.
        todo = []
        for point in sweep.points:
            if point.status == "damaged":  # reported by run_sweep; never run
                continue
            if point.status in ("finished", "diverged"):
                done(point, run_point(point.config))
            else:
                todo.append(point)
        if not todo:
            return False
        if sweep.should_stop():
            return True

        out = str(Path(sweep.out).resolve())
        token = secrets.token_hex(16)
        marker = Path(out) / MARKER_FILE
        atomic_write_bytes(marker, (token + "\n").encode())
        gpus = self._gpus(ray)
        if gpus > 0 and not ray.cluster_resources().get("GPU", 0):
            print(f"labkit: the Ray cluster has no GPU now; the points, {gpus:g} GPU each, wait "
                  "until GPU nodes join (use gpus_per_point=0, --gpus-per-point 0, to run them "
                  "on CPUs)", file=sys.stderr, flush=True)
        task = ray.remote(unit_task).options(
            num_gpus=gpus, num_cpus=self.cpus_per_point,
            max_retries=self.max_retries, retry_exceptions=False, name="labkit-point")
        # One task per unit: a pack of runs trained together, or one point (pack_units decides
        # on the driver's device: 8 runs per pack at small batch sizes on CPUs).
        refs: dict[Any, list[PointResult]] = {}
        for unit, packed in pack_units(todo, sweep.datasets, sweep.pack):
            configs = [_for_workers(point, out) for point in unit]
            refs[task.remote(configs, out, token, packed)] = unit
        waiting = {point.hash: point for unit in refs.values() for point in unit}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=_POLL)
                for ref in ready:
                    unit = refs.pop(ref)
                    outcomes = self._outcomes(ray, ref, len(unit))
                    for point, outcome in zip(unit, outcomes, strict=True):
                        waiting.pop(point.hash, None)
                        done(point, outcome)
                self._poll_started(sweep, waiting, token)
                if refs and sweep.should_stop():
                    self._cancel(ray, sweep, refs)
                    return True
        except BaseException:  # Ctrl-C, or a folder the workers cannot see
            self._cancel(ray, sweep, refs)
            raise
        finally:
            marker.unlink(missing_ok=True)
        return False

    @staticmethod
    def _poll_started(sweep: SweepRun, waiting: dict[str, PointResult], token: str) -> None:
        """Mark ``running`` the points whose task has written its worker file (this sweep's
        token), so the index and the bar tell running points from queued ones."""
        for key, point in list(waiting.items()):
            path = Path(point.folder) / WORKER_FILE
            try:
                started = token in path.read_text()
            except OSError:
                started = False
            if started:
                del waiting[key]
                sweep.started(point)

    def _outcomes(self, ray: Any, ref: Any, n: int) -> list[PointOutcome]:
        """The outcomes of a task's ``n`` points; what Ray raised for it, as ``failed`` or
        ``stopped`` ones."""
        from ray import exceptions as rex

        try:
            return list(ray.get(ref))
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(e, FolderNotVisibleError) or isinstance(cause, FolderNotVisibleError):
                raise ClusterError(str(cause or e).splitlines()[-1]) from None
            cause = cause if cause is not None else e
            return [PointOutcome("failed", error=f"{type(cause).__name__}: {cause}")] * n
        except rex.TaskCancelledError:
            return [PointOutcome("stopped", error=None)] * n
        except rex.RayError as e:  # worker or node died more than max_retries times, ...
            text = " ".join(str(e).split())[:500]
            return [PointOutcome(
                "failed",
                error=f"{type(e).__name__}: {text} (after {self.max_retries} retries; the run "
                "folder resumes from its last checkpoint on the next call)")] * n

    @staticmethod
    def _cancel(ray: Any, sweep: SweepRun, refs: dict[Any, list[PointResult]]) -> None:
        """Cancel the unfinished tasks (a KeyboardInterrupt inside each, as Ctrl-C does
        locally) and record their points as resumable."""
        for ref in refs:
            with contextlib.suppress(Exception):  # a task that has just ended
                ray.cancel(ref)
        if refs:
            ray.wait(list(refs), num_returns=len(refs), timeout=10)
        for unit in refs.values():
            for point in unit:
                sweep.interrupted(point)


def executor_from_env(environ: dict[str, str] | None = None) -> Callable[[SweepRun], bool] | None:
    """A :class:`RayExecutor` for the address in ``$LABKIT_RAY_ADDRESS``, or None when it is
    unset or empty (then sweeps run locally). The lab panels call this."""
    environ = os.environ if environ is None else environ
    address = environ.get(ENV_ADDRESS, "").strip()
    return RayExecutor(address) if address else None
