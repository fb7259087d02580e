"""Vocabulary-parallel kd_loss: the divergence family when each rank of a process group holds a
contiguous slice of the vocabulary, as a column-parallel LM head leaves the logits (Megatron's
layout; ``ColwiseParallel`` in ``torch.distributed.tensor.parallel``).

Rank r of the group holds columns [o_r, o_r + V_r) of every row, in rank order; the slices may be
uneven (any width of at least 1). Every rank computes the same loss, over the whole vocabulary, and
the gradient of its own columns. Nothing of size [N, V] is communicated or gathered.

Communication per call, for N rows (statistics in float32, float64 for float64 logits), after one
``all_gather`` of 7 int64 per rank (whether the rank's arguments passed validation, its row count,
slice width, whether its logits are float64, which gradients it needs, whether it can run the
kernel path: the vocabulary offsets, the path, and the same error on every rank for a mismatch
instead of ranks left waiting in a collective):

- **Forward KL with gradients for the student only** (the usual distillation step), the *kernel
  path*: one ``all_gather`` of each rank's per-row (max, log-sum-exp - max) pairs of z_s/T and
  z_t/T and a NaN/+inf flag (with ``ce_weight`` also the pair of z_s and the label's logit, from
  the rank holding it): [N, 5] or [N, 8] per rank; then one ``all_reduce`` SUM of the [N, 1] row
  losses. The pairs are gathered rather than summed because each rank needs the other ranks' mass
  apart from its own, which the total minus its own part loses to cancellation exactly where the
  teacher puts mass that the student does not.
- **Everything else**, the *element path*: three ``all_reduce`` calls of per-row statistics:

  1. MAX of [N, 3] ([N, 4] with ``ce_weight``): the row maxima of z_s/T and z_t/T (and of z_s for
     the cross-entropy at temperature 1), and a flag for rows holding a NaN or +inf logit;
  2. SUM of [N, 2] ([N, 4] with ``ce_weight``): the sums of exp(x - max) of each, and the label's
     shifted logit max - z_label, contributed by the one rank whose columns hold the label;
  3. SUM of [N, 1] to [N, 3]: the divergence's row sum and, where a gradient needs them, the
     softmax coupling sums Gq = sum(q * gq) and Gp = sum(p * gp) (docs/math.md, "Gradients").

  At most 11 numbers per row: 44 bytes per row in float32 (88 in float64), whatever V is.

What runs locally:

- **The kernel path**: the fused kd_loss kernel of the chosen backend (``backend``; ``auto``: the
  device's best) on this rank's slice with one more column per row, a *tail bucket* holding the
  rest of the vocabulary: its logit T·log(sum of exp(z/T) over the other ranks' columns) gives it
  exactly the mass they hold, on each side. A softmax over [slice, bucket] then equals the global
  softmax on the slice, the kernel's gradient there, q - p, is exactly the global one (forward
  KL's softmax coupling, sum(q·gq) = -1, does not depend on how the other columns are grouped), and
  its row value is the slice's terms plus the bucket's P·log(P/Q), taken out again from the
  gathered statistics. The cross-entropy term (``ce_weight``) adds softmax(z_s) - onehot on the
  slice in a chunked pass.
- **The element path** (every other divergence, a teacher that requires grad, or
  ``backend="reference"``): the kernel's gradient would couple each row through the bucket's one
  term instead of the other ranks' columns, so each rank evaluates the element functions of the
  ``reference`` backend (``element_terms``, ``grad_wrt_student``, ``grad_wrt_teacher`` in
  kdcore/ops/reference.py) on its slice, over chunks of rows, with the global normalizers
  (log q = (z_s/T - max) - log S), and all-reduces the softmax coupling sums: exact for every
  divergence, at the speed of PyTorch element-wise code.

Both compute in float32 (float64 for float64 logits).

Memory: the gradient of the local slice is computed in the forward pass, for a unit upstream
gradient, as the fused backends do, and kept until backward scales it by the upstream gradient (in
place when the graph is not retained): N x V_r elements in the logits' dtype for the student, as
many again for the teacher when it requires grad. On top of that during the call: the kernel path
holds float32 copies of both slices with their tail column (the kernel writes the student's
gradient over its copy); the element path about a dozen float32 temporaries of one row chunk
(``reference.CHUNK_ELEMENTS`` = 2^20 elements, 4 MiB each). Both keep the [N, 4] statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from kdcore import _checks
from kdcore.divergences import DIVERGENCES, REDUCTION_NONE
from kdcore.functional import (
    LossOptions,
    chosen_backend,
    logits_as_rows,
    loss_options,
    op_named,
    resolve_op_name,
    row_arguments,
)
from kdcore.ops.kd_loss import (
    all_neg_inf_error,
    hand_out_grads,
    kd_scales,
    kept_rows,
    label_out_of_range_error,
    loss_dtype,
    reduce_rows,
    reduction_divisor,
)
from kdcore.ops.reference import (
    CHUNK_ELEMENTS,
    element_terms,
    finish_rows,
    grad_wrt_student,
    grad_wrt_teacher,
    student_grad_needs_row_sum,
    teacher_grad_needs_row_sum,
)
from kdcore.sparse import SparseTeacher

_FORWARD_KL = DIVERGENCES["forward_kl"].code


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
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
    """:func:`kdcore.kd_loss` of logits whose vocabulary is split over the ranks of ``group``
    (default: the default process group).

    ``student_logits`` and ``teacher_logits`` are this rank's slices ``[..., V_r]``: every rank
    holds the same rows (the same leading shape) and the columns [o_r, o_r + V_r) of the
    vocabulary, rank 0 the first ones; widths may differ between ranks. Every option means what it
    means for ``kd_loss`` over the whole vocabulary (``labels`` index the whole vocabulary) and must
    be the same on every rank, as must ``labels``, ``mask`` and ``normalizer``. Each rank returns
    the same loss and its slices receive their gradients (the teacher's too when it requires grad).

    ``backend`` runs forward KL's local pass when only the student needs a gradient (``auto``: the
    best for the device; ``reference``: the element-wise path every other case takes).

    A mismatch between ranks (row counts, float64 on some ranks only, an argument one rank rejects)
    raises on every rank. ``-inf`` columns are legal, including a rank's whole slice of a row; a
    kept row that is ``-inf`` over the whole vocabulary raises, as in ``kd_loss``. Not supported: a
    :class:`kdcore.SparseTeacher` and ``vocab_size``. Runs eagerly; see the module docstring for
    the communication (a few numbers per row, independent of V) and the memory.
    """
    fn = "vocab_parallel_kd_loss"
    options = loss_options(fn, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                           t2_scale=t2_scale, kd_weight=kd_weight, ce_weight=ce_weight,
                           ignore_index=ignore_index, reduction=reduction)
    _refuse_unsupported(fn, teacher_logits, vocab_size)
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if isinstance(value, DTensor):
            raise TypeError(f"{fn}: {name} is a DTensor; pass this rank's slice ({name}.to_local()), or call "
                            "kdcore.kd_loss, which handles vocabulary-sharded DTensors")
    return sharded_kd_loss(fn, student_logits, teacher_logits, options, group=group, labels=labels, mask=mask,
                           normalizer=normalizer, backend=backend)


def kd_loss_on_dtensors(fn: str, student_logits, teacher_logits, options: LossOptions, *, labels, mask, normalizer,
                        vocab_size, inplace_grad: bool, backend) -> torch.Tensor:
    """``kd_loss`` of DTensor logits sharded along the vocabulary (``Shard(-1)`` on a 1-D mesh, what
    ``parallelize_module(lm_head, mesh, ColwiseParallel(use_local_output=False))`` returns): the
    vocabulary-parallel loss of their local slices over the mesh's process group. ``labels``,
    ``mask`` and ``normalizer`` may be plain tensors or ``Replicate`` DTensors. The loss is a plain
    tensor, the same on every rank; the DTensors receive their gradients through ``to_local``."""
    _refuse_unsupported(fn, teacher_logits, vocab_size)
    if inplace_grad:
        raise ValueError(f"{fn}: inplace_grad=True is not supported for vocabulary-sharded DTensor logits; leave it "
                         "False")
    mesh = _vocab_mesh(fn, "student_logits", student_logits)
    if _vocab_mesh(fn, "teacher_logits", teacher_logits) != mesh:
        raise ValueError(f"{fn}: student_logits and teacher_logits are sharded over different device meshes "
                         f"({mesh} and {teacher_logits.device_mesh}); both need the same one")
    labels, mask, normalizer = (_replicated_local(fn, name, value) for name, value in
                                (("labels", labels), ("mask", mask), ("normalizer", normalizer)))
    return sharded_kd_loss(fn, student_logits.to_local(), teacher_logits.to_local(), options,
                           group=mesh.get_group(), labels=labels, mask=mask, normalizer=normalizer, backend=backend)


def _vocab_mesh(fn: str, name: str, value):
    """The 1-D device mesh of a DTensor sharded along its last (vocabulary) dimension."""
    if not isinstance(value, DTensor):
        raise TypeError(f"{fn}: {name} must be a DTensor sharded like the other logits (Shard(-1) on the same 1-D "
                        f"mesh), got {type(value).__name__}; distribute it with "
                        "torch.distributed.tensor.distribute_tensor(x, mesh, [Shard(-1)])")
    mesh, placements = value.device_mesh, value.placements
    if mesh.ndim != 1 or not (type(placements[0]) is Shard and placements[0].dim in (-1, value.ndim - 1)):
        raise ValueError(f"{fn}: {name} is a DTensor with placements {tuple(placements)} on a {mesh.ndim}-D mesh; "
                         "vocabulary-parallel logits are sharded along the vocabulary (last) dimension over a 1-D "
                         "mesh, Shard(-1), as ColwiseParallel(use_local_output=False) leaves them: redistribute "
                         f"({name}.redistribute(mesh, [Shard(-1)])) or pass {name}.full_tensor()")
    return mesh


def _replicated_local(fn: str, name: str, value):
    """``labels``, ``mask`` or ``normalizer`` as a plain tensor: as given, or a Replicate DTensor's local copy."""
    if not isinstance(value, DTensor):
        return value
    if not all(placement.is_replicate() for placement in value.placements):
        raise ValueError(f"{fn}: {name} is a DTensor with placements {tuple(value.placements)}; every rank needs all "
                         f"of it: make it Replicate() ({name}.redistribute(mesh, [Replicate()])) or pass a plain "
                         "tensor")
    return value.to_local()


