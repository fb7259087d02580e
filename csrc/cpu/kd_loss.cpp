// CPU kernel of the kd_loss op family (kdcore::kd_loss_cpp).
//
// One row of the vocabulary per task (at::parallel_for over rows), processed in tiles of
// kTile elements that are converted to the accumulation type (float; double for float64 input)
// and padded with -inf, so every vector loop runs over whole at::vec::Vectorized registers.
//
//   pass 1  online max and exp-sum of both rows (and of the student at T = 1 for the fused CE),
//           plus the KL cross term, so forward and reverse KL know d after this pass;
//   pass 2  for jsd / skew_kl / skew_rkl / tvd: the row sums d, Gq, Gp of the Jacobian (and for
//           the KL variants when no gradient is wanted: d elementwise, for the loss);
//   pass 3  the gradients, written once in the logits' dtype, and d elementwise for the loss.
// Memory traffic: each logit is read from DRAM once (a row of both tensors stays in L2 for the
// later passes up to ~500 KB per row pair) and each gradient element is written once; no
// [N, V] temporary is allocated besides the gradients themselves.
//
// This file is compiled once per instruction set (default, AVX2, AVX-512) into its own Python
// module; kdcore/_ext.py loads the best one the processor supports.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "kdcore/divergence.h"
#include "kdcore/kd_loss_host.h"

#define KDCORE_STRINGIFY_(x) #x
#define KDCORE_STRINGIFY(x) KDCORE_STRINGIFY_(x)

namespace kdcore {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;

// exp for float vectors, accurate to 1 ulp for normal results (Cephes expf: Cody-Waite range
// reduction with ln 2 split in two, degree-6 minimax polynomial), 20% faster than Sleef's u10 and
// within 10% of at::vec's exp_u20, whose ~20 ulp error would show in the loss. Results below
// FLT_MIN flush to 0, -inf gives 0; NaN and +inf never reach it (those rows are NaN already).
inline at::vec::Vectorized<float> exp_1ulp(const at::vec::Vectorized<float>& x) {
  using F = at::vec::Vectorized<float>;
  using I = at::vec::Vectorized<int32_t>;
  const F lowest(-88.3762626647949f), highest(88.3762626647949f);
  const F xc = at::vec::minimum(at::vec::maximum(x, lowest), highest);
  const F n = (xc * F(1.44269504088896341f)).round();
  F r = at::vec::fmadd(n, F(-0.693359375f), xc);
  r = at::vec::fmadd(n, F(2.12194440e-4f), r);
  F y(1.9875691500e-4f);
  y = at::vec::fmadd(y, r, F(1.3981999507e-3f));
  y = at::vec::fmadd(y, r, F(8.3334519073e-3f));
  y = at::vec::fmadd(y, r, F(4.1665795894e-2f));
  y = at::vec::fmadd(y, r, F(1.6666665459e-1f));
  y = at::vec::fmadd(y, r, F(5.0000001201e-1f));
  y = at::vec::fmadd(y, r * r, r + F(1.0f));
  const I two_to_n = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
  return F::blendv(y * at::vec::cast<float>(two_to_n), F(0.0f), x < lowest);
}

template <typename T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  static V splat(T x) { return V(x); }
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return exp_1ulp(x);
    } else {
      return x.exp();
    }
  }
  static V log(const V& x) { return x.log(); }
  static V abs(const V& x) { return x.abs(); }
  static V gt(const V& a, const V& b) { return a > b; }
  static V select(const V& mask, const V& x, const V& y) { return V::blendv(y, x, mask); }
};

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
constexpr int64_t padded(int64_t n) {
  constexpr int64_t w = Vec<acc_t>::size();
  return (n + w - 1) / w * w;
}

// Reads n logits of type src_t into acc_t, padded with -inf to whole vectors. Returns src itself
// when no conversion or padding is needed.
template <typename src_t, typename acc_t>
const acc_t* load_tile(const void* src_v, int64_t n, acc_t* buf) {
  const src_t* src = static_cast<const src_t*>(src_v);
  if constexpr (std::is_same_v<src_t, acc_t>) {
    if (n % Vec<acc_t>::size() == 0) return src;
    std::copy(src, src + n, buf);
  } else {
    at::vec::convert(src, buf, n);
  }
  std::fill(buf + n, buf + padded<acc_t>(n), -std::numeric_limits<acc_t>::infinity());
  return buf;
}

