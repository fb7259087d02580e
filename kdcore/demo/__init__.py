"""``kdcore demo``: every distillation method against a scratch baseline on real data, in minutes
on a CPU (:mod:`kdcore.demo.experiment`), reported as a table, JSON and a plot
(:mod:`kdcore.demo.report`); and the capacity sweep (:mod:`kdcore.demo.capacity`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from kdcore.demo import capacity, report
from kdcore.demo.directory import DemoDirectoryError, claim
from kdcore.demo.experiment import Experiment, Settings, chosen_contenders

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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Trains with one intra-op thread: the demo's models are so small that more threads only add
    synchronization, and on a busy machine they make a run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
