"""Sweeps: many :func:`labkit.train.train` runs over a grid, resumable and never recomputed.

Book: every lab (the experiments of chapters 4, 7 and 8 are grids over optimizer, learning rate,
batch size, seed and optimizer hyperparameters: the power-eta thesis Fig. 1-2, Sato & Iiduka (2024)
Fig. 4-8).

A grid *spec* is a plain dict (the CLI reads it from YAML)::

    base:                      # TrainConfig fields shared by every point
      dataset: cifar100
      profile: short
      lr: 0.1
    grid:                      # axis -> list of values; the points are the cartesian product
      optimizer: [sgd, shb, nshb]
      batch_size: [8, 16, 32]
      seed: [0, 1, 2]
      beta: [0.9]              # a hyperparameter axis (see below)
    zip:                       # axes that vary together (one mapping, or a list of them)
      lr: [0.1, 0.2]
      epochs: [10, 20]

Keys of ``grid`` and ``zip``:

- a :class:`~labkit.train.TrainConfig` field (``lr``, ``batch_size``, ``seed``, ``epochs``,
  ``lr_schedule``, ...) sets that field; an ``hparams`` axis takes dicts that are merged into
  the base's ``hparams``;
- ``hparams.NAME`` sets the optimizer hyperparameter NAME on every point; an optimizer that has
  no such hyperparameter is an error;
- a plain NAME that is a hyperparameter of at least one of the grid's optimizers (per
  :func:`labkit.optim.hyperparameters`), e.g. ``beta`` or ``eta``, sets it on the points whose
  optimizer has it and is left out of the others, so ``optimizer: [sgd, shb]`` with
  ``beta: [0.9, 0.99]`` gives three runs (the two SGD points are the same run).

Points that turn out identical (same :func:`~labkit.train.config_hash`) are run once. The
``zip`` axes of one mapping must have equal lengths; each mapping is one axis of the product.

A sweep writes each point to ``<out>/runs/<hash>/`` (a :func:`labkit.train.train` run folder)
and keeps ``<out>/index.json`` (hash -> config identity, status and summary metrics), rewritten
atomically whenever a point starts or ends, so :func:`labkit.experiments.load_results` can read
it while the sweep runs. Statuses: ``pending`` (nothing on disk), ``running``, ``stopped``
(epochs on disk, resumable), ``finished``, ``diverged`` (a non-finite loss; recorded, the sweep
goes on), ``failed`` (an exception inside training; recorded with its message, retried on
the next call) and ``damaged`` (its ``result.json`` cannot be read; the error says what to do
and the sweep goes on without it).

A grid of more than :data:`MAX_POINTS` points is refused before it is expanded (``max_points``
raises the limit). One process at a time writes into a sweep folder
(:func:`labkit.store.writing`); a second one stops with :class:`labkit.store.FolderBusyError`.

Who trains the points is the *executor*'s business (``run_sweep(..., executor=...)``): by
default :func:`local_executor`, one point after another in this process;
:class:`labkit.experiments.ray_executor.RayExecutor` runs them as tasks on a Ray cluster. Both
call :func:`run_point` for each point and report to a :class:`SweepRun`, which keeps
``index.json``: only the process that called :func:`run_sweep` writes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import data as lk_data
from labkit import optim as lk_optim
from labkit import schedules as lk_schedules
from labkit import store
from labkit.digits import N_TRAIN as N_DIGITS_TRAIN
from labkit.experiments.results import load_results
from labkit.store import INDEX_FILE, RUNS_FOLDER, SweepIndex, run_state, summarize_metrics
from labkit.train import (
    SMOKE_FOLDER,
    SMOKE_SIZES,
    Callback,
    RunResult,
    RunState,
    TrainConfig,
    config_hash,
    prepare_data,
    resolve_device,
    train,
)

__all__ = [
    "INDEX_FILE",
    "MAX_POINTS",
    "RUNS_FOLDER",
    "STATUSES",
    "Executor",
    "Grid",
    "GridError",
    "PointOutcome",
    "PointResult",
    "SweepResult",
    "SweepRun",
    "expand_grid",
    "load_spec",
    "local_executor",
    "pack_units",
    "plan_sweep",
    "run_pack",
    "run_point",
    "run_sweep",
    "summarize_metrics",
    "train_set_size",
]

STATUSES = ("pending", "running", "stopped", "finished", "diverged", "failed", "damaged")
SPEC_KEYS = ("base", "grid", "zip")
#: The largest grid (points before de-duplication) a sweep expands unless told otherwise.
MAX_POINTS = 10_000

_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Chosen by the sweep, not by the spec.
_SWEEP_OWNED = ("out",)


class GridError(ValueError):
    """A bad grid spec. ``key`` is the spec location it concerns, e.g. ``("grid", "lr")``."""

    def __init__(self, message: str, key: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- grid spec


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _optimizer_names(values: Iterable[Any]) -> set[str]:
    return {v for v in values if isinstance(v, str) and v in lk_optim.OPTIMIZER_NAMES}


def _hyperparameters(optimizer: Any) -> dict[str, Any] | None:
    """The optimizer's hyperparameters, or None for a name that is not an optimizer."""
    if not isinstance(optimizer, str) or optimizer not in lk_optim.OPTIMIZER_NAMES:
        return None
    return lk_optim.hyperparameters(optimizer)


