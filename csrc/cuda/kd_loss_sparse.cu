// CUDA kernels of the kd_loss_sparse op family: its two passes over [N, V] student logits
// (kdcore/ops/kd_loss_sparse.py holds the bucket math between them). One thread block per row.
//
//   sparse_row_stats_cuda  the log-sum-exps of a = z * inv_t over the row and over the entries
//                          outside the teacher's top-k, and of z (temperature 1), in one sweep:
//                          each thread keeps online (reference, sums) that the block then merges.
//                          The top-k are marked in a shared-memory bitmap of the vocabulary
//                          (V / 8 bytes), so the two sums are kept apart and the tail is exact.
//                          A row with a NaN or +inf logit, or a top-k index outside [0, V), gets NaN.
//   sparse_fill_cuda       a new gradient tensor, every element from four per-row coefficients:
//                          kd_coef * exp(a - kd_shift) + ce_coef * (exp(z - ce_shift) - [j == label]);
//                          the exponents are <= 0 except at the top-k entries, which the op
//                          overwrites afterwards (clamped at 0 so those never overflow).
//
// Each logit is read from HBM once per pass and each gradient element written once. Both passes
// move rows in 16-byte packs: the elements before a row's first 16-byte boundary (the head) and
// after its last (the tail) are handled one by one, everything between with 16-byte accesses.
// Within a pack the maximum is taken first, so the running sums are rescaled once per pack.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace kdcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// 2^x in one MUFU instruction (about 2 ulp; results below 2^-126 flush to 0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The units a logit type's exponentials are taken in. 16-bit logits work in base 2 with log2(e)
// folded into each exponent's FMA and one MUFU.EX2 per element: their gradients are rounded to 8 or
// 11 bits, and their log-sum-exps stay exact to fp32 sums because the folded constant is divided
// back out (a log-sum-exp in base 2^kScale differs from the natural one only by kScale's rounding
// times the row's spread). Wider types use the accurate natural exp.
template <typename scalar_t>
struct Units {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kBase2 = sizeof(scalar_t) == 2;
  static constexpr acc_t kScale = kBase2 ? acc_t(1.4426950408889634) : acc_t(1);  // units per nat

  // (a - shift) in units, with `shift` already in units.
  __device__ static __forceinline__ acc_t shifted(acc_t a, acc_t shift) {
    if constexpr (kBase2) return __fmaf_rn(a, kScale, -shift);
    else return a - shift;
  }
  __device__ static __forceinline__ acc_t exp(acc_t x) {
    if constexpr (kBase2) return ex2_approx(x);
    else return ::exp(x);
  }
  __device__ static __forceinline__ double exp_wide(double x) { return kBase2 ? ::exp2(x) : ::exp(x); }
  // The natural log-sum-exp of a merged (reference in units, sum) pair.
  __device__ static __forceinline__ double lse_nats(double ref, double sum) {
    if (ref == -INFINITY) return -INFINITY;
    return kBase2 ? (ref + ::log2(sum)) / double(kScale) : ref + ::log(sum);
  }
};

