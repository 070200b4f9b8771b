"""Experiment-tracker callbacks: TensorBoard and MLflow, both local and offline by default.

Each logs what the run directory holds: the run's settings when training starts, every
epoch's metrics.jsonl line once it is complete (``on_epoch_logged``: losses, learning rate,
throughput, validation metrics, loss terms; intra-epoch validations under ``val_steps/``),
and, after the final test (``on_test_end``), the test metrics and the run's files or test
embeddings. Only the first process of a distributed run writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmlkit
from dmlkit.errors import DmlkitError


def _needs(package: str, extra: str, name: str) -> DmlkitError:
    return DmlkitError(f"callback '{name}' needs the {package} package: pip install 'dmlkit[{extra}]'")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl line, as trackers log them at step = epoch.

    Top-level numbers keep their names (``loss``, ``lr``, ``val_map_at_r`` ...); a table of
    numbers (``loss_terms``) becomes ``loss_terms/NAME``; ``epoch`` is the step itself, and
    missing values (``loss`` before the first step) are left out.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "epoch":
            continue
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _number(v)})
    return out


def step_scalars(record: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """Validations inside the epoch (``train.val_every_steps``): ``(training step, {val_steps/NAME: value})``."""
    out = []
    for entry in record.get("val_steps") or []:
        values = {f"val_steps/{k}": float(v) for k, v in entry.items() if k != "step" and _number(v)}
        out.append((int(entry["step"]), values))
    return out


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run config as ``{"train.lr": 0.001, "loss.name": "proxynca", "callbacks.0.name": ...}``."""
    out: dict[str, Any] = {}
    items = enumerate(cfg) if isinstance(cfg, list) else cfg.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def param_text(value: Any) -> str:
    """A config value as a parameter string: strings as they are, other values as JSON (true, 0.001, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def embed_selected(trainer: Any, results: dict[str, Any], index: np.ndarray) -> np.ndarray:
    """Embeddings of the test items ``index`` by the model of the selected epoch (results.json's ``test``)."""
    split = trainer.test_split
    best, last = results.get("best_epoch"), results.get("last_epoch")
    current = None
    if best is not None and best != last and (trainer.run_dir / "best.pt").is_file():
        from dmlkit.checkpoint import load as load_checkpoint

        ckpt = load_checkpoint(trainer.run_dir / "best.pt")
        if ckpt["epoch"] == best:
            current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.model.load_state_dict(ckpt["model"])
    try:
        if trainer.settings["feature_cache"]:  # cached features: the whole split is at hand
            return trainer.embed(split)[0][index]
        return trainer.embed(split.subset(index))[0]
    finally:
        if current is not None:
            trainer.model.load_state_dict(current)


class TensorBoard:
    """TensorBoard event files: the run's settings, each epoch's metrics, test embeddings for the projector.

    Writes to ``log_dir`` (default: ``tensorboard/`` in the run directory, so that
    ``tensorboard --logdir runs`` compares every run). Scalars carry metrics.jsonl's names at
    step = epoch; when training ends the test metrics of the chosen epoch (``test/...``) are
    logged with the settings as hyperparameters (the HParams tab), and up to
    ``embedding_points`` test embeddings (a seeded random sample; 0 for none) with their class
    labels go to the projector.

    Args:
        log_dir: the folder for the event files (default: tensorboard/ in the run directory).
        embedding_points: test embeddings sent to the projector (a seeded sample; 0 for none).
        flush_secs: seconds between writes of buffered events to disk.
    """

    def __init__(self, log_dir: str = "", embedding_points: int = 2000, flush_secs: int = 30):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise _needs("tensorboard", "tensorboard", "tensorboard") from None
        if embedding_points < 0:
            raise DmlkitError(f"callback 'tensorboard': embedding_points must be >= 0; got {embedding_points}")
        self.log_dir, self.embedding_points, self.flush_secs = log_dir, embedding_points, flush_secs
        self.writer: Any = None

    def _writer(self, trainer: Any) -> Any:
        if trainer.rank != 0:
            return None
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(self.log_dir).expanduser() if self.log_dir else trainer.run_dir / "tensorboard"
            self.writer = SummaryWriter(str(path), flush_secs=self.flush_secs)
        return self.writer

    def on_train_start(self, trainer: Any) -> None:
        writer = self._writer(trainer)
        if writer is not None:
            from dmlkit.config import to_toml

            toml = to_toml(trainer.config)
            writer.add_text("config", "".join(f"    {line}\n" for line in toml.splitlines()), 0)

    def on_epoch_logged(self, trainer: Any, record: dict[str, Any]) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        epoch = int(record["epoch"])
        for key, value in epoch_scalars(record).items():
            writer.add_scalar(key, value, epoch)
        for step, values in step_scalars(record):
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        writer.flush()

    def on_test_end(self, trainer: Any, results: dict[str, Any]) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        best = int(results["best_epoch"])
        metrics = {f"test/{k}": float(v) for k, v in results.get("test", {}).items() if _number(v)}
        settings = {
            k: (v if _number(v) or isinstance(v, str) else param_text(v))
            for k, v in flatten(trainer.config).items()
            if v is not None
        }
        file_writer = writer._get_file_writer()
        for summary in hparams(settings, metrics):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, best)
        n = min(self.embedding_points, len(trainer.test_split))
        if n > 0:
            rng = np.random.default_rng(trainer.settings["seed"])
            index = np.sort(rng.choice(len(trainer.test_split), n, replace=False))
            emb = embed_selected(trainer, results, index)
            labels = trainer.test_split.labels[index]
            names = trainer.test_split.class_names
            meta = [names[y] if y < len(names) else str(y) for y in labels] if names else [str(y) for y in labels]
            writer.add_embedding(
                torch.from_numpy(np.ascontiguousarray(emb)), metadata=meta, global_step=best, tag="test"
            )
        writer.close()
        self.writer = None