def _refuse_unsupported(fn: str, teacher_logits, vocab_size) -> None:
    """Sparse teachers and vocabulary mismatch have no vocabulary-parallel form."""
    if isinstance(teacher_logits, SparseTeacher):
        raise TypeError(f"{fn}: teacher_logits is a SparseTeacher, which the vocabulary-parallel loss does not "
                        "support; pass this rank's slice of the teacher's dense logits")
    if vocab_size is not None:
        raise ValueError(f"{fn}: vocab_size={vocab_size!r} is not supported with vocabulary-parallel logits; give "
                         "the student and the teacher the same vocabulary split (pad the smaller one with -inf)")


def sharded_kd_loss(fn: str, student_logits, teacher_logits, options: LossOptions, *, group, labels, mask,
                    normalizer, backend) -> torch.Tensor:
    """The vocabulary-parallel loss of this rank's slices with checked ``options``: validates the
    local arguments, exchanges the layout with the other ranks, and runs the autograd function."""
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}: no process group; call torch.distributed.init_process_group first (the "
                           "vocabulary is split over its ranks)")
    try:
        student, teacher, leading = _local_rows(fn, student_logits, teacher_logits)
        labels, mask, normalizer = row_arguments(fn, student, leading, labels, mask, normalizer, options)
        kernel = _kernel(fn, backend, student, options)
    except (TypeError, ValueError):
        device = student_logits.device if isinstance(student_logits, torch.Tensor) else torch.device("cpu")
        _gather_summaries(group, device, [0] * len(_SUMMARY))  # the other ranks raise too
        raise
    grad_enabled = torch.is_grad_enabled()
    student_grad, teacher_grad = grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad
    summary = [1, student.shape[0], student.shape[1], student.dtype == torch.float64, student_grad, teacher_grad,
               kernel is not None]
    summaries = _gather_summaries(group, student.device, summary)
    plan = _plan(fn, summaries, dist.get_rank(group), group, options, labels, mask, normalizer, kernel)
    loss = _VocabParallelKdLoss.apply(student, teacher, plan)
    return loss.reshape(leading) if options.reduction == REDUCTION_NONE else loss


