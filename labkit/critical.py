"""Critical batch size: SFO complexity, Theorem 4.4 of Sato & Iiduka, and the C^2 it implies.

Book: chapter 8 (critical batch size and estimating C^2), following Sato & Iiduka (2024), "Role of
momentum in smoothing objective function and generalizability of deep neural networks",
arXiv:2402.02325 (Sato & Iiduka (2024), §4.2-4.3).

Training with batch size b for T steps costs T b stochastic gradients (the SFO complexity). If T
is the number of steps until the stopping test with threshold eps passes, the critical batch size
b* = argmin_b T b is the batch size that reaches eps with the fewest gradients. Theorem 4.4 bounds
it from below, with eta the learning rate, beta the momentum and C^2 the stochastic-gradient
variance:

    b*_SGD  > eta C^2 / eps^2,
    b*_SHB  > eta (beta^2 - beta + 1) C^2 / (beta (1 - beta)^2 eps^2),
    b*_NSHB > eta C^2 / ((1 - beta) eps^2).

Read backwards, a measured b* gives an upper bound on C^2 (§4.3), which the smoothing degrees of
``labkit.noise`` need.

The measuring part (:func:`measure_sfo`, :class:`SFOCallback`) trains one run per batch size and
stops it at the first step T at which the stopping test passes, with T exact to the step:

- ``criterion="minibatch"`` (the default; the seed's experiment and the authors' published
  code): the running mean (1/t) sum_{s=1..t} ||grad f_{S_s}(x_{s-1})|| of the mini-batch
  gradient norms of all steps so far is <= eps. The authors' code applies the test only after
  10 epochs (``min_epochs=10``).
- ``criterion="full"``: the full-gradient norm ||grad f(x_t)|| over the whole training set is
  <= eps, evaluated every ``check_every`` steps (one extra pass over the training set each).

:func:`labkit.experiments.results.sfo_from_history` approximates the minibatch test from a
sweep's per-epoch metrics instead (T rounded up to an epoch end).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from labkit import data as lk_data
from labkit.train import (
    Callback,
    RunResult,
    RunState,
    TrainConfig,
    atomic_write_json,
    prepare_data,
    resolve_device,
    train,
)

__all__ = [
    "CRITERIA",
    "OPTIMIZERS",
    "PAPER_VALUES",
    "SFOCallback",
    "SFORecord",
    "SFOResult",
    "c2_upper_bound",
    "critical_batch_size",
    "critical_batch_size_lower_bound",
    "measure_sfo",
    "sfo_complexity",
    "sfo_table",
    "theorem_4_4_factor",
]

OPTIMIZERS = ("sgd", "shb", "nshb")

#: Published values for ResNet-18 on CIFAR-100 (labelled as the paper's values in the labs).
#:
#: From Sato & Iiduka (2024, arXiv:2402.02325) §4.3: learning rate eta = 0.1,
#: momentum beta = 0.9, stopping threshold eps = 0.5, batch sizes 2^3 ... 2^13, the measured
#: critical batch sizes and the C^2 upper bounds derived from them with Theorem 4.4 (the paper
#: prints 25.318 for SHB; the formula gives 25.3187, i.e. the paper truncates). From the authors'
#: published code: the gradient-norm bounds K used for delta_SHB / delta_NSHB, and the critical
#: batch sizes of its SHB plot for three thresholds eps. ``best_delta_range`` is §5.1's range of
#: smoothing degrees that generalized best (test accuracy against delta, Fig. 7).
PAPER_VALUES: dict[str, Any] = {
    "source": "Sato & Iiduka (2024), arXiv:2402.02325, ResNet-18 on CIFAR-100",
    "lr": 0.1,
    "beta": 0.9,
    "eps": 0.5,
    "batch_sizes": tuple(2**k for k in range(3, 14)),
    "critical_batch_size": {"sgd": 2**9, "shb": 2**10, "nshb": 2**9},
    "c2_upper_bound": {"sgd": 1280.0, "shb": 25.318, "nshb": 128.0},
    "k": {"shb": 1.77, "nshb": 4.5},
    "shb_critical_batch_size_by_eps": {0.5: 1024, 0.7: 512, 1.0: 256},
    "best_delta_range": (0.2, 1.0),
}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# SFO complexity and the measured critical batch size
# ---------------------------------------------------------------------------------------------


def sfo_complexity(steps: int, batch_size: int) -> int:
    """SFO complexity T b: stochastic gradients computed in ``steps`` steps of ``batch_size``."""
    return _check_int("steps", steps, 0) * _check_int("batch_size", batch_size, 1)


def _sfo_value(b: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SFO complexity for batch size {b} must be a number, got {value!r}")
    value = float(value)
    if value < 0:
        raise ValueError(f"SFO complexity for batch size {b} must be >= 0, got {value}")
    return value


def critical_batch_size(sfo: Mapping[int, float]) -> int:
    """The measured critical batch size b* = argmin_b SFO(b).

    Args:
        sfo: batch size -> SFO complexity T b. An entry that is inf or NaN marks a run that did
            not reach the threshold eps (or diverged) and is ignored.

    Returns:
        The batch size with the smallest finite SFO complexity; on a tie, the smallest such
        batch size (it reaches eps with as few gradients and fewer examples per step).

    Raises:
        ValueError: if ``sfo`` is empty or no entry is finite.
    """
    if not isinstance(sfo, Mapping):
        raise TypeError(f"sfo must be a mapping batch size -> SFO complexity, got {type(sfo)}")
    if not sfo:
        raise ValueError("sfo is empty; pass batch size -> SFO complexity for at least one run")
    finite: list[tuple[float, int]] = []
    for b, value in sfo.items():
        b = _check_int("batch size (a key of sfo)", b, 1)
        value = _sfo_value(b, value)
        if math.isfinite(value):
            finite.append((value, b))
    if not finite:
        raise ValueError(
            f"no batch size reached the threshold: every SFO value is inf or NaN "
            f"(batch sizes {sorted(sfo)}); train longer or loosen eps"
        )
    return min(finite)[1]


def sfo_table(
    steps: Mapping[int, int | float | None | Iterable[int | float | None]],
) -> dict[int, float]:
    """Turn steps-to-threshold per batch size into SFO complexities T b.

    Args:
        steps: batch size -> T (steps until the stopping test passed), or None / inf / NaN for a
            run that never passed it; or batch size -> a list of such values for repeated runs
            (seeds), whose SFO complexities are averaged. A batch size counts as having reached
            the threshold only if every one of its runs did; otherwise its entry is inf.

    Returns:
        batch size -> SFO complexity (float, inf where the threshold was not reached), sorted by
        batch size; ready for :func:`critical_batch_size`.
    """
    if not isinstance(steps, Mapping):
        raise TypeError(f"steps must be a mapping batch size -> steps, got {type(steps)}")
    table: dict[int, float] = {}
    for b in sorted(steps):
        value = steps[b]
        b = _check_int("batch size (a key of steps)", b, 1)
        runs = list(value) if isinstance(value, Iterable) else [value]
        if not runs:
            raise ValueError(f"steps for batch size {b} is an empty list")
        sfos = []
        for t in runs:
            if t is None or (isinstance(t, numbers.Real) and not math.isfinite(t)):
                sfos.append(math.inf)
                continue
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or t < 0 or t != int(t):
                raise ValueError(
                    f"steps for batch size {b} must be ints >= 0 (or None/inf for a run that "
                    f"did not reach the threshold), got {t!r}"
                )
            sfos.append(float(sfo_complexity(int(t), b)))
        table[b] = sum(sfos) / len(sfos)
    return table


# ---------------------------------------------------------------------------------------------
# Theorem 4.4 and its inverse (Sato & Iiduka (2024) §4.2-4.3)
# ---------------------------------------------------------------------------------------------


def _check_optimizer_beta(optimizer: Any, beta: Any) -> tuple[str, float]:
    """Validated (name, beta); beta is 0.0 for SGD, which has none."""
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    name = optimizer.lower()
    if beta is None:
        if name != "sgd":
            valid = "(0, 1)" if name == "shb" else "[0, 1)"
            raise ValueError(f"beta is required for optimizer={name!r}; pass a value in {valid}")
        return name, 0.0
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number in [0, 1), got {beta!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if name == "shb" and beta == 0:
        raise ValueError(
            "beta must be in (0, 1) for optimizer='shb': Theorem 4.4's SHB bound divides by "
            "beta, got beta=0"
        )
    return name, float(beta)


def theorem_4_4_factor(optimizer: str, beta: float | None = None) -> float:
    """The dimensionless factor c of Theorem 4.4, b* > c eta C^2 / eps^2.

    c = 1 for SGD, (beta^2 - beta + 1) / (beta (1 - beta)^2) for SHB (beta in (0, 1)) and
    1 / (1 - beta) for NSHB. ``beta`` is ignored for SGD.
    """
    name, beta = _check_optimizer_beta(optimizer, beta)
    if name == "sgd":
        return 1.0
    if name == "shb":
        return (beta**2 - beta + 1) / (beta * (1 - beta) ** 2)
    return 1.0 / (1.0 - beta)


def critical_batch_size_lower_bound(
    optimizer: str, *, c2: float, lr: float, eps: float, beta: float | None = None
) -> float:
    """Theorem 4.4: the critical batch size exceeds c eta C^2 / eps^2 (returns that bound).

    Args:
        optimizer: "sgd", "shb" or "nshb".
        c2: stochastic-gradient variance C^2 >= 0.
        lr: learning rate eta > 0.
        eps: stopping threshold eps > 0 (the test is on a gradient norm, in gradient units).
        beta: momentum in [0, 1) (in (0, 1) for SHB); required for shb and nshb, ignored for sgd.

    Returns:
        The real-valued lower bound on b* (in examples).
    """
    factor = theorem_4_4_factor(optimizer, beta)
    if isinstance(c2, bool) or not isinstance(c2, numbers.Real):
        raise TypeError(f"c2 must be a real number >= 0, got {c2!r}")
    if not (c2 >= 0 and math.isfinite(c2)):
        raise ValueError(f"c2 must be >= 0 and finite, got {c2!r}")
    lr = _check_positive("lr", lr)
    eps = _check_positive("eps", eps)
    return factor * lr * float(c2) / eps**2


def c2_upper_bound(
    optimizer: str,
    *,
    critical_batch_size: int,
    lr: float,
    eps: float,
    beta: float | None = None,
) -> float:
    """Theorem 4.4 read backwards (Sato & Iiduka (2024) §4.3): C^2 < b* eps^2 / (c eta).

    SGD: C^2 < b* eps^2 / eta; SHB: C^2 < b* beta (1 - beta)^2 eps^2 / (eta (beta^2 - beta + 1));
    NSHB: C^2 < b* (1 - beta) eps^2 / eta. With eta = 0.1, beta = 0.9, eps = 0.5 and the measured
    b* = 2^9, 2^10, 2^9 these are 1280, 25.3187 (printed 25.318) and 128.

    Args:
        optimizer: "sgd", "shb" or "nshb".
        critical_batch_size: measured b* (int >= 1), e.g. from :func:`critical_batch_size`.
        lr: learning rate eta > 0 used in the runs.
        eps: stopping threshold eps > 0 used in the runs.
        beta: momentum in [0, 1) (in (0, 1) for SHB); required for shb and nshb, ignored for sgd.

    Returns:
        The upper bound on C^2 (squared gradient units).
    """
    factor = theorem_4_4_factor(optimizer, beta)
    b = _check_int("critical_batch_size", critical_batch_size, 1)
    lr = _check_positive("lr", lr)
    eps = _check_positive("eps", eps)
    return b * eps**2 / (factor * lr)


# ---------------------------------------------------------------------------------------------
# Measuring T and T b by training (Sato & Iiduka (2024) §4.3)
# ---------------------------------------------------------------------------------------------

#: The stopping tests :func:`measure_sfo` offers; the first is the default (the authors').
CRITERIA = ("minibatch", "full")
#: File in a run folder with the stopping test's state at each epoch end and its outcome.
PROGRESS_FILE = "sfo-progress.json"
#: File in a measurement folder with the measurement's settings (one measurement per folder).
SETTINGS_FILE = "sfo-settings.json"


def _check_criterion(criterion: Any) -> str:
    if criterion not in CRITERIA:
        raise ValueError(
            f"criterion must be one of {', '.join(repr(c) for c in CRITERIA)}; got {criterion!r}"
        )
    return criterion


def _check_check_every(check_every: Any, criterion: str) -> int | None:
    if check_every is None:
        return None
    check_every = _check_int("check_every", check_every, 1)
    if criterion != "full":
        raise ValueError(
            f"check_every applies to criterion='full' only (got check_every={check_every} with "
            f"criterion={criterion!r}); the minibatch test is applied at every step"
        )
    return check_every


def _constant_batch(schedule: Any) -> bool:
    if schedule is None:
        return True
    return isinstance(schedule, Mapping) and schedule.get("kind") == "constant"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)


def _per_example_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float(), target, reduction="none")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e}); delete it to measure again") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object; delete it to measure again")
    return obj


class SFOCallback(Callback):
    """Stops a run at the first step T at which the SFO stopping test passes; T is exact.

    Pass it to :func:`labkit.train.train` (:func:`measure_sfo` does, once per batch size). Step t
    is the t-th optimizer update (t = 1, 2, ...), x_t the parameters after it, and the
    mini-batch gradient norm of step t is ||grad f_{S_t}(x_{t-1})|| (``state.grad_norm``: the
    gradient of the mean mini-batch loss, without weight decay). The test is applied at the
    steps t >= ``min_epochs`` * ceil(n / b), i.e. from the last step of epoch ``min_epochs``
    on; the running mean always averages over all steps from the first.

    ``criterion="minibatch"`` (the default): T is the first such t at which the running mean
    (1/t) sum_{s=1..t} ||grad f_{S_s}(x_{s-1})|| is <= ``eps``. The running sum lives on the
    device in float64 and the host reads it back only every ``sync_every`` steps, at each
    epoch's last step and at the end of the run, and never before step S_t / eps (the mean
    cannot reach eps earlier, since every norm is >= 0). The sums of the steps in between wait
    on the device, so T is still the exact first step; the run stops at the read that finds
    it, up to ``sync_every - 1`` steps later (``steps_run`` records where).

    ``criterion="full"``: T is the first such t that is a multiple of ``check_every`` (default:
    ceil(n / b), the steps of one epoch, so the test runs at epoch ends) at which the
    full-gradient norm ||grad f(x_t)|| is <= ``eps``. f is the mean cross-entropy over all n
    training images of ``data``, without augmentation and with batch norm in eval mode
    (:func:`labkit.noise.full_gradient`), so it is the empirical loss itself, not the loss of an
    augmented mini-batch. The run stops right after step T. Cost: each check is one forward
    and backward pass over the n images, about one epoch of training; checked every c steps,
    the measurement costs about 1 + n / (b c) times the training alone (twice, with the
    default once-per-epoch check). Batch norm in eval mode uses running statistics, which lag
    behind the weights early in training; there ||grad f|| says little about stationarity (on
    the smoke data it first grows, then falls), so skip that phase with ``min_epochs``.
    The two tests differ in scale too: by Jensen's inequality E||grad f_S|| >= ||grad f|| for
    an unbiased mini-batch gradient, so the same eps is a stricter test for ``"minibatch"``.

    After the run: ``steps`` (T, or None), ``reached``, ``diverged`` (a non-finite gradient
    norm, or the run ended diverged), ``value`` (the tested quantity at T, or at the last
    test), ``running_grad_norm`` (the running mean of the mini-batch norms at T, or at the
    end), ``steps_run`` and ``checks`` ((t, ||grad f(x_t)||) of each full-gradient check).

    With a run folder (``config.out``) it keeps :data:`PROGRESS_FILE` there, written at the last
    step of every epoch (before that epoch's checkpoint) and when the test passes, so a resumed
    run continues with the exact running sum and a run that already passed is not retrained.

    Args:
        eps: the threshold (gradient-norm units), > 0.
        criterion: ``"minibatch"`` or ``"full"`` (:data:`CRITERIA`).
        min_epochs: apply the test from the end of this epoch on (the authors' code: 10).
        check_every: steps between full-gradient checks (``criterion="full"`` only).
        sync_every: steps between reads of the running sum (``criterion="minibatch"``); any
            value gives the same T.
        data: the run's data set, required for ``criterion="full"``.
        chunk_size: images per forward/backward pass of a full-gradient check.
    """

    step_interval = 1

    def __init__(
        self,
        eps: float,
        *,
        criterion: str = "minibatch",
        min_epochs: int = 0,
        check_every: int | None = None,
        sync_every: int = 32,
        data: lk_data.CifarData | None = None,
        chunk_size: int = 500,
    ) -> None:
        self.eps = _check_positive("eps", eps)
        self.criterion = _check_criterion(criterion)
        self.min_epochs = _check_int("min_epochs", min_epochs, 0)
        self.check_every = _check_check_every(check_every, self.criterion)
        self.sync_every = _check_int("sync_every", sync_every, 1)
        self.chunk_size = _check_int("chunk_size", chunk_size, 1)
        if self.criterion == "full":
            if data is None:
                raise ValueError(
                    "criterion='full' needs data= (the CifarData the run trains on): the full "
                    "gradient is taken over its training images"
                )
            if not isinstance(data, lk_data.CifarData):
                raise TypeError(f"data must be a labkit.data.CifarData, got {type(data).__name__}")
        self.data = data
        self._reset()

    def _reset(self) -> None:
        self.steps: int | None = None
        self.reached = False
        self.diverged = False
        self.value = math.nan
        self.running_grad_norm = math.nan
        self.steps_run = 0
        self.checks: list[tuple[int, float]] = []
        self._sum: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._epoch_sums: list[float] = []
        self._earliest = 1
        self._next_sync = 1
        self._done = False
        self._restored = False
        self._folder: Path | None = None
        self._spe = 1
        self._t_min = 1
        self._every = 1
        self._norms = True

    def settings(self, steps_per_epoch: int) -> dict[str, Any]:
        """The test's settings for a run of ``steps_per_epoch`` steps per epoch (JSON-ready)."""
        return {
            "eps": self.eps,
            "criterion": self.criterion,
            "min_epochs": self.min_epochs,
            "check_every": (self.check_every or steps_per_epoch) if self.criterion == "full"
            else None,
        }

    def outcome(self) -> dict[str, Any]:
        """The measurement so far as a JSON-ready dict (non-finite numbers as None)."""
        return {
            "steps": self.steps,
            "reached": self.reached,
            "diverged": self.diverged,
            "value": _finite_or_none(self.value),
            "running_grad_norm": _finite_or_none(self.running_grad_norm),
            "steps_run": self.steps_run,
        }

    # ----------------------------------------------------------------------- hooks

    def on_run_start(self, state: RunState) -> None:
        cfg = state.config
        if not _constant_batch(cfg.batch_schedule):
            raise ValueError(
                "the SFO test needs a constant batch size (SFO = T b); got batch_schedule="
                f"{cfg.batch_schedule!r}: set it to None"
            )
        if self.criterion == "minibatch" and not cfg.track_grad_norm:
            raise ValueError(
                "criterion='minibatch' needs the mini-batch gradient norms: set "
                "track_grad_norm=True in the TrainConfig"
            )
        self._reset()
        self._spe = math.ceil(state.n_train / cfg.batch_size)
        self._t_min = max(1, self.min_epochs * self._spe)
        self._every = self.check_every or self._spe
        self._norms = bool(cfg.track_grad_norm)
        self._folder = Path(cfg.out) if cfg.out else None
        if self.criterion == "full":
            n = int(self.data.train_x.shape[0])
            if n != state.n_train:
                raise ValueError(
                    f"data has {n} training images but the run trains on {state.n_train}; pass "
                    "the CifarData the run trains on"
                )
            self._data = self.data.to(state.device)
        progress = self._read_progress()
        if progress is not None and progress.get("settings") != self.settings(self._spe):
            raise ValueError(
                f"{self._folder / PROGRESS_FILE} was written by an SFO test with the settings "
                f"{progress.get('settings')}, not {self.settings(self._spe)}; use another run "
                "folder (or delete that one) to measure with these settings"
            )
        t0 = state.step
        s0 = 0.0
        if t0 > 0 and progress is not None:
            outcome = progress.get("outcome") or {}
            if outcome.get("reached") or outcome.get("diverged"):
                # The test passed (or the run diverged) after this run's last checkpoint.
                self._restore(outcome, progress)
                state.stop = True
                return
            k = t0 // self._spe
            sums = progress.get("epoch_sums", [])
            if t0 % self._spe == 0 and len(sums) >= k:
                self._epoch_sums = [_nan_if_none(v) for v in sums[:k]]
            self.checks = [(int(t), _nan_if_none(v)) for t, v in progress.get("checks", [])
                           if t <= t0]
            if self.checks:
                self.value = self.checks[-1][1]
        if t0 > 0 and len(self._epoch_sums) != t0 // self._spe:
            # No progress file (or one behind the checkpoint): rebuild the sums from the
            # per-epoch means, exact up to rounding.
            total = 0.0
            self._epoch_sums = []
            for m in state.metrics:
                if self._norms:
                    total += _nan_if_none(m.get("grad_norm")) * m["steps"]
                self._epoch_sums.append(total)
        if self._epoch_sums:
            s0 = self._epoch_sums[-1]
        self._sum = torch.tensor(s0, dtype=torch.float64, device=state.device)
        self._after_read(t0, s0)

    def on_step(self, state: RunState) -> None:
        if self._done:
            state.stop = True
            return
        t = state.step
        if state.grad_norm is not None:
            self._sum = self._sum + state.grad_norm.detach().to(torch.float64)
        epoch_end = t % self._spe == 0
        current = None
        if self.criterion == "minibatch":
            if t >= self._earliest:
                self._pending.append((t, self._sum))
            if t >= self._next_sync or epoch_end:
                current = self._read(t)
        elif t >= self._t_min and t % self._every == 0:
            self._check_full(state.model, t)
        if self._done:
            self.steps_run = t
            state.stop = True
            self._write_progress()
        elif epoch_end:
            self._epoch_sums.append(float(self._sum) if current is None else current)
            self._write_progress()

    def on_run_end(self, state: RunState, result: RunResult) -> None:
        if self._restored or self._sum is None:
            return
        if not self._done:
            self.steps_run = state.step
            if self._pending:  # steps after the last read (a run stopped by another hook)
                self._read(state.step)
        if not self.reached:
            s = float(self._sum)
            if self._norms and self.steps_run:
                self.running_grad_norm = s / self.steps_run
            if self.criterion == "minibatch":
                self.value = self.running_grad_norm
            if result.status == "diverged" or (self._norms and not math.isfinite(s)):
                self.diverged = True
        self._write_progress(final=True)

    # ----------------------------------------------------------------------- internals

    def _after_read(self, t: int, s: float) -> None:
        """Schedule the next read after reading the running sum s at step t."""
        # mean_{t'} >= s / t' for t' > t, so the mean cannot reach eps before s / eps.
        bound = math.floor(s / self.eps) if math.isfinite(s) else 0
        self._earliest = max(t + 1, self._t_min, min(bound, 2**62))
        self._next_sync = max(t + self.sync_every, self._earliest)

    def _read(self, t: int) -> float:
        """One host sync: test the waiting running sums in order; return the sum at step t."""
        values = torch.stack([s for _, s in self._pending] + [self._sum]).tolist()
        current = values[-1]
        for (ti, _), si in zip(self._pending, values[:-1], strict=True):
            mean = si / ti
            if mean <= self.eps:
                self._passed(ti, mean, mean)
                break
        self._pending.clear()
        if not self._done:
            if math.isfinite(current):
                self._after_read(t, current)
            else:
                self.diverged = True
                self._done = True
                self.value = self.running_grad_norm = current / t
        return current

    def _check_full(self, model: torch.nn.Module, t: int) -> None:
        norm = self._full_grad_norm(model)
        self.checks.append((t, norm))
        self.value = norm
        if not math.isfinite(norm):
            self.diverged = True
            self._done = True
        elif norm <= self.eps:
            running = float(self._sum) / t if self._norms else math.nan
            self._passed(t, norm, running)

    def _passed(self, t: int, value: float, running: float) -> None:
        self.steps = t
        self.reached = True
        self.value = value
        self.running_grad_norm = running
        self._done = True

    def _full_grad_norm(self, model: torch.nn.Module) -> float:
        from labkit.noise import full_gradient

        data, c = self._data, self.chunk_size

        def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(0, data.train_x.shape[0], c):
                x = lk_data.normalize(data.train_x[i : i + c], data.mean, data.std)
                yield x, data.train_y[i : i + c]

        grads = full_gradient(model, _per_example_cross_entropy, chunks(), chunk_size=c)
        return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))

    def _restore(self, outcome: Mapping[str, Any], progress: Mapping[str, Any]) -> None:
        self.steps = outcome.get("steps")
        self.reached = bool(outcome.get("reached"))
        self.diverged = bool(outcome.get("diverged"))
        self.value = _nan_if_none(outcome.get("value"))
        self.running_grad_norm = _nan_if_none(outcome.get("running_grad_norm"))
        self.steps_run = int(outcome.get("steps_run") or 0)
        self.checks = [(int(t), _nan_if_none(v)) for t, v in progress.get("checks", [])]
        self._done = self._restored = True

    def _read_progress(self) -> dict[str, Any] | None:
        if self._folder is None or not (self._folder / PROGRESS_FILE).exists():
            return None
        return _read_json(self._folder / PROGRESS_FILE)

    def _write_progress(self, final: bool = False) -> None:
        if self._folder is None:
            return
        atomic_write_json(self._folder / PROGRESS_FILE, {
            "settings": self.settings(self._spe),
            "steps_per_epoch": self._spe,
            "epoch_sums": [_finite_or_none(v) for v in self._epoch_sums],
            "checks": [[t, _finite_or_none(v)] for t, v in self.checks],
            "outcome": self.outcome() if (final or self._done) else None,
        })


