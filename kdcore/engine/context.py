"""What a method sees of a running stage."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdcore.engine.data import Batch, call_model
from kdcore.engine.method import Outputs


class StageContext:
    """The models of one stage and the numbers a method needs to normalize its loss terms.

    ``normalizer`` / ``example_normalizer``: see :class:`kdcore.Method`; ``ignore_index``: the
    label of positions to skip (the config's ``data.ignore_index``); ``epoch`` and ``step`` (optimizer
    steps from 0 within the stage) locate the current batch.

    ``models`` maps ``"student"``, ``"teacher0"``, ``"teacher1"``, ... to the modules to call (under
    DDP, a trainable model is its ``DistributedDataParallel`` wrapper), and ``modules`` holds the
    extra modules the method added; call both through the context, not through references kept
    from :meth:`kdcore.Method.setup`, so that multi-process training sees the calls. ``sharded``
    says the models are sharded over the processes (``training.parallel: fsdp``): their parameters
    are then ``DTensor`` shards outside forward passes, and a model cannot be deep-copied: the
    engine passes ``copier`` (a role to a frozen sharded copy), which :meth:`frozen_copy` uses.
    """

    def __init__(self, run: Any, stage: Any, index: int, device: torch.device, models: dict[str, nn.Module], *,
                 copier: Callable[[str], nn.Module] | None = None) -> None:
        self.run, self.stage, self.index, self.device = run, stage, index, device
        self.models = dict(models)
        self.modules: dict[str, nn.Module] = {}
        self.trainable_modules: set[str] = set()
        self.epoch = 0
        self.step = 0
        self.normalizer = 1.0
        self.example_normalizer = 1.0
        self.ignore_index = -100
        self.sharded = copier is not None
        self.features: dict[str, torch.Tensor] = {}
        self.example: Batch | None = None  # two training examples, for dry_run
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._raw = dict(models)  # the unwrapped modules, which taps and checkpoints use
        self._copier = copier  # how a sharded run copies a model (a sharded model cannot be deep-copied)

    @property
    def student(self) -> nn.Module:
        return self.models["student"]

    @property
    def teachers(self) -> list[nn.Module]:
        return [self.models[f"teacher{i}"] for i in range(len(self.models) - 1)]

    def per_row(self, total: torch.Tensor) -> torch.Tensor:
        """A sum over this micro-batch's kept rows, as its share of the full-batch per-row mean."""
        return total / self.normalizer

    def per_example(self, total: torch.Tensor) -> torch.Tensor:
        """A sum over this micro-batch's examples, as its share of the full-batch per-example mean."""
        return total / self.example_normalizer

    def add_module(self, name: str, module: nn.Module, *, trainable: bool = True) -> None:
        """Adds an extra module to the stage (a FitNets regressor, an exit head, an EMA copy): moved
        to the stage's device, saved in checkpoints, and trained with the student when
        ``trainable``. Use it as ``ctx.modules[name]``."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"add_module({name!r}, ...) expects an nn.Module, got {type(module).__name__}")
        if name in self.modules:
            raise ValueError(f"add_module: a module named {name!r} was already added in this stage")
        module = module.to(self.device)
        self.modules[name] = module
        self._raw[f"module:{name}"] = module
        if trainable:
            self.trainable_modules.add(name)
        else:
            module.requires_grad_(False)

    def frozen_copy(self, model: str) -> nn.Module:
        """A frozen copy of ``model`` (``"student"``, ``"teacher0"``, ...): same weights, no
        gradients, eval mode, on the stage's device. In a sharded run it is sharded the way frozen
        teachers are (a sharded model cannot be deep-copied). Refresh it with
        ``copy.load_state_dict(ctx.raw(model).state_dict())``."""
        if model not in self.models:
            raise ValueError(f"frozen_copy: unknown model {model!r}; this stage has {', '.join(self.models)}")
        if self._copier is not None:
            return self._copier(model)
        return copy.deepcopy(self._raw[model]).requires_grad_(False).eval()

    def tap(self, model: str, layer: str) -> str:
        """Records the output of ``layer`` (a submodule path such as ``"layer3"`` or
        ``"blocks.5.mlp"``) of ``model`` (``"student"``, ``"teacher0"``, ...) on every forward pass,
        without editing the model; it appears in ``outputs.features`` under the returned key
        ``"<model>.<layer>"``."""
        if model not in self.models:
            raise ValueError(f"tap: unknown model {model!r}; this stage has {', '.join(self.models)}")
        try:
            submodule = self._raw[model].get_submodule(layer)
        except AttributeError:
            names = [name for name, _ in self._raw[model].named_modules() if name][:20]
            raise ValueError(f"tap: {model} has no submodule {layer!r}; it has {', '.join(names)}") from None
        key = f"{model}.{layer}"

        def record(_module, _inputs, output):
            self.features[key] = output

        self._hooks.append(submodule.register_forward_hook(record))
        return key

    def run_models(self, batch: Batch, trainable: Sequence[str] = (), *, training: bool = False) -> Outputs:
        """Runs the stage's models on ``batch``. In training, models go through ``models`` (the DDP
        wrappers) and teachers not in ``trainable`` run under no_grad; otherwise every model runs
        unwrapped (no DDP collectives, so evaluation shards may differ in length). Teachers read
        the batch's teacher view when it has one (another tokenization of the same text)."""
        self.features.clear()
        call = self.models.__getitem__ if training else self.raw
        student = call_model(call("student"), batch.inputs)
        teachers = []
        for role in [r for r in self.models if r != "student"]:
            with torch.set_grad_enabled(training and role in trainable and torch.is_grad_enabled()):
                teachers.append(call_model(call(role), batch.seen_by(role).inputs))
        return Outputs(student, teachers, dict(self.features))

    def dry_run(self) -> Outputs:
        """The models' outputs and tapped features on two training examples, without gradients or
        mode changes: for :meth:`kdcore.Method.setup` to size the modules it adds (a regressor from
        student to teacher features) before the optimizer is built."""
        if self.example is None:
            raise RuntimeError("dry_run: the engine has not given this context an example batch")
        modes = {name: self._raw[name].training for name in self.models}
        try:
            for name in self.models:
                self._raw[name].eval()
            with torch.no_grad():
                return self.run_models(self.example.to(self.device))
        finally:
            for name, mode in modes.items():
                self._raw[name].train(mode)

    def raw(self, name: str) -> nn.Module:
        """The unwrapped model (``"student"``, ``"teacher0"``, ...) or extra module
        (``"module:<name>"``)."""
        return self._raw[name]

    def close(self) -> None:
        """Removes the taps."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
