"""Distillation losses between models with different tokenizers, on aligned spans.

Both models score the same text; :mod:`kdcore.cross_tokenizer.alignment` cuts it into spans both
tokenizations agree on and gives every label the span of the token it names (``-1``: none). A
span is compared through each model's distribution at the span's first position, the row that
predicts its first token; when a span has more tokens on a side, that side's log-probabilities of
its actual further tokens are added to every entry (the chain rule: entry ``y`` becomes "the span
starts with ``y`` and goes on as the text does"; TRL's GOLD merges multi-token spans the same way).
For a 1:1 span this is the plain next-token distribution. Everything is at temperature ``T``.

Per compared span, with ``P`` the teacher's and ``Q`` the student's merged distribution:

* ``"uld"`` (Universal Logit Distillation, Boizard et al. 2024): ``Σ_i |P↓_i − Q↓_i|``, both sorted
  in decreasing order and zero-padded to the longer vocabulary, a bound on the Wasserstein-1
  distance that needs no vocabulary map; ``uld_top_k`` compares only the k largest of each.
* ``"shared_vocab"``: any :func:`kdcore.kd_loss` divergence over the tokens both vocabularies share
  (:class:`SharedVocabulary`: equal texts, or every teacher token under the student token it
  begins with, see :func:`~kdcore.cross_tokenizer.vocabulary.shared_vocabulary`), plus one tail
  bucket per side holding the rest of its distribution
  (what ``sparse_mode="tail"`` does for a top-k teacher), computed by kdcore's fused kd_loss kernels
  on the ``[spans, shared + 1]`` rows; ``T²``-scaled when ``t2_scale``. With one tokenizer on both
  sides (every token shared) it is exactly ``kd_loss``.
* ``"hybrid"`` (GOLD's): ``shared_weight`` · shared_vocab + ``uld_weight`` · ULD over the tokens
  outside the shared set.

The sum over compared spans is divided by their number (``reduction="mean"``), by ``normalizer``
(the engine passes its token count, for gradient accumulation), or kept (``"sum"``). Spans are
processed ``chunk_size`` at a time under activation checkpointing, so the loss keeps no
``[spans, vocab]`` intermediate for backward; the ``fused_linear_`` variant also computes each
chunk's logits from the last hidden states and LM head, so neither model's ``[tokens, vocab]``
logits ever exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from kdcore import _checks
from kdcore.cross_tokenizer.vocabulary import SharedVocabulary
from kdcore.functional import kd_loss, loss_options

LOSSES = ("uld", "shared_vocab", "hybrid")
REDUCTIONS = ("mean", "sum")
#: which spans are compared: every span both sides have, or only those of one token on each side
SPANS = ("all", "one_to_one")
#: logits per chunk (rows × vocabulary) when chunk_size is not given: 16 MiB of float32
CHUNK_ELEMENTS = 1 << 22


class _Rows:
    """One side's logits by row: a ``[N, V]`` tensor, or last hidden states ``[N, D]`` times an LM
    head (``weight [V, D]``, optional ``bias``), computed per chunk. ``tensors`` are what the
    chunk functions take as checkpointed inputs."""

    def __init__(self, logits=None, hidden=None, weight=None, bias=None) -> None:
        self.fused = logits is None
        self.tensors = (hidden, weight, bias) if self.fused else (logits,)
        self.vocab = (weight if self.fused else logits).shape[0 if self.fused else -1]

    @staticmethod
    def take(fused: bool, tensors: tuple, index: torch.Tensor) -> torch.Tensor:
        if not fused:
            out = tensors[0].index_select(0, index)
        else:
            hidden, weight, bias = tensors
            out = hidden.index_select(0, index) @ weight.t()
            out = out if bias is None else out + bias
        return out if out.dtype == torch.float64 else out.float()


def cross_tokenizer_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **options: Any) -> torch.Tensor:
    """The cross-tokenizer loss of the module docstring on materialized logits: ``student_logits
    [B, Ls, Vs]`` and ``teacher_logits [B, Lt, Vt]``, with keyword arguments ``student_labels
    [B, Ls]``, ``teacher_labels [B, Lt]`` (the next token of each position), ``student_spans``,
    ``teacher_spans`` (the span of each label, ``-1`` for none; from the alignment),
    ``vocabulary`` (a :class:`SharedVocabulary`, needed by ``shared_vocab`` and ``hybrid``),
    ``loss`` (``"uld"``, ``"shared_vocab"``, ``"hybrid"``; default ``"hybrid"``), ``divergence``,
    ``temperature``, ``beta``, ``alpha``, ``t2_scale`` (as :func:`kdcore.kd_loss`), ``uld_top_k``,
    ``shared_weight``, ``uld_weight`` (1.0 each), ``spans`` (``"all"``, or ``"one_to_one"`` to
    compare only the spans of one token on each side), ``reduction`` (``"mean"`` or ``"sum"``),
    ``normalizer``, ``chunk_size`` (spans per chunk) and ``backend`` (of the kd_loss kernels)."""
    fn = "cross_tokenizer_kd_loss"
    student = _checks.logits(fn, "student_logits", student_logits)
    teacher = _checks.logits(fn, "teacher_logits", teacher_logits)
    _check_3d(fn, "student_logits", student)
    _check_3d(fn, "teacher_logits", teacher)
    return _loss(fn, _Rows(logits=student.reshape(-1, student.shape[-1])),
                 _Rows(logits=teacher.detach().reshape(-1, teacher.shape[-1])),
                 tuple(student.shape[:2]), tuple(teacher.shape[:2]), **options)


def fused_linear_cross_tokenizer_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                                         student_bias: torch.Tensor | None = None,
                                         teacher_bias: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """:func:`cross_tokenizer_kd_loss` from each model's last hidden states ``[B, L, D]`` and LM
    head (``weight [V, D]``, optional ``bias [V]``) instead of its logits: each chunk's logits are
    computed, used and dropped (and recomputed in backward), so memory does not grow with
    ``tokens × vocabulary``. Gradients reach the student's hidden states, weight and bias."""
    fn = "fused_linear_cross_tokenizer_kd_loss"
    for name, hidden, weight in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        _check_3d(fn, f"{name}_hidden", hidden)
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{fn}: {name}_weight must be [vocab, {hidden.shape[-1]}] (the LM head of hidden size "
                             f"{hidden.shape[-1]}), got {tuple(weight.shape)}")
    with torch.no_grad():
        teacher_rows = _Rows(hidden=teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
                             weight=teacher_weight.detach(),
                             bias=None if teacher_bias is None else teacher_bias.detach())
    student_rows = _Rows(hidden=student_hidden.reshape(-1, student_hidden.shape[-1]), weight=student_weight,
                         bias=student_bias)
    return _loss(fn, student_rows, teacher_rows, tuple(student_hidden.shape[:2]), tuple(teacher_hidden.shape[:2]),
                 **options)


