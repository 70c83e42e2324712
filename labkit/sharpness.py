"""Worst-case adaptive sharpness of a trained network.

Book: chapter 8 (momentum, noise and generalization), the definition of adaptive sharpness
in Sato & Iiduka (2024) §5.3 (arXiv:2402.02325):

    S_max^rho(w, c) = E_B [ max_{||delta / c||_p <= rho}  L_B(w + delta) - L_B(w) ],     (8.S)

where L_B is the mean loss on the batch B, the division is elementwise, and c = |w| makes the
radius relative to each weight (Kwon et al. 2021, "ASAM: adaptive sharpness-aware
minimization for scale-invariant learning of deep neural networks", arXiv:2102.11600). With
c = |w| the measure is invariant under the rescalings that leave a ReLU network's function
unchanged (multiply one layer by a > 0 and the next by 1/a); with c = 1 it is not. Sato &
Iiduka (2024, arXiv:2402.02325) measure it with p = inf and rho = 0.0002 around ResNet-18
solutions on CIFAR-100, following Andriushchenko et al. (2023), "A modern look at the
relationship between sharpness and generalization", arXiv:2302.07011. Its code
(naoki-sato3/new-sigma-nice ``sharpness/main.py``) takes the expectation over the first 1024
training images in file order, in batches of 128, without augmentation;
:func:`labkit.experiments.measure_sharpness` does the same by default. (That script measures
plain sharpness unless it is run with ``--adaptive``; the article reports adaptive sharpness,
labkit's default.)

How the inner maximum is computed. We write delta = c * z and maximize over z in the ball
||z||_p <= rho by projected steepest ascent, the gradient in z being c * grad L(w + c * z):

* ``norm="linf"``: z <- clip(z + alpha * sign(g), -rho, rho);
* ``norm="l2"``:   z <- P(z + alpha * g / ||g||_2), P the projection onto the l2 ball.

The norm is taken over all perturbed parameters as one vector. The default step is
alpha = 2 rho, so the first step from z = 0 lands on the maximizer of the linearized loss
(the FGSM / SAM point). The step is then refined with the checkpoint rule of APGD (Croce &
Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", arXiv:2003.01690), which Andriushchenko et al. use for sharpness:
at the iterations ``checkpoint_iterations(n_iters)`` (fractions 0.22, 0.41, 0.57, ... of
n_iters), if the best objective did not improve since the previous checkpoint, the step is
halved and the iterate restarts from the best point found. We drop APGD's momentum term to
keep the iteration plain. The best objective over all evaluated points is returned; z = 0 is
one of them, so every per-batch value is >= 0 and is a lower bound on the true maximum.

Compared with the authors' code. Sato & Iiduka measure with the ``eval_APGD_sharpness`` of
Andriushchenko et al. (tml-epfl/sharpness-vs-generalization ``sharpness.py``, copied into
naoki-sato3/new-sigma-nice ``sharpness/sharpness.py``; ``m_apgd_linf``, ``rand_init`` off).
Same: the ball and its coordinates (their step adds alpha |w| sign(g) to delta and clips it to
[-rho |w|, rho |w|], i.e. our z-step), the first step alpha = 2 rho from delta = 0, 20
gradient evaluations per batch, the APGD checkpoints, the best loss over the iterates, the
mean over batches of (best loss - loss at w), every parameter perturbed, batch norm in eval
mode. Different:

* momentum: after the projection they average, delta <- 0.75 delta + 0.25 delta_prev
  (delta_prev the perturbation before the previous step), so their iterates lie inside the
  ball more often; ours are plain projected steps (on the box's corners for l_inf);
* the halving rule: they halve when fewer than 0.75 of the iterations since the last
  checkpoint improved the best loss, or when neither the step nor the best loss changed;
  we halve only when the best loss did not improve at all since the last checkpoint;
* the restart: they reload the best weights for the next gradient but keep updating their
  current perturbation (so the restart lasts one step); we move the iterate itself back
  to the best point.

Measured against an own transcription of their iteration on a trained CNN (labkit's tiny CNN
with batch norm, 8 epochs on 2048 generated CIFAR-100-format images, its first 1024 images in 8
batches of 128, 20 iterations), the two agree to 4 digits at rho = 0.0002 and 0.002 (0.0017718
vs 0.0017717; 0.019654 vs 0.019654) and differ by 0.04% at rho = 0.02 (0.55899 vs 0.55874):
at these radii the first step already reaches the sign corner of the box, and neither rule
improves much on it. The batch size matters more: batches of 256 instead of 128 gave 0.0016362
at rho = 0.0002, 8% less.

Conventions:

* The model is put in eval mode for the whole computation (BatchNorm uses its running
  statistics, dropout is off), as in Andriushchenko et al.; every module's train/eval flag is
  restored afterwards.
* Every parameter with ``requires_grad=True`` is perturbed, BatchNorm's affine weight and bias
  included (as in Andriushchenko et al. and as in (8.S), where w is the whole parameter
  vector). Freeze a parameter (``requires_grad_(False)``) to exclude it. Buffers (BN running
  statistics) are never perturbed. With c = |w|, a weight that is exactly 0 cannot move.
* The weights are restored bit for bit when the function returns or raises, and ``.grad``
  fields are left untouched (gradients are taken with ``torch.autograd.grad``).
* ``batches`` yields (inputs, targets) already on the model's device and already normalized:
  normalization is the data module's job. (A bug of the reference code gave CIFAR-100 inputs
  CIFAR-10's normalization constants; keeping normalization out of this function keeps it
  in one place.)
* The cost per batch is n_iters forward+backward passes plus two forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "NORMS",
    "SharpnessResult",
    "adaptive_sharpness",
    "adaptive_sharpness_result",
    "checkpoint_iterations",
]

NORMS: tuple[str, ...] = ("linf", "l2")


@dataclass(frozen=True)
class SharpnessResult:
    """Adaptive sharpness and its per-batch parts.

    ``sharpness`` is the mean of ``per_batch``; ``per_batch[i] = perturbed_losses[i] -
    base_losses[i]`` where ``base_losses[i] = L_B(w)`` and ``perturbed_losses[i]`` is the
    largest L_B(w + delta) found in the ball (loss units of ``loss_fn``).
    """

    sharpness: float
    per_batch: tuple[float, ...]
    base_losses: tuple[float, ...]
    perturbed_losses: tuple[float, ...]
    rho: float
    norm: str
    adaptive: bool
    n_iters: int


def checkpoint_iterations(n_iters: int) -> tuple[int, ...]:
    """Iterations (0 < k < n_iters) at which the step size may be halved.

    The APGD schedule of Croce & Hein (2020): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); checkpoint j is ceil(p_j * n_iters).
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an int >= 1, got n_iters={n_iters!r}")
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    ks = sorted({math.ceil(round(p * n_iters, 9)) for p in fractions[1:]})
    return tuple(k for k in ks if 0 < k < n_iters)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    rho: float,
    norm: str = "linf",
    adaptive: bool = True,
    n_iters: int = 20,
    step_size: float | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> float:
    """Worst-case (adaptive) sharpness (8.S), averaged over ``batches``; loss units.

    Args:
        model: the network; its weights are the center w of the ball.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the batch's mean loss (a scalar).
        batches: iterable of (inputs, targets) on the model's device, already normalized.
        rho: radius of the ball in the scaled coordinates z = delta / c, >= 0.
        norm: ``"linf"`` or ``"l2"`` (p in (8.S)).
        adaptive: c = |w| if True (adaptive sharpness), c = 1 if False (plain sharpness).
        n_iters: ascent iterations (gradient evaluations) per batch, >= 1.
        step_size: initial ascent step in z coordinates; default 2 * rho.
        random_start: start from a uniform random point of the ball instead of z = 0.
        generator: random generator for ``random_start``.

    See ``adaptive_sharpness_result`` for the per-batch values.
    """
    return adaptive_sharpness_result(
        model,
        loss_fn,
        batches,
        rho,
        norm=norm,
        adaptive=adaptive,
        n_iters=n_iters,
        step_size=step_size,
        random_start=random_start,
        generator=generator,
    ).sharpness