// Where a tile's gradient is computed: straight into the output when the dtypes match and the
// tile is whole vectors, else into buf (then store_tile converts).
template <typename dst_t, typename acc_t>
acc_t* tile_target(void* dst, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    if (n % Vec<acc_t>::size() == 0) return static_cast<acc_t*>(dst);
  }
  return buf;
}

template <typename dst_t, typename acc_t>
void store_tile(const acc_t* values, int64_t n, void* dst_v) {
  dst_t* dst = static_cast<dst_t*>(dst_v);
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    if (values != dst) std::copy(values, values + n, dst);
  } else {
    at::vec::convert(values, dst, n);
  }
}

// A logits tensor (or its gradient) seen as rows of raw bytes plus the conversions for its dtype.
template <typename acc_t>
struct RowTensor {
  char* data = nullptr;
  int64_t row_stride = 0;  // bytes
  int64_t elem_size = 0;   // bytes
  const acc_t* (*load)(const void*, int64_t, acc_t*) = nullptr;
  acc_t* (*target)(void*, int64_t, acc_t*) = nullptr;
  void (*store)(const acc_t*, int64_t, void*) = nullptr;

  char* at(int64_t row, int64_t col) const { return data + row * row_stride + col * elem_size; }
};

template <typename src_t, typename acc_t>
RowTensor<acc_t> row_tensor_of(const at::Tensor& t) {
  RowTensor<acc_t> r;
  r.data = static_cast<char*>(t.data_ptr());
  r.elem_size = sizeof(src_t);
  r.row_stride = t.dim() == 2 ? t.stride(0) * r.elem_size : 0;
  r.load = &load_tile<src_t, acc_t>;
  r.target = &tile_target<src_t, acc_t>;
  r.store = &store_tile<src_t, acc_t>;
  return r;
}

template <typename acc_t>
RowTensor<acc_t> make_row_tensor(const at::Tensor& t) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return row_tensor_of<double, double>(t);
  } else {
    switch (t.scalar_type()) {
      case at::kFloat:
        return row_tensor_of<float, float>(t);
      case at::kBFloat16:
        return row_tensor_of<c10::BFloat16, float>(t);
      case at::kHalf:
        return row_tensor_of<c10::Half, float>(t);
      default:
        TORCH_CHECK(false, "kd_loss_cpp: unsupported dtype ", t.scalar_type());
    }
  }
}

enum class RowError : int { None = 0, AllMasked = 1, LabelOutOfRange = 2 };

template <typename acc_t>
struct Problem {
  RowTensor<acc_t> student, teacher, grad_student, grad_teacher;
  const int64_t* labels = nullptr;  // may be null
  const bool* mask = nullptr;       // may be null
  acc_t* row_loss = nullptr;        // [N]
  int64_t n_rows = 0, vocab = 0;
  KdLossOptions opt{};
  double row_scale = 1.0;  // gradient factor: 1 / divisor for 'batchmean', else 1
  // the first failing row and why, raised after the parallel loop
  std::mutex error_mutex;
  int64_t error_row = std::numeric_limits<int64_t>::max();
  RowError error = RowError::None;

  void report(int64_t row, RowError kind) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (row < error_row) {
      error_row = row;
      error = kind;
    }
  }
};

template <typename acc_t>
struct Scratch {
  alignas(64) acc_t student[kTile];
  alignas(64) acc_t teacher[kTile];
  alignas(64) acc_t grad_student[kTile];
  alignas(64) acc_t grad_teacher[kTile];
};

template <typename acc_t>
acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& x, Vec<acc_t>& y) { return x + y; }, v);
}

template <typename acc_t>
acc_t hmax(const Vec<acc_t>& v) {  // NaN-propagating
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& x, Vec<acc_t>& y) { return at::vec::maximum(x, y); }, v);
}

template <typename acc_t>
bool is_nan_or_posinf(acc_t x) {
  return std::isnan(x) || x == std::numeric_limits<acc_t>::infinity();
}

// Softmax statistics of one row pair.
struct RowStats {
  // log-sum-exp of a = s/T, b = t/T and s, kept as (exact row maximum, log of the shifted sum):
  // a - max is exact near the maximum, so a - max - log_sum loses nothing to the size of a.
  double max_a = 0, max_b = 0, max_1 = 0;
  double log_sum_a = 0, log_sum_b = 0, log_sum_1 = 0;
  double lse_a() const { return max_a + log_sum_a; }
  double lse_b() const { return max_b + log_sum_b; }
  double lse_1() const { return max_1 + log_sum_1; }
  double d = 0;                            // the divergence (KL variants: known after pass 1)
  bool bad = false;                        // a NaN or +inf logit: the row's loss and gradient are NaN
  bool all_masked = false;                 // one of the rows is entirely -inf
};

