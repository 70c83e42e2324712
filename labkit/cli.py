"""The ``labkit`` command line: ``train``, ``sweep``, ``critical``, ``sharpness``, ``grade`` and
``info``.

Examples::

    labkit train --profile smoke --optimizer shb --lr 0.05 --out runs/smoke
    labkit train --dataset cifar10 --model resnet44 --optimizer adam --lr 1e-3 \\
        --batch-size 128 --epochs 200 --set eta=3 --out runs/adam-eta3
    labkit sweep grid.yaml --out runs/bs-sweep --dry-run
    labkit sweep grid.yaml --out /shared/runs/bs-sweep --ray ray://head:10001
    labkit critical --optimizer shb --lr 0.1 --beta 0.9 --eps 0.5 --sfo 512:2.1e6 1024:1.9e6
    labkit critical --results runs/sfo-sweep --eps 0.5
    labkit critical measure --dataset cifar100 --optimizer shb --lr 0.1 --set beta=0.9 \\
        --eps 0.5 --batch-sizes 8 16 32 64 128 256 512 1024 --out runs/sfo-shb
    labkit sharpness runs/smoke --rho 0.0002
    labkit grade submitted/ --lab labs/lab3_critical_batch.ipynb --out gradebook.csv
    labkit info

``labkit grade`` never imports torch: :func:`main` builds its parser alone
(:func:`build_grade_parser`), without the training modules the other subcommands need.

Errors are one line on stderr, never a traceback: bad input gets argparse's usage line and the
error, a problem of the environment (a missing data set, a busy or damaged folder, a full
disk) ``labkit CMD: error: ...``. Anything else is a bug of labkit's: one line says so and
where to report it; ``LABKIT_DEBUG=1`` prints the traceback of every error as well.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit import __version__

#: Where bugs are reported (the book's repository, _config.yml).
ISSUES_URL = "https://github.com/labkit-course/labkit/issues"
DEBUG_VARIABLE = "LABKIT_DEBUG"


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.9"`` -> 0.9, ``"true"`` -> True, ``"[0.9, 0.99]"`` -> [0.9, 0.99]."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"eta=3"`` -> ("eta", 3); raises argparse.ArgumentTypeError when malformed."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. beta=0.9), got {text!r}")
    return key.strip(), parse_value(value)


def parse_schedule(text: str) -> dict[str, Any]:
    """``"step:every=40,factor=0.7071"`` -> {"kind": "step", "every": 40, "factor": 0.7071}.

    A JSON object is accepted as well.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} ({e})") from e
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return spec
    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"kind": kind.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, value = parse_assignment(part)
        spec[key] = value
    return spec


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_run_options(p: argparse.ArgumentParser, profiles: Sequence[str]) -> None:
    """The options every training command shares (profile, seed, device, data, ...)."""
    from labkit.train import PRECISIONS

    p.add_argument("--profile", choices=profiles, default="short")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop, flip or rotation of training images")
    rot = p.add_mutually_exclusive_group()
    rot.add_argument("--rotate", type=_float, default=None, metavar="DEGREES",
                     help="random rotation of training images by up to DEGREES (default: 15 on "
                     "cifar100, as in Sato & Iiduka's code; 0 on cifar10)")
    rot.add_argument("--no-rotate", dest="rotate", action="store_const", const=0.0,
                     help="no random rotation (same as --rotate 0)")
    p.add_argument("--data-root", default=None,
                   help="folder with cifar-10-batches-py / cifar-100-python "
                   "(default: $LABKIT_DATA or ~/.cache/labkit/data)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR with torchvision when it is missing")


def build_parser() -> argparse.ArgumentParser:
    from labkit.data import DATASET_NAMES as CIFAR_NAMES
    from labkit.models import MODEL_NAMES
    from labkit.optim import OPTIMIZER_NAMES
    from labkit.train import DATASETS, PROFILES

    parser = argparse.ArgumentParser(
        prog="labkit",
        description="Optimization for deep learning: train CIFAR models with the course's "
        "optimizers, and inspect the installation.",
    )
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train one run (resumes an interrupted run in the same --out folder)",
        description="Train one run. Re-running the same command on the same --out folder "
        "resumes after the last finished epoch, or prints the stored result.",
    )
    t.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: digits (scikit-learn's handwritten digits) for --profile cpu, "
                   "else cifar10")
    t.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="default: tiny for --profile smoke and on the digits, else the "
                   "paper's model")
    t.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd")
    t.add_argument("--lr", type=_float, default=0.1, help="initial learning rate (default 0.1)")
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--epochs", type=_positive_int, default=None)
    t.add_argument("--weight-decay", type=_float, default=0.0)
    t.add_argument("--set", dest="hparams", action="append", type=parse_assignment, default=[],
                   metavar="KEY=VALUE",
                   help="optimizer hyperparameter, e.g. --set beta=0.9 --set eta=3 (repeatable)")
    t.add_argument("--lr-schedule", type=parse_schedule, default=None, metavar="SPEC",
                   help="e.g. step:every=40,factor=0.7071 or cosine or poly:power=0.9")
    t.add_argument("--batch-schedule", type=parse_schedule, default=None, metavar="SPEC",
                   help="e.g. step:every=40,factor=2")
    add_run_options(t, PROFILES)
    t.add_argument("--out", default=None, help="run folder (config, metrics, checkpoint, result)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.set_defaults(subparser=t)

    _add_science_parsers(sub, PROFILES)
    _add_grade_parser(sub)

    i = sub.add_parser("info", help="versions, device, and which data sets are present")
    i.add_argument("--data-root", default=None)

    d = sub.add_parser(
        "data", help="check (and with --download fetch) CIFAR-10/100 in the data root",
        description="Read each data set the way training does and say what is there: the "
        "number of images, whether the files are the official ones or generated by labkit, "
        "or what is missing and how to fix it. Exit status 1 when one is missing or unusable.",
    )
    d.add_argument("names", nargs="*", type=_dataset_name, metavar="NAME",
                   help=f"{' and/or '.join(CIFAR_NAMES)} (default: both)")
    d.add_argument("--data-root", default=None,
                   help="default: $LABKIT_DATA or ~/.cache/labkit/data")
    d.add_argument("--download", action="store_true",
                   help="fetch what is missing with torchvision's verified download "
                   "(needs internet)")
    return parser


def _dataset_name(text: str) -> str:
    from labkit.data import DATASET_NAMES as DATASETS

    if text not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown data set {text!r}; valid: {', '.join(DATASETS)}")
    return text


def _sfo_pair(text: str) -> tuple[int, float]:
    """``"512:2.1e6"`` -> (512, 2100000.0)."""
    b, sep, value = text.partition(":")
    try:
        if not sep:
            raise ValueError
        batch, sfo = int(b), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BATCH:SFO (e.g. 512:2.1e6), got {text!r}"
        ) from None
    if batch < 1 or not sfo >= 0:
        raise argparse.ArgumentTypeError(
            f"expected a batch size >= 1 and an SFO complexity >= 0, got {text!r}"
        )
    return batch, sfo


