"""Teachers given as their top-k entries rather than full logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcore import _checks

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8)


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher's top-k distribution per row: ``indices [..., k]`` (vocabulary ids; any integer
    dtype) and ``logprobs [..., k]`` (their log-probabilities at the teacher's temperature, e.g.
    ``log_softmax(teacher_logits / T).topk(k)``; float32/bf16/fp16/float64). Pass it to
    :func:`kdcore.kd_loss` in place of teacher logits; the leading dimensions match the student
    logits'. A teacher-logit cache (:mod:`kdcore.cache`) yields these.

    A slot whose log-probability is ``-inf`` is unused (a row that kept fewer than k entries, a
    padded position). It is dropped on both sides: the teacher has no entry there, and the
    student's probability at its index belongs to the tail like that of any column outside the
    row's entries. Its index is never read, so it may be any integer (a repeat of another slot's,
    negative, beyond the vocabulary). The row's other slots are its *entries*: their indices must
    lie in [0, V) and be distinct. A row without entries (every slot ``-inf``) is a teacher whose
    whole mass is the tail: with ``sparse_mode="tail"`` its divergence and the divergence's
    gradient are 0, and ``"renorm"`` raises for it unless the row is ignored."""

    indices: torch.Tensor
    logprobs: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTeacher:
        """The same teacher on ``device``."""
        return SparseTeacher(self.indices.to(device, non_blocking=non_blocking),
                             self.logprobs.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SparseTeacher:
        return SparseTeacher(self.indices.pin_memory(), self.logprobs.pin_memory())

    def rows(self, fn: str, leading: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Validates the pair against the student's leading shape and device; returns both as
        ``[N, k]`` rows (indices as int64)."""
        indices = _checks.tensor(fn, "teacher.indices", self.indices)
        logprobs = _checks.tensor(fn, "teacher.logprobs", self.logprobs)
        if indices.dtype not in INDEX_DTYPES:
            raise TypeError(f"{fn}: teacher.indices must be an integer tensor, got {indices.dtype}")
        if logprobs.dtype not in _checks.LOGIT_DTYPES:
            raise TypeError(f"{fn}: teacher.logprobs must be float32, bfloat16, float16 or float64, got "
                            f"{logprobs.dtype}")
        if indices.shape != logprobs.shape:
            raise ValueError(f"{fn}: teacher.indices {tuple(indices.shape)} and teacher.logprobs "
                             f"{tuple(logprobs.shape)} must have the same shape")
        if indices.dim() < 1 or indices.shape[:-1] != leading:
            raise ValueError(f"{fn}: the sparse teacher's shape {tuple(indices.shape)} must be the student logits' "
                             f"leading dimensions {tuple(leading)} plus k")
        if indices.shape[-1] < 1:
            raise ValueError(f"{fn}: the sparse teacher has k = 0 entries per row")
        _checks.same_device(fn, "student_logits", torch.empty(0, device=device),
                            **{"teacher.indices": indices, "teacher.logprobs": logprobs})
        if logprobs.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: teacher.logprobs requires grad, but a sparse teacher receives no gradient; "
                             "detach it")
        k = indices.shape[-1]
        return indices.reshape(-1, k).long(), logprobs.reshape(-1, k)