// Log-probabilities from raw logits, given a row's statistics.
template <typename acc_t>
struct LogProbs {
  using V = Vec<acc_t>;
  V inv_t, max_a, log_sum_a, max_b, log_sum_b, max_1, log_sum_1;
  LogProbs(const RowStats& st, acc_t inv_temperature)
      : inv_t(inv_temperature),
        max_a(static_cast<acc_t>(st.max_a)),
        log_sum_a(static_cast<acc_t>(st.log_sum_a)),
        max_b(static_cast<acc_t>(st.max_b)),
        log_sum_b(static_cast<acc_t>(st.log_sum_b)),
        max_1(static_cast<acc_t>(st.max_1)),
        log_sum_1(static_cast<acc_t>(st.log_sum_1)) {}
  V student(const V& s) const { return (s * inv_t - max_a) - log_sum_a; }     // log q
  V teacher(const V& t) const { return (t * inv_t - max_b) - log_sum_b; }     // log p
  V student_t1(const V& s) const { return (s - max_1) - log_sum_1; }          // log softmax(s)
};

template <typename acc_t, Divergence D>
class RowKernel {
  using V = Vec<acc_t>;
  using M = VecMath<acc_t>;
  using Traits = DivergenceTraits<D>;
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

 public:
  explicit RowKernel(Problem<acc_t>& pb)
      : pb_(pb),
        inv_t_(static_cast<acc_t>(1.0 / pb.opt.temperature)),
        separate_ce_(pb.opt.ce_weight != 0.0 && pb.opt.temperature != 1.0),
        c_(make_constants<M>(static_cast<acc_t>(pb.opt.mix))) {}

