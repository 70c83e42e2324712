"""The lab notebooks: instructor sources in labs/source/, student versions in labs/.

Parametrized over ``labs/source/*.ipynb`` (the sources, with solutions), so a new lab is tested as
soon as it is added. Per lab:

- the committed source has no outputs and no execution counts, stable unique cell ids, and
  ``metadata.labkit.lab`` equal to its file name;
- every ``# NBVAL_CHECK_OUTPUT`` cell has its expected printed output in
  ``labs/reference/<lab>.json`` (cell id -> text): notebooks are committed without outputs, so
  the nbval run below checks a temporary copy into which these references are put;
- its graded cells carry valid nbgrader metadata (schema 3, unique grade_ids
  ``<lab>-qN-answer`` / ``<lab>-qN-test`` in complete pairs, points > 0);
- ``pytest --nbval-lax`` runs the source top to bottom in the smoke profile (a subprocess, as a
  student's "Run All" would, with LABKIT_DATA and LABKIT_RESULTS in temporary folders);
- executed with nbclient (reusing the nbval run's results, so nothing trains again), the
  solution version passes its own test cells, emits exactly the records its metadata lists,
  and each test cell fails when its answer cell's solution is removed (the answers are then
  left at their initial None);
- the committed student version ``labs/<lab>.ipynb`` is exactly what
  ``python -m labkit.labs.release`` makes of the source now (nbgrader's generate_assignment),
  holds no solution, and run top to bottom fails in its answer cells (nbgrader's
  ``raise NotImplementedError()``) and their test cells only: the panel runs and the records
  made before the questions are saved.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
LABS_DIR = ROOT / "labs"
SOURCE_DIR = LABS_DIR / "source"
REFERENCE_DIR = LABS_DIR / "reference"
LABS = sorted(SOURCE_DIR.glob("*.ipynb"))
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
RECORD_MIME = "application/vnd.labkit.record+json"
NBGRADER_KEYS = {"grade", "grade_id", "locked", "schema_version", "solution", "task"}

pytestmark = pytest.mark.skipif(not LABS, reason="no lab notebooks in labs/source/")


def _read(path: Path):
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def _graded(nb):
    """(cell index, cell, nbgrader metadata) of the cells that carry a grade_id."""
    out = []
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        if meta is not None:
            out.append((i, cell, meta))
    return out


def _strip_solution(source: str) -> str:
    """The student version of a solution cell: the BEGIN/END SOLUTION block removed."""
    return re.sub(r"[ \t]*### BEGIN SOLUTION.*?### END SOLUTION[^\n]*\n?", "", source,
                  flags=re.S)


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory):
    """Environment of the labs' kernels: smoke profile, temporary data and results."""
    root = tmp_path_factory.mktemp("labs")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(LABKIT_PROFILE="smoke", LABKIT_DATA=str(root / "data"),
               LABKIT_RESULTS=str(root / "results"), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_committed_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "nbformat 4.5 (cell ids) is required"
    ids = [c.get("id") for c in nb.cells]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", i) for i in ids), ids
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    meta = nb.metadata.get("labkit", {})
    assert meta.get("lab") == path.stem, "metadata.labkit.lab must be the file name"
    assert isinstance(meta.get("records"), list) and meta["records"], "metadata.labkit.records"
    for cell in nb.cells:
        if cell.cell_type != "code":
            assert not cell.get("outputs") and not cell.get("attachments"), cell.id
            continue
        assert cell.outputs == [], f"cell {cell.id} has outputs"
        assert cell.execution_count is None, f"cell {cell.id} has an execution count"
    checked = {c.id for c in nb.cells
               if c.cell_type == "code" and c.source.startswith(CHECK_OUTPUT)}
    assert set(_references(path)) == checked, "labs/reference/<lab>.json must cover exactly " \
        "the # NBVAL_CHECK_OUTPUT cells"


def _references(path: Path) -> dict[str, str]:
    ref = REFERENCE_DIR / f"{path.stem}.json"
    return json.loads(ref.read_text()) if ref.exists() else {}


def _with_references(path: Path, folder: Path) -> Path:
    """A copy of the lab whose ``# NBVAL_CHECK_OUTPUT`` cells carry their reference output."""
    nb = _read(path)
    refs = _references(path)
    for count, cell in enumerate(nb.cells, start=1):
        if cell.cell_type == "code" and cell.id in refs:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=refs[cell.id])]
            cell.execution_count = count
    copy = folder / path.name
    nbformat.write(nb, copy)
    return copy


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_opens_with_a_version_check(path):
    nb = _read(path)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    m = re.search(r'check_version\("([0-9.]+)"\)', first_code.source)
    assert m, "the first code cell must call labkit.widgets.check_version(...)"
    assert m.group(1) == nb.metadata["labkit"]["labkit_version"]


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_nbgrader_metadata(path):
    nb = _read(path)
    graded = _graded(nb)
    grade_ids = [meta.get("grade_id") for _, _, meta in graded]
    assert len(set(grade_ids)) == len(grade_ids), "grade_ids must be unique"
    answers, tests = {}, {}
    for index, cell, meta in graded:
        assert NBGRADER_KEYS <= set(meta), f"{cell.id}: nbgrader metadata lacks keys"
        assert meta["schema_version"] == 3 and meta["task"] is False
        m = re.fullmatch(rf"{re.escape(path.stem)}-(q\d+)-(answer|test)", meta["grade_id"])
        assert m, f"grade_id {meta['grade_id']!r} must read {path.stem}-qN-answer/-test"
        assert cell.id == meta["grade_id"], "a graded cell's id is its grade_id (stable)"
        assert cell.cell_type == "code"
        if m.group(2) == "answer":
            assert meta["solution"] is True and meta["grade"] is False
            assert meta["locked"] is False
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
            answers[m.group(1)] = index
        else:
            assert meta["grade"] is True and meta["locked"] is True
            assert meta["solution"] is False
            points = meta.get("points")
            assert isinstance(points, (int, float)) and points > 0, f"{cell.id}: points > 0"
            assert "BEGIN SOLUTION" not in cell.source
            tests[m.group(1)] = index
    assert set(answers) == set(tests), "every question needs an answer cell and a test cell"
    assert 2 <= len(tests) <= 4, "a lab has 2-4 graded questions"
    for q in answers:
        assert answers[q] < tests[q], f"{q}: the answer cell comes before its test"


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_nbval_smoke(path, lab_env, tmp_path):
    """`pytest --nbval-lax` runs the lab top to bottom in the smoke profile."""
    copy = _with_references(path, tmp_path)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
           "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(copy)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=lab_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_reference_outputs_are_compared(tmp_path, lab_env):
    """A wrong reference makes the nbval run fail (so the references are not decoration)."""
    path = next((p for p in LABS if _references(p)), None)
    assert path is not None, "at least one lab has a # NBVAL_CHECK_OUTPUT cell"
    copy = _with_references(path, tmp_path)
    nb = _read(copy)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.outputs)
    text = cell.outputs[0]["text"]
    digit = next(ch for ch in text if ch.isdigit() and ch != "9")
    cell.outputs[0]["text"] = text.replace(digit, str(int(digit) + 1), 1)
    nbformat.write(nb, copy)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
           "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(copy)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=lab_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "failed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_solution_passes_and_blank_answers_fail(path, lab_env, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for key in ("LABKIT_PROFILE", "LABKIT_DATA", "LABKIT_RESULTS"):
        monkeypatch.setenv(key, lab_env[key])
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = _read(path)
    n_cells = len(nb.cells)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells[:n_cells]):
            client.execute_cell(cell, index)  # raises CellExecutionError on any error

        # The records the lab emits are exactly those its metadata lists, with payloads.
        emitted = []
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                payload = out.get("data", {}).get(RECORD_MIME)
                if payload is not None:
                    assert set(payload) == {"name", "value", "labkit_version"}
                    assert out["data"]["text/plain"].startswith(f"labkit.record: {payload['name']}")
                    emitted.append(payload["name"])
        assert sorted(set(emitted)) == sorted(nb.metadata["labkit"]["records"])

        # Each test cell must fail on the answers a student starts from.
        answers = {meta["grade_id"].rsplit("-", 1)[0]: cell
                   for _, cell, meta in _graded(nb) if meta["solution"]}
        for _, cell, meta in _graded(nb):
            if not meta["grade"]:
                continue
            question = meta["grade_id"].rsplit("-", 1)[0]
            blank = nbformat.v4.new_code_cell(_strip_solution(answers[question].source))
            nb.cells.append(blank)
            try:
                client.execute_cell(blank, len(nb.cells) - 1)
            except CellExecutionError:
                pass  # a blank answer may fail itself (it uses what is missing)
            test = nbformat.v4.new_code_cell(cell.source)
            nb.cells.append(test)
            with pytest.raises(CellExecutionError):
                client.execute_cell(test, len(nb.cells) - 1)


