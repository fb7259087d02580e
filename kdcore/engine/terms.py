"""Loss terms that many methods share, normalized the engine's way (each micro-batch's share of
the full-batch mean; see :class:`kdcore.Method`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None, ctx, *, label_smoothing: float = 0.0,
                  method: str = "method") -> torch.Tensor:
    """Cross-entropy of ``labels`` under ``logits [..., V]``, skipping ``ctx.ignore_index``."""
    if labels is None:
        raise ValueError(f"{method}: the label term needs labels, and the dataset gives none")
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=ctx.ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return ctx.per_row(total)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ctx) -> torch.Tensor:
    """−Σ target · log softmax(logits) per row (``target`` rows are distributions), for
    classification rows (one per example)."""
    return ctx.per_row(-(target * logits.float().log_softmax(-1)).sum())


def mixture_logits(log_probs: list[torch.Tensor], weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher logits for :func:`kdcore.kd_loss` whose temperature-``temperature`` softmax is the
    mixture ``Σ_k weights[..., k] · exp(log_probs[k])``: ``temperature · log(mixture)``.
    ``weights`` is ``[K]`` or per row ``[..., K]``, summing to 1 over K."""
    stacked = torch.stack([lp.float() for lp in log_probs], dim=-1)  # [..., V, K]
    weights = weights.to(stacked).unsqueeze(-2) if weights.dim() > 1 else weights.to(stacked)
    return temperature * torch.logsumexp(stacked + weights.clamp_min(1e-30).log(), dim=-1)