@dataclass(frozen=True)
class _Axis:
    key: str  # as written in the spec
    kind: str  # "field", "hparam" (plain name) or "strict_hparam" (hparams.NAME)
    name: str  # the field or hyperparameter name


@dataclass
class Grid:
    """A validated grid spec (see the module docstring); ``len(grid)`` counts its raw points.

    Build one with :meth:`from_spec`; :meth:`points` lists each point's overrides,
    :meth:`configs` the resolved, de-duplicated :class:`TrainConfig` of every point.
    """

    base: dict[str, Any]
    axes: list[tuple[_Axis, list[Any]]] = field(default_factory=list)
    zips: list[list[tuple[_Axis, list[Any]]]] = field(default_factory=list)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)
    source: str | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Grid:
        """Check a spec's structure and keys (values are checked by :meth:`configs`)."""
        lines = dict(getattr(spec, "lines", {}))
        source = getattr(spec, "source", None)
        try:
            return cls._from_spec(spec, lines, source)
        except GridError as e:
            raise _located(e, lines, source) from None

    @classmethod
    def _from_spec(cls, spec: Any, lines: dict, source: str | None) -> Grid:
        if not isinstance(spec, Mapping):
            raise GridError(
                f"a grid spec must be a mapping with the keys {', '.join(SPEC_KEYS)}; "
                f"got {type(spec).__name__}"
            )
        unknown = [k for k in spec if k not in SPEC_KEYS]
        if unknown:
            raise GridError(
                f"unknown top-level key {unknown[0]!r} in the grid spec; valid keys: "
                f"{', '.join(SPEC_KEYS)}",
                (str(unknown[0]),),
            )
        base = spec.get("base") or {}
        if not isinstance(base, Mapping):
            raise GridError(
                f"base must be a mapping of TrainConfig fields; got {base!r}", ("base",)
            )
        for key in base:
            if key not in _FIELDS:
                raise GridError(
                    f"unknown key {key!r} in base: not a TrainConfig field; valid fields: "
                    f"{', '.join(_FIELDS)} (optimizer hyperparameters go in base.hparams)",
                    ("base", str(key)),
                )
            if key in _SWEEP_OWNED:
                raise GridError(
                    f"base.{key} cannot be set: the sweep puts each run in <out>/runs/<hash>",
                    ("base", key),
                )
        base = dict(base)
        if "hparams" in base:
            if not isinstance(base["hparams"], Mapping):
                raise GridError(
                    f"base.hparams must be a mapping name -> value; got {base['hparams']!r}",
                    ("base", "hparams"),
                )
            base["hparams"] = dict(base["hparams"])

        grid_spec = spec.get("grid")
        if grid_spec is None:
            grid_spec = {}
        if not isinstance(grid_spec, Mapping):
            raise GridError(
                f"grid must be a mapping axis -> list of values; got {grid_spec!r}", ("grid",)
            )
        zip_spec = spec.get("zip")
        if zip_spec is None:
            zip_groups: list[Any] = []
        elif isinstance(zip_spec, Mapping):
            zip_groups = [zip_spec]
        elif _is_list(zip_spec):
            zip_groups = list(zip_spec)
        else:
            raise GridError(
                f"zip must be a mapping axis -> list of values (or a list of such mappings); "
                f"got {zip_spec!r}",
                ("zip",),
            )
        for g, group in enumerate(zip_groups):
            if not isinstance(group, Mapping) or not group:
                raise GridError(
                    f"zip group {g + 1} must be a non-empty mapping axis -> list of values; "
                    f"got {group!r}",
                    ("zip",),
                )
        if not grid_spec and not zip_groups:
            raise GridError(
                "the grid is empty: give at least one axis under grid (e.g. grid: {lr: [0.1]}) "
                "or zip",
                ("grid",),
            )

        # The optimizers the grid can use decide which plain names are hyperparameters.
        optimizers = _optimizer_names([base.get("optimizer", TrainConfig.optimizer)])
        for mapping in [grid_spec, *zip_groups]:
            values = mapping.get("optimizer")
            if _is_list(values):
                optimizers |= _optimizer_names(values)

        seen: dict[str, str] = {}

        def axis(where: str, key: Any, values: Any) -> tuple[_Axis, list[Any]]:
            loc = (where, str(key))
            if not isinstance(key, str):
                raise GridError(f"{where} keys must be strings; got {key!r}", loc)
            if key in seen:
                raise GridError(f"axis {key!r} appears in both {seen[key]} and {where}", loc)
            seen[key] = where
            ax = _classify(key, optimizers, loc)
            if not _is_list(values):
                raise GridError(
                    f"{where}.{key} must be a list of values; got {values!r} "
                    f"(put a single value in base, e.g. base: {{{key}: {values!r}}})",
                    loc,
                )
            if not values:
                raise GridError(f"{where}.{key} is an empty list; give at least one value", loc)
            if ax.kind == "field" and ax.name == "hparams":
                for v in values:
                    if not isinstance(v, Mapping):
                        raise GridError(
                            f"{where}.hparams values must be mappings name -> value; got {v!r}",
                            loc,
                        )
            return ax, list(values)

        axes = [axis("grid", k, v) for k, v in grid_spec.items()]
        zips = []
        for group in zip_groups:
            members = [axis("zip", k, v) for k, v in group.items()]
            lengths = {ax.key: len(v) for ax, v in members}
            if len(set(lengths.values())) > 1:
                first = next(iter(lengths))
                raise GridError(
                    "zip axes must have equal lengths (they vary together); got "
                    + ", ".join(f"{k}: {n}" for k, n in lengths.items()),
                    ("zip", first),
                )
            zips.append(members)
        return cls(base=base, axes=axes, zips=zips, lines=lines, source=source)

    def __len__(self) -> int:
        n = math.prod(len(v) for _, v in self.axes)
        return n * math.prod(len(group[0][1]) for group in self.zips)

    def points(self) -> list[dict[str, Any]]:
        """Each point's overrides ``{axis key: value}``, in product order (first axis slowest)."""
        factors: list[list[dict[str, Any]]] = [
            [{ax.key: v} for v in values] for ax, values in self.axes
        ]
        for group in self.zips:
            n = len(group[0][1])
            factors.append([{ax.key: values[i] for ax, values in group} for i in range(n)])
        out = []
        for combo in itertools.product(*factors):
            point: dict[str, Any] = {}
            for part in combo:
                point.update(part)
            out.append(point)
        return out

    def _axis_by_key(self) -> dict[str, _Axis]:
        axes = {ax.key: ax for ax, _ in self.axes}
        for group in self.zips:
            axes.update({ax.key: ax for ax, _ in group})
        return axes

    def config_of(self, point: Mapping[str, Any]) -> TrainConfig:
        """The (unresolved) config of one point from :meth:`points`."""
        by_key = self._axis_by_key()
        d = dict(self.base)
        d["hparams"] = dict(d.get("hparams") or {})
        hparam_items = []
        for key, value in point.items():
            ax = by_key[key]
            if ax.kind == "field":
                if ax.name == "hparams":
                    d["hparams"].update(value)
                else:
                    d[ax.name] = value
            else:
                hparam_items.append((ax, value))
        for ax, value in hparam_items:
            accepted = _hyperparameters(d.get("optimizer", TrainConfig.optimizer))
            if ax.kind == "hparam" and accepted is not None and ax.name not in accepted:
                continue  # a plain name applies only to optimizers that have it
            d["hparams"][ax.name] = value
        return TrainConfig(**d)

    def configs(self, max_points: int | None = MAX_POINTS) -> list[TrainConfig]:
        """Every point's resolved config, validated, without duplicates, in product order.

        Raises:
            GridError: a point has an invalid value (the message names the point and the
                field, and the spec line when the spec came from :func:`load_spec`), or the
                grid has more than ``max_points`` points (None: no limit).
        """
        try:
            check_grid_size(self, max_points)
        except GridError as e:
            raise _located(e, self.lines, self.source) from None
        points = self.points()
        configs: list[TrainConfig] = []
        hashes: set[str] = set()
        for i, point in enumerate(points):
            try:
                cfg = self.config_of(point).resolved()
                h = config_hash(cfg)
            except (ValueError, TypeError) as e:
                key = _guess_axis(str(e), point, self._axis_by_key(), self.base)
                err = GridError(
                    f"grid point {i + 1} of {len(points)} ({_describe(point)}): {e}", key
                )
                raise _located(err, self.lines, self.source) from None
            if h not in hashes:
                hashes.add(h)
                configs.append(cfg)
        return configs


