"""The ``response_kd`` method: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network" (2015).

The student matches the teacher's temperature-softened output distribution, plus cross-entropy on
the labels: ``kd_weight · T² · D(p_T ‖ q_S) + ce_weight · CE(q_S, y)``. The divergence is any of
:func:`kdcore.kd_loss`'s (forward KL by default, as in the paper), computed by the fused kernels.
With several teachers, the student matches the first one (the ensemble method combines several).

Config keys: ``temperature`` (default 4.0), ``divergence`` (default ``"forward_kl"``), ``beta``
and ``alpha`` (the divergence's parameter, where it has one), ``kd_weight`` (default 0.9) and
``ce_weight`` (default 0.1; 0 drops the label term). Positions labelled with the run's
``data.ignore_index`` are skipped by both terms.
"""

from __future__ import annotations

import torch.nn.functional as F

import kdcore
from kdcore.engine.method import options_of
from kdcore.functional import loss_options


class ResponseKD(kdcore.Method):
    name = "response_kd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, temperature=4.0, divergence="forward_kl", beta=0.5, alpha=0.1,
                             kd_weight=0.9, ce_weight=0.1)
        self.kd_options = {key: options[key] for key in ("temperature", "divergence", "beta", "alpha")}
        loss_options(self.name, t2_scale=True, reduction="batchmean", ignore_index=-100, kd_weight=options["kd_weight"],
                     ce_weight=options["ce_weight"], **self.kd_options)
        self.default_weights = {"kd": float(options["kd_weight"]), "ce": float(options["ce_weight"])}

    def losses(self, batch, outputs, ctx):
        if not outputs.teachers:
            raise ValueError("response_kd needs a teacher: list one under teachers in the run config")
        terms = {"kd": kdcore.kd_loss(outputs.student, outputs.teachers[0], labels=batch.labels,
                                      ignore_index=ctx.ignore_index, normalizer=ctx.normalizer, **self.kd_options)}
        if self.default_weights["ce"] > 0:
            if batch.labels is None:
                raise ValueError("response_kd: ce_weight > 0 needs labels, and the dataset gives none")
            logits = outputs.student
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                                 ignore_index=ctx.ignore_index, reduction="sum")
            terms["ce"] = ctx.per_row(ce)
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("response_kd", ResponseKD, description="Hinton et al. 2015: temperature-softened teacher outputs + labels")
