// CUDA kernels of the kd_loss op family (kdcore::kd_loss_cuda, kdcore::kd_loss_cuda_inplace).
//
// One row of the vocabulary is split over the C CTAs of a thread-block cluster (C = 1 for short
// rows and on GPUs before Hopper). Each CTA owns a slice of about V / C columns:
//
//   1  it reads its slice of both logit rows from HBM once -- 16-byte streaming loads -- converts
//      them to float (double for float64 logits) into shared memory, and finds the slice maxima;
//   2  the softmax statistics (maxima, exp-sums, the KL cross term) are reduced warp -> block ->
//      cluster, the last step through distributed shared memory: each CTA publishes its partials
//      in its own shared memory and one warp of every CTA reads all C of them in rank order, so
//      every CTA holds bit-identical row statistics;
//   3  jsd / skew_kl / skew_rkl / tvd only: the Jacobian row sums Gq, Gp and the divergence, the
//      same way, from shared memory;
//   4  the gradients, from shared memory, written to HBM once in the logits' dtype.
//
// Bytes moved per element of the [N, V] problem: the two logits read once and each requested
// gradient written once -- 6 B for bf16/fp16 (student gradient only), 12 B for float32, 24 B for
// float64 -- plus 8 B of labels/mask/loss per row. A slice lives in shared memory when it fits
// in half of an SM's opt-in shared memory (two CTAs per SM, so one loads while the other
// computes); C grows up to the largest cluster the GPU can schedule (16 on an H100) until it
// does. A row too long even for that (float32 beyond ~450k columns, float64 beyond ~225k on an
// H100) is swept from global memory in every phase instead: correct, 2-3x the traffic, and the
// L2 cache catches part of it.
//
// The per-element math is kdcore::DivergenceTraits (csrc/include/kdcore/divergence.h), the
// same code the CPU kernel runs, so the CPU tests exercise these formulas.
//
// With `inplace` (kd_loss_cuda_inplace) the student gradient is written over the student logits:
// every CTA has read its whole slice before phase 4 writes it (or, unstaged, each element is
// read and then written by the same thread in the last phase), and the label's logit for the
// fused cross-entropy is read before the first cluster barrier.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>

#include "kdcore/divergence.h"
#include "kdcore/kd_loss_host.h"

namespace kdcore {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxClusterCtas = 16;  // the largest (non-portable) cluster of an H100
constexpr int kNumPartials = 4;      // the most values one reduction carries

// Per-row failure codes, raised on the host after the launch (the same as the Triton backend).
constexpr int8_t kStatusAllNegInf = 1;
constexpr int8_t kStatusLabelOutOfRange = 2;

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* student;
  const scalar_t* teacher;
  scalar_t* grad_student;  // null when not requested; the student itself for in-place
  scalar_t* grad_teacher;  // null when not requested
  int64_t student_stride, teacher_stride, grad_student_stride, grad_teacher_stride;  // elements
  const int64_t* labels;   // [N] or null
  const bool* mask;        // [N] or null
  const acc_t* divisor;    // 0-dim: the loss divisor ('batchmean'), else 1
  acc_t* row_loss;         // [N]
  int8_t* status;          // [N], 0 = fine
  int64_t row_offset;      // first row of this launch
  int64_t vocab;
  int slice;               // columns per CTA, a multiple of the 16-byte vector width
  bool vectorized;         // rows are 16-byte aligned: phase 1 uses 16-byte loads
  acc_t inv_temperature, mix;
  double kd_loss_scale, kd_grad_scale, ce_weight;
  int64_t ignore_index;
  bool separate_ce;        // fused CE at T != 1 needs the exp-sum of the raw student logits
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
    for (int w = 1; w < warps; ++w) r = Op::apply(r, scratch.warp_partials[w][k]);
    v[k] = r;
  }
}

// Combines the block totals of the cluster's CTAs (every thread holds its block's totals in v).
// `phase` picks the publication slot (see ReductionScratch).
template <typename Op, int K>
__device__ void cluster_allreduce(double (&v)[K], ReductionScratch& scratch, int phase, int cluster_size) {
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
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch.result[k];
#endif
}

