"""Argument checks with errors that name the argument, what was expected and what was given.

Every public entry point validates through these, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from numbers import Integral, Real

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def suggestion(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def choice(fn: str, name: str, value, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
                         f"{suggestion(value, choices)}")
    return value


def real(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return value


def positive(fn: str, name: str, value) -> float:
    value = real(fn, name, value)
    if value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    return value


def non_negative(fn: str, name: str, value) -> float:
    value = real(fn, name, value)
    if value < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")
    return value


def in_interval(fn: str, name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    value = real(fn, name, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{fn}: {name} must lie in {interval}, got {value}")
    return value


def integer(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    return int(value)


def boolean(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {type(value).__name__}")
    return value


def tensor(fn: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def logits(fn: str, name: str, value) -> torch.Tensor:
    value = tensor(fn, name, value)
    if value.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if value.dim() < 1:
        raise ValueError(f"{fn}: {name} must have a vocabulary dimension ([..., V]), got a 0-dim tensor")
    if value.shape[-1] < 1:
        raise ValueError(f"{fn}: {name} has an empty vocabulary dimension (shape {tuple(value.shape)})")
    return value


def same_device(fn: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{fn}: {name} is on {value.device}, expected {reference.device} (the device of "
                             f"{reference_name})")


def row_tensor(fn: str, name: str, value, leading: torch.Size, *, kind: str) -> torch.Tensor:
    """Validates labels (kind='int') or a mask (kind='bool') with one entry per row of the logits,
    shaped like the logits' leading dimensions (or flat), and returns it flattened to [N]."""
    value = tensor(fn, name, value)
    if kind == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {value.dtype}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got {value.dtype}")
    n = math.prod(leading)
    if value.shape != leading and not (value.dim() == 1 and value.numel() == n):
        raise ValueError(f"{fn}: {name} must have shape {tuple(leading)} (one entry per row of the logits) "
                         f"or [{n}], got {tuple(value.shape)}")
    value = value.reshape(n)
    return value.long() if kind == "int" else value
