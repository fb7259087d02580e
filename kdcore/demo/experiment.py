"""The demo's experiment: every distillation method against a scratch baseline on real data.

On the UCI handwritten digits (shipped with kdcore, no download), for each seed: a teacher
(MLP 64-256-256-10, labels only) trained on the whole training split, then, on a quarter of it
(``train_fraction``: a smaller labelled budget, where distillation pays most), a scratch student
(MLP 64-H-10, labels only) and students of the same size trained by response KD, born-again networks (2 generations), a teacher ensemble (the
teachers of every seed), teacher-assistant distillation (through an MLP 64-4H-10) and
self-distillation (PS-KD). The teacher compressed to the student's budget by other means is
measured beside them: int8 dynamic quantization and global magnitude pruning to the student's
number of weights (no fine-tuning). Every model is then scored the same way on the held-out split
(accuracy, agreement with and KL to its seed's teacher, ECE), with its parameter count, size and
single-example CPU latency.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from kdcore.engine.builders import build_model, build_splits
from kdcore.engine.config import DataSpec, ModelSpec
from kdcore.engine.distiller import Distiller
from kdcore.engine.metrics import Meter

MARKER = "demo.json"  # a directory holding it was written by the demo and may be replaced by it


@dataclass(frozen=True)
class Settings:
    seeds: int = 3
    epochs: int = 40  # per student run; the teachers train for half as many, on four times the data
    student_width: int = 32
    train_fraction: float = 0.25  # of the training split that students see
    output_dir: Path = Path("runs/demo")


@dataclass
class Row:
    """One method's results over seeds."""

    name: str
    description: str
    accuracy: list[float] = field(default_factory=list)
    teacher_agreement: list[float] = field(default_factory=list)
    kl_to_teacher: list[float] = field(default_factory=list)
    ece: list[float] = field(default_factory=list)
    parameters: int = 0
    size_kb: float = 0.0
    latency_us: float = 0.0


def spec(hidden: list[int], checkpoint: Path | None = None) -> dict[str, Any]:
    model = {"model": "mlp", "options": {"in_features": 64, "num_classes": 10, "hidden": hidden}}
    return {**model, "checkpoint": str(checkpoint)} if checkpoint else model