template <typename Op, int K>
__device__ void row_allreduce(double (&v)[K], ReductionScratch& scratch, int phase, int cluster_size) {
  block_allreduce<Op>(v, scratch);
  cluster_allreduce<Op>(v, scratch, phase, cluster_size);
}

// ---------------------------------------------------------------------------------------------
// A CTA's slice of one row pair: staged in shared memory, or read from global memory each time.

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename acc_t>
__device__ acc_t max_ignoring_nan(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// Phase 1, staged: copies `len` logits into `dst` as acc_t and returns their maximum.
template <typename scalar_t, typename acc_t>
__device__ acc_t stage_slice(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int len, bool vectorized) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int tail = 0;
  if (vectorized) {
    const int packs = len / kVec;
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      Pack<scalar_t> in;
      *reinterpret_cast<uint4*>(&in) = __ldcs(reinterpret_cast<const uint4*>(src) + i);
      alignas(16) acc_t out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        out[k] = static_cast<acc_t>(in.v[k]);
        m = max_ignoring_nan(m, out[k]);
      }
      // 16-byte shared-memory stores: at most 2-way bank conflicts
#pragma unroll
      for (int c = 0; c < int(sizeof(out) / 16); ++c) {
        reinterpret_cast<uint4*>(dst + i * kVec)[c] = reinterpret_cast<const uint4*>(out)[c];
      }
    }
    tail = packs * kVec;
  }
  for (int j = tail + threadIdx.x; j < len; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(src[j]);
    dst[j] = x;
    m = max_ignoring_nan(m, x);
  }
  return m;
}

template <typename scalar_t, typename acc_t, bool kStaged>
struct Slice {
  const scalar_t* student;  // global, at the slice's first column
  const scalar_t* teacher;
  const acc_t* staged_student;  // shared memory (kStaged)
  const acc_t* staged_teacher;
  int len;

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

// ---------------------------------------------------------------------------------------------
// The kernel.

template <typename scalar_t, typename acc_t, Divergence D, bool kStaged>
struct RowProgram {
  using M = ScalarMath<acc_t>;
  using Traits = DivergenceTraits<D>;
  // forward and reverse KL: d from phase 2; one of their gradients needs log-probabilities
  static constexpr bool kKL = D == Divergence::ForwardKL || D == Divergence::ReverseKL;

  const Params<scalar_t, acc_t>& p;
  ReductionScratch& scratch;
  int64_t row;
  int rank, cluster_size;
  int64_t col0;  // the slice's first column
  Slice<scalar_t, acc_t, kStaged> slice;
  acc_t* staged;  // dynamic shared memory: 2 x p.slice acc_t (kStaged)

