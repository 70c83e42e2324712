"""labkit.grading and `labkit grade`: rules, keys, bad submissions, the gradebook, the real labs.

Synthetic notebooks (built here with nbformat) exercise every rule and every bad input; the real
labs (their sources with solutions, labs/source/) are executed once per session in the smoke
profile and turned into a correct, a wrong, an inconsistent, a cleared and a malformed submission
whose gradebook is checked exactly, against the source and against the student version in labs/.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit import grading
from labkit.cli import main
from labkit.grading import RECORD_MIME

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Building synthetic labs and submissions
# ---------------------------------------------------------------------------------------------


def nbg(grade_id: str, *, grade: bool = False, solution: bool = False, locked: bool = False,
        points: float | None = None) -> dict[str, Any]:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


def record_output(name: str, value: Any, version: str = "0.1.0") -> Any:
    return new_output("display_data", data={
        RECORD_MIME: {"name": name, "value": value, "labkit_version": version},
        "text/plain": f"labkit.record: {name} = {json.dumps(value, sort_keys=True)}",
    })


def make_lab(lab: str = "labx", points: tuple[float, ...] = (3, 2)) -> Any:
    """A released lab: intro, a setup cell, then per question an answer and a locked test."""
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells.append(new_markdown_cell(f"# {lab}\nRead this first.",
                                      metadata=nbg(f"{lab}-intro", locked=True)))
    nb.cells.append(new_code_cell("from labkit.record import record"))
    for q, p in enumerate(points, start=1):
        nb.cells.append(new_code_cell(
            f"### BEGIN SOLUTION\nanswer{q} = compute()\n### END SOLUTION",
            metadata=nbg(f"{lab}-q{q}-answer", solution=True)))
        nb.cells.append(new_code_cell(
            f"assert answer{q} is not None\n### BEGIN HIDDEN TESTS\nassert answer{q} > 0\n"
            "### END HIDDEN TESTS",
            metadata=nbg(f"{lab}-q{q}-test", grade=True, locked=True, points=p)))
    for i, cell in enumerate(nb.cells):
        cell.id = f"{lab}-cell-{i}"
    return nb


def write(nb: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def executed(lab_nb: Any, records: dict[int, dict[str, Any]] | None = None,
             test_error: dict[int, str] | None = None) -> Any:
    """A submission made from ``lab_nb``: every code cell run in order; question q's answer cell
    shows ``records[q]``, and its test cell an error when ``test_error[q]`` is given."""
    nb = copy.deepcopy(lab_nb)
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        gid = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        q = int(gid.split("-q")[1].split("-")[0]) if "-q" in gid else None
        if gid.endswith("-answer"):
            for name, value in (records or {}).get(q, {}).items():
                cell.outputs.append(record_output(name, value))
        if gid.endswith("-test") and q in (test_error or {}):
            cell.outputs.append(new_output("error", ename="AssertionError",
                                           evalue=test_error[q], traceback=[]))
    return nb


SHB = {"lr": 0.1, "beta": 0.9, "eps": 0.5}
SFO = {"8": 4.0e5, "16": 2.5e5, "32": 3.1e5, "64": None}
B_STAR = 16


def c2_shb(b: float, lr: float = 0.1, beta: float = 0.9, eps: float = 0.5) -> float:
    return b * beta * (1 - beta) ** 2 * eps**2 / (lr * (beta**2 - beta + 1))


GOOD = {
    1: {"inputs": {**SHB, "optimizer": "shb", "profile": "smoke"}, "sfo_table": SFO,
        "critical_batch_size": B_STAR, "c2_bound": c2_shb(B_STAR)},
    2: {"test_acc": {"0.5": 0.61, "1": 0.64, "2": 0.59}, "best_eta": 1},
}

KEY = {
    "lab": "labx",
    "labkit_version": "0.1.0",
    "questions": [
        {"grade_id": "labx-q1-test", "title": "Critical batch size", "checks": [
            {"rule": "test_cell", "points": 1},
            {"rule": "argmin", "record": "critical_batch_size", "table": "$sfo_table",
             "points": 1, "hint": "b* is the batch size with the smallest SFO"},
            {"rule": "c2_bound", "record": "c2_bound", "optimizer": "$inputs/optimizer",
             "b_star": "$critical_batch_size", "lr": "$inputs/lr", "eps": "$inputs/eps",
             "beta": "$inputs/beta", "points": 1},
        ]},
        {"grade_id": "labx-q2-test", "checks": [
            {"rule": "test_cell", "points": 1},
            {"rule": "argmax", "record": "best_eta", "table": "$test_acc", "points": 0.5},
            {"rule": "range", "record": "best_eta", "min": 0.5, "max": 2, "points": 0.5},
        ]},
    ],
}


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """labs/labx.ipynb and labs/keys/labx.yml in a temporary folder."""
    path = write(make_lab(), tmp_path / "labs" / "labx.ipynb")
    (tmp_path / "labs" / "keys").mkdir()
    (tmp_path / "labs" / "keys" / "labx.yml").write_text(yaml.safe_dump(KEY, sort_keys=False))
    return path


def read_gradebook(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def grade_one(lab: Path, nb: Any, tmp_path: Path, name: str = "alice") -> grading.GradeResult:
    sub = write(nb, tmp_path / "subs" / f"{name}.ipynb")
    (result,) = grading.grade_submissions([sub], lab)
    return result


# ---------------------------------------------------------------------------------------------
# Import hygiene: no torch, no kernel
# ---------------------------------------------------------------------------------------------


def test_importing_grading_does_not_import_torch():
    code = "import labkit.grading, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_labkit_grade_command_does_not_import_torch(lab, tmp_path):
    write(executed(make_lab(), GOOD), tmp_path / "subs" / "alice.ipynb")
    code = ("import sys; from labkit.cli import main; "
            f"rc = main(['grade', {str(tmp_path / 'subs')!r}, '--lab', {str(lab)!r}, "
            f"'--out', {str(tmp_path / 'gb.csv')!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'labkit.train' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    assert read_gradebook(tmp_path / "gb.csv")[0]["total"] == "5"


class _Forbidden(RuntimeError):
    pass


def _forbid(*args: Any, **kwargs: Any) -> Any:
    raise _Forbidden("grading tried to start a process or kernel")


def test_grading_starts_no_kernel_or_process_unless_execute(lab, tmp_path, monkeypatch, capsys):
    import asyncio
    import os

    import jupyter_client
    import jupyter_client.launcher
    import nbclient

    for target, name in [(subprocess, "Popen"), (jupyter_client.launcher, "Popen"),
                         (jupyter_client.launcher, "launch_kernel"),
                         (jupyter_client.KernelManager, "__init__"),
                         (jupyter_client.AsyncKernelManager, "__init__"),
                         (nbclient.NotebookClient, "__init__"), (os, "fork"),
                         (os, "posix_spawn"), (asyncio, "create_subprocess_exec")]:
        monkeypatch.setattr(target, name, _forbid)
    subs = tmp_path / "subs"
    write(executed(make_lab(), GOOD), subs / "alice.ipynb")
    write(make_lab(), subs / "bob.ipynb")
    (subs / "carol.ipynb").write_text("not json")
    assert main(["grade", str(subs), "--lab", str(lab), "--out", str(tmp_path / "gb.csv"),
                 "--feedback", str(tmp_path / "fb")]) == 0
    rows = {r["student"]: r for r in read_gradebook(tmp_path / "gb.csv")}
    assert [rows[s]["total"] for s in ("alice", "bob", "carol")] == ["5", "0", "0"]
    # The same patches do stop --execute: the test would notice a kernel start.
    assert main(["grade", str(subs / "alice.ipynb"), "--lab", str(lab), "--out",
                 str(tmp_path / "gb2.csv"), "--execute"]) == 0
    (row,) = read_gradebook(tmp_path / "gb2.csv")
    assert row["status"] == "error" and "grading tried to start" in row["reasons"]
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# A full synthetic batch
# ---------------------------------------------------------------------------------------------


def test_correct_submission_gets_full_marks(lab, tmp_path):
    r = grade_one(lab, executed(make_lab(), GOOD), tmp_path)
    assert (r.total, r.key.max_points, r.error, r.flags) == (5.0, 5.0, None, [])
    assert [q.points for q in r.questions] == [3.0, 2.0]


def test_gradebook_and_feedback_exact(lab, tmp_path, capsys):
    base = make_lab()
    wrong = copy.deepcopy(GOOD)
    wrong[1]["critical_batch_size"] = 32          # not the argmin, and C^2 was not computed from it
    wrong[2]["best_eta"] = 4                      # not the argmax, out of range
    subs = tmp_path / "subs"
    write(executed(base, GOOD), subs / "alice.ipynb")
    write(executed(base, wrong, test_error={2: "answer2 is wrong"}), subs / "bob.ipynb")
    write(base, subs / "carol.ipynb")             # outputs cleared
    (subs / "dave.ipynb").write_text('{"cells": [')
    out = tmp_path / "out" / "gradebook.csv"
    code = main(["grade", str(subs), "--lab", str(lab), "--out", str(out), "--feedback",
                 str(tmp_path / "fb")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "4 submission(s), 1 could not be graded" in printed
    rows = read_gradebook(out)
    assert list(rows[0]) == ["student", "submission", "status", "labx-q1-test", "labx-q2-test",
                             "total", "max", "flags", "reasons"]
    table = [(r["student"], r["status"], r["labx-q1-test"], r["labx-q2-test"], r["total"],
              r["max"]) for r in rows]
    assert table == [("alice", "graded", "3", "2", "5", "5"),
                     ("bob", "graded", "1", "0", "1", "5"),
                     ("carol", "graded", "0", "0", "0", "5"),
                     ("dave", "error", "0", "0", "0", "5")]
    bob = rows[1]["reasons"]
    assert "labx-q1-test (-2): critical_batch_size = 32, but the argmin of recorded sfo_table " \
           "is at 16 (250000)" in bob
    assert "Theorem 4.4 for shb" in bob and "gives the bound C^2 < 0.791209" in bob
    assert "labx-q2-test (-2): the test cell 'labx-q2-test' failed: AssertionError: answer2 " \
           "is wrong" in bob and "best_eta = 4 is outside [0.5, 2]" in bob
    assert rows[2]["flags"].startswith("outputs cleared")
    assert "no saved outputs" in rows[2]["reasons"]
    assert rows[3]["reasons"].startswith("not a notebook: not valid JSON")
    assert rows[0]["flags"] == "" and rows[0]["reasons"] == ""
    fb = (tmp_path / "fb" / "bob.md").read_text()
    assert fb.startswith("# labx: feedback for bob\n\n**Total: 1 / 5 points**")
    assert "## Critical batch size (1 / 3)" in fb
    assert "- earned 1: the test cell 'labx-q1-test' ran without error." in fb
    assert "- lost 1: critical_batch_size = 32" in fb
    assert "Hint: b\\* is the batch size with the smallest SFO" in fb  # Markdown-escaped
    assert "could not be graded" in (tmp_path / "fb" / "dave.md").read_text()
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == [
        "alice.md", "bob.md", "carol.md", "dave.md"]


def test_inconsistent_answers_lose_the_consistency_points(lab, tmp_path):
    bad = copy.deepcopy(GOOD)
    bad[1]["c2_bound"] = c2_shb(B_STAR) * 1.5     # not Theorem 4.4 applied to b*
    bad[1]["sfo_table"] = {"8": 1e5, "16": 2.5e5, "32": 3.1e5}  # b* = 16 is no longer argmin
    r = grade_one(lab, executed(make_lab(), bad), tmp_path)
    passed = [c.passed for c in r.questions[0].checks]
    assert passed == [True, False, False] and r.total == 3.0


# ---------------------------------------------------------------------------------------------
# Rules, one by one
# ---------------------------------------------------------------------------------------------


def run_checks(tmp_path: Path, records: dict[str, Any], checks: list[dict[str, Any]],
               test_error: str | None = None, **key_extra: Any) -> list[grading.CheckResult]:
    """Grade a one-question lab whose answer cell recorded ``records``; return check results."""
    points = sum(c["points"] * len(next(iter(c.get("for_each", {"_": [0]}).values())))
                 for c in checks)
    lab_nb = make_lab("laby", points=(points,))
    folder = tmp_path / "rule"
    lab_path = write(lab_nb, folder / "laby.ipynb")
    key = {"lab": "laby", **key_extra,
           "questions": [{"grade_id": "laby-q1-test", "checks": checks}]}
    key_path = folder / "key.yml"
    key_path.write_text(yaml.safe_dump(key))
    sub = write(executed(lab_nb, {1: records}, {1: test_error} if test_error else None),
                folder / "s.ipynb")
    (result,) = grading.grade_submissions([sub], lab_path, key_path)
    assert result.error is None
    return list(result.questions[0].checks)


def one(tmp_path: Path, records: dict[str, Any], check: dict[str, Any]) -> tuple[bool, str]:
    (r,) = run_checks(tmp_path, records, [{"points": 1, **check}])
    return r.passed, r.message


@pytest.mark.parametrize("value,ok", [(16, True), (16.0, True), ("16", True), (8, False),
                                      (64, False)])
def test_argmin(tmp_path, value, ok):
    passed, msg = one(tmp_path, {"t": SFO, "b": value},
                      {"rule": "argmin", "record": "b", "table": "$t"})
    assert passed is ok, msg


def test_argmin_and_argmax_forms(tmp_path):
    rows = [{"b": 8, "sfo": 3.0}, {"b": 16, "sfo": 1.0}, {"b": 32, "sfo": float("nan")}]
    assert one(tmp_path, {"t": rows, "b": 16}, {"rule": "argmin", "record": "b", "table": "$t",
                                                "key_field": "b", "value_field": "sfo"})[0]
    assert one(tmp_path, {"t": [[8, 3.0], [16, 1.0]], "b": 16},
               {"rule": "argmin", "record": "b", "table": "$t"})[0]
    # A tie accepts either winner; a string key (an optimizer) works too.
    assert one(tmp_path, {"t": {"a": 1.0, "b": 1.0}, "w": "b"},
               {"rule": "argmin", "record": "w", "table": "$t"})[0]
    passed, msg = one(tmp_path, {"acc": {"sgd": 0.5, "shb": 0.7}, "w": "sgd"},
                      {"rule": "argmax", "record": "w", "table": "$acc"})
    assert not passed and "argmax of recorded acc is at shb (0.7)" in msg
    passed, msg = one(tmp_path, {"t": {"a": None}, "w": "a"},
                      {"rule": "argmax", "record": "w", "table": "$t"})
    assert not passed and "no entry of recorded t is finite: it has no argmax" in msg
    # No batch size reached eps: the right answer is None, and None is wrong otherwise.
    assert one(tmp_path, {"t": {"8": None, "16": None}, "w": None},
               {"rule": "argmin", "record": "w", "table": "$t"})[0]
    passed, msg = one(tmp_path, {"t": SFO, "w": None},
                      {"rule": "argmin", "record": "w", "table": "$t"})
    assert not passed and "w = None, but the argmin of recorded t is at 16" in msg
    # item: the last element of each list; dropna: rows without a sharpness do not count.
    ratios = {"constant": [1.0, 1.0], "lr_step": [1.0, 0.7], "poly": [1.0, 0.5, 0.2]}
    assert one(tmp_path, {"t": ratios, "w": "poly"},
               {"rule": "argmin", "record": "w", "table": "$t", "item": -1})[0]
    passed, msg = one(tmp_path, {"t": {"a": 3}, "w": "a"},
                      {"rule": "argmin", "record": "w", "table": "$t", "item": -1})
    assert not passed and "entry a = 3, not a list with an element -1" in msg
    rows = [{"run": "r1", "acc": 0.9, "sharp": None}, {"run": "r2", "acc": 0.8, "sharp": 0.1}]
    check = {"rule": "argmax", "record": "w", "table": "$rows", "key_field": "run",
             "value_field": "acc"}
    assert one(tmp_path, {"rows": rows, "w": "r1"}, check)[0]
    assert one(tmp_path, {"rows": rows, "w": "r2"}, {**check, "dropna": ["sharp"]})[0]
    passed, msg = one(tmp_path, {"t": {"a": "x"}, "w": "a"},
                      {"rule": "argmax", "record": "w", "table": "$t"})
    assert not passed and "entry a = 'x', not a number" in msg
    passed, msg = one(tmp_path, {"t": 3, "w": "a"},
                      {"rule": "argmax", "record": "w", "table": "$t"})
    assert not passed and "not a table" in msg
    passed, msg = one(tmp_path, {"t": {"a": 1}, "w": [1]},
                      {"rule": "argmax", "record": "w", "table": "$t"})
    assert not passed and "not a single entry" in msg


@pytest.mark.parametrize("optimizer,beta", [("sgd", None), ("shb", 0.9), ("nshb", 0.9),
                                            ("SHB", 0.5)])
def test_c2_bound_matches_labkit_critical(tmp_path, optimizer, beta):
    from labkit.critical import c2_upper_bound

    want = c2_upper_bound(optimizer.lower(), critical_batch_size=512, lr=0.1, eps=0.5, beta=beta)
    inputs = {"lr": 0.1, "eps": 0.5, "optimizer": optimizer, "beta": beta}
    check = {"rule": "c2_bound", "record": "c2", "optimizer": "$in/optimizer", "b_star": 512,
             "lr": "$in/lr", "eps": "$in/eps", "beta": "$in/beta"}
    if beta is None:
        check.pop("beta")
    assert one(tmp_path, {"in": inputs, "c2": want}, check)[0]
    passed, msg = one(tmp_path, {"in": inputs, "c2": want * (1 + 1e-3)}, check)
    assert not passed and f"gives the bound C^2 < {want:.6g}" in msg


def test_c2_bound_paper_values(tmp_path):
    # Sato & Iiduka (2024) §4.3: eta 0.1, beta 0.9, eps 0.5, b* = 2^9, 2^10, 2^9 -> 1280, 25.318,
    # 128.
    for opt, b, c2, rtol in [("sgd", 512, 1280, 1e-9), ("shb", 1024, 25.318, 1e-4),
                             ("nshb", 512, 128, 1e-9)]:
        assert one(tmp_path, {"c2": c2}, {
            "rule": "c2_bound", "record": "c2", "optimizer": opt, "b_star": b, "lr": 0.1,
            "eps": 0.5, "beta": 0.9, "rtol": rtol})[0], opt


def test_c2_bound_bad_inputs(tmp_path):
    base = {"rule": "c2_bound", "record": "c2", "optimizer": "$o", "b_star": 16, "lr": "$lr",
            "eps": 0.5, "beta": 0.9}
    cases = [({"o": "adam", "lr": 0.1}, "expected one of sgd, shb, nshb"),
             ({"o": "sgd", "lr": -0.1}, "lr = -0.1 must be > 0"),
             ({"o": "sgd", "lr": "fast"}, "recorded lr is 'fast', not a number"),
             ({"o": "sgd", "lr": True}, "recorded lr is True, not a number")]
    for records, match in cases:
        passed, msg = one(tmp_path, {"c2": 1.0, **records}, base)
        assert not passed and match in msg, msg
    passed, msg = one(tmp_path, {"c2": 1.0, "o": "nshb", "lr": 0.1},
                      {k: v for k, v in base.items() if k != "beta"})
    assert not passed and "no beta" in msg
    passed, msg = one(tmp_path, {"c2": 1.0, "o": "shb", "lr": 0.1}, {**base, "beta": 0})
    assert not passed and "undefined" in msg


def test_c2_bound_without_a_critical_batch_size(tmp_path):
    check = {"rule": "c2_bound", "record": "c2", "optimizer": "nshb", "b_star": "$b", "lr": 0.1,
             "eps": 0.5, "beta": 0.9}
    assert one(tmp_path, {"b": None, "c2": None}, check)[0]
    passed, msg = one(tmp_path, {"b": None, "c2": 3.0}, check)
    assert not passed and "there is no bound and it should be None" in msg


def test_delta_rules(tmp_path):
    lr, beta, c2, k2 = 0.1, 0.9, 25.318, 1.77**2
    a = beta * (beta**2 - beta + 1) / (1 - beta) ** 2
    sgd = {str(b): lr * math.sqrt(c2 / b) for b in (8, 64, 512)}
    shb = {str(b): lr * math.sqrt((1 + a) * c2 / b + a * k2) for b in (8, 64, 512)}
    nshb = {str(b): lr * math.sqrt(c2 / ((1 - beta) * b)) for b in (8, 64, 512)}
    records = {"in": {"lr": lr, "beta": beta, "c2": c2, "k2": k2},
               "delta": {"sgd": sgd, "shb": shb, "nshb": nshb}, "one": sgd["64"]}
    common = {"lr": "$in/lr", "c2": "$in/c2"}
    checks = [
        {"rule": "delta_sgd", "record": "delta/sgd", **common, "points": 1},
        {"rule": "delta_shb", "record": "delta/shb", **common, "beta": "$in/beta",
         "k2": "$in/k2", "points": 1},
        {"rule": "delta_nshb", "record": "delta/nshb", **common, "beta": 0.9, "points": 1},
        {"rule": "delta_sgd", "record": "one", **common, "batch_size": 64, "points": 1},
        # Swapped: the SGD table does not follow eq. (13).
        {"rule": "delta_shb", "record": "delta/sgd", **common, "beta": 0.9, "k2": k2,
         "points": 1},
        {"rule": "delta_sgd", "record": "one", **common, "batch_size": 8, "points": 1},
    ]
    results = run_checks(tmp_path, records, checks)
    assert [r.passed for r in results] == [True, True, True, True, False, False]
    assert "delta/sgd does not follow eq. (13)" in results[4].message
    assert "b = 8: " in results[4].message and "(eq. gives" in results[4].message
    # Rounded values pass with a looser rtol, a bad key or a missing value fails.
    rounded = {k: float(f"{v:.4g}") for k, v in sgd.items()}
    assert not one(tmp_path, {**records, "r": rounded},
                   {"rule": "delta_sgd", "record": "r", **common})[0]
    assert one(tmp_path, {**records, "r": rounded},
               {"rule": "delta_sgd", "record": "r", **common, "rtol": 1e-3})[0]
    passed, msg = one(tmp_path, {**records, "r": {"big": 0.1}},
                      {"rule": "delta_sgd", "record": "r", **common})
    assert not passed and "key 'big', not a batch size" in msg
    passed, msg = one(tmp_path, {**records, "r": {"8": None}},
                      {"rule": "delta_sgd", "record": "r", **common})
    assert not passed and "b = 8: None" in msg
    passed, msg = one(tmp_path, {**records, "in": {"lr": 0.1, "c2": -1.0}},
                      {"rule": "delta_sgd", "record": "one", **common, "batch_size": 8})
    assert not passed and "c2 = -1 must be >= 0" in msg
    passed, msg = one(tmp_path, records, {"rule": "delta_nshb", "record": "one", **common,
                                          "beta": 1.5, "batch_size": 8})
    assert not passed and "beta = 1.5 must be in [0, 1)" in msg


def test_equals_one_of_range_tolerance_recorded(tmp_path):
    rec = {"opt": "shb", "x": 0.5, "n": 3, "acc": {"a": 0.5, "b": 0.9}, "txt": "hello",
           "nan": None}
    cases = [
        ({"rule": "equals", "record": "opt", "expected": "shb"}, True, "equals 'shb'"),
        ({"rule": "equals", "record": "opt", "expected": "sgd"}, False, "should equal 'sgd'"),
        ({"rule": "equals", "record": "n", "expected": 3.0}, True, ""),
        ({"rule": "equals", "record": "x", "expected": "$x"}, True, ""),
        ({"rule": "one_of", "record": "opt", "options": ["shb", "nshb"]}, True, ""),
        ({"rule": "one_of", "record": "n", "options": [1, 2]}, False, "should be one of 1, 2"),
        ({"rule": "range", "record": "x", "min": 0.2, "max": 1}, True, "lies in [0.2, 1]"),
        ({"rule": "range", "record": "x", "min": 0.6}, False, "outside [0.6, inf]"),
        ({"rule": "range", "record": "x", "max": "$n"}, True, ""),
        ({"rule": "range", "record": "acc", "min": 0, "max": 1}, True, "every entry"),
        ({"rule": "range", "record": "acc", "min": 0.6}, False, "a: 0.5"),
        ({"rule": "range", "record": "txt", "min": 0}, False, "'hello', not a number"),
        ({"rule": "range", "record": "nan", "min": 0}, False, "None, not a number"),
        ({"rule": "tolerance", "record": "x", "expected": 0.51, "atol": 0.02}, True, ""),
        ({"rule": "tolerance", "record": "x", "expected": 0.6, "rtol": 0.1}, False,
         "not within 0 + 0.1"),
        ({"rule": "recorded", "record": "txt"}, True, "txt is recorded"),
        ({"rule": "recorded", "record": "txt", "kind": "number"}, False, "not a number"),
        ({"rule": "recorded", "record": "acc", "kind": "table", "min_entries": 3}, False,
         "has 2 finite entries"),
        ({"rule": "recorded", "record": "acc", "kind": "table", "min_entries": 2}, True, ""),
        ({"rule": "recorded", "record": "n", "kind": "text"}, False, "not text"),
        ({"rule": "recorded", "record": "missing"}, False,
         "no labkit.record output named 'missing'"),
        ({"rule": "range", "record": "acc/c", "min": 0}, False, "has no entry 'c' (it has: a, b)"),
        ({"rule": "range", "record": "x/c", "min": 0}, False, "not a table with entry 'c'"),
    ]
    results = run_checks(tmp_path, rec, [{"points": 1, **c} for c, _, _ in cases])
    for (check, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (check, r.message)


def test_record_paths_and_text_fallback(tmp_path):
    lab_nb = make_lab("laby", points=(3,))
    lab_path = write(lab_nb, tmp_path / "laby.ipynb")
    key = {"lab": "laby", "questions": [{"grade_id": "laby-q1-test", "checks": [
        {"rule": "equals", "record": "t/512", "expected": 7, "points": 1},
        {"rule": "equals", "record": "l/1", "expected": "b", "points": 1},
        {"rule": "equals", "record": "p/0.5", "expected": 1, "points": 1}]}]}
    (tmp_path / "k.yml").write_text(yaml.safe_dump(key))
    nb = executed(lab_nb)
    cell = nb.cells[2]
    # Text only (a frontend dropped the JSON), a Python-literal text, and a later override.
    def text(line):
        return new_output("display_data", data={"text/plain": line})

    cell.outputs = [text('labkit.record: t = {"512": 7}'), text("labkit.record: l = ['a', 'b']"),
                    record_output("p", {"0.5": 0}), record_output("p", {"0.50": 1})]
    sub = write(nb, tmp_path / "s.ipynb")
    (r,) = grading.grade_submissions([sub], lab_path, tmp_path / "k.yml")
    assert [c.passed for c in r.questions[0].checks] == [True, True, True], r.questions


def test_aggregate_rule(tmp_path):
    rows = [{"optimizer": "adam", "eta": 0.5, "seed": 0, "acc": 0.6},
            {"optimizer": "adam", "eta": 0.5, "seed": 1, "acc": 0.8},
            {"optimizer": "adam", "eta": 2.0, "seed": 0, "acc": 0.5},
            {"optimizer": "adam", "eta": 1 / 3, "seed": 0, "acc": None},  # diverged
            {"optimizer": "sgd", "eta": None, "seed": 0, "acc": 0.9}]
    good = {"adam": {"1/2": 0.7, "2": 0.5, "1/3": None}}
    base = {"rule": "aggregate", "rows": "$runs", "key_field": ["optimizer", "eta"],
            "value_field": "acc", "where": {"optimizer": ["adam", "amsgrad"]}}
    cases = [
        (good, {}, True, "matches the mean of acc over recorded runs by optimizer, eta"),
        ({"adam": {"1/2": 0.7, "2": 0.5}}, {}, False, "no entry adam/0.3333"),
        ({"adam": {**good["adam"], "4": 0.1}}, {}, False, "entry adam/4 has no rows"),
        ({"adam": {**good["adam"], "1/2": 0.71}}, {}, False, "adam/0.5: 0.71 (rows give 0.7)"),
        ({"adam": {**good["adam"], "1/3": 0.2}}, {}, False, "(no finite value in the rows)"),
        ({"adam": {"1/2": 0.8, "2": 0.5, "1/3": None}}, {"reduce": "max"}, True, "the max"),
        ({"1/2": 0.6, "2": 0.5, "1/3": None}, {"key_field": "eta", "where": {"seed": 0},
                                              "reduce": "min"}, False, "no entry None"),
        ({"0.5": 0.6, "2": 0.5, "0.3333333333333333": None},
         {"key_field": "eta", "where": {"seed": 0, "optimizer": "adam"}}, True, ""),
        (good, {"where": {"optimizer": "amsgrad"}}, False, "no row of recorded runs matches"),
        (good, {"value_field": "loss"}, False, "a row of recorded runs has no field 'loss'"),
        ({"adam": 0.7}, {}, False, "0.7 is not a table nested 1 level(s) deep"),
    ]
    results = run_checks(tmp_path, {"runs": rows, **{f"t{i}": c[0] for i, c in enumerate(cases)}},
                         [{**base, **extra, "record": f"t{i}", "points": 1}
                          for i, (_, extra, _, _) in enumerate(cases)])
    for (table, extra, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (table, extra, r.message)
    passed, msg = one(tmp_path, {"runs": [{"optimizer": "adam", "eta": 1, "acc": "high"}],
                                 "t": {}}, {**base, "record": "t"})
    assert not passed and "acc = 'high', not a number" in msg
    passed, msg = one(tmp_path, {"runs": {"a": 1}, "t": {}}, {**base, "record": "t"})
    assert not passed and "not a list of rows" in msg


def test_lookup_rule(tmp_path):
    rows = [{"run": "a", "delta": 0.3, "acc": 0.5}, {"run": "b", "delta": 0.9, "acc": None}]
    table = {"16": 0.25, "32": 0.5}
    records = {"rows": rows, "t": table, "best": {"sgd": 32, "nshb": None},
               "delta": {"sgd": 0.5}, "d": 0.3, "run": "a", "none": None, "ghost": "z"}
    base = {"rule": "lookup", "table": "$rows", "key_field": "run", "value_field": "delta"}
    cases = [
        ({**base, "record": "d", "key": "$run"}, True, "d = 0.3 is the entry a of recorded rows"),
        ({**base, "record": "d", "key": "b"}, False, "but the entry b of recorded rows is 0.9"),
        ({**base, "record": "d", "key": "$ghost"}, False, "has no entry 'z' (the recorded ghost)"),
        ({**base, "record": "none", "key": "b", "value_field": "acc"}, True, ""),
        ({"rule": "lookup", "record": "delta/sgd", "table": "$t", "key": "$best/sgd"}, True, ""),
        ({"rule": "lookup", "record": "delta/nshb", "table": "$t", "key": "$best/nshb"}, True,
         "best/nshb is None and delta/nshb is absent"),
        ({"rule": "lookup", "record": "d", "table": "$t", "key": "$best/nshb"}, False,
         "should be None or absent"),
        ({"rule": "lookup", "record": "ghost", "table": "$t", "key": 16}, False,
         "but the entry 16 of recorded t is 0.25"),
    ]
    results = run_checks(tmp_path, records, [{**c, "points": 1} for c, _, _ in cases])
    for (check, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (check, r.message)


def test_rank_correlation_rule_matches_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"s": 0.3, "d": 0.2, "acc": 0.5}, {"s": 0.1, "d": 0.9, "acc": 0.7},
            {"s": 0.1, "d": 0.5, "acc": 0.7}, {"s": None, "d": 0.4, "acc": 0.6},
            {"s": 0.2, "d": 0.1, "acc": 0.4}, {"s": 0.5, "d": 0.7, "acc": None}]
    df = pd.DataFrame(rows).dropna()
    want = df[["s", "acc"]].corr(method="spearman").loc["s", "acc"]
    base = {"rule": "rank_correlation", "rows": "$rows", "x": "s", "y": "acc",
            "dropna": ["s", "d", "acc"]}
    records = {"rows": rows, "good": want, "bad": -want, "const": None}
    results = run_checks(tmp_path, records, [
        {**base, "record": "good", "points": 1}, {**base, "record": "bad", "points": 1},
        {**base, "record": "const", "points": 1}])
    assert [r.passed for r in results] == [True, False, False]
    assert "over the 4 complete rows" in results[0].message
    flat = [{"s": 1.0, "acc": 0.5}, {"s": 2.0, "acc": 0.5}, {"s": 3.0, "acc": 0.5}]
    assert one(tmp_path, {"rows": flat, "c": None},
               {"rule": "rank_correlation", "record": "c", "rows": "$rows", "x": "s",
                "y": "acc"})[0]
    for x, y in ([[1, 2, 3, 4], [10, 20, 30, 40]], [[1.0, 5.0, 5.0, 7.0, 3.0, 5.0],
                                                      [0.3, 0.1, 0.4, 0.9, 0.2, 0.4]]):
        ref = pd.DataFrame({"x": x, "y": y}).corr(method="spearman").loc["x", "y"]
        assert math.isclose(grading._spearman(x, y), ref, rel_tol=1e-12)


def test_flag_in_range_and_delta_ratio_rules(tmp_path):
    plan = {"constant": {"lr": [0.1, 0.1], "batch_size": [32, 32]},
            "batch_step": {"lr": [0.1, 0.1, 0.1], "batch_size": [32, 64, 128]},
            "lr_step": {"lr": [0.1, 0.1 / math.sqrt(2)], "batch_size": [32, 32]}}
    good = {"constant": [1.0, 1.0], "batch_step": [1.0, 1 / math.sqrt(2), 0.5],
            "lr_step": [1.0, 1 / math.sqrt(2)]}
    records = {"d": 0.2, "yes": True, "no": False, "plan": plan, "good": good,
               "short": {**good, "lr_step": [1.0]}, "fewer": {"constant": [1.0, 1.0]},
               "one": [1.0, 0.5, 0.25]}
    cases = [
        ({"rule": "flag_in_range", "record": "yes", "value": "$d", "min": 0.2, "max": 1}, True,
         "yes = True: d = 0.2 is in [0.2, 1]"),
        ({"rule": "flag_in_range", "record": "yes", "value": 1.01, "min": 0.2, "max": 1}, False,
         "yes = True, but 1.01 is not in [0.2, 1]"),
        ({"rule": "flag_in_range", "record": "d", "value": 1, "min": 0, "max": 1}, False,
         "recorded d is 0.2, not true or false"),
        ({"rule": "delta_ratio", "record": "good", "plan": "$plan"}, True, "good follows"),
        ({"rule": "delta_ratio", "record": "short", "plan": "$plan"}, False,
         "short/lr_step is [1], not a list of 2"),
        ({"rule": "delta_ratio", "record": "fewer", "plan": "$plan"}, False,
         "fewer/batch_step is missing"),
        ({"rule": "delta_ratio", "record": "one", "plan": "$plan/batch_step"}, False,
         "one[1] = 0.5, expected 0.707107"),
        ({"rule": "delta_ratio", "record": "good/batch_step", "plan": "$plan/batch_step"}, True,
         ""),
    ]
    results = run_checks(tmp_path, records, [{**c, "points": 1} for c, _, _ in cases])
    for (check, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (check, r.message)


def test_tolerance_on_lists_and_tables(tmp_path):
    records = {"l": [1.0, 0.5], "t": {"a": {"0.1": 1.0, "10": 2.0}}, "x": "word"}
    cases = [
        ({"record": "l", "expected": [1.0, 0.5000001], "rtol": 1e-6}, True, "every entry"),
        ({"record": "l", "expected": [1.0, 0.6], "rtol": 1e-6}, False,
         "l[1] = 0.5, expected 0.6"),
        ({"record": "l", "expected": [1.0], "atol": 1}, False, "not a list of 1"),
        ({"record": "t", "expected": {"a": {"0.1": 1.0, "10.0": 2.0}}, "rtol": 1e-9}, True, ""),
        ({"record": "t", "expected": {"a": {"0.1": 1.0}}, "rtol": 1e-9}, False,
         "t/a/10 is not expected"),
        ({"record": "t", "expected": {"a": {"0.1": 1.0, "10": 2.0, "1": 3.0}}, "rtol": 1e-9},
         False, "t/a/1 is missing"),
        ({"record": "x", "expected": ["word"], "atol": 0}, False, "not a list of 1"),
        ({"record": "x", "expected": 1.0, "atol": 0}, False, "recorded x is 'word', not a number"),
    ]
    results = run_checks(tmp_path, records, [{"rule": "tolerance", **c, "points": 1}
                                             for c, _, _ in cases])
    for (check, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (check, r.message)


def test_within_rule(tmp_path):
    pts = {"gd": [1.99], "sgd": [0.3], "graduated": [1e-40]}
    good = {"gd": False, "sgd": True, "graduated": True}
    base = {"rule": "within", "point": "$pts", "center": 0.0, "radius": 0.5}
    cases = [
        ({"record": "good"}, True, "agrees with the distance of pts to 0"),
        ({"record": "bad"}, False, "bad/gd = True, but pts/gd = [1.99] is 1.99 from [0] "
                                   "(radius 0.5)"),
        ({"record": "good", "radius": 0.2}, False, "good/sgd = True"),
        ({"record": "one", "point": "$pts/gd", "center": [2.0]}, True, ""),
        ({"record": "good", "center": [0, 0]}, False, "has 1 coordinates; the center has 2"),
        ({"record": "word"}, False, "recorded word/gd is 'no', not true or false"),
        ({"record": "good", "point": "$pts/gd"}, False, "not a table like good"),
        ({"record": "more"}, False, "recorded pts has no entry 'adam'"),
    ]
    records = {"pts": pts, "good": good, "bad": {**good, "gd": True}, "one": True,
               "word": {"gd": "no"}, "more": {**good, "adam": True}}
    results = run_checks(tmp_path, records, [{**base, **c, "points": 1} for c, _, _ in cases])
    for (check, ok, words), r in zip(cases, results, strict=True):
        assert r.passed is ok and words in r.message, (check, r.message)


def test_test_cell_rule(tmp_path):
    passed, msg = one(tmp_path, {}, {"rule": "test_cell"})
    assert passed and "ran without error" in msg
    (r,) = run_checks(tmp_path, {}, [{"rule": "test_cell", "points": 1}], test_error="nope")
    assert not r.passed and "failed: AssertionError: nope" in r.message
    lab_nb = make_lab("laby", points=(1,))
    lab_path = write(lab_nb, tmp_path / "laby.ipynb")
    key = tmp_path / "k.yml"
    key.write_text(yaml.safe_dump({"lab": "laby", "questions": [
        {"grade_id": "laby-q1-test", "checks": [{"rule": "test_cell", "points": 1}]}]}))

    def grade(nb):
        (r,) = grading.grade_submissions([write(nb, tmp_path / "s.ipynb")], lab_path, key)
        return r

    nb = executed(lab_nb)
    nb.cells[3].execution_count = None
    r = grade(nb)
    assert r.total == 0 and "was not run" in r.questions[0].reasons[0]
    nb = executed(lab_nb)
    nb.cells[3].source = "assert True"                    # tampered locked test cell
    r = grade(nb)
    assert r.total == 0
    assert "locked test cell 'laby-q1-test' was edited" in r.questions[0].reasons[0]
    assert "locked cells edited: laby-q1-test" in r.flags
    nb = executed(lab_nb)
    nb.cells[3].source = nb.cells[3].source.split("### BEGIN HIDDEN")[0] + "  \n"
    assert grade(nb).total == 1                           # nbgrader's release strips hidden tests
    nb = executed(lab_nb)
    nb.cells[3].cell_type = "markdown"
    del nb.cells[3]["outputs"], nb.cells[3]["execution_count"]
    r = grade(nb)
    assert r.total == 0 and "not a code cell" in r.questions[0].reasons[0]


def test_for_each_and_by_profile(tmp_path):
    records = {"inputs": {"profile": "smoke"}, "b": {"sgd": 8, "shb": 8, "nshb": 8},
               "t": {"sgd": {"8": 1, "16": 2}, "shb": {"8": 2, "16": 1}, "nshb": {"8": 2}}}
    checks = [{"rule": "argmin", "record": "b/{opt}", "table": "$t/{opt}", "points": 1,
               "for_each": {"opt": ["sgd", "shb", "nshb"]}, "label": "b* of {opt}"},
              {"rule": "range", "record": "b/shb", "min": 512, "max": 2048, "points": 1,
               "by_profile": {"smoke": {"min": 1}}}]
    results = run_checks(tmp_path, records, checks, profile="$inputs/profile")
    assert [r.passed for r in results] == [True, False, True, True]
    assert [r.check.label for r in results[:3]] == ["b* of sgd", "b* of shb", "b* of nshb"]
    records["inputs"]["profile"] = "paper"
    results = run_checks(tmp_path, records, checks, profile="$inputs/profile")
    assert results[3].passed is False and "outside [512, 2048]" in results[3].message


# ---------------------------------------------------------------------------------------------
# Bad submissions: every one gets a row, the batch completes
# ---------------------------------------------------------------------------------------------


def test_every_bad_input_gets_a_row_with_its_reason(lab, tmp_path, monkeypatch):
    base = make_lab()
    subs = tmp_path / "subs"
    subs.mkdir()
    write(executed(base, GOOD), subs / "good.ipynb")
    (subs / "notjson.ipynb").write_text("{ this is not json")
    (subs / "binary.ipynb").write_bytes(b"\xff\xfe\x00garbage")
    (subs / "jsonlist.ipynb").write_text("[1, 2, 3]")
    (subs / "jsondict.ipynb").write_text('{"name": "not a notebook"}')
    v3 = nbformat.v3.new_notebook(worksheets=[nbformat.v3.new_worksheet(
        cells=[nbformat.v3.new_code_cell(input="1 + 1")])])
    (subs / "v3.ipynb").write_text(nbformat.writes(v3, version=3))
    (subs / "v5.ipynb").write_text('{"nbformat": 5, "nbformat_minor": 0, "cells": []}')
    schema = json.loads(nbformat.writes(executed(base, GOOD)))
    schema["cells"][1]["outputs"] = "oops"
    (subs / "schema.ipynb").write_text(json.dumps(schema))
    write(executed(make_lab("otherlab"), GOOD), subs / "other.ipynb")
    plain = new_notebook(cells=[new_code_cell("print(1)")])
    write(plain, subs / "plain.ipynb")
    tagged = executed(base, GOOD)
    tagged.metadata["labkit"] = {"lab": "lab9"}
    write(tagged, subs / "tagged.ipynb")
    missing = executed(base, GOOD)
    del missing.cells[5]                                  # labx-q2-test
    write(missing, subs / "missing.ipynb")
    dup = executed(base, GOOD)
    dup.cells.insert(5, copy.deepcopy(dup.cells[3]))      # labx-q1-test twice
    dup.cells[5].id = "copy"
    write(dup, subs / "dup.ipynb")
    write(base, subs / "cleared.ipynb")
    nan = copy.deepcopy(GOOD)
    nan[1]["critical_batch_size"] = "sixteen"
    write(executed(base, nan), subs / "nan.ipynb")
    big = executed(base, GOOD)
    big.cells[1].outputs.append(new_output("stream", name="stdout", text="x" * 3_000_000))
    write(big, subs / "big.ipynb")
    (subs / "folder.ipynb").mkdir()
    (subs / "broken.ipynb").symlink_to(subs / "nowhere.ipynb")
    write(executed(base, GOOD), subs / "locked.ipynb")
    real_open = os.open

    def fake_open(path, *args, **kwargs):
        if os.fspath(path).endswith("locked.ipynb"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    out = tmp_path / "gb.csv"
    assert main(["grade", str(subs), "--lab", str(lab), "--out", str(out),
                 "--max-size", "2"]) == 0
    rows = {r["student"]: r for r in read_gradebook(out)}
    expect = {
        "good": ("graded", "5", ""),
        "notjson": ("error", "0", "not a notebook: not valid JSON"),
        "binary": ("error", "0", "not a notebook: not UTF-8 text"),
        "jsonlist": ("error", "0", "not a notebook: valid JSON, but without"),
        "jsondict": ("error", "0", "not a notebook: valid JSON, but without"),
        "v3": ("error", "0", "an nbformat 3 notebook"),
        "v5": ("error", "0", "nbformat 5 (expected 4)"),
        "schema": ("error", "0", "not a valid nbformat 4 notebook: 'oops' is not of type"),
        "other": ("error", "0", "a notebook of another lab: its graded cells (otherlab-"),
        "plain": ("error", "0", "no graded cells (nbgrader grade_ids) found"),
        "tagged": ("error", "0", "a notebook of another lab (lab9), not labx"),
        "missing": ("graded", "3", "labx-q2-test (-2): graded cell 'labx-q2-test' is missing"),
        "dup": ("graded", "2", "labx-q1-test (-3): graded cell 'labx-q1-test' appears 2 times"),
        "cleared": ("graded", "0", "no saved outputs"),
        "nan": ("graded", "3", "recorded critical_batch_size is 'sixteen', not a number"),
        "big": ("error", "0", "over the 2 MiB limit (--max-size)"),
        "folder": ("error", "0", "cannot read: it is a folder"),
        "broken": ("error", "0", "cannot read: a broken symbolic link"),
        "locked": ("error", "0", "cannot read: Permission denied"),
    }
    assert set(rows) == set(expect)
    for student, (status, total, words) in expect.items():
        row = rows[student]
        assert (row["status"], row["total"], row["max"]) == (status, total, "5"), row
        assert words in row["reasons"], (student, row["reasons"])
        assert "could not be graded" not in row["reasons"], row
    assert "graded cells missing (deleted?): labx-q2-test" in rows["missing"]["flags"]
    assert "graded cells duplicated: labx-q1-test" in rows["dup"]["flags"]
    assert rows["cleared"]["flags"].startswith("outputs cleared")


def test_cells_the_lab_ships_with_outputs_do_not_count_as_run(tmp_path):
    lab_nb = make_lab()
    lab_nb.cells[1].outputs = [new_output("stream", name="stdout", text="a fixed table\n")]
    lab_nb.cells[1].execution_count = 1
    lab_path = write(lab_nb, tmp_path / "labs" / "labx.ipynb")
    (tmp_path / "labs" / "keys").mkdir()
    (tmp_path / "labs" / "keys" / "labx.yml").write_text(yaml.safe_dump(KEY))
    assert grading.load_release(lab_path).prerun == {"labx-cell-1"}
    r = grade_one(lab_path, lab_nb, tmp_path)
    assert r.total == 0 and r.flags[0].startswith("outputs cleared")
    assert r.questions[0].reasons[0].startswith("no saved outputs")
    assert grade_one(lab_path, executed(lab_nb, GOOD), tmp_path).total == 5


def test_structure_flags(lab, tmp_path):
    base = make_lab()
    nb = executed(base, GOOD)
    nb.cells[2], nb.cells[4] = nb.cells[4], nb.cells[2]   # q1 answer and q2 answer swapped
    nb.cells[0].source += "\nmy notes"                    # a locked markdown cell edited
    nb.cells.append(new_code_cell("x", metadata=nbg("labx-q9-test", grade=True, points=1)))
    nb.cells[1].execution_count = 99                      # run out of order
    r = grade_one(lab, nb, tmp_path)
    flags = " | ".join(r.flags)
    assert "graded cells moved: 'labx-q2-answer' comes before 'labx-q1-test'" in flags
    assert "locked cells edited: labx-intro" in flags
    assert "graded cells not in the released lab: labx-q9-test" in flags
    assert "not run top to bottom" in flags
    assert r.total == 5                                   # flags cost no points by themselves


def test_version_mismatch_and_malformed_record_are_flagged(lab, tmp_path):
    nb = executed(make_lab(), GOOD)
    nb.cells[2].outputs.append(record_output("extra", 1, version="0.0.9"))
    nb.cells[2].outputs.append(new_output("display_data", data={RECORD_MIME: {"value": 1}}))
    r = grade_one(lab, nb, tmp_path)
    assert r.total == 5
    assert any("recorded with labkit 0.0.9, 0.1.0; the key is for 0.1.0" in f for f in r.flags)
    assert any("without a name and value was ignored" in f for f in r.flags)


# ---------------------------------------------------------------------------------------------
# Finding submissions and student ids
# ---------------------------------------------------------------------------------------------


def test_find_submissions_layouts(tmp_path):
    nb = make_lab()
    cls = tmp_path / "class"
    write(nb, cls / "alice.ipynb")
    write(nb, cls / "bob" / "labx" / "labx.ipynb")            # nbgrader's submitted/ layout
    write(nb, cls / "bob" / "labx" / ".ipynb_checkpoints" / "labx-checkpoint.ipynb")
    write(nb, cls / "carol" / "labx.ipynb")
    write(nb, cls / "carol" / "scratch.ipynb")
    write(nb, cls / "dave" / "a.ipynb")
    write(nb, cls / "dave" / "b.ipynb")
    (cls / "erin").mkdir()
    (cls / "notes.txt").write_text("ignored")
    single = write(nb, tmp_path / "frank" / "whatever.ipynb")
    subs = grading.find_submissions([cls, single], "labx")
    got = {s.student: (s.path.relative_to(tmp_path).as_posix(), s.error) for s in subs}
    assert got["alice"] == ("class/alice.ipynb", None)
    assert got["bob"] == ("class/bob/labx/labx.ipynb", None)
    assert got["carol"] == ("class/carol/labx.ipynb", None)
    assert "several notebooks" in got["dave"][1] and "none named labx.ipynb" in got["dave"][1]
    assert got["erin"][1] == "no notebook (.ipynb) in the student's folder"
    assert got["whatever"] == ("frank/whatever.ipynb", None)
    folder = {s.path.name: s.student for s in grading.find_submissions([cls, single], "labx",
                                                                       "folder")}
    assert folder["alice.ipynb"] == "class" and folder["whatever.ipynb"] == "frank"
    by_file = {s.student for s in grading.find_submissions([cls], "labx", "file")}
    assert {"alice", "labx"} <= by_file
    rx = grading.find_submissions([cls / "alice.ipynb", single], "labx",
                                  r"regex:(?P<student>[a-z]+)/whatever")
    assert [(s.student, s.error is None) for s in rx] == [("alice", False), ("frank", True)]
    assert "does not match" in rx[0].error


def test_duplicate_student_ids_are_flagged(lab, tmp_path):
    nb = executed(make_lab(), GOOD)
    a = write(nb, tmp_path / "x" / "alice.ipynb")
    b = write(nb, tmp_path / "y" / "alice.ipynb")
    results = grading.grade_submissions([b, a], lab)
    assert [r.path for r in results] == [a, b]
    assert results[1].flags == [f"student id 'alice' also used by {a.as_posix()}"]
    written = grading.write_feedback(results, tmp_path / "fb")
    assert [p.name for p in written] == ["alice.md", "alice-2.md"]


@pytest.mark.parametrize("value,match", [
    ("nope", "must be auto, file, folder or regex:PATTERN"),
    ("regex:(", "invalid regular expression"),
])
def test_bad_student_from(value, match):
    with pytest.raises(ValueError, match=match):
        grading.find_submissions([], "labx", value)


# ---------------------------------------------------------------------------------------------
# Keys and labs
# ---------------------------------------------------------------------------------------------


def key_error(tmp_path: Path, lab: Path, key: Any) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(key if isinstance(key, str) else yaml.safe_dump(key, sort_keys=False))
    with pytest.raises(ValueError) as e:
        grading.load_key(path, grading.load_release(lab))
    return str(e.value)


def _q(*checks: dict[str, Any], gid: str = "labx-q1-test", **extra: Any) -> dict[str, Any]:
    return {"lab": "labx", "questions": [{"grade_id": gid, "checks": list(checks), **extra}]}


@pytest.mark.parametrize("key,match", [
    ("a: [1", "not valid YAML"),
    ("[1, 2]", "top level: expected a mapping"),
    ({"lab": "labx", "questions": [], "extra": 1}, "unknown field 'extra'"),
    ({"lab": "", "questions": []}, "lab: expected the lab's name"),
    ({"lab": "labx", "questions": []}, "expected a non-empty list of questions"),
    ({"lab": "labx", "profile": "inputs/profile", "questions": [1]}, "expected a recorded value"),
    ({"lab": "labx", "questions": [{"checks": []}]}, "questions\\[0\\]: expected a mapping"),
    (_q(), "expected a non-empty list of checks"),
    (_q({"rule": "argmn", "points": 1}),
     "unknown rule 'argmn'; valid rules: aggregate, argmax, argmin"),
    (_q({"rule": "test_cell", "points": 0}), "points must be a number > 0, got 0"),
    (_q({"rule": "test_cell", "points": "1"}), "points must be a number > 0"),
    (_q({"rule": "range", "points": 3, "record": "x"}), "needs 'min', 'max' or both"),
    (_q({"rule": "tolerance", "points": 3, "record": "x", "expected": 1}),
     "needs 'rtol', 'atol' or both"),
    (_q({"rule": "argmin", "points": 3, "record": "x"}), "rule 'argmin' needs parameter 'table'"),
    (_q({"rule": "equals", "points": 3, "record": "x", "expected": 1, "tol": 1}),
     "rule 'equals' takes no parameter 'tol'"),
    (_q({"rule": "one_of", "points": 3, "record": "x", "options": "a"}), "must be a list"),
    (_q({"rule": "recorded", "points": 3, "record": "x", "kind": "blob"}), "'kind' must be"),
    (_q({"rule": "tolerance", "points": 3, "record": "x", "expected": 1, "rtol": -1}),
     "rtol must be a number >= 0"),
    (_q({"rule": "range", "points": 3, "record": "x", "min": 0, "by_profile": {"smoke": 1}}),
     "by_profile must map a profile name"),
    (_q({"rule": "range", "points": 3, "record": "x", "min": 0,
         "by_profile": {"smoke": {"lo": 1}}}), "by_profile 'smoke' overrides 'lo'"),
    (_q({"rule": "test_cell", "points": 3, "for_each": ["a"]}), "for_each must be one name"),
    (_q({"rule": "argmin", "points": 3, "record": "t", "table": "$r", "dropna": "x"}),
     "dropna must be a list of field names"),
    (_q({"rule": "argmin", "points": 3, "record": "t", "table": "$r", "item": "last"}),
     "item must be a list index"),
    (_q({"rule": "aggregate", "points": 3, "record": "t", "rows": "$r", "key_field": 1,
         "value_field": "v"}), "key_field must be a field name or a list"),
    (_q({"rule": "aggregate", "points": 3, "record": "t", "rows": "$r", "key_field": "k",
         "value_field": "v", "reduce": "median"}), "reduce must be one of mean, min, max, sum"),
    (_q({"rule": "aggregate", "points": 3, "record": "t", "rows": "$r", "key_field": "k",
         "value_field": "v", "where": ["a"]}), "where must map a field"),
    (_q({"rule": "test_cell", "points": 1}, {"rule": "test_cell", "points": 1}),
     "award 2 points, but the lab gives that cell points: 3"),
    (_q({"rule": "test_cell", "points": 3}, gid="labx-q1-answer"),
     "'labx-q1-answer' is not a graded cell"),
    (_q({"rule": "test_cell", "points": 3}, cells=["labx-q7-answer"]),
     "cell 'labx-q7-answer' is not a grade_id"),
    (_q({"rule": "test_cell", "points": 3}, cells="labx-q1-answer"), "must be a list"),
    (_q({"rule": "test_cell", "points": 3, "cell": "labx-q8-test"}),
     "test_cell names 'labx-q8-test'"),
    (_q({"rule": "test_cell", "points": 3}, notes="x"), "unknown field 'notes'"),
    ({"lab": "laby", "questions": [{"grade_id": "labx-q1-test", "checks": [
        {"rule": "test_cell", "points": 3}]}]}, "the key is for 'laby', but --lab is 'labx'"),
    ({"lab": "labx", "questions": [
        {"grade_id": "labx-q1-test", "checks": [{"rule": "test_cell", "points": 3}]},
        {"grade_id": "labx-q1-test", "checks": [{"rule": "test_cell", "points": 3}]}]},
     "grade_id 'labx-q1-test' appears twice"),
])
def test_bad_keys(lab, tmp_path, key, match):
    import re

    assert re.search(match, key_error(tmp_path, lab, key))


def test_key_and_lab_files(lab, tmp_path):
    with pytest.raises(FileNotFoundError, match="answer key .*nothere.yml' not found"):
        grading.load_key(tmp_path / "nothere.yml")
    with pytest.raises(FileNotFoundError, match="lab notebook .*nolab.ipynb' not found"):
        grading.load_release(tmp_path / "nolab.ipynb")
    (tmp_path / "junk.ipynb").write_text("junk")
    with pytest.raises(ValueError, match="cannot be used: not a notebook"):
        grading.load_release(tmp_path / "junk.ipynb")
    write(new_notebook(cells=[new_code_cell("1")]), tmp_path / "plain.ipynb")
    with pytest.raises(ValueError, match="has no cells with nbgrader metadata"):
        grading.load_release(tmp_path / "plain.ipynb")
    nb = make_lab()
    nb.cells.append(copy.deepcopy(nb.cells[3]))
    nb.cells[-1].id = "dupe"
    write(nb, tmp_path / "dup.ipynb")
    with pytest.raises(ValueError, match="uses grade_id 'labx-q1-test' more than once"):
        grading.load_release(tmp_path / "dup.ipynb")
    key = grading.load_key(grading.default_key_path(lab), grading.load_release(lab))
    assert key.max_points == 5 and key.questions[0].cells == ("labx-q1-test", "labx-q1-answer")
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        grading.grade_submissions([], lab, max_bytes=0)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,match", [
    (["--timeout", "5"], "--timeout only applies with --execute"),
    (["--kernel", "python3"], "--kernel only applies with --execute"),
    (["--student-from", "name"], "must be auto, file, folder or regex:PATTERN"),
    (["--max-size", "0"], "expected a number > 0"),
    (["--execute", "--timeout", "-1"], "expected a number > 0"),
])
def test_grade_bad_flags(lab, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(["grade", str(tmp_path), "--lab", str(lab), "--out", str(tmp_path / "g.csv"),
              *extra])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_grade_cli_errors(lab, tmp_path, capsys):
    out = str(tmp_path / "g.csv")
    assert main(["grade", str(tmp_path), "--lab", str(tmp_path / "no.ipynb"), "--out", out]) == 1
    assert "lab notebook" in capsys.readouterr().err
    assert main(["grade", str(tmp_path), "--lab", str(lab), "--key", str(tmp_path / "k.yml"),
                 "--out", out]) == 1
    assert "answer key" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["grade", str(tmp_path / "empty"), "--lab", str(lab), "--out", out]) == 1
    assert "no submissions found" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(_q({"rule": "test_cell", "points": 1})))
    with pytest.raises(SystemExit):
        main(["grade", str(tmp_path), "--lab", str(lab), "--key", str(bad), "--out", out])
    assert "the lab gives that cell points: 3" in capsys.readouterr().err


def test_grade_is_listed_in_the_full_parser(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "grade" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --execute (starts real kernels: a few seconds each)
# ---------------------------------------------------------------------------------------------


def test_execute_regrades_from_fresh_outputs(tmp_path, capsys):
    lab_nb = make_lab("labz", points=(2,))
    lab_nb.cells[2].source = ("from labkit.record import record\n"
                              "record('b', min({'8': 3.0, '16': 1.0}.items(), key=lambda kv: "
                              "kv[1])[0])\nanswer1 = 1")
    lab_nb.cells[3].source = "assert answer1 == 1"
    lab_path = write(lab_nb, tmp_path / "labz.ipynb")
    key = tmp_path / "k.yml"
    key.write_text(yaml.safe_dump({"lab": "labz", "questions": [{
        "grade_id": "labz-q1-test", "checks": [
            {"rule": "test_cell", "points": 1},
            {"rule": "equals", "record": "b", "expected": "16", "points": 1}]}]}))
    sub = executed(lab_nb, {1: {"b": "8"}})          # saved outputs say 8: wrong
    sub.cells[3].source = "pass"                     # and the locked test cell was tampered with
    path = write(sub, tmp_path / "subs" / "alice.ipynb")
    (plain,) = grading.grade_submissions([path], lab_path, key)
    assert plain.total == 0
    saved = tmp_path / "executed"
    assert main(["grade", str(path), "--lab", str(lab_path), "--key", str(key), "--out",
                 str(tmp_path / "g.csv"), "--execute", "--timeout", "60", "--save-executed",
                 str(saved)]) == 0
    (row,) = read_gradebook(tmp_path / "g.csv")
    assert row["total"] == "2", row
    assert "locked cells restored from the lab before running: labz-q1-test" in row["flags"]
    rerun = nbformat.read(saved / "alice.ipynb", as_version=4)
    assert rerun.cells[3].source == "assert answer1 == 1"
    capsys.readouterr()


def test_execute_timeout_is_a_flag(tmp_path):
    lab_nb = make_lab("labz", points=(1,))
    lab_nb.cells[1].source = "import time\ntime.sleep(30)"
    lab_nb.cells[3].source = "assert True"
    lab_path = write(lab_nb, tmp_path / "labz.ipynb")
    key = tmp_path / "k.yml"
    key.write_text(yaml.safe_dump({"lab": "labz", "questions": [{
        "grade_id": "labz-q1-test", "checks": [{"rule": "test_cell", "points": 1}]}]}))
    path = write(executed(lab_nb), tmp_path / "alice.ipynb")
    (r,) = grading.grade_submissions([path], lab_path, key, execute=True, timeout=2)
    assert any("ran longer than 2 s" in f for f in r.flags), r.flags
    # The cells after the timeout did not run, and their old outputs were cleared.
    assert r.total == 0 and "was not run" in r.questions[0].reasons[0]


# ---------------------------------------------------------------------------------------------
# Hostile submissions (issue 15): nesting, files that are not files, formulas, links
# ---------------------------------------------------------------------------------------------


def grade_cli(lab: Path, tmp_path: Path, *submissions: Any, extra: tuple[str, ...] = (),
              timeout: float = 300) -> tuple[dict[str, dict[str, str]], str]:
    """`labkit grade` in a child process (a hang fails the test instead of stopping it):
    gradebook rows by student, and what it printed."""
    out = tmp_path / "gb.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "labkit", "grade", *map(str, submissions), "--lab", str(lab),
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return {r["student"]: r for r in read_gradebook(out)}, proc.stdout


def nested(depth: int, kind: str = "list") -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def test_json_nesting_is_bounded_before_parsing(lab, tmp_path):
    """Class: input nested past what a parser, nbformat or a rule can recurse through. Each
    case gets its row; a deep record is ignored (and flagged) and the rest still grades."""
    base = make_lab()
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "brackets.ipynb").write_text("[" * 100_000)
    (subs / "objects.ipynb").write_text('{"a":' * 100_000)
    (subs / "closers.ipynb").write_text("]" * 100_000)
    deep_meta = json.loads(nbformat.writes(executed(base, GOOD)))  # plain JSON: nbformat
    deep_meta["cells"][2]["metadata"]["deep"] = nested(900, "dict")  # would recurse on it
    (subs / "meta900.ipynb").write_text(json.dumps(deep_meta))
    at_limit = json.loads(nbformat.writes(executed(base, GOOD)))
    at_limit["cells"][2]["metadata"]["deep"] = nested(60)  # 4 (root, cells, cell, metadata)
    (subs / "atlimit.ipynb").write_text(json.dumps(at_limit))  # + 60 = 64, the limit
    over = json.loads(nbformat.writes(executed(base, GOOD)))
    over["cells"][2]["metadata"]["deep"] = nested(61)
    (subs / "overlimit.ipynb").write_text(json.dumps(over))
    text_record = executed(base, GOOD)                     # a text/plain record, 50,000 deep
    text_record.cells[2].outputs.append(new_output("display_data", data={
        "text/plain": "labkit.record: junk = " + "[" * 50_000 + "]" * 50_000}))
    write(text_record, subs / "textrecord.ipynb")
    tuple_record = executed(base, GOOD)                    # as a Python literal, 50,000 deep
    tuple_record.cells[2].outputs.append(new_output("display_data", data={
        "text/plain": "labkit.record: junk = " + "(" * 50_000 + ")" * 50_000}))
    write(tuple_record, subs / "tuplerecord.ipynb")
    json_record = executed(base, GOOD)                     # the JSON payload as a string
    json_record.cells[2].outputs.append(new_output("display_data", data={
        RECORD_MIME: '{"name": "junk", "value": ' + "[" * 50_000 + "]" * 50_000 + "}"}))
    write(json_record, subs / "jsonrecord.ipynb")
    needed = executed(base, GOOD)                          # a graded record made too deep
    for out in needed.cells[2].outputs:
        if out.data[RECORD_MIME]["name"] == "critical_batch_size":
            out.data = {"text/plain": "labkit.record: critical_batch_size = "
                        + "[" * 5_000 + "16" + "]" * 5_000}
    write(needed, subs / "needed.ipynb")
    in_strings = executed(base, GOOD)                      # brackets inside strings do not count
    in_strings.cells[1].outputs.append(new_output("stream", name="stdout", text="[{(" * 100_000))
    write(in_strings, subs / "instrings.ipynb")
    (subs / "bigint.ipynb").write_text('{"nbformat": ' + "9" * 100_000 + ', "cells": []}')
    rows, printed = grade_cli(lab, tmp_path, subs)
    deep = "nests lists and objects more than 64 levels deep"
    expect = {
        "brackets": ("error", "0", deep), "objects": ("error", "0", deep),
        "meta900": ("error", "0", deep), "overlimit": ("error", "0", deep),
        "closers": ("error", "0", "not valid JSON"),
        "bigint": ("error", "0", "not valid JSON (Exceeds the limit"),
        "atlimit": ("graded", "5", ""), "instrings": ("graded", "5", ""),
        "textrecord": ("graded", "5", ""), "tuplerecord": ("graded", "5", ""),
        "jsonrecord": ("graded", "5", ""),
        "needed": ("graded", "3", "no labkit.record output named 'critical_batch_size'"),
    }
    assert set(rows) == set(expect)
    for student, (status, total, words) in expect.items():
        row = rows[student]
        assert (row["status"], row["total"]) == (status, total), (student, row)
        assert words in row["reasons"], (student, row["reasons"])
        assert "could not be graded" not in row["reasons"], row
    assert "cell 2: the record 'junk' nests more than 64 levels deep and was ignored" \
        in rows["textrecord"]["flags"]
    assert "cell 2: the record 'junk' nests more than 64" in rows["tuplerecord"]["flags"]
    assert "cell 2: a record nests more than 64 levels deep" in rows["jsonrecord"]["flags"]
    assert "the record 'critical_batch_size' nests more than 64" in rows["needed"]["flags"]
    assert "12 submission(s), 6 could not be graded" in printed


def test_the_batch_survives_any_failure_of_one_submission(lab, tmp_path, monkeypatch):
    """Reading, executing and grading all run inside the per-submission error handling."""
    subs = tmp_path / "subs"
    for name in ("alice", "bob", "carol"):
        write(executed(make_lab(), GOOD), subs / f"{name}.ipynb")
    real_read = grading.read_notebook

    def flaky_read(path, *args, **kwargs):
        if Path(path).stem == "bob":
            raise RecursionError("maximum recursion depth exceeded")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(grading, "read_notebook", flaky_read)
    results = grading.grade_submissions([subs], lab)
    assert [(r.student, r.total, r.status) for r in results] == [
        ("alice", 5.0, "graded"), ("bob", 0.0, "error"), ("carol", 5.0, "graded")]
    assert results[1].error == "could not be graded: RecursionError: maximum recursion depth " \
                               "exceeded"


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=12)
_SPOTS = ["root", "cells", "cell", "metadata", "outputs", "output", "data", "record", "value",
          "text", "nbformat", "source"]


@settings(max_examples=60, deadline=None)
@given(spot=st.sampled_from(_SPOTS), junk=_JSON, depth=st.sampled_from([0, 1, 70, 3000]))
def test_any_junk_anywhere_gets_exactly_one_row(spot, junk, depth):
    """Property: whatever JSON replaces whatever part of a correct submission (and however
    deep), grading returns exactly one row for it and raises nothing."""
    import tempfile

    for _ in range(depth):
        junk = [junk]
    nb = json.loads(nbformat.writes(executed(make_lab(), GOOD)))
    cell = nb["cells"][2]
    out = cell["outputs"][0]
    targets = {"cells": (nb, "cells"), "cell": (nb["cells"], 2), "metadata": (cell, "metadata"),
               "outputs": (cell, "outputs"), "output": (cell["outputs"], 0),
               "data": (out, "data"), "record": (out["data"], RECORD_MIME),
               "value": (out["data"][RECORD_MIME], "value"), "text": (out["data"], "text/plain"),
               "nbformat": (nb, "nbformat"), "source": (cell, "source")}
    if spot == "root":
        nb = junk
    else:
        parent, k = targets[spot]
        parent[k] = junk
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lab_path = write(make_lab(), tmp / "labs" / "labx.ipynb")
        (tmp / "labs" / "keys").mkdir()
        (tmp / "labs" / "keys" / "labx.yml").write_text(yaml.safe_dump(KEY))
        sub = tmp / "subs" / "alice.ipynb"
        sub.parent.mkdir()
        try:
            sub.write_text(json.dumps(nb))
        except RecursionError:  # too deep for json.dumps itself: write the brackets directly
            sub.write_text("[" * depth + "1" + "]" * depth)
        (row,) = grading.grade_submissions([sub.parent], lab_path)
        assert row.student == "alice" and 0 <= row.total <= 5
        assert row.error is None or "could not be graded" not in row.error, row.error


def test_only_regular_files_are_read(lab, tmp_path):
    """Class: paths that are not regular files (named pipes, sockets, devices) get an error row
    and are never opened for reading, so nothing blocks."""
    import socket

    subs = tmp_path / "subs"
    write(executed(make_lab(), GOOD), subs / "good.ipynb")
    os.mkfifo(subs / "fifo.ipynb")
    (subs / "bob" / "labx").mkdir(parents=True)
    os.mkfifo(subs / "bob" / "labx" / "labx.ipynb")        # nbgrader's submitted/ layout
    (subs / "carol.ipynb").symlink_to("fifo.ipynb")        # a link (inside) to a pipe
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(subs / "sock.ipynb"))
    single = tmp_path / "single.ipynb"
    os.mkfifo(single)
    try:
        rows, _ = grade_cli(lab, tmp_path, subs, single, "/dev/null", "/dev/zero", timeout=120)
    finally:
        sock.close()
    pipe = "cannot read: it is a named pipe (FIFO), not a regular file"
    expect = {"good": ("graded", ""), "fifo": ("error", pipe), "bob": ("error", pipe),
              "carol": ("error", pipe), "single": ("error", pipe),
              "sock": ("error", "cannot read: it is a socket, not a regular file"),
              "null": ("error", "cannot read: it is a character device"),
              "zero": ("error", "cannot read: it is a character device")}
    assert set(rows) == set(expect)
    for student, (status, words) in expect.items():
        assert rows[student]["status"] == status and words in rows[student]["reasons"], \
            (student, rows[student])
    assert "symbolic link to fifo.ipynb" in rows["carol"]["flags"]


def test_a_pipe_as_lab_or_key_is_an_error_not_a_hang(lab, tmp_path):
    fifo = tmp_path / "lab.ipynb"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "labkit", "grade", str(tmp_path), "--lab",
                           str(fifo), "--out", str(tmp_path / "g.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "it is a named pipe (FIFO)" in proc.stderr, proc.stderr
    key = tmp_path / "key.yml"
    os.mkfifo(key)
    proc = subprocess.run([sys.executable, "-m", "labkit", "grade", str(tmp_path), "--lab",
                           str(lab), "--key", str(key), "--out", str(tmp_path / "g.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"answer key '{key}': cannot read: it is a named pipe" \
        in proc.stderr, proc.stderr


def test_a_file_swapped_for_a_pipe_after_the_check_is_not_read(tmp_path, monkeypatch):
    """The file opened is checked again: a regular file at the first look that is a named pipe
    when opened (swapped in between) is refused without blocking."""
    fifo = tmp_path / "x.ipynb"
    os.mkfifo(fifo)
    regular = write(make_lab(), tmp_path / "regular.ipynb").stat()
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: regular if self == fifo
                        else real_stat(self, **kw))
    assert grading.read_notebook(fifo) == (None, "cannot read: it is a named pipe (FIFO), not "
                                           "a regular file; only regular notebook files are read")


HOSTILE_IDS = ["=HYPERLINK(\"evil.example\",\"click\")", "+1+1", "-2+3", "@SUM(A1)",
               "\tx", "\rx", " =1+1", "a;=1+1", "a,=1+1", "=1+2\";=1+2", "plain"]


def test_gradebook_cells_never_start_a_formula(lab, tmp_path):
    """Class: student ids, file names and reasons that a spreadsheet would run as a formula
    (OWASP's =, +, -, @, tab, CR, also after spaces). Each is written with a leading single
    quote, and every cell is quoted."""
    subs = tmp_path / "subs"
    good = executed(make_lab(), GOOD)
    for name in HOSTILE_IDS:
        write(good, subs / f"{name}.ipynb")
    write(good, subs / "-x" / "labx.ipynb")                # a student folder
    write(good, tmp_path / "=direct.ipynb")                 # given directly: the path too
    rows, _ = grade_cli(lab, tmp_path, "subs", "=direct.ipynb")
    neutral = {"'" + n if n.lstrip(" ")[0] in "=+-@\t\r" else n for n in HOSTILE_IDS}
    assert set(rows) == neutral | {"'=direct", "'-x"}
    assert {r["total"] for r in rows.values()} == {"5"}
    assert rows["'=direct"]["submission"] == "'=direct.ipynb"
    raw = (tmp_path / "gb.csv").read_text(encoding="utf-8")
    assert '\n"plain","subs/plain.ipynb","graded","3","2","5","5","",""\n' in raw, raw
    assert '\n"\'=1+2"";=1+2","subs/=1+2"";=1+2.ipynb","graded",' in raw, raw
    # A reason that starts with '-' (an error of --student-from) is text too.
    rows, _ = grade_cli(lab, tmp_path, "subs/plain.ipynb",
                        extra=("--student-from", "regex:nomatch"))
    assert rows["plain"]["reasons"].startswith("'--student-from regex:nomatch: the pattern")


def test_feedback_pages_are_literal_text(lab, tmp_path):
    """The Markdown feedback page shows what a student controls (the file name, recorded
    values, error messages) as literal text: rendered, it has no heading, link, image, HTML,
    code or emphasis of the student's making."""
    from markdown_it import MarkdownIt

    evil = ("<img src=x onerror=alert(1)> [click](http://evil.example) `code` *bold* _it_ "
            "~~del~~ <http://auto.example> \\\n# Total: 5 / 5\n\n<script>alert(1)</script>")
    nb = executed(make_lab(), GOOD, test_error={2: evil})
    nb.cells[2].outputs.append(record_output("critical_batch_size", evil))   # a recorded value
    name = "<b>x<\\b> ![i](http:x) _y_"
    (r,) = grading.grade_submissions([write(nb, tmp_path / "subs" / f"{name}.ipynb")], lab)
    page = grading.feedback_markdown(r)
    tokens = [t for block in MarkdownIt("commonmark").enable("strikethrough").parse(page)
              for t in [block, *(block.children or [])]]
    kinds = [t.type for t in tokens]
    assert not set(kinds) & {"html_inline", "html_block", "link_open", "image", "code_inline",
                             "em_open", "s_open", "code_block", "fence"}, kinds
    assert kinds.count("strong_open") == 1    # **Total: ...**
    assert kinds.count("heading_open") == 3   # the title and the two questions
    assert page.startswith(r"# labx: feedback for \<b>x\<\\b> !\[i](http:x) \_y\_")
    assert r"\<img src=x onerror=alert(1)> \[click](http://evil.example) \`code\`" in page


def test_terminal_output_escapes_control_characters(lab, tmp_path):
    write(executed(make_lab(), GOOD), tmp_path / "subs" / "\x1b[2Jevil\r.ipynb")
    rows, printed = grade_cli(lab, tmp_path, tmp_path / "subs")
    assert "\x1b" not in printed and "\r" not in printed
    assert "\\x1b[2Jevil\\r  5 / 5" in printed
    assert set(rows) == {"\x1b[2Jevil\r"}


def test_links_out_of_the_submissions_folder_are_not_followed(lab, tmp_path):
    """Class: symbolic links that lead out of the submissions folder (a notebook, a student
    folder, a folder inside one, relative or absolute, given directly) are not followed: an
    error row names the target. Links that stay inside are followed and flagged."""
    good = executed(make_lab(), GOOD)
    outside = tmp_path / "elsewhere"
    write(good, outside / "solution.ipynb")
    write(good, outside / "folder" / "labx.ipynb")
    subs = tmp_path / "subs"
    write(good, subs / "alice.ipynb")
    write(good, subs / "alicedir" / "labx.ipynb")
    (subs / "mallory.ipynb").symlink_to(outside / "solution.ipynb")        # absolute, out
    (subs / "bob").symlink_to(outside / "folder")                          # a student folder
    (subs / "carol" / "labx").mkdir(parents=True)                           # relative, out
    (subs / "carol" / "labx" / "labx.ipynb").symlink_to("../../../elsewhere/solution.ipynb")
    (subs / "dave").mkdir()                                                 # a folder inside
    (subs / "dave" / "labx").symlink_to(outside / "folder")
    (subs / "erin.ipynb").symlink_to("alice.ipynb")                        # inside: flagged
    (subs / "frank").symlink_to("alicedir")                                # inside: flagged
    (subs / "loop.ipynb").symlink_to("loop.ipynb")
    (subs / "gina").mkdir()                                                 # a loop of folders
    write(good, subs / "gina" / "labx.ipynb")
    (subs / "gina" / "again").symlink_to("..")
    (subs / "hank" / "labx").mkdir(parents=True)                            # chain, in, then out
    (subs / "hank" / "labx" / "labx.ipynb").symlink_to(subs / "mallory.ipynb")
    rows, _ = grade_cli(lab, tmp_path, subs)
    out = f"outside the submissions folder {subs.resolve().as_posix()}"
    expect = {
        "alice": ("graded", "5", ""), "alicedir": ("graded", "5", ""),
        "mallory": ("error", "0", "not graded: the notebook is a symbolic link to "
                    f"{(outside / 'solution.ipynb').as_posix()}, {out}"),
        "bob": ("error", "0", "not searched: the student's folder is a symbolic link to "
                f"{(outside / 'folder').as_posix()}, {out}"),
        "carol": ("error", "0", "not graded: the notebook is a symbolic link to "
                  f"{(outside / 'solution.ipynb').as_posix()}"),
        "dave": ("error", "0", "no notebook (.ipynb) in the student's folder (links out of the "
                 f"student's folder are not followed: labx -> {outside / 'folder'})"),
        "erin": ("graded", "5", ""), "frank": ("graded", "5", ""),
        "loop": ("error", "0", "cannot read: the notebook is a loop of symbolic links"),
        "gina": ("graded", "5", ""),
        "hank": ("error", "0", "not graded: the notebook is a symbolic link to "
                 f"{(outside / 'solution.ipynb').as_posix()}"),
    }
    assert set(rows) == set(expect)
    for student, (status, total, words) in expect.items():
        row = rows[student]
        assert (row["status"], row["total"]) == (status, total), (student, row)
        assert words in row["reasons"], (student, row["reasons"])
    assert rows["erin"]["flags"] == ("the notebook is a symbolic link to alice.ipynb in the "
                                     "submissions folder: check that it is this student's own "
                                     "work")
    assert rows["frank"]["flags"].startswith("the student's folder is a symbolic link to alicedir")
    assert rows["alice"]["flags"] == rows["gina"]["flags"] == ""
    # Given directly, a notebook that links out of its folder is not followed either; a folder
    # named on the command line is the instructor's choice, even through a link.
    (tmp_path / "class").symlink_to(subs)
    rows, _ = grade_cli(lab, tmp_path, subs / "mallory.ipynb", subs / "erin.ipynb")
    assert rows["mallory"]["status"] == "error" and out in rows["mallory"]["reasons"]
    assert rows["erin"]["total"] == "5"
    rows, _ = grade_cli(lab, tmp_path, tmp_path / "class")
    assert rows["alice"]["flags"] == "" and rows["mallory"]["status"] == "error"


# ---------------------------------------------------------------------------------------------
# nbgrader's release and source versions: the key, hidden tests, unanswered questions
# ---------------------------------------------------------------------------------------------


def nbgrader_release(nb: Any) -> Any:
    """What nbgrader's generate_assignment makes of a source notebook: solutions replaced by
    nbgrader's stub (raise NotImplementedError()), hidden tests and outputs removed."""
    if sys.version_info < (3, 11):
        pytest.skip("nbgrader 0.9 (labkit[instructor]) needs Python 3.11")
    from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions

    nb = copy.deepcopy(nb)
    for step in (ClearSolutions(), ClearHiddenTests(), ClearOutput()):
        nb, _ = step.preprocess(nb, {})
    return nb


def test_nbgrader_release_of_a_lab(tmp_path):
    source = make_lab()
    release = nbgrader_release(source)
    assert "raise NotImplementedError()" in release.cells[2].source
    assert "HIDDEN" not in release.cells[3].source and "BEGIN SOLUTION" not in str(release)
    s = grading.load_release(write(source, tmp_path / "source.ipynb"))
    r = grading.load_release(write(release, tmp_path / "release.ipynb"))
    assert (s.has_hidden_tests, s.has_solutions, r.has_hidden_tests, r.has_solutions) == (
        True, True, False, False)
    assert [c.source for c in s.cells if c.locked] == [c.source for c in r.cells if c.locked]


def test_the_key_is_found_from_the_release_or_the_source(tmp_path, capsys):
    source = make_lab()
    source.metadata["labkit"] = {"lab": "labx"}
    release = nbgrader_release(source)
    key = yaml.safe_dump(KEY)
    sub = write(executed(release, GOOD), tmp_path / "subs" / "alice.ipynb")
    layouts = {  # the lab given to --lab -> the key it finds
        "labs/labx.ipynb": "labs/keys/labx.yml",                       # labs/ (the release)
        "labs/source/labx.ipynb": "labs/keys/labx.yml",                # labs/source/
        "course/release/labx/labx.ipynb": "course/keys/labx.yml",      # nbgrader's course
        "course/source/labx/labx.ipynb": "course/keys/labx.yml",
        "other/renamed.ipynb": "other/keys/labx.yml",                  # metadata.labkit.lab
    }
    for lab, key_path in layouts.items():
        nb = source if "source" in lab else release
        write(nb, tmp_path / lab)
        (tmp_path / key_path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key_path).write_text(key)
        assert grading.find_key(tmp_path / lab, grading.load_release(tmp_path / lab)) == \
            tmp_path / key_path
        (r,) = grading.grade_submissions([sub], tmp_path / lab)
        assert (r.total, r.flags, r.error) == (5.0, [], None), (lab, r.flags, r.error)
    alone = write(release, tmp_path / "alone" / "deep" / "labx.ipynb")
    out = str(tmp_path / "g.csv")
    assert main(["grade", str(sub), "--lab", str(alone), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"no answer key for labx: looked for {alone.parent.as_posix()}/keys/labx.yml, " \
           f"{alone.parent.parent.as_posix()}/keys/labx.yml" in err
    assert "; pass --key KEY.yml (the labkit repository ships it as labs/keys/labx.yml)" in err


def hidden_test_lab() -> Any:
    """labz: the answer must be 1; the visible test only checks that there is one."""
    lab = make_lab("labz", points=(1,))
    lab.metadata["labkit"] = {"lab": "labz"}
    lab.cells[1].source = "x = 0"
    lab.cells[2].source = "### BEGIN SOLUTION\nanswer1 = 1\n### END SOLUTION"
    lab.cells[3].source = ("assert answer1 is not None\n### BEGIN HIDDEN TESTS\n"
                           "assert answer1 == 1, 'hidden test'\n### END HIDDEN TESTS")
    return lab


def test_execute_runs_the_hidden_tests_of_the_source(tmp_path, capsys):
    source = hidden_test_lab()
    release = nbgrader_release(source)
    labs = tmp_path / "labs"
    write(release, labs / "labz.ipynb")
    (labs / "keys").mkdir()
    (labs / "keys" / "labz.yml").write_text(yaml.safe_dump({"lab": "labz", "questions": [{
        "grade_id": "labz-q1-test", "checks": [{"rule": "test_cell", "points": 1}]}]}))
    sub = executed(release)
    sub.cells[2].source = "answer1 = 2"                 # passes the visible test only
    sub_path = write(sub, tmp_path / "subs" / "alice.ipynb")
    out = tmp_path / "g.csv"

    def grade(*extra: str) -> tuple[str, str]:
        assert main(["grade", str(sub_path), "--lab", str(labs / "labz.ipynb"), "--out",
                     str(out), "--execute", "--timeout", "120", *extra]) == 0
        (row,) = read_gradebook(out)
        return row["total"], capsys.readouterr().out

    total, printed = grade()                            # a release and no source at hand
    assert total == "1"
    assert "(a release version: hidden tests it may have had are not run; pass --source " \
           "SOURCE.ipynb to run them)" in printed
    other = write(source, tmp_path / "mine" / "labz-source.ipynb")
    total, printed = grade("--source", str(other))     # the source named
    assert total == "0" and f"the locked cells run as in {other}" in printed
    write(source, labs / "source" / "labz.ipynb")       # found in labs/source/
    total, printed = grade()
    assert total == "0" and f"run as in {labs / 'source' / 'labz.ipynb'}\n" in printed
    # The source given as --lab: its hidden tests run, even in an untouched test cell.
    assert main(["grade", str(sub_path), "--lab", str(labs / "source" / "labz.ipynb"),
                 "--out", str(out), "--execute", "--timeout", "120"]) == 0
    assert read_gradebook(out)[0]["total"] == "0"
    capsys.readouterr()


def test_execute_trains_in_the_graders_results_folder(tmp_path, monkeypatch, capsys):
    """A submission that ships finished runs beside the notebook (``results/``, where a lab
    looks when LABKIT_RESULTS is unset) is executed with the grader's results folder:
    ``--results DIR``, else $LABKIT_RESULTS, else ~/.cache/labkit/grading-results; a results
    folder inside the submissions is refused."""
    monkeypatch.delenv("LABKIT_RESULTS", raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    lab_nb = make_lab("labz", points=(1,))
    lab_nb.cells[1].source = ("from labkit.labs import results_root\n"
                              "from labkit.record import record\n"
                              "record('where', str(results_root()))")
    lab_nb.cells[3].source = "assert True"
    lab_path = write(lab_nb, tmp_path / "labz.ipynb")
    key = tmp_path / "k.yml"
    key.write_text(yaml.safe_dump({"lab": "labz", "questions": [{
        "grade_id": "labz-q1-test", "checks": [{"rule": "test_cell", "points": 1}]}]}))
    subs = tmp_path / "subs"
    write(executed(lab_nb), subs / "alice" / "labz.ipynb")
    (subs / "alice" / "results" / "labz" / "smoke").mkdir(parents=True)  # shipped "runs"
    saved = tmp_path / "executed"

    def where(*extra: str) -> tuple[str, str]:
        assert main(["grade", str(subs), "--lab", str(lab_path), "--key", str(key), "--out",
                     str(tmp_path / "g.csv"), "--execute", "--timeout", "120",
                     "--save-executed", str(saved), *extra]) == 0
        nb = nbformat.read(saved / "alice.ipynb", as_version=4)
        return grading.extract_records(nb)[0]["where"].value, capsys.readouterr().out

    default = (tmp_path / "home" / ".cache" / "labkit" / "grading-results").resolve()
    value, printed = where()
    assert value == str(default)
    assert f"--execute: the labs train their runs in {default}" in printed
    value, _ = where("--results", str(tmp_path / "mine"))
    assert value == str((tmp_path / "mine").resolve())
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "env"))
    value, _ = where()
    assert value == str((tmp_path / "env").resolve())

    for bad in (["--results", str(subs / "alice" / "results")], ["--results", str(subs)]):
        with pytest.raises(SystemExit):
            main(["grade", str(subs), "--lab", str(lab_path), "--key", str(key), "--out",
                  str(tmp_path / "g.csv"), "--execute", *bad])
        assert "is inside the submissions folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grade", str(subs), "--lab", str(lab_path), "--out", "g.csv", "--results", "x"])
    assert "--results only applies with --execute" in capsys.readouterr().err