class MLflow:
    """An MLflow run: the flattened config as params, each epoch's metrics at step = epoch, the run's files.

    By default a local file store in the run directory (``mlruns/``), which mlflow-skinny
    writes without a server or a database (dmlkit sets ``MLFLOW_ALLOW_FILE_STORE=true`` for it,
    which MLflow 3 asks for); ``tracking_uri`` names another store (``sqlite:///mlflow.db``
    needs SQLAlchemy and alembic, as the full ``mlflow`` package has; ``http://...`` a server).
    The run is named after the run directory in experiment ``experiment``; a resumed dmlkit run
    continues its MLflow run. When training ends the test metrics (``test/...`` at the chosen
    epoch, ``test_last/...`` at the last) are logged, and, with ``artifacts``, config.toml,
    metrics.jsonl, results.json and the plots. MLflow's usage telemetry is off unless
    ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.

    Args:
        tracking_uri: the MLflow store (default: a file store in the run directory's mlruns/).
        experiment: the MLflow experiment the run belongs to.
        run_name: the MLflow run's name (default: the run directory's name).
        artifacts: also log config.toml, metrics.jsonl, results.json and the plots as artifacts.
    """

    def __init__(self, tracking_uri: str = "", experiment: str = "dmlkit", run_name: str = "", artifacts: bool = True):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise _needs("mlflow-skinny", "mlflow", "mlflow") from None
        self.tracking_uri, self.experiment, self.run_name, self.artifacts = (
            tracking_uri,
            experiment,
            run_name,
            artifacts,
        )
        self.client: Any = None
        self.run_id: str | None = None

    def store_uri(self, trainer: Any) -> str:
        """``tracking_uri``, or the file store ``mlruns/`` in the run directory."""
        return self.tracking_uri or (trainer.run_dir / "mlruns").resolve().as_uri()

    def _open(self, trainer: Any) -> str | None:
        if trainer.rank != 0:
            return None
        if self.run_id is not None:
            return self.run_id
        from mlflow.tracking import MlflowClient

        uri = self.store_uri(trainer)
        if uri.startswith("file:") or "://" not in uri and ":" not in uri[2:]:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it; 2.x needs nothing
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
            run_id = trainer.extra_state.get("mlflow_run_id")
            if run_id is not None and not self._exists(client, run_id):
                run_id = None
            if run_id is None:
                run = client.create_run(
                    experiment_id,
                    run_name=self.run_name or trainer.run_dir.name,
                    tags={"dmlkit.run_dir": str(trainer.run_dir.resolve())},
                )
                run_id = run.info.run_id
                self._log_params(client, run_id, trainer.config)
            else:
                client.update_run(run_id, status="RUNNING")
        except DmlkitError:
            raise
        except Exception as exc:
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise DmlkitError(
                f"callback 'mlflow' cannot write to the MLflow store {uri}: {first[:300]} (tracking_uri=... picks another)"
            ) from None
        trainer.extra_state["mlflow_run_id"] = run_id  # saved in checkpoints: --resume continues this run
        self.client, self.run_id = client, run_id
        return run_id

    @staticmethod
    def _exists(client: Any, run_id: str) -> bool:
        try:
            client.get_run(run_id)
            return True
        except Exception:
            return False

    @staticmethod
    def _log_params(client: Any, run_id: str, cfg: dict[str, Any]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as most
        except ImportError:
            most = 500
        params = [Param(k, param_text(v)[:most]) for k, v in sorted(flatten(cfg).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run_id, params=params[i : i + 100])

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def on_train_start(self, trainer: Any) -> None:
        self._open(trainer)

    def on_epoch_logged(self, trainer: Any, record: dict[str, Any]) -> None:
        if self._open(trainer) is None:
            return
        self._log(epoch_scalars(record), int(record["epoch"]))
        for step, values in step_scalars(record):
            self._log(values, step)

    def on_test_end(self, trainer: Any, results: dict[str, Any]) -> None:
        run_id = self._open(trainer)
        if run_id is None:
            return
        for prefix, key, epoch in (("test", "test", "best_epoch"), ("test_last", "test_last", "last_epoch")):
            values = {f"{prefix}/{k}": float(v) for k, v in results.get(key, {}).items() if _number(v)}
            self._log(values, int(results[epoch]))
        if self.artifacts:
            for name in ("config.toml", "metrics.jsonl", "results.json", "loss.png", "metrics.png"):
                if (trainer.run_dir / name).is_file():
                    self.client.log_artifact(run_id, str(trainer.run_dir / name))
        self.client.set_terminated(run_id, "FINISHED")
        self.client, self.run_id = None, None


@dmlkit.hookimpl
def register_callbacks(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "tensorboard",
            TensorBoard,
            "TensorBoard: settings, per-epoch metrics, test embeddings for the projector (extra: tensorboard)",
        )
    )
    register(
        ComponentSpec(
            "mlflow",
            MLflow,
            "MLflow: params, per-epoch metrics, the run's files; a local file store by default (extra: mlflow)",
        )
    )
