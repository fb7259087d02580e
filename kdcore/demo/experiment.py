"""The demo's experiment: every built-in classification method against a scratch baseline of the
same architecture, on real data, over paired seeds.

On the UCI handwritten digits (shipped with kdcore, no download), for each seed, two families:

* **MLP** (flat 64-pixel inputs): a teacher (MLP 64-256-256-10, labels only) trained on the whole
  training split; then, on a quarter of it (``train_fraction``: a smaller labelled budget, where a
  teacher's soft targets carry what the labels cannot), a scratch student (MLP 64-W-10, labels only)
  and students of the same size trained by the output-level methods: response KD, born-again
  networks, a teacher ensemble (every seed's teacher), teacher-assistant distillation, decoupled
  KD, deep mutual learning and progressive self-distillation.
* **CNN** (8×8 images), for the methods that read feature maps: a CNN teacher (channels 32-64-64)
  and a CNN student a quarter as wide, with its own scratch row, trained by FitNets, attention
  transfer, relational KD and be-your-own-teacher.

The teacher compressed to the student's budget by other means (int8 dynamic quantization, magnitude
pruning) is measured beside them. Every model is scored the same way on the held-out split:
accuracy, agreement with and KL to its seed's teacher, calibration, and what it inherited from the
teacher (:func:`kdcore.transfer.transfer_figures`, against the scratch student of its family and
seed), with its parameter count, stored size and single-example CPU latency.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.demo.footprint import footprint, latency_us, pruned, quantized
from kdcore.engine.builders import build_model, build_splits
from kdcore.engine.config import DataSpec, ModelSpec
from kdcore.engine.distiller import Distiller
from kdcore.transfer import transfer_figures

@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 40  # per student run; the teachers train for half as many, on four times the data
    student_width: int = 32
    train_fraction: float = 0.25  # of the training split that students see
    output_dir: Path = Path("runs/demo")
    methods: tuple[str, ...] | None = None  # a subset of the contenders' names; None: all of them


@dataclass(frozen=True)
class Family:
    """An architecture: the teacher and the student (the scratch baseline's model) of the methods
    that use it."""

    name: str
    teacher_row: str
    scratch_row: str
    images: bool  # inputs as [1, 8, 8] images rather than 64 features
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_text: str
    student_text: str


@dataclass(frozen=True)
class Contender:
    """A method's row: its config, its family and which teachers it gets (``"seed"``: the seed's
    teacher; ``"all"``: every seed's teacher; ``"none"``)."""

    name: str
    family: str
    method: dict[str, Any]
    teachers: str
    description: str


@dataclass
class Row:
    """One model's results over seeds (lists are in seed order)."""

    name: str
    description: str
    family: str
    baseline: str | None = None  # the scratch row it is judged against
    accuracy: list[float] = field(default_factory=list)
    teacher_agreement: list[float] = field(default_factory=list)
    kl_to_teacher: list[float] = field(default_factory=list)
    ece: list[float] = field(default_factory=list)
    inherited_error_rate: list[float | None] = field(default_factory=list)
    baseline_inherited_error_rate: list[float | None] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)  # transfer_figures per seed
    parameters: int = 0
    size_kb: float = 0.0
    latency_us: float = 0.0


