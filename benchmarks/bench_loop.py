"""labkit's training loop vs a naive PyTorch loop on the same model and data.

The naive loop is what a hand-written CIFAR script usually looks like: a torchvision data
set read into PIL images, torchvision transforms (random crop with 4-pixel padding, flip, on
CIFAR-100 the rotation by up to 15 degrees that labkit applies there too, to-tensor,
normalize), a DataLoader with worker processes, and a ``loss.item()`` per step.
labkit keeps the data on the device, augments on the device, and reads metrics once per
epoch. Both run the same model, optimizer, batch size and number of epochs, and both
evaluate on the test set each epoch; the first epoch of each is a warm-up and not timed.

    python benchmarks/bench_loop.py            # CPU here: tiny CNN on generated CIFAR-10
    python benchmarks/bench_loop.py --model resnet18 --dataset cifar100 --n-train 50000

Prints images/s of both loops and the ratio labkit / naive.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def naive_epoch_times(
    root: Path,
    dataset: str,
    model_name: str,
    batch_size: int,
    epochs: int,
    workers: int,
    device: torch.device,
    lr: float = 0.05,
) -> list[float]:
    """Wall seconds of each epoch (train + test evaluation) of the naive loop."""
    import torchvision
    import torchvision.transforms as T

    from labkit.data import load_cifar
    from labkit.models import build_model
    from labkit.train import PAPER_ROTATION

    stats = load_cifar(dataset, root=root)  # the same per-channel statistics as labkit uses
    mean, std = stats.mean, stats.std
    rotation = [T.RandomRotation(PAPER_ROTATION[dataset])] if PAPER_ROTATION[dataset] else []
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *rotation,
                          T.ToTensor(), T.Normalize(mean, std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    base = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100

    # Generated CIFAR-format data has the official layout but not the official files' MD5
    # sums, which torchvision checks: give it the sums of the files that are there. The
    # reading code is torchvision's own.
    folder = Path(root) / base.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = type(f"Local{base.__name__}", (base,), {
        "train_list": [[n, md5(n)] for n, _ in base.train_list],
        "test_list": [[n, md5(n)] for n, _ in base.test_list],
        "meta": dict(base.meta, md5=md5(base.meta["filename"])),
    })
    train_set = cls(str(root), train=True, transform=train_tf, download=False)
    test_set = cls(str(root), train=False, transform=test_tf, download=False)
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0,
    )
    test_loader = torch.utils.data.DataLoader(
        test_set, batch_size=1000, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = build_model(model_name, len(train_set.classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()  # the per-step host sync of a typical script
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(device), y.to(device)
                correct += (model(x).argmax(1) == y).sum().item()
        times.append(time.perf_counter() - t0)
    return times


def labkit_epoch_times(
    root: Path,
    dataset: str,
    model_name: str,
    batch_size: int,
    epochs: int,
    device: torch.device,
    lr: float = 0.05,
    compile: bool = False,
    precision: str = "auto",
) -> list[float]:
    """Wall seconds of each epoch (train + test evaluation) of :func:`labkit.train`."""
    from labkit.train import TrainConfig, train

    cfg = TrainConfig(
        dataset=dataset, model=model_name, optimizer="shb", lr=lr, hparams={"beta": 0.9},
        batch_size=batch_size, epochs=epochs, data_root=str(root), device=str(device),
        compile=compile, precision=precision, profile="short",
    )
    result = train(cfg, progress=False)
    return [m["time"] for m in result.metrics]


def make_data(root: Path, dataset: str, n_train: int, n_test: int) -> Path:
    from labkit.data import make_fake_cifar

    make_fake_cifar(root, name=dataset, n_train=n_train, n_test=n_test, seed=0)
    return root


def compare(
    *,
    dataset: str,
    model: str,
    batch_size: int,
    n_train: int,
    n_test: int,
    epochs: int,
    workers: int,
    device: torch.device,
    data_root: Path | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Time both loops on the same data; epoch 1 of each is a warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        root = data_root or make_data(Path(tmp), dataset, n_train, n_test)
        lk = labkit_epoch_times(root, dataset, model, batch_size, epochs, device,
                                compile=compile)
        nv = naive_epoch_times(root, dataset, model, batch_size, epochs, workers, device)
    timed = slice(1, None) if epochs > 1 else slice(None)
    lk_t = min(lk[timed])
    nv_t = min(nv[timed])
    n = n_train if data_root is None else None
    row = {
        "device": str(device),
        "model": model,
        "dataset": dataset,
        "batch_size": batch_size,
        "labkit_s_per_epoch": lk_t,
        "naive_s_per_epoch": nv_t,
        "speedup": nv_t / lk_t,
    }
    if n:
        row["labkit_img_per_s"] = n / lk_t
        row["naive_img_per_s"] = n / nv_t
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    p.add_argument("--model", default="resnet18" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=50_000 if cuda else 4096)
    p.add_argument("--n-test", type=int, default=10_000 if cuda else 1000)
    p.add_argument("--epochs", type=int, default=3, help="the first one is a warm-up")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the naive loop")
    p.add_argument("--data-root", type=Path, default=None, help="real CIFAR instead of generated")
    p.add_argument("--compile", action="store_true", help="torch.compile in labkit's loop")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.workers = 512, 256, 2, 0
    device = torch.device("cuda" if cuda else "cpu")
    row = compare(
        dataset=args.dataset, model=args.model, batch_size=args.batch_size,
        n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, workers=args.workers,
        device=device, data_root=args.data_root, compile=args.compile,
    )
    print(f"device {row['device']}  model {row['model']}  {row['dataset']}  b={row['batch_size']}")
    for name in ("labkit", "naive"):
        ips = row.get(f"{name}_img_per_s")
        extra = f"  {ips:10.0f} img/s" if ips and math.isfinite(ips) else ""
        print(f"  {name:<7} {row[f'{name}_s_per_epoch']:8.3f} s/epoch{extra}")
    print(f"  ratio labkit/naive speed: {row['speedup']:.2f}x")
    print(json.dumps(row, sort_keys=True))
    return row


if __name__ == "__main__":
    main()