  __device__ void fill_gradients(acc_t value) const {
    if (p.grad_student != nullptr) {
      scalar_t* g = p.grad_student + row * p.grad_student_stride + col0;
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) g[j] = static_cast<scalar_t>(value);
    }
    if (p.grad_teacher != nullptr) {
      scalar_t* g = p.grad_teacher + row * p.grad_teacher_stride + col0;
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) g[j] = static_cast<scalar_t>(value);
    }
  }

  __device__ bool leader() const { return rank == 0 && threadIdx.x == 0; }

  __device__ void run() {
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    const bool kept = (p.mask == nullptr || p.mask[row]) && (p.labels == nullptr || p.labels[row] != p.ignore_index);
    if (!kept) {  // uniform over the cluster: no CTA reaches a cluster barrier
      if (leader()) p.row_loss[row] = 0;
      fill_gradients(acc_t(0));
      return;
    }
    const bool fused_ce = p.ce_weight != 0.0;
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    if (fused_ce && (label < 0 || label >= p.vocab)) {
      if (leader()) p.status[row] = kStatusLabelOutOfRange;
      return;
    }
    // read before any gradient can overwrite it (in-place)
    const acc_t z_label = fused_ce && leader() ? static_cast<acc_t>(p.student[row * p.student_stride + label]) : acc_t(0);
    const acc_t inv_t = p.inv_temperature;

    // 1: maxima (and staging)
    acc_t max_s, max_t;
    if constexpr (kStaged) {
      max_s = stage_slice(slice.student, staged, slice.len, p.vectorized);
      max_t = stage_slice(slice.teacher, staged + p.slice, slice.len, p.vectorized);
    } else {
      max_s = max_t = -kInf;
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) {
        max_s = max_ignoring_nan(max_s, slice.s(j));
        max_t = max_ignoring_nan(max_t, slice.t(j));
      }
    }
    {
      double v[2] = {double(max_s), double(max_t)};
      row_allreduce<MaxOp>(v, scratch, 0, cluster_size);  // also orders the staging stores
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
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) {
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
      row_allreduce<SumOp>(v, scratch, 1, cluster_size);
      sum_a = v[0];
      sum_b = v[1];
      cross = v[2];
      sum_1 = v[3];
    }
    // a NaN or +inf logit leaves a NaN in its exp-sum (a NaN exp, or inf - inf)
    const bool bad = isnan(sum_a) || isnan(sum_b) || isnan(sum_1);
    if (!bad && (max_s == -kInf || max_t == -kInf)) {
      if (leader()) p.status[row] = kStatusAllNegInf;
      return;
    }
    if (bad) {
      if (leader()) p.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
      fill_gradients(std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    const double log_sum_a = ::log(sum_a), log_sum_b = ::log(sum_b);
    const double log_sum_1 = p.separate_ce ? ::log(sum_1) : log_sum_a;
    const acc_t inv_sum_a = static_cast<acc_t>(1.0 / sum_a), inv_sum_b = static_cast<acc_t>(1.0 / sum_b);

    // 3: the divergence and the Jacobian row sums
    double d;
    JacobianSums<double> sums;
    if constexpr (kKL) {
      d = D == Divergence::ForwardKL ? cross / sum_b - log_sum_b + log_sum_a : cross / sum_a - log_sum_a + log_sum_b;
      sums = kl_jacobian_sums(D, d);
    } else {
      acc_t acc_d = 0, acc_q = 0, acc_p = 0;
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) {
        const acc_t q = M::exp(slice.s(j) * inv_t - shift_a) * inv_sum_a;
        const acc_t pr = M::exp(slice.t(j) * inv_t - shift_b) * inv_sum_b;
        const ElementTerms<acc_t> e = Traits::template terms<M>(acc_t(0), acc_t(0), q, pr, c);
        acc_d += e.term;
        acc_q += e.qgq;
        acc_p += e.pgp;
      }
      double v[3] = {double(acc_d), double(acc_q), double(acc_p)};
      row_allreduce<SumOp>(v, scratch, 2, cluster_size);
      d = v[0];
      sums = {v[1], v[2]};
    }

    // 4: gradients
    const double row_scale = 1.0 / static_cast<double>(*p.divisor);
    if (p.grad_student != nullptr || p.grad_teacher != nullptr) {
      const acc_t kd_scale = static_cast<acc_t>(p.kd_grad_scale * row_scale);
      const acc_t ce_scale = static_cast<acc_t>(p.ce_weight * row_scale);
      const acc_t g_q = static_cast<acc_t>(sums.gq), g_p = static_cast<acc_t>(sums.gp);
      const acc_t lsa = static_cast<acc_t>(log_sum_a), lsb = static_cast<acc_t>(log_sum_b);
      const acc_t ls1 = static_cast<acc_t>(log_sum_1);
      scalar_t* gs = p.grad_student != nullptr ? p.grad_student + row * p.grad_student_stride + col0 : nullptr;
      scalar_t* gt = p.grad_teacher != nullptr ? p.grad_teacher + row * p.grad_teacher_stride + col0 : nullptr;
      const int64_t label_in_slice = label - col0;
      for (int j = threadIdx.x; j < slice.len; j += blockDim.x) {
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
          gs[j] = static_cast<scalar_t>(g);
        }
        if (gt != nullptr) gt[j] = static_cast<scalar_t>(Traits::template teacher_grad<M>(e, q, pr, g_p, c) * kd_scale);
      }
    }
    if (leader()) {
      double loss = p.kd_loss_scale * d;
      if (fused_ce) loss += p.ce_weight * ((double(p.separate_ce ? shift_1 : shift_a) - double(z_label)) + log_sum_1);
      p.row_loss[row] = static_cast<acc_t>(loss);
    }
  }
};

