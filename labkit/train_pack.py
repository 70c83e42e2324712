"""Training a pack of runs at once: K :func:`labkit.train.train` runs in the steps of one model.

Book: the grids of chapters 4, 7 and 8 (see :mod:`labkit.pack` for the packed model). Each run
of a pack is the run :func:`labkit.train.train` would train: its own initialization (its model
is built with its own seed, then packed), data order and augmentation (its own generator draws
its epoch's crops, flips, rotations and permutation exactly as ``train`` does), learning rate,
momentum, weight decay and schedule (:class:`labkit.pack.PackedMomentum`), optimizer state and
BatchNorm statistics, and its own run folder, written by the same functions as ``train``'s
(``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` in ``train``'s format, ``grad-norms.f32``,
``result.json``). So a packed run resumes alone or packed, and results, labs and grader cannot
tell. Packing changes only the order of floating-point sums inside kernels.

A run leaves the pack when it diverges (recorded ``diverged`` at the end of the epoch, like
``train``), finishes, or is stopped by a callback; the others go on in a pack rebuilt from their
unpacked weights (a copy: nothing about them changes).

On CUDA, full batches run as a captured CUDA graph of the whole step (forward, backward,
gradient norms, update; :class:`StepGraph`) after a few eager warm-up steps; the last, partial
batch of an epoch runs eagerly. A small-batch step is otherwise bound by kernel launches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit import data as lk_data
from labkit import models as lk_models
from labkit import schedules as lk_schedules
from labkit import store
from labkit.pack import PACKABLE_OPTIMIZERS, Pack, PackedMomentum, pack_models
from labkit.precision import autocast_dtype, strict_fp32
from labkit.train import (
    Callback,
    ResolvedConfig,
    RunResult,
    RunState,
    TrainConfig,
    check_run_folder,
    epoch_images,
    epoch_row,
    finish_run,
    make_optimizer,
    open_run_folder,
    prepare_data,
    resolve_device,
    rng_state,
    run_dtypes,
    save_epoch,
)

__all__ = ["CPU_PACK_MAX_BATCH", "CPU_PACK_SIZE", "GRAPH_WARMUP_STEPS", "MAX_PACK_SIZE",
           "StepGraph", "choose_pack_size", "pack_key", "train_pack"]

#: Runs per pack on the CPU: at b = 8 a CPU step of the smoke profile's tiny CNN is dominated
#: by per-operation overhead, which a pack of 8 shares (benchmarks/bench_pack.py: about 3x).
CPU_PACK_SIZE = 8
#: The largest batch size at which the CPU packs runs: there the convolutions themselves
#: dominate, and oneDNN's grouped convolutions are no faster than K separate ones
#: (bench_pack.py on 2 cores: 3.1x at b = 8, 1.2x at b = 16, 0.9x at b = 32 and 64).
CPU_PACK_MAX_BATCH = 16
#: The largest pack on a GPU, whatever its memory.
MAX_PACK_SIZE = 32
#: The share of the GPU's free memory that packs may fill.
GPU_MEMORY_SHARE = 0.6

#: Eager steps before a CUDA graph of the step is captured (cuDNN picks its algorithms and
#: the autograd state settles on a side stream, as PyTorch's graph documentation asks).
GRAPH_WARMUP_STEPS = 3

# The fields that must agree for runs to share a step (besides the optimizer family).
_SHARED_FIELDS = ("dataset", "model", "profile", "data_root", "device", "precision",
                  "channels_last", "compile", "batch_size", "batch_schedule", "epochs")


def pack_key(config: TrainConfig) -> tuple | None:
    """Runs with equal keys can be trained as one pack; None for a run that does not pack
    (an optimizer other than SGD, SHB and NSHB)."""
    cfg = config.resolved()
    if cfg.optimizer not in PACKABLE_OPTIMIZERS:
        return None
    key = []
    for name in _SHARED_FIELDS:
        v = getattr(cfg, name)
        key.append(repr(sorted(v.items())) if isinstance(v, dict) else v)
    return tuple(key)


def choose_pack_size(config: TrainConfig, data: lk_data.CifarData | None, n_runs: int) -> int:
    """How many runs like ``config`` to train per pack, at most ``n_runs``.

    On the CPU :data:`CPU_PACK_SIZE`, or 1 (no packing) when the run's batch size exceeds
    :data:`CPU_PACK_MAX_BATCH`. On CUDA the memory of one run is measured (the peak of
    one training step at the run's largest batch size, plus its weights, optimizer state and
    an epoch of augmented images) and K runs fill at most :data:`GPU_MEMORY_SHARE` of the
    free memory (at most :data:`MAX_PACK_SIZE`).
    """
    cfg = config.resolved()
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        b = max(lk_schedules.batch_sizes(cfg.batch_schedule, cfg.batch_size, cfg.epochs))
        return 1 if b > CPU_PACK_MAX_BATCH else max(1, min(n_runs, CPU_PACK_SIZE))
    per_run = run_memory(cfg, data if data is not None else prepare_data(cfg, device), device)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n_runs, MAX_PACK_SIZE, int(GPU_MEMORY_SHARE * free // per_run)))


def run_memory(cfg: ResolvedConfig, data: lk_data.CifarData, device: torch.device) -> int:
    """Bytes of device memory one run of a pack needs (measured on CUDA with one step)."""
    param_dtype, in_dtype = run_dtypes(cfg, device)
    b = max(lk_schedules.batch_sizes(cfg.batch_schedule, cfg.batch_size, cfg.epochs))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = lk_models.build_model(cfg.model, data.num_classes,
                                  in_channels=int(data.train_x.shape[1]))
    model = model.to(device, param_dtype)
    pack = pack_models([model])
    opt = PackedMomentum(pack, ["shb"], [0.9], [0.0])
    amp = autocast_dtype(cfg.precision, device)
    x = torch.zeros(b, *data.train_x.shape[1:], device=device, dtype=in_dtype)
    y = torch.zeros(b, 1, device=device, dtype=torch.long)
    with torch.autocast(device_type=device.type, dtype=amp or torch.bfloat16,
                        enabled=amp is not None):
        loss, _ = _loss_and_correct(_as_loss_dtype(pack(x)), y, "mean")
    loss.sum().backward()
    opt.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model, pack, opt, x, y, loss
    torch.cuda.empty_cache()
    images = data.train_x.numel() * in_dtype.itemsize  # an epoch, normalized
    return int(peak + weights + images)


@dataclass(eq=False)
class _Run:
    """One run of a pack: its config, folder, single model and optimizer (to unpack into),
    generator and progress."""

    cfg: ResolvedConfig
    index: int
    out: Path | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    torch_rng: Tensor  # the global torch RNG right after its model was initialized
    state: RunState
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    log_norms: bool = False
    stopped: bool = False


def _loss_and_correct(logits: Tensor, y: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """Per-run cross-entropy ('mean' or 'sum' over the batch) and number correct, both (K,).

    ``logits``: (N, K, classes) in the run's loss dtype; ``y``: (N, K) labels."""
    losses = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none")  # (N, K)
    loss = losses.mean(0) if reduction == "mean" else losses.sum(0)
    return loss, (logits.detach().argmax(2) == y).sum(0)


