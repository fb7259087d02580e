"""kdcore: knowledge distillation for PyTorch.

Fused temperature-softmax divergence kernels (:func:`kd_loss`) behind one functional API, with
backends chosen per device (:func:`backends`); distillation methods, losses, backends and training
callbacks come from plugins (:mod:`kdcore.plugins`, hooks in :mod:`kdcore.hookspecs`).

``import kdcore`` is light: the names that need torch (the losses and their custom ops, the
engine) load on first use, so the ``kdcore`` command parses its arguments before torch is
imported. Using any of them, e.g. ``kdcore.kd_loss``, also registers the ``torch.ops.kdcore`` ops.
"""

from kdcore import plugins
from kdcore.backends import Backend, BackendStatus, backends
from kdcore.divergences import DIVERGENCES, REDUCTIONS
from kdcore.plugins import hookimpl

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use
_LAZY = {
    "kd_loss": "kdcore.functional",
    "fused_linear_kd_loss": "kdcore.functional",
    "dkd_loss": "kdcore.dkd",
    "KDLoss": "kdcore.losses",
    "SparseTeacher": "kdcore.sparse",
    "Method": "kdcore.engine.method",
    "Outputs": "kdcore.engine.method",
    "Stage": "kdcore.engine.method",
    "Distiller": "kdcore.engine.distiller",
    "RunConfig": "kdcore.engine.config",
    "ConfigError": "kdcore.engine.config",
    "StageContext": "kdcore.engine.context",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        importlib.import_module("kdcore.ops")  # the custom ops, whatever name is asked for first
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Backend",
    "BackendStatus",
    "ConfigError",
    "DIVERGENCES",
    "Distiller",
    "KDLoss",
    "Method",
    "Outputs",
    "REDUCTIONS",
    "RunConfig",
    "SparseTeacher",
    "Stage",
    "StageContext",
    "backends",
    "dkd_loss",
    "fused_linear_kd_loss",
    "hookimpl",
    "kd_loss",
    "plugins",
]
