"""Triton kernels of the kd_loss family (the ``triton`` backend; math in docs/math.md).

One program per row of ``[N, V]`` logits, launched as a 1-D grid of N programs. A program

1. decides whether its row is kept (``labels != ignore_index`` and ``mask``); a dropped row only
   writes zero gradients;
2. sweeps the row once for the softmax statistics of student and teacher at temperature T (a held
   row: maximum, then exp-sum; a swept row: per-lane running maxima and exp-sums, reduced across
   lanes once at the end), and of the raw student logits for the fused cross-entropy;
3. when a gradient needs a row sum (``Gq = Σ q·gq`` or ``Gp = Σ p·gp``), sweeps again for the row
   sums and the loss;
4. sweeps once more to write the gradients, scaled by the upstream factors (and, when no row sum
   was needed, accumulates the loss in the same sweep).

Sums are float32 within a lane and float64 across lanes, once per row (float32 throughout for a held
row of 16-bit logits). bf16/fp16 logits use the hardware exp2, log2 and reciprocal (FAST); float32
logits the accurate exp, log and IEEE division. Rows of 16-bit logits take their own programs
(_held_row_fast, _swept_row_fast): they work in log2 units (log2(e) folded into 1/T, one MUFU.EX2
per logit and sweep) and fold the per-row constants so that the student gradient is two
multiply-adds per element; a held row takes each exponential once and reuses it for the sums, the
divergence terms and the gradients, and reduces the statistics of both rows together; a swept row
checks bounds only in its last, partial tile, and under a KL divergence that needs its row sums
before the gradients (three sweeps) takes only the maxima in sweep 1 and the exp-sums in sweep 2.

Memory traffic. When the row fits one tile (V ≤ ``max_single_tile``: 4 096 columns on GPU, the
largest that compiles for sm_90 without spilling) the tile is loaded once and every sweep reuses it
from registers: each logit is read from HBM once and each gradient element written once, 6 bytes
per element in bf16 (12 in fp32) with the student gradient only. Longer rows are swept tile by tile
from memory: forward KL with only the student gradient (reverse KL with only the teacher's) reads
the logits twice (10 bytes per element in bf16), the other cases three times (14);
rows that stay in L2 between sweeps cost less. A program's failures (an entirely ``-inf`` kept row,
a label out of range) make its row's loss and gradients NaN and are written to a per-row status
byte that the host checks after the launch (kdcore/ops/status.py); a NaN or +inf logit makes the
row NaN without a failure.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_RKL, TVD = range(6)
STATUS_ALL_NEG_INF, STATUS_LABEL_OUT_OF_RANGE = 1, 2
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Inline PTX (the approximate log2 and reciprocal of FAST math) compiles for the GPU only; the
# interpreter (TRITON_INTERPRET=1, read when the kernels are defined, as Triton itself does)
# evaluates the same functions exactly instead.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _exp(x):
    """exp for x <= 0 (every exponential here: log-probabilities and shifted logits), to 0.64 ulp in
    float32 on every target (Cody-Waite reduction, degree-6 polynomial; csrc/cpu has the same), where
    tl.exp's fast approximation would cost float32 gradients several ulp. -inf gives 0 and NaN stays
    NaN (the clamp is a select: a float maximum would drop the NaN)."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        xc = tl.where(x < -88.0, -88.0, x)
        n = tl.floor(xc * 1.44269504088896341 + 0.5)
        r = tl.fma(n, -0.693359375, xc)
        r = tl.fma(n, 2.12194440e-4, r)
        y = tl.fma(1.3879691014264221e-3, r, 8.368693350504766e-3)
        y = tl.fma(y, r, 4.166722645766319e-2)
        y = tl.fma(y, r, 1.6666520870617613e-1)
        y = tl.fma(y, r, 4.9999998255559874e-1)
        y = tl.fma(y, r, 1.0)
        y = tl.fma(y, r, 1.0)
        two_to_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        return tl.where(x < -87.33654475, 0.0, y * two_to_n)


@triton.jit
def _exp_for(x, FAST: tl.constexpr):
    """exp for x <= 0: the hardware approximation (ex2.approx, a few float32 ulp, 2 instructions) when
    FAST, which the host sets for bfloat16 / float16 logits (their gradients keep 8 or 11 bits; results
    below 2^-126 flush to 0), else the accurate _exp. Both give 0 for -inf and NaN for NaN."""
    if FAST:
        return tl.math.exp2(x * LOG2E)
    else:
        return _exp(x)


@triton.jit
def _fast_log2(x):
    """log2(x) for x > 0 in float32: lg2.approx (one MUFU.LG2; within 2^-22 absolute for x in
    [0.5, 2], 2 ulp beyond) on the GPU."""
    if _PTX:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _fast_reciprocal(x):
    """1 / x in float32 for a normal or zero x: rcp.approx (one MUFU.RCP, 1 ulp) on the GPU."""
    if _PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _div(x, y, FAST: tl.constexpr):
    """x / y: when FAST, x times the approximate reciprocal (2 ulp; every divisor here is a normal number:
    a probability floored at the smallest normal, 1 + z >= mix, or the reduction's divisor), else the
    correctly rounded one."""
    if FAST:
        return x * _fast_reciprocal(y)
    else:
        return x / y


@triton.jit
def _guarded_mul(x, y):
    """x * y where x > 0, else 0 (0 * log 0 and 0 * inf vanish)."""
    return tl.where(x > 0, x * y, 0.0)


@triton.jit
def _log1p(x, FAST: tl.constexpr):
    """log(1 + x) for every x > -1. When FAST: lg2.approx(1 + x) ln 2, 3 instructions, within 1.7e-7
    absolute for 1 + x in [0.5, 2] and 2.4e-7 relative beyond -- rounding 16-bit logits moves these
    log-ratios by about 2^-9 |z / T|, far more, and the gradients keep 8 or 11 bits. Else to a few
    ulp (Goldberg: log(u) * x / (u - 1), u = 1 + x)."""
    if FAST:
        return _fast_log2(1.0 + x) * LN2
    else:
        u = 1.0 + x
        d = u - 1.0
        return tl.where(d == 0.0, x, tl.log(u) * _div(x, tl.where(d == 0.0, 1.0, d), FAST))


