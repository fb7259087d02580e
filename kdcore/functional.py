"""The functional API: argument validation, flattening to rows, and dispatch to a backend op."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from kdcore import _checks
from kdcore._compile import constant_result
from kdcore import plugins
from kdcore.divergences import DIVERGENCES, REDUCTIONS, REDUCTION_NONE
from kdcore.ops import gpu_choice
from kdcore.ops.fused_linear import (
    FusedLinearKdLoss,
    default_chunk_size,
    dense_teacher_chunks,
    sparse_teacher_chunks,
)
from kdcore.ops.kd_loss import InplaceKdLoss, loss_dtype
from kdcore.ops.kd_loss_sparse import SPARSE_MODES
from kdcore.sparse import SparseTeacher


@dataclass(frozen=True)
class LossOptions:
    """Validated scalar options of the divergence family, as the ops take them."""

    divergence: int
    mix: float
    temperature: float
    t2_scale: bool
    kd_weight: float
    ce_weight: float
    ignore_index: int
    reduction: int

    def scalars(self) -> tuple:
        """The options in the order the kd_loss ops take them (after ``normalizer``)."""
        return (self.temperature, self.divergence, self.mix, self.t2_scale, self.kd_weight, self.ce_weight,
                self.ignore_index, self.reduction)


def loss_options(fn: str, *, divergence: str, temperature, beta, alpha, t2_scale, kd_weight, ce_weight,
                 ignore_index, reduction: str) -> LossOptions:
    """Checks the scalar options of kd_loss (and of everything built on it)."""
    spec = DIVERGENCES[_checks.choice(fn, "divergence", divergence, DIVERGENCES)]
    mix = 0.0
    if spec.mix_param is not None:
        value = beta if spec.mix_param == "beta" else alpha
        mix = _checks.in_interval(fn, spec.mix_param, value, 0.0, 1.0, low_open=spec.mix_open_low, high_open=True)
    return LossOptions(
        divergence=spec.code,
        mix=mix,
        temperature=_checks.positive(fn, "temperature", temperature),
        t2_scale=_checks.boolean(fn, "t2_scale", t2_scale),
        kd_weight=_checks.non_negative(fn, "kd_weight", kd_weight),
        ce_weight=_checks.non_negative(fn, "ce_weight", ce_weight),
        ignore_index=_checks.integer(fn, "ignore_index", ignore_index),
        reduction=REDUCTIONS[_checks.choice(fn, "reduction", reduction, REDUCTIONS)],
    )


def _as_rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., V'] -> [N, vocab] with unit stride along the vocabulary (a view whenever possible)."""
    rows = x.reshape(-1, x.shape[-1])
    if vocab != rows.shape[1]:
        rows = rows[:, :vocab]
    if vocab > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def shared_vocab(fn: str, student: tuple[str, int], teacher: tuple[str, int], vocab_size) -> int:
    """The compared vocabulary size: the common size when the student's and teacher's (each a
    ``(name, size)``) are equal, else ``vocab_size``, which must then be given."""
    (student_name, v_student), (teacher_name, v_teacher) = student, teacher
    if vocab_size is None:
        if v_student != v_teacher:
            raise ValueError(
                f"{fn}: {teacher_name} has vocabulary size {v_teacher} but {student_name} has {v_student}; "
                f"pass vocab_size={min(v_student, v_teacher)} to compare the shared part (the extra columns "
                "are treated as -inf)")
        return v_student
    vocab = _checks.integer(fn, "vocab_size", vocab_size)
    if not 1 <= vocab <= min(v_student, v_teacher):
        raise ValueError(f"{fn}: vocab_size must lie in [1, {min(v_student, v_teacher)}] (the smaller "
                         f"vocabulary), got {vocab}")
    return vocab