def check_grid_size(grid: Grid, max_points: int | None = MAX_POINTS) -> int:
    """The number of points of ``grid`` (counted from its axis lengths, nothing expanded).

    Raises:
        GridError: more than ``max_points`` (None: no limit).
    """
    if max_points is not None and (isinstance(max_points, bool)
                                   or not isinstance(max_points, int) or max_points < 1):
        raise ValueError(f"max_points must be None or an integer >= 1; got {max_points!r}")
    n = len(grid)
    if max_points is not None and n > max_points:
        sizes = [len(v) for _, v in grid.axes] + [len(g[0][1]) for g in grid.zips]
        raise GridError(
            f"the grid has {n:,} points ({' x '.join(map(str, sizes))}), more than the limit "
            f"of {max_points:,}: shrink an axis, or raise the limit (labkit sweep --max-points "
            f"N; max_points=N in Python)", ("grid",))
    return n


def _classify(key: str, optimizers: set[str], loc: tuple[str, ...]) -> _Axis:
    if key in _FIELDS:
        if key in _SWEEP_OWNED:
            raise GridError(
                f"{key} cannot be an axis: the sweep puts each run in <out>/runs/<hash>", loc
            )
        return _Axis(key, "field", key)
    accepted: set[str] = set()
    for name in optimizers:
        accepted |= set(lk_optim.hyperparameters(name))
    if key.startswith("hparams."):
        name = key[len("hparams."):]
        if not name:
            raise GridError(f"axis {key!r} names no hyperparameter (write hparams.beta)", loc)
        return _Axis(key, "strict_hparam", name)
    if key in accepted:
        return _Axis(key, "hparam", key)
    raise GridError(
        f"unknown grid key {key!r}: not a TrainConfig field ({', '.join(_FIELDS)}) nor a "
        f"hyperparameter of the grid's optimizers ({', '.join(sorted(optimizers)) or 'none'}: "
        f"{', '.join(sorted(accepted - set(_FIELDS))) or 'none'}); write hparams.{key} to set "
        "it regardless",
        loc,
    )


