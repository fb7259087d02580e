"""The ``supervised`` method: train on the labels alone, with no teacher.

It trains the teachers that later runs distill from, and the same-architecture "scratch" baseline
every distillation result must be compared with. Its one term, ``ce``, is the cross-entropy of the
labels averaged over the kept rows of the step (tokens whose label is not the run's
``data.ignore_index``, for language models).

Config key: ``label_smoothing`` (default 0.0).
"""

from __future__ import annotations

import torch.nn.functional as F

import kdcore
from kdcore.engine.method import options_of


class Supervised(kdcore.Method):
    name = "supervised"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, label_smoothing=0.0)
        self.label_smoothing = float(options["label_smoothing"])
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def plan(self, config):
        return [kdcore.Stage(self.name, teachers=[])]

    def losses(self, batch, outputs, ctx):
        if batch.labels is None:
            raise ValueError("supervised: the dataset gives no labels")
        logits = outputs.student
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                             ignore_index=ctx.ignore_index, label_smoothing=self.label_smoothing, reduction="sum")
        return {"ce": ctx.per_row(ce)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("supervised", Supervised, description="labels only, no teacher: trains teachers and scratch baselines")
