// CUDA kernels of the kd_loss_sparse op family: its two passes over [N, V] student logits
// (kdcore/ops/kd_loss_sparse.py holds the bucket math between them). One thread block per row.
//
//   sparse_row_stats_cuda  the log-sum-exps of a = z * inv_t over the row and over the entries
//                          outside the teacher's top-k, and of z (temperature 1), in one sweep:
//                          each thread keeps online (maximum, sums) that the block then merges.
//                          The top-k are marked in a shared-memory bitmap of the vocabulary
//                          (V / 8 bytes), so the two sums are kept apart and the tail is exact.
//   sparse_fill_cuda       a new gradient tensor, every element from four per-row coefficients:
//                          kd_coef * exp(a - kd_shift) + ce_coef * (exp(z - ce_shift) - [j == label]);
//                          the exponents are <= 0 except at the top-k entries, which the op
//                          overwrites afterwards (clamped at 0 so those never overflow).
//
// Each logit is read from HBM once per pass and each gradient element written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace kdcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// A running log-sum-exp with two sums (all columns, columns outside the top-k) sharing one shift.
struct Lse {
  double max, all, outside;
};

__device__ __forceinline__ Lse lse_empty() { return {-INFINITY, 0.0, 0.0}; }

__device__ __forceinline__ Lse lse_merge(Lse x, const Lse& y) {
  if (y.max > x.max) {
    const double r = x.max == -INFINITY ? 0.0 : exp(x.max - y.max);
    return {y.max, x.all * r + y.all, x.outside * r + y.outside};
  }
  const double r = y.max == -INFINITY ? 0.0 : exp(y.max - x.max);
  return {x.max, x.all + y.all * r, x.outside + y.outside * r};
}

// A thread's running sums in the accumulation type (a few hundred terms each), merged in double.
template <typename acc_t>
struct LocalLse {
  acc_t max = -INFINITY, all = 0, outside = 0;

  // Adds exp(x) (to `outside` too when `out`); -inf adds nothing.
  __device__ __forceinline__ void add(acc_t x, bool out) {
    if (x == -INFINITY) return;
    if (x > max) {
      const acc_t r = max == -INFINITY ? acc_t(0) : exp(max - x);
      all *= r;
      outside *= r;
      max = x;
    }
    const acc_t e = exp(x - max);
    all += e;
    if (out) outside += e;
  }
  __device__ __forceinline__ Lse widened() const { return {double(max), double(all), double(outside)}; }
};

__device__ Lse block_merge(Lse s, Lse* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Lse other{__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.all, offset),
              __shfl_down_sync(0xffffffffu, s.outside, offset)};
    s = lse_merge(s, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < blockDim.x / 32 ? shared[lane] : lse_empty();
    for (int offset = 16; offset > 0; offset /= 2) {
      Lse other{__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.all, offset),
                __shfl_down_sync(0xffffffffu, s.outside, offset)};
      s = lse_merge(s, other);
    }
    if (lane == 0) shared[0] = s;
  }
  __syncthreads();
  const Lse out = shared[0];
  __syncthreads();
  return out;
}

__device__ __forceinline__ double lse_value(double max, double sum) {
  return max == -INFINITY ? -INFINITY : max + log(sum);
}

template <typename scalar_t, typename acc_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ student, int64_t s_stride, int64_t vocab,
                                 const int64_t* __restrict__ indices, int64_t k, acc_t inv_t, bool with_tail,
                                 bool separate_t1, bool with_t1, double* __restrict__ out) {
  extern __shared__ unsigned int member[];  // bitmap of the row's top-k, (V + 31) / 32 words
  __shared__ Lse partials[kThreads / 32];
  __shared__ int bad;
  const int64_t row = blockIdx.x;
  const int64_t words = (vocab + 31) / 32;
  if (threadIdx.x == 0) bad = 0;
  if (with_tail) {
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) member[w] = 0u;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const int64_t id = indices[row * k + i];
      if (id >= 0 && id < vocab) atomicOr(&member[id / 32], 1u << (id % 32));
    }
  }
  __syncthreads();
  LocalLse<acc_t> a_local, z_local;
  int local_bad = 0;
  const scalar_t* z_row = student + row * s_stride;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const acc_t z = static_cast<acc_t>(z_row[j]);
    local_bad |= (z != z) || (z == INFINITY);
    const bool out_of_top_k = !with_tail || !((member[j / 32] >> (j % 32)) & 1u);
    a_local.add(z * inv_t, out_of_top_k);
    if (separate_t1) z_local.add(z, false);
  }
  if (local_bad) atomicOr(&bad, 1);
  const Lse a = block_merge(a_local.widened(), partials);
  const Lse z1 = separate_t1 ? block_merge(z_local.widened(), partials) : lse_empty();
  if (threadIdx.x == 0) {
    double* o = out + row * 3;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    o[0] = bad ? nan : lse_value(a.max, a.all);
    o[1] = bad ? nan : with_tail ? lse_value(a.max, a.outside) : 0.0;
    o[2] = bad ? nan : !with_t1 ? 0.0 : separate_t1 ? lse_value(z1.max, z1.all) : o[0];
  }
}

