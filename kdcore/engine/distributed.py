"""The process group of a run: one process, or ``torchrun --nproc-per-node N`` (DDP or FSDP).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the default process group is initialized
with nccl on CUDA and gloo on CPU; each process uses the GPU of its ``LOCAL_RANK``. A sharded run
(``training.parallel: fsdp``) in one process gets a process group of its own, so that sharding and
sharded checkpoints work the same at every size.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdcore.engine.config import ConfigError


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether this run initialized the process group (and so tears it down)
    sharded: bool = False  # training.parallel is fsdp: models are sharded over the processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over every process (``tensor`` itself when alone)."""
        if not self.distributed:
            return tensor
        reduced = tensor.to(self.device).clone()
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, modules) -> None:
        """Copies the first process's buffers (BatchNorm running statistics, ...) of ``modules``
        to every process, as DDP does before each forward: each process updates its own copy from
        its own examples, and the copies must agree before a forward pass, an evaluation or a save."""
        if not self.distributed:
            return
        for module in modules:
            for buffer in module.buffers():
                if buffer.is_contiguous():  # an expanded view overlaps itself: a constant nothing updates
                    dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroys the process group this run created. The run has released its DDP wrappers;
        collecting garbage first makes sure none lingers in a reference cycle, since a wrapper
        torn down after its group aborts the process."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def start(device: str, parallel: str = "ddp") -> Processes:
    """Joins (or creates) the process group the environment describes; ``device`` is the config's
    ``auto`` / ``cpu`` / ``cuda``, ``parallel`` its ``training.parallel``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    sharded = parallel == "fsdp"
    if world_size == 1 and not sharded:
        return Processes(0, 1, target, owns_group=False)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if use_cuda else "gloo"
        if world_size == 1:  # no launcher to rendezvous with: a group of one, in this process's memory
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
    return Processes(dist.get_rank(), dist.get_world_size(), target, owns_group=owns, sharded=sharded)
