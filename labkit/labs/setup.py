"""What every lab shares: the setup cell, the results folders, and the checks of a panel's knobs.

Book: the labs (``labs/README.md``). A lab's first code cell calls :func:`lab_setup` (the
profile, the results folder, the data folder and the seeds); its panel keeps its runs in
:func:`results_dir` (``$LABKIT_RESULTS/<lab>/<profile>`` or ``labs/results/<lab>/<profile>``).
The lab modules (:mod:`labkit.labs.lab1` ... :mod:`labkit.labs.lab6`) check their knobs with
:func:`check_profile`, :func:`is_positive`, :func:`is_int_at_least` and :func:`is_finite`.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.train import CPU_DATASET, PROFILES

__all__ = [
    "LabSetup",
    "check_profile",
    "dataset_of",
    "is_finite",
    "is_int_at_least",
    "is_positive",
    "lab_setup",
    "results_dir",
    "results_root",
    "selection_messages",
]

_LAB_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


# =========================================================================== the knobs


def check_profile(profile: Any) -> str:
    """``profile`` itself when it is one of smoke, cpu, short, paper.

    Raises:
        ValueError: any other value.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    return profile


def dataset_of(profile: str, paper_dataset: str) -> str:
    """The data set a lab trains on in ``profile``: the handwritten digits in the cpu profile
    (:mod:`labkit.digits`), the paper's ``paper_dataset`` (its generated stand-in in smoke)
    otherwise."""
    return CPU_DATASET if check_profile(profile) == "cpu" else paper_dataset


def is_positive(value: Any) -> bool:
    """Whether ``value`` is a finite int or float > 0 (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def is_int_at_least(value: Any, low: int) -> bool:
    """Whether ``value`` is an int >= ``low`` (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (None, NaN and infinities are not)."""
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def selection_messages(chosen: Any, what: str, valid: Sequence[Any] | None = None) -> list[str]:
    """Why a multi-select knob cannot run: nothing chosen, or (with ``valid``) unknown values.

    ``what`` names one item, e.g. ``"optimizer"``: "choose at least one optimizer", "unknown
    optimizer(s) adam; valid: sgd, shb, nshb".
    """
    chosen = tuple(chosen or ())
    if not chosen:
        return [f"choose at least one {what}"]
    unknown = [c for c in chosen if valid is not None and c not in valid]
    if unknown:
        return [f"unknown {what}(s) {', '.join(map(str, unknown))}; valid: "
                f"{', '.join(map(str, valid))}"]
    return []


# =========================================================================== folders and setup


def results_root() -> Path:
    """Where the labs keep their sweep folders.

    ``$LABKIT_RESULTS`` when set. Else, while nbgrader autogrades the notebook
    (``NBGRADER_EXECUTION=autograde``), the grader's own folder
    (:func:`labkit.grading.grader_results_root`, ``~/.cache/labkit/grading-results``): the
    working directory is then the student's submission, and runs found there would be reloaded
    instead of trained. Otherwise ``results/`` beside the notebook when the working directory is
    ``labs/`` (how Jupyter starts a lab's kernel), ``labs/results/`` when it is the instructor
    sources' ``labs/source/`` or the repository root, and ``results/`` in the working directory
    otherwise. ``labs/results/`` is ignored by git.
    """
    env = os.environ.get("LABKIT_RESULTS", "").strip()
    if env:
        return Path(env).expanduser()
    if os.environ.get("NBGRADER_EXECUTION") == "autograde":
        from labkit.grading import grader_results_root

        return grader_results_root()
    cwd = Path.cwd()
    if cwd.name == "labs":
        return cwd / "results"
    if cwd.name == "source" and cwd.parent.name == "labs":
        return cwd.parent / "results"
    if (cwd / "labs").is_dir():
        return cwd / "labs" / "results"
    return cwd / "results"


def results_dir(lab_id: str, profile: str) -> Path:
    """The sweep folder of one lab and profile: ``<results_root()>/<lab_id>/<profile>``.

    Raises:
        ValueError: ``lab_id`` is not a lab's file name without ``.ipynb`` (lower-case letters,
            digits and ``_``, like ``"lab1_optimizer_zoo"``), or ``profile`` is not smoke, short
            or paper.
    """
    if not isinstance(lab_id, str) or not _LAB_ID.match(lab_id):
        raise ValueError(
            f"lab_id must be the lab's file name without .ipynb, like 'lab1_optimizer_zoo' "
            f"(lower-case letters, digits, _); got {lab_id!r}"
        )
    check_profile(profile)
    return results_root() / lab_id / profile


@dataclass(frozen=True)
class LabSetup:
    """What :func:`lab_setup` decided for a lab.

    Attributes:
        lab_id: the lab's file name without ``.ipynb``, e.g. ``"lab1_optimizer_zoo"`` (also the
            ``lab`` of the notebook's ``metadata.labkit`` and the prefix of its grade_ids).
        profile: the starting profile of the lab's panel.
        results_dir: the sweep folder of that profile (:func:`results_dir`).
        data_root: where CIFAR is read from (``$LABKIT_DATA`` or ``~/.cache/labkit/data``; the
            smoke profile generates its data under ``<data_root>/labkit-smoke``).
        device: ``"cuda"`` or ``"cpu"``.
        seed: the seed given to Python, numpy and torch.
        notes: remarks worth showing (an invalid ``$LABKIT_PROFILE``, say).
    """

    lab_id: str
    profile: str
    results_dir: Path
    data_root: Path
    device: str
    seed: int
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [
            f"lab {self.lab_id}: profile {self.profile!r} on {self.device}",
            f"results: {self.results_dir}",
            f"data:    {self.data_root}",
            f"seed:    {self.seed}",
        ]
        return "\n".join([*lines, *self.notes])


def lab_setup(lab_id: str, profile: str | None = None, *, seed: int = 0,
              show: bool = True) -> LabSetup:
    """Seed everything, pick the profile and the folders, and print them.

    The profile is ``profile`` if given, else :func:`labkit.widgets.default_profile`
    (``$LABKIT_PROFILE``, or smoke without CUDA and short with it). In the smoke profile on the
    CPU, torch is limited to one thread: the tiny smoke model trains faster on one thread than
    on two contended ones.

    Raises:
        ValueError: a bad ``lab_id``, ``profile`` or ``seed``.
    """
    import numpy as np
    import torch

    from labkit import widgets as lk_widgets
    from labkit.data import default_data_root

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    notes: list[str] = []
    if profile is None:
        try:
            profile = lk_widgets.default_profile()
        except ValueError as e:
            profile = "short" if torch.cuda.is_available() else "smoke"
            notes.append(f"note: {e}; using {profile!r}")
    folder = results_dir(lab_id, profile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if profile in ("smoke", "cpu") and device == "cpu":
        # Tiny models: a second intra-op thread only adds contention (on a busy 2-core
        # machine a step of the cpu profile's CNN took 20 to 50 times longer with 2 threads).
        torch.set_num_threads(1)
    setup = LabSetup(lab_id, profile, folder, default_data_root(), device, seed, tuple(notes))
    if show:
        print(setup.summary())
    return setup