def _describe(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


def _guess_axis(
    message: str, point: Mapping[str, Any], axes: Mapping[str, _Axis], base: Mapping[str, Any]
) -> tuple[str, ...]:
    """The spec location a validation message is about (for its line number), if any."""
    for key in point:
        if re.search(rf"\b{re.escape(axes[key].name)}\b", message):
            return ("grid", key)  # _located also looks under zip
    for key in base:
        if re.search(rf"\b{re.escape(key)}\b", message):
            return ("base", key)
    return ()


def _located(err: GridError, lines: Mapping[tuple, int], source: str | None) -> GridError:
    """Prefix ``file:line:`` when the spec came from a file."""
    if source is None:
        return err
    line = None
    key = err.key
    while key and line is None:
        line = lines.get(key)
        if line is None and key[0] in ("grid", "zip"):
            # zip axes are recorded under ("zip", key); grid axes under ("grid", key).
            other = "zip" if key[0] == "grid" else "grid"
            line = lines.get((other, *key[1:]))
        key = key[:-1]
    where = f"{source}:{line}" if line is not None else source
    return GridError(f"{where}: {err}", err.key)


def expand_grid(spec: Mapping[str, Any] | Grid,
                max_points: int | None = MAX_POINTS) -> list[TrainConfig]:
    """The resolved, validated, de-duplicated configs of a grid spec (see the module docstring).

    Raises:
        GridError (a ValueError): an unknown key, an empty grid or axis, unequal zip lengths, a
            point whose config :meth:`TrainConfig.resolved` rejects, or more than
            ``max_points`` points (counted before anything is expanded; None: no limit).
    """
    grid = spec if isinstance(spec, Grid) else Grid.from_spec(spec)
    return grid.configs(max_points)


# --------------------------------------------------------------------------- YAML


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.1 reads 1e-3 as a string; accept the exponent form every config writer uses.
    # Copy the resolver table first: add_implicit_resolver would otherwise append to lists
    # shared with yaml.SafeLoader.
    Loader.yaml_implicit_resolvers = {
        k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


class _Spec(dict):
    """A spec dict that remembers its file and the line of each key (for error messages)."""

    lines: dict[tuple[str, ...], int]
    source: str | None


def _key_lines(node: Any, source: str, prefix: tuple[str, ...] = (), depth: int = 3) -> dict:
    import yaml

    lines: dict[tuple[str, ...], int] = {}
    if depth == 0 or not isinstance(node, yaml.MappingNode):
        if isinstance(node, yaml.SequenceNode) and prefix == ("zip",):
            for item in node.value:
                lines.update(_key_lines(item, source, prefix, depth))
        return lines
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key in seen:
            raise ValueError(
                f"{source}:{key_node.start_mark.line + 1}: duplicate key {key!r}"
                + (f" in {'.'.join(prefix)}" if prefix else "")
            )
        seen.add(key)
        lines[(*prefix, key)] = key_node.start_mark.line + 1
        lines.update(_key_lines(value_node, source, (*prefix, key), depth - 1))
    return lines


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read a grid spec from a YAML file.

    The result is a dict that remembers the file and each key's line, so that
    :func:`expand_grid` errors read ``grid.yaml:7: ...``. ``1e-3`` is read as a number.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a YAML syntax error or a duplicate key (``file:line:column: problem``), or
            a file that is not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    text = path.read_text()
    loader_cls = _yaml_loader()
    try:
        node = yaml.compose(text, Loader=loader_cls)
        data = yaml.load(text, Loader=loader_cls)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = e.problem or e.context or "invalid YAML"
        cm = e.context_mark
        if e.problem and e.context and cm is not None:
            problem += f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: YAML error: {e}") from None
    if data is None:
        raise ValueError(f"{path}: the file is empty; a grid spec needs base: and grid: mappings")
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}:1: a grid spec must be a mapping with the keys {', '.join(SPEC_KEYS)}; "
            f"the file holds a {type(data).__name__}"
        )
    spec = _Spec(data)
    spec.lines = _key_lines(node, str(path))
    spec.source = str(path)
    return spec


# --------------------------------------------------------------------------- data sets


def _data_key(cfg: TrainConfig) -> tuple[str, str, str, str]:
    root = cfg.data_root or str(lk_data.default_data_root())
    return (cfg.dataset, cfg.profile, str(root), str(resolve_device(cfg.device)))


def train_set_size(config: TrainConfig) -> int:
    """Number of training images the config's run will see.

    The smoke profile generates :data:`labkit.train.SMOKE_SIZES` images; for real data the
    set is read once (on the CPU; the loader's cache makes this fast).

    Raises:
        FileNotFoundError / labkit.data.DatasetError: the data set is missing or corrupt.
    """
    if config.dataset == "digits":  # a fixed split (labkit.digits)
        return N_DIGITS_TRAIN
    if config.profile == "smoke":
        root = Path(config.data_root) if config.data_root else lk_data.default_data_root()
        folder = root / SMOKE_FOLDER
        name = "cifar-10-batches-py" if config.dataset == "cifar10" else "cifar-100-python"
        if not (folder / name).exists():
            return SMOKE_SIZES["n_train"]
        # A smoke folder written by another tool may hold another size: read it.
        root = folder
    else:
        root = Path(config.data_root) if config.data_root else lk_data.default_data_root()
    data = lk_data.load_cifar(config.dataset, root=root, device="cpu", download=config.download)
    return int(data.train_y.shape[0])


