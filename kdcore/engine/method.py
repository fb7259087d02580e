"""The contract between the engine and a distillation method.

A method plugin registers a factory (``kdcore_register_methods``) that turns the method's config
into a :class:`Method`. The method says *what* to train (:meth:`Method.plan`: the stages) and *how*
to score one batch (:meth:`Method.losses`: named loss terms); the engine does everything else
(models, data, optimizers, weighting and logging the terms, checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Stage:
    """One training stage, as plain data.

    ``student`` is None (the run config's student, freshly built), a reference to an earlier stage's
    trained student (``"previous"``, or ``"stage:NAME"``: keep training it), or a model spec (a
    :class:`kdcore.engine.config.ModelSpec` or a mapping of one). ``teachers`` is None (the run
    config's teachers) or a list of model specs and earlier-stage references (born-again
    generations and teacher-assistant chains teach with earlier students); an empty list is
    self-distillation.
    ``trainable`` names the models whose parameters the optimizer updates: ``"student"`` and, for
    mutual learning, teachers by position (``"teacher0"``, ...). ``epochs`` None means the run
    config's ``training.epochs``.
    """

    name: str
    epochs: int | None = None
    student: Any = None
    teachers: list[Any] | None = None
    trainable: tuple[str, ...] = ("student",)


@dataclass
class Outputs:
    """What the models produced for one batch: the student's logits, each teacher's logits (in the
    stage's teacher order), and the intermediate features the method tapped
    (:meth:`kdcore.engine.context.StageContext.tap`), keyed by ``"<model>.<layer>"``."""

    student: torch.Tensor
    teachers: list[torch.Tensor] = field(default_factory=list)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class of distillation methods. Subclasses implement :meth:`losses`; most keep the
    one-stage :meth:`plan`.

    Loss terms are normalized so that their sum over the micro-batches of an optimizer step (and
    over processes) is the full-batch mean: pass ``normalizer=ctx.normalizer`` to
    :func:`kdcore.kd_loss`, and divide a per-row sum by it (``ctx.per_row(sum)``) or a per-example
    sum by ``ctx.example_normalizer`` (``ctx.per_example(sum)``).
    """

    name: str = "method"
    #: the weight of each named term unless the run config's ``training.loss_weights`` sets it
    default_weights: Mapping[str, float] = {}

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})

    def plan(self, config: Any) -> list[Stage]:
        """The stages of a run (``config`` is the whole :class:`~kdcore.engine.config.RunConfig`),
        in order. Default: one stage with the run's student and teachers."""
        return [Stage(name=self.name)]

    def setup(self, ctx: Any) -> None:
        """Called at the start of each stage, before the optimizer is built: create extra trainable
        modules (``ctx.add_module``) or ask for intermediate features (``ctx.tap``). Default:
        nothing."""

    def prepare_batch(self, batch: Any, ctx: Any) -> Any:
        """Called on each training micro-batch (a :class:`kdcore.engine.data.Batch`, still on the
        CPU) before the step's tokens are counted and the models run; returns the batch to train
        on. Generation-based methods replace the targets here: sequence-level KD trains on the
        teacher's continuations of the prompts, on-policy KD on the student's. Default: the batch
        unchanged."""
        return batch

    def run_models(self, batch: Any, ctx: Any, trainable: tuple[str, ...]) -> Outputs:
        """The models' outputs for one training micro-batch (on the device). Default:
        ``ctx.run_models(batch, trainable, training=True)``, every model's logits. A method that
        needs something else (last hidden states for a loss that never materializes the logits)
        overrides it, calling trainable models through ``ctx.models`` so that DDP sees the calls."""
        return ctx.run_models(batch, trainable, training=True)

    def losses(self, batch: Any, outputs: Outputs, ctx: Any) -> dict[str, torch.Tensor]:
        """The named loss terms of one micro-batch (``{"kd": ..., "ce": ...}``), normalized as the
        class docstring says; the engine weights and sums them."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses(batch, outputs, ctx)")

    def teacher_logits(self, outputs: Outputs) -> torch.Tensor | None:
        """The teacher prediction the student is measured against (agreement, KL) in evaluation.
        Default: the first teacher's logits; an ensemble returns its combination."""
        return outputs.teachers[0] if outputs.teachers else None


def options_of(method: str, config: Mapping[str, Any], **defaults: Any) -> dict[str, Any]:
    """A method's options: ``defaults`` updated by ``config``; a key it does not take raises
    ``ValueError`` naming it and the keys it takes."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown config keys {unknown}; it takes {', '.join(sorted(defaults))}")
    return {**defaults, **config}
