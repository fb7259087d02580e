"""``kdcore demo``: every distillation method against a scratch baseline on real data, in minutes
on a CPU (:mod:`kdcore.demo.experiment`), reported as a table, JSON and a plot
(:mod:`kdcore.demo.report`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from kdcore.demo.experiment import Experiment, Settings
from kdcore.demo import report


def run(settings: Settings, say: Callable[[str], None] = print) -> str:
    """Runs the demo and returns its report (also written under ``settings.output_dir``)."""
    started = time.perf_counter()
    rows = Experiment(settings, say).run()
    return report.write(rows, settings, time.perf_counter() - started)