@triton.jit
def _relative_gap(x, y, w, tiny, FAST: tl.constexpr):
    """w (y - x) / x with x floored at the smallest normal number."""
    return _div(w * (y - x), tl.maximum(x, tiny), FAST)


@triton.jit
def _row_sum(x, NARROW: tl.constexpr):
    """The float64 sum of a tile's per-lane values. Each lane is widened first (once per row: the
    lanes of a swept row hold whole partial sums), except for a held row of 16-bit logits (NARROW),
    whose lanes are its elements and whose float32 sum is already far finer than its gradients."""
    if NARROW:
        return tl.sum(x, axis=0).to(tl.float64)
    else:
        return tl.sum(x.to(tl.float64), axis=0)


@triton.jit
def _row_stats(x, FAST: tl.constexpr):
    """(maximum, float64 sum of exp(x - maximum)) of a row held whole in one tile. An entirely -inf
    row gives (0, 0); a NaN or +inf logit makes the sum NaN."""
    m = tl.max(x, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift, _row_sum(_exp_for(x - shift, FAST), FAST)


@triton.jit
def _lane_update(m, s, x, FAST: tl.constexpr):
    """Folds a tile into per-lane running statistics (lane maximum m, sum s of exp(x - m)), with no
    reduction across lanes: one exponential per element, exp(-|x - m|), which is the new term when
    x <= m and the factor rescaling s when x raises the lane's maximum. m starts at the lowest finite
    value, so -inf adds 0 and never meets -inf; a NaN logit makes s NaN, a +inf one the maximum."""
    d = x - m
    grow = x > m
    e = _exp_for(-tl.abs(d), FAST)
    s = tl.where(grow, s * e + 1.0, s + e)
    return tl.where(grow, x, m), s


@triton.jit
def _combine(m, s):
    """The row's (maximum, float64 sum of exp(x - maximum)) from per-lane statistics, once per row.
    A row without a finite logit gives a zero sum; a NaN or +inf logit gives a NaN sum."""
    m_row = tl.max(m, axis=0)
    return m_row, _row_sum(s * _exp(m - m_row), False)


@triton.jit
def _log_sum(s, ACC: tl.constexpr, FAST: tl.constexpr):
    """log of a row's float64 exp-sum in the accumulation type (taken in float32 for 16-bit logits)."""
    if FAST:
        return tl.log(s.to(ACC))
    else:
        return tl.log(s).to(ACC)


@triton.jit
def _log_probs(x, m, log_sum):
    """log softmax from the row statistics: (x - max) - log sum, exact near the maximum."""
    return (x - m) - log_sum


@triton.jit
def _terms(la, lb, q, p, mix, tiny, DIVERGENCE: tl.constexpr, FAST: tl.constexpr):
    """Per-element (term, q·gq, p·gp, gq, gp); gq / gp are 0 where a closed form replaces them."""
    zero = tl.zeros_like(q)
    if DIVERGENCE == 0:  # forward KL
        gp = lb - la
        term = _guarded_mul(p, gp)
        return term, -p, term, zero, gp
    elif DIVERGENCE == 1:  # reverse KL
        gq = la - lb
        term = _guarded_mul(q, gq)
        return term, term, -q, gq, zero
    elif DIVERGENCE == 2:  # generalized JSD
        if FAST:
            # log(q / r), log(p / r) for the mixture r = (1 - mix) q + mix p as differences of
            # lg2.approx (2 ulp of each log, 2^-22 absolute on [0.5, 2]): q·gq errs by at most
            # q |log2 q| 2^-21 ln 2 <= 1.8e-7 (q |log2 q| <= 1 / (e ln 2)), within the gradient's
            # float32 rounding; every argument floored at the smallest normal, so gq, gp are finite
            # and q·gq is 0 at q = 0
            l_r = _fast_log2(tl.maximum((1.0 - mix) * q + mix * p, tiny))
            gq = (1.0 - mix) * LN2 * (_fast_log2(tl.maximum(q, tiny)) - l_r)
            gp = mix * LN2 * (_fast_log2(tl.maximum(p, tiny)) - l_r)
            qgq = q * gq
            pgp = p * gp
        else:
            gq = (1.0 - mix) * -_log1p(_relative_gap(q, p, mix, tiny, FAST), FAST)
            gp = mix * -_log1p(_relative_gap(p, q, 1.0 - mix, tiny, FAST), FAST)
            qgq = _guarded_mul(q, gq)
            pgp = _guarded_mul(p, gp)
        return qgq + pgp, qgq, pgp, gq, gp
    elif DIVERGENCE == 3:  # skew KL
        z = _relative_gap(p, q, 1.0 - mix, tiny, FAST)
        log_ratio = -_log1p(z, FAST)
        p_over_r = tl.where(p > 0, _div(1.0, 1.0 + z, FAST), 0.0)
        gq = -(1.0 - mix) * p_over_r
        gp = log_ratio - mix * p_over_r
        return _guarded_mul(p, log_ratio), q * gq, _guarded_mul(p, gp), gq, gp
    elif DIVERGENCE == 4:  # skew reverse KL
        z = _relative_gap(q, p, 1.0 - mix, tiny, FAST)
        log_ratio = -_log1p(z, FAST)
        q_over_r = tl.where(q > 0, _div(1.0, 1.0 + z, FAST), 0.0)
        gq = log_ratio - mix * q_over_r
        gp = -(1.0 - mix) * q_over_r
        return _guarded_mul(q, log_ratio), _guarded_mul(q, gq), p * gp, gq, gp
    else:  # total variation
        diff = p - q
        gp = 0.5 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        return 0.5 * tl.abs(diff), -q * gp, p * gp, -gp, gp


@triton.jit
def _load_tile(S, T, s_row, t_row, cols, n_cols, inv_temp, ACC: tl.constexpr):
    """(raw student z, student a = z/T, teacher b = t/T) in the accumulation type; -inf past V."""
    in_row = cols < n_cols
    z = tl.load(S + s_row + cols, mask=in_row, other=float("-inf")).to(ACC)
    b = tl.load(T + t_row + cols, mask=in_row, other=float("-inf")).to(ACC) * inv_temp
    return z, z * inv_temp, b


@triton.jit
def _is_bad(x):
    """1 where x is NaN or +inf."""
    return ((x != x) | (x == float("inf"))).to(tl.int32)


@triton.jit
def _tile_terms(a, b, m_a, ls_a, m_b, ls_b, mix, tiny, DIVERGENCE: tl.constexpr, FAST: tl.constexpr):
    """One tile's per-element (divergence term, q·gq, p·gp); 0 at -inf columns and past V."""
    la = _log_probs(a, m_a, ls_a)
    lb = _log_probs(b, m_b, ls_b)
    term, qgq, pgp, gq, gp = _terms(la, lb, _exp_for(la, FAST), _exp_for(lb, FAST), mix, tiny, DIVERGENCE, FAST)
    return term, qgq, pgp


@triton.jit
def _tile_gradients(z, a, b, cols, n_cols, label, m_a, ls_a, m_b, ls_b, m_z, ls_z, g_q, g_q_lo, g_p, g_p_lo, mix, tiny,
                    grad_scale, ce_scale, GS, GT, gs_row, gt_row, DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr,
                    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, FAST: tl.constexpr):
    """Writes one tile of the gradients; returns the tile's per-element divergence terms. The row sums
    Gq, Gp come as hi + lo pairs (_split)."""
    in_row = cols < n_cols
    la = _log_probs(a, m_a, ls_a)
    lb = _log_probs(b, m_b, ls_b)
    q = _exp_for(la, FAST)
    p = _exp_for(lb, FAST)
    term, qgq, pgp, gq, gp = _terms(la, lb, q, p, mix, tiny, DIVERGENCE, FAST)
    if STUDENT_GRAD:
        if DIVERGENCE == 0:
            d_a = q - p
        else:
            d_a = _guarded_mul(q, (gq - g_q) - g_q_lo)
        g = grad_scale * d_a
        if HAS_CE:
            soft = _exp_for(_log_probs(z, m_z, ls_z), FAST)
            g += ce_scale * (soft - tl.where(cols == label, 1.0, 0.0))
        tl.store(GS + gs_row + cols, g.to(GS.dtype.element_ty), mask=in_row)
    if TEACHER_GRAD:
        if DIVERGENCE == 1:
            d_b = p - q
        else:
            d_b = _guarded_mul(p, (gp - g_p) - g_p_lo)
        tl.store(GT + gt_row + cols, (grad_scale * d_b).to(GT.dtype.element_ty), mask=in_row)
    return term


@triton.jit
def _max2(x0, y0, x1, y1):
    """Combines two pairs of maxima (a reduction of two tensors in one pass)."""
    return tl.maximum(x0, x1), tl.maximum(y0, y1)


@triton.jit
def _add2(x0, y0, x1, y1):
    """Combines two pairs of sums (a reduction of two tensors in one pass)."""
    return x0 + x1, y0 + y1


@triton.jit
def _add3(x0, y0, w0, x1, y1, w1):
    """Combines two triples of sums (a reduction of three tensors in one pass)."""
    return x0 + x1, y0 + y1, w0 + w1


@triton.jit
def _exp2_shifted(x, shift, k):
    """(y, 2^y) for y = x k - shift: logits x in log2 units (k = log2(e) / T) less the row's shift, so
    that each exponential is one MUFU.EX2 (results below 2^-126 flush to 0)."""
    y = x * k - shift
    return y, tl.math.exp2(y)


@triton.jit
def _fast_terms(ya, ea, yb, eb, inv_a, inv_b, mix, tiny, DIVERGENCE: tl.constexpr):
    """Per element, from the exponentials 2^ya, 2^yb (ea, eb) and the reciprocal exp-sums: (loss
    contribution, q·gq, p·gp, gq, gp). For the KL divergences the loss contribution is the cross term
    in log2 units, b (yb - ya) (forward) or a (ya - yb) (reverse), gq and gp are that log2-ratio, 0
    where the exponential weighting it is 0 (an -inf logit there makes the ratio inf or NaN), and ea,
    eb stand in for q·gq, p·gp, whose row sums follow from the divergence instead."""
    if DIVERGENCE == 0:
        ratio = tl.where(eb > 0, yb - ya, 0.0)
        return eb * ratio, ea, eb, ratio, ratio
    elif DIVERGENCE == 1:
        ratio = tl.where(ea > 0, ya - yb, 0.0)
        return ea * ratio, ea, eb, ratio, ratio
    else:
        q = ea * inv_a
        p = eb * inv_b
        # la, lb (the log-probabilities) only serve the KL divergences: q, p stand in for them
        return _terms(q, p, q, p, mix, tiny, DIVERGENCE, True)


@triton.jit
def _kl_divergence(cross, inv_a, inv_b, log_ratio, DIVERGENCE: tl.constexpr):
    """A KL divergence from its row's cross sum (log2 units) and log_ratio = log S_a - log S_b:
    forward Σ p (log p - log q) = ln 2 Σ b (yb - ya) / S_b + log S_a - log S_b, reverse likewise."""
    if DIVERGENCE == 0:
        return LN2 * cross * inv_b + log_ratio
    else:
        return LN2 * cross * inv_a - log_ratio


@triton.jit
def _fast_student_grad(ea, eb, gq, inv_a, inv_b, g_q, grad_scale, DIVERGENCE: tl.constexpr):
    """The student gradient in two multiply-adds per element, from the unnormalized exponentials:
        forward KL  s (q - p)     = a k1 - b k0           (k1 = s / S_a, k0 = s / S_b)
        the others  s q (gq - Gq) = a (gq k1 - k1 Gq)     (k1 = s / S_a; ln 2 s / S_a for reverse KL,
                                                           whose gq is the log2-ratio and whose g_q
                                                           is then Gq + log S_a - log S_b)
    with s the gradient scale. Where q = 0, gq is finite, so the product is an exact 0."""
    k1 = grad_scale * inv_a
    if DIVERGENCE == 0:
        return ea * k1 - eb * (grad_scale * inv_b)
    elif DIVERGENCE == 1:
        return ea * (gq * (k1 * LN2) - k1 * g_q)
    else:
        return ea * (gq * k1 - k1 * g_q)


@triton.jit
def _fast_teacher_grad(ea, eb, gp, inv_a, inv_b, g_p, DIVERGENCE: tl.constexpr):
    """The teacher gradient before the gradient scale, p (gp - Gp): for forward KL gp is the
    log2-ratio and g_p is Gp - log S_a + log S_b; reverse KL's is p - q."""
    if DIVERGENCE == 0:
        return tl.where(eb > 0, eb * (LN2 * gp - g_p), 0.0) * inv_b
    elif DIVERGENCE == 1:
        return eb * inv_b - ea * inv_a
    else:
        return _guarded_mul(eb * inv_b, gp - g_p)


@triton.jit
def _ce_grad(z, cols, label, m_z, ls_z, ce_scale):
    """The fused cross-entropy's gradient ce_scale (softmax(z) - onehot(label)) for 16-bit logits."""
    soft = tl.math.exp2(((z - m_z) - ls_z) * LOG2E)
    return ce_scale * (soft - tl.where(cols == label, 1.0, 0.0))


@triton.jit
def _held_row_fast(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label, inv_temp, mix, tiny, grad_scale,
                   ce_scale, BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr,
                   STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """A held row of 16-bit logits (float32 math): loads it once, writes its gradients and returns
    (divergence, S_a, S_b, CE maximum, CE log-sum). Each exponential is taken once, in log2 units, and
    reused for the sums, the divergence terms and the gradients; row reductions of several tensors
    share one pass."""
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    z = tl.load(S + s_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    t = tl.load(T + t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    k = inv_temp * LOG2E
    m_s, m_t = tl.reduce((z, t), 0, _max2)
    ya, ea = _exp2_shifted(z, tl.where(m_s == float("-inf"), 0.0, m_s) * k, k)
    yb, eb = _exp2_shifted(t, tl.where(m_t == float("-inf"), 0.0, m_t) * k, k)
    if DIVERGENCE <= 1:  # the cross terms need no exp-sum: one reduction for the row
        cross, _, _, gq, gp = _fast_terms(ya, ea, yb, eb, 1.0, 1.0, mix, tiny, DIVERGENCE)
        s_a, s_b, cross = tl.reduce((ea, eb, cross), 0, _add3)
        # S >= 1 (the maximum contributes 2^0): rcp.approx is within 1 ulp, which moves the loss by
        # about 1e-7 of itself, and lg2.approx within 2 ulp of log2 S (2^-22 absolute below S = 2),
        # four times the float32 rounding of log S itself
        inv_a = _fast_reciprocal(s_a)
        inv_b = _fast_reciprocal(s_b)
        log_ratio = (_fast_log2(s_a) - _fast_log2(s_b)) * LN2  # log S_a - log S_b
        div = _kl_divergence(cross, inv_a, inv_b, log_ratio, DIVERGENCE)
        g_q = log_ratio + div
        g_p = div - log_ratio
    else:
        s_a, s_b = tl.reduce((ea, eb), 0, _add2)
        inv_a = _fast_reciprocal(s_a)
        inv_b = _fast_reciprocal(s_b)
        term, qgq, pgp, gq, gp = _fast_terms(ya, ea, yb, eb, inv_a, inv_b, mix, tiny, DIVERGENCE)
        div, g_q = tl.reduce((term, qgq), 0, _add2)
        if TEACHER_GRAD:
            g_p = tl.sum(pgp, axis=0)
    m_z = 0.0
    ls_z = 0.0
    if HAS_CE:  # the cross-entropy's softmax of the raw logits z
        m_z, s_z = _row_stats(z, True)
        ls_z = tl.log(s_z.to(tl.float32))
    if STUDENT_GRAD:
        g = _fast_student_grad(ea, eb, gq, inv_a, inv_b, g_q, grad_scale, DIVERGENCE)
        if HAS_CE:
            g += _ce_grad(z, cols, label, m_z, ls_z, ce_scale)
        tl.store(GS + gs_row + cols, g.to(GS.dtype.element_ty), mask=in_row)
    if TEACHER_GRAD:
        d_b = _fast_teacher_grad(ea, eb, gp, inv_a, inv_b, g_p, DIVERGENCE)
        tl.store(GT + gt_row + cols, (grad_scale * d_b).to(GT.dtype.element_ty), mask=in_row)
    return div, s_a, s_b, m_z, ls_z


@triton.jit
def _lane_update_log2(m, s, x):
    """_lane_update for logits in log2 units (x = logits log2(e) / T): exp2(-|x - m|), one MUFU.EX2."""
    grow = x > m
    e = tl.math.exp2(-tl.abs(x - m))
    s = tl.where(grow, s * e + 1.0, s + e)
    return tl.where(grow, x, m), s


@triton.jit
def _combine_log2(m, s):
    """_combine for per-lane statistics in log2 units: (row maximum, float64 sum of 2^(x - maximum))."""
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum((s * tl.math.exp2(m - m_row)).to(tl.float64), axis=0)


@triton.jit
def _load_pair(S, T, s_row, t_row, cols, n_cols, MASKED: tl.constexpr):
    """(student, teacher) logits of a tile in float32: -inf past V when MASKED (the row's last,
    partial tile), else unmasked (a full tile: no per-element bound checks)."""
    if MASKED:
        in_row = cols < n_cols
        z = tl.load(S + s_row + cols, mask=in_row, other=float("-inf"))
        t = tl.load(T + t_row + cols, mask=in_row, other=float("-inf"))
    else:
        z = tl.load(S + s_row + cols)
        t = tl.load(T + t_row + cols)
    return z.to(tl.float32), t.to(tl.float32)


@triton.jit
def _store_tile(G, g_row, cols, n_cols, g, MASKED: tl.constexpr):
    """Stores a tile of gradients in G's dtype, bound-checked only when MASKED (as _load_pair)."""
    if MASKED:
        tl.store(G + g_row + cols, g.to(G.dtype.element_ty), mask=cols < n_cols)
    else:
        tl.store(G + g_row + cols, g.to(G.dtype.element_ty))


@triton.jit
def _stats_tile(S, T, s_row, t_row, cols, n_cols, k, m_a, s_a, m_b, s_b, m_z, s_z, HAS_CE: tl.constexpr,
                MAX_ONLY: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 1 of a swept row of 16-bit logits over one tile: the per-lane statistics, in log2 units
    for a and b (natural units for the cross-entropy's raw logits); only the maxima of the raw
    logits z, t when MAX_ONLY (a NaN is dropped there and shows in the exp-sums of sweep 2)."""
    z, t = _load_pair(S, T, s_row, t_row, cols, n_cols, MASKED)
    if MAX_ONLY:
        m_a = tl.maximum(m_a, z)
        m_b = tl.maximum(m_b, t)
    else:
        m_a, s_a = _lane_update_log2(m_a, s_a, z * k)
        m_b, s_b = _lane_update_log2(m_b, s_b, t * k)
    if HAS_CE:
        m_z, s_z = _lane_update(m_z, s_z, z, True)
    return m_a, s_a, m_b, s_b, m_z, s_z


@triton.jit
def _kl_sums_tile(S, T, s_row, t_row, cols, n_cols, k, shift_a, shift_b, DIVERGENCE: tl.constexpr,
                  MASKED: tl.constexpr):
    """Sweep 2 of a swept row of 16-bit logits under a KL divergence over one tile, the row's maxima
    known: per element (2^ya, 2^yb, cross term of _fast_terms)."""
    z, t = _load_pair(S, T, s_row, t_row, cols, n_cols, MASKED)
    ya, ea = _exp2_shifted(z, shift_a, k)
    yb, eb = _exp2_shifted(t, shift_b, k)
    d_div, d_q, d_p, gq, gp = _fast_terms(ya, ea, yb, eb, 1.0, 1.0, 0.0, 0.0, DIVERGENCE)
    return ea, eb, d_div


@triton.jit
def _sums_tile(S, T, s_row, t_row, cols, n_cols, k, shift_a, shift_b, inv_a, inv_b, mix, tiny,
               DIVERGENCE: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 2 of a swept row of 16-bit logits over one tile: per element (loss contribution, q·gq,
    p·gp) of _fast_terms."""
    z, t = _load_pair(S, T, s_row, t_row, cols, n_cols, MASKED)
    ya, ea = _exp2_shifted(z, shift_a, k)
    yb, eb = _exp2_shifted(t, shift_b, k)
    d_div, d_q, d_p, gq, gp = _fast_terms(ya, ea, yb, eb, inv_a, inv_b, mix, tiny, DIVERGENCE)
    return d_div, d_q, d_p


@triton.jit
def _gradient_tile(S, T, GS, GT, s_row, t_row, gs_row, gt_row, cols, n_cols, label, k, shift_a, shift_b, inv_a,
                   inv_b, g_q, g_p, m_z, ls_z, mix, tiny, grad_scale, ce_scale, DIVERGENCE: tl.constexpr,
                   HAS_CE: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                   MASKED: tl.constexpr):
    """Sweep 3 of a swept row of 16-bit logits over one tile: writes the gradients and returns the
    per-element loss contributions."""
    z, t = _load_pair(S, T, s_row, t_row, cols, n_cols, MASKED)
    ya, ea = _exp2_shifted(z, shift_a, k)
    yb, eb = _exp2_shifted(t, shift_b, k)
    d_div, d_q, d_p, gq, gp = _fast_terms(ya, ea, yb, eb, inv_a, inv_b, mix, tiny, DIVERGENCE)
    if STUDENT_GRAD:
        g = _fast_student_grad(ea, eb, gq, inv_a, inv_b, g_q, grad_scale, DIVERGENCE)
        if HAS_CE:
            g += _ce_grad(z, cols, label, m_z, ls_z, ce_scale)
        _store_tile(GS, gs_row, cols, n_cols, g, MASKED)
    if TEACHER_GRAD:
        _store_tile(GT, gt_row, cols, n_cols, grad_scale * _fast_teacher_grad(ea, eb, gp, inv_a, inv_b, g_p,
                                                                              DIVERGENCE), MASKED)
    return d_div


@triton.jit
def _swept_row_fast(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label, inv_temp, mix, tiny, lowest,
                    grad_scale, ce_scale, BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr,
                    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, NEEDS_ROW_SUMS: tl.constexpr):
    """A swept row of 16-bit logits: sweeps 1-3 of the module docstring in log2 units (one MUFU.EX2 per
    logit and sweep), with the per-row constants of _held_row_fast; writes the gradients and returns
    (divergence, S_a, S_b, CE maximum, CE log-sum). Each sweep runs over the row's full tiles without
    bound checks, then over its partial last tile, if any, with them. Per-row scalars are float64."""
    base = tl.arange(0, BLOCK)
    n_full = n_cols - n_cols % BLOCK
    k = inv_temp * LOG2E
    # a KL divergence that needs its row sums before the gradients (reverse KL's Gq, forward KL's Gp)
    # sweeps three times anyway, and its cross sum needs no exp-sum: sweep 1 takes only the maxima,
    # sweep 2 the exp-sums together with the cross sum
    MAX_FIRST: tl.constexpr = DIVERGENCE <= 1 and NEEDS_ROW_SUMS
    m_a = tl.full([BLOCK], float("-inf") if MAX_FIRST else lowest, tl.float32)
    m_b, m_z = m_a, m_a
    s_a = tl.zeros([BLOCK], tl.float32)
    s_b, s_z = s_a, s_a
    for start in range(0, n_full, BLOCK):  # sweep 1: per-lane statistics
        m_a, s_a, m_b, s_b, m_z, s_z = _stats_tile(S, T, s_row, t_row, start + base, n_cols, k, m_a, s_a, m_b, s_b,
                                                   m_z, s_z, HAS_CE, MAX_FIRST, False)
    if n_full < n_cols:
        m_a, s_a, m_b, s_b, m_z, s_z = _stats_tile(S, T, s_row, t_row, n_full + base, n_cols, k, m_a, s_a, m_b, s_b,
                                                   m_z, s_z, HAS_CE, MAX_FIRST, True)
    m_z, s_z = _combine(m_z, s_z)
    ls_z = _log_sum(s_z, tl.float32, True)
    g_q = tl.zeros([], tl.float32)
    g_p = g_q
    if MAX_FIRST:
        m_a = tl.max(m_a, axis=0)
        m_b = tl.max(m_b, axis=0)
        shift_a = tl.where(m_a == float("-inf"), 0.0, m_a) * k
        shift_b = tl.where(m_b == float("-inf"), 0.0, m_b) * k
        t_a = tl.zeros([BLOCK], tl.float32)
        t_b, t_div = t_a, t_a
        for start in range(0, n_full, BLOCK):  # sweep 2: exp-sums and the cross sum
            d_a, d_b, d_div = _kl_sums_tile(S, T, s_row, t_row, start + base, n_cols, k, shift_a, shift_b,
                                            DIVERGENCE, False)
            t_a += d_a
            t_b += d_b
            t_div += d_div
        if n_full < n_cols:
            d_a, d_b, d_div = _kl_sums_tile(S, T, s_row, t_row, n_full + base, n_cols, k, shift_a, shift_b,
                                            DIVERGENCE, True)
            t_a += d_a
            t_b += d_b
            t_div += d_div
        s_a = tl.sum(t_a.to(tl.float64), axis=0)
        s_b = tl.sum(t_b.to(tl.float64), axis=0)
        inv_a = (1.0 / s_a).to(tl.float32)
        inv_b = (1.0 / s_b).to(tl.float32)
        log_ratio = tl.log(s_a / s_b)  # log S_a - log S_b, one logarithm per row
        div = _kl_divergence(tl.sum(t_div.to(tl.float64), axis=0), inv_a, inv_b, log_ratio, DIVERGENCE)
        g_q = (log_ratio + div).to(tl.float32)
        g_p = (div - log_ratio).to(tl.float32)
    else:
        shift_a, s_a = _combine_log2(m_a, s_a)
        shift_b, s_b = _combine_log2(m_b, s_b)
        inv_a = (1.0 / s_a).to(tl.float32)
        inv_b = (1.0 / s_b).to(tl.float32)
        log_ratio = tl.log(s_a / s_b)  # log S_a - log S_b, one logarithm per row
    if NEEDS_ROW_SUMS and not MAX_FIRST:  # sweep 2: the loss and the row sums the gradients need
        t_div = tl.zeros([BLOCK], tl.float32)
        t_q, t_p = t_div, t_div
        for start in range(0, n_full, BLOCK):
            d_div, d_q, d_p = _sums_tile(S, T, s_row, t_row, start + base, n_cols, k, shift_a, shift_b, inv_a, inv_b,
                                         mix, tiny, DIVERGENCE, False)
            t_div += d_div
            t_q += d_q
            t_p += d_p
        if n_full < n_cols:
            d_div, d_q, d_p = _sums_tile(S, T, s_row, t_row, n_full + base, n_cols, k, shift_a, shift_b, inv_a, inv_b,
                                         mix, tiny, DIVERGENCE, True)
            t_div += d_div
            t_q += d_q
            t_p += d_p
        div = tl.sum(t_div.to(tl.float64), axis=0)
        g_q = tl.sum(t_q.to(tl.float64), axis=0).to(tl.float32)
        g_p = tl.sum(t_p.to(tl.float64), axis=0).to(tl.float32)
    t_div = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_full, BLOCK):  # sweep 3: the gradients (and the loss, if sweep 2 did not run)
        t_div += _gradient_tile(S, T, GS, GT, s_row, t_row, gs_row, gt_row, start + base, n_cols, label, k, shift_a,
                                shift_b, inv_a, inv_b, g_q, g_p, m_z, ls_z, mix, tiny, grad_scale, ce_scale,
                                DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD, False)
    if n_full < n_cols:
        t_div += _gradient_tile(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_full + base, n_cols, label, k, shift_a,
                                shift_b, inv_a, inv_b, g_q, g_p, m_z, ls_z, mix, tiny, grad_scale, ce_scale,
                                DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD, True)
    if not NEEDS_ROW_SUMS:
        div = tl.sum(t_div.to(tl.float64), axis=0)
        if DIVERGENCE <= 1:
            div = _kl_divergence(div, inv_a, inv_b, log_ratio, DIVERGENCE)
    return div.to(tl.float32), s_a, s_b, m_z, ls_z

@triton.jit
def _split(x, ACC: tl.constexpr):
    """A row sum (float64) as hi + lo in the accumulation type, so that g - hi - lo keeps the sum
    exact where g is close to it (g - hi is then exact); lo is 0 for float64."""
    hi = x.to(ACC)
    if ACC == tl.float64:
        return hi, tl.zeros([], ACC)
    else:
        return hi, (x - hi.to(tl.float64)).to(ACC)


@triton.jit
def _swept_row(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label, inv_temp, mix, tiny, lowest, grad_scale,
               ce_scale, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, DIVERGENCE: tl.constexpr,
               HAS_CE: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
               NEEDS_ROW_SUMS: tl.constexpr, ACC: tl.constexpr):
    """Sweeps 1-3 of the module docstring for a row of float32 / float64 logits, held in one tile or
    swept tile by tile; writes its gradients and returns (divergence, S_a, S_b, CE maximum, CE
    log-sum)."""
    base = tl.arange(0, BLOCK)
    # sweep 1: softmax statistics of a = z/T, b = t/T and (for the CE) z
    if SINGLE_TILE:  # the whole row, loaded once and held in registers for every sweep
        z, a, b = _load_tile(S, T, s_row, t_row, base, n_cols, inv_temp, ACC)
        m_a, s_a = _row_stats(a, False)
        m_b, s_b = _row_stats(b, False)
        m_z, s_z = m_a, s_a
        if HAS_CE:
            m_z, s_z = _row_stats(z, False)
    else:  # per-lane statistics across the tiles, combined once at the end
        m_a = tl.full([BLOCK], lowest, ACC)
        m_b, m_z = m_a, m_a
        s_a = tl.zeros([BLOCK], ACC)
        s_b, s_z = s_a, s_a
        for start in range(0, n_cols, BLOCK):
            z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
            m_a, s_a = _lane_update(m_a, s_a, a, False)
            m_b, s_b = _lane_update(m_b, s_b, b, False)
            if HAS_CE:
                m_z, s_z = _lane_update(m_z, s_z, z, False)
        m_a, s_a = _combine(m_a, s_a)
        m_b, s_b = _combine(m_b, s_b)
        m_z, s_z = _combine(m_z, s_z)
    ls_a = _log_sum(s_a, ACC, False)
    ls_b = _log_sum(s_b, ACC, False)
    ls_z = _log_sum(s_z, ACC, False)
    # sweep 2 (only when a gradient needs Gq = Σ q·gq or Gp = Σ p·gp): row sums and the loss
    div = tl.zeros([], ACC)
    g_q, g_q_lo, g_p, g_p_lo = div, div, div, div
    if NEEDS_ROW_SUMS:
        if SINGLE_TILE:
            t_div, t_q, t_p = _tile_terms(a, b, m_a, ls_a, m_b, ls_b, mix, tiny, DIVERGENCE, False)
        else:
            t_div = tl.zeros([BLOCK], ACC)
            t_q, t_p = t_div, t_div
            for start in range(0, n_cols, BLOCK):
                z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
                d_div, d_q, d_p = _tile_terms(a, b, m_a, ls_a, m_b, ls_b, mix, tiny, DIVERGENCE, False)
                t_div += d_div
                t_q += d_q
                t_p += d_p
        div = _row_sum(t_div, False).to(ACC)
        g_q, g_q_lo = _split(_row_sum(t_q, False), ACC)
        g_p, g_p_lo = _split(_row_sum(t_p, False), ACC)
    # sweep 3: gradients (and the loss, if sweep 2 did not run)
    if STUDENT_GRAD or TEACHER_GRAD or not NEEDS_ROW_SUMS:
        if SINGLE_TILE:
            t_div = _tile_gradients(z, a, b, base, n_cols, label, m_a, ls_a, m_b, ls_b, m_z, ls_z, g_q, g_q_lo,
                                    g_p, g_p_lo, mix, tiny, grad_scale, ce_scale, GS, GT, gs_row, gt_row,
                                    DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD, False)
        else:
            t_div = tl.zeros([BLOCK], ACC)
            for start in range(0, n_cols, BLOCK):
                z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
                t_div += _tile_gradients(z, a, b, start + base, n_cols, label, m_a, ls_a, m_b, ls_b, m_z, ls_z,
                                         g_q, g_q_lo, g_p, g_p_lo, mix, tiny, grad_scale, ce_scale, GS, GT, gs_row,
                                         gt_row, DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD, False)
        if not NEEDS_ROW_SUMS:
            div = _row_sum(t_div, False).to(ACC)
    return div, s_a, s_b, m_z, ls_z


@triton.jit
def _fill_row(GS, GT, gs_row, gt_row, n_cols, value, BLOCK: tl.constexpr, STUDENT_GRAD: tl.constexpr,
              TEACHER_GRAD: tl.constexpr):
    """Writes value into every requested gradient element of the row."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        if STUDENT_GRAD:
            tl.store(GS + gs_row + cols, tl.full([BLOCK], value, GS.dtype.element_ty), mask=cols < n_cols)
        if TEACHER_GRAD:
            tl.store(GT + gt_row + cols, tl.full([BLOCK], value, GT.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def kd_loss_kernel(
    S, T, GS, GT, LABELS, MASK, DIVISOR, PARAMS, ROW_LOSS, STATUS,
    s_stride, t_stride, gs_stride, gt_stride, n_cols, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, NEEDS_ROW_SUMS: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # scalars come from a device tensor in the accumulation type (kernel float arguments are fp32)
    inv_temp = tl.load(PARAMS + 0)
    mix = tl.load(PARAMS + 1)
    kd_loss_scale = tl.load(PARAMS + 2)
    kd_grad_scale = tl.load(PARAMS + 3)
    ce_weight = tl.load(PARAMS + 4)
    tiny = tl.load(PARAMS + 5)
    lowest = tl.load(PARAMS + 6)
    s_row = row * s_stride
    t_row = row * t_stride
    gs_row = row * gs_stride
    gt_row = row * gt_stride
    kept = True
    label = 0
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        kept = label != ignore_index
    if HAS_MASK:
        kept = kept & (tl.load(MASK + row) != 0)
    if not kept:
        tl.store(ROW_LOSS + row, 0.0)
        _fill_row(GS, GT, gs_row, gt_row, n_cols, 0.0, BLOCK, STUDENT_GRAD, TEACHER_GRAD)
    else:
        status = tl.zeros([], tl.int32)
        z_label = tl.zeros([], ACC)
        if HAS_CE:
            status = tl.where((label < 0) | (label >= n_cols), 2, status)  # STATUS_LABEL_OUT_OF_RANGE
            # read before the gradient sweep, which may write over the student logits (in place)
            z_label = tl.load(S + s_row + tl.minimum(tl.maximum(label, 0), n_cols - 1)).to(ACC)
        # the divisor of the reduction and the chain rule through z / T, folded into two factors
        row_scale = _div(1.0, tl.load(DIVISOR).to(ACC), FAST)  # scales gradients only
        grad_scale = kd_grad_scale * row_scale
        ce_scale = ce_weight * row_scale
        if SINGLE_TILE and FAST:  # a held row of 16-bit logits: every sweep in one function
            div, s_a, s_b, m_z, ls_z = _held_row_fast(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label,
                                                      inv_temp, mix, tiny, grad_scale, ce_scale, BLOCK, DIVERGENCE,
                                                      HAS_CE, STUDENT_GRAD, TEACHER_GRAD)
        elif FAST:
            div, s_a, s_b, m_z, ls_z = _swept_row_fast(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label,
                                                       inv_temp, mix, tiny, lowest, grad_scale, ce_scale, BLOCK,
                                                       DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD,
                                                       NEEDS_ROW_SUMS)
        else:
            div, s_a, s_b, m_z, ls_z = _swept_row(S, T, GS, GT, s_row, t_row, gs_row, gt_row, n_cols, label, inv_temp,
                                                  mix, tiny, lowest, grad_scale, ce_scale, BLOCK, SINGLE_TILE,
                                                  DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD, NEEDS_ROW_SUMS, ACC)
        bad = (s_a != s_a) | (s_b != s_b)  # a NaN or +inf logit
        status = tl.where((s_a == 0.0) | (s_b == 0.0), 1, status)  # STATUS_ALL_NEG_INF
        loss = kd_loss_scale * div
        if HAS_CE:  # the logits' magnitude cancels before the log-sum is added
            loss += ce_weight * ((m_z - z_label) + ls_z)
        # a NaN / +inf logit, or a failure the host raises unless it cannot look (CUDA-graph capture):
        # the row's loss and gradients are NaN, as PyTorch's would be
        failed = bad | (status != 0)
        tl.store(ROW_LOSS + row, tl.where(failed, float("nan"), loss))
        tl.store(STATUS + row, status.to(tl.int8))
        if failed:
            _fill_row(GS, GT, gs_row, gt_row, n_cols, float("nan"), BLOCK, STUDENT_GRAD, TEACHER_GRAD)


# -- host side ------------------------------------------------------------------------------------

# Rows up to MAX_SINGLE_TILE columns are held in registers (one read of each logit); longer rows
# are swept in tiles of BLOCK. The GPU sizes are the largest that compile for sm_90 without spilling
# a register (benchmarks/triton_budget.py checks every variant). Interpreted runs
# (TRITON_INTERPRET=1, CPU tensors) use small sizes so that the tests' vocabularies (up to a few
# thousand) exercise both paths.
GPU_TILING = {"max_single_tile": 4096, "block": 4096}
INTERPRETED_TILING = {"max_single_tile": 1024, "block": 512}
MULTI_TILE_WARPS = 8
_PARAMS_CACHE_SIZE = 64


def tiling(n_cols: int, interpreted: bool) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_TILE, num_warps) for rows of ``n_cols`` columns."""
    sizes = INTERPRETED_TILING if interpreted else GPU_TILING
    width = triton.next_power_of_2(max(n_cols, 1))
    if width <= sizes["max_single_tile"]:
        return width, True, single_tile_warps(width)
    return sizes["block"], False, MULTI_TILE_WARPS


def single_tile_warps(width: int) -> int:
    """Warps of the program holding a row of ``width`` (a power of two) columns: 16 columns a thread
    (two 16-byte loads of bfloat16: the per-row work, reductions and scalars, spreads over more
    elements), at most 8 warps."""
    return min(8, max(1, width // 512))


def register_cap(num_warps: int) -> int:
    """Registers a thread may use: all of an SM's 64 Ki shared by one program of num_warps warps
    (ptxas would otherwise aim at two programs per SM and spill the held row)."""
    return min(255, 65536 // (32 * num_warps))


def fast_math(dtype: torch.dtype) -> bool:
    """Whether the kernels may use the hardware exp2 and approximate division: for 16-bit logits, whose
    gradients keep 8 or 11 bits, a few float32 ulp in the exponentials do not show."""
    return dtype in (torch.bfloat16, torch.float16)


def launch_device(tensor: torch.Tensor):
    """The context every Triton launch runs in: the tensor's CUDA device (Triton launches on the
    current device, whatever device the tensors are on), or nothing for the interpreter's CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


_params: dict[tuple, torch.Tensor] = {}


def scalar_params(device, dtype, values: tuple[float, ...]):
    """The kernel's float scalars as a device tensor of the accumulation type, cached per distinct
    set (the options rarely change during training, so there is no host-to-device copy per call)."""
    key = (device, dtype, values)
    cached = _params.get(key)
    if cached is None:
        if len(_params) >= _PARAMS_CACHE_SIZE:
            _params.clear()
        cached = _params[key] = torch.tensor(values, dtype=dtype, device=device)
    return cached


def launch(student, teacher, grad_student, grad_teacher, labels, mask, divisor, row_loss, status, *,
           temperature: float, divergence: int, mix: float, kd_loss_scale: float, kd_grad_scale: float,
           ce_weight: float, ignore_index: int, interpreted: bool) -> None:
    """Runs kd_loss_kernel over every row; writes row_loss, status and the requested gradients."""
    n, v = student.shape
    acc = row_loss.dtype
    student_grad, teacher_grad = grad_student.numel() > 0, grad_teacher.numel() > 0
    block, single_tile, num_warps = tiling(v, interpreted)
    finfo = torch.finfo(acc)
    params = scalar_params(student.device, acc, (1.0 / temperature, mix, kd_loss_scale, kd_grad_scale, ce_weight,
                                                 finfo.tiny, finfo.min))
    needs_row_sums = (student_grad and divergence != FORWARD_KL) or (teacher_grad and divergence != REVERSE_KL)
    with launch_device(student):
        kd_loss_kernel[(n,)](
            student, teacher, grad_student, grad_teacher,
            labels if labels is not None else row_loss, mask if mask is not None else row_loss,
            divisor, params, row_loss, status,
            student.stride(0), teacher.stride(0), grad_student.stride(0) if student_grad else 0,
            grad_teacher.stride(0) if teacher_grad else 0, v, ignore_index,
            DIVERGENCE=divergence, HAS_LABELS=labels is not None, HAS_MASK=mask is not None, HAS_CE=ce_weight != 0,
            STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, NEEDS_ROW_SUMS=needs_row_sums,
            BLOCK=block, SINGLE_TILE=single_tile, ACC=tl.float64 if acc == torch.float64 else tl.float32,
            FAST=fast_math(student.dtype) and fast_math(teacher.dtype), num_warps=num_warps,
            maxnreg=register_cap(num_warps),
        )
