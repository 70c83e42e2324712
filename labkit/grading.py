"""Grade saved lab notebooks from their outputs: recorded answers, their consistency with the
student's own recorded data, and the nbgrader test cells.

Book: no chapter of its own (this is the instructors' side of the labs). The consistency rules
restate two results of Sato & Iiduka (2024), "Role of momentum in smoothing objective function
and generalizability of deep neural networks", arXiv:2402.02325: Theorem 4.4 read
backwards, which turns a measured critical batch size b* into an upper bound on the gradient
variance C^2 (book chapter 8), and eqs. (12)-(14), the smoothing degrees delta of SGD, SHB and
NSHB (book chapter 6).

A lab notebook records what a student found with ``labkit.record(name, value)``: a display output
of MIME type ``application/vnd.labkit.record+json`` holding ``{"name", "value", "labkit_version"}``
(with a ``text/plain`` fallback ``labkit.record: name = value``). An answer key
(``labs/keys/<lab>.yml``, see :func:`load_key` and the README's "For instructors" section)
lists, per graded nbgrader cell of the lab, checks on those records drawn from a registry of
named rules (:data:`RULES`), each worth some points.

This module reads notebooks with nbformat and never executes them: it imports no torch and no
training code, so it runs in seconds anywhere and cannot run a student's code by accident. The
formulas come from the torch-free :mod:`labkit.critical`, the one home of Theorem 4.4 and
eqs. (12)-(14). Only
:func:`execute_notebook` (``labkit grade --execute``) starts a kernel, and only when asked.
"""

from __future__ import annotations

import ast
import copy
import csv
import itertools
import json
import math
import numbers
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from labkit import critical

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "MAX_DEPTH",
    "NO_OUTPUTS",
    "RECORD_MIME",
    "RULES",
    "Check",
    "CheckResult",
    "GradeResult",
    "GradedCell",
    "Key",
    "Question",
    "QuestionResult",
    "Record",
    "Release",
    "Submission",
    "default_key_path",
    "execute_notebook",
    "extract_records",
    "feedback_markdown",
    "find_key",
    "find_submissions",
    "grade_notebook",
    "grade_submissions",
    "grader_results_root",
    "key_candidates",
    "load_key",
    "load_release",
    "load_source",
    "read_notebook",
    "results_folder",
    "source_candidates",
    "write_feedback",
    "write_gradebook",
]

#: MIME type of the output ``labkit.record(name, value)`` displays.
RECORD_MIME = "application/vnd.labkit.record+json"
#: What nbgrader's generate_assignment leaves in an answer cell (a student who never answered
#: submits it as is): the grader reads it as "not answered".
ANSWER_PLACEHOLDER = "raise " + NotImplementedError.__name__ + "()"
#: Submissions larger than this (bytes) are not read: 20 MiB.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: Per-cell time limit (seconds) of ``--execute``.
DEFAULT_TIMEOUT = 600
#: Deepest nesting of JSON lists and objects read from a submission (and from a recorded value's
#: text). A notebook reaches a record's value 8 levels down and the labs' recorded tables add 3
#: or 4; deeper input is refused before it is parsed, so that no parser, nbformat, copy or rule
#: recurses anywhere near Python's recursion limit.
MAX_DEPTH = 64

_TEXT_RECORD = re.compile(r"\Alabkit\.record: (?P<name>.+?) = (?P<value>.*)\Z", re.S)
_HIDDEN_TESTS = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS.*?^[ \t]*### END HIDDEN TESTS[^\n]*\n?",
                           re.S | re.M)


# ---------------------------------------------------------------------------------------------
# The released lab and the answer key
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradedCell:
    """A cell of the released lab that carries nbgrader metadata with a grade_id."""

    grade_id: str
    index: int
    cell_type: str
    #: the source compared with a submission's: hidden tests removed, whitespace normalized
    source: str
    locked: bool
    grade: bool
    solution: bool
    points: float | None
    #: the source exactly as in the file (with any hidden tests)
    text: str = ""


@dataclass(frozen=True)
class Release:
    """The released lab notebook: its graded cells in order."""

    path: Path
    lab: str
    cells: tuple[GradedCell, ...]
    #: ids of code cells committed with outputs (a lab's ``# NBVAL_CHECK_OUTPUT`` cells): their
    #: outputs in a submission do not show that the student ran anything.
    prerun: frozenset[str] = frozenset()

    def cell(self, grade_id: str) -> GradedCell | None:
        for c in self.cells:
            if c.grade_id == grade_id:
                return c
        return None

    @property
    def grade_ids(self) -> tuple[str, ...]:
        return tuple(c.grade_id for c in self.cells)

    @property
    def has_hidden_tests(self) -> bool:
        """Whether a locked cell holds ``### BEGIN HIDDEN TESTS`` (a source version)."""
        return any(c.locked and _HIDDEN_TESTS.search(c.text) for c in self.cells)

    @property
    def has_solutions(self) -> bool:
        """Whether a solution cell holds ``### BEGIN SOLUTION`` (a source version; nbgrader's
        release replaces those blocks by a stub)."""
        return any(c.solution and "### BEGIN SOLUTION" in c.text for c in self.cells)


@dataclass(frozen=True)
class Check:
    """One check of a question: a rule applied with parameters, worth ``points``."""

    rule: str
    points: float
    params: Mapping[str, Any]
    label: str
    hint: str | None = None
    by_profile: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def params_for(self, profile: str | None) -> dict[str, Any]:
        """The parameters, with the ``by_profile`` overrides of ``profile`` applied."""
        params = dict(self.params)
        if profile is not None and profile in self.by_profile:
            params.update(self.by_profile[profile])
        return params


@dataclass(frozen=True)
class Question:
    """A graded question: the grade_id of its nbgrader test cell and its checks."""

    grade_id: str
    title: str
    checks: tuple[Check, ...]
    cells: tuple[str, ...]

    @property
    def points(self) -> float:
        return sum(c.points for c in self.checks)


@dataclass(frozen=True)
class Key:
    """An answer key: per question, the checks and their points."""

    path: Path
    lab: str
    questions: tuple[Question, ...]
    labkit_version: str | None = None
    profile: str | None = None

    @property
    def max_points(self) -> float:
        return sum(q.points for q in self.questions)


def _nbgrader_meta(cell: Mapping[str, Any]) -> Mapping[str, Any] | None:
    meta = cell.get("metadata")
    meta = meta.get("nbgrader") if isinstance(meta, Mapping) else None
    if isinstance(meta, Mapping) and isinstance(meta.get("grade_id"), str):
        return meta
    return None


def _normalized_source(source: Any) -> str:
    """Source text compared between a submission and the lab: hidden tests removed (nbgrader's
    release strips them), trailing spaces and surrounding blank lines ignored."""
    if isinstance(source, list):
        source = "".join(str(s) for s in source)
    text = _HIDDEN_TESTS.sub("", str(source))
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def load_release(path: str | Path) -> Release:
    """Read the lab notebook ``path`` (nbgrader's release version, or the source version with
    solutions) and list its graded cells.

    The lab's name is its ``metadata.labkit.lab`` when it has one (so a renamed copy still
    matches its key), else the file name without ``.ipynb``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not an nbformat 4 notebook or has no nbgrader cells.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"lab notebook {str(path)!r} not found; pass --lab "
                                "labs/<lab>.ipynb, the lab the students worked on")
    nb, error = read_notebook(path, max_bytes=None)
    if nb is None:
        raise ValueError(f"lab {str(path)!r} cannot be used: {error}")
    cells = []
    for index, cell in enumerate(nb.cells):
        meta = _nbgrader_meta(cell)
        if meta is None:
            continue
        points = meta.get("points")
        cells.append(GradedCell(
            grade_id=meta["grade_id"], index=index, cell_type=cell.cell_type,
            source=_normalized_source(cell.source), locked=bool(meta.get("locked")),
            grade=bool(meta.get("grade")), solution=bool(meta.get("solution")),
            points=float(points) if isinstance(points, numbers.Real) else None,
            text=str(cell.source),
        ))
    if not cells:
        raise ValueError(f"lab {str(path)!r} has no cells with nbgrader metadata (grade_id); "
                         "is it the released lab notebook?")
    ids = [c.grade_id for c in cells]
    dup = sorted({g for g in ids if ids.count(g) > 1})
    if dup:
        raise ValueError(f"lab {str(path)!r} uses grade_id {dup[0]!r} more than once; "
                         "grade_ids must be unique")
    prerun = frozenset(c.get("id") for c in nb.cells if c.cell_type == "code" and c.get("id")
                       and (c.get("outputs") or c.get("execution_count") is not None))
    meta = nb.metadata.get("labkit")
    name = meta.get("lab") if isinstance(meta, Mapping) else None
    return Release(path=path, lab=name if isinstance(name, str) and name else path.stem,
                   cells=tuple(cells), prerun=prerun)


def key_candidates(lab: str | Path, name: str | None = None) -> list[Path]:
    """Where the answer key of the lab notebook ``lab`` is looked for, in order:
    ``keys/<name>.yml`` in the lab's folder and in the two folders above it. That finds
    ``labs/keys/`` for ``labs/<lab>.ipynb`` and for ``labs/source/<lab>.ipynb``, and
    ``<course>/keys/`` for nbgrader's ``<course>/release/<assignment>/<lab>.ipynb``.
    ``name`` (default: the file name without .ipynb) is the lab's name."""
    lab = Path(lab)
    names = list(dict.fromkeys([name or lab.stem, lab.stem]))
    folders = [Path(os.path.normpath(lab.parent / up)) for up in (".", "..", "../..")]
    return list(dict.fromkeys(f / "keys" / f"{n}.yml" for f in folders for n in names))


def default_key_path(lab: str | Path, name: str | None = None) -> Path:
    """The answer key of the lab notebook ``lab``: the first of :func:`key_candidates` that
    exists, else the first of them (``labs/<lab>.ipynb`` -> ``labs/keys/<lab>.yml``)."""
    candidates = key_candidates(lab, name)
    return next((c for c in candidates if c.is_file()), candidates[0])


def source_candidates(lab: str | Path) -> list[Path]:
    """Where the source version (solutions and hidden tests) of the lab notebook ``lab`` is
    looked for: ``source/<lab>.ipynb`` next to it (``labs/source/`` for ``labs/<lab>.ipynb``)
    and nbgrader's ``<course>/source/<assignment>/<lab>.ipynb`` for
    ``<course>/release/<assignment>/<lab>.ipynb``."""
    lab = Path(lab)
    out = [lab.parent / "source" / lab.name]
    folder = lab.absolute().parent
    if folder.parent.name == "release":
        course = Path(os.path.normpath(lab.parent / ".." / ".."))
        out.append(course / "source" / folder.name / lab.name)
    return out


def _check_source(source: Release, release: Release) -> None:
    """The source must be the one ``release`` came from: the same lab, every graded cell of the
    release present, and every locked cell the same once hidden tests are taken out."""
    where = f"source {str(source.path)!r}"
    if source.lab != release.lab:
        raise ValueError(f"{where} is lab {source.lab!r}, but --lab is {release.lab!r}")
    for cell in release.cells:
        theirs = source.cell(cell.grade_id)
        if theirs is None:
            raise ValueError(f"{where} has no cell {cell.grade_id!r} of {release.lab}; pass the "
                             "source version the students' lab was generated from")
        if cell.locked and theirs.source != cell.source:
            raise ValueError(f"{where}: the locked cell {cell.grade_id!r} differs from the lab's "
                             "(not only by hidden tests); pass the source version the students' "
                             "lab was generated from")