// A row's 16-byte packs of logits: VEC elements each.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Where a row's 16-byte packs start and how many there are; elements [0, head) and
// [head + packs * kSize, vocab) are left to element-wise code.
struct RowSplit {
  int head, packs;
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int vocab) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  const int misaligned = int((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / int(sizeof(scalar_t));
  const int head = misaligned < vocab ? misaligned : vocab;
  return {head, (vocab - head) / kSize};
}

// A merged log-sum-exp with two sums (all columns, columns outside the top-k) sharing one
// reference, in the type's units (double).
struct Lse {
  double ref, all, outside;
};

__device__ __forceinline__ Lse lse_empty() { return {-INFINITY, 0.0, 0.0}; }

template <typename U>
__device__ __forceinline__ Lse lse_merge(Lse x, const Lse& y) {
  if (y.ref > x.ref) {
    const double r = x.ref == -INFINITY ? 0.0 : U::exp_wide(x.ref - y.ref);
    return {y.ref, x.all * r + y.all, x.outside * r + y.outside};
  }
  const double r = y.ref == -INFINITY ? 0.0 : U::exp_wide(y.ref - x.ref);
  return {x.ref, x.all + y.all * r, x.outside + y.outside * r};
}

// A thread's running sums of exp(x - ref) in the accumulation type (a few hundred terms each),
// folded in a pack at a time: the pack's maximum first, then one rescale of the sums. A NaN term
// (a NaN logit, or +inf meeting a +inf reference) makes `all` NaN for good, which marks the row.
template <typename scalar_t>
struct PackLse {
  using U = Units<scalar_t>;
  using acc_t = typename U::acc_t;
  static constexpr int kSize = Pack<scalar_t>::kSize;
  acc_t ref = -INFINITY, all = 0, outside = 0;

  // Folds x[0..kSize) with maximum x_max (NaN ignored); `inside` has bit i set when x[i] is a
  // top-k entry (it then counts in `all` only). Without kTail, `outside` is not kept.
  template <bool kTail>
  __device__ __forceinline__ void fold(const acc_t (&x)[kSize], acc_t x_max, unsigned inside) {
    const acc_t new_ref = fmax(ref, x_max * U::kScale);
    const acc_t shift = new_ref == -INFINITY ? acc_t(0) : new_ref;
    const acc_t r = U::exp(ref - shift);  // 0 while nothing was added (ref = -inf)
    acc_t e[kSize];
#pragma unroll
    for (int i = 0; i < kSize; ++i) e[i] = U::exp(U::shifted(x[i], shift));
    const acc_t pack_all = tree_sum(e);
    all = all * r + pack_all;
    if constexpr (kTail) {
      acc_t pack_outside = pack_all;
      if (__builtin_expect(inside != 0u, 0)) {  // a top-k entry in this pack: sum the others directly
        pack_outside = 0;
#pragma unroll
        for (int i = 0; i < kSize; ++i) pack_outside += (inside >> i) & 1u ? acc_t(0) : e[i];
      }
      outside = outside * r + pack_outside;
    }
    ref = new_ref;
  }
  __device__ static __forceinline__ acc_t tree_sum(const acc_t (&e)[kSize]) {
    acc_t s[kSize];
#pragma unroll
    for (int i = 0; i < kSize; ++i) s[i] = e[i];
#pragma unroll
    for (int width = kSize / 2; width > 0; width /= 2) {
#pragma unroll
      for (int i = 0; i < width; ++i) s[i] += s[i + width];
    }
    return s[0];
  }
  __device__ __forceinline__ Lse widened() const { return {double(ref), double(all), double(outside)}; }
};

template <typename U>
__device__ Lse block_merge(Lse s, Lse* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Lse other{__shfl_down_sync(0xffffffffu, s.ref, offset), __shfl_down_sync(0xffffffffu, s.all, offset),
              __shfl_down_sync(0xffffffffu, s.outside, offset)};
    s = lse_merge<U>(s, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < blockDim.x / 32 ? shared[lane] : lse_empty();
    for (int offset = 16; offset > 0; offset /= 2) {
      Lse other{__shfl_down_sync(0xffffffffu, s.ref, offset), __shfl_down_sync(0xffffffffu, s.all, offset),
                __shfl_down_sync(0xffffffffu, s.outside, offset)};
      s = lse_merge<U>(s, other);
    }
    if (lane == 0) shared[0] = s;
  }
  __syncthreads();
  const Lse out = shared[0];
  __syncthreads();
  return out;
}

// Whether a merged sum shows a NaN or +inf logit: NaN terms stick, and a +inf reference is +inf.
__device__ __forceinline__ bool lse_bad(const Lse& s) { return isnan(s.all) || s.ref == INFINITY; }

// The row sweep's per-thread state: the sums of a = z * inv_t and, with kT1, of z itself.
template <typename scalar_t, bool kTail, bool kT1>
struct RowSweep {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSize = Pack<scalar_t>::kSize;
  const unsigned int* member;  // the top-k bitmap, with one spare zero word at the end
  acc_t inv_t;
  PackLse<scalar_t> a, z;

  // Bits [column, column + kSize) of the bitmap (column >= 0; the pack lies inside the row).
  __device__ __forceinline__ unsigned inside_bits(int column) const {
    if constexpr (!kTail) return 0u;
    const int word = column >> 5;
    return __funnelshift_r(member[word], member[word + 1], column & 31) & ((1u << kSize) - 1u);
  }
  // Folds kSize logits whose first column is `column` (every column real, or -inf padding whose
  // bits are 0).
  __device__ __forceinline__ void fold(const acc_t (&zs)[kSize], unsigned inside) {
    acc_t z_max = zs[0];
#pragma unroll
    for (int i = 1; i < kSize; ++i) z_max = fmax(z_max, zs[i]);
    acc_t as[kSize];
#pragma unroll
    for (int i = 0; i < kSize; ++i) as[i] = zs[i] * inv_t;
    a.template fold<kTail>(as, z_max * inv_t, inside);  // inv_t > 0: rounding keeps the maximum's place
    if constexpr (kT1) z.template fold<false>(zs, z_max, 0u);
  }
  __device__ __forceinline__ void fold_pack(const Pack<scalar_t>& p, int column) {
    acc_t zs[kSize];
#pragma unroll
    for (int i = 0; i < kSize; ++i) zs[i] = static_cast<acc_t>(p.v[i]);
    fold(zs, inside_bits(column));
  }
  // Folds the columns [first, first + count) (count <= kSize) one element at a time.
  __device__ void fold_elements(const scalar_t* row, int first, int count) {
    acc_t zs[kSize];
    unsigned inside = 0u;
#pragma unroll
    for (int i = 0; i < kSize; ++i) {
      zs[i] = i < count ? static_cast<acc_t>(row[first + i]) : -INFINITY;
      if (kTail && i < count) inside |= ((member[(first + i) >> 5] >> ((first + i) & 31)) & 1u) << i;
    }
    fold(zs, inside);
  }
};

template <typename scalar_t, bool kTail, bool kT1>
__global__ void row_stats_kernel(const scalar_t* __restrict__ student, int64_t s_stride, int vocab,
                                 const int64_t* __restrict__ indices, int64_t k, at::opmath_type<scalar_t> inv_t,
                                 bool with_t1, double* __restrict__ out) {
  using U = Units<scalar_t>;
  constexpr int kSize = Pack<scalar_t>::kSize;
  extern __shared__ unsigned int member[];  // bitmap of the row's top-k, (V + 31) / 32 + 1 words
  __shared__ Lse partials[kThreads / 32];
  __shared__ int bad_index;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) bad_index = 0;
  if constexpr (kTail) {
    const int words = (vocab + 31) / 32 + 1;
    for (int w = threadIdx.x; w < words; w += blockDim.x) member[w] = 0u;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const int64_t id = indices[row * k + i];
      if (id >= 0 && id < vocab) atomicOr(&member[id / 32], 1u << (id % 32));
      else bad_index = 1;
    }
  }
  __syncthreads();
  RowSweep<scalar_t, kTail, kT1> sweep{member, inv_t};
  const scalar_t* z_row = student + row * s_stride;
  const RowSplit split = split_row(z_row, vocab);
  const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(z_row + split.head);
  const int stride = blockDim.x;
  int p = threadIdx.x;
