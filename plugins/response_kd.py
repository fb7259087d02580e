"""The ``response_kd`` method: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network" (2015).

The student matches the teacher's temperature-softened output distribution, plus cross-entropy on
the labels: ``kd_weight · T² · D(p_T ‖ q_S) + ce_weight · CE(q_S, y)``. The divergence is any of
:func:`kdcore.kd_loss`'s (forward KL by default, as in the paper), computed by the fused kernels,
or any registered loss in its place. With several teachers, the student matches the first one (the
``ensemble`` method combines several).

Config keys: ``temperature`` (default 4.0), ``divergence`` (default ``"forward_kl"``) or ``loss``
(a registered loss's name, or ``{name: NAME, option: value}``; not both), ``beta`` and ``alpha``
(the divergence's parameter, where it has one), ``kd_weight`` (default 0.9) and ``ce_weight``
(default 0.1; 0 drops the label term). Positions labelled with the run's ``data.ignore_index`` are
skipped by both terms.
"""

from __future__ import annotations

import kdcore
from kdcore.engine.method import options_of
from kdcore_plugins.common import RESPONSE_DEFAULTS, ResponseTerms


class ResponseKD(kdcore.Method):
    name = "response_kd"

    def __init__(self, config):
        super().__init__(config)
        self.response = ResponseTerms(self.name, self.config, options_of(self.name, self.config, **RESPONSE_DEFAULTS))
        self.default_weights = self.response.weights

    def losses(self, batch, outputs, ctx):
        if not outputs.teachers:
            raise ValueError("response_kd needs a teacher: list one under teachers in the run config")
        return self.response(outputs.student, outputs.teachers[0], batch, ctx)


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("response_kd", ResponseKD, description="Hinton et al. 2015: temperature-softened teacher outputs + labels")
