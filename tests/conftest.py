"""Shared fixtures: the backends under test are every available backend that runs on CPU tensors
(so a new backend gets the whole suite by registering itself)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import kdcore  # noqa: E402


def cpu_backends() -> list[str]:
    return [name for name, status in kdcore.backends().items()
            if status.available and ("cpu" in status.devices or "*" in status.devices)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
