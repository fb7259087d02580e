// CPU kernel of the kd_loss op family (kdcore::kd_loss_cpp).
//
// One row of the vocabulary per task (at::parallel_for over rows). Logits are read in tiles of
// kTile elements, converted to the accumulation type (float; double for float64 input) and padded
// with -inf, so every vector loop runs over whole at::vec::Vectorized registers.
//
//   P0  row maxima of both logits (and a NaN / +inf check);
//   P1  e = exp(x - max) of both rows into a per-thread stash, their sums, and the KL cross term,
//       which gives forward and reverse KL their d with no further pass;
//   P2  jsd / skew_kl / skew_rkl / tvd only: d and the Jacobian row sums Gq, Gp, from the stash,
//       and the free derivatives gq, gp into a second stash (their logs are taken once);
//   P3  the gradients, from the stashes (q = e_s / S_s, p = e_t / S_t), written once in the
//       logits' dtype; the logits are re-read only where log-probabilities are needed.
// Two exponentials per logit pair for every divergence (plus two log1p for jsd, one for skew). DRAM traffic: each logit is read once (the
// row then sits in L2/L3 for the later passes) and each gradient element is written once; the
// only [N, V] allocations are the gradients themselves; the stashes are 2 or 4 x V floats per thread.
//
// This file is compiled once per instruction set (default, AVX2, AVX-512) into its own Python
// module; kdcore/_ext.py loads the best one the processor supports.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kdcore/divergence.h"
#include "kdcore/kd_loss_host.h"
#include "kdcore/python_module.h"

namespace kdcore {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// exp of a non-positive float vector (every exponential here is of x - row max or of a
// log-probability), accurate to 0.64 ulp: Cody-Waite reduction with ln 2 split in two, then a
// degree-6 polynomial fitted for minimal relative error on [-ln2/2, ln2/2] with its constant and
// linear terms fixed at 1. No clamping is needed for x <= 0; results below FLT_MIN flush to 0 and
// -inf gives 0. 25% faster than the Cephes expf it replaces and ~2x faster than Sleef's u10.
inline Vec<float> exp_nonpositive(const Vec<float>& x) {
  using F = Vec<float>;
  using I = Vec<int32_t>;
  const F n = (x * F(1.44269504088896341f)).round();
  F r = at::vec::fmadd(n, F(-0.693359375f), x);
  r = at::vec::fmadd(n, F(2.12194440e-4f), r);
  F y(1.3879691014264221e-3f);
  y = at::vec::fmadd(y, r, F(8.368693350504766e-3f));
  y = at::vec::fmadd(y, r, F(4.166722645766319e-2f));
  y = at::vec::fmadd(y, r, F(1.6666520870617613e-1f));
  y = at::vec::fmadd(y, r, F(4.9999998255559874e-1f));
  y = at::vec::fmadd(y, r, F(1.0f));
  y = at::vec::fmadd(y, r, F(1.0f));
  const I two_to_n = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
  return F::blendv(y * at::vec::cast<float>(two_to_n), F(0.0f), x < F(-87.33654475f));  // < ln FLT_MIN
}

// log for positive float vectors (Cephes logf: exponent split, degree-8 polynomial), <= 1 ulp
// and 25% faster than Sleef's u10; 0 -> -inf, +inf -> +inf. Denormal inputs are not expected:
// every probability this kernel takes the log of comes from exp_nonpositive, which flushes them.
inline Vec<float> log_1ulp(const Vec<float>& x) {
  using F = Vec<float>;
  using I = Vec<int32_t>;
  const I bits = at::vec::cast<int32_t>(x);
  F e = at::vec::convert_to_fp_of_same_size<float>((bits >> I(23)) - I(126));
  F m = at::vec::cast<float>((bits & I(0x807fffff)) | I(0x3f000000));  // mantissa in [0.5, 1)
  const F below = m < F(0.707106781186547524f);                          // fold into [sqrt(1/2), sqrt 2)
  e = e - (below & F(1.0f));
  m = F::blendv(m - F(1.0f), m + m - F(1.0f), below);
  const F z = m * m;
  F y(7.0376836292e-2f);
  y = at::vec::fmadd(y, m, F(-1.1514610310e-1f));
  y = at::vec::fmadd(y, m, F(1.1676998740e-1f));
  y = at::vec::fmadd(y, m, F(-1.2420140846e-1f));
  y = at::vec::fmadd(y, m, F(1.4249322787e-1f));
  y = at::vec::fmadd(y, m, F(-1.6668057665e-1f));
  y = at::vec::fmadd(y, m, F(2.0000714765e-1f));
  y = at::vec::fmadd(y, m, F(-2.4999993993e-1f));
  y = at::vec::fmadd(y, m, F(3.3333331174e-1f));
  y = at::vec::fmadd(e, F(-2.12194440e-4f), y * m * z);
  y = at::vec::fmadd(z, F(-0.5f), y);
  F r = at::vec::fmadd(e, F(0.693359375f), m + y);
  r = F::blendv(r, F(-std::numeric_limits<float>::infinity()), x == F(0.0f));
  return F::blendv(r, x, x == F(std::numeric_limits<float>::infinity()));
}

// log1p(z) = log(u) * z / (u - 1), u = 1 + z (Goldberg): the rounding of u cancels, so it stays
// within ~1.5 ulp for small z where log(1 + z) would not.
inline Vec<float> log1p_1ulp(const Vec<float>& z) {
  using F = Vec<float>;
  const F u = z + F(1.0f);
  const F d = u - F(1.0f);
  return F::blendv(log_1ulp(u) * (z / d), z, d == F(0.0f));
}

template <typename T>
struct VecMath {
  using V = Vec<T>;
  static V splat(T x) { return V(x); }
  static V exp(const V& x) {  // x <= 0 or -inf, see exp_nonpositive
    if constexpr (std::is_same_v<T, float>) {
      return exp_nonpositive(x);
    } else {
      return x.exp();
    }
  }
  static V log(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return log_1ulp(x);
    } else {
      return x.log();
    }
  }
  static V log1p(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return log1p_1ulp(x);
    } else {
      return x.log1p();
    }
  }
  static V abs(const V& x) { return x.abs(); }
  static V gt(const V& a, const V& b) { return a > b; }
  static V select(const V& mask, const V& x, const V& y) { return V::blendv(y, x, mask); }
};