def logits_as_rows(fn: str, student_logits, teacher_logits, vocab_size):
    """Validates a student/teacher logits pair; returns both as [N, V] rows and the leading shape."""
    student = _checks.logits(fn, "student_logits", student_logits)
    teacher = _checks.logits(fn, "teacher_logits", teacher_logits)
    _checks.same_device(fn, "student_logits", student, teacher_logits=teacher)
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError(f"{fn}: float64 logits must be paired with float64 logits, got student_logits "
                        f"{student.dtype} and teacher_logits {teacher.dtype}")
    leading = student.shape[:-1]
    if teacher.shape[:-1] != leading:
        raise ValueError(f"{fn}: student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same leading dimensions")
    vocab = shared_vocab(fn, ("student_logits", student.shape[-1]), ("teacher_logits", teacher.shape[-1]), vocab_size)
    return _as_rows(student, vocab), _as_rows(teacher, vocab), leading


def row_arguments(fn: str, rows: torch.Tensor, leading: torch.Size, labels, mask, normalizer, options: LossOptions):
    """Validates labels, mask and normalizer against [N, V] rows; returns them as the ops take them."""
    if labels is not None:
        labels = _checks.row_tensor(fn, "labels", labels, leading, kind="int")
    if mask is not None:
        mask = _checks.row_tensor(fn, "mask", mask, leading, kind="bool")
    _checks.same_device(fn, "the logits", rows, labels=labels, mask=mask)
    if options.ce_weight > 0 and labels is None:
        raise ValueError(f"{fn}: ce_weight={options.ce_weight} adds a cross-entropy term, which needs labels")
    if normalizer is not None:
        if options.reduction != REDUCTIONS["batchmean"]:
            raise ValueError(f"{fn}: normalizer replaces the kept-row count of reduction='batchmean'; it has "
                             f"no meaning for reduction={_reduction_name(options.reduction)!r}")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"{fn}: normalizer must be a number or a one-element tensor, got shape "
                                 f"{tuple(normalizer.shape)}")
            if normalizer.device != rows.device and normalizer.device.type == "cpu":
                # a host value, filled on the device (a kernel launch, which a CUDA graph can
                # capture) rather than copied there (a blocking host-to-device copy)
                normalizer = torch.full((), normalizer.item(), dtype=loss_dtype(rows), device=rows.device)
            else:
                normalizer = normalizer.reshape(()).to(device=rows.device, dtype=loss_dtype(rows))
        else:
            normalizer = torch.full((), _checks.positive(fn, "normalizer", normalizer), dtype=loss_dtype(rows),
                                    device=rows.device)
    return labels, mask, normalizer


