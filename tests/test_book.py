"""The book builds from clean with warnings as errors, and serves its math renderer itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if not (ROOT / "book/_static/mathjax/tex-chtml.js").exists():
        pytest.fail("MathJax is missing from book/_static: run `bash .ci/setup` first")
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    p = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out), "-W",
                        "--keep-going"], capture_output=True, text=True,
                       env=os.environ | {"MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    yield out / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)


def test_intro_page_is_built(built):
    html = (built / "book" / "intro.html").read_text()
    assert "Optimization for Deep Learning" in html
    assert (built / "index.html").exists()


def test_math_renderer_is_served_locally(built):
    html = (built / "book" / "intro.html").read_text()
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', html)
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax and all(not s.startswith("http") for s in mathjax), mathjax
    assert (built / "_static" / "mathjax" / "tex-chtml.js").exists()