def load_source(path: str | Path | None, release: Release) -> Release:
    """The version of ``release`` whose locked cells ``--execute`` runs: ``path`` (checked to be
    the source ``release`` came from); else ``release`` itself when it has hidden tests or
    solutions (it is a source version); else the first of :func:`source_candidates` that exists;
    else ``release`` (an nbgrader release without a source at hand: its hidden tests were
    stripped and cannot be run).

    Raises:
        FileNotFoundError: if ``path`` is given and does not exist.
        ValueError: if the source is malformed or does not belong to ``release``.
    """
    if path is None:
        if release.has_hidden_tests or release.has_solutions:
            return release
        found = [p for p in source_candidates(release.path) if p.is_file()]
        if not found:
            return release
        path = found[0]
    source = load_release(path)
    _check_source(source, release)
    return source


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One ``labkit.record`` output found in a notebook."""

    name: str
    value: Any
    labkit_version: str | None
    cell: int


def _parse_text_value(text: str) -> Any:
    """The value of a text record: JSON, else a Python literal, else the text itself. The
    caller has checked the nesting depth (:func:`_too_deep`)."""
    text = text.strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError, MemoryError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _too_deep_problem(index: int, name: str | None) -> str:
    what = "a record" if name is None else f"the record {_fmt(name)}"
    return f"cell {index}: {what} nests more than {MAX_DEPTH} levels deep and was ignored"


def extract_records(nb: Mapping[str, Any]) -> tuple[dict[str, Record], list[str]]:
    """All ``labkit.record`` outputs of ``nb``: name -> the last one in notebook order.

    Reads the JSON payload of :data:`RECORD_MIME`, or the ``text/plain`` fallback when a
    frontend dropped the JSON. Returns the records and a list of problems (malformed outputs).
    """
    records: dict[str, Record] = {}
    problems: list[str] = []
    for index, cell in enumerate(nb.get("cells") or []):
        if not isinstance(cell, Mapping) or cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs") or []:
            if not isinstance(out, Mapping) or not isinstance(out.get("data"), Mapping):
                continue
            data = out["data"]
            if RECORD_MIME in data:
                payload = data[RECORD_MIME]
                if isinstance(payload, str):
                    if _too_deep(payload):
                        problems.append(_too_deep_problem(index, None))
                        continue
                    try:
                        payload = json.loads(payload)
                    except (ValueError, RecursionError, MemoryError):
                        payload = None
                if (not isinstance(payload, Mapping) or not isinstance(payload.get("name"), str)
                        or "value" not in payload):
                    problems.append(f"cell {index}: a {RECORD_MIME} output without a name and "
                                    "value was ignored")
                    continue
                version = payload.get("labkit_version")
                records[payload["name"]] = Record(
                    payload["name"], payload["value"],
                    version if isinstance(version, str) else None, index,
                )
                continue
            text = data.get("text/plain")
            if isinstance(text, list):
                text = "".join(text)
            match = _TEXT_RECORD.match(text) if isinstance(text, str) else None
            if match:
                name = match["name"].strip()
                if _too_deep(match["value"]):
                    problems.append(_too_deep_problem(index, name))
                    continue
                records[name] = Record(name, _parse_text_value(match["value"]), None, index)
    return records, problems


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A check cannot pass; the message says why in words a student understands."""


class _NoOutputs(CheckFailed):
    """A check cannot pass because the notebook holds no saved outputs at all (the question
    says so once, not each of its checks)."""


#: The reason of every question of a notebook saved without outputs, given once per question.
NO_OUTPUTS = ("no saved outputs: the notebook was saved with its outputs cleared (or never "
              "run), so no recorded answer or test result can be read; run the lab and save it "
              "with its outputs")


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, numbers.Real):
        return format(float(x), ".6g")
    if isinstance(x, list) and len(x) <= 8 and all(_is_number(v) for v in x):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    text = json.dumps(x, sort_keys=True, default=str) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _close(value: float, expected: float, rtol: float, atol: float) -> bool:
    return abs(value - expected) <= atol + rtol * abs(expected)


@dataclass
class _Context:
    """What a rule can see of one submission."""

    nb: Any
    release: Release
    question: Question
    records: dict[str, Record]
    has_outputs: bool
    cells: dict[str, list[int]]

    def record(self, ref: str) -> Any:
        """The recorded value at ``name/key/...``."""
        ref = ref[1:] if ref.startswith("$") else ref
        name, *path = ref.split("/")
        if name not in self.records:
            if not self.has_outputs:
                raise _NoOutputs(f"no saved outputs, so no recorded {name!r}")
            raise CheckFailed(f"no labkit.record output named {name!r}: run the cell that "
                              f"records it (labkit.record({name!r}, ...)) and save the notebook")
        value = self.records[name].value
        where = name
        for part in path:
            value = _child(value, part, where)
            where = f"{where}/{part}"
        return value

    def param(self, params: Mapping[str, Any], name: str) -> Any:
        """A parameter: a literal, or a recorded value when it is a string starting with $."""
        value = params[name]
        if isinstance(value, str) and value.startswith("$"):
            return self.record(value)
        return value

    def number(self, params: Mapping[str, Any], name: str) -> float:
        return _number(self.param(params, name), _what(params, name))


def _what(params: Mapping[str, Any], name: str) -> str:
    value = params[name]
    return f"recorded {value[1:]}" if isinstance(value, str) and value.startswith("$") else name


def _child(value: Any, part: str, where: str) -> Any:
    if isinstance(value, Mapping):
        if part in value:
            return value[part]
        for k, v in value.items():
            if str(k) == part:
                return v
        try:
            target = float(part)
        except ValueError:
            target = None
        if target is not None:
            for k, v in value.items():
                if _as_key_number(k) == target:
                    return v
        have = ", ".join(str(k) for k in list(value)[:12])
        raise CheckFailed(f"the recorded {where} has no entry {part!r} (it has: {have or 'none'})")
    if isinstance(value, list) and re.fullmatch(r"-?\d+", part):
        i = int(part)
        if -len(value) <= i < len(value):
            return value[i]
        raise CheckFailed(f"the recorded {where} has {len(value)} entries; no entry {part}")
    raise CheckFailed(f"the recorded {where} is {_fmt(value)}, not a table with entry {part!r}")


