"""What run folders and sweep folders hold on disk, written atomically and read back safely.

Book: none of its own; every lab keeps its runs this way. This module imports no torch, so
reading results (tables, the SFO test of chapter 8) never loads the training code.

A run folder (:func:`labkit.train.train` with ``out``) holds

- ``config.json``: the run's :class:`~labkit.train.TrainConfig`;
- ``metrics.jsonl``: one JSON object per finished epoch;
- ``checkpoint.pt``: the state to resume from, written after each epoch;
- ``grad-norms.f32``: the mini-batch gradient norm ||grad f_{S_t}(x_{t-1})|| of every step t of
  the finished epochs, little-endian float32, one value per step in order (runs with
  ``track_grad_norm``); the stopping test of the critical batch size reads it
  (:mod:`labkit.experiments.sfo`);
- ``result.json``: written once, when the run has ``finished`` or ``diverged``; the authority
  for a finished run (it holds every epoch's metrics, which ``metrics.jsonl`` must repeat).

While a process writes into a run or sweep folder it holds ``.labkit-writer.lock`` there
(:func:`writing`), so a second writer stops with :class:`FolderBusyError` instead of mixing its
rows with the first one's.

A sweep folder (:func:`labkit.experiments.run_sweep`) holds ``runs/<config hash>/`` run folders
and ``index.json`` (:class:`SweepIndex`), rewritten atomically whenever a point starts or ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: msvcrt below
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "DamagedFileError",
    "GRAD_NORMS_FILE",
    "INDEX_FILE",
    "METRICS_FILE",
    "RESULT_FILE",
    "RUNS_FOLDER",
    "RUN_FILES",
    "WRITER_LOCK",
    "FolderBusyError",
    "SweepIndex",
    "append_grad_norms",
    "append_jsonl",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_folder",
    "clean_temporary_files",
    "finite_or_none",
    "keep_grad_norms",
    "lock_file",
    "read_grad_norms",
    "read_index",
    "read_jsonl",
    "read_result",
    "run_state",
    "summarize_metrics",
    "writing",
    "write_jsonl",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"
GRAD_NORMS_FILE = "grad-norms.f32"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, RESULT_FILE)

INDEX_FILE = "index.json"
RUNS_FOLDER = "runs"
INDEX_VERSION = 1
WRITER_LOCK = ".labkit-writer.lock"


# --------------------------------------------------------------------------- writing safely


def atomic_replace(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Create or replace ``path`` so that readers see the old file or the new one, never a torn
    one: ``write(tmp)`` writes a temporary file next to it, which is flushed to disk and then
    renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), so a
    # results folder shared with a group stays readable by it.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def clean_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.*.tmp``) that a writer killed in the middle of
    :func:`atomic_replace` left in ``folder``; return them. Call it holding :func:`writing`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- one writer


class FolderBusyError(RuntimeError):
    """Another process (or another call in this one) is writing into the folder."""

    def __init__(self, folder: Path, pid: int | None, what: str) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{folder} is in use: {holder} is writing {what} there. Wait for it to end (or "
            f"stop it), then run again; to run both at once, give this one another folder"
        )
        self.folder = folder
        self.pid = pid


def lock_file(fd: int, wait: bool) -> bool:
    """Take an exclusive inter-process lock on the open file ``fd``: True once held; with
    ``wait=False``, False at once when another holds it. The operating system releases it
    when ``fd`` is closed or its process ends (however it ends)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    import msvcrt

    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not wait:
                return False
            time.sleep(0.1)


def _lock_holder(path: Path) -> tuple[int | None, str | None]:
    """(pid, what it writes) of the holder, from the lock file ("<pid> <what>")."""
    try:
        pid, _, what = path.read_text().strip().partition(" ")
        return int(pid) or None, what or None
    except (OSError, ValueError):
        return None, None


def check_folder(folder: str | os.PathLike, what: str = "a run") -> Path:
    """``folder`` as a Path, when it is a folder or does not exist yet.

    Raises:
        ValueError: it is a file, or lies under one.
    """
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == folder else f"lies under the file {p}"
                raise ValueError(f"{folder} {where}, not a folder; name a folder (new or "
                                 f"existing) to write {what} into")
            break
    return folder


