"""The divergence family and the reductions: names, the integer codes the kernels use, and each
divergence's mixing parameter. The math is in docs/math.md; the kernels implement it in
csrc/include/kdcore/divergence.h (C++/CUDA), kdcore/ops/triton and kdcore/ops/reference.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DivergenceSpec:
    """One member of the family. ``mix_param`` names the keyword of ``kd_loss`` that sets its
    mixing weight (``beta`` or ``alpha``), with the interval it must lie in."""

    name: str
    code: int
    formula: str
    mix_param: str | None = None
    mix_open_low: bool = True  # False when the lower end of the interval is allowed


DIVERGENCES: dict[str, DivergenceSpec] = {
    spec.name: spec
    for spec in (
        DivergenceSpec("forward_kl", 0, "KL(p || q)"),
        DivergenceSpec("reverse_kl", 1, "KL(q || p)"),
        DivergenceSpec("jsd", 2, "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q", "beta"),
        DivergenceSpec("skew_kl", 3, "KL(p || alpha p + (1 - alpha) q)", "alpha", mix_open_low=False),
        DivergenceSpec("skew_rkl", 4, "KL(q || alpha q + (1 - alpha) p)", "alpha", mix_open_low=False),
        DivergenceSpec("tvd", 5, "1/2 sum |p - q|"),
    )
}

REDUCTIONS: dict[str, int] = {"none": 0, "sum": 1, "batchmean": 2}
REDUCTION_NONE = REDUCTIONS["none"]
