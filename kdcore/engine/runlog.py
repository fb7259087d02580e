"""What a run reports: a JSON-lines file of events, console lines and a progress bar (main process
only).

Every line of ``metrics.jsonl`` is one event: ``{"event": "step" | "eval" | "teacher_eval" |
"stage_end" | "run_end", "stage": ..., ...}``. ``run_end`` holds the final metrics and
``seconds``, the run's wall-clock time (a resumed run adds what its earlier attempts spent up to
their last checkpoint), which the run also prints as its last line. Checkpoints remember the
file's length, and a resumed run cuts the file back to it, so the log of a resumed run is the log
of an uninterrupted one, but for the times (``examples_per_s``, ``seconds``). The progress bar
(tqdm) shows the loss, throughput and ETA, and stays off when stderr is not a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunLog:
    def __init__(self, path: Path, *, enabled: bool, console: bool = True,
                 guard: Callable[[], None] | None = None) -> None:
        """``guard`` is called before each write and raises when the run may no longer write
        (its output directory's lock was lost)."""
        self.path, self.enabled, self.console = path, enabled, console
        self.guard = guard or (lambda: None)

    def offset(self) -> int:
        """The log's current length in bytes (what a checkpoint remembers)."""
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drops every event written after ``offset`` (those of the work a resume redoes)."""
        if self.enabled and self.path.exists():
            self.guard()
            with open(self.path, "r+b") as handle:
                handle.truncate(offset)

    def event(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self.guard()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"event": event, **fields}) + "\n")

    def say(self, line: str) -> None:
        """A console line (kept clear of an active progress bar)."""
        if self.enabled and self.console:
            tqdm.write(line, file=sys.stdout)

    def progress(self, total: int, initial: int, description: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                    disable=not (self.enabled and self.console and sys.stderr.isatty()), leave=False)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())