class Experiment:
    def __init__(self, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.settings, self.say = settings, say
        self.root = settings.output_dir
        self.data = {"dataset": "digits", "batch_size": 32, "eval_batch_size": 512,
                     "options": {"train_fraction": settings.train_fraction}}
        self.teacher_data = {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512}
        self.teacher_hidden = [256, 256]
        self.student_hidden = [settings.student_width]
        self.assistant_hidden = [4 * settings.student_width]

    # -- training ---------------------------------------------------------------------------------

    def _train(self, name: str, seed: int, method: dict[str, Any], student: dict[str, Any],
               teachers: list[dict[str, Any]] = ()) -> Path:
        directory = self.root / f"seed{seed}" / name
        is_teacher = name == "teacher"
        config = {
            "method": method, "student": student, "teachers": list(teachers),
            "data": self.teacher_data if is_teacher else self.data,
            "optimizer": {"name": "adamw", "lr": 0.003 if is_teacher else 0.01, "weight_decay": 1e-4},
            "scheduler": {"name": "cosine"},
            "training": {"epochs": max(1, self.settings.epochs // 2) if is_teacher else self.settings.epochs,
                         "log_every": 1000},
            "seed": seed, "output_dir": str(directory), "device": "cpu",
        }
        started = time.perf_counter()
        Distiller(config, console=False).fit()
        self.say(f"  seed {seed}  {name:<14} trained in {time.perf_counter() - started:5.1f} s")
        return directory / "student.pt"

    def run(self) -> list[Row]:
        self._prepare_directory()
        seeds = range(self.settings.seeds)
        teachers = {s: self._train("teacher", s, {"name": "supervised"}, spec(self.teacher_hidden)) for s in seeds}
        students: dict[str, dict[int, Path]] = {}
        for s in seeds:
            teacher = spec(self.teacher_hidden, teachers[s])
            small = spec(self.student_hidden)
            runs = {
                "scratch": ({"name": "supervised"}, []),
                "response_kd": ({"name": "response_kd", "temperature": 4.0, "kd_weight": 0.7, "ce_weight": 0.3},
                                [teacher]),
                "born_again": ({"name": "born_again", "generations": 2, "temperature": 4.0, "kd_weight": 0.7,
                                "ce_weight": 0.3}, [teacher]),
                "ensemble": ({"name": "ensemble", "temperature": 4.0, "kd_weight": 0.7, "ce_weight": 0.3},
                             [spec(self.teacher_hidden, teachers[t]) for t in seeds]),
                "takd": ({"name": "takd", "assistants": [spec(self.assistant_hidden)], "temperature": 4.0,
                          "kd_weight": 0.7, "ce_weight": 0.3}, [teacher]),
                "self_distill": ({"name": "pskd", "alpha": 0.8}, []),
            }
            for name, (method, its_teachers) in runs.items():
                students.setdefault(name, {})[s] = self._train(name, s, method, small, its_teachers)
        return self._score(teachers, students)

    def _prepare_directory(self) -> None:
        if self.root.exists():
            if not (self.root / MARKER).exists():
                raise FileExistsError(f"{self.root} exists and was not written by `kdcore demo`; choose another "
                                      "--output-dir (the demo only replaces its own earlier results)")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        (self.root / MARKER).write_text("{}\n")  # claims the directory before anything is written in it

    # -- scoring ----------------------------------------------------------------------------------

    def _score(self, teachers: dict[int, Path], students: dict[str, dict[int, Path]]) -> list[Row]:
        _, val = build_splits(DataSpec(**self.data))
        inputs = torch.stack([val[i][0] for i in range(len(val))])
        labels = torch.stack([val[i][1] for i in range(len(val))])
        described = {
            "teacher": "MLP 64-256-256-10, labels only, the whole training split",
            "teacher_int8": "the teacher, int8 dynamic quantization",
            "teacher_pruned": "the teacher, magnitude-pruned to the student's weight count (no fine-tuning)",
            "scratch": f"MLP 64-{self.student_hidden[0]}-10, labels only, {self.settings.train_fraction:.0%} of the "
                       "training split (as every student)",
            "response_kd": "Hinton et al. 2015, T = 4",
            "born_again": "born-again networks, 2 generations",
            "ensemble": f"ensemble of {len(teachers)} teachers (probability space)",
            "takd": f"teacher -> assistant (64-{self.assistant_hidden[0]}-10) -> student",
            "self_distill": "PS-KD: previous-epoch self as teacher",
        }
        rows = {name: Row(name, text) for name, text in described.items()}
        student_parameters = sum(p.numel() for p in _load(spec(self.student_hidden)).parameters())
        for seed, path in teachers.items():
            teacher = _load(spec(self.teacher_hidden, path))
            with torch.no_grad():
                reference = teacher(inputs)
            models = {"teacher": teacher, "teacher_int8": _quantized(teacher),
                      "teacher_pruned": _pruned(teacher, student_parameters)}
            models.update({name: _load(spec(self.student_hidden, paths[seed])) for name, paths in students.items()})
            for name, model in models.items():
                _add(rows[name], model, inputs, labels, reference, with_model_stats=seed == 0)
        return list(rows.values())


def _load(model_spec: dict[str, Any]) -> nn.Module:
    return build_model(ModelSpec(**model_spec), "demo").eval()


def _quantized(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the linear layers, with torch's eager-mode API (deprecated in
    favour of torchao, which kdcore does not depend on; its deprecation warnings are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _pruned(model: nn.Module, budget: int) -> nn.Module:
    """The model with ``budget`` non-zero parameters: its biases and its largest-magnitude weights
    (all layers together)."""
    pruned = copy.deepcopy(model)
    weights = [(module, "weight") for module in pruned.modules() if isinstance(module, nn.Linear)]
    total = sum(module.weight.numel() for module, _ in weights)
    biases = sum(p.numel() for name, p in pruned.named_parameters() if not name.endswith("weight"))
    keep = max(1, budget - biases)
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=total - keep)
    for module, name in weights:
        prune.remove(module, name)
    return pruned


def _add(row: Row, model: nn.Module, inputs, labels, teacher_logits, *, with_model_stats: bool) -> None:
    meter = Meter(bins=15)
    with torch.no_grad():
        meter.update(model(inputs), labels, teacher_logits)
    metrics = meter.compute()
    for key in ("accuracy", "teacher_agreement", "kl_to_teacher", "ece"):
        getattr(row, key).append(metrics[key])
    if with_model_stats:
        row.parameters, row.size_kb = _footprint(model)
        row.latency_us = _latency_us(model, inputs[:1])


def _footprint(model: nn.Module) -> tuple[int, float]:
    """Non-zero parameters and serialized size (int8 weights count one byte each)."""
    state = model.state_dict()
    nonzero, size = 0, 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            tensor = value.dequantize() if value.is_quantized else value
            nonzero += int((tensor != 0).sum())
            size += value.numel() * value.element_size()
        elif isinstance(value, tuple):  # packed int8 linear parameters: (weight, bias)
            for part in value:
                if isinstance(part, torch.Tensor):
                    nonzero += int((part.dequantize() if part.is_quantized else part).ne(0).sum())
                    size += part.numel() * part.element_size()
    return nonzero, size / 1024


def _latency_us(model: nn.Module, example: torch.Tensor, repeats: int = 300) -> float:
    """Median single-example forward time on one CPU thread, in microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(20):
                model(example)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(example)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1e6
