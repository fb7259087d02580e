"""kd_loss(..., inplace_grad=True): the student gradient is written over the student logits, with
the same values as the out-of-place path, no [N, V] allocation, and clear errors where writing in
place would be wrong."""

from __future__ import annotations

import pytest
import torch

import kdcore
from cases import ALL_DIVERGENCES
from conftest import device_backends

backends = pytest.mark.parametrize("backend", device_backends())


def _head_and_teacher(n_rows: int, vocab: int, dtype=torch.float32, leading=()):
    """A tiny LM head, so the logits are a non-leaf tensor as in real use, and teacher logits."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*leading, n_rows, 16, generator=gen)
    weight = torch.randn(16, vocab, generator=gen).mul_(0.5).to(dtype).requires_grad_(True)
    teacher = (torch.randn(*leading, n_rows, vocab, generator=gen) * 2).to(dtype)
    return hidden, weight, teacher


def _loss_and_grad(hidden, weight, teacher, inplace: bool, teacher_weight=None, **options):
    weight.grad = None
    logits = hidden.to(weight.dtype) @ weight
    teacher_logits = teacher if teacher_weight is None else hidden.to(teacher_weight.dtype) @ teacher_weight
    loss = kdcore.kd_loss(logits, teacher_logits, inplace_grad=inplace, **options)
    upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.5)
    loss.backward(upstream)
    return loss.detach(), weight.grad.clone()


@backends
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("vocab", [700, 3001])
@pytest.mark.parametrize("options", [{}, {"ce_weight": 0.5, "temperature": 2.0}, {"reduction": "none"},
                                     {"reduction": "sum", "temperature": 0.7}],
                         ids=["batchmean", "ce_T2", "none", "sum"])
def test_same_values_as_out_of_place(backend, divergence, vocab, options):
    hidden, weight, teacher = _head_and_teacher(6, vocab)
    labels = torch.tensor([3, -100, 0, vocab - 1, 17, 5])
    kwargs = {"divergence": divergence, "backend": backend, "labels": labels, **options}
    loss, grad = _loss_and_grad(hidden, weight, teacher, False, **kwargs)
    loss_inplace, grad_inplace = _loss_and_grad(hidden, weight, teacher, True, **kwargs)
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, grad, rtol=1e-6, atol=1e-6)


@backends
def test_bf16_three_d_and_teacher_gradient(backend):
    hidden, weight, _ = _head_and_teacher(5, 900, torch.bfloat16, leading=(2,))
    teacher_weight = torch.randn(16, 900, dtype=torch.bfloat16, requires_grad=True)
    kwargs = {"divergence": "jsd", "backend": backend, "temperature": 2.0}
    loss, grad = _loss_and_grad(hidden, weight, None, False, teacher_weight, **kwargs)
    teacher_grad = teacher_weight.grad.clone()
    teacher_weight.grad = None
    loss_inplace, grad_inplace = _loss_and_grad(hidden, weight, None, True, teacher_weight, **kwargs)
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, grad, rtol=0, atol=0)
    torch.testing.assert_close(teacher_weight.grad, teacher_grad, rtol=0, atol=0)


@backends
def test_gradient_is_the_logits_buffer(backend):
    hidden, weight, teacher = _head_and_teacher(4, 1000)
    logits = hidden @ weight
    seen = []
    logits.register_hook(seen.append)
    kdcore.kd_loss(logits, teacher, inplace_grad=True, backend=backend).backward()
    assert seen[0].data_ptr() == logits.data_ptr()  # handed out as it is: nothing [N, V] was allocated
    assert not torch.equal(logits.detach(), (hidden @ weight).detach())  # the logits were overwritten


@backends
def test_nothing_is_written_without_a_student_gradient(backend):
    hidden, weight, teacher = _head_and_teacher(4, 500)
    with torch.no_grad():
        logits = hidden @ weight
        before = logits.clone()
        kdcore.kd_loss(logits, teacher, inplace_grad=True, backend=backend)
    assert torch.equal(logits, before)


def test_another_use_of_the_logits_is_refused():
    hidden, weight, teacher = _head_and_teacher(4, 500)
    logits = hidden @ weight
    other = logits.pow(2).sum()  # pow saves its input: it would read gradients as logits
    loss = kdcore.kd_loss(logits, teacher, inplace_grad=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_runs_once():
    hidden, weight, teacher = _head_and_teacher(4, 500)
    loss = kdcore.kd_loss(hidden @ weight, teacher, inplace_grad=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda w, t: (torch.randn(4, 500, requires_grad=True), t), "not a leaf tensor"),
        (lambda w, t: ((torch.randn(500, 4) @ torch.randn(4, 4, requires_grad=True)).t(), t), "without a copy"),
        (lambda w, t: (torch.randn(4, 16) @ w, None), "share student_logits' memory"),
    ],
    ids=["leaf", "transposed", "teacher_aliases"],
)
def test_bad_targets_raise(make, pattern):
    _, weight, teacher = _head_and_teacher(4, 500)
    student, teacher = make(weight, teacher)
    if teacher is None:
        teacher = student.detach()
    with pytest.raises(ValueError, match=pattern):
        kdcore.kd_loss(student, teacher, inplace_grad=True)


def test_partial_vocabulary_raises():
    hidden, weight, _ = _head_and_teacher(4, 500)
    with pytest.raises(ValueError, match="whole vocabulary"):
        kdcore.kd_loss(hidden @ weight, torch.randn(4, 400), vocab_size=400, inplace_grad=True)


def test_inplace_grad_must_be_bool():
    hidden, weight, teacher = _head_and_teacher(4, 500)
    with pytest.raises(TypeError, match="inplace_grad"):
        kdcore.kd_loss(hidden @ weight, teacher, inplace_grad="yes")


def test_kdloss_module_passes_inplace_grad():
    hidden, weight, teacher = _head_and_teacher(4, 500)
    with pytest.raises(TypeError, match="KDLoss: inplace_grad"):
        kdcore.KDLoss(inplace_grad=1)
    logits = hidden @ weight
    seen = []
    logits.register_hook(seen.append)
    kdcore.KDLoss("jsd", 2.0, inplace_grad=True)(logits, teacher).backward()
    assert seen[0].data_ptr() == logits.data_ptr()
