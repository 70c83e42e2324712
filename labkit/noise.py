"""Stochastic-gradient variance, search-direction noise and the smoothing degree it implies.

Book: chapter 6 (SGD noise as smoothing, delta = eta C / sqrt(b)) and chapter 8 (search-direction
noise of SHB and NSHB), following Sato & Iiduka (2024), "Role of momentum in smoothing objective
function and generalizability of deep neural networks", arXiv:2402.02325.

Notation (Sato & Iiduka (2024), §2.1-2.4). The empirical loss is f(x) = (1/n) sum_i f_i(x). A
mini-batch
gradient over b examples is grad f_S(x) = (1/b) sum_{i in S} grad f_i(x). The constants are

* C^2: the stochastic-gradient variance, E_xi ||G_xi(x_t) - grad f(x_t)||^2 <= C^2
  (assumption (A2)(ii)); with G_xi = grad f_i for a uniformly drawn example,
  C^2(x) = (1/n) sum_i ||grad f_i(x) - grad f(x)||^2 (:func:`gradient_variance`).
* K^2: a bound on E ||grad f(x_t)||^2 along the run (assumption (A4), :func:`k2_estimate`).

The search-direction noise (Sato & Iiduka (2024), §2.4) is the gap between the direction an
optimizer steps
along and the full gradient at the same point x_t:

* SGD:  omega_t = grad f_S(x_t) - grad f(x_t)   (identical to the gradient noise),
* SHB:  omega_t = m_t - grad f(x_t),  m_t = grad f_S(x_t) + beta m_{t-1},
* NSHB: omega_t = d_t - grad f(x_t),  d_t = (1 - beta) grad f_S(x_t) + beta d_{t-1},

with m_{-1} = d_{-1} = 0 (:class:`DirectionNoiseTracker`). Bounding E||omega_t|| (Theorems 3.1
and 3.2) and treating omega_t as Gaussian gives the smoothing degrees delta of eqs. (12)-(14)
(:func:`delta_sgd`, :func:`delta_shb`, :func:`delta_nshb`, :func:`smoothing_degree`,
:func:`momentum_factor`). Those formulas live in the torch-free :mod:`labkit.critical` and are
re-exported here.

The measurements (:func:`full_gradient`, :func:`gradient_variance`, :func:`k2_estimate`) run
in IEEE fp32 or better, with TF32 off on CUDA (:func:`labkit.precision.strict_fp32`).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from labkit.critical import (
    OPTIMIZERS,
    delta_nshb,
    delta_sgd,
    delta_shb,
    momentum_factor,
    smoothing_degree,
)
from labkit.precision import strict_fp32

__all__ = [
    "OPTIMIZERS",
    "DirectionNoiseTracker",
    "GradientStats",
    "NoiseRecord",
    "delta_nshb",
    "delta_sgd",
    "delta_shb",
    "direction_noise",
    "full_gradient",
    "gradient_variance",
    "k2_estimate",
    "momentum_factor",
    "smoothing_degree",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Data = tuple[Tensor, Tensor] | Iterable[Sequence[Tensor]]
ParamSpec = Iterable[str | Tensor] | None


# ---------------------------------------------------------------------------------------------
# Data, parameter and mode plumbing
# ---------------------------------------------------------------------------------------------


def _is_pair(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], Tensor)
        and isinstance(obj[1], Tensor)
    )


def _batches(data: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, targets) pairs from one pair or an iterable of pairs."""
    if _is_pair(data):
        items: Iterable[Any] = [data]
    elif isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an (inputs, targets) pair of tensors or an iterable of such pairs, "
            f"got {type(data).__name__}"
        )
    else:
        items = data
    for k, batch in enumerate(items):
        if not _is_pair(batch):
            raise TypeError(
                f"data batch {k} must be an (inputs, targets) pair of tensors, "
                f"got {type(batch).__name__}"
            )
        x, y = batch
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"data batch {k}: inputs and targets need the same leading (example) dimension, "
                f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        yield x, y