def _local_rows(fn: str, student_logits, teacher_logits):
    """This rank's slices as [N, V_r] rows (kd_loss's checks) and the leading shape."""
    student = _checks.logits(fn, "student_logits", student_logits)
    teacher = _checks.logits(fn, "teacher_logits", teacher_logits)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"{fn}: this rank's slices of student_logits ({student.shape[-1]} columns) and "
                         f"teacher_logits ({teacher.shape[-1]} columns) differ; each rank needs the same vocabulary "
                         "columns of both")
    return logits_as_rows(fn, student, teacher, None)


# the fields of each rank's summary, in order
_SUMMARY = ("valid", "rows", "width", "float64", "student_grad", "teacher_grad", "kernel")


def _gather_summaries(group, device: torch.device, summary: list) -> torch.Tensor:
    """[world size, len(_SUMMARY)] int64 on the CPU: every rank's summary in rank order (one all_gather)."""
    mine = torch.tensor([int(value) for value in summary], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).cpu()


@dataclass(frozen=True)
class _Plan:
    """One call's work on this rank: the options and row arguments, where the slice lies in the
    vocabulary, the gradients this rank computes, and which coupling sums are all-reduced (any rank's
    gradient needing one makes every rank contribute to it)."""

    options: LossOptions
    group: dist.ProcessGroup | None
    labels: torch.Tensor | None
    mask: torch.Tensor | None
    normalizer: torch.Tensor | None
    offset: int
    vocab: int
    student_grad: bool
    teacher_grad: bool
    reduce_gq: bool
    reduce_gp: bool
    kernel: str | None  # the fused kd_loss op of the tail-bucket path, None for the element path


