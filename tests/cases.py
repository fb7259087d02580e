"""The parametrized problems every kd_loss backend is checked on, and the comparison rule.

Each case builds float32 logits (tests cast them to the dtype under test) and the kd_loss options.
Together they cover: every reduction, temperatures below and above 1, labels with ignore_index and
the fused CE, masks, all rows ignored, -inf vocabulary padding and sparse supports, very large
logits, vocabularies of 1 and of sizes that are not multiples of any block (1025, 4099),
non-contiguous and 3-D inputs, a normalizer, near-one-hot teachers, identical distributions, rows entirely NaN,
and teacher gradients (mutual learning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conftest import TEST_DEVICE
from oracle import oracle_with_grads

ALL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, dict]]
    teacher_grad: bool = False
    options: dict = field(default_factory=dict)

    def make(self, seed: int = 0):
        """The case's tensors on the test device (built on the CPU, so seeds give the same values)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.device("cpu"):
            student, teacher, extra = self.build(gen)

        def on_device(x):
            return x.to(TEST_DEVICE) if isinstance(x, torch.Tensor) else x

        options = {key: on_device(value) for key, value in {**self.options, **extra}.items()}
        return on_device(student), on_device(teacher), options


def _randn(gen, *shape, scale=2.0):
    return torch.randn(*shape, generator=gen) * scale


def _pair(n, v, scale=2.0):
    return lambda gen: (_randn(gen, n, v, scale=scale), _randn(gen, n, v, scale=scale), {})


def _labels_ce(gen):
    s, t = _randn(gen, 8, 300), _randn(gen, 8, 300)
    labels = torch.randint(0, 300, (8,), generator=gen)
    labels[[1, 4, 6]] = -100
    return s, t, {"labels": labels, "ce_weight": 0.5, "kd_weight": 0.8}


def _custom_ignore(gen):
    s, t = _randn(gen, 6, 50), _randn(gen, 6, 50)
    labels = torch.randint(0, 50, (6,), generator=gen)
    labels[[0, 5]] = 7777
    return s, t, {"labels": labels, "ignore_index": 7777, "ce_weight": 1.0}


def _mask(gen):
    s, t = _randn(gen, 7, 129), _randn(gen, 7, 129)
    mask = torch.tensor([True, False, True, True, False, True, True])
    return s, t, {"mask": mask}


def _all_ignored(gen):
    s, t = _randn(gen, 5, 64), _randn(gen, 5, 64)
    return s, t, {"labels": torch.full((5,), -100), "ce_weight": 0.3}


def _neg_inf_padding(gen):
    s, t = _randn(gen, 6, 200), _randn(gen, 6, 200)
    s[:, -7:] = -torch.inf
    t[:, -7:] = -torch.inf
    return s, t, {}


def _sparse(gen, which):
    s, t = _randn(gen, 6, 300), _randn(gen, 6, 300)
    holes = torch.rand(6, 300, generator=gen) < 0.5
    holes[:, 0] = False  # keep one finite logit per row
    (t if which == "teacher" else s)[holes] = -torch.inf
    return s, t, {}


def _large_logits(gen):
    s, t = _randn(gen, 4, 513, scale=30.0) + 1.0e4, _randn(gen, 4, 513, scale=30.0) - 2.0e4
    return s, t, {}


def _noncontiguous(gen):
    s = _randn(gen, 300, 5).t()  # stride 1 along rows, not along the vocabulary
    t = _randn(gen, 5, 450)[:, 50:350]  # row stride 450
    return s, t, {}


def _three_d(gen):
    s, t = _randn(gen, 2, 3, 77), _randn(gen, 2, 3, 77)
    labels = torch.randint(0, 77, (2, 3), generator=gen)
    labels[1, 2] = -100
    return s, t, {"labels": labels}


def _near_one_hot(gen):
    s = _randn(gen, 5, 400)
    t = torch.zeros(5, 400)
    t[torch.arange(5), torch.randint(0, 400, (5,), generator=gen)] = 60.0
    return s, t, {}


def _rising(step):
    """Logits that grow along the vocabulary, so every tile of a kernel that sweeps the row raises
    the running maximum: by ~34 per 1024 columns (carried) or ~100 (more than any sane lead)."""
    def build(gen):
        ramp = torch.arange(3000, dtype=torch.float32) * step
        return ramp + _randn(gen, 3, 3000), ramp.flip(0) + _randn(gen, 3, 3000), {}
    return build


