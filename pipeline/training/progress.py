"""Progress of any training loop: a Rich bar on a terminal, one plain line at chosen points elsewhere.

Where the output is not a terminal (CI, a Prefect worker, a log file) a bar would only be drawn once, at the end;
there a loop's progress prints one line at the points it chooses (each epoch, each tenth of the steps) instead.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class LoopProgressBase:
    """A handler; subclasses say what a unit of work is (:meth:`extent`), what the bar shows (``label``, ``shown``
    and :meth:`fields`) and when and what a plain line says (:meth:`line`, None: no line at this event)."""

    label = ""  # Rich markup with {task.fields[...]}
    shown = ""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task = None
        self._started = 0.0

    def extent(self, loop) -> tuple[int, int]:
        """Units of work in all, and done already (a resumed run)."""
        raise NotImplementedError

    def fields(self, loop) -> dict[str, Any]:
        raise NotImplementedError

    def line(self, loop, event: str) -> str | None:
        raise NotImplementedError

    def on_fit_start(self, loop) -> None:
        self._started = time.monotonic()
        if not self.enabled or not self.console.is_terminal:
            return
        columns = (TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn(self.shown))
        self._progress = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        total, done = self.extent(loop)
        self._task = self._progress.add_task("", total=total, completed=done, **self.fields(loop))
        self._progress.start()

    def on_step_end(self, loop) -> None:
        self._update(loop, "step_end", advance=1)

    def on_epoch_end(self, loop) -> None:
        self._update(loop, "epoch_end", advance=0)

    def on_fit_end(self, loop) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _update(self, loop, event: str, advance: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, **self.fields(loop))
        elif self.enabled and (text := self.line(loop, event)) is not None:
            self.console.print(f"{text}  {time.monotonic() - self._started:.0f} s", highlight=False, markup=False)