def _check_3d(fn: str, name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise ValueError(f"{fn}: {name} must be [batch, length, size], got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")


def _loss(fn: str, student: _Rows, teacher: _Rows, student_shape: tuple[int, int], teacher_shape: tuple[int, int], *,
          student_labels: torch.Tensor, teacher_labels: torch.Tensor, student_spans: torch.Tensor,
          teacher_spans: torch.Tensor, vocabulary: SharedVocabulary | None = None, loss: str = "hybrid",
          divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
          t2_scale: bool = True, uld_top_k: int | None = None, shared_weight: float = 1.0, uld_weight: float = 1.0,
          spans: str = "all", reduction: str = "mean", normalizer: float | torch.Tensor | None = None,
          chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    loss = _checks.choice(fn, "loss", loss, LOSSES)
    reduction = _checks.choice(fn, "reduction", reduction, REDUCTIONS)
    spans = _checks.choice(fn, "spans", spans, SPANS)
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"{fn}: normalizer replaces the span count of reduction='mean'; it has no meaning for "
                         f"reduction={reduction!r}")
    options = loss_options(fn, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                           t2_scale=t2_scale, kd_weight=1.0, ce_weight=0.0, ignore_index=-100, reduction="sum")
    shared_weight = _checks.non_negative(fn, "shared_weight", shared_weight)
    uld_weight = _checks.non_negative(fn, "uld_weight", uld_weight)
    weights = {"uld": {"shared": 0.0, "uld": 1.0}, "shared_vocab": {"shared": 1.0, "uld": 0.0},
               "hybrid": {"shared": shared_weight, "uld": uld_weight}}[loss]
    if uld_top_k is not None and (isinstance(uld_top_k, bool) or not isinstance(uld_top_k, int) or uld_top_k < 1):
        raise ValueError(f"{fn}: uld_top_k must be a positive int (or None for every token), got {uld_top_k!r}")
    if loss != "uld":
        if not isinstance(vocabulary, SharedVocabulary):
            raise ValueError(f"{fn}: loss={loss!r} compares the tokens both vocabularies share and needs vocabulary= "
                             "(kdcore.cross_tokenizer.shared_vocabulary(student_tokenizer, teacher_tokenizer)); "
                             "loss='uld' needs none")
        for side, ids, rows in (("student", vocabulary.student_ids, student), ("teacher", vocabulary.teacher_ids, teacher)):
            if len(ids) and int(ids.max()) >= rows.vocab:
                raise ValueError(f"{fn}: the shared vocabulary names {side} token {int(ids.max())}, but the {side}'s "
                                 f"logits have {rows.vocab} columns; was it built for other tokenizers?")
        slots, students = vocabulary.teacher_slots, len(vocabulary.student_ids)
        if slots is None:
            consistent = len(vocabulary.teacher_ids) == students
        else:
            consistent = len(slots) == len(vocabulary.teacher_ids) and (
                not len(slots) or (int(slots.min()) >= 0 and int(slots.max()) < students))
        if not consistent:
            raise ValueError(f"{fn}: the shared vocabulary is inconsistent: each teacher token needs a slot among its "
                             f"{len(vocabulary.student_ids)} student tokens (build it with shared_vocabulary or "
                             "SharedVocabulary.from_pairs)")
    student_labels, student_spans = _side(fn, "student", student_labels, student_spans, student_shape, student.vocab)
    teacher_labels, teacher_spans = _side(fn, "teacher", teacher_labels, teacher_spans, teacher_shape, teacher.vocab)
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(f"{fn}: the student has {student_shape[0]} sequences but the teacher {teacher_shape[0]}")
    device = student.tensors[0].device
    plan = _span_plan(student_spans, teacher_spans, student_shape, teacher_shape, one_to_one=spans == "one_to_one")
    temperature = options.temperature
    student_more = _continuation(student, student_labels, plan["student"], temperature, chunk_size)
    with torch.no_grad():
        teacher_more = _continuation(teacher, teacher_labels, plan["teacher"], temperature, chunk_size)
    count = len(plan["student"]["base"])
    shared = None if vocabulary is None or loss == "uld" else vocabulary.to(device)
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(student.vocab, teacher.vocab))
    kd = dict(divergence=divergence, beta=beta, alpha=alpha, backend=backend,
              scale=temperature ** 2 if options.t2_scale else 1.0)
    dtype = torch.float64 if student.tensors[0].dtype == torch.float64 else torch.float32
    total = student.tensors[0].new_zeros((), dtype=dtype)
    for begin in range(0, count, chunk):
        part = slice(begin, begin + chunk)
        args = (plan["student"]["base"][part], plan["teacher"]["base"][part], student_more[part], teacher_more[part])
        total = total + _checkpointed(
            lambda *tensors: _span_chunk(student.fused, tensors[:len(student.tensors)], teacher, *tensors[len(student.tensors):],
                                         temperature=temperature, shared=shared, weights=weights, top_k=uld_top_k, kd=kd),
            *student.tensors, *args)
    if count == 0:  # keep the graph connected (data parallelism expects a gradient for every parameter)
        total = total + sum(t.sum() * 0 for t in student.tensors if t is not None and t.requires_grad)
    if reduction == "sum":
        return total
    if normalizer is not None:  # replaces the count: the engine's share of the step's tokens
        if isinstance(normalizer, torch.Tensor):
            return total / normalizer.to(total)
        return total / _checks.positive(fn, "normalizer", normalizer)
    return total / max(count, 1)


