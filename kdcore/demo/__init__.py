"""``kdcore demo``: every distillation method against a scratch baseline on real data, in minutes
on a CPU (:mod:`kdcore.demo.experiment`), reported as a table, JSON and a plot
(:mod:`kdcore.demo.report`); the capacity sweep (:mod:`kdcore.demo.capacity`); and the
language-model suite, ``--suite lm`` (:mod:`kdcore.demo.lm`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from kdcore.demo import capacity, report
from kdcore.demo.directory import DemoDirectoryError, claim
from kdcore.demo.experiment import Experiment, Settings, chosen_contenders, one_thread

__all__ = ["DemoDirectoryError", "Settings", "chosen_contenders", "run", "sweep"]


def run(settings: Settings, say: Callable[[str], None] = print) -> str:
    """Runs the method comparison and returns its report (also written under
    ``settings.output_dir``)."""
    started = time.perf_counter()
    with claim(settings.output_dir, "demo"), one_thread():
        rows = Experiment(settings, say).run()
        return report.write(rows, settings, time.perf_counter() - started)


def sweep(settings: Settings, say: Callable[[str], None] = print) -> str:
    """Runs the capacity sweep and returns its summary (capacity.json and capacity.png are written
    under ``settings.output_dir``)."""
    with claim(settings.output_dir, "capacity"), one_thread():
        return capacity.summary(capacity.run(settings, say))
