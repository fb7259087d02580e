"""Builds what a config names: models (with their checkpoints) and dataset splits.

A name is looked up among the registered models/datasets; a name with a colon
(``package.module:callable``) is imported. Errors name the config key.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdcore import plugins
from kdcore.cache import CacheError, CachedTeacherDataset, held_out_cache
from kdcore.engine.config import ConfigError, DataSpec, ModelSpec, resolve


def build_model(spec: ModelSpec, key: str) -> nn.Module:
    """The model ``spec`` describes, with its checkpoint loaded (strictly: every key must match)."""
    factory = resolve(spec.model, plugins.host().models, f"{key}.model")
    try:
        model = factory(**spec.options)
    except TypeError as exc:
        raise ConfigError(f"{key}.options: model {spec.model!r} rejected its options {spec.options}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}.model: {spec.model!r} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, f"{key}.checkpoint")
    return model


def load_weights(model: nn.Module, path: str | Path, key: str) -> None:
    """Loads a state-dict file into ``model`` strictly; a file for another architecture is an error
    naming the mismatched entries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {str(path)!r} does not exist") from None
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"{key}: cannot read {str(path)!r} as a state dict: {exc}") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"{key}: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or differently shaped entries
        raise ConfigError(f"{key}: {str(path)!r} does not fit the model: {' '.join(str(exc).split())}") from None


def _takes(factory: Any, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def build_tokenizers(student: ModelSpec, teachers: Sequence[ModelSpec]) -> dict[str, Any]:
    """The tokenizers the model specs name, by role (``"student"``, ``"teacher0"``, ...); roles
    without one are absent."""
    from kdcore.cross_tokenizer.vocabulary import load_tokenizer

    named = {"student": ("student", student)} | {f"teacher{i}": (f"teachers.{i}", spec) for i, spec in enumerate(teachers)}
    out = {}
    for role, (key, spec) in named.items():
        if spec.tokenizer is not None:
            try:
                out[role] = load_tokenizer(spec.tokenizer, f"{key}.tokenizer")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return out


def build_splits(spec: DataSpec, tokenizers: Mapping[str, Any] | None = None) -> tuple[Dataset, Dataset]:
    """The ``train`` and ``val`` splits of the configured dataset. When the config names a
    ``teacher_cache``, the train split carries its cached teacher, and so does the val split when
    the cache directory holds one for it (:func:`kdcore.cache.held_out_cache`). A dataset factory
    that takes a ``tokenizers`` argument receives ``tokenizers`` (by model role, see
    :func:`build_tokenizers`)."""
    factory = resolve(spec.dataset, plugins.host().datasets, "data.dataset")
    options = dict(spec.options)
    if "tokenizers" in options:
        raise ConfigError("data.options.tokenizers: name each model's tokenizer on the model instead "
                          "(student.tokenizer, teachers.N.tokenizer)")
    if _takes(factory, "tokenizers"):
        options["tokenizers"] = dict(tokenizers or {})
    try:
        splits = factory(**options)
    except TypeError as exc:
        raise ConfigError(f"data.options: dataset {spec.dataset!r} rejected its options {spec.options}: {exc}") from None
    except ValueError as exc:  # how a dataset says an option, or what the models name, does not fit
        raise ConfigError(f"data: dataset {spec.dataset!r}: {exc}") from None
    if not isinstance(splits, Mapping) or not {"train", "val"} <= set(splits):
        raise ConfigError(f"data.dataset: {spec.dataset!r} must return a mapping with 'train' and 'val' splits, "
                          f"got {type(splits).__name__}"
                          + (f" with keys {sorted(splits)}" if isinstance(splits, Mapping) else ""))
    for split in ("train", "val"):
        if len(splits[split]) == 0:
            raise ConfigError(f"data.dataset: the {split!r} split of {spec.dataset!r} is empty")
    train, val = splits["train"], splits["val"]
    if spec.teacher_cache is not None:
        try:
            train = CachedTeacherDataset(train, spec.teacher_cache)
            held_out = held_out_cache(train.cache)
            if held_out is not None:
                val = CachedTeacherDataset(val, held_out)
        except (CacheError, OSError) as exc:
            raise ConfigError(f"data.teacher_cache: {exc}") from None
    return train, val
