"""The ``triton`` backend: kd_loss as Triton kernels (``kdcore::kd_loss_triton``, and
``kdcore::kd_loss_sparse_triton`` for sparse teachers).

The ops are defined whether or not Triton is installed; the kernels (kdcore/ops/triton/*.py) are
imported on the first call. It runs on CUDA tensors, or, with ``TRITON_INTERPRET=1``, on CPU
tensors through Triton's interpreter (slow; that is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kdcore.ops.kd_loss import (
    all_neg_inf_error,
    define_kd_loss_ops,
    empty_outputs,
    kd_scales,
    kept_rows,
    label_out_of_range_error,
    loss_dtype,
    reduce_rows,
    reduction_divisor,
)
from kdcore.ops.kd_loss_sparse import RowKernels, define_kd_loss_sparse_op
from kdcore.ops.status import check_status


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def devices() -> tuple[str, ...]:
    return ("cpu",) if interpreted() else ("cuda",)


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if interpreted():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, slowly, for testing)"
    return None


def _kd_loss_triton(student, teacher, labels, mask, normalizer, temperature, divergence, mix, t2_scale, kd_weight,
                    ce_weight, ignore_index, reduction, student_grad, teacher_grad, *, inplace: bool):
    from kdcore.ops.triton import kd_loss as kernels

    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"kd_loss_triton: expected two [N, V] logits, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    _check_device("kd_loss_triton", student)
    n, v = student.shape
    if inplace and v > 1 and student.stride(1) != 1:
        raise ValueError("kd_loss_triton_inplace: the student logits must have unit stride along the vocabulary")
    acc = loss_dtype(student)
    student, teacher = (x if v <= 1 or x.stride(1) == 1 else x.contiguous() for x in (student, teacher))
    loss, grad_student, grad_teacher = empty_outputs(student, teacher, reduction, student_grad and not inplace,
                                                     teacher_grad)
    kept = kept_rows(n, labels, mask, ignore_index, student.device)
    divisor = reduction_divisor(kept, normalizer, reduction, acc).contiguous()
    row_loss = torch.zeros(n, dtype=acc, device=student.device)
    status = torch.zeros(n, dtype=torch.int8, device=student.device)
    if n > 0:
        kd_loss_scale, kd_grad_scale = kd_scales(temperature, t2_scale, kd_weight)
        kernels.launch(
            student, teacher, student if inplace and student_grad else grad_student, grad_teacher,
            labels.contiguous() if labels is not None else None, mask.contiguous() if mask is not None else None,
            divisor, row_loss, status, temperature=temperature, divergence=divergence, mix=mix,
            kd_loss_scale=kd_loss_scale, kd_grad_scale=kd_grad_scale,
            ce_weight=ce_weight, ignore_index=ignore_index, interpreted=interpreted(),
        )
        _raise_for_status(status, labels, v)
    reduce_rows(loss, row_loss, divisor, reduction)
    return loss, grad_student, grad_teacher


def _raise_for_status(status: torch.Tensor, labels, vocab: int) -> None:
    """Raises the first failing row's error (one device read per call, none while a CUDA graph is
    being captured: the kernel has made failing rows NaN)."""
    from kdcore.ops.triton.kd_loss import STATUS_ALL_NEG_INF, STATUS_LABEL_OUT_OF_RANGE

    def raise_row(row: int, code: int):
        if code == STATUS_ALL_NEG_INF:
            raise all_neg_inf_error(row)
        assert code == STATUS_LABEL_OUT_OF_RANGE, code
        raise label_out_of_range_error(row, int(labels[row]), vocab)

    check_status(status, raise_row)


QUALNAME, INPLACE_QUALNAME = define_kd_loss_ops("kdcore::kd_loss_triton", _kd_loss_triton)


def _check_device(op: str, student) -> None:
    if student.device.type != ("cpu" if interpreted() else "cuda"):
        raise ValueError(f"{op}: runs on {devices()[0]} tensors here, got {student.device.type}")


def _sparse_row_stats(student, indices, inv_t, with_tail, with_t1):
    from kdcore.ops.triton import kd_loss_sparse as kernels

    _check_device("kd_loss_sparse_triton", student)
    return kernels.row_stats(student, indices, inv_t, with_tail, with_t1, interpreted=interpreted())


def _sparse_fill(student, kept, labels, coefficients, inv_t):
    from kdcore.ops.triton import kd_loss_sparse as kernels

    return kernels.fill(student, kept, labels, coefficients, inv_t, interpreted=interpreted())


SPARSE_QUALNAME = define_kd_loss_sparse_op("kdcore::kd_loss_sparse_triton", RowKernels(_sparse_row_stats, _sparse_fill))
