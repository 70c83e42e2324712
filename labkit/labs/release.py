"""The student versions of the labs: nbgrader's ``generate_assignment`` applied to the sources.

Book: the labs (``labs/README.md``, "Student and instructor versions"). The instructor sources,
with their solutions (``### BEGIN SOLUTION`` blocks) and any hidden tests, are
``labs/source/<lab>.ipynb``; the notebooks students open (the book's launch links, its Labs
page, the download links) are ``labs/<lab>.ipynb``, made from the sources by nbgrader's own
``GenerateAssignment`` converter: every solution block becomes ``# YOUR CODE HERE`` /
nbgrader's placeholder (:data:`labkit.grading.ANSWER_PLACEHOLDER`), hidden tests are
removed, outputs cleared, locked cells marked read-only and checksummed. The files are
written by nbformat, so one source always gives the same bytes.

From the repository root::

    python -m labkit.labs.release           # regenerate labs/*.ipynb from labs/source/
    python -m labkit.labs.release --check   # exit status 1 if a committed one is stale

nbgrader is the ``labkit[instructor]`` extra (pinned in requirements.txt). nbgrader's gradebook
database is not used: its ``SaveCells`` step only records the cells there and leaves the
notebook unchanged, so it is left out (it would start Alembic migrations for every lab).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The folders, relative to the repository root: the sources and the student versions.
SOURCE_DIR = Path("labs/source")
STUDENT_DIR = Path("labs")


def _nbgrader() -> tuple[Any, Any, Any, Any]:
    try:
        from nbgrader.converters import GenerateAssignment
        from nbgrader.coursedir import CourseDirectory
        from nbgrader.preprocessors import SaveCells
        from traitlets.config import Config
    except ImportError as e:
        raise RuntimeError(
            f"making the student versions needs nbgrader ({e}): pip install 'labkit[instructor]'"
        ) from None
    return GenerateAssignment, CourseDirectory, SaveCells, Config


def student_versions(sources: Sequence[str | Path]) -> dict[str, str]:
    """The student version of each source notebook, as the text of an ``.ipynb`` file.

    Each source becomes one nbgrader assignment named after its file in a temporary course
    folder, and nbgrader's ``GenerateAssignment`` makes its release version; the result is
    read back and written by nbformat (keys sorted, one-space indent, final newline).

    Returns:
        file name (``lab1_optimizer_zoo.ipynb``) -> notebook text.

    Raises:
        FileNotFoundError: a source does not exist.
        RuntimeError: nbgrader is missing, or it failed on a source (its log is in the message).
    """
    import nbformat

    generate_assignment, course_directory, save_cells, config_cls = _nbgrader()
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"lab source {str(p)!r} not found")
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="labkit-release-") as tmp:
        root = Path(tmp)
        for p in paths:
            folder = root / "source" / p.stem
            folder.mkdir(parents=True)
            shutil.copyfile(p, folder / p.name)
            config = config_cls()
            config.CourseDirectory.root = str(root)
            config.CourseDirectory.assignment_id = p.stem
            config.GenerateAssignment.no_database = True
            steps = generate_assignment.class_traits()["preprocessors"].default()
            config.GenerateAssignment.preprocessors = [s for s in steps if s is not save_cells]
            converter = generate_assignment(coursedir=course_directory(config=config),
                                            config=config)
            log = io.StringIO()  # nbgrader logs its errors; shown only when it fails
            converter.log = logging.getLogger(f"labkit.release.{p.stem}")
            converter.log.propagate = False
            converter.log.handlers[:] = [logging.StreamHandler(log)]
            try:
                converter.start()
            except Exception as e:  # noqa: BLE001 - nbgrader raises its own exception types
                detail = " | ".join(log.getvalue().strip().splitlines()[-3:])
                raise RuntimeError(f"nbgrader could not make the student version of {p}: "
                                   f"{type(e).__name__}: {e} {detail}".strip()) from None
            made = root / "release" / p.stem / p.name
            nb = nbformat.read(made, as_version=nbformat.NO_CONVERT)
            out[p.name] = nbformat.writes(nb) + "\n"
    return out


def normalized(text: str) -> Any:
    """A notebook's JSON as Python objects: what two files must share to be the same lab
    (formatting, key order and line endings do not count)."""
    return json.loads(text)


def stale(source_dir: str | Path = SOURCE_DIR, student_dir: str | Path = STUDENT_DIR) -> list[str]:
    """Why the committed student versions are not what the sources make (empty: all current).

    One message per lab: a student version that is missing, that differs from the one its
    source makes now (compared as normalized JSON), or that has no source.
    """
    source_dir, student_dir = Path(source_dir), Path(student_dir)
    sources = _sources(source_dir)
    made = student_versions(sources)
    problems = []
    for name, text in made.items():
        committed = student_dir / name
        if not committed.is_file():
            problems.append(f"{committed}: missing (the student version of {source_dir / name})")
        elif normalized(committed.read_text(encoding="utf-8")) != normalized(text):
            problems.append(f"{committed}: differs from what {source_dir / name} makes now")
    for extra in sorted(student_dir.glob("*.ipynb")):
        if extra.name not in made:
            problems.append(f"{extra}: no source {source_dir / extra.name}")
    return problems


def release(source_dir: str | Path = SOURCE_DIR,
            student_dir: str | Path = STUDENT_DIR) -> list[tuple[Path, bool]]:
    """Write the student version of every ``source_dir/*.ipynb`` into ``student_dir``.

    A file is rewritten (atomically) only when its content changes.

    Returns:
        (student version, whether it was written) per lab, in file-name order.
    """
    source_dir, student_dir = Path(source_dir), Path(student_dir)
    made = student_versions(_sources(source_dir))
    student_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, text in made.items():
        target = student_dir / name
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current != text:
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        done.append((target, current != text))
    return done


def _sources(source_dir: Path) -> list[Path]:
    sources = sorted(source_dir.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no lab sources (*.ipynb) in {str(source_dir)!r}; run this "
                                "from the repository root or pass --source DIR")
    return sources


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.labs.release",
        description="Make the student version of every lab (nbgrader's generate_assignment: "
        "solutions replaced by stubs, hidden tests removed, outputs cleared) from the "
        "instructor sources.")
    parser.add_argument("--source", type=Path, default=SOURCE_DIR, metavar="DIR",
                        help=f"the sources with solutions (default {SOURCE_DIR})")
    parser.add_argument("--out", type=Path, default=STUDENT_DIR, metavar="DIR",
                        help=f"where the student versions go (default {STUDENT_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit with status 1 if a student version is "
                        "missing or differs from what its source makes")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale(args.source, args.out)
            for p in problems:
                print(p)
            if problems:
                print("run `python -m labkit.labs.release` to regenerate them", file=sys.stderr)
                return 1
            print(f"the student versions in {args.out} are current")
            return 0
        for target, written in release(args.source, args.out):
            print(f"{target}: {'written' if written else 'unchanged'}")
    except (FileNotFoundError, RuntimeError) as e:
        print(f"labkit release: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
