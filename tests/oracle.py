"""An independent statement of the loss, written from the formulas (docs/math.md) with torch
autograd for the gradients. It shares no code with kdcore.

``oracle_loss(..., compute_dtype=torch.float64)`` is the ground truth; with a lower compute dtype
it is "PyTorch's own computation at that precision", whose error against float64 sets the
tolerance for the kernels (they must be within 2x of it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _where_positive(x, value):
    """value where x > 0, else 0 -- with the second `where` so no NaN reaches the gradient."""
    return torch.where(x > 0, value, torch.zeros_like(value))


def _safe_log(x):
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)))


def _kl(p, log_p, log_r):
    """sum p (log p - log r), 0 where p = 0 (both logs zeroed there, so 0 * inf never forms)."""
    return (p * (_where_positive(p, log_p) - _where_positive(p, log_r))).sum(-1)


def divergence_rows(divergence, s, t, temperature, beta, alpha):
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    return divergence_of(divergence, log_q.exp(), log_p.exp(), log_q, log_p, beta, alpha)


def free_derivatives(divergence, q, p, beta, alpha):
    """(dd/dq, dd/dp) of each row's divergence with the probabilities q and p as free variables
    (float64; 0 where the probability is 0)."""
    q = q.detach().double().requires_grad_(True)
    p = p.detach().double().requires_grad_(True)
    rows = divergence_of(divergence, q, p, _safe_log(q), _safe_log(p), beta, alpha)
    gq, gp = torch.autograd.grad(rows.sum(), (q, p), allow_unused=True)
    zeros = torch.zeros_like(q)
    return tuple(torch.where(x > 0, g, zeros).nan_to_num() if g is not None else zeros for x, g in ((q, gq), (p, gp)))


def divergence_of(divergence, q, p, log_q, log_p, beta, alpha):
    """Each row's divergence from its probabilities and their logs."""
    if divergence == "forward_kl":
        return _kl(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(q, log_q, log_p)
    if divergence == "jsd":
        log_m = _safe_log(beta * p + (1 - beta) * q)
        return beta * _kl(p, log_p, log_m) + (1 - beta) * _kl(q, log_q, log_m)
    if divergence == "skew_kl":
        return _kl(p, log_p, _safe_log(alpha * p + (1 - alpha) * q))
    if divergence == "skew_rkl":
        return _kl(q, log_q, _safe_log(alpha * q + (1 - alpha) * p))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)


def oracle_loss(student, teacher, *, divergence="forward_kl", temperature=1.0, beta=0.5, alpha=0.1,
                t2_scale=True, labels=None, ignore_index=-100, mask=None, ce_weight=0.0, kd_weight=1.0,
                reduction="batchmean", normalizer=None, vocab_size=None, compute_dtype=torch.float64):
    """The loss for logits [..., V], computed in compute_dtype; differentiable w.r.t. both inputs."""
    leading = student.shape[:-1]
    v = vocab_size or student.shape[-1]
    s = student.to(compute_dtype).reshape(-1, student.shape[-1])[:, :v]
    t = teacher.to(compute_dtype).reshape(-1, teacher.shape[-1])[:, :v]
    rows = divergence_rows(divergence, s, t, temperature, beta, alpha)
    return _reduce(rows, s, labels, mask, ignore_index, ce_weight, kd_weight, temperature, t2_scale, reduction,
                   normalizer, leading)


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's generalized_jsd_loss (GKD) for 0 < beta < 1, reduction='batchmean' over tokens,
    as TRL writes it: the mixture in log space via logsumexp, then F.kl_div twice."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / math.prod(jsd.shape[:-1])


def oracle_with_grads(student, teacher, compute_dtype=torch.float64, **options):
    """(loss, d loss/d student, d loss/d teacher), differentiating sum(loss) in compute_dtype."""
    s = student.detach().to(compute_dtype).requires_grad_(True)
    t = teacher.detach().to(compute_dtype).requires_grad_(True)
    loss = oracle_loss(s, t, compute_dtype=compute_dtype, **options)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t), allow_unused=True)
    return loss.detach(), grad_s, grad_t


