"""Optimizer step time: labkit.optim vs its torch.optim counterpart, side by side.

The parameter set has the shapes of a CIFAR ResNet-18 (3x3 stem, 100 classes: 62 tensors,
11.2 M float32 values), built here as plain tensors with random gradients, so only the
optimizer's update is timed (no forward or backward pass). Pairs:

* ``SHB(beta=0.9)``  vs ``torch.optim.SGD(momentum=0.9)``
* ``AdamEta(eta=2)`` vs ``torch.optim.Adam``
* ``AdamEta(eta=3)`` vs ``torch.optim.Adam`` (the general-eta path: |g|^eta and a 1/eta root)

each with the multi-tensor path (``foreach=True``, the default on CUDA) and, unless
``--foreach-only``, the per-tensor path. The two sides of a pair alternate in repeated
blocks of steps; the median block gives ms/step.

    python benchmarks/bench_optim.py [--quick] [--device cpu|cuda] [--foreach-only]

Prints ms/step of both and the ratio labkit / torch (< 1: labkit is faster); on the CPU
also the process CPU time per step and its ratio, which a busy shared machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from labkit.optim import SHB, AdamEta


def resnet18_shapes(num_classes: int = 100) -> list[tuple[int, ...]]:
    """Parameter shapes of a CIFAR ResNet-18 (conv weights have no bias; BN has 2 vectors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    c_in = 64
    for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            first_in = c_in if block == 0 else c_out
            shapes += [(c_out, first_in, 3, 3), (c_out,), (c_out,)]
            shapes += [(c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
        c_in = c_out
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def make_params(
    shapes: list[tuple[int, ...]], device: torch.device, seed: int = 0
) -> list[torch.nn.Parameter]:
    """float32 parameters with random gradients already set (std 0.01)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.05)
        p.grad = (torch.randn(s, generator=gen) * 0.01).to(device)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(
    opt: torch.optim.Optimizer, steps: int, device: torch.device
) -> tuple[float, float]:
    """(wall ms, process CPU ms) per ``opt.step()`` over ``steps`` back-to-back steps.

    The CPU time of this process is what to compare on a shared, busy CPU: other
    processes stretch wall time but not it (on CUDA it is host time only; use wall).
    """
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps, (time.process_time() - c0) * 1e3 / steps


Factory = Callable[[list[torch.nn.Parameter], bool], torch.optim.Optimizer]

PAIRS: list[tuple[str, Factory, str, Factory]] = [
    ("SHB(beta=0.9)", lambda ps, fe: SHB(ps, lr=0.1, beta=0.9, foreach=fe),
     "SGD(momentum=0.9)", lambda ps, fe: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=fe)),
    ("AdamEta(eta=2)", lambda ps, fe: AdamEta(ps, lr=1e-3, eta=2.0, foreach=fe),
     "Adam", lambda ps, fe: torch.optim.Adam(ps, lr=1e-3, foreach=fe)),
    ("AdamEta(eta=3)", lambda ps, fe: AdamEta(ps, lr=1e-3, eta=3.0, foreach=fe),
     "Adam", lambda ps, fe: torch.optim.Adam(ps, lr=1e-3, foreach=fe)),
]


def compare(
    ours: Factory, theirs: Factory, foreach: bool, shapes: list[tuple[int, ...]],
    device: torch.device, steps: int, repeats: int, warmup: int,
) -> dict[str, float]:
    """Median ms/step (wall and CPU) of labkit's and torch's optimizer, alternating blocks."""
    opt_a = ours(make_params(shapes, device), foreach)
    opt_b = theirs(make_params(shapes, device), foreach)
    for opt in (opt_a, opt_b):
        time_block(opt, warmup, device)
    a, b = [], []
    for _ in range(repeats):
        a.append(time_block(opt_a, steps, device))
        b.append(time_block(opt_b, steps, device))
    return {
        "labkit_ms": statistics.median(w for w, _ in a),
        "torch_ms": statistics.median(w for w, _ in b),
        "labkit_cpu_ms": statistics.median(c for _, c in a),
        "torch_cpu_ms": statistics.median(c for _, c in b),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--foreach-only", action="store_true", help="skip the per-tensor path")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per side")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; use cpu")
    gpu = device.type == "cuda"
    steps = args.steps or (2 if args.quick else (50 if gpu else 10))
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = 1 if args.quick else (20 if gpu else 3)
    shapes = resnet18_shapes(args.num_classes)
    n_values = sum(torch.Size(s).numel() for s in shapes)
    name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device} [{name}], torch {torch.__version__}")
    print(f"params: ResNet-18 shapes, {len(shapes)} tensors, {n_values / 1e6:.2f} M float32; "
          f"{repeats} blocks of {steps} steps per side (median)")
    cpu_cols = "" if gpu else f" {'labkit cpu':>10} {'torch cpu':>9} {'cpu ratio':>9}"
    print(f"{'labkit':<16} {'torch':<18} {'path':<11} {'labkit ms':>10} {'torch ms':>9} "
          f"{'ratio labkit/torch':>19}{cpu_cols}")

    rows = []
    paths = [True] if args.foreach_only else [True, False]
    for ours_name, ours, theirs_name, theirs in PAIRS:
        for foreach in paths:
            t = compare(ours, theirs, foreach, shapes, device, steps, repeats, warmup)
            row = {"labkit": ours_name, "torch": theirs_name,
                   "path": "foreach" if foreach else "per-tensor", **t,
                   "ratio": t["labkit_ms"] / t["torch_ms"],
                   "cpu_ratio": t["labkit_cpu_ms"] / max(t["torch_cpu_ms"], 1e-9)}
            rows.append(row)
            cpu = "" if gpu else (f" {t['labkit_cpu_ms']:>10.3f} {t['torch_cpu_ms']:>9.3f} "
                                  f"{row['cpu_ratio']:>9.3f}")
            print(f"{ours_name:<16} {theirs_name:<18} {row['path']:<11} {t['labkit_ms']:>10.3f} "
                  f"{t['torch_ms']:>9.3f} {row['ratio']:>19.3f}{cpu}")
    out = {"device": str(device), "device_name": name, "n_tensors": len(shapes),
           "n_values": n_values, "steps": steps, "repeats": repeats, "results": rows}
    if args.json:
        print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
