"""kdcore: knowledge distillation for PyTorch.

Fused temperature-softmax divergence kernels (:func:`kd_loss`) behind one functional API, with
backends chosen per device (:func:`backends`).
"""

from kdcore import ops as _ops  # noqa: F401  (defines the ops and registers the built-in backends)
from kdcore.backends import Backend, BackendStatus, backends
from kdcore.divergences import DIVERGENCES, REDUCTIONS
from kdcore.functional import kd_loss
from kdcore.losses import KDLoss

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendStatus",
    "DIVERGENCES",
    "KDLoss",
    "REDUCTIONS",
    "backends",
    "kd_loss",
]
