// CUDA kernels of the kd_loss op family (kdcore::kd_loss_cuda, kdcore::kd_loss_cuda_inplace).
//
// One row of the vocabulary is split over the C CTAs of a thread-block cluster (C = 1 for short
// rows and on GPUs or binaries before sm_90). Each CTA owns a slice of about V / C columns:
//
//   1  it reads its slice of both logit rows from HBM once -- 16-byte streaming loads, several in
//      flight per thread, both rows in the same loop -- converts them to float into shared
//      memory, and finds the slice maxima;
//   2  the softmax statistics (maxima, exp-sums, the KL cross term) are reduced warp -> block ->
//      cluster, the last step through distributed shared memory: each CTA publishes its partials
//      in its own shared memory and one warp of every CTA reads all C of them in rank order, so
//      every CTA holds bit-identical row statistics;
//   3  jsd / skew_kl / skew_rkl / tvd only: the Jacobian row sums Gq, Gp and the divergence, the
//      same way, from shared memory;
//   4  the gradients, from shared memory, written to HBM once in the logits' dtype (16-byte
//      stores).
//
// Two kernel programs implement this:
//
//   FastRow (the common case: float accumulation, student gradient only) keeps what later phases
//   need instead of recomputing it: phase 2 overwrites the staged logits with their exponentials
//   exp2(z * log2(e) / T - shift) (log2(e) folded into 1/T, one MUFU.EX2 each), phase 3 the
//   teacher's with the free derivative gq, so phase 4 is a few multiplies per element. Its shared
//   memory loops handle 8 columns per iteration with 16-byte accesses laid out so that no two
//   threads of a quarter-warp meet in a bank (Swizzled, half_first): at the HBM rate every column
//   moves ~32-44 bytes through shared memory, close to what the banks can serve.
//   GeneralRow (teacher gradients, float64, fp32 cross-entropy at T != 1, rows too long for shared
//   memory) recomputes each phase from the logits (staged in shared memory, or read from global
//   memory every phase when the slice does not fit: correct, 2-3x the traffic).
//
// Bytes moved per element of the [N, V] problem: the two logits read once and each requested
// gradient written once -- 6 B for bf16/fp16 (student gradient only), 12 B for float32 -- plus a
// few bytes per row. Student and teacher may have different dtypes (bf16, fp16, float32); each is
// read as it is.
//
// The per-element math is kdcore::DivergenceTraits (csrc/include/kdcore/divergence.h), the
// same code the CPU kernel runs, so the CPU tests exercise these formulas.
//
// With `inplace` (kd_loss_cuda_inplace) the student gradient is written over the student logits:
// every CTA has staged its whole slice before phase 4 writes it (or, unstaged, each element is
// read and then written by the same thread in the last phase), and the label's logit for the
// fused cross-entropy is read before the first barrier.
//
// Failures (an entirely -inf kept row, a label out of range) set a per-row status byte and make
// the row's loss and gradients NaN; the host raises them after the launch with one status read,
// except while a CUDA graph is being captured, where the NaN is all that reports them.
//
// Loops marked "budget-loop" are the steady-state loops python -m benchmarks.sass_budget measures
// (instructions per element, from the compiled SASS; docs/gpu.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "kdcore/divergence.h"
#include "kdcore/kd_loss_host.h"

namespace kdcore {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxClusterCtas = 16;  // the largest (non-portable) cluster of an H100 / H200
constexpr int kNumPartials = 4;      // the most values one reduction carries
constexpr int kGroup = 8;            // columns per iteration of FastRow's shared-memory loops
constexpr int kLoadUnroll = 2;       // 16-byte loads per row in flight per thread while staging
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLn2d = 0.6931471805599453;

// Per-row failure codes, raised on the host after the launch (the same as the Triton backend).
constexpr int8_t kStatusAllNegInf = 1;
constexpr int8_t kStatusLabelOutOfRange = 2;

// How FastRow treats the fused hard-label cross-entropy: none, at T = 1 (its softmax is q), or at
// T != 1 (its softmax exp(z - max) / S1 is recovered from the stored exp2 as e^T; 16-bit students).
enum class CE : int { None = 0, SameT = 1, SeparateT = 2 };

template <typename S, typename T, typename acc_t>
struct Params {
  const S* student;
  const T* teacher;
  S* grad_student;  // null when not requested; the student itself for in-place
  T* grad_teacher;  // null when not requested
  int64_t student_stride, teacher_stride, grad_student_stride, grad_teacher_stride;  // elements
  const int64_t* labels;   // [N] or null
  const bool* mask;        // [N] or null
  const acc_t* inv_divisor;  // 0-dim: 1 / the loss divisor ('batchmean'), else 1
  acc_t* row_loss;         // [N]
  int8_t* status;          // [N], 0 = fine
  int64_t row_offset;      // first row of this launch
  int64_t vocab;
  int slice;               // columns per CTA, a multiple of kGroup
  int smem_columns;        // shared-memory floats per row side (staged kernels): slice + padding
  int cluster_size;        // CTAs per row in this launch; the kernel traps if its cluster differs
  acc_t inv_temperature, mix;
  acc_t temperature;       // FastRow, CE::SeparateT
  float exp2_scale;        // FastRow: log2(e) / T
  double kd_loss_scale, kd_grad_scale, ce_weight;
  int64_t ignore_index;
  bool separate_ce;        // fused CE at T != 1 needs the exp-sum of the raw student logits
};

// ---------------------------------------------------------------------------------------------
// Device math for FastRow: one-instruction exp2, and a division good to ~2 ulp for the normal
// divisors the divergence terms use (they are floored at the smallest normal number).

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: 2 ulp; flushes results below 2^-126 to 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_reciprocal(float x) {  // rcp.approx: 1 ulp for normal x
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x in double, correctly rounded to within an ulp, for a row's exp-sum (x in [1, 2^31]: the
// row maximum contributes exactly 1): a float reciprocal refined by two Newton steps. IEEE double
// division would call a slow-path routine whose calling convention spills registers.
__device__ __forceinline__ double reciprocal_of_sum(double x) {
  double r = static_cast<double>(fast_reciprocal(static_cast<float>(x)));
  r = fma(r, fma(-x, r, 1.0), r);
  return fma(r, fma(-x, r, 1.0), r);
}

// a / b in double for a positive normal b (the divergence terms divide by probabilities floored
// at the smallest normal number, or by 1 + z >= 1): rcp.approx refined by two Newton steps, then
// one product -- within 1.5 ulp, and no call to the division's slow-path routine (see above).
__device__ __forceinline__ double divide_by_normal(double a, double b) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(b));
  r = fma(r, fma(-b, r, 1.0), r);
  r = fma(r, fma(-b, r, 1.0), r);
  return a * r;
}

// GeneralRow's math: the shared scalar functions, with float64 division as above.
template <typename acc_t>
struct GeneralMath : ScalarMath<acc_t> {
  static __device__ __forceinline__ acc_t div(acc_t a, acc_t b) {
    if constexpr (std::is_same_v<acc_t, double>) {
      return divide_by_normal(a, b);
    } else {
      return a / b;
    }
  }
};

