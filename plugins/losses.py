"""The divergences of :func:`kdcore.kd_loss` as named losses (``"forward_kl"``, ``"jsd"``, ...), and
:func:`kdcore.dkd_loss` as ``"dkd"``, so configs and methods can name them like any loss a
third-party plugin adds."""

from __future__ import annotations

import functools

import kdcore
from kdcore.divergences import DIVERGENCES


@kdcore.hookimpl
def kdcore_register_losses(register):
    for spec in DIVERGENCES.values():
        loss = functools.partial(kdcore.kd_loss, divergence=spec.name)
        register(spec.name, loss, description=f"kd_loss(divergence={spec.name!r}): {spec.formula}")
    register("dkd", kdcore.dkd_loss, description="dkd_loss (Zhao et al. 2022): alpha·T²·TCKD + beta·T²·NCKD, "
                                                 "split at labels")
