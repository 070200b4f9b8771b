"""The training loop: components from the registry, run directory, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils.data import DataLoader

from dmlkit import distributed
from dmlkit.config import to_toml
from dmlkit.data import DatasetSplits, Split
from dmlkit.errors import DmlkitError, TrainingError
from dmlkit.model import EmbeddingHead, EmbeddingModel, feature_size, input_spec
from dmlkit.proxies import banks
from dmlkit.registry import Registry
from dmlkit.rundir import RunLock, crash_point, writable_error, write_text

#: Events a run's components (callbacks, the loss, the miner) may implement as methods taking the trainer.
EVENTS = (
    "on_train_start",
    "on_epoch_start",
    "on_after_backward",
    "on_epoch_end",
    "on_validation_end",
    "on_epoch_logged",
    "on_train_end",
    "on_test_end",
)
CHECKPOINT_VERSION = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        cause: BaseException | None = exc  # torch's writer reports a failed write as a RuntimeError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError):
            raise writable_error(path, cause, "checkpoint") from None
        raise


#: What every dmlkit checkpoint holds (``load_checkpoint`` refuses one without them).
CHECKPOINT_KEYS = ("config", "epoch", "step", "model", "loss", "optimizer", "scheduler", "history", "best")


def load_run(
    run: str | Path, which: str = "best", console: Console | None = None, err_console: Console | None = None
) -> Trainer:
    """The trainer of a finished (or running) run with the weights of its ``best`` or ``last``
    checkpoint, ready for :meth:`Trainer.embed` and :meth:`Trainer.evaluate` (without the run's
    callbacks). ``run`` is a run
    directory or a checkpoint file. ``best`` is the recorded best epoch's checkpoint; when a kill
    fell between writing ``last.pt`` and ``best.pt``, ``best.pt`` is restored from ``last.pt`` if no
    other process holds the run (otherwise the same weights are read from ``last.pt``)."""
    from dmlkit.config import validate
    from dmlkit.plugins import get_host
    from dmlkit.rundir import best_checkpoint

    run = Path(run)
    if which not in ("best", "last"):
        raise DmlkitError(f"--checkpoint must be best or last; got {which!r}")
    if run.is_file() and run.name == "best.pt" and (run.parent / "last.pt").is_file():
        run, which = run.parent, "best"  # a run's best.pt: checked against the run's record like the directory
    if run.is_dir() and which == "best":
        path = best_checkpoint(run, repair=False)
        if path.name != "best.pt" and (run / "best.pt").exists():
            try:
                with RunLock(run):
                    path = best_checkpoint(run, repair=True, console=err_console)
            except DmlkitError:  # in use, or read-only: read the same weights from last.pt, write nothing
                pass
    else:
        path = run / "last.pt" if run.is_dir() else run
    ckpt = load_checkpoint(path)
    registry = get_host().registry
    cfg = validate(ckpt["config"], registry)
    # reading a run trains nothing: its callbacks (trackers ...) are not built, nor their packages needed
    trainer = Trainer({**cfg, "callbacks": []}, registry, path.parent, console=console)
    trainer.load_state_dict(ckpt)
    trainer.checkpoint_file = path.name
    return trainer


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without running code in it (``weights_only=True``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise DmlkitError(f"no checkpoint at {p}; pass a run directory or a .pt file")
    if p.stat().st_size == 0:
        raise DmlkitError(f"checkpoint {p} is empty (0 bytes): it was never written completely")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DmlkitError(f"cannot load checkpoint {p} (corrupt, or not a dmlkit checkpoint): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dmlkit" or "config" not in ckpt:
        raise DmlkitError(f"{p} is not a dmlkit checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise DmlkitError(f"checkpoint {p} is incomplete: it has no {', '.join(missing)}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["best"], dict):
        raise DmlkitError(f"checkpoint {p} is damaged: its config, epoch or best entry has the wrong type")
    return ckpt


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DmlkitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DmlkitError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


class Trainer:
    """Builds a run from a validated config and trains it; components receive :data:`EVENTS`."""

    def __init__(
        self,
        cfg: dict[str, Any],
        registry: Registry,
        run_dir: str | Path,
        console: Console | None = None,
    ):
        self.cfg, self.registry, self.run_dir = cfg, registry, Path(run_dir)
        t = self.settings = cfg["train"]
        self.rank, self.world_size, local_rank = distributed.setup()
        self.console = console or Console()
        if self.rank != 0:
            self.console = Console(quiet=True)
        self.device = resolve_device(t["device"])
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        seed_everything(t["seed"])
        # the evaluator first: the metrics that settings and components read are checked before data loads
        self.evaluator = registry.build("evaluator", cfg["evaluator"]["name"], **_opts(cfg["evaluator"]))
        check_metrics(cfg, registry, self.evaluator)

        self.backbone = registry.build("backbone", cfg["backbone"]["name"], **_opts(cfg["backbone"]))
        spec = input_spec(self.backbone)
        data = registry.build("dataset", cfg["dataset"]["name"], context={"input_spec": spec}, **_opts(cfg["dataset"]))
        if not isinstance(data, DatasetSplits):
            raise DmlkitError(
                f"{self._describe('dataset')} returned a {type(data).__name__}; a dataset must return "
                "dmlkit.data.DatasetSplits(train, test)"
            )
        for what, count in getattr(data, "skipped", {}).items():
            self.console.print(f"[yellow]warning: dataset skipped {count} {what} (skip_bad=true)[/yellow]")
        self.train_split: Split = data.train
        self.test_split: Split = data.test
        check_splits(cfg["dataset"]["name"], data.train, data.test)
        self.val_split: Split | None = None
        self.val_note = "no validation: best = last epoch"
        self.full_train_split = data.train
        self.train_index = self.val_index = None  # into full_train_split
        if t["folds"] or (t["val_fraction"] > 0 and t["val_split"] == "classes"):
            self.train_index, self.val_index = class_disjoint_index(
                data.train.labels, t["val_fraction"], t["seed"], folds=t["folds"], fold=t["fold"]
            )
            self.train_split, self.val_split = data.train.subset(self.train_index), data.train.subset(self.val_index)
            n_val = self.val_split.num_classes
            self.val_note = f"validation: {n_val} held-out training classes ({len(self.val_split)} images)"
            if n_val < 2:
                self.console.print(
                    f"[yellow]warning: the validation split holds {n_val} class: every neighbour shares it, so "
                    "MAP@R is 1.0 whatever the model; use more classes (val_fraction) or --set val_split=samples[/yellow]"
                )
        elif t["val_fraction"] > 0:
            self.train_index, self.val_index = sample_disjoint_index(data.train.labels, t["val_fraction"], t["seed"])
            self.train_split, self.val_split = data.train.subset(self.train_index), data.train.subset(self.val_index)
            self.val_note = (
                f"validation: {len(self.val_split)} held-out images of the {self.val_split.num_classes} training "
                "classes (sample-disjoint: the same classes, unseen images)"
            )
        if self.val_split is not None:
            self.val_split = self.val_split.with_transform(self.test_split.transform)
        try:
            head = EmbeddingHead(
                feature_size(self.backbone),
                t["embedding_size"],
                t["pooling"],
                t["head_norm"],
                t["normalize_embeddings"],
                t["head_init"],
            )
            self.model = EmbeddingModel(self.backbone, head, freeze_bn=t["freeze_bn"]).to(self.device)
        except (MemoryError, RuntimeError) as exc:  # an embedding size or model too large for this machine
            if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
                raise
            raise DmlkitError(
                f"not enough memory to build the model with embedding_size {t['embedding_size']}; use a smaller one"
            ) from None
        if t["freeze_backbone"]:
            self.model.freeze_backbone()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.embedding_size = head.out_features
        self.net: nn.Module = self.model  # what a training step calls: the model, or its DDP wrapper
        self.features = None  # the frozen-backbone fast path
        if t["feature_cache"]:
            if self.world_size > 1:
                raise DmlkitError("train.feature_cache runs in one process; run it without torchrun")
            from dmlkit.features import FeatureCache

            self.features = FeatureCache(self)
            self.net = self.model.head  # cached pooled features go straight to the head
        if self.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=t["warmup_epochs"] > 0,
            )
        ctx = {"num_classes": self.train_split.num_classes, "embedding_size": self.embedding_size}
        self.loss = self._module("loss", registry.build("loss", cfg["loss"]["name"], context=ctx, **_opts(cfg["loss"])))
        self.miner = (
            self._module("miner", registry.build("miner", cfg["miner"]["name"], context=ctx, **_opts(cfg["miner"])))
            if cfg["miner"]["name"]
            else None
        )
        self.sampler = registry.build(
            "sampler",
            cfg["sampler"]["name"],
            context={
                "labels": self.train_split.labels,
                "batch_size": t["batch_size"],
                "seed": t["seed"],
                "rank": self.rank,
                "world_size": self.world_size,
            },
            **_opts(cfg["sampler"]),
        )
        self.callbacks = [registry.build("callback", cb["name"], **_opts(cb)) for cb in cfg["callbacks"]]
        self._owners = {
            id(self.loss): ("loss", cfg["loss"]["name"]),
            **({id(self.miner): ("miner", cfg["miner"]["name"])} if self.miner else {}),
            id(self.sampler): ("sampler", cfg["sampler"]["name"]),
            **{id(c): ("callback", cb["name"]) for c, cb in zip(self.callbacks, cfg["callbacks"])},
        }
        self.proxy_banks = banks(self.loss)
        for bank in self.proxy_banks:
            self._owners[id(bank)] = ("loss", cfg["loss"]["name"])
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.epoch = 0  # epochs completed
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"value": None, "epoch": None, **self.selection()}
        self.events: list[dict[str, Any]] = []  # what components logged during the current epoch
        self._last_val: tuple[int, dict[str, Any]] | None = None
        self._val_values: list[float] = []
        self.results: dict[str, Any] = {}
        self._in_epoch = False
        self._bad_step: torch.Tensor | None = None  # device-side: the first step with a non-finite value
        self._terms: dict[str, list[torch.Tensor]] = {}  # per-term losses of the current epoch
        self.stop_requested = False
        self.extra_state: dict[str, Any] = {}  # components may keep resumable state here

    # -- set-up ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone, head, and every parameter the loss or miner owns, each with its lr multiplier."""
        t = self.settings
        groups = [
            {
                "name": "backbone",
                "params": [p for p in self.model.backbone.parameters() if p.requires_grad],
                "lr_multiplier": t["backbone_lr_multiplier"],
            },
            {"name": "head", "params": list(self.model.head.parameters()), "lr_multiplier": t["head_lr_multiplier"]},
        ]
        for owner_name, owner in (("loss", self.loss), ("miner", self.miner)):
            if owner is None:
                continue
            mults = getattr(owner, "lr_multipliers", {})
            bank_mults = {id(b.vectors): b.lr_multiplier for b in banks(owner)}
            for pname, p in owner.named_parameters():
                if p.requires_grad:
                    mult = next(
                        (m for k, m in mults.items() if pname == k or pname.startswith(k + ".")),
                        bank_mults.get(id(p), 1.0),
                    )
                    groups.append({"name": f"{owner_name}.{pname}", "params": [p], "lr_multiplier": float(mult)})
        return [g for g in groups if g["params"]]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.settings
        groups = self.param_groups()
        for g in groups:
            g["lr"] = t["lr"] * g["lr_multiplier"]
        if t["optimizer"] == "adam":
            return torch.optim.Adam(groups, lr=t["lr"], weight_decay=t["weight_decay"])
        if t["optimizer"] == "adamw":
            return torch.optim.AdamW(groups, lr=t["lr"], weight_decay=t["weight_decay"])
        return torch.optim.SGD(groups, lr=t["lr"], momentum=0.9, weight_decay=t["weight_decay"])

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        t = self.settings
        epochs = t["epochs"]
        if t["scheduler"] == "cosine":
            f = lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))  # noqa: E731
        elif t["scheduler"] == "step":
            f = lambda e: 0.1 ** (e // max(1, epochs // 3))  # noqa: E731
        else:
            f = lambda e: 1.0  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, f)

    def loader_workers(self, split: Split) -> int:
        """``train.num_workers``, or for -1 (auto): none for arrays, up to 8 for image files."""
        workers = self.settings["num_workers"]
        if workers < 0:
            workers = 0 if not split.items or not isinstance(split.items[0], str) else min(8, os.cpu_count() or 1)
        return workers

    def loader(self, split: Split, train: bool) -> DataLoader:
        t = self.settings
        workers = self.loader_workers(split)
        common = {"num_workers": workers, "pin_memory": self.device.type == "cuda", "persistent_workers": False}
        if workers:
            common["worker_init_fn"] = _worker_init
        if train:
            return DataLoader(split, batch_sampler=self.sampler, **common)
        return DataLoader(split, batch_size=t["eval_batch_size"], shuffle=False, **common)

    # -- events ------------------------------------------------------------------------------
    def components(self) -> list[Any]:
        """What receives training events: callbacks, the loss, its proxy banks, the miner, the sampler."""
        return [*self.callbacks, self.loss, *self.proxy_banks, *([self.miner] if self.miner else []), self.sampler]

    def log_event(self, **info: Any) -> None:
        """Log what a component did (a re-initialisation, ...): one entry in the epoch's ``events``
        list of metrics.jsonl, with the epoch and step it happened at."""
        self.events.append({"epoch": self.epoch + 1 if self._in_epoch else self.epoch, "step": self.step, **info})

    def emit(self, event: str, **kwargs: Any) -> None:
        """Call ``event`` on every component that has it; a failure names the component and its plugin."""
        for comp in self.components():
            fn = getattr(comp, event, None)
            if fn is None:
                continue
            try:
                fn(self, **kwargs)
            except DmlkitError:
                raise
            except Exception as exc:
                kind, name = self._owners.get(id(comp), ("component", type(comp).__name__))
                raise TrainingError(
                    f"{self._describe(kind, name)} failed in {event}: {type(exc).__name__}: {exc}"
                ) from exc

    # -- embedding and evaluation ------------------------------------------------------------
    @torch.no_grad()
    def embed(self, split: Split, what: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (float32, normalised) and labels of ``split``, model in eval mode; a progress
        bar labelled ``what`` in a terminal."""
        was = self.model.training
        self.model.eval()
        outs = []
        if self.features is not None:
            feats = self.features.eval_features(split)
            for f in feats.split(self.settings["eval_batch_size"]):
                with self.autocast():
                    outs.append(self.model.head(f.to(self.device)).float().cpu())
            self.model.train(was)
            return torch.cat(outs).numpy(), split.labels
        with progress_bar(self.console, what) as bar:
            task = bar.add_task(what, total=len(split))
            for x, _ in self.loader(split, train=False):
                x = x.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                with self.autocast():
                    outs.append(self.model(x).float().cpu())
                bar.advance(task, len(x))
        self.model.train(was)
        return torch.cat(outs).numpy(), split.labels

    def evaluate(self, split: Split | None = None, what: str = "test") -> dict[str, Any]:
        split = split or self.test_split
        emb, labels = self.embed(split, f"embedding the {what} images")
        with self.console.status(f"evaluating: {len(labels):,} {what} embeddings ({self.cfg['evaluator']['name']})"):
            return self.evaluator(emb, labels, split.query_mask, split.gallery_mask)

    def autocast(self):
        """bf16 autocast on CUDA when train.amp is on; a no-op context elsewhere."""
        enabled = self.settings["amp"] and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "dmlkit",
            "version": CHECKPOINT_VERSION,
            "config": self.cfg,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "miner": self.miner.state_dict() if self.miner else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "extra": self.extra_state,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.loss.load_state_dict(ckpt["loss"])
            if self.miner:
                self.miner.load_state_dict(ckpt.get("miner", {}))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except Exception as exc:  # a wrong shape, a missing or extra key: the weights do not fit the config
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise DmlkitError(
                f"the checkpoint's weights do not fit the model its config builds ({type(exc).__name__}: "
                f"{first[:300]}); the file is damaged or was edited"
            ) from None
        if not isinstance(ckpt["history"], list) or not isinstance(ckpt["step"], int):
            raise DmlkitError("the checkpoint's history or step has the wrong type; the file is damaged")
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.history, self.extra_state = ckpt["history"], ckpt.get("extra", {})
        best = dict(ckpt["best"])
        if best.get("value") is not None and not math.isfinite(best["value"]):  # written by dmlkit < 0.2
            best.update(value=None, epoch=None)
        self.best = {**self.selection(), **{k: v for k, v in best.items() if k in ("value", "epoch")}}

    def save(self, best: bool) -> None:
        if self.rank != 0:
            return
        state = self.state_dict()
        crash_point("before", self.epoch)
        atomic_save(state, self.run_dir / "last.pt")
        crash_point("between", self.epoch)
        if best:
            atomic_save(state, self.run_dir / "best.pt")
        crash_point("after", self.epoch)

    def write_run_files(self, resumed: bool = False) -> None:
        """config.toml and metrics.jsonl (one row per epoch of the last checkpoint's history), each
        replaced whole, after the checkpoints: a run that fails before its first checkpoint writes
        neither, and a resumed run's log has exactly the epochs its checkpoint has. On resuming
        (``resumed``), before any epoch: metrics.jsonl, and config.toml only if it is missing."""
        if self.rank != 0:
            return
        files = [("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))]
        if not resumed or not (self.run_dir / "config.toml").exists():
            files.insert(0, ("config.toml", self.config_comments() + to_toml(self.cfg)))
        for name, text in files:
            try:
                write_text(self.run_dir / name, text)
            except OSError as exc:
                raise writable_error(self.run_dir / name, exc, "file") from None

    def replaced_components(self) -> list[str]:
        """One line per component of this run that a plugin put in place of another plugin's."""
        out = []
        sections = [(s, self.cfg[s]) for s in ("dataset", "backbone", "loss", "miner", "sampler", "evaluator")]
        for kind, section in [*sections, *(("callback", cb) for cb in self.cfg["callbacks"])]:
            name = section.get("name")
            if name and (kind, name) in self.registry:
                spec = self.registry.get(kind, name)
                if spec.replaced_plugin:
                    out.append(
                        f"{kind} '{spec.name}' is plugin '{spec.plugin}''s replacement of the {kind} "
                        f"'{spec.replaces}' of plugin '{spec.replaced_plugin}'"
                    )
        return out

    def config_comments(self) -> str:
        return "".join(f"# {line}\n" for line in self.replaced_components())

    # -- the loop ----------------------------------------------------------------------------
    def _checks_each_step(self) -> bool:
        """Whether the finiteness checks may synchronise with the device at every step: on a CPU
        (where it costs nothing), with ``nonfinite=skip`` (a bad step must be skipped), or when
        ``train.sync_every`` is 1. Otherwise they run on the device and are read every
        ``sync_every`` steps, keeping the host off the critical path."""
        return self.device.type == "cpu" or self.settings["nonfinite"] == "skip" or self.settings["sync_every"] <= 1

    def check_deferred(self) -> None:
        """Read the device-side finiteness flag (one synchronisation); stop if a step went bad."""
        if self._bad_step is None:
            return
        bad = int(self._bad_step)
        if bad >= 0:
            self._bad_step = None
            raise TrainingError(
                f"non-finite loss or gradient at epoch {self.epoch + 1}, step {bad}; likely causes: learning rate "
                f"too high (now {self.settings['lr']}), a loss scale/temperature too large, or bad input data. The "
                f"last good checkpoint is in {self.run_dir}; lower the lr or set train.nonfinite=skip"
            )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimisation step; returns the detached loss (on the device), None for a skipped step."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with self.autocast():
            emb = self._guarded("backbone", self.net, x)
        if self.world_size > 1:  # losses and miners see the whole global batch
            emb, y = distributed.gather_batch(emb, y)
        indices = self._guarded("miner", self.miner, emb, y) if self.miner is not None else None
        # without a miner, the plain call: a loss that takes no indices works as well
        loss = self._guarded("loss", self.loss, emb, y) if indices is None else self._guarded(
            "loss", self.loss, emb, y, indices=indices
        )
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TrainingError(f"{self._describe('loss')} must return a scalar tensor; got {type(loss).__name__}")
        each = self._checks_each_step()
        if each and not torch.isfinite(loss):
            return self._nonfinite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.emit("on_after_backward")
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.settings["grad_clip"] > 0:
            norm = nn.utils.clip_grad_norm_(params, self.settings["grad_clip"])
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params]) if params else None  # fused, one sync
        if each:
            if norm is not None and not torch.isfinite(norm):
                return self._nonfinite("gradient", norm)
        else:  # on the device: remember the first bad step, read every sync_every steps
            bad = (
                ~torch.isfinite(loss.detach())
                if norm is None
                else ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
            )
            if self._bad_step is None:
                self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_step = torch.where((self._bad_step < 0) & bad, self.step + 1, self._bad_step)
        self.optimizer.step()
        self.step += 1
        terms = getattr(self.loss, "last_terms", None)  # a loss made of parts reports each (logged per epoch)
        if isinstance(terms, dict):
            for k, v in terms.items():
                self._terms.setdefault(k, []).append(v.detach().float())
        if not each and self.step % self.settings["sync_every"] == 0:
            self.check_deferred()
        return loss.detach()

    def _module(self, kind: str, part: Any) -> Any:
        """A built loss or miner on the run's device; one that is no initialised ``nn.Module`` is named."""
        if not isinstance(part, nn.Module) or "_modules" not in vars(part):  # .to() would fail obscurely
            raise DmlkitError(
                f"{self._describe(kind)} must be a torch.nn.Module that ran nn.Module.__init__: subclass "
                f"dmlkit.losses.{'MetricLoss' if kind == 'loss' else 'Miner'} and call super().__init__() first"
            )
        return part.to(self.device)

    def _describe(self, kind: str, name: str | None = None) -> str:
        """``kind 'name' (plugin 'p')`` for error messages; ``name`` defaults to the run's component of ``kind``."""
        name = self.cfg[kind]["name"] if name is None else name
        plugin = self.registry.get(kind, name).plugin if (kind, name) in self.registry else "?"
        return f"{kind} '{name}' (plugin '{plugin}')"

    def _guarded(self, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a component; an unexpected exception names the component and its plugin."""
        try:
            return fn(*args, **kwargs)
        except (DmlkitError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            raise TrainingError(
                f"{self._describe(kind)} failed at epoch {self.epoch + 1}, step {self.step + 1}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _nonfinite(self, what: str, value: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        msg = (
            f"non-finite {what} ({float(value.detach())}) at epoch {self.epoch + 1}, step {self.step + 1}; likely causes: "
            f"learning rate too high (now {self.settings['lr']}), a loss scale/temperature too large, or bad input "
            f"data. The last good checkpoint is in {self.run_dir}"
        )
        if self.settings["nonfinite"] == "skip":
            self.console.print(f"[yellow]warning: {escape(msg)}; step skipped[/yellow]")
            return None
        raise TrainingError(msg + "; lower the lr or set train.nonfinite=skip")

    def fit(self, test: bool = True) -> dict[str, Any]:
        """Train to ``train.epochs`` holding the run directory's lock; a new run that fails before
        its first checkpoint leaves no run directory behind. ``test=False`` ends without reading
        the test set (no results.json): what a hyper-parameter search needs."""
        if self.rank != 0:
            return self._fit(test)
        lock = RunLock(self.run_dir)
        with lock:
            try:
                return self._fit(test)
            except BaseException:
                lock.discard_if_empty_run()
                raise

    def _fit(self, test: bool = True) -> dict[str, Any]:
        t = self.settings
        if self.history:  # resumed: the log holds exactly the checkpoint's epochs (a kill may have cut it)
            self.write_run_files(resumed=True)
        for line in self.replaced_components():
            self.console.print(f"[yellow]note: {escape(line)}[/yellow]", soft_wrap=True)
        self.console.print(f"{self.val_note}; {self.best['selected_by']}")
        if self.best["split"] == "test":
            self.console.print(
                "[bold red]warning: selection=test_set_biased picks the best epoch on the TEST set; its numbers are "
                "optimistic and not comparable with validation-selected results (Musgrave et al. 2020)[/bold red]"
            )
        if self.epoch == 0 and not self.history:  # not when resuming from the epoch-0 checkpoint
            self.emit("on_train_start")
            if t["eval_at_start"] and not self.history:  # epoch 0: where training starts from
                self._end_epoch({"epoch": 0, "step": 0, "loss": None, "lr": self.optimizer.param_groups[0]["lr"]})
        progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        with progress:
            while self.epoch < t["epochs"] and not self.stop_requested:
                self._run_epoch(progress)
        self.emit("on_train_end")
        self.results = self.final_test() if test else {}
        if self.results:
            self.emit("on_test_end", results=self.results)  # results.json is written: trackers log the run's files
        return self.history[-1] if self.history else {}

    # -- model selection ---------------------------------------------------------------------
    def selection(self) -> dict[str, Any]:
        """How this run picks its best epoch: metric, split it is read on, direction, and in words."""
        t = self.settings
        metric = t["best_metric"]
        if metric == "loss":
            return {"metric": "loss", "split": "train", "mode": "min", "selected_by": "best = lowest training loss"}
        mode = metric_direction(self.evaluator, metric)
        if t["selection"] == "last" or (t["selection"] == "validation" and self.val_split is None):
            return {"metric": metric, "split": "last", "mode": mode, "selected_by": "best = last epoch"}
        if t["selection"] == "test_set_biased":
            return {"metric": metric, "split": "test", "mode": mode, "selected_by": f"best by TEST {metric} (biased)"}
        return {"metric": metric, "split": "val", "mode": mode, "selected_by": f"best by validation {metric}"}

    def validate(self) -> dict[str, Any]:
        """Validation metrics (``val_*``) of the current model; ``on_validation_end`` receives them.
        An evaluation at the step of the previous one is reused, so each is seen once."""
        if self._last_val is not None and self._last_val[0] == self.step:
            return self._last_val[1]
        self.check_deferred()  # a non-finite step is reported as such, before its NaNs reach the evaluator
        metrics = {f"val_{k}": v for k, v in self.evaluate(self.val_split, "validation").items() if _scalar(v)}
        metrics["step"] = self.step
        self._last_val = (self.step, metrics)
        key = f"val_{self.best['metric']}"
        if key in metrics:
            self._val_values.append(metrics[key])
            if len(self._val_values) == 3 and max(self._val_values) - min(self._val_values) < 1e-9:
                self.console.print(
                    f"[yellow]warning: {key} is {metrics[key]:.4f} at every validation so far: the validation split "
                    "tells the models apart poorly (too few classes or images?)[/yellow]"
                )
        self.emit("on_validation_end", metrics=metrics)
        return metrics

    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        best = self.best["value"]
        if best is None:
            return True
        return value < best if self.best["mode"] == "min" else value > best

    def final_test(self) -> dict[str, Any]:
        """Test metrics at the chosen epoch (and the last), read once; written to results.json."""
        if not self.history:
            return {}
        last_epoch = self.history[-1]["epoch"]
        at_last = {k: v for k, v in self.evaluate().items() if _scalar(v)}
        best_epoch = self.best["epoch"]
        if best_epoch is None or best_epoch == last_epoch:
            at_best = at_last
        else:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            best_ckpt = load_checkpoint(self.run_dir / "best.pt")
            if best_ckpt["epoch"] != best_epoch:
                raise TrainingError(
                    f"{self.run_dir / 'best.pt'} holds epoch {best_ckpt['epoch']}, not the recorded best epoch "
                    f"{best_epoch}; resume the run (--resume {self.run_dir}) to restore it"
                )
            self.model.load_state_dict(best_ckpt["model"])
            at_best = {k: v for k, v in self.evaluate().items() if _scalar(v)}
            self.model.load_state_dict(current)
        selected_by = self.best["selected_by"]
        if best_epoch is None:
            selected_by = "last epoch (no validation value was ever recorded)"
        results = {
            "selected_by": selected_by,
            "selection_split": self.best["split"],
            "best_metric": self.best["metric"],
            "best_value": self.best["value"],
            "best_epoch": best_epoch if best_epoch is not None else last_epoch,
            "last_epoch": last_epoch,
            "test": at_best,
            "test_last": at_last,
        }
        if self.rank == 0:
            write_json(self.run_dir / "results.json", results)
        return results

    # -- the epoch ---------------------------------------------------------------------------
    def _run_epoch(self, progress: Progress) -> None:
        t = self.settings
        epoch = self.epoch + 1
        # every epoch is seeded from (seed, epoch): a resumed run draws the same batches and augmentations
        seed_everything(t["seed"] * 100_003 + epoch)
        self.sampler.set_epoch(epoch)
        self.model.backbone_frozen = self.model.backbone_fixed or epoch <= t["warmup_epochs"]
        self.model.train()
        self._in_epoch = True
        self.emit("on_epoch_start")
        task = progress.add_task("train", total=len(self.sampler), epoch=epoch, loss="-", ips="-")
        losses, seen, start, waited = [], 0, time.perf_counter(), 0.0
        val_steps: list[dict[str, Any]] = []
        fetched = start
        batches = self.features.train_batches(epoch) if self.features else self.loader(self.train_split, train=True)
        for x, y in batches:
            waited += time.perf_counter() - fetched  # time the step waited for its batch: the data bound
            try:
                value = self.train_step(x, y)
            except torch.OutOfMemoryError:
                b = self.settings["batch_size"]
                raise TrainingError(
                    f"out of GPU memory at epoch {epoch}, step {self.step + 1} with batch_size {b}; lower it "
                    f"(--batch-size {max(2, b // 2)}), or the image size; the last good checkpoint is in {self.run_dir}"
                ) from None
            if value is not None:
                losses.append(value)
            seen += len(y)
            ips = seen / max(time.perf_counter() - start, 1e-9)
            shown = {}
            if losses and (self.device.type == "cpu" or self.step % self.settings["sync_every"] == 0):
                # the running loss: one sync at most
                shown["loss"] = fmt("loss", float(torch.stack(losses[-50:]).mean()))
            progress.update(task, advance=1, ips=fmt("images_per_s", ips), **shown)
            due = t["val_every_steps"] and self.step % t["val_every_steps"] == 0
            if due and self.val_split is not None and (not val_steps or val_steps[-1]["step"] != self.step):
                val_steps.append(self.validate())
                self.model.train()
            fetched = time.perf_counter()
        progress.remove_task(task)
        self.check_deferred()
        elapsed = time.perf_counter() - start
        self.scheduler.step()
        self.epoch = epoch
        self._in_epoch = False
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": self.step,
            "loss": float(torch.stack(losses).float().mean()) if losses else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
            "data_wait_fraction": waited / max(elapsed, 1e-9),  # near 1: loading bound; near 0: compute bound
        }
        if val_steps:
            record["val_steps"] = val_steps
        if self._terms:
            record["loss_terms"] = {k: float(torch.stack(v).mean()) for k, v in self._terms.items()}
            self._terms = {}
        self.emit("on_epoch_end", record=record)
        self._end_epoch(record)

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Validate when due, keep the best, save checkpoints, log ``record`` and plot."""
        t, epoch = self.settings, record["epoch"]
        sel = self.best
        due = epoch % t["eval_every"] == 0 or epoch == t["epochs"]
        if due:
            if self.val_split is not None:
                record.update({k: v for k, v in self.validate().items() if k != "step"})
            if sel["split"] == "test" or t["test_every_epoch"]:  # logged; read for selection only when asked
                record.update({k: v for k, v in self.evaluate().items() if _scalar(v)})
            self._print_metrics(record)
        else:
            self.console.print(f"epoch {epoch}: loss {fmt('loss', record['loss'])}")
        key = {"val": f"val_{sel['metric']}", "test": sel["metric"], "train": "loss"}.get(sel["split"])
        if sel["split"] == "last":
            is_best = True
        elif key in record and record[key] is not None:
            is_best = self._is_better(record[key])
        else:
            is_best = False
        if is_best:
            self.best = {**sel, "value": record.get(key) if key else None, "epoch": epoch}
        if self.events:
            record["events"], self.events = self.events, []
        self.history.append(record)
        self.save(best=is_best)
        if self.rank == 0:
            self.write_run_files()
            plot_history(self.history, self.run_dir)
        self.emit("on_epoch_logged", record=record)  # the complete record, as metrics.jsonl has it

    def _print_metrics(self, record: dict[str, Any]) -> None:
        table = Table(title=f"epoch {record['epoch']}", title_justify="left")
        cols = [(k, label) for k, label in SHORT_NAMES.items() if k in record]
        cols += [(k, k.replace("recall_at_", "R@")) for k in record if k.startswith("recall_at_")]
        for _, label in cols:
            table.add_column(label, justify="right")
        table.add_row(*[fmt(k, record[k]) for k, _ in cols])
        self.console.print(table)


SHORT_NAMES = {
    "loss": "loss",
    "images_per_s": "img/s",
    "val_precision_at_1": "val P@1",
    "val_map_at_r": "val MAP@R",
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "map_at_r": "MAP@R",
    "nmi": "NMI",
    "ami": "AMI",
}


class _Rate(ProgressColumn):
    """Items per second as a whole number; '-' until it is known."""

    def render(self, task: Any) -> Text:
        return Text(f"{fmt('items_per_s', task.speed)}/s")


def progress_bar(console: Console, label: str) -> Progress:
    """The progress bar of a phase (embedding a split, filling a cache, a proxy pool): count, items/s
    and time left, shown only in a terminal and gone when the phase ends."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def fmt(key: str, v: Any) -> str:
    """A logged value as dmlkit prints it everywhere (tables, progress bars, summaries, reports), in a
    terminal or not: rates (``*_per_s``) as whole numbers, times (``*_s``) to 0.1 s, losses to 4
    significant digits, other numbers (metrics in [0, 1]) to 4 decimals, missing as ``-``."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if key.endswith("_per_s"):
        return f"{v:.0f}"
    if key.endswith("_s"):
        return f"{v:.1f}"
    if key == "loss" or key.startswith("loss_") or key.endswith("_loss") or abs(v) > 1:
        return f"{v:.4g}"
    return f"{v:.4f}"


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float)