def _side(fn: str, side: str, labels, spans, shape: tuple[int, int], vocab: int):
    for name, value in ((f"{side}_labels", labels), (f"{side}_spans", spans)):
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be an integer tensor, got "
                            f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{fn}: {name} must have the {side}'s [batch, length] shape {shape}, got "
                             f"{tuple(value.shape)}")
    labels, spans = labels.reshape(-1).long(), spans.reshape(-1).long()
    compared = spans >= 0
    bad = compared & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"{fn}: {side}_labels has {int(labels[bad][0])} at a position with a span; every compared "
                         f"label must be a token id in [0, {vocab})")
    return labels, spans


def _span_plan(student_spans: torch.Tensor, teacher_spans: torch.Tensor, student_shape, teacher_shape,
               one_to_one: bool = False) -> dict:
    """For the spans present on both sides (only those of one token on each side when
    ``one_to_one``): each side's base row (the first position of the span, whose distribution is
    compared) and its further positions with the span they extend."""
    batch = student_shape[0]
    width = max(student_shape[1], teacher_shape[1], 1)

    def ids(spans, length):
        example = torch.arange(batch, device=spans.device).repeat_interleave(length)
        return torch.where(spans >= 0, example * width + spans, -1)

    student_ids, teacher_ids = ids(student_spans, student_shape[1]), ids(teacher_spans, teacher_shape[1])
    present = torch.unique(student_ids[student_ids >= 0])  # sorted
    common = present[torch.isin(present, teacher_ids)]
    if one_to_one:
        for span_ids in (student_ids, teacher_ids):
            counts = torch.bincount(span_ids[span_ids >= 0], minlength=batch * width)
            common = common[counts[common] == 1]
    plan = {}
    for side, span_ids in (("student", student_ids), ("teacher", teacher_ids)):
        positions = torch.arange(len(span_ids), device=span_ids.device)
        kept = torch.isin(span_ids, common) & (span_ids >= 0)
        base = torch.full((batch * width,), len(span_ids), dtype=torch.long, device=span_ids.device)
        base.scatter_reduce_(0, span_ids[kept], positions[kept], reduce="amin")
        further = kept & (positions != base[span_ids.clamp_min(0)])
        slot = torch.searchsorted(common, span_ids[further])  # the span each further position extends
        plan[side] = {"base": base[common], "rows": positions[further], "slot": slot}
    return plan


