"""Packed runs (labkit.pack, labkit.train_pack): each run of a pack is the run train() trains.

The contract is exactness: on the CPU in float64 every packed run's per-epoch metrics and final
weights equal training it alone to 1e-10 (relative), for mixed SGD/SHB/NSHB, different seeds,
schedules and augmentation, and a run that diverges; a pack killed mid-epoch resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from labkit import models as lk_models
from labkit.data import make_fake_cifar
from labkit.pack import PackedMomentum, pack_models
from labkit.train import TrainConfig, load_checkpoint, train
from labkit.train_pack import pack_key, train_pack

torch.set_num_threads(2)
RTOL = 1e-10
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "batch_size", "steps",
           "total_steps", "grad_norm", "epoch")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fake_cifar(root, "cifar10", n_train=100, n_test=40, seed=0)
    return root


def cfg(data_root, **kw) -> TrainConfig:
    base = dict(dataset="cifar10", model="tiny", optimizer="shb", lr=0.05,
                hparams={"beta": 0.9}, batch_size=16, epochs=3, data_root=str(data_root),
                device="cpu", profile="short", precision="fp64")
    base.update(kw)
    return TrainConfig(**base)


def mixed(data_root, **kw):
    """SHB, NSHB and SGD runs with their own seeds, schedules, augmentation and weight decay,
    and an SGD run whose learning rate makes it diverge in its first epoch."""
    return [
        cfg(data_root, seed=0, lr_schedule={"kind": "step", "every": 1, "factor": 0.5}, **kw),
        cfg(data_root, optimizer="nshb", lr=0.2, hparams={"beta": 0.8}, seed=1,
            weight_decay=5e-4, rotate=10.0, **kw),
        cfg(data_root, optimizer="sgd", lr=0.1, hparams={}, seed=2, augment=False,
            lr_schedule={"kind": "cosine"}, **kw),
        cfg(data_root, optimizer="sgd", lr=1e200, hparams={}, seed=3, **kw),
    ]


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-300)


def assert_rows_equal(packed, alone):
    assert len(packed) == len(alone)
    for p, a in zip(packed, alone, strict=True):
        assert p.get("diverged") == a.get("diverged")
        for key in METRICS:
            assert close(p[key], a[key]), (key, p[key], a[key])


def max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if x.is_floating_point():
            scale = max(float(x.abs().max()), float(y.abs().max()), 1e-300)
            worst = max(worst, float((x - y).abs().max()) / scale)
        else:
            assert torch.equal(x, y), name
    return worst


def test_pack_forward_and_unpack_are_exact():
    torch.manual_seed(0)
    for name in ("tiny", "resnet20"):
        singles = []
        for seed in range(3):
            torch.manual_seed(seed)
            singles.append(lk_models.build_model(name, 10).double())
        pack = pack_models(singles)
        xs = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in singles]
        out = pack(torch.stack(xs, 1).reshape(4, 9, 32, 32))
        ref = torch.stack([m(x) for m, x in zip(singles, xs, strict=True)], 1)
        assert out.shape == (4, 3, 10)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        back = lk_models.build_model(name, 10).double()
        pack.unpack_into(2, back)  # BatchNorm statistics updated by the forward pass included
        for key, t in back.state_dict().items():
            torch.testing.assert_close(t, singles[2].state_dict()[key], rtol=1e-12, atol=1e-12)


def test_packed_momentum_is_each_runs_own_update():
    torch.manual_seed(0)
    singles = [lk_models.build_model("tiny", 10).double() for _ in range(3)]
    pack = pack_models(singles)
    kinds, betas, wds, lrs = ("sgd", "shb", "nshb"), (0.0, 0.9, 0.7), (0.0, 1e-3, 0.1), (
        0.1, 0.05, 0.3)
    opt = PackedMomentum(pack, kinds, betas, wds)
    opt.set_lrs(lrs)
    from labkit import optim as lk_optim

    refs = []
    for m, kind, beta, wd, lr in zip(singles, kinds, betas, wds, lrs, strict=True):
        hp = {} if kind == "sgd" else {"beta": beta}
        refs.append(lk_optim.build(kind, m.parameters(), lr=lr, weight_decay=wd, **hp))
    for _ in range(4):
        grads = [{n: torch.randn_like(p) for n, p in m.named_parameters()} for m in singles]
        for m, g, o in zip(singles, grads, refs, strict=True):
            for n, p in m.named_parameters():
                p.grad = g[n].clone()
            o.step()
        for name, p in opt.named:
            p.grad = pack.join(name, [g[name] for g in grads])
        opt.step()
    for k, m in enumerate(singles):
        back = pack.unpack_into(k, lk_models.build_model("tiny", 10).double())
        assert max_rel(back.state_dict(), m.state_dict()) < 1e-14


def test_pack_key_groups_what_shares_a_step(data_root):
    a, b, c, d = mixed(data_root)
    assert pack_key(a) == pack_key(b) == pack_key(c) == pack_key(d)
    assert pack_key(cfg(data_root, batch_size=32)) != pack_key(a)
    assert pack_key(cfg(data_root, optimizer="adam", hparams={})) is None
    with pytest.raises(ValueError, match="do not pack together"):
        train_pack([a, cfg(data_root, epochs=4)], progress=False)


def test_packed_runs_equal_training_alone(data_root, tmp_path):
    configs = [c.resolved().relocated(out=str(tmp_path / "pack" / str(i)))
               for i, c in enumerate(mixed(data_root))]
    packed = train_pack(configs, progress=False)
    alone = [train(c.relocated(out=str(tmp_path / "alone" / str(i))), progress=False)
             for i, c in enumerate(configs)]
    assert [r.status for r in packed] == ["finished", "finished", "finished", "diverged"]
    assert [r.status for r in alone] == [r.status for r in packed]
    worst = 0.0
    for i, (p, a) in enumerate(zip(packed, alone, strict=True)):
        assert_rows_equal(p.metrics, a.metrics)
        # The folders hold the same files; the checkpoints hold the same weights and state.
        pdir, adir = tmp_path / "pack" / str(i), tmp_path / "alone" / str(i)
        assert sorted(os.listdir(pdir)) == sorted(os.listdir(adir))
        assert json.loads((pdir / "result.json").read_text())["status"] == p.status
        cp, ca = load_checkpoint(pdir / "checkpoint.pt"), load_checkpoint(adir / "checkpoint.pt")
        assert cp.keys() == ca.keys()
        if p.status == "finished":
            worst = max(worst, max_rel(cp["model"], ca["model"]))
            bufs_p = {k: v.get("momentum_buffer") for k, v in cp["optimizer"]["state"].items()}
            bufs_a = {k: v.get("momentum_buffer") for k, v in ca["optimizer"]["state"].items()}
            assert bufs_p.keys() == bufs_a.keys()
            worst = max(worst, max_rel({k: v for k, v in bufs_p.items() if v is not None},
                                       {k: v for k, v in bufs_a.items() if v is not None}))
            assert cp["optimizer"]["param_groups"] == ca["optimizer"]["param_groups"]
            assert torch.equal(cp["rng"]["data_generator"], ca["rng"]["data_generator"])
    assert worst < RTOL
    print(f"largest relative difference of final weights and buffers: {worst:.2e}")


def test_a_diverging_run_leaves_the_others_undisturbed(data_root, tmp_path):
    # In memory (no folders): the diverging run leaves the pack after its first epoch.
    runs = mixed(data_root)
    with_bad = train_pack(runs, progress=False)
    without = train_pack(runs[:3], progress=False)
    assert with_bad[3].status == "diverged" and with_bad[3].metrics[-1]["diverged"]
    for p, a in zip(with_bad[:3], without, strict=True):
        assert_rows_equal(p.metrics, a.metrics)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from labkit.train import Callback, TrainConfig
    from labkit.train_pack import train_pack
    torch.set_num_threads(2)  # as in the test process: the same sums, bit for bit
    class Kill(Callback):
        step_interval = 1
        def on_step(self, state):
            # SIGKILL in the middle of epoch 2 (of 3): after the first epoch's checkpoints.
            if state.epoch == 1 and state.step == state.steps_per_epoch + 3:
                os.kill(os.getpid(), signal.SIGKILL)
    configs = [TrainConfig(**c) for c in __import__("json").loads(sys.argv[1])]
    train_pack(configs, [Kill()], progress=False)
""")


