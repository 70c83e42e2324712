"""Packed runs: K runs of one network trained as one model, each run exactly itself.

Book: no equation of its own. It makes the grids of chapters 4, 7 and 8 (many runs of one model on
one data set with one batch size, differing in optimizer, learning rate, momentum, schedule or
seed) cheap: on a GPU a small-batch step is launch-bound, and a pack runs K steps in the kernels
of one.

The scheme is block-diagonal widening, with grouped convolutions:

* a convolution of the K runs is one convolution whose weights are the runs' weights stacked
  along the output channels, with ``groups = K`` (run k's outputs see only run k's inputs);
* BatchNorm over the K*C channels: its statistics are per channel, hence per run;
* the linear head is a batched matrix product over the K runs;
* the option-A shortcut of the CIFAR ResNets (He et al. 2016) pads each run's channels;
* ReLU, pooling and the global average pool act per channel and need no change.

A packed input holds run k's own mini-batch (its own data order and augmentation) in channels
3k..3k+2, so every example of the batch dimension is a different image for each run. Forward and
backward passes are then those of the K runs side by side; only the order of floating-point
sums inside kernels differs (in float64, packed and single runs agree to about 1e-12 after
dozens of steps: ``tests/test_pack.py``). We chose this over ``torch.func.vmap`` of stacked
weights because grouped convolutions are single cuDNN/oneDNN kernels, BatchNorm in train mode
needs no special handling, and a pack is an ordinary ``nn.Module`` that CUDA graphs capture.

:func:`pack_models` builds a :class:`Pack` from K single models (each built with its own seed);
:meth:`Pack.unpack_into` copies a run's weights back into a single model, so checkpoints of
packed runs are those of :func:`labkit.train.train`. :class:`PackedMomentum` is the one update
of SGD, SHB and NSHB (:mod:`labkit.optim`) for all runs, with per-run coefficients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.models import ShortcutA

__all__ = [
    "PACKABLE_OPTIMIZERS",
    "Pack",
    "PackedConv2d",
    "PackedLinear",
    "PackedMomentum",
    "PackedShortcutA",
    "pack_models",
]

#: Optimizers that pack together (one update with per-run lr, beta and weight decay). The
#: adaptive methods of chapter 4 are not packed: their runs train one at a time.
PACKABLE_OPTIMIZERS = ("sgd", "shb", "nshb")

# How a run's tensor sits in the packed tensor: "cat" along dim 0 (convolutions, BatchNorm),
# "stack" as a new dim 0 (the linear head), "shared" (one value for all runs).
_CAT, _STACK, _SHARED = "cat", "stack", "shared"


class PackedConv2d(nn.Module):
    """K ``nn.Conv2d`` of equal shape as one grouped convolution.

    Input (N, K*C_in, H, W), run-major channels; output (N, K*C_out, H', W').
    """

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        if c.padding_mode != "zeros":
            raise ValueError(f"packing supports zero padding only; got {c.padding_mode!r}")
        self.k = len(convs)
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.groups = c.groups * self.k
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in convs]))
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in convs]))
                     if c.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class PackedLinear(nn.Module):
    """K ``nn.Linear`` of equal shape as one batched matrix product.

    Input (N, K*in) or (N, K, in); output (N, K, out). Weight (K, out, in), bias (K, out).
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k = len(linears)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in linears]))
                     if linears[0].bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.k, -1).transpose(0, 1)  # (K, N, in)
        w = self.weight.transpose(1, 2)
        out = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, w)
        return out.transpose(0, 1)


class PackedShortcutA(nn.Module):
    """K option-A shortcuts (:class:`labkit.models.ShortcutA`): subsample, then pad each run's
    channels with zeros."""

    def __init__(self, shortcut: ShortcutA, k: int) -> None:
        super().__init__()
        self.k = k
        self.pad_before, self.pad_after = shortcut.pad_before, shortcut.pad_after

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., ::2, ::2]
        n, _, h, w = x.shape
        x = x.reshape(n, self.k, -1, h, w)
        x = F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))
        return x.reshape(n, -1, h, w)


