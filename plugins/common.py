"""Pieces the built-in methods share (not a plugin itself: it registers nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdcore import _checks
from kdcore.engine.named_loss import chosen_loss
from kdcore.engine.terms import cross_entropy
from kdcore.integrations.generation import GenerationOptions

#: the options of the response-KD term, with Hinton et al.'s defaults (``loss`` None: ``divergence`` chooses)
RESPONSE_DEFAULTS = dict(temperature=4.0, loss=None, divergence="forward_kl", beta=0.5, alpha=0.1, kd_weight=0.9,
                         ce_weight=0.1)


class ResponseTerms:
    """``kd``: the config's loss between student and teacher logits (``loss: NAME``, any registered
    loss, or ``divergence``: a fused :func:`kdcore.kd_loss` divergence, T²-scaled); ``ce``:
    cross-entropy on the labels, present when its weight is positive. Weights go to the method's
    ``default_weights``. ``config`` is the method's section as the run config sets it, ``options``
    the same with the defaults (see :func:`kdcore.engine.named_loss.chosen_loss`)."""

    def __init__(self, method: str, config: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        self.method = method
        self.temperature = options["temperature"]
        self.loss = chosen_loss(method, config, options)
        self.loss.check(method, self.temperature)
        self.weights = {"kd": _checks.non_negative(method, "kd_weight", options["kd_weight"]),
                        "ce": _checks.non_negative(method, "ce_weight", options["ce_weight"])}

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, batch, ctx) -> dict[str, torch.Tensor]:
        terms = {"kd": self.loss(student, teacher, labels=batch.labels, ignore_index=ctx.ignore_index,
                                 temperature=self.temperature, normalizer=ctx.normalizer)}
        if self.weights["ce"] > 0:
            terms["ce"] = cross_entropy(student, batch.labels, ctx, method=self.method)
        return terms


#: the config keys of a method that generates continuations (see GenerationOptions)
GENERATION_DEFAULTS = dict(max_new_tokens=64, do_sample=False, generation_temperature=1.0, top_p=1.0, num_beams=1,
                           eos_token_id=None)


def generation_options(method: str, options: Mapping[str, Any]) -> GenerationOptions:
    """The checked :class:`GenerationOptions` of a method's config (``generation_temperature`` is
    the sampling temperature, apart from the loss's ``temperature``)."""
    chosen = GenerationOptions(max_new_tokens=options["max_new_tokens"], do_sample=bool(options["do_sample"]),
                               temperature=float(options["generation_temperature"]), top_p=float(options["top_p"]),
                               num_beams=options["num_beams"], eos_token_id=options["eos_token_id"])
    chosen.check(method)
    return chosen


def on_policy_step(ctx, lmbda: float) -> bool:
    """Whether the current optimizer step trains on the student's own samples: drawn with
    probability ``lmbda`` from the run's seed, the stage and the step, so every process and
    micro-batch agrees and a resumed run draws the same."""
    generator = torch.Generator().manual_seed(ctx.run.config.seed * 1_000_003 + ctx.index * 7_919 + ctx.step)
    return bool(torch.rand((), generator=generator) < lmbda)


def hidden_state_outputs(batch, ctx):
    """Outputs for the fused LM-head losses: the last hidden states stand in for the logits, and
    ``features`` hold ``(hidden, head weight, bias)`` of ``"student"`` (called through
    ``ctx.models``, so DDP sees it) and of ``"teacher0"`` (under no_grad, on the batch as the
    teacher reads it)."""
    from kdcore.engine.method import Outputs
    from kdcore.integrations.transformers import hidden_states_and_head

    student = hidden_states_and_head(ctx.models["student"], ctx.raw("student"), batch.inputs)
    with torch.no_grad():
        teacher = hidden_states_and_head(ctx.raw("teacher0"), ctx.raw("teacher0"), batch.seen_by("teacher0").inputs)
    return Outputs(student=student[0], teachers=[teacher[0]], features={"student": student, "teacher0": teacher})


def without_teachers(method: str, config) -> list:
    """The (empty) teacher list of a method that trains without a teacher; teachers in the run
    config would be ignored, so they are an error instead."""
    if config.teachers:
        raise ValueError(f"{method} trains without a teacher, but the run config lists {len(config.teachers)}; "
                         "remove them (teachers: [])")
    return []


def layer_pairs(method: str, value: Any, key: str = "layers") -> list[tuple[str, str]]:
    """``[[student_layer, teacher_layer], ...]`` from a config, checked."""
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in value):
        raise ValueError(f"{method}: {key} must be a non-empty list of [student_layer, teacher_layer] pairs, "
                         f"got {value!r}")
    return [tuple(pair) for pair in value]


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Features as one vector per example: spatial maps ``[N, C, H, W]`` averaged over space,
    sequences ``[N, L, D]`` over positions."""
    if features.dim() == 4:
        return features.mean((2, 3))
    if features.dim() == 3:
        return features.mean(1)
    return features


def width(features: torch.Tensor) -> int:
    """The feature size: channels of a ``[N, C, H, W]`` map, else the last dimension (``[N, D]``,
    ``[N, L, D]``)."""
    return features.shape[1] if features.dim() == 4 else features.shape[-1]


def positions(features: torch.Tensor) -> tuple[int, ...]:
    """The positions a feature size is given at: the spatial map, or the sequence."""
    return tuple(features.shape[2:] if features.dim() == 4 else features.shape[1:-1])


def linear_for(source: torch.Tensor, target_width: int) -> nn.Module:
    """A module mapping features shaped like ``source`` to ``target_width`` features at the same
    positions: a 1×1 convolution for spatial maps, a linear layer otherwise."""
    if source.dim() == 4:
        return nn.Conv2d(source.shape[1], target_width, kernel_size=1, bias=False)
    return nn.Linear(source.shape[-1], target_width)