#pragma unroll 1
  // budget-loop: row_stats elements=2*VEC
  for (; p + stride < split.packs; p += 2 * stride) {
    const Pack<scalar_t> x0 = packs[p], x1 = packs[p + stride];
    sweep.fold_pack(x0, split.head + p * kSize);
    sweep.fold_pack(x1, split.head + (p + stride) * kSize);
  }
  if (p < split.packs) sweep.fold_pack(packs[p], split.head + p * kSize);
  const int tail = split.head + split.packs * kSize;
  if (threadIdx.x == 0) sweep.fold_elements(z_row, 0, split.head);
  if (threadIdx.x == 1 % blockDim.x) sweep.fold_elements(z_row, tail, vocab - tail);
  const Lse a = block_merge<U>(sweep.a.widened(), partials);
  const Lse z1 = kT1 ? block_merge<U>(sweep.z.widened(), partials) : lse_empty();
  if (threadIdx.x == 0) {
    double* o = out + row * 3;
    const bool bad = bad_index || lse_bad(a) || (kT1 && lse_bad(z1));
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double lse_all = U::lse_nats(a.ref, a.all);
    o[0] = bad ? nan : lse_all;
    o[1] = bad ? nan : kTail ? U::lse_nats(a.ref, a.outside) : 0.0;
    o[2] = bad ? nan : !with_t1 ? 0.0 : kT1 ? U::lse_nats(z1.ref, z1.all) : lse_all;
  }
}