def test_autograding_never_reloads_runs_from_the_submission(tmp_path, monkeypatch):
    """nbgrader's autograde (NBGRADER_EXECUTION=autograde) runs each notebook in the
    student's folder: without LABKIT_RESULTS, a lab then keeps its runs in the grader's
    folder, not in the ``results/`` it finds there."""
    from labkit.labs import results_root

    submission = tmp_path / "autograded" / "alice" / "lab3"
    (submission / "results").mkdir(parents=True)
    monkeypatch.chdir(submission)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LABKIT_RESULTS", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert results_root() == submission / "results"  # a student working in their own folder
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")  # a student's own validation
    assert results_root() == submission / "results"
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert results_root() == grading.grader_results_root() == \
        tmp_path / "home" / ".cache" / "labkit" / "grading-results"
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "chosen"))
    assert results_root() == tmp_path / "chosen"
    # The instructor sources keep their runs with the student versions' (labs/results/).
    monkeypatch.delenv("LABKIT_RESULTS")
    monkeypatch.delenv("NBGRADER_EXECUTION")
    (tmp_path / "repo" / "labs" / "source").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "labs" / "source")
    assert results_root() == tmp_path / "repo" / "labs" / "results"


def test_a_source_that_does_not_match_is_refused(tmp_path, capsys):
    source = hidden_test_lab()
    lab = write(nbgrader_release(source), tmp_path / "labz.ipynb")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "labz.yml").write_text(yaml.safe_dump({"lab": "labz", "questions": [{
        "grade_id": "labz-q1-test", "checks": [{"rule": "test_cell", "points": 1}]}]}))
    changed = copy.deepcopy(source)
    changed.cells[3].source = "assert answer1 == 3"
    other = write(changed, tmp_path / "changed.ipynb")
    base = ["grade", str(tmp_path / "none"), "--lab", str(lab), "--out", str(tmp_path / "g.csv")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--execute", "--source", str(other)])
    assert e.value.code == 2 and "the locked cell 'labz-q1-test' differs from the lab's (not " \
        "only by hidden tests)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--source", str(other)])
    assert e.value.code == 2 and "--source only applies with --execute" in \
        capsys.readouterr().err


