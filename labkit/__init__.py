"""labkit: optimizers, CIFAR data on the device, and a fast training loop for the
course *Optimization for Deep Learning*.

The package mirrors the book: each module's docstring names the chapter and the
equations it implements.
"""

__version__ = "0.2.0"

# Light: labkit.record imports neither torch nor IPython at import time.
from labkit.record import record  # noqa: E402

__all__ = ["__version__", "record"]