def _reduction_name(code: int) -> str:
    return next(name for name, c in REDUCTIONS.items() if c == code)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher | None = None,
    *,
    teacher: SparseTeacher | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    t2_scale: bool = True,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits of shape ``[..., V]``.

    With teacher distribution ``p = softmax(teacher_logits / T)`` and student distribution
    ``q = softmax(student_logits / T)`` (computed in float32, float64 for float64 input), each row
    contributes ``d = divergence(p, q)``:

    - ``"forward_kl"``: KL(p ‖ q), the classic Hinton KD loss
    - ``"reverse_kl"``: KL(q ‖ p), mode-seeking
    - ``"jsd"``: β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q, ``beta`` in (0, 1);
      equals TRL's ``generalized_jsd_loss`` with ``t2_scale=False``
    - ``"skew_kl"``: KL(p ‖ α·p + (1−α)·q), ``alpha`` in [0, 1) (DistiLLM)
    - ``"skew_rkl"``: KL(q ‖ α·q + (1−α)·p), ``alpha`` in [0, 1)
    - ``"tvd"``: ½·Σ|p − q|

    The row loss is ``kd_weight · T² · d`` (``T²`` only when ``t2_scale``, which keeps gradient
    size independent of T) plus ``ce_weight · CE(student_logits, labels)`` at temperature 1.

    Rows are dropped where ``labels == ignore_index`` or ``mask`` is False. ``reduction``:
    ``"batchmean"`` divides the sum over kept rows by their number (or by ``normalizer``, for
    gradient accumulation and data parallelism), ``"sum"`` sums, ``"none"`` returns one value per
    row (shape ``[...]``, 0 on dropped rows). With no kept row the loss and gradients are 0.

    ``-inf`` logits are masked vocabulary entries; a kept row that is entirely ``-inf`` raises.
    A NaN or ``+inf`` logit makes its row's loss and gradient NaN. Teacher and student
    vocabularies of different sizes need ``vocab_size``: the shared first columns are compared
    and the rest count as ``-inf``.

    Gradients flow to the student, and to the teacher when it requires grad (mutual learning).

    The teacher may instead be a :class:`kdcore.SparseTeacher` (its top-k indices and
    log-probabilities, e.g. from a teacher-logit cache), given as ``teacher_logits`` or as
    ``teacher=``. Its log-probabilities are taken as they are (the teacher's temperature was
    applied when they were made); ``temperature`` applies to the student. ``sparse_mode="tail"``
    compares the k entries plus one bucket holding the rest of the vocabulary on both sides (the
    teacher's tail is ``1 - Σ exp(logprobs)``); ``"renorm"`` compares the k entries only, both
    sides renormalized over them. Slots whose log-probability is ``-inf`` are unused: dropped on
    both sides whatever their index (see :class:`kdcore.SparseTeacher`). Every divergence,
    reduction, label, mask and CE option applies; ``inplace_grad`` does not, and the teacher gets no
    gradient. With ``vocab_size`` the student's extra columns are dropped and every entry's index
    must lie below it.

    ``inplace_grad=True`` writes the student gradient over ``student_logits`` during this call,
    **destroying the logits**, and backward hands that buffer out as their gradient: no ``[N, V]``
    tensor is allocated at all. ``student_logits`` must be the output of a differentiable
    computation (e.g. an LM head), flatten to rows without a copy, use its whole vocabulary, and
    not be read again (autograd raises if another operation saved it); backward runs once.
    Eager mode only (under ``torch.compile`` the compiler plans buffers). Without a student
    gradient to compute (no grad mode, or a student that does not require grad) nothing is written.
    ``backend`` names a backend from ``kdcore.backends()``, or ``"auto"`` for the best available
    one for the tensors' device. The loss is float32 (float64 for float64 logits).

    Logits that are DTensors sharded along the vocabulary (``Shard(-1)`` on a 1-D device mesh, as
    ``ColwiseParallel(use_local_output=False)`` leaves an LM head's output) get the
    vocabulary-parallel loss of :func:`kdcore.parallel.vocab_parallel_kd_loss` over the mesh's
    process group: every rank returns the same plain-tensor loss, and no rank gathers the
    vocabulary. ``labels`` and ``mask`` may then be plain tensors or ``Replicate`` DTensors; a
    SparseTeacher, ``vocab_size`` and ``inplace_grad`` are not supported there.
    """
    fn = "kd_loss"
    options = loss_options(fn, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                           t2_scale=t2_scale, kd_weight=kd_weight, ce_weight=ce_weight,
                           ignore_index=ignore_index, reduction=reduction)
    inplace_grad = _checks.boolean(fn, "inplace_grad", inplace_grad)
    teacher_logits = _one_teacher(fn, teacher_logits, teacher)
    if _is_dtensor(student_logits) or _is_dtensor(teacher_logits):
        from kdcore.parallel.vocab_parallel import kd_loss_on_dtensors

        return kd_loss_on_dtensors(fn, student_logits, teacher_logits, options, labels=labels, mask=mask,
                                   normalizer=normalizer, vocab_size=vocab_size, inplace_grad=inplace_grad,
                                   backend=backend)
    if isinstance(teacher_logits, SparseTeacher):
        if inplace_grad:
            raise ValueError(f"{fn}: inplace_grad=True is not supported with a SparseTeacher")
        mode = SPARSE_MODES[_checks.choice(fn, "sparse_mode", sparse_mode, SPARSE_MODES)]
        return _sparse_kd_loss(fn, student_logits, teacher_logits, mode, options, labels, mask, normalizer,
                               vocab_size, backend)
    student, teacher, leading = logits_as_rows(fn, student_logits, teacher_logits, vocab_size)
    labels, mask, normalizer = row_arguments(fn, student, leading, labels, mask, normalizer, options)
    backend = chosen_backend(fn, backend, student, options, student.shape[1])
    grad_enabled = torch.is_grad_enabled()
    student_grad, teacher_grad = grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad
    scalars = options.scalars()
    if inplace_grad and student_grad:
        _check_inplace_target(fn, student_logits, student, teacher)
        op = op_named(resolve_op_name("kd_loss_inplace", backend, student.device.type, fn))
        loss = InplaceKdLoss.apply(op, student, teacher, labels, mask, normalizer, *scalars, teacher_grad)
    else:
        op = op_named(resolve_op_name("kd_loss", backend, student.device.type, fn))
        loss, _, _ = op(student, teacher, labels, mask, normalizer, *scalars, student_grad, teacher_grad)
    return loss.reshape(leading) if options.reduction == REDUCTION_NONE else loss


def _is_dtensor(value) -> bool:
    """Whether ``value`` is a DTensor, without importing torch.distributed.tensor (no DTensor can
    exist before that module is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, getattr(module, "DTensor", ()))


def _one_teacher(fn: str, teacher_logits, teacher):
    """The teacher, given either positionally (``teacher_logits``) or as ``teacher=``."""
    if (teacher_logits is None) == (teacher is None):
        raise TypeError(f"{fn}: give the teacher once: teacher_logits (a tensor or a SparseTeacher) or teacher=")
    return teacher if teacher_logits is None else teacher_logits


def _student_vocab(fn: str, size: int, vocab_size) -> int:
    """The student's compared vocabulary against a sparse teacher: all of it, or ``vocab_size``."""
    if vocab_size is None:
        return size
    vocab = _checks.integer(fn, "vocab_size", vocab_size)
    if not 1 <= vocab <= size:
        raise ValueError(f"{fn}: vocab_size must lie in [1, {size}] (the student's vocabulary), got {vocab}")
    return vocab


def _sparse_kd_loss(fn, student_logits, teacher: SparseTeacher, sparse_mode: int, options: LossOptions, labels, mask,
                    normalizer, vocab_size, backend):
    """kd_loss against a SparseTeacher (the kd_loss_sparse op family)."""
    student = _checks.logits(fn, "student_logits", student_logits)
    leading = student.shape[:-1]
    vocab = _student_vocab(fn, student.shape[-1], vocab_size)
    rows = _as_rows(student, vocab)
    indices, logprobs = teacher.rows(fn, leading, rows.device)
    labels, mask, normalizer = row_arguments(fn, rows, leading, labels, mask, normalizer, options)
    backend = chosen_backend(fn, backend, rows, options, vocab, family="kd_loss_sparse")
    op = op_named(resolve_op_name("kd_loss_sparse", backend, rows.device.type, fn))
    student_grad = torch.is_grad_enabled() and rows.requires_grad
    loss, _ = op(rows, indices, logprobs, labels, mask, normalizer, *options.scalars(), sparse_mode, student_grad)
    return loss.reshape(leading) if options.reduction == REDUCTION_NONE else loss


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher: SparseTeacher | None = None,
    sparse_mode: str = "tail",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    t2_scale: bool = True,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against the teacher's
    logits computed the same way, without materializing either ``[N, V]`` logits tensor.

    ``student_hidden [..., Hs]`` and ``teacher_hidden [..., Ht]`` share their leading dimensions;
    ``student_weight [Vs, Hs]`` and ``teacher_weight [Vt, Ht]`` are the LM heads (``nn.Linear``
    weights), with optional biases ``[Vs]`` / ``[Vt]``. Rows are processed ``chunk_size`` at a time
    (default: chunks of logits about as large as the hidden states); each chunk's logits exist only
    while the fused kd_loss kernel of ``backend`` reads them, and its gradient is folded at once into
    the gradients of the student's hidden states, weight and bias (weight and bias accumulated in
    fp32). Every kd_loss option means the same here, except that ``reduction`` is ``"batchmean"``
    or ``"sum"`` (per-row losses would need the chunks again in backward; use :func:`kd_loss`).
    The teacher gets no gradient: its tensors must not require one. With vocabularies of different
    sizes, ``vocab_size`` names the shared first rows of both weights.

    Instead of a teacher head, ``teacher=`` may be a :class:`kdcore.SparseTeacher` (``[..., k]``,
    e.g. from a teacher-logit cache): each chunk of student logits then meets the teacher's top-k
    rows, with ``sparse_mode`` as in :func:`kd_loss`; ``vocab_size`` then cuts the student's head.
    """
    fn = "fused_linear_kd_loss"
    options = loss_options(fn, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                           t2_scale=t2_scale, kd_weight=kd_weight, ce_weight=ce_weight,
                           ignore_index=ignore_index, reduction=reduction)
    if options.reduction == REDUCTION_NONE:
        raise ValueError(f"{fn}: reduction='none' is not supported (the per-row losses' gradients would need every "
                         "chunk again in backward); use 'batchmean' or 'sum', or kd_loss on materialized logits")
    hidden, weight, bias, leading = _linear_head(fn, "student", student_hidden, student_weight, student_bias)
    if teacher is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise TypeError(f"{fn}: give either the teacher's head (teacher_hidden, teacher_weight) or teacher=, "
                            "not both")
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"{fn}: teacher must be a kdcore.SparseTeacher, got {type(teacher).__name__}")
        vocab = _student_vocab(fn, weight.shape[0], vocab_size)
        indices, logprobs = teacher.rows(fn, leading, hidden.device)
        family = "kd_loss_sparse"
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise TypeError(f"{fn}: the teacher is missing: give teacher_hidden and teacher_weight, or teacher= "
                            "(a SparseTeacher)")
        t_hidden, t_weight, t_bias, t_leading = _linear_head(fn, "teacher", teacher_hidden, teacher_weight,
                                                             teacher_bias)
        _checks.same_device(fn, "student_hidden", hidden, teacher_hidden=t_hidden)
        if t_leading != leading:
            raise ValueError(f"{fn}: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                             f"{tuple(teacher_hidden.shape)} must have the same leading dimensions")
        for name, value in (("teacher_hidden", t_hidden), ("teacher_weight", t_weight), ("teacher_bias", t_bias)):
            if value is not None and value.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{fn}: {name} requires grad, but the fused path computes no teacher gradient; "
                                 "detach the teacher's tensors (or use kd_loss on logits for mutual learning)")
        vocab = shared_vocab(fn, ("student_weight", weight.shape[0]), ("teacher_weight", t_weight.shape[0]),
                             vocab_size)
        family = "kd_loss"
    labels, mask, normalizer = row_arguments(fn, hidden, leading, labels, mask, normalizer, options)
    if chunk_size is None:
        chunk = default_chunk_size(hidden.shape[0], vocab, hidden.shape[1])
    else:
        chunk = _checks.integer(fn, "chunk_size", chunk_size)
        if chunk < 1:
            raise ValueError(f"{fn}: chunk_size must be at least 1, got {chunk}")
    backend = chosen_backend(fn, backend, hidden, options, vocab, family=family)
    op = op_named(resolve_op_name(family, backend, hidden.device.type, fn))
    if family == "kd_loss_sparse":
        mode = SPARSE_MODES[_checks.choice(fn, "sparse_mode", sparse_mode, SPARSE_MODES)]
        chunk_loss = sparse_teacher_chunks(op, indices, logprobs, options.scalars(), mode)
    else:
        chunk_loss = dense_teacher_chunks(op, t_hidden, t_weight, t_bias, options.scalars(), vocab)
    return FusedLinearKdLoss.apply(chunk_loss, hidden, weight, bias, labels, mask, normalizer, options.scalars(),
                                   vocab, chunk)


def chosen_backend(fn: str, backend, rows: torch.Tensor, options: LossOptions, vocab: int,
                    family: str = "kd_loss") -> str:
    """``backend`` checked; ``"auto"`` for kd_loss on CUDA becomes the measured-fastest GPU backend
    for the problem (elsewhere resolution by priority happens in resolve_op_name)."""
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a backend name or 'auto', got {type(backend).__name__}")
    if backend == "auto" and rows.device.type == "cuda" and family == "kd_loss":
        return gpu_choice.fastest(rows.dtype, options.divergence, vocab)
    return backend


def _linear_head(fn: str, who: str, hidden, weight, bias):
    """Validates one model's hidden states ``[..., H]``, weight ``[V, H]`` and bias ``[V]``; returns
    the hidden states as ``[N, H]`` rows, the weight, the bias and the leading shape."""
    hidden = _checks.logits(fn, f"{who}_hidden", hidden)
    weight = _checks.tensor(fn, f"{who}_weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: {who}_weight must have shape [V, {hidden.shape[-1]}] (vocabulary x the hidden size "
                         f"of {who}_hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{fn}: {who}_weight is {weight.dtype} but {who}_hidden is {hidden.dtype}; they must match")
    _checks.same_device(fn, f"{who}_hidden", hidden, **{f"{who}_weight": weight})
    if bias is not None:
        bias = _checks.tensor(fn, f"{who}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: {who}_bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{fn}: {who}_bias is {bias.dtype} but {who}_hidden is {hidden.dtype}; they must match")
        _checks.same_device(fn, f"{who}_hidden", hidden, **{f"{who}_bias": bias})
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, hidden.shape[:-1]


def _check_inplace_target(fn: str, student_logits: torch.Tensor, rows: torch.Tensor, teacher: torch.Tensor) -> None:
    """inplace_grad=True writes the gradient over the rows the kernel reads: they must be the
    user's buffer itself, not a copy, and nothing else may live in it."""
    if torch.compiler.is_compiling():
        raise ValueError(f"{fn}: inplace_grad=True is an eager-mode memory saving; leave it False under "
                         "torch.compile, which plans the gradient buffer itself")
    if student_logits.is_leaf:
        raise ValueError(f"{fn}: inplace_grad=True overwrites student_logits, so they must be the output of a "
                         "differentiable computation (e.g. an LM head), not a leaf tensor")
    if rows.shape[1] != student_logits.shape[-1]:
        raise ValueError(f"{fn}: inplace_grad=True needs the student's whole vocabulary (vocab_size="
                         f"{rows.shape[1]} < {student_logits.shape[-1]} columns)")
    if rows.data_ptr() != student_logits.data_ptr() or rows.untyped_storage().data_ptr() != \
            student_logits.untyped_storage().data_ptr():
        raise ValueError(f"{fn}: inplace_grad=True needs student_logits that flatten to [N, V] rows without a copy "
                         f"(unit stride along the vocabulary); got strides {tuple(student_logits.stride())}")
    if teacher.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
        raise ValueError(f"{fn}: inplace_grad=True would overwrite the teacher logits too: they share "
                         "student_logits' memory")


@constant_result
def resolve_op_name(family: str, backend: str, device_type: str, caller: str) -> str:
    """The qualified name of the op that runs ``family`` for ``backend`` on ``device_type``.

    Runs eagerly even under ``torch.compile`` (it may load plugins and probe the machine); the
    compiled graph keeps its answer, so a backend registered after compiling is not seen there.
    """
    return plugins.host().backends.resolve(family, backend, device_type, caller)


def op_named(qualname: str):
    """The custom op registered under ``qualname`` (``namespace::name``)."""
    namespace, _, name = qualname.partition("::")
    return getattr(getattr(torch.ops, namespace), name)
