"""The ``cached_kd`` method: distillation from a teacher-logit cache, with no teacher model.

The teacher ran once over the training split (``kdcore cache-teacher CONFIG --output DIR``) and
its top-k log-probabilities per position were kept on disk (:mod:`kdcore.cache`); the run config
names that cache as ``data.teacher_cache``, and every training batch arrives with its examples'
cached teacher as a :class:`kdcore.SparseTeacher`. The student matches it with
:func:`kdcore.kd_loss`'s sparse path (``sparse_mode``: ``"tail"`` keeps the mass outside the top-k
as one bucket, ``"renorm"`` renormalizes the top-k), plus cross-entropy when ``ce_weight`` > 0, as
one term ``kd`` (``kd_weight · T² · D + ce_weight · CE``, averaged over labelled tokens). The
teachers listed in the run config (the one the cache was written from) are not built.

The loss temperature is the cache's (its log-probabilities were taken at it); ``temperature``, if
given, must equal it.

Config keys: ``divergence`` ("forward_kl"), ``sparse_mode`` ("tail"), ``temperature`` (the
cache's), ``beta``, ``alpha``, ``kd_weight`` (1.0), ``ce_weight`` (0.0), ``vocab_size`` (None).
"""

from __future__ import annotations

import kdcore
from kdcore.cache import CacheError, TeacherCache
from kdcore.engine.method import options_of
from kdcore.functional import loss_options

DEFAULTS = dict(divergence="forward_kl", sparse_mode="tail", temperature=None, beta=0.5, alpha=0.1, kd_weight=1.0,
                ce_weight=0.0, vocab_size=None)


class CachedKD(kdcore.Method):
    name = "cached_kd"
    default_weights = {"kd": 1.0}

    def __init__(self, config):
        super().__init__(config)
        self.options = options_of(self.name, self.config, **DEFAULTS)
        if self.options["sparse_mode"] not in ("tail", "renorm"):
            raise ValueError(f"cached_kd: sparse_mode must be 'tail' or 'renorm', got {self.options['sparse_mode']!r}")

    def plan(self, config):
        if config.data.teacher_cache is None:
            raise ValueError("cached_kd trains from a teacher-logit cache: set data.teacher_cache to the directory "
                             "`kdcore cache-teacher` wrote")
        try:
            temperature = TeacherCache(config.data.teacher_cache).spec.temperature
        except (CacheError, OSError) as exc:
            raise ValueError(f"cached_kd: data.teacher_cache: {exc}") from None
        if self.options["temperature"] is not None and self.options["temperature"] != temperature:
            raise ValueError(f"cached_kd: temperature {self.options['temperature']} differs from the cache's "
                             f"{temperature} (its log-probabilities were taken at that temperature)")
        self.options["temperature"] = temperature
        loss_options(self.name, t2_scale=True, reduction="batchmean", ignore_index=-100,
                     **{key: self.options[key] for key in ("divergence", "temperature", "beta", "alpha", "kd_weight",
                                                           "ce_weight")})
        return [kdcore.Stage(self.name, teachers=[])]

    def losses(self, batch, outputs, ctx):
        if batch.teacher is None:
            raise ValueError("cached_kd: the batch carries no cached teacher; set data.teacher_cache")
        return {"kd": kdcore.kd_loss(outputs.student, teacher=batch.teacher, labels=batch.labels,
                                     ignore_index=ctx.ignore_index, normalizer=ctx.normalizer, **self.options)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("cached_kd", CachedKD, description="distillation from a teacher-logit cache (data.teacher_cache): "
                                                "top-k sparse teacher, no teacher model")