void check_rows(const char* op, const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": expected [N, V] student logits, got ", student.sizes());
  TORCH_CHECK_VALUE(student.is_cuda(), op, ": runs on CUDA tensors, got ", student.device());
  TORCH_CHECK_VALUE(student.size(1) <= 1 || student.stride(1) == 1, op,
                    ": student logits must have unit stride along the vocabulary");
}

at::Tensor sparse_row_stats_cuda(const at::Tensor& student, const at::Tensor& indices, double inv_t, bool with_tail,
                                 bool with_t1) {
  constexpr const char* op = "sparse_row_stats_cuda";
  check_rows(op, student);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.scalar_type() == at::kLong &&
                        indices.is_contiguous() && indices.device() == student.device(),
                    op, ": indices must be contiguous int64 [N, k] beside the student");
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({student.size(0), 3}, student.options().dtype(at::kDouble));
  const int64_t n = student.size(0), v = student.size(1), k = indices.size(1);
  if (n == 0) return out;
  const size_t bitmap = with_tail ? size_t((v + 31) / 32) * sizeof(unsigned int) : 0;
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, student.get_device()));
  TORCH_CHECK_VALUE(bitmap + 1024 <= size_t(max_shared), op, ": a vocabulary of ", v,
                    " needs a top-k bitmap of ", bitmap, " bytes, more than this GPU's shared memory per block");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = row_stats_kernel<scalar_t, acc_t>;
    if (bitmap > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bitmap)));
    }
    const acc_t inv = static_cast<acc_t>(inv_t);
    kernel<<<n, kThreads, bitmap, stream>>>(student.data_ptr<scalar_t>(), student.stride(0), v,
                                            indices.data_ptr<int64_t>(), k, inv, with_tail,
                                            with_t1 && inv != acc_t(1), with_t1, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// c * exp(min(x - shift, 0)) with the double shift split into hi + lo in acc_t; inactive when c = 0 or
// the shift is +inf (the term is exactly 0 then).
template <typename acc_t>
struct ExpTerm {
  bool active;
  acc_t coef, hi, lo;
  __device__ ExpTerm(double c, double shift) {
    active = c != 0 && shift != INFINITY;
    coef = static_cast<acc_t>(c);
    hi = static_cast<acc_t>(shift);
    lo = isfinite(shift) ? static_cast<acc_t>(shift - double(hi)) : acc_t(0);
  }
  __device__ __forceinline__ acc_t operator()(acc_t x) const {
    return active ? coef * exp(min((x - hi) - lo, acc_t(0))) : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t>
__global__ void fill_kernel(const scalar_t* __restrict__ student, int64_t s_stride, scalar_t* __restrict__ grad,
                            int64_t g_stride, int64_t vocab, const bool* __restrict__ kept,
                            const int64_t* __restrict__ labels, const double* __restrict__ coefficients, acc_t inv_t) {
  const int64_t row = blockIdx.x;
  const double* c = coefficients + row * 4;
  const bool poisoned = isnan(c[0]) || isnan(c[1]) || isnan(c[2]) || isnan(c[3]);
  const ExpTerm<acc_t> kd(c[1], c[0]), ce(c[3], c[2]);
  const int64_t label = labels != nullptr ? labels[row] : -1;
  const bool keep = kept[row];
  const scalar_t* z_row = student + row * s_stride;
  scalar_t* g_row = grad + row * g_stride;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    acc_t g = 0;
    if (!keep) {
      g = 0;
    } else if (poisoned) {
      g = std::numeric_limits<acc_t>::quiet_NaN();
    } else {
      const acc_t z = static_cast<acc_t>(z_row[j]);
      g = kd(z * inv_t) + ce(z);
      if (ce.active && j == label) g -= ce.coef;
    }
    g_row[j] = static_cast<scalar_t>(g);
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
    fill_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        student.data_ptr<scalar_t>(), student.stride(0), grad.data_ptr<scalar_t>(), grad.stride(0), v,
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
