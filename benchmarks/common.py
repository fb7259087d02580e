"""Measurement helpers shared by the benchmarks: timing quantiles, peak extra memory, the
machine's copy bandwidth, the torch.compile peer and the check that it ran compiled, and one JSON
line per result.

Benchmarks print results; they assert nothing about time and write no files unless asked.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch._dynamo.utils import counters

COMPILE_PEER = "torch-compile"


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


def compile_peer(fn: Callable) -> Callable:
    """``torch.compile(fn)`` for one problem, compiled from scratch: dynamo's caches are reset
    first. Dynamo counts every compilation of a code object -- each divergence, shape and dtype
    is one -- towards its recompile limit (8) and past it silently runs the function eagerly, so
    one peer compiled across many problems would report eager figures as compiled ones."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _dynamo_counts() -> dict[str, Counter]:
    """A copy of the dynamo counters that tell whether a call ran compiled."""
    return {group: Counter(counters[group]) for group in ("frames", "stats", "graph_break", "unimplemented")}


def compile_fallback(before: dict[str, Counter], after: dict[str, Counter]) -> str | None:
    """Why the compiled peer ran (part of) its loss eagerly between two :func:`_dynamo_counts`,
    or None when dynamo compiled every frame it met into a graph with no graph break. A frame
    dynamo gives up on (recompile limit, an unsupported construct, a compiler error it
    suppressed) or skips without a word runs eagerly, so an unchanged count is a fallback too."""
    new = {group: after[group] - before[group] for group in after}
    if new["graph_break"]:
        return "graph break: " + next(iter(new["graph_break"])).splitlines()[0][:200]
    if new["unimplemented"]:
        return next(iter(new["unimplemented"])).splitlines()[0][:200]
    if new["frames"]["ok"] < new["frames"]["total"]:
        return f"{new['frames']['total'] - new['frames']['ok']} of {new['frames']['total']} frames not compiled"
    if not new["stats"]["unique_graphs"]:
        return "no graph compiled"
    return None


def measure(steps: dict[str, Callable[[], torch.Tensor]], device: torch.device, *, reset: Callable[[], None],
            budget_s: float, max_reps: int, slow: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Times each step (forward + backward, returning the loss) after an untimed warm-up call
    (which compiles the compiled peer), measures its peak extra memory and keeps its loss:
    name -> (Timing, extra bytes, loss, note), the note saying why the :data:`COMPILE_PEER` step
    did not run compiled (see :func:`compile_fallback`), or (None, None, None, "failed: ...") for
    a step that raised (a peer failing is a result, not a crash). ``reset`` drops the gradients
    the last timed step left, so the memory measurement starts from the inputs alone. ``slow``
    names get 30 % of the budget."""
    measured = {}
    for name, step in steps.items():
        before = _dynamo_counts()
        try:
            timing = time_fn(step, device, budget_s=budget_s * (0.3 if name in slow else 1.0), max_reps=max_reps)
            reset()
            extra = peak_extra_bytes(step, device)
            loss = float(step().detach())
        except (RuntimeError, TypeError, torch.OutOfMemoryError) as exc:
            measured[name] = (None, None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        fallback = compile_fallback(before, _dynamo_counts()) if name == COMPILE_PEER else None
        measured[name] = (timing, extra, loss, fallback and f"{COMPILE_PEER} fell back to eager: {fallback}")
    return measured


def measure_student_losses(losses: dict[str, Callable[[torch.Tensor], torch.Tensor]], student: torch.Tensor,
                           device: torch.device, args) -> dict[str, tuple]:
    """:func:`measure` for losses of one student tensor: each step clears its gradient, computes
    ``loss_fn(student)`` and runs backward (the reference backend gets the short budget)."""
    steps = {}
    for name, loss_fn in losses.items():
        def step(loss_fn=loss_fn):
            student.grad = None
            loss = loss_fn(student)
            loss.backward()
            return loss

        steps[name] = step
    return measure(steps, device, reset=lambda: setattr(student, "grad", None), budget_s=args.budget,
                   max_reps=args.max_reps, slow=("kdcore-reference",))


def results(benchmark: str, measured: dict[str, tuple], problem: dict, device: torch.device, limit_ms: float,
            limit: str) -> list[Result]:
    """One Result per measured implementation, each with the medians of its peers that ran as
    named (a compiled peer that fell back to eager is no peer: its own row carries the note); a
    loss that differs from kdcore's by more than 1 % is noted."""
    out = []
    reference = next((m[2] for k, m in measured.items() if k.startswith("kdcore-") and m[0]), None)
    for name, (timing, extra, loss, note) in measured.items():
        peers = {k: round(m[0].median_ms, 4) for k, m in measured.items() if k != name and m[0] and not m[3]}
        if timing is None:
            out.append(Result(benchmark, name, problem, device_name(device), math.nan, math.nan, math.nan, None,
                              round(limit_ms, 4), 0.0, limit, peers, note))
            continue
        if reference is not None and abs(loss - reference) > 1e-2 * max(1.0, abs(reference)):
            note = "; ".join(filter(None, [note, f"loss {loss:.6g} differs from kdcore's {reference:.6g}"]))
        out.append(Result(benchmark, name, problem, device_name(device), round(timing.median_ms, 4),
                          round(timing.p20_ms, 4), round(timing.p80_ms, 4), extra, round(limit_ms, 4),
                          round(limit_ms / timing.median_ms, 4), limit, peers, note))
    return out


def add_common_arguments(parser, *, temperature: float, max_reps: int) -> None:
    """The options every benchmark takes: device, implementation filter, loss options, budget."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", help="comma list of substrings selecting implementations")
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="one small problem, short budget")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per implementation")
    parser.add_argument("--max-reps", type=int, default=max_reps)


def problems_for(args, device: torch.device, problems: dict[str, list[str]], quick: dict[str, list[str]]) -> list[str]:
    """The problems to run: --problems, else the device's default (or quick) set; --quick also
    shortens the timing budget."""
    if args.quick:
        args.budget, args.max_reps = 0.5, 5
    return args.problems.split(",") if args.problems else (quick if args.quick else problems)[device.type]
