"""The kd_loss_sparse op family: kd_loss against a teacher given only as its top-k entries
(``kdcore::kd_loss_sparse_<backend>``), with one schema, fake and autograd for every backend.

The teacher of a row is ``k`` slots of vocabulary indices and their log-probabilities (already
at the teacher's temperature, typically read from a cache). A slot whose log-probability is
``-inf`` is unused: it is dropped on both sides, whatever index it holds, so the row's *entries*
are its other slots. The divergence is taken between two distributions over *buckets*
(docs/math.md, "Sparse teachers"):

- ``tail`` mode: the entries plus one bucket holding the rest of the vocabulary, on both sides
  (teacher tail ``1 - Σ p_k``, student tail the exact softmax mass outside the entries); a row
  whose entries are the whole vocabulary has no rest, and the teacher's rounding residual is
  renormalized away as in renorm; a row without entries is all tail on both sides (divergence 0);
- ``renorm`` mode: the entries only, both sides renormalized over them.

Every divergence of the family applies to the bucket distributions. The student gradient goes
through the bucketing: with ``G_b = Q_b (g_b - Σ Q g)`` the bucket-level gradient, an entry k gets
``G_k`` and a column j outside them ``q_j / Q_tail · G_tail`` (0 in renorm mode), written as
``exp(a_j - lse_tail) · G_tail``: a share of the tail in [0, 1] times a bounded gradient.

Only two steps touch ``[N, V]`` data, and each backend supplies them as row kernels (a
:class:`RowKernels`): ``row_stats`` reads the student once for its log-sum-exps (over the whole
row, over the columns outside the entries, and at temperature 1 for the fused cross-entropy), and
``fill`` writes every gradient element once from per-row coefficients. The bucket math in
between is ``[N, k]``-sized and is written here once, in float64, for every backend; so is the
handling of unused slots: the row kernels only ever see the columns of a row's entries
(:func:`_tail_exclusions`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial
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
from kdcore.ops.status import check_status

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
# columns outside the given indices (-inf when there are none), and of z itself (temperature 1, for
# the CE).
LSE_ALL, LSE_TAIL, LSE_T1 = range(3)
# Columns of fill's [N, 4] float64 coefficients: every element gets
#   kd_coef · exp(a_j - kd_shift) + ce_coef · (exp(z_j - ce_shift) - [j == label]),
# both exponents <= 0 outside the entries (which the op overwrites afterwards).
KD_SHIFT, KD_COEF, CE_SHIFT, CE_COEF = range(4)


@dataclass(frozen=True)
class RowKernels:
    """A backend's two ``[N, V]`` passes of the sparse family.

    ``row_stats(student, indices, inv_t, with_tail, with_t1) -> [N, 3] float64`` (columns
    ``LSE_ALL, LSE_TAIL, LSE_T1``; a NaN or +inf logit makes its row's entries NaN; the tail and
    T=1 columns are only meaningful when asked for). ``indices`` is contiguous int64 ``[N, k]``,
    each row in [0, V) and ascending, a column possibly repeated: the tail is every column of the
    row that is not listed. ``fill(student, kept, labels, coefficients,
    inv_t)`` returns a new gradient like ``student``, every element from the ``[N, 4]`` float64
    coefficients (columns ``KD_SHIFT, KD_COEF, CE_SHIFT, CE_COEF``), zeros on rows not kept.
    Both form ``a = z * inv_t`` in the accumulation type, with ``inv_t`` the accumulation type's
    rounding of 1/T (:func:`inverse_temperature`), so every pass and the bucket math see the same
    ``a`` to the last bit.
    """

    row_stats: Callable
    fill: Callable


def inverse_temperature(temperature: float, acc: torch.dtype) -> float:
    """1/T rounded to the accumulation type (exactly representable there), on the host."""
    inv = 1.0 / temperature
    return inv if acc == torch.float64 else struct.unpack("f", struct.pack("f", inv))[0]


def sparse_rows_error(row: int, what: str) -> ValueError:
    return ValueError(f"kd_loss: row {row} of the sparse teacher {what}")


# What can be wrong with a kept row, as the codes of its int8 status (0: fine). A row reports its
# smallest code; a call reports its first failing row (kdcore.ops.status.check_status).
(INDEX_OUT_OF_RANGE, INDEX_REPEATED, LOGPROB_POS_INF, PROBABILITY_OVER_ONE, LABEL_OUT_OF_RANGE,
 STUDENT_ALL_NEG_INF, TEACHER_NO_ENTRIES, STUDENT_NO_TOP_K_MASS) = range(1, 9)

# The sort key of an unused slot: after every index, so each row's entries come first.
_UNUSED = torch.iinfo(torch.int64).max


def _flag(status: torch.Tensor, failed: torch.Tensor, code: int) -> torch.Tensor:
    """``status`` with ``code`` on the rows where ``failed`` and no earlier check failed."""
    return torch.where((status == 0) & failed, code, status)


@dataclass(frozen=True)
class _RowFacts:
    """What the error messages quote, read only once a row has failed."""

    indices: torch.Tensor  # the teacher's indices as given, sorted per row, entries first
    entries: torch.Tensor  # which of those slots are entries (on kept rows)
    vocab: int
    mass: torch.Tensor | None  # tail mode: each row's top-k probability sum
    labels: torch.Tensor | None


def _raise_row(facts: _RowFacts, row: int, code: int):
    """Raises the error of a failed row: what is wrong, and what the argument should be."""
    v = facts.vocab
    if code == INDEX_OUT_OF_RANGE:
        ids = facts.indices[row]
        bad = ids[facts.entries[row] & ((ids < 0) | (ids >= v))][0]
        raise sparse_rows_error(row, f"has index {int(bad)}, outside the student's vocabulary [0, {v})")
    if code == INDEX_REPEATED:
        raise sparse_rows_error(row, "lists a vocabulary index twice; each row's top-k indices must be distinct")
    if code == LOGPROB_POS_INF:
        raise sparse_rows_error(row, "has a log-probability that is +inf or NaN (a teacher whose outputs were not "
                                     "finite)")
    if code == PROBABILITY_OVER_ONE:
        raise sparse_rows_error(row, f"has probabilities summing to {float(facts.mass[row]):.4g} > 1; logprobs must "
                                "be log-probabilities (log_softmax of the teacher's logits), not logits")
    if code == LABEL_OUT_OF_RANGE:
        raise label_out_of_range_error(row, int(facts.labels[row]), v)
    if code == STUDENT_ALL_NEG_INF:
        raise sparse_rows_error(row, "meets a student row that is entirely -inf; every kept row needs a finite logit "
                                "(mark the row ignored with labels=ignore_index or mask=False)")
    if code == TEACHER_NO_ENTRIES:
        raise sparse_rows_error(row, "has no entries (every log-probability is -inf), so sparse_mode='renorm' has "
                                "nothing to renormalize (mark the row ignored with labels=ignore_index or mask=False)")
    raise sparse_rows_error(row, "is degenerate: the student gives its top-k entries no probability, so "
                            "sparse_mode='renorm' has nothing to renormalize")


def _check_teacher(indices, logprobs, kept, vocab: int, sparse_mode: int):
    """Sorts each row's entries (the slots of a kept row whose log-probability is not -inf) by
    index, ahead of its unused slots, and checks them on the device: indices in [0, V) and
    distinct, no +inf or NaN log-probability, and in tail mode probabilities that sum to at most 1. The
    index of an unused slot is never read. Returns (sorted indices, their log-probs, which sorted
    slots are entries, status [N] int8, tail-mode probability sums)."""
    entries = kept.unsqueeze(1) & (logprobs != -torch.inf)
    sorted_indices, order = torch.where(entries, indices, _UNUSED).sort(dim=1)
    sorted_logprobs = logprobs.gather(1, order)
    entries = entries.gather(1, order)
    status = torch.zeros(kept.shape, dtype=torch.int8, device=kept.device)
    status = _flag(status, (entries & ((sorted_indices < 0) | (sorted_indices >= vocab))).any(1), INDEX_OUT_OF_RANGE)
    repeated = entries[:, 1:] & entries[:, :-1] & (sorted_indices[:, 1:] == sorted_indices[:, :-1])
    status = _flag(status, repeated.any(1), INDEX_REPEATED)
    not_finite = (sorted_logprobs == torch.inf) | sorted_logprobs.isnan()
    status = _flag(status, (entries & not_finite).any(1), LOGPROB_POS_INF)
    mass = None
    if sparse_mode == SPARSE_TAIL:
        mass = torch.where(kept, sorted_logprobs.double().exp().sum(1), 0)
        status = _flag(status, mass > 1 + PROBABILITY_SUM_SLACK, PROBABILITY_OVER_ONE)
    return sorted_indices, sorted_logprobs, entries, status, mass


def _tail_exclusions(sorted_indices, entries):
    """The columns the row kernels leave out of a row's tail, ascending as they expect: the row's
    entries, then its other slots repeating its largest entry (leaving a column out twice changes
    nothing), so an unused slot's index never reaches a kernel. A row without entries lists column
    0 throughout; the op then takes its whole row as the tail."""
    count = entries.sum(1, keepdim=True)
    largest = sorted_indices.gather(1, (count - 1).clamp_min(0))
    return torch.where(entries, sorted_indices, torch.where(count > 0, largest, 0)).contiguous()


def _buckets(la_k, lp, lse_all, lse_tail, sparse_mode: int, whole_vocab, kept, status):
    """Log-probabilities of both sides over the buckets, [N, k + 1] (tail) or [N, k] (renorm), and
    ``status`` with the renorm rows that have nothing to renormalize flagged. Unused slots hold
    -inf on both sides (a bucket of probability 0 that contributes nothing). In tail mode a row
    whose entries are the whole vocabulary (``whole_vocab``; None when k < V, where no row's are)
    is renormalized over them, its tail bucket empty on both sides: the student has no mass
    outside them, and the teacher's ``1 - Σ p`` is only rounding."""
    if sparse_mode != SPARSE_TAIL:
        student_mass, teacher_mass = la_k.logsumexp(1), lp.logsumexp(1)
        status = _flag(status, kept & (teacher_mass == -torch.inf), TEACHER_NO_ENTRIES)
        status = _flag(status, kept & (student_mass == -torch.inf), STUDENT_NO_TOP_K_MASS)
        return la_k - student_mass.unsqueeze(1), lp - teacher_mass.unsqueeze(1), status
    p_tail = (1 - lp.exp().sum(1, keepdim=True)).clamp_min(0)
    la = torch.cat([la_k, (lse_tail - lse_all).unsqueeze(1)], dim=1)
    lb = torch.cat([lp, p_tail.log()], dim=1)
    if whole_vocab is None:
        return la, lb, status
    none = torch.full_like(p_tail, -torch.inf)
    whole_vocab = whole_vocab.unsqueeze(1)
    la = torch.where(whole_vocab, torch.cat([la_k - la_k.logsumexp(1, keepdim=True), none], dim=1), la)
    lb = torch.where(whole_vocab, torch.cat([lp - lp.logsumexp(1, keepdim=True), none], dim=1), lb)
    return la, lb, status


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
    """The op body every backend shares; ``kernels`` does the two passes over ``[N, V]``.

    Every check of a kept row (the teacher's indices and log-probabilities, the label, a student
    row with no finite logit, a renorm row with nothing to renormalize) is gathered into one
    status per row on the device, and a call reads it back once: a ValueError then names the first
    failing row and what to fix. While a CUDA graph is being captured nothing is read back, and a
    failing row's loss and gradient come out NaN instead (as they do for a NaN or +inf logit)."""
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
    given_indices, logprobs, given_entries, status, mass = _check_teacher(indices.long(), logprobs, kept, v,
                                                                          sparse_mode)
    # rows not kept have no entries, and rows that failed a check are not read past their index list
    entries = given_entries & (status == 0).unsqueeze(1)
    indices = _tail_exclusions(given_indices, entries)
    count = entries.sum(1)
    with_ce = ce_weight != 0
    safe_labels = None
    if with_ce:
        label_in_range = (labels >= 0) & (labels < v)
        status = _flag(status, kept & ~label_in_range, LABEL_OUT_OF_RANGE)
        safe_labels = torch.where(kept & label_in_range, labels, 0)
    inv_t = inverse_temperature(temperature, acc)
    stats = kernels.row_stats(student, indices, inv_t, sparse_mode == SPARSE_TAIL, with_ce)
    lse_all, lse_tail, lse_t1 = stats[:, LSE_ALL], stats[:, LSE_TAIL], stats[:, LSE_T1]
    lse_tail = torch.where(count > 0, lse_tail, lse_all)  # a row without entries is all tail
    status = _flag(status, kept & (lse_all == -torch.inf), STUDENT_ALL_NEG_INF)
    z_k = student.gather(1, indices).to(acc)
    la_k = torch.where(entries, (z_k * inv_t).to(f64) - lse_all.unsqueeze(1), -torch.inf)
    lp = torch.where(entries, logprobs.to(f64), -torch.inf)
    whole_vocab = count == v if indices.shape[1] >= v else None
    la, lb, status = _buckets(la_k, lp, lse_all, lse_tail, sparse_mode, whole_vocab, kept, status)
    check_status(status, partial(_raise_row, _RowFacts(given_indices, given_entries, v, mass, labels)))
    # a NaN or +inf logit makes its row NaN; so does a failed check when it could not be raised
    bad = lse_all.isnan() | (lse_all == torch.inf) | (status != 0)
    q, p = la.exp(), lb.exp()
    term, _, _, gq, _ = element_terms(divergence, la, lb, q, p, mix)
    bucket_grad = _bucket_gradient(divergence, q, p, gq)
    kd_loss_scale, kd_grad_scale = kd_scales(temperature, t2_scale, kd_weight)
    row_loss = kd_loss_scale * term.sum(1)
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
        coefficients = torch.where(bad.unsqueeze(1), torch.nan, coefficients)
        grad = kernels.fill(student, kept, safe_labels, coefficients, inv_t)
        member = torch.where(kept.unsqueeze(1), torch.where(bad.unsqueeze(1), torch.nan, member), 0)
        # the other slots write again what their column holds: the row's largest entry's value, or
        # (a row without entries) the fill's, so no two writes to one element differ
        held = torch.where((count > 0).unsqueeze(1), member.gather(1, (count - 1).clamp_min(0).unsqueeze(1)),
                           grad.gather(1, indices[:, :1]).to(f64))
        member = torch.where(entries, member, held)
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
