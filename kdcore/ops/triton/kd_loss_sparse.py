"""Triton kernels of the kd_loss_sparse family: its two passes over ``[N, V]`` student logits (the
bucket math between them is kdcore/ops/kd_loss_sparse.py). One program per row.

- ``row_stats_kernel`` sweeps the row once for the log-sum-exps of ``a = z * inv_t`` over the whole
  row and over the entries outside the teacher's top-k, and of ``z`` (temperature 1). The two sums
  of ``a`` share one running maximum but are accumulated apart, so the tail is exact however small.
  Which columns of a tile are top-k entries comes from the row's *sorted* indices: a window of
  ``WINDOW`` of them at a time is compared with the tile's columns, and the window advances by the
  number that fell in the tile, so a row costs about ``V · WINDOW`` integer compares in all (the
  top-k of a large vocabulary rarely puts more than a window's worth in one tile).
- ``fill_kernel`` writes each gradient element once from six per-row values:
  ``kd_coef · exp(a - kd_hi - kd_lo) + ce_coef · (exp(z - ce_hi - ce_lo) - [j == label])``
  (each shift split into hi + lo in the accumulation type; exponents clamped at 0, which only the
  top-k entries reach and the op overwrites; rows not kept get 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdcore.ops.kd_loss_sparse import CE_COEF, CE_SHIFT, KD_SHIFT, KD_COEF
from kdcore.ops.triton.kd_loss import _exp, _is_bad, launch_device, scalar_params

GPU_BLOCK, INTERPRETED_BLOCK = 1024, 512
ROW_STATS_WARPS, FILL_WARPS = 8, 4  # the most columns a thread takes without spilling (sm_90)
MAX_WINDOW = 8


@triton.jit
def _online_update2(m, s_all, s_out, x, outside):
    """Folds tile x into a running maximum and two float64 sums of exp(x - maximum): over every
    column, and over the columns where ``outside``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m.to(tl.float64) - shift.to(tl.float64))
    e = _exp(x - shift)
    s_all = s_all * rescale + tl.sum(e, axis=0).to(tl.float64)
    s_out = s_out * rescale + tl.sum(tl.where(outside, e, 0.0), axis=0).to(tl.float64)
    return m_new, s_all, s_out


@triton.jit
def _lse(m, s):
    return m.to(tl.float64) + tl.log(s)


