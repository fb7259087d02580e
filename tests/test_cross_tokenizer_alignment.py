"""Aligning two tokenizations: cut points, spans, the shared vocabulary and the token texts, the
aligned dataset layout, and re-tokenizing student tokens for the teacher, on the tokenizers that
ship with kdcore (byte-level BPE against a metaspace unigram) and on hand-built ones."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models  # noqa: E402

from kdcore.cross_tokenizer import (  # noqa: E402
    align_spans,
    aligned_example,
    cut_points,
    encode,
    load_tokenizer,
    shared_vocabulary,
    token_texts,
)
from kdcore.cross_tokenizer.retokenize import Retokenizer, decode_pieces  # noqa: E402
from kdcore.engine.data import Batch, Collate  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak,   speak.\t"
        "Café naïve — 日本語 👍 end")


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("shakespeare-bpe-1024")


@pytest.fixture(scope="module")
def unigram():
    return load_tokenizer("shakespeare-unigram-512")


def span_ranges(offsets, spans):
    """span -> (first character, last character + 1) its tokens cover, and their count."""
    out = {}
    for (start, end), span in zip(offsets, spans):
        if span >= 0:
            low, high, count = out.get(span, (start, end, 0))
            out[span] = (min(low, start), max(high, end), count + 1)
    return out


def check_alignment(text, a_offsets, b_offsets, a_spans, b_spans, count, start=0):
    """Both sides cover the same characters with each span, spans are disjoint, in text order and
    numbered 0..count-1, and every character from the first to the last compared one is covered."""
    a, b = span_ranges(a_offsets, a_spans), span_ranges(b_offsets, b_spans)
    assert sorted(a) == sorted(b) == list(range(count))
    previous_end = None
    for span in range(count):
        assert a[span][:2] == b[span][:2], (span, text[a[span][0]:a[span][1]], text[b[span][0]:b[span][1]])
        low, high = a[span][:2]
        assert low >= start
        if previous_end is not None:
            assert low == previous_end  # contiguous
        previous_end = high


def test_cut_points_skip_straddled_positions():
    assert cut_points([(0, 0), (0, 5), (5, 13)]) == [5, 13]
    # a prepended metaspace token overlapping the first word: position 1 is not a cut
    assert cut_points([(0, 1), (0, 5), (5, 6)]) == [5, 6]
    # the byte tokens of one character share its offsets: one cut after the character
    assert cut_points([(3, 4), (3, 4), (4, 5)]) == [4, 5]


def test_spans_of_the_shipped_tokenizers_cover_the_same_text(bpe, unigram):
    a, b = encode(unigram, TEXT), encode(bpe, TEXT)
    a_spans, b_spans, count = align_spans(a.offsets, b.offsets)
    check_alignment(TEXT, a.offsets, b.offsets, a_spans, b_spans, count)
    assert a_spans[0] == -1 and b_spans[0] == -1  # the BOS tokens stand for no text
    sizes = [(a_spans.count(k), b_spans.count(k)) for k in range(count)]
    assert (1, 1) in sizes  # 1:1 positions
    assert any(x > 1 for x, _ in sizes) and any(y > 1 for _, y in sizes)  # merged spans, both ways
    # every character of the text is in a span: the two tokenizations start and end together
    ranges = span_ranges(a.offsets, a_spans)
    assert ranges[0][0] == 0 and ranges[count - 1][1] == len(TEXT)


def test_unicode_split_into_byte_tokens_is_one_span(bpe, unigram):
    text = "ab 日 cd"
    a, b = encode(unigram, text), encode(bpe, text)
    a_spans, b_spans, count = align_spans(a.offsets, b.offsets)
    check_alignment(text, a.offsets, b.offsets, a_spans, b_spans, count)
    char = text.index("日")
    byte_tokens = [i for i, (s, e) in enumerate(b.offsets) if (s, e) == (char, char + 1)]
    assert len(byte_tokens) == 3  # byte-level BPE spells the character in three byte tokens
    assert len({b_spans[i] for i in byte_tokens}) == 1


def test_truncation_between_the_byte_tokens_of_a_character(bpe, unigram):
    text = "ab 日 cd"
    a, b = encode(unigram, text), encode(bpe, text)
    first_byte = next(i for i, (s, e) in enumerate(b.offsets) if s == text.index("日"))
    kept = first_byte + 2  # stops after the second of the three byte tokens
    a_spans, b_spans, count = align_spans(a.offsets, b.offsets, teacher_kept=kept)
    assert len(b_spans) == kept
    check_alignment(text, a.offsets, b.offsets[:kept], a_spans, b_spans, count)
    ranges = span_ranges(b.offsets[:kept], b_spans)
    assert max(high for _, high, _ in ranges.values()) <= text.index("日")  # the split character is not compared


def test_truncation_at_different_lengths_keeps_the_common_prefix(bpe, unigram):
    a, b = encode(unigram, TEXT), encode(bpe, TEXT)
    a_spans, b_spans, count = align_spans(a.offsets, b.offsets, student_kept=12, teacher_kept=30)
    check_alignment(TEXT, a.offsets[:12], b.offsets[:30], a_spans, b_spans, count)
    covered = max(high for _, high, _ in span_ranges(a.offsets[:12], a_spans).values())
    assert covered <= a.offsets[11][1]


def test_prompt_spans_are_not_compared(bpe, unigram):
    prompt = TEXT.index("Before")
    a, b = encode(unigram, TEXT), encode(bpe, TEXT)
    a_spans, b_spans, count = align_spans(a.offsets, b.offsets, start=prompt)
    check_alignment(TEXT, a.offsets, b.offsets, a_spans, b_spans, count, start=prompt)
    assert count > 0


def test_sides_that_begin_at_different_places_align_nothing():
    assert align_spans([(0, 3), (3, 5)], [(1, 3), (3, 5)]) == ([-1, -1], [-1, -1], 0)


def test_aligned_example_layout(bpe, unigram):
    item = aligned_example(TEXT, unigram, bpe, student_length=40, teacher_length=200, prompt_chars=5)
    for side in (item, item["teacher_view"]):
        labels, spans, nbytes = side["labels"], side["spans"], side["label_bytes"]
        ids, mask = side["input_ids"], side["attention_mask"]
        count = int(mask.sum())
        assert torch.equal(labels[:count - 1][labels[:count - 1] != -100],
                           ids[1:count][labels[:count - 1] != -100])  # labels are the next tokens
        assert (spans[labels == -100] == -1).all()  # compared labels are labelled
        assert (nbytes[labels == -100] == 0).all()
    teacher = item["teacher_view"]
    assert int(teacher["attention_mask"].sum()) < 200  # padded
    assert (teacher["labels"][int(teacher["attention_mask"].sum()):] == -100).all()
    # the teacher's bytes cover the whole text after the prompt (it is not truncated); the student's less
    assert int(teacher["label_bytes"].sum()) == len(TEXT[5:].encode()) + _straddle(bpe, TEXT, 5)
    assert int(item["label_bytes"].sum()) < int(teacher["label_bytes"].sum())
    compared = set(item["spans"].tolist()) & set(teacher["spans"].tolist()) - {-1}
    assert compared and compared == set(item["spans"].tolist()) - {-1}


def _straddle(tokenizer, text, prompt):
    """Bytes before ``prompt`` that a token ending after it also covers (it is labelled whole)."""
    encoding = encode(tokenizer, text)
    first = next((start for start, end in encoding.offsets if end > prompt and end > start), prompt)
    return len(text[first:prompt].encode()) if first < prompt else 0


def test_aligned_items_collate_into_batches_with_a_teacher_view(bpe, unigram):
    items = [aligned_example(text, unigram, bpe, student_length=32, teacher_length=24) for text in
             (TEXT, TEXT[10:], TEXT[:20])]
    batch = Collate(items)(items)
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert batch.teacher_view.inputs["input_ids"].shape == (3, 24)
    assert batch.spans.shape == batch.labels.shape == (3, 32)
    assert batch.teacher_view.spans.shape == (3, 24)
    assert batch.seen_by("teacher0") is batch.teacher_view and batch.seen_by("student") is batch


def test_token_texts_undo_each_family_s_conventions(bpe, unigram):
    bpe_texts, unigram_texts = token_texts(bpe), token_texts(unigram)
    assert bpe_texts[bpe.token_to_id("Ġthe")] == b" the"
    assert unigram_texts[unigram.token_to_id("▁the")] == b" the"
    assert bpe_texts[bpe.token_to_id("<|endoftext|>")] is None and unigram_texts[unigram.token_to_id("<s>")] is None
    vocab = {"<0xC3>": 0, "<0xA9>": 1, "▁caf": 2, "##ing": 3}
    fallback = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    fallback.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert token_texts(fallback)[:3] == [b"\xc3", b"\xa9", b" caf"]
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "play": 1, "##ing": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    assert token_texts(wordpiece)[1:] == [b"play", b"ing"]


def test_shared_vocabulary_pairs_tokens_of_equal_text(bpe, unigram):
    shared = shared_vocabulary(unigram, bpe)
    u_texts, b_texts = token_texts(unigram), token_texts(bpe)
    pairs = list(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert len(pairs) > 200
    assert all(u_texts[s] == b_texts[t] for s, t in pairs)
    assert (unigram.token_to_id("▁the"), bpe.token_to_id("Ġthe")) in pairs
    assert len(set(shared.student_ids.tolist())) == len(pairs) == len(set(shared.teacher_ids.tolist()))
    same = shared_vocabulary(bpe, bpe)
    assert torch.equal(same.student_ids, same.teacher_ids) and len(same) == bpe.get_vocab_size()  # specials too


def test_projected_vocabulary_counts_each_teacher_token_under_the_student_s_first_piece(bpe, unigram):
    projected = shared_vocabulary(unigram, bpe, "projected")
    u_texts, b_texts = token_texts(unigram), token_texts(bpe)
    student_of = projected.student_ids[projected.teacher_slots]
    mapped = dict(zip(projected.teacher_ids.tolist(), student_of.tolist()))
    for teacher, student in mapped.items():
        if b_texts[teacher] is not None:
            assert b_texts[teacher].startswith(u_texts[student])  # the student token begins the text
    # the student's own segmentation decides: " there" is ▁the + re for this unigram model
    there = bpe.token_to_id("Ġthere")
    assert mapped[there] == unigram.model.tokenize("▁there")[0].id
    # every teacher token is mapped unless the student cannot spell its first character (a lone
    # UTF-8 byte, a character absent from the Shakespeare the student's tokenizer learned)
    spelled = {text for text in u_texts if text is not None}
    for teacher, text in enumerate(b_texts):
        if text is not None and teacher not in mapped:
            assert not any(text[:1].strip() and text.lstrip(b" ")[:1] == piece.lstrip(b" ")[:1]
                           for piece in spelled if piece.strip()), text
    assert len(projected.teacher_ids) > len(shared_vocabulary(unigram, bpe))
    with pytest.raises(ValueError, match="mode must be"):
        shared_vocabulary(unigram, bpe, "fuzzy")


def test_load_tokenizer_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="student.tokenizer: 'nope' is neither"):
        load_tokenizer("nope", "student.tokenizer")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(str(tmp_path), "teachers.0.tokenizer")
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(str(tmp_path / "missing"), "x")


def test_the_shipped_tokenizers_are_what_training_gives():
    """Retraining gives the same BPE, and a unigram model with the same pieces and scores to
    rounding (its trainer sums in parallel, so near-tied pieces may come out in another order: the
    shipped file fixes the ids) that segments text the same way."""
    from kdcore_plugins.shakespeare_tokenizers import TOKENIZERS, shakespeare_text, train

    sample = shakespeare_text()[-3000:]
    for name in TOKENIZERS:
        shipped, fresh = load_tokenizer(name), train(name)
        assert shipped.encode(sample).tokens == fresh.encode(sample).tokens
        model_shipped = json.loads(shipped.to_str())["model"]
        model_fresh = json.loads(fresh.to_str())["model"]
        if model_shipped["type"] == "Unigram":
            fresh_scores = dict(map(tuple, model_fresh["vocab"]))
            assert set(fresh_scores) == {piece for piece, _ in model_shipped["vocab"]}
            for piece, score in model_shipped["vocab"]:
                # the rarest single characters get "lowest score minus a step", which follows the order
                assert fresh_scores[piece] == pytest.approx(score, abs=1e-3)
        else:
            assert model_shipped == model_fresh


def test_decode_pieces_gives_each_byte_token_its_character():
    text, offsets = decode_pieces([b"", b" Hi", b"\xc3", b"\xa9", b"x", b"\xff", b"y"])
    assert text == " Hi\u00e9x\ufffdy"
    assert offsets == [(0, 0), (0, 3), (3, 4), (3, 4), (4, 5), (5, 6), (6, 7)]


def test_retokenized_student_batches_align_like_the_dataset(bpe, unigram):
    """A batch of student tokens (as generation leaves them) re-tokenized for the teacher: spans
    cover the same text on both sides, the prompt is not compared, the student's labels are kept."""
    texts = [TEXT[:60], TEXT[20:100]]
    rows = [encode(bpe, text).ids for text in texts]  # the byte-level BPE as the student here
    length = max(map(len, rows)) - 1
    input_ids = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), -100)
    mask = torch.zeros(2, length, dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        mask[r, :len(ids) - 1] = 1
        labels[r, 4:len(ids) - 1] = torch.tensor(ids[5:])  # the first 5 tokens are the prompt
    batch = Retokenizer(bpe, unigram)(Batch({"input_ids": input_ids, "attention_mask": mask}, labels))
    assert torch.equal(batch.labels, labels)
    texts_bpe = token_texts(bpe)
    for r, ids in enumerate(rows):
        text = b"".join(texts_bpe[t] or b"" for t in ids).decode()
        student_offsets = encode(bpe, text).offsets
        teacher_offsets = encode(unigram, text).offsets
        student_spans = [-1] + batch.spans[r, :len(ids) - 1].tolist()
        view = batch.teacher_view
        t_count = int(view.inputs["attention_mask"][r].sum()) + 1
        teacher_spans = [-1] + view.spans[r, :t_count - 1].tolist()
        count = max(student_spans) + 1
        prompt = student_offsets[5][0]
        check_alignment(text, student_offsets, teacher_offsets[:t_count], student_spans, teacher_spans, count,
                        start=prompt)
        assert count > 3


def test_retokenizer_caps_the_teacher_length(bpe, unigram):
    ids = encode(bpe, TEXT).ids
    input_ids = torch.tensor([ids[:-1]])
    labels = torch.tensor([ids[1:]])
    batch = Retokenizer(bpe, unigram, teacher_length=10)(Batch({"input_ids": input_ids}, labels))
    assert batch.teacher_view.inputs["input_ids"].shape == (1, 10)
    assert set(batch.spans[0].tolist()) - {-1} == set(batch.teacher_view.spans[0].tolist()) - {-1}


def test_invalid_utf8_in_sampled_tokens_still_aligns_the_rest(bpe, unigram):
    """A student may sample a lone byte of a multi-byte character; the teacher reads U+FFFD there
    and the spans around it still cover the same text on both sides."""
    lone_byte = bpe.token_to_id("Ã")  # 0xC3: the first byte of é, never completed here
    ids = [bpe.token_to_id("<|endoftext|>")] + encode(bpe, "First Citizen").ids[1:] + [lone_byte] + \
        encode(bpe, " we proceed").ids[1:]
    batch = Retokenizer(bpe, unigram)(Batch({"input_ids": torch.tensor([ids[:-1]])}, torch.tensor([ids[1:]])))
    text = "First Citizen\ufffd we proceed"
    student_offsets = decode_pieces([token_texts(bpe)[t] or b"" for t in ids])[1]
    assert decode_pieces([token_texts(bpe)[t] or b"" for t in ids])[0] == text
    teacher_offsets = encode(unigram, text).offsets
    spans = [-1] + batch.spans[0].tolist()
    t_count = int(batch.teacher_view.inputs["attention_mask"][0].sum()) + 1
    teacher_spans = [-1] + batch.teacher_view.spans[0, :t_count - 1].tolist()
    check_alignment(text, student_offsets, teacher_offsets[:t_count], spans, teacher_spans, max(spans) + 1)
    assert max(spans) >= 3
