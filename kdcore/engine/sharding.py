"""A stage's models under ``training.parallel: fsdp``: sharded with FSDP2, checkpointed by shards.

The stage's models are sharded as soon as they are built (before the preflight check and the
method's ``setup``, which then run on sharded models); the trainable modules a method adds are
sharded after ``setup``, before the optimizer is built over the sharded parameters. See
:mod:`kdcore.parallel.fsdp` for what is sharded and how.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.engine.config import ConfigError, FsdpSpec
from kdcore.engine.distributed import Processes
from kdcore.engine.rundir import RunDirectoryError
from kdcore.parallel import fsdp, sharded_checkpoint


class Sharding:
    """Shards ``models`` (role -> module, built on the CPU) over every process, each onto this
    process's device: the roles in ``trainable`` for training, the others for inference."""

    def __init__(self, procs: Processes, options: FsdpSpec | None, models: Mapping[str, nn.Module],
                 trainable: Collection[str]) -> None:
        self.options = options or FsdpSpec()
        unknown = fsdp.unknown_block_names(models.values(), self.options.shard_modules)
        if unknown:
            present = sorted({type(m).__name__ for model in models.values() for m in model.modules()})
            raise ConfigError(f"training.fsdp.shard_modules: {', '.join(unknown)} is no module class (misspelled?); "
                              f"this stage's models have {', '.join(present[:30])}")
        self.mesh = fsdp.mesh(procs.device, procs.world_size)
        self.blocks: dict[str, int] = {}
        for role, model in models.items():
            self.blocks[role] = self._shard(model, trainable=role in trainable,
                                            blocks=fsdp.block_names(model) | set(self.options.shard_modules))

    def _shard(self, model: nn.Module, *, trainable: bool, blocks) -> int:
        return fsdp.shard(model, self.mesh, blocks=blocks, trainable=trainable,
                          mp_policy=fsdp.precision_policy(self.options.mixed_precision),
                          reshard_after_forward=self.options.reshard_after_forward)

    def shard_added_modules(self, ctx: Any) -> None:
        """Shards the trainable modules the method added in ``setup`` (regressors, exit heads) at
        their root; frozen ones hold only what is sharded already (``ctx.frozen_copy``) or stay
        whole on every process."""
        for name in sorted(ctx.trainable_modules):
            module = ctx.modules[name]
            if any(p.requires_grad for p in module.parameters()):
                self._shard(module, trainable=True, blocks=self.options.shard_modules)

    def frozen_copy(self, build: Callable[[], nn.Module], live: nn.Module) -> nn.Module:
        """A frozen copy of the sharded model ``live``: ``build()`` makes another one like it on the
        CPU, which is sharded for inference and given ``live``'s weights shard by shard."""
        model = build().requires_grad_(False).eval()
        self._shard(model, trainable=False, blocks=fsdp.block_names(model) | set(self.options.shard_modules))
        model.load_state_dict(live.state_dict())
        return model

    def describe(self) -> str:
        """One line saying how the models were sharded, for the run log."""
        parts = [f"{role} ({count} blocks + root)" for role, count in self.blocks.items()]
        return f"FSDP over {self.mesh.size()} processes: " + ", ".join(parts)

    @staticmethod
    def release(models: Mapping[str, nn.Module]) -> None:
        """Frees the parameters the models' last forward passes gathered and still hold."""
        for model in models.values():
            fsdp.reshard(model)

    @staticmethod
    def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s whole state dict on the first process (every process calls this)."""
        return fsdp.full_state_dict(model)

    @staticmethod
    def save(path: Path, ctx: Any, optimizer: torch.optim.Optimizer) -> dict[str, list[int]]:
        """Writes the stage's models', added modules' and optimizer's shards to ``path``; returns
        the directory's manifest. A failed write (a full disk) is one line naming the directory."""
        try:
            return sharded_checkpoint.save(path, _everything(ctx), optimizer)
        except Exception as exc:  # DCP wraps each process's failure; its first line names the cause
            raise RunDirectoryError(f"cannot write the model shards into {path.parent} ({_first_line(exc)}); the "
                                    "last checkpoint is intact: free space or fix the directory, then resume") from None

    @staticmethod
    def load(path: Path, ctx: Any, optimizer: torch.optim.Optimizer) -> None:
        try:
            sharded_checkpoint.load(path, _everything(ctx), optimizer)
        except Exception as exc:
            raise RunDirectoryError(f"cannot load the model shards {path} ({_first_line(exc)}); they do not fit "
                                    "this run's models, or were changed since they were written") from None


def _everything(ctx: Any) -> nn.Module:
    """The stage's models and added modules under one module, so that their state has one set of
    names (``roles.student.…``, ``added.regressor0.…``) that the optimizer's state follows."""
    return nn.ModuleDict({
        "roles": nn.ModuleDict({role: ctx.raw(role) for role in ctx.models}),
        "added": nn.ModuleDict({name: ctx.raw(f"module:{name}") for name in ctx.modules}),
    })


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
