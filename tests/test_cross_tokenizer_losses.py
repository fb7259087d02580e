"""The cross-tokenizer losses against a float64 implementation written span by span, values and
gradients; the fused path against the unfused one; the shared-vocabulary divergence against
kd_loss when both sides use one tokenizer."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.cross_tokenizer import SharedVocabulary, cross_tokenizer_kd_loss, fused_linear_cross_tokenizer_kd_loss
from tests.cross_tokenizer_oracle import reference_loss

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd"]


def random_alignment(generator, batch=3, student_length=9, teacher_length=7, spans=5):
    """Random span ids laid out as real alignments are: nondecreasing along the positions, some
    positions in no span, every span present on a side with one or more tokens (a few spans only on
    one side, which must be skipped)."""
    def side(length, present):
        out = torch.full((batch, length), -1, dtype=torch.long)
        for b in range(batch):
            slots = sorted(torch.randperm(length, generator=generator)[:max(1, length - 2)].tolist())
            ids = sorted(torch.randint(0, spans, (len(slots),), generator=generator).tolist())
            for slot, span in zip(slots, ids):
                if span in present[b]:
                    out[b, slot] = span
        return out

    present = [set(torch.randperm(spans, generator=generator)[:spans - 1].tolist()) for _ in range(batch)]
    other = [set(torch.randperm(spans, generator=generator)[:spans - 1].tolist()) for _ in range(batch)]
    return side(student_length, present), side(teacher_length, other)


def case(seed, *, vs=11, vt=13, shared=6, dtype=torch.float64, scale=3.0, many_to_one=False):
    generator = torch.Generator().manual_seed(seed)
    s_spans, t_spans = random_alignment(generator)
    batch, ls = s_spans.shape
    lt = t_spans.shape[1]
    student = (torch.randn(batch, ls, vs, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(batch, lt, vt, generator=generator, dtype=torch.float64) * scale).to(dtype)
    s_labels = torch.randint(0, vs, (batch, ls), generator=generator)
    t_labels = torch.randint(0, vt, (batch, lt), generator=generator)
    s_labels[s_spans < 0] = -100  # labels off the spans do not matter
    s_ids = torch.randperm(vs, generator=generator)[:shared]
    t_ids = torch.randperm(vt, generator=generator)[:shared]
    vocabulary = SharedVocabulary(s_ids, t_ids, vs, vt)
    if many_to_one:  # most teacher tokens counted under a few student tokens, some unmapped
        t_ids = torch.randperm(vt, generator=generator)[:vt - 2]
        s_of = s_ids[torch.randint(0, shared, (len(t_ids),), generator=generator)]
        vocabulary = SharedVocabulary.from_pairs(list(zip(s_of.tolist(), t_ids.tolist())), vs, vt)
        assert vocabulary.teacher_slots is not None
    return student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary


def run_both(seed, loss, divergence="forward_kl", many_to_one=False, **options):
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(seed, many_to_one=many_to_one)
    student = student.clone().requires_grad_(True)
    got = cross_tokenizer_kd_loss(student, teacher, student_labels=s_labels, teacher_labels=t_labels,
                                  student_spans=s_spans, teacher_spans=t_spans, vocabulary=vocabulary, loss=loss,
                                  divergence=divergence, **options)
    (got_grad,) = torch.autograd.grad(got, student)
    reference_student = student.detach().clone().requires_grad_(True)
    slots = vocabulary.teacher_slots if vocabulary.teacher_slots is not None else torch.arange(len(vocabulary))
    pairs = list(zip(vocabulary.student_ids[slots].tolist(), vocabulary.teacher_ids.tolist()))
    want = reference_loss(reference_student, teacher, s_labels, t_labels, s_spans, t_spans, pairs=pairs, loss=loss,
                          divergence_name=divergence, **options)
    (want_grad,) = torch.autograd.grad(want, reference_student)
    return got, want, got_grad, want_grad


@pytest.mark.parametrize("many_to_one", [False, True], ids=["exact", "projected"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss", ["shared_vocab", "hybrid"])
def test_shared_and_hybrid_match_the_span_by_span_reference(loss, divergence, many_to_one):
    for seed in range(3):
        got, want, got_grad, want_grad = run_both(seed, loss, divergence, many_to_one, temperature=2.0, beta=0.3,
                                                  alpha=0.2)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"uld_top_k": 4}, {"uld_top_k": 100}, {"temperature": 0.5},
                                     {"reduction": "sum"}])
def test_uld_matches_the_span_by_span_reference(options):
    for seed in range(3):
        got, want, got_grad, want_grad = run_both(seed, "uld", **options)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["uld", "shared_vocab", "hybrid"])
def test_one_to_one_spans_only(loss):
    got, want, got_grad, want_grad = run_both(11, loss, many_to_one=True, spans="one_to_one", temperature=1.5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)
    everything, *_ = run_both(11, loss, many_to_one=True, temperature=1.5)
    assert float(got.detach()) != float(everything.detach())


def test_hybrid_weights_and_t2_scale():
    got, want, got_grad, want_grad = run_both(4, "hybrid", divergence="jsd", shared_weight=0.25, uld_weight=3.0,
                                              temperature=1.5, t2_scale=False, uld_top_k=3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_tokenizer_on_both_sides_is_kd_loss(divergence):
    """Every position its own span and every token shared: the shared-vocabulary divergence is
    kd_loss (the tail buckets are empty on both sides), values and gradients."""
    generator = torch.Generator().manual_seed(0)
    batch, length, vocab = 2, 6, 17
    student = (torch.randn(batch, length, vocab, generator=generator) * 4).requires_grad_(True)
    teacher = torch.randn(batch, length, vocab, generator=generator) * 4
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    spans = torch.arange(length).repeat(batch, 1)
    got = cross_tokenizer_kd_loss(student, teacher, student_labels=labels, teacher_labels=labels, student_spans=spans,
                                  teacher_spans=spans, vocabulary=SharedVocabulary.identity(vocab), loss="shared_vocab",
                                  divergence=divergence, temperature=2.0)
    want = kdcore.kd_loss(student, teacher, divergence=divergence, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    got_grad, = torch.autograd.grad(got, student)
    want_grad, = torch.autograd.grad(want, student)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-5, atol=1e-7)


def test_fused_equals_unfused_and_keeps_chunks_small():
    generator = torch.Generator().manual_seed(1)
    s_spans, t_spans = random_alignment(generator, batch=2, student_length=12, teacher_length=10, spans=7)
    dim, vs, vt = 8, 19, 23
    s_hidden = torch.randn(2, 12, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(2, 10, dim, generator=generator, dtype=torch.float64)
    s_weight = torch.randn(vs, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    s_bias = torch.randn(vs, generator=generator, dtype=torch.float64, requires_grad=True)
    t_weight = torch.randn(vt, dim, generator=generator, dtype=torch.float64)
    s_labels = torch.randint(0, vs, (2, 12), generator=generator)
    t_labels = torch.randint(0, vt, (2, 10), generator=generator)
    vocabulary = SharedVocabulary(torch.arange(5), torch.arange(3, 8), vs, vt)
    options = dict(student_labels=s_labels, teacher_labels=t_labels, student_spans=s_spans, teacher_spans=t_spans,
                   vocabulary=vocabulary, loss="hybrid", divergence="jsd", temperature=2.0)
    from kdcore.cross_tokenizer import losses

    computed = []
    take = losses._Rows.take

    def recording(fused, tensors, index):
        out = take(fused, tensors, index)
        computed.append(tuple(out.shape))
        return out

    losses._Rows.take = staticmethod(recording)
    try:
        fused = fused_linear_cross_tokenizer_kd_loss(s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias,
                                                     chunk_size=2, **options)
        fused_grads = torch.autograd.grad(fused, (s_hidden, s_weight, s_bias))
    finally:
        losses._Rows.take = staticmethod(take)
    # never more than a chunk of either model's logits at once, in forward or in backward's recomputation
    assert computed and max(rows for rows, _ in computed) <= 2
    plain = cross_tokenizer_kd_loss(s_hidden @ s_weight.t() + s_bias, t_hidden @ t_weight.t(), **options)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused_grads, torch.autograd.grad(plain, (s_hidden, s_weight, s_bias))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(5, dtype=dtype)
    got = cross_tokenizer_kd_loss(student, teacher, student_labels=s_labels, teacher_labels=t_labels,
                                  student_spans=s_spans, teacher_spans=t_spans, vocabulary=vocabulary)
    pairs = list(zip(vocabulary.student_ids.tolist(), vocabulary.teacher_ids.tolist()))
    want = reference_loss(student.double(), teacher.double(), s_labels, t_labels, s_spans, t_spans, pairs=pairs)
    assert got.dtype == torch.float32
    # float32 arithmetic on logits of size ~10: a few ulps per entry, summed over ~20 entries per span
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_masked_columns_and_underflowing_spans_stay_finite():
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(6, dtype=torch.float32, scale=40.0)
    student[..., 0] = float("-inf")
    teacher[..., 1] = float("-inf")
    student = student.requires_grad_(True)
    loss = cross_tokenizer_kd_loss(student, teacher, student_labels=s_labels.clamp_min(1).masked_fill(s_spans < 0, -100),
                                   teacher_labels=t_labels, student_spans=s_spans, teacher_spans=t_spans,
                                   vocabulary=vocabulary, divergence="reverse_kl")
    grad, = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()


def test_no_compared_span_gives_zero_with_a_gradient():
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(7, dtype=torch.float32)
    student.requires_grad_(True)
    loss = cross_tokenizer_kd_loss(student, teacher, student_labels=s_labels, teacher_labels=t_labels,
                                   student_spans=torch.full_like(s_spans, -1), teacher_spans=t_spans,
                                   vocabulary=vocabulary)
    assert float(loss.detach()) == 0.0
    grad, = torch.autograd.grad(loss, student)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_normalizer_replaces_the_span_count():
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(8)
    common = dict(student_labels=s_labels, teacher_labels=t_labels, student_spans=s_spans, teacher_spans=t_spans,
                  vocabulary=vocabulary)
    total = cross_tokenizer_kd_loss(student, teacher, reduction="sum", **common)
    torch.testing.assert_close(cross_tokenizer_kd_loss(student, teacher, normalizer=7.0, **common), total / 7)


@pytest.mark.parametrize("change, message", [
    (dict(loss="wasserstein"), "loss"),
    (dict(vocabulary=None), "vocabulary="),
    (dict(uld_top_k=0), "uld_top_k"),
    (dict(divergence="kl"), "divergence"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(spans="some"), "spans"),
    (dict(reduction="sum", normalizer=3.0), "normalizer replaces"),
    (dict(vocabulary=SharedVocabulary(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), 11, 13)), "inconsistent"),
    (dict(vocabulary=SharedVocabulary(torch.tensor([1]), torch.tensor([0, 1]), 11, 13, torch.tensor([0, 4]))),
     "inconsistent"),
    (dict(student_spans=torch.zeros(3, 4, dtype=torch.long)), "student_spans"),
    (dict(teacher_labels=torch.zeros(3, 7)), "teacher_labels must be an integer tensor"),
    (dict(vocabulary=SharedVocabulary(torch.tensor([40]), torch.tensor([0]), 41, 13)), "student token 40"),
])
def test_bad_arguments_name_themselves(change, message):
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(9)
    options = dict(student_labels=s_labels, teacher_labels=t_labels, student_spans=s_spans, teacher_spans=t_spans,
                   vocabulary=vocabulary, loss="hybrid")
    options.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        cross_tokenizer_kd_loss(student, teacher, **options)


def test_a_compared_label_outside_the_vocabulary_is_refused():
    student, teacher, s_labels, t_labels, s_spans, t_spans, vocabulary = case(10)
    s_labels = s_labels.clone()
    s_labels[s_spans >= 0] = 99
    with pytest.raises(ValueError, match="student_labels has 99"):
        cross_tokenizer_kd_loss(student, teacher, student_labels=s_labels, teacher_labels=t_labels,
                                student_spans=s_spans, teacher_spans=t_spans, loss="uld")