def _add_science_parsers(sub: Any, profiles: Sequence[str]) -> None:
    from labkit.critical import OPTIMIZERS as CRITICAL_OPTIMIZERS
    from labkit.experiments.sweep import MAX_POINTS
    from labkit.sharpness import NORMS

    s = sub.add_parser(
        "sweep",
        help="run a grid of training runs from a YAML file (resumable, never recomputes)",
        description="Run every point of GRID.yaml (base: TrainConfig fields; grid: axis -> "
        "list of values; zip: axes that vary together; see labkit.experiments.sweep). Each "
        "point trains in DIR/runs/<config hash>; DIR/index.json lists them. Re-running the "
        "same command skips finished points and resumes interrupted ones.",
    )
    s.add_argument("grid", metavar="GRID.yaml", help="the grid spec (YAML)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder (index.json and runs/)")
    s.add_argument("--profile", choices=profiles, default=None,
                   help="set base.profile (a grid axis 'profile' still wins)")
    s.add_argument("--data-root", default=None, help="set base.data_root")
    s.add_argument("--device", default=None,
                   help="set base.device: auto, cpu, cuda, cuda:N (part of each run's "
                   "identity: runs made with another device setting are not reused)")
    s.add_argument("--dry-run", action="store_true",
                   help="list the points and which are already done; train nothing")
    s.add_argument("--max-points", type=_positive_int, default=MAX_POINTS, metavar="N",
                   help=f"refuse a grid of more than N points (default {MAX_POINTS:,}), "
                   "counted before it is expanded")
    s.add_argument("--quiet", action="store_true", help="no per-point lines")
    s.add_argument("--no-pack", action="store_true",
                   help="train one point at a time (by default points that share model, data "
                   "set, batch sizes and epochs and use sgd/shb/nshb train as packs, each run "
                   "exactly as alone)")
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the points as tasks on a Ray cluster: auto (one started here with "
                   "ray start), ray://HOST:PORT, HOST:PORT or local (start one for this sweep); "
                   "DIR must be on a filesystem every node sees (needs labkit[ray])")
    s.add_argument("--gpus-per-point", type=_float, default=None, metavar="N",
                   help="with --ray: GPUs each point requests (default: 1 on a cluster with "
                   "GPUs, else 0); a fraction such as 0.25 runs 4 small points per GPU")
    s.set_defaults(subparser=s)

    c = sub.add_parser(
        "critical",
        help="critical batch size b* and the C^2 bound it implies (Sato & Iiduka 2024, Thm. 4.4)",
        usage="labkit critical (--sfo BATCH:SFO [...] | --results DIR) --eps EPS [options]\n"
        "       labkit critical measure --eps EPS --batch-sizes B [B ...] --out DIR [options]",
        description="Compute the critical batch size b* = argmin_b SFO(b) and, by Theorem 4.4 "
        "of Sato & Iiduka (arXiv:2402.02325) read backwards, the upper bound on the "
        "stochastic-gradient variance C^2. The SFO complexities come from --sfo (measured "
        "elsewhere) or from --results, a sweep folder (labkit sweep, a lab panel, labkit "
        "critical measure): there T is, for each run, the first step whose running mean of the "
        "mini-batch gradient norms of all steps so far is <= eps, tested after --skip-epochs "
        "whole epochs (the authors' code: 11), exact to the step from the run's per-step log; "
        "SFO = T b averaged over seeds; runs grouped by optimizer, lr and beta. `labkit "
        "critical measure ...` trains the runs (labkit.experiments.sfo).",
    )
    # One of --sfo / --results, or the `measure` subcommand: checked in _cmd_critical.
    src = c.add_mutually_exclusive_group()
    src.add_argument("--sfo", nargs="+", type=_sfo_pair, metavar="BATCH:SFO",
                     help="measured SFO complexities, e.g. --sfo 256:3e6 512:2e6 1024:2.4e6")
    src.add_argument("--results", metavar="DIR", help="a sweep folder (labkit sweep --out)")
    c.add_argument("--eps", type=_float, default=None,
                   help="the gradient-norm threshold of the stopping test (the paper: 0.5); "
                   "required")
    c.add_argument("--optimizer", choices=CRITICAL_OPTIMIZERS, default=None,
                   help="required with --sfo; with --results, keep only this optimizer")
    c.add_argument("--lr", type=_float, default=None,
                   help="required with --sfo; with --results, keep only this learning rate")
    c.add_argument("--beta", type=_float, default=None,
                   help="momentum (required with --sfo for shb and nshb)")
    c.add_argument("--skip-epochs", type=int, default=None,
                   help="with --results: whole epochs the stopping test skips (default 11, the "
                   "authors' code: it tests from the first step of epoch 12)")
    c.set_defaults(subparser=c, critical_command=None)
    _add_critical_measure_parser(c, profiles)

    h = sub.add_parser(
        "sharpness",
        help="adaptive sharpness of a trained run (Sato & Iiduka (2024) §5.3)",
        description="Load RUN_DIR's config.json and the model of its checkpoint.pt, and "
        "measure the worst-case adaptive sharpness max_{||delta/|w| ||_p <= rho} L(w + delta) "
        "- L(w), averaged over --batches batches (Kwon et al. 2021; labkit.sharpness). The "
        "defaults are the authors' measurement: the first 1024 training images, not augmented, "
        "in 8 batches of 128, batch norm in eval mode, rho 0.0002, l_inf, 20 iterations. The "
        "value is cached in RUN_DIR/sharpness.json under its settings.",
    )
    h.add_argument("run", metavar="RUN_DIR", help="a run folder (labkit train --out, or a "
                   "sweep's runs/<hash>)")
    h.add_argument("--rho", type=_float, default=0.0002, help="radius (default 0.0002)")
    h.add_argument("--norm", choices=NORMS, default="linf")
    h.add_argument("--batches", type=_positive_int, default=8,
                   help="batches to average over (default 8)")
    h.add_argument("--batch-size", type=_positive_int, default=128,
                   help="images per batch (default 128, as the authors)")
    h.add_argument("--split", choices=("train", "test"), default="train",
                   help="the data the loss is measured on (default train: the paper's S)")
    h.add_argument("--selection", choices=("first", "random"), default="first",
                   help="first: the split's first batches x batch-size images, as the authors' "
                   "code (default); random: a fixed random subset (--seed)")
    h.add_argument("--n-iters", type=_positive_int, default=20,
                   help="ascent iterations per batch (default 20)")
    h.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="plain sharpness (c = 1) instead of adaptive (c = |w|)")
    h.add_argument("--seed", type=int, default=0,
                   help="picks the images with --selection random (default 0)")
    h.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    h.add_argument("--data-root", default=None, help="override the run's data_root")
    h.add_argument("--no-cache", dest="cache", action="store_false",
                   help="measure again even if sharpness.json holds this setting")
    h.set_defaults(subparser=h)


