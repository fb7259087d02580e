"""Run configs: the structures a YAML file (or Python code) describes, validated on load.

A config names everything by registered name or import path, so a run is reproducible from the
file alone. Validation happens in two steps, both raising :class:`ConfigError` with the dotted key
and the allowed values: :func:`parse_config` checks structure, types and ranges (pydantic models
with unknown keys forbidden); :func:`check_names` checks that the method, models, datasets and
callbacks it names are registered, and that the files it names exist.

Relative paths (checkpoints, ``output_dir``) are relative to the working directory.
"""

from __future__ import annotations

import copy
import importlib
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from kdcore import plugins
from kdcore.registry import suggestion


class ConfigError(ValueError):
    """A run config is invalid; the message names the key, what is allowed and what was given."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    """A model to build: ``model`` is a registered model name (``kdcore plugins`` lists them) or an
    import path ``package.module:callable``; ``options`` are its keyword arguments; ``checkpoint``
    a state-dict file to load into it. ``pretrained: true`` says the factory loads trained weights
    itself (e.g. ``from_pretrained``), which a teacher needs when it has no checkpoint.
    ``tokenizer`` names the model's tokenizer for datasets and methods that tokenize text (a
    ``tokenizer.json`` file, a directory holding one, or a tokenizer that ships with kdcore such
    as ``shakespeare-bpe-1024``): a teacher whose tokenizer differs from the student's is distilled
    across tokenizers (``aligned_text`` data, ``cross_tokenizer_kd``)."""

    model: str
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    tokenizer: str | None = None


class MethodSpec(BaseModel):
    """The distillation method: its registered ``name`` plus the method's own options (every other
    key), which the method's factory validates."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSpec(_Section):
    """The dataset (a registered name or import path whose factory returns the ``train`` and
    ``val`` splits) and how it is batched. ``batch_size`` is the global number of examples per
    optimizer step, whatever the number of processes and accumulation steps, so the same config
    trains the same way on one process or many. An epoch is ``len(train) // batch_size`` steps.
    ``ignore_index`` is the label of positions to skip (prompt and padding tokens): the loss is
    normalized over, and the metrics count, only the other positions. ``teacher_cache`` is the
    directory ``kdcore cache-teacher`` writes: a teacher-logit cache of the train split, each
    training batch then carrying its examples' cached top-k teacher (``batch.teacher``), for
    methods that train without running a teacher (``cached_kd``); and in ``val/`` the held-out
    split's, which evaluation scores the student against when no teacher model does."""

    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 256
    num_workers: NonNegativeInt = 0
    shuffle: bool = True
    ignore_index: int = -100
    teacher_cache: str | None = None


