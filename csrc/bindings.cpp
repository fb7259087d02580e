// Schemas of kdcore's native ops. The kernels register their implementations beside the code
// that computes them (csrc/cpu, csrc/cuda); Python adds fake (meta) implementations and autograd
// in kdcore/ops. The pure-PyTorch and Triton ops declare the same schema from Python.
#include <torch/library.h>

#include "kdcore/python_module.h"

// kd_loss_<backend>(...) -> (loss, grad_student, grad_teacher)
//   loss: [] for 'sum' / 'batchmean', [N] for 'none' (float32; float64 for float64 logits)
//   grad_*: dLoss/dlogits for a unit upstream gradient, or an empty tensor when not requested
// kd_loss_<backend>_inplace(...): the same, but the student gradient is written over the student
//   logits (which it destroys) and grad_student comes back empty.
#define KDCORE_KD_LOSS_ARGUMENTS                                                                    \
  "Tensor teacher, Tensor? labels, Tensor? mask, Tensor? normalizer, "                             \
  "float temperature, int divergence, float mix, bool t2_scale, float kd_weight, float ce_weight, " \
  "int ignore_index, int reduction, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)"
#define KDCORE_KD_LOSS_SIGNATURE "(Tensor student, " KDCORE_KD_LOSS_ARGUMENTS
#define KDCORE_KD_LOSS_INPLACE_SIGNATURE "(Tensor(a!) student, " KDCORE_KD_LOSS_ARGUMENTS

// The two [N, V] passes of the kd_loss_sparse family (kdcore/ops/kd_loss_sparse.py composes them):
//   sparse_row_stats_<device>: [N, 3] float64 log-sum-exps (whole row, outside the top-k, at T = 1)
//   sparse_fill_<device>: a new [N, V] gradient, every element from [N, 4] float64 per-row coefficients
#define KDCORE_SPARSE_ROW_STATS_SIGNATURE \
  "(Tensor student, Tensor indices, float inv_t, bool with_tail, bool with_t1) -> Tensor"
#define KDCORE_SPARSE_FILL_SIGNATURE \
  "(Tensor student, Tensor kept, Tensor? labels, Tensor coefficients, float inv_t) -> Tensor"

TORCH_LIBRARY(kdcore, m) {
  m.def("kd_loss_cpp" KDCORE_KD_LOSS_SIGNATURE);
  m.def("kd_loss_cpp_inplace" KDCORE_KD_LOSS_INPLACE_SIGNATURE);
  m.def("sparse_row_stats_cpp" KDCORE_SPARSE_ROW_STATS_SIGNATURE);
  m.def("sparse_fill_cpp" KDCORE_SPARSE_FILL_SIGNATURE);
#ifdef KDCORE_WITH_CUDA
  m.def("kd_loss_cuda" KDCORE_KD_LOSS_SIGNATURE);
  m.def("kd_loss_cuda_inplace" KDCORE_KD_LOSS_INPLACE_SIGNATURE);
  m.def("sparse_row_stats_cuda" KDCORE_SPARSE_ROW_STATS_SIGNATURE);
  m.def("sparse_fill_cuda" KDCORE_SPARSE_FILL_SIGNATURE);
  // grad *= factor unless factor == 1, decided on the device (kd_loss's backward, no host sync)
  m.def("scale_grad_unless_one_cuda(Tensor(a!) grad, Tensor factor) -> ()");
#endif
}

#ifdef KDCORE_WITH_CUDA
#define KDCORE_BUILT_WITH_CUDA 1
#else
#define KDCORE_BUILT_WITH_CUDA 0
#endif

KDCORE_PYTHON_MODULE("kdcore's compiled operators (schemas; CUDA kernels when built with CUDA)",
                     PyModule_AddIntConstant(module, "with_cuda", KDCORE_BUILT_WITH_CUDA);
                     PyModule_AddStringConstant(module, "kd_loss_signature", KDCORE_KD_LOSS_SIGNATURE);
                     PyModule_AddStringConstant(module, "kd_loss_inplace_signature", KDCORE_KD_LOSS_INPLACE_SIGNATURE))
