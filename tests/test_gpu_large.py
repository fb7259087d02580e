"""A problem past 2^31 elements on the GPU (N = 16 384 rows of V = 262 144 bf16 logits: 4.3 * 10^9
elements), where 32-bit indexing would wrap: the GPU backends' losses and gradients on rows at the
start, the middle and the end against the float64 oracle on those rows. Runs with
KDCORE_TEST_DEVICE=cuda on a GPU with ~30 GB free (tools/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

import kdcore
from cases import assert_within_rule
from conftest import TEST_DEVICE, device_backends
from oracle import oracle_with_grads

pytestmark = pytest.mark.skipif(torch.device(TEST_DEVICE).type != "cuda", reason="runs with KDCORE_TEST_DEVICE=cuda")

N, V = 16384, 262144


@pytest.mark.parametrize("backend", [b for b in device_backends() if b in ("cuda", "triton")])
def test_rows_beyond_two_to_the_31_elements(backend):
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = (torch.randn(N, V, device="cuda", generator=generator) * 2).to(torch.bfloat16).requires_grad_(True)
    teacher = (torch.randn(N, V, device="cuda", generator=generator) * 2).to(torch.bfloat16)
    rows = kdcore.kd_loss(student, teacher, temperature=2.0, reduction="none", backend=backend)
    rows.sum().backward()
    picked = torch.tensor([0, N // 2, N - 1], device="cuda")
    s, t = student.detach()[picked], teacher[picked]
    exact, exact_grad, _ = oracle_with_grads(s, t, temperature=2.0, reduction="none")
    own, own_grad, _ = oracle_with_grads(s, t, temperature=2.0, reduction="none", compute_dtype=torch.bfloat16)
    assert_within_rule("loss", rows.detach()[picked], exact, own, torch.float32)
    assert_within_rule("student gradient", student.grad[picked], exact_grad, own_grad, torch.bfloat16)
