"""The ``rkd`` method: Park et al., "Relational Knowledge Distillation" (CVPR 2019).

Instead of matching outputs one example at a time, the student matches the teacher's *relations*
among the examples of a micro-batch: RKD-D, the pairwise distances normalized by their mean
(Huber loss), and RKD-A, the angles formed by every triplet (Huber loss on cosines). Embeddings
are the outputs of the named layers (spatial maps and sequences are average-pooled to one vector
per example), or the logits by default; student and teacher embeddings may have different sizes.
The labels' cross-entropy is added. The relations are computed within each micro-batch, so
gradient accumulation changes which pairs are compared.

Config keys: ``student_layer`` and ``teacher_layer`` (default None: the logits), ``distance_weight``
(default 25), ``angle_weight`` (default 50), ``ce_weight`` (default 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy
from kdcore_plugins.common import pooled


def distances(embedding: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over distinct pairs."""
    d = torch.cdist(embedding, embedding)
    off_diagonal = ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    return d / d[off_diagonal].mean().clamp_min(1e-12)


def angles(embedding: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i − e_j, e_k − e_j) for every triplet, ``[N, N, N]``."""
    directions = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), dim=2)  # [j, i, :]
    return torch.bmm(directions, directions.transpose(1, 2))


class RKD(kdcore.Method):
    name = "rkd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, student_layer=None, teacher_layer=None, distance_weight=25.0,
                             angle_weight=50.0, ce_weight=1.0)
        if (options["student_layer"] is None) != (options["teacher_layer"] is None):
            raise ValueError("rkd: give both student_layer and teacher_layer, or neither (to use the logits)")
        self.layers = (options["student_layer"], options["teacher_layer"])
        self.default_weights = {"distance": float(options["distance_weight"]), "angle": float(options["angle_weight"]),
                                "ce": float(options["ce_weight"])}

    def setup(self, ctx):
        if not ctx.teachers:
            raise ValueError("rkd needs a teacher: list one under teachers in the run config")
        self.keys = None if self.layers[0] is None else (ctx.tap("student", self.layers[0]),
                                                          ctx.tap("teacher0", self.layers[1]))

    def losses(self, batch, outputs, ctx):
        if self.keys is None:
            student, teacher = outputs.student, outputs.teachers[0]
        else:
            student, teacher = outputs.features[self.keys[0]], outputs.features[self.keys[1]]
        student, teacher = pooled(student.float()).flatten(1), pooled(teacher.float()).flatten(1)
        examples = len(student)
        with torch.no_grad():
            teacher_distances, teacher_angles = distances(teacher), angles(teacher)
        # each relational loss is a mean over the micro-batch's pairs or triplets; scaled by its
        # examples it becomes this micro-batch's share of the step
        share = examples / ctx.example_normalizer
        terms = {
            "distance": F.smooth_l1_loss(distances(student), teacher_distances) * share,
            "angle": F.smooth_l1_loss(angles(student), teacher_angles) * share,
        }
        if self.default_weights["ce"] > 0:
            terms["ce"] = cross_entropy(outputs.student, batch.labels, ctx, method=self.name)
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("rkd", RKD, description="Park et al. 2019: match pairwise distances and angles among examples")
