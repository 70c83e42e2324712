"""Per-epoch learning-rate and batch-size schedules as JSON-serializable spec dicts.

Book: chapter 3 (learning-rate decay) and chapter 7 (implicit graduated optimization,
Sato & Iiduka, arXiv 2311.08745, Algorithm 3).

A schedule is a plain dict such as ``{"kind": "step", "every": 40, "factor": 0.5}`` so it
can be stored in a run's ``config.json``. Epochs are 0-indexed; the value returned for
epoch ``e`` is used for the whole of epoch ``e``; ``epochs`` is the run's total number of
epochs. ``None`` means ``{"kind": "constant"}``.

Learning-rate kinds (``lr0`` is the initial learning rate):

- ``constant``: ``lr0``.
- ``step`` (``every`` = 40, ``factor`` = 1/sqrt(2)): ``lr0 * factor ** (e // every)``.
- ``cosine`` (``min_lr`` = 0): ``min_lr + (lr0 - min_lr) * (1 + cos(pi e / epochs)) / 2``,
  the per-epoch cosine annealing of ``torch.optim.lr_scheduler.CosineAnnealingLR`` with
  ``T_max = epochs``.
- ``poly`` (``power`` = 0.9, optional ``stages`` and ``every``): polynomial decay
  ``lr0 * ((S - m) / S) ** power`` in phase ``m`` of ``S`` equal phases, see below. With
  neither ``stages`` nor ``every`` each epoch is a phase and this is
  ``lr0 * (1 - e / epochs) ** power`` (``torch.optim.lr_scheduler.PolynomialLR`` with
  ``total_iters = epochs``).

Batch-size kinds (``b0`` is the initial batch size; results are ints >= 1):

- ``constant``: ``b0``.
- ``step`` (``every`` = 40, ``factor`` = 2, optional ``max``, ``delay`` = 0):
  ``round(b0 * factor ** (max(e - delay, 0) // every))``, capped at ``max``: the batch grows
  at epochs ``every + delay``, ``2 every + delay``, ... With ``delay = 0`` it grows at the
  epochs where a ``step`` learning rate with the same ``every`` decays. ``delay = 1`` is the
  timing of Sato & Iiduka's code (naoki-sato3/new-sigma-nice ``cifar.py``, lines 124-133):
  its loop grows the batch *after* training epoch ``e`` when ``e % every == 0 and e != 0``,
  so the new batch size is first used in epoch ``every + 1``, one epoch after its
  ``StepLR(step_size=every)`` has decayed the learning rate (epoch ``every``, as here).
  ``delay`` is left out of the normalized spec when it is 0, so specs written before it
  existed keep their form (and run folders their hashes).
- ``poly`` (``power`` = 0.9, optional ``stages``, ``every``, ``max``):
  ``round(b0 / g_m ** 2)`` with ``g_m = ((S - m) / S) ** power``, capped at ``max``.
  Since the smoothing degree of SGD is ``delta = lr * C / sqrt(b)`` (arXiv 2311.08745),
  growing the batch this way multiplies delta by exactly ``g_m``: the same stage-wise
  polynomial decay that the ``poly`` learning-rate schedule gives at constant batch size.

Rounding is half-up (``floor(x + 0.5)``), never below 1.

Phases of the ``poly`` kinds. ``stages = M`` is the number of decays, so a run has
``S = M + 1`` constant phases ``m = 0, ..., M`` (the indexing of the lr_m formula below).
The phase of epoch ``e`` is

- ``stages`` and ``every`` given: ``m = min(e // every, M)``;
- only ``stages``: the ``epochs`` are cut into ``M + 1`` equal phases,
  ``m = floor(e (M + 1) / epochs)`` (needs ``M + 1 <= epochs``);
- only ``every``: ``m = e // every`` and ``S = ceil(epochs / every)``;
- neither: ``m = e`` and ``S = epochs``.

Why this is the schedule of Algorithm 3 (arXiv 2311.08745): the algorithm multiplies the
learning rate after phase ``k`` by ``gamma_k = ((M - k) / (M - k + 1)) ** p``
(0-indexed here). The product telescopes::

    lr_m = lr0 * prod_{k=0}^{m-1} ((M - k) / (M - k + 1)) ** p
         = lr0 * (M / (M + 1) * (M - 1) / M * ... * (M + 1 - m) / (M + 2 - m)) ** p
         = lr0 * ((M + 1 - m) / (M + 1)) ** p,

which is ``lr0 * ((S - m) / S) ** p`` with ``S = M + 1``. The per-epoch form
``lr0 * (1 - e / epochs) ** p`` is the special case of one epoch per phase (``M = epochs - 1``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BATCH_KINDS",
    "LR_KINDS",
    "batch_size_at",
    "batch_sizes",
    "describe",
    "lr_at",
    "lr_values",
    "poly_factor",
    "round_batch_size",
    "validate_batch_schedule",
    "validate_lr_schedule",
]

# kind -> {key: default}; a default of None marks an optional key.
LR_KINDS: dict[str, dict[str, Any]] = {
    "constant": {},
    "step": {"every": 40, "factor": 2.0**-0.5},
    "cosine": {"min_lr": 0.0},
    "poly": {"power": 0.9, "stages": None, "every": None},
}
BATCH_KINDS: dict[str, dict[str, Any]] = {
    "constant": {},
    "step": {"every": 40, "factor": 2.0, "max": None, "delay": 0},
    "poly": {"power": 0.9, "stages": None, "every": None, "max": None},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(what: str, kind: str, key: str, value: Any, optional: bool) -> Any:
    """Validate one key of a spec; return the normalized value."""
    where = f"{what} schedule {kind!r}: {key!r}"
    if key in ("every", "stages"):
        if value is None and optional:
            return None
        if not _is_int(value) or value < 1:
            raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
        return int(value)
    if key == "max":
        if value is None:
            return None
        if not _is_int(value) or value < 1:
            raise ValueError(f"{where} must be an integer >= 1 or None, got {value!r}")
        return int(value)
    if key == "delay":
        if not _is_int(value) or value < 0:
            raise ValueError(f"{where} must be an integer >= 0 (epochs), got {value!r}")
        return int(value)
    if not _is_number(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if key == "factor" and value <= 0:
        raise ValueError(f"{where} must be > 0, got {value!r}")
    if key == "power" and value < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    if key == "min_lr" and value < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return float(value)


def _validate(spec: Any, kinds: dict[str, dict[str, Any]], what: str) -> dict:
    if spec is None:
        return {"kind": "constant"}
    if not isinstance(spec, dict):
        raise TypeError(
            f"{what} schedule must be a dict like {{'kind': 'constant'}} or None, "
            f"got {type(spec).__name__}: {spec!r}"
        )
    if "kind" not in spec:
        raise ValueError(
            f"{what} schedule {spec!r} has no 'kind'; valid kinds: {', '.join(kinds)}"
        )
    kind = spec["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(
            f"unknown {what} schedule kind {kind!r}; valid kinds: {', '.join(kinds)}"
        )
    defaults = kinds[kind]
    unknown = sorted(set(spec) - set(defaults) - {"kind"})
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} for {what} schedule {kind!r}; "
            f"valid keys: {valid}"
        )
    out: dict[str, Any] = {"kind": kind}
    for key, default in defaults.items():
        out[key] = _check_value(what, kind, key, spec.get(key, default), default is None)
    if out.get("delay") == 0:
        del out["delay"]  # the form (and hash) of specs written before "delay" existed
    return out


def validate_lr_schedule(spec: dict | None) -> dict:
    """Return the normalized learning-rate schedule spec with defaults filled in.

    Raises TypeError if ``spec`` is not a dict or None, ValueError for an unknown kind, an
    unknown key or a bad value (every/stages < 1, factor <= 0, power < 0, min_lr < 0).
    """
    return _validate(spec, LR_KINDS, "lr")


def validate_batch_schedule(spec: dict | None) -> dict:
    """Return the normalized batch-size schedule spec with defaults filled in.

    Raises TypeError if ``spec`` is not a dict or None, ValueError for an unknown kind, an
    unknown key or a bad value (every/stages/max < 1, factor <= 0, power < 0, delay < 0).
    ``delay`` appears in the result only when it is not 0.
    """
    return _validate(spec, BATCH_KINDS, "batch")


def _check_epoch(epoch: int, epochs: int) -> None:
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not _is_int(epoch) or not 0 <= epoch < epochs:
        raise ValueError(
            f"epoch must be an integer in [0, epochs) = [0, {epochs}) (0-indexed), got {epoch!r}"
        )


def _phase(spec: dict, epoch: int, epochs: int) -> tuple[int, int]:
    """Return (m, S): the phase of ``epoch`` and the number of phases of a poly spec."""
    stages, every = spec["stages"], spec["every"]
    if stages is not None and every is not None:
        return min(epoch // every, stages), stages + 1
    if stages is not None:
        if stages + 1 > epochs:
            raise ValueError(
                f"poly schedule with stages={stages} needs stages + 1 <= epochs, got "
                f"epochs={epochs}; give 'every' too or use fewer stages"
            )
        return epoch * (stages + 1) // epochs, stages + 1
    if every is not None:
        return epoch // every, -(-epochs // every)
    return epoch, epochs


def poly_factor(m: int, M: int, power: float) -> float:
    """Return ``((M + 1 - m) / (M + 1)) ** power``, the telescoped product of Algorithm 3.

    This is ``prod_{k<m} gamma_k`` with ``gamma_k = ((M - k) / (M - k + 1)) ** power``: the
    factor by which phase ``m`` (0 <= m <= M) of a run with ``M`` decays scales ``lr0``.
    """
    if not _is_int(M) or M < 0:
        raise ValueError(f"M must be an integer >= 0, got {M!r}")
    if not _is_int(m) or not 0 <= m <= M:
        raise ValueError(f"m must be an integer in [0, M] = [0, {M}], got {m!r}")
    if not _is_number(power) or power < 0:
        raise ValueError(f"power must be a finite number >= 0, got {power!r}")
    return ((M + 1 - m) / (M + 1)) ** power


def round_batch_size(b: float, cap: int | None = None) -> int:
    """Round a real batch size half-up to an int >= 1, capped at ``cap`` if given."""
    if not _is_number(b) or b <= 0:
        raise ValueError(f"batch size must be a finite number > 0, got {b!r}")
    out = max(1, math.floor(b + 0.5))
    return out if cap is None else min(out, cap)


def lr_at(spec: dict | None, lr0: float, epoch: int, epochs: int) -> float:
    """Learning rate for 0-indexed ``epoch`` of a run of ``epochs`` epochs.

    ``lr0`` (> 0) is the initial learning rate; see the module docstring for the kinds.
    """
    spec = validate_lr_schedule(spec)
    if not _is_number(lr0) or lr0 <= 0:
        raise ValueError(f"lr0 must be a finite number > 0, got {lr0!r}")
    _check_epoch(epoch, epochs)
    kind = spec["kind"]
    if kind == "constant":
        return float(lr0)
    if kind == "step":
        try:
            return lr0 * spec["factor"] ** (epoch // spec["every"])
        except OverflowError:  # a factor > 1 over many steps: as large as a float gets
            return math.inf
    if kind == "cosine":
        lo = spec["min_lr"]
        return lo + (lr0 - lo) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
    m, n_phases = _phase(spec, epoch, epochs)
    return lr0 * poly_factor(m, n_phases - 1, spec["power"])


def batch_size_at(spec: dict | None, b0: int, epoch: int, epochs: int) -> int:
    """Batch size (int >= 1) for 0-indexed ``epoch`` of a run of ``epochs`` epochs.

    ``b0`` (int >= 1) is the initial batch size; see the module docstring for the kinds.
    """
    spec = validate_batch_schedule(spec)
    if not _is_int(b0) or b0 < 1:
        raise ValueError(f"b0 must be an integer >= 1, got {b0!r}")
    _check_epoch(epoch, epochs)
    kind = spec["kind"]
    if kind == "constant":
        return b0
    if kind == "step":
        grown = max(epoch - spec.get("delay", 0), 0) // spec["every"]
        try:
            b = b0 * spec["factor"] ** grown
        except OverflowError:
            b = math.inf
        if spec["max"] is None and not math.isfinite(b):
            raise ValueError(
                f"batch schedule 'step' with factor {spec['factor']:g} every {spec['every']} "
                f"epoch(s) makes the batch size of epoch {epoch + 1} overflow; use a smaller "
                "factor or cap it with max")
        return round_batch_size(min(b, spec["max"] or b), spec["max"])
    m, n_phases = _phase(spec, epoch, epochs)
    return round_batch_size(b0 / poly_factor(m, n_phases - 1, spec["power"]) ** 2, spec["max"])


def lr_values(spec: dict | None, lr0: float, epochs: int) -> list[float]:
    """The learning rate of every epoch ``0 .. epochs - 1`` (for plots)."""
    return [lr_at(spec, lr0, e, epochs) for e in range(epochs)]


def batch_sizes(spec: dict | None, b0: int, epochs: int) -> list[int]:
    """The batch size of every epoch ``0 .. epochs - 1`` (for plots)."""
    return [batch_size_at(spec, b0, e, epochs) for e in range(epochs)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _phase_text(spec: dict) -> str:
    stages, every = spec["stages"], spec["every"]
    if stages is not None and every is not None:
        return f"{stages + 1} phases of {every} epochs (last one to the end)"
    if stages is not None:
        return f"{stages + 1} equal phases"
    if every is not None:
        return f"every {every} epochs"
    return "per epoch"


def describe(spec: dict | None, of: str = "lr") -> str:
    """A one-line human-readable description of a schedule spec.

    ``of`` says whether ``spec`` is a learning-rate ("lr") or batch-size ("batch") schedule.
    """
    if of == "lr":
        spec = validate_lr_schedule(spec)
        kind = spec["kind"]
        if kind == "constant":
            return "constant learning rate"
        if kind == "step":
            return f"lr x {_fmt(spec['factor'])} every {spec['every']} epochs"
        if kind == "cosine":
            return f"cosine annealing from lr0 to {_fmt(spec['min_lr'])} over the run"
        return (
            f"polynomial decay lr0 * (1 - m/S)^{_fmt(spec['power'])}, {_phase_text(spec)}"
        )
    if of == "batch":
        spec = validate_batch_schedule(spec)
        kind = spec["kind"]
        cap = "" if spec.get("max") is None else f", at most {spec['max']}"
        if kind == "constant":
            return "constant batch size"
        if kind == "step":
            lag = spec.get("delay", 0)
            late = "" if not lag else f" (first at epoch {spec['every'] + lag}, 0-based)"
            return f"batch x {_fmt(spec['factor'])} every {spec['every']} epochs{late}{cap}"
        return (
            f"polynomial growth b0 / (1 - m/S)^(2*{_fmt(spec['power'])}), "
            f"{_phase_text(spec)}{cap}"
        )
    raise ValueError(f"of must be 'lr' or 'batch', got {of!r}")