// FastRow's math, for the jsd / skew / tvd terms. With 16-bit gradients (kLowPrecision) log1p is
// lg2.approx(1 + z) * ln 2 -- 3 instructions instead of ~35; lg2.approx errs by at most 2^-22
// absolute for 1 + z in [0.5, 2] and by 2 ulp beyond, so a log-ratio is off by < 1.7e-7 where it
// is smaller than ln 2 and by < 2.4e-7 of itself elsewhere -- and a division is rcp.approx times
// the numerator (the divisors are normal
// numbers: probabilities floored at the smallest normal, or 1 + z >= 1). Rounding the 16-bit
// logits themselves moves those log-ratios by ~2^-9 |z / T|, three orders of magnitude more, and
// each gradient element is then rounded to 2^-9 of itself. Float32 gradients keep log1pf.
template <bool kLowPrecision>
struct FastMath : ScalarMath<float> {
  static __device__ __forceinline__ float div(float a, float b) {
    if constexpr (kLowPrecision) {
      return a * fast_reciprocal(b);
    } else {
      return __fdividef(a, b);
    }
  }
  static __device__ __forceinline__ float log1p(float z) {
    if constexpr (kLowPrecision) {
      return fast_log2(1.f + z) * kLn2;
    } else {
      return ::log1pf(z);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions. Every CTA of a cluster must see bit-identical statistics (it takes the same
// branches and the row's slices must agree on the shift), so each step combines in a fixed order:
// an xor butterfly within a warp (IEEE + and max are commutative, so every lane ends equal), warp
// partials in warp order, cluster partials in rank order.

struct SumOp {
  static constexpr double kIdentity = 0.0;
  __device__ static double apply(double a, double b) { return a + b; }
};

struct MaxOp {  // drops NaN; NaN logits are caught from the exp-sums
  static constexpr double kIdentity = -std::numeric_limits<double>::infinity();
  __device__ static double apply(double a, double b) { return ::fmax(a, b); }
};

struct ReductionScratch {
  double warp_partials[kMaxWarps][kNumPartials];
  double result[kNumPartials];
  // one slot per phase, so a CTA still reading a neighbour's slot of one phase never races the
  // neighbour publishing the next phase
  double cluster_slots[3][kNumPartials];
};

// The cluster barrier in two halves, so a CTA can announce that it will read no neighbour's
// shared memory any more (arrive, relaxed: no ordering of its own stores is needed) and go on
// writing gradients, and wait for its neighbours only before it exits.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

template <typename Op, int K>
__device__ void warp_allreduce(double (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] = Op::apply(v[k], __shfl_xor_sync(0xffffffffu, v[k], offset));
  }
}

template <typename Op, int K>
__device__ void block_allreduce(double (&v)[K], ReductionScratch& scratch) {
  warp_allreduce<Op>(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // the previous reduction's readers are done with warp_partials
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch.warp_partials[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double r = scratch.warp_partials[0][k];
#pragma unroll
    for (int w = 1; w < kMaxWarps; ++w) {
      if (w < warps) r = Op::apply(r, scratch.warp_partials[w][k]);
    }
    v[k] = r;
  }
}

// Combines the block totals of the cluster's CTAs (every thread holds its block's totals in v).
// `phase` picks the publication slot (see ReductionScratch); `last` says no later reduction reads
// a neighbour's shared memory, so the CTA arrives at the exit barrier right after reading.
template <typename Op, int K>
__device__ void cluster_allreduce(double (&v)[K], ReductionScratch& scratch, int phase, int cluster_size, bool last) {
  if (cluster_size == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch.cluster_slots[phase][k] = v[k];
  }
  cluster.sync();  // every CTA's partials are published (release/acquire across the cluster)
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double r[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      r[k] = Op::kIdentity;
      if (lane < cluster_size) r[k] = cluster.map_shared_rank(&scratch.cluster_slots[phase][0], lane)[k];
    }
    warp_allreduce<Op>(r);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch.result[k] = r[k];
    }
  }
  __syncthreads();
  if (last) cluster_arrive_relaxed();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch.result[k];
#endif
}

template <typename Op, int K>
__device__ void row_allreduce(double (&v)[K], ReductionScratch& scratch, int phase, int cluster_size, bool last) {
  block_allreduce<Op>(v, scratch);
  cluster_allreduce<Op>(v, scratch, phase, cluster_size, last);
}

// ---------------------------------------------------------------------------------------------
// Staging: a CTA's slice of both rows, converted to the accumulation type into shared memory.
//
// Column j of the slice lives at staged[Layout::at(pad + j)] (Plain: pad + j; Swizzled, below);
// `pad` (< 16 / sizeof(acc_t)) is chosen so that the columns where the student-gradient row is
// 16-byte aligned start 16-byte chunks of shared memory, which lets phase 4 read whole vectors.
// The slots before pad and after the slice, up to a multiple of kGroup, hold -inf, an entry of
// zero probability in every phase.

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// One FMNMX: drops a NaN operand; NaN logits are caught from the exp-sums instead.
template <typename acc_t>
__device__ __forceinline__ acc_t max_ignoring_nan(acc_t a, acc_t b) {
  return ::fmax(a, b);
}

// Elements before the first 16-byte aligned one at `ptr` (at most the row's length).
template <typename scalar_t>
__device__ __forceinline__ int head_elements(const scalar_t* ptr, int len) {
  const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(ptr) % 16) / int(sizeof(scalar_t));
  return min(len, misaligned == 0 ? 0 : Pack<scalar_t>::kSize - misaligned);
}

// Shared-memory layouts of a staged row. A thread that moves 32 contiguous bytes (8 floats) as two
// 16-byte accesses makes the 8 threads of a quarter-warp hit every bank twice if each takes its
// lower half first. FastRow therefore stores its rows Swizzled: the two 16-byte chunks of every
// 32-byte pair swap places where bit 3 of the chunk index is set, so 8 threads storing (or
// loading) the chunks 2k, 2k + 2, ... of consecutive packs touch 8 different 16-byte bank groups,
// whatever the row's offset. Phases 2 and 3, which treat the 8 floats of a pair alike, instead
// take the two halves of their pair in an order that differs between threads 0-3 and 4-7 of each
// quarter-warp (half_first). GeneralRow keeps its rows Plain.
struct Plain {
  static __device__ __forceinline__ int at(int index) { return index; }
};

struct Swizzled {  // float rows only: 4 floats a chunk
  static __device__ __forceinline__ int at(int index) { return index ^ ((index >> 3) & 4); }
};

__device__ __forceinline__ int half_first() { return (threadIdx.x & 4) ? 4 : 0; }

__device__ __forceinline__ float4 load_half(const float* p, int offset) {
  return *reinterpret_cast<const float4*>(p + offset);
}

__device__ __forceinline__ void store_half(float* p, int offset, const float4& v) {
  *reinterpret_cast<float4*>(p + offset) = v;
}

// The running maximum of one side's staged logits. 16-bit logits keep it in pairs of their own
// type while staging (one HMNMX2 per two values instead of one FMNMX each; like fmax, it drops a
// NaN operand -- NaN logits are caught from the exp-sums instead); the others in acc_t.
template <typename scalar_t, typename acc_t>
struct RunningMax {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  __device__ __forceinline__ void add(acc_t x) { m = max_ignoring_nan(m, x); }
  template <int N>
  __device__ __forceinline__ void add_pack(const scalar_t (&)[N], const acc_t (&converted)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) add(converted[k]);
  }
  __device__ __forceinline__ acc_t value() const { return m; }
};

template <typename Pair, typename scalar_t>
struct PairedRunningMax {
  Pair pairs = pair_of_neg_inf();
  float m = -std::numeric_limits<float>::infinity();
  static __device__ __forceinline__ Pair pair_of_neg_inf() {
    const scalar_t x = -std::numeric_limits<float>::infinity();
    Pair pair;
    reinterpret_cast<scalar_t*>(&pair)[0] = x;
    reinterpret_cast<scalar_t*>(&pair)[1] = x;
    return pair;
  }
  __device__ __forceinline__ void add(float x) { m = max_ignoring_nan(m, x); }
  template <int N>
  __device__ __forceinline__ void add_pack(const scalar_t (&raw)[N], const float (&converted)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800  // no paired 16-bit maximum before sm_80
#pragma unroll
    for (int k = 0; k < N; ++k) add(converted[k]);
#else
    (void)converted;
#pragma unroll
    for (int k = 0; k < N / 2; ++k) pairs = __hmax2(pairs, reinterpret_cast<const Pair*>(raw)[k]);
#endif
  }
  __device__ __forceinline__ float value() const {
    const scalar_t* halves = reinterpret_cast<const scalar_t*>(&pairs);
    return max_ignoring_nan(m, max_ignoring_nan(static_cast<float>(halves[0]), static_cast<float>(halves[1])));
  }
};

template <>
struct RunningMax<at::BFloat16, float> : PairedRunningMax<__nv_bfloat162, at::BFloat16> {};
template <>
struct RunningMax<at::Half, float> : PairedRunningMax<__half2, at::Half> {};

// One side's 16-byte aligned middle part, as packs.
template <typename scalar_t>
struct PackedRow {
  const Pack<scalar_t>* packs;
  int head;   // scalar elements before packs[0]
  int count;  // whole packs
  int tail;   // scalar elements after them
};

template <typename scalar_t>
__device__ PackedRow<scalar_t> packed_row(const scalar_t* src, int len) {
  const int head = head_elements(src, len);
  const int count = (len - head) / Pack<scalar_t>::kSize;
  return {reinterpret_cast<const Pack<scalar_t>*>(src + head), head, count, len - head - count * Pack<scalar_t>::kSize};
}

