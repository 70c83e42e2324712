"""Benchmark: each lab notebook run top to bottom ("Run All") in one profile, and its re-run.

    python benchmarks/bench_labs.py                       # every lab, short profile on CUDA
    python benchmarks/bench_labs.py --labs lab3 lab6 --profile short --timeout 3000
    python benchmarks/bench_labs.py --plan                # what each lab's defaults would train

Each lab (its source in ``labs/source/``, with the solutions, so every cell runs) executes in
a fresh kernel (nbclient) with ``LABKIT_PROFILE``, ``LABKIT_DATA`` and
``LABKIT_RESULTS`` set, as a student's *Run All* on a hub would, and no widget touched. Outside
the smoke profile the data are CIFAR-format files that :func:`labkit.data.make_fake_cifar`
writes at CIFAR's full size (50,000 training and 10,000 test images) into ``<workdir>/data``,
unless that folder already holds the real sets; the smoke profile generates its own tiny set.

Printed per lab: the wall time of the first execution (it trains), of a second execution of the
same notebook (it must load every finished run instead of training it again), their ratio (the
baseline measured in the same invocation), and how many runs are on disk. A lab that hits
``--timeout`` or fails is reported as such and the next lab goes on; its finished epochs are
checkpointed, so invoking the script again with the same ``--workdir`` resumes it.

``--plan`` trains nothing: for each lab it lists the runs, epochs and optimizer steps that its
default knobs in the profile ask for, with the epochs per batch size (the GPU time of a ResNet
epoch depends mostly on the batch size). With ``--step-times FILE`` (what
``bench_pack.py --gpu --json FILE`` measured: seconds per run-epoch of ResNet-18 packs of
K = 1, 3, 9 at several batch sizes) it also predicts each lab's GPU time with packing, the runs
grouped into packs as ``run_sweep`` groups them, and the time of the critical-batch figure of
Sato & Iiduka (2024) at paper scale (SGD, SHB and NSHB at b = 2^3 ... 2^13, 200 epochs, one
seed: one pack of three per batch size).

    python benchmarks/bench_pack.py --gpu --json pack.json
    python benchmarks/bench_labs.py --plan --profile short --step-times pack.json
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LABS_DIR = ROOT / "labs" / "source"  # the labs with their solutions, which run top to bottom
FULL_SIZE = {"n_train": 50_000, "n_test": 10_000}


def lab_paths() -> dict[str, Path]:
    """The lab notebooks in ``labs/source/`` (with solutions), by name (file stem)."""
    return {p.stem: p for p in sorted(LABS_DIR.glob("*.ipynb"))}


def select_labs(names: list[str] | None) -> list[str]:
    """Lab names from full names or unique prefixes (``lab3``); all labs for ``None``.

    Raises:
        ValueError: a name that matches no lab, or more than one.
    """
    known = list(lab_paths())
    if not names:
        return known
    out = []
    for name in names:
        hits = [k for k in known if k == name] or [k for k in known if k.startswith(name)]
        if len(hits) != 1:
            what = "matches no lab" if not hits else f"matches {len(hits)} labs"
            raise ValueError(f"lab {name!r} {what}; valid: {', '.join(known)} (or a unique "
                             f"prefix such as 'lab3')")
        out.append(hits[0])
    return list(dict.fromkeys(out))


def lab_module(lab: str) -> Any:
    """The labkit module of a lab notebook: ``lab1_optimizer_zoo`` -> ``labkit.labs.lab1``.

    Raises:
        ValueError: the module's ``LAB_ID`` names another notebook.
    """
    mod = importlib.import_module(f"labkit.labs.{lab.split('_')[0]}")
    if mod.LAB_ID != lab:
        raise ValueError(f"{mod.__name__} is the module of {mod.LAB_ID}, not of {lab}")
    return mod


def lab_plan(lab: str, profile: str) -> dict[str, Any]:
    """Runs, epochs and steps that ``lab``'s default knobs in ``profile`` train.

    A lab that trains nothing (lab 2) has ``runs == 0``. ``epochs_by_batch`` maps a batch size
    to the epochs trained at it, summed over runs (a batch-size schedule spreads one run's
    epochs over several batch sizes).
    """
    from labkit import schedules
    from labkit.train import SMOKE_SIZES

    plan = {"lab": lab, "profile": profile, "runs": 0, "epochs": 0, "steps": 0,
            "epochs_by_batch": {}, "datasets": [], "models": []}
    mod = lab_module(lab)
    if not hasattr(mod, "grid"):  # a lab without a sweep (lab 2's panel trains nothing)
        return plan
    values = {**mod.defaults(profile), "profile": profile}
    n_train = SMOKE_SIZES["n_train"] if profile == "smoke" else FULL_SIZE["n_train"]
    by_batch: Counter[int] = Counter()
    for config in mod.grid(values):
        cfg = config.resolved()
        for b in schedules.batch_sizes(cfg.batch_schedule, cfg.batch_size, cfg.epochs):
            by_batch[b] += 1
            plan["steps"] += math.ceil(n_train / b)
        plan["runs"] += 1
        plan["epochs"] += cfg.epochs
        plan["datasets"] = sorted({*plan["datasets"], cfg.dataset})
        plan["models"] = sorted({*plan["models"], cfg.model})
    plan["epochs_by_batch"] = dict(sorted(by_batch.items()))
    return plan


def _pack_sizes(times: dict[str, Any]) -> list[int]:
    """The pack sizes K of a bench_pack.py --gpu table (its ``pack<K>_s_per_run`` columns)."""
    return sorted({int(key[len("pack"):-len("_s_per_run")]) for r in times["rows"] for key in r
                   if key.startswith("pack") and key.endswith("_s_per_run")})


def run_epoch_seconds(times: dict[str, Any], b: int, k: int) -> float:
    """Seconds per run-epoch of a pack of ``k`` runs at batch size ``b`` from the measured table
    (``bench_pack.py --gpu`` rows): the largest measured pack size <= k, log-log interpolation
    (or extrapolation from the two nearest) in the batch size."""
    rows = sorted(times["rows"], key=lambda r: r["batch_size"])
    sizes = _pack_sizes(times)
    kk = max([s for s in sizes if s <= k] or [sizes[0]])
    pts = [(r["batch_size"], r[f"pack{kk}_s_per_run"]) for r in rows
           if r.get(f"pack{kk}_s_per_run")]
    for bb, t in pts:
        if bb == b:
            return t
    lo = max([p for p in pts if p[0] < b], default=None, key=lambda p: p[0])
    hi = min([p for p in pts if p[0] > b], default=None, key=lambda p: p[0])
    if lo is None or hi is None:  # outside the table: the two nearest points
        near = sorted(pts, key=lambda p: abs(math.log(p[0] / b)))[:2]
        lo, hi = sorted(near)
    slope = math.log(hi[1] / lo[1]) / math.log(hi[0] / lo[0])
    return lo[1] * (b / lo[0]) ** slope


def predict_lab(lab: str, profile: str, times: dict[str, Any]) -> float | None:
    """Predicted GPU seconds of ``lab``'s default grid, packed as ``run_sweep`` packs it (at
    most the largest measured K per pack); None when the lab trains another model than the
    measured one (ResNet-18) or trains nothing."""
    from labkit import schedules
    from labkit.train_pack import pack_key

    mod = lab_module(lab)
    if not hasattr(mod, "grid"):
        return None
    values = {**mod.defaults(profile), "profile": profile}
    configs = [c.resolved() for c in mod.grid(values)]
    if not configs or any(c.model != times.get("model", "resnet18") for c in configs):
        return None
    k_max = max(_pack_sizes(times))
    groups: dict[Any, list] = {}
    for i, c in enumerate(configs):
        groups.setdefault(pack_key(c) or ("alone", i), []).append(c)
    seconds = 0.0
    for members in groups.values():
        c = members[0]
        for start in range(0, len(members), k_max):
            k = len(members[start:start + k_max])
            for b in schedules.batch_sizes(c.batch_schedule, c.batch_size, c.epochs):
                seconds += k * run_epoch_seconds(times, b, k)
    return seconds


def predict_critical_figure(times: dict[str, Any], epochs: int = 200) -> float:
    """GPU seconds of the critical-batch figure at paper scale, one seed: SGD, SHB and NSHB
    at b = 2^3 ... 2^13 for ``epochs`` epochs, one pack of three per batch size."""
    return sum(epochs * 3 * run_epoch_seconds(times, 2 ** e, 3) for e in range(3, 14))


def ensure_data(root: Path, profile: str, datasets: list[str]) -> str:
    """The CIFAR-format ``datasets`` for ``profile`` under ``root``; what was found or made."""
    from labkit.data import dataset_folder, make_fake_cifar

    if profile == "smoke":
        return "generated by the smoke profile (tiny)"
    if not datasets:
        return "none needed"
    made = []
    for name in datasets:
        if not dataset_folder(root, name).is_dir():
            make_fake_cifar(root, name, seed=0, **FULL_SIZE)
            made.append(name)
    found = [n for n in datasets if n not in made]
    return "; ".join(
        ([f"generated {', '.join(made)} in CIFAR's format at full size"] if made else [])
        + ([f"{', '.join(found)} found in {root} (real or generated earlier)"] if found else []))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"


def execute(path: Path, timeout: float) -> tuple[str, float, str]:
    """Run the notebook at ``path`` top to bottom in a fresh kernel: (status, seconds, detail).

    ``status`` is ``ok``, ``timeout`` (a cell ran longer than ``timeout`` seconds) or ``error``;
    ``detail`` names the failing cell and the exception.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellTimeoutError as e:
        return "timeout", time.perf_counter() - t0, str(e).splitlines()[0]
    except CellExecutionError as e:
        where = next((f"cell {i} ({c.get('id', '?')})" for i, c in enumerate(nb.cells)
                      if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                     "a cell")
        return "error", time.perf_counter() - t0, f"{where}: {e.ename}: {e.evalue}"
    return "ok", time.perf_counter() - t0, ""


def _runs_on_disk(results: Path, lab: str, profile: str) -> int:
    return sum(1 for _ in (results / lab / profile).rglob("result.json"))


def bench_lab(lab: str, profile: str, workdir: Path, timeout: float) -> dict[str, Any]:
    """Execute ``lab`` twice in ``profile``; the times and statuses of both executions."""
    env = {"LABKIT_PROFILE": profile, "LABKIT_DATA": str(workdir / "data"),
           "LABKIT_RESULTS": str(workdir / "results"), "PYTHONUNBUFFERED": "1"}
    saved = {k: os.environ.get(k) for k in (*env, "MPLBACKEND")}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)  # the notebooks pick the inline backend themselves
    try:
        path = lab_paths()[lab]
        status, first, detail = execute(path, timeout)
        row = {"lab": lab, "profile": profile, "status": status, "first_s": first,
               "detail": detail, "rerun_s": None, "rerun_status": None}
        if status == "ok":
            row["rerun_status"], row["rerun_s"], rerun_detail = execute(path, timeout)
            row["detail"] = rerun_detail
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    row["runs_on_disk"] = _runs_on_disk(workdir / "results", lab, profile)
    return row


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_plan(plans: list[dict[str, Any]]) -> None:
    print("| lab | runs | epochs | steps | epochs per batch size | model |")
    print("|---|---|---|---|---|---|")
    for p in plans:
        by_b = " ".join(f"b{b}:{n}" for b, n in p["epochs_by_batch"].items()) or "-"
        print(f"| {p['lab']} | {p['runs']} | {p['epochs']} | {p['steps']} | {by_b} | "
              f"{', '.join(p['models']) or '-'} |")


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("| lab | status | runs on disk | first run (s) | re-run (s) | re-run / first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['rerun_s'] / r['first_s']:.3f}"
                 if r["rerun_s"] is not None and r["first_s"] > 0 else "-")
        status = r["status"] if r["rerun_status"] in (None, "ok") else \
            f"re-run {r['rerun_status']}"
        print(f"| {r['lab']} | {status} | {r['runs_on_disk']} | {_fmt_s(r['first_s'])} | "
              f"{_fmt_s(r['rerun_s'])} | {ratio} |")
    for r in rows:
        if r["detail"]:
            print(f"  {r['lab']}: {r['detail']}")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds; got {text!r}")
    return v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from labkit.train import PROFILES, atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None, choices=PROFILES,
                   help="default: short with CUDA, smoke without")
    p.add_argument("--labs", nargs="+", default=None, metavar="LAB",
                   help="lab names or unique prefixes (lab1 ... lab6); default: all")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "labkit-bench-labs",
                   help="holds data/ and results/; reuse it to resume or to re-time re-runs")
    p.add_argument("--timeout", type=_positive_float, default=3600.0,
                   help="seconds one cell may run before the lab counts as timed out")
    p.add_argument("--plan", action="store_true", help="only list what each lab would train")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--step-times", type=Path, default=None, metavar="FILE",
                   help="bench_pack.py --gpu --json output: predict GPU times from it")
    args = p.parse_args(argv)
    try:
        labs = select_labs(args.labs)
    except ValueError as e:
        p.error(str(e))
    if args.profile is None:
        import torch

        args.profile = "short" if torch.cuda.is_available() else "smoke"

    plans = [lab_plan(lab, args.profile) for lab in labs]
    out: dict[str, Any] = {"profile": args.profile, "plan": plans}
    print(f"profile {args.profile}; labs: {', '.join(labs)}")
    print_plan(plans)
    if args.step_times is not None:
        import json

        times = json.loads(args.step_times.read_text())
        if not times.get("rows"):
            p.error(f"{args.step_times} holds no rows of bench_pack.py --gpu")
        out["predicted_s"] = {lab: predict_lab(lab, args.profile, times) for lab in labs}
        out["critical_figure_s"] = predict_critical_figure(times)
        for lab, sec in out["predicted_s"].items():
            print(f"predicted GPU time of {lab} (packed, from {args.step_times}): "
                  + ("-" if sec is None else f"{sec / 60:.1f} min"))
        known = [v for v in out["predicted_s"].values() if v is not None]
        print(f"total of the labs predicted: {sum(known) / 60:.1f} min; the critical-batch "
              f"figure at paper scale (1 seed): {out['critical_figure_s'] / 3600:.2f} h")
    if not args.plan:
        args.workdir.mkdir(parents=True, exist_ok=True)
        out["device"] = _device()
        needed = sorted({d for plan in plans for d in plan["datasets"]})
        out["data"] = ensure_data(args.workdir / "data", args.profile, needed)
        print(f"device {out['device']}; data: {out['data']}; workdir {args.workdir}")
        rows = []
        for lab in labs:
            print(f"running {lab} ...", flush=True)
            rows.append(bench_lab(lab, args.profile, args.workdir, args.timeout))
        out["rows"] = rows
        print_rows(rows)
    if args.json is not None:
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if all(r["status"] == "ok" for r in main().get("rows", [])) else 1)
