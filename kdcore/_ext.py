"""Loads kdcore's compiled modules and remembers why one could not be loaded.

``kdcore._C`` holds the native op schemas (and the CUDA kernels when built with CUDA);
``kdcore._cpu_<isa>`` holds the CPU kernel compiled for one instruction set. The best variant the
processor supports is loaded, following ``torch.backends.cpu.get_cpu_capability()`` so that
``ATEN_CPU_CAPABILITY=default`` forces the portable build exactly as it does for torch itself.
Import never fails: a missing or broken build only makes the native backends unavailable, and
``kdcore.backends()`` reports the reason.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

_CPU_VARIANTS_BY_CAPABILITY = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}


@dataclass(frozen=True)
class ExtensionStatus:
    core_error: str | None  # why kdcore._C did not load, or None
    cpu_variant: str | None  # the instruction set of the loaded CPU kernel module
    cpu_error: str | None  # why no CPU kernel module loaded, or None
    with_cuda: bool  # kdcore._C was built with the CUDA kernels


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.cache
def status() -> ExtensionStatus:
    """Loads the compiled modules once and reports what loaded."""
    try:
        core = importlib.import_module("kdcore._C")
    except (ImportError, OSError) as exc:
        reason = f"kdcore._C could not be loaded ({_describe(exc)}); build it with `pip install --no-build-isolation -e .`"
        return ExtensionStatus(core_error=reason, cpu_variant=None, cpu_error=reason, with_cuda=False)

    capability = torch.backends.cpu.get_cpu_capability()
    failures = []
    for variant in _CPU_VARIANTS_BY_CAPABILITY.get(capability, ("default",)):
        try:
            importlib.import_module(f"kdcore._cpu_{variant}")
        except (ImportError, OSError) as exc:
            failures.append(f"{variant}: {_describe(exc)}")
            continue
        return ExtensionStatus(None, variant, None, bool(core.with_cuda))
    reason = "no CPU kernel module could be loaded (" + "; ".join(failures) + ")"
    return ExtensionStatus(None, None, reason, bool(core.with_cuda))
