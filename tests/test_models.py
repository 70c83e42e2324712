"""Tests for labkit.models: layouts against transcribed reference implementations, parameter
counts against the published ones, channels_last / autocast / vmap, and the tiny CNN's
ability to learn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from labkit.models import (
    MODEL_NAMES,
    CifarResNet,
    ResNet18,
    TinyCNN,
    build_model,
    num_parameters,
)

# --------------------------------------------------------------------------------------
# Reference implementations, transcribed independently of labkit.models
# --------------------------------------------------------------------------------------


class _RefBasicBlock(nn.Module):
    """kuangliu/pytorch-cifar models/resnet.py BasicBlock."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _RefResNet18(nn.Module):
    """kuangliu/pytorch-cifar ResNet(BasicBlock, [2, 2, 2, 2])."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_RefBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class _RefOptionABlock(nn.Module):
    """He et al. (2016) CIFAR block with the option A shortcut (the widely used
    akamaster/pytorch_resnet_cifar10 transcription)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = None
        if stride != 1 or in_planes != planes:
            self.pad = planes // 4

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is None:
            short = x
        else:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + short)


class _RefCifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_RefOptionABlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _copy_state_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and buffers position by position; shapes must match one to one."""
    src_state, dst_state = list(src.state_dict().values()), dst.state_dict()
    assert len(src_state) == len(dst_state)
    new_state = {}
    for (name, dst_tensor), src_tensor in zip(dst_state.items(), src_state, strict=True):
        assert dst_tensor.shape == src_tensor.shape, name
        new_state[name] = src_tensor.clone()
    dst.load_state_dict(new_state)


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Give BN non-trivial running statistics and affine parameters, so eval-mode outputs
    exercise them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            with torch.no_grad():
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# Layouts and parameter counts
# --------------------------------------------------------------------------------------


def test_model_names():
    assert MODEL_NAMES == ("resnet18", "resnet20", "resnet32", "resnet44", "resnet56", "tiny")


@pytest.mark.parametrize("num_classes, expected", [(10, 11_173_962), (100, 11_220_132)])
def test_resnet18_parameter_count(num_classes, expected):
    assert num_parameters(build_model("resnet18", num_classes)) == expected


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet18_matches_kuangliu_reference(num_classes):
    torch.manual_seed(0)
    ref = _RefResNet18(num_classes)
    ours = build_model("resnet18", num_classes)
    assert isinstance(ours, ResNet18)
    assert num_parameters(ref) == num_parameters(ours)
    _randomize_bn(ref, torch.Generator().manual_seed(1))
    _copy_state_in_order(ref, ours)
    x = _images(2)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# He et al. (2016), Table 6: 0.27M, 0.46M, 0.66M, 0.85M parameters (CIFAR-10).
_HE_COUNTS = {
    "resnet20": (0.27e6, 269_722, 275_572),
    "resnet32": (0.46e6, 464_154, 470_004),
    "resnet44": (0.66e6, 658_586, 664_436),
    "resnet56": (0.85e6, 853_018, 858_868),
}


@pytest.mark.parametrize("name", sorted(_HE_COUNTS))
def test_he_resnet_parameter_counts(name):
    paper, exact10, exact100 = _HE_COUNTS[name]
    n10 = num_parameters(build_model(name, 10))
    assert abs(n10 - paper) <= 0.005e6  # the paper rounds to 0.01M
    assert n10 == exact10  # the value stated in the docstring
    assert num_parameters(build_model(name, 100)) == exact100
    # The head is the only part that depends on the number of classes: 90 * (64 + 1).
    assert exact100 - exact10 == 90 * 65


@pytest.mark.parametrize("name", sorted(_HE_COUNTS))
def test_he_resnet_matches_reference(name):
    depth = int(name.removeprefix("resnet"))
    ref = _RefCifarResNet(depth, 10)
    ours = build_model(name, 10)
    assert isinstance(ours, CifarResNet) and ours.depth == depth
    n = (depth - 2) // 6
    assert [len(s) for s in (ours.layer1, ours.layer2, ours.layer3)] == [n, n, n]
    _randomize_bn(ref, torch.Generator().manual_seed(2))
    _copy_state_in_order(ref, ours)
    x = _images(2)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    model = build_model("resnet20", 10)
    block = model.layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 32, 32)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_he_resnet_kaiming_normal_init():
    torch.manual_seed(0)
    model = build_model("resnet56", 10)
    for conv in (model.conv1, model.layer3[5].conv2, model.layer2[0].conv1):
        fan_in = conv.weight[0].numel()
        std = conv.weight.std().item()
        n = conv.weight.numel()
        # Kaiming-normal, fan-in, ReLU gain: std = sqrt(2 / fan_in); sample-std error ~ 1/sqrt(2n).
        assert std == pytest.approx(math.sqrt(2.0 / fan_in), rel=5.0 / math.sqrt(2 * n))
        assert abs(conv.weight.mean().item()) < 5 * math.sqrt(2.0 / fan_in) / math.sqrt(n)


@pytest.mark.parametrize("depth", [0, 21, 2, "20"])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2"):
        CifarResNet(depth, 10)


def test_tiny_layout():
    model = build_model("tiny", 10)
    assert isinstance(model, TinyCNN)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 32), (32, 64)]
    assert num_parameters(model) == 24_346
    assert num_parameters(build_model("tiny", 100)) == 30_196


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_and_train_mode(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    assert model.training
    out = model(_images(3))
    assert out.shape == (3, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_build_model_returns_fresh_models():
    a, b = build_model("tiny", 10), build_model("tiny", 10)
    assert a is not b
    assert all(p is not q for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "ResNet18", "", None, 18])
def test_unknown_name(name):
    with pytest.raises(ValueError, match=r"unknown model name=.*valid names: resnet18, resnet20"):
        build_model(name, 10)


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.0, 10.5, "10", True, None])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 2, got num_classes="):
        build_model("tiny", num_classes)


# --------------------------------------------------------------------------------------
# channels_last, autocast, functional_call + vmap
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    _randomize_bn(model, torch.Generator().manual_seed(3))
    model.eval()
    x = _images(2)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # And backward works in train mode with channels_last.
    model_cl.train()
    model_cl(x.contiguous(memory_format=torch.channels_last)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model_cl.parameters())


@pytest.mark.parametrize("name", ["tiny", "resnet20", "resnet18"])
def test_cpu_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    _randomize_bn(model, torch.Generator().manual_seed(4))
    model.eval()
    x = _images(2)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 0.05 * scale + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_channels_last_bf16_autocast(name):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model(name, 100)
    _randomize_bn(model, torch.Generator().manual_seed(5))
    model = model.to(device).eval()
    x = _images(8).to(device)
    with torch.no_grad():
        expected = model(x).float()
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x_cl)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 100)
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 0.05 * scale + 1e-3
    # Training step under autocast (this updates BN's running statistics, hence last).
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x_cl).float(), torch.arange(8, device=device))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "resnet20", "resnet18"])
def test_vmap_per_example_gradients_in_eval_mode(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    _randomize_bn(model, torch.Generator().manual_seed(6))
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = _images(2, seed=7)
    y = torch.tensor([3, 8])

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(per_example[k][i], p.grad, rtol=1e-4, atol=1e-5 * scale)
    # The vmapped forward equals the batched forward.
    with torch.no_grad():
        out = vmap(lambda xi: functional_call(model, (params, buffers), (xi.unsqueeze(0),)))(x)
        torch.testing.assert_close(out.squeeze(1), model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# The tiny CNN learns a class-dependent color / pattern signal
# --------------------------------------------------------------------------------------


def _toy_images(n: int, num_classes: int, generator: torch.Generator):
    """Class k: a class color plus a stripe pattern of class-dependent orientation, in noise."""
    labels = torch.arange(n) % num_classes
    colors = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
    stripes = torch.sin(torch.arange(32.0) * math.pi / 4)
    patterns = torch.stack([stripes[:, None].expand(32, 32), stripes[None, :].expand(32, 32)])
    x = 1.5 * torch.randn(n, 3, 32, 32, generator=generator)
    x += colors[labels][:, :, None, None] * 0.5
    x += patterns[labels % 2][:, None] * 0.5
    return x, labels


def test_tiny_learns_simple_signal():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _toy_images(256, 4, g)
    x_test, y_test = _toy_images(256, 4, g)
    model = build_model("tiny", 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        model.eval()
        acc_before = (model(x_test).argmax(1) == y_test).float().mean().item()
    for _ in range(4):
        model.train()
        for i in torch.randperm(256, generator=g).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[i]), y_train[i]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert acc_before < 0.5
    assert acc >= 0.9
