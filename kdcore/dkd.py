"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022)
on the fused :func:`kdcore.kd_loss` kernels.

With ``a = student_logits / T``, ``b = teacher_logits / T``, ``q = softmax(a)``, ``p = softmax(b)``
and ``y`` the row's label, the classical KD loss splits as ``KL(p ‖ q) = TCKD + (1 − p_y) · NCKD``:

* TCKD (target-class knowledge): ``KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y])``, between the binary
  distributions "the label / any other class";
* NCKD (non-target-class knowledge): ``KL(p̂ ‖ q̂)`` with ``p̂ = softmax(b_{j≠y})`` and
  ``q̂ = softmax(a_{j≠y})``, the distributions among the other classes.

DKD weights the two freely, ``alpha · TCKD + beta · NCKD``, each times ``T²`` as in the authors'
code (megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``, ``dkd_loss``).

Both terms are forward-KL :func:`kdcore.kd_loss` calls, so they run on the fused kernels:

* NCKD is ``kd_loss`` of both logits with the label's column set to ``-inf`` (a masked vocabulary
  entry: probability exactly 0, gradient exactly 0). The authors subtract 1000 from it after the
  division by T instead, which is the same unless ``z_y / T`` leads the other classes by hundreds.
* TCKD is ``kd_loss`` of two-column logits ``[a_y, logsumexp_{j≠y} a_j]`` per side, whose softmax is
  ``[p_y, 1 − p_y]`` exactly. The log-sum-exp of the non-target logits gives ``log(1 − p_y)``
  without forming ``1 − p_y`` (which cancels to 0 for a confident teacher); these two columns are
  computed in float32 (float64 for float64 logits), like everything the kernels compute.
"""

from __future__ import annotations

import torch

from kdcore import _checks
from kdcore.functional import kd_loss, logits_as_rows, loss_options, row_arguments
from kdcore.ops.kd_loss import kept_rows, loss_dtype
from kdcore.ops.status import check_status


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    t2_scale: bool = True,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decoupled KD loss ``alpha · T² · TCKD + beta · T² · NCKD`` between logits ``[..., V]``
    (see the module docstring), split at ``labels [...]``, the target class of each row.

    The defaults are the authors' (alpha 1, beta 8, T = 4: their CIFAR-100 setting). ``t2_scale``
    False drops the ``T²``. Rows are dropped where ``labels == ignore_index`` or ``mask`` is False;
    ``reduction`` and ``normalizer`` mean what they mean in :func:`kdcore.kd_loss` (``"batchmean"``
    divides by the kept rows, the authors' mean over the batch; ``"sum"``; ``"none"``: one value per
    row), and with no kept row the loss and gradients are 0. The classes need ``V >= 2``; a kept
    label outside ``[0, V)`` raises. Gradients flow to the student, and to the teacher when it
    requires grad. The loss is float32 (float64 for float64 logits). ``backend`` selects the
    kd_loss kernels.
    """
    fn = "dkd_loss"
    alpha = _checks.non_negative(fn, "alpha", alpha)
    beta = _checks.non_negative(fn, "beta", beta)
    options = loss_options(fn, divergence="forward_kl", temperature=temperature, beta=0.5, alpha=0.1,
                           t2_scale=t2_scale, kd_weight=1.0, ce_weight=0.0, ignore_index=ignore_index,
                           reduction=reduction)
    student_logits = _checks.tensor(fn, "student_logits", student_logits)
    teacher_logits = _checks.tensor(fn, "teacher_logits", teacher_logits)
    if student_logits.dim() and teacher_logits.dim() and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"{fn}: student_logits has {student_logits.shape[-1]} classes but teacher_logits has "
                         f"{teacher_logits.shape[-1]}; the decoupled terms split both at the same label, so they "
                         "need the same classes")
    student, teacher, leading = logits_as_rows(fn, student_logits, teacher_logits, None)
    n, v = student.shape
    if v < 2:
        raise ValueError(f"{fn}: the logits need at least 2 classes (the target and another), got {v}")
    labels = _checks.tensor(fn, "labels", labels)
    labels, mask, normalizer = row_arguments(fn, student, leading, labels, mask, normalizer, options)
    kept = kept_rows(n, labels, mask, options.ignore_index, student.device)
    in_range = (labels >= 0) & (labels < v)
    bad = kept & ~in_range
    check_status(bad.to(torch.int8), lambda row, _: _raise_label_error(fn, row, int(labels[row]), v))
    target = torch.where(in_range, labels, 0).unsqueeze(1)  # dropped rows: any column
    is_target = torch.zeros_like(student, dtype=torch.bool).scatter_(1, target, True)
    common = dict(labels=labels, ignore_index=options.ignore_index, mask=mask, reduction=reduction,
                  normalizer=normalizer, backend=backend)

    non_target_student = student.masked_fill(is_target, -torch.inf)
    non_target_teacher = teacher.masked_fill(is_target, -torch.inf)
    nckd = kd_loss(non_target_student, non_target_teacher, temperature=options.temperature,
                   t2_scale=options.t2_scale, kd_weight=beta, **common)

    dtype = loss_dtype(student)
    binary_student = _binary_logits(student, non_target_student, target, kept, options.temperature, dtype)
    binary_teacher = _binary_logits(teacher, non_target_teacher, target, kept, options.temperature, dtype)
    # Under CUDA-graph capture check_status reads nothing back: a kept row with a label outside the
    # classes then gets a NaN loss and gradient instead of an error.
    binary_student = torch.where(bad.unsqueeze(1), torch.nan, binary_student)
    scale = options.temperature**2 if options.t2_scale else 1.0
    tckd = kd_loss(binary_student, binary_teacher, temperature=1.0, t2_scale=False, kd_weight=alpha * scale,
                   **common)
    loss = tckd + nckd
    return loss.reshape(leading) if reduction == "none" else loss


def _binary_logits(logits: torch.Tensor, non_target: torch.Tensor, target: torch.Tensor, kept: torch.Tensor,
                   temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``[N, 2]`` logits ``[z_y / T, logsumexp_{j≠y}(z_j / T)]``, whose softmax is
    ``[P(y), 1 − P(y)]`` under ``softmax(z / T)``. Dropped rows are zeroed before the log-sum-exp:
    their values may be anything (all ``-inf``, NaN), and its backward would turn the zero gradient
    kd_loss gives them into NaN."""
    scaled = (non_target.to(dtype) / temperature).masked_fill_(~kept.unsqueeze(1), 0.0)
    return torch.cat([logits.gather(1, target).to(dtype) / temperature,
                      torch.logsumexp(scaled, dim=1, keepdim=True)], dim=1)


def _raise_label_error(fn: str, row: int, label: int, vocab: int):
    raise ValueError(f"{fn}: labels[{row}] = {label} is outside [0, {vocab}) (the classes of the logits)")
