"""One training run: the fast CIFAR loop, its run folder, checkpoints and callbacks.

Every lab experiment is a set of calls to :func:`train`. The loop follows airbench
(Keller Jordan, 2024) in spirit: the whole data set lives on the device as one tensor,
augmentation runs on the device on whole batches, and the per-step metrics are accumulated
in device tensors that are read once per epoch, so a step never waits for the host. None of
this changes the mathematics of the optimizer: a step is ``loss.backward(); optimizer.step()``
on the mean mini-batch loss, exactly as in the papers the book follows (chapter 3, eq. (3.1)).

A run folder holds

- ``config.json``: the :class:`TrainConfig` that defines the run;
- ``metrics.jsonl``: one JSON object per finished epoch;
- ``checkpoint.pt``: model, optimizer, schedule position and every RNG state, written
  atomically after each epoch;
- ``grad-norms.f32``: with ``track_grad_norm``, the mini-batch gradient norm of every step of
  the finished epochs (:func:`labkit.store.read_grad_norms`; the critical batch size of
  chapter 8 is measured from it);
- ``result.json``: written once, when the run has ``finished`` or ``diverged``.

(:mod:`labkit.store` reads and writes these files.)

Calling :func:`train` again on the same folder resumes after the last finished epoch (on the
CPU the numbers are bit-for-bit those of an uninterrupted run) or, when ``result.json``
exists, returns the stored result without training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit import data as lk_data
from labkit import digits as lk_digits
from labkit import models as lk_models
from labkit import optim as lk_optim
from labkit import schedules as lk_schedules
from labkit import store
from labkit.precision import autocast_dtype, strict_fp32
from labkit.store import RUN_FILES, atomic_write_json  # noqa: F401  (part of this module's API)

PROFILES = ("smoke", "cpu", "short", "paper")
PRECISIONS = ("auto", "fp32", "bf16", "fp64")
DATASETS = ("cifar10", "cifar100", "digits")

#: Defaults a profile fills in for the fields left as ``None`` in a :class:`TrainConfig`.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    # CPU-friendly: generated CIFAR-format data, the tiny CNN, a few hundred images.
    "smoke": {"model": "tiny", "epochs": 4, "batch_size": 64},
    # CPU, minutes: real data that ships with scikit-learn (the 8x8 handwritten digits,
    # labkit.digits) and the small CNN made for them.
    "cpu": {"model": None, "epochs": 30, "batch_size": 64},
    # One GPU, minutes: the paper's model on the real data, few epochs.
    "short": {"model": None, "epochs": 15, "batch_size": 128},
    # The seeds' full scale.
    "paper": {"model": None, "epochs": 200, "batch_size": 128},
}
#: The model each paper trains on each data set (the power-eta thesis: ResNet-44 on CIFAR-10;
#: Sato & Iiduka (2023, 2024): ResNet-18 on CIFAR-100).
PAPER_MODEL = {"cifar10": "resnet44", "cifar100": "resnet18"}
#: The model a run gets when its profile names none: the paper's on CIFAR, on the digits the CNN
#: with one input channel (:class:`labkit.models.TinyCNN`).
DEFAULT_MODEL = {**PAPER_MODEL, "digits": "tiny"}
#: The data set of the cpu profile (it trains on nothing else).
CPU_DATASET = "digits"
#: The largest random rotation (degrees) of each paper's augmentation, what ``rotate=None``
#: resolves to when ``augment`` is on. Sato & Iiduka's code rotates its CIFAR-100 training images
#: by a uniform angle in [-15, 15] degrees after the crop and the flip
#: (``transforms.RandomRotation(15)``: naoki-sato3/new-sigma-nice ``cifar.py`` line 91 and
#: ``sharpness/main.py`` line 160, naoki-sato3/sigma-nice-momentum ``main.py`` line 167); the
#: articles do not mention it. The power-eta thesis's CIFAR-10 runs are not published; labkit
#: does not rotate them (crop and flip only, the usual recipe of He et al. 2016).
PAPER_ROTATION = {"cifar10": 0.0, "cifar100": 15.0, "digits": 0.0}
#: The crop padding (pixels) and the horizontal flip of ``augment`` per data set: CIFAR's
#: 4-pixel crops and flips; on the 8x8 digits shifts of one pixel and no mirror image
#: (:mod:`labkit.digits`).
AUGMENTATION = {"cifar10": (4, True), "cifar100": (4, True),
                "digits": (lk_digits.AUGMENT_PAD, lk_digits.AUGMENT_FLIP)}
#: Size of the generated data set of the smoke profile.
SMOKE_SIZES = {"n_train": 512, "n_test": 256}
SMOKE_FOLDER = "labkit-smoke"

# Fields that name where things are, not what is computed: they do not change a run's identity.
_NON_IDENTITY_FIELDS = ("out", "data_root", "download")
# Fields added after runs were first stored, with the value that reproduces what labkit did
# before them. A stored config without the field had that value, and an identity leaves the
# field out at that value, so the hashes (sweep folder names) of those runs do not change.
_ADDED_FIELDS: dict[str, Any] = {"rotate": 0.0}


@dataclass
class TrainConfig:
    """Everything that defines one training run.

    Fields left as ``None`` are filled in from the profile (:data:`PROFILE_DEFAULTS`).

    Attributes:
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"digits"`` (scikit-learn's 8x8 handwritten
            digits, :mod:`labkit.digits`; the only data set of the ``cpu`` profile).
        model: a name from :data:`labkit.models.MODEL_NAMES`; ``None`` picks the profile's
            (``tiny`` for ``smoke``, :data:`DEFAULT_MODEL` of the data set otherwise: the
            paper's model on CIFAR, ``tiny`` on the digits).
        optimizer: a name from :data:`labkit.optim.OPTIMIZER_NAMES`.
        lr: initial learning rate (the ``eta`` of the book; chapter 3).
        batch_size: initial batch size ``b`` (examples per step).
        epochs: number of passes over the training set.
        hparams: further optimizer hyperparameters, e.g. ``{"beta": 0.9}`` or ``{"eta": 3}``.
        weight_decay: coupled L2 weight decay added to the gradient (torch's convention).
        lr_schedule: a :mod:`labkit.schedules` learning-rate spec, e.g.
            ``{"kind": "step", "every": 40, "factor": 0.7071}``; ``None`` is constant.
        batch_schedule: a :mod:`labkit.schedules` batch-size spec; ``None`` is constant.
        seed: seeds the model's initialization, the shuffling and the augmentation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"auto"`` (bf16 autocast on CUDA with fp32 weights, fp32 on the CPU),
            ``"fp32"`` (IEEE fp32 everywhere, TF32 off: :mod:`labkit.precision`; the
            measurement runs of chapter 8 use it), ``"bf16"`` or ``"fp64"`` (weights, inputs
            and loss in float64, no autocast: what the exactness tests of packed runs use).
        channels_last: use the channels-last memory format; ``None`` means on CUDA only.
        compile: wrap the model in ``torch.compile``.
        augment: random crop (4-pixel padding) and horizontal flip of training images
            (on the digits: 1-pixel shifts, no flip; :data:`AUGMENTATION`).
        rotate: then rotate each training image by a uniform random angle in
            [-rotate, rotate] degrees (:func:`labkit.data.random_rotate`: torchvision's
            ``RandomRotation`` defaults, nearest neighbour, black corners); ``0`` turns it off.
            ``None`` picks the papers' recipe for the data set when ``augment`` is on
            (:data:`PAPER_ROTATION`: 15 on CIFAR-100, 0 on CIFAR-10), and 0 when it is off.
        track_grad_norm: record the mean mini-batch gradient norm of each epoch, and (with
            ``out``) the norm of every step in ``grad-norms.f32``.
        data_root: folder holding ``cifar-10-batches-py`` / ``cifar-100-python``; ``None``
            means ``$LABKIT_DATA`` or ``~/.cache/labkit/data``.
        download: fetch CIFAR with torchvision's verified download when it is missing.
        out: the run folder; ``None`` keeps everything in memory.
        profile: ``"smoke"``, ``"cpu"``, ``"short"`` or ``"paper"``.
    """

    dataset: str = "cifar10"
    model: str | None = None
    optimizer: str = "sgd"
    lr: float = 0.1
    batch_size: int | None = None
    epochs: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.0
    lr_schedule: dict[str, Any] | None = None
    batch_schedule: dict[str, Any] | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    augment: bool = True
    rotate: float | None = None
    track_grad_norm: bool = True
    data_root: str | None = None
    download: bool = False
    out: str | None = None
    profile: str = "short"

    def resolved(self) -> ResolvedConfig:
        """A copy with the profile's defaults filled in and every field checked.

        The copy is a :class:`ResolvedConfig`: :func:`config_hash`, the sweep index,
        ``plan_sweep``, ``run_sweep`` and :func:`train` take it without checking it again (its
        ``resolved()`` is itself).

        Raises:
            ValueError: a field has a value outside its valid range (the message names the
                field, the value and what would be valid).
        """
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {self.profile!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if self.profile == "cpu" and self.dataset != CPU_DATASET:
            raise ValueError(
                f"the cpu profile trains on dataset={CPU_DATASET!r} (scikit-learn's handwritten "
                f"digits); got dataset={self.dataset!r}: use dataset={CPU_DATASET!r} or another "
                "profile"
            )
        defaults = PROFILE_DEFAULTS[self.profile]
        cfg = TrainConfig(**{**_field_values(self), "hparams": dict(self.hparams)})
        if cfg.model is None:
            cfg.model = defaults["model"] or DEFAULT_MODEL[cfg.dataset]
        if cfg.epochs is None:
            cfg.epochs = defaults["epochs"]
        if cfg.batch_size is None:
            cfg.batch_size = defaults["batch_size"]
        if cfg.model not in lk_models.MODEL_NAMES:
            raise ValueError(
                f"model must be one of {', '.join(lk_models.MODEL_NAMES)}; got {cfg.model!r}"
            )
        if cfg.optimizer not in lk_optim.OPTIMIZER_NAMES:
            raise ValueError(
                f"optimizer must be one of {', '.join(lk_optim.OPTIMIZER_NAMES)}; "
                f"got {cfg.optimizer!r}"
            )
        _check_number("lr", cfg.lr, "a positive finite number", lambda v: v > 0)
        _check_int("batch_size", cfg.batch_size, 1)
        _check_int("epochs", cfg.epochs, 1)
        _check_int("seed", cfg.seed, 0)
        _check_number("weight_decay", cfg.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        if cfg.rotate is None:
            cfg.rotate = PAPER_ROTATION[cfg.dataset] if cfg.augment else 0.0
        _check_number("rotate", cfg.rotate, "None or a number of degrees in [0, 180]",
                      lambda v: 0 <= v <= 180)
        cfg.rotate = float(cfg.rotate)
        if cfg.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {cfg.precision!r}"
            )
        resolve_device(cfg.device)  # raises on a malformed or unavailable device
        cfg.lr_schedule = lk_schedules.validate_lr_schedule(cfg.lr_schedule)
        cfg.batch_schedule = lk_schedules.validate_batch_schedule(cfg.batch_schedule)
        # Build the optimizer on a dummy parameter so that bad hyperparameters fail here,
        # before any data is loaded.
        make_optimizer(cfg, [nn.Parameter(torch.zeros(1))])
        return ResolvedConfig.from_checked(cfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Read back a config written by :meth:`to_dict` (a run's ``config.json``).

        A field the dict lacks was added to labkit after the dict was written; it gets the
        value that reproduces what labkit did then (``rotate=0``: no rotation).
        """
        d = {**_ADDED_FIELDS, **d}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the numbers a run produces (not where files are)."""
        d = self.resolved().to_dict()
        for k in _NON_IDENTITY_FIELDS:
            d.pop(k)
        for k, before in _ADDED_FIELDS.items():
            if d[k] == before:
                d.pop(k)
        return d


def _field_values(cfg: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}


@dataclass
class ResolvedConfig(TrainConfig):
    """A :class:`TrainConfig` whose defaults are filled in and whose fields are checked.

    Made by :meth:`TrainConfig.resolved` (or by constructing it: the check runs in
    ``__post_init__``, so ``dataclasses.replace`` of a resolved config checks the new values).
    The fields that decide the numbers are read-only; ``out``, ``data_root`` and ``download``
    (where things are) may be set, or changed in a copy with :meth:`relocated`, unchecked.
    """

    def __post_init__(self) -> None:
        # Built directly or by dataclasses.replace: check (from_checked skips this).
        checked = TrainConfig.resolved(self)
        for name, value in _field_values(checked).items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_sealed", True)

    @classmethod
    def from_checked(cls, cfg: TrainConfig) -> ResolvedConfig:
        """``cfg``'s values as a ResolvedConfig, trusted: only :meth:`TrainConfig.resolved`,
        which has just checked them, should call this."""
        new = object.__new__(cls)
        for name, value in _field_values(cfg).items():
            object.__setattr__(new, name, value)
        object.__setattr__(new, "_sealed", True)
        return new

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_sealed", False) and name not in _NON_IDENTITY_FIELDS:
            raise AttributeError(
                f"a resolved TrainConfig is read-only (field {name!r}); use "
                f"dataclasses.replace(config, {name}=...), which checks the new value"
            )
        object.__setattr__(self, name, value)

    def resolved(self) -> ResolvedConfig:
        """Itself: it is already checked."""
        return self

    def relocated(self, **where: Any) -> ResolvedConfig:
        """A copy with ``out``, ``data_root`` or ``download`` changed (nothing re-checked)."""
        bad = sorted(set(where) - set(_NON_IDENTITY_FIELDS))
        if bad:
            raise ValueError(
                f"relocated() changes only {', '.join(_NON_IDENTITY_FIELDS)}; got "
                f"{', '.join(bad)} (use dataclasses.replace for the others)"
            )
        new = copy.copy(self)
        object.__setattr__(new, "hparams", dict(self.hparams))
        for k, v in where.items():
            object.__setattr__(new, k, v)
        return new


def config_hash(config: TrainConfig, length: int = 12) -> str:
    """A short stable hash of the config's identity (used to name sweep folders)."""
    blob = json.dumps(config.identity(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _check_number(name: str, value: Any, valid: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {valid}; got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {valid}; got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; anything else is checked."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}")
    return dev


def make_optimizer(config: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer a config asks for, built with :func:`labkit.optim.build`."""
    hp = dict(config.hparams)
    if config.weight_decay:
        hp["weight_decay"] = config.weight_decay
    return lk_optim.build(config.optimizer, params, lr=config.lr, **hp)


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        status: ``"finished"``, ``"diverged"`` (a NaN/inf loss) or ``"stopped"`` (a callback
            asked to stop; the folder is resumable).
        config: the resolved config, as a dict.
        metrics: one dict per finished epoch (see :func:`train` for the keys).
        out: the run folder, if any.
        resumed_from: the number of epochs that were loaded from a checkpoint.
        loaded: True when the run was already finished and nothing was trained.
    """

    status: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    out: str | None = None
    resumed_from: int = 0
    loaded: bool = False

    @property
    def final(self) -> dict[str, Any]:
        """The metrics of the last finished epoch (empty if none finished)."""
        return dict(self.metrics[-1]) if self.metrics else {}

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "epochs_completed": len(self.metrics),
            "final": self.final,
            "config": self.config,
            "metrics": self.metrics,
        }


def load_run(folder: str | os.PathLike) -> RunResult:
    """Read a finished (or diverged) run folder without training.

    The metrics are those of ``result.json`` (a ``metrics.jsonl`` that disagrees is reported
    with a warning).

    Raises:
        FileNotFoundError: the folder has no ``result.json`` (it never finished).
        labkit.store.DamagedFileError (a ValueError): its ``result.json`` is damaged.
    """
    folder = Path(folder)
    res = folder / "result.json"
    if not res.exists():
        raise FileNotFoundError(
            f"{res} does not exist: the run in {folder} has not finished "
            "(call labkit.train on its config to start or resume it)"
        )
    status, metrics = store.run_state(folder)
    stored = store.read_result(folder) or {}
    return RunResult(
        status=status,
        config=stored.get("config") or json.loads((folder / store.CONFIG_FILE).read_text()),
        metrics=metrics,
        out=str(folder),
        loaded=True,
    )


class Callback:
    """Hooks into a run. Subclass and override what you need.

    ``step_interval``: call :meth:`on_step` every that many optimizer steps (``0``: never).
    Set ``state.stop = True`` from any hook to end the run after the current step; the run
    folder stays resumable (status ``"stopped"``).
    """

    step_interval: int = 0

    def on_run_start(self, state: RunState) -> None:
        """Called once before the first epoch that will be trained."""

    def on_step(self, state: RunState) -> None:
        """Called after ``optimizer.step()``; ``state.loss`` and ``state.grad_norm`` are
        device tensors (reading them is a host sync, so keep the interval large)."""

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        """Called after each finished epoch with that epoch's metrics."""

    def on_run_end(self, state: RunState, result: RunResult) -> None:
        """Called once at the end, whatever the status."""


@dataclass
class RunState:
    """The live state of a run, handed to callbacks."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    n_train: int
    epoch: int = 0
    step: int = 0
    lr: float = 0.0
    batch_size: int = 0
    steps_per_epoch: int = 0
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False


# --------------------------------------------------------------------------- files


def _atomic_torch_save(path: Path, obj: Any) -> None:
    store.atomic_replace(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------- the loop


def prepare_data(config: TrainConfig, device: torch.device) -> lk_data.CifarData:
    """Load the config's data set onto the device (generating it for the smoke profile).

    Raises:
        FileNotFoundError / labkit.data.DatasetError: CIFAR is missing or corrupt.
        ImportError: the digits were asked for and scikit-learn is not installed.
    """
    if config.dataset == "digits":
        return lk_digits.load_digits(device)
    root = Path(config.data_root) if config.data_root else lk_data.default_data_root()
    if config.profile == "smoke":
        root = root / SMOKE_FOLDER
        lk_data.ensure_fake_cifar(root, name=config.dataset, seed=0, **SMOKE_SIZES)
    return lk_data.load_cifar(config.dataset, root=root, device=device, download=config.download)


def rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every RNG state a checkpoint keeps: the run's data generator and the global ones."""
    state: dict[str, Any] = {
        "data_generator": gen.get_state(),
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    gen.set_state(state["data_generator"])
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_images(cfg: TrainConfig, train_x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One epoch's augmented training images (uint8, like ``train_x``), drawn from ``gen``
    (the data set's augmentation, :data:`AUGMENTATION`)."""
    pad, flip = AUGMENTATION[cfg.dataset]
    x = lk_data.augment(train_x, gen, pad, flip) if cfg.augment else train_x
    if cfg.rotate:  # no random draws at 0: runs without rotation are what they were
        x = lk_data.random_rotate(x, gen, cfg.rotate)
    return x


def run_dtypes(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, input dtype) of a run: float64 for ``precision="fp64"``; else fp32
    weights and fp32 inputs, bf16 inputs under bf16 autocast on CUDA."""
    if cfg.precision == "fp64":
        return torch.float64, torch.float64
    amp = autocast_dtype(cfg.precision, device)
    return torch.float32, (torch.bfloat16 if amp is torch.bfloat16 and device.type == "cuda"
                           else torch.float32)


def _evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: dict[str, Any],
    batch_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number correct over (x, y), as device tensors (no host sync)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    with torch.no_grad(), torch.autocast(**autocast):
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i : i + batch_size])
            out = out.double() if out.dtype == torch.float64 else out.float()
            yb = y[i : i + batch_size]
            loss_sum += F.cross_entropy(out, yb, reduction="sum").double()
            correct += (out.argmax(1) == yb).sum()
    return loss_sum, correct


def train(
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    progress: bool = True,
    data: lk_data.CifarData | None = None,
) -> RunResult:
    """Train one run, resuming or loading it when its folder already holds it.

    Args:
        config: the run (see :class:`TrainConfig`).
        callbacks: objects with :class:`Callback`'s hooks (live plots, early stopping, ...).
        progress: show a ``tqdm.auto`` bar (a widget in notebooks, text in a terminal).
        data: a data set already on the device (sweeps load it once for many runs).

    Returns:
        A :class:`RunResult`. Its ``metrics`` rows have the keys ``epoch`` (1-based),
        ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (accuracies in [0, 1]),
        ``lr``, ``batch_size``, ``steps`` (optimizer steps in the epoch), ``total_steps``,
        ``grad_norm`` (mean mini-batch gradient norm of the epoch, or None) and ``time``
        (wall seconds of the epoch, evaluation included).

    Raises:
        ValueError: invalid config, or a folder that holds a different run.
        FileNotFoundError / labkit.data.DatasetError: the data set is missing or corrupt.
        labkit.store.FolderBusyError: another process is writing into ``out``.
    """
    cfg = config.resolved()
    if not cfg.out:
        return _train(cfg, callbacks, progress, data)
    with store.writing(cfg.out, "a run"):
        # Left by a writer killed while it replaced a file; no other writer is here now.
        store.clean_temporary_files(cfg.out)
        return _train(cfg, callbacks, progress, data)


def _train(
    cfg: TrainConfig,
    callbacks: Sequence[Callback],
    progress: bool,
    data: lk_data.CifarData | None,
) -> RunResult:
    """:func:`train` of a resolved config, holding the folder's writer lock."""
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        stored = _check_folder(out, cfg)
        if stored is not None:
            return stored

    device = resolve_device(cfg.device)
    if data is None:
        data = prepare_data(cfg, device)
    else:
        data = data.to(device)
    n_train = int(data.train_x.shape[0])
    max_b = max(
        lk_schedules.batch_size_at(cfg.batch_schedule, cfg.batch_size, e, cfg.epochs)
        for e in range(cfg.epochs)
    )
    if max_b > n_train:
        raise ValueError(
            f"batch_size {max_b} (the largest of the run's batch-size schedule) exceeds the "
            f"{n_train} training images of {cfg.dataset}; use a batch size <= {n_train}"
        )

    use_cuda = device.type == "cuda"
    channels_last = use_cuda if cfg.channels_last is None else cfg.channels_last
    amp_dtype = autocast_dtype(cfg.precision, device)
    autocast = {
        "device_type": device.type,
        "dtype": amp_dtype or torch.bfloat16,  # ignored when disabled
        "enabled": amp_dtype is not None,
    }
    param_dtype, in_dtype = run_dtypes(cfg, device)

    torch.manual_seed(cfg.seed)
    model = lk_models.build_model(cfg.model, data.num_classes,
                                  in_channels=int(data.train_x.shape[1])).to(device, param_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    forward = torch.compile(model) if cfg.compile else model

    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    # Training images stay uint8 on the device. At the start of each epoch the whole set is
    # cropped and flipped (independently per image; black padding), rotated when cfg.rotate > 0
    # (Sato & Iiduka's CIFAR-100 recipe) and normalized in a handful of kernels, airbench-style,
    # so a step only gathers its batch.
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    train_y, test_y = data.train_y, data.test_y
    test_x = lk_data.normalize(data.test_x, data.mean, data.std, dtype=in_dtype)
    test_x = test_x.contiguous(memory_format=memory_format)

    def epoch_inputs() -> torch.Tensor:
        x = epoch_images(cfg, data.train_x, gen)
        x = lk_data.normalize(x, data.mean, data.std, dtype=in_dtype)
        return x.contiguous(memory_format=memory_format)

    state = RunState(cfg, model, optimizer, device, n_train)
    metrics: list[dict[str, Any]] = []
    resumed_from = 0
    if out is not None:
        metrics, state.step = open_run_folder(out, cfg, model, optimizer, gen, device, amp_dtype)
        resumed_from = len(metrics)
    state.metrics = metrics
    # The per-step gradient-norm log covers exactly the checkpoint's steps; none is kept for a
    # run resumed from a checkpoint trained without it (an incomplete log would mislead).
    log_norms = (out is not None and cfg.track_grad_norm
                 and store.keep_grad_norms(out, state.step))
    state.epoch = len(metrics)

    for cb in callbacks:
        cb.on_run_start(state)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.epochs,
            initial=len(metrics),
            desc=f"{cfg.optimizer} lr={cfg.lr:g}",
            unit="epoch",
            leave=False,
        )

    status = "finished"
    step_cbs = [cb for cb in callbacks if cb.step_interval > 0]
    # cuDNN picks the fastest convolution algorithm per shape (restored afterwards).
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = use_cuda or cudnn_benchmark
    settings = ExitStack()
    try:
        if amp_dtype is None:  # IEEE fp32 (TF32 off), as the measurements of chapter 8 need
            settings.enter_context(strict_fp32())
        for epoch in range(len(metrics), cfg.epochs):
            t0 = time.perf_counter()
            state.epoch = epoch
            lr_mult = lk_schedules.lr_at(cfg.lr_schedule, 1.0, epoch, cfg.epochs)
            b = lk_schedules.batch_size_at(cfg.batch_schedule, cfg.batch_size, epoch, cfg.epochs)
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base * lr_mult
            state.lr, state.batch_size = cfg.lr * lr_mult, b
            state.steps_per_epoch = math.ceil(n_train / b)

            model.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            gnorm_sum = torch.zeros((), device=device, dtype=torch.float64)
            step_norms = torch.empty(state.steps_per_epoch if log_norms else 0, device=device)
            steps = 0
            train_x = epoch_inputs()
            for idx in lk_data.iterate_batches(n_train, b, gen):
                xb, yb = train_x[idx], train_y[idx]
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(**autocast):
                    out_b = forward(xb)
                    logits = out_b.double() if out_b.dtype == torch.float64 else out_b.float()
                    loss = F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.track_grad_norm:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    state.grad_norm = torch.linalg.vector_norm(
                        torch.stack(torch._foreach_norm(grads))
                    )
                    gnorm_sum += state.grad_norm.double()
                    if log_norms:
                        step_norms[steps] = state.grad_norm
                optimizer.step()
                loss_sum += loss.detach().double() * yb.shape[0]
                correct += (out_b.detach().argmax(1) == yb).sum()
                steps += 1
                state.step += 1
                state.loss = loss.detach()
                for cb in step_cbs:
                    if state.step % cb.step_interval == 0:
                        cb.on_step(state)
                if state.stop:
                    break
            if state.stop and steps < state.steps_per_epoch:
                status = "stopped"
                break

            test_loss, test_correct = _evaluate(model, test_x, test_y, autocast)
            # The one host sync of the epoch.
            sums = torch.stack(
                [loss_sum, correct.double(), test_loss, test_correct.double(), gnorm_sum]
            ).tolist()
            row = epoch_row(cfg, epoch, sums, n_train, int(test_y.shape[0]), state.lr, b, steps,
                            state.step, time.perf_counter() - t0)
            diverged = bool(row.get("diverged"))
            metrics.append(row)
            if out is not None:
                save_epoch(out, cfg, row, metrics, model.state_dict(), optimizer.state_dict(),
                           rng_state(gen, device), step_norms.cpu().numpy() if log_norms else None,
                           amp_dtype)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3g}" if not diverged else "nan",
                                test_acc=f"{(row['test_acc'] or 0):.3f}")
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            if diverged:
                status = "diverged"
                break
            if state.stop and epoch + 1 < cfg.epochs:
                status = "stopped"
                break
    finally:
        settings.close()
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if bar is not None:
            bar.close()

    result = finish_run(cfg, status, metrics, out, resumed_from)
    for cb in callbacks:
        cb.on_run_end(state, result)
    return result


def open_run_folder(
    out: Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Start a run folder, or load its checkpoint into ``model``, ``optimizer`` and ``gen``.

    ``amp_dtype`` is the run's autocast dtype (None: none); a checkpoint written under another
    one gives a warning (:func:`_check_precision`).

    Returns the finished epochs' metrics and the optimizer steps taken so far;
    ``metrics.jsonl`` is rewritten to hold exactly the checkpoint's rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics: list[dict[str, Any]] = []
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_precision(out, ckpt, amp_dtype, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], gen, device)
        metrics = list(ckpt["metrics"])
        step = int(ckpt["total_steps"])
    else:
        atomic_write_json(out / "config.json", cfg.to_dict())
    store.write_jsonl(out / store.METRICS_FILE, metrics)
    return metrics, step


def epoch_row(
    cfg: TrainConfig,
    epoch: int,
    sums: Sequence[float],
    n_train: int,
    n_test: int,
    lr: float,
    batch_size: int,
    steps: int,
    total_steps: int,
    seconds: float,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` row from an epoch's sums (train loss, train correct, test loss,
    test correct, gradient norms); any non-finite value is written as None and makes it a
    ``diverged`` row."""
    tl, tc, vl, vc, gn = sums
    row = {
        "epoch": epoch + 1,
        "train_loss": tl / n_train,
        "train_acc": tc / n_train,
        "test_loss": vl / n_test,
        "test_acc": vc / n_test,
        "lr": lr,
        "batch_size": batch_size,
        "steps": steps,
        "total_steps": total_steps,
        "grad_norm": gn / steps if cfg.track_grad_norm else None,
        "time": seconds,
    }
    _nonfinite_to_none(row)
    return row


def save_epoch(
    out: Path,
    cfg: TrainConfig,
    row: dict[str, Any],
    metrics: list[dict[str, Any]],
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    rng: dict[str, Any],
    step_norms: np.ndarray | None,
    amp_dtype: torch.dtype | None = None,
) -> None:
    """Write a finished epoch: the step norms, then the checkpoint, then the metrics row
    (``metrics`` already ends with ``row``)."""
    if step_norms is not None:  # before the checkpoint, so the log never falls behind it
        store.append_grad_norms(out, step_norms)
    _atomic_torch_save(
        out / "checkpoint.pt",
        {
            "model": model_state,
            "optimizer": optimizer_state,
            "rng": rng,
            "metrics": metrics,
            "total_steps": row["total_steps"],
            "lr_schedule": cfg.lr_schedule,
            "batch_schedule": cfg.batch_schedule,
            "next_epoch": row["epoch"],
            "lr": row["lr"],
            "batch_size": row["batch_size"],
            "autocast": _dtype_name(amp_dtype),
        },
    )
    store.append_jsonl(out / store.METRICS_FILE, row)


def finish_run(
    cfg: TrainConfig,
    status: str,
    metrics: list[dict[str, Any]],
    out: Path | None,
    resumed_from: int,
) -> RunResult:
    """The run's :class:`RunResult`; ``result.json`` is written when it finished or diverged."""
    result = RunResult(
        status=status,
        config=cfg.to_dict(),
        metrics=metrics,
        out=str(out) if out else None,
        resumed_from=resumed_from,
    )
    if out is not None and status in ("finished", "diverged"):
        atomic_write_json(out / "result.json", result.to_dict())
    return result


def _nonfinite_to_none(row: dict[str, Any]) -> bool:
    """Replace the NaN and infinite values of an epoch's metrics by None (JSON has neither) and
    mark the row ``diverged``; True when there was any. A finite training loss with a NaN test
    loss or gradient norm is a diverged run as well."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    for k in bad:
        row[k] = None
    if bad:
        row["diverged"] = True
    return bool(bad)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def _check_precision(out: Path, ckpt: dict[str, Any], amp_dtype: torch.dtype | None,
                     device: torch.device) -> None:
    """Warn when a run trained so far in one arithmetic resumes in another (precision "auto"
    is bf16 on CUDA and fp32 on the CPU, so moving a run between machines changes it)."""
    before, now = ckpt.get("autocast"), _dtype_name(amp_dtype)
    if before is not None and before != now:
        import warnings

        warnings.warn(
            f"{out} was trained in {before} for {len(ckpt.get('metrics', []))} epoch(s) and "
            f"resumes in {now} (on {device.type}): its later epochs are not those of an "
            f"uninterrupted run; pass precision {before!r} (--precision) to keep it",
            UserWarning, stacklevel=3)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, read with ``weights_only=True`` (no code a file holds runs).

    Raises:
        ValueError: the file is not a readable labkit checkpoint (the message names it).
    """
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file must not be a bare unpickling traceback
        # torch's own message advises retrying with weights_only=False, which would run any
        # code a foreign file holds: keep only its first line, without that advice.
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in why or "Weights only load failed" in why:
            why = "not a checkpoint of labkit's (or a damaged one)"
        raise ValueError(
            f"cannot read the checkpoint {path} ({type(e).__name__}: {why}); "
            "delete it to restart the run from scratch"
        ) from e


def check_run_folder(out: Path, cfg: TrainConfig) -> RunResult | None:
    """The stored result of a finished run in ``out``, None when there is none yet; a folder
    of a different run is a ``ValueError``."""
    return _check_folder(out, cfg)


def _check_folder(out: Path, cfg: TrainConfig) -> RunResult | None:
    """Return the stored result of a finished run; refuse a folder of a different run."""
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        if out.exists() and (out / "checkpoint.pt").exists():
            raise ValueError(
                f"{out} has a checkpoint.pt but no config.json; it is not a labkit run folder"
            )
        return None
    try:
        stored_cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        stored_identity = stored_cfg.identity()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a valid labkit run config: {e}") from e
    identity = cfg.identity()
    if stored_identity != identity:
        stored_full = stored_cfg.resolved().to_dict()
        diff = sorted(k for k in {**identity, **stored_identity}
                      if identity.get(k) != stored_identity.get(k))
        what = ", ".join(f"{k} {stored_full.get(k)!r} there, {cfg.to_dict().get(k)!r} here"
                         for k in diff)
        raise ValueError(
            f"{out} holds a different run ({what}); to resume it give the values it was "
            "started with, else choose another --out folder or delete this one"
        )
    if (out / "result.json").exists():
        return load_run(out)
    return None