def _as_loss_dtype(out: Tensor) -> Tensor:
    return out.double() if out.dtype == torch.float64 else out.float()


class StepGraph:
    """A CUDA graph of one packed training step at a fixed batch shape.

    ``step(x, y)`` copies the batch into static buffers and replays the graph; the returned
    tensors (per-run loss, number correct, gradient norm) are static and overwritten by the
    next replay. The graph updates the pack's weights, BatchNorm statistics and momentum
    buffers in place; learning rates are read from :class:`PackedMomentum`'s tensors, so they
    may change between replays.
    """

    def __init__(self, step_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
                 optimizer: PackedMomentum, x: Tensor, y: Tensor) -> None:
        self.static_x = x.clone()
        self.static_y = y.clone()
        optimizer.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step_fn(self.static_x, self.static_y)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.outputs


def train_pack(
    configs: Sequence[TrainConfig],
    callbacks: Sequence[Callback] = (),
    *,
    progress: bool = True,
    data: lk_data.CifarData | None = None,
    graphs: bool | None = None,
) -> list[RunResult]:
    """Train runs that share model, data set, batch-size schedule and epochs as one pack.

    Args:
        configs: the runs; :func:`pack_key` must be equal (and not None) for all of them.
        callbacks: :class:`~labkit.train.Callback` objects; each hook is called per run with
            that run's :class:`~labkit.train.RunState` (whose ``model`` and ``optimizer`` are
            its single model and optimizer, updated at each epoch's end).
        progress: one ``tqdm.auto`` bar over the pack's epochs.
        data: the data set already on the device.
        graphs: capture full-batch steps in a CUDA graph; None means on CUDA without
            ``compile``.

    Returns:
        One :class:`~labkit.train.RunResult` per config, in order, as :func:`~labkit.train.train`
        would return it (finished runs in their folders are loaded, not trained).

    Raises:
        ValueError: the configs do not pack together, or what :func:`~labkit.train.train`
            raises for a config.
    """
    cfgs = [c.resolved() for c in configs]
    if not cfgs:
        raise ValueError("train_pack needs at least one config")
    keys = {pack_key(c) for c in cfgs}
    if None in keys or len(keys) > 1:
        raise ValueError(
            "these runs do not pack together: all must use " + "/".join(PACKABLE_OPTIMIZERS)
            + " and share " + ", ".join(_SHARED_FIELDS)
        )
    # Each run's folder is locked for the whole pack, as train() locks it for one run.
    with ExitStack() as locks:
        for cfg in cfgs:
            if cfg.out:
                locks.enter_context(store.writing(cfg.out, "a run"))
                store.clean_temporary_files(cfg.out)
        return _train_pack(cfgs, callbacks, progress, data, graphs)


