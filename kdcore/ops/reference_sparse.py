"""The ``reference`` backend's kd_loss_sparse op (``kdcore::kd_loss_sparse_reference``): the two
``[N, V]`` passes of the sparse family (kdcore/ops/kd_loss_sparse.py) in plain PyTorch, over
chunks of rows so the extra memory stays a few chunk-sized temporaries whatever N is."""

from __future__ import annotations

import torch

from kdcore.ops.kd_loss import loss_dtype
from kdcore.ops.kd_loss_sparse import CE_COEF, CE_SHIFT, KD_SHIFT, KD_COEF, RowKernels, define_kd_loss_sparse_op
from kdcore.ops.reference import CHUNK_ELEMENTS


def _chunks(student):
    n, v = student.shape
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    return (slice(start, min(n, start + step)) for start in range(0, n, step))


def _lse64(x: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp as float64 max + log(shifted sum): exact near the maximum however large the
    logits are; -inf for an all--inf row, NaN for a row with NaN or +inf."""
    m = x.max(1).values
    shift = torch.where(m == -torch.inf, 0, m)
    log_sum = (x - shift.unsqueeze(1)).exp().to(torch.float64).sum(1).log()
    return shift.to(torch.float64) + log_sum


def row_stats(student, indices, inv_t, with_tail, with_t1):
    stats = torch.zeros(student.shape[0], 3, dtype=torch.float64, device=student.device)
    for rows in _chunks(student):
        z = student[rows].to(loss_dtype(student))
        a = z * inv_t
        stats[rows, 0] = _lse64(a)
        if with_tail:
            stats[rows, 1] = _lse64(a.scatter(1, indices[rows], -torch.inf))
        if with_t1:
            stats[rows, 2] = _lse64(z)
    return stats


def fill(student, kept, labels, coefficients, inv_t):
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    for rows in _chunks(student):
        z = student[rows].to(loss_dtype(student))
        a = (z * inv_t).to(torch.float64)
        z = z.to(torch.float64)
        c = coefficients[rows]
        g = c[:, KD_COEF, None] * (a - c[:, KD_SHIFT, None]).exp()
        if labels is not None:
            onehot = torch.zeros_like(z).scatter_(1, labels[rows].unsqueeze(1), 1.0)
            g = g + c[:, CE_COEF, None] * ((z - c[:, CE_SHIFT, None]).exp() - onehot)
        grad[rows] = torch.where(kept[rows].unsqueeze(1), g, 0).to(grad.dtype)
    return grad


QUALNAME = define_kd_loss_sparse_op("kdcore::kd_loss_sparse_reference", RowKernels(row_stats, fill))
