"""The ``dml`` method: Zhang et al., "Deep Mutual Learning" (CVPR 2018).

No pre-trained teacher: the student and a peer train together from scratch, each on the labels
and on the other's predictions (KL(p_peer ‖ p_student) for the student, KL(p_student ‖ p_peer)
for the peer, the other side's prediction held fixed). Both are trained (the stage's
``trainable`` is the student and ``teacher0``), and the peer is saved beside the student
(``stages/0-dml/teacher0.pt``). Evaluation reports the student's agreement with its peer.

Config keys: ``peer`` (a model spec; default: the same model as the student, freshly
initialized), ``temperature`` (default 1.0), ``divergence`` (default ``"forward_kl"``) or ``loss``
(any registered loss), ``kd_weight`` (default 1.0), ``ce_weight`` (default 1.0).
"""

from __future__ import annotations

import kdcore
from kdcore.engine.method import options_of
from kdcore_plugins.common import ResponseTerms, without_teachers


class MutualLearning(kdcore.Method):
    name = "dml"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, peer=None, temperature=1.0, loss=None, divergence="forward_kl",
                             kd_weight=1.0, ce_weight=1.0)
        self.peer = options["peer"]
        self.response = ResponseTerms(self.name, self.config, options)
        self.default_weights = {**self.response.weights, "peer_kd": self.response.weights["kd"],
                                "peer_ce": self.response.weights["ce"]}

    def plan(self, config):
        without_teachers(self.name, config)  # the peer is the only other model
        peer = self.peer if self.peer is not None else config.student.model_copy(update={"checkpoint": None})
        return [kdcore.Stage(self.name, teachers=[peer], trainable=("student", "teacher0"))]

    def losses(self, batch, outputs, ctx):
        student, peer = outputs.student, outputs.teachers[0]
        terms = self.response(student, peer.detach(), batch, ctx)
        for name, value in self.response(peer, student.detach(), batch, ctx).items():
            terms[f"peer_{name}"] = value
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("dml", MutualLearning, description="Zhang et al. 2018: student and peer learn from each other")