void check_rows(const char* op, const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": expected [N, V] student logits, got ", student.sizes());
  TORCH_CHECK_VALUE(student.is_cuda(), op, ": runs on CUDA tensors, got ", student.device());
  TORCH_CHECK_VALUE(student.size(1) <= 1 || student.stride(1) == 1, op,
                    ": student logits must have unit stride along the vocabulary");
  TORCH_CHECK_VALUE(student.size(1) < std::numeric_limits<int>::max() / 2, op, ": a vocabulary of ",
                    student.size(1), " columns is beyond this kernel's 32-bit column indices");
}

// The row-stats kernel for one dtype and the two sweep options.
template <typename scalar_t>
auto row_stats_variant(bool with_tail, bool separate_t1) {
  if (with_tail) return separate_t1 ? row_stats_kernel<scalar_t, true, true> : row_stats_kernel<scalar_t, true, false>;
  return separate_t1 ? row_stats_kernel<scalar_t, false, true> : row_stats_kernel<scalar_t, false, false>;
}

at::Tensor sparse_row_stats_cuda(const at::Tensor& student, const at::Tensor& indices, double inv_t, bool with_tail,
                                 bool with_t1) {
  constexpr const char* op = "sparse_row_stats_cuda";
  check_rows(op, student);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.scalar_type() == at::kLong &&
                        indices.is_contiguous() && indices.device() == student.device(),
                    op, ": indices must be contiguous int64 [N, k] beside the student");
  TORCH_CHECK_VALUE(inv_t > 0, op, ": inv_t must be positive (1 / temperature), got ", inv_t);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({student.size(0), 3}, student.options().dtype(at::kDouble));
  const int64_t n = student.size(0), v = student.size(1), k = indices.size(1);
  if (n == 0) return out;
  const size_t bitmap = with_tail ? size_t((v + 31) / 32 + 1) * sizeof(unsigned int) : 0;
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, student.get_device()));
  TORCH_CHECK_VALUE(bitmap + 1024 <= size_t(max_shared), op, ": a vocabulary of ", v,
                    " needs a top-k bitmap of ", bitmap, " bytes, more than this GPU's shared memory per block");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv = static_cast<acc_t>(inv_t);
    auto kernel = row_stats_variant<scalar_t>(with_tail, with_t1 && inv != acc_t(1));
    if (bitmap > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bitmap)));
    }
    kernel<<<n, kThreads, bitmap, stream>>>(student.data_ptr<scalar_t>(), student.stride(0), int(v),
                                            indices.data_ptr<int64_t>(), k, inv, with_t1, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// c * exp(min(x - shift, 0)) in the type's units, with the double shift split into hi + lo in
// acc_t; inactive when c = 0 or the shift is +inf (the term is exactly 0 then).
template <typename scalar_t>
struct ExpTerm {
  using U = Units<scalar_t>;
  using acc_t = typename U::acc_t;
  bool active;
  acc_t coef, hi, lo;
  __device__ ExpTerm(double c, double shift) {
    active = c != 0 && shift != INFINITY;
    const double units = shift * double(U::kScale);
    coef = static_cast<acc_t>(c);
    hi = static_cast<acc_t>(units);
    lo = isfinite(units) ? static_cast<acc_t>(units - double(hi)) : acc_t(0);
  }
  __device__ __forceinline__ acc_t operator()(acc_t x) const {
    return coef * U::exp(min(U::shifted(x, hi) - lo, acc_t(0)));
  }
};

// One row's gradient: the KD term (kKd) and the CE term (kCe, whose label entry also gets -ce_coef).
template <typename scalar_t, bool kKd, bool kCe>
struct RowGradient {
  using acc_t = at::opmath_type<scalar_t>;
  ExpTerm<scalar_t> kd, ce;
  acc_t inv_t;
  int label;

  __device__ __forceinline__ acc_t operator()(acc_t z) const {
    acc_t g = 0;
    if constexpr (kKd) g = kd(z * inv_t);
    if constexpr (kCe) g += ce(z);
    return g;
  }
  __device__ __forceinline__ acc_t at(acc_t z, int column) const {
    const acc_t g = (*this)(z);
    return kCe && column == label ? g - ce.coef : g;
  }
};

// Converts a pack of accumulation-type values to the logit type, two per instruction for 16-bit types.
template <typename scalar_t, typename acc_t, int kSize>
__device__ __forceinline__ Pack<scalar_t> narrow(const acc_t (&g)[kSize]) {
  Pack<scalar_t> out;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    using pair_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, __nv_bfloat162, __half2>;
    pair_t pairs[kSize / 2];
#pragma unroll
    for (int i = 0; i < kSize / 2; ++i) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) pairs[i] = __floats2bfloat162_rn(g[2 * i], g[2 * i + 1]);
      else pairs[i] = __floats2half2_rn(g[2 * i], g[2 * i + 1]);
    }
    static_assert(sizeof(pairs) == sizeof(out));
    memcpy(&out, pairs, sizeof(out));
  } else {
#pragma unroll
    for (int i = 0; i < kSize; ++i) out.v[i] = static_cast<scalar_t>(g[i]);
  }
  return out;
}

