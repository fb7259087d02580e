"""fused_linear_kd_loss against kd_loss on materialized logits (float64), on every backend that runs
on the test device: values and the gradients of the student's hidden states, weight and bias,
over chunk sizes, labels, masks, reductions, vocabulary mismatch and dtypes; errors; and the
memory claim (extra memory bounded by the chunk, not by N x V)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdcore
from conftest import TEST_DEVICE, device_backends

BACKENDS = device_backends()
ROOT = Path(__file__).resolve().parents[1]


def problem(n=37, hs=16, ht=24, vs=50, vt=50, dtype=torch.float64, bias=True, leading=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(TEST_DEVICE)

    shape = leading or (n,)
    student = {"student_hidden": make(*shape, hs), "student_weight": make(vs, hs, scale=hs ** -0.5 * 3)}
    teacher = {"teacher_hidden": make(*shape, ht), "teacher_weight": make(vt, ht, scale=ht ** -0.5 * 3)}
    if bias:
        student["student_bias"], teacher["teacher_bias"] = make(vs), make(vt)
    for value in student.values():
        value.requires_grad_(True)
    return student, teacher


def unfused(student, teacher, **options):
    logits = student["student_hidden"].double() @ student["student_weight"].double().T
    teacher_logits = teacher["teacher_hidden"].double() @ teacher["teacher_weight"].double().T
    if "student_bias" in student:
        logits = logits + student["student_bias"].double()
        teacher_logits = teacher_logits + teacher["teacher_bias"].double()
    return kdcore.kd_loss(logits, teacher_logits, backend="reference", **options)


def grads(loss, student):
    return torch.autograd.grad(loss, list(student.values()))


def labels_for(n, vocab, seed=1):
    labels = torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))
    labels[::5] = -100
    return labels.to(TEST_DEVICE)


CASES = {
    "forward_kl": dict(divergence="forward_kl", temperature=2.0),
    "reverse_kl+ce": dict(divergence="reverse_kl", ce_weight=0.5, labels=True),
    "jsd+mask": dict(divergence="jsd", beta=0.3, mask=True),
    "skew_kl sum": dict(divergence="skew_kl", alpha=0.2, reduction="sum"),
    "tvd normalizer": dict(divergence="tvd", normalizer=100.0, t2_scale=False, temperature=0.7),
}


def options_for(case, n):
    options = dict(CASES[case])
    if options.pop("labels", False):
        options["labels"] = labels_for(n, 50)
    if options.pop("mask", False):
        options["mask"] = (torch.arange(n) % 3 != 0).to(TEST_DEVICE)
    return options


def matrix():
    """Every case at every chunk size on each backend; the chunking is the same Python code for
    every backend, so the Triton kernels (interpreted on CPU, slowly) see every case at one chunk
    size that splits the rows unevenly."""
    for backend in BACKENDS:
        interpreted = backend == "triton" and TEST_DEVICE == "cpu"
        for chunk_size in ([8] if interpreted else [1, 8, None, 1000]):
            for case in CASES:
                yield pytest.param(backend, case, chunk_size, id=f"{backend}-{case}-{chunk_size}")


@pytest.mark.parametrize("backend, case, chunk_size", list(matrix()))
def test_matches_materialized_logits(backend, case, chunk_size):
    dtype = torch.float64 if backend == "reference" else torch.float32
    student, teacher = problem(dtype=dtype)
    options = options_for(case, 37)
    loss = kdcore.fused_linear_kd_loss(**student, **teacher, chunk_size=chunk_size, backend=backend, **options)
    expected = unfused(student, teacher, **options)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), expected, **tolerance)
    for ours, theirs in zip(grads(loss, student), grads(expected, student)):
        torch.testing.assert_close(ours.double(), theirs.double(), **tolerance)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_leading_dimensions_no_bias_and_vocabulary_mismatch(backend):
    student, teacher = problem(leading=(3, 5), vs=50, vt=64, bias=False)
    labels = labels_for(15, 40).reshape(3, 5)
    options = dict(labels=labels, ce_weight=0.2, vocab_size=40, temperature=1.5)
    loss = kdcore.fused_linear_kd_loss(**student, **teacher, chunk_size=4, backend=backend, **options)
    expected = unfused(student, teacher, **options)
    torch.testing.assert_close(loss.double(), expected)
    ours, theirs = grads(loss, student), grads(expected, student)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double())
    assert ours[1][40:].abs().max() == 0  # student vocabulary past the shared part gets no gradient


def test_gradcheck_float64():
    student, teacher = problem(n=9, hs=4, ht=5, vs=7, vt=7)
    labels = labels_for(9, 7)

    def loss(hidden, weight, bias):
        return kdcore.fused_linear_kd_loss(hidden, weight, teacher["teacher_hidden"], teacher["teacher_weight"],
                                           student_bias=bias, teacher_bias=teacher["teacher_bias"], chunk_size=4,
                                           divergence="jsd", labels=labels, ce_weight=0.3, backend="reference")

    assert torch.autograd.gradcheck(loss, tuple(student.values()))


def test_upstream_gradient_scales_everything():
    student, teacher = problem(dtype=torch.float32)
    loss = kdcore.fused_linear_kd_loss(**student, **teacher, chunk_size=8)
    once = grads(loss, student)
    loss = kdcore.fused_linear_kd_loss(**student, **teacher, chunk_size=8)
    thrice = grads(3 * loss, student)
    for a, b in zip(once, thrice):
        torch.testing.assert_close(3 * a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_twice_pytorchs(dtype):
    """Against float64, the error of the fused path is at most 2x that of the same computation
    written with plain PyTorch ops at that precision (an nn.Linear head in the half dtype, the
    loss in fp32)."""
    backend = next(b for b in BACKENDS if b != "triton")
    student, teacher = problem(n=64, hs=32, ht=48, vs=300, vt=300, dtype=dtype, seed=3)
    exact_student = {k: v.detach().double().requires_grad_(True) for k, v in student.items()}
    exact = unfused(exact_student, teacher, temperature=2.0)
    exact_grads = grads(exact, exact_student)

    def pytorch(student):  # an nn.Linear head, then the loss in fp32
        logits = F.linear(student["student_hidden"], student["student_weight"], student["student_bias"])
        teacher_logits = F.linear(teacher["teacher_hidden"], teacher["teacher_weight"], teacher["teacher_bias"])
        log_q = (logits.float() / 2).log_softmax(-1)
        log_p = (teacher_logits.float() / 2).log_softmax(-1)
        return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / 64 * 4

    theirs = pytorch(student)
    theirs_grads = grads(theirs, student)
    ours = kdcore.fused_linear_kd_loss(**student, **teacher, temperature=2.0, chunk_size=16, backend=backend)
    ours_grads = grads(ours, student)
    assert abs(float(ours.detach()) - float(exact.detach())) <= 2 * abs(float(theirs.detach()) - float(exact.detach())) + 1e-6
    for mine, reference, exact_grad in zip(ours_grads, theirs_grads, exact_grads):
        assert mine.dtype == dtype
        my_error = (mine.double() - exact_grad).abs().max()
        torch_error = (reference.double() - exact_grad).abs().max()
        assert my_error <= 2 * torch_error + 1e-6


SPARSE_BACKENDS = [b for b in BACKENDS if "kd_loss_sparse" in kdcore.backends()[b].families]


def sparse_teacher_for(teacher, k=12):
    logits = teacher["teacher_hidden"].double() @ teacher["teacher_weight"].double().T + teacher["teacher_bias"].double()
    logprobs, indices = torch.log_softmax(logits / 1.5, -1).topk(k, dim=-1)
    return kdcore.SparseTeacher(indices, logprobs.float())


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparse_teacher_matches_materialized_logits(backend, case, mode):
    """teacher= a SparseTeacher (a cached teacher): chunk by chunk against kd_loss on full logits."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    student, teacher = problem(dtype=dtype)
    sparse = sparse_teacher_for(teacher)
    options = options_for(case, 37)
    loss = kdcore.fused_linear_kd_loss(**student, teacher=sparse, sparse_mode=mode, chunk_size=8, backend=backend,
                                       **options)
    logits = student["student_hidden"].double() @ student["student_weight"].double().T + student["student_bias"].double()
    expected = kdcore.kd_loss(logits, sparse, sparse_mode=mode, backend="reference", **options)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), expected, **tolerance)
    for ours, theirs in zip(grads(loss, student), grads(expected, student)):
        torch.testing.assert_close(ours.double(), theirs.double(), **tolerance)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparse_teacher_unused_slots_are_dropped(backend, mode):
    """Slots of log-probability -inf (here with indices that repeat an entry or are out of range)
    change nothing, chunk by chunk: the loss and gradients of the teacher without them."""
    student, teacher = problem(dtype=torch.float64 if backend == "reference" else torch.float32)
    sparse = sparse_teacher_for(teacher)
    n = sparse.indices.shape[0]
    junk = torch.stack([sparse.indices[:, 3], torch.full((n,), -1, device=TEST_DEVICE), sparse.indices[:, 0]], 1)
    padded = kdcore.SparseTeacher(torch.cat([junk[:, :1], sparse.indices, junk[:, 1:]], 1),
                                  torch.cat([torch.full((n, 1), -torch.inf, device=TEST_DEVICE), sparse.logprobs,
                                             torch.full((n, 2), -torch.inf, device=TEST_DEVICE)], 1))
    options = dict(sparse_mode=mode, chunk_size=8, backend=backend, divergence="reverse_kl", temperature=1.5,
                   labels=labels_for(n, 50), ce_weight=0.3)
    ours = kdcore.fused_linear_kd_loss(**student, teacher=padded, **options)
    theirs = kdcore.fused_linear_kd_loss(**student, teacher=sparse, **options)
    torch.testing.assert_close(ours, theirs)
    for mine, reference in zip(grads(ours, student), grads(theirs, student)):
        torch.testing.assert_close(mine, reference)


