"""fused_linear_kd_loss: both models' LM heads and the kd_loss, chunk by chunk over rows.

For each chunk of ``C`` rows it computes the student's and the teacher's logits (``[C, V]``, the
input dtype, fp32 accumulation inside the matmul), runs a kd_loss backend op on them — which
returns the chunk's loss *and* its gradient with respect to the student logits — and folds that
gradient straight into the gradients of the student's hidden states, weight and bias (weight and
bias accumulated in fp32 across chunks). No ``[N, V]`` tensor ever exists: the extra memory is a
few ``[C, V]`` chunks plus the weight gradient. The gradients are computed in the forward pass, as
the kd_loss ops do; backward scales them by the upstream gradient.

Cost per chunk: two ``C × V × H`` matmuls forward (student and teacher) and two backward (hidden
and weight gradients), plus the fused loss pass over ``2 · C · V`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kdcore.divergences import REDUCTIONS
from kdcore.ops.kd_loss import kept_rows, loss_dtype, reduction_divisor

_IGNORE_INDEX, _REDUCTION = 6, 7  # positions in the kd_loss op's scalar arguments


MIN_CHUNK_ELEMENTS = 1 << 22  # 4 Mi logits (16 MiB in fp32): below that, per-chunk overheads dominate


def default_chunk_size(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: a chunk of logits about as large as the hidden states (``C · V ≈ N · H``,
    so the extra memory grows no faster than the activations), but at least
    ``MIN_CHUNK_ELEMENTS`` logits, so each chunk's matmuls and the weight-gradient update (a
    ``V × H`` read-modify-write per chunk) stay large; rounded up to a power of two."""
    elements = max(rows * hidden, MIN_CHUNK_ELEMENTS)
    chunk = math.ceil(elements / vocab)
    return max(1, min(rows, 1 << max(0, math.ceil(math.log2(chunk)))))


class FusedLinearKdLoss(torch.autograd.Function):
    """Arguments: ``op`` (a kd_loss backend op), the student's ``hidden [N, Hs]``, ``weight
    [V', Hs]``, ``bias [V']`` (or None), the teacher's (no gradient), ``labels``/``mask`` (``[N]``
    or None), ``normalizer`` (a 0-dim tensor or None), ``scalars`` (the op's scalar arguments),
    ``vocab`` (the compared vocabulary: the first ``vocab`` rows of each weight), ``chunk``."""

    @staticmethod
    def forward(ctx, op: Callable, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                labels: torch.Tensor | None, mask: torch.Tensor | None, normalizer: torch.Tensor | None,
                scalars: Sequence, vocab: int, chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        weight_v, bias_v = weight[:vocab], None if bias is None else bias[:vocab]
        teacher_weight_v = teacher_weight[:vocab]
        teacher_bias_v = None if teacher_bias is None else teacher_bias[:vocab]
        scalars = list(scalars)
        if scalars[_REDUCTION] == REDUCTIONS["batchmean"] and normalizer is None:
            # the divisor of the whole batch, so each chunk's loss and gradient are its share
            kept = kept_rows(rows, labels, mask, scalars[_IGNORE_INDEX], hidden.device)
            normalizer = reduction_divisor(kept, None, scalars[_REDUCTION], loss_dtype(hidden))
        wants = (ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                                        bias is not None and ctx.needs_input_grad[3])
        student_grad = any(wants)
        accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if wants[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if wants[2] else None
        total = torch.zeros((), dtype=loss_dtype(hidden), device=hidden.device)
        for start in range(0, rows, chunk):
            part = slice(start, min(rows, start + chunk))
            h = hidden[part]
            logits = F.linear(h, weight_v, bias_v)
            teacher_logits = F.linear(teacher_hidden[part], teacher_weight_v, teacher_bias_v)
            loss, grad, _ = op(logits, teacher_logits, None if labels is None else labels[part],
                               None if mask is None else mask[part], normalizer, *scalars, student_grad, False)
            total += loss
            del logits, teacher_logits
            if not student_grad:
                continue
            if grad_hidden is not None:
                grad_hidden[part] = grad @ weight_v
            if grad_weight is not None or grad_bias is not None:
                wide = grad.to(accumulate)
                if grad_weight is not None:
                    grad_weight[:vocab].addmm_(wide.t(), h.to(accumulate))
                if grad_bias is not None:
                    grad_bias[:vocab] += wide.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.reshape(())
        out_hidden = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        out_weight = None if grad_weight is None else (grad_weight * scale).to(weight_dtype)
        out_bias = None if grad_bias is None else (grad_bias * scale).to(bias_dtype)
        return None, out_hidden, out_weight, out_bias, None, None, None, None, None, None, None, None, None
