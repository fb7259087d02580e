"""The Triton kernels with the tile sizes they use on a GPU (the shared suite runs them with small
interpreter tiles): a row held whole in one 32 768-column tile, and a longer row swept in 4 096-column
tiles. Runs through the interpreter where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize("vocab", [32768, 33001])
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
                  TEACHER_GRAD=True, NEEDS_ROW_SUMS=True, SINGLE_TILE=single_tile, ACC=tl.float32,
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