def sparse_oracle_loss(student, indices, logprobs, *, sparse_mode="tail", divergence="forward_kl", temperature=1.0,
                       beta=0.5, alpha=0.1, t2_scale=True, labels=None, ignore_index=-100, mask=None, ce_weight=0.0,
                       kd_weight=1.0, reduction="batchmean", normalizer=None, vocab_size=None,
                       compute_dtype=torch.float64):
    """The loss against a top-k teacher (docs/math.md, "Sparse teachers"), written from the bucket
    definition: a row's entries are its slots whose log-probability is not -inf (the index of any
    other slot is never read); the entries (+ the rest of the vocabulary as one bucket in tail mode)
    on both sides, then the dense formulas of ``divergence_rows`` over the buckets."""
    leading = student.shape[:-1]
    v = vocab_size or student.shape[-1]
    k = indices.shape[-1]
    s = student.to(compute_dtype).reshape(-1, student.shape[-1])[:, :v]
    lp = logprobs.to(compute_dtype).reshape(-1, k)
    entry = lp > -torch.inf
    idx = torch.where(entry, indices.reshape(-1, k).long(), torch.zeros((), dtype=torch.long))
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_q_k = log_q.gather(1, idx).masked_fill(~entry, -torch.inf)
    none = torch.full_like(lp[:, :1], -torch.inf)
    whole_vocab = entry.sum(-1) == v  # entries that cover the vocabulary leave no tail: renormalize
    renorm = whole_vocab | (sparse_mode == "renorm")
    # renormalizing needs probability among the entries on both sides (kd_loss raises otherwise;
    # NaN here); rows not renormalized get a dummy finite row, so no NaN reaches the gradient
    # through the branch not taken
    defined = ~renorm | (entry.any(-1) & (log_q_k > -torch.inf).any(-1))
    use_r = (renorm & defined).unsqueeze(1)
    q_r = torch.where(use_r, log_q_k, torch.zeros_like(log_q_k))
    p_r = torch.where(use_r, lp, torch.zeros_like(lp))
    log_q_b = torch.cat([q_r - q_r.logsumexp(-1, keepdim=True), none], dim=1)
    log_p_b = torch.cat([p_r - p_r.logsumexp(-1, keepdim=True), none], dim=1)
    if sparse_mode == "tail":
        member = torch.zeros_like(s).scatter_add(1, idx, entry.to(s.dtype)) > 0
        has_tail = ~(member | (log_q == -torch.inf)).all(-1)
        outside = torch.where(has_tail.unsqueeze(1), log_q.masked_fill(member, -torch.inf), torch.zeros_like(s))
        log_q_tail = torch.where(has_tail, outside.logsumexp(-1), torch.full_like(has_tail, -torch.inf, dtype=s.dtype))
        p_tail = (1 - lp.exp().sum(-1)).clamp_min(0)
        tail_q_b = torch.cat([log_q_k, log_q_tail.unsqueeze(1)], dim=1)
        tail_p_b = torch.cat([lp, _safe_log(p_tail).masked_fill(p_tail == 0, -torch.inf).unsqueeze(1)], dim=1)
        log_q_b = torch.where(renorm.unsqueeze(1), log_q_b, tail_q_b)
        log_p_b = torch.where(renorm.unsqueeze(1), log_p_b, tail_p_b)
    rows = divergence_rows(divergence, log_q_b, log_p_b, 1.0, beta, alpha)
    rows = torch.where(defined, rows, torch.full_like(rows, torch.nan))
    return _reduce(rows, s, labels, mask, ignore_index, ce_weight, kd_weight, temperature, t2_scale, reduction,
                   normalizer, leading)


def _reduce(rows, s, labels, mask, ignore_index, ce_weight, kd_weight, temperature, t2_scale, reduction, normalizer,
            leading):
    n = s.shape[0]
    kept = torch.ones(n, dtype=torch.bool, device=s.device)
    if labels is not None:
        labels = labels.reshape(-1)
        kept &= labels != ignore_index
    if mask is not None:
        kept &= mask.reshape(-1)
    rows = kd_weight * (temperature**2 if t2_scale else 1.0) * rows
    if ce_weight:
        safe_labels = torch.where(kept, labels, torch.zeros_like(labels))
        rows = rows + ce_weight * F.cross_entropy(s, safe_labels, reduction="none")
    rows = torch.where(kept, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(leading)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (normalizer if normalizer is not None else max(int(kept.sum()), 1))


def sparse_oracle_with_grads(student, indices, logprobs, compute_dtype=torch.float64, **options):
    """(loss, d loss/d student) of :func:`sparse_oracle_loss`, differentiating sum(loss)."""
    s = student.detach().to(compute_dtype).requires_grad_(True)
    loss = sparse_oracle_loss(s, indices, logprobs, compute_dtype=compute_dtype, **options)
    (grad,) = torch.autograd.grad(loss.sum(), (s,))
    return loss.detach(), grad
