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
- ``result.json``: written once, when the run has ``finished`` or ``diverged``.

A sweep folder (:func:`labkit.experiments.run_sweep`) holds ``runs/<config hash>/`` run folders
and ``index.json`` (:class:`SweepIndex`), rewritten atomically whenever a point starts or ends.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "GRAD_NORMS_FILE",
    "INDEX_FILE",
    "METRICS_FILE",
    "RESULT_FILE",
    "RUNS_FOLDER",
    "RUN_FILES",
    "SweepIndex",
    "append_grad_norms",
    "append_jsonl",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_json",
    "keep_grad_norms",
    "read_grad_norms",
    "read_index",
    "read_jsonl",
    "run_state",
    "summarize_metrics",
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


# --------------------------------------------------------------------------- writing safely


def atomic_replace(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Create or replace ``path`` so that readers see the old file or the new one, never a torn
    one: ``write(tmp)`` writes a temporary file next to it, which is flushed to disk and then
    renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` atomically (:func:`atomic_replace`)."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- JSON lines


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order; ``[]`` when it does not exist.

    Blank lines are skipped; reading stops at a line that is not JSON (the torn last line of
    a process killed mid-write; the checkpoint, not this file, is authoritative).
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
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


def run_state(folder: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """(status, per-epoch metrics) of a run folder as it is on disk.

    The status is ``result.json``'s (``finished`` or ``diverged``) once the run has ended,
    ``stopped`` when it has a checkpoint to resume from, else ``pending``.

    Raises:
        ValueError: a ``result.json`` that is not a labkit result.
    """
    folder = Path(folder)
    metrics = read_jsonl(folder / METRICS_FILE)
    result = folder / RESULT_FILE
    if result.exists():
        try:
            status = json.loads(result.read_text())["status"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{result} is not a labkit run result ({e}); delete it to resume "
                             "the run") from e
        return str(status), metrics
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


def _finite_or_none(value: Any) -> Any:
    # index.json must stay strict JSON, which has no NaN or inf.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summarize_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of a run's per-epoch metrics: final values, best test accuracy, wall time.

    Non-finite numbers become None (strict JSON).
    """
    accs = [(m["test_acc"], m.get("epoch")) for m in metrics
            if _finite_or_none(m.get("test_acc")) is not None]
    best = max(accs, key=lambda t: t[0]) if accs else (None, None)
    final = {k: _finite_or_none(v) for k, v in metrics[-1].items()} if metrics else {}
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
    try:
        points = json.loads(path.read_text())["points"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a labkit sweep index ({e})") from e
    if not isinstance(points, dict):
        raise ValueError(f"{path} is not a labkit sweep index (its points are not a mapping)")
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
