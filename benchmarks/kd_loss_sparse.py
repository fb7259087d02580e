"""kd_loss against a top-k teacher (SparseTeacher, tail mode, forward KL), forward + backward: every
available kdcore backend against the same loss hand-written in torch eager (log_softmax, gather,
a masked logsumexp for the student's tail) and torch.compile of it, in one process.

    python -m benchmarks.kd_loss_sparse                 # the default problems for this device
    python -m benchmarks.kd_loss_sparse --quick
    python -m benchmarks.kd_loss_sparse --problems bfloat16:8192x128256:128 --sparse-mode renorm

Prints one JSON line per (problem, implementation) (schema: benchmarks/common.py Result). The
limit is the traffic a fused kernel cannot avoid: read the student logits once and write their
gradient once, 2 x element size bytes per logit, at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kdcore
from benchmarks.common import (
    COMPILE_PEER,
    add_common_arguments,
    compile_peer,
    copy_bandwidth_gbs,
    measure_student_losses,
    problems_for,
    results,
)

PROBLEMS = {
    "cpu": ["float32:512x32000:128", "bfloat16:512x128256:128"],
    "cuda": ["bfloat16:8192x32000:128", "bfloat16:8192x128256:128"],
}
QUICK = {"cpu": ["float32:128x8192:64"], "cuda": ["bfloat16:2048x32000:128"]}


def eager_loss(s: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, temperature: float,
               sparse_mode: str) -> torch.Tensor:
    """Forward KL against a top-k teacher as one writes it by hand in PyTorch."""
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_q_k = log_q.gather(1, indices)
    p = logprobs.float().exp()
    if sparse_mode == "renorm":
        log_q_k = log_q_k - log_q_k.logsumexp(-1, keepdim=True)
        p = p / p.sum(-1, keepdim=True)
        d = (p * (p.log() - log_q_k)).sum()
    else:
        log_q_tail = log_q.scatter(1, indices, -torch.inf).logsumexp(-1)
        p_tail = (1 - p.sum(-1)).clamp_min(0)
        d = (p * (logprobs.float() - log_q_k)).sum() + torch.xlogy(p_tail, p_tail).sum() - (p_tail * log_q_tail).sum()
    return d / s.shape[0] * temperature**2


def parse_problem(spec: str) -> tuple[torch.dtype, int, int, int]:
    dtype_name, _, shape = spec.partition(":")
    n, rest = shape.split("x")
    v, k = rest.split(":")
    return getattr(torch, dtype_name), int(n), int(v), int(k)


def run_problem(spec: str, device: torch.device, bandwidth: float, args):
    dtype, n, v, k = parse_problem(spec)
    gen = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype).requires_grad_(True)
    teacher_logits = torch.randn(n, v, device=device, generator=gen) * 3
    logprobs, indices = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    logprobs = logprobs.to(torch.bfloat16)
    del teacher_logits
    teacher = kdcore.SparseTeacher(indices, logprobs)
    limit_ms = 2 * student.element_size() * n * v / (bandwidth * 1e9) * 1e3
    problem = {"divergence": "forward_kl", "sparse_mode": args.sparse_mode, "shape": [n, v], "k": k,
               "dtype": str(dtype).removeprefix("torch."), "temperature": args.temperature}

    def eager(s):
        return eager_loss(s, indices, logprobs, args.temperature, args.sparse_mode)

    impls = {}
    for name, status in kdcore.backends().items():
        if status.available and "kd_loss_sparse" in status.families and (
                device.type in status.devices or "*" in status.devices):
            impls[f"kdcore-{name}"] = (lambda s, name=name: kdcore.kd_loss(
                s, teacher, sparse_mode=args.sparse_mode, temperature=args.temperature, backend=name))
    impls["torch-eager"] = eager
    impls[COMPILE_PEER] = compile_peer(eager)
    if args.impls:
        impls = {key: fn for key, fn in impls.items() if any(sel in key for sel in args.impls.split(","))}
    measured = measure_student_losses(impls, student, device, args)
    return results("kd_loss_sparse", measured, problem, device, limit_ms,
                   f"{2 * student.element_size()} B/elem at {bandwidth:.1f} GB/s copy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", help="comma list of DTYPE:NxV:K (default: the set for the device)")
    parser.add_argument("--sparse-mode", choices=("tail", "renorm"), default="tail")
    add_common_arguments(parser, temperature=1.0, max_reps=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    bandwidth = copy_bandwidth_gbs(device)
    for spec in problems_for(args, device, PROBLEMS, QUICK):
        for result in run_problem(spec, device, bandwidth, args):
            result.emit()


if __name__ == "__main__":
    main()
