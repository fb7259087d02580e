"""fused_linear_kd_loss forward + backward: kdcore's chunked path on every available backend
against materialized logits in torch eager and torch.compile and (on CUDA, when installed)
Liger-Kernel's fused-linear JSD and chunked JSD loss, in one process.

    python -m benchmarks.fused_linear_kd                  # the ANCHORS.md problem for this device
    python -m benchmarks.fused_linear_kd --quick          # one small problem, a few seconds
    python -m benchmarks.fused_linear_kd --problems bfloat16:16384x2048x4096x128256

Prints one JSON line per (problem, implementation) (schema: benchmarks/common.py Result). The
limit is the matmul work no implementation can avoid -- the student's and the teacher's logits
forward (2·N·V·Hs + 2·N·V·Ht FLOPs), the student's hidden-state and weight gradients backward
(2 · 2·N·V·Hs): 2·N·V·(Ht + 3·Hs) FLOPs in all -- at the matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import kdcore
from benchmarks.common import (
    COMPILE_PEER,
    Result,
    add_common_arguments,
    compile_peer,
    measure,
    problems_for,
    results,
    time_fn,
)
from benchmarks.kd_loss import eager_loss

PROBLEMS = {  # dtype:N x Hs x Ht x V
    # CPUs without bf16 matmul units run bf16 GEMMs emulated, orders of magnitude below fp32: no
    # useful limit there, so the CPU default is fp32 (bf16 stays available through --problems)
    "cpu": ["float32:1024x512x1024x32000"],
    "cuda": ["bfloat16:8192x2048x4096x128256", "bfloat16:16384x2048x4096x128256"],
}
QUICK = {"cpu": ["float32:256x128x256x8192"], "cuda": ["bfloat16:2048x1024x2048x32000"]}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 4096) -> float:
    """The measured rate of a large square matmul in ``dtype``: the limit's denominator."""
    size = size if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_fn(lambda: a @ b, device, min_reps=5, max_reps=20, budget_s=1.0)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def liger_losses(temperature: float, beta: float) -> dict[str, Callable]:
    """Liger-Kernel's fused-linear JSD and its chunked JSD loss, where installed."""
    out = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        fused = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
        out["liger-fused-linear-jsd"] = lambda hs, ws, ht, wt: fused(hs, ws, ht, wt)
    except ImportError:
        pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                          temperature=temperature)
        out["liger-chunked-jsd"] = lambda hs, ws, ht, wt: chunked(hs, ws, ht, wt, torch.zeros(
            hs.shape[0], dtype=torch.long, device=hs.device))
    except ImportError:
        pass
    return out


def implementations(device: torch.device, args) -> dict[str, Callable]:
    options = dict(divergence=args.divergence, temperature=args.temperature, beta=args.beta)

    def kdcore_impl(backend):
        return lambda hs, ws, ht, wt: kdcore.fused_linear_kd_loss(hs, ws, ht, wt, backend=backend, **options)

    def eager(hs, ws, ht, wt):
        return eager_loss(args.divergence, hs @ ws.T, ht @ wt.T, args.temperature, args.beta, 0.1)

    impls = {}
    for name, status in kdcore.backends().items():
        if status.available and (device.type in status.devices or "*" in status.devices) and name != "reference":
            impls[f"kdcore-{name}"] = kdcore_impl(name)
    impls["torch-eager"] = eager
    impls[COMPILE_PEER] = compile_peer(eager)
    if device.type == "cuda" and args.divergence == "jsd":
        impls.update(liger_losses(args.temperature, args.beta))
    if args.impls:
        impls = {k: v for k, v in impls.items() if any(sel in k for sel in args.impls.split(","))}
    return impls


def run_problem(spec: str, device: torch.device, args) -> list[Result]:
    dtype_name, _, shape = spec.partition(":")
    dtype = getattr(torch, dtype_name)
    n, hs_size, ht_size, v = (int(x) for x in shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype)

    hs, ws = randn(n, hs_size).requires_grad_(True), randn(v, hs_size, scale=hs_size**-0.5).requires_grad_(True)
    ht, wt = randn(n, ht_size), randn(v, ht_size, scale=ht_size**-0.5)
    rate = matmul_tflops(device, dtype)
    flops = 2 * n * v * (ht_size + 3 * hs_size)
    limit_ms = flops / (rate * 1e12) * 1e3
    problem = {"divergence": args.divergence, "shape": {"N": n, "Hs": hs_size, "Ht": ht_size, "V": v},
               "dtype": dtype_name, "temperature": args.temperature}
    steps = {}
    for name, loss_fn in implementations(device, args).items():
        def step(loss_fn=loss_fn):
            hs.grad = ws.grad = None
            loss = loss_fn(hs, ws, ht, wt)
            loss.backward()
            return loss

        steps[name] = step
    def reset():
        hs.grad = ws.grad = None

    measured = measure(steps, device, reset=reset, budget_s=args.budget, max_reps=args.max_reps)
    return results("fused_linear_kd", measured, problem, device, limit_ms,
                   f"{flops / 1e12:.3f} TFLOP at {rate:.1f} TFLOP/s measured matmul rate")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", help="comma list of DTYPE:NxHsxHtxV (default: the ANCHORS.md set for the device)")
    parser.add_argument("--divergence", default="jsd", help="a kd_loss divergence (jsd: Liger's peers apply)")
    add_common_arguments(parser, temperature=1.0, max_reps=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    problems = problems_for(args, device, PROBLEMS, QUICK)
    for spec in problems:
        for result in run_problem(spec, device, args):
            result.emit()


if __name__ == "__main__":
    main()
