"""The language-model suite's results (rows, sections) and how it scores its models: each student
over the held-out text's labelled next-token positions, against the one teacher and beside the
scratch student of its seed.

Per model and seed: the held-out perplexity (exp of the mean next-token cross-entropy) and the
transfer figures (:func:`kdcore.transfer.figures.figures_of`: token accuracy, agreement with and KL
to the teacher, ECE, and the inherited-error rate against the scratch student's), computed batch by
batch so no split's ``[positions, vocabulary]`` logits are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from kdcore.engine.data import call_model
from kdcore.transfer.figures import Rows, figures_of


@dataclass
class LMRow:
    """One model's results over seeds (lists in seed order; the teacher's hold one entry, as it is
    trained once)."""

    name: str
    description: str
    baseline: str | None = None  # the scratch row it is judged against
    perplexity: list[float] = field(default_factory=list)
    token_accuracy: list[float] = field(default_factory=list)
    teacher_agreement: list[float] = field(default_factory=list)
    kl_to_teacher: list[float] = field(default_factory=list)
    ece: list[float] = field(default_factory=list)
    inherited_error_rate: list[float | None] = field(default_factory=list)
    baseline_inherited_error_rate: list[float | None] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)  # the transfer figures per seed
    seconds: list[float] = field(default_factory=list)  # training wall-clock per seed
    parameters: int = 0

    def add(self, perplexity: float, figures: dict[str, Any], seconds: float) -> None:
        """Appends one seed's results."""
        self.perplexity.append(perplexity)
        self.transfer.append(figures)
        self.token_accuracy.append(figures["accuracy"])
        self.teacher_agreement.append(figures["agreement"])
        for key in ("kl_to_teacher", "ece", "inherited_error_rate", "baseline_inherited_error_rate"):
            getattr(self, key).append(figures[key])
        self.seconds.append(seconds)


@dataclass(frozen=True)
class Section:
    """One part of the language-model suite: what it measured (``text``, printed above its table)
    and its rows; a row with a ``baseline`` gets a verdict against that row."""

    name: str
    text: str
    rows: list[LMRow]


@dataclass(frozen=True)
class Score:
    """A model's perplexity and transfer figures on the held-out split."""

    perplexity: float
    figures: dict[str, Any]


def score(held_out: Dataset, teacher: nn.Module, students: Mapping[tuple[str, int], nn.Module], baseline: str,
          *, batch_size: int = 64, ignore_index: int = -100) -> tuple[Score, dict[tuple[str, int], Score]]:
    """Scores ``teacher`` and each of ``students`` (keyed by row name and seed; the row named
    ``baseline`` must have every seed) over ``held_out`` (items ``{"input_ids", "labels"}``, labels
    aligned with the logits, ``ignore_index`` where nothing is scored). Returns the teacher's score
    and each student's, its transfer figures against the teacher beside ``baseline``'s student of
    the same seed."""
    nll: dict[Any, float] = {}
    rows: dict[Any, list[Rows]] = {}
    count = 0
    with torch.no_grad():
        for batch in DataLoader(held_out, batch_size=batch_size):
            labels = batch["labels"].reshape(-1)
            inputs = {"input_ids": batch["input_ids"]}
            teacher_logits = _flat(call_model(teacher, inputs))
            logits = {key: _flat(call_model(model, inputs)) for key, model in students.items()}
            count += int((labels != ignore_index).sum())
            scored = {"teacher": (teacher_logits, None)}
            scored.update({key: (value, logits[baseline, key[1]]) for key, value in logits.items()})
            for key, (model_logits, baseline_logits) in scored.items():
                nll[key] = nll.get(key, 0.0) + float(F.cross_entropy(model_logits, labels, ignore_index=ignore_index,
                                                                     reduction="sum"))
                rows.setdefault(key, []).append(Rows.of(model_logits, teacher_logits, labels,
                                                        baseline_logits=baseline_logits, ignore_index=ignore_index))
    scores = {key: Score(math.exp(nll[key] / count), figures_of(Rows.cat(parts))) for key, parts in rows.items()}
    return scores.pop("teacher"), scores


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` logits as rows ``[B * L, V]``, one per position."""
    return logits.reshape(-1, logits.shape[-1])
