"""Triton kernels of the kd_loss family (the ``triton`` backend; math in docs/math.md).

One program per row of ``[N, V]`` logits, launched as a 1-D grid of N programs. A program

1. decides whether its row is kept (``labels != ignore_index`` and ``mask``); a dropped row only
   writes zero gradients;
2. sweeps the row once for the softmax statistics of student and teacher at temperature T (online
   maximum and shifted sum), of the raw student logits for the fused cross-entropy, and for NaN /
   +inf logits;
3. when a gradient needs a row sum (``Gq = Σ q·gq`` or ``Gp = Σ p·gp``), sweeps again for the row
   sums and the loss;
4. sweeps once more to write the gradients, scaled by the upstream factors (and, when no row sum
   was needed, accumulates the loss in the same sweep).

Memory traffic. When the row fits one tile (V ≤ ``max_single_tile``: 32 768 columns on GPU) the
tile is loaded once and every sweep reuses it from registers: each logit is read from HBM once
and each gradient element written once, 6 bytes per element in bf16 (12 in fp32) with the student
gradient only. Longer rows are swept tile by tile from memory: forward KL and reverse KL with only
the student gradient read the logits twice (10 bytes per element in bf16), the mixture
divergences, TVD and teacher gradients three times (14); rows that stay in L2 between sweeps
cost less. A program's failures (an entirely ``-inf`` kept row, a label out of range) are written to
a per-row status byte that the host checks after the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_RKL, TVD = range(6)
STATUS_ALL_NEG_INF, STATUS_LABEL_OUT_OF_RANGE = 1, 2


@triton.jit
def _exp(x):
    """exp for x <= 0 (every exponential here: log-probabilities and shifted logits), to 0.64 ulp in
    float32 on every target (Cody-Waite reduction, degree-6 polynomial; csrc/cpu has the same), where
    tl.exp's fast approximation would cost the gradients several ulp. -inf gives 0."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        xc = tl.maximum(x, -88.0)
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
def _guarded_mul(x, y):
    """x * y where x > 0, else 0 (0 * log 0 and 0 * inf vanish)."""
    return tl.where(x > 0, x * y, 0.0)


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulp for every x > -1 (Goldberg: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _relative_gap(x, y, w, tiny):
    """w (y - x) / x with x floored at the smallest normal number."""
    return w * (y - x) / tl.maximum(x, tiny)


@triton.jit
def _online_update(m, s, x):
    """Folds tile x into the running (maximum, float64 sum of exp(x - maximum)); -inf tiles add
    nothing. The rescaling of the running sum is done in float64, so a row whose maximum rises
    tile after tile keeps its sum to a float32 ulp."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m.to(tl.float64) - shift.to(tl.float64))
    s = s * rescale + tl.sum(_exp(x - shift), axis=0).to(tl.float64)
    return m_new, s


@triton.jit
def _log_probs(x, m, log_sum):
    """log softmax from the row statistics: (x - max) - log sum, exact near the maximum."""
    return (x - m) - log_sum


@triton.jit
def _terms(la, lb, q, p, mix, tiny, DIVERGENCE: tl.constexpr):
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
        gq = (1.0 - mix) * -_log1p(_relative_gap(q, p, mix, tiny))
        gp = mix * -_log1p(_relative_gap(p, q, 1.0 - mix, tiny))
        qgq = _guarded_mul(q, gq)
        pgp = _guarded_mul(p, gp)
        return qgq + pgp, qgq, pgp, gq, gp
    elif DIVERGENCE == 3:  # skew KL
        z = _relative_gap(p, q, 1.0 - mix, tiny)
        log_ratio = -_log1p(z)
        p_over_r = tl.where(p > 0, 1.0 / (1.0 + z), 0.0)
        gq = -(1.0 - mix) * p_over_r
        gp = log_ratio - mix * p_over_r
        return _guarded_mul(p, log_ratio), q * gq, _guarded_mul(p, gp), gq, gp
    elif DIVERGENCE == 4:  # skew reverse KL
        z = _relative_gap(q, p, 1.0 - mix, tiny)
        log_ratio = -_log1p(z)
        q_over_r = tl.where(q > 0, 1.0 / (1.0 + z), 0.0)
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
def _tile_stats(z, a, b, m_a, s_a, m_b, s_b, m_z, s_z, bad, HAS_CE: tl.constexpr):
    m_a, s_a = _online_update(m_a, s_a, a)
    m_b, s_b = _online_update(m_b, s_b, b)
    if HAS_CE:
        m_z, s_z = _online_update(m_z, s_z, z)
    bad = tl.maximum(bad, tl.max(tl.maximum(_is_bad(z), _is_bad(b)), axis=0))
    return m_a, s_a, m_b, s_b, m_z, s_z, bad


@triton.jit
def _tile_gradients(z, a, b, cols, n_cols, label, m_a, ls_a, m_b, ls_b, m_z, ls_z, g_q, g_q_lo, g_p, g_p_lo,
                    mix, tiny, grad_scale, ce_scale, GS, GT, gs_row, gt_row, DIVERGENCE: tl.constexpr,
                    HAS_CE: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Writes one tile of the gradients; returns the tile's float64 sum of divergence terms."""
    in_row = cols < n_cols
    la = _log_probs(a, m_a, ls_a)
    lb = _log_probs(b, m_b, ls_b)
    q = _exp(la)
    p = _exp(lb)
    term, qgq, pgp, gq, gp = _terms(la, lb, q, p, mix, tiny, DIVERGENCE)
    if STUDENT_GRAD:
        if DIVERGENCE == 0:
            d_a = q - p
        else:
            d_a = _guarded_mul(q, (gq - g_q) - g_q_lo)
        g = grad_scale * d_a
        if HAS_CE:
            soft = _exp(_log_probs(z, m_z, ls_z))
            g += ce_scale * (soft - tl.where(cols == label, 1.0, 0.0))
        tl.store(GS + gs_row + cols, g.to(GS.dtype.element_ty), mask=in_row)
    if TEACHER_GRAD:
        if DIVERGENCE == 1:
            d_b = p - q
        else:
            d_b = _guarded_mul(p, (gp - g_p) - g_p_lo)
        tl.store(GT + gt_row + cols, (grad_scale * d_b).to(GT.dtype.element_ty), mask=in_row)
    return _sum64(term, in_row)


@triton.jit
def _tile_sums(a, b, cols, n_cols, m_a, ls_a, m_b, ls_b, mix, tiny, DIVERGENCE: tl.constexpr):
    """One tile's sums of (divergence term, q·gq, p·gp)."""
    in_row = cols < n_cols
    la = _log_probs(a, m_a, ls_a)
    lb = _log_probs(b, m_b, ls_b)
    term, qgq, pgp, gq, gp = _terms(la, lb, _exp(la), _exp(lb), mix, tiny, DIVERGENCE)
    return _sum64(term, in_row), _sum64(qgq, in_row), _sum64(pgp, in_row)


@triton.jit
def _sum64(x, in_row):
    """The float64 sum of x over the columns in the row."""
    return tl.sum(tl.where(in_row, x, 0.0).to(tl.float64), axis=0)


@triton.jit
def _split(x):
    """x (float64) as hi + lo in the accumulation type's precision, so that g - hi - lo keeps the
    row sum exact where g is close to it (hi - g is then exact)."""
    hi = x.to(tl.float32)
    return hi, (x - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _zero_row(GS, GT, gs_row, gt_row, n_cols, BLOCK: tl.constexpr, STUDENT_GRAD: tl.constexpr,
              TEACHER_GRAD: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        if STUDENT_GRAD:
            tl.store(GS + gs_row + cols, tl.zeros([BLOCK], GS.dtype.element_ty), mask=cols < n_cols)
        if TEACHER_GRAD:
            tl.store(GT + gt_row + cols, tl.zeros([BLOCK], GT.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def kd_loss_kernel(
    S, T, GS, GT, LABELS, MASK, DIVISOR, PARAMS, ROW_LOSS, STATUS,
    s_stride, t_stride, gs_stride, gt_stride, n_cols, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, NEEDS_ROW_SUMS: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # scalars come from a device tensor in the accumulation type (kernel float arguments are fp32)
    inv_temp = tl.load(PARAMS + 0)
    mix = tl.load(PARAMS + 1)
    kd_loss_scale = tl.load(PARAMS + 2)
    kd_grad_scale = tl.load(PARAMS + 3)
    ce_weight = tl.load(PARAMS + 4)
    tiny = tl.load(PARAMS + 5)
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
        _zero_row(GS, GT, gs_row, gt_row, n_cols, BLOCK, STUDENT_GRAD, TEACHER_GRAD)
    else:
        status = tl.zeros([], tl.int32)
        if HAS_CE:
            status = tl.where((label < 0) | (label >= n_cols), 2, status)
            # read before the gradient sweep, which may write over the student logits (in place)
            z_label = tl.load(S + s_row + tl.minimum(tl.maximum(label, 0), n_cols - 1)).to(ACC)
        neg_inf = tl.full([], float("-inf"), ACC)
        zero = tl.zeros([], ACC)
        zero64 = tl.zeros([], tl.float64)
        m_a, s_a, m_b, s_b, m_z, s_z = neg_inf, zero64, neg_inf, zero64, neg_inf, zero64
        bad = tl.zeros([], tl.int32)
        base = tl.arange(0, BLOCK)
        # sweep 1: softmax statistics (held tile: the whole row, loaded once)
        if SINGLE_TILE:
            z, a, b = _load_tile(S, T, s_row, t_row, base, n_cols, inv_temp, ACC)
            m_a, s_a, m_b, s_b, m_z, s_z, bad = _tile_stats(z, a, b, m_a, s_a, m_b, s_b, m_z, s_z, bad, HAS_CE)
        else:
            for start in range(0, n_cols, BLOCK):
                z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
                m_a, s_a, m_b, s_b, m_z, s_z, bad = _tile_stats(z, a, b, m_a, s_a, m_b, s_b, m_z, s_z, bad,
                                                                HAS_CE)
        status = tl.where((m_a == float("-inf")) | (m_b == float("-inf")), 1, status)
        ls_a = tl.log(s_a).to(ACC)
        ls_b = tl.log(s_b).to(ACC)
        ls_z = tl.log(s_z).to(ACC)
        # the divisor of the reduction and the chain rule through z / T, folded into two factors
        row_scale = 1.0 / tl.load(DIVISOR).to(ACC)
        grad_scale = kd_grad_scale * row_scale
        ce_scale = ce_weight * row_scale
        # sweep 2 (only when a gradient needs Gq or Gp): row sums and the loss, in float64; the
        # gradients subtract Gq and Gp as hi + lo pairs, so the cancellation in g - G is exact
        div64 = tl.zeros([], tl.float64)
        g_q64 = tl.zeros([], tl.float64)
        g_p64 = tl.zeros([], tl.float64)
        if NEEDS_ROW_SUMS:
            if SINGLE_TILE:
                div64, g_q64, g_p64 = _tile_sums(a, b, base, n_cols, m_a, ls_a, m_b, ls_b, mix, tiny, DIVERGENCE)
            else:
                for start in range(0, n_cols, BLOCK):
                    z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
                    t_div, t_q, t_p = _tile_sums(a, b, start + base, n_cols, m_a, ls_a, m_b, ls_b, mix, tiny,
                                                 DIVERGENCE)
                    div64 += t_div
                    g_q64 += t_q
                    g_p64 += t_p
        if ACC == tl.float64:
            g_q, g_q_lo, g_p, g_p_lo = g_q64, zero, g_p64, zero
        else:
            g_q, g_q_lo = _split(g_q64)
            g_p, g_p_lo = _split(g_p64)
        div = div64.to(ACC)
        # sweep 3: gradients (and the loss, if sweep 2 did not run)
        if STUDENT_GRAD or TEACHER_GRAD or not NEEDS_ROW_SUMS:
            if SINGLE_TILE:
                div_again = _tile_gradients(z, a, b, base, n_cols, label, m_a, ls_a, m_b, ls_b, m_z, ls_z, g_q,
                                            g_q_lo, g_p, g_p_lo, mix, tiny, grad_scale, ce_scale, GS, GT, gs_row,
                                            gt_row, DIVERGENCE, HAS_CE, STUDENT_GRAD, TEACHER_GRAD)
            else:
                div_again = tl.zeros([], tl.float64)
                for start in range(0, n_cols, BLOCK):
                    z, a, b = _load_tile(S, T, s_row, t_row, start + base, n_cols, inv_temp, ACC)
                    div_again += _tile_gradients(z, a, b, start + base, n_cols, label, m_a, ls_a, m_b, ls_b, m_z,
                                                 ls_z, g_q, g_q_lo, g_p, g_p_lo, mix, tiny, grad_scale, ce_scale,
                                                 GS, GT, gs_row, gt_row, DIVERGENCE, HAS_CE, STUDENT_GRAD,
                                                 TEACHER_GRAD)
            if not NEEDS_ROW_SUMS:
                div = div_again.to(ACC)
        loss = kd_loss_scale * div
        if HAS_CE:
            loss += ce_weight * (m_z + ls_z - z_label)
        loss = tl.where(bad != 0, float("nan"), loss)
        tl.store(ROW_LOSS + row, loss)
        tl.store(STATUS + row, status.to(tl.int8))
        if bad != 0:  # a NaN / +inf logit: the row's gradients are NaN, as PyTorch's would be
            for start in range(0, n_cols, BLOCK):
                cols = start + base
                if STUDENT_GRAD:
                    tl.store(GS + gs_row + cols, tl.full([BLOCK], float("nan"), GS.dtype.element_ty),
                             mask=cols < n_cols)
                if TEACHER_GRAD:
                    tl.store(GT + gt_row + cols, tl.full([BLOCK], float("nan"), GT.dtype.element_ty),
                             mask=cols < n_cols)


# -- host side ------------------------------------------------------------------------------------

# Rows up to MAX_SINGLE_TILE columns are held in registers (one read of each logit); longer rows
# are swept in tiles of BLOCK. Interpreted runs (TRITON_INTERPRET=1, CPU tensors) use small sizes
# so that the tests' vocabularies (up to a few thousand) exercise both paths.
GPU_TILING = {"max_single_tile": 32768, "block": 4096}
INTERPRETED_TILING = {"max_single_tile": 1024, "block": 512}
_PARAMS_CACHE_SIZE = 64


def tiling(n_cols: int, interpreted: bool) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_TILE, num_warps) for rows of ``n_cols`` columns."""
    sizes = INTERPRETED_TILING if interpreted else GPU_TILING
    width = triton.next_power_of_2(max(n_cols, 1))
    if width <= sizes["max_single_tile"]:
        return width, True, min(16, max(1, width // 1024))
    return sizes["block"], False, 8


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
    params = scalar_params(student.device, acc, (1.0 / temperature, mix, kd_loss_scale, kd_grad_scale, ce_weight,
                                                 torch.finfo(acc).tiny))
    needs_row_sums = (student_grad and divergence != FORWARD_KL) or (teacher_grad and divergence != REVERSE_KL)
    kd_loss_kernel[(n,)](
        student, teacher, grad_student, grad_teacher,
        labels if labels is not None else row_loss, mask if mask is not None else row_loss,
        divisor, params, row_loss, status,
        student.stride(0), teacher.stride(0), grad_student.stride(0) if student_grad else 0,
        grad_teacher.stride(0) if teacher_grad else 0, v, ignore_index,
        DIVERGENCE=divergence, HAS_LABELS=labels is not None, HAS_MASK=mask is not None, HAS_CE=ce_weight != 0,
        STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, NEEDS_ROW_SUMS=needs_row_sums,
        BLOCK=block, SINGLE_TILE=single_tile, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=num_warps,
    )
