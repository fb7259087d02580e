"""Finished runs as the transfer report reads them: a run directory's config (from its
checkpoint), its final student, its first teacher and its held-out split, built as ``kdcore eval``
builds them; and :func:`score`, which runs them (and a baseline run's student) over the held-out
split and keeps the :class:`~kdcore.transfer.figures.Rows` of each batch."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdcore.engine import rundir
from kdcore.engine.builders import build_model, build_splits, build_tokenizers
from kdcore.engine.config import ConfigError, RunConfig
from kdcore.engine.data import EvalShard, call_model, loader
from kdcore.engine.distiller import Distiller
from kdcore.engine.rundir import RunDirectoryError, read_checkpoint
from kdcore.transfer.figures import Rows


class ReportError(ValueError):
    """The runs cannot be compared (no teacher, another tokenization, other data or classes); the
    message names the run and what differs."""


@dataclass(frozen=True)
class FinishedRun:
    """A run directory whose last stage ended: ``path`` and ``run``, a :class:`Distiller` of the
    config it was trained with (its ``output_dir`` this directory, wherever it was trained)."""

    path: Path
    run: Distiller

    @classmethod
    def open(cls, path: str | Path) -> FinishedRun:
        """The finished run in ``path``; a directory that is not a run's, or a run that has not
        finished, raises :class:`RunDirectoryError` saying which."""
        path = Path(path)
        if not path.is_dir():
            problem = "it is not a directory" if path.exists() else "it does not exist"
            raise RunDirectoryError(f"{path} is not a run directory ({problem})")
        if not any((path / name).exists() for name in rundir.RUN_FILES):
            raise RunDirectoryError(f"{path} is not a run directory: it holds none of the files `kdcore distill` "
                                    f"writes ({', '.join(rundir.RUN_FILES)})")
        if not (path / rundir.STUDENT_NAME).is_file():
            raise RunDirectoryError(f"{path} is an unfinished run: it has no {rundir.STUDENT_NAME}, which a run "
                                    "writes when its last stage ends; finish it (kdcore distill CONFIG --resume)")
        checkpoint = path / rundir.CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise RunDirectoryError(f"{path} has no {rundir.CHECKPOINT_NAME}, which records the config the run was "
                                    "trained with")
        config = read_checkpoint(checkpoint, rundir.CHECKPOINT_KEYS)["config"]
        try:
            return cls(path, Distiller({**config, "output_dir": str(path)}, console=False))
        except ConfigError as exc:  # e.g. a teacher checkpoint moved since: say whose config it is
            raise ConfigError(f"{path} (the config it was trained with): {exc}") from None

    @property
    def config(self) -> RunConfig:
        return self.run.config

    def student(self) -> nn.Module:
        """The final student (``student.pt`` in the model of the last stage's student)."""
        spec = self.run.student_spec(len(self.run.stages) - 1)
        spec = spec.model_copy(update={"checkpoint": str(self.path / rundir.STUDENT_NAME), "pretrained": False})
        return build_model(spec, "student")

    def teacher(self) -> nn.Module:
        """The config's first teacher; a run without one raises :class:`ReportError`."""
        if not self.config.teachers:
            if self.config.data.teacher_cache:
                raise ReportError(f"{self.path}: the run learned from a teacher cache and names no teacher model, "
                                  "which the report scores; a run whose config also names the teacher the cache "
                                  "was written from (as examples/configs/shakespeare_cached_kd.yaml does) can be "
                                  "reported on")
            raise ReportError(f"{self.path}: the run (method {self.config.method.name!r}) has no teacher, so there "
                              "is nothing to inherit; report on a distilled run, and pass a run like this one as "
                              "--baseline")
        return build_model(self.config.teachers[0], "teachers.0")

    def held_out(self) -> Dataset:
        """The ``val`` split, as the run's evaluation reads it (a ``data.teacher_cache``, which
        only the training split reads, is not opened)."""
        data = self.config.data.model_copy(update={"teacher_cache": None})
        return build_splits(data, build_tokenizers(self.config.student, self.config.teachers))[1]


def score(run: FinishedRun, baseline: FinishedRun | None, device: torch.device) -> Rows:
    """The rows of ``run``'s held-out split (its rows whose label is not ``data.ignore_index``;
    for a language model, each labelled position) scored by its student and first teacher and by
    ``baseline``'s student, under the run's ``training.precision``. The baseline's held-out split
    must be the same examples with the same labels, and its student must predict as many classes."""
    config = run.config
    teacher = run.teacher().to(device).eval()
    student = run.student().to(device).eval()
    other = None if baseline is None else baseline.student().to(device).eval()
    val = run.held_out()
    other_val = None if baseline is None else baseline.held_out()
    if other_val is not None and len(other_val) != len(val):
        raise _other_data(run, baseline, f"{len(other_val)} held-out examples against {len(val)}")
    other_batches = itertools.repeat(None) if other_val is None else _batches(other_val, config, device)
    parts = []
    bf16 = config.training.precision == "bf16"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch, same in zip(_batches(val, config, device), other_batches):
            if batch.teacher_view is not None:
                raise ReportError(f"{run.path}: the teacher reads another tokenization of the text than the student, "
                                  "so their predictions cannot be compared position by position")
            if batch.labels is None:
                raise ReportError(f"{run.path}: data.dataset {config.data.dataset!r} gives no labels on its held-out "
                                  "split; the figures need them")
            if same is not None and not (_equal(batch.inputs, same.inputs) and _equal(batch.labels, same.labels)):
                raise _other_data(run, baseline, "the examples or labels differ")
            student_logits = call_model(student, batch.inputs)
            teacher_logits = call_model(teacher, batch.inputs)
            baseline_logits = None if other is None else call_model(other, batch.inputs)
            classes = student_logits.shape[-1]
            if baseline_logits is not None and baseline_logits.shape[-1] != classes:
                raise ReportError(f"--baseline {baseline.path}: its student predicts {baseline_logits.shape[-1]} "
                                  f"classes, the student of {run.path} {classes}; compare runs over the same classes")
            if teacher_logits.shape[-1] != classes:
                raise ReportError(f"{run.path}: the teacher predicts {teacher_logits.shape[-1]} classes and the "
                                  f"student {classes}; the figures compare them class by class")
            parts.append(Rows.of(_flat(student_logits), _flat(teacher_logits), batch.labels.reshape(-1),
                                 baseline_logits=None if baseline_logits is None else _flat(baseline_logits),
                                 ignore_index=config.data.ignore_index))
    return Rows.cat(parts)


def _batches(dataset: Dataset, config: RunConfig, device: torch.device):
    """The held-out batches in order, on ``device``."""
    for batch in loader(dataset, EvalShard(len(dataset), 0, 1), config.data.eval_batch_size,
                        num_workers=config.data.num_workers, seed=config.seed, pin_memory=device.type == "cuda"):
        yield batch.to(device)


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` logits as rows ``[N, C]`` (a language model's positions), as the metrics read them."""
    return logits.reshape(-1, logits.shape[-1])


def _equal(first: Any, second: Any) -> bool:
    """Whether two batches' inputs (tensors, or mappings of them) or labels are the same."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_equal(first[key], second[key]) for key in first)
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.shape == second.shape and bool(torch.equal(first, second))
    return first is None and second is None


def _other_data(run: FinishedRun, baseline: FinishedRun, what: str) -> ReportError:
    data, other = run.config.data, baseline.config.data
    return ReportError(f"--baseline {baseline.path}: its held-out split is not that of {run.path} ({what}; "
                       f"data.dataset {other.dataset!r} with options {other.options} against {data.dataset!r} with "
                       f"options {data.options}); the figures compare the two students example by example")
