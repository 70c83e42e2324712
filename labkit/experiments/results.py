"""Reading sweeps back as tables, and the quantities the labs derive from them.

Book: chapter 8 (critical batch size and SFO complexity, smoothing degree delta, adaptive
sharpness) and the labs that plot them (Sato & Iiduka (2024) Fig. 4-8, the power-eta thesis Fig.
1-2).

- :func:`load_results`: one row per run (config columns + summary metrics), from a sweep's
  ``index.json`` (safe to call while the sweep runs).
- :func:`load_history`: one row per (run, epoch), read from each run's ``metrics.jsonl``.
- :func:`add_delta`: the smoothing degree delta of each run from estimated C^2 (Sato & Iiduka (2024)
  eqs. (12)-(14)).
- :func:`measure_sharpness`: adaptive sharpness (Kwon et al. 2021, arXiv:2102.11600) of a
  finished run's weights, cached in the run folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit.store import (
    INDEX_FILE,
    RUNS_FOLDER,
    DamagedFileError,
    atomic_write_json,
    read_index,
    read_jsonl,
    run_state,
    summarize_metrics,
)
from labkit.train import TrainConfig

__all__ = [
    "CONFIG_COLUMNS",
    "HISTORY_COLUMNS",
    "RESULT_COLUMNS",
    "add_delta",
    "final_model",
    "load_history",
    "load_results",
    "measure_gradient_stats",
    "measure_sharpness",
]

#: File of a run folder caching :func:`measure_gradient_stats`.
GRADIENT_STATS_FILE = "gradient-stats.json"

#: Config columns, in this order; each optimizer hyperparameter gets a column of its own,
#: placed after ``seed``.
CONFIG_COLUMNS = (
    "optimizer", "lr", "batch_size", "seed", "epochs", "weight_decay", "lr_schedule",
    "batch_schedule", "dataset", "model", "profile", "precision", "augment", "rotate", "device",
)
#: Summary columns of :func:`load_results` (after the config columns).
RESULT_COLUMNS = (
    "epochs_completed", "test_acc", "test_loss", "train_acc", "train_loss", "best_test_acc",
    "best_epoch", "grad_norm", "total_steps", "wall_time", "error", "folder",
)
#: Per-epoch columns of :func:`load_history`; ``epoch_lr`` / ``epoch_batch_size`` are the
#: values the schedules gave that epoch (``lr`` / ``batch_size`` are the run's initial ones).
HISTORY_COLUMNS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_lr",
    "epoch_batch_size", "steps", "total_steps", "grad_norm", "time", "diverged",
)
_NUMERIC = ("test_acc", "test_loss", "train_acc", "train_loss", "best_test_acc", "grad_norm",
            "wall_time", "time", "epoch_lr")
# Hyperparameters that are TrainConfig fields or do not change the mathematics.
_NOT_HPARAM_COLUMNS = ("lr", "weight_decay", "foreach")


def _pandas():
    import pandas as pd

    return pd


def _entries(folder: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(run name, index entry) pairs of a sweep folder, in sweep order.

    A folder without ``index.json`` is scanned (``runs/*/config.json``); a single run folder
    (``labkit train --out``) reads as a sweep of one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    if (folder / INDEX_FILE).exists():
        points = read_index(folder)
        return sorted(points.items(), key=lambda kv: kv[1].get("order", 0))
    if (folder / RUNS_FOLDER).is_dir():
        run_folders = sorted(p for p in (folder / RUNS_FOLDER).iterdir()
                             if (p / "config.json").exists())
        base = folder
    elif (folder / "config.json").exists():
        run_folders, base = [folder], folder.parent
    else:
        raise FileNotFoundError(
            f"{folder} has no {INDEX_FILE}, no {RUNS_FOLDER}/ and no config.json: it is not a "
            "sweep folder (labkit sweep --out) nor a run folder (labkit train --out)"
        )
    out = []
    for order, run in enumerate(run_folders):
        try:
            cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
            identity = cfg.identity()
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{run / 'config.json'} is not a valid labkit run config: {e}") from e
        try:
            status, metrics = run_state(run)
            error = None
        except DamagedFileError as e:  # listed with what to do; the other runs go on
            status, metrics, error = "damaged", read_jsonl(run / "metrics.jsonl"), str(e)
        entry = {"order": order, "config": identity, "status": status, "error": error,
                 "folder": os.path.relpath(run, base)}
        entry.update(summarize_metrics(metrics))
        out.append((run.name, entry))
    return out


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _config_rows(entries: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[list[dict], list[str]]:
    """Flattened config of each entry, and the hyperparameter column names."""
    from labkit import optim as lk_optim

    names: list[str] = []
    for _, e in entries:
        for k in e["config"].get("hparams", {}):
            if k not in names and k not in _NOT_HPARAM_COLUMNS:
                names.append(k)
    rows = []
    for run, e in entries:
        c = e["config"]
        row: dict[str, Any] = {"run": run, "status": e.get("status")}
        for k in CONFIG_COLUMNS:
            v = c.get(k)
            row[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
        hp = c.get("hparams", {})
        try:
            defaults = lk_optim.hyperparameters(c.get("optimizer"))
        except (TypeError, ValueError):
            defaults = {}
        for k in names:
            col = k if k not in CONFIG_COLUMNS else f"hparams.{k}"
            if k in hp:
                row[col] = _hashable(hp[k])
            elif k in defaults and defaults[k] is not lk_optim.REQUIRED:
                row[col] = defaults[k]  # what the run used
            else:
                row[col] = None  # this optimizer has no such hyperparameter
        rows.append(row)
    hparam_cols = [k if k not in CONFIG_COLUMNS else f"hparams.{k}" for k in names]
    return rows, hparam_cols


def _frame(rows: list[dict], columns: Sequence[str]):
    pd = _pandas()
    df = pd.DataFrame(rows, columns=list(columns))
    for col in _NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def load_results(folder: str | os.PathLike):
    """One row per run of a sweep folder, as a ``pandas.DataFrame``.

    Columns: ``run`` (the config hash), ``status``, the config (:data:`CONFIG_COLUMNS`,
    schedules as JSON strings) with one column per optimizer hyperparameter (``beta``, ``eta``,
    ...; filled with the optimizer's default where a run did not set it, empty for optimizers
    that have no such hyperparameter), then :data:`RESULT_COLUMNS`: the last epoch's metrics
    (accuracies in [0, 1]; NaN where a diverged run produced none), ``best_test_acc`` and its
    epoch, ``wall_time`` (seconds, summed over epochs), ``error`` (of failed runs) and
    ``folder`` (relative to ``folder``).

    Reads ``index.json`` (written atomically by :func:`run_sweep`, so this is safe while a
    sweep runs); a folder without one is scanned, and a single run folder reads as one row.

    Raises:
        FileNotFoundError: ``folder`` is missing or is neither a sweep nor a run folder.
        ValueError: a corrupt index or run config.
    """
    entries = _entries(folder)
    cfg_rows, hparam_cols = _config_rows(entries)
    rows = []
    for (_, e), row in zip(entries, cfg_rows, strict=True):
        final = e.get("final") or {}
        row.update({
            "epochs_completed": e.get("epochs_completed", 0),
            "test_acc": final.get("test_acc"),
            "test_loss": final.get("test_loss"),
            "train_acc": final.get("train_acc"),
            "train_loss": final.get("train_loss"),
            "best_test_acc": e.get("best_test_acc"),
            "best_epoch": e.get("best_epoch"),
            "grad_norm": final.get("grad_norm"),
            "total_steps": final.get("total_steps"),
            "wall_time": e.get("wall_time"),
            "error": e.get("error"),
            "folder": e.get("folder"),
        })
        rows.append(row)
    cols = ["run", "status", *CONFIG_COLUMNS[:4], *hparam_cols, *CONFIG_COLUMNS[4:],
            *RESULT_COLUMNS]
    return _frame(rows, cols)


def _run_metrics(folder: Path) -> list[dict[str, Any]]:
    """A run's epochs: ``result.json``'s for an ended run (the authority), else those of
    ``metrics.jsonl``; a damaged ``result.json`` falls back to the log (the index and
    :func:`load_results` report it)."""
    try:
        status, metrics = run_state(folder)
    except DamagedFileError:
        return read_jsonl(folder / "metrics.jsonl")
    return metrics if status in ("finished", "diverged") else read_jsonl(folder / "metrics.jsonl")


def load_history(folder: str | os.PathLike):
    """One row per (run, finished epoch) of a sweep folder, as a ``pandas.DataFrame``.

    Columns: ``run``, ``status``, the config columns of :func:`load_results` and
    :data:`HISTORY_COLUMNS`. Read from each run's ``metrics.jsonl``, so a run in progress shows
    its epochs so far. For curves: ``df.groupby("eta")`` then plot ``test_acc`` vs ``epoch``.
    """
    folder = Path(folder)
    entries = _entries(folder)
    cfg_rows, hparam_cols = _config_rows(entries)
    base = folder if (folder / INDEX_FILE).exists() or (folder / RUNS_FOLDER).is_dir() \
        else folder.parent
    rows = []
    for (_, e), cfg_row in zip(entries, cfg_rows, strict=True):
        for m in _run_metrics(base / e["folder"]):
            row = dict(cfg_row)
            row.update({k: m.get(k) for k in HISTORY_COLUMNS})
            row["epoch_lr"] = m.get("lr")
            row["epoch_batch_size"] = m.get("batch_size")
            row["diverged"] = bool(m.get("diverged", False))
            rows.append(row)
    cols = ["run", "status", *CONFIG_COLUMNS[:4], *hparam_cols, *CONFIG_COLUMNS[4:],
            *HISTORY_COLUMNS]
    return _frame(rows, cols)


def _per_optimizer(value: Any, optimizer: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(optimizer)
    return value


def add_delta(results, c2: Mapping[str, float], k2: Mapping[str, float] | float | None = None):
    """A copy of ``results`` with a ``delta`` column: the smoothing degree of each run.

    delta is Sato & Iiduka's (2024) eq. (12) (SGD), (13) (SHB, needs K^2) or (14) (NSHB)
    (:func:`labkit.critical.smoothing_degree`), from each row's
    ``lr``, ``batch_size`` and ``beta`` (the optimizer's default when the table has no ``beta``
    value for the row) and the estimated stochastic-gradient variance.

    Args:
        results: a table with ``optimizer``, ``lr``, ``batch_size`` (e.g. :func:`load_results`).
        c2: optimizer ("sgd", "shb", "nshb") -> C^2 estimate, e.g. the upper bounds of
            :func:`labkit.critical.c2_upper_bound`. Rows of other optimizers get NaN.
        k2: K^2 (bound on E||grad f||^2) for SHB: a number or a mapping optimizer -> K^2.

    Raises:
        ValueError: ``c2`` names an optimizer without a delta formula, or SHB is asked for
            without ``k2``.
    """
    from labkit import critical
    from labkit import optim as lk_optim

    bad = [k for k in c2 if k not in critical.OPTIMIZERS]
    if bad:
        raise ValueError(
            f"c2 has no delta formula for optimizer {bad[0]!r}; valid: "
            f"{', '.join(critical.OPTIMIZERS)}"
        )
    if "shb" in c2 and _per_optimizer(k2, "shb") is None:
        raise ValueError(
            "k2 (the bound K^2 on E||grad f||^2) is required for SHB's delta "
            "(Sato & Iiduka 2024, eq. 13);"
            " the authors' code uses K = 1.77 for ResNet-18, i.e. k2=1.77**2"
        )
    missing = sorted({"optimizer", "lr", "batch_size"} - set(results.columns))
    if missing:
        raise ValueError(f"results lacks the column(s) {', '.join(missing)}")
    out = results.copy()
    deltas = []
    for _, row in out.iterrows():
        opt = row["optimizer"]
        if opt not in c2:
            deltas.append(math.nan)
            continue
        beta = row.get("beta") if "beta" in out.columns else None
        if beta is None or (isinstance(beta, float) and math.isnan(beta)):
            beta = lk_optim.hyperparameters(opt).get("beta")
        deltas.append(float(critical.smoothing_degree(
            opt, lr=float(row["lr"]), batch_size=float(row["batch_size"]), c2=float(c2[opt]),
            beta=beta, k2=_per_optimizer(k2, opt),
        )))
    out["delta"] = deltas
    return out


SHARPNESS_FILE = "sharpness.json"
SPLITS = ("train", "test")
#: How :func:`measure_sharpness` picks its images: the first ones of the split (the authors'
#: code) or a fixed random subset.
SELECTIONS = ("first", "random")


def _run_folder(run: str | os.PathLike) -> Path:
    folder = Path(run)
    for name in ("config.json", "checkpoint.pt"):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder / name} does not exist: {folder} is not a run folder with a trained "
                "model (labkit train --out / a sweep's runs/<hash>)"
            )
    return folder


def _finished_epochs(folder: Path, what: str) -> int:
    """Epochs the run's checkpoint holds; a diverged run has no weights worth measuring."""
    status, metrics = run_state(folder)
    if status == "diverged":
        raise ValueError(f"the run in {folder} diverged (non-finite loss): its weights have no "
                         f"meaningful {what}")
    return len(metrics)


