"""The student's token sequences as the teacher reads them, for text that exists only as student
tokens: the student's own samples in on-policy training, or a Hugging Face batch tokenized for the
student alone. Each sequence's text is rebuilt from the bytes its tokens stand for, tokenized by
the teacher's tokenizer, and aligned (this runs in the training step, unlike a dataset's
alignment, because the text did not exist before the step).
"""

from __future__ import annotations

import codecs
from typing import Any

import torch

from kdcore.cross_tokenizer.alignment import Encoding, align_spans, covered_bytes, encode, lm_layout
from kdcore.cross_tokenizer.vocabulary import strips_leading_space, token_texts
from kdcore.engine.data import Batch


class Retokenizer:
    """Turns student-token batches (the engine's layout: ``labels[:, i]`` is the token after
    position ``i``) into batches that also carry the teacher's view and the alignment. Positions
    before a row's first label are its prompt: spans starting there are not compared."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, *, ignore_index: int = -100,
                 teacher_length: int | None = None) -> None:
        self.texts = [b"" if text is None else text for text in token_texts(student_tokenizer, "student_tokenizer")]
        self.strip_first_space = strips_leading_space(student_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.ignore_index = ignore_index
        self.teacher_length = teacher_length

    def __call__(self, batch: Batch) -> Batch:
        input_ids = batch.inputs["input_ids"].cpu()
        labels = batch.labels.cpu()
        mask = batch.inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.cpu()
        rows = [self._row(input_ids[r], labels[r], int(mask[r].sum())) for r in range(len(input_ids))]
        width = max(1, max(len(teacher.ids) - 1 for teacher, *_ in rows))
        if self.teacher_length is not None:
            width = min(width, self.teacher_length)
        student_spans = torch.full_like(labels, -1)
        label_bytes = torch.zeros_like(labels)
        views = []
        for r, (teacher, student_spans_r, teacher_spans_r, text, student_offsets, prompt_chars) in enumerate(rows):
            # the student's labels stay as generated; its spans and bytes follow the rebuilt text
            student_bytes = covered_bytes(text, student_offsets)
            for i in range(min(len(student_offsets) - 1, labels.shape[1])):
                if labels[r, i] != self.ignore_index:
                    student_spans[r, i] = student_spans_r[i + 1]
                    label_bytes[r, i] = student_bytes[i + 1]
            views.append(lm_layout(teacher, teacher_spans_r, covered_bytes(text, teacher.offsets), length=width,
                                   prompt_chars=prompt_chars, ignore_index=self.ignore_index))
        stacked = {key: torch.stack([view[key] for view in views]) for key in views[0]}
        device = batch.labels.device
        teacher_view = Batch({"input_ids": stacked["input_ids"], "attention_mask": stacked["attention_mask"]},
                             stacked["labels"], label_bytes=stacked["label_bytes"], spans=stacked["spans"]).to(device)
        return Batch(batch.inputs, batch.labels, teacher_view=teacher_view, label_bytes=label_bytes.to(device),
                     spans=student_spans.to(device))

    def _row(self, input_ids: torch.Tensor, labels: torch.Tensor, length: int):
        tokens = input_ids[:length].tolist()
        labelled = (labels[:length] != self.ignore_index).nonzero()
        if len(labelled) and int(labelled[-1]) == length - 1:
            tokens.append(int(labels[length - 1]))  # the last token is only a label
        pieces = [self.texts[t] if 0 <= t < len(self.texts) else b"" for t in tokens]
        first = next((i for i, piece in enumerate(pieces) if piece), None)
        stripped = self.strip_first_space and first is not None and pieces[first].startswith(b" ")
        if stripped:
            pieces[first] = pieces[first][1:]  # the space the tokenizer put before the text
        text, offsets = decode_pieces(pieces)
        if stripped and not pieces[first] and offsets[first][0] < len(text):
            # a lone prepended "▁": it belongs to the first word, as the tokenizer's own offsets have it
            offsets[first] = (offsets[first][0], offsets[first][0] + 1)
        first_label = int(labelled[0]) + 1 if len(labelled) else len(tokens)
        prompt_chars = offsets[first_label][0] if first_label < len(offsets) else len(text)
        teacher = encode(self.teacher_tokenizer, text, "teacher_tokenizer")
        kept = None if self.teacher_length is None else self.teacher_length + 1
        student_spans, teacher_spans, _ = align_spans(offsets, teacher.offsets, start=prompt_chars, teacher_kept=kept)
        if kept is not None:
            teacher = Encoding(teacher.ids[:kept], teacher.offsets[:kept])
        return teacher, student_spans, teacher_spans, text, offsets, prompt_chars


def decode_pieces(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """The text the byte ``pieces`` make (invalid UTF-8 becomes U+FFFD) and each piece's character
    offsets in it: a piece covers every character one of its bytes belongs to, so the byte tokens
    of one character all carry that character's offsets (as tokenizers' own encodings do)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    owner: list[int] = []  # the character each byte belongs to
    pending: list[int] = []
    chars: list[str] = []
    data = b"".join(pieces)
    for index in range(len(data) + 1):
        out = decoder.decode(data[index:index + 1], final=index == len(data))
        if index < len(data):
            pending.append(index)
        if out:
            # the pending bytes made these characters: the last byte completes the last one
            for byte in pending[:-1]:
                owner.append(len(chars))
            if pending:
                owner.append(len(chars) + len(out) - 1)
            chars.extend(out)
            pending = []
    offsets, position = [], 0
    for piece in pieces:
        if not piece:
            start = owner[position] if position < len(owner) else len(chars)
            offsets.append((start, start))
            continue
        offsets.append((owner[position], owner[position + len(piece) - 1] + 1))
        position += len(piece)
    return "".join(chars), offsets