def _max_batch_size(cfg: TrainConfig) -> int:
    return max(lk_schedules.batch_sizes(cfg.batch_schedule, cfg.batch_size, cfg.epochs))


def _check_batch_sizes(configs: Sequence[TrainConfig], sizes: Mapping[tuple, int]) -> None:
    for i, cfg in enumerate(configs):
        n = sizes[_data_key(cfg)]
        b = _max_batch_size(cfg)
        if b > n:
            grows = "" if b == cfg.batch_size else (
                f"its batch-size schedule grows b from {cfg.batch_size} to {b}, which ")
            fix = f"use batch sizes <= {n}" if not grows else (
                f"start from a smaller batch size (the schedule multiplies it by "
                f"{b / cfg.batch_size:g}) or use fewer growth stages")
            raise GridError(
                f"grid point {i + 1} of {len(configs)} (optimizer={cfg.optimizer!r}, "
                f"lr={cfg.lr!r}, batch_size={cfg.batch_size!r}): {grows}"
                f"{'exceeds' if grows else f'batch size {b} exceeds'} the "
                f"{n} training images of {cfg.dataset} (profile {cfg.profile!r}); {fix}",
                ("grid", "batch_size"),
            )


# --------------------------------------------------------------------------- the sweep


@dataclass
class PointResult:
    """One point of a sweep.

    Attributes:
        index: position in the sweep (0-based).
        hash: :func:`labkit.train.config_hash` of the config; the run folder's name.
        config: the resolved config, with ``out`` set to the run folder.
        status: one of :data:`STATUSES`.
        folder: ``<out>/runs/<hash>``.
        result: the :class:`~labkit.train.RunResult` when the point was trained or loaded.
        error: the exception text of a ``failed`` point.
        loaded: True when the point was already finished and nothing was trained.
    """

    index: int
    hash: str
    config: TrainConfig
    status: str
    folder: str
    result: RunResult | None = None
    error: str | None = None
    loaded: bool = False


@dataclass
class SweepResult:
    """What :func:`run_sweep` did. ``stopped`` is True when a stop request ended it early."""

    out: str
    points: list[PointResult]
    stopped: bool = False

    def counts(self) -> dict[str, int]:
        """Status -> number of points."""
        out: dict[str, int] = {}
        for p in self.points:
            out[p.status] = out.get(p.status, 0) + 1
        return out

    @property
    def complete(self) -> bool:
        """Every point finished or diverged."""
        return all(p.status in ("finished", "diverged") for p in self.points)

    def results(self):
        """The sweep's table (:func:`labkit.experiments.load_results` of ``out``)."""
        return load_results(self.out)


def _as_configs(spec_or_configs: Any, max_points: int | None = MAX_POINTS) -> list[TrainConfig]:
    if isinstance(spec_or_configs, (Mapping, Grid)):
        return expand_grid(spec_or_configs, max_points)
    if isinstance(spec_or_configs, TrainConfig):
        spec_or_configs = [spec_or_configs]
    if not isinstance(spec_or_configs, Iterable) or isinstance(spec_or_configs, (str, bytes)):
        raise TypeError(
            "spec_or_configs must be a grid spec (dict), a Grid or a list of TrainConfig; got "
            f"{type(spec_or_configs).__name__}"
        )
    items = list(spec_or_configs)
    if not items:
        raise GridError("the list of configs is empty; give at least one TrainConfig")
    if max_points is not None and len(items) > max_points:
        raise GridError(f"{len(items):,} configs, more than the limit of {max_points:,}; pass "
                        "max_points=N to raise it")
    configs, hashes = [], set()
    for i, cfg in enumerate(items):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"configs[{i}] must be a TrainConfig; got {type(cfg).__name__}")
        try:
            cfg = cfg.resolved()
        except ValueError as e:
            raise GridError(f"configs[{i}] ({cfg.optimizer}, lr={cfg.lr!r}): {e}") from None
        h = config_hash(cfg)
        if h not in hashes:
            hashes.add(h)
            configs.append(cfg)
    return configs


class _StopCallback(Callback):
    """Sets ``state.stop`` when the sweep's stop request is set (checked every step)."""

    step_interval = 1

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def _check(self, state: RunState) -> None:
        if self.should_stop():
            state.stop = True

    def on_run_start(self, state: RunState) -> None:
        self._check(state)

    def on_step(self, state: RunState) -> None:
        self._check(state)

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        self._check(state)


def _stop_predicate(stop_event: Any) -> Callable[[], bool]:
    if stop_event is None:
        return lambda: False
    if callable(getattr(stop_event, "is_set", None)):
        return stop_event.is_set
    if callable(stop_event):
        return lambda: bool(stop_event())
    raise TypeError(
        "stop_event must be None, an object with is_set() (e.g. threading.Event) or a "
        f"callable returning bool; got {type(stop_event).__name__}"
    )


