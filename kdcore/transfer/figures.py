"""The transfer figures: what a student inherits from its teacher, computed from logits.

Accuracy and agreement say how close a student came to its teacher; they do not say *what* it
took from it. These figures do: whether the student repeats the teacher's mistakes (the
inherited-error rate, against a baseline trained without the teacher), whether it is better where
the teacher is good (the per-class gap against the teacher's per-class accuracy), and how its
calibration compares (ECE and the reliability diagram). Definitions: docs/transfer.md.

Each scored row (an example; a token position for a language model) is reduced to a few numbers
(:class:`Rows`), so a held-out split is scored batch by batch without keeping its logits
(``[N, V]`` floats for a language model's vocabulary ``V``): :func:`transfer_figures` does both
steps on whole tensors, :func:`figures_of` the second on rows gathered by :meth:`Rows.cat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kdcore.functional import kd_loss

#: what :func:`figures_of` gives of the student, and of the baseline with the prefix ``baseline_``
MODEL_KEYS = ("accuracy", "agreement", "kl_to_teacher", "ece", "reliability")
#: up to this many classes, ``per_class`` lists every class (an absent one as None); beyond it (a
#: language model's vocabulary), only the classes that occur among the labels
LISTED_CLASSES = 1000


@dataclass(frozen=True)
class Predictions:
    """One model on each scored row: its top-1 class, that class's probability, and
    KL(teacher ‖ model) at temperature 1 in nats."""

    prediction: torch.Tensor  # int64 [N]
    confidence: torch.Tensor  # float64 [N]
    kl: torch.Tensor  # float64 [N]

    @classmethod
    def of(cls, logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> Predictions:
        """The predictions of ``logits [N, C]``; ``teacher_logits`` None: the teacher's own (KL 0)."""
        rows = logits.detach().float()
        top_log_prob, prediction = rows.log_softmax(-1).max(-1)
        if teacher_logits is None or rows.shape[0] == 0:
            kl = torch.zeros(rows.shape[0])
        else:
            kl = kd_loss(rows, teacher_logits.detach().float(), divergence="forward_kl", reduction="none")
        return cls(prediction.cpu(), top_log_prob.exp().double().cpu(), kl.detach().double().cpu())

    @classmethod
    def cat(cls, parts: list[Predictions]) -> Predictions:
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("prediction", "confidence", "kl")))


@dataclass(frozen=True)
class Rows:
    """What the figures read of the scored rows (labels that are not ``ignore_index``): the
    labels, the teacher's, the student's and optionally the baseline's :class:`Predictions`, and
    the number of classes of the logits."""

    labels: torch.Tensor  # int64 [N]
    teacher: Predictions
    student: Predictions
    baseline: Predictions | None
    classes: int

    @classmethod
    def of(cls, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
           baseline_logits: torch.Tensor | None = None, ignore_index: int = -100) -> Rows:
        """The rows of ``[N, C]`` logits and ``[N]`` labels (checked: an error names the argument
        that does not fit), without those labelled ``ignore_index``."""
        _check_logits("student_logits", student_logits, None)
        _check_logits("teacher_logits", teacher_logits, student_logits)
        if baseline_logits is not None:
            _check_logits("baseline_logits", baseline_logits, student_logits)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor [N], got {_describe(labels)}")
        rows, classes = student_logits.shape
        if labels.shape[0] != rows:
            raise ValueError(f"labels has {labels.shape[0]} rows but student_logits has {rows}")
        keep = labels != ignore_index
        kept = labels[keep]
        bad = kept[(kept < 0) | (kept >= classes)]
        if bad.numel():
            raise ValueError(f"labels must be class ids in [0, {classes}) or ignore_index ({ignore_index}); found "
                             f"{int(bad[0])}")
        keep = keep.to(student_logits.device)
        teacher = teacher_logits[keep]
        return cls(kept.long().cpu(), Predictions.of(teacher, None), Predictions.of(student_logits[keep], teacher),
                   None if baseline_logits is None else Predictions.of(baseline_logits[keep], teacher), classes)

    @classmethod
    def cat(cls, parts: list[Rows]) -> Rows:
        """The rows of several batches, in order."""
        if not parts:
            raise ValueError("no rows to join")
        if len({part.classes for part in parts}) != 1 or len({part.baseline is None for part in parts}) != 1:
            raise ValueError("the batches' rows differ in their class count or in having a baseline")
        baseline = None if parts[0].baseline is None else Predictions.cat([part.baseline for part in parts])
        return cls(torch.cat([part.labels for part in parts]), Predictions.cat([part.teacher for part in parts]),
                   Predictions.cat([part.student for part in parts]), baseline, parts[0].classes)


def transfer_figures(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                     baseline_logits: torch.Tensor | None = None, ignore_index: int = -100,
                     bins: int = 15) -> dict[str, Any]:
    """What the student (``student_logits [N, C]``) inherits from its teacher (``teacher_logits
    [N, C]``) on the rows whose ``labels [N]`` are not ``ignore_index`` (a language model's tokens
    flattened to rows), beside a ``baseline`` (the same student trained without the teacher);
    ECE over ``bins`` equal-width confidence bins. Returns plain numbers, lists and None (JSON
    as it is); the keys are those of :func:`figures_of`."""
    return figures_of(Rows.of(student_logits, teacher_logits, labels, baseline_logits=baseline_logits,
                              ignore_index=ignore_index), bins=bins)