def adaptive_sharpness_result(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    rho: float,
    norm: str = "linf",
    adaptive: bool = True,
    n_iters: int = 20,
    step_size: float | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Like ``adaptive_sharpness`` but returns a ``SharpnessResult`` with per-batch values."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got rho={rho!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got rho={rho!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm={norm!r}; valid norms: {', '.join(NORMS)}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an int >= 1, got n_iters={n_iters!r}")
    if step_size is None:
        step_size = 2.0 * float(rho)
    elif (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not math.isfinite(step_size)
        or step_size <= 0
    ):
        raise ValueError(f"step_size must be a finite number > 0 or None, got {step_size!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True to perturb")
    checkpoints = set(checkpoint_iterations(n_iters))
    modes = [(m, m.training) for m in model.modules()]
    originals = [p.detach().clone() for p in params]
    scales = [w.abs() if adaptive else torch.ones_like(w) for w in originals]

    base_losses: list[float] = []
    perturbed_losses: list[float] = []
    try:
        model.eval()
        for index, batch in enumerate(batches):
            try:
                inputs, targets = batch
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"batches must yield (inputs, targets) pairs; item {index} is "
                    f"{type(batch).__name__}"
                ) from error
            base, best = _sharpness_on_batch(
                model, loss_fn, inputs, targets, params, originals, scales, float(rho), norm,
                n_iters, float(step_size), checkpoints, random_start, generator,
            )  # fmt: skip
            base_losses.append(base)
            perturbed_losses.append(best)
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)
        for module, training in modes:
            module.training = training

    if not base_losses:
        raise ValueError("batches is empty: need at least one (inputs, targets) batch")
    per_batch = tuple(b - a for a, b in zip(base_losses, perturbed_losses, strict=True))
    return SharpnessResult(
        sharpness=sum(per_batch) / len(per_batch),
        per_batch=per_batch,
        base_losses=tuple(base_losses),
        perturbed_losses=tuple(perturbed_losses),
        rho=float(rho),
        norm=norm,
        adaptive=bool(adaptive),
        n_iters=n_iters,
    )


