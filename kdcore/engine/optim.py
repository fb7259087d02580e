"""Optimizer and learning-rate schedule of a stage, from the config's sections."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kdcore.engine.config import OptimizerSpec, SchedulerSpec


def build_optimizer(spec: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    parameters = list(parameters)
    if not parameters:
        raise ValueError("the stage has nothing to train: its trainable models have no parameters that require grad")
    if spec.name == "sgd":
        return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    optimizer = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return optimizer(parameters, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def build_scheduler(spec: SchedulerSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    """A ``LambdaLR`` over ``total_steps`` optimizer steps: linear warm-up, then the named decay."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.name == "constant":
            return 1.0
        if spec.name == "step":
            return spec.gamma ** ((step - spec.warmup_steps) // spec.step_size)
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if spec.name == "cosine" else 1.0 - progress
        return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