@contextlib.contextmanager
def writing(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """Hold the writer's lock of ``folder`` (created when missing) for the ``with`` block.

    An inter-process lock (:func:`lock_file`) on ``<folder>/.labkit-writer.lock``, a file
    holding the holder's pid and ``what`` it writes, removed on exit. The operating system
    releases the lock when its process dies, so a killed writer never blocks the next one.
    Nested use on one folder in one process is an
    error as well: two writers are two writers.

    Raises:
        FolderBusyError: another writer holds it (the message names its pid); nothing waits.
        ValueError: ``folder`` exists and is not a folder.
    """
    folder = check_folder(folder, what)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WRITER_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            held = lock_file(fd, wait=False)
        except BaseException:
            os.close(fd)
            raise
        if not held:
            os.close(fd)
            pid, theirs = _lock_holder(path)
            raise FolderBusyError(folder, pid, theirs or what) from None
        # The previous holder may have removed the file between our open and our lock: then
        # we hold a lock on a file nobody else sees; take the one on the path instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the lock


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` atomically (:func:`atomic_replace`)."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- JSON lines


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order; ``[]`` when it does not exist.

    Blank lines are skipped; reading stops at a line that is not a JSON object (the torn last
    line of a process killed mid-write; the checkpoint, not this file, is authoritative). NaN
    and infinities, which files of older labkit versions hold, are read as None.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line, parse_constant=lambda _: None)
        except (json.JSONDecodeError, RecursionError):
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one object to a JSON-lines file and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- run folders


class DamagedFileError(ValueError):
    """A file of a run or sweep folder that labkit cannot read; ``path`` names it."""

    def __init__(self, path: Path, problem: str, fix: str, what: str = "damaged") -> None:
        super().__init__(f"{path} is {what} ({problem}); {fix}")
        self.path = path


def read_result(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``result.json`` of a run folder (None when the run has not ended).

    Raises:
        DamagedFileError: the file is not a labkit run result (the message names it and says
            what to do).
    """
    path = Path(folder) / RESULT_FILE
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_bytes(), parse_constant=lambda _: None)
        problem = None if isinstance(stored, dict) else "not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        problem = f"not JSON: {e}"
    except OSError as e:
        problem = f"cannot read it: {e.strerror or e}"
    if problem is None and stored.get("status") not in ("finished", "diverged"):
        problem = f"status {stored.get('status')!r} is not 'finished' or 'diverged'"
    if problem is None and not isinstance(stored.get("metrics", []), list):
        problem = "its metrics are not a list"
    if problem is not None:
        has_checkpoint = (Path(folder) / CHECKPOINT_FILE).exists()
        fix = ("delete it and run again: the run resumes from its checkpoint and writes it anew"
               if has_checkpoint else "delete the run folder and run again to train it anew")
        raise DamagedFileError(path, problem, fix)
    return stored


def _same_metrics(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return json.dumps(list(a), sort_keys=True) == json.dumps(list(b), sort_keys=True)


def run_state(folder: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """(status, per-epoch metrics) of a run folder as it is on disk.

    The status is ``result.json``'s (``finished`` or ``diverged``) once the run has ended,
    ``stopped`` when it has a checkpoint to resume from, else ``pending``. For an ended run the
    metrics are those of ``result.json``, the authority; a ``metrics.jsonl`` that disagrees
    with it is reported (a :class:`UserWarning` naming both files) and ignored.

    Raises:
        DamagedFileError (a ValueError): a ``result.json`` that is not a labkit result.
    """
    folder = Path(folder)
    metrics = read_jsonl(folder / METRICS_FILE)
    result = read_result(folder)
    if result is not None:
        on_disk = len(metrics)
        stored = result.get("metrics")
        if stored is None:  # written by labkit < 0.3: only the epoch count and the final row
            agree = (len(metrics) == result.get("epochs_completed", len(metrics))
                     and (not metrics or "final" not in result
                          or _same_metrics([metrics[-1]], [result["final"]])))
        else:
            agree = _same_metrics(metrics, stored)
            metrics = [dict(m) for m in stored]
        if not agree:
            import warnings

            warnings.warn(
                f"{folder / METRICS_FILE} ({on_disk} epochs) disagrees with "
                f"{folder / RESULT_FILE} ({result.get('epochs_completed', len(metrics))} "
                f"epochs); labkit uses {RESULT_FILE}, the record of the finished run",
                UserWarning, stacklevel=2)
        return str(result["status"]), metrics
    if (folder / CHECKPOINT_FILE).exists():
        return "stopped", metrics
    return "pending", []


def read_grad_norms(folder: str | os.PathLike) -> np.ndarray | None:
    """The per-step mini-batch gradient norms of a run folder (float32, one per step), or None
    when the run kept none (trained with ``track_grad_norm=False``, or before labkit logged
    them)."""
    path = Path(folder) / GRAD_NORMS_FILE
    if not path.exists():
        return None
    return np.fromfile(path, dtype="<f4")


def append_grad_norms(folder: str | os.PathLike, norms: Any) -> None:
    """Append the gradient norms of some steps (any float array) to the run's log, durably."""
    values = np.asarray(norms, dtype="<f4").reshape(-1)
    with open(Path(folder) / GRAD_NORMS_FILE, "ab") as f:
        f.write(values.tobytes())
        f.flush()
        os.fsync(f.fileno())


def keep_grad_norms(folder: str | os.PathLike, steps: int) -> bool:
    """Prepare a run's log for training from step ``steps`` on (a checkpoint's step count).

    A log that covers the first ``steps`` steps is cut back to them (values written after the
    checkpoint, e.g. by a run killed before its next checkpoint, are trained again) and True
    is returned. A log that does not cover them is deleted and False returned: a run resumed
    from a checkpoint that was trained without the log must not keep an incomplete one.
    """
    path = Path(folder) / GRAD_NORMS_FILE
    have = path.stat().st_size // 4 if path.exists() else 0
    if have < steps:
        path.unlink(missing_ok=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:  # creates the file; then cut it back to the checkpoint
        f.truncate(4 * steps)
    return True


def finite_or_none(value: Any) -> Any:
    """``value``, or None when it is a float NaN or infinity (strict JSON has neither)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summarize_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of a run's per-epoch metrics: final values, best test accuracy, wall time.

    Non-finite numbers become None (strict JSON).
    """
    accs = [(m["test_acc"], m.get("epoch")) for m in metrics
            if finite_or_none(m.get("test_acc")) is not None]
    best = max(accs, key=lambda t: t[0]) if accs else (None, None)
    final = {k: finite_or_none(v) for k, v in metrics[-1].items()} if metrics else {}
    return {
        "epochs_completed": len(metrics),
        "final": final,
        "best_test_acc": best[0],
        "best_epoch": best[1],
        "wall_time": float(sum(m.get("time") or 0.0 for m in metrics)),
    }


# --------------------------------------------------------------------------- sweep folders


def read_index(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The points of a sweep folder's ``index.json``: run name -> entry.

    Raises:
        FileNotFoundError: the folder has no index.
        ValueError: the index is not a labkit sweep index.
    """
    path = Path(folder) / INDEX_FILE
    what = "not a labkit sweep index"
    fix = ("delete it: labkit sweep rebuilds it, and labkit.experiments.load_results reads "
           "the run folders instead")
    try:
        points = json.loads(path.read_bytes(), parse_constant=lambda _: None)["points"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise DamagedFileError(path, f"{type(e).__name__}: {e}", fix, what) from None
    if not isinstance(points, dict):
        raise DamagedFileError(path, "its points are not a mapping", fix, what)
    for name, entry in points.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("config"), dict)
                and isinstance(entry.get("folder"), str)
                and isinstance(entry.get("order", 0), int)):
            raise DamagedFileError(path, f"point {name!r} is not an entry with a config, a "
                                   "folder and an order", fix, what)
    return points


class SweepIndex:
    """``<sweep>/index.json``: run name -> entry (config identity, status, summary metrics).

    Rewritten atomically by :meth:`save`, so readers can load it while a sweep runs. A corrupt
    index starts empty (the sweep rebuilds it from its run folders).
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out) / INDEX_FILE
        self.points: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.points = dict(read_index(out))
            except ValueError:
                self.points = {}

    def set(self, name: str, order: int, identity: Mapping[str, Any], status: str,
            metrics: Sequence[Mapping[str, Any]], error: str | None = None) -> None:
        """Record run ``name`` (in ``runs/<name>``) with its config identity and status."""
        entry = {
            "order": order,
            "config": dict(identity),
            "status": status,
            "folder": f"{RUNS_FOLDER}/{name}",
            "error": error,
            "updated": time.time(),
        }
        entry.update(summarize_metrics(metrics))
        self.points[name] = entry

    def save(self) -> None:
        atomic_write_json(
            self.path, {"version": INDEX_VERSION, "updated": time.time(), "points": self.points}
        )
