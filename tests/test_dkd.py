"""kdcore.dkd_loss (decoupled KD on the fused kd_loss kernels) against the authors' formula:
megvii-research/mdistiller's ``dkd_loss`` (``mdistiller/distillers/DKD.py``), transcribed below in
float64 with torch autograd for the gradients. Loss and gradients are held to the project's rule
(tests/cases.py: a multiple of PyTorch's own error at the input's precision, here the same
transcription run in that precision)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdcore
from cases import ROUNDINGS_OF_TERMS, assert_within_rule
from conftest import device_backends

N, V = 12, 10


def kl_div_rows(log_pred_student, pred_teacher, log_pred_teacher):
    """``F.kl_div(log_pred_student, pred_teacher)`` summed per row, with the teacher's log taken
    as given: the same values, and a teacher gradient where a probability underflows to 0 (kl_div
    differentiates p · log p there, which is NaN)."""
    return (pred_teacher * (log_pred_teacher - log_pred_student)).sum(1)


def mdistiller_dkd_rows(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Per-row DKD losses as mdistiller's dkd_loss computes them (its ``size_average=False`` sum
    over the batch, divided by the batch size, is the mean of these rows)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = torch.cat([(pred_student * gt_mask).sum(1, keepdim=True),
                              (pred_student * other_mask).sum(1, keepdim=True)], dim=1)
    pred_teacher = torch.cat([(pred_teacher * gt_mask).sum(1, keepdim=True),
                              (pred_teacher * other_mask).sum(1, keepdim=True)], dim=1)
    log_pred_student = torch.log(pred_student)
    tckd = kl_div_rows(log_pred_student, pred_teacher, torch.log(pred_teacher)) * temperature**2
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_teacher_part2 = F.log_softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = kl_div_rows(log_pred_student_part2, pred_teacher_part2, log_pred_teacher_part2) * temperature**2
    return alpha * tckd + beta * nckd


def oracle(student, teacher, labels, *, alpha, beta, temperature, kept=None, reduction="batchmean",
           compute_dtype=torch.float64):
    """The transcription on the kept rows, reduced as kd_loss reduces; loss and gradients."""
    s = student.detach().to(compute_dtype).requires_grad_(True)
    t = teacher.detach().to(compute_dtype).requires_grad_(True)
    kept = torch.ones(labels.shape, dtype=torch.bool) if kept is None else kept
    rows = mdistiller_dkd_rows(s[kept], t[kept], labels[kept], alpha, beta, temperature)
    if reduction == "none":
        loss = torch.zeros(labels.shape, dtype=compute_dtype).masked_scatter(kept, rows)
        total = loss.sum()
    else:
        loss = rows.sum() / (max(int(kept.sum()), 1) if reduction == "batchmean" else 1)
        total = loss
    gs, gt = torch.autograd.grad(total, (s, t), allow_unused=True, materialize_grads=True)
    return loss.detach(), gs, gt


def _terms(prob, g):
    """``prob_j (|g_j| + Σ_k prob_k |g_k|)``: the size of the terms of a softmax-Jacobian gradient
    entry ``prob_j (g_j − Σ_k prob_k g_k)`` (tests/cases.py), 0 where ``prob`` is."""
    g = torch.where(prob > 0, g, 0.0).abs()
    return prob * (g + (prob * g).sum(1, keepdim=True))


def rounding_allowance(student, teacher, labels, kept, *, wrt, alpha, beta, temperature, out_dtype):
    """Per-entry allowance of the gradient with respect to ``wrt`` (``"student"`` or
    ``"teacher"``), from the size of its terms as tests/cases.py derives it for kd_loss: NCKD is a
    forward KL over the non-target distributions q̂, p̂ (free derivatives −p̂/q̂ for the student,
    log p̂ − log q̂ for the teacher); TCKD one over the binary distributions, whose second column
    reaches entry j ≠ y through the log-sum-exp with the factor q̂_j (p̂_j for the teacher). Each
    term, rounded a few times in float32, costs ROUNDINGS_OF_TERMS float32 eps of its size; with
    16-bit logits the TCKD and NCKD parts also reach the gradient rounded to that dtype apart."""
    s, t = student.detach().double() / temperature, teacher.detach().double() / temperature
    in_range = torch.where((labels >= 0) & (labels < s.shape[1]), labels, 0)
    target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, in_range.unsqueeze(1), True)
    q_hat, p_hat = s.masked_fill(target, -torch.inf).softmax(1), t.masked_fill(target, -torch.inf).softmax(1)
    q_y, p_y = s.softmax(1)[target].unsqueeze(1), t.softmax(1)[target].unsqueeze(1)
    q_bin, p_bin = torch.cat([q_y, 1 - q_y], 1), torch.cat([p_y, 1 - p_y], 1)
    if wrt == "student":
        nckd, tckd, through = _terms(q_hat, -p_hat / q_hat), _terms(q_bin, -p_bin / q_bin), q_hat
    else:
        nckd, tckd, through = (_terms(p_hat, p_hat.log() - q_hat.log()), _terms(p_bin, p_bin.log() - q_bin.log()),
                               p_hat)
    tckd = torch.where(target, tckd[:, :1], tckd[:, 1:] * through)
    magnitude = temperature * (beta * nckd + alpha * tckd)
    magnitude = torch.where(kept.unsqueeze(1), magnitude, 0.0) / max(int(kept.sum()), 1)
    eps = torch.finfo(torch.float32).eps if student.dtype != torch.float64 else torch.finfo(torch.float64).eps
    parts = torch.finfo(out_dtype).eps if out_dtype in (torch.bfloat16, torch.float16) else 0.0
    return (ROUNDINGS_OF_TERMS * eps + parts) * magnitude


def problem(gen, *, confident=False):
    """Classification logits: a student, a teacher and labels; ``confident`` puts a teacher margin
    of 30 on half the labels (1 − p_y ~ 1e-12 at T = 1: the TCKD that cancellation would lose)."""
    s = torch.randn(N, V, generator=gen) * 3
    t = torch.randn(N, V, generator=gen) * 3
    labels = torch.randint(0, V, (N,), generator=gen)
    if confident:
        t[torch.arange(0, N, 2), labels[::2]] += 30.0
    return s, t, labels


def check(student, teacher, labels, *, ignore_index=-100, mask=None, teacher_grad=False, reduction="batchmean",
          backend="auto", **options):
    """dkd_loss of ``student`` / ``teacher`` (leaf tensors of the dtype under test) against the
    oracle by the rule: loss, student gradient and (with ``teacher_grad``) teacher gradient."""
    student = student.detach().requires_grad_(True)
    teacher = teacher.detach().requires_grad_(teacher_grad)
    dtype = student.dtype
    loss = kdcore.dkd_loss(student, teacher, labels=labels, ignore_index=ignore_index, mask=mask,
                           reduction=reduction, backend=backend, **options)
    kept_rows = (labels != ignore_index) & (True if mask is None else mask)
    exact, exact_gs, exact_gt = oracle(student, teacher, labels, kept=kept_rows, reduction=reduction, **options)
    own, own_gs, own_gt = oracle(student, teacher, labels, kept=kept_rows, reduction=reduction, compute_dtype=dtype,
                                 **options)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype
    assert_within_rule("loss", loss, exact, own, loss_dtype)
    loss.sum().backward()
    assert student.grad.dtype == dtype

    def allowance(wrt):
        allowed = rounding_allowance(student, teacher, labels, kept_rows, wrt=wrt, out_dtype=dtype, **options)
        return allowed if reduction == "batchmean" else allowed * max(int(kept_rows.sum()), 1)

    assert_within_rule("student gradient", student.grad, exact_gs, own_gs, dtype, allowance("student"))
    if teacher_grad:
        assert_within_rule("teacher gradient", teacher.grad, exact_gt, own_gt, dtype, allowance("teacher"))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 8.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_the_authors_formula(dtype, temperature):
    gen = torch.Generator().manual_seed(0)
    s, t, labels = problem(gen, confident=True)
    check(s.to(dtype), t.to(dtype), labels, alpha=1.0, beta=8.0, temperature=temperature)


@pytest.mark.parametrize("backend", device_backends())
def test_every_backend(backend):
    gen = torch.Generator().manual_seed(1)
    s, t, labels = problem(gen)
    check(s, t, labels, alpha=0.5, beta=2.0, temperature=4.0, backend=backend, teacher_grad=True)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_ignored_rows_reductions_and_teacher_gradient(reduction):
    gen = torch.Generator().manual_seed(2)
    s, t, labels = problem(gen)
    labels[[1, 5, 6]] = -100
    s[5] = torch.nan  # what a dropped row holds never reaches the loss or the gradients
    t[6] = -torch.inf
    check(s, t, labels, alpha=2.0, beta=0.5, temperature=2.0, reduction=reduction, teacher_grad=True)


def test_mask_custom_ignore_index_and_normalizer():
    gen = torch.Generator().manual_seed(3)
    s, t, labels = problem(gen)
    labels[0] = 7777
    mask = torch.ones(N, dtype=torch.bool)
    mask[[3, 4]] = False
    check(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0, ignore_index=7777, mask=mask)
    total = kdcore.dkd_loss(s, t, labels=labels, ignore_index=7777, mask=mask, reduction="sum")
    torch.testing.assert_close(kdcore.dkd_loss(s, t, labels=labels, ignore_index=7777, mask=mask, normalizer=5.0),
                               total / 5.0)


def test_all_rows_ignored_give_zero_loss_and_gradients():
    s = torch.randn(4, V, requires_grad=True)
    t = torch.randn(4, V, requires_grad=True)
    loss = kdcore.dkd_loss(s, t, labels=torch.full((4,), -100), temperature=4.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


def test_leading_dimensions_and_the_kd_decomposition():
    """[B, L, V] logits with labels [B, L]; and, row by row, KL(p ‖ q) = TCKD + (1 − p_y) · NCKD
    (the identity DKD starts from), with the T² of both sides."""
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, V, generator=gen) * 2, torch.randn(2, 3, V, generator=gen) * 2
    labels = torch.randint(0, V, (2, 3), generator=gen)
    tckd = kdcore.dkd_loss(s, t, labels=labels, alpha=1.0, beta=0.0, temperature=3.0, reduction="none")
    nckd = kdcore.dkd_loss(s, t, labels=labels, alpha=0.0, beta=1.0, temperature=3.0, reduction="none")
    assert tckd.shape == nckd.shape == (2, 3)
    p_y = (t / 3.0).softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tckd + (1 - p_y) * nckd,
                               kdcore.kd_loss(s, t, temperature=3.0, reduction="none"))


def test_named_loss_is_dkd_loss():
    s, t, labels = torch.randn(5, V), torch.randn(5, V), torch.randint(0, V, (5,))
    loss = kdcore.plugins.get_loss("dkd")(s, t, labels=labels, alpha=0.5, beta=4.0, temperature=2.0)
    torch.testing.assert_close(loss, kdcore.dkd_loss(s, t, labels=labels, alpha=0.5, beta=4.0, temperature=2.0))


@pytest.mark.parametrize("call, error, pattern", [
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=None), TypeError, r"dkd_loss: labels must be a torch.Tensor"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y.float()), TypeError, r"dkd_loss: labels must be an integer"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y[:3]), ValueError, r"dkd_loss: labels must have shape \(6,\)"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y.index_fill(0, torch.tensor([4]), V)), ValueError,
     rf"dkd_loss: labels\[4\] = {V} is outside \[0, {V}\)"),
    (lambda s, t, y: kdcore.dkd_loss(s[:, :1], t[:, :1], labels=y * 0), ValueError,
     r"dkd_loss: the logits need at least 2 classes"),
    (lambda s, t, y: kdcore.dkd_loss(s, t[:, :4], labels=y), ValueError,
     r"dkd_loss: student_logits has 10 classes but teacher_logits has 4; the decoupled terms split both at the "
     r"same label, so they need the same classes$"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y, alpha=-1.0), ValueError, r"dkd_loss: alpha must be >= 0"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y, beta="8"), TypeError, r"dkd_loss: beta must be a real number"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y, temperature=0), ValueError,
     r"dkd_loss: temperature must be > 0"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y, reduction="mean"), ValueError,
     r"dkd_loss: reduction must be one of 'none', 'sum', 'batchmean'; got 'mean'"),
    (lambda s, t, y: kdcore.dkd_loss(s, t, labels=y, reduction="sum", normalizer=3.0), ValueError,
     r"dkd_loss: normalizer replaces the kept-row count"),
])
def test_bad_arguments_name_themselves(call, error, pattern):
    s, t, labels = torch.randn(6, V), torch.randn(6, V), torch.randint(0, V, (6,))
    with pytest.raises(error, match=pattern):
        call(s, t, labels)
