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

    ``student`` and each of ``teachers`` is a model spec: a config mapping, an import path, or
    ``"previous"`` for the student the previous stage trained (born-again, teacher-assistant
    chains). ``teachers`` may be empty (self-distillation). ``trainable`` names the models whose
    parameters the optimizer updates (several for mutual learning).
    """

    name: str
    epochs: int = 1
    student: Any = None
    teachers: list[Any] = field(default_factory=list)
    trainable: tuple[str, ...] = ("student",)


@dataclass
class Outputs:
    """What the models produced for one batch: the student's logits, each teacher's logits (in the
    stage's teacher order), and any intermediate features the method asked the engine to tap,
    keyed by ``"<model>.<layer>"``."""

    student: torch.Tensor
    teachers: list[torch.Tensor] = field(default_factory=list)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class of distillation methods. Subclasses implement :meth:`losses`; most keep the
    one-stage :meth:`plan`."""

    name: str = "method"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})

    def plan(self) -> list[Stage]:
        """The stages of a run, in order. Default: one stage of ``config["epochs"]`` (1) epochs."""
        return [Stage(name=self.name, epochs=int(self.config.get("epochs", 1)))]

    def setup(self, ctx: Any) -> None:
        """Called at the start of each stage, before the optimizer is built: create extra trainable
        modules or ask for intermediate features here. Default: nothing."""

    def losses(self, batch: Any, outputs: Outputs, ctx: Any) -> dict[str, torch.Tensor]:
        """The named loss terms of one batch (``{"kd": ..., "ce": ...}``); the engine sums them."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses(batch, outputs, ctx)")