def _cached(store: Path, settings: Mapping[str, Any],
            key: str) -> tuple[list[dict[str, Any]], Any]:
    """(every record of a run's measurement file, the value stored under ``settings`` or None).

    A measurement file holds ``{"records": [{"settings": {...}, key: value}, ...]}``; the
    settings include the number of epochs the checkpoint held, so a resumed run is measured anew.
    """
    records: list[dict[str, Any]] = []
    if store.exists():
        try:
            records = list(json.loads(store.read_text()).get("records", []))
        except (json.JSONDecodeError, AttributeError):
            records = []
    found = next((r[key] for r in records if r.get("settings") == settings and key in r), None)
    return records, found


def _store(store: Path, records: list[dict[str, Any]], settings: Mapping[str, Any], key: str,
           value: Any) -> None:
    records = [r for r in records if r.get("settings") != settings]
    records.append({"settings": dict(settings), key: value})
    atomic_write_json(store, {"records": records})


def final_model(folder: Path, cfg: TrainConfig, num_classes: int, device: Any,
                in_channels: int = 3) -> Any:
    """The run's model with the weights of its last checkpoint, on ``device``.

    ``folder`` is a run folder holding ``checkpoint.pt``; ``cfg`` its resolved config.
    """
    from labkit import models as lk_models
    from labkit.train import load_checkpoint

    model = lk_models.build_model(cfg.model, num_classes, in_channels=in_channels)
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder / 'checkpoint.pt'} holds no {cfg.model} model of this run "
                         f"({type(e).__name__}); train the run again to write it") from None
    return model.to(device)


