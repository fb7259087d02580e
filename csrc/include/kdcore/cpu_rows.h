// Row-tile machinery shared by the CPU kernels (csrc/cpu/*.cpp): vector math in the accumulation
// type, logit tiles of any dtype converted to it (and gradients back), rows of raw bytes, and the
// horizontal reductions. Every kernel file is compiled once per instruction set, so these inline
// definitions take that file's vector width.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdcore {
namespace cpu {
// one namespace per instruction set, as ATen's vectorized code does, so the builds never mix
inline namespace CPU_CAPABILITY {

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
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V gt(const V& a, const V& b) { return a > b; }
  static V keep(const V& mask, const V& x) { return mask & x; }  // masks are all-ones or all-zeros lanes
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
inline void advise_huge_pages(const at::Tensor& t) {
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


template <typename acc_t>
acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& x, Vec<acc_t>& y) { return x + y; }, v);
}

// A plain (one-instruction) maximum that may drop NaN: NaN and +inf logits are caught from the
// exp-sums instead (a NaN logit gives a NaN exp; a +inf one makes inf - inf in its exp).
template <typename acc_t>
Vec<acc_t> vmax(const Vec<acc_t>& a, const Vec<acc_t>& b) {
  return at::vec::clamp_min(a, b);
}

template <typename acc_t>
acc_t hmax(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& x, Vec<acc_t>& y) { return vmax(x, y); }, v);
}


}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdcore
