"""The Triton kernels with the tile sizes they use on a GPU (the shared suite runs them with small
interpreter tiles): a row held whole in one 4 096-column tile, and a longer row swept in 4 096-column
tiles; the launches' device, the status check's device reads, and the kernels' sm_90 compilation.
Runs through the interpreter where there is no GPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch

import kdcore
from kdcore.ops.triton import interpreted

pytestmark = pytest.mark.skipif(not kdcore.backends()["triton"].available, reason="the triton backend is unavailable")


@pytest.fixture
def gpu_tiling(monkeypatch):
    if interpreted():
        from kdcore.ops.triton import kd_loss as kernels

        monkeypatch.setattr(kernels, "INTERPRETED_TILING", kernels.GPU_TILING)


@pytest.mark.parametrize("vocab", [4096, 33001])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_gpu_tile_sizes(gpu_tiling, vocab, divergence):
    device = "cpu" if interpreted() else "cuda"
    s = torch.randn(3, vocab, device=device) * 3
    t = torch.randn(3, vocab, device=device) * 3
    t[1, : vocab // 2] = -torch.inf
    labels = torch.tensor([5, 0, vocab - 1], device=device)
    results = []
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        student, teacher = (x.detach().to(dtype).requires_grad_(True) for x in (s, t))
        loss = kdcore.kd_loss(student, teacher, divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.25,
                              backend=backend)
        loss.backward()
        results.append((loss.detach(), student.grad, teacher.grad))
    for got, exact in zip(results[1], results[0]):  # float32 rounding, relative to each tensor's scale
        assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("vocab", [100, 1500], ids=["single_tile", "multi_tile"])
def test_cross_entropy_of_huge_logits(vocab):
    """Student logits near 1e6 (a float32 ulp of 0.06 there): the CE row loss max - z_label + log Σ
    keeps its few units only if the logits' magnitude cancels before the log-sum is added."""
    from oracle import oracle_loss

    device = "cpu" if interpreted() else "cuda"
    s, t = torch.randn(4, vocab, device=device) + 1.0e6, torch.randn(4, vocab, device=device)
    labels = torch.tensor([0, 7, vocab - 1, 42], device=device)
    options = dict(labels=labels, ce_weight=1.0, temperature=2.0, reduction="none")
    rows = kdcore.kd_loss(s, t, backend="triton", **options)
    expected = oracle_loss(s.double(), t.double(), **options)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)


COMPILE_FOR_HOPPER = """
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdcore.ops.triton.kd_loss import GPU_TILING, kd_loss_kernel

divergence, single_tile = int(sys.argv[1]), sys.argv[2] == "1"
signature = {"S": "*bf16", "T": "*bf16", "GS": "*bf16", "GT": "*bf16", "LABELS": "*i64", "MASK": "*i1",
             "DIVISOR": "*fp32", "PARAMS": "*fp32", "ROW_LOSS": "*fp32", "STATUS": "*i8", "s_stride": "i64",
             "t_stride": "i64", "gs_stride": "i64", "gt_stride": "i64", "n_cols": "i32", "ignore_index": "i64"}
constexprs = dict(DIVERGENCE=divergence, HAS_LABELS=True, HAS_MASK=True, HAS_CE=True, STUDENT_GRAD=True,
                  TEACHER_GRAD=True, NEEDS_ROW_SUMS=True, SINGLE_TILE=single_tile, ACC=tl.float32, FAST=True,
                  BLOCK=GPU_TILING["max_single_tile"] if single_tile else GPU_TILING["block"])
signature.update({name: "constexpr" for name in constexprs})
source = ASTSource(fn=kd_loss_kernel, signature=signature,
                   constexprs={(kd_loss_kernel.arg_names.index(k),): v for k, v in constexprs.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16 if single_tile else 8})
print(".entry kd_loss_kernel" in compiled.asm["ptx"])
"""


@pytest.mark.parametrize("divergence, single_tile", [(0, True), (2, False)])
def test_kernel_compiles_for_hopper(divergence, single_tile):
    """Lowers the kernel through Triton's whole pipeline to PTX for sm_90 (no GPU needed; in a
    process without the interpreter): catches what the interpreter cannot (typing, layouts)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(divergence), str(int(single_tile))],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-3000:]


COMPILE_SPARSE_FOR_HOPPER = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdcore.ops.triton.kd_loss_sparse import GPU_BLOCK, MAX_WINDOW, fill_kernel, row_stats_kernel

def build(kernel, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return f".entry {kernel.fn.__name__}" in compiled.asm["ptx"]

stats = build(row_stats_kernel, {"S": "*bf16", "IDX": "*i64", "OUT": "*fp64", "INV_T": "*fp32", "s_stride": "i64",
                                 "n_cols": "i32", "k": "i32"},
              dict(WITH_TAIL=True, WITH_T1=True, BLOCK=GPU_BLOCK, WINDOW=MAX_WINDOW, ACC=tl.float32))
fill = build(fill_kernel, {"S": "*bf16", "G": "*bf16", "KEPT": "*i1", "LABELS": "*i64", "PARAMS": "*fp32",
                           "INV_T": "*fp32", "s_stride": "i64", "g_stride": "i64", "n_cols": "i32"},
             dict(HAS_CE=True, BLOCK=GPU_BLOCK, ACC=tl.float32))
print(stats and fill)
"""


