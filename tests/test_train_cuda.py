"""The same loop on CUDA (runs only where a GPU is present; CI has none).

On the device: bf16 autocast with fp32 weights, channels_last, data and metrics on the GPU,
no synchronizing call inside a step, and a resumed run that matches an uninterrupted one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from labkit.data import make_fake_cifar
from labkit.train import Callback, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    make_fake_cifar(r, "cifar100", n_train=1024, n_test=256, seed=0)
    return r


def cfg(root, **kw):
    base = dict(dataset="cifar100", model="resnet18", optimizer="nshb", lr=0.05,
                hparams={"beta": 0.9}, batch_size=128, epochs=3, data_root=str(root),
                profile="short")
    base.update(kw)
    return TrainConfig(**base)


def test_cuda_run_defaults(root):
    seen = {}

    class Spy(Callback):
        step_interval = 1

        def on_step(self, state):
            p = next(state.model.parameters())
            seen["param_dtype"] = p.dtype
            seen["device"] = p.device.type
            seen["loss_device"] = state.loss.device.type

    res = train(cfg(root, epochs=1), callbacks=[Spy()], progress=False)
    assert res.status == "finished"
    assert seen == {"param_dtype": torch.float32, "device": "cuda", "loss_device": "cuda"}


def test_no_sync_inside_steps(root):
    """From the first optimizer step to the last one of an epoch nothing waits for the GPU."""

    class Watch(Callback):
        step_interval = 1

        def on_step(self, state):
            if state.step == 1:
                torch.cuda.set_sync_debug_mode("warn")
            elif state.step == state.steps_per_epoch - 1:
                torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(cfg(root, epochs=1, model="tiny"), callbacks=[Watch()], progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()
             and "prototype" not in str(w.message).lower()]
    assert syncs == []


def test_cuda_resume_matches(root, tmp_path):
    full = train(cfg(root, precision="fp32", model="tiny"), progress=False)

    class StopAfter1(Callback):
        def on_epoch_end(self, state, metrics):
            state.stop = True

    out = str(tmp_path / "run")
    train(cfg(root, precision="fp32", model="tiny", out=out), callbacks=[StopAfter1()],
          progress=False)
    resumed = train(cfg(root, precision="fp32", model="tiny", out=out), progress=False)
    for a, b in zip(full.metrics, resumed.metrics, strict=True):
        # cuDNN is not bitwise deterministic; the numbers agree to round-off.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["batch_size"] == b["batch_size"] and a["lr"] == b["lr"]


class _Precision(Callback):
    """Records cuDNN's and CUDA matmul's fp32 settings while the run trains."""

    def on_epoch_end(self, state, metrics):
        self.seen = (torch.backends.cudnn.conv.fp32_precision,
                     torch.backends.cuda.matmul.fp32_precision)


def test_fp32_runs_are_ieee_fp32_and_auto_runs_keep_the_defaults(root):
    """A measurement run (precision fp32) trains with TF32 off and restores the settings."""
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    spy = _Precision()
    train(cfg(root, epochs=1, precision="fp32"), [spy], progress=False)
    assert spy.seen == ("ieee", "ieee")
    spy = _Precision()
    train(cfg(root, epochs=1, precision="auto"), [spy], progress=False)
    assert spy.seen == before
    assert (torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == before
