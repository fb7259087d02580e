"""The ``dkd`` method: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

The classical KD loss mixes two kinds of knowledge with a weight the student cannot choose: how
sure the teacher is of the label (TCKD, the binary "label / not the label" distributions) and
how it ranks the other classes (NCKD, the distributions among the non-target classes), weighted
by ``1 − p_label``, so the better the teacher knows an example the less its dark knowledge
counts. DKD weights the two apart: ``alpha · TCKD + beta · NCKD``, each at temperature T and
scaled by T², computed by :func:`kdcore.dkd_loss` on the fused kd_loss kernels; plus
cross-entropy on the labels (``ce``). For classification: each row needs its label.

As in the authors' code (megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``), the KD
term ramps in linearly over the first ``warmup`` epochs: in epoch e (counted from 1) it is
weighted ``min(e / warmup, 1)``, 1/warmup in the first.

Config keys: ``alpha`` (default 1.0), ``beta`` (default 8.0), ``temperature`` (default 4.0),
``ce_weight`` (default 1.0; 0 drops the label term), ``warmup`` (epochs, default 20; 0 or 1: none)
— the authors' defaults (``mdistiller/engine/cfg.py``); their configs lower ``beta`` for some
teacher–student pairs (2.0 for ResNet56 → ResNet20 on CIFAR-100; 0.5 with T = 1 and warmup 1 on
ImageNet). Positions labelled with the run's ``data.ignore_index`` are skipped by both terms.
"""

from __future__ import annotations

import math
import warnings

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy


def _number(key: str, value, *, positive: bool = False) -> float:
    """A config value that must be a finite number, >= 0 (or > 0 with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"dkd: {key} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


class DecoupledKD(kdcore.Method):
    name = "dkd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, alpha=1.0, beta=8.0, temperature=4.0, ce_weight=1.0, warmup=20)
        self.alpha, self.beta = _number("alpha", options["alpha"]), _number("beta", options["beta"])
        self.temperature = _number("temperature", options["temperature"], positive=True)
        warmup = options["warmup"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"dkd: warmup must be a whole number of epochs >= 0, got {warmup!r}")
        self.warmup = warmup
        self.default_weights = {"kd": 1.0, "ce": _number("ce_weight", options["ce_weight"])}

    def plan(self, config):
        if self.warmup > config.training.epochs:
            warnings.warn(f"dkd: warmup is {self.warmup} epochs but the run trains {config.training.epochs}: the KD "
                          f"term never reaches its full weight (at most {config.training.epochs}/{self.warmup} of it); "
                          "lower warmup (0 turns the ramp off)", stacklevel=2)
        return super().plan(config)

    def ramp(self, epoch: int) -> float:
        """The KD term's warm-up factor in ``epoch`` (counted from 0, as the engine does)."""
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def losses(self, batch, outputs, ctx):
        if not outputs.teachers:
            raise ValueError("dkd needs a teacher: list one under teachers in the run config")
        if batch.labels is None:
            raise ValueError("dkd: the decoupled terms split at the label, and the dataset gives none")
        kd = kdcore.dkd_loss(outputs.student, outputs.teachers[0], labels=batch.labels, alpha=self.alpha,
                             beta=self.beta, temperature=self.temperature, ignore_index=ctx.ignore_index,
                             normalizer=ctx.normalizer)
        terms = {"kd": self.ramp(ctx.epoch) * kd}
        if self.default_weights["ce"] > 0:
            terms["ce"] = cross_entropy(outputs.student, batch.labels, ctx, method=self.name)
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("dkd", DecoupledKD, description="Zhao et al. 2022: target-class and non-target-class KD weighted apart")