def _train_pack(
    cfgs: list[ResolvedConfig],
    callbacks: Sequence[Callback],
    progress: bool,
    data: lk_data.CifarData | None,
    graphs: bool | None,
) -> list[RunResult]:
    """:func:`train_pack` of resolved configs, holding every run folder's writer lock."""
    results: list[RunResult | None] = [None] * len(cfgs)
    todo = []
    for i, cfg in enumerate(cfgs):
        out = Path(cfg.out) if cfg.out else None
        stored = check_run_folder(out, cfg) if out is not None else None
        if stored is not None:
            results[i] = stored
        else:
            todo.append(i)
    if not todo:
        return results  # type: ignore[return-value]

    base = cfgs[todo[0]]
    device = resolve_device(base.device)
    data = prepare_data(base, device) if data is None else data.to(device)
    n_train = int(data.train_x.shape[0])
    max_b = max(lk_schedules.batch_sizes(base.batch_schedule, base.batch_size, base.epochs))
    if max_b > n_train:
        raise ValueError(
            f"batch_size {max_b} (the largest of the run's batch-size schedule) exceeds the "
            f"{n_train} training images of {base.dataset}; use a batch size <= {n_train}"
        )
    param_dtype, _ = run_dtypes(base, device)
    runs = []
    for i in todo:
        cfg = cfgs[i]
        torch.manual_seed(cfg.seed)
        model = lk_models.build_model(cfg.model, data.num_classes,
                                      in_channels=int(data.train_x.shape[1]))
        model = model.to(device, param_dtype)
        torch_rng = torch.get_rng_state()
        optimizer = make_optimizer(cfg, model.parameters())
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
        out = Path(cfg.out) if cfg.out else None
        run = _Run(cfg, i, out, model, optimizer, gen, torch_rng,
                   RunState(cfg, model, optimizer, device, n_train))
        if out is not None:
            run.metrics, run.state.step = open_run_folder(out, cfg, model, optimizer, gen, device,
                                                          autocast_dtype(cfg.precision, device))
            run.resumed_from = len(run.metrics)
            run.log_norms = cfg.track_grad_norm and store.keep_grad_norms(out, run.state.step)
        run.state.metrics = run.metrics
        run.state.epoch = len(run.metrics)
        runs.append(run)

    # Runs resumed from different epochs train as separate packs (a step is one epoch's).
    for start in sorted({len(r.metrics) for r in runs}):
        group = [r for r in runs if len(r.metrics) == start]
        _train_group(group, callbacks, progress, data, device, graphs, results)
    return results  # type: ignore[return-value]


