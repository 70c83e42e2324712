"""Host syncs per training step of labkit's loop: the goal is 0.

Counts ``aten::_local_scalar_dense`` (what ``.item()``, ``float(t)`` and ``if t:`` run) and
``aten::item`` with the PyTorch profiler over two runs of the same loop that differ only in
their number of steps; the difference divided by the extra steps is the count per step, so
the once-per-epoch metrics read cancels out. On CUDA it also runs a few steps under
``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronizing calls.

    python benchmarks/bench_syncs.py [--optimizers sgd shb nshb adam]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item")


def count_syncs(root: Path, optimizer: str, n_train: int, batch_size: int,
                device: torch.device, callbacks=()) -> int:
    """Sync ops counted by the profiler over one epoch of ``n_train`` images."""
    from labkit.train import TrainConfig, train

    cfg = TrainConfig(dataset="cifar10", model="tiny", optimizer=optimizer,
                      lr=1e-3 if optimizer in ("adam", "amsgrad") else 0.05,
                      batch_size=batch_size, epochs=1, data_root=str(root), device=str(device),
                      profile="short")
    from labkit.data import load_cifar

    data = load_cifar("cifar10", root=root, device=device)
    data.train_x, data.train_y = data.train_x[:n_train], data.train_y[:n_train]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train(cfg, progress=False, data=data, callbacks=callbacks)
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS)


def cuda_sync_calls(root: Path, batch_size: int, device: torch.device) -> int:
    """Synchronizing CUDA calls flagged by ``torch.cuda.set_sync_debug_mode("warn")`` from
    the end of the first optimizer step to the end of the last-but-one step of an epoch."""
    from labkit.train import Callback, TrainConfig, train

    class Watch(Callback):
        step_interval = 1

        def on_step(self, state):
            if state.step == 1:
                torch.cuda.set_sync_debug_mode("warn")
            elif state.step == state.steps_per_epoch - 1:
                torch.cuda.set_sync_debug_mode("default")

    cfg = TrainConfig(dataset="cifar10", model="tiny", optimizer="shb", lr=0.05,
                      batch_size=batch_size, epochs=1, data_root=str(root), device=str(device),
                      profile="short")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(cfg, progress=False, callbacks=[Watch()])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()
             and "prototype" not in str(w.message).lower()]
    for w in syncs[:5]:
        print("  sync:", str(w.message).splitlines()[0][:160])
    return len(syncs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "shb", "nshb", "adam"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="extra steps of the second run")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"device": str(device), "per_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from labkit.data import make_fake_cifar

        make_fake_cifar(Path(tmp), "cifar10", n_train=512, n_test=64, seed=0)
        b = args.batch_size
        for name in args.optimizers:
            short = count_syncs(Path(tmp), name, 2 * b, b, device)
            long = count_syncs(Path(tmp), name, (2 + args.steps) * b, b, device)
            per_step = (long - short) / args.steps
            out["per_step"][name] = per_step
            print(f"{name:<8} host syncs per step: {per_step:g}   "
                  f"(whole epoch incl. the metrics read: {short} and {long})")
        if device.type == "cuda":
            out["cuda_syncs_per_epoch"] = cuda_sync_calls(Path(tmp), b, device)
            print(f"synchronizing CUDA calls between steps 1 and {512 // b - 1} of an epoch: "
                  f"{out['cuda_syncs_per_epoch']}")
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
