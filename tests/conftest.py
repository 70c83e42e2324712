"""Fixtures shared by several test modules. One section per fixture family."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# The built book: one clean `jupyter-book build -W` per test session, shared by test_book.py
# and test_book_browser.py.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltBook:
    """The book built from clean into a temporary folder."""

    html: Path  # the site root (what `bash .ci/book` writes to _build/html)
    log: str  # everything `jupyter-book build` printed, colour codes removed
    returncode: int  # with -W --keep-going, non-zero when there was any warning


@pytest.fixture(scope="session")
def built_book(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltBook]:
    """Build the whole book once, as `bash .ci/book` does: chapters executed, -W.

    With --keep-going a build that warns still writes the whole site, so the other checks run
    on it; test_book.py's test_build_passes_with_warnings_as_errors fails on the warnings.
    """
    if not (ROOT / "book/_static/mathjax/tex-chtml.js").exists():
        pytest.fail("MathJax is missing from book/_static/mathjax: run `bash .ci/setup` first")
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    # The chapters' kernels must draw with matplotlib's inline backend. An inherited
    # MPLBACKEND=Agg (.ci/test sets it for the unit tests) makes `plt.show()` draw nothing,
    # and every figure and figure reference of a chapter silently disappears.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--path-output", str(out), "-W", "--keep-going"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    html = out / "_build" / "html"
    if not (html / "index.html").exists():
        pytest.fail(f"`jupyter-book build` wrote no site (exit {proc.returncode}):\n"
                    + "\n".join(log.splitlines()[-40:]), pytrace=False)
    yield BuiltBook(html=html, log=log, returncode=proc.returncode)
    shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Training the tiny smoke model in a test module.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a whole module: the tiny smoke model trains faster on one thread
    than on two contended ones (a module opts in with ``pytest.mark.usefixtures``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lab_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty data folder per module, which the smoke profile fills with generated data."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def lab_data_env(monkeypatch: pytest.MonkeyPatch, lab_data_root: Path) -> Path:
    """``LABKIT_DATA`` set to the module's :func:`lab_data_root`; ``LABKIT_PROFILE`` unset."""
    monkeypatch.setenv("LABKIT_DATA", str(lab_data_root))
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    return lab_data_root