template <typename acc_t>
constexpr int64_t padded(int64_t n) {
  constexpr int64_t w = Vec<acc_t>::size();
  return (n + w - 1) / w * w;
}

// ---------------------------------------------------------------------------------------------
// Tiles: logits of any dtype in, acc_t out (and back for gradients).

// Reads n logits of type src_t as acc_t, padded with -inf to whole vectors. Returns src itself
// when no conversion or padding is needed.
template <typename src_t, typename acc_t>
const acc_t* load_tile(const void* src_v, int64_t n, acc_t* buf) {
  const src_t* src = static_cast<const src_t*>(src_v);
  if constexpr (std::is_same_v<src_t, acc_t>) {
    if (n % Vec<acc_t>::size() == 0) return src;
    std::copy(src, src + n, buf);
  } else {
    // bfloat16 / float16 -> float, two float vectors per reduced-precision vector
    using R = at::vec::Vectorized<src_t>;
    int64_t j = 0;
    for (; j + R::size() <= n; j += R::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(R::loadu(src + j));
      lo.store(buf + j);
      hi.store(buf + j + Vec<float>::size());
    }
    for (; j < n; ++j) buf[j] = static_cast<float>(src[j]);
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

// Asks the kernel to back a fresh output buffer with transparent huge pages before its first
// touch. A large gradient otherwise costs one page fault per 4 KiB when first written -- on
// virtual machines that is several times the kernel's own work. Only the buffer's 2 MiB-aligned
// interior is advised; nothing changes where THP is off or the hint is refused.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ---------------------------------------------------------------------------------------------
// The problem and the per-row kernel.

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

// Per-thread buffers: converted tiles, gradient tiles, and stashes for the row in flight.
template <typename acc_t>
struct Scratch {
  Scratch(int64_t vocab, bool with_derivatives)
      : exp_student(padded<acc_t>(vocab)),
        exp_teacher(padded<acc_t>(vocab)),
        dd_dq(with_derivatives ? padded<acc_t>(vocab) : 0),
        dd_dp(with_derivatives ? padded<acc_t>(vocab) : 0) {}
  alignas(64) acc_t student[kTile];
  alignas(64) acc_t teacher[kTile];
  alignas(64) acc_t grad_student[kTile];
  alignas(64) acc_t grad_teacher[kTile];
  std::vector<acc_t> exp_student, exp_teacher;  // exp(x - row max), written by P1
  std::vector<acc_t> dd_dq, dd_dp;              // the free derivatives gq, gp, written by P2
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

// Softmax statistics of one row pair. Each log-sum-exp is kept as (exact row maximum, log of the
// shifted sum): x - max is exact near the maximum, so x - max - log_sum loses nothing to the size
// of x, however large the logits are.
template <typename acc_t>
struct RowStats {
  acc_t max_a = 0, max_b = 0, max_1 = 0;   // maxima of a = s/T, b = t/T and s
  double log_sum_a = 0, log_sum_b = 0, log_sum_1 = 0;
  acc_t inv_sum_a = 0, inv_sum_b = 0;      // 1 / sum exp(x - max): q = e_s * inv_sum_a
  double d = 0;                            // the divergence of the row
  bool bad = false;                        // a NaN or +inf logit: the row's loss and gradient are NaN
  bool all_masked = false;                 // one of the rows is entirely -inf
};

// Log-probabilities from raw logits, given a row's statistics.
template <typename acc_t>
struct LogProbs {
  using V = Vec<acc_t>;
  V inv_t, max_a, log_sum_a, max_b, log_sum_b, max_1, log_sum_1;
  LogProbs(const RowStats<acc_t>& st, acc_t inv_temperature)
      : inv_t(inv_temperature),
        max_a(st.max_a),
        log_sum_a(static_cast<acc_t>(st.log_sum_a)),
        max_b(st.max_b),
        log_sum_b(static_cast<acc_t>(st.log_sum_b)),
        max_1(st.max_1),
        log_sum_1(static_cast<acc_t>(st.log_sum_1)) {}
  V student(const V& s) const { return (s * inv_t - max_a) - log_sum_a; }  // log q
  V teacher(const V& t) const { return (t * inv_t - max_b) - log_sum_b; }  // log p
  V student_t1(const V& s) const { return (s - max_1) - log_sum_1; }       // log softmax(s)
};

template <typename acc_t, Divergence D>
class RowKernel {
  using V = Vec<acc_t>;
  using M = VecMath<acc_t>;
  using Traits = DivergenceTraits<D>;
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  static constexpr bool kKL = D == Divergence::ForwardKL || D == Divergence::ReverseKL;

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
    RowStats<acc_t> st = maxima(row, scratch);
    if (st.all_masked) {
      pb_.report(row, RowError::AllMasked);
      return;
    }
    if (st.bad) {
      pb_.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
      fill_gradients(row, std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    exponentials(row, scratch, st);
    JacobianSums<double> sums = kl_jacobian_sums(D, st.d);
    if constexpr (Traits::kNeedsRowSums) sums = row_sums(row, scratch, st);
    const LossScales<double> scales = loss_scales(o.temperature, o.t2_scale, o.kd_weight);
    if (o.student_grad || o.teacher_grad) gradients(row, scratch, st, sums, scales, label);

    double loss = scales.kd_loss * st.d;
    if (o.ce_weight != 0.0) {
      alignas(64) acc_t logit[V::size()];
      const acc_t* loaded = pb_.student.load(pb_.student.at(row, label), 1, logit);
      loss += o.ce_weight * ((st.max_1 - static_cast<double>(loaded[0])) + st.log_sum_1);
    }
    pb_.row_loss[row] = static_cast<acc_t>(loss);
  }

 private:
  template <typename Body>
  void for_each_tile(int64_t row, Scratch<acc_t>& scratch, bool load_logits, Body body) {
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      const int64_t n = std::min(kTile, pb_.vocab - start);
      const acc_t* s = load_logits ? pb_.student.load(pb_.student.at(row, start), n, scratch.student) : nullptr;
      const acc_t* t = load_logits ? pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher) : nullptr;
      body(start, n, padded<acc_t>(n), s, t);
    }
  }

  // P0: row maxima, and the checks that need them.
  RowStats<acc_t> maxima(int64_t row, Scratch<acc_t>& scratch) {
    V vmax_s(-kInf), vmax_t(-kInf);
    for_each_tile(row, scratch, true, [&](int64_t, int64_t, int64_t nv, const acc_t* s, const acc_t* t) {
      for (int64_t j = 0; j < nv; j += V::size()) {
        vmax_s = at::vec::maximum(vmax_s, V::loadu(s + j));
        vmax_t = at::vec::maximum(vmax_t, V::loadu(t + j));
      }
    });
    RowStats<acc_t> st;
    const acc_t max_s = hmax(vmax_s), max_t = hmax(vmax_t);
    st.bad = is_nan_or_posinf(max_s) || is_nan_or_posinf(max_t);
    st.all_masked = !st.bad && (max_s == -kInf || max_t == -kInf);
    st.max_a = max_s * inv_t_;  // the float products the shifts below use
    st.max_b = max_t * inv_t_;
    st.max_1 = separate_ce_ ? max_s : st.max_a;
    return st;
  }

  // P1: the exp stash, the sums, and the KL cross term (kl_cross_term in divergence.h).
  void exponentials(int64_t row, Scratch<acc_t>& scratch, RowStats<acc_t>& st) {
    const V inv_t(inv_t_), shift_a(st.max_a), shift_b(st.max_b), shift_1(st.max_1);
    V acc_a(0), acc_b(0), acc_1(0), acc_cross(0);
    double sum_a = 0, sum_b = 0, sum_1 = 0, cross = 0;
    acc_t* exp_s = scratch.exp_student.data();
    acc_t* exp_t = scratch.exp_teacher.data();
    for_each_tile(row, scratch, true, [&](int64_t start, int64_t, int64_t nv, const acc_t* s, const acc_t* t) {
      for (int64_t j = 0; j < nv; j += V::size()) {
        const V sv = V::loadu(s + j);
        const V xa = sv * inv_t - shift_a, xb = V::loadu(t + j) * inv_t - shift_b;
        const V ea = M::exp(xa), eb = M::exp(xb);
        ea.store(exp_s + start + j);
        eb.store(exp_t + start + j);
        acc_a += ea;
        acc_b += eb;
        if constexpr (D == Divergence::ForwardKL) acc_cross += kl_cross_term<M>(eb, xb, xa, c_);
        if constexpr (D == Divergence::ReverseKL) acc_cross += kl_cross_term<M>(ea, xa, xb, c_);
        if (separate_ce_) acc_1 += M::exp(sv - shift_1);
      }
      // fold each tile's lanes into double row sums: short float partial sums stay accurate
      sum_a += hsum(acc_a);
      sum_b += hsum(acc_b);
      sum_1 += hsum(acc_1);
      cross += hsum(acc_cross);
      acc_a = acc_b = acc_1 = acc_cross = V(0);
    });
    st.log_sum_a = std::log(sum_a);
    st.log_sum_b = std::log(sum_b);
    st.log_sum_1 = separate_ce_ ? std::log(sum_1) : st.log_sum_a;
    st.inv_sum_a = static_cast<acc_t>(1.0 / sum_a);
    st.inv_sum_b = static_cast<acc_t>(1.0 / sum_b);
    if constexpr (D == Divergence::ForwardKL) st.d = cross / sum_b - st.log_sum_b + st.log_sum_a;
    if constexpr (D == Divergence::ReverseKL) st.d = cross / sum_a - st.log_sum_a + st.log_sum_b;
  }

  // Probabilities of one vector, from the exp stash.
  V student_prob(const Scratch<acc_t>& scratch, int64_t k, const V& inv_sum_a) const {
    return V::loadu(scratch.exp_student.data() + k) * inv_sum_a;
  }
  V teacher_prob(const Scratch<acc_t>& scratch, int64_t k, const V& inv_sum_b) const {
    return V::loadu(scratch.exp_teacher.data() + k) * inv_sum_b;
  }

  // P2 (jsd / skew_kl / skew_rkl / tvd): d, Gq = sum q*gq and Gp = sum p*gp, and gq, gp into the
  // stash for P3 -- the logs of these divergences are computed once per element.
  JacobianSums<double> row_sums(int64_t row, Scratch<acc_t>& scratch, RowStats<acc_t>& st) {
    static_assert(!Traits::kReadsLogProbs, "row sums come from probabilities alone");
    const V inv_sum_a(st.inv_sum_a), inv_sum_b(st.inv_sum_b), zero(0);
    double d = 0, gq = 0, gp = 0;
    for_each_tile(row, scratch, false, [&](int64_t start, int64_t, int64_t nv, const acc_t*, const acc_t*) {
      V acc_d(0), acc_q(0), acc_p(0);
      for (int64_t j = 0; j < nv; j += V::size()) {
        const int64_t k = start + j;
        const V q = student_prob(scratch, k, inv_sum_a), p = teacher_prob(scratch, k, inv_sum_b);
        const ElementTerms<V> e = Traits::template terms<M>(zero, zero, q, p, c_);
        e.gq.store(scratch.dd_dq.data() + k);
        e.gp.store(scratch.dd_dp.data() + k);
        acc_d += e.term;
        acc_q += e.qgq;
        acc_p += e.pgp;
      }
      d += hsum(acc_d);
      gq += hsum(acc_q);
      gp += hsum(acc_p);
    });
    st.d = d;
    return {gq, gp};
  }

  // The element terms P3 needs: from the P2 stash, or (KL) computed here from the probabilities
  // and, when a gradient reads them, the log-probabilities.
  ElementTerms<V> terms_for_gradient(const Scratch<acc_t>& scratch, int64_t k, const acc_t* s, const acc_t* t,
                                     int64_t j, const LogProbs<acc_t>& lp, const V& q, const V& p) const {
    if constexpr (Traits::kNeedsRowSums) {
      ElementTerms<V> e;
      e.gq = V::loadu(scratch.dd_dq.data() + k);
      e.gp = V::loadu(scratch.dd_dp.data() + k);
      return e;
    } else {
      const V la = s != nullptr ? lp.student(V::loadu(s + j)) : V(0);
      const V lb = t != nullptr ? lp.teacher(V::loadu(t + j)) : V(0);
      return Traits::template terms<M>(la, lb, q, p, c_);
    }
  }

  // Whether P3 reads the logits: for the fused CE at T != 1, and for the KL gradients that are not
  // the closed forms q - p (forward KL, student) and p - q (reverse KL, teacher).
  bool gradients_read_logits() const {
    const KdLossOptions& o = pb_.opt;
    if constexpr (D == Divergence::ForwardKL) return o.teacher_grad || separate_ce_;
    if constexpr (D == Divergence::ReverseKL) return o.student_grad || separate_ce_;
    return separate_ce_;
  }

  // P3: dLoss/ds = kd_grad * q (gq - Gq) + ce_weight * (softmax(s) - onehot), and
  // dLoss/dt = kd_grad * p (gp - Gp), both times the row scale.
  void gradients(int64_t row, Scratch<acc_t>& scratch, const RowStats<acc_t>& st, const JacobianSums<double>& sums,
                 const LossScales<double>& scales, int64_t label) {
    const KdLossOptions& o = pb_.opt;
    const bool fused_ce = o.ce_weight != 0.0;
    const LogProbs<acc_t> lp(st, inv_t_);
    const V inv_sum_a(st.inv_sum_a), inv_sum_b(st.inv_sum_b);
    const V g_q(static_cast<acc_t>(sums.gq)), g_p(static_cast<acc_t>(sums.gp));
    const V kd_scale(static_cast<acc_t>(scales.kd_grad * pb_.row_scale));
    const acc_t ce_scale_s = static_cast<acc_t>(o.ce_weight * pb_.row_scale);
    const V ce_scale(ce_scale_s);
    for_each_tile(row, scratch, gradients_read_logits(),
                  [&](int64_t start, int64_t n, int64_t nv, const acc_t* s, const acc_t* t) {
      acc_t* gs = o.student_grad ? pb_.grad_student.target(pb_.grad_student.at(row, start), n, scratch.grad_student)
                                 : nullptr;
      acc_t* gt = o.teacher_grad ? pb_.grad_teacher.target(pb_.grad_teacher.at(row, start), n, scratch.grad_teacher)
                                 : nullptr;
      for (int64_t j = 0; j < nv; j += V::size()) {
        const int64_t k = start + j, count = std::min<int64_t>(V::size(), n - j);
        const V q = student_prob(scratch, k, inv_sum_a), p = teacher_prob(scratch, k, inv_sum_b);
        const ElementTerms<V> e = terms_for_gradient(scratch, k, s, t, j, lp, q, p);
        if (gs != nullptr) {
          V g = Traits::template student_grad<M>(e, q, p, g_q, c_) * kd_scale;
          if (fused_ce) g += ce_scale * (separate_ce_ ? M::exp(lp.student_t1(V::loadu(s + j))) : q);
          g.store(gs + j, count);
        }
        if (gt != nullptr) (Traits::template teacher_grad<M>(e, q, p, g_p, c_) * kd_scale).store(gt + j, count);
      }
      if (gs != nullptr) {
        if (fused_ce && label >= start && label < start + n) gs[label - start] -= ce_scale_s;
        pb_.grad_student.store(gs, n, pb_.grad_student.at(row, start));
      }
      if (gt != nullptr) pb_.grad_teacher.store(gt, n, pb_.grad_teacher.at(row, start));
    });
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
    auto scratch = std::make_unique<Scratch<acc_t>>(pb.vocab, DivergenceTraits<D>::kNeedsRowSums);
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
  advise_huge_pages(grad_s);
  advise_huge_pages(grad_t);
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
  at::Tensor loss = opt.reduction == Reduction::None ? row_loss : row_loss.sum().div(divisor);
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CPU, m) { m.impl("kd_loss_cpp", &kdcore::cpu::kd_loss_cpu); }

KDCORE_PYTHON_MODULE("kdcore's CPU kernels for one instruction set",
                     PyModule_AddStringConstant(module, "capability", KDCORE_STRINGIFY(CPU_CAPABILITY)))
