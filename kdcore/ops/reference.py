"""The ``reference`` backend: kd_loss in plain PyTorch (``kdcore::kd_loss_reference``).

It runs on any device torch supports and is the readable statement of the math the fused kernels
implement (docs/math.md; the C++/CUDA twin is csrc/include/kdcore/divergence.h). Rows are
processed in chunks of about ``CHUNK_ELEMENTS`` logits, so its extra memory is a few chunk-sized
float32 temporaries plus the gradients, whatever N is. It computes in float32 (float64 for
float64 logits) and checks values it can see cheaply: all--inf kept rows and out-of-range labels
raise, NaN / +inf logits make that row's loss and gradient NaN.
"""

from __future__ import annotations

import torch

from kdcore.divergences import DIVERGENCES
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

CHUNK_ELEMENTS = 1 << 20

_FORWARD_KL, _REVERSE_KL, _JSD, _SKEW_KL, _SKEW_RKL, _TVD = (
    DIVERGENCES[name].code for name in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")
)


def guarded_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y where x > 0, else 0 (so 0 * log 0 and 0 * inf vanish)."""
    return torch.where(x > 0, x * y, torch.zeros((), dtype=x.dtype, device=x.device))


def _relative_gap(x, y, w):
    """w (y - x) / x, with x floored at the smallest normal number so it cannot overflow (an entry
    that small is weighted by x again wherever it counts)."""
    return w * (y - x) / x.clamp_min(torch.finfo(x.dtype).tiny)


def _log_ratio_to_mixture(x, y, w):
    """log(x / (w y + (1 - w) x)) = -log1p(w (y - x) / x): exactly 0 when y = x, accurate near it."""
    return -torch.log1p(_relative_gap(x, y, w))


def element_terms(divergence: int, la, lb, q, p, mix: float):
    """Per-element (term, q*gq, p*gp, gq, gp) of a divergence, gq = dd/dq and gp = dd/dp with q and
    p as free variables; see csrc/include/kdcore/divergence.h for the derivation."""
    if divergence == _FORWARD_KL:
        gp = lb - la
        term = guarded_mul(p, gp)
        return term, -p, term, None, gp
    if divergence == _REVERSE_KL:
        gq = la - lb
        term = guarded_mul(q, gq)
        return term, term, -q, gq, None
    if divergence == _JSD:
        gq = (1 - mix) * _log_ratio_to_mixture(q, p, mix)
        gp = mix * _log_ratio_to_mixture(p, q, 1 - mix)
        qgq, pgp = guarded_mul(q, gq), guarded_mul(p, gp)
        return qgq + pgp, qgq, pgp, gq, gp
    if divergence == _SKEW_KL:
        z = _relative_gap(p, q, 1 - mix)
        log_ratio = -torch.log1p(z)
        p_over_r = torch.where(p > 0, 1 / (1 + z), torch.zeros_like(p))
        gq, gp = -(1 - mix) * p_over_r, log_ratio - mix * p_over_r
        return guarded_mul(p, log_ratio), q * gq, guarded_mul(p, gp), gq, gp
    if divergence == _SKEW_RKL:
        z = _relative_gap(q, p, 1 - mix)
        log_ratio = -torch.log1p(z)
        q_over_r = torch.where(q > 0, 1 / (1 + z), torch.zeros_like(q))
        gq, gp = log_ratio - mix * q_over_r, -(1 - mix) * q_over_r
        return guarded_mul(q, log_ratio), guarded_mul(q, gq), p * gp, gq, gp
    if divergence == _TVD:
        diff = p - q
        gp = 0.5 * torch.sign(diff)
        return 0.5 * diff.abs(), -q * gp, p * gp, -gp, gp
    raise ValueError(f"kd_loss_reference: unknown divergence code {divergence}")


def _softmax_grad(prob, g, g_sum):
    """prob * (g - sum(prob * g)), the softmax Jacobian applied as torch's softmax backward does."""
    return guarded_mul(prob, g - g_sum.unsqueeze(1))


def student_grad_needs_row_sum(divergence: int) -> bool:
    """Whether dd/da needs the row sum Gq = sum(q * gq); forward KL's closed form q - p does not.
    (A caller holding part of each row, e.g. one vocabulary slice per device, sums it over the parts.)"""
    return divergence != _FORWARD_KL


def teacher_grad_needs_row_sum(divergence: int) -> bool:
    """Whether dd/db needs the row sum Gp = sum(p * gp); reverse KL's closed form p - q does not."""
    return divergence != _REVERSE_KL


def grad_wrt_student(divergence: int, q, p, gq, qgq_sum):
    """dd/da from the elements of q, p, gq and the rows' Gq = sum(q * gq) over the whole row
    (``qgq_sum``, [rows]; unused by forward KL, whose closed form q - p avoids gq = -p/q)."""
    return q - p if divergence == _FORWARD_KL else _softmax_grad(q, gq, qgq_sum)