// Converts one pack and writes it at staged[index...] in the layout (16-byte stores when kAligned:
// index is a multiple of a 16-byte chunk).
template <bool kAligned, class Layout, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(const Pack<scalar_t>& in, acc_t* staged, int index,
                                           RunningMax<scalar_t, acc_t>& m) {
  constexpr int kVec = Pack<scalar_t>::kSize, kPerChunk = 16 / sizeof(acc_t);
  alignas(16) acc_t out[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = static_cast<acc_t>(in.v[k]);
  m.add_pack(in.v, out);
  if constexpr (kAligned) {
#pragma unroll
    for (int c = 0; c < kVec / kPerChunk; ++c) {
      *reinterpret_cast<uint4*>(staged + Layout::at(index + c * kPerChunk)) = reinterpret_cast<const uint4*>(out)[c];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) staged[Layout::at(index + k)] = out[k];
  }
}

// The scalar head and tail of one side, slice column 0 at staged[offset] (at most one element per
// thread each).
template <class Layout, typename scalar_t, typename acc_t>
__device__ void stage_edges(const scalar_t* src, const PackedRow<scalar_t>& r, acc_t* staged, int offset,
                            RunningMax<scalar_t, acc_t>& m) {
  const int t = threadIdx.x;
  if (t < r.head) {
    const acc_t x = static_cast<acc_t>(src[t]);
    staged[Layout::at(offset + t)] = x;
    m.add(x);
  }
  const int tail0 = r.head + r.count * Pack<scalar_t>::kSize;
  if (t < r.tail) {
    const acc_t x = static_cast<acc_t>(src[tail0 + t]);
    staged[Layout::at(offset + tail0 + t)] = x;
    m.add(x);
  }
}

// One iteration of a staging loop over one side: kLoadUnroll 16-byte loads issued before any is
// used, then converted into shared memory.
template <bool kAligned, class Layout, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_iteration(const PackedRow<scalar_t>& r, int i, acc_t* staged, int offset,
                                                RunningMax<scalar_t, acc_t>& m) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  const int stride = blockDim.x;
  Pack<scalar_t> in[kLoadUnroll];
#pragma unroll
  for (int u = 0; u < kLoadUnroll; ++u) {
    if (i + u * stride < r.count) *reinterpret_cast<uint4*>(&in[u]) = __ldcs(reinterpret_cast<const uint4*>(r.packs + i + u * stride));
  }
#pragma unroll
  for (int u = 0; u < kLoadUnroll; ++u) {
    if (i + u * stride < r.count) store_pack<kAligned, Layout>(in[u], staged, offset + r.head + (i + u * stride) * kVec, m);
  }
}

// The same over both rows of a pair whose packs line up (same dtype, same alignment): every
// thread has the loads of both rows in flight together.
template <bool kAligned, class Layout, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_pair_iteration(const PackedRow<scalar_t>& rs, const PackedRow<scalar_t>& rt,
                                                     int i, acc_t* staged_s, acc_t* staged_t, int offset,
                                                     RunningMax<scalar_t, acc_t>& ms, RunningMax<scalar_t, acc_t>& mt) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  const int stride = blockDim.x;
  Pack<scalar_t> in_s[kLoadUnroll], in_t[kLoadUnroll];
#pragma unroll
  for (int u = 0; u < kLoadUnroll; ++u) {
    if (i + u * stride < rs.count) {
      *reinterpret_cast<uint4*>(&in_s[u]) = __ldcs(reinterpret_cast<const uint4*>(rs.packs + i + u * stride));
      *reinterpret_cast<uint4*>(&in_t[u]) = __ldcs(reinterpret_cast<const uint4*>(rt.packs + i + u * stride));
    }
  }
#pragma unroll
  for (int u = 0; u < kLoadUnroll; ++u) {
    if (i + u * stride < rs.count) {
      const int index = offset + rs.head + (i + u * stride) * kVec;
      store_pack<kAligned, Layout>(in_s[u], staged_s, index, ms);
      store_pack<kAligned, Layout>(in_t[u], staged_t, index, mt);
    }
  }
}

// Stages one side's packs. Aligned: the packs start on a 16-byte chunk of shared memory (the
// usual case; see staging_pad), so they are written as 16-byte vectors.
template <class Layout, typename scalar_t, typename acc_t>
__device__ void stage_packs(const PackedRow<scalar_t>& r, acc_t* staged, int offset, RunningMax<scalar_t, acc_t>& m) {
  const int step = kLoadUnroll * blockDim.x;
  if ((offset + r.head) % (16 / sizeof(acc_t)) == 0) {
    // budget-loop: stage_one elements=2*VEC
#pragma unroll 1
    for (int i = threadIdx.x; i < r.count; i += step) stage_iteration<true, Layout>(r, i, staged, offset, m);
  } else {
    // budget-loop: stage_one_unaligned elements=2*VEC
#pragma unroll 1
    for (int i = threadIdx.x; i < r.count; i += step) stage_iteration<false, Layout>(r, i, staged, offset, m);
  }
}

template <class Layout, typename scalar_t, typename acc_t>
__device__ void stage_pair_packs(const PackedRow<scalar_t>& rs, const PackedRow<scalar_t>& rt, acc_t* staged_s,
                                 acc_t* staged_t, int offset, RunningMax<scalar_t, acc_t>& ms,
                                 RunningMax<scalar_t, acc_t>& mt) {
  const int step = kLoadUnroll * blockDim.x;
  if ((offset + rs.head) % (16 / sizeof(acc_t)) == 0) {
    // budget-loop: stage_pair elements=2*VEC
#pragma unroll 1
    for (int i = threadIdx.x; i < rs.count; i += step) {
      stage_pair_iteration<true, Layout>(rs, rt, i, staged_s, staged_t, offset, ms, mt);
    }
  } else {
    // budget-loop: stage_pair_unaligned elements=2*VEC
#pragma unroll 1
    for (int i = threadIdx.x; i < rs.count; i += step) {
      stage_pair_iteration<false, Layout>(rs, rt, i, staged_s, staged_t, offset, ms, mt);
    }
  }
}

// Fills the -inf slots around the slice: [0, pad) and [pad + len, columns).
template <class Layout, typename acc_t>
__device__ void fill_padding(acc_t* staged, int pad, int len, int columns) {
  const int t = threadIdx.x;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (t < pad) staged[Layout::at(t)] = kNegInf;
  if (pad + len + t < columns) staged[Layout::at(pad + len + t)] = kNegInf;
}

// Phase 1, staged: both slices into shared memory (slice column j at staged_s[Layout::at(pad + j)],
// likewise the teacher); returns each thread's maxima. Visible to the block after the next
// __syncthreads.
template <class Layout, typename S, typename T, typename acc_t>
__device__ void stage_slices(const S* src_s, const T* src_t, int len, acc_t* staged_s, acc_t* staged_t, int pad,
                             int columns, acc_t& max_s, acc_t& max_t) {
  RunningMax<S, acc_t> ms;
  RunningMax<T, acc_t> mt;
  const PackedRow<S> rs = packed_row(src_s, len);
  const PackedRow<T> rt = packed_row(src_t, len);
  bool paired = false;
  if constexpr (std::is_same_v<S, T>) {
    paired = rs.head == rt.head;
    if (paired) stage_pair_packs<Layout>(rs, rt, staged_s, staged_t, pad, ms, mt);
  }
  if (!paired) {
    stage_packs<Layout>(rs, staged_s, pad, ms);
    stage_packs<Layout>(rt, staged_t, pad, mt);
  }
  stage_edges<Layout>(src_s, rs, staged_s, pad, ms);
  stage_edges<Layout>(src_t, rt, staged_t, pad, mt);
  fill_padding<Layout>(staged_s, pad, len, columns);
  fill_padding<Layout>(staged_t, pad, len, columns);
  max_s = ms.value();
  max_t = mt.value();
}

// The shared-memory padding that aligns the gradient row's 16-byte columns (see Staging).
template <typename scalar_t, typename acc_t>
__device__ int staging_pad(const scalar_t* grad_row, const scalar_t* student_row, int len) {
  constexpr int kAccPerVec = 16 / sizeof(acc_t);
  const int head = head_elements(grad_row != nullptr ? grad_row : student_row, len);
  return (kAccPerVec - head % kAccPerVec) % kAccPerVec;
}

// ---------------------------------------------------------------------------------------------
// What both programs share: the row's identity, the kept / label checks, and the exits.

template <typename S, typename T, typename acc_t>
struct RowBase {
  const Params<S, T, acc_t>& p;
  ReductionScratch& scratch;
  int64_t row;
  int rank, cluster_size;
  int64_t col0;  // the slice's first column
  int len;       // the slice's columns
  bool arrived = false;  // this CTA has arrived at the exit barrier

  __device__ bool leader() const { return rank == 0 && threadIdx.x == 0; }
  __device__ S* grad_student_row() const {
    return p.grad_student != nullptr ? p.grad_student + row * p.grad_student_stride + col0 : nullptr;
  }
  __device__ T* grad_teacher_row() const {
    return p.grad_teacher != nullptr ? p.grad_teacher + row * p.grad_teacher_stride + col0 : nullptr;
  }

