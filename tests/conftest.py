"""Shared fixtures: the backends under test are every available backend that runs on CPU tensors
(so a new backend gets the whole suite by registering itself).

Without a CUDA device the Triton kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before kdcore imports Triton), so they face the same cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import kdcore  # noqa: E402


def cpu_backends() -> list[str]:
    return [name for name, status in kdcore.backends().items()
            if status.available and ("cpu" in status.devices or "*" in status.devices)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
