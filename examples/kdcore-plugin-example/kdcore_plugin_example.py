"""An example kdcore plugin.

It adds one of each thing a plugin can add, except a kernel backend:

* the loss ``logit_mse``: mean squared error between student and teacher logits, the logit
  regression of Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NeurIPS 2014); any
  logit-level method trains on it with ``loss: logit_mse`` in its config;
* the method ``logit_matching``: trains the student on that loss against its first teacher, plus
  cross-entropy on the labels when ``ce_weight`` > 0;
* the callback ``loss_history``: keeps each step's losses and, given ``path``, writes them as
  JSON lines when the run ends.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import kdcore
from kdcore.engine.named_loss import reduce_rows


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, labels: torch.Tensor | None = None,
              ignore_index: int = -100, temperature: float = 1.0, reduction: str = "batchmean",
              normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Squared error between logits, summed over the vocabulary, per row; reduced as kdcore's
    registered losses are (rows labelled ``ignore_index`` dropped; ``"batchmean"`` divides by
    ``normalizer`` or by the kept rows). Logit regression has no temperature: it is accepted, as
    every registered loss's is, and ignored; there are no options of its own."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_mse: student_logits has shape {tuple(student_logits.shape)} but teacher_logits "
                         f"has {tuple(teacher_logits.shape)}")
    per_row = (student_logits.float() - teacher_logits.float()).square().sum(-1)
    return reduce_rows(per_row, labels, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer)


class LogitMatching(kdcore.Method):
    """Config key: ``ce_weight`` (default 0: no label term).

    Its terms follow the engine's normalization: each is this micro-batch's share of the
    full-batch per-row mean (a per-row sum divided by ``ctx.normalizer``), so gradient
    accumulation and multi-process runs give the full-batch loss.
    """

    name = "logit_matching"

    def __init__(self, config):
        super().__init__(config)
        unknown = set(self.config) - {"ce_weight"}
        if unknown:
            raise ValueError(f"logit_matching: unknown config keys {sorted(unknown)}; it takes ce_weight")
        self.ce_weight = float(self.config.get("ce_weight", 0.0))

    def losses(self, batch, outputs, ctx):
        if not outputs.teachers:
            raise ValueError("logit_matching needs a teacher")
        terms = {"kd": logit_mse(outputs.student, outputs.teachers[0], labels=batch.labels,
                                 ignore_index=ctx.ignore_index, normalizer=ctx.normalizer)}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * ctx.per_row(F.cross_entropy(outputs.student, batch.labels, reduction="sum"))
        return terms


class LossHistory:
    """Records ``kdcore_step_end``'s losses; writes them to ``path`` (if given) at the end of the run."""

    def __init__(self, options):
        self.path = options.get("path")
        self.steps: list[dict] = []

    @kdcore.hookimpl
    def kdcore_step_end(self, stage, step, losses):
        self.steps.append({"stage": stage.name, "step": step, **losses})

    @kdcore.hookimpl
    def kdcore_run_end(self):
        if self.path:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in self.steps)


@kdcore.hookimpl
def kdcore_register_losses(register):
    register("logit_mse", logit_mse, description="squared error between logits (Ba & Caruana 2014)")


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("logit_matching", LogitMatching, description="student regresses the teacher's logits")


@kdcore.hookimpl
def kdcore_register_callbacks(register):
    register("loss_history", LossHistory, description="keeps every step's losses; writes them to `path`")
