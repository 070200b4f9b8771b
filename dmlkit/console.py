"""What dmlkit prints: one number format, progress that works in a terminal and outside one.

In a terminal a phase (an epoch, embedding a split, filling the feature cache) shows a progress
bar that is gone when the phase ends. Outside a terminal (a log file, nohup, a cluster job, CI)
there is no bar: a phase prints a progress line (count, rate, time left) every
``$DMLKIT_PROGRESS_EVERY`` seconds (default 30) while it runs, and one line when it ends if it took
5 s or more, so a log is never silent for long and short phases do not flood it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

#: Width of a console that is not a terminal: tables are never cut (rich would use 80).
LOG_WIDTH = 1000


def make_console(stderr: bool = False, quiet: bool = False) -> Console:
    """A console for dmlkit's output: markup on, highlighting off; outside a terminal, wide enough
    that tables and lines are never cut or wrapped."""
    console = Console(stderr=stderr, highlight=False, quiet=quiet)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, quiet=quiet, width=LOG_WIDTH)
    return console


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


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 27 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


#: Short column names of the metrics an epoch prints.
SHORT_NAMES = {
    "loss": "loss",
    "images_per_s": "img/s",
    "val_precision_at_1": "val P@1",
    "val_map_at_r": "val MAP@R",
    "val_nway_accuracy": "val N-way acc",
    "val_accuracy": "val acc",
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "map_at_r": "MAP@R",
    "nmi": "NMI",
    "ami": "AMI",
    "nway_accuracy": "N-way acc",
    "accuracy": "acc",
}


def epoch_columns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the values an epoch's line or table shows, in a fixed order."""
    cols = [(k, label) for k, label in SHORT_NAMES.items() if k in record]
    cols += [(k, k.replace("recall_at_", "R@")) for k in record if k.startswith("recall_at_")]
    return cols


def print_epoch(console: Console, record: dict[str, Any], epochs: int | None = None) -> None:
    """An evaluated epoch: a table in a terminal, one line elsewhere."""
    cols = epoch_columns(record)
    title = f"epoch {record['epoch']}" + (f"/{epochs}" if epochs else "")
    if console.is_terminal:
        table = Table(title=title, title_justify="left")
        for _, label in cols:
            table.add_column(label, justify="right")
        table.add_row(*[fmt(k, record[k]) for k, _ in cols])
        console.print(table)
        return
    parts = [f"{label} {fmt(k, record[k])}" for k, label in cols]
    if record.get("epoch_time_s") is not None:
        parts.append(duration(record["epoch_time_s"]))
    console.print(escape(f"{title}: " + ", ".join(parts)), soft_wrap=True)


def progress_every() -> float:
    """Seconds between progress lines outside a terminal (``$DMLKIT_PROGRESS_EVERY``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("DMLKIT_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


class _Rate(ProgressColumn):
    """Items per second as a whole number; '-' until it is known."""

    def render(self, task: Any) -> Text:
        return Text(f"{fmt('items_per_s', task.speed)}/s")


class Phase:
    """The progress of one phase over ``total`` items (see the module's docstring)."""

    def __init__(
        self,
        console: Console,
        label: str,
        total: int | None,
        unit: str = "items",
        final: bool = True,
        fields: dict[str, str] | None = None,
    ):
        self.console, self.label, self.total, self.unit, self.final = console, label, total, unit, final
        self.done = 0
        self.fields: dict[str, str] = dict(fields or {})  # shown beside the count, '-' until known
        self.start = self.last_line = time.perf_counter()
        self.every = progress_every()
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> Phase:
        if self.console.is_terminal and not self.console.quiet:
            self._bar = Progress(
                TextColumn(escape(self.label)),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TextColumn("{task.fields[extra]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, extra=self._extra())
        return self

    def advance(self, n: int = 1, **fields: str) -> None:
        """``n`` more items done; ``fields`` (e.g. ``loss="0.123"``) are shown beside the count."""
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, extra=self._extra())
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every and (self.total is None or self.done < self.total):
            self.last_line = now
            self.console.print(escape(self.line(now)), soft_wrap=True)

    def _extra(self) -> str:
        return escape("  ".join(f"{k} {v}" for k, v in self.fields.items()))

    def line(self, now: float | None = None) -> str:
        """``label: 1,234/9,330 items (13 %), 45/s, 2 min 58 s left[, field value ...]``."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:,}" + (f"/{self.total:,}" if self.total else "")
        text = f"{self.label}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f} %)"
        text += f", {fmt('items_per_s', rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {duration((self.total - self.done) / rate)} left"
        extra = ", ".join(f"{k} {v}" for k, v in self.fields.items())
        return text + (f", {extra}" if extra else "")

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, *rest)
            return
        elapsed = time.perf_counter() - self.start
        if exc_type is None and self.final and self.done and elapsed >= min(5.0, self.every):
            rate = self.done / max(elapsed, 1e-9)
            self.console.print(
                escape(
                    f"{self.label}: {self.done:,} {self.unit} in {duration(elapsed)} ({fmt('items_per_s', rate)}/s)"
                ),
                soft_wrap=True,
            )


@contextmanager
def phase(
    console: Console,
    label: str,
    total: int | None,
    unit: str = "items",
    final: bool = True,
    fields: dict[str, str] | None = None,
) -> Iterator[Phase]:
    """``with phase(console, "embedding the test images", n, "images") as p: ... p.advance(len(x))``."""
    with Phase(console, label, total, unit, final, fields) as p:
        yield p


def progress_bar(console: Console, label: str) -> Progress:
    """The 0.1 progress bar (rich, terminal only); dmlkit itself now uses :func:`phase`."""
    return Progress(
        TextColumn(escape(label)),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