  __device__ void fill_gradients(acc_t value) const {
    if (S* g = grad_student_row()) {
      for (int j = threadIdx.x; j < len; j += blockDim.x) g[j] = static_cast<S>(value);
    }
    if (T* g = grad_teacher_row()) {
      for (int j = threadIdx.x; j < len; j += blockDim.x) g[j] = static_cast<T>(value);
    }
  }

  // A failed row: its status, and NaN loss and gradients (what a captured graph reports).
  __device__ void fail(int8_t status) const {
    if (leader()) {
      p.status[row] = status;
      p.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
    }
    fill_gradients(std::numeric_limits<acc_t>::quiet_NaN());
  }

  __device__ bool kept() const {
    return (p.mask == nullptr || p.mask[row]) && (p.labels == nullptr || p.labels[row] != p.ignore_index);
  }

  // Ends the row early (uniformly over the cluster) for a row not kept or a label out of range;
  // returns true when it did.
  __device__ bool skip_or_reject(bool fused_ce, int64_t label) const {
    if (!kept()) {
      if (leader()) p.row_loss[row] = 0;
      fill_gradients(acc_t(0));
      return true;
    }
    if (fused_ce && (label < 0 || label >= p.vocab)) {
      fail(kStatusLabelOutOfRange);
      return true;
    }
    return false;
  }

  // After the exp-sums: a NaN / +inf logit gives NaN, an all -inf row an error; true when done.
  __device__ bool reject_bad_sums(bool bad, acc_t max_s, acc_t max_t) const {
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    if (!bad && (max_s == -kInf || max_t == -kInf)) {
      fail(kStatusAllNegInf);
      return true;
    }
    if (bad) {
      if (leader()) p.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
      fill_gradients(std::numeric_limits<acc_t>::quiet_NaN());
      return true;
    }
    return false;
  }

  // Forward or reverse KL from phase 2's sums: E[x - y] under the one softmax (the cross term of
  // divergence.h over its exp-sum) minus log S_b plus log S_a, or the mirror image.
  template <Divergence D>
  static __device__ double kl_from_sums(double cross, double sum_a, double sum_b, double log_sum_a, double log_sum_b) {
    return D == Divergence::ForwardKL ? cross * reciprocal_of_sum(sum_b) - log_sum_b + log_sum_a
                                      : cross * reciprocal_of_sum(sum_a) - log_sum_a + log_sum_b;
  }

