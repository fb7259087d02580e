"""kdcore's custom ops (``torch.ops.kdcore.*``) and the built-in backends that expose them.

Importing this package defines the Python ops and gives every op its fake implementation and
autograd. It is also the plugin (entry point ``kdcore.backends``) that registers kdcore's own
backends, through the same hook a third-party backend uses.
"""

from __future__ import annotations

import torch

from kdcore import _ext
from kdcore.backends import Backend
from kdcore.ops import native_sparse, reference, reference_sparse
from kdcore.ops import triton as triton_ops
from kdcore.ops.kd_loss import register_kd_loss_inplace_op, register_kd_loss_op
from kdcore.plugins import hookimpl


def _cpp_unavailable() -> str | None:
    return _ext.status().cpu_error


def _cuda_unavailable() -> str | None:
    status = _ext.status()
    if status.core_error is not None:
        return status.core_error
    if not status.with_cuda:
        return ("kdcore._C was built without CUDA (build on a machine with a CUDA toolkit and a CUDA build of torch: "
                "pip install --no-build-isolation -e .)")
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


BUILTIN_BACKENDS = (
    Backend(
        name="cuda",
        devices=("cuda",),
        priority=40,
        ops={"kd_loss": "kdcore::kd_loss_cuda", "kd_loss_inplace": "kdcore::kd_loss_cuda_inplace",
             "kd_loss_sparse": "kdcore::kd_loss_sparse_cuda"},
        unavailable_reason=_cuda_unavailable,
        description="fused CUDA kernel (rows split over a Hopper thread-block cluster, one pass over HBM)",
    ),
    Backend(
        name="cpp",
        devices=("cpu",),
        priority=20,
        ops={"kd_loss": "kdcore::kd_loss_cpp", "kd_loss_inplace": "kdcore::kd_loss_cpp_inplace",
             "kd_loss_sparse": "kdcore::kd_loss_sparse_cpp"},
        unavailable_reason=_cpp_unavailable,
        description="fused C++ kernel (at::vec, one pass over DRAM)",
    ),
    Backend(
        name="triton",
        devices=triton_ops.devices(),
        # interpreted (TRITON_INTERPRET=1, CPU tensors) it is for testing only: never picked by "auto"
        priority=-10 if triton_ops.interpreted() else 30,
        ops={"kd_loss": triton_ops.QUALNAME, "kd_loss_inplace": triton_ops.INPLACE_QUALNAME,
             "kd_loss_sparse": triton_ops.SPARSE_QUALNAME},
        unavailable_reason=triton_ops.unavailable_reason,
        description="Triton kernels, one program per row (CUDA; CPU through TRITON_INTERPRET=1)",
    ),
    Backend(
        name="reference",
        devices=("*",),
        priority=0,
        ops={"kd_loss": reference.QUALNAME, "kd_loss_inplace": reference.INPLACE_QUALNAME,
             "kd_loss_sparse": reference_sparse.QUALNAME},
        description="pure PyTorch, row-chunked; runs on any device",
    ),
)

register_kd_loss_op(reference.QUALNAME)
register_kd_loss_op(triton_ops.QUALNAME)
register_kd_loss_inplace_op(reference.INPLACE_QUALNAME)
register_kd_loss_inplace_op(triton_ops.INPLACE_QUALNAME)
if _ext.status().core_error is None:
    register_kd_loss_op("kdcore::kd_loss_cpp")
    register_kd_loss_inplace_op("kdcore::kd_loss_cpp_inplace")
    native_sparse.define("cpp")
    if _ext.status().with_cuda:
        register_kd_loss_op("kdcore::kd_loss_cuda")
        register_kd_loss_inplace_op("kdcore::kd_loss_cuda_inplace")
        native_sparse.define("cuda")


@hookimpl
def kdcore_register_backends(register):
    for backend in BUILTIN_BACKENDS:
        register(backend)
