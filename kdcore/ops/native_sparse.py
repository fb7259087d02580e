"""The compiled backends' kd_loss_sparse ops (``kdcore::kd_loss_sparse_cpp``): the family's shared
body (kdcore/ops/kd_loss_sparse.py) over the C++ row kernels of csrc/cpu/kd_loss_sparse.cpp, whose
schemas are in csrc/bindings.cpp. Importing this module needs kdcore._C loaded."""

from __future__ import annotations

import torch

from kdcore.ops.kd_loss_sparse import RowKernels, define_kd_loss_sparse_op


def _fake_row_stats(student, indices, inv_t, with_tail, with_t1):
    return student.new_empty((student.shape[0], 3), dtype=torch.float64)


def _fake_fill(student, kept, labels, coefficients, inv_t):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def define(device: str) -> str:
    """Defines ``kdcore::kd_loss_sparse_<device>`` over ``sparse_row_stats_<device>`` and
    ``sparse_fill_<device>``; returns its qualified name."""
    stats, fill = f"kdcore::sparse_row_stats_{device}", f"kdcore::sparse_fill_{device}"
    torch.library.register_fake(stats, _fake_row_stats)
    torch.library.register_fake(fill, _fake_fill)
    kernels = RowKernels(getattr(torch.ops.kdcore, f"sparse_row_stats_{device}"),
                         getattr(torch.ops.kdcore, f"sparse_fill_{device}"))
    return define_kd_loss_sparse_op(f"kdcore::kd_loss_sparse_{device}", kernels)
