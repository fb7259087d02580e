"""Builds what a config names: models (with their checkpoints) and dataset splits.

A name is looked up among the registered models/datasets; a name with a colon
(``package.module:callable``) is imported. Errors name the config key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from kdcore import plugins
from kdcore.cache import CacheError, CachedTeacherDataset
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


def build_splits(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """The ``train`` and ``val`` splits of the configured dataset; the train split carries its
    cached teacher when the config names a ``teacher_cache``."""
    factory = resolve(spec.dataset, plugins.host().datasets, "data.dataset")
    try:
        splits = factory(**spec.options)
    except TypeError as exc:
        raise ConfigError(f"data.options: dataset {spec.dataset!r} rejected its options {spec.options}: {exc}") from None
    if not isinstance(splits, Mapping) or not {"train", "val"} <= set(splits):
        raise ConfigError(f"data.dataset: {spec.dataset!r} must return a mapping with 'train' and 'val' splits, "
                          f"got {type(splits).__name__}"
                          + (f" with keys {sorted(splits)}" if isinstance(splits, Mapping) else ""))
    for split in ("train", "val"):
        if len(splits[split]) == 0:
            raise ConfigError(f"data.dataset: the {split!r} split of {spec.dataset!r} is empty")
    train = splits["train"]
    if spec.teacher_cache is not None:
        try:
            train = CachedTeacherDataset(train, spec.teacher_cache)
        except (CacheError, OSError) as exc:
            raise ConfigError(f"data.teacher_cache: {exc}") from None
    return train, splits["val"]
