"""labkit.record: a lab's answers as machine-readable notebook outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import labkit
from labkit.record import MIME_TYPE, jsonable, recorded


@pytest.fixture
def shell():
    """An IPython shell, as in a notebook kernel (display() goes to captured outputs)."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    yield sh
    InteractiveShell.clear_instance()


def test_record_displays_the_mime_payload_and_the_text_line(shell):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        out = labkit.record("best_eta", {"adam": "1/2", "amsgrad": "4"})
    assert out is None  # a record as a cell's last line must not display twice
    assert len(cap.outputs) == 1
    data = cap.outputs[0].data
    assert data[MIME_TYPE] == {"name": "best_eta", "value": {"adam": "1/2", "amsgrad": "4"},
                               "labkit_version": labkit.__version__}
    assert data["text/plain"] == 'labkit.record: best_eta = {"adam": "1/2", "amsgrad": "4"}'
    assert recorded()["best_eta"]["value"] == {"adam": "1/2", "amsgrad": "4"}


def test_record_prints_the_text_line_outside_ipython(capsys):
    labkit.record("critical_batch_size", 512)
    assert capsys.readouterr().out == "labkit.record: critical_batch_size = 512\n"
    assert recorded()["critical_batch_size"] == {
        "name": "critical_batch_size", "value": 512, "labkit_version": labkit.__version__}
    # The last value wins, as when a cell is run again.
    labkit.record("critical_batch_size", 1024)
    assert recorded()["critical_batch_size"]["value"] == 1024


def test_values_become_plain_json():
    value = {
        "np_float": np.float32(0.5), "np_int": np.int64(3), "np_bool": np.bool_(True),
        "array": np.arange(3), "tensor": torch.tensor([[1.0, 2.0]]), "scalar": torch.tensor(2),
        "tuple": (1, "a"), "nan": float("nan"), "inf": -math.inf, "nested": [{"x": None}],
        4: "int key", 0.5: "float key",
    }
    out = jsonable(value)
    assert out == {
        "np_float": 0.5, "np_int": 3, "np_bool": True, "array": [0, 1, 2],
        "tensor": [[1.0, 2.0]], "scalar": 2, "tuple": [1, "a"], "nan": None, "inf": None,
        "nested": [{"x": None}], "4": "int key", "0.5": "float key",
    }
    assert json.loads(json.dumps(out)) == out  # strict JSON round trip
    assert type(out["np_int"]) is int and type(out["np_bool"]) is bool
    assert jsonable(np.array([1.5, np.nan])) == [1.5, None]


def test_bad_names_and_values_are_refused():
    with pytest.raises(TypeError, match="record name must be a str, got int 3"):
        labkit.record(3, 1)
    for bad in ("", "1st", "best eta", "a/b", "x" * 101):
        with pytest.raises(ValueError, match="is not valid: use letters, digits"):
            labkit.record(bad, 1)
    with pytest.raises(TypeError, match=r"value\['runs'\]\[1\] of type set cannot be recorded"):
        labkit.record("table", {"runs": [1, {2}]})
    with pytest.raises(TypeError, match="two keys that both read '1'"):
        jsonable({1: "a", "1": "b"})
    with pytest.raises(TypeError, match="keys must be strings or numbers"):
        jsonable({(1, 2): "a"})
    assert "table" not in recorded()


def test_importing_labkit_stays_light():
    code = ("import sys, labkit; heavy = [m for m in ('torch', 'IPython', 'ipywidgets', 'numpy') "
            "if m in sys.modules]; print(heavy); assert callable(labkit.record)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
