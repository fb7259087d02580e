"""Every CPU backend against the float64 oracle, on every case and divergence: loss and gradients."""

from __future__ import annotations

import pytest
import torch

import kdcore
from cases import ALL_DIVERGENCES, CASES, DTYPE_CASES, check_backend_on_case
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


@pytest.mark.parametrize("backend", device_backends())
def test_mixed_dtypes_bf16_student_fp32_teacher(backend):
    student32, teacher32, _ = CASES[0].make()
    s = student32.to(torch.bfloat16).requires_grad_(True)
    t = teacher32.requires_grad_(True)
    loss = kdcore.kd_loss(s, t, divergence="jsd", temperature=2.0, backend=backend)
    loss.backward()
    expected = kdcore.kd_loss(s.detach().float(), t.detach(), divergence="jsd", temperature=2.0, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert s.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.float32
