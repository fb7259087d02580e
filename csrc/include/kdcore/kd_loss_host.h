// Host-side pieces shared by the CPU and CUDA implementations of the kd_loss ops: the options
// record, the input checks every op re-does (the Python API has already given the user a
// friendlier message; these guard direct op calls), and the loss normalizer.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "kdcore/divergence.h"

namespace kdcore {

struct KdLossOptions {
  Divergence divergence;
  double temperature;
  double mix;  // beta (jsd) or alpha (skew_kl, skew_rkl)
  bool t2_scale;
  double kd_weight;
  double ce_weight;
  int64_t ignore_index;
  Reduction reduction;
  bool student_grad;
  bool teacher_grad;
};

inline KdLossOptions make_options(int64_t divergence, double temperature, double mix, bool t2_scale,
                                  double kd_weight, double ce_weight, int64_t ignore_index,
                                  int64_t reduction, bool student_grad, bool teacher_grad) {
  TORCH_CHECK_VALUE(divergence >= 0 && divergence < kNumDivergences, "kd_loss: unknown divergence code ",
                    divergence);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "kd_loss: unknown reduction code ", reduction);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "kd_loss: temperature must be > 0, got ",
                    temperature);
  return {static_cast<Divergence>(divergence), temperature, mix, t2_scale, kd_weight, ce_weight,
          ignore_index, static_cast<Reduction>(reduction), student_grad, teacher_grad};
}

inline bool is_supported_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Checks what the kernels rely on: 2-D [N, V] logits with unit column stride, one device,
// matching shapes, [N] labels (int64) and mask (bool).
inline void check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& normalizer, const KdLossOptions& o) {
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2, op, ": expected 2-D [N, V] logits, got student ",
                    student.sizes(), " and teacher ", teacher.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(), " and teacher ",
                    teacher.sizes(), " differ in shape");
  TORCH_CHECK_VALUE(student.size(1) >= 1, op, ": vocabulary size must be at least 1");
  TORCH_CHECK_VALUE(student.device() == teacher.device(), op, ": student is on ", student.device(),
                    " but teacher is on ", teacher.device());
  TORCH_CHECK_VALUE(is_supported_logit_dtype(student.scalar_type()) && is_supported_logit_dtype(teacher.scalar_type()),
                    op, ": logits must be float32, bfloat16, float16 or float64, got ", student.scalar_type(),
                    " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble), op,
                    ": float64 logits must be paired with float64 logits, got ", student.scalar_type(), " and ",
                    teacher.scalar_type());
  TORCH_CHECK_VALUE(student.numel() == 0 || student.size(1) == 1 || (student.stride(1) == 1 && teacher.stride(1) == 1), op,
                    ": logits must have unit stride along the vocabulary");
  const int64_t n = student.size(0);
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == n && labels->scalar_type() == at::kLong, op,
                      ": labels must be int64 of shape [", n, "], got ", labels->scalar_type(), " ", labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student.device(), op, ": labels are on ", labels->device(),
                      " but logits are on ", student.device());
  }
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == n && mask->scalar_type() == at::kBool, op,
                      ": mask must be bool of shape [", n, "], got ", mask->scalar_type(), " ", mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == student.device(), op, ": mask is on ", mask->device(),
                      " but logits are on ", student.device());
  }
  if (normalizer.has_value()) {
    TORCH_CHECK_VALUE(normalizer->dim() == 0 && normalizer->device() == student.device(), op,
                      ": normalizer must be a 0-dim tensor on ", student.device());
    TORCH_CHECK_VALUE(o.reduction == Reduction::BatchMean, op, ": normalizer applies to reduction 'batchmean' only");
  }
  TORCH_CHECK_VALUE(o.ce_weight == 0.0 || labels.has_value(), op, ": ce_weight > 0 needs labels");
}

// Rows that take part in the loss: label != ignore_index and mask set. Returns an undefined
// tensor when every row is kept.
inline at::Tensor kept_rows(const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
                            int64_t ignore_index) {
  at::Tensor kept;
  if (labels.has_value()) kept = labels->ne(ignore_index);
  if (mask.has_value()) kept = kept.defined() ? kept.logical_and(*mask) : *mask;
  return kept;
}

// The divisor of the summed loss, as a 0-dim float tensor on the logits' device: the
// normalizer if given, else the number of kept rows (at least 1) for 'batchmean', else 1.
inline at::Tensor loss_divisor(const at::Tensor& kept, int64_t n_rows, const std::optional<at::Tensor>& normalizer,
                               Reduction reduction, const at::TensorOptions& opts) {
  if (reduction != Reduction::BatchMean) return at::ones({}, opts);
  if (normalizer.has_value()) return normalizer->to(opts);
  if (!kept.defined()) return at::full({}, static_cast<double>(std::max<int64_t>(n_rows, 1)), opts);
  return kept.sum().to(opts).clamp_min(1);
}

inline at::ScalarType loss_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The errors a kernel finds in a row (the Python backends raise the same messages).
[[noreturn]] inline void raise_all_neg_inf(int64_t row) {
  TORCH_CHECK_VALUE(false, "kd_loss: row ", row,
                    " of the logits is entirely -inf in the student or the teacher; every kept row needs a "
                    "finite logit (mark the row ignored with labels=ignore_index or mask=False)");
  std::abort();  // unreachable: TORCH_CHECK_VALUE(false, ...) throws
}

[[noreturn]] inline void raise_label_out_of_range(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "kd_loss: labels[", row, "] = ", label, " is outside [0, ", vocab,
                    ") and is not ignore_index (", ignore_index, ")");
  std::abort();
}

// Defines the op function `name` with the C++ signature of the kd_loss schema, forwarding to
//   run(const char* op, student, teacher, labels, mask, normalizer, const KdLossOptions&, bool inplace)
// -- one definition for each op and its in-place twin, on every device.
#define KDCORE_DEFINE_KD_LOSS_OP(name, run, inplace)                                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> name(                                                                 \
      const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,                   \
      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& normalizer, double temperature,          \
      int64_t divergence, double mix, bool t2_scale, double kd_weight, double ce_weight, int64_t ignore_index,         \
      int64_t reduction, bool student_grad, bool teacher_grad) {                                                       \
    const KdLossOptions opt = make_options(divergence, temperature, mix, t2_scale, kd_weight, ce_weight, ignore_index, \
                                           reduction, student_grad, teacher_grad);                                     \
    return run(#name, student, teacher, labels, mask, normalizer, opt, inplace);                                      \
  }

}  // namespace kdcore
