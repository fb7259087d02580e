"""fused_linear_kd_loss: the student's LM head and the kd_loss, chunk by chunk over rows.

For each chunk of ``C`` rows it computes the student's logits (``[C, V]``, the input dtype, fp32
accumulation inside the matmul) and hands them to a chunk loss — the teacher's logits computed the
same way and a kd_loss backend op, or a sparse teacher's rows and a kd_loss_sparse op — which
returns the chunk's loss *and* its gradient with respect to the student logits — and folds that
gradient straight into the gradients of the student's hidden states, weight and bias (weight and
bias accumulated in fp32 across chunks). No ``[N, V]`` tensor ever exists: the extra memory is a
few ``[C, V]`` chunks plus the weight gradient. The gradients are computed in the forward pass, as
the kd_loss ops do; backward scales them by the upstream gradient.

Cost per chunk: two ``C × V × H`` matmuls forward (student and a dense teacher) and two backward
(hidden and weight gradients), plus the fused loss pass over the chunk's logits.
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


# chunk_loss(student_logits [C, V], rows, labels, mask, normalizer, student_grad) -> (loss, grad)
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def dense_teacher_chunks(op: Callable, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                         teacher_bias: torch.Tensor | None, scalars: Sequence, vocab: int) -> ChunkLoss:
    """The chunk loss against a teacher's LM head: its logits for the chunk, then the kd_loss op."""
    weight_v = teacher_weight[:vocab]
    bias_v = None if teacher_bias is None else teacher_bias[:vocab]

    def chunk_loss(logits, rows, labels, mask, normalizer, student_grad):
        teacher_logits = F.linear(teacher_hidden[rows], weight_v, bias_v)
        loss, grad, _ = op(logits, teacher_logits, labels, mask, normalizer, *scalars, student_grad, False)
        return loss, grad

    return chunk_loss


def sparse_teacher_chunks(op: Callable, indices: torch.Tensor, logprobs: torch.Tensor, scalars: Sequence,
                          sparse_mode: int) -> ChunkLoss:
    """The chunk loss against a sparse (top-k) teacher's rows: the kd_loss_sparse op."""

    def chunk_loss(logits, rows, labels, mask, normalizer, student_grad):
        return op(logits, indices[rows], logprobs[rows], labels, mask, normalizer, *scalars, sparse_mode, student_grad)

    return chunk_loss


class FusedLinearKdLoss(torch.autograd.Function):
    """Arguments: ``chunk_loss`` (see :data:`ChunkLoss`), the student's ``hidden [N, Hs]``,
    ``weight [V', Hs]``, ``bias [V']`` (or None), ``labels``/``mask`` (``[N]`` or None),
    ``normalizer`` (a 0-dim tensor or None), ``scalars`` (the op's scalar arguments), ``vocab``
    (the compared vocabulary: the first ``vocab`` rows of the weight), ``chunk``."""

    @staticmethod
    def forward(ctx, chunk_loss: ChunkLoss, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor | None, mask: torch.Tensor | None, normalizer: torch.Tensor | None,
                scalars: Sequence, vocab: int, chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        weight_v, bias_v = weight[:vocab], None if bias is None else bias[:vocab]
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
            try:
                loss, grad = chunk_loss(logits, part, None if labels is None else labels[part],
                                        None if mask is None else mask[part], normalizer, student_grad)
            except ValueError as exc:  # the op numbers rows within the chunk
                if start == 0:
                    raise
                raise ValueError(f"{exc} [row numbers count from row {start}, where this chunk starts]") from None
            total += loss
            del logits
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
        return None, out_hidden, out_weight, out_bias, None, None, None, None, None, None
