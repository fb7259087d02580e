"""The ``takd`` method: Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant"
(AAAI 2020).

When the gap between teacher and student is large, distilling in steps works better: the teacher
teaches an assistant of intermediate size, the assistant teaches the next, and the last teaches
the student. Each link of the chain is a stage (``assistant1``, ..., ``student``) with its own
checkpoints, so a long chain resumes where it stopped; each stage's student is saved and loaded as
the next stage's teacher.

Config keys: ``assistants`` (required: a list of model specs, largest first, e.g.
``[{model: mlp, options: {hidden: [128]}}]``), and the response-KD keys ``temperature``,
``divergence`` or ``loss``, ``beta``, ``alpha``, ``kd_weight``, ``ce_weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import kdcore
from kdcore.engine.method import options_of
from kdcore_plugins.common import RESPONSE_DEFAULTS, ResponseTerms


class TeacherAssistant(kdcore.Method):
    name = "takd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, assistants=None, **RESPONSE_DEFAULTS)
        assistants = options["assistants"]
        if not isinstance(assistants, list) or not assistants or not all(isinstance(a, Mapping) for a in assistants):
            raise ValueError(f"takd: assistants must be a non-empty list of model specs, got {assistants!r}")
        self.assistants = assistants
        self.response = ResponseTerms(self.name, self.config, options)
        self.default_weights = self.response.weights

    def plan(self, config):
        if not config.teachers:
            raise ValueError("takd: the chain starts from a teacher: list one under teachers in the run config")
        stages = [kdcore.Stage(f"assistant{k}", student=spec, teachers=None if k == 1 else ["previous"])
                  for k, spec in enumerate(self.assistants, start=1)]
        return stages + [kdcore.Stage("student", teachers=["previous"])]

    def losses(self, batch, outputs, ctx):
        return self.response(outputs.student, outputs.teachers[0], batch, ctx)


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("takd", TeacherAssistant, description="Mirzadeh et al. 2020: teacher -> assistants -> student chain")
