"""The training loop: a run built from its config, trained with checkpoints, validated, tested once.

The trainer implements the run context of :mod:`dmlkit.contract`; components receive a
:class:`~dmlkit.contract.RunContext` view of it in their events, never the trainer itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from dmlkit import checkpoint, distributed
from dmlkit.compat import moved_names
from dmlkit.components import (
    build_parts,
    decayed_before_clip,
    describe,
    optimizer,
    param_groups,
    replaced_components,
    scheduler,
)
from dmlkit.config import to_toml
from dmlkit.console import fmt, make_console, phase, print_epoch
from dmlkit.contract import EVENTS, RunContext, evaluator_arguments
from dmlkit.data import Split
from dmlkit.embedding import embed_dataset, embed_tensors, in_eval_mode
from dmlkit.errors import DmlkitError, TrainingError
from dmlkit.fileio import save_torch, write_json, write_text
from dmlkit.finite import FiniteGuard
from dmlkit.plots import plot_history
from dmlkit.proxies import pool_index
from dmlkit.registry import Registry
from dmlkit.rundir import RunLock, crash_point
from dmlkit.runtime import autocast, loader_workers, resolve_device, seed_everything, worker_init
from dmlkit.selection import Selection
from dmlkit.settings import Settings


class Trainer:
    """Builds a run from a validated config and trains it; components receive the events of
    :data:`dmlkit.contract.EVENTS` with a :class:`~dmlkit.contract.RunContext`."""

    def __init__(self, cfg: dict[str, Any], registry: Registry, run_dir: str | Path, console: Console | None = None):
        self.cfg, self.registry, self.run_dir = cfg, registry, Path(run_dir)
        t = self.settings = Settings(cfg["train"])
        self.rank, self.world_size, local_rank = distributed.setup()
        self.console = console or make_console()
        if self.rank != 0:
            self.console = Console(quiet=True)
        self.device = resolve_device(t.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        seed_everything(t.seed)
        with registry.active():  # nested components come from the run's registry
            parts = build_parts(cfg, registry, t, self.device, self.rank, self.world_size)
        for line in parts.warnings:
            self.warn(line)
        self.evaluator, self.backbone, self.test_split = parts.evaluator, parts.backbone, parts.test
        v = parts.validation
        self.full_train_split, self.train_split, self.val_split = parts.train, v.train, v.val
        self.train_index, self.val_index, self.val_note = v.train_index, v.val_index, v.note
        self.model = parts.model
        self.embedding_size = self.model.head.out_features
        self.net: nn.Module = self.model  # what a training step calls: the model, its head, or a DDP wrapper
        self.features = None  # the frozen-backbone fast path
        if t.feature_cache:
            if self.world_size > 1:
                raise DmlkitError("train.feature_cache runs in one process; run it without torchrun")
            from dmlkit.features import FeatureCache

            self.features = FeatureCache(self)
            self.net = self.model.cached_net()  # cached features go to the trainable stages and the head
        if self.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=t.warmup_epochs > 0,
            )
        self.loss, self.miner, self.sampler, self.callbacks = parts.loss, parts.miner, parts.sampler, parts.callbacks
        self.proxy_banks, self._owners = parts.banks, parts.owners
        self.optimizer = optimizer(param_groups(self.model, t, [("loss", self.loss), ("miner", self.miner)]), t)
        self._decayed = decayed_before_clip(self.model, t)  # weight decay as ccp-dml adds it, before clipping
        self.scheduler = scheduler(self.optimizer, t)
        self.run_id = checkpoint.new_run_id()
        self.epoch = self.step = 0  # epochs completed, optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self.selection = Selection(t, self.evaluator, self.val_split is not None)
        self.events: list[dict[str, Any]] = []  # what components logged during the current epoch
        self.results: dict[str, Any] = {}
        self.started = time.perf_counter()  # set-up, caches, training, validation and test: results' wall_time_s
        self.stop_requested = False
        self.extra_state: dict[str, Any] = {}  # components may keep resumable state here
        self.context = RunContext(self)
        self._last_val: tuple[int, dict[str, Any]] | None = None
        self._in_epoch = False
        self.guard = FiniteGuard(t, self.device, self.run_dir, self.warn)
        self._terms: dict[str, list[torch.Tensor]] = {}  # per-term losses of the current epoch
        self._miner_stats: list[dict[str, Any]] = []

    # -- the run context (dmlkit.contract.MEMBERS) --------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.cfg

    @property
    def best(self) -> dict[str, Any]:
        return dict(self.selection.best)

    def log_event(self, **info: Any) -> None:
        """One entry in the epoch's ``events`` list of metrics.jsonl, with its epoch and step."""
        self.events.append({"epoch": self.epoch + 1 if self._in_epoch else self.epoch, "step": self.step, **info})

    def autocast(self) -> Any:
        return autocast(self.device, self.settings.amp)

    @torch.no_grad()
    def embed(self, split: Split, what: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (float32, normalised) and labels of ``split``, model in eval mode."""
        t = self.settings
        with in_eval_mode(self.model):
            if self.features is not None:
                out = embed_tensors(
                    self.net,
                    self.features.eval_features(split, what),
                    device=self.device,
                    batch_size=t.eval_batch_size,
                    amp=t.amp,
                )
            else:
                out = embed_dataset(
                    self.model,
                    split,
                    device=self.device,
                    batch_size=t.eval_batch_size,
                    workers=loader_workers(t.num_workers, split.items),
                    amp=t.amp,
                    console=self.console,
                    what=what,
                    model=self.model,
                )
        return out.numpy(), split.labels

    @torch.no_grad()
    def embed_pool(self, rounds: int, seed: int, class_ids: np.ndarray | None = None) -> torch.Tensor:
        """See :func:`dmlkit.proxies.embed_pool`."""
        idx = pool_index(self.train_split.labels, rounds, seed, class_ids)
        t = self.settings
        with in_eval_mode(self.model):
            if self.features is not None:  # cached augmented views through the head
                feats = self.features.train_items(idx.reshape(-1), seed)
                out = embed_tensors(self.net, feats, device=self.device, batch_size=t.eval_batch_size, amp=t.amp)
            else:
                pool = torch.utils.data.Subset(self.train_split, idx.reshape(-1).tolist())
                out = embed_dataset(
                    self.model,
                    pool,
                    device=self.device,
                    batch_size=t.eval_batch_size,
                    console=self.console,
                    what="embedding the proxy pool",
                    amp=t.amp,
                    model=self.model,
                )
        return out.to(self.device).reshape(len(idx), rounds, -1)

    # -- events ------------------------------------------------------------------------------
    def components(self) -> list[Any]:
        """What receives training events, in dispatch order: callbacks, the loss, its proxy banks,
        the miner, the sampler."""
        return [*self.callbacks, self.loss, *self.proxy_banks, *([self.miner] if self.miner else []), self.sampler]

    def emit(self, event: str, **kwargs: Any) -> None:
        """Call ``event`` on every component that has it; a failure names the component, its plugin and
        the event."""
        assert event in EVENTS, event
        for comp in self.components():
            fn = getattr(comp, event, None)
            if fn is None:
                continue
            try:
                with self.registry.active():
                    fn(self.context, **kwargs)
            except (torch.OutOfMemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:
                kind, name = self._owners.get(id(comp), ("component", type(comp).__name__))
                text = str(exc) if isinstance(exc, DmlkitError) else f"{type(exc).__name__}: {exc}"
                raise TrainingError(f"{describe(self.registry, kind, name)} failed in {event}: {text}") from exc

    def warn(self, line: str) -> None:
        self.console.print(f"[yellow]warning: {escape(line)}[/yellow]", soft_wrap=True)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, split: Split | None = None, what: str = "test") -> dict[str, Any]:
        split = split or self.test_split
        emb, labels = self.embed(split, f"embedding the {what} images")
        extra = evaluator_arguments(self.evaluator, split, self.loss)  # groups=, similarity= where it takes them
        with self.console.status(f"evaluating: {len(labels):,} {what} embeddings ({self.cfg['evaluator']['name']})"):
            return self.evaluator(emb, labels, split.query_mask, split.gallery_mask, **extra)

    def validate(self) -> dict[str, Any]:
        """Validation metrics (``val_*``) of the current model; ``on_validation_end`` receives them.
        An evaluation at the step of the previous one is reused, so each is seen once."""
        if self._last_val is not None and self._last_val[0] == self.step:
            return self._last_val[1]
        self.guard.check_deferred(self.epoch + 1)  # a non-finite step is reported before its NaNs reach the evaluator
        self.emit("on_before_validation")
        metrics = {f"val_{k}": v for k, v in self.evaluate(self.val_split, "validation").items() if _scalar(v)}
        best = self.selection.best
        if best["split"] == "val" and f"val_{best['metric']}" not in metrics:
            raise TrainingError(
                f"evaluator '{self.cfg['evaluator']['name']}' did not report '{best['metric']}', which "
                f"train.best_metric selects on (it reported: {', '.join(k[4:] for k in metrics) or 'nothing'}); "
                "set train.best_metric to one of them"
            )
        metrics["step"] = self.step
        self._last_val = (self.step, metrics)
        warning = self.selection.validation_warning(metrics)
        if warning:
            self.warn(warning)
        self.emit("on_validation_end", metrics=metrics)
        return metrics

    def final_test(self) -> dict[str, Any]:
        """Test metrics at the chosen epoch (and the last), read once; written to results.json."""
        if not self.history:
            return {}
        best = self.selection.best
        last_epoch, best_epoch = self.history[-1]["epoch"], best["epoch"]
        at_last = {k: v for k, v in self.evaluate().items() if _scalar(v)}
        at_best = at_last
        if best_epoch is not None and best_epoch != last_epoch:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            best_ckpt = checkpoint.load(self.run_dir / "best.pt")
            if best_ckpt["epoch"] != best_epoch or checkpoint.run_id(best_ckpt) not in ("", self.run_id):
                raise TrainingError(
                    f"{self.run_dir / 'best.pt'} holds epoch {best_ckpt['epoch']} of run "
                    f"{checkpoint.run_id(best_ckpt) or '?'}, not this run's best epoch {best_epoch}; resume the run "
                    f"(--resume {self.run_dir}) to restore it"
                )
            self.model.load_state_dict(best_ckpt["model"])
            at_best = {k: v for k, v in self.evaluate().items() if _scalar(v)}
            self.model.load_state_dict(current)
        selected_by = best["selected_by"] if best_epoch is not None else "last epoch (no epoch was selected)"
        results = {
            "selected_by": selected_by,
            "selection_split": best["split"] if best_epoch is not None else "last",
            "best_metric": best["metric"],
            "best_value": best["value"],
            "best_epoch": best_epoch if best_epoch is not None else last_epoch,
            "last_epoch": last_epoch,
            "test": at_best,
            "test_last": at_last,
            "wall_time_s": round(time.perf_counter() - self.started, 1),  # this process's (a resume's: since it)
        }
        if self.rank == 0:
            write_json(self.run_dir / "results.json", results)
        return results

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "dmlkit",
            "version": checkpoint.VERSION,
            "run_id": self.run_id,
            "config": self.cfg,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "miner": self.miner.state_dict() if self.miner else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.selection.best,
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
        self.run_id = checkpoint.run_id(ckpt) or self.run_id
        self.selection = Selection(self.settings, self.evaluator, self.val_split is not None)
        self.selection.restore(dict(ckpt["best"]), self.history)

    def save(self, best: bool) -> None:
        if self.rank != 0:
            return
        state = self.state_dict()
        crash_point("before", self.epoch)
        save_torch(state, self.run_dir / "last.pt")
        crash_point("between", self.epoch)
        if best:
            save_torch(state, self.run_dir / "best.pt")
        crash_point("after", self.epoch)

    def write_run_files(self, resumed: bool = False) -> None:
        """config.toml and metrics.jsonl (one row per epoch of the last checkpoint's history), each
        replaced whole, after the checkpoints: a run that fails before its first checkpoint writes
        neither, and a resumed run's log has exactly the epochs its checkpoint has. On resuming
        (``resumed``), before any epoch: metrics.jsonl, and config.toml only if it is missing."""
        if self.rank != 0:
            return
        import json

        files = [("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))]
        if not resumed or not (self.run_dir / "config.toml").exists():
            comments = "".join(f"# {line}\n" for line in replaced_components(self.cfg, self.registry))
            files.insert(0, ("config.toml", comments + to_toml(self.cfg)))
        for name, text in files:
            write_text(self.run_dir / name, text)

    # -- the loop ----------------------------------------------------------------------------
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

    def _fit(self, test: bool) -> dict[str, Any]:
        t = self.settings
        if self.history:  # resumed: the log holds exactly the checkpoint's epochs (a kill may have cut it)
            self.write_run_files(resumed=True)
        for line in replaced_components(self.cfg, self.registry):
            self.console.print(f"[yellow]note: {escape(line)}[/yellow]", soft_wrap=True)
        self.console.print(escape(f"{self.val_note}; {self.selection.best['selected_by']}"), soft_wrap=True)
        if self.selection.best["split"] == "test":
            self.console.print(
                "[bold red]warning: selection=test_set_biased picks the best epoch on the TEST set; its numbers are "
                "optimistic and not comparable with validation-selected results (Musgrave et al. 2020)[/bold red]"
            )
        if self.epoch == 0 and not self.history:  # not when resuming from the epoch-0 checkpoint
            self.emit("on_train_start")
            if t.eval_at_start:  # epoch 0: where training starts from
                self._end_epoch({"epoch": 0, "step": 0, "loss": None, "lr": self.optimizer.param_groups[0]["lr"]})
        while self.epoch < t.epochs and not self.stop_requested and not self.selection.stop():
            self._run_epoch()
        if self.selection.stop() and self.epoch < t.epochs:
            self.console.print(
                f"early stop after epoch {self.epoch}: no gain above min_delta {t.min_delta} in {t.patience} "
                f"evaluated epochs; best epoch {self.selection.best['epoch']}"
            )
        self.emit("on_train_end")
        self.results = self.final_test() if test else {}
        if self.results:
            self.emit("on_test_end", results=self.results)  # results.json is written: trackers log the run's files
        return self.history[-1] if self.history else {}

    def _run_epoch(self) -> None:
        t, epoch = self.settings, self.epoch + 1
        # every epoch is seeded from (seed, epoch): a resumed run draws the same batches and augmentations
        seed_everything(t.seed * 100_003 + epoch)
        self.sampler.set_epoch(epoch)
        self.model.backbone_frozen = self.model.backbone_fixed or epoch <= t.warmup_epochs
        self.model.train()
        self._in_epoch = True
        self.emit("on_epoch_start")
        losses, seen, val_steps, waited = [], 0, [], 0.0
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
        start = fetched = time.perf_counter()
        batches = self.features.train_batches(epoch) if self.features else self.loader(self.train_split)
        with phase(self.console, f"epoch {epoch}/{t.epochs}", len(self.sampler), "steps", False, _UNKNOWN) as bar:
            for x, y in batches:
                waited += time.perf_counter() - fetched  # time the step waited for its batch: the data bound
                value = self._step_or_oom(x, y, epoch)
                if value is not None:
                    losses.append(value)
                seen += len(y)
                shown = {}
                if losses and (self.device.type == "cpu" or self.step % t.sync_every == 0):  # one sync at most
                    shown["loss"] = fmt("loss", float(torch.stack(losses[-50:]).mean()))
                shown["img/s"] = fmt("images_per_s", seen / max(time.perf_counter() - start, 1e-9))
                bar.advance(1, **shown)
                due = t.val_every_steps and self.step % t.val_every_steps == 0
                if due and self.val_split is not None and (not val_steps or val_steps[-1]["step"] != self.step):
                    val_steps.append(self.validate())
                    self.model.train()
                fetched = time.perf_counter()
        self.guard.check_deferred(epoch)
        elapsed = time.perf_counter() - start
        self.scheduler.step()
        self.epoch, self._in_epoch = epoch, False
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": self.step,
            "loss": float(torch.stack(losses).float().mean()) if losses else None,
            "lr": lr,
            "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
            "data_wait_fraction": waited / max(elapsed, 1e-9),  # near 1: loading bound; near 0: compute bound
        }
        if val_steps:
            record["val_steps"] = val_steps
        if self._terms:
            record["loss_terms"] = {k: float(torch.stack(v).mean()) for k, v in self._terms.items()}
            self._terms = {}
        if self._miner_stats:
            record["miner"] = _mean_stats(self._miner_stats)
            self._miner_stats = []
        self.emit("on_epoch_end", record=record)
        self._end_epoch(record)

    def _step_or_oom(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor | None:
        try:
            return self.train_step(x, y)
        except torch.OutOfMemoryError:
            b = self.settings.batch_size
            raise TrainingError(
                f"out of GPU memory at epoch {epoch}, step {self.step + 1} with batch_size {b}; lower it "
                f"(--batch-size {max(2, b // 2)}), or the image size; the last good checkpoint is in {self.run_dir}"
            ) from None

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Validate when due, keep the best, save checkpoints, log ``record`` and plot."""
        t, epoch, split = self.settings, record["epoch"], self.selection.best["split"]
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            if self.val_split is not None:
                record.update({k: v for k, v in self.validate().items() if k != "step"})
            if split == "test" or t.test_every_epoch:  # logged; read for selection only when asked
                record.update({k: v for k, v in self.evaluate().items() if _scalar(v)})
            print_epoch(self.console, record, t.epochs)
        else:
            self.console.print(f"epoch {epoch}/{t.epochs}: loss {fmt('loss', record['loss'])}")
        chosen = self.selection.observe(record)
        if self.events:
            record["events"], self.events = self.events, []
        self.history.append(record)
        self.save(best=chosen)
        if self.rank == 0:
            self.write_run_files()
            plot_history(self.history, self.run_dir, self.selection.best["epoch"])
        self.emit("on_epoch_logged", record=record)  # the complete record, as metrics.jsonl has it

    def loader(self, split: Split, train: bool = True) -> torch.utils.data.DataLoader:
        """The training batches of ``split`` as the sampler cuts them (``train=False``: in order, in
        batches of ``eval_batch_size``)."""
        workers = loader_workers(self.settings.num_workers, split.items)
        batching = {"batch_sampler": self.sampler} if train else {"batch_size": self.settings.eval_batch_size}
        return torch.utils.data.DataLoader(
            split,
            **batching,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if workers else None,
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimisation step; returns the detached loss (on the device), None for a skipped step."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with self.autocast():
            emb = self._guarded("backbone", self.net, x)
        if self.world_size > 1:  # losses and miners see the whole global batch
            emb, y = distributed.gather_batch(emb, y)
        indices = self._guarded("miner", self.miner, emb, y) if self.miner is not None else None
        if self.miner is not None:
            self._miner_stats.append(self.miner.stats() if hasattr(self.miner, "stats") else {})
        # without a miner, the plain call: a loss that takes no indices works as well
        extra = {} if indices is None else {"indices": indices}
        loss = self._guarded("loss", self.loss, emb, y, **extra)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TrainingError(f"{self._describe('loss')} must return a scalar tensor; got {type(loss).__name__}")
        if not self.guard.loss_ok(loss, self.epoch + 1, self.step + 1):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.emit("on_after_backward")
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        for p in self._decayed:
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=self.settings.weight_decay)
        if self.settings.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params]) if params else None  # fused, one sync
        if self.settings.grad_clip_value > 0:
            nn.utils.clip_grad_value_(params, self.settings.grad_clip_value)
        if not self.guard.step_ok(loss, norm, self.epoch + 1, self.step + 1):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.step += 1
        self.emit("on_after_optimizer_step")
        terms = getattr(self.loss, "last_terms", None)  # a loss made of parts reports each (logged per epoch)
        if isinstance(terms, dict):
            for k, v in terms.items():
                self._terms.setdefault(k, []).append(v.detach().float())
        if self.guard.due(self.step):
            self.guard.check_deferred(self.epoch + 1)
        return loss.detach()

    def _describe(self, kind: str) -> str:
        return describe(self.registry, kind, self.cfg[kind]["name"])

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


