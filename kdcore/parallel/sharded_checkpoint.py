"""Model and optimizer state of a sharded run, written with ``torch.distributed.checkpoint`` (DCP).

Every process writes its own shards into one directory, so a checkpoint costs each process its
share of the state, and a checkpoint written by N processes loads on M (DCP reshards on load).
The write is atomic as a whole: the processes write into a temporary directory, and once all of
them are done (and DCP has flushed every file) the first process renames it to its final name. A
process killed at any moment leaves either no directory under that name or a complete one; the
engine's ``checkpoint.pt`` names the directory only after the rename, with its manifest (each
file's size and CRC-32), so that a file lost, cut or changed later is found before loading. For
several hosts, the output directory must be on a filesystem they share.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

METADATA_NAME = ".metadata"  # what DCP writes last, naming every shard

def save(path: Path, models: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[int]]:
    """Writes ``models``' and ``optimizer``'s state to the directory ``path`` (every process calls
    this), replacing whatever has that name. Returns the directory's manifest: each file's size and
    CRC-32 (each process checksums the files it wrote), which :func:`damage` checks."""
    temporary = path.with_name(f".{path.name}.tmp")
    if dist.get_rank() == 0:
        _remove(temporary)  # left by a killed write
        temporary.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(models, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary)
    dist.barrier()  # every process's files are written and synced
    mine = [entry for entry in temporary.iterdir() if entry.name.startswith(f"__{dist.get_rank()}_")]
    if dist.get_rank() == 0:
        mine.append(temporary / METADATA_NAME)
    manifests: list[dict[str, list[int]]] = [{}] * dist.get_world_size()
    dist.all_gather_object(manifests, {entry.name: [entry.stat().st_size, _crc32(entry)] for entry in mine})
    if dist.get_rank() == 0:
        _remove(path)  # an incomplete write of this name, named only by a checkpoint a resume set aside
        os.replace(temporary, path)
        _sync_directory(path.parent)
    dist.barrier()
    return {name: entry for manifest in manifests for name, entry in manifest.items()}


def damage(path: Path, manifest: dict[str, list[int]]) -> str | None:
    """What is wrong with the directory ``path`` against the ``manifest`` :func:`save` returned (a
    file missing, cut, or changed), or None when every file is as written."""
    if not (path / METADATA_NAME).is_file():
        return "its metadata file is missing (the write did not finish)"
    for name, (size, crc) in sorted(manifest.items()):
        entry = path / name
        if not entry.is_file():
            return f"{name} is missing"
        if entry.stat().st_size != size:
            return f"{name} has {entry.stat().st_size} bytes, not the {size} written"
        if _crc32(entry) != crc:
            return f"{name} does not hold the bytes written (its checksum differs)"
    return None


def load(path: Path, models: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads what :func:`save` wrote into ``models`` and ``optimizer`` (every process calls this,
    with the models sharded as this run shards them)."""
    model_state, optimizer_state = get_state_dict(models, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(models, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _remove(path: Path) -> None:
    """Removes ``path``, a directory or anything else, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _sync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
