"""Held-out metrics, accumulated as sums so that shards from several processes add up exactly.

Per scored row (an example, or a token whose label is not ``ignore_index``):

* ``accuracy`` (``token_accuracy`` for language modeling): argmax equals the label;
* ``nll``: cross-entropy of the label (``perplexity`` = exp(nll) for language modeling);
* ``ece``: expected calibration error of the top-1 confidence, over ``bins`` equal-width bins;
* ``teacher_agreement``: the student's argmax equals the teacher's;
* ``kl_to_teacher``: KL(teacher ‖ student) at temperature 1, in nats, averaged over rows;
* ``byte_perplexity`` (language modeling, when the data gives the bytes of text each label adds):
  exp(total nll / total bytes), the per-byte perplexity, which compares models whose tokenizers
  differ (a token-level perplexity does not).

The teacher's own accuracy, nll and ece come from the same class with the teacher's logits as the
prediction.

A teacher known only by its top-k entries (a :class:`kdcore.SparseTeacher`, as a teacher-logit
cache holds it) is measured on what those entries determine: ``teacher_agreement`` compares the
student's argmax with the teacher's top-1 entry (its argmax, whatever k is), and ``kl_to_teacher``
is the KL over k + 1 buckets, the teacher's k entries and one bucket for the rest of the
vocabulary on each side (the teacher's tail is 1 − Σ of its k probabilities, the student's is
computed exactly), at the temperature the log-probabilities were taken at. Merging the tail into
one bucket can only lower a KL, so this is a lower bound on the full KL, equal to it when k is the
vocabulary size; it is the divergence ``kd_loss(..., sparse_mode="tail")`` trains on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcore.functional import kd_loss
from kdcore.sparse import SparseTeacher

# positions in the packed sums; the calibration bins follow
_ROWS, _CORRECT, _NLL, _PAIRED, _AGREE, _KL, _BYTES = range(7)
_BINS = 7


class Meter:
    """Accumulates one model's predictions (and optionally a reference teacher's) over batches."""

    def __init__(self, *, task: str = "classification", ignore_index: int = -100, bins: int = 15) -> None:
        self.task, self.ignore_index, self.bins = task, ignore_index, bins
        self.sums = torch.zeros(_BINS + 2 * bins, dtype=torch.float64)  # + per bin: confidence, correct

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None,
               teacher_logits: torch.Tensor | SparseTeacher | None = None, label_bytes: torch.Tensor | None = None,
               teacher_temperature: float = 1.0) -> None:
        """Adds a batch: ``logits [..., V]``, ``labels [...]`` (or None), the teacher (logits
        ``[..., V]``, or a SparseTeacher ``[..., k]`` whose log-probabilities were taken at
        ``teacher_temperature``; or None), ``label_bytes [...]`` (the bytes of text each label
        adds, or None)."""
        rows = logits.detach().reshape(-1, logits.shape[-1]).float()
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        sums = torch.zeros_like(self.sums, device=rows.device)
        if labels is not None:
            labels = labels.reshape(-1).to(rows.device)
            if labels.shape[0] != rows.shape[0]:
                raise ValueError(f"metrics: labels have {labels.shape[0]} rows but the logits have {rows.shape[0]}")
            keep = labels != self.ignore_index
            rows, labels = rows[keep], labels[keep]
            log_probs = rows.log_softmax(-1)
            top_log_prob, prediction = log_probs.max(-1)
            confidence = top_log_prob.exp()
            correct = (prediction == labels).double()
            sums[_ROWS] = rows.shape[0]
            sums[_CORRECT] = correct.sum()
            sums[_NLL] = F.nll_loss(log_probs, labels, reduction="sum").double()
            bin_index = (confidence * self.bins).long().clamp_(max=self.bins - 1)
            sums[_BINS:_BINS + self.bins] = torch.bincount(bin_index, confidence.double(), minlength=self.bins)
            sums[_BINS + self.bins:] = torch.bincount(bin_index, correct, minlength=self.bins)
            if label_bytes is not None:
                sums[_BYTES] = label_bytes.reshape(-1).to(rows.device)[keep].double().sum()
        if isinstance(teacher_logits, SparseTeacher):
            k = teacher_logits.indices.shape[-1]
            indices = teacher_logits.indices.reshape(-1, k).to(rows.device)[keep]
            logprobs = teacher_logits.logprobs.reshape(-1, k).to(rows.device)[keep]
            top = indices.gather(1, logprobs.argmax(-1, keepdim=True)).squeeze(1)
            sums[_PAIRED] = rows.shape[0]
            sums[_AGREE] = (rows.argmax(-1) == top).sum()
            if rows.shape[0]:
                sums[_KL] = kd_loss(rows, SparseTeacher(indices, logprobs), sparse_mode="tail",
                                    temperature=teacher_temperature, t2_scale=False, reduction="sum").double()
        elif teacher_logits is not None:
            teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).float()[keep]
            sums[_PAIRED] = rows.shape[0]
            sums[_AGREE] = (rows.argmax(-1) == teacher.argmax(-1)).sum()
            if rows.shape[0]:
                sums[_KL] = kd_loss(rows, teacher, divergence="forward_kl", reduction="sum").double()
        self.sums += sums.cpu()

    def compute(self) -> dict[str, float]:
        """The metrics of everything added so far (a key is absent when nothing fed it)."""
        s = self.sums
        out: dict[str, float] = {}
        if s[_ROWS] > 0:
            n = float(s[_ROWS])
            nll = float(s[_NLL]) / n
            if self.task == "language_modeling":
                out["token_accuracy"] = float(s[_CORRECT]) / n
                out["perplexity"] = math.exp(min(nll, 700.0))
            else:
                out["accuracy"] = float(s[_CORRECT]) / n
            out["nll"] = nll
            # sum over bins of |Σ confidence − Σ correct| / n  =  Σ_b (n_b / n) · |conf_b − acc_b|
            out["ece"] = float((s[_BINS:_BINS + self.bins] - s[_BINS + self.bins:]).abs().sum()) / n
            if self.task == "language_modeling" and s[_BYTES] > 0:
                out["byte_perplexity"] = math.exp(min(float(s[_NLL]) / float(s[_BYTES]), 700.0))
        if s[_PAIRED] > 0:
            out["teacher_agreement"] = float(s[_AGREE]) / float(s[_PAIRED])
            out["kl_to_teacher"] = float(s[_KL]) / float(s[_PAIRED])
        return out