template <typename scalar_t, typename acc_t, Divergence D, bool kStaged>
__global__ void __launch_bounds__(kMaxThreads) kd_loss_kernel(const Params<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ ReductionScratch scratch;
  int rank = 0, cluster_size = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  rank = static_cast<int>(cluster.block_rank());
  cluster_size = static_cast<int>(cluster.num_blocks());
#endif
  const int64_t row = p.row_offset + blockIdx.x / cluster_size;
  const int64_t col0 = int64_t(rank) * p.slice;
  const int len = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(p.slice, p.vocab - col0)));
  acc_t* staged = reinterpret_cast<acc_t*>(dynamic_smem);
  RowProgram<scalar_t, acc_t, D, kStaged> program{
      p, scratch, row, rank, cluster_size, col0,
      {p.student + row * p.student_stride + col0, p.teacher + row * p.teacher_stride + col0, staged,
       staged + p.slice, len},
      staged};
  program.run();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // no CTA may leave while a neighbour can still read its shared memory; every path through
  // run() is uniform over the cluster, so all CTAs arrive here
  if (cluster_size > 1) cluster.sync();
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side: launch geometry and dispatch.

struct Geometry {
  int cluster_size;
  int slice;    // columns per CTA
  int threads;
  bool staged;
  size_t smem;  // dynamic shared memory per CTA
};

int round_up(int64_t x, int64_t m) { return static_cast<int>((x + m - 1) / m * m); }

int threads_for(int slice) { return slice >= 4096 ? kMaxThreads : slice >= 1024 ? 256 : 128; }

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
  config.numAttrs = 1;
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

// Lets a kernel use clusters beyond the portable 8 CTAs; returns the largest cluster to try.
template <typename KernelFn>
int allow_large_clusters(KernelFn kernel) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
    return kMaxClusterCtas;
  }
  (void)cudaGetLastError();
  return 8;
}

// Picks the cluster size and staging for a row of `vocab` columns: the smallest cluster whose
// slices fit in half an SM's shared memory (else in all of it) and that the GPU can schedule;
// failing that, the largest schedulable cluster, unstaged.
template <typename scalar_t, typename acc_t, Divergence D>
Geometry plan(int64_t vocab, const cudaDeviceProp& prop) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  // dynamic shared memory: all a CTA may take, and what leaves room for a second CTA on the SM
  const size_t budget = prop.sharedMemPerBlockOptin - sizeof(ReductionScratch);
  const size_t half = std::min(budget, prop.sharedMemPerMultiprocessor / 2 - prop.reservedSharedMemPerBlock -
                                           sizeof(ReductionScratch));
  const size_t per_column = 2 * sizeof(acc_t);
  auto staged_kernel = kd_loss_kernel<scalar_t, acc_t, D, true>;
  auto streamed_kernel = kd_loss_kernel<scalar_t, acc_t, D, false>;
  // the attribute is the kernel's ceiling, not what a launch takes: set it once, to the most
  C10_CUDA_CHECK(cudaFuncSetAttribute(staged_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(budget)));
  int max_cluster = 1;
  if (prop.major >= 9) max_cluster = std::min(allow_large_clusters(staged_kernel), allow_large_clusters(streamed_kernel));
  for (const size_t limit : {half, budget}) {
    for (int c = 1; c <= max_cluster; c *= 2) {
      const int slice = round_up((vocab + c - 1) / c, kVec);
      const size_t smem = size_t(slice) * per_column;
      const Geometry g{c, slice, threads_for(slice), true, smem};
      if (smem <= limit && cluster_fits(staged_kernel, g)) return g;
    }
  }
  for (int c = max_cluster; c >= 1; c /= 2) {
    const int slice = round_up((vocab + c - 1) / c, kVec);
    const Geometry g{c, slice, threads_for(slice), false, 0};
    if (cluster_fits(streamed_kernel, g)) return g;
  }
  TORCH_CHECK(false, "kd_loss_cuda: no launch geometry fits this GPU");
}