def families(width: int) -> dict[str, Family]:
    """The two architectures, with students of width ``width`` (the CNN's channels scale with it)."""
    cnn_student = [max(1, width // 4), max(1, width // 2), max(1, width // 2)]
    return {
        "mlp": Family("mlp", "teacher", "scratch", False, mlp([256, 256]), mlp([width]),
                      "MLP 64-256-256-10", f"MLP 64-{width}-10"),
        "cnn": Family("cnn", "teacher_cnn", "scratch_cnn", True, cnn([32, 64, 64]), cnn(cnn_student),
                      "CNN 32-64-64", f"CNN {'-'.join(map(str, cnn_student))}"),
    }


def contenders(width: int, seeds: int) -> list[Contender]:
    """Every built-in classification method, with settings tuned to this data (the papers' where
    they win here; what changed and why is in each description)."""
    response = {"temperature": 4.0, "kd_weight": 0.7, "ce_weight": 0.3}
    return [
        Contender("response_kd", "mlp", {"name": "response_kd", **response}, "seed", "Hinton et al. 2015, T = 4"),
        Contender("born_again", "mlp", {"name": "born_again", "generations": 2, **response}, "seed",
                  "born-again networks, 2 generations"),
        Contender("ensemble", "mlp", {"name": "ensemble", **response}, "all",
                  f"ensemble of {seeds} teachers (probability space)"),
        Contender("takd", "mlp", {"name": "takd", "assistants": [mlp([4 * width])], **response}, "seed",
                  f"teacher -> assistant (64-{4 * width}-10) -> student"),
        Contender("dkd", "mlp", {"name": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0}, "seed",
                  "decoupled KD, alpha 1, beta 8, T = 4"),
        Contender("dml", "mlp", {"name": "dml", "temperature": 1.0}, "none",
                  "deep mutual learning with a same-size peer"),
        Contender("pskd", "mlp", {"name": "pskd", "alpha": 0.8}, "none",
                  "progressive self-distillation: previous-epoch self as teacher"),
        Contender("fitnets", "cnn", {"name": "fitnets", "hints": [["blocks.2", "blocks.2"]], **response}, "seed",
                  "hints at the last block (1x1-conv regressor) + outputs, T = 4"),
        Contender("attention_transfer", "cnn", {"name": "attention_transfer", "beta": 10.0,
                                                "layers": [["blocks.1", "blocks.1"], ["blocks.2", "blocks.2"]]},
                  "seed", "attention maps of the last two blocks, beta 10 (the paper's 1000 swamps the labels "
                          "on 4x4 and 2x2 maps)"),
        Contender("rkd", "cnn", {"name": "rkd", "student_layer": "blocks.2", "teacher_layer": "blocks.2"}, "seed",
                  "distances and angles of the pooled last-block features"),
        Contender("byot", "cnn", {"name": "byot", "exits": ["blocks.0", "blocks.1"], "feature_layer": "blocks.2"},
                  "none", "exits on the first two blocks, taught by the network's output and last block"),
    ]


def chosen_contenders(settings: Settings) -> list[Contender]:
    """The contenders ``settings.methods`` names (all by default); ValueError for an unknown name."""
    every = contenders(settings.student_width, len(settings.seeds))
    if settings.methods is None:
        return every
    unknown = sorted(set(settings.methods) - {c.name for c in every})
    if unknown:
        raise ValueError(f"--methods: the demo has no method named {', '.join(unknown)}; it runs "
                         f"{', '.join(c.name for c in every)}")
    return [c for c in every if c.name in settings.methods]


def mlp(hidden: list[int]) -> dict[str, Any]:
    return {"model": "mlp", "options": {"in_features": 64, "num_classes": 10, "hidden": hidden}}


def cnn(channels: list[int]) -> dict[str, Any]:
    return {"model": "cnn", "options": {"num_classes": 10, "channels": channels, "stride": 2}}


def with_checkpoint(model: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    return {**model, "checkpoint": str(checkpoint)}


class Trainer:
    """Trains one run of the demo in a directory of its own under the output directory."""

    def __init__(self, root: Path, epochs: int, train_fraction: float, say: Callable[[str], None]) -> None:
        self.root, self.epochs, self.train_fraction, self.say = root, epochs, train_fraction, say

    def data(self, images: bool, *, teacher: bool = False) -> dict[str, Any]:
        options = {"images": images} if teacher else {"images": images, "train_fraction": self.train_fraction}
        return {"dataset": "digits", "batch_size": 64 if teacher else 32, "eval_batch_size": 512, "options": options}

    def train(self, directory: str, seed: int, method: dict[str, Any], student: dict[str, Any],
              teachers: Sequence[dict[str, Any]], images: bool, *, teacher: bool = False) -> Path:
        config = {
            "method": method, "student": student, "teachers": list(teachers),
            "data": self.data(images, teacher=teacher),
            "optimizer": {"name": "adamw", "lr": 0.003 if teacher else 0.01, "weight_decay": 1e-4},
            "scheduler": {"name": "cosine"},
            "training": {"epochs": max(1, self.epochs // 2) if teacher else self.epochs, "log_every": 1000},
            "seed": seed, "output_dir": str(self.root / f"seed{seed}" / directory), "device": "cpu",
        }
        return fit(config, self.say)


def fit(config: dict[str, Any], say: Callable[[str], None]) -> Path:
    """Trains the run ``config`` describes (its directory named after the row), says how long it
    took, and returns the trained student's state-dict file."""
    started = time.perf_counter()
    Distiller(config, console=False).fit()
    directory = Path(config["output_dir"])
    say(f"  seed {config['seed']}  {directory.name:<20} trained in {time.perf_counter() - started:5.1f} s")
    return directory / "student.pt"


class Experiment:
    def __init__(self, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.settings, self.say = settings, say
        self.families = families(settings.student_width)
        self.contenders = chosen_contenders(settings)
        self.trainer = Trainer(settings.output_dir, settings.epochs, settings.train_fraction, say)

    def used_families(self) -> list[Family]:
        names = {c.family for c in self.contenders} | {"mlp"}  # the compression rows are the MLP teacher's
        return [family for name, family in self.families.items() if name in names]

    def run(self) -> list[Row]:
        seeds = self.settings.seeds
        teachers = {(family.name, s): self.trainer.train(family.teacher_row, s, {"name": "supervised"}, family.teacher,
                                                         [], family.images, teacher=True)
                    for family in self.used_families() for s in seeds}
        students: dict[str, dict[int, Path]] = {}
        for s in seeds:
            for family in self.used_families():
                students.setdefault(family.scratch_row, {})[s] = self.trainer.train(
                    family.scratch_row, s, {"name": "supervised"}, family.student, [], family.images)
            for contender in self.contenders:
                family = self.families[contender.family]
                own = with_checkpoint(family.teacher, teachers[family.name, s])
                given = {"seed": [own], "none": [],
                         "all": [with_checkpoint(family.teacher, teachers[family.name, t]) for t in seeds]}
                students.setdefault(contender.name, {})[s] = self.trainer.train(
                    contender.name, s, contender.method, family.student, given[contender.teachers], family.images)
        return self._score(teachers, students)

    # -- scoring ----------------------------------------------------------------------------------

    def _rows(self) -> dict[str, Row]:
        """The rows, family by family: teacher (and its compressed forms), scratch, methods."""
        fraction = f"{self.settings.train_fraction:.0%} of the training split"
        rows: dict[str, Row] = {}
        for family in self.used_families():
            rows[family.teacher_row] = Row(family.teacher_row, f"{family.teacher_text}, labels only, the whole "
                                                               "training split", family.name)
            if family.name == "mlp":
                rows["teacher_int8"] = Row("teacher_int8", "the teacher, int8 dynamic quantization", "mlp")
                rows["teacher_pruned"] = Row("teacher_pruned", "the teacher, magnitude-pruned to the student's "
                                                               "weight count (no fine-tuning)", "mlp", "scratch")
            rows[family.scratch_row] = Row(family.scratch_row, f"{family.student_text}, labels only, {fraction} "
                                                               "(as every student of its family)", family.name)
            for contender in self.contenders:
                if contender.family == family.name:
                    rows[contender.name] = Row(contender.name, contender.description, family.name, family.scratch_row)
        return rows

    def _score(self, teachers: dict[tuple[str, int], Path], students: dict[str, dict[int, Path]]) -> list[Row]:
        rows = self._rows()
        for family in self.used_families():
            inputs, labels = self._held_out(family.images)
            members = [name for name, row in rows.items() if row.family == family.name]
            student_parameters = sum(p.numel() for p in _load(family.student).parameters())
            for seed in self.settings.seeds:
                teacher = _load(with_checkpoint(family.teacher, teachers[family.name, seed]))
                models = {family.teacher_row: teacher}
                if family.name == "mlp":
                    models.update(teacher_int8=quantized(teacher), teacher_pruned=pruned(teacher, student_parameters))
                models.update({name: _load(with_checkpoint(family.student, students[name][seed]))
                               for name in members if name in students})
                with torch.no_grad():
                    logits = {name: model(inputs) for name, model in models.items()}
                for name in members:
                    _add(rows[name], models[name], logits[name], logits[family.teacher_row], labels,
                         logits[family.scratch_row], inputs[:1], with_model_stats=seed == self.settings.seeds[0])
        return list(rows.values())

    def _held_out(self, images: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _, val = build_splits(DataSpec(**self.trainer.data(images)))
        return (torch.stack([val[i][0] for i in range(len(val))]),
                torch.stack([val[i][1] for i in range(len(val))]))


def _load(model_spec: dict[str, Any]) -> nn.Module:
    return build_model(ModelSpec(**model_spec), "demo").eval()


def _add(row: Row, model: nn.Module, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
         baseline_logits: torch.Tensor, example: torch.Tensor, *, with_model_stats: bool) -> None:
    figures = transfer_figures(logits, teacher_logits, labels, baseline_logits=baseline_logits)
    row.transfer.append(figures)
    row.accuracy.append(figures["accuracy"])
    row.teacher_agreement.append(figures["agreement"])
    for key in ("kl_to_teacher", "ece", "inherited_error_rate", "baseline_inherited_error_rate"):
        getattr(row, key).append(figures[key])
    if with_model_stats:
        row.parameters, row.size_kb = footprint(model)
        row.latency_us = latency_us(model, example)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Trains with one intra-op thread: the demo's models are so small that more threads only add
    synchronization, and on a busy machine they make a run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
