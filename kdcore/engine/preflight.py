"""Checks a stage's models on one batch before training, so that a model that does not fit the data
or its teachers fails at once, naming the config keys to change, instead of with a shape traceback
after the output directory was written.

Each model runs on two training examples without gradients. A model that raises names its config
key and, where its options say what it expects (``in_features``, ``in_channels``, ``vocab_size``),
the option that disagrees with the data. Then the student's class count is checked against the
labels of the first training batch and against the teacher prediction the method compares it with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kdcore.engine.config import ConfigError, ModelSpec
from kdcore.engine.data import Batch, call_model
from kdcore.engine.method import Outputs

# model options that name a count of classes (or tokens) the model outputs
CLASS_OPTIONS = ("num_classes", "vocab_size", "num_labels")


def check_stage(ctx: Any, specs: Mapping[str, tuple[str, ModelSpec]], method: Any, dataset: str,
                labels: torch.Tensor | None, method_code: Callable[[str], Any]) -> None:
    """Runs each model of ``ctx`` on ``ctx.example``. ``specs`` maps a role (``"student"``,
    ``"teacher0"``, ...) to its config key and spec; ``method`` says which teacher prediction the
    student is compared with; ``dataset`` is the config's ``data.dataset`` (for messages);
    ``labels`` are the first training batch's, checked against the student's class count;
    ``method_code(where)`` is the context the method's own code runs in (naming its plugin)."""
    batch: Batch = ctx.example.to(ctx.device)
    outputs = {role: _run(ctx.raw(role), batch.seen_by(role), *specs[role], dataset) for role in specs}
    student_key, student_spec = specs["student"]
    classes = outputs["student"].shape[-1]
    if labels is not None:
        labels = labels[labels != ctx.ignore_index]
        if labels.numel() and int(labels.max()) >= classes:
            raise ConfigError(f"{_classes(student_key, student_spec, classes)}, but data.dataset {dataset!r} has "
                              f"labels up to {int(labels.max())}: the student needs at least {int(labels.max()) + 1}")
    if batch.teacher_view is not None:  # teachers with their own tokenizer: each covers its own labels
        _check_teacher_labels(batch.teacher_view.labels, outputs, specs, dataset, ctx.ignore_index)
        return
    teachers = [outputs[role] for role in specs if role != "student"]
    teacher_side = "; ".join(_classes(key, spec, outputs[role].shape[-1]) for role, (key, spec) in specs.items()
                             if role != "student" and outputs[role].shape[-1] != classes)
    mismatch = (f"{_classes(student_key, student_spec, classes)} but {{}}; the student is distilled from and "
                "compared with the teacher's prediction, so the counts must be equal")
    try:
        with method_code("teacher_logits"):
            reference = method.teacher_logits(Outputs(outputs["student"], teachers)) if teachers else None
    except Exception:
        if teacher_side:  # combining teachers of different class counts fails: that is the problem to name
            raise ConfigError(mismatch.format(teacher_side)) from None
        raise
    if isinstance(reference, torch.Tensor) and reference.shape[-1] != classes:
        raise ConfigError(mismatch.format(teacher_side or f"the teacher prediction has {reference.shape[-1]}"))


def _check_teacher_labels(labels: torch.Tensor | None, outputs: Mapping[str, torch.Tensor],
                          specs: Mapping[str, tuple[str, ModelSpec]], dataset: str, ignore_index: int) -> None:
    if labels is None:
        return
    labels = labels[labels != ignore_index]
    for role, (key, spec) in specs.items():
        classes = outputs[role].shape[-1]
        if role != "student" and labels.numel() and int(labels.max()) >= classes:
            raise ConfigError(f"{_classes(key, spec, classes)}, but the teacher tokens of data.dataset {dataset!r} go "
                              f"up to {int(labels.max())}: does {key}.tokenizer belong to this model?")


def _run(model: torch.nn.Module, batch: Batch, key: str, spec: ModelSpec, dataset: str) -> torch.Tensor:
    """``model``'s logits on ``batch`` in eval mode without gradients; a failure names ``key``."""
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, batch.inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: model {spec.model!r} fails on a batch of data.dataset {dataset!r} "
                          f"(inputs {_shape(batch.inputs)}): {detail}{_hint(key, spec, batch.inputs)}") from exc
    finally:
        model.train(mode)
    if out.dim() == 0:
        raise ConfigError(f"{key}: model {spec.model!r} returned a scalar; a model must return logits [..., classes]")
    return out


def _hint(key: str, spec: ModelSpec, inputs: Any) -> str:
    """What in ``spec.options`` disagrees with ``inputs``, as a sentence naming the key; or a
    listing of the options when nothing specific is known."""
    options = spec.options
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        inputs = inputs["input_ids"]  # a language model's tokens: what vocab_size must cover
    if isinstance(inputs, torch.Tensor):
        if "in_features" in options and inputs.dim() >= 1 and inputs.shape[-1] != options["in_features"]:
            return (f"; {key}.options.in_features is {options['in_features']} but the inputs have "
                    f"{inputs.shape[-1]} features: set {key}.options.in_features={inputs.shape[-1]}")
        if "in_channels" in options and inputs.dim() == 4 and inputs.shape[1] != options["in_channels"]:
            return (f"; {key}.options.in_channels is {options['in_channels']} but the inputs have "
                    f"{inputs.shape[1]} channels: set {key}.options.in_channels={inputs.shape[1]}")
        if "vocab_size" in options and not inputs.is_floating_point() and inputs.numel() \
                and int(inputs.max()) >= options["vocab_size"]:
            return (f"; {key}.options.vocab_size is {options['vocab_size']} but the inputs hold token id "
                    f"{int(inputs.max())}: set {key}.options.vocab_size to at least {int(inputs.max()) + 1}")
    return f"; check {key}.options ({dict(options)})" if options else ""


def _classes(key: str, spec: ModelSpec, count: int) -> str:
    """``"student outputs 5 classes (student.options.num_classes)"``."""
    option = next((name for name in CLASS_OPTIONS if name in spec.options), None)
    where = f" ({key}.options.{option})" if option else f" (model {spec.model!r})"
    return f"{key} outputs {count} classes{where}"


def _shape(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"{str(inputs.dtype).removeprefix('torch.')}{list(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{name}: {_shape(value)}" for name, value in inputs.items()) + "}"
    return type(inputs).__name__
