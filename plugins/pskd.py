"""The ``pskd`` method: Kim et al., "Self-Knowledge Distillation with Progressive Refinement of
Targets" (ICCV 2021).

No separate teacher: the model's own snapshot from the end of the previous epoch provides soft
targets. In epoch t of T (t counted from 0) the target is (1 − α_t) · one-hot(y) + α_t · p_snapshot,
with α_t = α_T · (t + 1) / T, which reaches α_T in the last epoch, and the student minimizes the
cross-entropy to it. The schedule is the authors' (lgcnsai/PS-KD-Pytorch, ``main.py``:
``alpha_t = args.alpha_T * ((epoch + 1) / args.end_epoch)``, epochs counted from 0). In the
first epoch there is no earlier model and the target is the label alone (the authors' stored
predictions start as the one-hot labels). The snapshot
is a frozen copy of the student kept as an extra module (so a resumed run has it), refreshed at
the first step of every epoch.

For classification (one label per example). Config keys: ``alpha`` (α_T, default 0.8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kdcore
from kdcore.engine.data import call_model
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy, soft_cross_entropy
from kdcore_plugins.common import without_teachers


class Snapshot(nn.Module):
    """A frozen copy of a model and the epoch it was taken at (a buffer, so checkpoints keep it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("epoch", torch.tensor(-1))


class ProgressiveSelfKD(kdcore.Method):
    name = "pskd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, alpha=0.8)
        self.alpha = float(options["alpha"])
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"pskd: alpha must lie in [0, 1], got {self.alpha}")

    def alpha_at(self, epoch: int, epochs: int) -> float:
        """α_t in epoch ``epoch`` (counted from 0) of ``epochs``: α_T · (epoch + 1) / epochs."""
        return self.alpha * (epoch + 1) / epochs

    def plan(self, config):
        return [kdcore.Stage(self.name, teachers=without_teachers(self.name, config))]

    def setup(self, ctx):
        ctx.add_module("snapshot", Snapshot(ctx.frozen_copy("student")), trainable=False)

    def losses(self, batch, outputs, ctx):
        snapshot = ctx.modules["snapshot"]
        if int(snapshot.epoch) != ctx.epoch:  # the first step of an epoch: keep the last epoch's model
            snapshot.model.load_state_dict(ctx.raw("student").state_dict())
            snapshot.epoch.fill_(ctx.epoch)
        if ctx.epoch == 0 or self.alpha == 0.0:
            return {"ce": cross_entropy(outputs.student, batch.labels, ctx, method=self.name)}
        alpha = self.alpha_at(ctx.epoch, ctx.stage.epochs or ctx.run.config.training.epochs)
        with torch.no_grad():
            snapshot.eval()
            past = call_model(snapshot.model, batch.inputs).float().softmax(-1)
        target = (1 - alpha) * F.one_hot(batch.labels, outputs.student.shape[-1]).float() + alpha * past
        return {"ce": soft_cross_entropy(outputs.student, target, ctx)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("pskd", ProgressiveSelfKD, description="Kim et al. 2021: the previous epoch's model provides "
                                                    "progressively weighted soft targets")