def _masked_prefix(gen):
    """The first tiles are entirely -inf in both rows (a kernel has no maximum yet when it reaches
    the finite part)."""
    s, t = _randn(gen, 4, 2500), _randn(gen, 4, 2500)
    s[:, :1500] = -torch.inf
    t[:, :1500] = -torch.inf
    return s, t, {}


def _nan_rows(v):
    """A row entirely NaN in both logits (a maximum that skips NaN finds no finite logit in it, yet
    the row is NaN, not an error), next to ordinary rows. (The oracle's guards against 0 * log 0
    also hide a NaN on one side only; tests/test_kd_loss_edges.py checks those rows.)"""
    def build(gen):
        s, t = _randn(gen, 5, v), _randn(gen, 5, v)
        s[1] = torch.nan
        t[1] = torch.nan
        labels = torch.randint(0, v, (5,), generator=gen)
        return s, t, {"labels": labels, "ce_weight": 0.5}
    return build


def _identical(gen):
    s = _randn(gen, 4, 90)
    return s, s.clone(), {}


CASES = [
    Case("basic", _pair(6, 37), teacher_grad=True),
    Case("temperature_sum", _pair(5, 1000), options={"temperature": 2.5, "reduction": "sum"}),
    Case("rows_none", _pair(4, 1025), options={"temperature": 0.7, "reduction": "none"}),
    Case("multi_tile", _pair(3, 4099), teacher_grad=True,
         options={"temperature": 2.0, "beta": 0.3, "alpha": 0.25}),
    Case("vocab_one", _pair(4, 1), teacher_grad=True),
    Case("labels_ce", _labels_ce, teacher_grad=True, options={"temperature": 2.0}),
    # the student-only fused CE at T != 1 and at T = 1 (the CUDA kernel's fast program has both)
    Case("labels_ce_student_only", _labels_ce, options={"temperature": 2.0}),
    Case("labels_ce_t1", _labels_ce, options={"temperature": 1.0}),
    Case("custom_ignore_index", _custom_ignore, options={"reduction": "none"}),
    Case("mask_no_t2", _mask, options={"temperature": 3.0, "t2_scale": False}),
    Case("all_ignored", _all_ignored, teacher_grad=True, options={"temperature": 2.0}),
    Case("neg_inf_padding", _neg_inf_padding, teacher_grad=True, options={"temperature": 1.5}),
    Case("teacher_sparse_support", lambda g: _sparse(g, "teacher"), options={"alpha": 0.2}),
    Case("student_sparse_support", lambda g: _sparse(g, "student"), options={"alpha": 0.2}),
    Case("large_logits", _large_logits, options={"temperature": 4.0}),
    Case("noncontiguous", _noncontiguous, teacher_grad=True, options={"temperature": 2.0}),
    Case("three_d_none", _three_d, options={"reduction": "none"}),
    Case("normalizer", _pair(6, 100), options={"normalizer": 11.0}),
    Case("near_one_hot_teacher", _near_one_hot, options={"temperature": 1.0, "beta": 0.9, "alpha": 0.5}),
    Case("identical", _identical, teacher_grad=True, options={"temperature": 2.0}),
    Case("rising_logits_small_steps", _rising(1 / 30), teacher_grad=True, options={"temperature": 1.0}),
    Case("rising_logits_large_steps", _rising(0.1), teacher_grad=True, options={"temperature": 0.5}),
    Case("masked_prefix", _masked_prefix, teacher_grad=True, options={"temperature": 2.0}),
    Case("nan_rows", _nan_rows(300), teacher_grad=True, options={"reduction": "none"}),
    Case("nan_rows_multi_tile", _nan_rows(1100), teacher_grad=True, options={"reduction": "none", "temperature": 2.0}),
]

DTYPE_CASES = [c for c in CASES if c.name in {"basic", "multi_tile", "labels_ce", "labels_ce_student_only",
                                               "labels_ce_t1", "rows_none", "neg_inf_padding", "large_logits",
                                               "noncontiguous", "near_one_hot_teacher"}]


def _max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _magnitude(x: torch.Tensor) -> float:
    return float(x.double().abs().max()) if x.numel() else 0.0


