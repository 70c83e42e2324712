"""Image classifiers: the CIFAR ResNets of the labs and a tiny CNN (also for 8x8 digits).

Book: the labs of chapters 4 and 8 (models, not equations). Which lab uses which model:

* lab 1 (optimizer zoo, the power-eta thesis): ``resnet44`` on CIFAR-10;
* labs 3-6 (critical batch size, smoothing and generalization, implicit graduated
  optimization, sharpness; Sato & Iiduka (2024, 2023)): ``resnet18`` on CIFAR-100;
* every lab's smoke profile (CPU, generated data, seconds): ``tiny``;
* every lab's cpu profile (CPU, scikit-learn's 8x8 handwritten digits, minutes): ``tiny``
  with one input channel.

References:

* K. He, X. Zhang, S. Ren, J. Sun (2016), "Deep residual learning for image recognition",
  CVPR, arXiv:1512.03385, section 4.2: the CIFAR ResNets ``resnet20/32/44/56`` (three stages
  of n = (depth - 2) / 6 basic blocks with 16/32/64 channels, option A shortcuts, He
  initialization).
* The CIFAR variant of ResNet-18 popularized by the kuangliu/pytorch-cifar repository: the
  ImageNet ResNet-18 of He et al. (2016) with a 3x3, stride-1 stem, no max-pool, and 1x1
  convolution + BN projection shortcuts where the shape changes.

Parameter counts (weights and BN affine parameters; BN running statistics are buffers):

=========  ===============  ================
model      10 classes       100 classes
=========  ===============  ================
resnet18   11,173,962       11,220,132
resnet20   269,722          275,572
resnet32   464,154          470,004
resnet44   658,586          664,436
resnet56   853,018          858,868
tiny       24,346           30,196
=========  ===============  ================

(The He et al. counts are the 0.27M / 0.46M / 0.66M / 0.85M of the paper's Table 6.)

All models map float inputs of shape (N, C, H, W), already normalized, to logits of
shape (N, num_classes): C = 3 and 32x32 for CIFAR; C = 1 and 8x8 for the digits
(``in_channels`` of :func:`build_model`). They contain no in-place operations, so they work with
``channels_last`` memory format, with bf16 autocast, and with ``torch.func.functional_call``
+ ``torch.func.vmap``. Under ``vmap`` the model must be in eval mode: BatchNorm then uses its
running statistics and every example is processed independently, so per-example gradients
(chapter 8's variance estimates) are taken in eval mode. In train mode BatchNorm mixes the
examples of a batch, which has no per-example meaning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODEL_NAMES",
    "CifarResNet",
    "ResNet18",
    "ShortcutA",
    "TinyCNN",
    "build_model",
    "num_parameters",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------------------
# ResNet-18, CIFAR variant
# --------------------------------------------------------------------------------------


class _ProjectionBlock(nn.Module):
    """BasicBlock with an identity shortcut, or a 1x1 conv + BN projection when the shape
    changes (the layout of ResNet-18 for CIFAR)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3/64 stem (stride 1, no max-pool), BasicBlocks
    [2, 2, 2, 2] with 64/128/256/512 channels, global average pool, linear head.

    11,220,132 parameters for 100 classes, 11,173,962 for 10. PyTorch's default
    initialization, as in the kuangliu/pytorch-cifar code the published runs used.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        in_channels = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(
                    _ProjectionBlock(in_channels, out_channels, stride),
                    _ProjectionBlock(out_channels, out_channels, 1),
                )
            )
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool; on 32x32 inputs this equals avg_pool2d(out, 4).
        return self.linear(out.mean(dim=(-2, -1)))


# --------------------------------------------------------------------------------------
# He et al. (2016) CIFAR ResNets
# --------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Option A shortcut of He et al. (2016): subsample by taking every second pixel and
    pad the new channels with zeros. No parameters."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., ::2, ::2]
        # F.pad pads the last dims first: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _OptionABlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if stride != 2:
                raise ValueError(f"option A shortcut needs stride 2, got stride={stride}")
            self.shortcut = ShortcutA(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, §4.2) with depth = 6n + 2.

    3x3/16 stem, three stages of n BasicBlocks with 16/32/64 channels (the first block of
    stages 2 and 3 has stride 2 and an option A shortcut), global average pool, linear head.
    Convolutions use Kaiming-normal (He) initialization, fan-in mode, as in the paper.
    Parameter counts (10 / 100 classes): depth 20: 269,722 / 275,572; 32: 464,154 / 470,004;
    44: 658,586 / 664,436; 56: 853,018 / 858,868.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got depth={depth!r}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        in_channels = 16
        for out_channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_OptionABlock(in_channels, out_channels, stride)]
            blocks += [_OptionABlock(out_channels, out_channels, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(-2, -1)))


# --------------------------------------------------------------------------------------
# Tiny CNN for the smoke profile
# --------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """A three-conv CNN for CPU smoke runs: conv(3->16)-BN-ReLU-maxpool,
    conv(16->32)-BN-ReLU-maxpool, conv(32->64)-BN-ReLU, global average pool, linear.

    24,346 parameters for 10 classes; a forward + backward pass on 256 images of 32x32 takes
    a fraction of a second on two CPU cores.

    With ``in_channels=1`` it is the cpu profile's model for scikit-learn's 8x8 handwritten
    digits (:mod:`labkit.digits`; 24,058 parameters): the two poolings take 8x8 to 4x4 to 2x2,
    and the last conv-BN-ReLU still sees the whole digit. A wider or less pooled variant
    (one pooling, 8x8 -> 4x4) learned the digits no better in 10 epochs and cost 1.6 to 3
    times as much per step on one CPU core (b = 64 to 512), which the labs' sweeps of dozens
    of runs cannot afford.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv3x3(in_channels, 16),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _conv3x3(16, 32),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _conv3x3(32, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x).mean(dim=(-2, -1)))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": ResNet18,
    "resnet20": lambda num_classes, in_channels: CifarResNet(20, num_classes, in_channels),
    "resnet32": lambda num_classes, in_channels: CifarResNet(32, num_classes, in_channels),
    "resnet44": lambda num_classes, in_channels: CifarResNet(44, num_classes, in_channels),
    "resnet56": lambda num_classes, in_channels: CifarResNet(56, num_classes, in_channels),
    "tiny": TinyCNN,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the model ``name`` (one of ``MODEL_NAMES``) with a ``num_classes``-way head for
    images of ``in_channels`` channels (3 for CIFAR, 1 for the digits).

    The model is returned on the CPU in float32 and train mode; move it with ``.to(device)``.
    Raises ValueError for an unknown name or a ``num_classes`` that is not an int >= 2.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown model name={name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got num_classes={num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got in_channels={in_channels!r}")
    return _BUILDERS[name](num_classes, in_channels)


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (buffers such as BN running statistics are
    not counted; shared parameters are counted once)."""
    return sum(p.numel() for p in model.parameters())