def _student_from(text: str) -> str:
    from labkit.grading import _check_student_from

    try:
        _check_student_from(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("student_from ", "", 1)) from None
    return text


def _positive_float(text: str) -> float:
    v = _float(text)
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _add_grade_parser(sub: Any) -> None:
    """The ``grade`` subcommand; imports nothing but the standard library here."""
    g = sub.add_parser(
        "grade",
        help="grade saved lab notebooks from their outputs (never runs them unless --execute)",
        description="Grade students' saved lab notebooks against the released lab and its "
        "answer key: recorded answers (labkit.record outputs) within the key's tolerances, "
        "their consistency with the student's own recorded data, and whether the nbgrader test "
        "cells ran without error. Notebooks are read with nbformat and never executed unless "
        "--execute is given. Writes a CSV gradebook with one row per submission, whatever is "
        "wrong with it. See the \"For instructors\" section of README.md.",
    )
    g.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                   help="a student's notebook, or a folder: each notebook directly in it and "
                   "each subfolder (nbgrader's submitted/<student>/) is one student's")
    g.add_argument("--lab", required=True, metavar="LAB.ipynb",
                   help="the lab the students received (nbgrader's release version) or its "
                   "source version, e.g. labs/lab3_critical_batch.ipynb")
    g.add_argument("--key", default=None, metavar="KEY.yml",
                   help="answer key (default: keys/<lab>.yml next to the lab or in one of the "
                   "two folders above it)")
    g.add_argument("--out", required=True, metavar="GRADEBOOK.csv", help="the CSV gradebook")
    g.add_argument("--feedback", default=None, metavar="DIR",
                   help="also write one Markdown feedback page per student into DIR")
    g.add_argument("--student-from", type=_student_from, default="auto",
                   metavar="auto|file|folder|regex:PATTERN",
                   help="where the student id comes from (default auto: the notebook's file "
                   "name, or the student's subfolder)")
    g.add_argument("--max-size", type=_positive_float, default=20.0, metavar="MiB",
                   help="skip (with a reason) notebooks larger than this (default 20)")
    g.add_argument("--execute", action="store_true",
                   help="re-run each notebook in a fresh kernel first (nbclient). This RUNS THE "
                   "STUDENTS' CODE with your permissions: use a sandbox")
    g.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --execute: per-cell time limit (default 600)")
    g.add_argument("--kernel", default=None,
                   help="with --execute: kernel name (default: the notebook's, else python3)")
    g.add_argument("--save-executed", default=None, metavar="DIR",
                   help="with --execute: keep the executed notebooks in DIR")
    g.add_argument("--results", default=None, metavar="DIR",
                   help="with --execute: where the labs train (and reuse) their runs, outside "
                   "the submissions (default: $LABKIT_RESULTS, else "
                   "~/.cache/labkit/grading-results); never a folder found in a submission")
    g.add_argument("--source", default=None, metavar="SOURCE.ipynb",
                   help="with --execute: the lab's source version, whose locked cells (with "
                   "the hidden tests nbgrader's release strips) are run (default: LAB when it "
                   "is a source version, else source/<lab>.ipynb next to LAB if present)")
    g.set_defaults(subparser=g)