def _build(group: list[_Run], device: torch.device, channels_last: bool,
           buffers: list[dict[str, Tensor | None]] | None) -> tuple[Pack, PackedMomentum]:
    pack = pack_models([r.model for r in group])
    if channels_last:
        pack = pack.to(memory_format=torch.channels_last)
    # The hyperparameters each run's own optimizer was built with (defaults filled in).
    groups = [r.optimizer.param_groups[0] for r in group]
    opt = PackedMomentum(pack, [r.cfg.optimizer for r in group],
                         [float(g.get("beta", 0.0)) for g in groups],
                         [float(g["weight_decay"]) for g in groups])
    if buffers is None:
        buffers = [_single_buffers(r) for r in group]
    opt.load_buffers(buffers)
    return pack, opt


def _single_buffers(run: _Run) -> dict[str, Tensor | None]:
    """A run's momentum buffers by parameter name, from its single optimizer's state."""
    out: dict[str, Tensor | None] = {}
    for name, p in run.model.named_parameters():
        out[name] = run.optimizer.state.get(p, {}).get("momentum_buffer")
    return out


@torch.no_grad()
def _unpack(pack: Pack, opt: PackedMomentum, k: int, run: _Run, lr: float) -> None:
    """Copy slot k into the run's single model and optimizer (weights, buffers, lr)."""
    pack.unpack_into(k, run.model)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    if run.cfg.optimizer == "sgd":
        return
    bufs = opt.slot_buffers(k)
    for name, p in run.model.named_parameters():
        run.optimizer.state[p]["momentum_buffer"] = bufs[name].clone()


