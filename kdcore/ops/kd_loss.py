"""The kd_loss op family: one schema, one fake (meta) implementation and one autograd formula,
shared by every backend's op (``kdcore::kd_loss_<backend>``).

Each op computes the loss *and* the gradients of the loss with respect to the logits in its
forward pass, for a unit upstream gradient; backward only scales them by the upstream gradient.
That is what lets a fused kernel read each logit once and write each gradient element once.
In eager mode, when the graph is not retained, backward hands that buffer to autograd as it is
(when the upstream gradient is exactly 1, the usual ``loss.backward()``) or scaled in place, so it
is the only ``[N, V]`` tensor; with ``retain_graph`` or under tracing it multiplies out of place.
"""

from __future__ import annotations

import torch

from kdcore.divergences import REDUCTION_NONE, REDUCTIONS

# Arguments, in order; the C++ twins are in csrc/bindings.cpp. The in-place variant
# (kd_loss_<backend>_inplace) writes the student gradient over the student logits and returns an
# empty grad_student; it has no autograd formula of its own (kdcore.functional wraps it).
_ARGUMENTS = (
    "Tensor teacher, Tensor? labels, Tensor? mask, Tensor? normalizer, "
    "float temperature, int divergence, float mix, bool t2_scale, float kd_weight, float ce_weight, "
    "int ignore_index, int reduction, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)"
)
KD_LOSS_SIGNATURE = "(Tensor student, " + _ARGUMENTS
KD_LOSS_INPLACE_SIGNATURE = "(Tensor(a!) student, " + _ARGUMENTS
_NUM_ARGS = 15
_STUDENT_GRAD, _TEACHER_GRAD, _REDUCTION = 13, 14, 12


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The loss is float32, or float64 for float64 logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def empty_outputs(student, teacher, reduction: int, student_grad: bool, teacher_grad: bool):
    """Allocates (loss, grad_student, grad_teacher) as every kd_loss op returns them."""
    n, v = student.shape
    loss = student.new_empty((n,) if reduction == REDUCTION_NONE else (), dtype=loss_dtype(student))
    grad_student = student.new_empty((n, v) if student_grad else (0,))
    grad_teacher = teacher.new_empty((n, v) if teacher_grad else (0,))
    return loss, grad_student, grad_teacher


def kept_rows(n: int, labels, mask, ignore_index: int, device) -> torch.Tensor:
    """[N] bool: labels != ignore_index and mask (each optional)."""
    kept = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        kept &= labels != ignore_index
    if mask is not None:
        kept &= mask
    return kept


def reduction_divisor(kept: torch.Tensor, normalizer, reduction: int, dtype: torch.dtype) -> torch.Tensor:
    """The 0-dim divisor of the summed row losses: the normalizer or the kept-row count (at least
    1) for batchmean, else 1. Stays on the device (no synchronization)."""
    if reduction != REDUCTIONS["batchmean"]:
        return torch.ones((), dtype=dtype, device=kept.device)
    if normalizer is not None:
        return normalizer.to(dtype)
    return kept.sum().to(dtype).clamp_min(1)


def kd_scales(temperature: float, t2_scale: bool, kd_weight: float) -> tuple[float, float]:
    """(factor of the summed divergence in the loss, factor of dd/da in the logits' gradient):
    kd_weight times T² (or 1), and the chain rule through a = z / T on top of that."""
    return (kd_weight * (temperature**2 if t2_scale else 1.0),
            kd_weight * (temperature if t2_scale else 1.0 / temperature))


def reduce_rows(loss: torch.Tensor, row_loss: torch.Tensor, divisor: torch.Tensor, reduction: int) -> None:
    """Writes the op's loss output: the row losses for reduction 'none', else their sum / divisor."""
    loss.copy_(row_loss if reduction == REDUCTION_NONE else row_loss.sum() / divisor)


