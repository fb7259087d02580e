"""The ``reasoning_kd`` method: distilling rationales and answers ("Distilling Step-by-Step",
Hsieh et al., 2023; chain-of-thought distillation).

The student learns to produce a rationale followed by the answer. Targets are the teacher's
continuations of each prompt (``source: teacher``: the teacher writes rationale and answer) or the
dataset's own continuations (``source: data``: rationales written beforehand, e.g. by a larger
model, as in the paper). The ``answer_marker`` token sequence separates the two: in each target,
the marker's first occurrence and everything after it is the answer, everything before it the
rationale (a target without the marker is all rationale). The two parts are separate terms,
``rationale`` and ``answer`` (cross-entropy summed over their tokens, divided by the step's
labelled tokens, so with equal weights their sum is the plain per-token cross-entropy), weighted
by ``rationale_weight`` and ``answer_weight``: the paper's multi-task weighting of rationale
generation against label prediction. ``kd_weight`` > 0 adds token-level distillation of the
teacher's distributions on the same targets (term ``kd``).

A ``answer_marker`` string stands for its UTF-8 bytes (byte-level vocabularies, such as the
``text`` dataset's); for a tokenized vocabulary give the marker's token ids as a list.

Config keys: ``answer_marker`` (required), ``source`` ("teacher"), ``rationale_weight`` (1.0),
``answer_weight`` (1.0), ``kd_weight`` (0.0) with ``divergence`` ("forward_kl") or ``loss`` (any
registered loss), ``temperature`` (1.0), ``beta``, ``alpha``; and, for ``source: teacher``,
``max_new_tokens`` (64), ``do_sample`` (false), ``generation_temperature``, ``top_p``,
``num_beams``, ``eos_token_id``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kdcore
from kdcore import _checks
from kdcore.engine.data import call_model
from kdcore.engine.method import Outputs, options_of
from kdcore.engine.named_loss import chosen_loss
from kdcore.integrations.generation import continue_prompts, require_generate
from kdcore_plugins.common import GENERATION_DEFAULTS, generation_options

DEFAULTS = dict(GENERATION_DEFAULTS, answer_marker=None, source="teacher", rationale_weight=1.0, answer_weight=1.0,
                kd_weight=0.0, loss=None, divergence="forward_kl", temperature=1.0, beta=0.5, alpha=0.1)


def marker_ids(marker) -> list[int]:
    """The answer marker as token ids: a string's UTF-8 bytes, or a list of ids."""
    if isinstance(marker, str) and marker:
        return list(marker.encode("utf-8"))
    if isinstance(marker, (list, tuple)) and marker and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in marker):
        return list(marker)
    raise ValueError(f"reasoning_kd: answer_marker must be a non-empty string (its UTF-8 bytes) or a list of token "
                     f"ids, got {marker!r}")


def answer_mask(labels: torch.Tensor, marker: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """True at the labelled positions of ``labels [B, L]`` from the first occurrence of ``marker``
    on (the answer); False elsewhere."""
    labelled = labels != ignore_index
    if labels.shape[1] < len(marker):
        return torch.zeros_like(labelled)
    hits = (labels.unfold(1, len(marker), 1) == marker).all(-1)
    start = torch.where(hits.any(1), hits.int().argmax(1), labels.shape[1])
    return labelled & (torch.arange(labels.shape[1], device=labels.device) >= start[:, None])


class ReasoningKD(kdcore.Method):
    name = "reasoning_kd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        self.marker = marker_ids(options["answer_marker"])
        if options["source"] not in ("teacher", "data"):
            raise ValueError(f"reasoning_kd: source must be 'teacher' (the teacher writes rationales and answers) or "
                             f"'data' (the dataset's), got {options['source']!r}")
        self.source = options["source"]
        self.generation = generation_options(self.name, options)
        self.temperature = options["temperature"]
        self.loss = chosen_loss(self.name, self.config, options)
        self.loss.check(self.name, self.temperature)
        kd_weight = _checks.non_negative(self.name, "kd_weight", options["kd_weight"])
        for key in ("rationale_weight", "answer_weight"):
            if isinstance(options[key], bool) or not isinstance(options[key], (int, float)) or options[key] < 0:
                raise ValueError(f"reasoning_kd: {key} must be a number >= 0, got {options[key]!r}")
        self.default_weights = {"rationale": float(options["rationale_weight"]),
                                "answer": float(options["answer_weight"])}
        if kd_weight > 0:
            self.default_weights["kd"] = kd_weight

    @property
    def needs_teacher(self) -> bool:
        return self.source == "teacher" or "kd" in self.default_weights

    def plan(self, config):
        if not self.needs_teacher:
            return [kdcore.Stage(self.name, teachers=[])]  # the rationales are in the data
        if not config.teachers:
            raise ValueError("reasoning_kd with source: teacher (or kd_weight > 0) needs a teacher: list one under "
                             "teachers in the run config")
        return [kdcore.Stage(self.name)]

    def setup(self, ctx):
        if self.source == "teacher":
            require_generate(ctx.raw("teacher0"), self.name)

    def prepare_batch(self, batch, ctx):
        if self.source == "data":
            return batch
        return continue_prompts(ctx.raw("teacher0"), batch, ctx.ignore_index, self.generation, method=self.name)

    def run_models(self, batch, ctx, trainable):
        if "kd" in self.default_weights:
            return super().run_models(batch, ctx, trainable)
        return Outputs(call_model(ctx.models["student"], batch.inputs))

    def losses(self, batch, outputs, ctx):
        if batch.labels is None:
            raise ValueError("reasoning_kd: the dataset gives no labels to mark prompts and targets")
        logits = outputs.student
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                                    ignore_index=ctx.ignore_index, reduction="none").reshape(batch.labels.shape)
        answer = answer_mask(batch.labels, torch.tensor(self.marker, device=batch.labels.device), ctx.ignore_index)
        terms = {"rationale": ctx.per_row(per_token.masked_fill(answer, 0).sum()),
                 "answer": ctx.per_row(per_token.masked_fill(~answer, 0).sum())}
        if "kd" in self.default_weights:
            terms["kd"] = self.loss(logits, outputs.teachers[0], labels=batch.labels, ignore_index=ctx.ignore_index,
                                    temperature=self.temperature, normalizer=ctx.normalizer)
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("reasoning_kd", ReasoningKD, description="Hsieh et al. 2023: rationales + answers as targets (the "
                                                      "teacher's or the data's), weighted apart")