def test_no_saved_outputs_is_said_once_per_question(lab, tmp_path):
    subs = tmp_path / "subs"
    write(make_lab(), subs / "carol.ipynb")
    out = tmp_path / "g.csv"
    assert main(["grade", str(subs), "--lab", str(lab), "--out", str(out), "--feedback",
                 str(tmp_path / "fb")]) == 0
    (row,) = read_gradebook(out)
    assert row["reasons"] == (f"labx-q1-test (-3): {grading.NO_OUTPUTS} | "
                              f"labx-q2-test (-2): {grading.NO_OUTPUTS}")
    page = (tmp_path / "fb" / "carol.md").read_text()
    assert page.count("- no saved outputs: ") == 2            # once per question
    assert "- lost 1: b\\* is the argmin" not in page           # labels, not messages
    assert "- lost 1: critical_batch_size is the argmin of sfo_table." in page


def test_an_unanswered_question_reads_not_answered(lab, tmp_path):
    """nbgrader's release run as handed out: its answer cells raise NotImplementedError."""
    from nbclient import NotebookClient

    release = nbgrader_release(make_lab())
    release.cells[1].source = "x = 0"
    nb = copy.deepcopy(release)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    answered = copy.deepcopy(nb)                         # question 2 answered and recorded
    answered.cells[4].outputs = [record_output(n, v) for n, v in GOOD[2].items()]
    answered.cells[5].outputs = []
    unrun = copy.deepcopy(nb)                            # the stub left, not run
    unrun.cells[2].outputs, unrun.cells[2].execution_count = [], None
    subs = tmp_path / "subs"
    write(nb, subs / "asis.ipynb")
    write(answered, subs / "half.ipynb")
    write(unrun, subs / "unrun.ipynb")
    results = {r.student: r for r in grading.grade_submissions([subs], lab)}
    stub = ("not answered: the cell 'labx-q{}-answer' raised NotImplementedError (the lab's "
            "placeholder): write your answer in place of 'raise NotImplementedError()', run it "
            "and save the notebook")
    assert [q.reasons for q in results["asis"].questions] == [[stub.format(1)], [stub.format(2)]]
    assert results["half"].questions[1].reasons == [] and results["half"].total == 2
    assert results["unrun"].questions[0].reasons == [
        "not answered: the answer cell 'labx-q1-answer' still holds the lab's placeholder "
        "'raise NotImplementedError()' and was not run"]
    feedback = grading.feedback_markdown(results["asis"])
    assert feedback.count("not answered") == 2


# ---------------------------------------------------------------------------------------------
# The real labs: executed once per session in the smoke profile, then graded as five students
# ---------------------------------------------------------------------------------------------

LABS = sorted((ROOT / "labs" / "source").glob("*.ipynb"))

#: Per lab: record edits that make a "wrong" and an "inconsistent" submission out of the
#: executed lab, and the exact points per question (in key order) each then earns. A lab that
#: exists without an entry here fails test_real_lab_gradebook: add its case with its key.
LAB_CASES: dict[str, dict[str, Any]] = {
    "lab1_optimizer_zoo": {
        # Not an eta label at all, so certainly not the argmax, whatever the runs gave.
        "wrong": {"best_eta/adam": "7"},
        "wrong_points": [2.5, 3, 2],
        "wrong_reasons": ["best_eta/adam = '7', but the argmax of recorded "
                          "final_test_acc_by_eta/adam is at"],
        # The best accuracy nudged up: still the argmax, no longer the runs' mean.
        "inconsistent": {"final_test_acc_by_eta/adam": lambda t: {
            k: v + 0.01 if v == max(t.values()) else v for k, v in t.items()}},
        "inconsistent_points": [2, 3, 2],
        "inconsistent_reasons": ["final_test_acc_by_eta does not match the mean of test_acc "
                                 "over recorded run_results by optimizer, eta: adam/"],
    },
    "lab2_seeing_smoothing": {
        "wrong": {"rastrigin_convexity_delta": 1.0, "st_smoothed_minimizer": 2.75},
        "wrong_points": [1, 2, 1.5],
        "wrong_reasons": ["rastrigin_convexity_delta = 1 is not within 0.002",
                          "st_smoothed_minimizer = 2.75 is not within 0.001"],
        # GD's final point (near 2) is far from the minimizer 0: it did not reach it.
        "inconsistent": {"reached_global_minimum/gd": True},
        "inconsistent_points": [2, 1.5, 2],
        "inconsistent_reasons": ["reached_global_minimum/gd = True, but final_points/gd = "],
    },
    "lab3_critical_batch": {
        # 3 is no batch size of the grid, and not the b* the C^2 bound was computed from.
        "wrong": {"critical_batch_size/sgd": 3, "predicted_b_star_shb/1.0": 128.0},
        "wrong_points": [2.5, 2.5, 1],
        "wrong_reasons": ["critical_batch_size/sgd = 3, but the argmin of recorded "
                          "sfo_table/sgd is at", "Theorem 4.4 for sgd with b_star = 3",
                          "predicted_b_star_shb/1.0 = 128, expected 256"],
        "inconsistent": {"sfo_table/shb": {"7": 1.0}, "c2_bound/nshb": lambda v: 2 * v},
        "inconsistent_points": [2.5, 2.5, 2],
        "inconsistent_reasons": ["but the argmin of recorded sfo_table/shb is at 7 (1)",
                                 "c2_bound/nshb = "],
    },
    "lab4_smoothing_generalization": {
        "wrong": {"shb_delta_floor": 0.5, "good_batch_sizes/shb": [1024]},
        "wrong_points": [3, 2, 1],
        "wrong_reasons": ["shb_delta_floor = 0.5 is not within",
                          "good_batch_sizes = {"],
        # Every NSHB delta 10% too large: off eq. (14), and off the recorded best_delta.
        "inconsistent": {"delta_table/nshb": lambda row: {b: 1.1 * d for b, d in row.items()}},
        "inconsistent_points": [2.5, 1.75, 2],
        "inconsistent_reasons": ["delta_table/nshb does not follow eq. (14)",
                                 "best_delta/nshb = "],
    },
    "lab5_implicit_graduated": {
        "wrong": {"p_match": 0.9, "gammas": lambda g: [1.01 * x for x in g]},
        "wrong_points": [3, 2, 2],
        "wrong_reasons": ["p_match = 0.9 is not within", "gammas[0] = "],
        # The constant schedule's ratios doubled (its last ratio stays the largest), and a
        # best schedule that is no schedule.
        "inconsistent": {"delta_ratios/constant": lambda r: [2 * x for x in r],
                         "best_schedule": "no_such_schedule"},
        "inconsistent_points": [2.25, 1.5, 3],
        "inconsistent_reasons": ["delta_ratios does not follow delta_e / delta_0",
                                 "best_schedule = 'no_such_schedule', but the argmax"],
    },
    "lab6_sharpness": {
        "wrong": {"tiny_sharpness/plain/1": 0.5},
        "wrong_points": [3, 2, 2.25],
        "wrong_reasons": ["tiny_sharpness/plain/1 = 0.5, expected 0.152016"],
        # 2 is no correlation at all; the flag says the opposite of best_delta's range.
        "inconsistent": {"spearman/delta_vs_test_acc": 2.0,
                         "best_delta_in_paper_range": lambda b: not b},
        "inconsistent_points": [2.5, 1.75, 3],
        "inconsistent_reasons": ["spearman/delta_vs_test_acc = 2, but Spearman's",
                                 "best_delta_in_paper_range = "],
    },
}