def all_neg_inf_error(row: int) -> ValueError:
    return ValueError(f"kd_loss: row {row} of the logits is entirely -inf in the student or the teacher; every kept "
                      "row needs a finite logit (mark the row ignored with labels=ignore_index or mask=False)")


def label_out_of_range_error(index: int, label: int, vocab: int) -> ValueError:
    return ValueError(f"kd_loss: labels[{index}] = {label} is outside [0, {vocab})")


def _fake(student, teacher, labels, mask, normalizer, temperature, divergence, mix, t2_scale, kd_weight,
          ce_weight, ignore_index, reduction, student_grad, teacher_grad):
    return empty_outputs(student, teacher, reduction, student_grad, teacher_grad)


def _fake_inplace(student, teacher, labels, mask, normalizer, temperature, divergence, mix, t2_scale, kd_weight,
                  ce_weight, ignore_index, reduction, student_grad, teacher_grad):
    return empty_outputs(student, teacher, reduction, False, teacher_grad)


def _setup_context(ctx, inputs, output):
    _, grad_student, grad_teacher = output
    ctx.mark_non_differentiable(grad_student, grad_teacher)
    # The gradient outputs never receive gradients; without this autograd would allocate and
    # zero-fill [N, V] tensors standing for them before every backward.
    ctx.set_materialize_grads(False)
    # Held as plain attributes, not saved tensors: backward hands them to autograd and drops its
    # own reference when the graph is not retained, so a leaf's .grad takes the buffer as it is.
    ctx.grads = (grad_student, grad_teacher)
    ctx.has_grad = (inputs[_STUDENT_GRAD], inputs[_TEACHER_GRAD])
    ctx.rowwise = inputs[_REDUCTION] == REDUCTION_NONE


def _graph_is_retained() -> bool:
    """Whether this backward runs with retain_graph (then the stash must stay untouched)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _is_eager(t: torch.Tensor) -> bool:
    """A real tensor outside any tracing (Dynamo, AOTAutograd and make_fx trace with tensor
    subclasses), where looking at values and writing in place are safe."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _scaled(grad: torch.Tensor, upstream: torch.Tensor, rowwise: bool, in_place: bool) -> torch.Tensor:
    """grad * upstream (0-dim, or [N] for reduction='none').

    In place with a scalar upstream gradient -- the usual ``loss.backward()`` -- a factor of
    exactly 1 leaves the gradient untouched: checked on the host for CPU tensors, and on the
    device for CUDA tensors (no synchronization, and no pass over the gradient when it is 1)."""
    if in_place and not rowwise:
        if upstream.device.type == "cpu":
            if upstream.item() == 1.0:
                return grad
        elif _scale_unless_one_on_device(grad, upstream):
            return grad
    factor = upstream.unsqueeze(1) if rowwise else upstream
    return grad.mul_(factor) if in_place else grad * factor


_SCALE_ON_DEVICE = "kdcore::scale_grad_unless_one_cuda"