def _train_group(
    group: list[_Run],
    callbacks: Sequence[Callback],
    progress: bool,
    data: lk_data.CifarData,
    device: torch.device,
    graphs: bool | None,
    results: list[RunResult | None],
) -> None:
    base = group[0].cfg
    use_cuda = device.type == "cuda"
    # channels_last=None: channels-last on the CPU too, unlike train(): oneDNN's grouped
    # convolutions are faster in it (benchmarks/bench_pack.py), and only sums' order changes.
    channels_last = True if base.channels_last is None else base.channels_last
    amp_dtype = autocast_dtype(base.precision, device)
    autocast = {"device_type": device.type, "dtype": amp_dtype or torch.bfloat16,
                "enabled": amp_dtype is not None}
    _, in_dtype = run_dtypes(base, device)
    use_graphs = (use_cuda and not base.compile) if graphs is None else graphs
    if use_graphs and not use_cuda:
        raise ValueError("graphs=True needs a CUDA device; this pack runs on the CPU")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    n_train = int(data.train_x.shape[0])
    test_y = data.test_y
    test_x = lk_data.normalize(data.test_x, data.mean, data.std, dtype=in_dtype)
    n_test = int(test_y.shape[0])

    active = list(group)
    for run in active:
        for cb in callbacks:
            cb.on_run_start(run.state)
    pack, opt = _build(active, device, channels_last, None)
    forward: Callable[[Tensor], Tensor] = torch.compile(pack) if base.compile else pack
    step_cbs = [cb for cb in callbacks if cb.step_interval > 0]

    def step_fn(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(**autocast, cache_enabled=not use_graphs):
            logits = _as_loss_dtype(forward(xb))
            loss, correct = _loss_and_correct(logits, yb, "mean")
        loss.sum().backward()
        norms = opt.grad_norms()
        opt.step()
        return loss.detach(), correct, norms

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=base.epochs, initial=len(group[0].metrics),
                   desc=f"pack of {len(group)}", unit="epoch", leave=False)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = use_cuda or cudnn_benchmark
    settings = ExitStack()
    graph: StepGraph | None = None
    warm = 0
    try:
        if amp_dtype is None:
            settings.enter_context(strict_fp32())
        for epoch in range(len(group[0].metrics), base.epochs):
            if not active:
                break
            t0 = time.perf_counter()
            k = len(active)
            b = lk_schedules.batch_size_at(base.batch_schedule, base.batch_size, epoch,
                                           base.epochs)
            lrs = [r.cfg.lr * lk_schedules.lr_at(r.cfg.lr_schedule, 1.0, epoch, base.epochs)
                   for r in active]
            opt.set_lrs(lrs)
            steps_per_epoch = math.ceil(n_train / b)
            for run, lr in zip(active, lrs, strict=True):
                run.state.epoch, run.state.lr, run.state.batch_size = epoch, lr, b
                run.state.steps_per_epoch = steps_per_epoch
            # Each run draws its epoch exactly as train() does: augmentation, then the order;
            # the images are normalized once per epoch, as in train().
            images = torch.stack([
                lk_data.normalize(epoch_images(r.cfg, data.train_x, r.gen), data.mean,
                                  data.std, dtype=in_dtype)
                for r in active])
            order = torch.stack([torch.cat(list(lk_data.iterate_batches(n_train, b, r.gen)))
                                 for r in active])  # (K, n_train)
            slots = torch.arange(k, device=device).unsqueeze(1)
            pack.train()
            loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
            correct_sum = torch.zeros(k, device=device, dtype=torch.int64)
            gnorm_sum = torch.zeros(k, device=device, dtype=torch.float64)
            step_norms = torch.empty(k, steps_per_epoch, device=device)
            if graph is not None and graph.static_x.shape[0] != b:
                graph, warm = None, 0
            steps = 0
            for s in range(steps_per_epoch):
                idx = order[:, s * b:(s + 1) * b]  # (K, B)
                nb = idx.shape[1]
                xb = images[slots, idx].transpose(0, 1)  # (B, K, C, H, W)
                xb = xb.reshape(nb, -1, *xb.shape[-2:]).contiguous(memory_format=memory_format)
                yb = data.train_y[idx].t()  # (B, K)
                if use_graphs and nb == b and graph is not None:
                    loss, correct, norms = graph.step(xb, yb)
                elif use_graphs and nb == b and warm >= GRAPH_WARMUP_STEPS:
                    graph = StepGraph(step_fn, opt, xb, yb)
                    loss, correct, norms = graph.step(xb, yb)
                elif use_graphs and nb == b:
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        opt.zero_grad()
                        loss, correct, norms = step_fn(xb, yb)
                    torch.cuda.current_stream(device).wait_stream(side)
                    warm += 1
                else:
                    opt.zero_grad()
                    loss, correct, norms = step_fn(xb, yb)
                loss_sum += loss.double() * nb
                correct_sum += correct
                gnorm_sum += norms.double()
                step_norms[:, s] = norms
                steps += 1
                for j, run in enumerate(active):
                    run.state.step += 1
                    if not step_cbs or run.stopped:
                        continue
                    run.state.loss, run.state.grad_norm = loss[j], norms[j]
                    for cb in step_cbs:
                        if run.state.step % cb.step_interval == 0:
                            cb.on_step(run.state)
                    # A run stopped inside an epoch keeps its last checkpoint: what it
                    # computes until the pack is rebuilt is thrown away.
                    run.stopped = run.stopped or (run.state.stop and s + 1 < steps_per_epoch)
                if all(r.stopped for r in active):
                    break

            leaving: list[_Run] = []
            if steps == steps_per_epoch:
                test_loss, test_correct = _evaluate_pack(pack, test_x, test_y, autocast)
                sums = torch.stack([loss_sum, correct_sum.double(), test_loss,
                                    test_correct.double(), gnorm_sum]).t().tolist()
                norms_host = step_norms.cpu().numpy()
                seconds = time.perf_counter() - t0
            for j, run in enumerate(active):
                if run.stopped:
                    leaving.append(run)
                    results[run.index] = _end(run, "stopped", callbacks)
                    continue
                row = epoch_row(run.cfg, epoch, sums[j], n_train, n_test, lrs[j], b, steps,
                                run.state.step, seconds)
                run.metrics.append(row)
                _unpack(pack, opt, j, run, lrs[j])
                if run.out is not None:
                    rng = rng_state(run.gen, device)
                    rng["torch"] = run.torch_rng
                    save_epoch(run.out, run.cfg, row, run.metrics, run.model.state_dict(),
                               run.optimizer.state_dict(), rng,
                               np.ascontiguousarray(norms_host[j]) if run.log_norms else None,
                               amp_dtype)
                for cb in callbacks:
                    cb.on_epoch_end(run.state, row)
                status = None
                if row.get("diverged"):
                    status = "diverged"
                elif epoch + 1 == base.epochs:
                    status = "finished"
                elif run.state.stop:
                    status = "stopped"
                if status is not None:
                    leaving.append(run)
                    results[run.index] = _end(run, status, callbacks)
            if bar is not None:
                bar.update(1)
            if leaving:  # the others were unpacked above: rebuild the pack from them
                active = [r for r in active if r not in leaving]
                if active:
                    pack, opt = _build(active, device, channels_last, None)
                    forward = torch.compile(pack) if base.compile else pack
                graph, warm = None, 0
    finally:
        settings.close()
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if bar is not None:
            bar.close()
    for run in active:  # only when the loop ended early (all stopped): nothing left to train
        if results[run.index] is None:
            results[run.index] = _end(run, "stopped", callbacks)