def _execute_smoke(lab: Path, tmp: Path) -> Any:
    from nbclient import NotebookClient

    nb = nbformat.read(lab, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABKIT_PROFILE", "smoke")
        mp.setenv("LABKIT_DATA", str(tmp.parent / "data"))
        mp.setenv("LABKIT_RESULTS", str(tmp / "results"))
        mp.delenv("MPLBACKEND", raising=False)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(lab.parent)}}).execute()
    return nb


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """lab path -> a copy of the lab executed in the smoke profile (each lab runs once)."""
    cache: dict[Path, Any] = {}
    root = tmp_path_factory.mktemp("smoke-labs")

    def get(lab: Path) -> Any:
        if lab not in cache:
            cache[lab] = _execute_smoke(lab, root / lab.stem)
        return copy.deepcopy(cache[lab])

    return get


def _record_outputs(nb: Any, name: str) -> list[Any]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if isinstance(out.get("data", {}).get(RECORD_MIME), dict)
            and out.data[RECORD_MIME].get("name") == name]


def edit_records(nb: Any, edits: dict[str, Any]) -> Any:
    """A copy of ``nb`` whose last record ``name`` has ``value`` set at ``name/key/...``.

    A callable value receives the current value and returns the new one."""
    nb = copy.deepcopy(nb)
    for ref, new in edits.items():
        name, *path = ref.split("/")
        outs = _record_outputs(nb, name)
        assert outs, f"the executed lab recorded no {name!r}"
        payload = outs[-1].data[RECORD_MIME]
        if not path:
            payload["value"] = new(payload["value"]) if callable(new) else new
        else:
            parent = payload["value"]
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = new(parent[path[-1]]) if callable(new) else new
        outs[-1].data["text/plain"] = (f"labkit.record: {name} = "
                                       f"{json.dumps(payload['value'], sort_keys=True)}")
    return nb