_UNKNOWN = {"loss": "-", "img/s": "-"}  # what the epoch's bar shows before its first step


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mean_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The per-step statistics of a miner averaged over an epoch (numbers and scalar tensors)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v)
            if _scalar(v):
                values.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}


def load_run(
    run: str | Path, which: str = "best", console: Console | None = None, err_console: Console | None = None
) -> Trainer:
    """The trainer of a finished (or running) run with the weights of its ``best`` or ``last``
    checkpoint, ready for :meth:`Trainer.embed` and :meth:`Trainer.evaluate` (without the run's
    callbacks). ``run`` is a run directory or a checkpoint file. ``best`` is the recorded best
    epoch's checkpoint; when a kill fell between writing ``last.pt`` and ``best.pt``, ``best.pt``
    is restored from ``last.pt`` if no other process holds the run (otherwise the same weights are
    read from ``last.pt``)."""
    from dmlkit.config import validate
    from dmlkit.plugins import get_host

    run = Path(run)
    if which not in ("best", "last"):
        raise DmlkitError(f"--checkpoint must be best or last; got {which!r}")
    if run.is_file() and run.name == "best.pt" and (run.parent / "last.pt").is_file():
        run, which = run.parent, "best"  # a run's best.pt: checked against the run's record like the directory
    if run.is_dir() and which == "best":
        path = checkpoint.best_checkpoint(run, repair=False)
        if path.name != "best.pt" and (run / "best.pt").exists():
            try:
                with RunLock(run):
                    path = checkpoint.best_checkpoint(run, repair=True, console=err_console)
            except DmlkitError:  # in use, or read-only: read the same weights from last.pt, write nothing
                pass
    else:
        path = run / "last.pt" if run.is_dir() else run
    ckpt = checkpoint.load(path)
    registry = get_host().registry
    cfg = validate(ckpt["config"], registry)
    # reading a run trains nothing: its callbacks (trackers ...) are not built, nor their packages needed
    trainer = Trainer({**cfg, "callbacks": []}, registry, path.parent, console=console)
    trainer.load_state_dict(ckpt)
    trainer.checkpoint_file = path.name
    return trainer


#: 0.1 names that moved to other modules: importable from here, with a DeprecationWarning, until 0.3.
__getattr__ = moved_names(__name__)
