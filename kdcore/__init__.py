"""kdcore: knowledge distillation for PyTorch.

Fused temperature-softmax divergence kernels (:func:`kd_loss`) behind one functional API, with
backends chosen per device (:func:`backends`); distillation methods, losses, backends and training
callbacks come from plugins (:mod:`kdcore.plugins`, hooks in :mod:`kdcore.hookspecs`).
"""

from kdcore import ops as _ops  # noqa: F401  (defines the custom ops)
from kdcore import plugins
from kdcore.backends import Backend, BackendStatus, backends
from kdcore.divergences import DIVERGENCES, REDUCTIONS
from kdcore.engine import Method, Outputs, Stage
from kdcore.functional import fused_linear_kd_loss, kd_loss
from kdcore.losses import KDLoss
from kdcore.sparse import SparseTeacher
from kdcore.plugins import hookimpl

__version__ = "0.1.0"

# the engine loads on first use (it imports pydantic, yaml and the data-loading machinery)
_ENGINE = {
    "Distiller": "kdcore.engine.distiller",
    "RunConfig": "kdcore.engine.config",
    "ConfigError": "kdcore.engine.config",
    "StageContext": "kdcore.engine.context",
}


def __getattr__(name: str):
    if name in _ENGINE:
        import importlib

        return getattr(importlib.import_module(_ENGINE[name]), name)
    raise AttributeError(f"module 'kdcore' has no attribute {name!r}")


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
    "fused_linear_kd_loss",
    "hookimpl",
    "kd_loss",
    "plugins",
]