@triton.jit
def row_stats_kernel(S, IDX, OUT, INV_T, s_stride, n_cols, k, WITH_TAIL: tl.constexpr, WITH_T1: tl.constexpr,
                     BLOCK: tl.constexpr, WINDOW: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(INV_T)  # from a tensor in the accumulation type: kernel float arguments are fp32
    s_row = row * s_stride
    neg_inf = tl.full([], float("-inf"), ACC)
    zero64 = tl.zeros([], tl.float64)
    m_a, s_all, s_out = neg_inf, zero64, zero64
    m_z, s_z, unused = neg_inf, zero64, zero64
    bad = tl.zeros([], tl.int32)
    ptr = tl.zeros([], tl.int32)
    base = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + base
        z = tl.load(S + s_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
        bad = tl.maximum(bad, tl.max(_is_bad(z), axis=0))
        member = tl.zeros([BLOCK], tl.int32)
        if WITH_TAIL:
            more = ptr < k
            while more:
                slots = ptr + tl.arange(0, WINDOW)
                window = tl.load(IDX + row * k + slots, mask=slots < k, other=2147483647)
                member = tl.maximum(member, tl.max((cols[:, None] == window[None, :]).to(tl.int32), axis=1))
                taken = tl.sum((window < start + BLOCK).to(tl.int32), axis=0)
                ptr += taken
                more = (taken == WINDOW) & (ptr < k)
        m_a, s_all, s_out = _online_update2(m_a, s_all, s_out, z * inv_t, member == 0)
        if WITH_T1:
            m_z, s_z, unused = _online_update2(m_z, s_z, unused, z, member == 0)
    lse_all = _lse(m_a, s_all)
    lse_out = _lse(m_a, s_out)
    lse_t1 = _lse(m_z, s_z)
    nan = float("nan")
    tl.store(OUT + row * 3 + 0, tl.where(bad != 0, nan, lse_all))
    tl.store(OUT + row * 3 + 1, tl.where(bad != 0, nan, lse_out))
    tl.store(OUT + row * 3 + 2, tl.where(bad != 0, nan, lse_t1))


@triton.jit
def _exp_clamped(x):
    """exp(min(x, 0)): the exponents of the fill are <= 0 except at the top-k entries, whose
    values the op overwrites afterwards."""
    return _exp(tl.minimum(x, 0.0))


@triton.jit
def fill_kernel(S, G, KEPT, LABELS, PARAMS, INV_T, s_stride, g_stride, n_cols, HAS_CE: tl.constexpr,
                BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kept = tl.load(KEPT + row) != 0
    inv_t = tl.load(INV_T)
    kd_coef = tl.load(PARAMS + row * 6 + 0)
    kd_hi = tl.load(PARAMS + row * 6 + 1)
    kd_lo = tl.load(PARAMS + row * 6 + 2)
    ce_coef = tl.load(PARAMS + row * 6 + 3)
    ce_hi = tl.load(PARAMS + row * 6 + 4)
    ce_lo = tl.load(PARAMS + row * 6 + 5)
    label = -1
    if HAS_CE:
        label = tl.load(LABELS + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        z = tl.load(S + row * s_stride + cols, mask=in_row, other=0.0).to(ACC)
        g = kd_coef * _exp_clamped((z * inv_t - kd_hi) - kd_lo)
        if HAS_CE:
            g += ce_coef * (_exp_clamped((z - ce_hi) - ce_lo) - tl.where(cols == label, 1.0, 0.0))
        g = tl.where(kept, g, 0.0)
        tl.store(G + row * g_stride + cols, g.to(G.dtype.element_ty), mask=in_row)


def _acc(student):
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _tl_acc(student):
    return tl.float64 if student.dtype == torch.float64 else tl.float32


def _inv_t(student, inv_t: float) -> torch.Tensor:
    return scalar_params(student.device, _acc(student), (inv_t,))


def _block(interpreted: bool) -> int:
    return INTERPRETED_BLOCK if interpreted else GPU_BLOCK


def row_stats(student, indices, inv_t, with_tail, with_t1, *, interpreted: bool):
    n, v = student.shape
    k = indices.shape[1]
    out = torch.empty(n, 3, dtype=torch.float64, device=student.device)
    if n:
        with launch_device(student):
            row_stats_kernel[(n,)](student, indices, out, _inv_t(student, inv_t), student.stride(0), v, k,
                                   WITH_TAIL=with_tail, WITH_T1=with_t1, BLOCK=_block(interpreted),
                                   WINDOW=min(MAX_WINDOW, max(2, triton.next_power_of_2(k))), ACC=_tl_acc(student),
                                   num_warps=ROW_STATS_WARPS)
    return out


def _split(shift: torch.Tensor, acc: torch.dtype):
    """A float64 shift as hi + lo in acc (lo = 0 where the shift is infinite)."""
    hi = shift.to(acc)
    lo = torch.where(shift.isfinite(), shift - hi.to(torch.float64), 0.0).to(acc)
    return hi, lo


def fill(student, kept, labels, coefficients, inv_t, *, interpreted: bool):
    n, v = student.shape
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    acc = _acc(student)
    kd_hi, kd_lo = _split(coefficients[:, KD_SHIFT], acc)
    ce_hi, ce_lo = _split(coefficients[:, CE_SHIFT], acc)
    params = torch.stack([coefficients[:, KD_COEF].to(acc), kd_hi, kd_lo, coefficients[:, CE_COEF].to(acc), ce_hi,
                          ce_lo], dim=1).contiguous()
    with launch_device(student):
        fill_kernel[(n,)](student, grad, kept, labels if labels is not None else kept, params,
                          _inv_t(student, inv_t), student.stride(0), grad.stride(0), v, HAS_CE=labels is not None,
                          BLOCK=_block(interpreted), ACC=_tl_acc(student), num_warps=FILL_WARPS)
    return grad