@dataclass
class SFORecord:
    """The measurement of one batch size.

    Attributes:
        batch_size: b.
        steps: T, the first step at which the stopping test passed; None if it never did.
        sfo: T b (the paper's SFO complexity); ``inf`` if the test never passed.
        reached: whether the test passed within the run's epochs.
        diverged: the run produced a non-finite gradient norm or loss before passing.
        epochs: epochs (started) up to ``steps_run``.
        steps_run: optimizer steps actually trained (>= T: the minibatch test may stop the run
            a few steps after T, see :class:`SFOCallback`).
        examples: images processed in the first T steps (< T b when an epoch's last batch is
            short); None if the test never passed.
        value: the tested quantity at T (the running mean, or ||grad f(x_T)||), or at the
            last test; NaN if it was never evaluated.
        running_grad_norm: running mean of the mini-batch gradient norms at T (or at the end).
        status: the run's status (:class:`labkit.train.RunResult`): ``"stopped"`` (the test
            passed mid-run), ``"finished"`` or ``"diverged"``.
        folder: the run folder, if any.
        loaded: read from disk (a measurement folder), not trained now.
    """

    batch_size: int
    steps: int | None
    sfo: float
    reached: bool
    diverged: bool
    epochs: int
    steps_run: int
    examples: int | None
    value: float
    running_grad_norm: float
    status: str
    folder: str | None = None
    loaded: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inf``/NaN as None; ``loaded`` is not stored)."""
        d = dataclasses.asdict(self)
        d.pop("loaded")
        for k in ("sfo", "value", "running_grad_norm"):
            d[k] = _finite_or_none(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, loaded: bool = False) -> SFORecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"loaded"}
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"an SFO record needs the key(s) {', '.join(missing)}")
        kw = {k: d[k] for k in names}
        kw["sfo"] = math.inf if d["sfo"] is None else float(d["sfo"])
        kw["value"] = _nan_if_none(d["value"])
        kw["running_grad_norm"] = _nan_if_none(d["running_grad_norm"])
        return cls(**kw, loaded=loaded)


@dataclass
class SFOResult:
    """A measurement over a grid of batch sizes (returned by :func:`measure_sfo`).

    Attributes:
        records: one :class:`SFORecord` per measured batch size, sorted by batch size.
        eps, criterion, min_epochs, max_epochs, check_every: the stopping test.
        config: the resolved base :class:`~labkit.train.TrainConfig` as a dict (its
            ``batch_size`` is that of the config passed in, not of the runs).
        out: the measurement folder, if any.
        pending: batch sizes left unmeasured because a callback stopped a run.
    """

    records: list[SFORecord]
    eps: float
    criterion: str
    min_epochs: int
    max_epochs: int
    check_every: int | None
    config: dict[str, Any]
    out: str | None = None
    pending: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.pending

    def table(self) -> dict[int, float]:
        """batch size -> SFO complexity T b (``inf`` where eps was not reached), for
        :func:`critical_batch_size`."""
        return {r.batch_size: r.sfo for r in sorted(self.records, key=lambda r: r.batch_size)}

    @property
    def critical_batch_size(self) -> int:
        """b* = argmin_b T b over the batch sizes that reached eps (ValueError if none did)."""
        return critical_batch_size(self.table())

    def beta(self) -> float | None:
        """The momentum of the runs (the optimizer's default if the config sets none)."""
        from labkit.optim import hyperparameters

        beta = self.config.get("hparams", {}).get("beta")
        if beta is None:
            beta = hyperparameters(self.config["optimizer"]).get("beta")
        return None if beta is None else float(beta)

    def c2_upper_bound(self) -> float:
        """Theorem 4.4 read backwards with the measured b*: :func:`c2_upper_bound` for the
        runs' optimizer (sgd, shb or nshb), learning rate, momentum and eps."""
        opt = self.config["optimizer"]
        return c2_upper_bound(
            opt,
            critical_batch_size=self.critical_batch_size,
            lr=self.config["lr"],
            eps=self.eps,
            beta=None if opt == "sgd" else self.beta(),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``sfo`` maps str(batch size) -> T b or None."""
        return {
            "eps": self.eps,
            "criterion": self.criterion,
            "min_epochs": self.min_epochs,
            "max_epochs": self.max_epochs,
            "check_every": self.check_every,
            "config": self.config,
            "out": self.out,
            "pending": list(self.pending),
            "records": [r.to_dict() for r in self.records],
            "sfo": {str(b): _finite_or_none(v) for b, v in self.table().items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SFOResult:
        return cls(
            records=[SFORecord.from_dict(r) for r in d["records"]],
            eps=d["eps"],
            criterion=d["criterion"],
            min_epochs=d["min_epochs"],
            max_epochs=d["max_epochs"],
            check_every=d["check_every"],
            config=dict(d["config"]),
            out=d.get("out"),
            pending=list(d.get("pending", [])),
        )


def _check_batch_sizes(batch_sizes: Any) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
        raise TypeError(
            f"batch_sizes must be a sequence of ints >= 1 (e.g. [8, 16, 32]), got {batch_sizes!r}"
        )
    sizes: list[int] = []
    for b in batch_sizes:
        b = _check_int("batch size (an entry of batch_sizes)", b, 1)
        if b in sizes:
            raise ValueError(f"batch_sizes lists batch size {b} twice")
        sizes.append(b)
    if not sizes:
        raise ValueError("batch_sizes is empty; pass at least one batch size, e.g. [8, 16, 32]")
    return sizes


def _examples(steps: int, batch_size: int, n_train: int) -> int:
    """Images in the first ``steps`` steps: whole epochs of n, then full batches."""
    spe = math.ceil(n_train / batch_size)
    epochs, rest = divmod(steps, spe)
    return epochs * n_train + rest * batch_size


def _record(
    b: int, n_train: int, outcome: Mapping[str, Any], status: str, folder: Path | None
) -> SFORecord:
    reached = bool(outcome["reached"])
    steps = int(outcome["steps"]) if reached else None
    steps_run = int(outcome["steps_run"] or 0)
    return SFORecord(
        batch_size=b,
        steps=steps,
        sfo=float(sfo_complexity(steps, b)) if steps is not None else math.inf,
        reached=reached,
        diverged=not reached and (bool(outcome["diverged"]) or status == "diverged"),
        epochs=math.ceil(steps_run / math.ceil(n_train / b)),
        steps_run=steps_run,
        examples=_examples(steps, b, n_train) if steps is not None else None,
        value=_nan_if_none(outcome["value"]),
        running_grad_norm=_nan_if_none(outcome["running_grad_norm"]),
        status=status,
        folder=str(folder) if folder is not None else None,
    )


def _record_from_folder(
    folder: Path, b: int, n_train: int, test: SFOCallback
) -> SFORecord | None:
    """The record of a run folder that already holds the answer, else None (train it)."""
    from labkit.train import load_run

    progress_path = folder / PROGRESS_FILE
    progress = _read_json(progress_path) if progress_path.exists() else None
    spe = math.ceil(n_train / b)
    if progress is not None and progress.get("settings") != test.settings(spe):
        raise ValueError(
            f"{progress_path} was written by an SFO test with the settings "
            f"{progress.get('settings')}, not {test.settings(spe)}; delete {folder} to measure "
            f"batch size {b} again"
        )
    finished = (folder / "result.json").exists()
    status = load_run(folder).status if finished else "stopped"
    outcome = (progress or {}).get("outcome")
    if outcome and (outcome.get("reached") or outcome.get("diverged")):
        return _record(b, n_train, outcome, status, folder)
    if not finished:
        return None
    if progress is None:
        raise ValueError(
            f"{folder} holds a finished run but no {PROGRESS_FILE}: it was not trained with the "
            f"SFO test; delete it to measure batch size {b}"
        )
    if outcome is None:
        # The run ended before its final progress write; the test never passed (a pass is
        # written before the run can finish).
        sums = [_nan_if_none(v) for v in progress.get("epoch_sums", [])]
        steps_run = spe * len(sums)
        running = sums[-1] / steps_run if sums else math.nan
        checks = progress.get("checks", [])
        value = running if test.criterion == "minibatch" else (
            _nan_if_none(checks[-1][1]) if checks else math.nan)
        outcome = {"steps": None, "reached": False, "diverged": not math.isfinite(running),
                   "value": value, "running_grad_norm": running, "steps_run": steps_run}
    return _record(b, n_train, outcome, status, folder)


def measure_sfo(
    config: TrainConfig,
    batch_sizes: Sequence[int],
    eps: float,
    *,
    criterion: str = "minibatch",
    min_epochs: int = 0,
    max_epochs: int | None = None,
    check_every: int | None = None,
    sync_every: int = 32,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    data: lk_data.CifarData | None = None,
    callbacks: Sequence[Callback] = (),
    on_record: Callable[[SFORecord], None] | None = None,
) -> SFOResult:
    """Measure the SFO complexity T b for each batch size by training (Sato & Iiduka (2024) §4.3).

    One run per batch size b: ``config`` with ``batch_size=b`` and ``epochs=max_epochs``,
    stopped by :class:`SFOCallback` at the first step T at which the stopping test passes
    (T exact to the step). The paper's grid is ``[2**k for k in range(3, 14)]`` with eta = 0.1,
    beta = 0.9, eps = 0.5 (ResNet-18 on CIFAR-100); :func:`critical_batch_size` of
    :meth:`SFOResult.table` is b*, and :meth:`SFOResult.c2_upper_bound` the C^2 bound of §4.3.

    Criteria (see :class:`SFOCallback`):

    - ``"minibatch"`` (default): the running mean of the mini-batch gradient norms of steps
      1..t is <= eps, as in the seed and the authors' published code. That code starts testing
      after 10 epochs: pass ``min_epochs=10`` to do the same.
    - ``"full"``: ||grad f(x_t)|| over the whole training set is <= eps, tested every
      ``check_every`` steps (default: once per epoch). Each test costs about one epoch of
      training.

    Runs that never pass the test within ``max_epochs`` get ``sfo = inf`` (ignored by
    :func:`critical_batch_size`), and so do runs that diverge; the measurement goes on.

    With ``out``, batch size b trains in ``out/runs/b<b>/`` (a resumable run folder) and its
    record is written atomically to ``out/sfo-b<b>.json`` when it is done, so calling again
    with the same arguments skips the finished batch sizes, resumes an interrupted one from its
    last epoch, and retrains nothing. ``out/sfo-settings.json`` holds the settings; a folder
    measured with other settings is refused. Batch sizes can be added to a finished folder.

    Args:
        config: the run (optimizer, lr, hparams, dataset, model, profile, device, ...). Its
            ``batch_size`` is replaced by each entry of ``batch_sizes``; ``out`` must be None
            and ``batch_schedule`` None; the minibatch test needs ``track_grad_norm=True``.
        batch_sizes: ints >= 1, at most the number of training images, no repeats.
        eps: the threshold (gradient-norm units), > 0.
        criterion: ``"minibatch"`` or ``"full"``.
        min_epochs: apply the test from the end of this epoch on (the authors' code: 10).
        max_epochs: epochs after which a run that has not passed counts as not reached;
            default ``config.epochs`` (or the profile's).
        check_every: steps between full-gradient tests (``criterion="full"`` only).
        sync_every: steps between host reads of the minibatch running mean (any value gives
            the same T; a run may train up to ``sync_every - 1`` steps past T).
        out: the measurement folder; None keeps everything in memory.
        progress: show a progress bar per run.
        data: a :class:`labkit.data.CifarData` to train on (default: the config's data set,
            loaded once for all batch sizes).
        callbacks: further :class:`labkit.train.Callback` objects for every run. One that sets
            ``state.stop`` ends the measurement: the result lists the unmeasured batch sizes
            in ``pending``.
        on_record: called with each :class:`SFORecord` as soon as it is known (or loaded).

    Returns:
        An :class:`SFOResult`.

    Raises:
        ValueError / TypeError: a bad argument (before anything is trained), or an ``out``
            folder that holds a measurement with other settings.
        FileNotFoundError / labkit.data.DatasetError: the data set is missing or corrupt.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a labkit.train.TrainConfig, got {type(config).__name__}")
    eps = _check_positive("eps", eps)
    criterion = _check_criterion(criterion)
    min_epochs = _check_int("min_epochs", min_epochs, 0)
    if max_epochs is not None:
        max_epochs = _check_int("max_epochs", max_epochs, 1)
    check_every = _check_check_every(check_every, criterion)
    sync_every = _check_int("sync_every", sync_every, 1)
    sizes = _check_batch_sizes(batch_sizes)
    if config.out is not None:
        raise ValueError(
            f"config.out must be None (got {config.out!r}): measure_sfo puts the run of batch "
            "size b in out/runs/b<b>; pass out= instead"
        )
    if not _constant_batch(config.batch_schedule):
        raise ValueError(
            "config.batch_schedule must be None: the SFO complexity T b needs a constant batch "
            f"size; got {config.batch_schedule!r}"
        )
    if criterion == "minibatch" and not config.track_grad_norm:
        raise ValueError(
            "criterion='minibatch' needs the mini-batch gradient norms: set "
            "track_grad_norm=True in the config"
        )
    if data is not None and not isinstance(data, lk_data.CifarData):
        raise TypeError(f"data must be a labkit.data.CifarData or None, got {type(data).__name__}")
    base = dataclasses.replace(config, epochs=max_epochs or config.epochs).resolved()
    if min_epochs > base.epochs:
        raise ValueError(
            f"min_epochs={min_epochs} exceeds max_epochs={base.epochs}: the test would never "
            f"be applied; use min_epochs <= {base.epochs} or more epochs"
        )
    out_path = Path(out) if out is not None else None
    configs = {
        b: dataclasses.replace(
            base, batch_size=b,
            out=str(out_path / "runs" / f"b{b}") if out_path is not None else None,
        ).resolved()
        for b in sizes
    }

    device = resolve_device(base.device)
    data = prepare_data(base, device) if data is None else data.to(device)
    n_train = int(data.train_x.shape[0])
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise ValueError(
            f"batch size(s) {', '.join(map(str, too_big))} exceed the {n_train} training images "
            f"of {base.dataset}; use batch sizes <= {n_train}"
        )
    test = SFOCallback(eps, criterion=criterion, min_epochs=min_epochs, check_every=check_every,
                       sync_every=sync_every, data=data if criterion == "full" else None)

    settings = {
        "config": {k: v for k, v in base.identity().items() if k != "batch_size"},
        "eps": eps,
        "criterion": criterion,
        "min_epochs": min_epochs,
        "max_epochs": base.epochs,
        "check_every": check_every,
    }
    if out_path is not None:
        settings = json.loads(json.dumps(settings, sort_keys=True))
        path = out_path / SETTINGS_FILE
        if path.exists():
            stored = _read_json(path)
            if stored != settings:
                diff = sorted(k for k in set(settings) | set(stored)
                              if settings.get(k) != stored.get(k))
                if "config" in diff:
                    cfg_old, cfg_new = stored.get("config") or {}, settings["config"]
                    diff.remove("config")
                    diff += [f"config.{k}" for k in set(cfg_old) | set(cfg_new)
                             if cfg_old.get(k) != cfg_new.get(k)]
                raise ValueError(
                    f"{out_path} holds an SFO measurement with other settings (differing: "
                    f"{', '.join(sorted(diff))}); use another out folder or delete this one"
                )
        else:
            atomic_write_json(path, settings)

    records: dict[int, SFORecord] = {}
    pending: list[int] = []
    for i, b in enumerate(sizes):
        cfg = configs[b]
        folder = Path(cfg.out) if cfg.out else None
        record = None
        if out_path is not None:
            saved = out_path / f"sfo-b{b}.json"
            if saved.exists():
                try:
                    record = SFORecord.from_dict(_read_json(saved), loaded=True)
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{saved} is not an SFO record ({e}); delete it") from e
            elif folder is not None:
                record = _record_from_folder(folder, b, n_train, test)
        if record is None:
            result = train(cfg, [test, *callbacks], progress=progress, data=data)
            if result.status == "stopped" and not (test.reached or test.diverged):
                pending = sizes[i:]  # stopped by another callback: measured up to here
                break
            record = _record(b, n_train, test.outcome(), result.status, folder)
        if out_path is not None and not record.loaded:
            atomic_write_json(out_path / f"sfo-b{b}.json", record.to_dict())
        records[b] = record
        if on_record is not None:
            on_record(record)
    return SFOResult(
        records=[records[b] for b in sorted(records)],
        eps=eps,
        criterion=criterion,
        min_epochs=min_epochs,
        max_epochs=base.epochs,
        check_every=check_every,
        config=base.to_dict(),
        out=str(out_path) if out_path is not None else None,
        pending=pending,
    )