class OptimizerSpec(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


class SchedulerSpec(_Section):
    """Learning-rate schedule over a stage's optimizer steps, after ``warmup_steps`` of linear
    warm-up. ``cosine`` and ``linear`` decay to ``min_lr_ratio`` · lr; ``step`` multiplies by
    ``gamma`` every ``step_size`` steps."""

    name: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    step_size: PositiveInt = 1000
    gamma: PositiveFloat = 0.1


class FsdpSpec(_Section):
    """How ``training.parallel: fsdp`` shards (see docs/scale.md). ``shard_modules``: class names of
    the blocks sharded one by one, besides the blocks a Hugging Face model declares
    (``_no_split_modules``); each model is also sharded at its root. ``mixed_precision: bf16``
    computes with bf16 parameters and reduces gradients in float32. ``reshard_after_forward``
    frees the student's gathered blocks after the forward pass (gathered again for backward):
    less memory, more communication. Teachers always reshard after forward."""

    shard_modules: list[str] = Field(default_factory=list)
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    reshard_after_forward: bool = True


class TrainingSpec(_Section):
    """``epochs`` per stage (a method's plan may set its own); ``grad_accum`` micro-batches per
    optimizer step; ``precision: bf16`` runs forward passes under bf16 autocast; ``loss_weights``
    overrides the method's weights of its named terms. ``parallel`` is how several processes
    (``torchrun``) share the work: ``ddp`` (every process holds whole models, gradients are
    all-reduced) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state are sharded over
    the processes, teachers too; options under ``fsdp``). ``fsdp`` also runs in one process."""

    epochs: PositiveInt = 1
    grad_accum: PositiveInt = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    max_grad_norm: PositiveFloat | None = None
    loss_weights: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    log_every: PositiveInt = 10
    find_unused_parameters: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FsdpSpec | None = None

    @pydantic.model_validator(mode="after")
    def _fsdp_options_need_fsdp(self) -> TrainingSpec:
        if self.fsdp is not None and self.parallel != "fsdp":
            raise ValueError("training.fsdp sets FSDP options, but training.parallel is 'ddp'; set "
                             "training.parallel: fsdp, or remove training.fsdp")
        if self.parallel == "fsdp" and self.find_unused_parameters:
            raise ValueError("training.find_unused_parameters is a DDP option; FSDP needs no such setting, remove it")
        return self


class EvalSpec(_Section):
    """How the held-out split is scored. ``language_modeling`` reports token accuracy and perplexity
    over the positions whose label is not ``data.ignore_index``; ``classification`` reports accuracy."""

    task: Literal["classification", "language_modeling"] = "classification"
    ece_bins: PositiveInt = 15


class CheckpointSpec(_Section):
    """Checkpoints are written after every epoch and stage; ``every_steps`` adds one every that many
    optimizer steps within an epoch (for long epochs)."""

    every_steps: PositiveInt | None = None


class RunConfig(_Section):
    """A whole distillation run."""

    method: MethodSpec
    student: ModelSpec
    teachers: list[ModelSpec] = Field(default_factory=list)
    data: DataSpec
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    callbacks: list[str | dict[str, Any]] = Field(default_factory=list)
    seed: int = 0
    output_dir: str = "runs/kdcore"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @pydantic.model_validator(mode="after")
    def _teachers_have_weights(self) -> RunConfig:
        for index, teacher in enumerate(self.teachers):
            if teacher.checkpoint is None and not teacher.pretrained:
                raise ValueError(f"teachers.{index}: a teacher needs trained weights: give checkpoint: PATH "
                                 "(a state-dict file), or pretrained: true if its factory loads them itself")
        return self


def parse_config(source: RunConfig | Mapping[str, Any] | str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a config object, a mapping or a YAML file, with
    ``overrides`` (``"optimizer.lr=0.01"``, values parsed as YAML) applied first."""
    where = "config"
    if isinstance(source, RunConfig):
        data = source.model_dump()
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        where = str(source)
        data = _read_yaml(Path(source))
    for override in overrides:
        _apply_override(data, override)
    try:
        return RunConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{where}: " + "; ".join(_describe(error) for error in exc.errors())) from None


def check_names(config: RunConfig) -> None:
    """Checks what the config names: the method, models, datasets and callbacks must be registered
    (or importable), and checkpoint files must exist."""
    host = plugins.host()
    resolve(config.method.name, host.methods, "method.name")
    specs = [("student", config.student)] + [(f"teachers.{i}", t) for i, t in enumerate(config.teachers)]
    for key, spec in specs:
        resolve(spec.model, host.models, f"{key}.model")
        if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
            raise ConfigError(f"{key}.checkpoint: file {spec.checkpoint!r} does not exist "
                              f"(relative paths are relative to {os.getcwd()})")
    resolve(config.data.dataset, host.datasets, "data.dataset")
    for index, callback in enumerate(config.callbacks):
        name = callback if isinstance(callback, str) else callback.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"callbacks.{index}: a callback given as a mapping needs a 'name' key")
        try:
            host.callbacks.get(name, f"callbacks.{index}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def resolve(name: str, registry, key: str) -> Callable[..., Any]:
    """The factory ``name`` refers to: an import path ``module:attr`` or a registered name."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{key}: cannot import {name!r}: {type(exc).__name__}: {exc}") from None
        if not callable(obj):
            raise ConfigError(f"{key}: {name!r} is not callable")
        return obj
    try:
        return registry.get(name, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (method, student, data, ...), "
                          f"got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optimizer.lr=0.01")
    *parents, leaf = key.split(".")
    node = data
    for index, part in enumerate(parents):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {override!r}: {'.'.join(parents[:index + 1])} is not a section")
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = yaml.safe_load(raw)
    elif isinstance(node, dict):
        node[leaf] = yaml.safe_load(raw)
    else:
        raise ConfigError(f"override {override!r}: {'.'.join(parents)} is not a section")


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _section_keys(error["loc"][:-1])
        hint = suggestion(str(error["loc"][-1]), allowed)
        return f"{key}: unknown key{hint}" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error":
        message += f" (got {error.get('input')!r})"
    return f"{key}: {message}" if key else message


def _section_keys(loc: tuple) -> list[str]:
    """The keys the config section at ``loc`` allows (empty if it is not a fixed section)."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        model = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