def grad_wrt_teacher(divergence: int, q, p, gp, pgp_sum):
    """dd/db from the elements and the rows' Gp = sum(p * gp) (``pgp_sum``; unused by reverse KL,
    whose closed form is p - q)."""
    return p - q if divergence == _REVERSE_KL else _softmax_grad(p, gp, pgp_sum)


def _check_values(s, t, kept, labels, ce_weight, first_row):
    all_masked = kept & ((s == -torch.inf).all(-1) | (t == -torch.inf).all(-1))
    if bool(all_masked.any()):
        raise all_neg_inf_error(first_row + int(all_masked.nonzero()[0, 0]))
    if ce_weight != 0:
        out_of_range = kept & ((labels < 0) | (labels >= s.shape[1]))
        if bool(out_of_range.any()):
            i = int(out_of_range.nonzero()[0, 0])
            raise label_out_of_range_error(first_row + i, int(labels[i]), s.shape[1])


def finish_rows(grad, kept, bad, row_scale):
    """Scales a chunk's gradient; exactly 0 on ignored rows, NaN on kept rows with NaN / +inf logits."""
    grad = torch.where(kept.unsqueeze(1), grad * row_scale, 0.0)
    return grad.masked_fill((bad & kept).unsqueeze(1), torch.nan)


def _kd_loss_reference(student, teacher, labels, mask, normalizer, temperature, divergence, mix, t2_scale,
                       kd_weight, ce_weight, ignore_index, reduction, student_grad, teacher_grad, *, inplace: bool):
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"kd_loss_reference: expected two [N, V] logits, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    n, v = student.shape
    acc = loss_dtype(student)
    loss, grad_student, grad_teacher = empty_outputs(student, teacher, reduction, student_grad and not inplace,
                                                     teacher_grad)
    # in place, a chunk's gradient replaces its logits once everything read from them is computed
    student_grad_out = student if inplace else grad_student
    kept = kept_rows(n, labels, mask, ignore_index, student.device)
    divisor = reduction_divisor(kept, normalizer, reduction, acc)
    row_scale = 1 / divisor
    kd_loss_scale, kd_grad_scale = kd_scales(temperature, t2_scale, kd_weight)
    row_loss = torch.zeros(n, dtype=acc, device=student.device)
    chunk = max(1, CHUNK_ELEMENTS // v)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        s, t, k = student[rows].to(acc), teacher[rows].to(acc), kept[rows]
        lab = labels[rows] if labels is not None else None
        _check_values(s, t, k, lab, ce_weight, start)
        bad = (s.isnan() | s.isposinf()).any(-1) | (t.isnan() | t.isposinf()).any(-1)
        la = torch.log_softmax(s / temperature, dim=-1)
        lb = torch.log_softmax(t / temperature, dim=-1)
        q, p = la.exp(), lb.exp()
        term, qgq, pgp, gq, gp = element_terms(divergence, la, lb, q, p, mix)
        chunk_loss = kd_loss_scale * term.sum(-1)
        if ce_weight != 0:
            safe_labels = torch.where(k, lab, 0).unsqueeze(1)
            # (max - z_label) + log sum exp(z - max): the logits' magnitude cancels before the log-sum is
            # added, so logits near 1e6 (a float32 ulp of 0.06) keep the few units the loss has
            top = s.amax(-1, keepdim=True)
            log_sum = torch.logsumexp(s - top, -1)
            chunk_loss = chunk_loss + ce_weight * ((top.squeeze(1) - s.gather(1, safe_labels).squeeze(1)) + log_sum)
        chunk_loss = torch.where(bad, torch.nan, chunk_loss)
        row_loss[rows] = torch.where(k, chunk_loss, 0)
        if student_grad:
            qgq_sum = qgq.sum(-1) if student_grad_needs_row_sum(divergence) else None
            g = kd_grad_scale * grad_wrt_student(divergence, q, p, gq, qgq_sum)
            if ce_weight != 0:
                g = g + ce_weight * (torch.softmax(s, -1) - torch.zeros_like(s).scatter_(1, safe_labels, 1.0))
            student_grad_out[rows] = finish_rows(g, k, bad, row_scale).to(student.dtype)
        if teacher_grad:
            pgp_sum = pgp.sum(-1) if teacher_grad_needs_row_sum(divergence) else None
            g = kd_grad_scale * grad_wrt_teacher(divergence, q, p, gp, pgp_sum)
            grad_teacher[rows] = finish_rows(g, k, bad, row_scale).to(teacher.dtype)
    reduce_rows(loss, row_loss, divisor, reduction)
    return loss, grad_student, grad_teacher


QUALNAME, INPLACE_QUALNAME = define_kd_loss_ops("kdcore::kd_loss_reference", _kd_loss_reference)
