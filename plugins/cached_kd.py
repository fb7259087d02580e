"""The ``cached_kd`` method: distillation from a teacher-logit cache, with no teacher model.

The teacher ran once over the dataset (``kdcore cache-teacher CONFIG``, which writes to the
config's ``data.teacher_cache`` unless given ``--output``) and its top-k log-probabilities per
position were kept on disk (:mod:`kdcore.cache`): the train split's in that directory, the held-out
split's in its ``val/``. Every training batch arrives with its examples' cached teacher as a
:class:`kdcore.SparseTeacher`. The student matches it with :func:`kdcore.kd_loss`'s sparse path
(``sparse_mode``: ``"tail"`` keeps the mass outside the top-k as one bucket, ``"renorm"``
renormalizes the top-k), plus cross-entropy when ``ce_weight`` > 0, as one term ``kd``
(``kd_weight · T² · D + ce_weight · CE``, averaged over labelled tokens). The teachers listed in
the run config (the one the cache was written from) are not built.

Evaluation scores the student against the held-out split's cached teacher, as other methods score
it against a live one (:mod:`kdcore.engine.metrics`): ``teacher_agreement`` counts the tokens where
the student's argmax is the teacher's top-1 entry, ``kl_to_teacher`` is the KL over the top-k
entries and one bucket for the rest of the vocabulary (a lower bound on the full KL, equal to it
when k is the vocabulary size). Without a held-out cache these two are not reported.

The loss temperature is the cache's (its log-probabilities were taken at it); ``temperature``, if
given, must equal it. The teacher is sparse, so ``loss`` names one of kd_loss's divergences (as
``divergence`` does): a registered loss of dense teacher logits cannot take it.

Config keys: ``divergence`` ("forward_kl") or ``loss`` (not both), ``sparse_mode`` ("tail"),
``temperature`` (the cache's), ``beta``, ``alpha``, ``kd_weight`` (1.0), ``ce_weight`` (0.0),
``vocab_size`` (None).
"""

from __future__ import annotations

import kdcore
from kdcore import _checks
from kdcore.cache import CacheError, TeacherCache
from kdcore.divergences import DIVERGENCES
from kdcore.engine.method import options_of
from kdcore.engine.named_loss import chosen_loss

DEFAULTS = dict(loss=None, divergence="forward_kl", sparse_mode="tail", temperature=None, beta=0.5, alpha=0.1,
                kd_weight=1.0, ce_weight=0.0, vocab_size=None)


class CachedKD(kdcore.Method):
    name = "cached_kd"
    default_weights = {"kd": 1.0}

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        if options["sparse_mode"] not in ("tail", "renorm"):
            raise ValueError(f"cached_kd: sparse_mode must be 'tail' or 'renorm', got {options['sparse_mode']!r}")
        self.loss = chosen_loss(self.name, self.config, options)
        if self.loss.divergence is None:
            raise ValueError(f"cached_kd: loss {self.loss.name!r} takes dense teacher logits, but a teacher-logit "
                             "cache holds top-k log-probabilities; choose one of kd_loss's divergences "
                             f"({', '.join(DIVERGENCES)})")
        self.temperature = options["temperature"]
        self.options = {"sparse_mode": options["sparse_mode"], "vocab_size": options["vocab_size"],
                        "kd_weight": _checks.non_negative(self.name, "kd_weight", options["kd_weight"]),
                        "ce_weight": _checks.non_negative(self.name, "ce_weight", options["ce_weight"])}

    def plan(self, config):
        if config.data.teacher_cache is None:
            raise ValueError("cached_kd trains from a teacher-logit cache: set data.teacher_cache to a directory "
                             "and write the cache there with `kdcore cache-teacher CONFIG`")
        try:
            temperature = TeacherCache(config.data.teacher_cache).spec.temperature
        except (CacheError, OSError) as exc:
            raise ValueError(f"cached_kd: data.teacher_cache: {exc}") from None
        if self.temperature is not None and self.temperature != temperature:
            raise ValueError(f"cached_kd: temperature {self.temperature} differs from the cache's {temperature} (its "
                             "log-probabilities were taken at that temperature)")
        self.temperature = temperature
        self.loss.check(self.name, temperature)
        return [kdcore.Stage(self.name, teachers=[])]

    def losses(self, batch, outputs, ctx):
        if batch.teacher is None:
            raise ValueError("cached_kd: the batch carries no cached teacher; set data.teacher_cache")
        return {"kd": kdcore.kd_loss(outputs.student, teacher=batch.teacher, labels=batch.labels,
                                     ignore_index=ctx.ignore_index, normalizer=ctx.normalizer,
                                     divergence=self.loss.divergence, temperature=self.temperature, **self.options,
                                     **self.loss.options)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("cached_kd", CachedKD, description="distillation from a teacher-logit cache (data.teacher_cache): "
                                                "top-k sparse teacher, no teacher model")