  __device__ void write_loss(double d, bool fused_ce, double shift, acc_t z_label, double log_sum_ce) const {
    if (leader()) {
      double loss = p.kd_loss_scale * d;
      if (fused_ce) loss += p.ce_weight * ((shift - double(z_label)) + log_sum_ce);
      p.row_loss[row] = static_cast<acc_t>(loss);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// FastRow: float accumulation, student gradient only, the slice staged in shared memory.

template <typename S, typename T, Divergence D, CE kCE>
struct FastRow : RowBase<S, T, float> {
  using Base = RowBase<S, T, float>;
  using Base::col0;
  using Base::cluster_size;
  using Base::len;
  using Base::p;
  using Base::row;
  using Base::scratch;
  using Traits = DivergenceTraits<D>;
  using Math = FastMath<sizeof(S) == 2>;  // a 16-bit gradient rounds to 2^-9 anyway
  static constexpr bool kKL = D == Divergence::ForwardKL || D == Divergence::ReverseKL;
  static constexpr int kVec = Pack<S>::kSize;  // gradient elements per 16-byte store

  float* staged_s;  // 2 x p.smem_columns floats of dynamic shared memory
  float* staged_t;

  // Phase 2 over 8 columns: exp2 of both sides, the sums, and what phase 3/4 keep in their place.
  struct Sums {
    float a = 0, b = 0, cross = 0, one = 0;
  };

  // The 8 columns of a group as two halves in the conflict-free order (half_first); the order of the
  // elements within the group does not matter to phases 2 and 3.
  static __device__ __forceinline__ void load_group(const float* p, float (&v)[kGroup]) {
    reinterpret_cast<float4*>(v)[0] = load_half(p, half_first());
    reinterpret_cast<float4*>(v)[1] = load_half(p, 4 - half_first());
  }
  static __device__ __forceinline__ void store_group(float* p, const float (&v)[kGroup]) {
    store_half(p, half_first(), reinterpret_cast<const float4*>(v)[0]);
    store_half(p, 4 - half_first(), reinterpret_cast<const float4*>(v)[1]);
  }

  __device__ void exp_group(float* ps, float* pt, float k, float shift_a, float shift_b, float shift_1, Sums& acc) const {
    float s[kGroup], t[kGroup];
    load_group(ps, s);
    load_group(pt, t);
#pragma unroll
    for (int e = 0; e < kGroup; ++e) {
      const float xa = fmaf(s[e], k, -shift_a), xb = fmaf(t[e], k, -shift_b);
      const float ea = fast_exp2(xa), eb = fast_exp2(xb);
      acc.a += ea;
      acc.b += eb;
      // the cross term e * (x - y) of kl_cross_term, with x - y taken as 0 where e = 0 (an -inf
      // logit makes x - y inf or NaN there, and its entry counts for nothing)
      if constexpr (D == Divergence::ForwardKL) acc.cross = fmaf(eb, eb > 0.f ? xb - xa : 0.f, acc.cross);
      if constexpr (D == Divergence::ReverseKL) {
        // reverse KL's gradient needs log q - log p: keep the log2-ratio (exact where p underflows)
        const float ratio = ea > 0.f ? xa - xb : 0.f;
        acc.cross = fmaf(ea, ratio, acc.cross);
        t[e] = ratio;
      } else {
        t[e] = eb;
      }
      if constexpr (kCE == CE::SeparateT) acc.one += fast_exp2(fmaf(s[e], kLog2e, -shift_1));
      s[e] = ea;
    }
    store_group(ps, s);
    store_group(pt, t);
  }

  // Phase 3 over 8 columns (jsd, skew, tvd): the divergence terms; gq replaces the teacher's exp.
  __device__ void terms_group(const float* ps, float* pt, float inv_a, float inv_b, const DivergenceConstants<float>& c,
                              float& acc_d, float& acc_q) const {
    float s[kGroup], t[kGroup];
    load_group(ps, s);
    load_group(pt, t);
#pragma unroll
    for (int e = 0; e < kGroup; ++e) {
      const float q = s[e] * inv_a, pr = t[e] * inv_b;
      const ElementTerms<float> terms = Traits::template terms<Math>(0.f, 0.f, q, pr, c);
      acc_d += terms.term;
      acc_q += terms.qgq;  // Gp (the teacher's) is not needed: no teacher gradient here
      t[e] = terms.gq;
    }
    store_group(pt, t);
  }

  // Phase 4's per-element formula, from what phases 2 and 3 left in shared memory (a: the
  // student's exp, b: the teacher's exp, reverse KL's log2-ratio or the free derivative gq):
  //   dLoss/dz = kd (q (gq - Gq)) + ce q  =  a (b k1 + k0)        (reverse KL, jsd, skew, tvd)
  //            = kd (q - p) + ce q        =  a k1 - b k0          (forward KL)
  // with q = a / S_a, p = b / S_b, and the per-row constants k0, k1 folding in 1/S, kd and ce.
  // Where q = 0, b is 0 (reverse KL) or a finite gq, so the product is an exact 0. At T != 1 the
  // cross-entropy's softmax is exp(z - max) / S_1 = a^T / S_1.
  struct GradientRule {
    float k1, k0, ce_scale, temperature, ce_over_sum_1;
    __device__ __forceinline__ float operator()(float a, float b) const {
      float g;
      if constexpr (D == Divergence::ForwardKL) {
        g = fmaf(a, k1, -(b * k0));
      } else {
        g = a * fmaf(b, k1, k0);
      }
      if constexpr (kCE == CE::SeparateT) g = fmaf(ce_over_sum_1, fast_exp2(temperature * fast_log2(a)), g);
      return g;
    }
  };

  // k1, k0 of GradientRule for this row.
  __device__ GradientRule gradient_rule(double sum_a, double sum_b, double g_q, double log_sum_a, double log_sum_b,
                                        double sum_1) const {
    const double inv_a = reciprocal_of_sum(sum_a), inv_b = reciprocal_of_sum(sum_b);
    const double row_scale = static_cast<double>(*p.inv_divisor);
    const double kd = p.kd_grad_scale * row_scale, ce = p.ce_weight * row_scale;
    const double ce_q = kCE == CE::SameT ? ce : 0.0;  // the cross-entropy's q term, when its softmax is q
    GradientRule rule{};
    if constexpr (D == Divergence::ForwardKL) {
      rule.k1 = static_cast<float>(inv_a * (kd + ce_q));
      rule.k0 = static_cast<float>(inv_b * kd);
    } else if constexpr (D == Divergence::ReverseKL) {
      // gq = log q - log p = ln2 * b + (log S_b - log S_a)
      rule.k1 = static_cast<float>(inv_a * kd * kLn2d);
      rule.k0 = static_cast<float>(inv_a * (kd * ((log_sum_b - log_sum_a) - g_q) + ce_q));
    } else {
      rule.k1 = static_cast<float>(inv_a * kd);
      rule.k0 = static_cast<float>(inv_a * (ce_q - kd * g_q));
    }
    rule.ce_scale = static_cast<float>(ce);
    rule.temperature = static_cast<float>(p.temperature);
    rule.ce_over_sum_1 = static_cast<float>(ce * reciprocal_of_sum(sum_1));
    return rule;
  }

  // The gradient of slice column j from the staged rows (Swizzled, see Staging).
  __device__ __forceinline__ float gradient_at(const GradientRule& rule, int pad, int j) const {
    const int index = Swizzled::at(pad + j);
    return rule(staged_s[index], staged_t[index]);
  }

  __device__ void write_gradients(const GradientRule& rule, int pad, int64_t label) const {
    S* g = this->grad_student_row();
    const int head = head_elements(g, len);
    const int packs = (len - head) / kVec;
    // budget-loop: gradient elements=1*VEC
#pragma unroll 1
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      const int j = head + i * kVec;  // pad + j is a multiple of 4: a 16-byte chunk
      float a[kVec], b[kVec];
#pragma unroll
      for (int c = 0; c < kVec / 4; ++c) {
        const int index = Swizzled::at(pad + j + 4 * c);
        reinterpret_cast<float4*>(a)[c] = load_half(staged_s, index);
        reinterpret_cast<float4*>(b)[c] = load_half(staged_t, index);
      }
      Pack<S> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = static_cast<S>(rule(a[e], b[e]));
      *reinterpret_cast<uint4*>(g + j) = *reinterpret_cast<const uint4*>(&out);
    }
    const int t = threadIdx.x, tail0 = head + packs * kVec;
    if (t < head) g[t] = static_cast<S>(gradient_at(rule, pad, t));
    if (tail0 + t < len) g[tail0 + t] = static_cast<S>(gradient_at(rule, pad, tail0 + t));
    if constexpr (kCE != CE::None) {
      const int64_t local = label - col0;
      if (local >= 0 && local < len) {
        __syncthreads();  // the vector store of the label's column is done
        if (threadIdx.x == 0) {
          const int j = static_cast<int>(local);
          g[j] = static_cast<S>(gradient_at(rule, pad, j) - rule.ce_scale);
        }
      }
    }
  }

  __device__ void run() {
    constexpr bool kFusedCE = kCE != CE::None;
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    if (this->skip_or_reject(kFusedCE, label)) return;
    // read before any gradient can overwrite it (in-place)
    const float z_label = kFusedCE && this->leader() ? static_cast<float>(p.student[row * p.student_stride + label]) : 0.f;
    const S* src_s = p.student + row * p.student_stride + col0;
    const T* src_t = p.teacher + row * p.teacher_stride + col0;
    const int pad = staging_pad<S, float>(this->grad_student_row(), src_s, len);
    const int columns = (pad + len + kGroup - 1) / kGroup * kGroup;

    // 1: staging and maxima
    float max_s, max_t;
    stage_slices<Swizzled>(src_s, src_t, len, staged_s, staged_t, pad, columns, max_s, max_t);
    {
      double v[2] = {double(max_s), double(max_t)};
      row_allreduce<MaxOp>(v, scratch, 0, cluster_size, false);  // also orders the staging stores
      max_s = static_cast<float>(v[0]);
      max_t = static_cast<float>(v[1]);
    }

    // 2: exponentials in log2 units, their sums and the KL cross term (divergence.h); a row with
    // no finite maximum uses shift 0, so its NaNs still show in the sums
    constexpr float kInf = std::numeric_limits<float>::infinity();
    const float k = p.exp2_scale;
    const float shift_a = max_s == -kInf ? 0.f : max_s * k, shift_b = max_t == -kInf ? 0.f : max_t * k;
    const float shift_1 = max_s == -kInf ? 0.f : max_s * kLog2e;
    double sum_a, sum_b, cross, sum_1;
    {
      Sums acc;
      // budget-loop: exp elements=8
#pragma unroll 1
      for (int i = threadIdx.x * kGroup; i < columns; i += blockDim.x * kGroup) {
        exp_group(staged_s + i, staged_t + i, k, shift_a, shift_b, shift_1, acc);
      }
      double v[4] = {double(acc.a), double(acc.b), double(acc.cross), double(acc.one)};
      row_allreduce<SumOp>(v, scratch, 1, cluster_size, kKL);
      this->arrived = kKL && cluster_size > 1;
      sum_a = v[0];
      sum_b = v[1];
      cross = v[2] * kLn2d;  // back to natural-log units
      sum_1 = v[3];
    }
    const bool bad = isnan(sum_a) || isnan(sum_b) || (kCE == CE::SeparateT && isnan(sum_1));
    if (this->reject_bad_sums(bad, max_s, max_t)) return;
    const double log_sum_a = ::log(sum_a), log_sum_b = ::log(sum_b);
    const double log_sum_1 = kCE == CE::SeparateT ? ::log(sum_1) : log_sum_a;
    const float inv_a = static_cast<float>(reciprocal_of_sum(sum_a)), inv_b = static_cast<float>(reciprocal_of_sum(sum_b));

    // 3: the divergence and the Jacobian row sums
    double d;
    JacobianSums<double> sums;
    if constexpr (kKL) {
      d = Base::template kl_from_sums<D>(cross, sum_a, sum_b, log_sum_a, log_sum_b);
      sums = kl_jacobian_sums(D, d);
    } else {
      const DivergenceConstants<float> c = make_constants<Math>(static_cast<float>(p.mix));
      float acc_d = 0, acc_q = 0;
      // budget-loop: terms elements=8
#pragma unroll 1
      for (int i = threadIdx.x * kGroup; i < columns; i += blockDim.x * kGroup) {
        terms_group(staged_s + i, staged_t + i, inv_a, inv_b, c, acc_d, acc_q);
      }
      double v[2] = {double(acc_d), double(acc_q)};
      row_allreduce<SumOp>(v, scratch, 2, cluster_size, true);
      this->arrived = cluster_size > 1;
      d = v[0];
      sums = {v[1], 0.0};
    }

    // 4: gradients
    if (p.grad_student != nullptr) {
      write_gradients(gradient_rule(sum_a, sum_b, sums.gq, log_sum_a, log_sum_b, sum_1), pad, label);
    }
    const double shift = kCE == CE::SeparateT ? double(max_s) : double(max_s) * double(p.inv_temperature);
    this->write_loss(d, kFusedCE, shift, z_label, log_sum_1);
  }
};

// ---------------------------------------------------------------------------------------------
// GeneralRow: any accumulation type, teacher gradients, the slice staged or read from global.

template <typename S, typename T, typename acc_t, bool kStaged>
struct Slice {
  const S* student;  // global, at the slice's first column
  const T* teacher;
  const acc_t* staged_student;  // shared memory, at column 0 (kStaged)
  const acc_t* staged_teacher;

  __device__ acc_t s(int j) const {
    if constexpr (kStaged) {
      return staged_student[j];
    } else {
      return static_cast<acc_t>(student[j]);
    }
  }
  __device__ acc_t t(int j) const {
    if constexpr (kStaged) {
      return staged_teacher[j];
    } else {
      return static_cast<acc_t>(teacher[j]);
    }
  }
};

template <typename S, typename T, typename acc_t, Divergence D, bool kStaged>
struct GeneralRow : RowBase<S, T, acc_t> {
  using Base = RowBase<S, T, acc_t>;
  using Base::col0;
  using Base::cluster_size;
  using Base::len;
  using Base::p;
  using Base::row;
  using Base::scratch;
  using M = GeneralMath<acc_t>;
  using Traits = DivergenceTraits<D>;
  // forward and reverse KL: d from phase 2; one of their gradients needs log-probabilities
  static constexpr bool kKL = D == Divergence::ForwardKL || D == Divergence::ReverseKL;

  acc_t* staged_s;  // dynamic shared memory: 2 x p.smem_columns acc_t (kStaged)
  acc_t* staged_t;

  __device__ void run() {
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    const bool fused_ce = p.ce_weight != 0.0;
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    if (this->skip_or_reject(fused_ce, label)) return;
    // read before any gradient can overwrite it (in-place)
    const acc_t z_label =
        fused_ce && this->leader() ? static_cast<acc_t>(p.student[row * p.student_stride + label]) : acc_t(0);
    const acc_t inv_t = p.inv_temperature;
    const S* src_s = p.student + row * p.student_stride + col0;
    const T* src_t = p.teacher + row * p.teacher_stride + col0;

    // 1: maxima (and staging)
    acc_t max_s, max_t;
    int pad = 0;
    if constexpr (kStaged) {
      pad = staging_pad<S, acc_t>(this->grad_student_row(), src_s, len);
      stage_slices<Plain>(src_s, src_t, len, staged_s, staged_t, pad, pad + len, max_s, max_t);
    } else {
      max_s = max_t = -kInf;
      // budget-loop: max elements=1
      for (int j = threadIdx.x; j < len; j += blockDim.x) {
        max_s = max_ignoring_nan(max_s, static_cast<acc_t>(src_s[j]));
        max_t = max_ignoring_nan(max_t, static_cast<acc_t>(src_t[j]));
      }
    }
    const Slice<S, T, acc_t, kStaged> slice{src_s, src_t, staged_s + pad, staged_t + pad};
    {
      double v[2] = {double(max_s), double(max_t)};
      row_allreduce<MaxOp>(v, scratch, 0, cluster_size, false);  // also orders the staging stores
      max_s = static_cast<acc_t>(v[0]);
      max_t = static_cast<acc_t>(v[1]);
    }

    // 2: exp-sums and the KL cross term (kl_cross_term in divergence.h), relative to the maxima;
    // a row with no finite maximum uses shift 0, so its NaNs still show in the sums
    const acc_t shift_a = max_s == -kInf ? acc_t(0) : max_s * inv_t;
    const acc_t shift_b = max_t == -kInf ? acc_t(0) : max_t * inv_t;
    const acc_t shift_1 = max_s == -kInf ? acc_t(0) : max_s;
    const DivergenceConstants<acc_t> c = make_constants<M>(p.mix);
    double sum_a, sum_b, cross, sum_1;
    {
      acc_t acc_a = 0, acc_b = 0, acc_x = 0, acc_1 = 0;
      // budget-loop: exp elements=1
      for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const acc_t s = slice.s(j);
        const acc_t xa = s * inv_t - shift_a, xb = slice.t(j) * inv_t - shift_b;
        const acc_t ea = M::exp(xa), eb = M::exp(xb);
        acc_a += ea;
        acc_b += eb;
        if constexpr (D == Divergence::ForwardKL) acc_x += kl_cross_term<M>(eb, xb, xa, c);
        if constexpr (D == Divergence::ReverseKL) acc_x += kl_cross_term<M>(ea, xa, xb, c);
        if (p.separate_ce) acc_1 += M::exp(s - shift_1);
      }
      double v[4] = {double(acc_a), double(acc_b), double(acc_x), double(acc_1)};
      row_allreduce<SumOp>(v, scratch, 1, cluster_size, kKL);
      this->arrived = kKL && cluster_size > 1;
      sum_a = v[0];
      sum_b = v[1];
      cross = v[2];
      sum_1 = v[3];
    }
    // a NaN or +inf logit leaves a NaN in its exp-sum (a NaN exp, or inf - inf)
    const bool bad = isnan(sum_a) || isnan(sum_b) || isnan(sum_1);
    if (this->reject_bad_sums(bad, max_s, max_t)) return;
    const double log_sum_a = ::log(sum_a), log_sum_b = ::log(sum_b);
    const double log_sum_1 = p.separate_ce ? ::log(sum_1) : log_sum_a;
    const acc_t inv_sum_a = static_cast<acc_t>(reciprocal_of_sum(sum_a));
    const acc_t inv_sum_b = static_cast<acc_t>(reciprocal_of_sum(sum_b));

    // 3: the divergence and the Jacobian row sums
    double d;
    JacobianSums<double> sums;
    if constexpr (kKL) {
      d = Base::template kl_from_sums<D>(cross, sum_a, sum_b, log_sum_a, log_sum_b);
      sums = kl_jacobian_sums(D, d);
    } else {
      acc_t acc_d = 0, acc_q = 0, acc_p = 0;
      // budget-loop: terms elements=1
      for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const acc_t q = M::exp(slice.s(j) * inv_t - shift_a) * inv_sum_a;
        const acc_t pr = M::exp(slice.t(j) * inv_t - shift_b) * inv_sum_b;
        const ElementTerms<acc_t> e = Traits::template terms<M>(acc_t(0), acc_t(0), q, pr, c);
        acc_d += e.term;
        acc_q += e.qgq;
        acc_p += e.pgp;
      }
      double v[3] = {double(acc_d), double(acc_q), double(acc_p)};
      row_allreduce<SumOp>(v, scratch, 2, cluster_size, true);
      this->arrived = cluster_size > 1;
      d = v[0];
      sums = {v[1], v[2]};
    }

    // 4: gradients
    const double row_scale = static_cast<double>(*p.inv_divisor);
    S* gs = this->grad_student_row();
    T* gt = this->grad_teacher_row();
    if (gs != nullptr || gt != nullptr) {
      const acc_t kd_scale = static_cast<acc_t>(p.kd_grad_scale * row_scale);
      const acc_t ce_scale = static_cast<acc_t>(p.ce_weight * row_scale);
      const acc_t g_q = static_cast<acc_t>(sums.gq), g_p = static_cast<acc_t>(sums.gp);
      const acc_t lsa = static_cast<acc_t>(log_sum_a), lsb = static_cast<acc_t>(log_sum_b);
      const acc_t ls1 = static_cast<acc_t>(log_sum_1);
      const int64_t label_in_slice = label - col0;
      // budget-loop: gradient elements=1
      for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const acc_t s = slice.s(j);
        const acc_t xa = s * inv_t - shift_a, xb = slice.t(j) * inv_t - shift_b;
        const acc_t q = M::exp(xa) * inv_sum_a, pr = M::exp(xb) * inv_sum_b;
        ElementTerms<acc_t> e{};
        if constexpr (Traits::kNeedsRowSums) {
          e = Traits::template terms<M>(acc_t(0), acc_t(0), q, pr, c);
        } else {
          e = Traits::template terms<M>(xa - lsa, xb - lsb, q, pr, c);
        }
        if (gs != nullptr) {
          acc_t g = Traits::template student_grad<M>(e, q, pr, g_q, c) * kd_scale;
          if (fused_ce) {
            const acc_t softmax = p.separate_ce ? M::exp((s - shift_1) - ls1) : q;
            g += ce_scale * softmax;
            if (j == label_in_slice) g -= ce_scale;
          }
          gs[j] = static_cast<S>(g);
        }
        if (gt != nullptr) gt[j] = static_cast<T>(Traits::template teacher_grad<M>(e, q, pr, g_p, c) * kd_scale);
      }
    }
    this->write_loss(d, fused_ce, double(p.separate_ce ? shift_1 : shift_a), z_label, log_sum_1);
  }
};

