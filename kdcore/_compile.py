"""Marks for torch.compile that do not import torch._dynamo.

``torch.compiler.assume_constant_result`` imports torch._dynamo (most of a second) when it
decorates, i.e. on every ``import kdcore``. :func:`constant_result` sets the same mark directly;
tests/test_compile_marks.py checks that it is still the one the decorator sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)``: under torch.compile, ``fn`` runs eagerly at
    trace time and the graph keeps its answer as a constant."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