def _continuation(rows: _Rows, labels: torch.Tensor, plan: dict, temperature: float, chunk_size) -> torch.Tensor:
    """Per compared span, the side's summed log-probability (at ``temperature``) of the span's
    further tokens: 0 for a one-token span."""
    count = len(plan["base"])
    dtype = torch.float64 if rows.tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(count, dtype=dtype, device=rows.tensors[0].device)
    positions = plan["rows"]
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // rows.vocab)
    for begin in range(0, len(positions), chunk):
        index = positions[begin:begin + chunk]
        value = _checkpointed(lambda *t: _label_logprobs(rows.fused, t[:-2], t[-2], t[-1], temperature),
                              *rows.tensors, index, labels.index_select(0, index))
        out = out.index_add(0, plan["slot"][begin:begin + chunk], value.to(dtype))
    return out


def _label_logprobs(fused: bool, tensors: tuple, index: torch.Tensor, labels: torch.Tensor, temperature: float):
    logits = _Rows.take(fused, tensors, index) / temperature
    return logits.gather(1, labels[:, None])[:, 0] - torch.logsumexp(logits, -1)


def _checkpointed(function, *tensors):
    """``function(*tensors)``, recomputed in backward rather than keeping its intermediates, when
    anything it reads needs a gradient."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)


def _span_chunk(student_fused: bool, student_tensors: tuple, teacher: _Rows, student_base, teacher_base, student_more,
                teacher_more, *, temperature: float, shared: SharedVocabulary | None, weights: dict, top_k,
                kd: dict) -> torch.Tensor:
    """The summed loss of one chunk of spans."""
    student = (_Rows.take(student_fused, student_tensors, student_base) / temperature).log_softmax(-1)
    with torch.no_grad():
        teacher_log = (_Rows.take(teacher.fused, teacher.tensors, teacher_base) / temperature).log_softmax(-1)
    if student.dtype != student_more.dtype:
        student, teacher_log = student.to(student_more.dtype), teacher_log.to(student_more.dtype)
    total = student.new_zeros(())
    student_mask = teacher_mask = None
    if shared is not None:
        student_mask = torch.zeros(student.shape[-1], dtype=torch.bool, device=student.device)
        student_mask[shared.student_ids] = True
        teacher_mask = torch.zeros(teacher_log.shape[-1], dtype=torch.bool, device=student.device)
        teacher_mask[shared.teacher_ids] = True
    if weights["shared"] > 0:
        student_rows = _with_tail(student, student_more, shared.student_ids, student_mask)
        teacher_rows = _with_tail(teacher_log, teacher_more, shared.teacher_ids, teacher_mask, shared.teacher_slots,
                                  len(shared.student_ids))
        divergence = kd_loss(student_rows, teacher_rows, divergence=kd["divergence"], beta=kd["beta"],
                             alpha=kd["alpha"], temperature=1.0, t2_scale=False, reduction="sum", backend=kd["backend"])
        total = total + weights["shared"] * kd["scale"] * divergence
    if weights["uld"] > 0:
        student_probs = (student + student_more[:, None]).exp()
        teacher_probs = (teacher_log + teacher_more[:, None]).exp()
        if shared is not None:  # the hybrid's ULD covers the tokens outside the shared set
            student_probs = student_probs.masked_fill(student_mask, 0.0)
            teacher_probs = teacher_probs.masked_fill(teacher_mask, 0.0)
        total = total + weights["uld"] * _sorted_l1(student_probs, teacher_probs, top_k)
    return total


def _with_tail(log_probs: torch.Tensor, more: torch.Tensor, shared_ids: torch.Tensor, shared_mask: torch.Tensor,
               slots: torch.Tensor | None = None, width: int | None = None):
    """``[S, K + 1]`` normalized log-probabilities: the merged entries of the shared tokens (those
    sharing a slot added, when ``slots`` maps them onto ``width`` slots), then the tail bucket
    ``log(1 − Σ shared)``, computed without cancellation as
    ``log((1 − e^more) + e^more · Σ_{unshared} p)``; ``-inf`` where it is empty."""
    shared = log_probs.index_select(1, shared_ids)
    if slots is not None:
        shared = _slot_logsumexp(shared, slots, width)
    shared = shared + more[:, None]
    unshared = _safe_logsumexp(log_probs.masked_fill(shared_mask, float("-inf")), -1) + more
    incomplete = torch.where(more < 0, _log1mexp(torch.where(more < 0, more, -1.0)), float("-inf"))
    tail = _safe_logsumexp(torch.stack([incomplete, unshared], -1), -1)
    return torch.cat([shared, tail[:, None]], 1)


def _slot_logsumexp(x: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
    """``[S, width]``: for each slot, the logsumexp of the columns of ``x [S, M]`` mapped to it
    (``-inf`` for a slot nothing maps to)."""
    top = x.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = x.new_zeros(x.shape[0], width).index_add_(1, slots, (x - top).exp())
    return sums.log() + top


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate on both sides of −log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that is ``-inf`` with a zero (not NaN) gradient where every entry is ``-inf``."""
    empty = torch.isneginf(x).all(dim)
    value = torch.logsumexp(x.masked_fill(empty.unsqueeze(dim), 0.0), dim)
    return value.masked_fill(empty, float("-inf"))


def _sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Σ over rows of Σ_i |sorted student_i − sorted teacher_i|, decreasing order, the shorter
    side zero-padded; only the ``top_k`` largest of each side when given."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    if top_k is not None:
        width = min(width, top_k)

    def largest(probs):
        k = min(width, probs.shape[-1])
        values = probs.topk(k, dim=-1).values if k < probs.shape[-1] else probs.sort(-1, descending=True).values
        return torch.nn.functional.pad(values, (0, width - k))

    return (largest(student_probs) - largest(teacher_probs)).abs().sum()
