"""Packed runs vs the same runs one after another (labkit.train_pack vs labkit.train).

CPU (default): the smoke profile's tiny CNN on generated CIFAR-10 (512 training images), K = 8
runs (SGD, SHB and NSHB with their own seeds and learning rates) at b = 8 and b = 64: one epoch
of the 8 runs trained one after another by ``train``, then one epoch of the same 8 runs as one
pack by ``train_pack``, alternated ``--repeats`` times; the best time of each is kept (the
machine may be shared). Goal: packed at least 3x the sequential runs at b = 8.

GPU (``--gpu``): ResNet-18 on generated CIFAR-100-shaped data at b = 8, 32, 128, 512, 2048,
seconds per epoch *per run* for one run trained by ``train`` today (eager, no pack) and for packs
of K = 1, 3, 9 with CUDA graphs, extrapolated from ``--n-train`` images to CIFAR's 50,000 (the
second epoch is timed; the first is a warm-up that also captures the graphs). Goals (H100 /
H200): b = 8 at most 7 s per run-epoch packed with graphs; b = 512 single run at most 0.7 s.
Then the CUDA tests of packs (tests/test_pack_cuda.py) are the check that graphs and packs
equal eager single runs.

    python benchmarks/bench_pack.py                  # CPU ratio
    python benchmarks/bench_pack.py --gpu --json pack.json   # the GPU table (needs CUDA)
    python benchmarks/bench_labs.py --plan --step-times pack.json  # labs' predicted GPU time
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from labkit.data import load_cifar, make_fake_cifar
from labkit.train import TrainConfig, train
from labkit.train_pack import choose_pack_size, train_pack

CIFAR_TRAIN = 50_000


def configs(root: Path, k: int, **kw: Any) -> list[TrainConfig]:
    """K runs that pack together: SGD, SHB and NSHB in turn, each with its own seed and lr."""
    kinds = [("sgd", {}), ("shb", {"beta": 0.9}), ("nshb", {"beta": 0.9})]
    out = []
    for i in range(k):
        opt, hp = kinds[i % 3]
        out.append(TrainConfig(optimizer=opt, hparams=hp, lr=0.02 * (1 + i % 4), seed=i,
                               data_root=str(root), **kw))
    return out


def time_sequential(cfgs: list[TrainConfig], data) -> float:
    t0 = time.perf_counter()
    for c in cfgs:
        train(c, progress=False, data=data)
    return time.perf_counter() - t0


def time_packed(cfgs: list[TrainConfig], data, graphs: bool | None = None) -> float:
    t0 = time.perf_counter()
    train_pack(cfgs, progress=False, data=data, graphs=graphs)
    return time.perf_counter() - t0


def cpu_main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_fake_cifar(root, "cifar10", n_train=args.n_train, n_test=args.n_test, seed=0)
        data = load_cifar("cifar10", root=root, device="cpu")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"CPU: {torch.get_num_threads()} threads, load average {load:.2f} "
              f"({os.cpu_count()} cores); tiny CNN, {args.n_train} images, K = {args.k}")
        for b in args.batch_sizes:
            cfgs = configs(root, args.k, model="tiny", batch_size=b, epochs=1, device="cpu",
                           profile="short")
            seq, packed = [], []
            for _ in range(args.repeats):  # alternated, so both see the same machine load
                seq.append(time_sequential(cfgs, data))
                packed.append(time_packed(cfgs, data))
            row = {"batch_size": b, "k": args.k, "sequential_s": min(seq),
                   "packed_s": min(packed), "ratio": min(seq) / min(packed),
                   "load_average": load}
            rows.append(row)
            print(f"b = {b:4d}: {args.k} runs one after another {row['sequential_s']:.2f} s, "
                  f"packed {row['packed_s']:.2f} s; ratio packed/sequential speed "
                  f"{row['ratio']:.2f}x (goal at b = 8: >= 3x)")
    out = {"device": "cpu", "rows": rows}
    print(json.dumps(out))
    return out


def gpu_main(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("bench_pack --gpu: no CUDA device here; run it on a GPU machine.")
        return {}
    print(f"GPU: {torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    scale = CIFAR_TRAIN / args.n_train
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_fake_cifar(root, "cifar100", n_train=args.n_train, n_test=args.n_test, seed=0)
        data = load_cifar("cifar100", root=root, device="cuda")
        for b in args.batch_sizes:
            row: dict[str, Any] = {"batch_size": b}
            base = dict(dataset="cifar100", model="resnet18", batch_size=b, epochs=2,
                        device="cuda", profile="short")
            # Today: one run, eager, one epoch after a warm-up epoch.
            res = train(configs(root, 1, **base)[0], progress=False, data=data)
            row["single_eager_s"] = res.metrics[-1]["time"] * scale
            for k in args.ks:
                fits = choose_pack_size(configs(root, 1, **base)[0], data, k)
                if fits < k:
                    print(f"b = {b}: K = {k} does not fit in free memory (at most {fits})")
                    continue
                res = train_pack(configs(root, k, **base), progress=False, data=data,
                                 graphs=not args.no_graphs)
                row[f"pack{k}_s_per_run"] = res[0].metrics[-1]["time"] * scale / k
            rows.append(row)
            print(f"b = {b:5d}: single run {row['single_eager_s']:.2f} s/epoch; "
                  + ", ".join(f"K = {k}: {row[f'pack{k}_s_per_run']:.2f}" for k in args.ks
                              if f"pack{k}_s_per_run" in row)
                  + " s per run-epoch (packed, graphs)", flush=True)
    out = {"device": torch.cuda.get_device_name(0), "n_train": args.n_train,
           "model": "resnet18", "rows": rows}
    print(json.dumps(out))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU table (ResNet-18, CUDA)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--k", type=int, default=8, help="runs per pack (CPU)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 9], help="pack sizes (GPU)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--no-graphs", action="store_true", help="GPU packs without CUDA graphs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's run)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the GPU table here (bench_labs.py --plan --step-times reads it)")
    args = p.parse_args(argv)
    if args.gpu:
        args.batch_sizes = args.batch_sizes or [8, 32, 128, 512, 2048]
        args.n_train = args.n_train or 8192
        args.n_test = args.n_test or 1000
        return gpu_main(args)
    args.batch_sizes = args.batch_sizes or ([8] if args.quick else [8, 64])
    args.n_train = args.n_train or (64 if args.quick else 512)
    args.n_test = args.n_test or (32 if args.quick else 256)
    if args.quick:
        args.k, args.repeats = 3, 1
    return cpu_main(args)


if __name__ == "__main__":
    main()
