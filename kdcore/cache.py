"""Teacher-logit caches: run a teacher over a dataset once, keep each position's top-k
log-probabilities on disk, and train students from them later without the teacher.

A cache is a directory:

- ``manifest.json``: what was cached (model id, tokenizer, k, temperature, value and index dtypes,
  vocabulary size, dataset length) and one entry per finished shard (file, first example, number of
  examples and positions, size, SHA-256), plus a checksum over the shards once complete;
- ``shard-NNNNN.kdc``: raw little-endian arrays, back to back: the number of positions of each
  example (int32), the top-k indices (the smallest unsigned type that holds the vocabulary: uint8,
  uint16, else int32) and their log-probabilities (bfloat16 or float16 bits), ``[positions, k]``
  each, in rank order (most probable first).

A run's cache directory (``data.teacher_cache``) holds the train split's cache, and in ``val/``
the held-out split's, against which the run scores its student (``kdcore cache-teacher`` writes
both).

Writing is resumable: each shard is written to a temporary file, synced and renamed, and only then
recorded in the manifest (itself replaced atomically), so an interrupted run continues after the
last recorded shard and the cache never holds a duplicate or a missing example. A cache costs
``k * (index bytes + 2)`` bytes per position, plus 4 bytes per example.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from kdcore.sparse import SparseTeacher

FORMAT = "kdcore-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HELD_OUT = "val"  # the held-out split's cache, inside a run's cache directory
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def index_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest index type that holds every id of a vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype("<u1")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<i4")


def bytes_per_position(k: int, vocab_size: int) -> int:
    """Bytes a cache spends on one position (one token): k indices and k 16-bit log-probabilities."""
    return k * (index_dtype_for(vocab_size).itemsize + 2)


class CacheError(ValueError):
    """A cache that cannot be written, resumed or read as asked."""


@dataclass(frozen=True)
class CacheSpec:
    """What identifies a cache's contents; resuming requires the same spec."""

    model_id: str
    tokenizer: str | None
    k: int
    temperature: float
    value_dtype: str
    vocab_size: int
    num_examples: int
    sequence: bool  # the teacher's logits have a position dimension ([B, L, V], not [B, V])

    @property
    def index_dtype(self) -> np.dtype:
        return index_dtype_for(self.vocab_size)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_id(model: str, options: Mapping[str, Any], checkpoint: str | None) -> str:
    """What a cache records as its teacher (``CacheSpec.model_id``): the model's registered name,
    options and checkpoint with the checkpoint's SHA-256, so that resuming a cache with another
    teacher, or with the same one retrained, is refused."""
    return json.dumps({"model": model, "options": dict(options), "checkpoint": checkpoint,
                       "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None}, sort_keys=True)


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{file} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{file} is not a kdcore teacher cache (version {FORMAT_VERSION})")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    _write_atomic(path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2) + "\n"), mode="w")


def _top_k(logits: torch.Tensor, k: int, temperature: float, value_dtype: torch.dtype):
    """(indices, log-probabilities) of the k most probable entries of each row, in rank order."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return indices, values.to(value_dtype)


def write_teacher_cache(teacher: Callable[[Any], torch.Tensor], dataset: Dataset, path: str | Path, *, k: int,
                        model_id: str, temperature: float = 1.0, value_dtype: str = "bfloat16",
                        tokenizer: str | None = None, batch_size: int = 32, examples_per_shard: int = 4096,
                        device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                        ) -> Path:
    """Runs ``teacher`` (a callable from a collated batch's inputs to logits ``[B, V]`` or
    ``[B, L, V]``, e.g. ``lambda inputs: call_model(model.eval(), inputs)``; it runs under
    ``torch.no_grad``) over every example of ``dataset`` in order and caches the top-``k``
    log-probabilities at ``temperature`` in ``path``.

    An existing cache at ``path`` is resumed when its spec is the same (an error names what
    differs) and left alone when complete. ``progress(done, total)`` is called after each shard.
    Returns ``path``.
    """
    from kdcore.engine.data import Batch

    path = Path(path)
    if value_dtype not in VALUE_DTYPES:
        raise CacheError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    for name, value in (("k", k), ("batch_size", batch_size), ("examples_per_shard", examples_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CacheError(f"{name} must be a positive int, got {value!r}")
    if not 0 < temperature < math.inf:
        raise CacheError(f"temperature must be a finite number > 0, got {temperature}")
    total = len(dataset)
    if total == 0:
        raise CacheError("the dataset is empty")

    def logits_of(first: int, last: int) -> torch.Tensor:
        batch = Batch.from_collated(default_collate([dataset[i] for i in range(first, last)])).to(torch.device(device))
        with torch.no_grad():
            return teacher(batch.inputs)

    path.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(path)
    if manifest is None:
        probe = logits_of(0, 1)
        if probe.dim() not in (2, 3):
            raise CacheError(f"the teacher's logits must be [B, V] or [B, L, V], got shape {tuple(probe.shape)}")
        vocab = probe.shape[-1]
        if k > vocab:
            raise CacheError(f"k = {k} exceeds the teacher's vocabulary size {vocab}")
        spec = CacheSpec(model_id, tokenizer, k, float(temperature), value_dtype, vocab, total, probe.dim() == 3)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "spec": asdict(spec), "shards": [], "checksum": None}
        _write_manifest(path, manifest)
    else:
        spec = CacheSpec(**manifest["spec"])
        wanted = {"model_id": model_id, "tokenizer": tokenizer, "k": k, "temperature": float(temperature),
                  "value_dtype": value_dtype, "num_examples": total}
        differs = {key: (getattr(spec, key), value) for key, value in wanted.items() if getattr(spec, key) != value}
        if differs:
            detail = ", ".join(f"{key}: cached {old!r}, asked {new!r}" for key, (old, new) in differs.items())
            raise CacheError(f"{path} holds a different cache ({detail}); choose another directory")
    done = sum(shard["num_examples"] for shard in manifest["shards"])
    value_torch = VALUE_DTYPES[spec.value_dtype]
    while done < total:
        end = min(total, done + examples_per_shard)
        lengths, indices, values = [], [], []
        for first in range(done, end, batch_size):
            logits = logits_of(first, min(end, first + batch_size))
            if logits.shape[-1] != spec.vocab_size or (logits.dim() == 3) != spec.sequence:
                raise CacheError(f"the teacher's logits changed shape mid-run: {tuple(logits.shape)} (cached: "
                                 f"vocabulary {spec.vocab_size}, {'with' if spec.sequence else 'without'} positions)")
            if logits.isnan().any() or (logits == math.inf).any():
                raise CacheError(f"the teacher's logits for examples {first} to {min(end, first + batch_size) - 1} hold "
                                 "NaN or +inf; a cache of them would teach nothing: check the teacher's checkpoint")
            top_indices, top_values = _top_k(logits, spec.k, spec.temperature, value_torch)
            for idx, val in zip(top_indices.reshape(logits.shape[0], -1, spec.k),
                                top_values.reshape(logits.shape[0], -1, spec.k)):
                lengths.append(idx.shape[0])
                indices.append(idx.cpu().numpy().astype(spec.index_dtype))
                values.append(val.cpu().view(torch.int16).numpy())
        shard = _write_shard(path, len(manifest["shards"]), np.asarray(lengths, dtype="<i4"),
                             np.concatenate(indices), np.concatenate(values))
        manifest["shards"].append({**shard, "first_example": done, "num_examples": end - done,
                                   "num_positions": int(sum(lengths))})
        done = end
        if done == total:
            manifest["checksum"] = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        _write_manifest(path, manifest)
        if progress is not None:
            progress(done, total)
    return path


def _write_shard(path: Path, number: int, lengths: np.ndarray, indices: np.ndarray, values: np.ndarray) -> dict:
    name = f"shard-{number:05d}.kdc"

    def write(f) -> None:
        for array in (lengths, indices, values):
            f.write(np.ascontiguousarray(array).tobytes())

    _write_atomic(path / name, write)
    return {"file": name, "bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}


class TeacherCache:
    """Read access to a complete cache: ``cache[i]`` is example i's ``(indices [P, k] int64,
    logprobs [P, k])`` (P positions; P = 1 for a teacher without positions), memory-mapped from the
    shards. ``verify()`` recomputes every checksum."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"{self.path} holds no teacher cache ({MANIFEST} is missing); write it with "
                             "kdcore cache-teacher")
        self.spec = CacheSpec(**manifest["spec"])
        self.shards = manifest["shards"]
        self.checksum = manifest["checksum"]
        cached = sum(shard["num_examples"] for shard in self.shards)
        if cached != self.spec.num_examples or self.checksum is None:
            raise CacheError(f"{self.path} is incomplete ({cached} of {self.spec.num_examples} examples); run the same "
                             "cache-teacher command again to finish it")
        self._firsts = np.asarray([shard["first_example"] for shard in self.shards])
        self._opened: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.spec.num_examples

    @property
    def bytes_per_position(self) -> float:
        """Measured: the shards' bytes over the positions they hold."""
        return sum(s["bytes"] for s in self.shards) / max(1, sum(s["num_positions"] for s in self.shards))

    def _open(self, number: int):
        if number not in self._opened:
            shard = self.shards[number]
            raw = np.memmap(self.path / shard["file"], dtype=np.uint8, mode="r")
            n, p, k = shard["num_examples"], shard["num_positions"], self.spec.k
            index_bytes = p * k * self.spec.index_dtype.itemsize
            expected = 4 * n + index_bytes + 2 * p * k
            if raw.size != expected:
                raise CacheError(f"{shard['file']} has {raw.size} bytes, expected {expected}; the cache is damaged")
            lengths = raw[: 4 * n].view("<i4")
            indices = raw[4 * n: 4 * n + index_bytes].view(self.spec.index_dtype).reshape(p, k)
            values = raw[4 * n + index_bytes:].view("<i2").reshape(p, k)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            self._opened[number] = (lengths, offsets, indices, values)
        return self._opened[number]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} is outside the cache's {len(self)} examples")
        number = int(np.searchsorted(self._firsts, i, side="right") - 1)
        _, offsets, indices, values = self._open(number)
        j = i - self.shards[number]["first_example"]
        rows = slice(int(offsets[j]), int(offsets[j + 1]))
        top = torch.from_numpy(indices[rows].astype(np.int64))
        logprobs = torch.from_numpy(np.array(values[rows])).view(VALUE_DTYPES[self.spec.value_dtype])
        return top, logprobs

    def verify(self) -> None:
        """Raises CacheError naming the first shard whose bytes no longer match the manifest."""
        for shard in self.shards:
            if file_sha256(self.path / shard["file"]) != shard["sha256"]:
                raise CacheError(f"{shard['file']} does not match its checksum in the manifest; the cache is damaged")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


