"""``KDLoss``: kd_loss as an ``nn.Module`` that holds its options."""

from __future__ import annotations

import torch
from torch import nn

from kdcore import _checks
from kdcore.functional import kd_loss, loss_options


class KDLoss(nn.Module):
    """Holds the options of :func:`kdcore.kd_loss`; ``forward(student_logits, teacher_logits,
    labels=None, mask=None, normalizer=None)`` computes it. Options are validated here, at
    construction, so a bad config fails before training starts."""

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        *,
        beta: float = 0.5,
        alpha: float = 0.1,
        t2_scale: bool = True,
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        reduction: str = "batchmean",
        vocab_size: int | None = None,
        inplace_grad: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        loss_options("KDLoss", divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                     t2_scale=t2_scale, kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                     reduction=reduction)
        _checks.boolean("KDLoss", "inplace_grad", inplace_grad)
        self.options = dict(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                            t2_scale=t2_scale, ignore_index=ignore_index, ce_weight=ce_weight,
                            kd_weight=kd_weight, reduction=reduction, vocab_size=vocab_size, inplace_grad=inplace_grad,
                            backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None, mask=None,
                normalizer=None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, mask=mask, normalizer=normalizer,
                       **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