def _chunks(data: Any, chunk_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    seen = 0
    for x, y in _batches(data):
        for start in range(0, x.shape[0], chunk_size):
            xc = x[start : start + chunk_size].to(device, non_blocking=True)
            yc = y[start : start + chunk_size].to(device, non_blocking=True)
            seen += xc.shape[0]
            yield xc, yc
    if seen == 0:
        raise ValueError("data holds no examples; pass at least one (inputs, targets) example")


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _resolve_params(model: nn.Module, params: ParamSpec) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs to differentiate: all with requires_grad, or the chosen ones."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters to differentiate")
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("no parameter of the model has requires_grad=True; pass params=")
        return chosen
    if isinstance(params, (str, Tensor)):
        params = [params]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    chosen_names: list[str] = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"params: {item!r} is not a parameter name of the model")
            name = item
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError("params: a tensor in params is not a parameter of the model")
            name = by_id[id(item)]
        else:
            raise TypeError(
                f"params must hold parameter names or parameter tensors, got {type(item).__name__}"
            )
        if name not in chosen_names:
            chosen_names.append(name)
    if not chosen_names:
        raise ValueError("params is empty; pass None to use every trainable parameter")
    return [(n, by_name[n]) for n in chosen_names]


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    raise ValueError("model has no parameters to differentiate")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each submodule's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_loss_shape(loss: Tensor, batch: int) -> None:
    if loss.shape != (batch,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({batch},), got shape "
            f"{tuple(loss.shape)}; use e.g. nn.CrossEntropyLoss(reduction='none')"
        )


# ---------------------------------------------------------------------------------------------
# Full gradient and gradient variance
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientStats:
    """Per-example gradient statistics at one point x over n examples.

    Attributes:
        c2: C^2 = (1/n) sum_i ||grad f_i(x) - grad f(x)||^2 (the stochastic-gradient variance).
        full_grad_norm_sq: ||grad f(x)||^2 with grad f(x) = (1/n) sum_i grad f_i(x).
        mean_sq_grad_norm: (1/n) sum_i ||grad f_i(x)||^2 (= c2 + full_grad_norm_sq).
        n: number of examples.
    """

    c2: float
    full_grad_norm_sq: float
    mean_sq_grad_norm: float
    n: int


def _full_gradient64(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    chunk_size: int,
    named: list[tuple[str, nn.Parameter]],
) -> tuple[list[Tensor], int]:
    """Mean gradient over the examples in float64, model in eval mode, and the example count."""
    device = _device_of(model)
    chosen = {name: p.detach().requires_grad_(True) for name, p in named}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})
    leaves = list(chosen.values())
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in leaves]
    n = 0
    with _eval_mode(model), torch.enable_grad(), strict_fp32():
        for x, y in _chunks(data, chunk_size, device):
            loss = loss_fn(functional_call(model, {**fixed, **chosen}, (x,)), y)
            _check_loss_shape(loss, x.shape[0])
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            for s, g in zip(sums, grads, strict=True):
                if g is not None:
                    s.add_(g.to(torch.float64))
            n += x.shape[0]
    return [s / n for s in sums], n


def full_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    chunk_size: int = 256,
    params: ParamSpec = None,
) -> list[Tensor]:
    """Full gradient grad f(x) = (1/n) sum_i grad f_i(x) over the given examples.

    Args:
        model: the network; evaluated in eval mode (batch norm uses its running statistics, so
            that f_i depends on example i alone), its modes are restored afterwards.
        loss_fn: ``loss_fn(output, target)`` returning per-example losses of shape (batch,).
        data: an (inputs, targets) pair, or an iterable of such batches (e.g. a DataLoader).
        chunk_size: examples per forward/backward pass (bounds memory).
        params: names or tensors of the parameters to differentiate; default all trainable.

    Returns:
        One tensor per selected parameter, same shape and dtype as the parameter (summed in
        float64 before the cast).
    """
    chunk_size = _check_chunk_size(chunk_size)
    named = _resolve_params(model, params)
    grads, _ = _full_gradient64(model, loss_fn, data, chunk_size, named)
    return [g.to(p.dtype) for g, (_, p) in zip(grads, named, strict=True)]


