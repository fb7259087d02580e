"""kd_loss forward + backward: every available kdcore backend against hand-written torch eager,
torch.compile of the same code and (on CUDA, when installed) Liger-Kernel, in one process.

    python -m benchmarks.kd_loss                 # the ANCHORS.md problems for this device
    python -m benchmarks.kd_loss --quick         # one small problem, a few seconds
    python -m benchmarks.kd_loss --divergences all --problems bfloat16:512x128256

Prints one JSON line per (problem, implementation) (schema: benchmarks/common.py Result). The limit
is the memory traffic a fused kernel cannot avoid -- read both logits, write the student gradient:
3 x element size bytes per logit -- at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kdcore
from benchmarks.common import (
    COMPILE_PEER,
    Result,
    add_common_arguments,
    compile_peer,
    copy_bandwidth_gbs,
    measure_student_losses,
    problems_for,
    results,
)

PROBLEMS = {
    "cpu": ["float32:512x32000", "float32:2048x32000", "bfloat16:512x128256"],
    "cuda": ["bfloat16:8192x32000", "bfloat16:8192x128256", "bfloat16:8192x262144"],
}
QUICK = {"cpu": ["float32:128x8192"], "cuda": ["bfloat16:2048x32000"]}


def eager_loss(divergence: str, s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float,
               alpha: float) -> torch.Tensor:
    """The loss as people write it by hand: log_softmax in the input dtype, then F.kl_div."""
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    n = s.shape[0]

    def kl(log_target, log_input):  # KL(target || input), summed
        return F.kl_div(log_input, log_target, reduction="sum", log_target=True)

    def log_mix(log_x, log_y, w):  # log(w x + (1 - w) y)
        return torch.logsumexp(torch.stack([log_x + math.log(w) if w > 0 else torch.full_like(log_x, -math.inf),
                                            log_y + math.log(1 - w)]), dim=0)

    if divergence == "forward_kl":
        d = kl(log_p, log_q)
    elif divergence == "reverse_kl":
        d = kl(log_q, log_p)
    elif divergence == "jsd":
        log_m = log_mix(log_p, log_q, beta)
        d = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    elif divergence == "skew_kl":
        d = kl(log_p, log_mix(log_p, log_q, alpha))
    elif divergence == "skew_rkl":
        d = kl(log_q, log_mix(log_q, log_p, alpha))
    else:
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum()
    return d / n * temperature**2


def liger_losses(divergence: str, temperature: float, beta: float) -> dict[str, Callable]:
    """Liger-Kernel's closest ops (they take log-probabilities, so log_softmax runs eagerly first)."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return {}
    out = {}
    t2 = temperature**2
    if divergence == "forward_kl":
        kldiv = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        jsd0 = LigerJSD(beta=0.0)
        out["liger-kldiv"] = lambda s, t: kldiv(F.log_softmax(s / temperature, -1),
                                                F.log_softmax(t / temperature, -1)) * t2
        out["liger-jsd-beta0"] = lambda s, t: jsd0(F.log_softmax(s.float() / temperature, -1),
                                                   F.log_softmax(t.float() / temperature, -1)) * t2
    if divergence == "jsd":
        jsd = LigerJSD(beta=beta)
        out["liger-jsd"] = lambda s, t: jsd(F.log_softmax(s.float() / temperature, -1),
                                            F.log_softmax(t.float() / temperature, -1)) * t2
    return out


def implementations(divergence: str, device: torch.device, args) -> dict[str, Callable]:
    def kdcore_impl(backend):
        return lambda s, t: kdcore.kd_loss(s, t, divergence=divergence, temperature=args.temperature,
                                           beta=args.beta, alpha=args.alpha, backend=backend)

    def eager(s, t):
        return eager_loss(divergence, s, t, args.temperature, args.beta, args.alpha)

    impls = {}
    for name, status in kdcore.backends().items():
        if status.available and (device.type in status.devices or "*" in status.devices):
            impls[f"kdcore-{name}"] = kdcore_impl(name)
    impls["torch-eager"] = eager
    impls[COMPILE_PEER] = compile_peer(eager)
    if device.type == "cuda":
        impls.update(liger_losses(divergence, args.temperature, args.beta))
    if args.impls:
        impls = {k: v for k, v in impls.items() if any(sel in k for sel in args.impls.split(","))}
    return impls


def parse_problem(spec: str) -> tuple[torch.dtype, int, int]:
    dtype_name, _, shape = spec.partition(":")
    n, _, v = shape.partition("x")
    return getattr(torch, dtype_name), int(n), int(v)


def run_problem(spec: str, divergence: str, device: torch.device, bandwidth: float, args) -> list[Result]:
    dtype, n, v = parse_problem(spec)
    gen = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype)
    limit_ms = 3 * student.element_size() * n * v / (bandwidth * 1e9) * 1e3
    problem = {"divergence": divergence, "shape": [n, v], "dtype": str(dtype).removeprefix("torch."),
               "temperature": args.temperature}
    losses = {name: (lambda s, loss_fn=loss_fn: loss_fn(s, teacher))
              for name, loss_fn in implementations(divergence, device, args).items()}
    measured = measure_student_losses(losses, student, device, args)
    return results("kd_loss", measured, problem, device, limit_ms,
                   f"{3 * student.element_size()} B/elem at {bandwidth:.1f} GB/s copy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", help="comma list of DTYPE:NxV (default: the ANCHORS.md set for the device)")
    parser.add_argument("--divergences", default="forward_kl", help="comma list, or 'all'")
    parser.add_argument("--alpha", type=float, default=0.1)
    add_common_arguments(parser, temperature=2.0, max_reps=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    problems = problems_for(args, device, PROBLEMS, QUICK)
    divergences = list(kdcore.DIVERGENCES) if args.divergences == "all" else args.divergences.split(",")
    bandwidth = copy_bandwidth_gbs(device)
    for spec in problems:
        for divergence in divergences:
            for result in run_problem(spec, divergence, device, bandwidth, args):
                result.emit()


if __name__ == "__main__":
    main()
