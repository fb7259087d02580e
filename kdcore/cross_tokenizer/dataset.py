"""Texts served to a student and a teacher that tokenize them differently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from kdcore.cross_tokenizer.alignment import aligned_example, student_example


class AlignedTexts(Dataset):
    """Each text tokenized by both tokenizers and aligned when it is fetched (so in a DataLoader's
    worker processes with ``data.num_workers > 0``, never in the training step). Items are
    :func:`kdcore.cross_tokenizer.aligned_example`'s: the student's ``input_ids``,
    ``attention_mask``, ``labels``, ``label_bytes`` and ``spans``, and the teacher's under
    ``teacher_view``, padded to ``student_length`` / ``teacher_length`` positions. The first
    ``prompt_chars`` characters of every text are a prompt: nothing in them is scored. Without a
    ``teacher_tokenizer`` (a student trained alone) items have no teacher view."""

    def __init__(self, texts: Sequence[str], student_tokenizer: Any, teacher_tokenizer: Any | None, *, student_length: int,
                 teacher_length: int, prompt_chars: int = 0, ignore_index: int = -100) -> None:
        for name, value in (("student_length", student_length), ("teacher_length", teacher_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AlignedTexts: {name} must be a positive int, got {value!r}")
        self.texts = list(texts)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.options = dict(student_length=student_length, teacher_length=teacher_length, prompt_chars=prompt_chars,
                            ignore_index=ignore_index)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.teacher_tokenizer is None:
            return student_example(self.texts[index], self.student_tokenizer, **self.options)
        return aligned_example(self.texts[index], self.student_tokenizer, self.teacher_tokenizer, **self.options)