def _per_example_grad_fn(
    model: nn.Module, loss_fn: LossFn
) -> Callable[..., dict[str, Tensor]]:
    def loss_one(
        trainable: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        out = functional_call(model, {**fixed, **trainable}, (x.unsqueeze(0),))
        loss = loss_fn(out, y.unsqueeze(0))
        _check_loss_shape(loss, 1)
        return loss[0]

    return vmap(grad(loss_one), in_dims=(None, None, 0, 0))


def gradient_variance(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    chunk_size: int = 64,
    params: ParamSpec = None,
) -> GradientStats:
    """Stochastic-gradient variance C^2 at the model's current parameters x.

    C^2 = (1/n) sum_i ||g_i - g_bar||^2 with g_i = grad f_i(x) the per-example gradients and
    g_bar = grad f(x) their mean over the n given examples. This is E||G_xi(x) - grad f(x)||^2 of
    Sato & Iiduka (2024) assumption (A2)(ii) for an example drawn uniformly from the n; a
    mini-batch of b
    examples drawn with replacement then has E||grad f_S(x) - grad f(x)||^2 = C^2 / b exactly
    (Theorem 3.1 with equality), and without replacement C^2 / b * (n - b) / (n - 1).
    Sato & Iiduka's (2024) C^2_opt bounds this at every iterate of a run, so a value measured
    at one point is a lower bound on it; measure at several checkpoints and take the largest.

    Per-example gradients come from ``torch.func`` (``vmap`` over ``grad`` of a
    ``functional_call``), ``chunk_size`` examples at a time, so memory is about
    chunk_size x (number of parameters) floats. The model runs in eval mode with its buffers
    passed to ``functional_call``; modes are restored afterwards and no buffer is updated.

    Numerics: each chunk's mean and centred sum of squares are computed in float64 and merged
    with the pairwise update of Chan, Golub & LeVeque (1979),
    M2 = M2_a + M2_b + ||mean_b - mean_a||^2 n_a n_b / (n_a + n_b). This is one pass and, unlike
    mean||g_i||^2 - ||g_bar||^2, does not cancel catastrophically when C^2 << ||g_bar||^2.
    On a float64 model the result equals a per-example loop to about 1e-12 relative. TF32 is
    off while it runs (:func:`labkit.precision.strict_fp32`; PyTorch's default would run a
    float32 model's convolutions on CUDA in TF32, agreeing with a loop only to about 1e-3).

    Args:
        model: the network (any dtype / device); inputs are moved to its device chunk by chunk.
        loss_fn: ``loss_fn(output, target)`` returning per-example losses of shape (batch,), like
            ``nn.CrossEntropyLoss(reduction="none")``.
        data: an (inputs, targets) pair, or an iterable of such batches.
        chunk_size: examples per vmapped pass.
        params: names or tensors of the parameters to differentiate; default all trainable.

    Returns:
        :class:`GradientStats` (c2, full_grad_norm_sq, mean_sq_grad_norm, n).
    """
    chunk_size = _check_chunk_size(chunk_size)
    named = _resolve_params(model, params)
    device = _device_of(model)
    chosen = {n for n, _ in named}
    trainable = {n: p.detach() for n, p in named}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})
    per_example = _per_example_grad_fn(model, loss_fn)

    n = 0
    sums: dict[str, Tensor] = {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    m2, sq_sum = zero, zero  # 0-d float64 tensors: no host sync per chunk
    with _eval_mode(model), strict_fp32():
        for x, y in _chunks(data, chunk_size, device):
            grads = per_example(trainable, fixed, x, y)
            c = x.shape[0]
            chunk_sums: dict[str, Tensor] = {}
            chunk_m2 = zero
            for name, g in grads.items():
                g64 = g.reshape(-1).to(torch.float64)
                s = g64.view(c, -1).sum(0)
                chunk_sums[name] = s
                centred = (g64.view(c, -1) - s / c).view(-1)
                chunk_m2 = chunk_m2 + torch.dot(centred, centred)
                sq_sum = sq_sum + torch.dot(g64, g64)
            if n == 0:
                sums, m2 = chunk_sums, chunk_m2
            else:
                gap = sum(((chunk_sums[k] / c - sums[k] / n) ** 2).sum() for k in sums)
                m2 = m2 + chunk_m2 + gap * (n * c / (n + c))
                for k in sums:
                    sums[k] += chunk_sums[k]
            n += c
    full_sq = float(sum(((s / n) ** 2).sum() for s in sums.values()))
    return GradientStats(
        c2=float(m2) / n, full_grad_norm_sq=full_sq, mean_sq_grad_norm=float(sq_sum) / n, n=n
    )


def k2_estimate(
    points: Sequence[nn.Module | Mapping[str, Tensor]],
    loss_fn: LossFn,
    data: Data,
    *,
    model: nn.Module | None = None,
    reduce: str = "max",
    chunk_size: int = 256,
    params: ParamSpec = None,
) -> float:
    """Estimate K^2 of assumption (A4), E||grad f(x_t)||^2 <= K^2, from several points x_t.

    Args:
        points: the points x_t, each a model (``nn.Module``) or a state dict; state dicts (for
            example checkpoints saved along a run) are loaded into a copy of ``model``.
        loss_fn: per-example loss, as in :func:`full_gradient`.
        data: the examples over which grad f is taken, as in :func:`full_gradient`.
        model: architecture template, required when ``points`` holds state dicts (not modified).
        reduce: "max" (default: (A4) bounds every iterate, so K^2 is at least the largest value
            seen) or "mean" (average over the points).
        chunk_size: examples per forward/backward pass.
        params: names of the parameters to differentiate; default all trainable.

    Returns:
        The estimate of K^2 (squared gradient units). The authors' code (not the article) uses
        K = 1.77 (SHB) and K = 4.5 (NSHB) for ResNet-18 on CIFAR-100, see
        ``labkit.critical.PAPER_VALUES``.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if isinstance(points, (nn.Module, Mapping)) or not isinstance(points, Sequence):
        raise TypeError("points must be a list of models or state dicts")
    if len(points) == 0:
        raise ValueError("points is empty; pass at least one model or state dict")
    chunk_size = _check_chunk_size(chunk_size)
    if isinstance(params, str):
        params = [params]
    if params is not None and not all(isinstance(p, str) for p in params):
        raise TypeError("k2_estimate needs params as parameter names (they apply to every point)")
    holder: nn.Module | None = None
    values = []
    for k, point in enumerate(points):
        if isinstance(point, nn.Module):
            net = point
        elif isinstance(point, Mapping):
            if model is None:
                raise ValueError(
                    f"points[{k}] is a state dict; pass model= (the architecture to load it into)"
                )
            if holder is None:
                holder = copy.deepcopy(model)
            holder.load_state_dict(point)
            net = holder
        else:
            raise TypeError(
                f"points[{k}] must be an nn.Module or a state dict, got {type(point).__name__}"
            )
        named = _resolve_params(net, params)
        grads, _ = _full_gradient64(net, loss_fn, data, chunk_size, named)
        values.append(sum(float((g**2).sum()) for g in grads))
    return max(values) if reduce == "max" else sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Search-direction noise (Sato & Iiduka (2024) §2.4)
# ---------------------------------------------------------------------------------------------


def direction_noise(direction: Sequence[Tensor], full_grad: Sequence[Tensor]) -> float:
    """||direction - full_grad|| over all parameter tensors (Euclidean norm, computed in float64).

    With ``direction`` the optimizer's search direction at x_t and ``full_grad`` = grad f(x_t) this
    is ||omega_t||, the search-direction noise of Sato & Iiduka (2024) §2.4.
    """
    if len(direction) != len(full_grad):
        raise ValueError(
            f"direction has {len(direction)} tensors but full_grad has {len(full_grad)}; "
            "they must list the same parameters"
        )
    total = 0.0
    for k, (d, g) in enumerate(zip(direction, full_grad, strict=True)):
        if d.shape != g.shape:
            raise ValueError(
                f"tensor {k}: direction has shape {tuple(d.shape)}, full_grad has shape "
                f"{tuple(g.shape)}"
            )
        total += float(((d.to(torch.float64) - g.to(torch.float64)) ** 2).sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class NoiseRecord:
    """One measurement of :class:`DirectionNoiseTracker` at iterate x_t.

    Attributes:
        step: t, the number of tracker steps before this one (0 for the first).
        direction_noise: ||omega_t|| = ||direction_t - grad f(x_t)|| (Sato & Iiduka (2024) §2.4).
        gradient_noise: ||grad f_S(x_t) - grad f(x_t)||, the mini-batch gradient noise, which is
            the same quantity for every optimizer (equal to direction_noise for SGD).
        full_grad_norm_sq: ||grad f(x_t)||^2 (one sample for the K^2 of assumption (A4)).
    """

    step: int
    direction_noise: float
    gradient_noise: float
    full_grad_norm_sq: float


class DirectionNoiseTracker:
    """Record the search-direction noise ||omega_t|| of SGD, SHB or NSHB during training.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``, every iteration.
    It reads the mini-batch gradient g_t from ``p.grad``, advances its own copy of the direction
    recursion of Sato & Iiduka (2024) Algorithms 2.1-2.3 (so it does not depend on any optimizer's
    internals)

    * ``"sgd"``:  direction_t = g_t,
    * ``"shb"``:  m_t = g_t + beta m_{t-1}            (PyTorch's SGD momentum, dampening 0),
    * ``"nshb"``: d_t = (1 - beta) g_t + beta d_{t-1},

    with m_{-1} = d_{-1} = 0, and, on measured steps, computes the full gradient grad f(x_t) over
    ``data`` at the same point x_t (before the optimizer moves it) and records
    ||direction_t - grad f(x_t)||. As in Sato & Iiduka (2024), omega is taken against
    grad f(x_t) itself, not against a rescaled gradient: in steady state m_t is about
    grad f / (1 - beta), so the SHB noise carries a bias of about beta / (1 - beta) grad f(x_t).
    That bias is why K^2 enters delta_SHB (eq. (13)) and not delta_NSHB (eq. (14)), whose d_t
    is a convex combination.
    Multiplying a recorded noise by the learning rate gives an empirical smoothing degree
    eta ||omega_t|| to set beside eqs. (12)-(14).

    With ``weight_decay`` > 0 the direction is built from g_t + weight_decay x_t (as torch.optim.SGD
    does) and the reference gradient is grad f(x_t) + weight_decay x_t, the gradient of the
    regularized objective. The full gradient is taken in eval mode (see :func:`full_gradient`);
    for a network with batch norm the training step's g_t uses batch statistics instead, and that
    systematic difference is part of the recorded noise.

    Args:
        model: the network being trained.
        loss_fn: per-example loss, as in :func:`full_gradient`.
        data: the examples defining f (a fixed subset of the training set keeps it cheap).
        kind: "sgd", "shb" or "nshb".
        beta: momentum coefficient in [0, 1), required for shb and nshb.
        weight_decay: L2 coefficient >= 0 applied as above.
        params: names or tensors of the parameters the optimizer updates; default all trainable.
        chunk_size: examples per pass of the full-gradient computation.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        kind: str = "sgd",
        beta: float | None = None,
        weight_decay: float = 0.0,
        params: ParamSpec = None,
        chunk_size: int = 256,
    ) -> None:
        if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
        self.kind = kind.lower()
        if self.kind == "sgd":
            if beta not in (None, 0, 0.0):
                raise ValueError(f"kind='sgd' takes no momentum, got beta={beta!r}")
            beta = 0.0
        elif beta is None:
            raise ValueError(f"beta is required for kind={self.kind!r}; pass a value in [0, 1)")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
                or not (weight_decay >= 0 and math.isfinite(weight_decay))):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay!r}")
        self.beta = float(beta)
        self.weight_decay = float(weight_decay)
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.chunk_size = _check_chunk_size(chunk_size)
        self._named = _resolve_params(model, params)
        self._buffers: list[Tensor] | None = None
        self.steps = 0
        self.records: list[NoiseRecord] = []

    @property
    def direction(self) -> list[Tensor] | None:
        """The current search direction (one tensor per parameter); None before the first step."""
        return self._buffers

    def step(self, measure: bool = True) -> NoiseRecord | None:
        """Advance the direction recursion with the gradients in ``p.grad``; measure if asked.

        Pass ``measure=False`` on iterations where the (costly) full gradient is not wanted: the
        direction is still updated so later measurements stay exact. Returns the new record, or
        None when not measuring.
        """
        grads = []
        for name, p in self._named:
            if p.grad is None:
                raise ValueError(
                    f"parameter {name!r} has no gradient; call loss.backward() before "
                    "tracker.step(), or pass params= to track only the updated parameters"
                )
            g = p.grad.detach()
            if self.weight_decay:
                g = g.add(p.detach(), alpha=self.weight_decay)
            grads.append(g)
        if self.kind == "sgd":
            self._buffers = [g.clone() for g in grads]
        elif self._buffers is None:  # m_{-1} = d_{-1} = 0
            scale = 1.0 if self.kind == "shb" else 1.0 - self.beta
            self._buffers = [g * scale for g in grads]
        else:
            alpha = 1.0 if self.kind == "shb" else 1.0 - self.beta
            for buf, g in zip(self._buffers, grads, strict=True):
                buf.mul_(self.beta).add_(g, alpha=alpha)
        record = None
        if measure:
            full, _ = _full_gradient64(
                self.model, self.loss_fn, self.data, self.chunk_size, self._named
            )
            if self.weight_decay:
                full = [
                    f + self.weight_decay * p.detach().to(torch.float64)
                    for f, (_, p) in zip(full, self._named, strict=True)
                ]
            record = NoiseRecord(
                step=self.steps,
                direction_noise=direction_noise(self._buffers, full),
                gradient_noise=direction_noise(grads, full),
                full_grad_norm_sq=sum(float((f**2).sum()) for f in full),
            )
            self.records.append(record)
        self.steps += 1
        return record

    def k2(self, reduce: str = "max") -> float:
        """K^2 estimated along the run: max (default) or mean of the recorded ||grad f(x_t)||^2."""
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        if not self.records:
            raise ValueError("no measurement recorded yet; call step(measure=True) first")
        values = [r.full_grad_norm_sq for r in self.records]
        return max(values) if reduce == "max" else sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Gradient noise scale B_simple (McCandlish et al. (2018), "An empirical model of large-batch
# training", arXiv:1812.06162, §2.2 and Appendix A). Book: chapter 8, "Large-batch training".
# ---------------------------------------------------------------------------------------------


# Listed here rather than in __all__ above, so that this section is self-contained.
__all__ += ["NoiseScale", "gradient_noise_scale", "noise_scale", "noise_scale_from_batch_norms"]


@dataclass(frozen=True)
class NoiseScale:
    """The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 and its two parts.

    Attributes:
        trace_sigma: tr(Sigma), the trace of the covariance of one example's gradient, which is
            C^2 of Sato & Iiduka (2024) (squared gradient units).
        grad_norm_sq: |G|^2 = ||grad f(x)||^2 (squared gradient units).
        b_simple: tr(Sigma) / |G|^2, in examples (a batch size); ``math.inf`` when |G|^2 <= 0
            (at a stationary point, or when a two-batch estimate of |G|^2 came out <= 0).
    """

    trace_sigma: float
    grad_norm_sq: float
    b_simple: float


def _ratio(trace_sigma: float, grad_norm_sq: float) -> NoiseScale:
    b = trace_sigma / grad_norm_sq if grad_norm_sq > 0 else math.inf
    return NoiseScale(trace_sigma=trace_sigma, grad_norm_sq=grad_norm_sq, b_simple=b)


def noise_scale(stats: GradientStats) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 from the statistics :func:`gradient_variance` returns.

    With per-example gradients g_i and their mean G over n examples, tr(Sigma) is
    (1/n) sum_i ||g_i - G||^2 = ``stats.c2`` and |G|^2 is ``stats.full_grad_norm_sq``.
    A mini-batch of b examples drawn with replacement then has
    E||g_b||^2 = |G|^2 + tr(Sigma) / b = |G|^2 (1 + B_simple / b): at b = B_simple the noise
    and the signal in the squared mini-batch gradient norm are equal.
    """
    if not isinstance(stats, GradientStats):
        raise TypeError(
            f"stats must be the GradientStats that gradient_variance returns, got "
            f"{type(stats).__name__}"
        )
    if stats.c2 == 0 and stats.full_grad_norm_sq == 0:
        raise ValueError(
            "every per-example gradient is zero (c2 = 0 and full_grad_norm_sq = 0), so "
            "B_simple = tr(Sigma) / |G|^2 is 0 / 0; measure at a point where the loss is not flat"
        )
    return _ratio(stats.c2, stats.full_grad_norm_sq)


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    chunk_size: int = 64,
    params: ParamSpec = None,
) -> NoiseScale:
    """McCandlish et al.'s simple noise scale B_simple = tr(Sigma) / |G|^2 at the model's point.

    Computed exactly from the per-example gradients of :func:`gradient_variance` (same
    arguments, same eval-mode and float64 conventions): tr(Sigma) = C^2 and
    |G|^2 = ||grad f(x)||^2 over the given examples. McCandlish et al. (2018) show that, for
    SGD near x with an optimally tuned step, the batch size at which doubling the batch stops
    nearly halving the number of steps is about B_simple (exactly so for a quadratic loss with
    a Hessian proportional to the identity). Book, chapter 8, compares it with the critical
    batch size b* of Sato & Iiduka (2024).

    Returns:
        :class:`NoiseScale` (trace_sigma, grad_norm_sq, b_simple in examples).
    """
    return noise_scale(
        gradient_variance(model, loss_fn, data, chunk_size=chunk_size, params=params)
    )


def _mean_of(name: str, values: Any) -> float:
    """Mean of one squared norm or a sequence (or tensor) of them, each >= 0 and finite."""
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [values]
    try:
        arr = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a squared norm >= 0 or a sequence of them, "
                        f"got {values!r}") from err
    if not arr:
        raise ValueError(f"{name} is empty; pass at least one squared gradient norm")
    bad = [v for v in arr if not (v >= 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"{name} must be >= 0 and finite, got {bad[0]!r}")
    return math.fsum(arr) / len(arr)


def noise_scale_from_batch_norms(
    small_norm_sq: Any, small_batch: int, big_norm_sq: Any, big_batch: int
) -> NoiseScale:
    """B_simple from squared mini-batch gradient norms at two batch sizes (no per-example grads).

    McCandlish et al. (2018), Appendix A.1: with |g_B|^2 the squared norm of a mini-batch
    gradient over B examples, E|g_B|^2 = |G|^2 + tr(Sigma) / B, so two batch sizes
    B_small < B_big give the unbiased estimates

        |G|^2     = (B_big E|g_big|^2 - B_small E|g_small|^2) / (B_big - B_small),
        tr(Sigma) = (E|g_small|^2 - E|g_big|^2) / (1 / B_small - 1 / B_big).

    Each argument ``*_norm_sq`` is one squared norm or a sequence of them (for example one per
    training step, as in data-parallel training where the small batch is one worker's and the
    big batch all workers'); their means are used, and the ratio is taken after averaging
    because the ratio of two noisy estimates is biased. Averaged over too few draws, either
    estimate can come out negative, and then ``b_simple`` is meaningless (negative, or
    ``math.inf`` when the |G|^2 estimate is <= 0).

    Args:
        small_norm_sq: |g_B|^2 at batch size ``small_batch`` (>= 0; float or sequence).
        small_batch: B_small >= 1.
        big_norm_sq: |g_B|^2 at batch size ``big_batch`` (>= 0; float or sequence).
        big_batch: B_big > B_small.

    Returns:
        :class:`NoiseScale` with the two estimates and their ratio.
    """
    for name, b in (("small_batch", small_batch), ("big_batch", big_batch)):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"{name} must be an int >= 1, got {b!r}")
    if big_batch <= small_batch:
        raise ValueError(
            f"big_batch must be larger than small_batch, got big_batch={big_batch} and "
            f"small_batch={small_batch}"
        )
    small = _mean_of("small_norm_sq", small_norm_sq)
    big = _mean_of("big_norm_sq", big_norm_sq)
    grad_norm_sq = (big_batch * big - small_batch * small) / (big_batch - small_batch)
    trace_sigma = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
    return _ratio(trace_sigma, grad_norm_sq)