def test_strip_solution():
    src = "x = None\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\nrecord('x', x)\n"
    assert _strip_solution(src) == "x = None\nrecord('x', x)\n"
    src = "def f():\n    y = None\n    ### BEGIN SOLUTION\n    y = 2\n    ### END SOLUTION\n" \
          "    return y\n"
    assert _strip_solution(src) == "def f():\n    y = None\n    return y\n"


# ---------------------------------------------------------------------------------------------
# The student versions (labs/<lab>.ipynb): what the launch links and the book open
# ---------------------------------------------------------------------------------------------

# record("name", ...), and panel.record_inputs() (the "inputs" record of the panel's knobs).
RECORD_CALL = re.compile(r"""\brecord\(\s*["']([^"']+)["']|\.record_(inputs)\(\)""")
STUB = "raise NotImplementedError()"


def _student(path: Path) -> Path:
    return LABS_DIR / path.name


def test_student_versions_are_what_the_sources_make():
    """`python -m labkit.labs.release --check`: one student version per source, each equal (as
    JSON) to what nbgrader's generate_assignment makes of its source now."""
    from labkit.labs import release

    assert sorted(p.name for p in LABS_DIR.glob("*.ipynb")) == [p.name for p in LABS]
    assert release.stale(SOURCE_DIR, LABS_DIR) == []


