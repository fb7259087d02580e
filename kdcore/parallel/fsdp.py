"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a run's models.

A model is sharded block by block, then at its root: each block's parameters are gathered just
before the block runs and freed after it (and again for backward), so a process holds whole
parameters of one block at a time plus its own shard of everything. The blocks are the classes a
Hugging Face model declares unsplittable (``_no_split_modules``, its transformer layers) and those
the config names (``training.fsdp.shard_modules``). Trained models keep gradients and optimizer
state sharded too; frozen teachers are sharded for inference the same way and never hold a
gradient.

FSDP2 keeps a root's own parameters (embeddings, final norm, LM head) gathered after forward, for
backward; a frozen teacher has no backward, so the engine calls :func:`reshard` on teachers once
a step no longer needs them. While gathered, a root's parameters are plain tensors: a fused LM-head
loss reads ``get_output_embeddings().weight`` after the model's forward and its gradient reaches
the shards through FSDP's end-of-backward reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """The one-dimensional mesh of every process of the default group, on ``device``'s type."""
    return init_device_mesh(device.type, (world_size,))


def block_names(model: nn.Module) -> set[str]:
    """The class names of ``model``'s blocks as its Hugging Face classes declare them (every
    submodule's ``_no_split_modules``); empty for other models."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def unknown_block_names(models: Iterable[nn.Module], wanted: Sequence[str]) -> list[str]:
    """The names in ``wanted`` that are the class of no submodule of ``models`` and of no module
    class imported anywhere (a misspelling; a class of another stage's models is known)."""
    present = {type(module).__name__ for model in models for module in model.modules()}
    return [name for name in wanted if name not in present and name not in _module_class_names()]


def _module_class_names() -> set[str]:
    names, pending = set(), [nn.Module]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub.__name__ not in names:
                names.add(sub.__name__)
                pending.append(sub)
    return names


def precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """The policy of ``training.fsdp.mixed_precision``: ``bf16`` computes with bf16 parameters and
    reduces gradients in float32; ``fp32`` keeps the parameters' own dtype."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, device_mesh: DeviceMesh | None, *, blocks: Iterable[str], trainable: bool,
          mp_policy: MixedPrecisionPolicy | None = None, offload_policy: OffloadPolicy | None = None,
          reshard_after_forward: bool = True) -> int:
    """Shards ``model`` in place over ``device_mesh`` (None: FSDP's default mesh over every
    process): every submodule whose class name is in ``blocks`` (innermost first, so nested blocks
    each get their own group), then the root. A frozen model (``trainable=False``) always frees its
    blocks after forward; the root's own parameters stay gathered after forward until backward or
    :func:`reshard`. Returns the number of blocks sharded on their own."""
    names = set(blocks)
    options = {"mesh": device_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "offload_policy": offload_policy or OffloadPolicy()}
    free_blocks = reshard_after_forward or not trainable
    sharded = 0
    for module in reversed(list(model.modules())):  # children before their parents
        if module is not model and type(module).__name__ in names and _holds_parameters(module):
            fully_shard(module, reshard_after_forward=free_blocks, **options)
            sharded += 1
    # the root stays gathered after forward: backward needs it at once, and a fused LM-head loss reads its head
    fully_shard(model, reshard_after_forward=False, **options)
    return sharded


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules of ``model`` (its root and blocks; none when it is not sharded)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Frees every gathered parameter of ``model`` (a no-op for blocks already freed, and for a
    model that is not sharded)."""
    for module in sharded_modules(model):
        module.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict, on the CPU of the first process (every process must call
    this; the others get an empty dict): what a plain ``student.pt`` holds."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