def _opts(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "name"}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the main process for cores
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def declared_metrics(evaluator: Any) -> dict[str, str] | None:
    """``{metric: "max" | "min"}`` that an evaluator declares (its ``metrics`` attribute), or None."""
    declared = getattr(evaluator, "metrics", None)
    return dict(declared) if isinstance(declared, dict) else None


def metric_direction(evaluator: Any, metric: str) -> str:
    """ "max" or "min" for ``metric``: as the evaluator declares it (undeclared: higher is better)."""
    declared = declared_metrics(evaluator) or {}
    return declared.get(metric, "max")


def check_metrics(cfg: dict[str, Any], registry: Registry, evaluator: Any) -> None:
    """``train.best_metric`` and every metric a component reads must be one the evaluator reports.

    A component names the options that hold metric names in a ``reads_metrics_from`` class
    attribute (CCP: ``("metric",)``). An evaluator that declares nothing is not checked.
    """
    declared = declared_metrics(evaluator)
    if declared is None:
        return
    wanted = [("train.best_metric", cfg["train"]["best_metric"])]
    for section in ("loss", "miner", "sampler"):
        name = cfg[section]["name"]
        if not name:
            continue
        factory = registry.get(section, name).factory
        for option in getattr(factory, "reads_metrics_from", ()):
            wanted.append((f"{section} '{name}' option {option}", cfg[section].get(option)))
    for where, metric in wanted:
        if metric == "loss" and where == "train.best_metric":
            continue
        if metric not in declared:
            raise DmlkitError(
                f"{where} = {metric!r} is not a metric of evaluator '{cfg['evaluator']['name']}'; "
                f"valid: {', '.join(sorted(declared))}" + (", loss" if where == "train.best_metric" else "")
            )


