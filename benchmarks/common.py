"""Measurement helpers shared by the benchmarks: timing quantiles, peak extra memory, the
machine's copy bandwidth, and one JSON line per result.

Benchmarks print results; they assert nothing about time and write no files unless asked.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(samples_ms: list[float]) -> Timing:
    samples = sorted(samples_ms)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), q[1], q[7], len(samples))


def time_fn(fn: Callable[[], object], device: torch.device, *, min_reps: int = 5, max_reps: int = 50,
            budget_s: float = 2.0) -> Timing:
    """Runs fn until budget_s or max_reps (at least min_reps) after one warm-up call."""
    if device.type == "cuda":
        import triton.testing

        samples = triton.testing.do_bench(fn, quantiles=None, return_mode="all")
        return _quantiles(list(samples))
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of fn above what was live before it (None where the
    platform gives no way to measure it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _peak_extra_rss(fn)


def _serve_large_blocks_by_mmap() -> bool:
    """Tells glibc to serve every block of 128 KiB or more by mmap and return it on free. Done
    once, at import, before any large tensor exists: glibc otherwise raises its mmap threshold
    after the first large free and keeps later blocks resident in the heap after they are freed."""
    try:
        import ctypes

        m_mmap_threshold = -3
        return ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024) == 1
    except OSError:
        return False


_LARGE_BLOCKS_BY_MMAP = _serve_large_blocks_by_mmap()


def _peak_extra_rss(fn: Callable[[], object]) -> int | None:
    """With large blocks served by mmap, the resident-set peak tracks live tensor bytes; the peak
    mark is reset through /proc/self/clear_refs before the call (Linux)."""
    if not _LARGE_BLOCKS_BY_MMAP:
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) * 1024
    except OSError:
        return None


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-memory copy rate, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, min_reps=5, max_reps=20, budget_s=1.0)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass
class Result:
    """One JSON line: a problem, an implementation, and the peers measured in the same run."""

    benchmark: str
    impl: str
    problem: dict
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    extra_bytes: int | None
    limit_ms: float
    fraction_of_limit: float
    limit: str
    peers: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    def emit(self, stream=sys.stdout) -> None:
        print(json.dumps(asdict(self)), file=stream, flush=True)