def figures_of(rows: Rows, *, bins: int = 15) -> dict[str, Any]:
    """The figures of :class:`Rows` (docs/transfer.md defines each):

    * ``rows``, ``classes``, ``bins``: what they were computed over;
    * ``accuracy``, ``agreement``, ``kl_to_teacher``, ``ece``, ``reliability``: the student's;
      ``baseline_accuracy``, ... the same for the baseline (None without one);
    * ``teacher_accuracy``, ``teacher_ece``;
    * ``teacher_errors``: rows the teacher gets wrong; ``inherited_error_rate`` (and
      ``baseline_inherited_error_rate``): the share of them where the model predicts the teacher's
      wrong class (None when the teacher makes no error, or without a baseline);
    * ``per_class``: ``classes`` (the class ids the lists are indexed by), ``restricted`` (only
      the classes among the labels, past :data:`LISTED_CLASSES` classes), ``count`` and the
      ``teacher``, ``student`` and ``baseline`` accuracy per class (None for a class absent from
      the labels; ``baseline`` None without one);
    * ``gap_teacher_correlation``: Pearson's r over the classes present of the student's
      per-class gap over the baseline with the teacher's per-class accuracy (None without a
      baseline, with fewer than two classes, or when either is constant).
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    n = rows.labels.numel()
    if n == 0:
        raise ValueError("labels: every row is ignore_index, so there is nothing to score")
    teacher = rows.teacher.prediction
    errors = teacher != rows.labels
    out: dict[str, Any] = {"rows": n, "classes": rows.classes, "bins": bins}
    out.update(_model(rows.student, rows.labels, teacher, bins))
    baseline = None if rows.baseline is None else _model(rows.baseline, rows.labels, teacher, bins)
    out.update({f"baseline_{key}": None if baseline is None else baseline[key] for key in MODEL_KEYS})
    out["teacher_accuracy"] = _mean(~errors)
    out["teacher_ece"] = _calibration(rows.teacher.confidence, rows.teacher.prediction == rows.labels, bins)[0]
    out["teacher_errors"] = int(errors.sum())
    out["inherited_error_rate"] = _inherited(rows.student, teacher, errors)
    out["baseline_inherited_error_rate"] = None if rows.baseline is None else _inherited(rows.baseline, teacher, errors)
    out["per_class"] = per_class = _per_class(rows)
    out["gap_teacher_correlation"] = None if rows.baseline is None else _gap_correlation(per_class)
    return out


def _model(predictions: Predictions, labels: torch.Tensor, teacher: torch.Tensor, bins: int) -> dict[str, Any]:
    correct = predictions.prediction == labels
    ece, reliability = _calibration(predictions.confidence, correct, bins)
    return {"accuracy": _mean(correct), "agreement": _mean(predictions.prediction == teacher),
            "kl_to_teacher": float(predictions.kl.mean()), "ece": ece, "reliability": reliability}


def _calibration(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> tuple[float, list[dict[str, Any]]]:
    """ECE and the reliability diagram's bins: bin ``b`` holds confidences in ``[b/bins,
    (b+1)/bins)`` (1.0 in the last), as :class:`kdcore.engine.metrics.Meter` bins them."""
    index = (confidence * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.bincount(index, confidence, minlength=bins)
    correct_sum = torch.bincount(index, correct.double(), minlength=bins)
    ece = float((confidence_sum - correct_sum).abs().sum()) / confidence.numel()
    reliability = [{"lower": b / bins, "upper": (b + 1) / bins,
                    "confidence": float(confidence_sum[b] / count[b]) if count[b] else None,
                    "accuracy": float(correct_sum[b] / count[b]) if count[b] else None,
                    "count": int(count[b])} for b in range(bins)]
    return ece, reliability


def _inherited(predictions: Predictions, teacher: torch.Tensor, errors: torch.Tensor) -> float | None:
    if not errors.any():
        return None
    return _mean(predictions.prediction[errors] == teacher[errors])


def _per_class(rows: Rows) -> dict[str, Any]:
    restricted = rows.classes > LISTED_CLASSES
    every_count = torch.bincount(rows.labels, minlength=rows.classes)
    classes = every_count.nonzero()[:, 0] if restricted else torch.arange(rows.classes)
    count = every_count[classes]

    def accuracy(predictions: Predictions | None) -> list[float | None] | None:
        if predictions is None:
            return None
        correct = torch.bincount(rows.labels, (predictions.prediction == rows.labels).double(), minlength=rows.classes)
        share = (correct[classes] / count.clamp(min=1)).tolist()
        return [value if n else None for value, n in zip(share, count.tolist())]

    return {"classes": classes.tolist(), "restricted": restricted, "count": count.tolist(),
            "teacher": accuracy(rows.teacher), "student": accuracy(rows.student), "baseline": accuracy(rows.baseline)}


def _gap_correlation(per_class: dict[str, Any]) -> float | None:
    present = [(student - baseline, teacher) for student, baseline, teacher
               in zip(per_class["student"], per_class["baseline"], per_class["teacher"]) if teacher is not None]
    if len(present) < 2:
        return None
    gap, teacher = torch.tensor(present, dtype=torch.float64).unbind(1)
    gap, teacher = gap - gap.mean(), teacher - teacher.mean()
    scale = math.sqrt(float(gap.square().sum()) * float(teacher.square().sum()))
    return float((gap * teacher).sum()) / scale if scale > 0 else None


def _mean(flags: torch.Tensor) -> float:
    return float(flags.double().mean())


def _check_logits(name: str, logits: Any, like: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, C], got {_describe(logits)}")
    if like is not None and logits.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(logits.shape)} but student_logits has {tuple(like.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has no classes (shape {tuple(logits.shape)})")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}"
    return type(value).__name__