def _kernel(fn: str, backend, student: torch.Tensor, options: LossOptions) -> str | None:
    """The in-place kd_loss op that runs forward KL's local pass, or None where the element path
    runs (another divergence, or the reference backend chosen)."""
    if options.divergence != _FORWARD_KL:
        chosen_backend(fn, backend, student, options, student.shape[1])  # still checked
        return None
    name = resolve_op_name("kd_loss_inplace", chosen_backend(fn, backend, student, options, student.shape[1]),
                           student.device.type, fn)
    return None if name == resolve_op_name("kd_loss_inplace", "reference", student.device.type, fn) else name


def _plan(fn: str, summaries: torch.Tensor, rank: int, group, options: LossOptions, labels, mask, normalizer,
          kernel: str | None) -> _Plan:
    """Checks that the ranks' summaries agree; the plan of this rank's work."""
    ranks = {name: summaries[:, i].tolist() for i, name in enumerate(_SUMMARY)}
    rejected = [r for r, valid in enumerate(ranks["valid"]) if not valid]
    if rejected:
        raise ValueError(f"{fn}: rank(s) {rejected} rejected their arguments (the error is raised there); every rank "
                         "must pass its slice of the same rows, with the same options")
    if len(set(ranks["rows"])) > 1:
        raise ValueError(f"{fn}: the ranks hold different numbers of rows (N = {ranks['rows']} on ranks 0 to "
                         f"{len(ranks['rows']) - 1}); every rank must hold the same rows, each its own slice of the "
                         "vocabulary")
    if len(set(ranks["float64"])) > 1:
        raise TypeError(f"{fn}: the logits are float64 on some ranks only (ranks "
                        f"{[r for r, wide in enumerate(ranks['float64']) if wide]}); make them float64 on every rank "
                        "or on none")
    widths = ranks["width"]
    plan = _Plan(options=options, group=group, labels=labels, mask=mask, normalizer=normalizer,
                 offset=sum(widths[:rank]), vocab=sum(widths), student_grad=bool(ranks["student_grad"][rank]),
                 teacher_grad=bool(ranks["teacher_grad"][rank]),
                 reduce_gq=any(ranks["student_grad"]) and student_grad_needs_row_sum(options.divergence),
                 reduce_gp=any(ranks["teacher_grad"]) and teacher_grad_needs_row_sum(options.divergence),
                 kernel=kernel if all(ranks["kernel"]) and not any(ranks["teacher_grad"]) else None)
    if options.ce_weight != 0:
        _check_labels(plan)
    return plan


def _check_labels(plan: _Plan) -> None:
    """Kept labels must index the whole vocabulary (checked alike on every rank)."""
    o = plan.options
    kept = kept_rows(plan.labels.shape[0], plan.labels, plan.mask, o.ignore_index, plan.labels.device)
    out_of_range = kept & ((plan.labels < 0) | (plan.labels >= plan.vocab))
    if bool(out_of_range.any()):
        i = int(out_of_range.nonzero()[0, 0])
        raise label_out_of_range_error(i, int(plan.labels[i]), plan.vocab)


