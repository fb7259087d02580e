"""Shared fixtures: the backends under test are every available backend that runs on the test
device (so a new backend gets the whole suite by registering itself).

The test device is the CPU, or what ``KDCORE_TEST_DEVICE`` names (``KDCORE_TEST_DEVICE=cuda`` runs
the suite on a GPU: tensors are created there and the CUDA backends are the ones under test).
Without a CUDA device the Triton kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before kdcore imports Triton), so they face the same cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TEST_DEVICE = os.environ.get("KDCORE_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)

sys.path.insert(0, str(Path(__file__).parent))

import kdcore  # noqa: E402


def device_backends() -> list[str]:
    device_type = torch.device(TEST_DEVICE).type
    return [name for name, status in kdcore.backends().items()
            if status.available and (device_type in status.devices or "*" in status.devices)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The model spec of a small classification teacher, trained once per session."""
    from engine_helpers import train_teacher

    return train_teacher(tmp_path_factory.mktemp("teacher"))
