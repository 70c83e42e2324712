"""The GPU benchmark: ResNet-18 on CIFAR-100-shaped data, labkit vs the naive loop.

Epoch time (50,000 training images, test evaluation on 10,000 included) at batch sizes 8,
128 and 512 for labkit's loop and for the naive loop of ``bench_loop.py``. The goals: at
most 0.7 s/epoch at b=512 on an H100, and at least 10x the naive loop.

    python benchmarks/bench_gpu.py [--batch-sizes 8 128 512] [--compile] [--skip-naive-below 64]

Needs CUDA; on a machine without it, it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import labkit_epoch_times, make_data, naive_epoch_times  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 128, 512])
    p.add_argument("--epochs", type=int, default=3, help="labkit epochs (first is warm-up)")
    p.add_argument("--naive-epochs", type=int, default=2, help="naive epochs (first is warm-up)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--model", default="resnet18")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a GPU machine.")
        return {}
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp), "cifar100", 50_000, 10_000)
        for b in args.batch_sizes:
            lk = labkit_epoch_times(root, "cifar100", args.model, b, args.epochs, dev,
                                    compile=args.compile)
            nv = naive_epoch_times(root, "cifar100", args.model, b, args.naive_epochs,
                                   args.workers, dev)
            row = {"batch_size": b, "labkit_s": min(lk[1:]), "naive_s": min(nv[1:]),
                   "labkit_epochs": lk, "naive_epochs": nv}
            row["speedup"] = row["naive_s"] / row["labkit_s"]
            rows.append(row)
            print(f"b={b:<4} labkit {row['labkit_s']:7.3f} s/epoch   naive {row['naive_s']:7.3f}"
                  f" s/epoch   ratio {row['speedup']:5.1f}x", flush=True)
    out = {"gpu": torch.cuda.get_device_name(0), "model": args.model, "compile": args.compile,
           "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