// Writes g[0..kSize) to the gradient row at `column`: one 16-byte store when the gradient row is
// aligned as the student row is (kPacked), element by element otherwise.
template <typename scalar_t, bool kPacked, typename acc_t, int kSize>
__device__ __forceinline__ void store_pack(scalar_t* g_row, int column, const acc_t (&g)[kSize]) {
  if constexpr (kPacked) {
    *reinterpret_cast<Pack<scalar_t>*>(g_row + column) = narrow<scalar_t>(g);
  } else {
#pragma unroll
    for (int i = 0; i < kSize; ++i) g_row[column + i] = static_cast<scalar_t>(g[i]);
  }
}

// The gradient of the elements [first, first + count) one at a time.
template <typename scalar_t, typename F>
__device__ void fill_elements(const scalar_t* z_row, scalar_t* g_row, int first, int count, const F& f) {
  for (int j = first; j < first + count; ++j) g_row[j] = static_cast<scalar_t>(f.at(static_cast<typename F::acc_t>(z_row[j]), j));
}

template <typename scalar_t, bool kKd, bool kCe, bool kPacked>
__device__ void fill_row(const scalar_t* z_row, scalar_t* g_row, int vocab, const RowGradient<scalar_t, kKd, kCe>& f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kSize = Pack<scalar_t>::kSize;
  const RowSplit split = split_row(z_row, vocab);
  const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(z_row + split.head);
  const int stride = blockDim.x;
  int p = threadIdx.x;
  const auto pack_gradient = [&](const Pack<scalar_t>& x, int column) {
    acc_t g[kSize];
#pragma unroll
    for (int i = 0; i < kSize; ++i) g[i] = f(static_cast<acc_t>(x.v[i]));
    store_pack<scalar_t, kPacked>(g_row, column, g);
  };
#pragma unroll 1
  // budget-loop: fill elements=2*VEC
  for (; p + stride < split.packs; p += 2 * stride) {
    const Pack<scalar_t> x0 = packs[p], x1 = packs[p + stride];
    pack_gradient(x0, split.head + p * kSize);
    pack_gradient(x1, split.head + (p + stride) * kSize);
  }
  if (p < split.packs) pack_gradient(packs[p], split.head + p * kSize);
  const int tail = split.head + split.packs * kSize;
  if (threadIdx.x == 0) fill_elements(z_row, g_row, 0, split.head, f);
  if (threadIdx.x == 1 % blockDim.x) fill_elements(z_row, g_row, tail, vocab - tail, f);
  // the label's entry inside the packs: rewritten by the thread that wrote its pack, after it
  const int label_pack = (f.label - split.head) / kSize;
  if (kCe && f.label >= split.head && f.label < tail && label_pack % stride == int(threadIdx.x)) {
    g_row[f.label] = static_cast<scalar_t>(f.at(static_cast<acc_t>(z_row[f.label]), f.label));
  }
}

// Sets every element of a gradient row to `value` (rows not kept: 0; poisoned rows: NaN).
template <typename scalar_t>
__device__ void fill_constant_row(scalar_t* g_row, int vocab, scalar_t value) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  const RowSplit split = split_row(g_row, vocab);
  Pack<scalar_t> x;
#pragma unroll
  for (int i = 0; i < kSize; ++i) x.v[i] = value;
  auto* packs = reinterpret_cast<Pack<scalar_t>*>(g_row + split.head);