def clear_outputs(nb: Any) -> Any:
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_real_lab_key_is_valid_and_complete(lab):
    release = grading.load_release(lab)
    key = grading.load_key(grading.default_key_path(lab), release)
    graded = [c.grade_id for c in release.cells if c.grade]
    assert [q.grade_id for q in key.questions] == graded
    assert key.max_points == sum(c.points for c in release.cells if c.grade)


@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_real_lab_gradebook(lab, smoke_run, tmp_path, capsys):
    case = LAB_CASES.get(lab.stem)
    assert case is not None, f"no grading test case for {lab.stem}: add it to LAB_CASES"
    key = grading.load_key(grading.default_key_path(lab), grading.load_release(lab))
    full = [q.points for q in key.questions]
    nb = smoke_run(lab)
    subs = tmp_path / "subs"
    write(nb, subs / "correct.ipynb")
    write(edit_records(nb, case["wrong"]), subs / "wrong.ipynb")
    write(edit_records(nb, case["inconsistent"]), subs / "inconsistent.ipynb")
    write(clear_outputs(nb), subs / "cleared.ipynb")
    write(nbformat.read(lab, as_version=4), subs / "unrun.ipynb")  # handed in as released
    text = nbformat.writes(nb)
    (subs / "malformed.ipynb").write_text(text[: len(text) // 2])
    out = tmp_path / "gradebook.csv"
    assert main(["grade", str(subs), "--lab", str(lab), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = {r["student"]: r for r in read_gradebook(out)}
    gids = [q.grade_id for q in key.questions]

    def points(row):
        return [float(row[g]) for g in gids], float(row["total"]), float(row["max"])

    expect = {
        "correct": ("graded", full),
        "wrong": ("graded", case["wrong_points"]),
        "inconsistent": ("graded", case["inconsistent_points"]),
        "cleared": ("graded", [0.0] * len(gids)),
        "unrun": ("graded", [0.0] * len(gids)),
        "malformed": ("error", [0.0] * len(gids)),
    }
    assert set(rows) == set(expect)
    for student, (status, pts) in expect.items():
        row = rows[student]
        assert row["status"] == status, (student, row)
        assert points(row) == (pts, sum(pts), key.max_points), (student, row["reasons"])
    assert rows["correct"]["flags"] == "" and rows["correct"]["reasons"] == ""
    for words in case.get("wrong_reasons", ()):
        assert words in rows["wrong"]["reasons"], rows["wrong"]["reasons"]
    for words in case.get("inconsistent_reasons", ()):
        assert words in rows["inconsistent"]["reasons"], rows["inconsistent"]["reasons"]
    for student in ("cleared", "unrun"):
        assert rows[student]["flags"].startswith("outputs cleared"), rows[student]
        assert "no saved outputs" in rows[student]["reasons"], rows[student]
    assert "not valid JSON" in rows["malformed"]["reasons"]


@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_real_lab_release_version_grades_the_same(lab, smoke_run, tmp_path, capsys):
    """The student version of each lab (labs/<lab>.ipynb, nbgrader's release), given as --lab,
    finds the key in labs/keys/ and grades a correct submission exactly as the source version
    does: full marks, no flags."""
    release = ROOT / "labs" / lab.name
    assert grading.find_key(release) == grading.find_key(lab) == \
        ROOT / "labs" / "keys" / f"{lab.stem}.yml"
    sub = write(smoke_run(lab), tmp_path / "subs" / "correct.ipynb")
    out = tmp_path / "g.csv"
    assert main(["grade", str(sub), "--lab", str(release), "--out", str(out)]) == 0
    capsys.readouterr()
    (row,) = read_gradebook(out)
    assert (row["status"], row["total"], row["flags"], row["reasons"]) == (
        "graded", row["max"], "", ""), row