// ---------------------------------------------------------------------------------------------
// The kernels: one CTA per (row, slice), a cluster per row.

// The row, the slice and the cluster rank of this CTA. The cluster size comes from the host (it
// chose the launch); a kernel whose hardware cluster disagrees -- a pre-sm_90 binary or PTX JIT
// launched with clusters, say -- traps rather than read and write the wrong rows.
template <typename Program, typename P>
__device__ Program make_row(const P& p, ReductionScratch& scratch) {
  int rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (static_cast<int>(cluster.num_blocks()) != p.cluster_size) __trap();
  rank = static_cast<int>(cluster.block_rank());
#else
  if (p.cluster_size != 1) __trap();
#endif
  const int64_t row = p.row_offset + blockIdx.x / p.cluster_size;
  const int64_t col0 = int64_t(rank) * p.slice;
  const int len = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(p.slice, p.vocab - col0)));
  Program program{{p, scratch, row, rank, p.cluster_size, col0, len}};
  return program;
}

// No CTA may leave while a neighbour can still read its shared memory; every path through run()
// is uniform over the cluster, so all CTAs arrive exactly once.
__device__ __forceinline__ void leave_cluster(int cluster_size, bool arrived) {
  if (cluster_size == 1) return;
  if (!arrived) cluster_arrive_relaxed();
  cluster_wait();
}