def _state(folder: Path) -> tuple[str, list[dict[str, Any]], str | None]:
    """(status, metrics, error) of a point's run folder; ``damaged`` when its result.json
    cannot be read (the error names the file and what to do)."""
    try:
        status, metrics = run_state(folder)
    except store.DamagedFileError as e:
        return "damaged", store.read_jsonl(folder / store.METRICS_FILE), str(e)
    return status, metrics, None


def plan_sweep(
    spec_or_configs: Any, out: str | os.PathLike, *, check_data: bool = False,
    max_points: int | None = MAX_POINTS,
) -> list[PointResult]:
    """The points of a sweep and their status on disk, without training anything.

    Used by ``labkit sweep --dry-run``. With ``check_data=True`` every batch size is also
    checked against its training set (:func:`train_set_size`, which reads real data sets once).

    Raises:
        GridError: what :func:`expand_grid` raises; with ``check_data``, a batch size larger
            than the training set.
        FileNotFoundError / labkit.data.DatasetError: with ``check_data``, a missing data set.
    """
    out = store.check_folder(out, "a sweep")
    configs = _as_configs(spec_or_configs, max_points)
    if check_data:
        sizes: dict[tuple, int] = {}
        for cfg in configs:
            key = _data_key(cfg)
            if key not in sizes:
                sizes[key] = train_set_size(cfg)
        _check_batch_sizes(configs, sizes)
    index = SweepIndex(out) if (out / INDEX_FILE).exists() else None
    points = []
    for i, cfg in enumerate(configs):
        h = config_hash(cfg)
        folder = out / RUNS_FOLDER / h
        status, _, error = _state(folder)
        if index is not None and status in ("pending", "stopped"):
            stored = index.points.get(h, {})
            if stored.get("status") == "failed":
                status, error = "failed", stored.get("error")
        points.append(PointResult(i, h, cfg.relocated(out=str(folder)), status,
                                  str(folder), error=error))
    return points


def run_sweep(
    spec_or_configs: Mapping[str, Any] | Grid | Sequence[TrainConfig],
    out: str | os.PathLike,
    *,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    stop_event: Any = None,
    on_run_end: Callable[[PointResult], None] | None = None,
    pack: bool = True,
    executor: Executor | None = None,
    max_points: int | None = MAX_POINTS,
) -> SweepResult:
    """Run every point of a grid, skipping finished ones and resuming interrupted ones.

    Before anything trains, every point is validated (:func:`expand_grid`), each data set is
    loaded once per (dataset, profile, data_root, device) and every batch size is checked
    against its training set. Then the points run in order, each in ``<out>/runs/<hash>/``.

    Args:
        spec_or_configs: a grid spec dict (module docstring), a :class:`Grid`, or a list of
            :class:`~labkit.train.TrainConfig` (their ``out`` is replaced).
        out: the sweep folder (``index.json`` and ``runs/``).
        callbacks: :class:`~labkit.train.Callback` objects passed to every run (live plots).
        progress: show a bar over the points and one per run (``tqdm.auto``).
        stop_event: a stop request: a ``threading.Event`` (or anything with ``is_set()``), or a
            callable returning True to stop. It is checked before each point and after every
            optimizer step; the running point stops at once with its last finished epoch on
            disk, and the next call resumes it. A notebook's Stop button sets the event.
        on_run_end: called with each :class:`PointResult` as soon as the point is done
            (trained, loaded, stopped, diverged, failed or damaged).
        executor: what runs the points: None (the default, :func:`local_executor`) trains
            them one after another in this process; a
            :class:`labkit.experiments.ray_executor.RayExecutor` runs each one as a task on a
            Ray cluster (``callbacks`` then see only the points trained here, none). Either
            way this process alone writes ``index.json``.
        max_points: refuse a grid of more points than this (None: no limit).
        pack: train the points that share model, data set, batch-size schedule and epochs
            (and use SGD, SHB or NSHB) as packs of K runs at once
            (:func:`labkit.train_pack.train_pack`; K from the GPU's free memory, 8 on the CPU
            at batch sizes up to 16 and no packing above: :func:`labkit.train_pack.
            choose_pack_size`). Every run and its folder are what
            training it alone gives. ``False`` trains one point at a time. The adaptive
            optimizers always train one at a time.

    Returns:
        A :class:`SweepResult`; ``stopped`` is True when the stop request ended the sweep.

    Raises:
        GridError: a bad spec or a batch size larger than the training set (before any run).
        FileNotFoundError / labkit.data.DatasetError: a data set is missing.
        labkit.store.FolderBusyError (a RuntimeError): another sweep (in this process or
            another) is writing into ``out``.
        KeyboardInterrupt: re-raised after the index records the interrupted point as
            ``stopped`` (its folder is resumable).

    An exception raised inside one run (e.g. a CUDA out-of-memory error) marks that point
    ``failed`` with its message and the sweep goes on; a non-finite loss marks it ``diverged``.
    """
    should_stop = _stop_predicate(stop_event)
    configs = _as_configs(spec_or_configs, max_points)
    out = Path(out)

    # Data: loaded once per key; batch sizes checked against every set before training.
    datasets: dict[tuple, lk_data.CifarData] = {}
    for cfg in configs:
        key = _data_key(cfg)
        if key not in datasets:
            datasets[key] = prepare_data(cfg, resolve_device(cfg.device))
    _check_batch_sizes(configs, {k: int(d.train_y.shape[0]) for k, d in datasets.items()})

    with store.writing(out, "a sweep"):
        store.clean_temporary_files(out)
        return _run(configs, out, datasets, callbacks, progress, should_stop, on_run_end,
                    executor or local_executor, pack)


