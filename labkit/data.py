"""CIFAR-10 and CIFAR-100 held as tensors on the device, plus on-device batching and augmentation.

Book: no chapter of its own; every lab trains on the data this module provides.

The datasets are those of Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny
Images", University of Toronto technical report. :func:`load_cifar` reads the official
*python-format* files (``cifar-10-batches-py/`` and ``cifar-100-python/``) with its own reader
and returns a :class:`CifarData` whose image tensors are ``uint8`` of shape ``(N, 3, 32, 32)``
(channels R, G, B; values 0..255) and whose labels are ``int64`` of shape ``(N,)``.

How the data lives on the device. Following airbench (Keller Jordan, 2024, "94% on CIFAR-10 in
3.29 seconds on a single GPU", arXiv:2404.00498), the whole dataset is moved to the device once
(150 MiB for CIFAR-10's training set) and stays there for the whole run. There is no
``DataLoader``, no worker process and no PIL: an epoch is a random permutation of indices
(:func:`iterate_batches`), the training loop gathers ``x[idx]`` itself, and random crops and flips
are applied to a whole batch at once by :func:`augment` (random rotations by
:func:`random_rotate`), which draw their randomness from a seeded ``torch.Generator`` so that
runs are reproducible. A typical step::

    data = load_cifar("cifar10", device="auto")
    gen = torch.Generator(device=data.train_x.device).manual_seed(0)
    for idx in iterate_batches(len(data.train_y), 512, gen):
        x = normalize(augment(data.train_x[idx], gen), data.mean, data.std)
        y = data.train_y[idx]

Where the files come from. ``root=None`` means :func:`default_data_root` (``$LABKIT_DATA`` or
``~/.cache/labkit/data``). ``download=True`` asks torchvision to fetch the official archive and
check its MD5 sums; the files are then read by this module. :func:`make_fake_cifar` writes a small
learnable dataset in exactly the official on-disk layout, so tests and the "smoke" lab profile
run the same loading path as the real data on machines without network; it writes into a
temporary folder that is renamed into place, under a lock, so a killed or concurrent first run
never leaves a half-written data set (:func:`ensure_fake_cifar` detects and rewrites one).

The first load converts the pickles into ``<root>/<folder>/labkit-cache.pt``; later loads read that
file instead, as long as the sizes and modification times of the source files are unchanged. The
cache is written atomically and skipped silently where the folder is read-only; a damaged cache
is ignored and rebuilt.

Security. The official format is Python pickle, and unpickling a file can run code. The reader
refuses every pickled global other than the few numpy names the CIFAR files need, but still:
only point ``root`` / ``LABKIT_DATA`` at folders you trust. The cache is read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labkit import store

__all__ = [
    "CifarData",
    "DatasetError",
    "augment",
    "crop_flip",
    "dataset_folder",
    "default_data_root",
    "ensure_fake_cifar",
    "is_generated",
    "iterate_batches",
    "load_cifar",
    "make_fake_cifar",
    "normalize",
    "num_batches",
    "random_rotate",
    "rotate",
]

DATASET_NAMES = ("cifar10", "cifar100")
CACHE_FILENAME = "labkit-cache.pt"
#: Written last into a generated data set's folder (its sizes and seed, each file's size): a
#: folder without it, or whose files do not have those sizes, is not whole.
GENERATED_MARKER = "labkit-generated.json"
_CACHE_VERSION = 1
_SYNTHETIC_TAG = "labkit synthetic"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# CIFAR-100's 20 superclasses and their 5 classes each, as listed on the dataset's web page
# (https://www.cs.toronto.edu/~kriz/cifar.html) with the file's spelling of the names.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
# The files list the fine classes alphabetically and the superclasses in the order above.
CIFAR100_CLASSES = tuple(sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names))
CIFAR100_COARSE_CLASSES = tuple(CIFAR100_SUPERCLASSES)


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


_SPECS = {
    "cifar10": _Spec(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        classes=CIFAR10_CLASSES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        torchvision_class="CIFAR10",
    ),
    "cifar100": _Spec(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        classes=CIFAR100_CLASSES,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        torchvision_class="CIFAR100",
    ),
}


class DatasetError(ValueError):
    """A CIFAR file exists but its content is not what the official format holds."""


def _spec(name: str) -> _Spec:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"unknown dataset name={name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _SPECS[name]


def dataset_folder(root: str | os.PathLike, name: str) -> Path:
    """The folder of dataset ``name`` under ``root`` in the official layout (it may not exist).

    ``<root>/cifar-10-batches-py`` for ``"cifar10"``, ``<root>/cifar-100-python`` for
    ``"cifar100"``.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASET_NAMES`.
    """
    return Path(root).expanduser() / _spec(name).folder


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(
            f"device must be 'auto', a device string or a torch.device, got {type(device).__name__}"
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device={device!r} is not a valid device; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        ) from err


@dataclasses.dataclass(repr=False)
class CifarData:
    """A CIFAR dataset as tensors.

    ``train_x``/``test_x``: uint8, shape (N, 3, 32, 32), RGB values 0..255.
    ``train_y``/``test_y``: int64, shape (N,), class indices into ``classes``.
    ``mean``/``std``: the published per-channel statistics of the real training set, in [0, 1]
    units (pixel / 255), for :func:`normalize`. Generated data uses the same constants.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: str | torch.device) -> CifarData:
        """Return a copy whose four tensors live on ``device`` ('auto', a string or a device)."""
        dev = _resolve_device(device)
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(dev),
            train_y=self.train_y.to(dev),
            test_x=self.test_x.to(dev),
            test_y=self.test_y.to(dev),
        )

    def __repr__(self) -> str:
        return (
            f"CifarData(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )


def default_data_root() -> Path:
    """``$LABKIT_DATA`` if set and non-empty, else ``~/.cache/labkit/data``."""
    env = os.environ.get("LABKIT_DATA", "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "labkit" / "data"


# ---------------------------------------------------------------------------------------------
# Reading the official python-format files


# The only globals a CIFAR pickle refers to (numpy arrays, written by Python 2 or 3).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}; a CIFAR file holds only numpy "
                "arrays, lists, numbers and strings"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    # encoding="bytes" as in the dataset's readme: the files were written by Python 2, so keys and
    # names come back as bytes.
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as err:
        raise DatasetError(
            f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); the file is "
            f"corrupt or truncated: delete {path.parent} and download it again"
        ) from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _get(entry: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in entry:
            return entry[k]
    found = ", ".join(sorted(repr(k) for k in entry))
    raise DatasetError(f"{path}: missing key {key!r} (found keys: {found})")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    data = _get(entry, "data", path)
    if not isinstance(data, np.ndarray):
        raise DatasetError(
            f"{path}: 'data' is a {type(data).__name__}, expected a numpy uint8 array (N, 3072)"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: 'data' has dtype {data.dtype} and shape {tuple(data.shape)}; expected uint8 "
            "of shape (N, 3072), i.e. N images of 3 x 32 x 32"
        )
    raw = _get(entry, label_key, path)
    try:
        labels = np.asarray(raw)
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers ({err})") from err
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(
            f"{path}: {label_key!r} must be a flat list of integers, found dtype {labels.dtype} "
            f"and shape {labels.shape}"
        )
    if len(labels) != len(data):
        raise DatasetError(
            f"{path}: {len(data)} images but {len(labels)} {label_key!r}; the lengths must match"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: {label_key!r} range over [{labels.min()}, {labels.max()}]; valid labels are "
            f"0..{num_classes - 1}"
        )
    return data, labels.astype(np.int64)


def _read_names(path: Path, key: str, num_classes: int) -> list[str]:
    names = _get(_unpickle(path), key, path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{path}: {key!r} must be a list of strings")
    if len(names) != num_classes:
        raise DatasetError(f"{path}: {key!r} has {len(names)} names, expected {num_classes}")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: {key!r} holds a name that is not UTF-8 ({err})") from err


def _read_split(spec: _Spec, folder: Path, files: Sequence[str]) -> tuple[torch.Tensor, ...]:
    parts = [_read_batch(folder / f, spec.label_key, len(spec.classes)) for f in files]
    data = np.concatenate([p[0] for p in parts])  # a fresh, writable, contiguous array
    labels = np.concatenate([p[1] for p in parts])
    # Each row holds the R plane, then G, then B, each 32 x 32 in row-major order.
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels)


def _parse_folder(spec: _Spec, folder: Path) -> dict[str, Any]:
    train_x, train_y = _read_split(spec, folder, spec.train_files)
    test_x, test_y = _read_split(spec, folder, spec.test_files)
    classes = _read_names(folder / spec.meta_file, spec.names_key, len(spec.classes))
    return {
        "train_x": train_x,
        "train_y": train_y,
        "test_x": test_x,
        "test_y": test_y,
        "classes": classes,
    }


# ---------------------------------------------------------------------------------------------
# The converted tensor cache


def _source_stats(folder: Path, spec: _Spec) -> dict[str, list[int]]:
    stats = {}
    for f in spec.files:
        st = (folder / f).stat()
        stats[f] = [st.st_size, st.st_mtime_ns]
    return stats


def _load_cache(path: Path, spec: _Spec, sources: dict[str, list[int]]) -> dict[str, Any] | None:
    """The cached tensors if the cache exists, is intact and matches ``sources``; else None."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # corrupt or from an incompatible version: rebuild from the source files
    if not isinstance(obj, dict) or obj.get("version") != _CACHE_VERSION:
        return None
    if obj.get("sources") != sources:
        return None
    try:
        ok = all(
            isinstance(obj[f"{s}_x"], torch.Tensor)
            and obj[f"{s}_x"].dtype == torch.uint8
            and obj[f"{s}_x"].shape[1:] == (3, 32, 32)
            and isinstance(obj[f"{s}_y"], torch.Tensor)
            and obj[f"{s}_y"].dtype == torch.int64
            and obj[f"{s}_y"].shape == obj[f"{s}_x"].shape[:1]
            for s in ("train", "test")
        )
        ok = ok and isinstance(obj["classes"], list) and len(obj["classes"]) == len(spec.classes)
    except KeyError:
        return None
    return obj if ok else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_cache(path: Path, arrays: dict[str, Any], sources: dict[str, list[int]]) -> None:
    payload = {**arrays, "sources": sources, "version": _CACHE_VERSION}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".labkit-cache-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared data folder
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        # A read-only (e.g. shared instructor) folder or a full disk: run without a cache.
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Loading


def _download(spec: _Spec, root: Path) -> None:
    try:
        from torchvision import datasets
    except ImportError as err:
        raise ImportError(
            "load_cifar(download=True) needs torchvision (pip install torchvision); or copy "
            f"{spec.folder} into {root} yourself and use download=False"
        ) from err
    root.mkdir(parents=True, exist_ok=True)
    try:
        # torchvision checks the MD5 sums, downloads only when they fail, and extracts the archive.
        getattr(datasets, spec.torchvision_class)(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"downloading {spec.title} into {root} failed ({type(err).__name__}: {err}). Without "
            f"network, point LABKIT_DATA (command line: --data-root) at a folder that contains "
            f"{spec.folder}"
        ) from err


def load_cifar(
    name: str,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = False,
    cache: bool = True,
) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 into tensors on ``device``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: the folder that contains ``cifar-10-batches-py`` / ``cifar-100-python``;
            ``None`` means :func:`default_data_root`.
        device: ``"auto"`` (CUDA if available, else CPU), a device string or a ``torch.device``.
        download: let torchvision fetch and extract the official archive when the files are
            missing or fail its MD5 checksums (it then replaces them, so generated data and
            ``download=True`` do not mix); nothing is fetched when the real files are in place.
        cache: read and write ``<root>/<folder>/labkit-cache.pt`` (see the module docstring).

    Raises:
        ValueError: unknown ``name`` or ``device``.
        FileNotFoundError: the dataset's folder or one of its files is missing.
        DatasetError: a file exists but is corrupt, truncated or not in the official format.
    """
    spec = _spec(name)
    dev = _resolve_device(device)
    for arg, value in (("download", download), ("cache", cache)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be True or False, got {value!r}")
    root = default_data_root() if root is None else Path(root).expanduser()
    folder = root / spec.folder
    if download:
        _download(spec, root)
    fixes = (
        "Fix it in one of two ways: fetch the official files with `python -m labkit data "
        f"--download {spec.name}` in a terminal (needs internet; in Python: download=True), or "
        f"point LABKIT_DATA (command line: --data-root) at a folder that contains {spec.folder}"
    )
    if not folder.is_dir():
        hint = ""
        if (root / spec.files[0]).is_file():
            hint = (
                f" ({root} itself looks like the dataset folder: root must be the folder that "
                f"contains it, here {root.parent})"
            )
        raise FileNotFoundError(
            f"{spec.title} not found: searched {folder}, which does not exist{hint}. {fixes}"
        )
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec.title} in {folder} is incomplete: missing {', '.join(missing)}. {fixes}"
        )

    sources = _source_stats(folder, spec)
    cache_path = folder / CACHE_FILENAME
    arrays = _load_cache(cache_path, spec, sources) if cache else None
    if arrays is None:
        arrays = _parse_folder(spec, folder)
        if cache:
            _save_cache(cache_path, arrays, sources)
    data = CifarData(
        name=spec.name,
        train_x=arrays["train_x"],
        train_y=arrays["train_y"],
        test_x=arrays["test_x"],
        test_y=arrays["test_y"],
        classes=list(arrays["classes"]),
        mean=spec.mean,
        std=spec.std,
    )
    return data.to(dev)


