"""Packs on CUDA: CUDA-graph steps equal eager steps, packed runs equal runs alone (runs only
where a GPU is present; CI has none: `python benchmarks/bench_pack.py --gpu` and this file are
the GPU check)."""

from __future__ import annotations

import pytest
import torch

from labkit.data import make_fake_cifar
from labkit.train import TrainConfig, prepare_data, train
from labkit.train_pack import GRAPH_WARMUP_STEPS, choose_pack_size, train_pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    # 200 images at b = 16: 12 full batches (graph replays after the warm-up) and a partial
    # one (eager) per epoch.
    make_fake_cifar(r, "cifar100", n_train=200, n_test=64, seed=0)
    return r


def runs(root, **kw):
    base = dict(dataset="cifar100", model="resnet20", batch_size=16, epochs=2,
                data_root=str(root), profile="short", device="cuda")
    base.update(kw)
    return [
        TrainConfig(optimizer="shb", lr=0.05, hparams={"beta": 0.9}, seed=0,
                    lr_schedule={"kind": "step", "every": 1, "factor": 0.5}, **base),
        TrainConfig(optimizer="nshb", lr=0.2, hparams={"beta": 0.8}, seed=1,
                    weight_decay=5e-4, **base),
        TrainConfig(optimizer="sgd", lr=0.1, seed=2, **base),
    ]


def rows_close(a, b, rel):
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=rel), (key, ra[key], rb[key])


def test_graph_steps_equal_eager_steps(root):
    assert 200 // 16 > GRAPH_WARMUP_STEPS + 1
    cfgs = runs(root, precision="fp32")
    eager = train_pack(cfgs, progress=False, graphs=False)
    graphed = train_pack(cfgs, progress=False, graphs=True)
    for e, g in zip(eager, graphed, strict=True):
        assert e.status == g.status == "finished"
        rows_close(e.metrics, g.metrics, 1e-4)


def test_packed_runs_with_graphs_equal_runs_alone_in_float64(root, tmp_path):
    cfgs = runs(root, precision="fp64")
    packed = train_pack(cfgs, progress=False, graphs=True)
    for c, p in zip(cfgs, packed, strict=True):
        alone = train(c, progress=False)
        rows_close(p.metrics, alone.metrics, 1e-9)


def test_a_diverging_run_leaves_a_graphed_pack(root):
    cfgs = runs(root, precision="fp32")
    bad = TrainConfig(**{**cfgs[2].to_dict(), "lr": 1e30, "seed": 3})
    with_bad = train_pack([*cfgs, bad], progress=False, graphs=True)
    without = train_pack(cfgs, progress=False, graphs=True)
    assert with_bad[3].status == "diverged"
    for a, b in zip(with_bad[:3], without, strict=True):
        rows_close(a.metrics, b.metrics, 1e-4)


def test_bf16_pack_trains_and_the_pack_size_fits_memory(root):
    cfgs = runs(root)  # precision auto: bf16 autocast, channels_last
    results = train_pack(cfgs, progress=False)
    assert all(r.status == "finished" for r in results)
    data = prepare_data(cfgs[0].resolved(), torch.device("cuda"))
    assert 1 <= choose_pack_size(cfgs[0], data, 100) <= 32
