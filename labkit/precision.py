"""Floating-point precision: bf16 autocast for training, strict fp32 for measurements.

Book: chapter 8 (measuring the critical batch size, C^2 and sharpness). The code of Sato &
Iiduka (2024) trains and measures without autocast, in fp32. labkit trains in bf16 autocast on
CUDA by default (``TrainConfig.precision="auto"``: fp32 weights, bf16 matrix products), which
suits accuracy curves but rounds the quantities chapter 8 measures: the stopping test of the
critical batch size compares a running mean of mini-batch gradient norms with a threshold, and
C^2 and sharpness are differences of nearby numbers. So the measurement runs (lab 3's SFO grid,
``labkit critical measure``) train with ``precision="fp32"``, and the measurements at a run's
weights (C^2 and K^2, adaptive sharpness) run in fp32.

"fp32" means IEEE fp32 here: on Ampere and later GPUs PyTorch runs fp32 convolutions in TF32 (a
10-bit mantissa) unless told otherwise, so a measurement would depend on the GPU generation.
:func:`strict_fp32` turns TF32 off for convolutions and matrix products while a measurement (or
a ``precision="fp32"`` run) runs, and restores the previous settings afterwards. On the CPU these
settings change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["MEASUREMENT_PRECISION", "autocast_dtype", "strict_fp32"]

#: The ``TrainConfig.precision`` of runs whose numbers are measurements (lab 3, ``labkit
#: critical measure``).
MEASUREMENT_PRECISION = "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: bf16 for ``"bf16"`` and for ``"auto"`` on CUDA, None (no
    autocast) for ``"fp32"``, ``"fp64"`` and for ``"auto"`` elsewhere."""
    if precision in ("fp32", "fp64") or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@contextmanager
def strict_fp32() -> Iterator[None]:
    """IEEE fp32 for cuDNN convolutions and CUDA matrix products inside the block (TF32 off).

    Uses PyTorch's ``fp32_precision`` settings (mixing them with the legacy ``allow_tf32``
    flags is an error in PyTorch) and restores the previous values on exit.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = "ieee"
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