# ---------------------------------------------------------------------------------------------
# Generated data in the official on-disk layout


def _py2_pickle(obj: Any) -> bytes:
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) wrote the official files.

    Python 3's pickle cannot write Python 2 ``str`` objects (BINSTRING opcodes), which load as
    ``bytes`` under ``encoding="bytes"`` and as ``str`` under ``encoding="latin1"``; the official
    files rely on exactly that. ``str`` and ``bytes`` values are both written as such strings.
    """
    out = [b"\x80\x02"]
    _emit(obj, out)
    out.append(b".")
    return b"".join(out)


def _emit(obj: Any, out: list[bytes]) -> None:
    if obj is None:
        out.append(b"N")
    elif isinstance(obj, bool):
        out.append(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out.append(b"K" + bytes([obj]))
        elif 0 <= obj < 65536:
            out.append(b"M" + struct.pack("<H", obj))
        else:
            out.append(b"J" + struct.pack("<i", obj))
    elif isinstance(obj, (str, bytes)):
        b = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(b) < 256:
            out.append(b"U" + bytes([len(b)]) + b)
        else:
            out.append(b"T" + struct.pack("<i", len(b)) + b)
    elif isinstance(obj, tuple):
        out.append(b"(")
        for item in obj:
            _emit(item, out)
        out.append(b"t")
    elif isinstance(obj, list):
        out.append(b"]")
        if obj and all(type(v) is int and 0 <= v < 256 for v in obj):
            # Labels: one BININT1 opcode per entry, built in one go.
            ops = np.empty((len(obj), 2), dtype=np.uint8)
            ops[:, 0] = ord("K")
            ops[:, 1] = obj
            out.extend([b"(", ops.tobytes(), b"e"])
        elif obj:
            out.append(b"(")
            for item in obj:
                _emit(item, out)
            out.append(b"e")
    elif isinstance(obj, dict):
        out.append(b"}")
        if obj:
            out.append(b"(")
            for k, v in obj.items():
                _emit(k, out)
                _emit(v, out)
            out.append(b"u")
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        # numpy's own reduction: _reconstruct(ndarray, (0,), 'b'), then BUILD with the state
        # (1, shape, dtype('uint8'), is_fortran=False, raw bytes).
        out.append(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
        _emit((0,), out)
        _emit("b", out)
        out.append(b"tR(")
        _emit(1, out)
        _emit(tuple(obj.shape), out)
        out.append(b"cnumpy\ndtype\n")
        _emit(("u1", 0, 1), out)
        out.append(b"R")
        _emit((3, "|", None, None, None, -1, -1, 0), out)
        out.append(b"b")
        _emit(False, out)
        _emit(np.ascontiguousarray(obj).tobytes(), out)
        out.append(b"tb")
    else:
        raise TypeError(f"cannot write {type(obj).__name__} in the CIFAR pickle format")


def _class_signatures(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class colour offset in [-1, 1]^3 and plaid frequencies (cycles per 32 pixels).

    Fixed for a given number of classes (independent of the seed), so that every split and every
    seed draws the same classes.
    """
    rng = np.random.default_rng(2009 + num_classes)
    colors = rng.uniform(-1.0, 1.0, size=(num_classes, 3))
    c = np.arange(num_classes)
    return colors, 1 + c % 4, 1 + (c // 4) % 4


def _synthesize(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list]:
    """``n`` images (uint8, (n, 3072)) and balanced labels in 0..num_classes-1.

    Image = grey + class colour + class plaid ``cos(2 pi fy (y+sy)/32) cos(2 pi fx (x+sx)/32)``
    + noise. The plaid has whole periods over 32 pixels, so shifts (random per image, up to
    4 pixels like the crop augmentation) and horizontal flips only change its phase.
    """
    labels = rng.permutation(np.arange(n) % num_classes)
    colors, fx, fy = _class_signatures(num_classes)
    shift = rng.integers(-4, 5, size=(2, n))
    pos = np.arange(32)
    rows = np.cos(2 * np.pi * fy[labels, None] * (pos + shift[0, :, None]) / 32)
    cols = np.cos(2 * np.pi * fx[labels, None] * (pos + shift[1, :, None]) / 32)
    amplitude = rng.uniform(0.7, 1.0, size=(n, 1, 1))
    plaid = (60.0 * amplitude * rows[:, :, None] * cols[:, None, :]).astype(np.float32)
    color = colors[labels] + rng.uniform(-0.1, 0.1, size=(n, 3))
    base = (128.0 + 50.0 * color).astype(np.float32)[:, :, None, None]
    img = rng.standard_normal(size=(n, 3, 32, 32), dtype=np.float32)  # noise, sd 20 below
    img *= 20.0
    img += base
    img += plaid[:, None]
    np.clip(np.rint(img, out=img), 0, 255, out=img)
    return img.astype(np.uint8).reshape(n, 3 * 32 * 32), labels.tolist()


def _batch_label(path: Path) -> Any:
    """The ``batch_label`` of an existing CIFAR batch file (None when it has none).

    Raises:
        DatasetError: the file is not a readable CIFAR pickle.
    """
    entry = _unpickle(path)
    label = entry.get(b"batch_label", entry.get("batch_label"))
    return label.decode("latin1") if isinstance(label, bytes) else label


def _check_not_real(folder: Path, spec: _Spec) -> None:
    """Refuse to overwrite a dataset that make_fake_cifar did not write (e.g. the real one)."""
    path = folder / spec.test_files[0]
    if not path.is_file():
        return
    try:
        label = _batch_label(path)
    except DatasetError:
        return  # unreadable, so nothing worth keeping
    if not (isinstance(label, str) and label.startswith(_SYNTHETIC_TAG)):
        raise FileExistsError(
            f"{folder} already holds a {spec.title} dataset that make_fake_cifar did not write "
            f"(batch_label {label!r} in {path.name}); refusing to overwrite it: pass another root"
        )

def is_generated(root: str | os.PathLike, name: str) -> bool:
    """Whether the ``name`` dataset under ``root`` was written by :func:`make_fake_cifar`.

    Reads the batch label of the test file ("labkit synthetic ..."); False when the file is
    missing or unreadable.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASET_NAMES`.
    """
    path = dataset_folder(root, name) / _spec(name).test_files[0]
    try:
        label = _batch_label(path) if path.is_file() else None
    except DatasetError:
        return False
    return isinstance(label, str) and label.startswith(_SYNTHETIC_TAG)


def make_fake_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    n_train: int = 512,
    n_test: int = 256,
    seed: int = 0,
) -> Path:
    """Write a small learnable dataset in the official python-format layout; return its folder.

    The folder (``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``) holds the official
    file names and pickle keys with the official dtypes, written the way Python 2 wrote the
    originals, so :func:`load_cifar` and torchvision both read it. CIFAR-10's training set is
    split over ``data_batch_1..5`` as evenly as possible. Each class has a fixed colour and a
    plaid pattern of its own frequencies; each image adds a random shift of up to 4 pixels, an
    amplitude and colour jitter, and Gaussian noise (sd 20 grey levels). Labels are balanced
    (class counts differ by at most one) and shuffled. The same seed gives the same bytes.

    The batch labels start with "labkit synthetic", and an existing folder whose test file does
    not is never overwritten (FileExistsError), so the real data is safe.
    """
    spec = _spec(name)
    for arg, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an integer, got {type(value).__name__}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must both be at least 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer")
    folder = dataset_folder(root, name)
    with _generation_lock(folder):
        _check_not_real(folder, spec)
        _generate(folder, spec, n_train, n_test, seed)
    return folder