  void run(int64_t row, Scratch<acc_t>& scratch) {
    const KdLossOptions& o = pb_.opt;
    const bool kept = (pb_.mask == nullptr || pb_.mask[row]) &&
                      (pb_.labels == nullptr || pb_.labels[row] != o.ignore_index);
    if (!kept) {
      pb_.row_loss[row] = 0;
      fill_gradients(row, acc_t(0));
      return;
    }
    const int64_t label = pb_.labels != nullptr ? pb_.labels[row] : -1;
    if (o.ce_weight != 0.0 && (label < 0 || label >= pb_.vocab)) {
      pb_.report(row, RowError::LabelOutOfRange);
      return;
    }
    RowStats st = statistics(row, scratch);
    if (st.all_masked) {
      pb_.report(row, RowError::AllMasked);
      return;
    }
    if (st.bad) {
      pb_.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
      fill_gradients(row, std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    // The KL divergences know d (hence Gq, Gp) after pass 1, but the loss takes d from the
    // elementwise sum of pass 2 or 3, which does not cancel to an ulp of the logits.
    JacobianSums<double> sums = kl_jacobian_sums(D, st.d);
    const bool any_grad = o.student_grad || o.teacher_grad;
    if (Traits::kNeedsRowSums || !any_grad) sums = row_sums(row, scratch, st);
    const LossScales<double> scales = loss_scales(o.temperature, o.t2_scale, o.kd_weight);
    if (any_grad) st.d = gradients(row, scratch, st, sums, scales, label);

    double loss = scales.kd_loss * st.d;
    if (o.ce_weight != 0.0) {
      alignas(64) acc_t logit[V::size()];
      const acc_t* loaded = pb_.student.load(pb_.student.at(row, label), 1, logit);
      loss += o.ce_weight * (st.max_1 - static_cast<double>(loaded[0]) + st.log_sum_1);
    }
    pb_.row_loss[row] = static_cast<acc_t>(loss);
  }

 private:
  RowStats statistics(int64_t row, Scratch<acc_t>& scratch) {
    RowStats st;
    acc_t max_s = -kInf, max_t = -kInf;  // running maxima of the raw logits
    double sum_a = 0, sum_b = 0, sum_1 = 0;  // exp-sums relative to the running maxima
    // KL cross term: sum of e * ((x - max_x) - (y - max_y)), weights e of the teacher (forward KL)
    // or the student (reverse KL). Working on shifted values, the maxima cancel exactly in d.
    double cross = 0;
    const V inv_t(inv_t_);
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      const int64_t n = std::min(kTile, pb_.vocab - start), nv = padded<acc_t>(n);
      const acc_t* s = pb_.student.load(pb_.student.at(row, start), n, scratch.student);
      const acc_t* t = pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher);
      V vmax_s(-kInf), vmax_t(-kInf);
      for (int64_t j = 0; j < nv; j += V::size()) {
        vmax_s = at::vec::maximum(vmax_s, V::loadu(s + j));
        vmax_t = at::vec::maximum(vmax_t, V::loadu(t + j));
      }
      const acc_t tile_max_s = hmax(vmax_s), tile_max_t = hmax(vmax_t);
      if (is_nan_or_posinf(tile_max_s) || is_nan_or_posinf(tile_max_t)) {
        st.bad = true;
        return st;
      }
      // Move the running maxima; rescale the sums and correct the cross term by the shift deltas
      // (a sum still at -inf has nothing to rescale, and its delta counts as 0).
      const acc_t new_max_s = std::max(max_s, tile_max_s), new_max_t = std::max(max_t, tile_max_t);
      const double delta_a = max_s == -kInf ? 0.0 : double(new_max_s * inv_t_) - double(max_s * inv_t_);
      const double delta_b = max_t == -kInf ? 0.0 : double(new_max_t * inv_t_) - double(max_t * inv_t_);
      const double delta_1 = max_s == -kInf ? 0.0 : double(new_max_s) - double(max_s);
      if constexpr (D == Divergence::ForwardKL) {
        if (delta_a != 0 || delta_b != 0) cross = (cross - (delta_b - delta_a) * sum_b) * std::exp(-delta_b);
      }
      if constexpr (D == Divergence::ReverseKL) {
        if (delta_a != 0 || delta_b != 0) cross = (cross - (delta_a - delta_b) * sum_a) * std::exp(-delta_a);
      }
      sum_a *= std::exp(-delta_a);
      sum_b *= std::exp(-delta_b);
      sum_1 *= std::exp(-delta_1);
      max_s = new_max_s;
      max_t = new_max_t;
      // A row that is -inf so far contributes nothing; a finite shift keeps exp(-inf - shift) = 0.
      const V shift_a(max_s == -kInf ? acc_t(0) : max_s * inv_t_);
      const V shift_b(max_t == -kInf ? acc_t(0) : max_t * inv_t_);
      const V shift_1(max_s == -kInf ? acc_t(0) : max_s);
      V acc_a(0), acc_b(0), acc_1(0), acc_cross(0);
      for (int64_t j = 0; j < nv; j += V::size()) {
        const V sv = V::loadu(s + j);
        const V xa = sv * inv_t - shift_a, xb = V::loadu(t + j) * inv_t - shift_b;
        const V ea = M::exp(xa), eb = M::exp(xb);
        acc_a += ea;
        acc_b += eb;
        if constexpr (D == Divergence::ForwardKL) acc_cross += kl_cross_term<M>(eb, xb, xa, c_);
        if constexpr (D == Divergence::ReverseKL) acc_cross += kl_cross_term<M>(ea, xa, xb, c_);
        if (separate_ce_) acc_1 += M::exp(sv - shift_1);
      }
      sum_a += hsum(acc_a);
      sum_b += hsum(acc_b);
      sum_1 += hsum(acc_1);
      cross += hsum(acc_cross);
    }
    if (max_s == -kInf || max_t == -kInf) {
      st.all_masked = true;
      return st;
    }
    // the same float products as the shifts of the loop above, so a - max_a is exact at the maximum
    st.max_a = static_cast<acc_t>(max_s * inv_t_);
    st.max_b = static_cast<acc_t>(max_t * inv_t_);
    st.log_sum_a = std::log(sum_a);
    st.log_sum_b = std::log(sum_b);
    st.max_1 = separate_ce_ ? max_s : st.max_a;
    st.log_sum_1 = separate_ce_ ? std::log(sum_1) : st.log_sum_a;
    if constexpr (D == Divergence::ForwardKL) st.d = cross / sum_b - st.log_sum_b + st.log_sum_a;
    if constexpr (D == Divergence::ReverseKL) st.d = cross / sum_a - st.log_sum_a + st.log_sum_b;
    return st;
  }

