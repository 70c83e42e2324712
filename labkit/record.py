"""``record(name, value)``: a lab's answers, saved in the notebook in machine-readable form.

Book: the labs (graded questions). A lab records each answer a student derives from their own
experiment (the eta that won, a critical batch size, a table of smoothed values) and the data the
answer came from, so that an instructor can check the answers against each other and against
the data from the saved notebook alone, without running anything.

In a notebook, ``record`` displays one output with two representations:

- ``application/vnd.labkit.record+json``: ``{"name": ..., "value": ..., "labkit_version": ...}``;
- ``text/plain``: ``labkit.record: name = <value as JSON>`` (what a reader sees).

Values are converted to plain JSON: numpy and torch scalars and arrays become numbers and
lists, tuples become lists, mapping keys become strings, and non-finite floats (a diverged run's
NaN accuracy) become ``None`` because JSON has no NaN. Outside IPython the text line is
printed instead.

Example::

    from labkit import record
    record("best_eta", "1/2")
    record("final_test_acc_by_eta", {"adam": {"1/2": 0.62, "2": 0.58}})

This module imports nothing heavy (no torch, no IPython at import time), so ``import labkit``
stays fast.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MIME_TYPE", "jsonable", "record", "recorded"]

#: The MIME type of a record output (a grader looks for it in saved notebooks).
MIME_TYPE = "application/vnd.labkit.record+json"

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,99}$")
# What this process recorded, name -> payload (the last value wins, as in a re-run cell).
_RECORDED: dict[str, dict[str, Any]] = {}


def jsonable(value: Any, *, where: str = "value") -> Any:
    """``value`` as plain JSON data (see the module docstring for the conversions).

    Raises:
        TypeError: something with no JSON form (an object, a set, a function...); the message
            names where in ``value`` it sits.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    # numpy / torch scalars and arrays, without importing either.
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return jsonable(value.tolist(), where=where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _key(k, where)
            if key in out:
                raise TypeError(
                    f"{where} has two keys that both read {key!r} as JSON strings; "
                    "use distinct string keys"
                )
            out[key] = jsonable(v, where=f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return jsonable(item(), where=where)
    raise TypeError(
        f"{where} of type {type(value).__name__} cannot be recorded: use numbers, strings, "
        "booleans, None, lists and dicts (numpy/torch values are converted)"
    )


def _key(k: Any, where: str) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None:
        return json.dumps(k)
    plain = jsonable(k, where=f"a key of {where}")
    if isinstance(plain, (int, float)):
        return repr(plain)
    raise TypeError(
        f"a key of {where} is {k!r} ({type(k).__name__}); keys must be strings or numbers"
    )


def record(name: str, value: Any, *, display_id: str | None = None,
           update: bool = False) -> None:
    """Display ``value`` as a labkit record named ``name``.

    Args:
        name: letters, digits, ``_``, ``.``, ``-``, starting with a letter (at most 100
            characters), e.g. ``"best_eta"``.
        value: numbers, strings, booleans, None, lists and dicts of them (numpy/torch values
            are converted; non-finite floats become None).
        display_id: give the output this display id, so that a later call with
            ``update=True`` replaces it in place (a panel's record of the knobs of its
            latest run, :meth:`labkit.widgets.ControlPanel.record_inputs`).
        update: replace the output of ``display_id`` instead of adding one.

    The payload ``{"name": name, "value": <value as JSON>, "labkit_version": ...}`` is also kept
    in :func:`recorded`. Nothing is returned, so that a record as a cell's last line shows once.

    Raises:
        TypeError: ``name`` is not a string, or ``value`` has no JSON form.
        ValueError: ``name`` has characters other than the ones above.
    """
    from labkit import __version__

    if not isinstance(name, str):
        raise TypeError(f"record name must be a str, got {type(name).__name__} {name!r}")
    if not _NAME.match(name):
        raise ValueError(
            f"record name {name!r} is not valid: use letters, digits, '_', '.', '-', starting "
            "with a letter, at most 100 characters (e.g. 'best_eta')"
        )
    payload = {"name": name, "value": jsonable(value), "labkit_version": __version__}
    text = f"labkit.record: {name} = {json.dumps(payload['value'], sort_keys=True)}"
    _RECORDED[name] = payload
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(text)
        return
    if get_ipython() is None:
        print(text)
    elif update and display_id is not None:
        from IPython.display import update_display

        update_display({MIME_TYPE: payload, "text/plain": text}, raw=True,
                       display_id=display_id)
    else:
        display({MIME_TYPE: payload, "text/plain": text}, raw=True, display_id=display_id)


def recorded() -> dict[str, dict[str, Any]]:
    """What this process has recorded so far: name -> payload (a copy)."""
    return {k: dict(v) for k, v in _RECORDED.items()}