def _run(
    configs: list[TrainConfig],
    out: Path,
    datasets: dict[tuple, lk_data.CifarData],
    callbacks: Sequence[Callback],
    progress: bool,
    should_stop: Callable[[], bool],
    on_run_end: Callable[[PointResult], None] | None,
    executor: Executor,
    pack: bool = False,
) -> SweepResult:
    (out / RUNS_FOLDER).mkdir(parents=True, exist_ok=True)
    index = SweepIndex(out)
    previous = index.points
    index.points = {}
    points: list[PointResult] = []
    for i, cfg in enumerate(configs):
        h = config_hash(cfg)
        folder = out / RUNS_FOLDER / h
        status, metrics, error = _state(folder)
        old = previous.get(h, {})
        if status in ("pending", "stopped") and old.get("status") == "failed":
            status, error = "failed", old.get("error")
        index.set(h, i, cfg.identity(), status, metrics, error)
        points.append(PointResult(i, h, cfg.relocated(out=str(folder)), status,
                                  str(folder), error=error))
    # Entries of earlier sweeps into the same folder stay (a grid can grow).
    extra = sorted((e.get("order", 0), h) for h, e in previous.items() if h not in index.points)
    for k, (_, h) in enumerate(extra):
        index.points[h] = dict(previous[h], order=len(configs) + k)
    index.save()

    sweep = SweepRun(out=out, points=points, index=index, datasets=datasets,
                     callbacks=tuple(callbacks), progress=progress, should_stop=should_stop,
                     on_run_end=on_run_end, pack=pack)
    if progress:
        from tqdm.auto import tqdm

        sweep.bar = tqdm(total=len(points), desc="sweep", unit="run")
    try:
        for point in points:  # reported here; no executor runs a damaged point
            if point.status == "damaged":
                sweep.skipped(point)
        stopped = executor(sweep)
    finally:
        if sweep.bar is not None:
            sweep.bar.close()
    return SweepResult(out=str(out), points=points, stopped=bool(stopped))


# --------------------------------------------------------------------------- executors


@dataclass
class PointOutcome:
    """What running one point gave: its status, and its result or its error.

    Attributes:
        status: ``finished``, ``diverged``, ``stopped`` or ``failed``.
        result: the :class:`~labkit.train.RunResult` (None for a failed point).
        error: ``"ExceptionType: message"`` of a failed point.
        detail: the end of the failed point's traceback.
    """

    status: str
    result: RunResult | None = None
    error: str | None = None
    detail: str | None = None


