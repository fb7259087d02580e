"""The compiled parts: the instruction-set variant follows torch's CPU capability, the portable
build gives the same results, and kdcore still imports (reporting why) when _C cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore import _ext

ROOT = Path(__file__).resolve().parents[1]
needs_cpp = pytest.mark.skipif(not kdcore.backends()["cpp"].available, reason="the cpp backend is not built")


def _run(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=ROOT / "tests", env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_cpp
def test_loaded_variant_matches_torch_capability():
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    assert _ext.status().cpu_variant in (expected, "default")


@needs_cpp
def test_portable_variant_runs_the_suite_cases():
    """ATEN_CPU_CAPABILITY=default loads the variant built without vector ISA flags; it must pass
    the same oracle checks as the vectorized one."""
    out = _run(
        """
        import torch, kdcore
        from kdcore import _ext
        from cases import ALL_DIVERGENCES, CASES, check_backend_on_case
        assert _ext.status().cpu_variant == "default", _ext.status()
        for case in CASES:
            for divergence in ALL_DIVERGENCES:
                check_backend_on_case(kdcore.kd_loss, "cpp", case, divergence, torch.float32)
        print("ok", len(CASES))
        """,
        ATEN_CPU_CAPABILITY="default",
    )
    assert out.startswith("ok")


def test_import_survives_a_broken_extension():
    out = _run(
        """
        import sys, torch
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "kdcore._C":
                    raise ImportError("simulated: undefined symbol _ZN3c10")
        sys.meta_path.insert(0, Broken())
        import kdcore
        status = kdcore.backends()["cpp"]
        assert not status.available and "simulated" in status.reason, status
        s, t = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9)
        kdcore.kd_loss(s, t).backward()  # auto falls back to an available backend
        try:
            kdcore.kd_loss(s, t, backend="cpp")
        except ValueError as e:
            assert "backend 'cpp' is not available: kdcore._C could not be loaded" in str(e), e
        else:
            raise AssertionError("explicit unavailable backend did not raise")
        print("ok")
        """
    )
    assert out.strip() == "ok"
