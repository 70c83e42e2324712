"""scikit-learn's handwritten digits as a :class:`labkit.data.CifarData`: the cpu profile's data.

Book: no chapter of its own; the ``cpu`` profile of every training lab and the figures of
chapters 4, 7 and 8 that the book computes at build time train on the data this module provides.

The data set is the test part of the UCI "Optical Recognition of Handwritten Digits" collection
(Alpaydin & Kaynak, 1998) as scikit-learn ships it inside its wheel
(``sklearn.datasets.load_digits``): 1,797 grey images of 8 x 8 pixels, values 0..16, ten
classes 0..9 with 174 to 183 images each. Nothing is downloaded, so it works on CPU-only hubs
and CI machines that cannot fetch CIFAR.

How it is held. :func:`load_digits` scales the pixel values to uint8 0..255 (``round(v * 255 /
16)``), so that the images go through exactly the CIFAR path of :mod:`labkit.data` (uint8
tensors on the device, :func:`labkit.data.normalize`, :func:`labkit.data.augment`) with one
channel: ``train_x``/``test_x`` are uint8 of shape (N, 1, 8, 8). The split is fixed: a stratified
25 % test set (scikit-learn's default test fraction) drawn with seed :data:`SPLIT_SEED`, giving
1,347 training and 450 test images; every run of every lab sees the same split. ``mean``/``std``
are the pixel statistics of that training set, in [0, 1] units (:data:`MEAN`, :data:`STD`).

Augmentation (:data:`AUGMENT_PAD`, :data:`AUGMENT_FLIP`): a random shift of at most one pixel in
each direction (zero padding, :func:`labkit.data.augment` with ``pad=1``: one pixel is an eighth
of the image, as CIFAR's four pixels are an eighth of 32), and no mirror image, since a mirrored
2, 3, 4, 5, 6, 7 or 9 is not that digit. No rotation by default.
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.data import CifarData

__all__ = [
    "AUGMENT_FLIP",
    "AUGMENT_PAD",
    "DIGITS_CLASSES",
    "MEAN",
    "N_TEST",
    "N_TRAIN",
    "SKLEARN_MISSING",
    "SPLIT_SEED",
    "STD",
    "TEST_FRACTION",
    "digits_arrays",
    "load_digits",
]

DIGITS_CLASSES = tuple(str(d) for d in range(10))
#: The seed of the fixed stratified train/test split.
SPLIT_SEED = 0
#: The test fraction of the split (scikit-learn's default for ``train_test_split``).
TEST_FRACTION = 0.25
N_TRAIN, N_TEST = 1347, 450
#: Pixel mean and standard deviation of the training split, values in [0, 1] (pixel / 255);
#: ``tests/test_data.py`` recomputes them from the data.
MEAN = (0.3053,)
STD = (0.3758,)
#: The augmentation of the digits: shifts of at most one pixel, no mirror image.
AUGMENT_PAD = 1
AUGMENT_FLIP = False

SKLEARN_MISSING = (
    "the handwritten digits (dataset 'digits', the cpu profile) come with scikit-learn, which is "
    "not installed: run `pip install scikit-learn==1.9.1` (it is pinned in requirements.txt; "
    "`bash .ci/setup` installs it)"
)


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split as numpy arrays: ``train_x, train_y, test_x, test_y``.

    Images are uint8 of shape (N, 1, 8, 8) with values 0..255, labels int64 of shape (N,).

    Raises:
        ImportError: scikit-learn is not installed (the message says how to install it).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(SKLEARN_MISSING) from err
    bunch = sk_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    x = images.astype(np.uint8).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return (np.ascontiguousarray(train_x), np.ascontiguousarray(train_y),
            np.ascontiguousarray(test_x), np.ascontiguousarray(test_y))


def load_digits(device: str | torch.device = "cpu") -> CifarData:
    """The handwritten digits, split into 1,347 training and 450 test images, on ``device``.

    Returns a :class:`labkit.data.CifarData` named ``"digits"`` with uint8 images of shape
    (N, 1, 8, 8), classes ``"0"`` ... ``"9"`` and the training split's :data:`MEAN`/:data:`STD`.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``device`` is not a valid device.
    """
    train_x, train_y, test_x, test_y = digits_arrays()
    data = CifarData(
        name="digits",
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        classes=list(DIGITS_CLASSES),
        mean=MEAN,
        std=STD,
    )
    return data.to(device)
