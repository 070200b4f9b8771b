"""The ``timm`` backbone: any model of the timm library, with weights read offline.

Weights come from ``weights_path`` (a ``.safetensors``, ``.pth`` or ``.bin`` file), or, with
``pretrained=true``, from the local Hugging Face cache (or timm's older torch-hub cache) as
``HF_HUB_OFFLINE=1`` would find them: nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dmlkit
from dmlkit.errors import DmlkitError, OptionError

EXTRA = "pip install 'dmlkit[timm]'"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise DmlkitError(f"backbone 'timm' needs the timm package: {EXTRA}") from None
    return timm


def check_model_name(name: str) -> str:
    """``name`` if timm has it (``arch`` or ``arch.tag``), else an error with the closest names."""
    timm = _timm()
    if not name:
        raise OptionError(
            "backbone 'timm' needs model=NAME, a timm model such as resnet50.a1_in1k or vit_small_patch16_224.dino "
            "(timm.list_models(pretrained=True) lists them)"
        )
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise OptionError(
            f"backbone 'timm': {name!r} would be read from the Hugging Face hub, and dmlkit never downloads; "
            "name the timm architecture (model=ARCH.TAG) and pass weights_path=FILE"
        )
    if name.startswith("local-dir:"):
        return name
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=bool(tag)) or timm.list_models(), 3, 0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise OptionError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them)")
    if tag:
        try:
            timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            close = difflib.get_close_matches(name, tags, 3, 0.5) or tags[:3]
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; it has no pretrained tag"
            raise OptionError(f"timm model {arch!r} has no pretrained tag {tag!r}{hint}") from None
    return name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm state dict from ``path`` (.safetensors, or a torch file read with ``weights_only=True``).

    A checkpoint that wraps it (``state_dict``, ``model``, EMA weights first, as timm reads them),
    a ``module.`` prefix (DistributedDataParallel), and a dmlkit checkpoint or backbone of this
    kind (``backbone.model.`` / ``model.``) are unwrapped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DmlkitError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DmlkitError(f"cannot read weights file {p}: {first}") from None
    if isinstance(sd, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DmlkitError(f"weights file {p} holds no state dict (a mapping of parameter names to tensors)")
    for prefix in ("module.", "backbone.model.", "model."):
        if prefix == "backbone.model." and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}  # a dmlkit checkpoint
        elif all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def cached_weights(cfg: dict[str, Any], name: str) -> Path:
    """The file of ``cfg``'s pretrained weights in the local caches; never downloads."""
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = (
                [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            )
            for filename in names:
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    if url:  # timm's older cache: torch hub's checkpoints folder
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if legacy.is_file():
            return legacy
    if not hub_id and not url:
        raise DmlkitError(f"timm model {name!r} has no pretrained weights: pass weights_path=FILE, or pretrained=false")
    where = (
        f"put it in the Hugging Face cache (`hf download {hub_id} model.safetensors` on a machine with network "
        "access, then copy ~/.cache/huggingface/hub), or download "
        f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors"
        if hub_id
        else f"download {url} to {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )
    raise DmlkitError(
        f"timm weights for {name!r} are not in the local cache and dmlkit never downloads: {where} and pass "
        "weights_path=FILE, or pretrained=false for random weights"
    )


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """What timm says while loading weights (it logs missing and unexpected keys instead of raising)."""
    logger = logging.getLogger("timm.models._builder")
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level, propagate = Keep(logging.INFO), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class TimmBackbone(nn.Module):
    """Any timm model (``model=NAME``, e.g. ``resnet50.a1_in1k``, ``vit_small_patch16_224.dino``), weights offline.

    Input size, mean, std, interpolation and crop come from the model's pretrained config
    (``image_size`` overrides the size; a ViT's position embeddings are resized by timm).
    The output is the model's own pooled features (``num_classes=0``: average pooling for
    CNNs, the class token or token average for ViTs, with the model's final norm), so the
    head's ``pooling`` does not apply; ``feature_maps=true`` returns a CNN's ``[B, C, H, W]``
    maps instead, pooled by the head (``train.pooling``). ``in_chans=1`` takes grayscale
    images (timm sums the first convolution's pretrained weights). ``global_pool`` and
    ``model_kwargs`` (e.g. ``{drop_path_rate = 0.1}``) go to ``timm.create_model``.

    Args:
        model: the timm model name, with its pretrained tag (``resnet50.a1_in1k``).
        pretrained: load the model's weights from the local Hugging Face cache (never downloaded).
        weights_path: a local weights file (.safetensors, .pth, .bin) to load instead.
        image_size: the input side (default: the model's pretrained config).
        in_chans: input channels (1 for greyscale; timm adapts the first convolution).
        feature_maps: return a CNN's feature maps, pooled by dmlkit's head, instead of the model's pooled features.
        global_pool: timm's ``global_pool`` argument (e.g. ``avg``, ``token``).
        model_kwargs: other arguments of ``timm.create_model`` (e.g. ``{drop_path_rate = 0.1}``).
    """

    def __init__(
        self,
        model: str = "",
        pretrained: bool = True,
        weights_path: str | None = None,
        image_size: int | None = None,
        in_chans: int = 3,
        feature_maps: bool = False,
        global_pool: str = "",
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        timm = _timm()
        name = check_model_name(model)
        if in_chans < 1:
            raise OptionError(f"backbone 'timm': in_chans must be >= 1; got {in_chans}")
        if image_size is not None and image_size < 1:
            raise OptionError(f"backbone 'timm': image_size must be >= 1; got {image_size}")
        kwargs: dict[str, Any] = {**(model_kwargs or {}), "num_classes": 0, "in_chans": in_chans}
        if global_pool:
            kwargs["global_pool"] = global_pool
        cfg = _pretrained_cfg(timm, name)
        if image_size and cfg.get("fixed_input_size") and image_size != (cfg.get("input_size") or (0, 0, 0))[-1]:
            kwargs["img_size"] = image_size  # a ViT is built for one size
        state = None
        if weights_path:
            state = read_state_dict(weights_path)
        elif pretrained:
            state = read_state_dict(cached_weights(cfg, name))
        source = weights_path or "the cached pretrained weights"
        try:
            with _load_report() as report:
                if state is None:
                    net = timm.create_model(name, pretrained=False, **kwargs)
                else:
                    net = timm.create_model(
                        name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs
                    )
        except (RuntimeError, ValueError, KeyError) as exc:
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            if state is None:
                raise DmlkitError(f"timm model {name!r} failed to build: {first[:300]}") from None
            raise DmlkitError(f"{source} do not fit timm model {name!r}: {first[:300]}") from None
        missing = [m for m in report if m.startswith("Missing keys")]
        if missing:
            raise DmlkitError(
                f"{source} do not fit timm model {name!r}: {missing[0][:300]} (is it this model's state dict?)"
            )
        for key in ("state_dict", "file"):  # timm keeps the overlay: do not hold a second copy of the weights
            for holder in (getattr(net, "pretrained_cfg", None), getattr(net, "default_cfg", None)):
                if isinstance(holder, dict):
                    holder.pop(key, None)
        self.model, self.name, self.feature_maps = net, name, feature_maps
        data = timm.data.resolve_data_config({}, model=net)
        size = int(image_size or data["input_size"][-1])
        self.input_spec = {
            "channels": in_chans,
            "image_size": size,
            "mean": _per_channel(data["mean"], in_chans),
            "std": _per_channel(data["std"], in_chans),
            "interpolation": str(data.get("interpolation") or "bilinear"),
            "crop_pct": float(data.get("crop_pct") or 0.875),
        }
        if feature_maps:
            was = net.training
            net.eval()
            with torch.no_grad():
                out = net.forward_features(torch.zeros(1, in_chans, size, size))
            net.train(was)
            if out.ndim != 4 or out.shape[1] != net.num_features:
                raise OptionError(
                    f"backbone 'timm': feature_maps=true needs [B, C, H, W] feature maps, and {name!r} gives "
                    f"{tuple(out.shape)}; use feature_maps=false (the model's own pooling)"
                )
            self.out_features = int(net.num_features)
        else:
            self.out_features = int(getattr(net, "head_hidden_size", None) or net.num_features)

    @staticmethod
    def validate_options(options: dict[str, Any]) -> None:
        """timm installed and the model name known: checked with the config, before data loads."""
        check_model_name(options.get("model", ""))

    def forward(self, x):
        if self.feature_maps:
            return self.model.forward_features(x)
        return self.model(x)  # num_classes=0: the pooled (pre-logits) features

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The model as a chain cut after each of timm's feature stages (its ``feature_info``: e.g.
        ``layer1`` ... ``layer4`` for a ResNet, ``blocks.0`` ... for a ViT); the last piece, ``head``,
        holds the rest (final norm, pooling). Traced with torch.fx; each piece runs the original
        layers (no copy of a parameter). A stage after which more than one value goes on is not a
        place to cut and is left out."""
        import torch.fx as fx

        names = [f"model.{f['module']}" for f in getattr(self.model, "feature_info", []) if f.get("module")]

        class StagesAsLeaves(fx.Tracer):  # each stage one node of the graph: the chain is cut between them
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return qualname in names or super().is_leaf_module(m, qualname)

        try:
            traced = fx.GraphModule(self, StagesAsLeaves().trace(self))
        except Exception as exc:
            raise DmlkitError(
                f"timm model {self.name!r} cannot be traced into stages ({type(exc).__name__}); freeze it whole "
                "(freeze_backbone=true) or not at all"
            ) from None
        nodes = list(traced.graph.nodes)
        cuts = []  # (index of the stage's node, its name), where only its value goes on
        for i, node in enumerate(nodes):
            if node.op == "call_module" and node.target in names and _cuttable(nodes, i):
                cuts.append((i, node.target.removeprefix("model.")))
        pieces, start = [], 0
        for end, name in [*cuts, (len(nodes) - 1, "head")]:
            pieces.append((name, fx.GraphModule(traced, _segment(nodes, start, end, first=start == 0))))
            start = end + 1
        return pieces


def _cuttable(nodes: list[Any], cut: int) -> bool:
    """Whether only the value of node ``cut`` (besides parameters and constants) is used after it."""
    before = set(nodes[: cut + 1])
    used = {a for n in nodes[cut + 1 :] for a in n.all_input_nodes if a in before and a.op != "get_attr"}
    return used == {nodes[cut]}


def _segment(nodes: list[Any], start: int, end: int, first: bool) -> Any:
    """A graph of ``nodes[start:end + 1]``: its input is the model's input (first segment) or the value
    of the node before ``start``; its output the value of node ``end`` (the model's output, last)."""
    import torch.fx as fx

    g = fx.Graph()
    env: dict[Any, Any] = {}
    if not first:
        env[nodes[start - 1]] = g.placeholder("x")

    def lookup(n: Any) -> Any:
        if n not in env and n.op == "get_attr":  # a parameter or buffer: read it where it is used
            env[n] = g.get_attr(n.target)
        return env[n]

    for node in nodes[start : end + 1]:
        if node.op == "output":
            g.output(fx.node.map_arg(node.args[0], lookup))
            return g
        env[node] = g.node_copy(node, lookup)
    g.output(env[nodes[end]])
    return g


def _pretrained_cfg(timm: Any, name: str) -> dict[str, Any]:
    if name.startswith("local-dir:"):
        return {}
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    """The config's per-channel mean or std for ``channels`` inputs (their average for fewer)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def feature_count(options: dict[str, Any]) -> int:
    """The backbone's output features for ``options``, from a model built on the meta device (no memory)."""
    timm = _timm()
    kwargs: dict[str, Any] = {**(options.get("model_kwargs") or {}), "num_classes": 0}
    kwargs["in_chans"] = options.get("in_chans", 3)
    if options.get("global_pool"):
        kwargs["global_pool"] = options["global_pool"]
    with torch.device("meta"):
        net = timm.create_model(options["model"], pretrained=False, **kwargs)
    if options.get("feature_maps"):
        return int(net.num_features)
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def recommends(options: dict[str, Any]) -> dict[str, Any]:
    """What a timm backbone with weights recommends: the fine-tuning recipe of dmlkit's ImageNet backbones.

    The embedding starts as the model's pooled features (a linear layer that starts as the
    identity), BatchNorm statistics stay as pretraining left them (nothing to keep for a ViT),
    the backbone moves at a tenth of the base learning rate (AdamW, 1e-4: a ViT at 1e-5), the
    loss is Proxy Anchor with proxies at the class means of embedded training samples, and the
    untrained model is evaluated first (epoch 0). With random weights: nothing.
    """
    if not options.get("model") or not (options.get("pretrained") or options.get("weights_path")):
        return {}
    try:
        features = feature_count(options)
    except Exception:  # a wrong name or option: the config check reports it
        return {}
    train: dict[str, Any] = {
        "embedding_size": features,
        "head_init": "identity",
        "freeze_bn": True,
        "optimizer": "adamw",
        "lr": 1e-4,
        "backbone_lr_multiplier": 0.1,
        "eval_at_start": True,
    }
    if options.get("feature_maps"):
        train["pooling"] = "avgmax"
    return {"train": train, "loss": {"name": "proxy_anchor", "proxy_init": "class_means"}}


@dmlkit.hookimpl
def register_backbones(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "timm",
            TimmBackbone,
            "Any timm model (model=NAME); weights from weights_path or the local cache, never downloaded",
            recommends=recommends,
        )
    )
