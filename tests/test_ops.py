"""The custom ops themselves: opcheck (schema, fake, autograd registration, AOT dispatch),
float64 gradcheck, torch.compile, and that the C++ and Python schemas are the same."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kdcore
from kdcore import _ext
from kdcore.divergences import DIVERGENCES, REDUCTIONS
from kdcore.ops.kd_loss import KD_LOSS_INPLACE_SIGNATURE, KD_LOSS_SIGNATURE
from cases import ALL_DIVERGENCES
from conftest import device_backends



def _op(backend, family="kd_loss"):
    """The backend's op for an op family, as registered by its plugin."""
    namespace, _, name = kdcore.plugins.host().backends.get(backend).ops[family].partition("::")
    return getattr(getattr(torch.ops, namespace), name)


def _op_args(student, teacher, *, labels=None, mask=None, normalizer=None, temperature=2.0, divergence="jsd",
             mix=0.4, t2_scale=True, kd_weight=1.0, ce_weight=0.0, ignore_index=-100, reduction="batchmean"):
    return (student, teacher, labels, mask, normalizer, temperature, DIVERGENCES[divergence].code, mix, t2_scale,
            kd_weight, ce_weight, ignore_index, REDUCTIONS[reduction], student.requires_grad, teacher.requires_grad)


def _samples():
    s = torch.randn(5, 33, requires_grad=True)
    t = torch.randn(5, 33)
    labels = torch.tensor([1, -100, 3, 32, 0])
    yield _op_args(s, t)
    yield _op_args(s, t.clone().requires_grad_(True), divergence="tvd", reduction="none")
    yield _op_args(s, t, divergence="forward_kl", labels=labels, ce_weight=0.5, reduction="sum")
    yield _op_args(s, t, divergence="skew_rkl", mask=torch.tensor([True, False, True, True, True]),
                   normalizer=torch.tensor(3.0))
    yield _op_args(s.detach().to(torch.bfloat16).requires_grad_(True), t, divergence="reverse_kl")
    yield _op_args(torch.randn(7, 1), torch.randn(7, 1), divergence="forward_kl")


@pytest.mark.parametrize("backend", device_backends())
def test_opcheck(backend):
    op = _op(backend)
    for args in _samples():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", device_backends())
def test_opcheck_inplace(backend):
    """The in-place ops declare their mutation of the student (autograd is kdcore.functional's)."""
    op = _op(backend, "kd_loss_inplace")
    for args in _samples():
        student = args[0].detach().clone()
        args = (student, args[1].detach()) + args[2:13] + (True, False)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", device_backends())
def test_gradcheck_float64(backend, divergence):
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, -100, 6])

    def loss(student, teacher):
        return kdcore.kd_loss(student, teacher, divergence=divergence, temperature=1.7, beta=0.3, alpha=0.2,
                              labels=labels, ce_weight=0.4, backend=backend)

    def rows(student, teacher):
        return kdcore.kd_loss(student, teacher, divergence=divergence, temperature=0.8, reduction="none",
                              backend=backend)

    assert torch.autograd.gradcheck(loss, (s, t))
    assert torch.autograd.gradcheck(rows, (s, t))


@pytest.mark.parametrize("backend", device_backends())
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph_matches_eager(backend, reduction):
    def step(student, teacher, labels):
        loss = kdcore.kd_loss(student, teacher, divergence="skew_kl", temperature=2.0, labels=labels,
                              ce_weight=0.3, reduction=reduction, backend=backend)
        return (loss * 1.5).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s = torch.randn(2, 6, 50)
    t = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, 0] = -100
    results = []
    for fn in (step, compiled):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_compile_before_any_eager_call():
    """The first kd_loss call of a process may be inside a compiled function: choosing the backend
    (which loads plugins and probes the machine) runs eagerly, outside the traced graph."""
    code = textwrap.dedent("""
        import torch, kdcore
        step = torch.compile(lambda s, t: kdcore.kd_loss(s, t, temperature=2.0), fullgraph=True,
                             backend="aot_eager")
        s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        loss = step(s, t)
        torch.testing.assert_close(loss, kdcore.kd_loss(s, t, temperature=2.0))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(_ext.status().core_error is not None, reason="kdcore._C is not built")
def test_cpp_schema_matches_python_schema():
    from kdcore import _C

    assert _C.kd_loss_signature == KD_LOSS_SIGNATURE
    assert _C.kd_loss_inplace_signature == KD_LOSS_INPLACE_SIGNATURE