def build_grade_parser() -> argparse.ArgumentParser:
    """A parser that knows only ``grade``: no training module (and so no torch) is imported."""
    parser = argparse.ArgumentParser(prog="labkit")
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_grade_parser(sub)
    return parser


def _printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (escape sequences, carriage
    returns) and bidirectional overrides in a student's file name are shown escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _unwritable(path: str, kind: str) -> str | None:
    """Why ``path`` cannot become a file (``kind="file"``) or a folder, or None."""
    p = Path(path)
    flag = "--out" if kind == "file" else "--feedback"
    if kind == "file" and p.is_dir():
        return (f"{flag} {path} is a folder; name the CSV file to write, e.g. "
                f"{p / 'gradebook.csv'}")
    if kind == "folder" and p.exists() and not p.is_dir():
        return f"{flag} {path} is a file; name a folder (it is created when missing)"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {path}: {parent} is a file, so nothing can be created under it"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{flag} {path}: {parent} is not writable"
            break
    return None


def _cmd_grade(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from labkit.grading import (
        grade_submissions,
        load_release,
        load_source,
        results_folder,
        write_feedback,
        write_gradebook,
    )

    if not args.execute:
        for flag, value in (("--timeout", args.timeout), ("--kernel", args.kernel),
                            ("--save-executed", args.save_executed), ("--source", args.source),
                            ("--results", args.results)):
            if value is not None:
                parser.error(f"{flag} only applies with --execute")
    timeout = 600.0 if args.timeout is None else args.timeout
    # Where the results go is checked before anything is graded (grading can take hours).
    problem = _unwritable(args.out, "file") or (
        _unwritable(args.feedback, "folder") if args.feedback else None)
    if problem:
        parser.error(problem)
    try:
        source = None
        if args.execute:
            runs = results_folder(args.results, args.submissions)
            print(f"--execute: the labs train their runs in {runs} (shared by all submissions)")
            release = load_release(args.lab)
            source = load_source(args.source, release).path
            print(f"--execute: the locked cells run as in {source}"
                  + ("" if source != release.path or release.has_hidden_tests
                     or release.has_solutions else
                     " (a release version: hidden tests it may have had are not run; pass "
                     "--source SOURCE.ipynb to run them)"))
        results = grade_submissions(
            args.submissions, args.lab, args.key, student_from=args.student_from,
            max_bytes=int(args.max_size * 2**20), execute=args.execute, timeout=timeout,
            kernel_name=args.kernel, save_executed=args.save_executed, source=source,
            results=args.results,
        )
    except FileNotFoundError as e:
        print(f"labkit grade: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    if not results:
        print("labkit grade: error: no submissions found in "
              f"{', '.join(args.submissions)}", file=sys.stderr)
        return 1
    key = results[0].key
    write_gradebook(results, key, args.out)
    names = [_printable(r.student) for r in results]
    width = max(len(n) for n in names)
    for name, r in zip(names, results, strict=True):
        note = f"  {r.error}" if r.error else (f"  ({len(r.flags)} flag(s))" if r.flags else "")
        print(_printable(f"{name:<{width}}  {r.total:g} / {key.max_points:g}{note}"))
    if args.feedback:
        write_feedback(results, args.feedback)
    bad = sum(r.error is not None for r in results)
    print(f"wrote {args.out}: {len(results)} submission(s), {bad} could not be graded"
          + (f"; feedback in {args.feedback}" if args.feedback else ""))
    return 0


def _add_critical_measure_parser(c: argparse.ArgumentParser, profiles: Sequence[str]) -> None:
    """``labkit critical measure``: train one run per batch size and measure T and T b."""
    from labkit.experiments.sfo import AUTHORS_SKIP_EPOCHS
    from labkit.models import MODEL_NAMES
    from labkit.optim import OPTIMIZER_NAMES
    from labkit.precision import MEASUREMENT_PRECISION
    from labkit.train import DATASETS

    sub = c.add_subparsers(dest="critical_command", metavar="measure", title="measuring",
                           description="instead of --sfo / --results: train and measure")
    m = sub.add_parser(
        "measure",
        help="measure the SFO complexity T b per batch size by training, then b* and C^2",
        description="Train one run per batch size (in OUT/runs/b<b>, in fp32 with TF32 off "
        "unless --precision says otherwise) until its stopping test has passed; print T, "
        "SFO = T b, the critical batch size b* = argmin_b T b and the C^2 bound of Theorem 4.4 "
        "(Sato & Iiduka, arXiv:2402.02325, §4.3; the paper: --dataset cifar100 --optimizer shb "
        "--lr 0.1 --set beta=0.9 --eps 0.5 --batch-sizes 8 16 ... 8192). The test, as in the "
        "authors' code: T is the first step whose running mean of the mini-batch gradient "
        "norms of all steps so far is <= eps, tested after --skip-epochs whole epochs (default "
        "11: from the first step of epoch 12); exact to the step, from each run's per-step log. "
        "A batch size that does not reach eps within --max-epochs, or diverges, gets SFO = inf. "
        "Re-running the same command trains nothing new and resumes interrupted runs; another "
        "--eps trains only the runs that stopped before reaching it.",
    )
    m.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: digits for --profile cpu, else cifar100 (the paper's "
                   "experiment)")
    m.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="default: tiny for --profile smoke and on the digits, else the "
                   "paper's model")
    m.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd",
                   help="default sgd; the C^2 bound exists for sgd, shb and nshb")
    m.add_argument("--lr", type=_float, default=0.1, help="learning rate (default 0.1)")
    m.add_argument("--set", dest="hparams", action="append", type=parse_assignment, default=[],
                   metavar="KEY=VALUE", help="optimizer hyperparameter, e.g. --set beta=0.9")
    m.add_argument("--weight-decay", type=_float, default=0.0)
    m.add_argument("--eps", type=_float, required=True,
                   help="the threshold of the stopping test, a gradient norm (the paper: 0.5)")
    m.add_argument("--batch-sizes", nargs="+", type=_positive_int, required=True, metavar="B",
                   help="the grid, e.g. 8 16 32 64 128 256 512 1024 2048 4096 8192")
    m.add_argument("--skip-epochs", type=int, default=AUTHORS_SKIP_EPOCHS,
                   help=f"whole epochs the stopping test skips (default {AUTHORS_SKIP_EPOCHS}, "
                   "the authors' code; must be below --max-epochs)")
    m.add_argument("--max-epochs", type=_positive_int, default=None,
                   help="give up on a batch size after this many epochs (default: the "
                   "profile's epochs)")
    add_run_options(m, profiles)
    m.set_defaults(precision=MEASUREMENT_PRECISION)
    m.add_argument("--out", required=True, metavar="DIR",
                   help="measurement folder (a run folder runs/b<b> per batch size)")
    m.add_argument("--quiet", action="store_true", help="no per-batch-size lines")
    m.set_defaults(subparser=m, critical_command="measure")


