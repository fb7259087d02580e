"""Shared fixtures: the backends under test are every available backend that runs on the test
device (so a new backend gets the whole suite by registering itself).

The test device is the CPU, or what ``KDCORE_TEST_DEVICE`` names (``KDCORE_TEST_DEVICE=cuda`` runs
the suite on a GPU: tensors are created there and the CUDA backends are the ones under test).
Without a CUDA device the Triton kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before kdcore imports Triton), so they face the same cases.

The interpreter is two to three orders of magnitude slower than the compiled backends, so the
fast tier (``-m "not slow"``) runs the interpreted Triton backend on a covering subset of the
parametrized tests: each test function at least once, and every value of every parameter (each
divergence, case, dtype, reduction, sparse mode, ...) at least once. The rest is marked ``slow``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TEST_DEVICE = os.environ.get("KDCORE_TEST_DEVICE", "cpu")
# Inductor's compile cache does not key its C++ on ATEN_CPU_CAPABILITY: code cached by a run under
# one capability fails to build under another (`at::vec` undeclared). One cache per capability.
if "ATEN_CPU_CAPABILITY" in os.environ:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY']}-{os.getuid()}"))
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


def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` each interpreted-Triton item that is not its test function's first and adds
    no parameter value that earlier interpreted items have not covered (see the docstring)."""
    if not _triton_interpreted():
        return
    functions, covered = set(), set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") != "triton":
            continue
        values = {(name, _value_id(value)) for name, value in params.items() if name != "backend"}
        if item.function not in functions or values - covered:
            functions.add(item.function)
            covered |= values
        else:
            item.add_marker(pytest.mark.slow)


def _value_id(value) -> str:
    """A parameter value's identity across test functions (cases by name, dtypes by name)."""
    return getattr(value, "name", None) or str(value)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and kdcore.backends()["triton"].available