template <typename scalar_t, typename acc_t, Divergence D>
void launch(const Params<scalar_t, acc_t>& base, int64_t n_rows, cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  const cudaDeviceProp& prop = *at::cuda::getDeviceProperties(device);
  // plans depend only on (device, vocab) per instantiation; planning queries the driver, so cache
  static std::mutex mutex;
  static std::vector<std::tuple<int, int64_t, Geometry>> plans;
  Geometry g{};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = std::find_if(plans.begin(), plans.end(),
                           [&](const auto& e) { return std::get<0>(e) == device && std::get<1>(e) == base.vocab; });
    if (it == plans.end()) {
      plans.emplace_back(device, base.vocab, plan<scalar_t, acc_t, D>(base.vocab, prop));
      it = std::prev(plans.end());
    }
    g = std::get<2>(*it);
  }
  Params<scalar_t, acc_t> p = base;
  p.slice = g.slice;
  constexpr int kVecBytes = 16;
  auto aligned = [&](const void* ptr, int64_t stride) {
    return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0 && (stride * int64_t(sizeof(scalar_t))) % kVecBytes == 0;
  };
  p.vectorized = aligned(p.student, p.student_stride) && aligned(p.teacher, p.teacher_stride);
  auto kernel = g.staged ? kd_loss_kernel<scalar_t, acc_t, D, true> : kd_loss_kernel<scalar_t, acc_t, D, false>;
  // gridDim.x is below 2^31: launch at most that many CTAs at a time
  const int64_t rows_per_launch = (int64_t(std::numeric_limits<int>::max()) / g.cluster_size);
  for (int64_t first = 0; first < n_rows; first += rows_per_launch) {
    p.row_offset = first;
    const int64_t rows = std::min(rows_per_launch, n_rows - first);
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t config = launch_config(dim3(static_cast<unsigned>(rows * g.cluster_size)), g, stream, &attr);
    if (prop.major < 9) config.numAttrs = 0;  // no clusters before Hopper (cluster_size is 1)
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  }
}

template <typename scalar_t, typename acc_t>
void dispatch_divergence(Divergence div, const Params<scalar_t, acc_t>& p, int64_t n_rows, cudaStream_t stream) {
  switch (div) {
    case Divergence::ForwardKL:
      return launch<scalar_t, acc_t, Divergence::ForwardKL>(p, n_rows, stream);
    case Divergence::ReverseKL:
      return launch<scalar_t, acc_t, Divergence::ReverseKL>(p, n_rows, stream);
    case Divergence::JSD:
      return launch<scalar_t, acc_t, Divergence::JSD>(p, n_rows, stream);
    case Divergence::SkewKL:
      return launch<scalar_t, acc_t, Divergence::SkewKL>(p, n_rows, stream);
    case Divergence::SkewRKL:
      return launch<scalar_t, acc_t, Divergence::SkewRKL>(p, n_rows, stream);
    case Divergence::TVD:
      return launch<scalar_t, acc_t, Divergence::TVD>(p, n_rows, stream);
  }
}

// Raises the first failing row's error (one device synchronization per call).
void raise_for_status(const at::Tensor& status, const std::optional<at::Tensor>& labels, int64_t vocab,
                      int64_t ignore_index) {
  if (status.numel() == 0 || status.max().item<int8_t>() == 0) return;
  const int64_t row = status.ne(0).nonzero().select(1, 0)[0].item<int64_t>();
  if (status[row].item<int8_t>() == kStatusAllNegInf) raise_all_neg_inf(row);
  raise_label_out_of_range(row, (*labels)[row].item<int64_t>(), vocab, ignore_index);
}