def _packed_batchnorm(bns: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b = bns[0]
    ref = b.running_mean if b.running_mean is not None else b.weight
    out = nn.BatchNorm2d(len(bns) * b.num_features, eps=b.eps, momentum=b.momentum,
                         affine=b.affine, track_running_stats=b.track_running_stats,
                         device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, t in out.named_parameters(recurse=False):
            t.copy_(torch.cat([getattr(m, name).detach() for m in bns]))
        for name in ("running_mean", "running_var"):
            if getattr(out, name) is not None:
                getattr(out, name).copy_(torch.cat([getattr(m, name) for m in bns]))
        if out.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(b.num_batches_tracked)
    return out


# Leaf modules that act per channel (or elementwise) and so need no change in a pack.
_PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.AdaptiveAvgPool2d,
                nn.Flatten)


class Pack(nn.Module):
    """K runs of one architecture as one model: ``pack(x)`` maps (N, K*3, H, W) to logits
    (N, K, classes).

    Build with :func:`pack_models`. ``names`` lists the single model's ``state_dict`` keys, all
    of which the pack holds under the same names (run k's part: :meth:`slot`).
    """

    def __init__(self, net: nn.Module, k: int, shapes: dict[str, torch.Size],
                 modes: dict[str, str], template: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.k = k
        self.shapes = shapes
        self.modes = modes
        # A single model of the architecture (on the CPU), to unpack runs into.
        self.template = [template]  # in a list: not a submodule

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def slot(self, name: str, tensor: Tensor, k: int) -> Tensor:
        """Run k's part of ``tensor``, a tensor shaped like the packed ``name`` (a parameter,
        a buffer, or an optimizer state of that parameter), as a view."""
        if self.modes[name] == _SHARED:
            return tensor
        return tensor.view(self.k, *self.shapes[name])[k]

    def join(self, name: str, tensors: Sequence[Tensor]) -> Tensor:
        """The packed tensor ``name`` made of one single-run tensor per run."""
        mode = self.modes[name]
        if mode == _SHARED:
            return tensors[0].clone()
        return torch.cat(list(tensors)) if mode == _CAT else torch.stack(list(tensors))

    def tensors(self) -> dict[str, Tensor]:
        """Packed parameters and buffers by single-model ``state_dict`` name."""
        return {n[len("net."):]: t for n, t in self.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def unpack_into(self, k: int, model: nn.Module) -> nn.Module:
        """Copy run k's weights and buffers into ``model`` (a single model of the
        architecture) and return it."""
        own = self.tensors()
        for name, t in model.state_dict(keep_vars=True).items():
            t.copy_(self.slot(name, own[name].detach(), k))
        return model

    @torch.no_grad()
    def load_slot(self, k: int, model: nn.Module) -> None:
        """Copy a single model's weights and buffers into run k's slot."""
        own = self.tensors()
        for name, t in model.state_dict(keep_vars=True).items():
            self.slot(name, own[name].detach(), k).copy_(t.detach())


def _modes_and_net(template: nn.Module, models: Sequence[nn.Module]) -> tuple[nn.Module, dict]:
    k = len(models)
    net = copy.deepcopy(template)
    modes: dict[str, str] = {}
    named = [dict(m.named_modules()) for m in models]
    for name, module in list(template.named_modules()):
        if name == "" or list(module.children()):
            if name and any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"cannot pack module {name!r}: a container with parameters")
            continue
        group = [n[name] for n in named]
        if isinstance(module, nn.Conv2d):
            new: nn.Module = PackedConv2d(group)
            kinds = {"weight": _CAT, "bias": _CAT}
        elif isinstance(module, nn.BatchNorm2d):
            new = _packed_batchnorm(group)
            kinds = {"weight": _CAT, "bias": _CAT, "running_mean": _CAT, "running_var": _CAT,
                     "num_batches_tracked": _SHARED}
        elif isinstance(module, nn.Linear):
            new = PackedLinear(group)
            kinds = {"weight": _STACK, "bias": _STACK}
        elif isinstance(module, ShortcutA):
            new, kinds = PackedShortcutA(module, k), {}
        elif isinstance(module, (*_PER_CHANNEL, nn.Sequential)):  # an empty Sequential: identity
            continue
        else:
            raise ValueError(
                f"cannot pack module {name!r} of type {type(module).__name__}; packable: "
                "Conv2d, BatchNorm2d, Linear, ShortcutA and per-channel layers"
            )
        for tname, _ in new.state_dict(keep_vars=True).items():
            modes[f"{name}.{tname}"] = kinds[tname]
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, new)
    return net, modes


def pack_models(models: Sequence[nn.Module]) -> Pack:
    """A :class:`Pack` of ``models`` (K >= 1 single models of one architecture, same device,
    dtype and mode): run k's weights and buffers are ``models[k]``'s, copied.

    Raises:
        ValueError: the models differ in architecture, or hold a layer packing does not know.
    """
    if not models:
        raise ValueError("pack_models needs at least one model")
    shapes0 = {n: t.shape for n, t in models[0].state_dict().items()}
    for i, m in enumerate(models[1:], 1):
        if {n: t.shape for n, t in m.state_dict().items()} != shapes0:
            raise ValueError(f"models[{i}] has another architecture than models[0]")
    template = copy.deepcopy(models[0]).cpu()
    net, modes = _modes_and_net(models[0], models)
    missing = sorted(set(shapes0) - set(modes))
    if missing:
        raise ValueError(f"cannot pack the tensors {', '.join(missing)}")
    pack = Pack(net, len(models), shapes0, modes, template)
    pack.train(models[0].training)
    first = next(models[0].parameters())
    fmt = (torch.channels_last if first.dim() == 4
           and first.is_contiguous(memory_format=torch.channels_last)
           and not first.is_contiguous() else torch.contiguous_format)
    return pack.to(device=first.device, memory_format=fmt)


class PackedMomentum:
    """SGD, SHB and NSHB (:mod:`labkit.optim`) of the K runs of a pack in one update.

    With per-run learning rate lr_k, momentum beta_k, dampening c_k and weight decay wd_k (each a
    tensor broadcast over run k's rows), for every parameter::

        g   <- g + wd_k x          (only when some run has weight decay; wd_k = 0 adds 0)
        buf <- beta_k buf + c_k g  (SHB: c = 1; NSHB: c = 1 - beta; SGD: beta = 0, c = 1)
        x   <- x - lr_k buf

    which is run k's own update: SHB's m_t = g_t + beta m_{t-1}, NSHB's d_t = (1 - beta) g_t +
    beta d_{t-1} and SGD's x - lr g (there buf = g exactly). The coefficient tensors stay in
    place (:meth:`set_lrs` copies into them), so a CUDA graph of the step sees new learning
    rates.
    """

    def __init__(self, pack: Pack, kinds: Sequence[str], betas: Sequence[float],
                 weight_decays: Sequence[float]) -> None:
        bad = [kd for kd in kinds if kd not in PACKABLE_OPTIMIZERS]
        if bad:
            raise ValueError(f"optimizer {bad[0]!r} does not pack; packable: "
                             f"{', '.join(PACKABLE_OPTIMIZERS)}")
        self.pack = pack
        self.named = [(n[len("net."):], p) for n, p in pack.named_parameters()]
        self.params = [p for _, p in self.named]
        first = self.params[0]
        opts = {"device": first.device, "dtype": first.dtype}
        beta = [0.0 if kd == "sgd" else float(b) for kd, b in zip(kinds, betas, strict=True)]
        damp = [1.0 - b if kd == "nshb" else 1.0 for kd, b in zip(kinds, beta, strict=True)]
        self.use_wd = any(w != 0 for w in weight_decays)
        self._lr = torch.zeros(pack.k, **opts)
        self._beta = torch.tensor(beta, **opts)
        self._damp = torch.tensor(damp, **opts)
        self._wd = torch.tensor([float(w) for w in weight_decays], **opts)
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format)
                        for p in self.params]
        # Per parameter, the coefficients repeated over its rows, shaped (K*rows, 1, ...).
        self._rows = [self.pack.shapes[name][0] if self.pack.modes[name] == _CAT else 1
                      for name, _ in self.named]
        self._coef = [self._spread(p, rows) for (_, p), rows in zip(self.named, self._rows,
                                                                     strict=True)]

    def _spread(self, p: Tensor, rows: int) -> dict[str, Tensor]:
        bshape = (p.shape[0],) + (1,) * (p.dim() - 1)
        out = {}
        for key, t in (("beta", self._beta), ("damp", self._damp), ("wd", self._wd)):
            out[key] = t.repeat_interleave(rows).view(bshape)
        out["neg_lr"] = torch.zeros(bshape, device=p.device, dtype=p.dtype)
        return out

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Set each run's learning rate (in place)."""
        self._lr.copy_(torch.tensor([float(v) for v in lrs], dtype=self._lr.dtype))
        for c, rows in zip(self._coef, self._rows, strict=True):
            c["neg_lr"].copy_((-self._lr).repeat_interleave(rows).view_as(c["neg_lr"]))

    @torch.no_grad()
    def step(self) -> None:
        for p, buf, c in zip(self.params, self.buffers, self._coef, strict=True):
            g = p.grad
            if g is None:
                continue
            if self.use_wd:
                g = g.addcmul(p, c["wd"])
            buf.mul_(c["beta"]).addcmul_(g, c["damp"])
            p.addcmul_(buf, c["neg_lr"])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def grad_norms(self) -> Tensor:
        """Each run's gradient norm over all its parameters, shape (K,)."""
        per_param = []
        for name, p in self.named:
            if p.grad is None:
                continue
            g = p.grad.view(self.pack.k, *self.pack.shapes[name])
            per_param.append(torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim()))))
        return torch.linalg.vector_norm(torch.stack(per_param), dim=0)

    def slot_buffers(self, k: int) -> dict[str, Tensor]:
        """Run k's momentum buffers by parameter name (views)."""
        return {name: self.pack.slot(name, b, k)
                for (name, _), b in zip(self.named, self.buffers, strict=True)}

    @torch.no_grad()
    def load_buffers(self, per_run: Sequence[dict[str, Tensor | None]]) -> None:
        """Set the buffers from one dict name -> buffer (None: zeros) per run."""
        for (name, p), buf in zip(self.named, self.buffers, strict=True):
            parts = [(d.get(name) if d.get(name) is not None
                      else torch.zeros(self.pack.shapes[name], dtype=p.dtype, device=p.device))
                     for d in per_run]
            buf.copy_(self.pack.join(name, [t.to(p.device, p.dtype) for t in parts]))