def test_sparse_kernels_compile_for_hopper():
    """The sparse family's Triton kernels (with the data-dependent window loop) lowered to PTX."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SPARSE_FOR_HOPPER], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-3000:]


# -- launches on the tensors' device ----------------------------------------------------------------

def test_launch_device_is_the_tensors_cuda_device(monkeypatch):
    """CUDA tensors launch under torch.cuda.device(their device); the interpreter's CPU tensors
    launch under no device at all (torch.cuda is not touched)."""
    from kdcore.ops.triton.kd_loss import launch_device

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with launch_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


class _Recorder:
    """Stands in for launch_device: records the devices launches are guarded with, and wraps the
    kernels so that a launch outside the guard fails."""

    def __init__(self):
        self.devices, self.inside = [], False

    @contextlib.contextmanager
    def guard(self, tensor):
        self.devices.append(tensor.device)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def kernel(self, kernel):
        recorder = self

        class Guarded:
            def __getitem__(self, grid):
                assert recorder.inside, "a Triton kernel was launched outside launch_device"
                return kernel[grid]

        return Guarded()


@pytest.mark.skipif(not interpreted(), reason="checks the launches through the interpreter")
def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    from kdcore.ops.triton import kd_loss as dense
    from kdcore.ops.triton import kd_loss_sparse as sparse

    recorder = _Recorder()
    for module in (dense, sparse):
        monkeypatch.setattr(module, "launch_device", recorder.guard)
    for module, name in ((dense, "kd_loss_kernel"), (sparse, "row_stats_kernel"), (sparse, "fill_kernel")):
        monkeypatch.setattr(module, name, recorder.kernel(getattr(module, name)))
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    labels = torch.tensor([1, 2, 3])
    launches = {}
    for what, run in {
        "dense": lambda: kdcore.kd_loss(s.clone().requires_grad_(True), t, backend="triton").backward(),
        "dense inplace": lambda: kdcore.kd_loss(s.clone().requires_grad_(True) * 1.0, t, inplace_grad=True,
                                                backend="triton").backward(),
        "sparse row_stats and fill": lambda: kdcore.kd_loss(
            s.clone().requires_grad_(True), kdcore.SparseTeacher(*torch.topk(t.log_softmax(-1), 5)[::-1]),
            labels=labels, ce_weight=0.5, backend="triton").backward(),
    }.items():
        recorder.devices.clear()
        run()
        launches[what] = list(recorder.devices)
    assert launches == {"dense": [s.device], "dense inplace": [s.device],
                        "sparse row_stats and fill": [s.device, s.device]}


# -- status: one read per call, none while capturing ----------------------------------------------

def test_stream_capturing_asks_torch_cuda_only_for_cuda_devices(monkeypatch):
    from kdcore.ops import status

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert status.stream_is_capturing(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: pytest.fail("asked for a CPU tensor"))
    assert not status.stream_is_capturing(torch.device("cpu"))


@pytest.fixture
def status_reads(monkeypatch):
    """Counts the status check's device reads; ``status_reads.capturing = True`` makes the check
    believe a CUDA graph is being captured."""
    from kdcore.ops import status

    counter = types.SimpleNamespace(reads=0, capturing=False)
    read = status._to_host

    def counting_read(tensor):
        counter.reads += 1
        return read(tensor)

    monkeypatch.setattr(status, "_to_host", counting_read)
    monkeypatch.setattr(status, "stream_is_capturing", lambda device: counter.capturing)
    return counter


def _failing_rows_problem():
    """Row 1 entirely -inf in the student, row 3's label out of range; rows 0 and 2 fine."""
    s, t = torch.randn(4, 60), torch.randn(4, 60)
    s[1] = -torch.inf
    return s, t, torch.tensor([3, 4, 5, 60])


@pytest.mark.skipif(not interpreted(), reason="counts the reads through the interpreter")
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_one_status_read_per_call(status_reads, inplace):
    s, t = torch.randn(4, 60, requires_grad=True), torch.randn(4, 60)
    loss = kdcore.kd_loss(s * 1.0, t, labels=torch.tensor([3, 4, 5, 6]), ce_weight=0.5,
                          inplace_grad=inplace, backend="triton")
    loss.backward()
    assert status_reads.reads == 1
    s, t, labels = _failing_rows_problem()
    with pytest.raises(ValueError, match=r"row 1 .*entirely -inf"):
        kdcore.kd_loss(s.requires_grad_(True) * 1.0, t, labels=labels, ce_weight=0.5, inplace_grad=inplace,
                       backend="triton")
    assert status_reads.reads == 2


@pytest.mark.skipif(not interpreted(), reason="counts the reads through the interpreter")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_failures_while_capturing_are_nan_rows(status_reads, divergence):
    status_reads.capturing = True
    s, t, labels = _failing_rows_problem()
    student = s.clone().requires_grad_(True)
    rows = kdcore.kd_loss(student, t, labels=labels, ce_weight=0.5, divergence=divergence, reduction="none",
                          backend="triton")
    rows.sum().backward()
    assert status_reads.reads == 0
    assert torch.isnan(rows[[1, 3]]).all() and torch.isnan(student.grad[[1, 3]]).all()
    fine = [0, 2]
    expected = kdcore.kd_loss(s[fine], t[fine], labels=labels[fine], ce_weight=0.5, divergence=divergence,
                              reduction="none", backend="reference")
    torch.testing.assert_close(rows[fine], expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(student.grad[fine]).all()
