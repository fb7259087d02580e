"""Every CPU backend against the float64 oracle, on every case and divergence: loss and gradients."""

from __future__ import annotations

import pytest
import torch

import kdcore
from cases import ALL_DIVERGENCES, CASES, DTYPE_CASES, assert_within_rule, check_backend_on_case
from oracle import oracle_with_grads
from conftest import device_backends


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", device_backends())
def test_float32_matches_float64_oracle(backend, divergence, case):
    check_backend_on_case(kdcore.kd_loss, backend, case, divergence, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", device_backends())
def test_half_precision_within_twice_torch_error(backend, divergence, case, dtype):
    check_backend_on_case(kdcore.kd_loss, backend, case, divergence, dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"basic", "labels_ce", "multi_tile"}],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("backend", device_backends())
def test_float64_matches_float64_oracle(backend, divergence, case):
    check_backend_on_case(kdcore.kd_loss, backend, case, divergence, torch.float64)


MIXED_PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student_grad", "both_grads"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(("student_dtype", "teacher_dtype"), MIXED_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", device_backends())
def test_mixed_dtypes_read_as_they_are(backend, student_dtype, teacher_dtype, divergence, teacher_grad):
    """Student and teacher of different dtypes (rows of 1025 columns: not 16-byte aligned in 16-bit
    types) against the float64 oracle on the same values, by the rule of the shared cases with
    float32 as the computation's precision and each gradient rounded to its input's dtype."""
    student32, teacher32, options = CASES[2].make()  # rows_none: [4, 1025], T = 0.7
    options = {**options, "reduction": "batchmean", "divergence": divergence}
    s = student32.to(student_dtype).requires_grad_(True)
    t = teacher32.to(teacher_dtype).requires_grad_(teacher_grad)
    loss = kdcore.kd_loss(s, t, backend=backend, **options)
    loss.backward()
    exact, exact_gs, exact_gt = oracle_with_grads(s, t, **options)
    own, own_gs, own_gt = oracle_with_grads(s, t, compute_dtype=torch.float32, **options)
    assert_within_rule("loss", loss, exact, own, torch.float32)
    assert s.grad.dtype == student_dtype
    assert_within_rule("student gradient", s.grad, exact_gs, own_gs, student_dtype)
    if teacher_grad:
        assert t.grad.dtype == teacher_dtype
        assert_within_rule("teacher gradient", t.grad, exact_gt, own_gt, teacher_dtype)
    else:
        assert t.grad is None