def test_sparse_teacher_errors_name_the_row():
    student, teacher = problem()
    sparse = sparse_teacher_for(teacher)
    indices = sparse.indices.clone()
    indices[20, 1] = indices[20, 0]
    with pytest.raises(ValueError, match=r"row 4 of the sparse teacher lists a vocabulary index twice.*from row 16"):
        kdcore.fused_linear_kd_loss(**student, teacher=kdcore.SparseTeacher(indices, sparse.logprobs), chunk_size=8)
    with pytest.raises(TypeError, match="either the teacher's head .* or teacher=, not both"):
        kdcore.fused_linear_kd_loss(**student, **teacher, teacher=sparse)
    with pytest.raises(TypeError, match="the teacher is missing"):
        kdcore.fused_linear_kd_loss(**student)


@pytest.mark.parametrize("change, error, match", [
    (dict(reduction="none"), ValueError, r"reduction='none' is not supported"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be at least 1, got 0"),
    (dict(chunk_size=2.5), TypeError, r"chunk_size must be an int, got float"),
    (dict(teacher_weight=torch.randn(50, 24, dtype=torch.float64, requires_grad=True)), ValueError,
     r"teacher_weight requires grad, but the fused path computes no teacher gradient"),
    (dict(student_weight=torch.randn(50, 15, dtype=torch.float64)), ValueError,
     r"student_weight must have shape \[V, 16\] \(vocabulary x the hidden size of student_hidden\), got \(50, 15\)"),
    (dict(student_weight=torch.randn(50, 16)), TypeError,
     r"student_weight is torch.float32 but student_hidden is torch.float64; they must match"),
    (dict(teacher_weight=torch.randn(64, 24, dtype=torch.float64), teacher_bias=torch.randn(64, dtype=torch.float64)),
     ValueError, r"teacher_weight has vocabulary size 64 but student_weight has 50; pass vocab_size=50"),
    (dict(student_bias=torch.randn(49, dtype=torch.float64)), ValueError, r"student_bias must have shape \[50\]"),
    (dict(teacher_hidden=torch.randn(36, 24, dtype=torch.float64)), ValueError,
     r"student_hidden \(37, 16\) and teacher_hidden \(36, 24\) must have the same leading dimensions"),
    (dict(labels=torch.zeros(36, dtype=torch.long)), ValueError, r"labels must have shape \(37,\)"),
])
def test_bad_input_is_named(change, error, match):
    student, teacher = problem()
    arguments = {**student, **teacher, **{k: v.to(TEST_DEVICE) if isinstance(v, torch.Tensor) else v
                                        for k, v in change.items()}}
    with pytest.raises(error, match=match):
        kdcore.fused_linear_kd_loss(**arguments)


@pytest.mark.skipif(TEST_DEVICE != "cpu" or not sys.platform.startswith("linux"),
                    reason="measures the process's resident memory (Linux, CPU)")
def test_extra_memory_is_bounded_by_the_chunk():
    """N = 4096 rows of a 16 384-token vocabulary: materialized logits (student, teacher and the
    student's gradient) are 3 x 256 MiB; the fused path must stay within a few chunks."""
    script = """
import json, torch, kdcore
from benchmarks.common import peak_extra_bytes
torch.manual_seed(0)
n, h, v, chunk = 4096, 64, 16384, 256
hs, ws = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
ht, wt = torch.randn(n, h), torch.randn(v, h)

def fused():
    kdcore.fused_linear_kd_loss(hs, ws, ht, wt, chunk_size=chunk).backward()

def materialized():
    kdcore.kd_loss(hs @ ws.T, ht @ wt.T).backward()

fused(); hs.grad = ws.grad = None
print(json.dumps({"fused": peak_extra_bytes(fused, torch.device("cpu")),
                  "materialized": peak_extra_bytes(materialized, torch.device("cpu"))}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["fused"] is None:
        pytest.skip("this platform gives no resident-memory high-water mark")
    chunk_bytes = 256 * 16384 * 4
    weight_grads = 2 * 16384 * 64 * 4  # fp32 accumulator and the returned gradient
    assert measured["fused"] <= 6 * chunk_bytes + weight_grads + (8 << 20), measured
    assert measured["materialized"] >= 2 * 4096 * 16384 * 4, measured