class _VocabParallelKdLoss(torch.autograd.Function):
    """Forward computes the loss and this rank's gradient slices for a unit upstream gradient;
    backward scales them by the upstream gradient (per row for reduction='none')."""

    @staticmethod
    def forward(ctx, student, teacher, plan: _Plan):
        loss, grads = _loss_and_grads(student, teacher, plan)
        ctx.set_materialize_grads(False)
        ctx.grads = grads  # plain attributes: backward hands the buffers to autograd (kd_loss.hand_out_grads)
        ctx.rowwise = plan.options.reduction == REDUCTION_NONE
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None
        wanted = tuple(needs and grad is not None for needs, grad in zip(ctx.needs_input_grad, ctx.grads))
        return (*hand_out_grads(ctx, grad_loss, wanted), None)


def _chunks(n: int, width: int) -> list[slice]:
    """Row slices of about CHUNK_ELEMENTS logits each, as the reference backend walks its rows."""
    step = max(1, CHUNK_ELEMENTS // width)
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _all_reduce(stats: torch.Tensor, op, group) -> torch.Tensor:
    """``stats`` reduced in place over the group (no message for zero rows: every rank has as many)."""
    if stats.numel():
        dist.all_reduce(stats, op=op, group=group)
    return stats


def _loss_and_grads(student: torch.Tensor, teacher: torch.Tensor, plan: _Plan):
    """The loss (the same on every rank) and this rank's gradient slices (None where not computed)."""
    o = plan.options
    n = student.shape[0]
    acc = loss_dtype(student)
    kept = kept_rows(n, plan.labels, plan.mask, o.ignore_index, student.device)
    if plan.kernel:
        return _kernel_loss_and_grads(student, teacher, plan, kept, acc)
    maxima = _all_reduce(_local_maxima(student, teacher, plan, acc), dist.ReduceOp.MAX, plan.group)
    _check_distributions(maxima, kept)
    sums = _all_reduce(_local_exp_sums(student, teacher, plan, kept, maxima, acc), dist.ReduceOp.SUM, plan.group)
    log_sums = sums[:, :2].log()
    parts = _all_reduce(_local_divergence_sums(student, teacher, plan, maxima, log_sums, acc), dist.ReduceOp.SUM,
                        plan.group)
    kd_loss_scale, _ = kd_scales(o.temperature, o.t2_scale, o.kd_weight)
    loss, divisor = _reduced(kd_loss_scale * parts[:, 0], student, plan, kept, maxima, sums, acc)
    grads = (None, None)
    if plan.student_grad or plan.teacher_grad:
        coupling = parts[:, 1:]
        grads = _local_grads(student, teacher, plan, kept, maxima, sums, log_sums, coupling, 1 / divisor, acc)
    return loss, grads


def _reduced(kd_rows: torch.Tensor, student: torch.Tensor, plan: _Plan, kept, maxima, sums, acc):
    """The loss from the rows' distillation terms (the same on every rank): the cross-entropy added,
    NaN rows, ignored rows zeroed, reduced; and the reduction's divisor."""
    o = plan.options
    n = student.shape[0]
    row_loss = kd_rows
    if o.ce_weight != 0:
        row_loss = row_loss + o.ce_weight * (sums[:, 3] + sums[:, 2].log())
    row_loss = torch.where(maxima[:, -1] > 0, torch.nan, row_loss)
    row_loss = torch.where(kept, row_loss, 0)
    divisor = reduction_divisor(kept, plan.normalizer, o.reduction, acc)
    loss = student.new_empty((n,) if o.reduction == REDUCTION_NONE else (), dtype=acc)
    reduce_rows(loss, row_loss, divisor, o.reduction)
    return loss, divisor


def _kernel_loss_and_grads(student, teacher, plan: _Plan, kept, acc):
    """Forward KL through the fused kernel on [slice, tail bucket] (see the module docstring): the
    loss and the student's gradient slice (the teacher needs none on this path). Each rank's
    log-sum-exps are gathered as (max, log-sum) pairs, so the buckets' and the whole rows'
    normalizers are exact in the log domain: no rank's mass is lost to cancellation or underflow,
    however far below the others its logits lie."""
    o = plan.options
    n, width = student.shape
    ranks = _gather_rows(_local_log_sums(student, teacher, plan, kept, acc), plan.group)  # [R, N, k]
    rank = dist.get_rank(plan.group)
    bad = ranks[:, :, -1].amax(0) > 0
    whole = _log_sum_exp(ranks)
    others = _log_sum_exp(torch.cat([ranks[:rank], ranks[rank + 1:]]))
    _check_distributions(torch.stack([whole[:, 0], whole[:, 1], bad.to(acc)], 1), kept)
    tail = o.temperature * others[:, :2]
    tail = torch.where(kept.unsqueeze(1), tail, 0.0).masked_fill(bad.unsqueeze(1), torch.nan)
    rows_student = torch.cat([student.to(acc), tail[:, :1]], 1)
    rows_teacher = torch.cat([teacher.to(acc), tail[:, 1:]], 1)
    kernel_options = replace(o, ce_weight=0.0, reduction=REDUCTION_NONE)
    local_rows, _, _ = op_named(plan.kernel)(rows_student, rows_teacher, None, kept, None,
                                             *kernel_options.scalars(), plan.student_grad, False)
    del rows_teacher
    # the bucket's own term, P log(P / Q), is no part of the loss: take it out again
    log_q, log_p = others[:, 0] - whole[:, 0], others[:, 1] - whole[:, 1]
    bucket = torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), 0.0)
    kd_loss_scale, _ = kd_scales(o.temperature, o.t2_scale, o.kd_weight)
    kd_rows = torch.where(kept, local_rows - kd_loss_scale * bucket, 0.0)
    kd_rows = _all_reduce(kd_rows.unsqueeze(1), dist.ReduceOp.SUM, plan.group)[:, 0]
    maxima, sums = _ce_statistics(ranks, bad)
    loss, divisor = _reduced(kd_rows, student, plan, kept, maxima, sums, acc)
    if not plan.student_grad:
        return loss, (None, None)
    grad = rows_student[:, :width]  # the kernel wrote the gradient of the summed rows over the copy
    if o.ce_weight == 0:  # the kernel zeroed the ignored rows and made the NaN ones NaN: only the scale is left
        grad.mul_(1 / divisor)
    else:
        for rows in _chunks(n, width):
            g = grad[rows] + o.ce_weight * _cross_entropy_grad(student[rows].to(acc), plan, rows, kept, maxima, sums)
            grad[rows] = finish_rows(g, kept[rows], bad[rows], 1 / divisor)
    return loss, (grad.to(student.dtype), None)


