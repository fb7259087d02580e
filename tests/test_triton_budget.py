"""The static report of the Triton kernels (benchmarks/triton_budget.py): every variant compiles for
sm_90 without spilling a register. Needs Triton with its NVIDIA backend (ptxas, nvdisasm), no GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _ptxas_reason() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return "triton is not installed"
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    if not all((bin_dir / tool).exists() for tool in ("ptxas", "nvdisasm")):
        return "triton has no NVIDIA backend with ptxas and nvdisasm"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_ptxas_reason() is not None, reason=str(_ptxas_reason()))
def test_no_triton_kernel_spills():
    from benchmarks.triton_budget import reports

    found = reports()
    assert {r["kernel"] for r in found} == {"triton.kd_loss[single_tile]", "triton.kd_loss[multi_tile]",
                                            "triton.kd_loss_sparse[row_stats]", "triton.kd_loss_sparse[fill]"}
    spilling = [(r["kernel"], r["divergence"], r["dtype"], r["spill_bytes"]) for r in found if r["spill_bytes"] != 0]
    assert not spilling, f"variants that spill (or whose ptxas report was not found): {spilling}"
    assert all(r["instructions_per_element"] > 0 for r in found)