def _generate(folder: Path, spec: _Spec, n_train: int, n_test: int, seed: int) -> None:
    """Write the generated data set into a temporary folder beside ``folder``, then rename it
    into place, so ``folder`` is never half written (hold :func:`_generation_lock`)."""
    num_classes = len(spec.classes)
    rng = np.random.default_rng(seed)
    train_x, train_y = _synthesize(rng, n_train, num_classes)
    test_x, test_y = _synthesize(rng, n_test, num_classes)

    def filenames(labels: list[int], start: int) -> list[str]:
        return [f"{spec.classes[c]}_s_{start + i:06d}.png" for i, c in enumerate(labels)]

    files: dict[str, dict[str, Any]] = {}
    if spec.name == "cifar10":
        bounds = np.linspace(0, n_train, len(spec.train_files) + 1).round().astype(int)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            files[spec.train_files[i]] = {
                "batch_label": f"{_SYNTHETIC_TAG} training batch {i + 1} of 5",
                "labels": train_y[lo:hi],
                "data": train_x[lo:hi],
                "filenames": filenames(train_y[lo:hi], int(lo)),
            }
        files["test_batch"] = {
            "batch_label": f"{_SYNTHETIC_TAG} testing batch 1 of 1",
            "labels": test_y,
            "data": test_x,
            "filenames": filenames(test_y, 0),
        }
        files["batches.meta"] = {
            "num_cases_per_batch": int(bounds[1] - bounds[0]),
            "label_names": list(spec.classes),
            "num_vis": 3 * 32 * 32,
        }
    else:
        coarse_of = {
            fine: k for k, names in enumerate(CIFAR100_SUPERCLASSES.values()) for fine in names
        }
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            files[split] = {
                "filenames": filenames(y, 0),
                "batch_label": f"{_SYNTHETIC_TAG} {split}ing batch 1 of 1",
                "fine_labels": y,
                "coarse_labels": [coarse_of[spec.classes[c]] for c in y],
                "data": x,
            }
        files["meta"] = {
            "fine_label_names": list(spec.classes),
            "coarse_label_names": list(CIFAR100_COARSE_CLASSES),
        }

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared data folder
    try:
        sizes = {}
        for fname, entry in files.items():
            payload = _py2_pickle(entry)
            (tmp / fname).write_bytes(payload)
            sizes[fname] = len(payload)
        marker = {"name": spec.name, "n_train": n_train, "n_test": n_test, "seed": seed,
                  "sizes": sizes}
        (tmp / GENERATED_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        if folder.exists():  # a generated (checked by the caller) or broken folder: replace it
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old.tmp")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(folder: Path) -> None:
    """Temporary folders of a generator that was killed (none runs: the lock is held)."""
    for p in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _generation_lock(folder: Path) -> Iterator[None]:
    """Wait for, then hold, the lock that serializes generating ``folder`` across processes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.with_name(f".{folder.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        store.lock_file(fd, wait=True)
        yield
    finally:
        os.close(fd)


def _generated_intact(folder: Path, spec: _Spec) -> bool:
    """Whether ``folder`` holds a whole data set: one of :func:`make_fake_cifar` with its
    completion marker and every file at its recorded size, or (written before labkit kept
    the marker, or by other means) a folder whose every file reads."""
    marker = folder / GENERATED_MARKER
    if marker.is_file():
        try:
            sizes = json.loads(marker.read_text())["sizes"]
            return all((folder / f).is_file() and (folder / f).stat().st_size == sizes[f]
                       for f in spec.files)
        except (OSError, ValueError, KeyError, TypeError):
            return False
    try:
        _parse_folder(spec, folder)
    except (OSError, DatasetError):
        return False
    return True


def ensure_fake_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    n_train: int = 512,
    n_test: int = 256,
    seed: int = 0,
) -> Path:
    """The folder of the generated data set ``name`` under ``root``, written by
    :func:`make_fake_cifar` unless a whole one is already there; return it.

    Safe when several processes start at once (they wait for one another) and after a
    generator was killed: a half-written folder is detected and written again. A whole data
    set already there (of any size, e.g. the real files) is left as it is.
    """
    spec = _spec(name)
    folder = dataset_folder(root, name)
    if (folder / GENERATED_MARKER).is_file() and _generated_intact(folder, spec):
        return folder  # the common case, without waiting for the lock
    with _generation_lock(folder):
        if folder.is_dir() and _generated_intact(folder, spec):
            return folder
        _check_not_real(folder, spec)
        _generate(folder, spec, n_train, n_test, seed)
    return folder


# ---------------------------------------------------------------------------------------------
# Batching: index permutations on the device


def _check_count(arg: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{arg} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{arg}={value} must be at least {minimum}")


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch, ``ceil(n / batch_size)``: the last partial batch counts."""
    _check_count("n", n, 0)
    _check_count("batch_size", batch_size, 1)
    return -(-int(n) // int(batch_size))


def iterate_batches(
    n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True
) -> Iterator[torch.Tensor]:
    """One epoch of index batches (int64 tensors on ``generator.device``).

    With ``shuffle`` the order is a fresh random permutation of ``0..n-1`` drawn from
    ``generator`` when this function is called, so consecutive calls (epochs) give different
    orders and a generator seeded the same way gives the same sequence of epochs. Without
    ``shuffle`` the order is ``0..n-1`` and the generator is only consulted for its device. All
    batches hold ``batch_size`` indices except the last, which holds the remainder (it is kept,
    not dropped); there are ``num_batches(n, batch_size)`` of them.
    """
    count = num_batches(n, batch_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device
    if shuffle:
        order = torch.randperm(int(n), generator=generator, device=device)
    else:
        order = torch.arange(int(n), device=device)
    if count == 0:
        return iter(())
    return iter(order.split(int(batch_size)))


# ---------------------------------------------------------------------------------------------
# Augmentation on the device


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_images(x: Any, arg: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{arg} must have shape (N, C, H, W), got shape {tuple(x.shape)}")


def _crop_flip(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    pos_h = torch.arange(h, device=x.device)
    pos_w = torch.arange(w, device=x.device)
    rows = top[:, None] + pos_h  # (N, H): rows of the padded image to keep
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - pos_w, pos_w)  # (N, W)
    # Two gathers with expanded (not copied) index tensors: all images at once, no Python loop.
    xp = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def crop_flip(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    pad: int = 4,
) -> torch.Tensor:
    """Deterministic part of :func:`augment`: crop, then mirror, each image as told.

    Image ``i`` of ``x`` (N, C, H, W) is zero-padded by ``pad`` pixels on every side, the
    H x W window whose top-left corner is at (``top[i]``, ``left[i]``) of the padded image is
    kept (offsets in ``0..2*pad``; ``pad`` is the centre, i.e. no shift), and the window is
    mirrored left-right where ``flip[i]`` is true. Same dtype and shape as ``x``.
    """
    _check_images(x)
    _check_count("pad", pad, 0)
    n = x.shape[0]
    for arg, t in (("top", top), ("left", left), ("flip", flip)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{arg} must be a tensor of shape ({n},), got {shape}")
    for arg, t in (("top", top), ("left", left)):
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"{arg} must be an integer tensor, got {t.dtype}")
        if n and (int(t.min()) < 0 or int(t.max()) > 2 * pad):
            raise ValueError(
                f"{arg} ranges over [{int(t.min())}, {int(t.max())}]; with pad={pad} offsets "
                f"must lie in 0..{2 * pad}"
            )
    if flip.dtype != torch.bool:
        raise TypeError(f"flip must be a bool tensor, got {flip.dtype}")
    dev = x.device
    return _crop_flip(x, top.to(dev, torch.int64), left.to(dev, torch.int64), flip.to(dev), pad)


def augment(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, independently per image.

    ``x``: (N, C, H, W), uint8 or floating; returned with the same dtype, shape and device.
    Each image gets its own crop offset, uniform in ``-pad..pad`` pixels in each direction, and
    (with ``flip``) is mirrored left-right with probability 1/2; all randomness comes from
    ``generator`` (on any device), so a seeded generator reproduces a run exactly.

    Padding: the padded border is zeros of ``x``'s own dtype. Applied to uint8 images, as
    intended, that is black, exactly like torchvision's ``RandomCrop(32, padding=4)`` before
    ``Normalize`` in the usual CIFAR ResNet recipe (He et al. 2016, arXiv:1512.03385); applied
    to normalized images it would be the mean colour instead. (airbench reflects the border
    instead; labkit keeps the black border of the papers' code, whose CIFAR-100 runs then also
    rotate each image: :func:`random_rotate`.)
    """
    _check_images(x)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _check_count("pad", pad, 0)
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be True or False, got {flip!r}")
    n = x.shape[0]
    gdev = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gdev)
    if flip:
        mirror = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool()
    else:
        mirror = torch.zeros(n, dtype=torch.bool, device=gdev)
    dev = x.device
    return _crop_flip(x, offsets[0].to(dev), offsets[1].to(dev), mirror.to(dev), pad)


#: Images per call of ``grid_sample`` in :func:`rotate`: bounds the float32 copies (about
#: 110 MiB of work memory at 32 x 32 x 3) whatever the size of the set rotated at once.
ROTATE_CHUNK = 8192


def _rotation_grid(angles: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Sampling grids (N, H, W, 2) of ``grid_sample`` for counter-clockwise rotations.

    The same arithmetic as torchvision's tensor ``rotate`` (``center=None``, ``expand=False``),
    written for N angles at once: the inverse affine matrix [[cos a, sin a], [-sin a, cos a]]
    of a = -(angle mod 360) degrees in float64, rounded to ``dtype``; pixel-centre coordinates
    x = j - (W - 1) / 2 (and y likewise) multiplied by it with ``bmm``; the result divided by
    (W / 2, H / 2) into grid_sample's [-1, 1] (``align_corners=False``).
    """
    n, dev = angles.shape[0], angles.device
    a = torch.remainder(angles.to(torch.float64), 360.0)
    rad = -a * (math.pi / 180.0)  # Python's math.radians(-a), operation for operation
    cos, sin = torch.cos(rad).to(dtype), torch.sin(rad).to(dtype)
    zero = torch.zeros_like(cos)
    # theta^T of torchvision, rows (x, y, 1) -> columns (source x, source y)
    theta = torch.stack([cos, -sin, sin, cos, zero, zero], dim=1).view(n, 3, 2)
    theta = theta / torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=dev)
    base = torch.empty(1, h, w, 3, dtype=dtype, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(
        torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    return base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta).view(n, h, w, 2)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` of ``x`` counter-clockwise by ``angles[i]`` degrees about its centre.

    Deterministic part of :func:`random_rotate`. ``x``: (N, C, H, W), uint8 or floating;
    ``angles``: N finite numbers (degrees, any range). Returns the same dtype, shape and
    device. Nearest-neighbour sampling, output of the input's size (corners cut off), pixels
    whose source lies outside the image set to 0 (black for uint8 images): the defaults of
    torchvision's ``RandomRotation`` (interpolation NEAREST, ``expand=False``, ``center=None``,
    ``fill=0``).

    Equal to ``torchvision.transforms.v2.functional.rotate(x[i], float(angles[i]))``, bit for
    bit: the grids are computed with the same float32 operations and sampled with the same
    ``torch.nn.functional.grid_sample`` call, only for all images at once (in chunks of
    :data:`ROTATE_CHUNK`). Where a source position lies within float32 round-off of the
    midpoint between two pixels, which pixel wins depends on that arithmetic, so the match is
    exact only against torchvision on the same device. (Pillow's ``Image.rotate``, which the
    papers' data loaders applied to PIL images, computes positions in 16.16 fixed point and
    picks the other neighbour for about 1.5 pixels in 10,000: those whose source lies within
    3e-4 pixel of such a midpoint.)
    """
    _check_images(x)
    n, c, h, w = x.shape
    if not isinstance(angles, torch.Tensor) or angles.shape != (n,):
        shape = tuple(angles.shape) if isinstance(angles, torch.Tensor) else type(angles).__name__
        raise ValueError(f"angles must be a tensor of shape ({n},), got {shape}")
    if not (angles.dtype.is_floating_point or angles.dtype in _INT_DTYPES):
        raise TypeError(f"angles must be a real tensor (degrees), got {angles.dtype}")
    if n and not bool(torch.isfinite(angles).all()):
        raise ValueError("angles must be finite numbers of degrees; got inf or nan")
    work = x.dtype if x.dtype.is_floating_point else torch.float32
    angles = angles.to(x.device)
    out = torch.empty_like(x)
    for i in range(0, n, ROTATE_CHUNK):
        xs = x[i : i + ROTATE_CHUNK]
        grid = _rotation_grid(angles[i : i + ROTATE_CHUNK], h, w, work)
        rotated = F.grid_sample(
            xs.to(work), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        out[i : i + ROTATE_CHUNK] = rotated if xs.dtype == work else rotated.round_()
    return out


def random_rotate(
    x: torch.Tensor, generator: torch.Generator, degrees: float = 15.0
) -> torch.Tensor:
    """Rotate each image of ``x`` by its own angle, uniform in [-degrees, degrees].

    torchvision's ``RandomRotation(degrees)`` with its defaults, for a whole set of images at
    once (:func:`rotate`; the angles are drawn like its ``uniform_``, in float32). ``x``:
    (N, C, H, W), uint8 or floating; all randomness comes from ``generator``. Applied to
    uint8 images after :func:`augment`, this is the CIFAR-100 recipe of Sato & Iiduka's code
    (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``RandomRotation(15)``, then
    ``ToTensor`` and ``Normalize``).
    """
    _check_images(x)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(degrees, bool) or not isinstance(degrees, (int, float)) or not (
        math.isfinite(degrees) and degrees >= 0
    ):
        raise ValueError(f"degrees must be a finite number >= 0, got {degrees!r}")
    angles = torch.empty(x.shape[0], device=generator.device)
    angles.uniform_(-float(degrees), float(degrees), generator=generator)
    return rotate(x, angles)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, on ``x``'s device.

    ``x``: uint8 images (..., C, H, W) with values 0..255; ``mean``/``std``: C values in [0, 1]
    units (e.g. ``CifarData.mean``/``.std``). Returns a tensor of floating ``dtype``; the
    arithmetic runs in float32 (float64 if ``dtype`` is float64) and is cast at the end.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"x must be uint8 images with values 0..255, got dtype {x.dtype}")
    if x.ndim < 3:
        raise ValueError(f"x must have shape (..., C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    channels = x.shape[-3]
    for arg, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(
                f"{arg} has {len(values)} values but x has {channels} channels (dim -3)"
            )
    if any(not math.isfinite(s) or s <= 0 for s in std):
        raise ValueError(f"std={tuple(std)} must be finite and positive")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    m = torch.tensor(mean, dtype=work, device=x.device).view(channels, 1, 1)
    s = torch.tensor(std, dtype=work, device=x.device).view(channels, 1, 1)
    return ((x.to(work) / 255.0 - m) / s).to(dtype)
