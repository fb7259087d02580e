"""``kdcore demo``: every distillation method against a scratch baseline on real data, in minutes
on a CPU (:mod:`kdcore.demo.experiment`), reported as a table, JSON and a plot
(:mod:`kdcore.demo.report`); and the capacity sweep (:mod:`kdcore.demo.capacity`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from kdcore.demo import capacity, report
from kdcore.demo.experiment import Experiment, Settings, chosen_contenders

__all__ = ["Settings", "chosen_contenders", "run", "sweep"]


def run(settings: Settings, say: Callable[[str], None] = print) -> str:
    """Runs the method comparison and returns its report (also written under
    ``settings.output_dir``)."""
    started = time.perf_counter()
    rows = Experiment(settings, say).run()
    return report.write(rows, settings, time.perf_counter() - started)


def sweep(settings: Settings, say: Callable[[str], None] = print) -> str:
    """Runs the capacity sweep and returns its summary (capacity.json and capacity.png are written
    under ``settings.output_dir``)."""
    return capacity.summary(capacity.run(settings, say))
