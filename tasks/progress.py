"""Live progress of the long stages: a rich progress bar on the CLI's terminal and a Prefect
progress artifact in the UI, fed by the ``progress(done, total, info)`` callback the training
loops take (``elmo_core.training.ProgressFn``).

The loops call it every step; this side throttles (the artifact is written at most every
``ARTIFACT_EVERY_S`` seconds or whole percent, the bar redraws at its own rate), so neither the
Prefect API nor the log table sees per-step traffic. Without a live display (tests, a worker
process, a pipe) the bar is skipped; without a task run context the artifact is.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ARTIFACT_EVERY_S = 5.0

_display: Any = None  # the rich Progress of the running CLI command, if any
_lock = threading.Lock()


def prefect_console_handler() -> Any:
    """Prefect's own log handler (it prints through a rich Console), if one is installed."""
    from rich.console import Console

    for name in ("prefect", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(getattr(h, "console", None), Console):
                return h
    return None


@contextmanager
def live_display(enabled: bool = True) -> Iterator[None]:
    """Show a progress bar per running stage while the block runs (the CLI wraps a run in it).
    Only on a terminal: piped output gets the stages' periodic log lines instead.

    Prefect's log handler prints through its own Console; for the duration it prints through
    the bars' console instead, so log lines scroll above the bars instead of tearing them
    (Prefect's console has a theme without rich's default styles, so the bars cannot use it)."""
    global _display
    handler = prefect_console_handler() if enabled else None
    if handler is None or not handler.console.is_terminal:
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    original = handler.console
    console = Console(file=original.file, highlighter=original.highlighter, markup=False)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        refresh_per_second=4,
    )
    handler.console = console
    try:
        with progress:
            with _lock:
                _display = progress
            try:
                yield
            finally:
                with _lock:
                    _display = None
    finally:
        handler.console = original


def artifact_key(stage: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"progress-{stage}".lower()).strip("-")


class StageProgress:
    """The ``progress`` callback of one stage: bar + Prefect progress artifact."""

    def __init__(self, stage: str, unit: str = "steps") -> None:
        self.stage = stage
        self.unit = unit
        self._bar: Any = None
        self._bar_display: Any = None
        self._artifact: Any = None
        self._last_write = 0.0
        self._last_pct = -1
        self._stretch: tuple[Any, ...] = ()
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is not None:
                self._artifact = create_progress_artifact(
                    0.0, key=artifact_key(stage), description=f"{stage}: starting"
                )
        except Exception as e:  # a UI nicety must never fail a stage
            logging.getLogger("elmo_news").debug("no progress artifact for %s: %s", stage, e)

    def __call__(self, done: int, total: int, info: dict[str, float]) -> None:
        if self._artifact is None and _display is None:  # nothing shows it: cost nothing
            return
        epoch = info.get("epoch")
        epochs = info.get("epochs")
        label = f"epoch {int(epoch)}/{int(epochs)}" if epoch and epochs else ""
        speed = f"{info['tokens_per_s']:,.0f} tok/s" if info.get("tokens_per_s") else ""
        with _lock:
            display = _display
        if display is not None:
            stretch = (label, total)
            if self._bar is None or self._bar_display is not display:
                self._bar = display.add_task(self.stage, total=total, epoch=label, speed=speed)
                self._bar_display = display
            elif stretch != self._stretch:  # a new epoch: the bar starts over
                display.reset(self._bar, total=total, epoch=label, speed=speed)
            display.update(self._bar, completed=done, epoch=label, speed=speed)
            self._stretch = stretch
        if self._artifact is not None:
            pct = self._overall(done, total, info)
            now = time.monotonic()
            if int(pct) != self._last_pct and now - self._last_write >= ARTIFACT_EVERY_S:
                self._write(pct, f"{self.stage}: {label} {done}/{total} {self.unit} {speed}")
                self._last_write, self._last_pct = now, int(pct)

    @staticmethod
    def _overall(done: int, total: int, info: dict[str, float]) -> float:
        """Percent of the whole stage: epochs done plus this epoch's share."""
        frac = done / max(total, 1)
        epoch, epochs = info.get("epoch"), info.get("epochs")
        if epoch and epochs:
            frac = (epoch - 1 + frac) / epochs
        return 100.0 * min(max(frac, 0.0), 1.0)

    def _write(self, pct: float, description: str) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, pct, description=description.strip())
        except Exception as e:
            logging.getLogger("elmo_news").debug("progress artifact update failed: %s", e)
            self._artifact = None

    def close(self, ok: bool = True) -> None:
        """The artifact and the bar end at 100 % (or stay where a failure left them)."""
        if self._artifact is not None and ok:
            self._write(100.0, f"{self.stage}: done")
        if self._bar is not None and ok:  # a finished stage's bar stays, full
            task = next(t for t in self._bar_display.tasks if t.id == self._bar)
            self._bar_display.update(self._bar, completed=task.total)


@contextmanager
def stage_progress(stage: str, unit: str = "steps") -> Iterator[StageProgress]:
    p = StageProgress(stage, unit)
    ok = False
    try:
        yield p
        ok = True
    finally:
        p.close(ok)
