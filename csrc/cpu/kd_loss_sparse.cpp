// CPU kernels of the kd_loss_sparse op family: its two passes over [N, V] student logits
// (kdcore/ops/kd_loss_sparse.py holds the bucket math between them).
//
//   sparse_row_stats_cpp  per row, the log-sum-exps of a = z * inv_t over the whole row and over
//                         the entries outside the teacher's top-k, and of z itself (temperature 1).
//                         The two sums of a are accumulated separately (a per-thread 0/1 row marks
//                         the top-k), so the tail mass is exact however small it is, never the
//                         difference of two nearly equal sums.
//   sparse_fill_cpp       a new gradient tensor, every element from four per-row coefficients:
//                         kd_coef * exp(a - kd_shift) + ce_coef * (exp(z - ce_shift) - [j == label]);
//                         the exponents are <= 0 except at the top-k entries, which the op
//                         overwrites afterwards, so they are clamped at 0 for the fast exp.
//
// One row per task (at::parallel_for), tiles of kTile logits converted to the accumulation type;
// each logit is read from DRAM once per pass and each gradient element written once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kdcore/cpu_rows.h"

namespace kdcore {
namespace cpu {
namespace {

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// A running log-sum-exp: the maximum so far and double sums of exp(x - maximum).
struct RunningSums {
  double max = -std::numeric_limits<double>::infinity();
  double all = 0, outside = 0;

  // Moves the shift up to `tile_max` (rescaling the sums); returns the shift to use for the tile.
  double raise(double tile_max) {
    if (tile_max > max) {
      const double rescale = max == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(max - tile_max);
      all *= rescale;
      outside *= rescale;
      max = tile_max;
    }
    return max;
  }
  double lse(double sum) const {
    return max == -std::numeric_limits<double>::infinity() ? max : max + std::log(sum);
  }
};

void check_rows(const char* op, const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": expected [N, V] student logits, got ", student.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu(), op, ": runs on CPU tensors, got ", student.device());
  TORCH_CHECK_VALUE(student.size(1) <= 1 || student.stride(1) == 1, op,
                    ": student logits must have unit stride along the vocabulary");
}

template <typename acc_t>
void row_stats(const at::Tensor& student, const at::Tensor& indices, acc_t inv_t, bool with_tail, bool with_t1,
               double* out) {
  using V = Vec<acc_t>;
  const int64_t n = student.size(0), v = student.size(1), k = indices.size(1);
  const RowTensor<acc_t> rows = make_row_tensor<acc_t>(student);
  const int64_t* idx = indices.data_ptr<int64_t>();
  const bool separate_t1 = with_t1 && inv_t != acc_t(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t tile[kTile];
    std::vector<acc_t> outside(with_tail ? padded<acc_t>(v) : 0, acc_t(0));  // 1 outside the top-k
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* row_idx = idx + row * k;
      if (with_tail) {
        std::fill(outside.begin(), outside.begin() + v, acc_t(1));
        for (int64_t i = 0; i < k; ++i) {
          if (row_idx[i] >= 0 && row_idx[i] < v) outside[row_idx[i]] = acc_t(0);  // checked for kept rows
        }
      }
      RunningSums a_sums, z_sums;
      for (int64_t start = 0; start < v; start += kTile) {
        const int64_t len = std::min(kTile, v - start), nv = padded<acc_t>(len);
        const acc_t* z = rows.load(rows.at(row, start), len, tile);
        V vmax_z(-kInf<acc_t>);
        for (int64_t j = 0; j < nv; j += V::size()) vmax_z = vmax(vmax_z, V::loadu(z + j));
        const acc_t max_z = hmax(vmax_z);
        if (max_z == -kInf<acc_t>) {  // nothing but -inf here, unless a NaN hid from the maximum
          bool nan = false;
          for (int64_t j = 0; j < len; ++j) nan |= std::isnan(z[j]);
          if (nan) a_sums.all = z_sums.all = std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        const V shift_a(static_cast<acc_t>(a_sums.raise(double(max_z * inv_t)))), scale(inv_t);
        V sum_all(0), sum_outside(0);
        for (int64_t j = 0; j < nv; j += V::size()) {
          const V e = VecMath<acc_t>::exp(V::loadu(z + j) * scale - shift_a);  // of x - max <= 0
          sum_all += e;
          if (with_tail) sum_outside += e * V::loadu(outside.data() + start + j);
        }
        a_sums.all += hsum(sum_all);
        a_sums.outside += hsum(sum_outside);
        if (separate_t1) {
          const V shift_z(static_cast<acc_t>(z_sums.raise(double(max_z))));
          V sum_z(0);
          for (int64_t j = 0; j < nv; j += V::size()) sum_z += VecMath<acc_t>::exp(V::loadu(z + j) - shift_z);
          z_sums.all += hsum(sum_z);
        }
      }
      double* o = out + row * 3;
      o[0] = a_sums.lse(a_sums.all);
      o[1] = with_tail ? a_sums.lse(a_sums.outside) : 0.0;
      o[2] = !with_t1 ? 0.0 : separate_t1 ? z_sums.lse(z_sums.all) : o[0];
    }
  });
}

at::Tensor sparse_row_stats_cpp(const at::Tensor& student, const at::Tensor& indices, double inv_t, bool with_tail,
                                bool with_t1) {
  constexpr const char* op = "sparse_row_stats_cpp";
  check_rows(op, student);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.scalar_type() == at::kLong &&
                        indices.is_contiguous() && indices.device() == student.device(),
                    op, ": indices must be contiguous int64 [N, k] beside the student, got ", indices.scalar_type(), " ",
                    indices.sizes());
  at::Tensor out = at::empty({student.size(0), 3}, student.options().dtype(at::kDouble));
  if (student.numel() == 0) return out.zero_();
  if (student.scalar_type() == at::kDouble) {
    row_stats<double>(student, indices, inv_t, with_tail, with_t1, out.data_ptr<double>());
  } else {
    row_stats<float>(student, indices, static_cast<float>(inv_t), with_tail, with_t1, out.data_ptr<double>());
  }
  return out;
}