def check_splits(name: str, train: Split, test: Split) -> None:
    """What training and the final test need of a dataset's splits, checked before any work: a test
    query set and gallery that are not empty, and at least two items on each side."""
    if len(train) < 2 or len(test) < 2:
        raise DmlkitError(
            f"dataset '{name}' has {len(train)} training and {len(test)} test items; each split needs at least 2"
        )
    for what, mask in (("query", test.query_mask), ("gallery", test.gallery_mask)):
        if mask is not None and not np.asarray(mask, bool).any():
            raise DmlkitError(
                f"dataset '{name}': the test {what} set is empty (no test item is marked as a {what}); "
                f"mark some items as {what} items"
            )


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: never half a file."""
    try:
        write_text(path, json.dumps(obj, indent=2))
    except OSError as exc:
        raise writable_error(path, exc, "file") from None


def sample_disjoint_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of the images of every training class (at least one, and at least
    one left for training) for validation: the same classes, unseen images."""
    keep, held = sample_disjoint_index(split.labels, fraction, seed)
    return split.subset(keep), split.subset(held)


def sample_disjoint_index(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of :func:`sample_disjoint_split`: (kept for training, held out)."""
    split = Split(list(range(len(labels))), labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(split.labels), bool)
    for c in np.unique(split.labels):
        items = rng.permutation(np.flatnonzero(split.labels == c))
        if len(items) < 2:
            continue
        n_val = min(len(items) - 1, max(1, int(round(len(items) * fraction))))
        is_val[items[:n_val]] = True
    if not is_val.any():
        raise DmlkitError("val_split=samples needs classes with at least 2 training images")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def class_disjoint_split(
    split: Split, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[Split, Split]:
    """Hold out classes of ``split`` for validation: ``fraction`` of them (at least one), or,
    with ``folds``, fold number ``fold`` of a seeded partition of the classes into ``folds``."""
    keep, held = class_disjoint_index(split.labels, fraction, seed, folds, fold)
    return split.subset(keep), split.subset(held)


def class_disjoint_index(
    labels: np.ndarray, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The indices of :func:`class_disjoint_split`: (kept for training, held out)."""
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    if folds:
        if folds > len(classes):
            raise DmlkitError(f"{folds} folds need at least {folds} training classes; there are {len(classes)}")
        val_classes = np.array_split(classes, folds)[fold]
    else:
        n_val = max(1, int(round(len(classes) * fraction)))
        if n_val >= len(classes):
            raise DmlkitError(f"val_fraction {fraction} leaves no training class ({len(classes)} classes)")
        val_classes = classes[:n_val]
    is_val = np.isin(labels, val_classes)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _savefig(fig: Any, path: Path) -> None:
    """Save a figure through a temporary file and a rename (a full disk leaves the old figure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise writable_error(path, exc, "figure") from None


def plot_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """loss.png and metrics.png over epochs in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h["loss"] if h["loss"] is not None else np.nan for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    _savefig(fig, run_dir / "loss.png")
    plt.close(fig)
    keys = ["val_precision_at_1", "val_map_at_r", "precision_at_1", "map_at_r", "r_precision"]
    drawn = False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in keys:
        pts = [(h["epoch"], h[k]) for h in history if h.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=k if k.startswith("val_") else f"test {k}")
            drawn = True
    if not drawn:
        plt.close(fig)
    else:
        ax.set_xlabel("epoch")
        ax.set_ylabel("metric")
        ax.legend()
        fig.tight_layout()
        _savefig(fig, run_dir / "metrics.png")
        plt.close(fig)