// Runs the kernels on inputs already checked (run_any_dtypes), student and teacher of one dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const char* op, const at::Tensor& student,
                                                   const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& normalizer, const KdLossOptions& opt,
                                                   bool inplace) {
  TORCH_CHECK_VALUE(student.is_cuda(), op, ": runs on CUDA tensors, got ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK_VALUE(v < std::numeric_limits<int>::max(), op, ": vocabulary sizes beyond 2^31 are not supported");
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
  if (n > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Params<scalar_t, acc_t> p{};
      p.student = student.data_ptr<scalar_t>();
      p.teacher = teacher.data_ptr<scalar_t>();
      p.student_stride = student.stride(0);
      p.teacher_stride = teacher.stride(0);
      if (opt.student_grad) {
        p.grad_student = inplace ? student.data_ptr<scalar_t>() : grad_s.data_ptr<scalar_t>();
        p.grad_student_stride = inplace ? student.stride(0) : v;
      }
      if (opt.teacher_grad) {
        p.grad_teacher = grad_t.data_ptr<scalar_t>();
        p.grad_teacher_stride = v;
      }
      p.labels = labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr;
      p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
      p.divisor = divisor.data_ptr<acc_t>();
      p.row_loss = row_loss.data_ptr<acc_t>();
      p.status = status.data_ptr<int8_t>();
      p.vocab = v;
      p.inv_temperature = static_cast<acc_t>(1.0 / opt.temperature);
      p.mix = static_cast<acc_t>(opt.mix);
      const LossScales<double> scales = loss_scales(opt.temperature, opt.t2_scale, opt.kd_weight);
      p.kd_loss_scale = scales.kd_loss;
      p.kd_grad_scale = scales.kd_grad;
      p.ce_weight = opt.ce_weight;
      p.ignore_index = opt.ignore_index;
      p.separate_ce = opt.ce_weight != 0.0 && opt.temperature != 1.0;
      dispatch_divergence(opt.divergence, p, n, stream);
    });
    raise_for_status(status, labels_c.defined() ? std::optional<at::Tensor>(labels_c) : std::nullopt, v,
                     opt.ignore_index);
  }
  at::Tensor loss = opt.reduction == Reduction::None ? row_loss : row_loss.sum().div(divisor);
  return {loss, grad_s, grad_t};
}

// The kernels read one dtype for both logits; a mixed pair (say a bf16 student and a float32
// teacher) is read as float32 copies and the gradients are converted back to each side's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_any_dtypes(const char* op, const at::Tensor& student,
                                                              const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& labels,
                                                              const std::optional<at::Tensor>& mask,
                                                              const std::optional<at::Tensor>& normalizer,
                                                              const KdLossOptions& opt, bool inplace) {
  check_inputs(op, student, teacher, labels, mask, normalizer, opt);
  if (student.scalar_type() == teacher.scalar_type()) return run(op, student, teacher, labels, mask, normalizer, opt, inplace);
  auto [loss, grad_s, grad_t] =
      run(op, student.to(at::kFloat), teacher.to(at::kFloat), labels, mask, normalizer, opt, false);
  if (grad_t.numel() > 0) grad_t = grad_t.to(teacher.scalar_type());
  if (grad_s.numel() > 0 && inplace) {
    student.copy_(grad_s);
    grad_s = at::empty({0}, student.options());
  } else if (grad_s.numel() > 0) {
    grad_s = grad_s.to(student.scalar_type());
  }
  return {loss, grad_s, grad_t};
}

KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cuda, run_any_dtypes, false)
KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cuda_inplace, run_any_dtypes, true)

}  // namespace
}  // namespace cuda
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CUDA, m) {
  m.impl("kd_loss_cuda", &kdcore::cuda::kd_loss_cuda);
  m.impl("kd_loss_cuda_inplace", &kdcore::cuda::kd_loss_cuda_inplace);
}
