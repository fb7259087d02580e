"""kdcore's custom ops (``torch.ops.kdcore.*``) and the built-in backends that expose them.

Importing this package defines the Python ops and gives every op its fake implementation and
autograd. It is also the plugin (entry point ``kdcore.backends``) that registers kdcore's own
backends, through the same hook a third-party backend uses.
"""

from __future__ import annotations

from kdcore import _ext
from kdcore.backends import Backend
from kdcore.ops import reference
from kdcore.ops import triton as triton_ops
from kdcore.ops.kd_loss import register_kd_loss_op
from kdcore.plugins import hookimpl


def _cpp_unavailable() -> str | None:
    return _ext.status().cpu_error


BUILTIN_BACKENDS = (
    Backend(
        name="cpp",
        devices=("cpu",),
        priority=20,
        ops={"kd_loss": "kdcore::kd_loss_cpp"},
        unavailable_reason=_cpp_unavailable,
        description="fused C++ kernel (at::vec, one pass over DRAM)",
    ),
    Backend(
        name="triton",
        devices=triton_ops.devices(),
        # interpreted (TRITON_INTERPRET=1, CPU tensors) it is for testing only: never picked by "auto"
        priority=-10 if triton_ops.interpreted() else 30,
        ops={"kd_loss": triton_ops.QUALNAME},
        unavailable_reason=triton_ops.unavailable_reason,
        description="Triton kernels, one program per row (CUDA; CPU through TRITON_INTERPRET=1)",
    ),
    Backend(
        name="reference",
        devices=("*",),
        priority=0,
        ops={"kd_loss": reference.QUALNAME},
        description="pure PyTorch, row-chunked; runs on any device",
    ),
)

register_kd_loss_op(reference.QUALNAME)
register_kd_loss_op(triton_ops.QUALNAME)
if _ext.status().core_error is None:
    register_kd_loss_op("kdcore::kd_loss_cpp")


@hookimpl
def kdcore_register_backends(register):
    for backend in BUILTIN_BACKENDS:
        register(backend)