  // Pass 2: d, Gq = sum q*gq and Gp = sum p*gp.
  JacobianSums<double> row_sums(int64_t row, Scratch<acc_t>& scratch, RowStats& st) {
    const LogProbs lp(st, inv_t_);
    double d = 0, gq = 0, gp = 0;
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      const int64_t n = std::min(kTile, pb_.vocab - start), nv = padded<acc_t>(n);
      const acc_t* s = pb_.student.load(pb_.student.at(row, start), n, scratch.student);
      const acc_t* t = pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher);
      V acc_d(0), acc_q(0), acc_p(0);
      for (int64_t j = 0; j < nv; j += V::size()) {
        const V la = lp.student(V::loadu(s + j)), lb = lp.teacher(V::loadu(t + j));
        const ElementTerms<V> e = Traits::template terms<M>(la, lb, M::exp(la), M::exp(lb), c_);
        acc_d += e.term;
        acc_q += e.qgq;
        acc_p += e.pgp;
      }
      d += hsum(acc_d);
      gq += hsum(acc_q);
      gp += hsum(acc_p);
    }
    st.d = d;
    return {gq, gp};
  }

  // Pass 3: dLoss/ds = kd_grad * q (gq - Gq) + ce_weight * (softmax(s) - onehot), and
  // dLoss/dt = kd_grad * p (gp - Gp), both times the row scale. Returns d, summed elementwise.
  double gradients(int64_t row, Scratch<acc_t>& scratch, const RowStats& st, const JacobianSums<double>& sums,
                 const LossScales<double>& scales, int64_t label) {
    const KdLossOptions& o = pb_.opt;
    const bool fused_ce = o.ce_weight != 0.0;
    const LogProbs lp(st, inv_t_);
    const V g_q(static_cast<acc_t>(sums.gq)), g_p(static_cast<acc_t>(sums.gp));
    const V kd_scale(static_cast<acc_t>(scales.kd_grad * pb_.row_scale));
    const acc_t ce_scale_s = static_cast<acc_t>(o.ce_weight * pb_.row_scale);
    const V ce_scale(ce_scale_s);
    double d = 0;
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      const int64_t n = std::min(kTile, pb_.vocab - start), nv = padded<acc_t>(n);
      const acc_t* s = pb_.student.load(pb_.student.at(row, start), n, scratch.student);
      const acc_t* t = pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher);
      acc_t* gs = o.student_grad ? pb_.grad_student.target(pb_.grad_student.at(row, start), n, scratch.grad_student)
                                 : nullptr;
      acc_t* gt = o.teacher_grad ? pb_.grad_teacher.target(pb_.grad_teacher.at(row, start), n, scratch.grad_teacher)
                                 : nullptr;
      V acc_d(0);
      for (int64_t j = 0; j < nv; j += V::size()) {
        const V sv = V::loadu(s + j);
        const V la = lp.student(sv), lb = lp.teacher(V::loadu(t + j));
        const V q = M::exp(la), p = M::exp(lb);
        const ElementTerms<V> e = Traits::template terms<M>(la, lb, q, p, c_);
        acc_d += e.term;
        if (gs != nullptr) {
          V g = Traits::template student_grad<M>(e, q, p, g_q, c_) * kd_scale;
          if (fused_ce) g += ce_scale * (separate_ce_ ? M::exp(lp.student_t1(sv)) : q);
          g.store(gs + j, std::min<int64_t>(V::size(), n - j));
        }
        if (gt != nullptr) {
          (Traits::template teacher_grad<M>(e, q, p, g_p, c_) * kd_scale).store(gt + j, std::min<int64_t>(V::size(), n - j));
        }
      }
      d += hsum(acc_d);
      if (gs != nullptr) {
        if (fused_ce && label >= start && label < start + n) gs[label - start] -= ce_scale_s;
        pb_.grad_student.store(gs, n, pb_.grad_student.at(row, start));
      }
      if (gt != nullptr) pb_.grad_teacher.store(gt, n, pb_.grad_teacher.at(row, start));
    }
    return d;
  }

  void fill_gradients(int64_t row, acc_t value) {
    fill_row(pb_.opt.student_grad ? &pb_.grad_student : nullptr, row, value);
    fill_row(pb_.opt.teacher_grad ? &pb_.grad_teacher : nullptr, row, value);
  }

  void fill_row(const RowTensor<acc_t>* g, int64_t row, acc_t value) {
    if (g == nullptr) return;
    acc_t buf[kTile];
    std::fill(buf, buf + kTile, value);
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      g->store(buf, std::min(kTile, pb_.vocab - start), g->at(row, start));
    }
  }

  Problem<acc_t>& pb_;
  const acc_t inv_t_;
  const bool separate_ce_;  // fused CE at T != 1 needs its own exp-sum and softmax
  const DivergenceConstants<V> c_;
};

