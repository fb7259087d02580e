"""Batches and the order data is visited in.

The training order depends only on (seed, epoch), never on the global RNG, and is cut so that the
global batch of every optimizer step is the same set of examples whatever the number of processes
and accumulation steps: that is what makes a resumed run and a multi-process run match the plain
one. A position within an epoch is a number of optimizer steps, so resuming skips exactly the
micro-batches already trained on without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from kdcore.cache import CachedTeacherDataset
from kdcore.sparse import SparseTeacher


#: entries of a mapping item that are not model inputs
NOT_INPUTS = ("labels", "label_bytes", "spans", "teacher_view")


@dataclass
class Batch:
    """One collated batch: ``inputs`` (a tensor, or a mapping of keyword inputs), ``labels`` (or
    None) and, when the run trains from a teacher-logit cache (``data.teacher_cache``), the cached
    ``teacher`` of these examples (a :class:`kdcore.SparseTeacher` aligned with the labels).

    Text datasets for teachers with another tokenizer (``aligned_text``) add, per item:
    ``label_bytes`` (the bytes of text each label adds, for per-byte perplexity), ``spans`` (the
    aligned span of each label, :mod:`kdcore.cross_tokenizer.alignment`) and ``teacher_view``: the
    same examples as the teachers read them (their own inputs, labels, label bytes and spans), a
    ``Batch`` itself."""

    inputs: Any
    labels: torch.Tensor | None = None
    teacher: SparseTeacher | None = None
    teacher_view: Batch | None = None
    label_bytes: torch.Tensor | None = None
    spans: torch.Tensor | None = None

    @classmethod
    def from_collated(cls, collated: Any) -> Batch:
        if isinstance(collated, Mapping):
            inputs = {key: value for key, value in collated.items() if key not in NOT_INPUTS}
            view = collated.get("teacher_view")
            return cls(inputs, collated.get("labels"), teacher_view=None if view is None else cls.from_collated(view),
                       label_bytes=collated.get("label_bytes"), spans=collated.get("spans"))
        if isinstance(collated, (tuple, list)):
            if len(collated) != 2:
                raise ValueError(f"a dataset item given as a sequence must be (inputs, labels), got {len(collated)} parts")
            return cls(collated[0], collated[1])
        return cls(collated)

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked copies, for the DataLoader's ``pin_memory``."""
        return self._map(lambda x: x.pin_memory())

    def _map(self, fn) -> Batch:
        move = (lambda x: fn(x) if isinstance(x, (torch.Tensor, SparseTeacher)) else x)
        inputs = {k: move(v) for k, v in self.inputs.items()} if isinstance(self.inputs, Mapping) else move(self.inputs)
        view = None if self.teacher_view is None else self.teacher_view._map(fn)
        return Batch(inputs, move(self.labels), move(self.teacher), view, move(self.label_bytes), move(self.spans))

    def seen_by(self, role: str) -> Batch:
        """The batch as model ``role`` (``"student"``, ``"teacher0"``, ...) reads it: the teachers'
        own view when they read another tokenization, else this batch."""
        return self.teacher_view if role != "student" and self.teacher_view is not None else self

    def num_examples(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, Mapping) else self.inputs
        return len(first)

    def kept_rows(self, ignore_index: int) -> int:
        """The rows a per-row loss averages over: labels that are not ``ignore_index`` (tokens, for
        a language model), or the examples when there are no labels."""
        if self.labels is None:
            return self.num_examples()
        return int((self.labels != ignore_index).sum())


class Collate:
    """A DataLoader's ``collate_fn`` giving :class:`Batch` objects; over a
    :class:`kdcore.cache.CachedTeacherDataset`, each batch carries its cached teacher."""

    def __init__(self, dataset: Dataset) -> None:
        self.cached = dataset if isinstance(dataset, CachedTeacherDataset) else None

    def __call__(self, items: list) -> Batch:
        if self.cached is None:
            return Batch.from_collated(default_collate(items))
        examples, teacher = self.cached.collate(items)
        batch = Batch.from_collated(examples)
        batch.teacher = teacher
        return batch


def call_model(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """Runs ``model`` on a batch's inputs and returns its logits."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"{type(model).__name__} returned {type(out).__name__}; a model must return logits "
                    "(a tensor, an object with .logits, or a tuple whose first item is the logits)")


class TrainOrder(Sampler[int]):
    """The example indices one process trains on in one epoch, in order.

    The epoch's permutation (seeded by ``seed`` and ``epoch``) is cut into global batches of
    ``batch_size``; the last partial batch is dropped. Each global batch is cut into ``grad_accum``
    micro-batches; process ``rank`` of ``world_size`` takes every ``world_size``-th example of each.
    Iteration starts ``start_step`` optimizer steps into the epoch.
    """

    def __init__(self, length: int, *, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, epoch: int, shuffle: bool = True, start_step: int = 0) -> None:
        self.length, self.batch_size, self.grad_accum = length, batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.shuffle, self.start_step = seed, epoch, shuffle, start_step

    @property
    def steps(self) -> int:
        return self.length // self.batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.grad_accum * self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        chunk = self.batch_size // self.grad_accum
        for step in range(self.start_step, self.steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            for micro in range(self.grad_accum):
                yield from batch[micro * chunk:(micro + 1) * chunk][self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum * self.micro_batch_size


class EvalShard(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each example is scored exactly once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, *, num_workers: int, seed: int,
           pin_memory: bool) -> DataLoader:
    """A DataLoader of :class:`Batch` objects over ``sampler``, whose worker seeds come from
    ``seed``, not the global RNG."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=Collate(dataset), pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def _mix(seed: int, epoch: int) -> int:
    """A per-epoch seed; distinct epochs of distinct seeds do not collide."""
    return (seed * 1_000_003 + epoch * 7_919 + 0x5EED) % (2**63 - 1)