#pragma unroll 1
  // budget-loop: fill_constant elements=1*VEC
  for (int p = threadIdx.x; p < split.packs; p += blockDim.x) packs[p] = x;
  const int tail = split.head + split.packs * kSize;
  if (threadIdx.x < split.head) g_row[threadIdx.x] = value;
  if (tail + int(threadIdx.x) < vocab) g_row[tail + threadIdx.x] = value;
}

template <typename scalar_t, bool kKd, bool kCe>
__device__ void fill_row_aligned_or_not(const scalar_t* z_row, scalar_t* g_row, int vocab,
                                        const RowGradient<scalar_t, kKd, kCe>& f) {
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(z_row) ^ reinterpret_cast<uintptr_t>(g_row)) & 15) == 0;
  if (same_alignment) fill_row<scalar_t, kKd, kCe, true>(z_row, g_row, vocab, f);
  else fill_row<scalar_t, kKd, kCe, false>(z_row, g_row, vocab, f);
}

template <typename scalar_t>
__global__ void fill_kernel(const scalar_t* __restrict__ student, int64_t s_stride, scalar_t* __restrict__ grad,
                            int64_t g_stride, int vocab, const bool* __restrict__ kept,
                            const int64_t* __restrict__ labels, const double* __restrict__ coefficients,
                            at::opmath_type<scalar_t> inv_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const double* c = coefficients + row * 4;
  const bool poisoned = isnan(c[0]) || isnan(c[1]) || isnan(c[2]) || isnan(c[3]);
  const ExpTerm<scalar_t> kd(c[1], c[0]), ce(c[3], c[2]);
  const int64_t label = labels != nullptr ? labels[row] : -1;
  const scalar_t* z_row = student + row * s_stride;
  scalar_t* g_row = grad + row * g_stride;
  if (!kept[row] || poisoned || !(kd.active || ce.active)) {
    const acc_t value = kept[row] && poisoned ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
    fill_constant_row(g_row, vocab, static_cast<scalar_t>(value));
    return;
  }
  const int column = label >= 0 && label < vocab ? int(label) : -1;
  if (kd.active && ce.active) {
    fill_row_aligned_or_not(z_row, g_row, vocab, RowGradient<scalar_t, true, true>{kd, ce, inv_t, column});
  } else if (kd.active) {
    fill_row_aligned_or_not(z_row, g_row, vocab, RowGradient<scalar_t, true, false>{kd, ce, inv_t, column});
  } else {
    fill_row_aligned_or_not(z_row, g_row, vocab, RowGradient<scalar_t, false, true>{kd, ce, inv_t, column});
  }
}

at::Tensor sparse_fill_cuda(const at::Tensor& student, const at::Tensor& kept, const std::optional<at::Tensor>& labels,
                            const at::Tensor& coefficients, double inv_t) {
  constexpr const char* op = "sparse_fill_cuda";
  check_rows(op, student);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK_VALUE(kept.dim() == 1 && kept.size(0) == n && kept.scalar_type() == at::kBool && kept.is_contiguous() &&
                        kept.device() == student.device(),
                    op, ": kept must be contiguous bool [N] beside the student");
  TORCH_CHECK_VALUE(coefficients.sizes() == at::IntArrayRef({n, 4}) && coefficients.scalar_type() == at::kDouble &&
                        coefficients.is_contiguous() && coefficients.device() == student.device(),
                    op, ": coefficients must be contiguous float64 [N, 4] beside the student");
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == n && labels->scalar_type() == at::kLong &&
                          labels->is_contiguous() && labels->device() == student.device(),
                      op, ": labels must be contiguous int64 [N] beside the student");
  }
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty(student.sizes(), student.options());
  if (n == 0 || v == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fill_kernel<scalar_t><<<n, kThreads, 0, stream>>>(
        student.data_ptr<scalar_t>(), student.stride(0), grad.data_ptr<scalar_t>(), grad.stride(0), int(v),
        kept.data_ptr<bool>(), labels.has_value() ? labels->data_ptr<int64_t>() : nullptr,
        coefficients.data_ptr<double>(), static_cast<acc_t>(inv_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CUDA, m) {
  m.impl("sparse_row_stats_cuda", &kdcore::cuda::sparse_row_stats_cuda);
  m.impl("sparse_fill_cuda", &kdcore::cuda::sparse_fill_cuda);
}
