"""kd_loss against a SparseTeacher (top-k indices + log-probabilities): every backend against the
float64 bucket oracle, on every divergence, both sparse modes and the edge cases; the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

import pytest
import torch

import kdcore
from cases import ALL_DIVERGENCES, assert_within_rule
from conftest import TEST_DEVICE, device_backends
from oracle import sparse_oracle_with_grads

SPARSE_BACKENDS = [b for b in device_backends() if "kd_loss_sparse" in kdcore.backends()[b].families]
MODES = ("tail", "renorm")


def top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, dtype=torch.float32):
    """The teacher's top-k as a cache stores them: (indices, log-probabilities in dtype)."""
    logprobs, indices = torch.log_softmax(teacher_logits.double() / temperature, -1).topk(k, dim=-1)
    return indices, logprobs.to(dtype)


def _randn(gen, *shape, scale=2.0):
    return torch.randn(*shape, generator=gen) * scale


def with_unused_slots(indices, logprobs, extra: int, vocab: int, gen, out_of_range: bool = True):
    """The teacher ``(indices, logprobs) [N, k]`` with ``extra`` more slots per row whose
    log-probability is -inf (unused), every row's slots then shuffled. The unused slots hold random
    indices: any in [0, vocab), repeats of the row's own entries, and (``out_of_range``) -1 or
    2**40 in the first of them."""
    n, k = indices.shape
    junk = torch.randint(0, vocab, (n, extra), generator=gen)
    repeats = indices.long().gather(1, torch.randint(0, k, (n, extra), generator=gen))
    junk = torch.where(torch.rand(n, extra, generator=gen) < 0.5, repeats, junk)
    if out_of_range:
        junk[:, 0] = torch.where(torch.arange(n) % 2 == 0, -1, 2**40)
    order = torch.rand(n, k + extra, generator=gen).argsort(1)
    padded_indices = torch.cat([indices.long(), junk], 1).gather(1, order)
    padded_logprobs = torch.cat([logprobs, torch.full((n, extra), -torch.inf, dtype=logprobs.dtype)], 1)
    return padded_indices, padded_logprobs.gather(1, order)


@dataclass(frozen=True)
class SparseCase:
    name: str
    build: Callable  # gen -> (student, indices, logprobs, options)
    options: dict = field(default_factory=dict)

    def make(self):
        gen = torch.Generator().manual_seed(0)
        with torch.device("cpu"):
            student, indices, logprobs, extra = self.build(gen)

        def on_device(x):
            return x.to(TEST_DEVICE) if isinstance(x, torch.Tensor) else x

        options = {key: on_device(value) for key, value in {**self.options, **extra}.items()}
        return on_device(student), on_device(indices), on_device(logprobs), options


def _plain(n, v, k, scale=2.0, **top_k_options):
    def build(gen):
        s, t = _randn(gen, n, v, scale=scale), _randn(gen, n, v, scale=scale)
        return (s, *top_k(t, k, **top_k_options), {})
    return build


def _labels_ce(gen):
    s, t = _randn(gen, 8, 300), _randn(gen, 8, 300)
    indices, logprobs = top_k(t, 20)
    labels = torch.randint(0, 300, (8,), generator=gen)
    labels[0], labels[2] = indices[0, 3], indices[2, 0]  # labels inside the top-k too
    labels[[1, 4, 6]] = -100
    return s, indices, logprobs, {"labels": labels, "ce_weight": 0.5, "kd_weight": 0.8}


def _mask(gen):
    s, t = _randn(gen, 7, 129), _randn(gen, 7, 129)
    mask = torch.tensor([True, False, True, True, False, True, True])
    return (s, *top_k(t, 9), {"mask": mask})


def _all_ignored(gen):
    s, t = _randn(gen, 5, 64), _randn(gen, 5, 64)
    return (s, *top_k(t, 4), {"labels": torch.full((5,), -100), "ce_weight": 0.3})


def _padded_slots(gen):
    """Rows whose teacher kept fewer than k entries (10, 9, ..., 5): the unused slots hold -inf and
    any index (repeats of the row's entries, out of range), in any position."""
    s, t = _randn(gen, 6, 200), _randn(gen, 6, 200)
    indices, logprobs = top_k(t, 10)
    logprobs[torch.arange(10) >= 10 - torch.arange(6).unsqueeze(1)] = -torch.inf
    return s, *with_unused_slots(indices, logprobs, 3, 200, gen), {}


def _student_masked_vocab(gen):
    """-inf student logits (masked vocabulary) outside the teacher's top-k."""
    s, t = _randn(gen, 6, 300), _randn(gen, 6, 300)
    indices, logprobs = top_k(t, 12)
    holes = torch.rand(6, 300, generator=gen) < 0.5
    holes.scatter_(1, indices, False)
    s[holes] = -torch.inf
    return s, indices, logprobs, {}


def _large_logits(gen):
    s, t = _randn(gen, 4, 513, scale=30.0) + 1.0e4, _randn(gen, 4, 513, scale=30.0)
    return (s, *top_k(t, 32), {})


def _confident_student(gen):
    """The student puts all but ~1e-20 of its mass on the top-k: its tail must come out exact."""
    s, t = _randn(gen, 4, 400), _randn(gen, 4, 400)
    indices, logprobs = top_k(t, 16)
    s.scatter_(1, indices[:, :1], 60.0)
    return s, indices, logprobs, {}


def _near_one_hot_teacher(gen):
    s, t = _randn(gen, 5, 400), torch.zeros(5, 400)
    t[torch.arange(5), torch.randint(0, 400, (5,), generator=gen)] = 60.0
    return (s, *top_k(t, 8), {})


def _noncontiguous(gen):
    s = _randn(gen, 300, 5).t()
    t = _randn(gen, 5, 300)
    return (s, *top_k(t, 25), {})


def _three_d(gen):
    s, t = _randn(gen, 2, 3, 77), _randn(gen, 2, 3, 77)
    labels = torch.randint(0, 77, (2, 3), generator=gen)
    labels[1, 2] = -100
    return (s, *top_k(t, 5), {"labels": labels})


def _bf16_cache(gen):
    """Log-probabilities stored in bfloat16 and int16 indices, as a compact cache keeps them."""
    s, t = _randn(gen, 6, 500), _randn(gen, 6, 500)
    indices, logprobs = top_k(t, 64, temperature=2.0, dtype=torch.bfloat16)
    return s, indices.to(torch.int16), logprobs, {}


SPARSE_CASES = [
    SparseCase("basic", _plain(6, 300, 16)),
    SparseCase("temperature_sum", _plain(5, 1000, 50), options={"temperature": 2.5, "reduction": "sum"}),
    SparseCase("rows_none", _plain(4, 1025, 7), options={"temperature": 0.7, "reduction": "none"}),
    SparseCase("multi_tile", _plain(3, 4099, 64), options={"temperature": 2.0, "beta": 0.3, "alpha": 0.25}),
    SparseCase("k_is_vocab", _plain(4, 12, 12)),
    SparseCase("k_one", _plain(5, 200, 1), options={"temperature": 1.5}),
    SparseCase("labels_ce", _labels_ce, options={"temperature": 2.0}),
    SparseCase("mask_normalizer", _mask, options={"temperature": 3.0, "t2_scale": False, "normalizer": 4.0}),
    SparseCase("all_ignored", _all_ignored, options={"temperature": 2.0}),
    SparseCase("padded_slots", _padded_slots, options={"temperature": 1.5}),
    SparseCase("student_masked_vocab", _student_masked_vocab, options={"alpha": 0.2}),
    SparseCase("large_logits", _large_logits, options={"temperature": 4.0}),
    SparseCase("confident_student", _confident_student),
    SparseCase("near_one_hot_teacher", _near_one_hot_teacher, options={"beta": 0.9, "alpha": 0.5}),
    SparseCase("noncontiguous", _noncontiguous, options={"temperature": 2.0}),
    SparseCase("three_d_none", _three_d, options={"reduction": "none"}),
    SparseCase("bf16_cache", _bf16_cache, options={"temperature": 2.0}),
]
DTYPE_CASES = [c for c in SPARSE_CASES if c.name in {"basic", "multi_tile", "labels_ce", "large_logits",
                                                     "bf16_cache"}]


def check_sparse_case(backend, case, divergence, mode, dtype):
    student32, indices, logprobs, options = case.make()
    options = {**options, "divergence": divergence, "sparse_mode": mode}
    student = student32.to(dtype).requires_grad_(True)
    loss = kdcore.kd_loss(student, kdcore.SparseTeacher(indices, logprobs), backend=backend, **options)
    exact, exact_grad = sparse_oracle_with_grads(student, indices, logprobs, **options)
    own, own_grad = sparse_oracle_with_grads(student, indices, logprobs, compute_dtype=dtype, **options)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype
    assert_within_rule("loss", loss, exact, own, loss_dtype)
    if not torch.isfinite(exact).all():
        return
    loss.sum().backward()
    assert student.grad is not None and student.grad.dtype == dtype
    assert_within_rule("student gradient", student.grad, exact_grad, own_grad, dtype)


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_float32_matches_float64_oracle(backend, divergence, mode, case):
    check_sparse_case(backend, case, divergence, mode, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_half_precision_within_twice_torch_error(backend, divergence, mode, case, dtype):
    check_sparse_case(backend, case, divergence, mode, dtype)


@pytest.mark.parametrize("case", [c for c in SPARSE_CASES if c.name in {"basic", "labels_ce", "multi_tile"}],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_float64_matches_float64_oracle(backend, divergence, mode, case):
    check_sparse_case(backend, case, divergence, mode, torch.float64)


def test_every_cpu_backend_but_cuda_implements_the_sparse_family():
    expected = {"reference", "cpp", "triton"} & set(device_backends())
    assert expected <= set(SPARSE_BACKENDS)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_complete_top_k_equals_the_dense_loss(backend):
    """With k = V the buckets are the vocabulary: both modes give kd_loss on full logits."""
    s, t = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40)
    dense = kdcore.kd_loss(s, t, divergence="jsd", temperature=2.0, backend="reference")
    for mode in MODES:
        sparse = kdcore.kd_loss(s, teacher=kdcore.SparseTeacher(*top_k(t, 40, temperature=2.0)[::1]),
                                divergence="jsd", temperature=2.0, sparse_mode=mode, backend=backend)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_masked_rows_contribute_nothing(backend):
    s, t = torch.randn(6, 50), torch.randn(6, 50)
    indices, logprobs = top_k(t, 8)
    labels = torch.tensor([1, -100, 2, -100, 3, 4])
    s_poisoned = s.clone()
    s_poisoned[[1, 3]] = torch.nan
    out = []
    for x in (s, s_poisoned):
        x = x.clone().requires_grad_(True)
        loss = kdcore.kd_loss(x, kdcore.SparseTeacher(indices, logprobs), labels=labels, backend=backend)
        loss.backward()
        out.append((loss, x.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert (out[1][1][[1, 3]] == 0).all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_nan_logit_poisons_only_its_row(backend):
    s, t = torch.randn(4, 60), torch.randn(4, 60)
    s[2, 17] = torch.nan
    s.requires_grad_(True)
    loss = kdcore.kd_loss(s, kdcore.SparseTeacher(*top_k(t, 6)), reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all()
    assert s.grad[2].isnan().all() and s.grad[[0, 1, 3]].isfinite().all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_vocab_size_drops_the_students_extra_columns(backend):
    s, t = torch.randn(4, 70), torch.randn(4, 64)
    teacher = kdcore.SparseTeacher(*top_k(t, 10))
    loss = kdcore.kd_loss(s, teacher, vocab_size=64, backend=backend)
    torch.testing.assert_close(loss, kdcore.kd_loss(s[:, :64].contiguous(), teacher, backend=backend))


ERRORS = [
    ("duplicate", lambda i, lp: (i.index_fill(1, torch.tensor([1]), 0).index_fill(1, torch.tensor([0]), 0), lp),
     "lists a vocabulary index twice"),
    ("duplicate_beside_unused", lambda i, lp: (i.index_fill(1, torch.tensor([0, 1, 2]), 0),
                                               lp.index_fill(1, torch.tensor([2]), -torch.inf)),
     "lists a vocabulary index twice"),
    ("out_of_range_beside_unused",
     lambda i, lp: (i.index_fill(1, torch.tensor([0]), 50).index_fill(1, torch.tensor([3]), -9),
                    lp.index_fill(1, torch.tensor([3]), -torch.inf)),
     "has index 50, outside"),
    ("out_of_range", lambda i, lp: (i.index_fill(1, torch.tensor([0]), 50), lp), "outside the student's vocabulary"),
    ("logits_not_logprobs", lambda i, lp: (i, lp + 5.0), "not logits"),
    ("nan", lambda i, lp: (i, lp.index_fill(1, torch.tensor([0]), torch.nan)), "is \\+inf or NaN"),
    ("pos_inf", lambda i, lp: (i, lp.index_fill(1, torch.tensor([2]), torch.inf)), "is \\+inf or NaN"),
    ("nan_row", lambda i, lp: (i, torch.full_like(lp, torch.nan)), "is \\+inf or NaN"),
]


@pytest.mark.parametrize("name, corrupt, message", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_bad_teacher_values_raise(backend, name, corrupt, message):
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    indices, logprobs = corrupt(*top_k(t, 5))
    with pytest.raises(ValueError, match=message):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), backend=backend)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_all_neg_inf_student_row_raises_unless_ignored(backend):
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    s[1] = -torch.inf
    teacher = kdcore.SparseTeacher(*top_k(t, 4))
    with pytest.raises(ValueError, match="row 1 .* entirely -inf"):
        kdcore.kd_loss(s, teacher, backend=backend)
    loss = kdcore.kd_loss(s, teacher, mask=torch.tensor([True, False, True]), backend=backend)
    assert loss.isfinite()


def _unused_slots_problem(dtype):
    """(student [6, 97] in dtype, the teacher's top-7 in dtype, that teacher with 5 unused slots
    per row, labels and CE options), all on the test device. One label names a column that only an
    unused slot of its row names."""
    gen = torch.Generator().manual_seed(1)
    s, t = _randn(gen, 6, 97), _randn(gen, 6, 97)
    indices, logprobs = top_k(t, 7, temperature=1.3, dtype=dtype)
    padded = with_unused_slots(indices, logprobs, 5, 97, gen)
    labels = torch.randint(0, 97, (6,), generator=gen)
    labels[3] = -100
    labels[0] = next(c for c in range(97) if c not in indices[0])
    padded[0][0, padded[1][0].isneginf().nonzero()[-1]] = labels[0]
    on_device = [x.to(TEST_DEVICE) for x in (s.to(dtype), indices, logprobs, *padded, labels)]
    return on_device[0], on_device[1:3], on_device[3:5], {"labels": on_device[5], "ce_weight": 0.5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_unused_slots_are_dropped(backend, divergence, mode, temperature, dtype):
    """Slots of log-probability -inf, whatever index they hold (random, a repeat of an entry, out of
    range) and wherever they sit, change neither the loss nor the student gradient: the backend on
    the padded teacher is held to the float64 oracle of the teacher without them."""
    student, (indices, logprobs), padded, options = _unused_slots_problem(dtype)
    options = {**options, "divergence": divergence, "sparse_mode": mode, "temperature": temperature}
    student.requires_grad_(True)
    loss = kdcore.kd_loss(student, kdcore.SparseTeacher(*padded), backend=backend, **options)
    loss.backward()
    assert loss.isfinite() and student.grad.isfinite().all()
    exact, exact_grad = sparse_oracle_with_grads(student, indices, logprobs, **options)
    own, own_grad = sparse_oracle_with_grads(student, indices, logprobs, compute_dtype=dtype, **options)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_within_rule("loss", loss, exact, own, out_dtype)
    assert_within_rule("student gradient", student.grad, exact_grad, own_grad, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_oracle_drops_unused_slots(divergence, mode):
    """The oracle states the rule on its own: the padded teacher of test_unused_slots_are_dropped
    is the teacher without those slots."""
    student, (indices, logprobs), padded, options = _unused_slots_problem(torch.float64)
    options = {**options, "divergence": divergence, "sparse_mode": mode, "temperature": 1.5}
    exact, exact_grad = sparse_oracle_with_grads(student, indices, logprobs, **options)
    padded_exact, padded_exact_grad = sparse_oracle_with_grads(student, *padded, **options)
    torch.testing.assert_close(padded_exact, exact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(padded_exact_grad, exact_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_row_without_entries_is_all_tail(backend, divergence):
    """A row whose every log-probability is -inf has no top-k entries: in tail mode the teacher's
    whole mass is its tail, as is the student's, so its divergence and divergence gradient are
    exactly 0 (the fused CE still applies); renorm mode has nothing to renormalize and raises
    unless the row is ignored."""
    gen = torch.Generator().manual_seed(2)
    s, t = _randn(gen, 3, 40).to(TEST_DEVICE), _randn(gen, 3, 40)
    indices, logprobs = top_k(t, 6)
    indices[1] = torch.randint(0, 40, (6,), generator=gen)
    logprobs[1] = -torch.inf
    teacher = kdcore.SparseTeacher(indices.to(TEST_DEVICE), logprobs.to(TEST_DEVICE))
    student = s.clone().requires_grad_(True)
    loss = kdcore.kd_loss(student, teacher, divergence=divergence, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[1] == 0 and (student.grad[1] == 0).all()
    assert loss[[0, 2]].isfinite().all() and (loss[[0, 2]] > 0).all()
    labels = torch.tensor([3, 5, 7], device=TEST_DEVICE)
    student = s.clone().requires_grad_(True)
    loss = kdcore.kd_loss(student, teacher, divergence=divergence, labels=labels, ce_weight=0.5, reduction="none",
                          backend=backend)
    loss.sum().backward()
    ce = s[1:2].clone().requires_grad_(True)
    expected = 0.5 * torch.nn.functional.cross_entropy(ce, labels[1:2])
    expected.backward()
    torch.testing.assert_close(loss[1], expected.detach())
    torch.testing.assert_close(student.grad[1], ce.grad[0])
    with pytest.raises(ValueError, match="row 1 of the sparse teacher has no entries"):
        kdcore.kd_loss(s, teacher, divergence=divergence, sparse_mode="renorm", backend=backend)
    ignored = kdcore.kd_loss(s, teacher, divergence=divergence, sparse_mode="renorm", reduction="sum", backend=backend,
                             mask=torch.tensor([True, False, True], device=TEST_DEVICE))
    rest = kdcore.kd_loss(s[[0, 2]], kdcore.SparseTeacher(teacher.indices[[0, 2]], teacher.logprobs[[0, 2]]),
                          divergence=divergence, sparse_mode="renorm", reduction="sum", backend=backend)
    torch.testing.assert_close(ignored, rest)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_unused_slots_beside_a_whole_vocabulary(backend, mode):
    """Whether a row's entries are the whole vocabulary (no tail) is a property of the entries, not
    of k: V entries plus unused slots (k > V) give the k = V loss, and k = V slots of which some
    are unused give the loss of the smaller k, tail included."""
    gen = torch.Generator().manual_seed(3)
    s, t = _randn(gen, 4, 12).to(TEST_DEVICE), _randn(gen, 4, 12)

    def loss_and_grad(indices, logprobs):
        student = s.clone().requires_grad_(True)
        loss = kdcore.kd_loss(student, kdcore.SparseTeacher(indices.to(TEST_DEVICE), logprobs.to(TEST_DEVICE)),
                              divergence="jsd", sparse_mode=mode, temperature=1.5, backend=backend)
        loss.backward()
        return loss, student.grad

    for k in (12, 9):
        full = top_k(t, k)
        padded = with_unused_slots(*full, 3, 12, gen, out_of_range=False)
        for ours, theirs in zip(loss_and_grad(*padded), loss_and_grad(*full)):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_argument_errors_name_the_argument():
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    indices, logprobs = top_k(t, 4)
    teacher = kdcore.SparseTeacher(indices, logprobs)
    with pytest.raises(ValueError, match="sparse_mode must be one of 'tail', 'renorm'"):
        kdcore.kd_loss(s, teacher, sparse_mode="tails")
    with pytest.raises(ValueError, match=r"leading dimensions \(2,\) plus k"):
        kdcore.kd_loss(s[:2], teacher)
    with pytest.raises(ValueError, match="same shape"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices[:, :3], logprobs))
    with pytest.raises(TypeError, match="teacher.indices must be an integer tensor"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices.float(), logprobs))
    with pytest.raises(TypeError, match="give the teacher once"):
        kdcore.kd_loss(s, t, teacher=teacher)
    with pytest.raises(ValueError, match="inplace_grad=True is not supported"):
        kdcore.kd_loss(s, teacher, inplace_grad=True)
    with pytest.raises(ValueError, match="teacher.logprobs requires grad"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs.clone().requires_grad_(True)))
    with pytest.raises(ValueError, match="vocab_size must lie in"):
        kdcore.kd_loss(s, teacher, vocab_size=21)


def _sparse_op(backend):
    namespace, _, name = kdcore.plugins.host().backends.get(backend).ops["kd_loss_sparse"].partition("::")
    return getattr(getattr(torch.ops, namespace), name)


def _sparse_samples():
    s = torch.randn(5, 33, requires_grad=True)
    indices, logprobs = top_k(torch.randn(5, 33), 6)
    labels = torch.tensor([1, -100, 3, 32, 0])
    common = (None, 2.0, 2, 0.4, True, 1.0, 0.0, -100, 2)  # normalizer, T, jsd, beta, t2, kd, ce, ignore, batchmean
    yield (s, indices, logprobs, None, None, *common, 0, True)
    yield (s, indices, logprobs, labels, None, None, 1.0, 0, 0.0, True, 1.0, 0.5, -100, 0, 1, True)
    yield (s, indices, logprobs, None, torch.tensor([True, False, True, True, True]), torch.tensor(3.0), 1.5, 5, 0.0,
           False, 0.7, 0.0, -100, 2, 0, True)
    yield (s.detach().to(torch.bfloat16).requires_grad_(True), indices, logprobs.to(torch.bfloat16), None, None,
           *common, 0, True)
    unused = torch.full((5, 2), -torch.inf)  # unused slots: one repeats an entry, one is out of range
    yield (s, torch.cat([indices, indices[:, :1], torch.full((5, 1), -1)], 1), torch.cat([logprobs, unused], 1),
           labels, None, None, 1.0, 0, 0.0, True, 1.0, 0.5, -100, 0, 0, True)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_opcheck(backend):
    op = _sparse_op(backend)
    for args in _sparse_samples():
        args = tuple(a.to(TEST_DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.skipif("cpp" not in SPARSE_BACKENDS, reason="the C++ kernels are not built")
def test_opcheck_cpp_row_kernels():
    s = torch.randn(4, 70)
    indices = top_k(torch.randn(4, 70), 5)[0].sort(1).values.contiguous()
    torch.library.opcheck(torch.ops.kdcore.sparse_row_stats_cpp, (s, indices, 0.5, True, True))
    coefficients = torch.tensor([[3.0, 1.0, 2.0, 0.5]] * 4, dtype=torch.float64)
    args = (s, torch.tensor([True, False, True, True]), torch.tensor([1, 2, 3, 4]), coefficients, 0.5)
    torch.library.opcheck(torch.ops.kdcore.sparse_fill_cpp, args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_reference_gradcheck_float64(divergence, mode):
    s = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    teacher = kdcore.SparseTeacher(*top_k(torch.randn(3, 11), 4, dtype=torch.float64))
    labels = torch.tensor([2, -100, 7])

    def loss(x):
        return kdcore.kd_loss(x, teacher, divergence=divergence, sparse_mode=mode, temperature=1.7, labels=labels,
                              ce_weight=0.3, reduction="none", backend="reference")

    assert torch.autograd.gradcheck(loss, (s,))


@pytest.mark.parametrize("backend", [b for b in SPARSE_BACKENDS if b != "triton"])
def test_torch_compile_matches_eager(backend):
    s = torch.randn(4, 3, 50, requires_grad=True)
    teacher = kdcore.SparseTeacher(*top_k(torch.randn(4, 3, 50), 8))

    def step(x):
        return kdcore.kd_loss(x, teacher, temperature=2.0, divergence="skew_kl", backend=backend)

    eager = step(s)
    (grad_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True)(s)
    (grad_compiled,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


class _DeviceReads:
    """Counts kdcore.ops.status' device-to-host reads and can pretend a CUDA graph is captured."""

    def __init__(self, monkeypatch, capturing: bool):
        from kdcore.ops import status

        self.count = 0
        real_read = status._to_host

        def counted(values):
            self.count += 1
            return real_read(values)

        monkeypatch.setattr(status, "_to_host", counted)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        if TEST_DEVICE == "cpu":  # CPU tensors never ask CUDA: pretend they are captured too
            monkeypatch.setattr(status, "stream_is_capturing", lambda device: capturing)


def _sync_case():
    s, t = torch.randn(4, 60), torch.randn(4, 60)
    indices, logprobs = top_k(t, 6)
    labels = torch.tensor([3, 7, -100, 11])
    return s, indices, logprobs, labels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_one_device_read_per_call(backend, mode, monkeypatch):
    s, indices, logprobs, labels = (x.to(TEST_DEVICE) for x in _sync_case())
    reads = _DeviceReads(monkeypatch, capturing=False)
    s.requires_grad_(True)
    loss = kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, ce_weight=0.5,
                          sparse_mode=mode, backend=backend)
    loss.backward()
    assert reads.count == 1
    assert loss.isfinite() and s.grad.isfinite().all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_forward_converts_one_tensor_to_python(backend, monkeypatch):
    """Not only check_status' read: no other tensor of the forward becomes a Python value."""
    s, indices, logprobs, labels = (x.to(TEST_DEVICE) for x in _sync_case())
    teacher = kdcore.SparseTeacher(indices, logprobs)
    kdcore.kd_loss(s, teacher, labels=labels, ce_weight=0.5, backend=backend)  # any lazy setup first
    conversions = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            conversions.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = kdcore.kd_loss(s, teacher, labels=labels, ce_weight=0.5, backend=backend)
    assert conversions == ["tolist"]
    assert loss.isfinite()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_cuda_capture_is_asked_only_for_cuda_tensors(backend, monkeypatch):
    if TEST_DEVICE != "cpu":
        pytest.skip("the student is on CUDA")

    def must_not_be_called():
        raise AssertionError("torch.cuda.is_current_stream_capturing called for CPU tensors")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", must_not_be_called)
    s, indices, logprobs, labels = _sync_case()
    assert kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, backend=backend).isfinite()


def _corrupted_case(what):
    """The sync case on the test device, with row 1 broken in one way."""
    s, indices, logprobs, labels = (x.to(TEST_DEVICE) for x in _sync_case())
    if what == "duplicate":
        indices[1, 1] = indices[1, 0]
    elif what == "out_of_range":
        indices[1, 0] = 60
    elif what == "label":
        labels[1] = 60
    elif what == "logits_not_logprobs":
        logprobs[1] += 5.0
    return s, indices, logprobs, labels


CORRUPTIONS = ("duplicate", "out_of_range", "label", "logits_not_logprobs")


@pytest.mark.parametrize("what", CORRUPTIONS)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_captured_call_reads_nothing_and_gives_nan_rows(backend, what, monkeypatch):
    s, indices, logprobs, labels = _corrupted_case(what)
    reads = _DeviceReads(monkeypatch, capturing=True)
    s.requires_grad_(True)
    loss = kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, ce_weight=0.5,
                          reduction="none", backend=backend)
    loss.sum().backward()
    assert reads.count == 0
    assert loss[1].isnan() and loss[[0, 3]].isfinite().all() and loss[2] == 0
    assert s.grad[1].isnan().all() and s.grad[[0, 3]].isfinite().all() and (s.grad[2] == 0).all()


@pytest.mark.parametrize("what", CORRUPTIONS)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_uncaptured_call_raises_for_the_failing_row(backend, what, monkeypatch):
    s, indices, logprobs, labels = _corrupted_case(what)
    reads = _DeviceReads(monkeypatch, capturing=False)
    with pytest.raises(ValueError, match=r"row 1 |labels\[1\] = 60"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, ce_weight=0.5, backend=backend)
    assert reads.count == 1


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_rows_first_failed_check_is_reported(backend):
    """A row with a repeated index and a too-large mass reports the index; the first failing row wins."""
    s, indices, logprobs, labels = _sync_case()
    indices, logprobs = indices.clone(), logprobs.clone()
    indices[3, 1] = indices[3, 0]
    logprobs[3] += 5.0
    labels[0] = 60
    with pytest.raises(ValueError, match=r"labels\[0\] = 60"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, ce_weight=0.5, backend=backend)
    labels[0] = 3
    with pytest.raises(ValueError, match="row 3 .* lists a vocabulary index twice"):
        kdcore.kd_loss(s, kdcore.SparseTeacher(indices, logprobs), labels=labels, ce_weight=0.5, backend=backend)
