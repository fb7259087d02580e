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
from kdcore.functional import kd_loss
from kdcore.losses import KDLoss
from kdcore.plugins import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendStatus",
    "DIVERGENCES",
    "KDLoss",
    "Method",
    "Outputs",
    "REDUCTIONS",
    "Stage",
    "backends",
    "hookimpl",
    "kd_loss",
    "plugins",
]