def measure_sharpness(
    run: str | os.PathLike,
    *,
    rho: float = 0.0002,
    norm: str = "linf",
    adaptive: bool = True,
    n_batches: int = 8,
    batch_size: int | None = 128,
    split: str = "train",
    selection: str = "first",
    n_iters: int = 20,
    seed: int = 0,
    device: str = "auto",
    data_root: str | None = None,
    cache: bool = True,
    stored_only: bool = False,
) -> float:
    """Adaptive sharpness of a run's last checkpoint (Sato & Iiduka (2024) §5.3; loss units).

    Rebuilds the model from the run's ``config.json`` and ``checkpoint.pt``, takes
    ``n_batches`` batches of ``batch_size`` images of ``split``, normalized like training did
    and not augmented, and calls :func:`labkit.sharpness.adaptive_sharpness` with the mean
    cross-entropy (batch norm in eval mode). The default split is ``train``: the paper defines
    the sharpness as an expectation over the training set S.

    The defaults are the measurement of the authors' code (naoki-sato3/new-sigma-nice
    ``sharpness/main.py``, lines 131-142 and 205-223, which call the loaders of
    tml-epfl/sharpness-vs-generalization with ``shuffle=False``): the *first* 1024 training
    images in file order (``selection="first"``), 8 batches of 128, rho = 0.0002, the l_inf
    ball, adaptive, 20 iterations. (Their ``--adaptive`` switch is off by default; the paper
    reports adaptive sharpness.) ``selection="random"`` takes a fixed random subset instead
    (``seed``); ``batch_size=None`` uses the run's training batch size. The batch size matters:
    the measure is an average of per-batch maxima, and smaller batches have larger maxima.

    The value is stored in ``<run>/sharpness.json`` under its settings and the number of
    epochs the checkpoint holds; ``cache=True`` returns a stored value for the same settings
    instead of measuring again. ``stored_only=True`` never measures: it returns the stored
    value, or NaN when there is none (what a stopped panel still shows).

    Raises:
        FileNotFoundError: the folder has no ``config.json`` or ``checkpoint.pt``.
        ValueError: bad settings, a diverged run, or more images asked for than the split holds.
    """
    import torch
    import torch.nn.functional as F

    from labkit import data as lk_data
    from labkit.sharpness import adaptive_sharpness
    from labkit.train import prepare_data, resolve_device

    folder = _run_folder(run)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {selection!r}")
    for name, value in (("n_batches", n_batches), ("n_iters", n_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1 or None; got {batch_size!r}")
    cfg = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    if data_root is not None:
        cfg.data_root = str(data_root)
    cfg = cfg.resolved()
    epochs = _finished_epochs(folder, "sharpness")
    bs = batch_size or cfg.batch_size
    settings = {"rho": float(rho), "norm": norm, "adaptive": bool(adaptive),
                "n_batches": n_batches, "batch_size": bs, "split": split,
                "selection": selection, "n_iters": n_iters,
                "seed": seed if selection == "random" else None, "epochs": epochs}
    store = folder / SHARPNESS_FILE
    records, found = _cached(store, settings, "sharpness")
    if (cache or stored_only) and found is not None:
        return float(found)
    if stored_only:
        return math.nan

    dev = resolve_device(device)
    data = prepare_data(cfg, dev)
    x = data.train_x if split == "train" else data.test_x
    y = data.train_y if split == "train" else data.test_y
    n = int(y.shape[0])
    if n_batches * bs > n:
        raise ValueError(
            f"n_batches * batch_size = {n_batches} * {bs} = {n_batches * bs} exceeds the {n} "
            f"images of the {split} split; lower n_batches or batch_size"
        )
    if selection == "first":
        idx = torch.arange(n_batches * bs, device=x.device)
    else:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[: n_batches * bs].to(x.device)
    xs = lk_data.normalize(x[idx], data.mean, data.std)
    ys = y[idx]
    batches = [(xs[i * bs:(i + 1) * bs], ys[i * bs:(i + 1) * bs]) for i in range(n_batches)]

    model = final_model(folder, cfg, data.num_classes, dev, int(data.train_x.shape[1]))
    value = float(adaptive_sharpness(model, lambda out, t: F.cross_entropy(out, t), batches,
                                     rho, norm=norm, adaptive=adaptive, n_iters=n_iters))
    _store(store, records, settings, "sharpness", value)
    return value


def measure_gradient_stats(
    run: str | os.PathLike,
    *,
    n_images: int = 1024,
    seed: int = 0,
    chunk_size: int = 64,
    device: str = "auto",
    data: Any = None,
    cache: bool = True,
    stored_only: bool = False,
) -> Any:
    """C^2 and ||grad f||^2 at a run's final weights (:func:`labkit.noise.gradient_variance`).

    Rebuilds the model from the run's ``config.json`` and ``checkpoint.pt`` and takes the
    per-example gradients of ``n_images`` training images (a fixed random subset, ``seed``),
    without augmentation, with batch norm in eval mode. ``c2`` is
    (1/n) sum_i ||grad f_i - grad f||^2 and ``full_grad_norm_sq`` is ||grad f||^2, both over the
    subset. Sato & Iiduka's (2024) C^2 bounds the variance at every iterate and K^2 bounds
    E||grad f(x_t)||^2, so one point gives a lower estimate of each (book chapter 8).

    The result is stored in ``<run>/gradient-stats.json`` under its settings and the number of
    epochs the checkpoint holds; with ``cache`` a stored value is returned without measuring.

    Args:
        run: the run folder.
        n_images: images of the training set to average over (>= 2).
        seed: picks the subset.
        chunk_size: images per vmapped pass (memory: chunk_size x parameters floats).
        device: "auto", "cpu" or "cuda".
        data: the run's :class:`labkit.data.CifarData` if already loaded (sweeps share it).
        cache: reuse a stored value.
        stored_only: never measure; return the stored value or None.

    Returns:
        a :class:`labkit.noise.GradientStats` (None: ``stored_only`` and nothing stored).

    Raises:
        FileNotFoundError: the folder has no ``config.json`` or ``checkpoint.pt``.
        ValueError: bad settings, a diverged run, or more images than the training set holds.
    """
    import torch
    import torch.nn.functional as F

    from labkit import data as lk_data
    from labkit import noise as lk_noise
    from labkit.train import prepare_data, resolve_device

    folder = _run_folder(run)
    for name, value, low in (("n_images", n_images, 2), ("seed", seed, 0),
                             ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    cfg = TrainConfig.from_dict(json.loads((folder / "config.json").read_text())).resolved()
    settings = {"n_images": n_images, "seed": seed,
                "epochs": _finished_epochs(folder, "gradient variance")}
    store = folder / GRADIENT_STATS_FILE
    records, found = _cached(store, settings, "stats")
    if (cache or stored_only) and found is not None:
        return lk_noise.GradientStats(**found)
    if stored_only:
        return None

    dev = resolve_device(device)
    data = prepare_data(cfg, dev) if data is None else data.to(dev)
    n = int(data.train_y.shape[0])
    if n_images > n:
        raise ValueError(f"n_images={n_images} exceeds the {n} training images of "
                         f"{cfg.dataset}; use n_images <= {n}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:n_images].to(data.train_x.device)
    x = lk_data.normalize(data.train_x[idx], data.mean, data.std)
    model = final_model(folder, cfg, data.num_classes, dev, int(data.train_x.shape[1]))
    stats = lk_noise.gradient_variance(
        model, lambda out, t: F.cross_entropy(out.float(), t, reduction="none"),
        (x, data.train_y[idx]), chunk_size=chunk_size)
    _store(store, records, settings, "stats", {
        "c2": stats.c2, "full_grad_norm_sq": stats.full_grad_norm_sq,
        "mean_sq_grad_norm": stats.mean_sq_grad_norm, "n": stats.n})
    return stats