def test_a_pack_killed_mid_epoch_resumes_every_run_exactly(data_root, tmp_path):
    configs = [c.resolved().relocated(out=str(tmp_path / "killed" / str(i)))
               for i, c in enumerate(mixed(data_root)[:3])]
    blob = json.dumps([c.to_dict() for c in configs])
    proc = subprocess.run([sys.executable, "-c", KILLER, blob], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    for c in configs:
        rows = [json.loads(line) for line in open(os.path.join(c.out, "metrics.jsonl"))]
        assert len(rows) == 1  # killed in epoch 2
    resumed = train_pack(configs, progress=False)
    assert all(r.resumed_from == 1 and r.status == "finished" for r in resumed)
    whole = train_pack([c.relocated(out=str(tmp_path / "whole" / str(i)))
                        for i, c in enumerate(configs)], progress=False)
    for i, (r, w) in enumerate(zip(resumed, whole, strict=True)):
        assert_rows_equal(r.metrics, w.metrics)
        a = load_checkpoint(tmp_path / "killed" / str(i) / "checkpoint.pt")
        b = load_checkpoint(tmp_path / "whole" / str(i) / "checkpoint.pt")
        for key, t in a["model"].items():
            assert torch.equal(t, b["model"][key]), key
    # A packed run's folder also resumes with train() alone: a finished run is loaded.
    assert train(configs[0], progress=False).loaded
