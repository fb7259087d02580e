"""The divergences of :func:`kdcore.kd_loss` as named losses (``"forward_kl"``, ``"jsd"``, ...), so
configs and methods can name them like any loss a third-party plugin adds."""

from __future__ import annotations

import functools

import kdcore
from kdcore.divergences import DIVERGENCES


@kdcore.hookimpl
def kdcore_register_losses(register):
    for spec in DIVERGENCES.values():
        loss = functools.partial(kdcore.kd_loss, divergence=spec.name)
        register(spec.name, loss, description=f"kd_loss(divergence={spec.name!r}): {spec.formula}")
