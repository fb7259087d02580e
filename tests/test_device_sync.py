"""What a kd_loss call asks of the host on a GPU: at most one status read in the forward pass,
none in the backward pass, none at all while a CUDA graph is captured (failed rows are NaN then),
launches on the tensors' device, and a Python normalizer filled on the device, not copied there.

The CPU checks stand in for the device with mocks (a ``meta`` tensor has a device and no values,
so any host read of it fails); with ``KDCORE_TEST_DEVICE=cuda`` the same properties are measured
on the GPU with torch's synchronization debug mode.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import kdcore
from conftest import TEST_DEVICE, device_backends
from kdcore.ops import kd_loss as kd_loss_ops

on_cuda = pytest.mark.skipif(torch.device(TEST_DEVICE).type != "cuda", reason="runs with KDCORE_TEST_DEVICE=cuda")


def test_backward_leaves_a_device_factor_to_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(kd_loss_ops, "_scale_unless_one_on_device",
                        lambda grad, upstream: calls.append((grad, upstream)) or True)
    grad = torch.empty(3, 5, device="meta")
    upstream = torch.empty((), device="meta")
    assert kd_loss_ops._scaled(grad, upstream, rowwise=False, in_place=True) is grad
    assert calls == [(grad, upstream)]  # no .item(): a meta tensor would have raised


def test_backward_multiplies_where_no_device_kernel_exists():
    grad = torch.ones(2, 3)
    assert not kd_loss_ops._scale_unless_one_on_device(grad, torch.tensor(2.0))  # a CPU tensor
    out = kd_loss_ops._scaled(grad.clone(), torch.tensor(2.0), rowwise=False, in_place=True)
    assert torch.equal(out, torch.full((2, 3), 2.0))
    one = torch.ones(2, 3)
    assert kd_loss_ops._scaled(one, torch.tensor(1.0), rowwise=False, in_place=True) is one


def test_python_normalizer_is_filled_on_the_device_not_copied(monkeypatch):
    def no_host_copy(*args, **kwargs):
        raise AssertionError("torch.tensor(...) would copy the normalizer from the host")

    s = torch.randn(4, 10)
    t = torch.randn(4, 10)
    expected = kdcore.kd_loss(s, t, normalizer=torch.tensor(3.0), backend="reference")
    monkeypatch.setattr(torch, "tensor", no_host_copy)
    assert torch.equal(kdcore.kd_loss(s, t, normalizer=3.0, backend="reference"), expected)


def test_host_normalizer_tensor_for_device_rows_is_read_on_the_host():
    from kdcore.functional import loss_options, row_arguments

    rows = torch.empty(4, 10, device="meta")
    options = loss_options("kd_loss", divergence="forward_kl", temperature=1.0, beta=0.5, alpha=0.1, t2_scale=True,
                           kd_weight=1.0, ce_weight=0.0, ignore_index=-100, reduction="batchmean")
    _, _, normalizer = row_arguments("kd_loss", rows, torch.Size([4]), None, None, torch.tensor(8.0), options)
    assert normalizer.device.type == "meta" and normalizer.shape == ()


@on_cuda
def test_scale_kernel_skips_a_factor_of_one_and_scales_otherwise():
    grad = torch.randn(7, 33, device="cuda", dtype=torch.bfloat16)
    before = grad.clone()
    assert kd_loss_ops._scale_unless_one_on_device(grad, torch.ones((), device="cuda"))
    assert torch.equal(grad, before)
    assert kd_loss_ops._scale_unless_one_on_device(grad, torch.full((), 2.5, device="cuda", dtype=torch.float64))
    torch.testing.assert_close(grad, (before.double() * 2.5).to(torch.bfloat16))


def _synchronizations(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@on_cuda
@pytest.mark.parametrize("backend", [b for b in device_backends() if b in ("cuda", "triton")])
def test_one_status_read_forward_none_backward(backend):
    s = torch.randn(64, 5003, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(64, 5003, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 5003, (64,), device="cuda")
    holder = {}

    def forward():
        holder["loss"] = kdcore.kd_loss(s, t, labels=labels, ce_weight=0.5, temperature=2.0, backend=backend,
                                        normalizer=17.0)

    assert _synchronizations(forward) <= 1
    assert _synchronizations(lambda: holder["loss"].backward()) == 0


@on_cuda
@pytest.mark.parametrize("backend", [b for b in device_backends() if b in ("cuda", "triton")])
def test_failed_rows_are_nan_while_capturing(backend):
    s = torch.randn(4, 1000, device="cuda")
    t = torch.randn(4, 1000, device="cuda")
    s[2] = -torch.inf  # an all -inf kept row: an error outside capture
    with pytest.raises(ValueError, match="entirely -inf"):
        kdcore.kd_loss(s, t, backend=backend, reduction="none")
    kdcore.kd_loss(s[:1], t[:1], backend=backend, reduction="none")  # warm up (compile, plan) outside capture
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        rows = kdcore.kd_loss(s, t, backend=backend, reduction="none")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


@on_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [b for b in device_backends() if b in ("cuda", "triton")])
def test_launches_on_the_tensors_device(backend):
    s = torch.randn(8, 3001, device="cuda:1", requires_grad=True)
    t = torch.randn(8, 3001, device="cuda:1")
    with torch.cuda.device(0):
        loss = kdcore.kd_loss(s, t, backend=backend)
        loss.backward()
    expected = kdcore.kd_loss(s.detach().cpu(), t.cpu(), backend="reference")
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-6)
