"""A straightforward float64 implementation of the cross-tokenizer losses, one span at a time,
written from the definitions in kdcore.cross_tokenizer.losses' docstring, to test the batched
implementation against."""

from __future__ import annotations

import torch


def divergence(p: torch.Tensor, q: torch.Tensor, name: str, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """D(p, q) of two probability vectors (teacher p, student q), 0 · log 0 = 0."""
    def kl(a, b):
        terms = torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a))
        return terms.sum()

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise ValueError(name)


def merged(logits, labels, positions, temperature):
    """log P(span starts with y, then goes on as the text does), for every y."""
    base = torch.log_softmax(logits[positions[0]] / temperature, -1)
    more = sum((torch.log_softmax(logits[i] / temperature, -1)[labels[i]] for i in positions[1:]),
               torch.zeros((), dtype=logits.dtype))
    return base + more


def sorted_l1(q, p, top_k):
    width = max(len(q), len(p)) if top_k is None else min(max(len(q), len(p)), top_k)

    def largest(x):
        x = torch.sort(x, descending=True).values[:width]
        return torch.cat([x, x.new_zeros(width - len(x))])

    return (largest(q) - largest(p)).abs().sum()


def reference_loss(student_logits, teacher_logits, student_labels, teacher_labels, student_spans, teacher_spans, *,
                   pairs=None, loss="hybrid", divergence_name="forward_kl", temperature=1.0, beta=0.5, alpha=0.1,
                   t2_scale=True, uld_top_k=None, shared_weight=1.0, uld_weight=1.0, spans="all", reduction="mean"):
    """``pairs``: list of (student id, teacher id) shared tokens; a student id may appear with
    several teacher ids (their probabilities add)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in range(student_logits.shape[0]):
        s_spans, t_spans = student_spans[b].tolist(), teacher_spans[b].tolist()
        for k in sorted((set(s_spans) & set(t_spans)) - {-1}):
            s_pos = [i for i, v in enumerate(s_spans) if v == k]
            t_pos = [i for i, v in enumerate(t_spans) if v == k]
            if spans == "one_to_one" and (len(s_pos) > 1 or len(t_pos) > 1):
                continue
            q = merged(student_logits[b], student_labels[b], s_pos, temperature).exp()
            p = merged(teacher_logits[b], teacher_labels[b], t_pos, temperature).exp()
            count += 1
            if loss in ("shared_vocab", "hybrid"):
                s_ids = sorted({s for s, _ in pairs})  # several teacher tokens may count under one student token
                q_shared = q[torch.tensor(s_ids, dtype=torch.long)]
                p_shared = torch.stack([sum((p[t] for s2, t in pairs if s2 == s), torch.zeros((), dtype=p.dtype))
                                        for s in s_ids])
                q_rows = torch.cat([q_shared, (1 - q_shared.sum()).clamp_min(0)[None]])
                p_rows = torch.cat([p_shared, (1 - p_shared.sum()).clamp_min(0)[None]])
                weight = shared_weight if loss == "hybrid" else 1.0
                scale = temperature ** 2 if t2_scale else 1.0
                total = total + weight * scale * divergence(p_rows, q_rows, divergence_name, beta, alpha)
            if loss in ("uld", "hybrid"):
                if loss == "hybrid":
                    q_mask = torch.ones_like(q, dtype=torch.bool)
                    q_mask[torch.tensor([s for s, _ in pairs], dtype=torch.long)] = False
                    p_mask = torch.ones_like(p, dtype=torch.bool)
                    p_mask[torch.tensor([t for _, t in pairs], dtype=torch.long)] = False
                    q, p = q[q_mask], p[p_mask]
                weight = uld_weight if loss == "hybrid" else 1.0
                total = total + weight * sorted_l1(q, p, uld_top_k)
    return total / max(count, 1) if reduction == "mean" else total