// One term of the fill, c * exp(min(x - shift, 0)), with the double shift split into hi + lo in
// the accumulation type so that x * inv_t - hi stays exact near the row's largest entries.
template <typename acc_t>
struct ExpTerm {
  bool active = false;
  acc_t coef = 0, hi = 0, lo = 0;
  ExpTerm(double c, double shift) {
    active = c != 0 && shift != std::numeric_limits<double>::infinity();
    if (!active) return;
    coef = static_cast<acc_t>(c);
    hi = static_cast<acc_t>(shift);
    lo = std::isfinite(shift) ? static_cast<acc_t>(shift - double(hi)) : acc_t(0);
  }
};

template <typename acc_t>
void fill(const at::Tensor& student, const at::Tensor& grad, const bool* kept, const int64_t* labels,
          const double* coefficients, acc_t inv_t) {
  using V = Vec<acc_t>;
  using M = VecMath<acc_t>;
  const int64_t n = student.size(0), v = student.size(1);
  const RowTensor<acc_t> rows = make_row_tensor<acc_t>(student);
  const RowTensor<acc_t> out = make_row_tensor<acc_t>(grad);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t tile[kTile];
    alignas(64) acc_t buf[kTile];
    for (int64_t row = begin; row < end; ++row) {
      const double* c = coefficients + row * 4;
      const bool poisoned = std::isnan(c[0]) || std::isnan(c[1]) || std::isnan(c[2]) || std::isnan(c[3]);
      const ExpTerm<acc_t> kd(c[1], c[0]), ce(c[3], c[2]);
      const int64_t label = labels != nullptr ? labels[row] : -1;
      for (int64_t start = 0; start < v; start += kTile) {
        const int64_t len = std::min(kTile, v - start), nv = padded<acc_t>(len);
        acc_t* g = out.target(out.at(row, start), len, buf);
        if (!kept[row] || poisoned) {
          std::fill(g, g + nv, kept[row] ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0));
        } else {
          const acc_t* z = rows.load(rows.at(row, start), len, tile);
          const V scale(inv_t), kd_coef(kd.coef), kd_hi(kd.hi), kd_lo(kd.lo);
          const V ce_coef(ce.coef), ce_hi(ce.hi), ce_lo(ce.lo), zero(0);
          for (int64_t j = 0; j < nv; j += V::size()) {
            const V x = V::loadu(z + j);
            V value(0);
            if (kd.active) value = kd_coef * M::exp(at::vec::minimum((x * scale - kd_hi) - kd_lo, zero));
            if (ce.active) value += ce_coef * M::exp(at::vec::minimum((x - ce_hi) - ce_lo, zero));
            value.store(g + j);
          }
          if (ce.active && label >= start && label < start + len) g[label - start] -= ce.coef;
        }
        out.store(g, len, out.at(row, start));
      }
    }
  });
}

at::Tensor sparse_fill_cpp(const at::Tensor& student, const at::Tensor& kept, const std::optional<at::Tensor>& labels,
                           const at::Tensor& coefficients, double inv_t) {
  constexpr const char* op = "sparse_fill_cpp";
  check_rows(op, student);
  const int64_t n = student.size(0);
  TORCH_CHECK_VALUE(kept.dim() == 1 && kept.size(0) == n && kept.scalar_type() == at::kBool && kept.is_contiguous(), op,
                    ": kept must be contiguous bool [N]");
  TORCH_CHECK_VALUE(coefficients.sizes() == at::IntArrayRef({n, 4}) && coefficients.scalar_type() == at::kDouble &&
                        coefficients.is_contiguous(),
                    op, ": coefficients must be contiguous float64 [N, 4]");
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == n && labels->scalar_type() == at::kLong &&
                          labels->is_contiguous(),
                      op, ": labels must be contiguous int64 [N]");
  }
  at::Tensor grad = at::empty(student.sizes(), student.options());
  if (student.numel() == 0) return grad;
  advise_huge_pages(grad);  // a fresh [N, V] buffer: one fault per 2 MiB instead of per 4 KiB
  const int64_t* label_ptr = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  if (student.scalar_type() == at::kDouble) {
    fill<double>(student, grad, kept.data_ptr<bool>(), label_ptr, coefficients.data_ptr<double>(), inv_t);
  } else {
    fill<float>(student, grad, kept.data_ptr<bool>(), label_ptr, coefficients.data_ptr<double>(),
                static_cast<float>(inv_t));
  }
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CPU, m) {
  m.impl("sparse_row_stats_cpp", &kdcore::cpu::sparse_row_stats_cpp);
  m.impl("sparse_fill_cpp", &kdcore::cpu::sparse_fill_cpp);
}