template <typename acc_t, Divergence D>
void run_rows(Problem<acc_t>& pb) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(pb.vocab, 1));
  at::parallel_for(0, pb.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowKernel<acc_t, D> kernel(pb);
    auto scratch = std::make_unique<Scratch<acc_t>>();
    for (int64_t row = begin; row < end; ++row) kernel.run(row, *scratch);
  });
}

template <typename acc_t>
void dispatch_divergence(Problem<acc_t>& pb) {
  switch (pb.opt.divergence) {
    case Divergence::ForwardKL:
      return run_rows<acc_t, Divergence::ForwardKL>(pb);
    case Divergence::ReverseKL:
      return run_rows<acc_t, Divergence::ReverseKL>(pb);
    case Divergence::JSD:
      return run_rows<acc_t, Divergence::JSD>(pb);
    case Divergence::SkewKL:
      return run_rows<acc_t, Divergence::SkewKL>(pb);
    case Divergence::SkewRKL:
      return run_rows<acc_t, Divergence::SkewRKL>(pb);
    case Divergence::TVD:
      return run_rows<acc_t, Divergence::TVD>(pb);
  }
}

template <typename acc_t>
void compute(Problem<acc_t>& pb, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad_s,
             const at::Tensor& grad_t) {
  pb.student = make_row_tensor<acc_t>(student);
  pb.teacher = make_row_tensor<acc_t>(teacher);
  if (pb.opt.student_grad) pb.grad_student = make_row_tensor<acc_t>(grad_s);
  if (pb.opt.teacher_grad) pb.grad_teacher = make_row_tensor<acc_t>(grad_t);
  dispatch_divergence(pb);
  if (pb.error == RowError::AllMasked) {
    TORCH_CHECK_VALUE(false, "kd_loss: row ", pb.error_row,
                      " of the logits is entirely -inf in the student or the teacher; every kept row needs a "
                      "finite logit (mark the row ignored with labels=ignore_index or mask=False)");
  }
  if (pb.error == RowError::LabelOutOfRange) {
    const int64_t row = pb.error_row;
    TORCH_CHECK_VALUE(false, "kd_loss: labels[", row, "] = ", pb.labels[row], " is outside [0, ", pb.vocab,
                      ") and is not ignore_index (", pb.opt.ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& normalizer, double temperature,
    int64_t divergence, double mix, bool t2_scale, double kd_weight, double ce_weight, int64_t ignore_index,
    int64_t reduction, bool student_grad, bool teacher_grad) {
  const KdLossOptions opt = make_options(divergence, temperature, mix, t2_scale, kd_weight, ce_weight,
                                         ignore_index, reduction, student_grad, teacher_grad);
  check_inputs("kd_loss_cpp", student, teacher, labels, mask, normalizer, opt);
  TORCH_CHECK_VALUE(student.device().is_cpu(), "kd_loss_cpp: runs on CPU tensors, got ", student.device());
  const int64_t n = student.size(0), v = student.size(1);
  const auto loss_opts = student.options().dtype(loss_dtype(student));
  at::Tensor row_loss = at::empty({n}, loss_opts);
  at::Tensor grad_s = at::empty(student_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, student.options());
  at::Tensor grad_t = at::empty(teacher_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, teacher.options());
  at::Tensor labels_c = labels.has_value() ? labels->contiguous() : at::Tensor();
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor divisor =
      loss_divisor(kept_rows(labels, mask, ignore_index), n, normalizer, opt.reduction, loss_opts);
  if (n > 0) {
    const double row_scale = 1.0 / divisor.item<double>();
    auto fill = [&](auto& pb) {
      pb.opt = opt;
      pb.n_rows = n;
      pb.vocab = v;
      pb.labels = labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr;
      pb.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
      pb.row_scale = row_scale;
    };
    if (student.scalar_type() == at::kDouble) {
      Problem<double> pb;
      fill(pb);
      pb.row_loss = row_loss.data_ptr<double>();
      compute(pb, student, teacher, grad_s, grad_t);
    } else {
      Problem<float> pb;
      fill(pb);
      pb.row_loss = row_loss.data_ptr<float>();
      compute(pb, student, teacher, grad_s, grad_t);
    }
  }
  at::Tensor loss = opt.reduction == Reduction::None ? row_loss : row_loss.sum() / divisor;
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CPU, m) { m.impl("kd_loss_cpp", &kdcore::cpu::kd_loss_cpu); }

// The module exists so Python can import (and thereby load) this instruction-set variant.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("capability") = KDCORE_STRINGIFY(CPU_CAPABILITY);
}
