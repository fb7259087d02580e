"""The kd_loss_sparse op family: kd_loss against a teacher given only as its top-k entries
(``kdcore::kd_loss_sparse_<backend>``), with one schema, fake and autograd for every backend.

The teacher of a row is ``k`` vocabulary indices and their log-probabilities (already at the
teacher's temperature, typically read from a cache). The divergence is taken between two
distributions over *buckets* (docs/math.md, "Sparse teachers"):

- ``tail`` mode: the k entries plus one bucket holding the rest of the vocabulary, on both sides
  (teacher tail ``1 - Σ p_k``, student tail the exact softmax mass outside the k entries); when
  k = V there is no rest, and the teacher's rounding residual is renormalized away as in renorm;
- ``renorm`` mode: the k entries only, both sides renormalized over them.

Every divergence of the family applies to the bucket distributions. The student gradient goes
through the bucketing: with ``G_b = Q_b (g_b - Σ Q g)`` the bucket-level gradient, an entry k gets
``G_k`` and an entry j outside them ``q_j / Q_tail · G_tail`` (0 in renorm mode), written as
``exp(a_j - lse_tail) · G_tail``: a share of the tail in [0, 1] times a bounded gradient.

Only two steps touch ``[N, V]`` data, and each backend supplies them as row kernels (a
:class:`RowKernels`): ``row_stats`` reads the student once for its log-sum-exps (over the whole
row, over the entries outside the k, and at temperature 1 for the fused cross-entropy), and
``fill`` writes every gradient element once from per-row coefficients. The bucket math in
between is ``[N, k]``-sized and is written here once, in float64, for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kdcore.divergences import DIVERGENCES, REDUCTION_NONE
from kdcore.ops.kd_loss import (
    _graph_is_retained,
    _is_eager,
    _scaled,
    kd_scales,
    kept_rows,
    label_out_of_range_error,
    loss_dtype,
    reduce_rows,
    reduction_divisor,
)
from kdcore.ops.reference import guarded_mul, element_terms

_FORWARD_KL = DIVERGENCES["forward_kl"].code
SPARSE_MODES = {"tail": 0, "renorm": 1}
SPARSE_TAIL = SPARSE_MODES["tail"]

KD_LOSS_SPARSE_SIGNATURE = (
    "(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, Tensor? mask, Tensor? normalizer, "
    "float temperature, int divergence, float mix, bool t2_scale, float kd_weight, float ce_weight, "
    "int ignore_index, int reduction, int sparse_mode, bool student_grad) -> (Tensor, Tensor)"
)
_NUM_ARGS = 16
_STUDENT_GRAD, _REDUCTION = 15, 13

# How far above 1 the teacher's top-k probabilities may sum in tail mode before the values are
# taken for something other than log-probabilities (fp16 / bf16 caches round each entry).
PROBABILITY_SUM_SLACK = 1e-2

# Columns of row_stats' [N, 3] float64 output: log-sum-exp of a = z / T over the row, over the
# entries outside the k (-inf when there are none), and of z itself (temperature 1, for the CE).
LSE_ALL, LSE_TAIL, LSE_T1 = range(3)
# Columns of fill's [N, 4] float64 coefficients: every element gets
#   kd_coef · exp(a_j - kd_shift) + ce_coef · (exp(z_j - ce_shift) - [j == label]),
# both exponents <= 0 outside the top-k (whose entries the op overwrites afterwards).
KD_SHIFT, KD_COEF, CE_SHIFT, CE_COEF = range(4)


@dataclass(frozen=True)
class RowKernels:
    """A backend's two ``[N, V]`` passes of the sparse family.

    ``row_stats(student, sorted_indices, inv_t, with_tail, with_t1) -> [N, 3] float64`` (columns
    ``LSE_ALL, LSE_TAIL, LSE_T1``; a NaN or +inf logit makes its row's entries NaN; the tail and
    T=1 columns are only meaningful when asked for). ``fill(student, kept, labels, coefficients,
    inv_t)`` returns a new gradient like ``student``, every element from the ``[N, 4]`` float64
    coefficients (columns ``KD_SHIFT, KD_COEF, CE_SHIFT, CE_COEF``), zeros on rows not kept.
    Both form ``a = z * inv_t`` in the accumulation type, with ``inv_t`` the accumulation type's
    rounding of 1/T (:func:`inverse_temperature`), so every pass and the bucket math see the same
    ``a`` to the last bit.
    """

    row_stats: Callable
    fill: Callable


def inverse_temperature(temperature: float, acc: torch.dtype) -> float:
    """1/T rounded to the accumulation type (exactly representable there)."""
    return float(torch.tensor(1.0 / temperature, dtype=acc))


def sparse_rows_error(row: int, what: str) -> ValueError:
    return ValueError(f"kd_loss: row {row} of the sparse teacher {what}")


def _check_teacher(indices, logprobs, kept, vocab: int, sparse_mode: int):
    """Sorts each row's entries by index and checks them: indices in [0, V) and distinct, and in
    tail mode probabilities that sum to at most 1. Returns (sorted indices, their log-probs)."""
    sorted_indices, order = indices.sort(dim=1)
    sorted_logprobs = logprobs.gather(1, order)
    checked = kept.unsqueeze(1)
    out_of_range = checked & ((sorted_indices < 0) | (sorted_indices >= vocab))
    if bool(out_of_range.any()):
        row = int(out_of_range.any(1).nonzero()[0, 0])
        bad = sorted_indices[row][out_of_range[row]][0]
        raise sparse_rows_error(row, f"has index {int(bad)}, outside the student's vocabulary [0, {vocab})")
    repeated = checked & (sorted_indices[:, 1:] == sorted_indices[:, :-1])
    if bool(repeated.any()):
        row = int(repeated.any(1).nonzero()[0, 0])
        raise sparse_rows_error(row, "lists a vocabulary index twice; each row's top-k indices must be distinct")
    infinite = checked & (sorted_logprobs == torch.inf)
    if bool(infinite.any()):
        row = int(infinite.any(1).nonzero()[0, 0])
        raise sparse_rows_error(row, "has a log-probability of +inf")
    if sparse_mode == SPARSE_TAIL:
        mass = torch.where(kept, sorted_logprobs.double().exp().sum(1), 0)
        too_much = mass > 1 + PROBABILITY_SUM_SLACK
        if bool(too_much.any()):
            row = int(too_much.nonzero()[0, 0])
            raise sparse_rows_error(row, f"has probabilities summing to {float(mass[row]):.4g} > 1; logprobs must "
                                    "be log-probabilities (log_softmax of the teacher's logits), not logits")
    return sorted_indices.contiguous(), sorted_logprobs


def _buckets(la_k, lp, lse_all, lse_tail, sparse_mode: int, kept):
    """Log-probabilities of both sides over the buckets, [N, k + 1] (tail) or [N, k] (renorm)."""
    if sparse_mode == SPARSE_TAIL:
        p_tail = (1 - lp.exp().sum(1, keepdim=True)).clamp_min(0)
        la = torch.cat([la_k, (lse_tail - lse_all).unsqueeze(1)], dim=1)
        return la, torch.cat([lp, p_tail.log()], dim=1)
    student_mass, teacher_mass = la_k.logsumexp(1), lp.logsumexp(1)
    for mass, side in ((student_mass, "the student gives"), (teacher_mass, "the teacher gives")):
        empty = kept & (mass == -torch.inf)
        if bool(empty.any()):
            raise sparse_rows_error(int(empty.nonzero()[0, 0]), f"is degenerate: {side} its top-k entries no "
                                    "probability, so sparse_mode='renorm' has nothing to renormalize")
    return la_k - student_mass.unsqueeze(1), lp - teacher_mass.unsqueeze(1)


def _bucket_gradient(divergence: int, q, p, gq):
    """dd/da per bucket, ``Q_i (g_i - Σ_b Q_b g_b)``, written as ``Q_i ((g_i - g_m) + Σ_b Q_b (g_m - g_b))``
    around each row's most probable bucket m: the same in exact arithmetic (Σ Q = 1), but without
    the cancellation that swamps ``g_m - Σ Q g`` when Q_m is within an ulp of 1 (a confident
    student), where the true value is of the order of the remaining mass. Forward KL: Q - P."""
    if divergence == _FORWARD_KL:
        return q - p
    g_top = gq.gather(1, q.argmax(1, keepdim=True))
    gap = g_top - gq
    return guarded_mul(q, guarded_mul(q, gap).sum(1, keepdim=True) - gap)


def sparse_kd_loss(kernels: RowKernels, student, indices, logprobs, labels, mask, normalizer, temperature,
                   divergence, mix, t2_scale, kd_weight, ce_weight, ignore_index, reduction, sparse_mode,
                   student_grad):
    """The op body every backend shares; ``kernels`` does the two passes over ``[N, V]``."""
    if student.dim() != 2 or indices.dim() != 2 or indices.shape != logprobs.shape or \
            indices.shape[0] != student.shape[0]:
        raise ValueError(f"kd_loss_sparse: expected student [N, V] with indices and logprobs [N, k], got "
                         f"{tuple(student.shape)}, {tuple(indices.shape)} and {tuple(logprobs.shape)}")
    if sparse_mode not in SPARSE_MODES.values():
        raise ValueError(f"kd_loss_sparse: unknown sparse_mode code {sparse_mode}")
    if divergence not in {spec.code for spec in DIVERGENCES.values()}:
        raise ValueError(f"kd_loss_sparse: unknown divergence code {divergence}")
    n, v = student.shape
    acc = loss_dtype(student)
    f64 = torch.float64
    kept = kept_rows(n, labels, mask, ignore_index, student.device)
    divisor = reduction_divisor(kept, normalizer, reduction, acc)
    loss = student.new_empty((n,) if reduction == REDUCTION_NONE else (), dtype=acc)
    if n == 0:
        reduce_rows(loss, torch.zeros(0, dtype=acc, device=student.device), divisor, reduction)
        return loss, student.new_empty((0, v) if student_grad else (0,))
    # rows not kept are never checked: give them harmless indices before any kernel reads them
    placeholder = torch.arange(indices.shape[1], device=indices.device) % v
    indices = torch.where(kept.unsqueeze(1), indices.long(), placeholder)
    indices, logprobs = _check_teacher(indices, logprobs, kept, v, sparse_mode)
    if indices.shape[1] == v:  # the top-k is the whole vocabulary: no tail exists, whatever rounding left over
        sparse_mode = SPARSE_MODES["renorm"]
    with_ce = ce_weight != 0
    if with_ce:
        out_of_range = kept & ((labels < 0) | (labels >= v))
        if bool(out_of_range.any()):
            row = int(out_of_range.nonzero()[0, 0])
            raise label_out_of_range_error(row, int(labels[row]), v)
    inv_t = inverse_temperature(temperature, acc)
    stats = kernels.row_stats(student, indices, inv_t, sparse_mode == SPARSE_TAIL, with_ce)
    lse_all, lse_tail, lse_t1 = stats[:, LSE_ALL], stats[:, LSE_TAIL], stats[:, LSE_T1]
    masked = kept & (lse_all == -torch.inf)
    if bool(masked.any()):
        raise sparse_rows_error(int(masked.nonzero()[0, 0]), "meets a student row that is entirely -inf; every "
                                "kept row needs a finite logit (mark the row ignored with labels=ignore_index "
                                "or mask=False)")
    bad = lse_all.isnan() | (lse_all == torch.inf)  # a NaN or +inf logit: the row is NaN
    z_k = student.gather(1, indices).to(acc)
    lp = logprobs.to(f64)
    la, lb = _buckets((z_k * inv_t).to(f64) - lse_all.unsqueeze(1), lp, lse_all, lse_tail, sparse_mode, kept)
    q, p = la.exp(), lb.exp()
    term, _, _, gq, _ = element_terms(divergence, la, lb, q, p, mix)
    bucket_grad = _bucket_gradient(divergence, q, p, gq)
    kd_loss_scale, kd_grad_scale = kd_scales(temperature, t2_scale, kd_weight)
    row_loss = kd_loss_scale * term.sum(1)
    safe_labels = torch.where(kept, labels, 0) if with_ce else None
    if with_ce:
        z_label = student.gather(1, safe_labels.unsqueeze(1)).squeeze(1).to(f64)
        row_loss = row_loss + ce_weight * (lse_t1 - z_label)
    row_loss = torch.where(bad, torch.nan, row_loss)
    reduce_rows(loss, torch.where(kept, row_loss, 0).to(acc), divisor.to(acc), reduction)
    if student_grad:
        row_scale = 1 / divisor.to(f64)
        k = indices.shape[1]
        coefficients = torch.zeros(n, 4, dtype=f64, device=student.device)
        coefficients[:, KD_SHIFT] = coefficients[:, CE_SHIFT] = torch.inf  # exp(x - inf) = 0: no term
        if sparse_mode == SPARSE_TAIL:  # q_j / Q_tail · G_tail = exp(a_j - lse_tail) · G_tail
            coefficients[:, KD_SHIFT] = torch.where(lse_tail == -torch.inf, torch.inf, lse_tail)
            coefficients[:, KD_COEF] = kd_grad_scale * row_scale * bucket_grad[:, k]
        member = kd_grad_scale * row_scale * bucket_grad[:, :k]
        if with_ce:
            coefficients[:, CE_SHIFT] = lse_t1
            coefficients[:, CE_COEF] = ce_weight * row_scale
            hit = (indices == safe_labels.unsqueeze(1)).to(f64)
            member = member + ce_weight * row_scale * ((z_k.to(f64) - lse_t1.unsqueeze(1)).exp() - hit)
        coefficients[bad] = torch.nan
        grad = kernels.fill(student, kept, safe_labels, coefficients, inv_t)
        member = torch.where(kept.unsqueeze(1), torch.where(bad.unsqueeze(1), torch.nan, member), 0)
        # a flat index_put_ (scatter_ into a reduced-precision CPU tensor upcasts all of it)
        flat = (torch.arange(n, device=indices.device).unsqueeze(1) * v + indices).reshape(-1)
        grad.view(-1).index_put_((flat,), member.to(grad.dtype).reshape(-1))
        return loss, grad
    return loss, student.new_empty((0,))


# -- the family's schema, fake and autograd ---------------------------------------------------------

def _fake(student, indices, logprobs, labels, mask, normalizer, temperature, divergence, mix, t2_scale, kd_weight,
          ce_weight, ignore_index, reduction, sparse_mode, student_grad):
    n, v = student.shape
    loss = student.new_empty((n,) if reduction == REDUCTION_NONE else (), dtype=loss_dtype(student))
    return loss, student.new_empty((n, v) if student_grad else (0,))


def _setup_context(ctx, inputs, output):
    _, grad_student = output
    ctx.mark_non_differentiable(grad_student)
    ctx.set_materialize_grads(False)
    ctx.grad = grad_student  # handed to autograd as it is when the graph is not retained (kd_loss.py)
    ctx.has_grad = inputs[_STUDENT_GRAD]
    ctx.rowwise = inputs[_REDUCTION] == REDUCTION_NONE


def _backward(ctx, grad_loss, _grad_of_grad_student):
    if grad_loss is None or not (ctx.needs_input_grad[0] and ctx.has_grad):
        return (None,) * _NUM_ARGS
    in_place = _is_eager(grad_loss) and not _graph_is_retained()
    grad = ctx.grad
    if in_place:
        ctx.grad = None
    return (_scaled(grad, grad_loss, ctx.rowwise, in_place),) + (None,) * (_NUM_ARGS - 1)


def register_kd_loss_sparse_op(qualname: str) -> None:
    """Gives a kd_loss_sparse op (defined with KD_LOSS_SPARSE_SIGNATURE) its fake and autograd."""
    torch.library.register_fake(qualname, _fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


def define_kd_loss_sparse_op(qualname: str, kernels: RowKernels) -> str:
    """Defines the backend op ``qualname`` running :func:`sparse_kd_loss` with ``kernels``."""

    def op(*args):
        return sparse_kd_loss(kernels, *args)

    torch.library.custom_op(qualname, op, mutates_args=(), schema=KD_LOSS_SPARSE_SIGNATURE)
    register_kd_loss_sparse_op(qualname)
    return qualname