def test_a_stale_student_version_is_caught(tmp_path, capsys):
    from labkit.labs import release

    source, out = tmp_path / "source", tmp_path / "labs"
    source.mkdir()
    for name in ("lab1_optimizer_zoo.ipynb", "lab3_critical_batch.ipynb"):
        (source / name).write_bytes((SOURCE_DIR / name).read_bytes())
    assert [written for _, written in release.release(source, out)] == [True, True]
    assert [written for _, written in release.release(source, out)] == [False, False]
    assert release.main(["--check", "--source", str(source), "--out", str(out)]) == 0
    # Formatting alone does not count: the comparison is of the JSON.
    lab1 = out / "lab1_optimizer_zoo.ipynb"
    lab1.write_text(json.dumps(json.loads(lab1.read_text()), indent=4))
    assert release.stale(source, out) == []
    # A source edited after the release: its student version is stale.
    nb = _read(source / "lab3_critical_batch.ipynb")
    test = next(c for c in nb.cells if c.id == "lab3_critical_batch-q3-test")
    test.source += "\nprint('one more check')"
    nbformat.write(nb, source / "lab3_critical_batch.ipynb")
    (out / "lab9_extra.ipynb").write_text(lab1.read_text())
    problems = release.stale(source, out)
    assert problems == [f"{out / 'lab3_critical_batch.ipynb'}: differs from what "
                        f"{source / 'lab3_critical_batch.ipynb'} makes now",
                        f"{out / 'lab9_extra.ipynb'}: no source {source / 'lab9_extra.ipynb'}"]
    capsys.readouterr()
    assert release.main(["--check", "--source", str(source), "--out", str(out)]) == 1
    assert capsys.readouterr().out.splitlines() == problems
    assert release.main(["--source", str(tmp_path / "nowhere")]) == 1
    assert "no lab sources (*.ipynb) in" in capsys.readouterr().err


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_student_version_holds_no_solution(path):
    source, student = _read(path), _read(_student(path))
    text = json.dumps(student)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text, f"{marker!r} in the student version"
    assert student.metadata["labkit"] == source.metadata["labkit"]
    assert [c.id for c in student.cells] == [c.id for c in source.cells]
    for mine, theirs in zip(student.cells, source.cells, strict=True):
        if mine.cell_type == "code":
            assert mine.outputs == [] and mine.execution_count is None, mine.id
        meta = theirs.metadata.get("nbgrader")
        if meta is None:
            assert mine.source == theirs.source, f"{mine.id}: differs from the source"
        elif meta["solution"]:
            assert STUB in mine.source, f"{mine.id}: no {STUB}"
        else:
            assert mine.source == theirs.source, f"{mine.id}: a locked cell differs"
            assert mine.metadata["editable"] is False, f"{mine.id} is not read-only"


def _errors(nb) -> dict[str, str]:
    """cell id -> the name of the exception its outputs show, for every cell that raised."""
    return {cell.id: out["ename"] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if out.get("output_type") == "error"}


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_student_version_runs_with_only_its_questions_failing(path, lab_env, monkeypatch):
    """The student version as handed out, run top to bottom (Run All goes on after errors, as
    nbgrader's autograde does): only the answer cells (nbgrader's NotImplementedError) and
    their test cells fail; the panel is shown, the experiment's records are saved, and
    `labkit grade` reads every question as not answered."""
    from nbclient import NotebookClient

    from labkit import grading

    for key in ("LABKIT_PROFILE", "LABKIT_DATA", "LABKIT_RESULTS"):
        monkeypatch.setenv(key, lab_env[key])
    monkeypatch.delenv("MPLBACKEND", raising=False)
    student = _student(path)
    nb = _read(student)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(LABS_DIR)}}).execute()

    answers = {c.id for _, c, meta in _graded(nb) if meta["solution"]}
    tests = {c.id for _, c, meta in _graded(nb) if meta["grade"]}
    errors = _errors(nb)
    assert set(errors) == answers | tests, errors
    assert {errors[a] for a in answers} == {"NotImplementedError"}, errors

    panel = next(c for c in nb.cells if c.id == "panel")
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {})
               for out in panel.outputs), "the panel cell shows no widget"
    # Every record made outside the answer cells is saved: the knobs and the experiment's data.
    expected = {name for c in nb.cells if c.cell_type == "code" and c.id not in answers
                for names in RECORD_CALL.findall(c.source) for name in names if name}
    emitted = {out["data"][RECORD_MIME]["name"] for c in nb.cells if c.cell_type == "code"
               for out in c.outputs if RECORD_MIME in out.get("data", {})}
    assert "inputs" in expected and emitted == expected

    release = grading.load_release(student)
    key = grading.load_key(grading.find_key(student, release), release)
    questions, _, error = grading.grade_notebook(nb, release, key)
    assert error is None and sum(q.points for q in questions) == 0
    assert all(any("not answered" in r for r in q.reasons) for q in questions), [
        q.reasons for q in questions]