def _local_log_sums(student, teacher, plan: _Plan, kept, acc) -> torch.Tensor:
    """[N, k]: this rank's (max, log of the sum of exp(x - max)) over its columns of z_s/T, z_t/T
    (and of z_s, then the label's logit on the rank holding it, 0 elsewhere, with the
    cross-entropy), and last the NaN/+inf flag. An all--inf slice reads (-inf, 0)."""
    n, width = student.shape
    with_ce = plan.options.ce_weight != 0
    temperature = plan.options.temperature
    out = torch.empty(n, 8 if with_ce else 5, dtype=acc, device=student.device)
    for rows in _chunks(n, width):
        s, t = student[rows].to(acc), teacher[rows].to(acc)
        bad_s, bad_t = _nan_or_posinf(s), _nan_or_posinf(t)
        columns = [*_max_and_log_sum(s / temperature, bad_s), *_max_and_log_sum(t / temperature, bad_t)]
        if with_ce:
            index, here = _local_labels(plan, rows, kept, width)
            columns += [*_max_and_log_sum(s, bad_s), torch.where(here, s.gather(1, index).squeeze(1), 0.0)]
        columns.append((bad_s | bad_t).to(acc))
        out[rows] = torch.stack(columns, 1)
    return out


def _max_and_log_sum(x: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and log(sum(exp(x - max))); (0, 0) in bad rows, (-inf, 0) in all--inf ones."""
    top = _row_max(x, bad)
    empty = top == -torch.inf
    shifted = torch.where(empty.unsqueeze(1), -torch.inf, x - top.unsqueeze(1))
    log_sum = torch.where(empty | bad, 0.0, shifted.exp().sum(-1).log())
    return top, log_sum


def _gather_rows(stats: torch.Tensor, group) -> torch.Tensor:
    """[R, N, k]: every rank's ``stats`` in rank order (one all_gather)."""
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    if stats.numel():
        dist.all_gather(gathered, stats.contiguous(), group=group)
    return torch.stack(gathered)


def _log_sum_exp(ranks: torch.Tensor) -> torch.Tensor:
    """[N, 2] (max + log-sum over the ranks given) for the student and teacher pairs of ``ranks``,
    -inf where none of them holds a finite logit."""
    sides = []
    for column in (0, 2):
        top = ranks[:, :, column].amax(0) if len(ranks) else ranks.new_full(ranks.shape[1:2], -torch.inf)
        finite = top > -torch.inf
        shift = torch.where(finite, top, 0.0)
        total = (ranks[:, :, column] - shift + ranks[:, :, column + 1]).exp().sum(0)
        sides.append(torch.where(finite, top + total.log(), -torch.inf))
    return torch.stack(sides, 1)


def _ce_statistics(ranks: torch.Tensor, bad: torch.Tensor):
    """(maxima, sums) as the element path holds them, for the cross-entropy at temperature 1 and
    the NaN rows: maxima[:, 2] the row maximum of z_s, maxima[:, 3] the NaN/+inf flag, sums[:, 2]
    the sum of exp(z_s - max), sums[:, 3] max - z_label."""
    n = ranks.shape[1]
    maxima = ranks.new_zeros(n, 4)
    sums = ranks.new_zeros(n, 4)
    maxima[:, 3] = bad.to(ranks.dtype)
    if ranks.shape[2] == 8:
        top = ranks[:, :, 4].amax(0)
        top = torch.where(bad | (top == -torch.inf), 0.0, top)
        maxima[:, 2] = top
        sums[:, 2] = (ranks[:, :, 4] - top + ranks[:, :, 5]).exp().sum(0)
        sums[:, 3] = top - ranks[:, :, 6].sum(0)
    return maxima, sums


def _nan_or_posinf(x: torch.Tensor) -> torch.Tensor:
    """[rows] bool: rows holding a NaN or +inf logit (their loss and gradient are NaN)."""
    return (x.isnan() | x.isposinf()).any(-1)


def _row_max(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Each row's maximum, 0 in the bad rows (a number the all-reduced maximum can take)."""
    return torch.where(bad, 0.0, x.amax(-1))


def _local_maxima(student, teacher, plan: _Plan, acc) -> torch.Tensor:
    """[N, 3] ([N, 4] with the cross-entropy): the row maxima over this rank's columns of z_s/T,
    z_t/T (and z_s), and last a flag, 1 where a NaN or +inf logit makes the row NaN. A side's
    maximum reads 0 in a row where that side is NaN/+inf, so the all-reduced maximum of a row whose
    other slices are all -inf stays finite: that row is NaN, not an error, as in kd_loss."""
    n, width = student.shape
    with_ce = plan.options.ce_weight != 0
    temperature = plan.options.temperature
    out = torch.empty(n, 4 if with_ce else 3, dtype=acc, device=student.device)
    for rows in _chunks(n, width):
        s, t = student[rows].to(acc), teacher[rows].to(acc)
        bad_s, bad_t = _nan_or_posinf(s), _nan_or_posinf(t)
        columns = [_row_max(s / temperature, bad_s), _row_max(t / temperature, bad_t)]
        if with_ce:
            columns.append(_row_max(s, bad_s))
        columns.append((bad_s | bad_t).to(acc))
        out[rows] = torch.stack(columns, 1)
    return out


def _check_distributions(maxima: torch.Tensor, kept: torch.Tensor) -> None:
    """A kept row that is -inf over the whole vocabulary on either side has no distribution."""
    empty = kept & ((maxima[:, 0] == -torch.inf) | (maxima[:, 1] == -torch.inf))
    if bool(empty.any()):
        raise all_neg_inf_error(int(empty.nonzero()[0, 0]))


def _local_labels(plan: _Plan, rows: slice, kept: torch.Tensor, width: int):
    """([rows, 1] column of each row's label within this slice (0 where it is not here), [rows] bool:
    the label is a kept row's and lies in this rank's columns)."""
    local = plan.labels[rows] - plan.offset
    here = kept[rows] & (local >= 0) & (local < width)
    return torch.where(here, local, 0).unsqueeze(1), here


def _local_exp_sums(student, teacher, plan: _Plan, kept, maxima, acc) -> torch.Tensor:
    """[N, 2] ([N, 4] with the cross-entropy): sums over this rank's columns of exp(z_s/T - max)
    and exp(z_t/T - max) with the global row maxima (then of exp(z_s - max), and max - z_label on
    the rank holding the label's column, 0 on the others)."""
    n, width = student.shape
    with_ce = plan.options.ce_weight != 0
    temperature = plan.options.temperature
    out = torch.empty(n, 4 if with_ce else 2, dtype=acc, device=student.device)
    for rows in _chunks(n, width):
        s, t = student[rows].to(acc), teacher[rows].to(acc)
        columns = [torch.exp(s / temperature - maxima[rows, 0:1]).sum(-1),
                   torch.exp(t / temperature - maxima[rows, 1:2]).sum(-1)]
        if with_ce:
            top = maxima[rows, 2:3]
            index, here = _local_labels(plan, rows, kept, width)
            columns.append(torch.exp(s - top).sum(-1))
            # (max - z_label) apart from the log-sum, as the reference backend keeps it (large logits)
            columns.append(torch.where(here, (top - s.gather(1, index)).squeeze(1), 0.0))
        out[rows] = torch.stack(columns, 1)
    return out


def _log_probs(s, t, rows: slice, maxima, log_sums, temperature: float):
    """log q and log p of a chunk's columns: (x - max) - log S with the rows' global max and S, the
    two parts kept apart as log_softmax does, so large logits lose nothing."""
    la = (s / temperature - maxima[rows, 0:1]) - log_sums[rows, 0:1]
    lb = (t / temperature - maxima[rows, 1:2]) - log_sums[rows, 1:2]
    return la, lb


def _local_divergence_sums(student, teacher, plan: _Plan, maxima, log_sums, acc) -> torch.Tensor:
    """[N, 1 + reduce_gq + reduce_gp]: sums over this rank's columns of the divergence's terms,
    then of q * gq and of p * gp where the plan reduces them (``element_terms``)."""
    n, width = student.shape
    o = plan.options
    out = torch.empty(n, 1 + plan.reduce_gq + plan.reduce_gp, dtype=acc, device=student.device)
    for rows in _chunks(n, width):
        la, lb = _log_probs(student[rows].to(acc), teacher[rows].to(acc), rows, maxima, log_sums, o.temperature)
        term, qgq, pgp, _, _ = element_terms(o.divergence, la, lb, la.exp(), lb.exp(), o.mix)
        columns = [term.sum(-1)]
        if plan.reduce_gq:
            columns.append(qgq.sum(-1))
        if plan.reduce_gp:
            columns.append(pgp.sum(-1))
        out[rows] = torch.stack(columns, 1)
    return out


def _local_grads(student, teacher, plan: _Plan, kept, maxima, sums, log_sums, coupling, row_scale, acc):
    """(d loss / d student slice, d loss / d teacher slice) for a unit upstream gradient, in the
    logits' dtypes; None for a side this rank does not differentiate. ``coupling`` holds the
    all-reduced Gq and Gp columns the plan reduced."""
    n, width = student.shape
    o = plan.options
    _, kd_grad_scale = kd_scales(o.temperature, o.t2_scale, o.kd_weight)
    gq_sum = coupling[:, 0] if plan.reduce_gq else None
    gp_sum = coupling[:, int(plan.reduce_gq)] if plan.reduce_gp else None
    grad_student = student.new_empty(student.shape) if plan.student_grad else None
    grad_teacher = teacher.new_empty(teacher.shape) if plan.teacher_grad else None
    for rows in _chunks(n, width):
        s, t, k = student[rows].to(acc), teacher[rows].to(acc), kept[rows]
        bad = maxima[rows, -1] > 0
        la, lb = _log_probs(s, t, rows, maxima, log_sums, o.temperature)
        q, p = la.exp(), lb.exp()
        _, _, _, gq, gp = element_terms(o.divergence, la, lb, q, p, o.mix)
        if grad_student is not None:
            g = kd_grad_scale * grad_wrt_student(o.divergence, q, p, gq, None if gq_sum is None else gq_sum[rows])
            if o.ce_weight != 0:
                g = g + o.ce_weight * _cross_entropy_grad(s, plan, rows, kept, maxima, sums)
            grad_student[rows] = finish_rows(g, k, bad, row_scale).to(student.dtype)
        if grad_teacher is not None:
            g = kd_grad_scale * grad_wrt_teacher(o.divergence, q, p, gp, None if gp_sum is None else gp_sum[rows])
            grad_teacher[rows] = finish_rows(g, k, bad, row_scale).to(teacher.dtype)
    return grad_student, grad_teacher


def _cross_entropy_grad(s, plan: _Plan, rows: slice, kept, maxima, sums) -> torch.Tensor:
    """softmax(z_s) - onehot(label) on a chunk of this rank's columns (the one-hot only on the rank
    holding the label), with the global maximum and sum of exponentials at temperature 1."""
    probs = torch.exp(s - maxima[rows, 2:3]) / sums[rows, 2:3]
    index, here = _local_labels(plan, rows, kept, s.shape[1])
    return probs - torch.zeros_like(s).scatter_(1, index, here.unsqueeze(1).to(s.dtype))