template <typename S, typename T, Divergence D, CE kCE>
__global__ void __launch_bounds__(kMaxThreads, 2) kd_loss_fast_kernel(const Params<S, T, float> p) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ ReductionScratch scratch;
  auto program = make_row<FastRow<S, T, D, kCE>>(p, scratch);
  program.staged_s = reinterpret_cast<float*>(dynamic_smem);
  program.staged_t = program.staged_s + p.smem_columns;
  program.run();
  leave_cluster(p.cluster_size, program.arrived);
}

// Threads per CTA at most: float64 math needs more registers than 65536 / 512 leaves a thread.
// Every kernel is bounded for two CTAs per SM (the plans size a slice for half an SM's shared
// memory so that one CTA loads while the other computes), i.e. 64 registers a thread at 512.
template <typename acc_t>
constexpr int max_threads() {
  return std::is_same_v<acc_t, double> ? kMaxThreads / 2 : kMaxThreads;
}

template <typename S, typename T, typename acc_t, Divergence D, bool kStaged>
__global__ void __launch_bounds__(max_threads<acc_t>(), 2) kd_loss_general_kernel(const Params<S, T, acc_t> p) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ ReductionScratch scratch;
  auto program = make_row<GeneralRow<S, T, acc_t, D, kStaged>>(p, scratch);
  program.staged_s = reinterpret_cast<acc_t*>(dynamic_smem);
  program.staged_t = program.staged_s + p.smem_columns;
  program.run();
  leave_cluster(p.cluster_size, program.arrived);
}

// grad *= *factor, unless *factor is exactly 1 (read on the device: no host synchronization,
// and the usual loss.backward() costs a launch instead of a pass over the gradient).
template <typename scalar_t, typename factor_t>
__global__ void scale_unless_one_kernel(scalar_t* grad, const factor_t* factor, int64_t n) {
  const factor_t f = *factor;
  if (f == factor_t(1)) return;
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * static_cast<acc_t>(f));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: launch geometry and dispatch.

struct Geometry {
  int cluster_size;
  int slice;         // columns per CTA
  int threads;
  size_t smem;       // dynamic shared memory per CTA
  int smem_columns;  // shared-memory columns per row side (staged)
};

int round_up(int64_t x, int64_t m) { return static_cast<int>((x + m - 1) / m * m); }

int threads_for(int slice, int max_threads) {
  return std::min(max_threads, slice >= 4096 ? kMaxThreads : slice >= 1024 ? 256 : 128);
}

cudaLaunchConfig_t launch_config(dim3 grid, const Geometry& g, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(g.threads);
  config.dynamicSmemBytes = g.smem;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = g.cluster_size;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = g.cluster_size > 1 ? 1 : 0;  // no attribute at all for single-CTA rows
  return config;
}

// Whether clusters of `g.cluster_size` CTAs with `g.smem` bytes each can be co-scheduled.
template <typename KernelFn>
bool cluster_fits(KernelFn kernel, const Geometry& g) {
  if (g.cluster_size == 1) return true;
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t config = launch_config(dim3(g.cluster_size), g, nullptr, &attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error the query left behind
    return false;
  }
  return clusters > 0;
}

// The largest cluster to try for a kernel: 1 unless the GPU and the kernel's code both support
// clusters (the code was compiled for sm_90 or later, not JIT-compiled from older PTX, whose
// kernels do not know their cluster), then 16 where non-portable sizes are allowed, else 8.
template <typename KernelFn>
int max_cluster_size(KernelFn kernel, const cudaDeviceProp& prop) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (prop.major < 9 || attr.ptxVersion < 90 || attr.binaryVersion < 90) return 1;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
    return kMaxClusterCtas;
  }
  (void)cudaGetLastError();
  return 8;
}

// Staged geometry: the smallest cluster whose slices fit in half an SM's shared memory (two CTAs
// per SM, so one loads while the other computes), else in all of it, that the GPU can schedule.
template <typename KernelFn>
std::optional<Geometry> plan_staged(KernelFn kernel, int64_t vocab, size_t acc_bytes, int max_threads,
                                    const cudaDeviceProp& prop) {
  const size_t budget = prop.sharedMemPerBlockOptin - sizeof(ReductionScratch);
  const size_t half = std::min(budget, prop.sharedMemPerMultiprocessor / 2 - prop.reservedSharedMemPerBlock -
                                           sizeof(ReductionScratch));
  // the attribute is the kernel's ceiling, not what a launch takes: set it once, to the most
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(budget)));
  const int max_cluster = max_cluster_size(kernel, prop);
  const int pad_columns = static_cast<int>(16 / acc_bytes);
  for (const size_t limit : {half, budget}) {
    for (int c = 1; c <= max_cluster; c *= 2) {
      const int slice = round_up((vocab + c - 1) / c, kGroup);
      const int columns = round_up(slice + pad_columns, kGroup);
      const size_t smem = 2 * size_t(columns) * acc_bytes;
      const Geometry g{c, slice, threads_for(slice, max_threads), smem, columns};
      if (smem <= limit && cluster_fits(kernel, g)) return g;
    }
  }
  return std::nullopt;
}

// Streamed geometry: the largest cluster the GPU can schedule.
template <typename KernelFn>
Geometry plan_streamed(KernelFn kernel, int64_t vocab, int max_threads, const cudaDeviceProp& prop) {
  for (int c = max_cluster_size(kernel, prop); c >= 1; c /= 2) {
    const int slice = round_up((vocab + c - 1) / c, kGroup);
    const Geometry g{c, slice, threads_for(slice, max_threads), 0, 0};
    if (cluster_fits(kernel, g)) return g;
  }
  TORCH_CHECK(false, "kd_loss_cuda: no launch geometry fits this GPU");
}

// Plans depend only on (device, vocabulary, kernel); planning queries the driver, so they are
// cached. A staged kernel whose slices fit nowhere caches "none".
template <typename Compute>
std::optional<Geometry> cached_plan(int device, int64_t vocab, const void* kernel, Compute&& compute) {
  static std::mutex mutex;
  static std::vector<std::tuple<int, int64_t, const void*, std::optional<Geometry>>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [d, v, k, g] : plans) {
    if (d == device && v == vocab && k == kernel) return g;
  }
  plans.emplace_back(device, vocab, kernel, compute());
  return std::get<3>(plans.back());
}