def run_point(
    config: TrainConfig,
    *,
    data: lk_data.CifarData | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> PointOutcome:
    """Train (or load, or resume) one point in its run folder ``config.out``: the work of one
    point, the same whichever executor calls it.

    An exception inside training is caught and returned as a ``failed`` outcome (one failing
    run must not end the sweep); a KeyboardInterrupt is not caught.
    """
    try:
        result = train(config, callbacks=callbacks, progress=progress, data=data)
    except Exception as e:
        return PointOutcome("failed", error=f"{type(e).__name__}: {e}",
                            detail=traceback.format_exc(limit=-8))
    return PointOutcome(result.status, result=result)


def run_pack(
    configs: Sequence[TrainConfig],
    *,
    data: lk_data.CifarData | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> list[PointOutcome]:
    """Train points together as one pack (:func:`labkit.train_pack.train_pack`): each run and
    its folder are what training it alone gives. If the pack raises (e.g. out of memory), the
    points train one at a time with :func:`run_point`, so that a point's error is its own.
    """
    from labkit.train_pack import train_pack

    try:
        results = train_pack(configs, callbacks, progress=progress, data=data)
    except Exception:
        return [run_point(c, data=data, callbacks=callbacks, progress=progress) for c in configs]
    return [PointOutcome(r.status, result=r) for r in results]


@dataclass
class SweepRun:
    """One call of :func:`run_sweep` as an executor sees it: the points and the driver's
    bookkeeping.

    An executor runs ``points`` (any order, anywhere) and reports each through
    :meth:`started`, :meth:`finished` or :meth:`interrupted`, which keep ``index.json``, the
    progress bar and ``on_run_end`` up to date: only the process that called
    :func:`run_sweep` writes the index.
    """

    out: Path
    points: list[PointResult]
    index: SweepIndex
    datasets: dict[tuple, lk_data.CifarData]
    callbacks: tuple[Callback, ...]
    progress: bool
    should_stop: Callable[[], bool]
    on_run_end: Callable[[PointResult], None] | None = None
    pack: bool = False
    bar: Any = None
    running: set[str] = field(default_factory=set)

    def data_for(self, config: TrainConfig) -> lk_data.CifarData:
        """The data set of a point, loaded once on this process's device."""
        return self.datasets[_data_key(config)]

    def _save(self, point: PointResult, status: str, error: str | None = None) -> None:
        self.index.set(point.hash, point.index, point.config.identity(), status,
                       _state(Path(point.folder))[1], error)
        self.index.save()

    def _postfix(self, last: str | None = None) -> None:
        if self.bar is None:
            return
        failed = sum(p.status == "failed" for p in self.points if p.hash not in self.running)
        extra = {"last": last} if last else {}
        self.bar.set_postfix(running=len(self.running), failed=failed, **extra)

    def started(self, point: PointResult) -> None:
        """The point has started training: ``running`` in the index."""
        self.running.add(point.hash)
        self._save(point, "running")
        self._postfix()

    def finished(self, point: PointResult, outcome: PointOutcome) -> None:
        """The point is done (trained, loaded, stopped, diverged or failed)."""
        self.running.discard(point.hash)
        point.status, point.error = outcome.status, outcome.error
        if outcome.result is not None:
            point.result, point.loaded = outcome.result, outcome.result.loaded
            self.index.set(point.hash, point.index, point.config.identity(), outcome.status,
                           outcome.result.metrics)
            self.index.save()
        else:
            error = outcome.error if outcome.detail is None else (
                f"{outcome.error}\n{outcome.detail}")
            self._save(point, outcome.status, error)
        if self.bar is not None:
            self.bar.update(1)
        self._postfix(point.status)
        if self.on_run_end is not None:
            self.on_run_end(point)

    def skipped(self, point: PointResult) -> None:
        """The point is not run (a damaged ``result.json``): counted and reported as done."""
        if self.bar is not None:
            self.bar.update(1)
        self._postfix(point.status)
        if self.on_run_end is not None:
            self.on_run_end(point)

    def interrupted(self, point: PointResult) -> None:
        """The point was cut short (Ctrl-C, a cancelled task): its status is what its folder
        holds, ``stopped`` (resumable from its last checkpoint), ``pending`` (no epoch
        finished) or ``finished`` (it ended as it was cut)."""
        self.running.discard(point.hash)
        point.status = _state(Path(point.folder))[0]
        self._save(point, point.status)


#: An executor runs a sweep's points and returns True when a stop request ended it early.
Executor = Callable[[SweepRun], bool]


def local_executor(sweep: SweepRun) -> bool:
    """Run the points in this process, in order: one at a time, or as packs of runs trained
    together (:func:`pack_units`, when ``run_sweep(pack=True)``; the default executor).

    Finished points are loaded from disk; the stop request is checked before each unit and
    after every optimizer step; Ctrl-C records the running points as resumable and re-raises.
    """
    stop_cb = _StopCallback(sweep.should_stop)
    callbacks = (*sweep.callbacks, stop_cb)
    points = [p for p in sweep.points if p.status != "damaged"]  # reported by run_sweep
    for unit, packed in pack_units(points, sweep.datasets, sweep.pack):
        if sweep.should_stop():
            return True
        for point in unit:
            if point.status not in ("finished", "diverged"):
                sweep.started(point)
        data = sweep.data_for(unit[0].config)
        try:
            if packed:
                outcomes = run_pack([p.config for p in unit], data=data, callbacks=callbacks,
                                    progress=sweep.progress)
            else:
                outcomes = [run_point(unit[0].config, data=data, callbacks=callbacks,
                                      progress=sweep.progress)]
        except KeyboardInterrupt:
            for point in unit:
                sweep.interrupted(point)
            raise
        for point, outcome in zip(unit, outcomes, strict=True):
            sweep.finished(point, outcome)
        if any(point.status == "stopped" for point in unit):
            return True
    return False




# --------------------------------------------------------------------------- packs


def pack_units(
    points: Sequence[PointResult], datasets: Mapping[tuple, lk_data.CifarData], pack: bool
) -> list[tuple[list[PointResult], bool]]:
    """The order in which :func:`run_sweep` trains its points: ``(points, packed)`` pairs, one
    point trained alone by :func:`labkit.train.train` (or loaded), or a pack of points trained
    together by :func:`labkit.train_pack.train_pack`.

    A pack holds points to train that share :func:`labkit.train_pack.pack_key`, at most
    :func:`labkit.train_pack.choose_pack_size` of them (on the CPU only at small batch sizes);
    it takes the place of its first point. On CUDA a packable point without company is a pack
    of one, for its CUDA-graph steps.
    """
    if not pack:
        return [([p], False) for p in points]
    from labkit.train_pack import choose_pack_size, pack_key

    groups: dict[tuple, list[PointResult]] = {}
    units: list[list[PointResult]] = []
    for p in points:
        key = pack_key(p.config) if p.status not in ("finished", "diverged") else None
        if key is None:
            units.append([p])
            continue
        if key not in groups:
            groups[key] = []
            units.append(groups[key])
        groups[key].append(p)
    out: list[tuple[list[PointResult], bool]] = []
    for unit in units:
        cfg = unit[0].config
        if len(unit) == 1:
            alone = pack_key(cfg) is None or unit[0].status in ("finished", "diverged")
            out.append((unit, not alone and resolve_device(cfg.device).type == "cuda"))
            continue
        k = choose_pack_size(cfg, datasets.get(_data_key(cfg)), len(unit))
        on_cuda = resolve_device(cfg.device).type == "cuda"
        out.extend((unit[i:i + k], k > 1 or on_cuda) for i in range(0, len(unit), k))
    return out