# How far the kernels may be from the float64 oracle, per output dtype: a multiple of PyTorch's own
# error at that precision (the flash-attention rule, 2x, for bf16/fp16 as the project standard
# says; 4x for float32, whose errors depend on association more than on rounding of the output)
# plus a few ulp of the result's largest magnitude for the final rounding into that dtype. In
# float64 torch's own computation *is* the oracle (error 0), so only summation order is allowed.
TOLERANCE = {torch.float64: (0.0, 256), torch.float32: (4.0, 4), torch.bfloat16: (2.0, 2), torch.float16: (2.0, 2)}


# The absolute error no kernel can avoid near zero: values below float32's normal range (which the
# GPU kernels' fast instructions flush to zero; the output of a 16-bit or float32 result), or the
# spacing of float16's subnormals, or float64's smallest normal number.
UNDERFLOW = {torch.float64: torch.finfo(torch.float64).tiny, torch.float32: torch.finfo(torch.float32).tiny,
             torch.bfloat16: torch.finfo(torch.float32).tiny, torch.float16: 2.0**-24}


def assert_within_rule(what: str, actual, exact, torch_own, out_dtype: torch.dtype, allowance=0.0) -> None:
    """|actual - exact| <= k |torch_own - exact| + u ulp(out_dtype) max|exact| + UNDERFLOW + allowance,
    entry by entry, with (k, u) from TOLERANCE; ``allowance`` is a number or a tensor of per-entry
    allowances (``rounding_allowance``). Non-finite entries of ``exact`` must be matched exactly."""
    actual, exact = actual.detach().double(), exact.detach().double()
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(actual), torch.isnan(exact)), f"{what}: NaN pattern differs"
    assert torch.equal(actual[torch.isinf(exact)], exact[torch.isinf(exact)]), f"{what}: inf entries differ"
    a, e, o = actual[finite], exact[finite], torch_own.detach().double()[finite]
    allowed = torch.as_tensor(allowance, dtype=torch.float64, device=a.device)
    allowed = allowed.expand_as(finite)[finite] if allowed.dim() else allowed
    times_torch, ulps = TOLERANCE[out_dtype]
    bound = (times_torch * _max_abs_error(o.nan_to_num(), e) + ulps * torch.finfo(out_dtype).eps * _magnitude(e)
             + UNDERFLOW[out_dtype] + allowed)
    excess = (a - e).abs() - bound
    if excess.numel() and float(excess.max()) > 0:
        worst = int(excess.argmax())
        err, at_bound = float((a - e).abs().flatten()[worst]), float(torch.as_tensor(bound).expand_as(e).flatten()[worst])
        raise AssertionError(f"{what}: error {err:.3e} exceeds {at_bound:.3e} ({times_torch:g}x torch's own error + "
                             f"{ulps} ulp + the allowance of that entry)")


# How many float32 (or float64) roundings of each gradient entry's terms the kernels may show. An
# entry of the gradient is prob_j (g_j - sum_k prob_k g_k) times the loss scale (docs/math.md): a
# difference of terms whose size is set by the problem, not by the result, which cancels to ~0
# where the two distributions give g_j ~ G (ramps running in opposite directions, say). Rounding
# each term and the row sum once costs a few ulp of their magnitudes, whatever the order of the
# summation, the instruction set or the thread count; a wrong formula, a lost term or a scale
# applied twice moves the entry by a sizeable fraction of those magnitudes.
ROUNDINGS_OF_TERMS = 16