def _number(value: Any, what: str) -> float:
    if not _is_number(value):
        raise CheckFailed(f"{what} is {_fmt(value)}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise CheckFailed(f"{what} is {_fmt(value)}, not a finite number")
    return value


_FRACTION = re.compile(r"\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*")


def _as_key_number(key: Any) -> float | None:
    """A table key as a number: 512, "512", "0.5" and the label "1/2" all read as numbers."""
    if _is_number(key):
        return float(key)
    if isinstance(key, str):
        try:
            return float(key)
        except ValueError:
            pass
        match = _FRACTION.fullmatch(key)
        if match and float(match[2]) != 0:
            return float(match[1]) / float(match[2])
    return None


def _table(value: Any, what: str, key_field: str | None = None,
           value_field: str | None = None) -> list[tuple[Any, float | None]]:
    """A table as (key, number or None) pairs; None marks a missing entry (null, NaN, inf)."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list) and key_field is not None:
        items = []
        for row in value:
            if not isinstance(row, Mapping) or key_field not in row or value_field not in row:
                raise CheckFailed(f"{what} should be a list of rows with fields {key_field!r} "
                                  f"and {value_field!r}; found {_fmt(row)}")
            items.append((row[key_field], row[value_field]))
    elif isinstance(value, list) and all(isinstance(r, list) and len(r) == 2 for r in value):
        items = [(r[0], r[1]) for r in value]
    else:
        raise CheckFailed(f"{what} is {_fmt(value)}, not a table (key -> number)")
    if not items:
        raise CheckFailed(f"{what} is an empty table")
    rows: list[tuple[Any, float | None]] = []
    for k, v in items:
        if v is None or (_is_number(v) and not math.isfinite(v)):
            rows.append((k, None))
        elif _is_number(v):
            rows.append((k, float(v)))
        else:
            raise CheckFailed(f"{what} has entry {k} = {_fmt(v)}, not a number")
    return rows


def _same_key(value: Any, key: Any) -> bool:
    a, b = _as_key_number(value), _as_key_number(key)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    return str(value) == str(key)


def _present(value: Any) -> bool:
    return value is not None and not (_is_number(value) and not math.isfinite(value))


def _filtered_rows(raw: Any, p: Mapping[str, Any]) -> Any:
    """Rows without a value in any ``dropna`` field (null, NaN) are left out."""
    if "dropna" not in p or not isinstance(raw, list):
        return raw
    return [r for r in raw
            if not isinstance(r, Mapping) or all(_present(r.get(f)) for f in p["dropna"])]


def _items(raw: Any, item: int, what: str) -> Any:
    """Each entry of a table whose values are lists, replaced by its element ``item``."""
    if not isinstance(raw, Mapping):
        raise CheckFailed(f"{what} is {_fmt(raw)}, not a table of lists")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, list) or not -len(v) <= item < len(v):
            raise CheckFailed(f"{what} has entry {k} = {_fmt(v)}, not a list with an element "
                              f"{item}")
        out[k] = v[item]
    return out


def _arg_best(ctx: _Context, p: Mapping[str, Any], best: Callable[..., float],
              word: str) -> tuple[bool, str]:
    name = p["record"]
    answer = ctx.record(name)
    what = f"recorded {_r(p, 'table')}"
    raw = _filtered_rows(ctx.param(p, "table"), p)
    if "item" in p:
        raw = _items(raw, int(p["item"]), what)
        what = f"element {p['item']} of each entry of {what}"
    rows = _table(raw, what, p.get("key_field"), p.get("value_field"))
    finite = [(k, v) for k, v in rows if v is not None]
    if isinstance(answer, list | Mapping):
        raise CheckFailed(f"recorded {name} is {_fmt(answer)}, not a single entry of the table")
    if not finite:
        if answer is None:
            return True, f"{name} is None, as no entry of {what} is finite"
        return False, f"{name} = {_fmt(answer)}, but no entry of {what} is finite: it has no {word}"
    target = best(v for _, v in finite)
    winners = [k for k, v in finite if v == target]
    if answer is not None and any(_same_key(answer, k) for k in winners):
        return True, f"{name} = {_fmt(answer)} is the {word} of {what} ({_fmt(target)})"
    return False, (f"{name} = {_fmt(answer)}, but the {word} of {what} is at "
                   f"{' or '.join(str(k) for k in winners)} ({_fmt(target)})")


def _rule_argmin(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    return _arg_best(ctx, p, min, "argmin")


def _rule_argmax(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    return _arg_best(ctx, p, max, "argmax")


def _tolerances(p: Mapping[str, Any], rtol: float, atol: float = 0.0) -> tuple[float, float]:
    return float(p.get("rtol", rtol)), float(p.get("atol", atol))


def _rule_equals(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    value = ctx.record(p["record"])
    expected = ctx.param(p, "expected")
    if _is_number(value) and _is_number(expected):
        ok = _close(float(value), float(expected), 1e-9, 0.0)
    else:
        ok = value == expected
    verb = "equals" if ok else "should equal"
    return ok, f"{p['record']} = {_fmt(value)} {verb} {_fmt(expected)}"


def _rule_one_of(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    value = ctx.record(p["record"])
    options = p["options"]
    ok = any((_is_number(value) and _is_number(o) and float(value) == float(o)) or value == o
             for o in options)
    verb = "is one of" if ok else "should be one of"
    return ok, f"{p['record']} = {_fmt(value)} {verb} {', '.join(_fmt(o) for o in options)}"


def _rule_range(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    raw = ctx.record(name)
    low = ctx.number(p, "min") if "min" in p else -math.inf
    high = ctx.number(p, "max") if "max" in p else math.inf
    span = f"[{_fmt(low)}, {_fmt(high)}]"
    if isinstance(raw, Mapping | list):
        rows = _table(raw, f"recorded {name}")
        bad = [(k, v) for k, v in rows if v is None or not low <= v <= high]
        if bad:
            shown = ", ".join(f"{k}: {_fmt(v)}" for k, v in bad[:4])
            return False, f"entries of {name} outside {span}: {shown}"
        return True, f"every entry of {name} lies in {span}"
    value = _number(raw, f"recorded {name}")
    if low <= value <= high:
        return True, f"{name} = {_fmt(value)} lies in {span}"
    return False, f"{name} = {_fmt(value)} is outside {span}"


def _mismatches(value: Any, expected: Any, rtol: float, atol: float, where: str) -> list[str]:
    """Where ``value`` differs from ``expected`` (numbers within tolerance; lists and tables
    entry by entry; anything else exactly)."""
    if isinstance(expected, Mapping):
        if not isinstance(value, Mapping):
            return [f"{where} is {_fmt(value)}, not a table"]
        out = []
        for k, e in expected.items():
            match = [v for kk, v in value.items() if _same_key(kk, k)]
            out += ([f"{where}/{k} is missing"] if not match
                    else _mismatches(match[0], e, rtol, atol, f"{where}/{k}"))
        extra = [kk for kk in value if not any(_same_key(kk, k) for k in expected)]
        return out + [f"{where}/{k} is not expected" for k in extra]
    if isinstance(expected, list):
        if not isinstance(value, list) or len(value) != len(expected):
            return [f"{where} is {_fmt(value)}, not a list of {len(expected)}"]
        return [m for i, (v, e) in enumerate(zip(value, expected, strict=True))
                for m in _mismatches(v, e, rtol, atol, f"{where}[{i}]")]
    if _is_number(expected):
        if not _is_number(value) or not math.isfinite(value):
            return [f"{where} is {_fmt(value)}, not a number"]
        if not _close(float(value), float(expected), rtol, atol):
            return [f"{where} = {_fmt(value)}, expected {_fmt(expected)}"]
        return []
    return [] if value == expected else [f"{where} = {_fmt(value)}, expected {_fmt(expected)}"]


def _rule_tolerance(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    value = ctx.record(name)
    expected = ctx.param(p, "expected")
    rtol, atol = _tolerances(p, 0.0)
    if not isinstance(expected, Mapping | list):
        value = _number(value, f"recorded {name}")
        expected = _number(expected, _what(p, "expected"))
        if _close(value, expected, rtol, atol):
            return True, f"{name} = {_fmt(value)} is within tolerance of {_fmt(expected)}"
        return False, (f"{name} = {_fmt(value)} is not within {_fmt(atol)} + {_fmt(rtol)} x "
                       f"|{_fmt(expected)}| of {_fmt(expected)}")
    bad = _mismatches(value, expected, rtol, atol, name)
    if bad:
        return False, (f"{'; '.join(bad[:3])} (tolerance {_fmt(atol)} + {_fmt(rtol)} x "
                       "|expected|)")
    return True, f"every entry of {name} is within tolerance of the expected values"


def _rule_lookup(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    key = ctx.param(p, "key")
    what = f"recorded {_r(p, 'table')}"
    rows = _table(_filtered_rows(ctx.param(p, "table"), p), what, p.get("key_field"),
                  p.get("value_field"))
    if key is None:
        try:
            value = ctx.record(name)
        except CheckFailed:
            return True, f"{_r(p, 'key')} is None and {name} is absent"
        return value is None, f"{_r(p, 'key')} is None, so {name} should be None or absent"
    value = ctx.record(name)
    match = [v for k, v in rows if _same_key(k, key)]
    if not match:
        raise CheckFailed(f"{what} has no entry {key!r} (the recorded {_r(p, 'key')})")
    want = match[0]
    if want is None:
        ok = not _present(value)
    else:
        ok = _is_number(value) and _close(float(value), want, *_tolerances(p, 1e-9))
    text = f"{name} = {_fmt(value)}"
    if ok:
        return True, f"{text} is the entry {key} of {what}"
    return False, f"{text}, but the entry {key} of {what} is {_fmt(want)}"


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share the average of their ranks
        i = j + 1
    return ranks


def _spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's of the average ranks); None when undefined."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _rule_rank_correlation(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    value = ctx.record(name)
    rows_name = _r(p, "rows")
    rows = ctx.param(p, "rows")
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise CheckFailed(f"recorded {rows_name} is {_fmt(rows)}, not a list of rows")
    fx, fy = p["x"], p["y"]
    need = list(dict.fromkeys([*p.get("dropna", []), fx, fy]))
    xs, ys = [], []
    for row in rows:
        if all(_present(row.get(f)) for f in need):
            xs.append(_number(row[fx], f"{fx} in recorded {rows_name}"))
            ys.append(_number(row[fy], f"{fy} in recorded {rows_name}"))
    want = _spearman(xs, ys)
    what = f"Spearman's rank correlation of {fx} and {fy} over the {len(xs)} complete rows"
    if want is None:
        ok = not _present(value)
    else:
        ok = _is_number(value) and _close(float(value), want, *_tolerances(p, 1e-6, 1e-9))
    if ok:
        return True, f"{name} = {_fmt(value)} is {what} of {rows_name}"
    return False, f"{name} = {_fmt(value)}, but {what} of {rows_name} is {_fmt(want)}"


def _rule_flag_in_range(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    flag = ctx.record(name)
    if not isinstance(flag, bool):
        raise CheckFailed(f"recorded {name} is {_fmt(flag)}, not true or false")
    value = ctx.number(p, "value")
    low, high = ctx.number(p, "min"), ctx.number(p, "max")
    truth = low <= value <= high
    ref = p["value"]
    subject = f"{ref[1:]} = {_fmt(value)}" if isinstance(ref, str) else _fmt(value)
    text = f"{subject} is {'' if truth else 'not '}in [{_fmt(low)}, {_fmt(high)}]"
    if flag == truth:
        return True, f"{name} = {flag}: {text}"
    return False, f"{name} = {flag}, but {text}"


def _rule_delta_ratio(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    value = ctx.record(name)
    plan_name = _r(p, "plan")
    plan = ctx.param(p, "plan")
    if isinstance(value, Mapping):
        if not isinstance(plan, Mapping):
            raise CheckFailed(f"recorded {plan_name} is {_fmt(plan)}, not a table like {name}")
        keys = list(dict.fromkeys([*value, *plan]))
        pairs = [(f"{name}/{k}", value.get(k), f"{plan_name}/{k}", plan.get(k)) for k in keys]
    else:
        pairs = [(name, value, plan_name, plan)]
    bad = []
    for v_name, ratios, pl_name, pl in pairs:
        if ratios is None:
            bad.append(f"{v_name} is missing")
            continue
        if not isinstance(pl, Mapping) or not isinstance(pl.get("lr"), list) \
                or not isinstance(pl.get("batch_size"), list) or not pl["lr"]:
            bad.append(f"recorded {pl_name} has no lists lr and batch_size")
            continue
        lrs = [_number(x, f"lr in recorded {pl_name}") for x in pl["lr"]]
        bss = [_number(x, f"batch_size in recorded {pl_name}") for x in pl["batch_size"]]
        if len(lrs) != len(bss) or lrs[0] <= 0 or min(bss) <= 0:
            raise CheckFailed(f"recorded {pl_name} needs lr > 0 and batch sizes > 0 of equal "
                              "length")
        want = [(lr / lrs[0]) * math.sqrt(bss[0] / b) for lr, b in zip(lrs, bss, strict=True)]
        bad += _mismatches(ratios, want, *_tolerances(p, 1e-6), v_name)
    if bad:
        return False, (f"{name} does not follow delta_e / delta_0 = (lr_e / lr_0) "
                       f"sqrt(b_0 / b_e) of {plan_name}: {'; '.join(bad[:3])}")
    return True, f"{name} follows delta_e / delta_0 = (lr_e / lr_0) sqrt(b_0 / b_e) of {plan_name}"


def _rule_recorded(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    value = ctx.record(name)
    kind = p.get("kind", "any")
    if kind == "number":
        _number(value, f"recorded {name}")
    elif kind == "table":
        rows = _table(value, f"recorded {name}")
        need = int(p.get("min_entries", 1))
        have = sum(v is not None for _, v in rows)
        if have < need:
            return False, f"{name} has {have} finite entries; at least {need} are needed"
    elif kind == "text" and not isinstance(value, str):
        raise CheckFailed(f"recorded {name} is {_fmt(value)}, not text")
    return True, f"{name} is recorded"


_MISSING = object()
_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: sum(v) / len(v), "min": min, "max": max, "sum": sum,
}


def _matches(value: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(value, w) for w in want)
    if _is_number(value) and _is_number(want):
        return math.isclose(float(value), float(want), rel_tol=1e-12)
    return value == want


def _rule_aggregate(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    table = ctx.record(name)
    rows_name = _r(p, "rows")
    rows = ctx.param(p, "rows")
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise CheckFailed(f"recorded {rows_name} is {_fmt(rows)}, not a list of rows")
    fields = [p["key_field"]] if isinstance(p["key_field"], str) else list(p["key_field"])
    value_field = p["value_field"]
    where = {f: ctx.param(p["where"], f) for f in p.get("where", {})}
    reduce = p.get("reduce", "mean")
    groups: dict[tuple[Any, ...], list[float | None]] = {}
    for row in rows:
        for f in [*where, *fields, value_field]:
            if f not in row:
                raise CheckFailed(f"a row of recorded {rows_name} has no field {f!r}")
        if not all(_matches(row[f], want) for f, want in where.items()):
            continue
        v = row[value_field]
        if v is not None and not _is_number(v):
            raise CheckFailed(f"recorded {rows_name} has {value_field} = {_fmt(v)}, not a "
                              "number")
        finite = v is not None and math.isfinite(v)
        groups.setdefault(tuple(row[f] for f in fields), []).append(float(v) if finite else None)
    if not groups:
        raise CheckFailed(f"no row of recorded {rows_name} matches {where}")
    what = f"the {reduce} of {value_field} over recorded {rows_name} by {', '.join(fields)}"
    bad = []
    for group, values in groups.items():
        finite = [v for v in values if v is not None]
        want = _REDUCE[reduce](finite) if finite else None
        node: Any = table
        for part in group:
            match = [k for k in node if _same_key(k, part)] if isinstance(node, Mapping) else []
            node = node[match[0]] if match else _MISSING
            if node is _MISSING:
                break
        label = "/".join(str(g) for g in group)
        if node is _MISSING:
            bad.append(f"no entry {label}")
        elif want is None:
            if node is not None and not (_is_number(node) and not math.isfinite(node)):
                bad.append(f"{label}: {_fmt(node)} (no finite value in the rows)")
        elif not _is_number(node) or not _close(float(node), want, *_tolerances(p, 1e-6)):
            bad.append(f"{label}: {_fmt(node)} (rows give {_fmt(want)})")
    extra = [path for path in _leaf_paths(table, len(fields))
             if not any(all(_same_key(a, b) for a, b in zip(path, g, strict=True))
                        for g in groups)]
    bad += [f"entry {'/'.join(map(str, path))} has no rows" for path in extra]
    if bad:
        return False, f"{name} does not match {what}: {'; '.join(bad[:3])}"
    return True, f"{name} matches {what}"


def _leaf_paths(node: Any, depth: int) -> list[tuple[Any, ...]]:
    if depth == 0:
        return [()]
    if not isinstance(node, Mapping):
        raise CheckFailed(f"{_fmt(node)} is not a table nested {depth} level(s) deep")
    return [(k, *rest) for k, v in node.items() for rest in _leaf_paths(v, depth - 1)]


def _point(value: Any, what: str) -> list[float]:
    if isinstance(value, list):
        return [_number(v, what) for v in value]
    return [_number(value, what)]


def _rule_within(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    answer = ctx.record(name)
    points = ctx.param(p, "point")
    center = ctx.param(p, "center")
    radius = ctx.number(p, "radius")
    point_name = _r(p, "point")
    if isinstance(answer, Mapping):
        if not isinstance(points, Mapping):
            raise CheckFailed(f"recorded {point_name} is {_fmt(points)}, not a table like "
                              f"{name}")
        missing = [k for k in answer if k not in points]
        if missing:
            raise CheckFailed(f"recorded {point_name} has no entry {missing[0]!r}")
        pairs = [(f"{name}/{k}", a, f"{point_name}/{k}", points[k]) for k, a in answer.items()]
    else:
        pairs = [(name, answer, point_name, points)]
    bad = []
    for a_name, a, pt_name, pt in pairs:
        if not isinstance(a, bool):
            raise CheckFailed(f"recorded {a_name} is {_fmt(a)}, not true or false")
        x = _point(pt, f"recorded {pt_name}")
        c = _point(center, "center")
        c = c * len(x) if len(c) == 1 else c
        if len(c) != len(x):
            raise CheckFailed(f"recorded {pt_name} has {len(x)} coordinates; the center has "
                              f"{len(c)}")
        dist = math.dist(x, c)
        if a != (dist < radius):
            bad.append(f"{a_name} = {a}, but {pt_name} = {_fmt(x)} is {_fmt(dist)} from "
                       f"{_fmt(c)}")
    if bad:
        return False, f"{'; '.join(bad[:3])} (radius {_fmt(radius)})"
    return True, f"{name} agrees with the distance of {point_name} to {_fmt(center)}"


def _rule_test_cell(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    gid = p.get("cell", ctx.question.grade_id)
    where = ctx.cells.get(gid, [])
    if not where:
        raise CheckFailed(f"the test cell {gid!r} is missing from the notebook")
    if len(where) > 1:
        raise CheckFailed(f"the test cell {gid!r} appears {len(where)} times")
    cell = ctx.nb.cells[where[0]]
    released = ctx.release.cell(gid)
    if cell.get("cell_type") != "code":
        raise CheckFailed(f"the test cell {gid!r} is not a code cell any more")
    if (released is not None and released.locked
            and _normalized_source(cell.get("source", "")) != released.source):
        return False, (f"the locked test cell {gid!r} was edited, so its saved result does not "
                       "count; restore it from the lab and re-run it")
    if cell.get("execution_count") is None:
        if not ctx.has_outputs:
            raise _NoOutputs(f"no saved outputs, so no result of the test cell {gid!r}")
        return False, f"the test cell {gid!r} was not run (it has no execution count)"
    for out in cell.get("outputs") or []:
        if out.get("output_type") == "error":
            return False, (f"the test cell {gid!r} failed: {out.get('ename', 'Error')}: "
                           f"{str(out.get('evalue', ''))[:200]}")
    return True, f"the test cell {gid!r} ran without error"


def _check_domain(args: Mapping[str, float]) -> None:
    for name, value in args.items():
        if name in ("lr", "eps") and not value > 0:
            raise CheckFailed(f"{name} = {_fmt(value)} must be > 0")
        if name in ("c2", "k2") and not value >= 0:
            raise CheckFailed(f"{name} = {_fmt(value)} must be >= 0")
        if name == "beta" and not 0 <= value < 1:
            raise CheckFailed(f"beta = {_fmt(value)} must be in [0, 1)")
        if name in ("batch_size", "b_star") and not value >= 1:
            raise CheckFailed(f"{name} = {_fmt(value)} must be >= 1")


def _rule_c2_bound(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
    name = p["record"]
    raw = ctx.record(name)
    if ctx.param(p, "b_star") is None:
        ok = raw is None
        return ok, (f"{name} is {_fmt(raw)}; {_r(p, 'b_star')} is None (no batch size reached "
                    f"eps), so there is no bound{'' if ok else ' and it should be None'}")
    value = _number(raw, f"recorded {name}")
    optimizer = ctx.param(p, "optimizer")
    if not isinstance(optimizer, str) or optimizer.lower() not in critical.OPTIMIZERS:
        raise CheckFailed(f"{_what(p, 'optimizer')} is {_fmt(optimizer)}; expected one of "
                          f"{', '.join(critical.OPTIMIZERS)}")
    optimizer = optimizer.lower()
    args = {n: ctx.number(p, n) for n in ("b_star", "lr", "eps")}
    beta = 0.0
    if optimizer != "sgd":
        if "beta" not in p:
            raise CheckFailed(f"the key gives no beta for optimizer {optimizer}")
        beta = ctx.number(p, "beta")
        args["beta"] = beta
        if optimizer == "shb" and beta == 0:
            raise CheckFailed("beta = 0 makes Theorem 4.4's SHB bound undefined")
    _check_domain(args)
    if not math.isfinite(args["b_star"]) or args["b_star"] != int(args["b_star"]):
        raise CheckFailed(f"b_star = {_fmt(args['b_star'])} is not a whole batch size")
    bound = critical.c2_upper_bound(optimizer, critical_batch_size=int(args["b_star"]),
                                    lr=args["lr"], eps=args["eps"],
                                    beta=None if optimizer == "sgd" else beta)
    rtol, atol = _tolerances(p, 1e-6)
    inputs = ", ".join(f"{k} = {_fmt(v)}" for k, v in args.items())
    if _close(value, bound, rtol, atol):
        return True, f"{name} = {_fmt(value)} is Theorem 4.4's C^2 bound for {optimizer} ({inputs})"
    return False, (f"{name} = {_fmt(value)}, but Theorem 4.4 for {optimizer} with {inputs} "
                   f"gives the bound C^2 < {_fmt(bound)}")


def _delta_rule(formula: Callable[..., float], args: Sequence[str],
                label: str) -> Callable[[_Context, Mapping[str, Any]], tuple[bool, str]]:
    def rule(ctx: _Context, p: Mapping[str, Any]) -> tuple[bool, str]:
        name = p["record"]
        raw = ctx.record(name)
        values = {n: ctx.number(p, n) for n in args}
        _check_domain(values)
        if "batch_size" in p:
            b = ctx.number(p, "batch_size")
            _check_domain({"batch_size": b})
            rows: list[tuple[Any, float | None]] = [(b, _number(raw, f"recorded {name}"))]
        else:
            rows = _table(raw, f"recorded {name}")
        rtol, atol = _tolerances(p, 1e-6)
        bad = []
        for key, got in rows:
            b = _as_key_number(key)
            if b is None or b < 1:
                raise CheckFailed(f"recorded {name} has key {key!r}, not a batch size")
            want = formula(batch_size=b, **values)
            if got is None or not _close(got, want, rtol, atol):
                bad.append(f"b = {_fmt(b)}: {_fmt(got)} (eq. gives {_fmt(want)})")
        inputs = ", ".join(f"{k} = {_fmt(v)}" for k, v in values.items())
        if bad:
            return False, f"{name} does not follow {label} with {inputs}: {'; '.join(bad[:3])}"
        return True, f"{name} follows {label} ({inputs})"

    return rule


@dataclass(frozen=True)
class RuleSpec:
    """A named rule of the key: its function, parameters, and a one-line description."""

    func: Callable[[_Context, Mapping[str, Any]], tuple[bool, str]]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    describe: Callable[[Mapping[str, Any]], str]


def _r(p: Mapping[str, Any], name: str) -> str:
    v = p.get(name)
    return str(v)[1:] if isinstance(v, str) and v.startswith("$") else str(v)


_DELTA_LABEL = "{} follows eq. ({}) from the recorded inputs"

#: The rules a key can use, by name. Parameters that name a recorded value start with ``$``
#: (``$sfo_table/shb``); ``record`` always names one (the ``$`` is optional there).
RULES: dict[str, RuleSpec] = {
    "test_cell": RuleSpec(_rule_test_cell, (), ("cell",),
                          lambda p: f"test cell {p.get('cell', 'of the question')} ran without "
                          "error"),
    "recorded": RuleSpec(_rule_recorded, ("record",), ("kind", "min_entries"),
                         lambda p: f"{_r(p, 'record')} is recorded"),
    "equals": RuleSpec(_rule_equals, ("record", "expected"), (),
                       lambda p: f"{_r(p, 'record')} equals {_r(p, 'expected')}"),
    "one_of": RuleSpec(_rule_one_of, ("record", "options"), (),
                       lambda p: f"{_r(p, 'record')} is one of {p.get('options')}"),
    "range": RuleSpec(_rule_range, ("record",), ("min", "max"),
                      lambda p: f"{_r(p, 'record')} lies in [{_r(p, 'min') if 'min' in p else ''}"
                      f", {_r(p, 'max') if 'max' in p else ''}]"),
    "tolerance": RuleSpec(_rule_tolerance, ("record", "expected"), ("rtol", "atol"),
                          lambda p: f"{_r(p, 'record')} is close to {_r(p, 'expected')}"),
    "argmin": RuleSpec(_rule_argmin, ("record", "table"),
                       ("key_field", "value_field", "dropna", "item"),
                       lambda p: f"{_r(p, 'record')} is the argmin of {_r(p, 'table')}"),
    "argmax": RuleSpec(_rule_argmax, ("record", "table"),
                       ("key_field", "value_field", "dropna", "item"),
                       lambda p: f"{_r(p, 'record')} is the argmax of {_r(p, 'table')}"),
    "lookup": RuleSpec(_rule_lookup, ("record", "table", "key"),
                       ("key_field", "value_field", "dropna", "rtol", "atol"),
                       lambda p: f"{_r(p, 'record')} is the entry {_r(p, 'key')} of "
                       f"{_r(p, 'table')}"),
    "rank_correlation": RuleSpec(_rule_rank_correlation, ("record", "rows", "x", "y"),
                                 ("dropna", "rtol", "atol"),
                                 lambda p: f"{_r(p, 'record')} is Spearman's rank correlation "
                                 f"of {p.get('x')} and {p.get('y')} in {_r(p, 'rows')}"),
    "flag_in_range": RuleSpec(_rule_flag_in_range, ("record", "value", "min", "max"), (),
                              lambda p: f"{_r(p, 'record')} says whether {_r(p, 'value')} lies "
                              f"in [{_r(p, 'min')}, {_r(p, 'max')}]"),
    "delta_ratio": RuleSpec(_rule_delta_ratio, ("record", "plan"), ("rtol", "atol"),
                            lambda p: f"{_r(p, 'record')} follows delta = lr C / sqrt(b) "
                            f"along {_r(p, 'plan')}"),
    "aggregate": RuleSpec(_rule_aggregate, ("record", "rows", "key_field", "value_field"),
                          ("where", "reduce", "rtol", "atol"),
                          lambda p: f"{_r(p, 'record')} is the {p.get('reduce', 'mean')} of "
                          f"{p.get('value_field')} over {_r(p, 'rows')}"),
    "within": RuleSpec(_rule_within, ("record", "point", "center", "radius"), (),
                       lambda p: f"{_r(p, 'record')} says whether {_r(p, 'point')} lies within "
                       f"{_r(p, 'radius')} of {_r(p, 'center')}"),
    "c2_bound": RuleSpec(_rule_c2_bound, ("record", "optimizer", "b_star", "lr", "eps"),
                         ("beta", "rtol", "atol"),
                         lambda p: f"{_r(p, 'record')} is Theorem 4.4's C^2 bound from "
                         f"{_r(p, 'b_star')}"),
    "delta_sgd": RuleSpec(_delta_rule(critical.delta_sgd, ("lr", "c2"), "eq. (12)"),
                          ("record", "lr", "c2"), ("batch_size", "rtol", "atol"),
                          lambda p: _DELTA_LABEL.format(_r(p, "record"), 12)),
    "delta_shb": RuleSpec(_delta_rule(critical.delta_shb, ("lr", "beta", "c2", "k2"),
                                      "eq. (13)"),
                          ("record", "lr", "beta", "c2", "k2"), ("batch_size", "rtol", "atol"),
                          lambda p: _DELTA_LABEL.format(_r(p, "record"), 13)),
    "delta_nshb": RuleSpec(_delta_rule(critical.delta_nshb, ("lr", "beta", "c2"), "eq. (14)"),
                           ("record", "lr", "beta", "c2"), ("batch_size", "rtol", "atol"),
                           lambda p: _DELTA_LABEL.format(_r(p, "record"), 14)),
}

_CHECK_FIELDS = ("rule", "points", "label", "hint", "for_each", "by_profile")


def _key_error(path: Path, where: str, message: str) -> ValueError:
    return ValueError(f"answer key {str(path)!r}: {where}: {message}")


def _substitute(value: Any, names: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        for n, v in names.items():
            value = value.replace("{" + n + "}", str(v))
        return value
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    if isinstance(value, Mapping):
        return {k: _substitute(v, names) for k, v in value.items()}
    return value


def _parse_checks(path: Path, where: str, spec: Any) -> list[Check]:
    if not isinstance(spec, Mapping):
        raise _key_error(path, where, f"a check must be a mapping with 'rule' and 'points', "
                         f"got {spec!r}")
    rule = spec.get("rule")
    if rule not in RULES:
        raise _key_error(path, where, f"unknown rule {rule!r}; valid rules: "
                         f"{', '.join(sorted(RULES))}")
    rs = RULES[rule]
    points = spec.get("points")
    if not _is_number(points) or not points > 0:
        raise _key_error(path, where, f"points must be a number > 0, got {points!r}")
    params = {k: v for k, v in spec.items() if k not in _CHECK_FIELDS}
    allowed = set(rs.required) | set(rs.optional)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _key_error(path, where, f"rule {rule!r} takes no parameter {unknown[0]!r}; it "
                         f"takes {', '.join(rs.required + rs.optional) or 'none'}")
    missing = [k for k in rs.required if k not in params]
    if missing:
        raise _key_error(path, where, f"rule {rule!r} needs parameter {missing[0]!r}")
    if rule == "range" and "min" not in params and "max" not in params:
        raise _key_error(path, where, "rule 'range' needs 'min', 'max' or both")
    if rule == "tolerance" and "rtol" not in params and "atol" not in params:
        raise _key_error(path, where, "rule 'tolerance' needs 'rtol', 'atol' or both")
    if rule == "one_of" and not isinstance(params["options"], list):
        raise _key_error(path, where, f"'options' must be a list, got {params['options']!r}")
    if "kind" in params and params["kind"] not in ("any", "number", "table", "text"):
        raise _key_error(path, where, f"'kind' must be any, number, table or text, got "
                         f"{params['kind']!r}")
    if "dropna" in params and not (isinstance(params["dropna"], list)
                                   and all(isinstance(f, str) for f in params["dropna"])):
        raise _key_error(path, where, f"dropna must be a list of field names, got "
                         f"{params['dropna']!r}")
    if "item" in params and (isinstance(params["item"], bool)
                             or not isinstance(params["item"], int)):
        raise _key_error(path, where, f"item must be a list index (an int, -1 for the last), "
                         f"got {params['item']!r}")
    if rule == "aggregate":
        kf = params["key_field"]
        if not (isinstance(kf, str) or (isinstance(kf, list) and kf
                                        and all(isinstance(f, str) for f in kf))):
            raise _key_error(path, where, f"key_field must be a field name or a list of them, "
                             f"got {kf!r}")
        if params.get("reduce", "mean") not in _REDUCE:
            raise _key_error(path, where, f"reduce must be one of {', '.join(_REDUCE)}, got "
                             f"{params['reduce']!r}")
        if not isinstance(params.get("where", {}), Mapping):
            raise _key_error(path, where, "where must map a field to a value (or a list of "
                             f"values), got {params['where']!r}")
    for tol in ("rtol", "atol"):
        if tol in params and (not _is_number(params[tol]) or params[tol] < 0):
            raise _key_error(path, where, f"{tol} must be a number >= 0, got {params[tol]!r}")
    by_profile = spec.get("by_profile", {})
    if not isinstance(by_profile, Mapping) or not all(
            isinstance(v, Mapping) for v in by_profile.values()):
        raise _key_error(path, where, "by_profile must map a profile name to parameter "
                         f"overrides, got {by_profile!r}")
    for profile, overrides in by_profile.items():
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise _key_error(path, where, f"by_profile {profile!r} overrides {bad[0]!r}, not a "
                             f"parameter of rule {rule!r}")
    for_each = spec.get("for_each")
    if for_each is None:
        combos: list[dict[str, Any]] = [{}]
    elif (isinstance(for_each, Mapping) and len(for_each) == 1
          and isinstance(next(iter(for_each.values())), list)
          and next(iter(for_each.values()))):
        (var, values), = for_each.items()
        combos = [{var: v} for v in values]
    else:
        raise _key_error(path, where, "for_each must be one name mapped to a non-empty list, "
                         f"e.g. {{opt: [sgd, shb, nshb]}}, got {for_each!r}")
    checks = []
    for names in combos:
        p = _substitute(params, names)
        label = spec.get("label")
        label = _substitute(label, names) if isinstance(label, str) else rs.describe(p)
        hint = spec.get("hint")
        checks.append(Check(rule=rule, points=float(points), params=p, label=label,
                            hint=_substitute(hint, names) if isinstance(hint, str) else None,
                            by_profile=_substitute(dict(by_profile), names)))
    return checks


def load_key(path: str | Path, release: Release | None = None) -> Key:
    """Read and check an answer key (YAML).

    Format (see the README's "For instructors" section)::

        lab: lab3_critical_batch          # the lab's file name without .ipynb
        labkit_version: 0.1.0             # optional: flag records made by another version
        profile: $inputs/profile          # optional: where the profile a student ran is recorded
        questions:
          - grade_id: lab3_critical_batch-q1-test   # the nbgrader test cell of the question
            title: Critical batch sizes             # optional
            cells: [lab3_critical_batch-q1-answer]  # optional; default: same-prefix cells
            checks:
              - {rule: test_cell, points: 1}
              - rule: argmin
                record: critical_batch_size/{opt}
                table: $sfo_table/{opt}
                for_each: {opt: [sgd, shb, nshb]}   # one check per value, each worth points
                points: 1
                by_profile: {smoke: {}}             # parameter overrides per profile

    With ``release``, also checks that every question's grade_id is a graded cell of the lab
    and that each question's points equal that cell's nbgrader points.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the offending entry, for anything malformed.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"answer key {str(path)!r} not found; pass --key KEY.yml or "
                                "put the lab's key at labs/keys/<lab>.yml")
    data, error = _read_regular(path, DEFAULT_MAX_BYTES)
    if data is None:
        raise ValueError(f"answer key {str(path)!r}: {error}")
    try:
        spec = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"answer key {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(spec, Mapping):
        raise _key_error(path, "top level", "expected a mapping with 'lab' and 'questions'")
    unknown = sorted(set(spec) - {"lab", "labkit_version", "profile", "questions"})
    if unknown:
        raise _key_error(path, "top level", f"unknown field {unknown[0]!r}; valid fields: lab, "
                         "labkit_version, profile, questions")
    lab = spec.get("lab")
    if not isinstance(lab, str) or not lab:
        raise _key_error(path, "lab", f"expected the lab's name, got {lab!r}")
    profile = spec.get("profile")
    if profile is not None and not (isinstance(profile, str) and profile.startswith("$")):
        raise _key_error(path, "profile", f"expected a recorded value like $inputs/profile, got "
                         f"{profile!r}")
    version = spec.get("labkit_version")
    questions_spec = spec.get("questions")
    if not isinstance(questions_spec, list) or not questions_spec:
        raise _key_error(path, "questions", "expected a non-empty list of questions")
    questions = []
    seen: set[str] = set()
    for i, q in enumerate(questions_spec):
        where = f"questions[{i}]"
        if not isinstance(q, Mapping) or not isinstance(q.get("grade_id"), str):
            raise _key_error(path, where, "expected a mapping with a grade_id and checks")
        gid = q["grade_id"]
        if gid in seen:
            raise _key_error(path, where, f"grade_id {gid!r} appears twice")
        seen.add(gid)
        bad = sorted(set(q) - {"grade_id", "title", "cells", "checks"})
        if bad:
            raise _key_error(path, where, f"unknown field {bad[0]!r}; valid fields: grade_id, "
                             "title, cells, checks")
        checks_spec = q.get("checks")
        if not isinstance(checks_spec, list) or not checks_spec:
            raise _key_error(path, where, "expected a non-empty list of checks")
        checks: list[Check] = []
        for j, c in enumerate(checks_spec):
            checks += _parse_checks(path, f"{where}.checks[{j}]", c)
        cells = q.get("cells")
        if cells is not None and not (isinstance(cells, list)
                                      and all(isinstance(c, str) for c in cells)):
            raise _key_error(path, where, f"cells must be a list of grade_ids, got {cells!r}")
        if cells is None:
            prefix = gid.rsplit("-", 1)[0] + "-"
            cells = [g for g in (release.grade_ids if release else ()) if g.startswith(prefix)]
        cells = list(dict.fromkeys([gid, *cells]))
        questions.append(Question(grade_id=gid, title=str(q.get("title") or gid),
                                  checks=tuple(checks), cells=tuple(cells)))
    key = Key(path=path, lab=lab, questions=tuple(questions),
              labkit_version=None if version is None else str(version), profile=profile)
    if release is not None:
        _check_key_against(key, release)
    return key


def _check_key_against(key: Key, release: Release) -> None:
    if key.lab != release.lab:
        raise _key_error(key.path, "lab", f"the key is for {key.lab!r}, but --lab is "
                         f"{release.lab!r}")
    for i, q in enumerate(key.questions):
        where = f"questions[{i}]"
        cell = release.cell(q.grade_id)
        if cell is None or not cell.grade:
            raise _key_error(key.path, where, f"{q.grade_id!r} is not a graded cell (nbgrader "
                             f"grade: true) of {release.lab}; graded cells: "
                             f"{', '.join(c.grade_id for c in release.cells if c.grade)}")
        if cell.points is not None and not math.isclose(q.points, cell.points):
            raise _key_error(key.path, where, f"the checks of {q.grade_id!r} award "
                             f"{q.points:g} points, but the lab gives that cell points: "
                             f"{cell.points:g}; make them equal so labkit grade and nbgrader "
                             "agree")
        for c in q.cells:
            if release.cell(c) is None:
                raise _key_error(key.path, where, f"cell {c!r} is not a grade_id of "
                                 f"{release.lab}")
        for check in q.checks:
            if check.rule == "test_cell":
                gid = check.params.get("cell", q.grade_id)
                if release.cell(gid) is None:
                    raise _key_error(key.path, where, f"test_cell names {gid!r}, not a grade_id "
                                     f"of {release.lab}")


# ---------------------------------------------------------------------------------------------
# Reading submissions
# ---------------------------------------------------------------------------------------------


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"' + r"|'[^'\\]*(?:\\.[^'\\]*)*'", re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}()")
_DEPTH_STEP = [1 if b in b"[{(" else -1 if b in b"]})" else 0 for b in range(256)]


def _too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON (or a Python literal) ``text`` nests brackets more than ``limit`` deep.

    Found without parsing and without recursion, at C speed (a few seconds for 20 MiB of
    brackets): quoted strings are dropped first (brackets in them do not count), then the
    running depth of the brackets left is followed to its maximum.
    """
    if '"' in text or "'" in text:
        text = _JSON_STRING.sub("", text)
    skeleton = text.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKET)
    if len(skeleton) <= limit:
        return False
    if re.search(rb"[\[{(]{%d}" % (limit + 1), skeleton):
        return True
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, skeleton))) > limit


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is (a named pipe is never opened for reading)."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(kind: str) -> str:
    if kind == "a folder":
        return "cannot read: it is a folder, not a notebook file"
    return f"cannot read: it is {kind}, not a regular file; only regular notebook files are read"


def _read_regular(path: Path, max_bytes: int | None) -> tuple[bytes | None, str | None]:
    """The bytes of the regular file ``path``, or why it is not read.

    Only a regular file is opened: a named pipe, a socket or a device gets a reason at once and
    never blocks, and the file opened is checked again (it may have been swapped since the
    first look). At most ``max_bytes + 1`` bytes are read.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return None, "cannot read: a broken symbolic link (its target does not exist)"
        return None, "cannot read: no such file"
    except (OSError, RuntimeError) as e:  # ELOOP (a loop of links), EACCES, ENAMETOOLONG, ...
        return None, f"cannot read: {getattr(e, 'strerror', None) or e}"
    kind = _file_kind(st.st_mode)
    if kind is not None:
        return None, _not_regular(kind)
    if max_bytes is not None and st.st_size > max_bytes:
        return None, (f"file is {st.st_size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB "
                      "limit (--max-size); clear large outputs (images) and resubmit, or raise "
                      "the limit")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    try:
        with os.fdopen(fd, "rb") as f:
            kind = _file_kind(os.fstat(f.fileno()).st_mode)
            if kind is not None:
                return None, _not_regular(kind)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    if max_bytes is not None and len(data) > max_bytes:
        return None, f"file is over the {max_bytes / 2**20:g} MiB limit (--max-size)"
    return data, None


def read_notebook(path: str | Path, max_bytes: int | None = DEFAULT_MAX_BYTES
                  ) -> tuple[Any | None, str | None]:
    """Read ``path`` as an nbformat 4 notebook without executing anything.

    Returns ``(notebook, None)``, or ``(None, reason)`` when the file cannot be graded: not a
    regular file (a folder, a named pipe, a device), too large, unreadable, not UTF-8, nested
    more than :data:`MAX_DEPTH` deep, not JSON, JSON but not a notebook, an older nbformat, or
    not valid against the nbformat 4 schema. Size and depth are checked before the JSON is
    parsed, and any failure of the parsers themselves is a reason too: this never raises for a
    file's content.
    """
    path = Path(path)
    data, error = _read_regular(path, max_bytes)
    if data is None:
        return None, error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not a notebook: not UTF-8 text (byte {e.start})"
    if _too_deep(text):
        return None, (f"not a notebook: its JSON nests lists and objects more than {MAX_DEPTH} "
                      "levels deep (a lab notebook needs about 12), so it was not parsed")
    try:
        raw = json.loads(text)
    except ValueError as e:
        return None, f"not a notebook: not valid JSON ({str(e)[:200]})"
    except (RecursionError, MemoryError) as e:
        return None, f"not a notebook: the JSON could not be parsed ({type(e).__name__})"
    if not isinstance(raw, dict) or "nbformat" not in raw or (
            "cells" not in raw and "worksheets" not in raw):
        return None, ("not a notebook: valid JSON, but without the 'nbformat' and 'cells' "
                      "fields of a Jupyter notebook")
    major = raw.get("nbformat")
    if major != 4:
        if isinstance(major, int) and major < 4:
            return None, (f"an nbformat {major} notebook (IPython 3 or older); the labs are "
                          "nbformat 4: open the lab in a current Jupyter, redo it and resubmit")
        return None, f"not a notebook this grader reads: nbformat {_fmt(major)} (expected 4)"
    if not isinstance(raw.get("cells"), list):
        return None, "not a notebook: 'cells' is not a list"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nbformat.validate(nbformat.from_dict(raw))
        nb = nbformat.v4.to_notebook_json(raw)
    except (nbformat.ValidationError, AttributeError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"not a valid nbformat 4 notebook: {first[:200]}"
    except (RecursionError, MemoryError) as e:
        return None, ("not a valid nbformat 4 notebook: it could not be checked "
                      f"({type(e).__name__})")
    return nb, None


@dataclass(frozen=True)
class Submission:
    """One student's submission: the id, the notebook path, or why none was found, and notes
    about how it was found (a link inside the submissions folder)."""

    student: str
    path: Path
    error: str | None = None
    flags: tuple[str, ...] = ()


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


@dataclass(frozen=True)
class _Root:
    """A submissions folder as given (``path``) and as it really is (``real``): nothing found
    under it is followed out of ``real`` through a symbolic link."""

    path: Path
    real: Path

    @classmethod
    def of(cls, folder: Path) -> _Root:
        try:
            return cls(folder, folder.resolve(strict=True))
        except (OSError, RuntimeError):
            return cls(folder, Path(os.path.abspath(folder)))

    def check(self, path: Path, what: str) -> tuple[str | None, tuple[str, ...]]:
        """``(error, flags)`` for ``path`` (``self.path / ...``), the student's ``what``: an
        error when a symbolic link on the way leads out of the root (it is not followed) or
        loops; a flag when a link leads elsewhere inside the root."""
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            return None, ()  # missing, or a broken link: reading it says which
        except (OSError, RuntimeError):
            return f"cannot read: {what} is a loop of symbolic links", ()
        if real == self.real / path.relative_to(self.path):
            return None, ()
        if not real.is_relative_to(self.real):
            return (f"not graded: {what} is a symbolic link to {real.as_posix()}, outside the "
                    f"submissions folder {self.real.as_posix()}; links out of it are not "
                    "followed (to grade the target, pass it itself)"), ()
        inside = real.relative_to(self.real).as_posix() or "."
        return None, (f"{what} is a symbolic link to {inside} in the submissions folder: check "
                      "that it is this student's own work",)


def _notebooks_under(folder: Path) -> tuple[list[Path], list[str]]:
    """The notebooks under a student's ``folder`` (hidden names skipped), and the linked folders
    not searched because they lead out of it (into another student's folder, say). Linked
    folders inside it are searched once each; nothing recurses, so no nesting or loop of links
    can stop this."""
    mine = _Root.of(folder)
    found: list[Path] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(current) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if _hidden(entry.name):
                continue
            child = current / entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(child)
            elif entry.is_symlink() and child.is_dir():
                if mine.check(child, "a folder")[0] is None:
                    stack.append(child)
                else:
                    skipped.append(f"{child.relative_to(folder).as_posix()} -> "
                                   f"{os.readlink(child)}")
            elif entry.name.endswith(".ipynb"):
                found.append(child)
    return sorted(found), skipped


def _student_id(path: Path, student_from: str, default: str, folder_name: str) -> str | None:
    if student_from == "auto":
        return default
    if student_from == "file":
        return path.stem
    if student_from == "folder":
        return folder_name
    match = re.search(student_from[len("regex:"):], path.as_posix())
    if match is None:
        return None
    if "student" in match.re.groupindex:
        return match["student"]
    return match[1] if match.re.groups else match[0]


def _check_student_from(student_from: str) -> None:
    if student_from in ("auto", "file", "folder"):
        return
    if student_from.startswith("regex:"):
        try:
            re.compile(student_from[len("regex:"):])
        except re.error as e:
            raise ValueError(f"student_from {student_from!r}: invalid regular expression: "
                             f"{e}") from None
        return
    raise ValueError(f"student_from must be auto, file, folder or regex:PATTERN, got "
                     f"{student_from!r}")


#: What :func:`find_submissions` finds per student: the notebook (or folder), the default id,
#: the folder id, an error, flags.
_Found = tuple[Path, str, str, str | None, tuple[str, ...]]


def find_submissions(paths: Iterable[str | Path], lab: str, student_from: str = "auto"
                     ) -> list[Submission]:
    """Expand SUBMISSIONS into one :class:`Submission` per student.

    A notebook path is one student's (id: the file name without .ipynb). A folder is a class:
    each notebook directly inside is one student's (id: the file name), and each subfolder is one
    student's (id: the subfolder's name; nbgrader's ``submitted/<student>/<assignment>/`` layout)
    holding one notebook, or several of which one is named ``<lab>.ipynb``.

    Symbolic links are not followed out of the submissions folder (the folder given, or for a
    notebook given, the folder holding it): such a notebook or student folder gets an error
    naming the link's target, and a link that stays inside is followed and flagged. Only
    regular files are read later (:func:`read_notebook`).

    ``student_from``: ``auto`` (as above), ``file`` (always the notebook's file name), ``folder``
    (the student subfolder's name, or for a notebook given directly or lying directly in a class
    folder, the folder that holds it), or ``regex:PATTERN`` (searched in the notebook's path;
    the group named ``student``, else group 1, else the whole match).
    """
    _check_student_from(student_from)
    items: list[_Found] = []

    for given in map(Path, paths):
        if given.is_dir() and given.suffix != ".ipynb":
            root = _Root.of(given)
            try:
                children = sorted(c for c in given.iterdir() if not _hidden(c.name))
            except OSError as e:
                items.append((given, given.name, given.name,
                              f"cannot read folder: {e.strerror or e}", ()))
                continue
            for child in children:
                if child.suffix == ".ipynb":  # a folder, pipe or broken link is reported when read
                    error, flags = root.check(child, "the notebook")
                    items.append((child, child.stem, given.name, error, flags))
                elif child.is_dir():
                    items.append(_from_student_folder(child, lab, root))
        else:
            error, flags = _Root.of(given.parent).check(given, "the notebook")
            items.append((given, given.stem, given.absolute().parent.name, error, flags))

    found = []
    for path, default, folder, error, flags in items:
        student = _student_id(path, student_from, default, folder)
        if student is None:
            student = path.stem
            error = error or (f"--student-from {student_from}: the pattern does not match the "
                              f"path {path.as_posix()!r}")
        found.append(Submission(student=student, path=path, error=error, flags=flags))
    return found


def _from_student_folder(folder: Path, lab: str, root: _Root) -> _Found:
    error, flags = root.check(folder, "the student's folder")
    if error is not None:
        return folder, folder.name, folder.name, error.replace("not graded", "not searched"), ()
    try:
        notebooks, skipped = _notebooks_under(folder)
    except OSError as e:
        return folder, folder.name, folder.name, f"cannot read folder: {e.strerror or e}", flags
    if not notebooks:
        why = "no notebook (.ipynb) in the student's folder"
        if skipped:
            why += (f" (links out of the student's folder are not followed: "
                    f"{', '.join(skipped[:3])})")
        return folder, folder.name, folder.name, why, flags
    if len(notebooks) > 1:
        named = [p for p in notebooks if p.stem == lab]
        if len(named) != 1:
            names = ", ".join(p.relative_to(folder).as_posix() for p in notebooks[:5])
            return folder, folder.name, folder.name, (
                f"several notebooks in the student's folder ({names}) and "
                f"{'none' if not named else 'more than one'} named {lab}.ipynb"), flags
        notebooks = named
    error, more = root.check(notebooks[0], "the notebook")
    return notebooks[0], folder.name, folder.name, error, flags or more


# ---------------------------------------------------------------------------------------------
# Grading one notebook
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    check: Check
    passed: bool
    points: float
    message: str


@dataclass(frozen=True)
class QuestionResult:
    question: Question
    points: float
    checks: tuple[CheckResult, ...]
    #: why the question could not be graded at all (every check lost)
    problem: str | None = None
    #: one reason that explains every lost check ("no saved outputs", "not answered")
    summary: str | None = None

    @property
    def reasons(self) -> list[str]:
        """Why points were lost, without repeats: the problem, else the summary (once, however
        many checks it cost), else each lost check's message."""
        if self.problem:
            return [self.problem]
        lost = [r.message for r in self.checks if not r.passed]
        if self.summary and lost:
            return [self.summary]
        return list(dict.fromkeys(lost))


@dataclass
class GradeResult:
    """One gradebook row."""

    student: str
    path: Path
    key: Key
    questions: list[QuestionResult]
    flags: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def total(self) -> float:
        return sum(q.points for q in self.questions)

    @property
    def status(self) -> str:
        return "error" if self.error else "graded"


def _graded_cells(nb: Any) -> dict[str, list[int]]:
    cells: dict[str, list[int]] = {}
    for index, cell in enumerate(nb.cells):
        meta = _nbgrader_meta(cell)
        if meta is not None:
            cells.setdefault(meta["grade_id"], []).append(index)
    return cells


def _has_outputs(nb: Any, release: Release) -> bool:
    """Whether the student ran anything: some code cell has outputs or an execution count,
    not counting the cells the lab itself ships with outputs."""
    return any(c.get("cell_type") == "code" and c.get("id") not in release.prerun
               and (c.get("outputs") or c.get("execution_count") is not None)
               for c in nb.cells)


def _structure_flags(nb: Any, release: Release, cells: dict[str, list[int]]) -> list[str]:
    flags = []
    missing = [g for g in release.grade_ids if g not in cells]
    if missing:
        flags.append(f"graded cells missing (deleted?): {', '.join(missing)}")
    dup = [g for g, idx in cells.items() if len(idx) > 1]
    if dup:
        flags.append(f"graded cells duplicated: {', '.join(dup)}")
    extra = [g for g in cells if release.cell(g) is None]
    if extra:
        flags.append(f"graded cells not in the released lab: {', '.join(extra)}")
    order = [g for g, _ in sorted(((g, idx[0]) for g, idx in cells.items()
                                   if release.cell(g) is not None), key=lambda t: t[1])]
    rank = {g: i for i, g in enumerate(release.grade_ids)}
    for a, b in zip(order, order[1:], strict=False):
        if rank[a] > rank[b]:
            flags.append(f"graded cells moved: {a!r} comes before {b!r}; the lab has them the "
                         "other way round")
            break
    edited = [c.grade_id for c in release.cells if c.locked and len(cells.get(c.grade_id, [])) == 1
              and _normalized_source(nb.cells[cells[c.grade_id][0]].get("source", "")) != c.source]
    if edited:
        flags.append(f"locked cells edited: {', '.join(edited)}")
    counts = [c.execution_count for c in nb.cells
              if c.get("cell_type") == "code" and isinstance(c.get("execution_count"), int)]
    if any(b <= a for a, b in zip(counts, counts[1:], strict=False)):
        flags.append("cells were not run top to bottom (execution counts do not increase), so "
                     "saved outputs may not come from the code above them")
    return flags


def _wrong_lab(nb: Any, release: Release, cells: dict[str, list[int]]) -> str | None:
    meta = nb.get("metadata", {}).get("labkit")
    other = meta.get("lab") if isinstance(meta, Mapping) else None
    if isinstance(other, str) and other != release.lab:
        return f"a notebook of another lab ({other}), not {release.lab}"
    if not cells:
        return (f"no graded cells (nbgrader grade_ids) found: not a copy of {release.lab}.ipynb, "
                "or its cell metadata was stripped")
    if not any(release.cell(g) is not None for g in cells):
        ids = ", ".join(sorted(cells)[:3])
        return (f"a notebook of another lab: its graded cells ({ids}, ...) are none of "
                f"{release.lab}'s")
    return None


def grade_notebook(nb: Any, release: Release, key: Key) -> tuple[list[QuestionResult], list[str],
                                                                  str | None]:
    """Grade one notebook (already read) from its saved outputs.

    Returns the per-question results, notebook-level flags, and an error when the notebook
    cannot be graded at all (another lab, no graded cells), in which case every question scores
    zero.
    """
    cells = _graded_cells(nb)
    wrong = _wrong_lab(nb, release, cells)
    if wrong is not None:
        return [QuestionResult(q, 0.0, (), wrong) for q in key.questions], [], wrong
    flags = _structure_flags(nb, release, cells)
    has_outputs = _has_outputs(nb, release)
    if not has_outputs:
        flags.insert(0, "outputs cleared: the notebook holds no saved outputs, so every "
                     "output-graded check scores zero")
    records, problems = extract_records(nb)
    flags += problems
    versions = sorted({r.labkit_version for r in records.values() if r.labkit_version})
    if key.labkit_version and versions and versions != [key.labkit_version]:
        flags.append(f"recorded with labkit {', '.join(versions)}; the key is for "
                     f"{key.labkit_version}")
    profile = None
    if key.profile is not None:
        ctx = _Context(nb, release, key.questions[0], records, has_outputs, cells)
        try:
            value = ctx.record(key.profile)
            profile = value if isinstance(value, str) else None
        except CheckFailed:
            profile = None
    results = []
    for q in key.questions:
        problems_q = []
        for gid in q.cells:
            n = len(cells.get(gid, []))
            if n == 0:
                problems_q.append(f"graded cell {gid!r} is missing from the notebook")
            elif n > 1:
                problems_q.append(f"graded cell {gid!r} appears {n} times (duplicated grade_id; "
                                  "nbgrader would reject it too)")
        if problems_q:
            results.append(QuestionResult(q, 0.0, (), "; ".join(problems_q)))
            continue
        ctx = _Context(nb, release, q, records, has_outputs, cells)
        checks = []
        for check in q.checks:
            try:
                passed, message = RULES[check.rule].func(ctx, check.params_for(profile))
            except CheckFailed as e:
                passed, message = False, str(e)
            checks.append(CheckResult(check, passed, check.points if passed else 0.0, message))
        summary = NO_OUTPUTS if not has_outputs else _not_answered(nb, release, q, cells)
        results.append(QuestionResult(q, sum(c.points for c in checks), tuple(checks),
                                      summary=summary))
    return results, flags, None


def _not_answered(nb: Any, release: Release, q: Question,
                  cells: dict[str, list[int]]) -> str | None:
    """The reason "not answered: ..." when a cell of question ``q`` raised NotImplementedError
    (the stub nbgrader's release puts in place of a solution) or still holds that stub without
    having run; else None."""
    for gid in q.cells:
        for index in cells.get(gid, []):
            cell = nb.cells[index]
            for out in cell.get("outputs") or []:
                if out.get("output_type") == "error" and out.get("ename") == "NotImplementedError":
                    return (f"not answered: the cell {gid!r} raised NotImplementedError (the "
                            f"lab's placeholder): write your answer in place of "
                            f"'{ANSWER_PLACEHOLDER}', run it and save the notebook")
            released = release.cell(gid)
            if (released is not None and released.solution and cell.get("cell_type") == "code"
                    and cell.get("execution_count") is None
                    and ANSWER_PLACEHOLDER.rstrip("()") in str(cell.get("source", ""))):
                return (f"not answered: the answer cell {gid!r} still holds the lab's "
                        f"placeholder '{ANSWER_PLACEHOLDER}' and was not run")
    return None


# ---------------------------------------------------------------------------------------------
# Optional execution (labkit grade --execute)
# ---------------------------------------------------------------------------------------------


def grader_results_root() -> Path:
    """The grader's own results folder, ``~/.cache/labkit/grading-results``: where the labs keep
    the runs they train while being graded (``labkit grade --execute``, nbgrader's autograde)
    when ``LABKIT_RESULTS`` is unset. A lab otherwise keeps its runs beside the notebook, which
    during grading is the student's submission folder: finished runs found there would be
    reloaded instead of trained, and a student could ship them."""
    return Path.home() / ".cache" / "labkit" / "grading-results"


def results_folder(results: str | Path | None, submissions: Iterable[str | Path]) -> Path:
    """The results folder the kernels of ``--execute`` get as ``LABKIT_RESULTS``: ``results``,
    else ``$LABKIT_RESULTS``, else :func:`grader_results_root`; as an absolute path.

    Raises:
        ValueError: the folder is one of the submissions' folders or inside one (a folder
            given is a class of submissions; a notebook given, the folder holding it), where a
            student's files would be loaded as finished runs.
    """
    chosen = results if results is not None else os.environ.get("LABKIT_RESULTS", "").strip()
    folder = Path(chosen or grader_results_root()).expanduser().resolve()
    for given in submissions:
        given = Path(given).expanduser().resolve()
        root = given if given.is_dir() else given.parent
        if folder == root or root in folder.parents:
            raise ValueError(
                f"the results folder {folder} is inside the submissions folder {root}, where a "
                "student's files would be loaded as finished runs: pass --results DIR (or set "
                "LABKIT_RESULTS) to a folder outside the submissions")
    return folder


def execute_notebook(nb: Any, release: Release, *, timeout: float = DEFAULT_TIMEOUT,
                     kernel_name: str | None = None, cwd: str | Path | None = None,
                     source: Release | None = None,
                     results: str | Path | None = None) -> tuple[Any, list[str]]:
    """Run a copy of ``nb`` top to bottom in a fresh kernel (nbclient) and return it with flags.

    The kernel runs in ``cwd`` with ``LABKIT_RESULTS`` set to ``results`` (default: the
    caller's ``$LABKIT_RESULTS``, else :func:`grader_results_root`), so the lab trains, or
    reloads, its runs in the grader's folder and never in one it finds beside the notebook.

    THIS RUNS THE STUDENT'S CODE with the caller's permissions. Every locked cell is first
    replaced by its text in ``source`` (default ``release``), as nbgrader's autograde does: a
    source version brings back the hidden tests that nbgrader's release stripped, and a student's
    edit of a locked cell is undone (and flagged). Every output is cleared, errors do not stop
    the run (they are kept as outputs), and a cell that runs longer than ``timeout`` seconds
    stops the run there.
    """
    import nbclient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    if not (_is_number(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    source = release if source is None else source
    nb = copy.deepcopy(nb)
    flags = []
    restored = []
    for gid, where in _graded_cells(nb).items():
        cell, theirs = release.cell(gid), source.cell(gid)
        if (cell is None or theirs is None or not cell.locked or theirs.solution
                or len(where) != 1):
            continue  # never a solution from the source into a student's notebook
        mine = nb.cells[where[0]]
        if _normalized_source(mine.source) != cell.source:
            restored.append(gid)
        mine.source = theirs.text
    if restored:
        flags.append(f"--execute: locked cells restored from the lab before running: "
                     f"{', '.join(restored)}")
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    name = kernel_name or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=name, allow_errors=True,
        resources={"metadata": {"path": str(cwd) if cwd is not None else "."}},
    )
    env = {**os.environ, "LABKIT_RESULTS": str(results_folder(results, []))}
    try:
        client.execute(env=env)
    except CellTimeoutError:
        flags.append(f"--execute: a cell ran longer than {timeout:g} s; the run stopped there")
    except DeadKernelError as e:
        flags.append(f"--execute: the kernel died ({str(e)[:120]}); the run stopped there")
    except Exception as e:  # noqa: BLE001 - a failed start must not stop the batch
        flags.append(f"--execute: could not run the notebook: {type(e).__name__}: "
                     f"{str(e)[:200]}")
    return nb, flags


# ---------------------------------------------------------------------------------------------
# A batch, the gradebook, feedback
# ---------------------------------------------------------------------------------------------


def find_key(lab: str | Path, release: Release | None = None) -> Path:
    """The answer key of the lab notebook ``lab``: the first of :func:`key_candidates` that
    exists.

    Raises:
        FileNotFoundError: naming the places looked at and the --key to pass.
    """
    name = release.lab if release is not None else None
    candidates = key_candidates(lab, name)
    for c in candidates:
        if c.is_file():
            return c
    name = name or Path(lab).stem
    raise FileNotFoundError(
        f"no answer key for {name}: looked for {', '.join(c.as_posix() for c in candidates)}; "
        f"pass --key KEY.yml (the labkit repository ships it as labs/keys/{name}.yml)")


def grade_submissions(
    paths: Iterable[str | Path],
    lab: str | Path,
    key: str | Path | Key | None = None,
    *,
    student_from: str = "auto",
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    execute: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    kernel_name: str | None = None,
    save_executed: str | Path | None = None,
    source: str | Path | None = None,
    results: str | Path | None = None,
) -> list[GradeResult]:
    """Grade every submission under ``paths`` against the ``lab`` (the version the students
    received, or its source) and its key.

    Every submission gets a row, whatever is wrong with it; the batch always completes. Rows are
    sorted by student id, then path. ``key`` defaults to :func:`find_key` of ``lab``.
    With ``execute=True`` (off by default), each notebook is first re-run with
    :func:`execute_notebook`, which runs the student's code, with the locked cells (and hidden
    tests) of ``source`` (default: :func:`load_source`'s choice); ``save_executed`` is a folder
    that receives the executed copies as ``<student>.ipynb``; the labs keep their runs in
    ``results`` (:func:`results_folder`: default ``$LABKIT_RESULTS``, else
    :func:`grader_results_root`), shared by all submissions.

    Raises:
        FileNotFoundError: if the lab, the key or the source is missing.
        ValueError: if the lab, the key, the source or ``student_from`` is malformed, or (with
            ``execute``) the results folder lies inside the submissions.
    """
    release = load_release(lab)
    if not isinstance(key, Key):
        key = load_key(find_key(lab, release) if key is None else key, release)
    else:
        _check_key_against(key, release)
    if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes > 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    locked = load_source(source, release) if execute else release
    paths = list(paths)
    runs = results_folder(results, paths) if execute else None
    subs = sorted(find_submissions(paths, release.lab, student_from),
                  key=lambda s: (s.student, s.path.as_posix()))
    results: list[GradeResult] = []
    seen: dict[str, Path] = {}
    for sub in subs:
        try:
            result = _grade_one(sub, release, key, max_bytes, execute, timeout, kernel_name,
                                save_executed, locked, runs)
        except Exception as e:  # noqa: BLE001 - one odd submission must not stop the batch
            error = f"could not be graded: {type(e).__name__}: {str(e)[:200]}"
            result = GradeResult(sub.student, sub.path, key, _zero(key, error), error=error)
        if sub.student in seen:
            result.flags.append(f"student id {_fmt(sub.student)} also used by "
                                f"{seen[sub.student].as_posix()}")
        seen.setdefault(sub.student, sub.path)
        results.append(result)
    return results


def _zero(key: Key, reason: str) -> list[QuestionResult]:
    return [QuestionResult(q, 0.0, (), reason) for q in key.questions]


def _grade_one(sub: Submission, release: Release, key: Key, max_bytes: int | None,
               execute: bool, timeout: float, kernel_name: str | None,
               save_executed: str | Path | None, source: Release,
               results: Path | None) -> GradeResult:
    flags = list(sub.flags)
    if sub.error:
        return GradeResult(sub.student, sub.path, key, _zero(key, sub.error), flags,
                           error=sub.error)
    try:
        nb, error = read_notebook(sub.path, max_bytes)
        if nb is None:
            return GradeResult(sub.student, sub.path, key, _zero(key, error), flags, error=error)
        if execute:
            nb, ran = execute_notebook(nb, release, timeout=timeout, kernel_name=kernel_name,
                                       cwd=sub.path.parent, source=source, results=results)
            flags += ran
            if save_executed is not None:
                out = Path(save_executed)
                out.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, out / f"{_safe_name(sub.student)}.ipynb")
        questions, more, error = grade_notebook(nb, release, key)
    except Exception as e:  # noqa: BLE001 - one odd notebook must not stop the batch
        error = f"could not be graded: {type(e).__name__}: {str(e)[:200]}"
        return GradeResult(sub.student, sub.path, key, _zero(key, error), flags, error=error)
    return GradeResult(sub.student, sub.path, key, questions, flags + more, error=error)


def _pts(x: float) -> str:
    return format(round(x, 6), "g")


#: First characters that make a spreadsheet read a CSV cell as a formula (OWASP, "CSV
#: Injection"): = + - @, tab, carriage return; line feed and NUL for good measure.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")


def _csv_cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: one that starts (after spaces) like a formula
    gets a leading single quote, as OWASP recommends (``=HYPERLINK(...)`` -> ``'=HYPERLINK(...)``);
    the writer also quotes every cell, so no delimiter inside one starts another."""
    return "'" + value if value.lstrip(" ").startswith(_FORMULA_START) else value


def write_gradebook(results: Sequence[GradeResult], key: Key, path: str | Path) -> Path:
    """Write the CSV gradebook: student, submission, status, one column of points per question
    (headed by its grade_id), total, max, flags (notebook-level notes) and reasons (why points
    were lost, per question).

    Every cell is quoted, and a text cell that starts like a spreadsheet formula (=, +, -, @,
    tab, CR: a student id or file name such as ``=HYPERLINK(...)``) starts with a single quote
    instead, so a spreadsheet shows it as text and runs nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gids = [q.grade_id for q in key.questions]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow([_csv_cell(c) for c in ["student", "submission", "status", *gids, "total",
                                           "max", "flags", "reasons"]])
        for r in results:
            by_id = {q.question.grade_id: q for q in r.questions}
            reasons = []
            if r.error:
                reasons.append(r.error)
            else:
                for q in r.questions:
                    lost = q.question.points - q.points
                    if lost > 0:
                        reasons.append(f"{q.question.grade_id} (-{_pts(lost)}): "
                                       + "; ".join(q.reasons))
            w.writerow([_csv_cell(c) for c in [
                r.student, r.path.as_posix(), r.status, *(_pts(by_id[g].points) for g in gids),
                _pts(r.total), _pts(key.max_points), " | ".join(r.flags), " | ".join(reasons)]])
    return path


def _safe_name(student: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", student).strip("._")
    return name or "student"


#: Characters that start Markdown or HTML syntax inside a line: a backslash, code, emphasis,
#: a link or image (``[``), HTML or an autolink (``<``), strikethrough; ``_`` only where it can
#: start or end emphasis (inside a word, as in ``c2_bound``, it cannot). Nothing a student
#: writes starts a line of the page, so line-start syntax (#, >, -) needs no escape.
_MD_SPECIAL = re.compile(r"([\\`*\[<~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _md(text: Any) -> str:
    """``text`` as one line of literal Markdown text: line breaks and control characters become
    spaces, and Markdown and HTML syntax is escaped, so that what a student put in a file name,
    a recorded value or an error message cannot add headings, links, images or HTML to the
    feedback page."""
    return _MD_SPECIAL.sub(r"\\\1", _CONTROL.sub(" ", str(text)))


def feedback_markdown(result: GradeResult) -> str:
    """A short Markdown page for one student: points per question and what earned or lost them.

    Every text that comes from the grading (ids, file names, messages, the key's labels and
    hints) is escaped as literal text (:func:`_md`)."""
    key = result.key
    lines = [f"# {_md(key.lab)}: feedback for {_md(result.student)}", "",
             f"**Total: {_pts(result.total)} / {_pts(key.max_points)} points**", ""]
    if result.error:
        lines += ["This submission could not be graded:", "", f"> {_md(result.error)}", ""]
    for q in result.questions:
        lines.append(f"## {_md(q.question.title)} ({_pts(q.points)} / "
                     f"{_pts(q.question.points)})")
        lines.append("")
        if q.problem and not result.error:
            lines.append(f"- lost: {_md(q.problem)}")
        lost = [c for c in q.checks if not c.passed]
        if q.summary and lost:
            lines.append(f"- {_md(q.summary)}")
        for c in q.checks:
            # Under a summary, a lost check names what it checks; the summary said why.
            text = c.check.label if q.summary and not c.passed else c.message
            line = f"- {'earned' if c.passed else 'lost'} {_pts(c.check.points)}: {_md(text)}."
            if not c.passed and c.check.hint and not q.summary:
                line += f" Hint: {_md(c.check.hint)}"
            lines.append(line)
        lines.append("")
    if result.flags:
        lines += ["## Notes", ""] + [f"- {_md(f)}" for f in result.flags] + [""]
    return "\n".join(lines)


def write_feedback(results: Sequence[GradeResult], folder: str | Path) -> list[Path]:
    """Write one Markdown page per student (``<student>.md``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for r in results:
        name = _safe_name(r.student)
        stem, n = name, 2
        while name in used:
            name, n = f"{stem}-{n}", n + 1
        used.add(name)
        p = folder / f"{name}.md"
        p.write_text(feedback_markdown(r), encoding="utf-8")
        written.append(p)
    return written
