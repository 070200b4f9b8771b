"""Stopping (or skipping) a training step whose loss or gradient is not finite.

On a CPU, with ``train.nonfinite = "skip"``, or with ``train.sync_every = 1``, each step is checked
at once. On a GPU otherwise, the check stays on the device (no synchronisation per step): the first
bad step is remembered there and read every ``sync_every`` steps, and before each validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmlkit.errors import TrainingError

CAUSES = "likely causes: learning rate too high (now {lr}), a loss scale/temperature too large, or bad input data"


class FiniteGuard:
    def __init__(self, settings: Any, device: torch.device, run_dir: Path, warn: Any):
        self.settings, self.run_dir, self.warn = settings, run_dir, warn
        #: whether each step is checked at once (see the module's docstring)
        self.each_step = device.type == "cpu" or settings["nonfinite"] == "skip" or settings["sync_every"] <= 1
        self._bad: torch.Tensor | None = None  # device-side: the first step with a non-finite value

    def loss_ok(self, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """Checked at once: False for a non-finite loss to skip (``nonfinite = "skip"``); else an error."""
        return not self.each_step or bool(torch.isfinite(loss)) or self._fail("loss", loss, epoch, step)

    def step_ok(self, loss: torch.Tensor, norm: torch.Tensor | None, epoch: int, step: int) -> bool:
        """After backward: the gradient norm checked at once, or both values remembered on the device."""
        if self.each_step:
            return norm is None or bool(torch.isfinite(norm)) or self._fail("gradient", norm, epoch, step)
        ok = torch.isfinite(loss.detach()) if norm is None else torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if self._bad is None:
            self._bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._bad = torch.where((self._bad < 0) & ~ok, step, self._bad)
        return True

    def due(self, step: int) -> bool:
        return not self.each_step and step % self.settings["sync_every"] == 0

    def check_deferred(self, epoch: int) -> None:
        """Read the device-side flag (one synchronisation); stop if a step went bad."""
        if self._bad is None:
            return
        bad = int(self._bad)
        if bad >= 0:
            self._bad = None
            raise TrainingError(
                f"non-finite loss or gradient at epoch {epoch}, step {bad}; {CAUSES.format(lr=self.settings['lr'])}. "
                f"The last good checkpoint is in {self.run_dir}; lower the lr or set train.nonfinite=skip"
            )

    def _fail(self, what: str, value: torch.Tensor, epoch: int, step: int) -> bool:
        msg = (
            f"non-finite {what} ({float(value.detach())}) at epoch {epoch}, step {step}; "
            f"{CAUSES.format(lr=self.settings['lr'])}. The last good checkpoint is in {self.run_dir}"
        )
        if self.settings["nonfinite"] == "skip":
            self.warn(msg + "; step skipped")
            return False
        raise TrainingError(msg + "; lower the lr or set train.nonfinite=skip")
