"""An example kdcore plugin.

It adds one of each thing a plugin can add, except a kernel backend:

* the loss ``logit_mse``: mean squared error between student and teacher logits, the logit
  regression of Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NeurIPS 2014);
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


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, reduction: str = "batchmean",
              **_kd_loss_options) -> torch.Tensor:
    """Squared error between logits, summed over the vocabulary: averaged over rows
    (``"batchmean"``), summed (``"sum"``) or per row (``"none"``). Other kd_loss options
    (temperature, ...) do not apply to logit regression and are ignored."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_mse: student_logits has shape {tuple(student_logits.shape)} but teacher_logits "
                         f"has {tuple(teacher_logits.shape)}")
    per_row = (student_logits.float() - teacher_logits.float()).square().sum(-1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "batchmean":
        return per_row.mean()
    raise ValueError(f"logit_mse: reduction must be 'none', 'sum' or 'batchmean', got {reduction!r}")


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
        terms = {"kd": ctx.per_row(logit_mse(outputs.student, outputs.teachers[0], reduction="sum"))}
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