def held_out_path(path: str | Path) -> Path:
    """Where the held-out split's cache of the run cache directory ``path`` lives."""
    return Path(path) / HELD_OUT


def held_out_cache(train: TeacherCache) -> TeacherCache | None:
    """The held-out split's cache beside the train split's cache ``train``, or None when none was
    written. A held-out cache of another teacher (model, tokenizer, temperature, vocabulary) is
    refused: the student would be scored against a teacher it was not trained on."""
    path = held_out_path(train.path)
    if not (path / MANIFEST).exists():
        return None
    held_out = TeacherCache(path)
    keys = ("model_id", "tokenizer", "temperature", "vocab_size", "sequence")
    differs = [key for key in keys if getattr(held_out.spec, key) != getattr(train.spec, key)]
    if differs:
        raise CacheError(f"{path} was written from another teacher than {train.path} (different {', '.join(differs)}); "
                         f"delete {path} and run kdcore cache-teacher again with --split val")
    return held_out


class CachedTeacherDataset(Dataset):
    """``dataset`` with its cached teacher beside each example: item i is ``(dataset[i], indices,
    logprobs)``. Batch it with :meth:`collate` (``DataLoader(..., collate_fn=ds.collate)``), which
    gives ``(collated examples, SparseTeacher)`` aligned with the batch however it was sampled.
    The cache must have been written over the same dataset, in the same order."""

    def __init__(self, dataset: Dataset, cache: TeacherCache | str | Path) -> None:
        self.dataset = dataset
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        if len(self.cache) != len(dataset):
            raise CacheError(f"the cache holds {len(self.cache)} examples but the dataset has {len(dataset)}; it was "
                             "written for another dataset")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (self.dataset[i], *self.cache[i])

    def collate(self, items: list) -> tuple[Any, SparseTeacher]:
        """Collates the examples and stacks their teachers into one SparseTeacher ``[B, P, k]``
        (``[B, k]`` for a teacher without positions); sequences of different lengths are padded
        with positions that have no entries (every slot's log-probability -inf, its index 0; see
        :class:`kdcore.SparseTeacher`): mark those positions ignored in the student's labels."""
        examples = default_collate([item[0] for item in items])
        longest = max(item[1].shape[0] for item in items)
        k = self.cache.spec.k
        indices = torch.zeros((len(items), longest, k), dtype=torch.int64)
        logprobs = torch.full((len(items), longest, k), -torch.inf, dtype=VALUE_DTYPES[self.cache.spec.value_dtype])
        for row, (_, top, values) in enumerate(items):
            indices[row, : top.shape[0]] = top
            logprobs[row, : values.shape[0]] = values
        if not self.cache.spec.sequence:
            indices, logprobs = indices[:, 0], logprobs[:, 0]
        return examples, SparseTeacher(indices, logprobs)
