"""Aligning two tokenizations of the same text through character offsets.

A *cut point* of a tokenization is a character position where one token ends and no token
straddles it. Where both tokenizations have a cut point, their token sequences can be cut at the
same place in the text; the pieces between consecutive common cut points are the *spans*, the
smallest units both sides agree on. A span of one token on each side is a 1:1 position. Tokens of
zero width (special tokens such as BOS) belong to no span, and neither do tokens past the last
common cut point (one side truncated earlier) or inside the prompt.

Offsets come from the tokenizers' own encodings, so normalizers, a metaspace tokenizer's prepended
``▁`` (offsets overlapping the first word) and characters split into several byte tokens (which
share the character's offsets) are all handled without special cases.

Everything is laid out as the engine's language-modelling batches are: ``labels[i]`` is the token
after position ``i``, so the *span of a label* is the span of the token it names, and the row of
logits that predicts it is row ``i``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdcore.cross_tokenizer.vocabulary import backend

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Encoding:
    """One tokenization of a text: token ``ids`` and their character ``offsets`` into it (special
    tokens included, as the tokenizer's post-processor adds them)."""

    ids: list[int]
    offsets: list[tuple[int, int]]


def encode(tokenizer: Any, text: str, name: str = "tokenizer") -> Encoding:
    encoding = backend(tokenizer, name).encode(text)
    return Encoding(list(encoding.ids), [tuple(offset) for offset in encoding.offsets])


def cut_points(offsets: Offsets) -> list[int]:
    """The sorted positions after a token where the text can be cut: token ends that no token of
    this tokenization straddles (a byte token ending inside a character its neighbour also covers,
    a prepended ``▁`` overlapping the first word)."""
    tokens = sorted((start, end) for start, end in offsets if end > start)
    ends = sorted({end for _, end in tokens})
    blocked: list[tuple[int, int]] = []  # merged open intervals (start, end)
    for start, end in tokens:
        if blocked and start < blocked[-1][1]:
            blocked[-1] = (blocked[-1][0], max(blocked[-1][1], end))
        else:
            blocked.append((start, end))
    cuts, index = [], 0
    for point in ends:
        while index < len(blocked) and blocked[index][1] <= point:
            index += 1
        if not (index < len(blocked) and blocked[index][0] < point < blocked[index][1]):
            cuts.append(point)
    return cuts


def align_spans(student_offsets: Offsets, teacher_offsets: Offsets, *, start: int = 0, student_kept: int | None = None,
                teacher_kept: int | None = None) -> tuple[list[int], list[int], int]:
    """The span of each kept token of both sides (``-1``: compared nowhere) and the number of spans.

    Spans run between consecutive cut points common to both sides, from the first position both
    tokenizations start at. Only the first ``*_kept`` tokens of a side (all by default) are kept,
    as truncation leaves them; a span is compared only if every token of it on both sides is kept
    (truncation may stop between the byte tokens of one character). Spans that begin before
    ``start`` (a prompt of ``start`` characters) are not compared."""
    sides = []
    for offsets, kept in ((student_offsets, student_kept), (teacher_offsets, teacher_kept)):
        kept = len(offsets) if kept is None else min(kept, len(offsets))
        cuts = cut_points(offsets)
        # a cut is inside the kept part only if every token ending at or before it is kept
        dropped_end = min((e for s, e in offsets[kept:] if e > s), default=None)
        if dropped_end is not None:
            cuts = [c for c in cuts if c < dropped_end]
        first = min((s for s, e in offsets[:kept] if e > s), default=None)
        sides.append((offsets[:kept], set(cuts), first))
    (student_kept_offsets, student_cuts, student_first), (teacher_kept_offsets, teacher_cuts, teacher_first) = sides
    if student_first is None or student_first != teacher_first:
        return [-1] * len(student_kept_offsets), [-1] * len(teacher_kept_offsets), 0  # nothing both sides begin at
    boundaries = [student_first] + sorted(c for c in student_cuts & teacher_cuts if c > student_first)
    # spans (boundaries[k], boundaries[k+1]]; those beginning inside the prompt are dropped
    kept_spans = [k for k in range(len(boundaries) - 1) if boundaries[k] >= start]
    number = {k: i for i, k in enumerate(kept_spans)}

    def spans_of(offsets: Offsets) -> list[int]:
        out = []
        for s, e in offsets:
            k = bisect.bisect_left(boundaries, e) - 1  # boundaries[k] < e <= boundaries[k + 1]
            inside = e > s and 0 <= k < len(boundaries) - 1 and s >= boundaries[k]
            out.append(number.get(k, -1) if inside else -1)
        return out

    return spans_of(student_kept_offsets), spans_of(teacher_kept_offsets), len(kept_spans)


def covered_bytes(text: str, offsets: Offsets) -> list[int]:
    """The UTF-8 bytes of text each token adds to what the tokens before it cover: summed over the
    scored tokens this is the text they predict, the denominator of a per-byte perplexity that is
    comparable across tokenizers."""
    out, reached = [], 0
    for _, end in offsets:
        if end > reached:
            out.append(len(text[reached:end].encode()))
            reached = end
        else:
            out.append(0)
    return out


def lm_layout(encoding: Encoding, spans: list[int], nbytes: list[int], *, length: int, prompt_chars: int = 0,
              ignore_index: int = -100, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One side of an aligned example in the engine's language-modelling layout, ``length``
    positions (the tokens truncated to ``length + 1``): ``input_ids``, ``attention_mask``,
    ``labels`` (the next token; ``ignore_index`` on padding, on zero-width tokens and on tokens that
    end inside the prompt), ``label_bytes`` (the bytes of text each label adds) and ``spans`` (the
    span of each label, ``-1`` where it is compared nowhere)."""
    ids = encoding.ids[:length + 1]
    count = max(len(ids) - 1, 0)
    scored = [end > start and end > prompt_chars for start, end in encoding.offsets[1:count + 1]]
    pad = length - count

    def column(values: list[int], fill: int) -> torch.Tensor:
        return torch.tensor(values + [fill] * pad, dtype=torch.long)

    return {
        "input_ids": column(ids[:count], pad_id),
        "attention_mask": column([1] * count, 0),
        "labels": column([ids[i + 1] if scored[i] else ignore_index for i in range(count)], ignore_index),
        "label_bytes": column([nbytes[i + 1] if scored[i] else 0 for i in range(count)], 0),
        "spans": column([spans[i + 1] if scored[i] else -1 for i in range(count)], -1),
    }


def aligned_example(text: str, student_tokenizer: Any, teacher_tokenizer: Any, *, student_length: int,
                    teacher_length: int, prompt_chars: int = 0, ignore_index: int = -100) -> dict[str, Any]:
    """``text`` tokenized by both tokenizers and aligned: a dataset item the engine collates
    (``input_ids``, ``attention_mask``, ``labels``, ``label_bytes`` and ``spans`` of the student;
    the teacher's under ``"teacher_view"``). Runs in the data pipeline (a DataLoader's workers),
    not in the training step."""
    student = encode(student_tokenizer, text, "student_tokenizer")
    teacher = encode(teacher_tokenizer, text, "teacher_tokenizer")
    student_spans, teacher_spans, _ = align_spans(student.offsets, teacher.offsets, start=prompt_chars,
                                                  student_kept=student_length + 1, teacher_kept=teacher_length + 1)
    sides = {}
    for name, encoding, spans, length in (("student", student, student_spans, student_length),
                                          ("teacher", teacher, teacher_spans, teacher_length)):
        kept = Encoding(encoding.ids[:length + 1], encoding.offsets[:length + 1])
        sides[name] = lm_layout(kept, spans, covered_bytes(text, kept.offsets), length=length,
                                prompt_chars=prompt_chars, ignore_index=ignore_index)
    item = sides["student"]
    item["teacher_view"] = sides["teacher"]
    return item


def student_example(text: str, student_tokenizer: Any, *, student_length: int, prompt_chars: int = 0,
                    ignore_index: int = -100, **_teacher_options: Any) -> dict[str, Any]:
    """``text`` as :func:`aligned_example` lays out the student's side, for a student without a
    teacher (every ``spans`` entry is ``-1``)."""
    encoding = encode(student_tokenizer, text, "student_tokenizer")
    kept = Encoding(encoding.ids[:student_length + 1], encoding.offsets[:student_length + 1])
    return lm_layout(kept, [-1] * len(kept.ids), covered_bytes(text, kept.offsets), length=student_length,
                     prompt_chars=prompt_chars, ignore_index=ignore_index)