def rounding_allowance(student, teacher, options, compute_dtype: torch.dtype, wrt: str) -> torch.Tensor:
    """Per-entry allowance ROUNDINGS_OF_TERMS * eps * M_j of the gradient with respect to ``wrt``
    (the student or the teacher logits), M_j = scale * prob_j (|g_j| + sum_k prob_k |g_k|) with g
    the free derivative of the divergence (oracle.free_derivatives), plus, for the student, the
    fused cross-entropy's ce * (softmax_j + [j = label]); rows not kept get 0. eps is float32's for
    every precision below float64 (the kernels compute in float32) and float64's for float64."""
    from oracle import free_derivatives

    v = student.shape[-1]
    t = options.get("temperature", 1.0)
    s64 = student.detach().double().reshape(-1, v)
    q = torch.softmax(s64 / t, -1)
    p = torch.softmax(teacher.detach().double().reshape(-1, v) / t, -1)
    gq, gp = free_derivatives(options["divergence"], q, p, options.get("beta", 0.5), options.get("alpha", 0.1))
    prob, g = (q, gq) if wrt == "student" else (p, gp)
    magnitude = prob * (g.abs() + (prob * g.abs()).sum(-1, keepdim=True))
    magnitude = magnitude * options.get("kd_weight", 1.0) * (t if options.get("t2_scale", True) else 1.0 / t)
    kept = torch.ones(s64.shape[0], dtype=torch.bool, device=s64.device)
    labels = options.get("labels")
    if labels is not None:
        kept &= labels.reshape(-1) != options.get("ignore_index", -100)
    if options.get("mask") is not None:
        kept &= options["mask"].reshape(-1)
    if wrt == "student" and options.get("ce_weight", 0.0):
        onehot = torch.zeros_like(s64)
        rows = torch.nonzero(kept).flatten()
        onehot[rows, labels.reshape(-1)[rows]] = 1.0
        magnitude = magnitude + options["ce_weight"] * (torch.softmax(s64, -1) + onehot)
    magnitude = torch.where(kept.unsqueeze(1), magnitude, torch.zeros_like(magnitude)).nan_to_num()
    if options.get("reduction", "batchmean") == "batchmean":
        magnitude = magnitude / (options.get("normalizer") or max(int(kept.sum()), 1))
    eps = torch.finfo(torch.float64 if compute_dtype == torch.float64 else torch.float32).eps
    return (ROUNDINGS_OF_TERMS * eps * magnitude).reshape(student.shape)


def tvd_tie_allowance(student, teacher, options, dtype, wrt: str) -> float:
    """TVD's gradient uses sign(p - q), which is discontinuous where p = q. Entries whose |p - q| is
    within the float resolution of dtype may take either sign in any implementation; flipping
    entry k's sign moves gradient entry j by at most prob_j * prob_k + [j == k] prob_j (prob = q for
    the student gradient, p for the teacher's). Returns the largest such move over the rows,
    scaled as the loss scales the gradient, or 0 when no entry is that close to a tie."""
    t = options.get("temperature", 1.0)
    v = student.shape[-1]
    q = torch.softmax(student.detach().double().reshape(-1, v) / t, -1)
    p = torch.softmax(teacher.detach().double().reshape(-1, v) / t, -1)
    prob = q if wrt == "student" else p
    ties = (p - q).abs() <= 16 * torch.finfo(dtype).eps * torch.maximum(p, q)
    if not bool(ties.any()):
        return 0.0
    per_row = prob.max(-1).values * (prob * ties).sum(-1) + (prob * ties).max(-1).values
    scale = options.get("kd_weight", 1.0) * (t if options.get("t2_scale", True) else 1.0 / t)
    if options.get("reduction", "batchmean") == "batchmean":
        kept = torch.ones(q.shape[0], dtype=torch.bool)
        if options.get("labels") is not None:
            kept &= options["labels"].reshape(-1) != options.get("ignore_index", -100)
        if options.get("mask") is not None:
            kept &= options["mask"].reshape(-1)
        scale /= options.get("normalizer") or max(int(kept.sum()), 1)
    return float(per_row.max()) * scale


def check_backend_on_case(kd_loss, backend: str, case: Case, divergence: str, dtype: torch.dtype) -> None:
    """Runs kd_loss on the case in dtype and compares loss and gradients with the oracle."""
    student32, teacher32, options = case.make()
    student = student32.to(dtype).requires_grad_(True)
    teacher = teacher32.to(dtype).requires_grad_(case.teacher_grad)
    options = {**options, "divergence": divergence}
    loss = kd_loss(student, teacher, backend=backend, **options)
    exact, exact_gs, exact_gt = oracle_with_grads(student, teacher, **options)
    own, own_gs, own_gt = oracle_with_grads(student, teacher, compute_dtype=dtype, **options)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype
    assert_within_rule("loss", loss, exact, own, loss_dtype)
    if not torch.isfinite(exact).all():
        return  # an infinite divergence has no meaningful gradient
    loss.sum().backward()

    def allowance(wrt):
        ties = tvd_tie_allowance(student, teacher, options, dtype, wrt) if divergence == "tvd" else 0.0
        return ties + rounding_allowance(student, teacher, options, dtype, wrt)

    assert student.grad is not None and student.grad.dtype == dtype
    assert_within_rule("student gradient", student.grad, exact_gs, own_gs, dtype, allowance("student"))
    if case.teacher_grad:
        assert teacher.grad is not None and teacher.grad.dtype == dtype
        assert_within_rule("teacher gradient", teacher.grad, exact_gt, own_gt, dtype, allowance("teacher"))
