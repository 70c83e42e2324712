"""Tests for labkit.data: generated CIFAR files, the reader, the cache, batching, augmentation."""

import multiprocessing
import os
import pickle
import re
import shutil
import signal
import time
import urllib.error

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import labkit.data as D
from labkit.data import (
    CifarData,
    DatasetError,
    augment,
    crop_flip,
    default_data_root,
    iterate_batches,
    load_cifar,
    make_fake_cifar,
    normalize,
    num_batches,
    random_rotate,
    rotate,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CIFAR10_FILES = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
CIFAR100_FILES = {"train", "test", "meta"}
# make_fake_cifar writes its completion marker last, beside the official files.
GENERATED = {D.GENERATED_MARKER}

# The fine -> coarse label map of the real CIFAR-100 files (fine labels 0..99 in file order),
# written out independently of labkit's superclass table.
REAL_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    # The tensors here are tiny; on a shared 2-core runner, intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # as in the dataset's readme


def write_py3_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ---------------------------------------------------------------------------------------------
# make_fake_cifar: the official on-disk layout


def test_fake_cifar10_layout_keys_and_dtypes(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=13, n_test=7, seed=1)
    assert folder == tmp_path / "cifar-10-batches-py"
    assert {p.name for p in folder.iterdir()} == CIFAR10_FILES | GENERATED
    sizes = []
    for i in range(1, 6):
        entry = unpickle(folder / f"data_batch_{i}")
        assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
        data, labels = entry[b"data"], entry[b"labels"]
        assert isinstance(data, np.ndarray) and data.dtype == np.uint8
        assert data.ndim == 2 and data.shape[1] == 3072
        assert isinstance(labels, list) and all(type(v) is int for v in labels)
        assert len(labels) == len(data) == len(entry[b"filenames"])
        assert entry[b"batch_label"] == f"labkit synthetic training batch {i} of 5".encode()
        sizes.append(len(labels))
    assert sum(sizes) == 13 and max(sizes) - min(sizes) <= 1  # uneven split, nothing lost
    test = unpickle(folder / "test_batch")
    assert test[b"data"].shape == (7, 3072) and len(test[b"labels"]) == 7
    meta = unpickle(folder / "batches.meta")
    assert set(meta) == {b"num_cases_per_batch", b"label_names", b"num_vis"}
    assert meta[b"num_vis"] == 3072 and meta[b"num_cases_per_batch"] == sizes[0]
    assert meta[b"label_names"] == [n.encode() for n in D.CIFAR10_CLASSES]


def test_fake_cifar100_layout_keys_and_coarse_labels(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar100", n_train=300, n_test=200, seed=2)
    assert folder == tmp_path / "cifar-100-python"
    assert {p.name for p in folder.iterdir()} == CIFAR100_FILES | GENERATED
    for split, n in (("train", 300), ("test", 200)):
        entry = unpickle(folder / split)
        assert set(entry) == {
            b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"
        }
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (n, 3072)
        fine, coarse = entry[b"fine_labels"], entry[b"coarse_labels"]
        assert len(fine) == len(coarse) == n
        assert [REAL_FINE_TO_COARSE[f] for f in fine] == coarse
    meta = unpickle(folder / "meta")
    assert set(meta) == {b"fine_label_names", b"coarse_label_names"}
    fine_names = [n.decode() for n in meta[b"fine_label_names"]]
    coarse_names = [n.decode() for n in meta[b"coarse_label_names"]]
    assert len(fine_names) == len(set(fine_names)) == 100 and fine_names == sorted(fine_names)
    assert len(coarse_names) == 20
    # spot checks against the real files' names
    assert fine_names[0] == "apple" and fine_names[19] == "cattle" and fine_names[99] == "worm"
    assert coarse_names[0] == "aquatic_mammals" and coarse_names[19] == "vehicles_2"
    assert coarse_names[9] == "large_man-made_outdoor_things"


def test_fake_with_fewer_images_than_batches(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=3, n_test=1)
    sizes = [len(unpickle(folder / f"data_batch_{i}")[b"labels"]) for i in range(1, 6)]
    assert sum(sizes) == 3 and 0 in sizes
    data = load_cifar("cifar10", tmp_path)
    assert data.train_x.shape == (3, 3, 32, 32) and data.train_y.dtype == torch.int64


def test_fake_pickles_read_with_latin1_like_torchvision(tmp_path):
    # The files are written as Python 2 wrote them: str keys under latin1, bytes under "bytes".
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert set(entry) == {"batch_label", "labels", "data", "filenames"}
    assert entry["data"].dtype == np.uint8


def test_fake_is_deterministic_balanced_and_seed_dependent(tmp_path):
    a = make_fake_cifar(tmp_path / "a", "cifar10", n_train=100, n_test=30, seed=5)
    b = make_fake_cifar(tmp_path / "b", "cifar10", n_train=100, n_test=30, seed=5)
    c = make_fake_cifar(tmp_path / "c", "cifar10", n_train=100, n_test=30, seed=6)
    for f in CIFAR10_FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "test_batch").read_bytes() != (c / "test_batch").read_bytes()
    data = load_cifar("cifar10", tmp_path / "a", cache=False)
    assert torch.bincount(data.train_y, minlength=10).tolist() == [10] * 10
    assert torch.bincount(data.test_y, minlength=10).tolist() == [3] * 10
    assert data.train_x.float().std() > 20  # not a constant image


def test_fake_cifar10_is_learnable_by_a_small_cnn_with_augmentation(tmp_path):
    make_fake_cifar(tmp_path, "cifar10", n_train=512, n_test=256, seed=0)
    data = load_cifar("cifar10", tmp_path)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in iterate_batches(len(data.train_y), 64, gen):
            x = normalize(augment(data.train_x[idx], gen), data.mean, data.std)
            loss = nn.functional.cross_entropy(net(x), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net(normalize(data.test_x, data.mean, data.std)).argmax(1)
    accuracy = (pred == data.test_y).float().mean().item()
    assert accuracy > 0.7  # chance is 0.1; 0.85-0.97 over seeds 0-2


def test_make_fake_refuses_to_overwrite_a_real_dataset(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    real_like = {"batch_label": "testing batch 1 of 1", "labels": [0], "data": np.zeros((1, 3072))}
    write_py3_pickle(folder / "test_batch", real_like)
    with pytest.raises(FileExistsError, match=re.escape(str(folder))):
        make_fake_cifar(tmp_path, "cifar10")
    write_py3_pickle(folder / "test_batch", {"labels": [0], "data": np.zeros((1, 3072))})
    with pytest.raises(FileExistsError, match="did not write"):
        make_fake_cifar(tmp_path, "cifar10")  # no batch_label: not ours either
    (folder / "test_batch").write_bytes(b"garbage")  # unreadable: nothing to keep
    make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    # its own output may be regenerated in place, and stale caches are removed
    make_fake_cifar(tmp_path / "own", "cifar10", n_train=20, n_test=10)
    load_cifar("cifar10", tmp_path / "own")
    again = make_fake_cifar(tmp_path / "own", "cifar10", n_train=30, n_test=10)
    assert not (again / D.CACHE_FILENAME).exists()
    assert len(load_cifar("cifar10", tmp_path / "own").train_y) == 30


def test_make_fake_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        make_fake_cifar(tmp_path, "mnist")
    with pytest.raises(ValueError, match="n_train=0"):
        make_fake_cifar(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="seed=-1"):
        make_fake_cifar(tmp_path, seed=-1)
    with pytest.raises(TypeError, match="n_test"):
        make_fake_cifar(tmp_path, n_test=2.5)


# ---------------------------------------------------------------------------------------------
# load_cifar: round trip and agreement with torchvision


@pytest.mark.parametrize(
    "name, folder, num_classes, mean, std",
    [
        ("cifar10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ],
)
def test_load_round_trip(tmp_path, name, folder, num_classes, mean, std):
    path = make_fake_cifar(tmp_path, name, n_train=123, n_test=45, seed=3)
    assert path == tmp_path / folder
    data = load_cifar(name, tmp_path)
    assert isinstance(data, CifarData) and data.name == name
    assert data.train_x.shape == (123, 3, 32, 32) and data.test_x.shape == (45, 3, 32, 32)
    assert data.train_x.dtype == data.test_x.dtype == torch.uint8
    assert data.train_y.shape == (123,) and data.test_y.shape == (45,)
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    for y in (data.train_y, data.test_y):
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
    assert data.num_classes == len(data.classes) == num_classes
    assert all(isinstance(c, str) for c in data.classes)
    assert data.mean == mean and data.std == std
    assert data.device == torch.device("cpu")
    assert repr(data).startswith(f"CifarData(name='{name}', train=123, test=45")
    # rows are R, G, B planes of 32 x 32 in row-major order
    test_file = "test_batch" if name == "cifar10" else "test"
    raw = unpickle(path / test_file)[b"data"]
    assert torch.equal(data.test_x, torch.from_numpy(raw.reshape(45, 3, 32, 32)))
    assert torch.equal(data.test_x[7, 1, 2, 5], torch.tensor(raw[7, 1024 + 2 * 32 + 5]))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_parsing_matches_torchvision(tmp_path, monkeypatch, name):
    import torchvision.datasets.cifar as tv_cifar

    make_fake_cifar(tmp_path, name, n_train=77, n_test=33, seed=4)
    # torchvision checks the real files' MD5 sums, which generated files cannot match; the
    # parsing that follows the check is what is compared here.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    cls = tv_cifar.CIFAR10 if name == "cifar10" else tv_cifar.CIFAR100
    data = load_cifar(name, tmp_path)
    for train, x, y in ((True, data.train_x, data.train_y), (False, data.test_x, data.test_y)):
        ref = cls(str(tmp_path), train=train, download=False)
        # torchvision keeps HWC numpy arrays
        assert torch.equal(torch.from_numpy(ref.data).permute(0, 3, 1, 2), x)
        assert ref.targets == y.tolist()
        assert ref.classes == data.classes


@pytest.mark.parametrize("device", DEVICES)
def test_device_argument_and_to(tmp_path, device):
    make_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    data = load_cifar("cifar10", tmp_path, device=torch.device(device))
    assert data.train_x.device.type == device and data.test_y.device.type == device
    auto = load_cifar("cifar10", tmp_path, device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    back = data.to("cpu")
    assert back.device.type == "cpu" and torch.equal(back.train_x, data.train_x.cpu())
    assert back.classes == data.classes and back.mean == data.mean


def test_default_root_and_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == tmp_path / "home" / ".cache" / "labkit" / "data"
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "shared"))
    assert default_data_root() == tmp_path / "shared"
    make_fake_cifar(tmp_path / "shared", "cifar100", n_train=10, n_test=10)
    assert load_cifar("cifar100").num_classes == 100


# ---------------------------------------------------------------------------------------------
# download=True goes through torchvision (network is not available: torchvision is replaced)


@pytest.mark.parametrize("name, cls_name", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100")])
def test_download_calls_torchvision_then_reads_files(tmp_path, monkeypatch, name, cls_name):
    import torchvision.datasets

    calls = []

    class FakeTorchvisionCifar:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            make_fake_cifar(root, name, n_train=15, n_test=5)

    monkeypatch.setattr(torchvision.datasets, cls_name, FakeTorchvisionCifar)
    root = tmp_path / "new" / "root"
    data = load_cifar(name, root, download=True)
    assert calls == [(str(root), True, True)]
    assert len(data.train_y) == 15 and data.num_classes == (10 if name == "cifar10" else 100)


def test_download_failure_explains_the_offline_fix(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(RuntimeError, match="LABKIT_DATA.*cifar-10-batches-py"):
        load_cifar("cifar10", tmp_path, download=True)


# ---------------------------------------------------------------------------------------------
# The tensor cache


def counting_parser(monkeypatch):
    calls = []
    parse = D._parse_folder

    def wrapped(spec, folder):
        calls.append(folder)
        return parse(spec, folder)

    monkeypatch.setattr(D, "_parse_folder", wrapped)
    return calls


def test_cache_created_reused_and_invalidated(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=20)
    calls = counting_parser(monkeypatch)
    first = load_cifar("cifar10", tmp_path)
    cache = folder / D.CACHE_FILENAME
    assert cache.is_file() and len(calls) == 1
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    saved = torch.load(cache, weights_only=True)
    assert set(saved) >= {"train_x", "train_y", "test_x", "test_y", "classes", "sources"}
    assert set(saved["sources"]) == CIFAR10_FILES

    second = load_cifar("cifar10", tmp_path)  # from the cache: no parsing
    assert len(calls) == 1
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert first.classes == second.classes

    # a source file's mtime changes (same size): the cache is stale
    st = (folder / "data_batch_3").stat()
    os.utime(folder / "data_batch_3", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_cifar("cifar10", tmp_path)
    assert len(calls) == 2
    load_cifar("cifar10", tmp_path)
    assert len(calls) == 2

    # a source file's size changes: stale again, and the new content is what loads
    entry = unpickle(folder / "test_batch")
    entry[b"labels"] = entry[b"labels"][:5]
    entry[b"data"] = entry[b"data"][:5]
    write_py3_pickle(folder / "test_batch", entry)
    assert len(load_cifar("cifar10", tmp_path).test_y) == 5
    assert len(calls) == 3


def test_cache_false_neither_reads_nor_writes(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path, "cifar100", n_train=10, n_test=10)
    calls = counting_parser(monkeypatch)
    load_cifar("cifar100", tmp_path, cache=False)
    assert not (folder / D.CACHE_FILENAME).exists()
    load_cifar("cifar100", tmp_path)
    load_cifar("cifar100", tmp_path, cache=False)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"this is not a torch file"),
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: torch.save({"version": 1, "sources": {}, "train_x": torch.zeros(1)}, p),
        lambda p: torch.save([1, 2, 3], p),
    ],
    ids=["garbage", "truncated", "wrong-content", "not-a-dict"],
)
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=30, n_test=10)
    reference = load_cifar("cifar10", tmp_path, cache=False)
    load_cifar("cifar10", tmp_path)
    damage(folder / D.CACHE_FILENAME)
    calls = counting_parser(monkeypatch)
    data = load_cifar("cifar10", tmp_path)
    assert len(calls) == 1 and torch.equal(data.train_x, reference.train_x)
    load_cifar("cifar10", tmp_path)  # rebuilt cache is valid again
    assert len(calls) == 1


def test_cache_with_mismatched_shapes_is_rebuilt(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=30, n_test=10)
    load_cifar("cifar10", tmp_path)
    saved = torch.load(folder / D.CACHE_FILENAME, weights_only=True)
    saved["train_y"] = saved["train_y"][:3]
    torch.save(saved, folder / D.CACHE_FILENAME)
    calls = counting_parser(monkeypatch)
    assert len(load_cifar("cifar10", tmp_path).train_y) == 30
    assert len(calls) == 1


def test_read_only_folder_skips_the_cache_silently(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(D.tempfile, "mkstemp", refuse)
    data = load_cifar("cifar10", tmp_path)
    assert len(data.train_y) == 20
    assert {p.name for p in folder.iterdir()} == CIFAR10_FILES | GENERATED


def test_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(D.os, "replace", disk_full)
    load_cifar("cifar10", tmp_path)
    assert {p.name for p in folder.iterdir()} == CIFAR10_FILES | GENERATED


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"name='svhn'.*cifar10, cifar100"):
        load_cifar("svhn")


def test_missing_folder_says_where_and_how_to_fix(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))) as info:
        load_cifar("cifar10", tmp_path)
    message = str(info.value)
    for fix in ("download=True", "--download", "LABKIT_DATA", "--data-root"):
        assert fix in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar("cifar100", tmp_path)


def test_root_pointing_at_the_dataset_folder_itself_gets_a_hint(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    with pytest.raises(FileNotFoundError, match="root must be the folder that contains it"):
        load_cifar("cifar10", folder)


def test_missing_file_is_named(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3.*download=True"):
        load_cifar("cifar10", tmp_path)


def test_argument_type_errors(tmp_path):
    make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    with pytest.raises(ValueError, match="device='gpu'"):
        load_cifar("cifar10", tmp_path, device="gpu")
    with pytest.raises(TypeError, match="device"):
        load_cifar("cifar10", tmp_path, device=0.5)
    with pytest.raises(TypeError, match="download"):
        load_cifar("cifar10", tmp_path, download="yes")


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def _corrupt_cases():
    def set_key(key, value):
        def apply(entry):
            entry[key] = value
            return entry

        return apply

    def drop(key):
        def apply(entry):
            del entry[key]
            return entry

        return apply

    return [
        ("not-a-pickle", None, "not a readable CIFAR pickle"),
        ("truncated", None, "not a readable CIFAR pickle"),
        ("not-a-dict", None, "expected a pickled dict"),
        ("evil-global", None, "refusing to load global"),
        ("missing-labels", drop(b"labels"), "missing key 'labels'"),
        ("missing-data", drop(b"data"), "missing key 'data'"),
        ("data-list", set_key(b"data", [[0] * 3072]), "expected a numpy uint8 array"),
        ("data-shape", set_key(b"data", np.zeros((2, 3000), np.uint8)), r"shape \(2, 3000\)"),
        ("data-dtype", set_key(b"data", np.zeros((2, 3072), np.int16)), "dtype int16"),
        ("labels-range", set_key(b"labels", [0, 10]), r"valid labels are 0\.\.9"),
        ("labels-negative", set_key(b"labels", [-1, 3]), r"\[-1, 3\]"),
        ("labels-float", set_key(b"labels", [0.5, 1.0]), "flat list of integers"),
        ("lengths", set_key(b"labels", [1, 2, 3]), "lengths must match"),
    ]


@pytest.mark.parametrize("case, edit, message", _corrupt_cases(), ids=lambda v: str(v)[:20])
def test_corrupt_source_files_raise_dataset_error(tmp_path, case, edit, message):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    path = folder / "data_batch_2"
    if case == "not-a-pickle":
        path.write_text("<html>404 Not Found</html>")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "not-a-dict":
        write_py3_pickle(path, [1, 2, 3])
    elif case == "evil-global":
        write_py3_pickle(path, {"data": Evil(), "labels": [0]})
    else:
        entry = unpickle(path)
        entry[b"data"] = np.zeros((2, 3072), np.uint8)
        entry[b"labels"] = [0, 1]
        write_py3_pickle(path, edit(entry))
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*" + message):
        load_cifar("cifar10", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_corrupt_meta_and_cifar100_files(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar100", n_train=10, n_test=5)
    meta = unpickle(folder / "meta")
    meta[b"fine_label_names"] = meta[b"fine_label_names"][:99]
    write_py3_pickle(folder / "meta", meta)
    with pytest.raises(DatasetError, match=r"meta: 'fine_label_names' has 99 names, expected 100"):
        load_cifar("cifar100", tmp_path)
    folder = make_fake_cifar(tmp_path, "cifar100", n_train=10, n_test=5)
    entry = unpickle(folder / "test")
    entry[b"fine_labels"][0] = 100
    write_py3_pickle(folder / "test", entry)
    with pytest.raises(DatasetError, match=r"test: 'fine_labels'.*0\.\.99"):
        load_cifar("cifar100", tmp_path)


def test_python3_pickles_with_str_keys_are_accepted(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    reference = load_cifar("cifar10", tmp_path, cache=False)
    for name in CIFAR10_FILES:
        entry = {k.decode(): v for k, v in unpickle(folder / name).items()}
        write_py3_pickle(folder / name, entry)
    data = load_cifar("cifar10", tmp_path, cache=False)
    assert torch.equal(data.train_x, reference.train_x) and data.classes == reference.classes


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("device", DEVICES)
def test_batches_cover_every_index_once_and_keep_the_last(device):
    gen = torch.Generator(device=device).manual_seed(0)
    batches = list(iterate_batches(10, 4, gen))
    assert [len(b) for b in batches] == [4, 4, 2] and num_batches(10, 4) == 3
    assert all(b.device.type == device and b.dtype == torch.int64 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


@pytest.mark.parametrize("device", DEVICES)
def test_batches_same_seed_same_order_new_epoch_new_order(device):
    def epochs(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return [torch.cat(list(iterate_batches(100, 16, gen))).tolist() for _ in range(3)]

    a, b = epochs(1), epochs(1)
    assert a == b
    assert a[0] != a[1] and a[1] != a[2]
    assert epochs(2)[0] != a[0]
    assert a[0] != list(range(100))


def test_batches_without_shuffle_and_empty():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.cat(list(iterate_batches(7, 3, gen, shuffle=False))).tolist() == list(range(7))
    assert torch.equal(gen.get_state(), state)  # no randomness consumed
    assert list(iterate_batches(0, 3, gen)) == [] and num_batches(0, 3) == 0


def test_batch_argument_errors():
    gen = torch.Generator()
    with pytest.raises(ValueError, match="batch_size=0"):
        list(iterate_batches(10, 0, gen))
    with pytest.raises(ValueError, match="n=-1"):
        num_batches(-1, 4)
    with pytest.raises(TypeError, match="batch_size"):
        num_batches(10, 2.0)
    with pytest.raises(TypeError, match="generator"):
        iterate_batches(10, 2, 0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    batch_size=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
    shuffle=st.booleans(),
)
def test_batches_property(n, batch_size, seed, shuffle):
    gen = torch.Generator().manual_seed(seed)
    batches = list(iterate_batches(n, batch_size, gen, shuffle=shuffle))
    expected = -(-n // batch_size)
    assert len(batches) == num_batches(n, batch_size) == expected
    assert all(len(b) == batch_size for b in batches[:-1])
    if batches:
        assert len(batches[-1]) == n - batch_size * (expected - 1)
    flat = torch.cat(batches).tolist() if batches else []
    assert sorted(flat) == list(range(n))


# ---------------------------------------------------------------------------------------------
# Augmentation


def reference_crop_flip(x, top, left, flip, pad):
    """Image by image, the obvious way."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(len(x)):
        padded = torch.zeros(x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        padded[:, pad : pad + h, pad : pad + w] = x[i]
        window = padded[:, top[i] : top[i] + h, left[i] : left[i] + w]
        out[i] = window.flip(-1) if flip[i] else window
    return out


def identify(x, out, pad):
    """For each image, the set of (top, left, flip) that produce ``out`` from ``x``."""
    n = len(x)
    found = [set() for _ in range(n)]
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            for f in (False, True):
                cand = crop_flip(
                    x, torch.full((n,), top), torch.full((n,), left), torch.full((n,), f), pad
                )
                for i in torch.nonzero((cand == out).flatten(1).all(1)).flatten().tolist():
                    found[i].add((top, left, f))
    return found


def random_images(n, c=3, h=8, w=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)


def test_crop_flip_matches_per_image_reference():
    x = random_images(20, h=9, w=7)
    gen = torch.Generator().manual_seed(3)
    top = torch.randint(0, 7, (20,), generator=gen)
    left = torch.randint(0, 7, (20,), generator=gen)
    flip = torch.rand(20, generator=gen) < 0.5
    expected = reference_crop_flip(x, top, left, flip, 3)
    assert torch.equal(crop_flip(x, top, left, flip, pad=3), expected)


def test_centre_crop_is_identity_and_flip_is_exact_mirror():
    x = random_images(5)
    centre = torch.full((5,), 4)
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(5, dtype=torch.bool)), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.ones(5, dtype=torch.bool)), x.flip(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_shape_dtype_and_determinism(device, dtype):
    x = random_images(16).to(device=device, dtype=dtype)
    out1 = augment(x, torch.Generator(device=device).manual_seed(7))
    out2 = augment(x, torch.Generator(device=device).manual_seed(7))
    out3 = augment(x, torch.Generator(device=device).manual_seed(8))
    assert out1.shape == x.shape and out1.dtype == dtype and out1.device == x.device
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)


def test_augment_with_cpu_generator_on_other_device_tensor():
    device = DEVICES[-1]
    x = random_images(8).to(device)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.device == x.device
    expected = augment(x.cpu(), torch.Generator().manual_seed(0))
    assert torch.equal(out.cpu(), expected)


def test_augment_only_crops_and_mirrors_independently_per_image():
    n, pad = 200, 4
    x = random_images(n)
    out = augment(x, torch.Generator().manual_seed(0), pad=pad)
    found = identify(x, out, pad)
    # every output image is a zero-padded window of its own input, possibly mirrored:
    # no pixel is invented beyond the padding
    assert all(found)
    params = [min(s) for s in found]
    assert len(set(params)) > 40  # images get their own crops, not one shared crop
    flips = sum(p[2] for p in params)
    assert 0.4 * n < flips < 0.6 * n
    assert {p[0] for p in params} == set(range(2 * pad + 1))
    assert {p[1] for p in params} == set(range(2 * pad + 1))
    # the pad region is zeros: a shifted image holds zeros exactly where the window leaves x
    assert int(out.min()) == 0 and int(x.min()) >= 1


def test_augment_without_pad_or_flip():
    x = random_images(64)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(augment(x, gen, pad=0, flip=False), x)
    out = augment(x, gen, pad=0, flip=True)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((mirrored | same).all()) and 0 < int(mirrored.sum()) < 64
    found = identify(x, augment(x, gen, pad=2, flip=False), 2)
    assert all(found) and not any(p[2] for s in found for p in s)


def test_augment_argument_errors():
    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment(torch.zeros(3, 32, 32, dtype=torch.uint8), gen)
    with pytest.raises(TypeError, match="generator"):
        augment(torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="pad=-1"):
        augment(torch.zeros(1, 3, 8, 8), gen, pad=-1)
    with pytest.raises(TypeError, match="flip"):
        augment(torch.zeros(1, 3, 8, 8), gen, flip=1)
    x = torch.zeros(2, 3, 8, 8)
    ok = torch.zeros(2, dtype=torch.long)
    no = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"top ranges over \[0, 9\].*0\.\.8"):
        crop_flip(x, torch.tensor([0, 9]), ok, no, pad=4)
    with pytest.raises(ValueError, match=r"left must be a tensor of shape \(2,\)"):
        crop_flip(x, ok, torch.zeros(3, dtype=torch.long), no)
    with pytest.raises(TypeError, match="flip must be a bool tensor"):
        crop_flip(x, ok, ok, ok)


# ---------------------------------------------------------------------------------------------
# Rotation (torchvision's RandomRotation with its defaults, for a whole set of images at once)


def torchvision_rotate(x, angles):
    """Image by image with torchvision's tensor kernel: the reference."""
    from torchvision.transforms.v2 import functional as TF

    return torch.stack([TF.rotate(x[i], float(a)) for i, a in enumerate(angles.tolist())])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_rotate_equals_torchvision_bit_for_bit(device, dtype):
    # 400 CIFAR-sized images, angles uniform in [-15, 15] plus the special cases torchvision
    # takes shortcuts for (0, 90, 180, 270, multiples of 360) and angles outside [0, 360).
    x = random_images(410, h=32, w=32, seed=4).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    angles = torch.cat([torch.empty(400).uniform_(-15, 15, generator=gen),
                        torch.tensor([0.0, 90.0, -90.0, 180.0, 270.0, 360.0, -725.5, 15.0,
                                      -15.0, 1e-3])])
    out = rotate(x, angles)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert torch.equal(out.cpu(), torchvision_rotate(x, angles).cpu())


def test_rotate_non_square_and_chunked(monkeypatch):
    monkeypatch.setattr(D, "ROTATE_CHUNK", 7)  # several grid_sample calls
    x = random_images(20, h=9, w=14, seed=6)
    angles = torch.linspace(-40.0, 200.0, 20)
    assert torch.equal(rotate(x, angles), torchvision_rotate(x, angles))
    assert rotate(x[:0], angles[:0]).shape == (0, 3, 9, 14)


def test_random_rotate_is_RandomRotation_with_the_same_seed():
    """Applied image by image after torch.manual_seed(s), torchvision's RandomRotation(15) draws
    the same angles as random_rotate with a generator seeded s: the outputs are identical."""
    from torchvision.transforms import v2

    x = random_images(300, h=32, w=32, seed=7)
    torch.manual_seed(11)
    transform = v2.RandomRotation(15)
    expected = torch.stack([transform(img) for img in x])
    out = random_rotate(x, torch.Generator().manual_seed(11), 15)
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)
    assert torch.equal(random_rotate(x, torch.Generator().manual_seed(0), 0), x)


def test_rotation_is_about_the_centre_and_counter_clockwise():
    # A bright pixel right of the centre of a 32 x 32 image moves up by 90 degrees.
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[0, 0, 15, 25] = 255
    out = rotate(x, torch.tensor([90.0]))
    assert out[0, 0].nonzero().tolist() == [[6, 15]]
    # Small rotations keep the centre pixel and cut off the corners (zero fill).
    img = random_images(1, h=32, w=32, seed=8)
    turned = rotate(img, torch.tensor([15.0]))
    assert torch.equal(turned[..., 15, 15], img[..., 15, 15])
    assert int(turned[0, :, 0, 0].max()) == 0 and int(img[0, :, 0, 0].min()) >= 1


def test_rotate_against_pillow_differs_only_at_near_ties():
    """The papers' loaders rotated PIL images. Pillow's nearest-neighbour affine map works in
    16.16 fixed point, so it may pick the other neighbour where the exact source position lies
    within a few 1e-4 pixel of the midpoint between two pixels; nowhere else."""
    import math

    from PIL import Image
    from torchvision.transforms import functional as TF1

    n = 300
    x = random_images(n, h=32, w=32, seed=9)
    angles = torch.empty(n).uniform_(-15, 15, generator=torch.Generator().manual_seed(9))
    ours = rotate(x, angles)
    differing = 0
    for i in range(n):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        theirs = torch.from_numpy(np.array(TF1.rotate(pil, float(angles[i]), fill=0)))
        mask = (theirs.permute(2, 0, 1) != ours[i]).any(0)
        a = math.radians(float(angles[i]))
        for row, col in mask.nonzero().tolist():
            u, v = col - 15.5, row - 15.5  # pixel centre relative to the image centre
            src = (math.cos(a) * u - math.sin(a) * v + 15.5,
                   math.sin(a) * u + math.cos(a) * v + 15.5)
            assert min(abs(s - math.floor(s) - 0.5) for s in src) < 5e-4, (i, row, col)
        differing += int(mask.sum())
    assert differing / (n * 32 * 32) < 1e-3


def test_rotate_argument_errors():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"angles must be a tensor of shape \(2,\)"):
        rotate(x, torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        rotate(x, torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="real tensor"):
        rotate(x, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        rotate(x[0], torch.zeros(3))
    with pytest.raises(ValueError, match="degrees must be a finite number >= 0, got -1"):
        random_rotate(x, torch.Generator(), -1)
    with pytest.raises(TypeError, match="generator"):
        random_rotate(x, 0)


# ---------------------------------------------------------------------------------------------
# Normalization


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_matches_manual_computation(device):
    x = random_images(4, h=5, w=6).to(device)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.device == x.device and out.shape == x.shape
    xd = x.cpu().double()
    for c in range(3):
        manual = (xd[:, c] / 255.0 - mean[c]) / std[c]
        torch.testing.assert_close(out[:, c].cpu().double(), manual, rtol=1e-6, atol=1e-6)
    exact = normalize(x, mean, std, dtype=torch.float64)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact[:, 1].cpu(), (xd[:, 1] / 255.0 - mean[1]) / std[1])
    half = normalize(x, mean, std, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out, rtol=1e-2, atol=1e-2)
    # a single image (C, H, W) works too
    torch.testing.assert_close(normalize(x[0], mean, std), out[0])


def test_normalize_argument_errors():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float(), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="mean has 2 values but x has 3 channels"):
        normalize(x, (0.5, 0.5), (0.2,) * 3)
    with pytest.raises(ValueError, match="std="):
        normalize(x, (0.5,) * 3, (0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="dtype"):
        normalize(x, (0.5,) * 3, (0.2,) * 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(4, 4, dtype=torch.uint8), (0.5,), (0.2,))


def test_dataset_folder_is_where_the_files_go(tmp_path):
    from labkit.data import dataset_folder

    for name in ("cifar10", "cifar100"):
        assert dataset_folder(tmp_path, name) == make_fake_cifar(tmp_path, name, 8, 4)
    with pytest.raises(ValueError, match="unknown dataset name='mnist'; valid names: cifar10"):
        dataset_folder(tmp_path, "mnist")


def test_is_generated_tells_labkits_files_from_others(tmp_path):
    from labkit.data import is_generated

    assert not is_generated(tmp_path, "cifar10")  # nothing there
    make_fake_cifar(tmp_path, "cifar10", 8, 4)
    assert is_generated(tmp_path, "cifar10") and not is_generated(tmp_path, "cifar100")
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(test_batch.read_bytes(), encoding="bytes")
    entry[b"batch_label"] = b"testing batch 1 of 1"  # what the official file says
    test_batch.write_bytes(pickle.dumps(entry))
    assert not is_generated(tmp_path, "cifar10")


# ---------------------------------------------------------------------------------------------
# Generating the smoke data: atomic, locked, and repaired after a killed first run


def test_a_half_written_generated_folder_is_detected_and_written_again(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=10)
    whole = {f: (folder / f).read_bytes() for f in CIFAR10_FILES}
    # What labkit before the marker left when killed: a truncated data_batch_2 and no test file.
    (folder / D.GENERATED_MARKER).unlink()
    (folder / "data_batch_2").write_bytes(whole["data_batch_2"][:100])
    (folder / "test_batch").unlink()
    assert D.ensure_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=10) == folder
    assert {f: (folder / f).read_bytes() for f in CIFAR10_FILES} == whole
    # A marked folder whose file has another size than recorded is not whole either.
    (folder / "data_batch_3").write_bytes(whole["data_batch_3"] + b"\0")
    D.ensure_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=10)
    assert (folder / "data_batch_3").read_bytes() == whole["data_batch_3"]
    assert len(load_cifar("cifar10", tmp_path).train_y) == 40


def test_a_whole_folder_is_kept_whatever_its_size(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar100", n_train=30, n_test=10)
    (folder / D.GENERATED_MARKER).unlink()  # written before the marker existed, but whole
    stamp = (folder / "train").stat().st_mtime_ns
    D.ensure_fake_cifar(tmp_path, "cifar100", n_train=512, n_test=256)
    assert (folder / "train").stat().st_mtime_ns == stamp
    assert len(load_cifar("cifar100", tmp_path).train_y) == 30


def test_leftovers_of_a_killed_generator_are_removed(tmp_path):
    stale = tmp_path / ".cifar-10-batches-py.abc.tmp"
    stale.mkdir()
    (stale / "data_batch_1").write_bytes(b"half")
    D.ensure_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "cifar-10-batches-py"]


def _generate(root, n_train, started=None):
    # Runs in a forked child: numpy and pickle only, nothing of torch's thread pools.
    if started is not None:
        started.set()
    D.ensure_fake_cifar(root, "cifar10", n_train=n_train, n_test=64)


def test_several_first_runs_at_once_all_get_the_whole_data_set(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_generate, args=(tmp_path, 3000)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(load_cifar("cifar10", tmp_path, cache=False).train_y) == 3000


def test_a_generator_killed_at_any_moment_leaves_no_half_written_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    ctx = multiprocessing.get_context("fork")
    for delay in (0.0, 0.05, 0.2):
        started = ctx.Event()
        proc = ctx.Process(target=_generate, args=(tmp_path, 5000, started))
        proc.start()
        started.wait(30)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        # Either nothing is in place yet, or the whole data set is.
        assert not folder.exists() or D.GENERATED_MARKER in {p.name for p in folder.iterdir()}
        D.ensure_fake_cifar(tmp_path, "cifar10", n_train=5000, n_test=64)
        assert len(load_cifar("cifar10", tmp_path, cache=False).train_y) == 5000
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits (labkit.digits): the cpu profile's data


def test_digits_split_shapes_dtypes_and_stratification():
    from sklearn.datasets import load_digits as sk_load_digits

    from labkit import digits as G

    d = G.load_digits()
    assert isinstance(d, CifarData) and d.name == "digits"
    assert d.train_x.shape == (G.N_TRAIN, 1, 8, 8) and d.test_x.shape == (G.N_TEST, 1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.classes == [str(k) for k in range(10)] and d.num_classes == 10
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    # Every image of scikit-learn's set is in exactly one split (as a multiset of label counts),
    # and each class is split 3:1 up to one image (stratified).
    y = sk_load_digits().target
    total = np.bincount(y, minlength=10)
    test = np.bincount(d.test_y.numpy(), minlength=10)
    train = np.bincount(d.train_y.numpy(), minlength=10)
    np.testing.assert_array_equal(train + test, total)
    assert np.all(np.abs(test - total * G.TEST_FRACTION) <= 1)


def test_digits_pixels_are_sklearn_values_scaled_to_uint8():
    from sklearn.datasets import load_digits as sk_load_digits

    from labkit import digits as G

    d = G.load_digits()
    images = sk_load_digits().images  # values 0..16
    scaled = np.rint(images * 255 / 16).astype(np.uint8)
    # Each training image is one of scikit-learn's images with its label.
    sk = {(scaled[i].tobytes(), int(t)) for i, t in enumerate(sk_load_digits().target)}
    for x, t in zip(d.train_x[:50], d.train_y[:50], strict=True):
        assert (x[0].numpy().tobytes(), int(t)) in sk


def test_digits_split_is_fixed_and_mean_std_are_the_training_split_statistics():
    from labkit import digits as G

    a, b = G.load_digits(), G.load_digits()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    pixels = a.train_x.double() / 255
    assert a.mean == G.MEAN and a.std == G.STD
    assert float(pixels.mean()) == pytest.approx(G.MEAN[0], abs=5e-5)
    assert float(pixels.std()) == pytest.approx(G.STD[0], abs=5e-5)
    x = normalize(a.train_x, a.mean, a.std)
    assert x.shape == (G.N_TRAIN, 1, 8, 8)
    assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=1e-3)


def test_digits_augmentation_shifts_by_one_pixel_and_never_mirrors():
    from labkit import digits as G

    d = G.load_digits()
    gen = torch.Generator().manual_seed(0)
    x = d.train_x[:200]
    out = augment(x, gen, pad=G.AUGMENT_PAD, flip=G.AUGMENT_FLIP)
    # Each output is the input shifted by (dy, dx) in -1..1 with zero fill: find the shift.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(x.shape[0]):
        windows = [padded[i, :, 1 + dy:9 + dy, 1 + dx:9 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_digits_without_scikit_learn_is_one_clear_error(monkeypatch):
    import sys

    from labkit import digits as G

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install scikit-learn==") as info:
        G.load_digits()
    assert "\n" not in str(info.value)


def test_digits_through_the_training_path():
    from labkit.train import TrainConfig, prepare_data, train

    cfg = TrainConfig(profile="cpu", dataset="digits", epochs=3, batch_size=64, lr=1e-3,
                      optimizer="adam", device="cpu")
    r = cfg.resolved()
    assert r.model == "tiny" and r.rotate == 0.0
    data = prepare_data(r, torch.device("cpu"))
    assert data.name == "digits" and data.train_x.device.type == "cpu"
    result = train(cfg, progress=False, data=data)
    assert result.status == "finished"
    # It learns: the training loss falls well below chance level, log(10) = 2.30. (Single-epoch
    # test accuracies jump around with BatchNorm's running statistics this early.)
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 2.0
    with pytest.raises(ValueError, match="cpu profile trains on dataset='digits'"):
        TrainConfig(profile="cpu", dataset="cifar10").resolved()