def _sharpness_on_batch(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    params: list[nn.Parameter],
    originals: list[Tensor],
    scales: list[Tensor],
    rho: float,
    norm: str,
    n_iters: int,
    step_size: float,
    checkpoints: set[int],
    random_start: bool,
    generator: torch.Generator | None,
) -> tuple[float, float]:
    """Projected ascent on one batch; returns (L_B(w), best L_B(w + delta) found)."""

    def set_weights(z: list[Tensor]) -> None:
        with torch.no_grad():
            for p, w, c, zi in zip(params, originals, scales, z, strict=True):
                p.copy_(w + c * zi)

    def value(z: list[Tensor]) -> float:
        set_weights(z)
        with torch.no_grad():
            return _scalar(loss_fn(model(inputs), targets))

    def value_and_grad(z: list[Tensor]) -> tuple[float, list[Tensor]]:
        set_weights(z)
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            loss_value = _scalar(loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        # Chain rule for delta = c * z; a parameter the loss does not use gets gradient 0.
        return loss_value, [
            torch.zeros_like(c) if g is None else c * g for g, c in zip(grads, scales, strict=True)
        ]

    zero = [torch.zeros_like(w) for w in originals]
    base = value(zero)
    if not math.isfinite(base):
        raise ValueError(f"the loss at the unperturbed weights is not finite: {base}")

    z = _random_point(originals, rho, norm, generator) if random_start else zero
    best_value, best_z = base, zero
    best_grad: list[Tensor] | None = None
    improved = False
    alpha = step_size
    for k in range(n_iters):
        f, g = value_and_grad(z)
        if f > best_value:
            best_value, best_z, best_grad, improved = f, z, g, True
        elif z is best_z:
            best_grad = g  # k = 0 without random start: the best point is still z = 0
        if k in checkpoints:
            if not improved:
                alpha /= 2.0
                if best_grad is not None:  # restart from the best point (APGD)
                    z, g = best_z, best_grad
            improved = False
        z = _ascent_step(z, g, alpha, rho, norm)
    f = value(z)
    if f > best_value:
        best_value = f
    return base, best_value


def _ascent_step(
    z: list[Tensor], g: list[Tensor], alpha: float, rho: float, norm: str
) -> list[Tensor]:
    """One projected steepest-ascent step in the scaled coordinates."""
    if norm == "linf":
        return [(zi + alpha * gi.sign()).clamp_(-rho, rho) for zi, gi in zip(z, g, strict=True)]
    g_norm = _global_l2(g)
    if g_norm == 0.0:
        return z
    z = [zi + (alpha / g_norm) * gi for zi, gi in zip(z, g, strict=True)]
    z_norm = _global_l2(z)
    if z_norm > rho:
        z = [zi * (rho / z_norm) for zi in z]
    return z


def _random_point(
    like: list[Tensor], rho: float, norm: str, generator: torch.Generator | None
) -> list[Tensor]:
    """A uniform random point of the ball of radius rho (same shapes as ``like``)."""
    device = generator.device if generator is not None else torch.device("cpu")

    def draw(w: Tensor, gaussian: bool) -> Tensor:
        sampler = torch.randn if gaussian else torch.rand
        x = sampler(w.shape, generator=generator, device=device, dtype=w.dtype)
        return x.to(w.device)

    if norm == "linf":
        return [(2.0 * draw(w, False) - 1.0) * rho for w in like]
    direction = [draw(w, True) for w in like]
    d = sum(w.numel() for w in like)
    u = float(torch.rand((), generator=generator, device=device, dtype=torch.float64))
    radius = rho * u ** (1.0 / d)
    length = _global_l2(direction)
    return [x * (radius / length) for x in direction]


def _global_l2(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _scalar(loss: Tensor) -> float:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn must return a scalar tensor (the batch's mean loss), got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
        )
    return float(loss.detach())
