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
    if not path.exists():
        raise DmlkitError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DmlkitError(f"cannot read weights file {path}: {exc}") from None


def resnet18(pretrained: bool = False, weights_path: str | None = None, image_size: int = 224) -> nn.Module:
    """torchvision ResNet-18 (512 channels)."""
    return TorchvisionResNet("resnet18", pretrained, weights_path, image_size)


def resnet50(pretrained: bool = False, weights_path: str | None = None, image_size: int = 224) -> nn.Module:
    """torchvision ResNet-50 (2048 channels)."""
    return TorchvisionResNet("resnet50", pretrained, weights_path, image_size)


@dmlkit.hookimpl
def register_backbones(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "smallcnn", SmallCNN, "Conv-4 network for small grayscale images (64 channels)", aliases=("conv4",)
        )
    )
    register(ComponentSpec("resnet18", resnet18, "torchvision ResNet-18, ImageNet weights from the local cache"))
    register(ComponentSpec("resnet50", resnet50, "torchvision ResNet-50, ImageNet weights from the local cache"))