def _dataset_of(args: argparse.Namespace, default: str) -> str:
    """``--dataset``, or when it is not given the digits for ``--profile cpu`` (the only data
    set of that profile) and ``default`` otherwise."""
    from labkit.train import CPU_DATASET

    if args.dataset is not None:
        return args.dataset
    return CPU_DATASET if args.profile == "cpu" else default


def _hparams(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ``--set KEY=VALUE`` pairs as a dict; a key given twice is an error."""
    hparams: dict[str, Any] = {}
    for key, value in args.hparams:
        if key in hparams:
            parser.error(f"--set {key} given twice")
        hparams[key] = value
    return hparams


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from labkit.data import DatasetError
    from labkit.store import DamagedFileError, FolderBusyError
    from labkit.train import Callback, TrainConfig, train

    hparams = _hparams(args, parser)
    config = TrainConfig(
        dataset=_dataset_of(args, "cifar10"), model=args.model, optimizer=args.optimizer,
        lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, hparams=hparams,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        batch_schedule=args.batch_schedule, seed=args.seed, device=args.device,
        precision=args.precision, compile=args.compile, augment=args.augment,
        rotate=args.rotate, data_root=args.data_root, download=args.download, out=args.out,
        profile=args.profile,
    )
    try:
        config = config.resolved()
    except (ValueError, TypeError) as e:
        parser.error(str(e))

    class _Print(Callback):
        def on_epoch_end(self, state, m):
            def f(v, fmt):
                return "nan" if v is None else format(v, fmt)

            print(
                f"epoch {m['epoch']:>4}/{state.config.epochs}  lr {m['lr']:.4g}"
                f"  b {m['batch_size']}"
                f"  train loss {f(m['train_loss'], '.4f')} acc {f(m['train_acc'], '.4f')}"
                f"  test loss {f(m['test_loss'], '.4f')} acc {f(m['test_acc'], '.4f')}"
                f"  {m['time']:.1f}s",
                flush=True,
            )

    try:
        result = train(config, callbacks=() if args.quiet else (_Print(),), progress=False)
    except KeyboardInterrupt:
        where = (f"run the same command again to resume ({args.out})" if args.out
                 else "nothing was kept (no --out folder)")
        print(f"labkit train: interrupted; {where}", file=sys.stderr)
        return 130
    except (FileNotFoundError, DatasetError, DamagedFileError, FolderBusyError,
            ImportError) as e:
        print(f"labkit train: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if result.loaded:
        print(f"{args.out} already holds a finished run; loaded its result (nothing trained).")
    print(json.dumps({"status": result.status, "epochs": len(result.metrics),
                      "out": result.out, "final": result.final}, sort_keys=True))
    return 0 if result.status in ("finished", "diverged") else 3


def info(data_root: str | None = None) -> dict[str, Any]:
    """Versions, the device labkit would pick, and which data sets are present."""
    import torch
    import torchvision

    from labkit.data import DATASET_NAMES as DATASETS
    from labkit.data import dataset_folder, default_data_root
    from labkit.train import SMOKE_FOLDER

    root = Path(data_root) if data_root else default_data_root()
    cuda = torch.cuda.is_available()
    return {
        "labkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "data_root": str(root),
        "datasets": {name: dataset_folder(root, name).is_dir() for name in DATASETS},
        "smoke_datasets": {name: dataset_folder(root / SMOKE_FOLDER, name).is_dir()
                           for name in DATASETS},
    }


def _cmd_data(args: argparse.Namespace) -> int:
    from labkit.data import DATASET_NAMES as DATASETS
    from labkit.data import (
        DatasetError,
        dataset_folder,
        default_data_root,
        is_generated,
        load_cifar,
    )

    root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
    failed = 0
    for name in dict.fromkeys(args.names or DATASETS):
        try:
            d = load_cifar(name, root=root, device="cpu", download=args.download)
        except (FileNotFoundError, DatasetError, RuntimeError, ImportError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            failed += 1
            continue
        kind = ("generated by labkit.data.make_fake_cifar, not the real data"
                if is_generated(root, name) else "the official files")
        print(f"{name}: {len(d.train_y)} training and {len(d.test_y)} test images, "
              f"{d.num_classes} classes ({kind}) in {dataset_folder(root, name)}")
    return 1 if failed else 0


def _cmd_info(args: argparse.Namespace) -> int:
    d = info(args.data_root)
    width = max(map(len, d))
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{n}: {'present' if ok else 'missing'}" for n, ok in v.items())
        print(f"{k:<{width}}  {v}")
    return 0


def _varying(configs: Sequence[Any]) -> list[str]:
    """Config fields (and hparams) whose values differ between the points, in field order."""
    from labkit.experiments.sweep import _FIELDS

    rows = []
    for cfg in configs:
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("hparams", "out")}
        d.update(cfg.hparams)
        rows.append({k: json.dumps(v, sort_keys=True) for k, v in d.items()})
    keys: list[str] = [k for k in _FIELDS if k != "hparams"]
    keys += sorted({k for r in rows for k in r} - set(keys))
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def _point_text(cfg: Any, keys: Sequence[str]) -> str:
    d = {**cfg.to_dict(), **cfg.hparams}
    return " ".join(f"{k}={d.get(k)!r}" if isinstance(d.get(k), str) else f"{k}={d.get(k)}"
                    for k in keys)


def _cmd_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from labkit.data import DatasetError
    from labkit.experiments.sweep import expand_grid, load_spec, plan_sweep, run_sweep
    from labkit.store import FolderBusyError

    try:
        spec = load_spec(args.grid)
        base = spec.get("base")
        if base is None:
            base = spec["base"] = {}
        if not isinstance(base, dict):
            expand_grid(spec)  # reports the malformed base with its line
        for key, value in (("profile", args.profile), ("data_root", args.data_root),
                           ("device", args.device)):
            if value is not None:
                base[key] = value
        configs = expand_grid(spec, args.max_points)
    except (FileNotFoundError, ValueError, TypeError) as e:
        parser.error(str(e))
    keys = _varying(configs)

    if args.dry_run:
        note = None
        try:
            points = plan_sweep(configs, args.out, check_data=True, max_points=None)
        except (FileNotFoundError, DatasetError) as e:
            points = plan_sweep(configs, args.out, max_points=None)
            note = f"batch sizes not checked against the data set: {e}"
        except ValueError as e:
            parser.error(str(e))
        for p in points:
            print(f"{p.index + 1:>4}  {p.hash}  {p.status:<9} {_point_text(p.config, keys)}")
            if p.status == "damaged":
                print(f"      {p.error}")
        counts: dict[str, int] = {}
        for p in points:
            counts[p.status] = counts.get(p.status, 0) + 1
        todo = sum(p.status not in ("finished", "diverged") for p in points)
        print(f"{len(points)} points; {todo} to run; "
              + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        if note:
            print(f"note: {note}")
        return 0

    n = len(configs)

    def report(p) -> None:
        if args.quiet and p.status != "damaged":
            return
        final = p.result.final if p.result is not None else {}
        acc = final.get("test_acc")
        what = "loaded" if p.loaded else p.status
        extra = f"  test_acc {acc:.4f}" if isinstance(acc, float) else ""
        if p.error:
            extra = f"  {p.error}"
        print(f"[{p.index + 1}/{n}] {p.hash} {what:<9}{extra}  {_point_text(p.config, keys)}",
              flush=True)

    executor = None
    if args.ray is not None:
        from labkit.experiments.ray_executor import ClusterError, RayExecutor, import_ray

        try:
            executor = RayExecutor(args.ray, gpus_per_point=args.gpus_per_point)
        except ValueError as e:
            parser.error(f"--ray: {e}")
        try:
            import_ray()  # before any data is loaded
        except ClusterError as e:
            print(f"labkit sweep: error: {e}", file=sys.stderr)
            return 1
    elif args.gpus_per_point is not None:
        parser.error("--gpus-per-point needs --ray ADDRESS (a local sweep uses this machine's "
                     "device)")
    try:
        result = run_sweep(configs, args.out, progress=sys.stderr.isatty() and not args.quiet,
                           on_run_end=report, executor=executor,
                           max_points=None, pack=not args.no_pack)
    except KeyboardInterrupt:
        print(f"labkit sweep: interrupted; run the same command again to resume ({args.out})",
              file=sys.stderr)
        return 130
    except (FileNotFoundError, DatasetError, FolderBusyError, ImportError) as e:
        print(f"labkit sweep: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    except RuntimeError as e:  # a Ray cluster that cannot be used (ClusterError), a busy out
        print(f"labkit sweep: error: {e}", file=sys.stderr)
        return 1
    counts = result.counts()
    print(json.dumps({"out": result.out, "points": len(result.points), "counts": counts,
                      "stopped": result.stopped}, sort_keys=True))
    if counts.get("failed"):
        print(f"labkit sweep: {counts['failed']} point(s) failed; see the error column of "
              "labkit.experiments.load_results; re-running retries them", file=sys.stderr)
    if counts.get("damaged"):
        print(f"labkit sweep: {counts['damaged']} point(s) have a damaged result.json (the "
              "lines above name them and say what to do); the other points went on",
              file=sys.stderr)
    if counts.get("failed") or counts.get("damaged"):
        return 1
    return 0 if result.complete else 3


def _print_curve(curve: Any) -> None:
    """The SFO table, b* and the C^2 bound of an :class:`labkit.experiments.sfo.SFOCurve`."""
    import math

    beta = "" if curve.beta is None else f"  beta {curve.beta:g}"
    print(f"optimizer {curve.optimizer}  lr {curve.lr:g}{beta}  eps {curve.eps:g}")
    for b, v in sorted(curve.sfo.items()):
        print(f"  b = {b:>6}  SFO {v:.4g}" if math.isfinite(v)
              else f"  b = {b:>6}  did not reach eps")
    _print_b_star(curve)


def _print_b_star(curve: Any) -> None:
    import math

    b = curve.critical_batch_size
    if b is not None:
        log2 = math.log2(b)
        power = f" (2^{int(log2)})" if log2 == int(log2) else ""
        print(f"critical batch size b* = {b}{power}")
    if curve.c2_upper_bound is not None:
        print(f"C^2 < {curve.c2_upper_bound:.6g}  (Theorem 4.4)")
    if curve.note:
        print(f"note: {curve.note}")


def _cmd_critical(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import math

    if args.critical_command == "measure":
        return _cmd_critical_measure(args, parser)
    if args.sfo is None and args.results is None:
        parser.error("one of the arguments --sfo --results is required (or measure the SFO "
                     "complexities by training: labkit critical measure --help)")
    if args.eps is None:
        parser.error("the following arguments are required: --eps")
    if not (args.eps > 0 and math.isfinite(args.eps)):
        parser.error(f"--eps must be a positive finite number; got {args.eps}")
    if args.beta is not None and not 0 <= args.beta < 1:
        parser.error(f"--beta must be in [0, 1); got {args.beta}")
    from labkit.experiments.sfo import AUTHORS_SKIP_EPOCHS, SFOCurve, sfo_curves, sfo_of_sweep

    if args.sfo is not None:
        if args.optimizer is None or args.lr is None:
            parser.error("--sfo needs --optimizer and --lr (and --beta for shb and nshb)")
        if args.optimizer != "sgd" and args.beta is None:
            parser.error(f"--beta is required for --optimizer {args.optimizer}")
        sfo: dict[int, float] = {}
        for b, v in args.sfo:
            if b in sfo:
                parser.error(f"--sfo gives batch size {b} twice")
            sfo[b] = v
        curve = SFOCurve(args.optimizer, args.lr, None if args.optimizer == "sgd" else args.beta,
                         args.eps, sfo)
        if curve.critical_batch_size is None:
            parser.error(f"no batch size reached the threshold: every SFO value is inf "
                         f"(batch sizes {sorted(sfo)})")
        _print_curve(curve)
        print(json.dumps(curve.to_dict(), sort_keys=True))
        return 0

    skip = AUTHORS_SKIP_EPOCHS if args.skip_epochs is None else args.skip_epochs
    if skip < 0:
        parser.error(f"--skip-epochs must be >= 0; got {skip}")
    try:
        runs = sfo_of_sweep(args.results, args.eps, skip_epochs=skip)
    except (FileNotFoundError, ValueError) as e:
        print(f"labkit critical: error: {e}", file=sys.stderr)
        return 1
    if int(runs["epochs_completed"].sum()) == 0:
        print(f"labkit critical: error: {args.results} holds no trained epochs", file=sys.stderr)
        return 1
    runs = runs[runs["optimizer"].isin(["sgd", "shb", "nshb"])]
    if args.optimizer is not None:
        runs = runs[runs["optimizer"] == args.optimizer]
    if args.lr is not None:
        runs = runs[runs["lr"] == args.lr]
    if args.beta is not None:
        runs = runs[runs["beta"] == args.beta]
    curves = sfo_curves(runs)
    if not curves:
        print(f"labkit critical: error: no finished sgd/shb/nshb runs in {args.results} match "
              "the filters", file=sys.stderr)
        return 1
    code = 0
    for curve in curves:
        _print_curve(curve)
        if curve.critical_batch_size is None:
            code = 1
            epochs = int(runs["epochs_completed"].max())
            if skip >= epochs:
                print(f"  (the runs have at most {epochs} epochs and the test skips {skip}: "
                      "pass a smaller --skip-epochs)")
    print(json.dumps({"skip_epochs": skip, "groups": [c.to_dict() for c in curves]},
                     sort_keys=True))
    return code


def _sfo_line(r: Mapping[str, Any], loaded: bool, max_epochs: int) -> str:
    """One row of the `labkit critical measure` table."""
    how = " (saved)" if loaded else ""
    b = r["batch_size"]
    if r["reached"]:
        return (f"  b = {b:>6}  T = {int(r['steps']):>8}  SFO = {r['sfo']:<10.6g}  "
                f"{r['epochs_completed']} epoch(s), running mean {r['final_mean']:.4g} at the "
                f"end{how}")
    if r["status"] == "diverged":
        return f"  b = {b:>6}  diverged after {r['epochs_completed']} epoch(s): SFO = inf{how}"
    return (f"  b = {b:>6}  did not reach eps within {max_epochs} epochs "
            f"(lowest running mean {r['lowest_mean']:.4g}): SFO = inf{how}")


def _cmd_critical_measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import math

    from labkit.data import DatasetError
    from labkit.experiments.sfo import measure_sfo, sfo_curves
    from labkit.store import DamagedFileError, FolderBusyError
    from labkit.train import TrainConfig

    # Options of the formula mode given before `measure`.
    for flag, value in (("--sfo", args.sfo), ("--results", args.results), ("--beta", args.beta)):
        if value is not None:
            hint = " (use --set beta=VALUE after measure)" if flag == "--beta" else ""
            parser.error(f"{flag} belongs to `labkit critical`, not `labkit critical measure`"
                         f"{hint}")
    if not (args.eps > 0 and math.isfinite(args.eps)):
        parser.error(f"--eps must be a positive finite number; got {args.eps}")
    if args.skip_epochs < 0:
        parser.error(f"--skip-epochs must be >= 0; got {args.skip_epochs}")
    hparams = _hparams(args, parser)
    config = TrainConfig(
        dataset=_dataset_of(args, "cifar100"), model=args.model, optimizer=args.optimizer,
        lr=args.lr, hparams=hparams, weight_decay=args.weight_decay, seed=args.seed,
        device=args.device, precision=args.precision, compile=args.compile, augment=args.augment,
        rotate=args.rotate, data_root=args.data_root, download=args.download,
        profile=args.profile,
    )
    max_epochs = args.max_epochs
    quiet = args.quiet

    def report(row: Mapping[str, Any], loaded: bool) -> None:
        if not quiet:
            print(_sfo_line(row, loaded, max_epochs), flush=True)

    try:
        config = config.resolved()
        if max_epochs is None:
            max_epochs = config.epochs
        if not quiet:
            print(f"SFO complexity T b: {config.optimizer} lr {config.lr:g}"
                  + "".join(f" {k}={v}" for k, v in sorted(hparams.items()))
                  + f" on {config.dataset} ({config.model}, {config.precision}), eps "
                  f"{args.eps:g}, the test skips {args.skip_epochs} epoch(s), max_epochs "
                  f"{max_epochs}", flush=True)
        runs = measure_sfo(
            config, args.batch_sizes, args.eps, out=args.out, skip_epochs=args.skip_epochs,
            max_epochs=max_epochs, progress=sys.stderr.isatty() and not quiet, on_run=report,
        )
    except KeyboardInterrupt:
        print(f"labkit critical measure: interrupted; run the same command again to resume "
              f"({args.out})", file=sys.stderr)
        return 130
    except (FileNotFoundError, DatasetError, DamagedFileError, FolderBusyError,
            ImportError) as e:
        print(f"labkit critical measure: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:
        parser.error(str(e))

    (curve,) = sfo_curves(runs) or [None]
    summary: dict[str, Any] = {
        "skip_epochs": args.skip_epochs, "max_epochs": max_epochs, "out": args.out,
        "precision": config.precision,
        "runs": [{"batch_size": int(r["batch_size"]), "steps": None if not r["reached"]
                  else int(r["steps"]), "reached": bool(r["reached"]), "status": r["status"],
                  "epochs": int(r["epochs_completed"])} for _, r in runs.iterrows()],
    }
    if curve is None:  # a callback stopped the first run before anything was known
        print("labkit critical measure: nothing measured", file=sys.stderr)
        print(json.dumps(summary, sort_keys=True))
        return 1
    if curve.critical_batch_size is None:
        print(f"labkit critical measure: no batch size reached the threshold eps = {args.eps:g}",
              file=sys.stderr)
        _print_b_star(curve)
        print(json.dumps({**curve.to_dict(), **summary}, sort_keys=True))
        return 1
    _print_b_star(curve)
    print(json.dumps({**curve.to_dict(), **summary}, sort_keys=True))
    return 0


def _cmd_sharpness(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from labkit.data import DatasetError
    from labkit.experiments.results import measure_sharpness
    from labkit.precision import strict_fp32

    try:
        value = strict_fp32()(measure_sharpness)(  # a measurement: IEEE fp32, TF32 off
            args.run, rho=args.rho, norm=args.norm, adaptive=args.adaptive,
            n_batches=args.batches, batch_size=args.batch_size, split=args.split,
            selection=args.selection, n_iters=args.n_iters, seed=args.seed, device=args.device,
            data_root=args.data_root, cache=args.cache,
        )
    except (FileNotFoundError, DatasetError, ImportError) as e:
        print(f"labkit sharpness: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    kind = "adaptive sharpness" if args.adaptive else "sharpness"
    print(f"{kind} (rho={args.rho:g}, {args.norm}, {args.batches} {args.split} batches of "
          f"{args.batch_size}, {args.selection} images): {value:.6g}")
    print(json.dumps({"run": args.run, "sharpness": value, "rho": args.rho, "norm": args.norm,
                      "adaptive": args.adaptive, "batches": args.batches,
                      "batch_size": args.batch_size, "selection": args.selection,
                      "split": args.split}, sort_keys=True))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (``labkit: warning: ...``), without the source line."""
    print(f"labkit: warning: {message}", file=sys.stderr if file is None else file)


def _environment_error(e: OSError) -> str:
    """One line for an error of the machine (full disk, no permission, ...)."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; free some space and run the same "
                "command again (an interrupted run resumes from its last checkpoint)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write{where}: {e.strerror}; choose a folder you can write"
    return f"{e.strerror or e}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 bad input, 3 not
    complete, 130 interrupted). Errors are one line each (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "labkit"
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            return _main(argv)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print(f"labkit {command}: interrupted", file=sys.stderr)
            return 130
        except OSError as e:
            if debug:
                traceback.print_exc()
            print(f"labkit {command}: error: {_environment_error(e)}", file=sys.stderr)
            return 1
        except Exception as e:
            if debug:
                traceback.print_exc()
            what = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"labkit {command}: internal error (a bug in labkit {__version__}): "
                  f"{type(e).__name__}: {what}. Please report it at {ISSUES_URL} with the "
                  f"traceback that {DEBUG_VARIABLE}=1 prints", file=sys.stderr)
            return 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["grade"]:
        # Grading must not import torch or the training code: it gets a parser of its own.
        grade_parser = build_grade_parser()
        args = grade_parser.parse_args(argv)
        return _cmd_grade(args, args.subparser)
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "sweep": _cmd_sweep, "critical": _cmd_critical,
                "sharpness": _cmd_sharpness, "grade": _cmd_grade}
    if args.command in commands:
        return commands[args.command](args, args.subparser)
    if args.command == "data":
        return _cmd_data(args)
    return _cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
