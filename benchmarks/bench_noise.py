"""Benchmark: per-example gradient variance C^2 with vmap-chunked ``labkit.noise.gradient_variance``
against a per-example loop (one forward and backward pass per example) on the same model and
examples.

    python benchmarks/bench_noise.py [--quick] [--examples N] [--chunk-size C] [--model NAME]

Prints examples/s of both, their ratio, and the relative difference of the two C^2 values.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from labkit.noise import gradient_variance


def _fallback_cnn(num_classes: int) -> nn.Module:
    """A small BN CNN for 32x32 inputs, used when labkit.models is not available."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def build(name: str, num_classes: int) -> tuple[nn.Module, str]:
    try:
        from labkit.models import build_model
    except ImportError:
        return _fallback_cnn(num_classes), "fallback small CNN (labkit.models not found)"
    return build_model(name, num_classes), f"labkit.models.build_model({name!r})"


def loop_variance(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> float:
    """Baseline: one backward pass per example; float64 running sums of g_i and ||g_i||^2."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=x.device)
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([t.reshape(-1) for t in grads]).to(torch.float64)
        total += g
        sq += g @ g
    model.train(was)
    n = x.shape[0]
    return float(sq / n - (total / n) @ (total / n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few examples, one repeat")
    parser.add_argument("--examples", type=int, default=None, help="examples (default 512)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--model", default="tiny", help="name for labkit.models.build_model")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept")
    args = parser.parse_args(argv)
    n = args.examples or (64 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    if n < 1 or args.chunk_size < 1 or repeats < 1:
        parser.error("--examples, --chunk-size and --repeats must be >= 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, model_desc = build(args.model, args.classes)
    model = model.to(device)
    x = torch.randn(n, 3, 32, 32, device=device)
    y = torch.randint(0, args.classes, (n,), device=device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # warm-up (kernel selection, vmap tracing caches)
    warm = min(n, args.chunk_size)
    gradient_variance(model, loss_fn, (x[:warm], y[:warm]), chunk_size=args.chunk_size)
    loop_variance(model, loss_fn, x[: min(n, 8)], y[: min(n, 8)])

    t_vmap, stats = _time(
        lambda: gradient_variance(model, loss_fn, (x, y), chunk_size=args.chunk_size),
        device,
        repeats,
    )
    t_loop, c2_loop = _time(lambda: loop_variance(model, loss_fn, x, y), device, repeats)
    c2_vmap = stats.c2
    result = {
        "device": str(device),
        "model": model_desc,
        "parameters": n_params,
        "examples": n,
        "chunk_size": args.chunk_size,
        "vmap_seconds": t_vmap,
        "loop_seconds": t_loop,
        "vmap_examples_per_s": n / t_vmap,
        "loop_examples_per_s": n / t_loop,
        "speedup": t_loop / t_vmap,
        "c2_vmap": c2_vmap,
        "c2_loop": c2_loop,
        "c2_rel_diff": abs(c2_vmap - c2_loop) / max(abs(c2_loop), 1e-300),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch threads: {torch.get_num_threads()}")
    print(f"model: {model_desc}, {n_params:,} parameters; {n} examples of 3x32x32")
    print(
        f"vmap, chunk {args.chunk_size:>4}: {result['vmap_examples_per_s']:10.1f} examples/s "
        f"({t_vmap:.3f} s)"
    )
    print(f"per-example loop:  {result['loop_examples_per_s']:10.1f} examples/s ({t_loop:.3f} s)")
    print(f"speedup (loop time / vmap time): {result['speedup']:.2f}x")
    print(f"C^2 vmap {c2_vmap:.6g}, loop {c2_loop:.6g}, relative difference "
          f"{result['c2_rel_diff']:.1e}")
    return result


if __name__ == "__main__":
    main()
