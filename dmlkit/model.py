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
    """backbone -> head; ``freeze_bn`` keeps the backbone's BatchNorm statistics and affine fixed.

    The backbone may be frozen whole (:meth:`freeze_backbone`) or up to a stage
    (:meth:`freeze_prefix`): the frozen part (``prefix``) then runs in inference mode without
    gradients, and :meth:`from_prefix` continues from its output (the feature cache's path).
    """

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, freeze_bn: bool = False):
        super().__init__()
        self.backbone, self.head, self.freeze_bn = backbone, head, freeze_bn
        self.backbone_frozen = False  # warm-up: the backbone runs without gradients
        self.backbone_fixed = False  # frozen for the whole run: no gradients, inference mode (BN, dropout)
        self.frozen_upto = ""  # the last frozen stage of a partly frozen backbone
        # views of the backbone's own layers (not registered: their parameters stay the backbone's)
        object.__setattr__(self, "prefix", None)
        object.__setattr__(self, "suffix", None)
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

    def freeze_prefix(self, upto: int | str) -> None:
        """Freeze the backbone up to and including stage ``upto`` (its name, or its index in
        :func:`backbone_stages`); the later stages train."""
        prefix, suffix, name = split_backbone(self.backbone, upto)
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "suffix", suffix)
        self.frozen_upto = name
        for p in prefix.parameters():
            p.requires_grad_(False)
        prefix.eval()

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.backbone_fixed:
            self.backbone.eval()
        if self.prefix is not None:
            self.prefix.eval()
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def from_prefix(self, features: Tensor) -> Tensor:
        """The embedding of the frozen prefix's output (of the pooled features, with the whole backbone frozen)."""
        if self.suffix is None:
            return self.head(features)
        return self.head(self.suffix(features))

    def prefix_features(self, x: Tensor) -> Tensor:
        """What the feature cache stores: the frozen prefix's output, or the whole backbone's pooled features."""
        if self.prefix is not None:
            return self.prefix(x)
        return self.head.pool(self.backbone(x))

    def cached_net(self) -> nn.Module:
        """What a training step calls on cached features (:meth:`prefix_features`): the head, or the
        backbone's trainable stages then the head."""
        return self.head if self.suffix is None else _FromPrefix(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone_frozen:
            if self.backbone_fixed and x.device.type == "cpu" and x.ndim == 4:
                # an inference-only backbone on a CPU runs on channels-last input, as the feature cache
                # embeds (a third to a half faster for convolutional backbones): cached == uncached
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)
        if self.prefix is not None:
            with torch.no_grad():
                features = self.prefix(x)
            return self.head(self.suffix(features))
        return self.head(self.backbone(x))


class _FromPrefix(nn.Module):
    """``model.from_prefix`` as a module (it holds no parameters of its own: they stay the model's)."""

    def __init__(self, model: EmbeddingModel):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, features: Tensor) -> Tensor:
        return self.model.from_prefix(features)


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone as a chain of named stages (its ``stages()``), whose composition is its forward."""
    stages = getattr(backbone, "stages", None)
    if not callable(stages):
        raise OptionError(
            f"backbone {type(backbone).__name__} does not say its stages (no stages() method), so it can only be "
            "frozen whole (freeze_backbone=true) or not at all"
        )
    return list(stages())


def split_backbone(backbone: nn.Module, upto: int | str) -> tuple[nn.Module, nn.Module, str]:
    """(the stages up to and including ``upto``, the rest, the name of ``upto``) as two chains."""
    stages = backbone_stages(backbone)
    names = [n for n, _ in stages]
    if isinstance(upto, bool) or not isinstance(upto, int | str):
        raise OptionError(f"freeze_backbone takes true, false, a stage name or index; got {upto!r}")
    if isinstance(upto, int):
        if not 0 <= upto < len(stages) - 1:
            raise OptionError(
                f"freeze_backbone={upto}: the backbone has stages 0..{len(stages) - 1} ({', '.join(names)}); freezing "
                f"up to stage 0..{len(stages) - 2} leaves one to train (true freezes all)"
            )
        index = upto
    else:
        if upto not in names:
            raise OptionError(
                f"freeze_backbone={upto!r} is not a stage of the backbone; its stages: {', '.join(names)}"
            )
        index = names.index(upto)
        if index == len(stages) - 1:
            raise OptionError(f"freeze_backbone={upto!r} is the last stage: that freezes it all; write true")
    prefix = nn.Sequential(*(m for _, m in stages[: index + 1]))
    suffix = nn.Sequential(*(m for _, m in stages[index + 1 :]))
    return prefix, suffix, names[index]


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