def _end(run: _Run, status: str, callbacks: Sequence[Callback]) -> RunResult:
    result = finish_run(run.cfg, status, run.metrics, run.out, run.resumed_from)
    for cb in callbacks:
        cb.on_run_end(run.state, result)
    return result


def _evaluate_pack(
    pack: Pack, x: Tensor, y: Tensor, autocast: dict[str, Any], batch_size: int = 1000
) -> tuple[Tensor, Tensor]:
    """Each run's summed test loss and number correct, (K,) device tensors (no host sync)."""
    pack.eval()
    k = pack.k
    loss_sum = torch.zeros(k, device=x.device, dtype=torch.float64)
    correct = torch.zeros(k, device=x.device, dtype=torch.int64)
    fmt = (torch.channels_last if next(pack.parameters()).is_contiguous(
        memory_format=torch.channels_last) and not next(pack.parameters()).is_contiguous()
        else torch.contiguous_format)
    with torch.no_grad(), torch.autocast(**autocast):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            n = xb.shape[0]
            xb = xb.unsqueeze(1).expand(n, k, *xb.shape[1:]).reshape(n, -1, *xb.shape[-2:])
            logits = _as_loss_dtype(pack(xb.contiguous(memory_format=fmt)))
            yb = y[i:i + batch_size].unsqueeze(1).expand(n, k)
            loss, hits = _loss_and_correct(logits, yb, "sum")
            loss_sum += loss.double()
            correct += hits
    return loss_sum, correct
