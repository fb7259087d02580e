"""The ``supervised`` method: train on the labels alone, with no teacher.

It trains the teachers that later runs distill from, and the same-architecture "scratch" baseline
every distillation result must be compared with. Its one term, ``ce``, is the cross-entropy of the
labels averaged over the kept rows of the step (tokens whose label is not the run's
``data.ignore_index``, for language models).

Config key: ``label_smoothing`` (default 0.0).
"""

from __future__ import annotations

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy
from kdcore_plugins.common import without_teachers


class Supervised(kdcore.Method):
    name = "supervised"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, label_smoothing=0.0)
        self.label_smoothing = float(options["label_smoothing"])
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def plan(self, config):
        return [kdcore.Stage(self.name, teachers=without_teachers(self.name, config))]

    def losses(self, batch, outputs, ctx):
        return {"ce": cross_entropy(outputs.student, batch.labels, ctx, label_smoothing=self.label_smoothing,
                                    method=self.name)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("supervised", Supervised, description="labels only, no teacher: trains teachers and scratch baselines")
