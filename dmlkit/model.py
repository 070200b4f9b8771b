"""The embedding model: a registered backbone followed by dmlkit's embedding head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmlkit.errors import OptionError
from dmlkit.settings import BY_NAME

POOLINGS, NORMS, INITS = (BY_NAME[k].choices for k in ("pooling", "head_norm", "head_init"))  # one list of each


class EmbeddingHead(nn.Module):
    """Pooling (average, max, or their sum), optional LayerNorm/BatchNorm, linear, L2 normalisation.

    ``embedding_size=0`` keeps the pooled features (no linear layer). ``init="identity"`` starts
    the linear layer as the identity (embedding_size = in_features), so that training starts
    from the pooled features of a pretrained backbone instead of a random projection of them.
    """

    def __init__(
        self,
        in_features: int,
        embedding_size: int = 128,
        pooling: str = "avg",
        norm: str = "none",
        normalize: bool = True,
        init: str = "random",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise OptionError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if norm not in NORMS:
            raise OptionError(f"head norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if embedding_size < 0:
            raise OptionError(f"embedding_size must be > 0 (or 0 for the pooled features); got {embedding_size}")
        self.pooling, self.normalize = pooling, normalize
        self.norm = {
            "none": nn.Identity(),
            "layernorm": nn.LayerNorm(in_features),
            "batchnorm": nn.BatchNorm1d(in_features),
        }[norm]
        if init not in INITS:
            raise OptionError(f"head init must be one of {', '.join(INITS)}; got {init!r}")
        self.linear = nn.Linear(in_features, embedding_size) if embedding_size else nn.Identity()
        if init == "identity" and embedding_size:
            if embedding_size != in_features:
                raise OptionError(
                    f"head_init=identity needs embedding_size equal to the backbone's {in_features} features "
                    f"(or 0 for no linear layer); got {embedding_size}: set head_init=random for a random projection"
                )
            with torch.no_grad():
                nn.init.eye_(self.linear.weight)
                self.linear.bias.zero_()
        self.out_features = embedding_size or in_features

    def pool(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            return x
        if self.pooling == "avg":
            return x.mean((2, 3))
        if self.pooling == "max":
            return x.amax((2, 3))
        return x.mean((2, 3)) + x.amax((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(self.norm(self.pool(x)))
        return nn.functional.normalize(z.float(), dim=1) if self.normalize else z


class EmbeddingModel(nn.Module):
    """backbone -> head; ``freeze_bn`` keeps the backbone's BatchNorm statistics and affine fixed."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, freeze_bn: bool = False):
        super().__init__()
        self.backbone, self.head, self.freeze_bn = backbone, head, freeze_bn
        self.backbone_frozen = False  # warm-up: the backbone runs without gradients
        self.backbone_fixed = False  # frozen for the whole run: no gradients, inference mode (BN, dropout)
        if freeze_bn:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def freeze_backbone(self) -> None:
        """Freeze the backbone for good: its parameters leave the optimizer and it runs in inference mode."""
        self.backbone_fixed = self.backbone_frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.backbone_fixed:
            self.backbone.eval()
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)
        return self.head(self.backbone(x))


def input_spec(backbone: nn.Module) -> dict[str, Any]:
    """What a backbone expects: channels, image size, mean, std (defaults for RGB ImageNet)."""
    spec = {"channels": 3, "image_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    spec.update(getattr(backbone, "input_spec", {}))
    return spec


@torch.no_grad()
def feature_size(backbone: nn.Module) -> int:
    """The backbone's output channels (``out_features`` if it says, else a dummy forward pass)."""
    if hasattr(backbone, "out_features"):
        return int(backbone.out_features)
    spec = input_spec(backbone)
    was = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, spec["channels"], spec["image_size"], spec["image_size"]))
    backbone.train(was)
    return int(out.shape[1])
