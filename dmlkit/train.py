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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from dmlkit import distributed
from dmlkit.config import to_toml
from dmlkit.data import Split
from dmlkit.errors import DmlkitError, TrainingError
from dmlkit.model import EmbeddingHead, EmbeddingModel, feature_size, input_spec
from dmlkit.registry import Registry

#: Events a run's components (callbacks, the loss, the miner) may implement as methods taking the trainer.
EVENTS = ("on_train_start", "on_epoch_start", "on_after_backward", "on_epoch_end", "on_validation_end", "on_train_end")
CHECKPOINT_VERSION = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without running code in it (``weights_only=True``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise DmlkitError(f"no checkpoint at {p}; pass a run directory or a .pt file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DmlkitError(
            f"cannot load checkpoint {p} (corrupt, or not a dmlkit checkpoint): {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dmlkit" or "config" not in ckpt:
        raise DmlkitError(f"{p} is not a dmlkit checkpoint")
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
        run_dir: Path,
        console: Console | None = None,
    ):
        self.cfg, self.registry, self.run_dir = cfg, registry, run_dir
        t = self.settings = cfg["train"]
        self.rank, self.world_size, local_rank = distributed.setup()
        self.console = console or Console()
        if self.rank != 0:
            self.console = Console(quiet=True)
        self.device = resolve_device(t["device"])
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        seed_everything(t["seed"])

        self.backbone = registry.build("backbone", cfg["backbone"]["name"], **_opts(cfg["backbone"]))
        spec = input_spec(self.backbone)
        data = registry.build("dataset", cfg["dataset"]["name"], context={"input_spec": spec}, **_opts(cfg["dataset"]))
        for what, count in getattr(data, "skipped", {}).items():
            self.console.print(f"[yellow]warning: dataset skipped {count} {what} (skip_bad=true)[/yellow]")
        self.train_split: Split = data.train
        self.test_split: Split = data.test
        self.val_split: Split | None = None
        if t["val_fraction"] > 0 or t["folds"]:
            self.train_split, self.val_split = class_disjoint_split(
                self.train_split, t["val_fraction"], t["seed"], folds=t["folds"], fold=t["fold"]
            )
            self.val_split = self.val_split.with_transform(self.test_split.transform)
        head = EmbeddingHead(
            feature_size(self.backbone),
            t["embedding_size"],
            t["pooling"],
            t["head_norm"],
            t["normalize_embeddings"],
            t["head_init"],
        )
        self.model = EmbeddingModel(self.backbone, head, freeze_bn=t["freeze_bn"]).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.embedding_size = head.out_features
        self.net: nn.Module = self.model  # what a training step calls: the model, or its DDP wrapper
        if self.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=t["warmup_epochs"] > 0,
            )
        ctx = {"num_classes": self.train_split.num_classes, "embedding_size": self.embedding_size}
        self.loss = registry.build("loss", cfg["loss"]["name"], context=ctx, **_opts(cfg["loss"])).to(self.device)
        self.miner = (
            registry.build("miner", cfg["miner"]["name"], context=ctx, **_opts(cfg["miner"])).to(self.device)
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
        self.evaluator = registry.build("evaluator", cfg["evaluator"]["name"], **_opts(cfg["evaluator"]))
        self.callbacks = [registry.build("callback", cb["name"], **_opts(cb)) for cb in cfg["callbacks"]]
        self._owners = {
            id(self.loss): ("loss", cfg["loss"]["name"]),
            **({id(self.miner): ("miner", cfg["miner"]["name"])} if self.miner else {}),
            **{id(c): ("callback", cb["name"]) for c, cb in zip(self.callbacks, cfg["callbacks"])},
        }
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.epoch = 0  # epochs completed
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"value": -math.inf, "epoch": 0}
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
            for pname, p in owner.named_parameters():
                if p.requires_grad:
                    mult = next((m for k, m in mults.items() if pname == k or pname.startswith(k + ".")), 1.0)
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

    def loader(self, split: Split, train: bool) -> DataLoader:
        t = self.settings
        workers = t["num_workers"]
        if workers < 0:  # auto: arrays need no workers; image files do
            workers = 0 if not split.items or not isinstance(split.items[0], str) else min(8, os.cpu_count() or 1)
        common = {"num_workers": workers, "pin_memory": self.device.type == "cuda", "persistent_workers": False}
        if workers:
            common["worker_init_fn"] = _worker_init
        if train:
            return DataLoader(split, batch_sampler=self.sampler, **common)
        return DataLoader(split, batch_size=t["eval_batch_size"], shuffle=False, **common)

    # -- events ------------------------------------------------------------------------------
    def components(self) -> list[Any]:
        return [*self.callbacks, self.loss, *([self.miner] if self.miner else [])]

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
    def embed(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (float32, normalised) and labels of ``split``, model in eval mode."""
        was = self.model.training
        self.model.eval()
        outs = []
        for x, _ in self.loader(split, train=False):
            x = x.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            with self.autocast():
                outs.append(self.model(x).float().cpu())
        self.model.train(was)
        return torch.cat(outs).numpy(), split.labels

    def evaluate(self, split: Split | None = None) -> dict[str, Any]:
        split = split or self.test_split
        emb, labels = self.embed(split)
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
        self.model.load_state_dict(ckpt["model"])
        self.loss.load_state_dict(ckpt["loss"])
        if self.miner:
            self.miner.load_state_dict(ckpt["miner"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.history, self.best, self.extra_state = ckpt["history"], ckpt["best"], ckpt.get("extra", {})

    def save(self, best: bool) -> None:
        if self.rank != 0:
            return
        state = self.state_dict()
        atomic_save(state, self.run_dir / "last.pt")
        if best:
            atomic_save(state, self.run_dir / "best.pt")

    # -- the loop ----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with self.autocast():
            emb = self._guarded("backbone", self.net, x)
        if self.world_size > 1:  # losses and miners see the whole global batch
            emb, y = distributed.gather_batch(emb, y)
        indices = self._guarded("miner", self.miner, emb, y) if self.miner is not None else None
        loss = self._guarded("loss", self.loss, emb, y, indices=indices)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TrainingError(f"{self._describe('loss')} must return a scalar tensor; got {type(loss).__name__}")
        if not torch.isfinite(loss):
            return self._nonfinite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.emit("on_after_backward")
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.settings["grad_clip"] > 0:
            norm = nn.utils.clip_grad_norm_(params, self.settings["grad_clip"])
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params]) if params else None  # fused, one sync
        if norm is not None and not torch.isfinite(norm):
            return self._nonfinite("gradient", norm)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

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

    def fit(self) -> dict[str, Any]:
        t = self.settings
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg), encoding="utf-8")
            # resumed: epochs logged after the last complete checkpoint are dropped, then re-run
            lines = "".join(json.dumps(h) + "\n" for h in self.history)
            (self.run_dir / "metrics.jsonl").write_text(lines, encoding="utf-8")
        if self.epoch == 0:
            self.emit("on_train_start")
            if t["eval_at_start"] and not self.history:  # epoch 0: where training starts from
                self._end_epoch({"epoch": 0, "step": 0, "loss": None, "lr": self.optimizer.param_groups[0]["lr"]})
        progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        with progress:
            while self.epoch < t["epochs"] and not self.stop_requested:
                self._run_epoch(progress)
        self.emit("on_train_end")
        return self.history[-1] if self.history else {}

    def _run_epoch(self, progress: Progress) -> None:
        t = self.settings
        epoch = self.epoch + 1
        # every epoch is seeded from (seed, epoch): a resumed run draws the same batches and augmentations
        seed_everything(t["seed"] * 100_003 + epoch)
        self.sampler.set_epoch(epoch)
        self.model.backbone_frozen = epoch <= t["warmup_epochs"]
        self.model.train()
        self.emit("on_epoch_start")
        task = progress.add_task("train", total=len(self.sampler), epoch=epoch, loss=0.0, ips=0.0)
        losses, seen, start, waited = [], 0, time.perf_counter(), 0.0
        fetched = start
        for x, y in self.loader(self.train_split, train=True):
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
            progress.update(task, advance=1, loss=float(np.mean(losses)) if losses else 0.0, ips=ips)
            fetched = time.perf_counter()
        progress.remove_task(task)
        elapsed = time.perf_counter() - start
        self.scheduler.step()
        self.epoch = epoch
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": self.step,
            "loss": float(np.mean(losses)) if losses else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
            "data_wait_fraction": waited / max(elapsed, 1e-9),  # near 1: loading bound; near 0: compute bound
        }
        self.emit("on_epoch_end", record=record)
        self._end_epoch(record)

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Evaluate when due, keep the best, save checkpoints, log ``record`` and plot."""
        t, epoch = self.settings, record["epoch"]
        is_best = False
        if epoch % t["eval_every"] == 0 or epoch == t["epochs"]:
            if self.val_split is not None:
                record.update({f"val_{k}": v for k, v in self.evaluate(self.val_split).items() if _scalar(v)})
            metrics = self.evaluate()
            record.update({k: v for k, v in metrics.items() if _scalar(v)})
            key = t["best_metric"]
            if key not in record:
                raise DmlkitError(f"best_metric '{key}' is not among the metrics: {', '.join(k for k in record)}")
            if record[key] > self.best["value"]:
                self.best = {"value": record[key], "epoch": epoch, "metric": key}
                is_best = True
            self.emit("on_validation_end", metrics=record)
            self._print_metrics(record)
        else:
            self.console.print(f"epoch {epoch}: loss {record['loss']}")
        self.history.append(record)
        self.save(best=is_best)
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            plot_history(self.history, self.run_dir)

    def _print_metrics(self, record: dict[str, Any]) -> None:
        table = Table(title=f"epoch {record['epoch']}", title_justify="left")
        cols = [(k, label) for k, label in SHORT_NAMES.items() if k in record]
        cols += [(k, k.replace("recall_at_", "R@")) for k in record if k.startswith("recall_at_")]
        for _, label in cols:
            table.add_column(label, justify="right")
        table.add_row(*[_fmt(record[k]) for k, _ in cols])
        self.console.print(table)


SHORT_NAMES = {
    "loss": "loss",
    "images_per_s": "img/s",
    "val_map_at_r": "val MAP@R",
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "map_at_r": "MAP@R",
    "nmi": "NMI",
    "ami": "AMI",
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float)


def _opts(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "name"}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the main process for cores
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def class_disjoint_split(
    split: Split, fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[Split, Split]:
    """Hold out classes of ``split`` for validation: ``fraction`` of them (at least one), or,
    with ``folds``, fold number ``fold`` of a seeded partition of the classes into ``folds``."""
    classes = np.random.default_rng(seed).permutation(np.unique(split.labels))
    if folds:
        if folds > len(classes):
            raise DmlkitError(f"{folds} folds need at least {folds} training classes; there are {len(classes)}")
        val_classes = np.array_split(classes, folds)[fold]
    else:
        n_val = max(1, int(round(len(classes) * fraction)))
        if n_val >= len(classes):
            raise DmlkitError(f"val_fraction {fraction} leaves no training class ({len(classes)} classes)")
        val_classes = classes[:n_val]
    is_val = np.isin(split.labels, val_classes)
    return split.subset(np.flatnonzero(~is_val)), split.subset(np.flatnonzero(is_val))


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
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    keys = ["precision_at_1", "map_at_r", "r_precision", "val_map_at_r"]
    evald = [h for h in history if "precision_at_1" in h]
    if evald:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in keys:
            if k in evald[0]:
                ax.plot([h["epoch"] for h in evald], [h[k] for h in evald], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test metric")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "metrics.png", dpi=100)
        plt.close(fig)