template <typename KernelFn, typename P>
void launch_rows(KernelFn kernel, P p, const Geometry& g, int64_t n_rows, cudaStream_t stream) {
  p.slice = g.slice;
  p.smem_columns = g.smem_columns;
  p.cluster_size = g.cluster_size;
  // gridDim.x is below 2^31: launch at most that many CTAs at a time
  const int64_t rows_per_launch = int64_t(std::numeric_limits<int>::max()) / g.cluster_size;
  for (int64_t first = 0; first < n_rows; first += rows_per_launch) {
    p.row_offset = first;
    const int64_t rows = std::min(rows_per_launch, n_rows - first);
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t config = launch_config(dim3(static_cast<unsigned>(rows * g.cluster_size)), g, stream, &attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  }
}

// FastRow when it applies and its slices fit in shared memory; else GeneralRow, staged or not.
template <typename S, typename T, typename acc_t, Divergence D>
void launch(const Params<S, T, acc_t>& p, int64_t n_rows, bool teacher_grad, cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  const cudaDeviceProp& prop = *at::cuda::getDeviceProperties(device);
  if constexpr (std::is_same_v<acc_t, float>) {
    const bool fused_ce = p.ce_weight != 0.0;
    // a float32 student's cross-entropy at T != 1 is computed from its logits (GeneralRow)
    const bool fast = !teacher_grad && !(p.separate_ce && sizeof(S) == 4);
    if (fast) {
      auto try_fast = [&](auto kernel) {
        const auto g = cached_plan(device, p.vocab, reinterpret_cast<const void*>(kernel),
                                   [&] { return plan_staged(kernel, p.vocab, sizeof(float), kMaxThreads, prop); });
        if (g.has_value()) launch_rows(kernel, p, *g, n_rows, stream);
        return g.has_value();
      };
      bool launched;
      if (!fused_ce) {
        launched = try_fast(kd_loss_fast_kernel<S, T, D, CE::None>);
      } else if (!p.separate_ce) {
        launched = try_fast(kd_loss_fast_kernel<S, T, D, CE::SameT>);
      } else if constexpr (sizeof(S) == 2) {
        launched = try_fast(kd_loss_fast_kernel<S, T, D, CE::SeparateT>);
      } else {
        launched = false;
      }
      if (launched) return;
    }
  }
  auto staged = kd_loss_general_kernel<S, T, acc_t, D, true>;
  const auto g = cached_plan(device, p.vocab, reinterpret_cast<const void*>(staged),
                             [&] { return plan_staged(staged, p.vocab, sizeof(acc_t), max_threads<acc_t>(), prop); });
  if (g.has_value()) return launch_rows(staged, p, *g, n_rows, stream);
  auto streamed = kd_loss_general_kernel<S, T, acc_t, D, false>;
  const auto gs = cached_plan(device, p.vocab, reinterpret_cast<const void*>(streamed),
                              [&] { return std::optional<Geometry>(plan_streamed(streamed, p.vocab, max_threads<acc_t>(), prop)); });
  launch_rows(streamed, p, *gs, n_rows, stream);
}

template <typename S, typename T, typename acc_t>
void dispatch_divergence(Divergence div, const Params<S, T, acc_t>& p, int64_t n_rows, bool teacher_grad,
                         cudaStream_t stream) {
  switch (div) {
    case Divergence::ForwardKL:
      return launch<S, T, acc_t, Divergence::ForwardKL>(p, n_rows, teacher_grad, stream);
    case Divergence::ReverseKL:
      return launch<S, T, acc_t, Divergence::ReverseKL>(p, n_rows, teacher_grad, stream);
    case Divergence::JSD:
      return launch<S, T, acc_t, Divergence::JSD>(p, n_rows, teacher_grad, stream);
    case Divergence::SkewKL:
      return launch<S, T, acc_t, Divergence::SkewKL>(p, n_rows, teacher_grad, stream);
    case Divergence::SkewRKL:
      return launch<S, T, acc_t, Divergence::SkewRKL>(p, n_rows, teacher_grad, stream);
    case Divergence::TVD:
      return launch<S, T, acc_t, Divergence::TVD>(p, n_rows, teacher_grad, stream);
  }
}

template <typename X>
struct Tag {
  using type = X;
};

// Calls f(Tag<S>{}, Tag<T>{}) for the logits' dtypes: any pair of bfloat16, float16 and float32,
// or float64 with float64 (check_inputs refuses float64 mixed with anything else).
template <typename F>
void dispatch_dtypes(at::ScalarType student, at::ScalarType teacher, F&& f) {
  auto with_teacher = [&](auto s) {
    switch (teacher) {
      case at::kFloat:
        return f(s, Tag<float>{});
      case at::kBFloat16:
        return f(s, Tag<at::BFloat16>{});
      case at::kHalf:
        return f(s, Tag<at::Half>{});
      default:
        TORCH_CHECK(false, "kd_loss_cuda: unsupported teacher dtype ", teacher);
    }
  };
  switch (student) {
    case at::kFloat:
      return with_teacher(Tag<float>{});
    case at::kBFloat16:
      return with_teacher(Tag<at::BFloat16>{});
    case at::kHalf:
      return with_teacher(Tag<at::Half>{});
    case at::kDouble:
      return f(Tag<double>{}, Tag<double>{});
    default:
      TORCH_CHECK(false, "kd_loss_cuda: unsupported student dtype ", student);
  }
}

// Raises the first failing row's error. One device read (the status maximum) when nothing
// failed; none while the stream is being captured into a CUDA graph, where a failed row shows
// only as its NaN loss and gradients.
void raise_for_status(const at::Tensor& status, const std::optional<at::Tensor>& labels, int64_t vocab,
                      int64_t ignore_index) {
  if (status.numel() == 0 || at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) return;
  if (status.max().item<int8_t>() == 0) return;
  const at::Tensor host = status.cpu();
  const int8_t* codes = host.data_ptr<int8_t>();
  const int64_t row = std::find_if(codes, codes + host.numel(), [](int8_t c) { return c != 0; }) - codes;
  if (codes[row] == kStatusAllNegInf) raise_all_neg_inf(row);
  raise_label_out_of_range(row, (*labels)[row].item<int64_t>(), vocab, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const char* op, const at::Tensor& student,
                                                   const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& normalizer, const KdLossOptions& opt,
                                                   bool inplace) {
  check_inputs(op, student, teacher, labels, mask, normalizer, opt);
  TORCH_CHECK_VALUE(student.is_cuda(), op, ": runs on CUDA tensors, got ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK_VALUE(v < std::numeric_limits<int>::max() - 64, op, ": vocabulary sizes beyond 2^31 are not supported");
  const auto loss_opts = student.options().dtype(loss_dtype(student));
  at::Tensor row_loss = at::empty({n}, loss_opts);
  at::Tensor status = at::zeros({n}, student.options().dtype(at::kChar));
  const bool write_student = opt.student_grad && !inplace;
  at::Tensor grad_s = at::empty(write_student ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, student.options());
  at::Tensor grad_t = at::empty(opt.teacher_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, teacher.options());
  at::Tensor labels_c = labels.has_value() ? labels->contiguous() : at::Tensor();
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor divisor =
      loss_divisor(kept_rows(labels, mask, opt.ignore_index), n, normalizer, opt.reduction, loss_opts).contiguous();
  const at::Tensor inv_divisor = divisor.reciprocal();  // on the device: the kernels only multiply
  if (n > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_dtypes(student.scalar_type(), teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using acc_t = at::opmath_type<S>;
      Params<S, T, acc_t> p{};
      p.student = student.data_ptr<S>();
      p.teacher = teacher.data_ptr<T>();
      p.student_stride = student.stride(0);
      p.teacher_stride = teacher.stride(0);
      if (opt.student_grad) {
        p.grad_student = inplace ? student.data_ptr<S>() : grad_s.data_ptr<S>();
        p.grad_student_stride = inplace ? student.stride(0) : v;
      }
      if (opt.teacher_grad) {
        p.grad_teacher = grad_t.data_ptr<T>();
        p.grad_teacher_stride = v;
      }
      p.labels = labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr;
      p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
      p.inv_divisor = inv_divisor.data_ptr<acc_t>();
      p.row_loss = row_loss.data_ptr<acc_t>();
      p.status = status.data_ptr<int8_t>();
      p.vocab = v;
      p.inv_temperature = static_cast<acc_t>(1.0 / opt.temperature);
      p.temperature = static_cast<acc_t>(opt.temperature);
      p.exp2_scale = static_cast<float>(1.4426950408889634 / opt.temperature);
      p.mix = static_cast<acc_t>(opt.mix);
      const LossScales<double> scales = loss_scales(opt.temperature, opt.t2_scale, opt.kd_weight);
      p.kd_loss_scale = scales.kd_loss;
      p.kd_grad_scale = scales.kd_grad;
      p.ce_weight = opt.ce_weight;
      p.ignore_index = opt.ignore_index;
      p.separate_ce = opt.ce_weight != 0.0 && opt.temperature != 1.0;
      dispatch_divergence(opt.divergence, p, n, opt.teacher_grad, stream);
    });
    raise_for_status(status, labels_c.defined() ? std::optional<at::Tensor>(labels_c) : std::nullopt, v,
                     opt.ignore_index);
  }
  at::Tensor loss = opt.reduction == Reduction::None ? row_loss : row_loss.sum().div(divisor);
  return {loss, grad_s, grad_t};
}

KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cuda, run, false)
KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cuda_inplace, run, true)

// grad *= factor (a one-element tensor on the same device) unless the factor is exactly 1,
// decided on the device: what kd_loss's backward needs without a host synchronization.
void scale_grad_unless_one_cuda(const at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK_VALUE(grad.is_cuda() && factor.device() == grad.device(), "scale_grad_unless_one_cuda: grad (",
                    grad.device(), ") and factor (", factor.device(), ") must be on one CUDA device");
  TORCH_CHECK_VALUE(factor.numel() == 1 && (factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble),
                    "scale_grad_unless_one_cuda: factor must be one float32 or float64 element, got ",
                    factor.scalar_type(), " ", factor.sizes());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "scale_grad_unless_one_cuda: grad must be contiguous");
  const int64_t n = grad.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = factor.reshape({});
  const int threads = 256;
  const int sms = at::cuda::getDeviceProperties(grad.get_device())->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, int64_t(sms) * 8));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_unless_one_cuda", [&] {
    if (f.scalar_type() == at::kFloat) {
      scale_unless_one_kernel<<<blocks, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), f.data_ptr<float>(), n);
    } else {
      scale_unless_one_kernel<<<blocks, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), f.data_ptr<double>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CUDA, m) {
  m.impl("kd_loss_cuda", &kdcore::cuda::kd_loss_cuda);
  m.impl("kd_loss_cuda_inplace", &kdcore::cuda::kd_loss_cuda_inplace);
  m.impl("scale_grad_unless_one_cuda", &kdcore::cuda::scale_grad_unless_one_cuda);
}