def _has_cuda_kernel(qualname: str) -> bool:
    """Whether the op exists (kdcore built with CUDA) and has a CUDA kernel."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    except RuntimeError:  # no such operator
        return False


def _scale_unless_one_on_device(grad: torch.Tensor, upstream: torch.Tensor) -> bool:
    """grad *= upstream unless upstream == 1, decided by a CUDA kernel; False (and nothing done)
    where kdcore was built without CUDA kernels or the tensors do not suit it."""
    if not (grad.is_cuda and grad.is_contiguous() and upstream.numel() == 1
            and upstream.dtype in (torch.float32, torch.float64) and upstream.device == grad.device):
        return False
    if not _has_cuda_kernel(_SCALE_ON_DEVICE):
        return False
    torch.ops.kdcore.scale_grad_unless_one_cuda(grad, upstream)
    return True


def hand_out_grads(ctx, grad_loss: torch.Tensor, wanted: tuple[bool, ...]) -> tuple:
    """The gradients a forward pass stashed in ``ctx.grads`` times the upstream gradient (per row
    when ``ctx.rowwise``), None where ``wanted`` is False. In place, with the stash dropped so that
    autograd receives the buffers themselves, only when nothing can read the stash again: eager,
    and the graph not retained."""
    in_place = _is_eager(grad_loss) and not _graph_is_retained()
    grads = ctx.grads
    if in_place:
        ctx.grads = None
    return tuple(_scaled(grad, grad_loss, ctx.rowwise, in_place) if want else None
                 for grad, want in zip(grads, wanted))


def _backward(ctx, grad_loss, _grad_of_grad_student, _grad_of_grad_teacher):
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return (None,) * _NUM_ARGS
    wanted = (ctx.needs_input_grad[0] and ctx.has_grad[0], ctx.needs_input_grad[1] and ctx.has_grad[1])
    return hand_out_grads(ctx, grad_loss, wanted) + (None,) * (_NUM_ARGS - 2)


def register_kd_loss_op(qualname: str) -> None:
    """Gives a kd_loss op (already defined with KD_LOSS_SIGNATURE) its fake and autograd."""
    torch.library.register_fake(qualname, _fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


def define_kd_loss_ops(qualname: str, impl) -> tuple[str, str]:
    """Defines a Python backend's op ``qualname`` and its in-place twin ``qualname + "_inplace"``,
    both running ``impl(*op_arguments, inplace=...)``; returns the two qualified names."""

    def out_of_place(*args):
        return impl(*args, inplace=False)

    def in_place(*args):
        return impl(*args, inplace=True)

    inplace_qualname = qualname + "_inplace"
    torch.library.custom_op(qualname, out_of_place, mutates_args=(), schema=KD_LOSS_SIGNATURE)
    torch.library.custom_op(inplace_qualname, in_place, mutates_args=("student",), schema=KD_LOSS_INPLACE_SIGNATURE)
    return qualname, inplace_qualname


def register_kd_loss_inplace_op(qualname: str) -> None:
    """Gives an in-place kd_loss op (defined with KD_LOSS_INPLACE_SIGNATURE) its fake."""
    torch.library.register_fake(qualname, _fake_inplace)


class InplaceKdLoss(torch.autograd.Function):
    """Autograd of the in-place ops (``kd_loss(..., inplace_grad=True)``): forward runs
    ``kd_loss_<backend>_inplace``, which leaves dLoss/dstudent in the student logits' buffer, and
    backward hands that buffer out (scaled in place by the upstream gradient), so no ``[N, V]``
    tensor is allocated at all.

    The student logits' version counter is bumped, so autograd refuses a backward through any
    other operation that saved them (it would read gradients instead of logits). Backward can run
    only once: the buffer is the gradient it returned.
    """

    @staticmethod
    def forward(ctx, op, student, teacher, labels, mask, normalizer, temperature, divergence, mix, t2_scale,
                kd_weight, ce_weight, ignore_index, reduction, teacher_grad):
        loss, _, grad_teacher = op(student, teacher, labels, mask, normalizer, temperature, divergence, mix,
                                   t2_scale, kd_weight, ce_weight, ignore_index, reduction, True, teacher_grad)
        torch.autograd.graph.increment_version(student)
        ctx.set_materialize_grads(False)
        ctx.grads = (student.detach(), grad_teacher if teacher_grad else None)  # the buffer, outside the graph
        ctx.rowwise = reduction == REDUCTION_NONE
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        nothing = (None,) * 12  # labels ... teacher_grad
        if grad_loss is None:
            return (None, None, None) + nothing
        if ctx.grads is None:
            raise RuntimeError("kd_loss(inplace_grad=True): backward can run only once; the student gradient lives in "
                               "the student logits' buffer and the first backward already handed it out")
        grad_student, grad_teacher = ctx.grads
        ctx.grads = None
        out_teacher = _scaled(grad_teacher, grad_loss, ctx.rowwise, True) if grad_teacher is not None else None
        return (None, _scaled(grad_student, grad_loss, ctx.rowwise, True), out_teacher) + nothing  # op first
