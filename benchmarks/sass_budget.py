"""Static performance report of kdcore's GPU kernels, read from their compiled machine code.

    python -m benchmarks.sass_budget [--output FILE] [--check] [--skip-triton]

Needs no GPU: a CUDA toolkit (nvcc), a CUDA build of torch (for the ATen headers) and Triton (for
its nvdisasm and for compiling the Triton kernels). It compiles csrc/cuda/*.cu for sm_90 with
``-lineinfo``, disassembles them with ``nvdisasm -gi``, and prints one JSON line per kernel
variant (kernel x divergence x dtypes): registers, spill bytes, static shared memory and the
instructions issued per logit element in the steady-state loops, next to the goal. With
``--check`` it exits 1 when any kernel spills (or a marked loop is missing from the machine code);
with ``--check-goals`` also when one misses its instruction goal.

How instructions per element are counted (docs/gpu.md): every steady-state loop in the CUDA
sources carries a comment ``// budget-loop: NAME elements=K*VEC`` on the line above it, where
VEC is the logits' 16-byte vector width (8 for bf16/fp16, 4 for float32) and K*VEC the columns
one thread handles per iteration. A machine loop (a backward branch) belongs to the marked loop
whose source lines most of its instructions come from, inlined code included; its instructions
per element are the loop body's count over the marked elements per iteration, and a kernel's
figure is the sum over the loops a row runs through. Loops the compiler split or versioned count
at their largest copy; marked loops that compile to no loop are reported, not guessed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sass import Function, parse_ptxas_report, parse_sass

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = (ROOT / "csrc" / "cuda" / "kd_loss.cu", ROOT / "csrc" / "cuda" / "kd_loss_sparse.cu")
ARCH = "sm_90"

# Instructions per logit element the kernels aim at in bf16 (docs/gpu.md: what the H200's issue
# rate allows at the bandwidth limit of 6 bytes per element).
GOALS = {"forward_kl": 40, "reverse_kl": 40, "tvd": 40, "jsd": 60, "skew_kl": 60, "skew_rkl": 60}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")
DTYPES = {"N3c108BFloat16E": "bfloat16", "N3c104HalfE": "float16", "f": "float32", "d": "float64"}
VEC = {"bfloat16": 8, "float16": 8, "float32": 4, "float64": 2}

_MARKER = re.compile(r"//\s*budget-loop:\s*(?P<name>\w+)\s+elements=(?P<expr>[\w*]+)")


@dataclass(frozen=True)
class MarkedLoop:
    """A steady-state loop of a source file, marked with ``// budget-loop:``."""

    file: str
    name: str
    first_line: int
    last_line: int
    elements: str  # e.g. "2*VEC", "8"

    def elements_for(self, dtype: str) -> int:
        value = 1
        for factor in self.elements.split("*"):
            value *= VEC[dtype] if factor == "VEC" else int(factor)
        return value


def marked_loops(path: Path) -> list[MarkedLoop]:
    """The marked loops of a source file, each spanning from its marker to the end of its body
    (the closing brace, or the semicolon of a single-statement body)."""
    text = path.read_text()
    lines = text.splitlines()
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    loops = []
    for index, line in enumerate(lines):
        marker = _MARKER.search(line)
        if marker is None:
            continue
        end = _loop_end(text, offsets[index + 1])
        if end is None:
            raise ValueError(f"{path}:{index + 1}: budget-loop marker without a braced loop after it")
        last_line = next(i for i in range(len(lines)) if offsets[i + 1] > end) + 1
        loops.append(MarkedLoop(str(path), marker["name"], index + 2, last_line, marker["expr"]))
    return loops


_LOOP_HEAD = re.compile(r"\A(?:\s*#pragma[^\n]*\n)*\s*(?:for|while)\s*\(")


def _loop_end(text: str, start: int) -> int | None:
    """Offset of the last character of the for/while loop starting at ``start`` (after pragmas)."""
    head = _LOOP_HEAD.match(text[start:])
    if head is None:
        return None
    position, depth = start + head.end(), 1
    while depth and position < len(text):  # the parenthesized loop header
        depth += {"(": 1, ")": -1}.get(text[position], 0)
        position += 1
    body = len(text[position:]) - len(text[position:].lstrip())
    position += body
    if text.startswith("{", position):
        depth = 0
        for i in range(position, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return i
        return None
    semicolon = text.find(";", position)
    return semicolon if semicolon >= 0 else None


@functools.lru_cache(maxsize=None)
def _real(path: str) -> str:
    return os.path.realpath(path)


def _owner(locations, loops: list[MarkedLoop]) -> MarkedLoop | None:
    """The innermost marked loop any of an instruction's (inlined) source locations falls in."""
    best = None
    for file, line in locations:
        for loop in loops:
            if _real(file) == _real(loop.file):
                if loop.first_line <= line <= loop.last_line:
                    if best is None or loop.last_line - loop.first_line < best.last_line - best.first_line:
                        best = loop
    return best


@dataclass(frozen=True)
class LoopCost:
    issued: int        # instructions one iteration issues
    mufu: int          # of which on the special-function unit (exp2, log2, reciprocal): a quarter-rate pipe
    shared_bytes: int  # bytes one thread moves to and from shared memory (LDS / STS) per iteration


def shared_bytes(opcode: str) -> int:
    """Bytes one thread moves with a shared-memory load or store (LDS.128: 16, LDS.64: 8, ...)."""
    if not opcode.startswith(("LDS", "STS")):
        return 0
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    return next((w for suffix, w in widths.items() if f".{suffix}" in opcode), 4)


def loop_costs(function: Function, loops: list[MarkedLoop]) -> dict[MarkedLoop, LoopCost]:
    """Instructions per iteration of each marked loop found in a function's machine code."""
    costs: dict[MarkedLoop, LoopCost] = {}
    for machine_loop in function.loops():
        votes: dict[MarkedLoop, int] = {}
        for instruction in machine_loop.instructions:
            owner = _owner(instruction.locations, loops)
            if owner is not None:
                votes[owner] = votes.get(owner, 0) + 1
        if not votes:
            continue
        owner = max(votes, key=votes.get)
        if votes[owner] * 2 < len(machine_loop.instructions):
            continue  # mostly other code (a reduction or setup loop the marker's lines merely touch)
        cost = LoopCost(machine_loop.issued, sum(i.opcode.startswith("MUFU") for i in machine_loop.instructions),
                        sum(shared_bytes(i.opcode) for i in machine_loop.instructions))
        if owner not in costs or cost.issued > costs[owner].issued:
            costs[owner] = cost
    return costs


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled kernel names to C++ signatures, through binutils' c++filt."""
    tool = shutil.which("c++filt")
    if tool is None:
        raise SystemExit("sass_budget: c++filt not found; install binutils (it names the kernel variants)")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _dtype(token: str) -> str:
    return {"c10::BFloat16": "bfloat16", "c10::Half": "float16", "float": "float32", "double": "float64"}[token.strip()]


_DIVERGENCE_NAMES = {f"(kdcore::Divergence){i}": name for i, name in enumerate(DIVERGENCES)}
_CE_NAMES = {"(kdcore::cuda::(anonymous namespace)::CE)0": "none", "(kdcore::cuda::(anonymous namespace)::CE)1": "same_t",
             "(kdcore::cuda::(anonymous namespace)::CE)2": "separate_t"}


def describe(demangled: str) -> dict | None:
    """Kernel family, dtypes, divergence and variant of a demangled kdcore kernel name."""
    match = re.search(r"::(?P<kernel>\w+_kernel)<(?P<args>.*)>\(", demangled)
    if match is None:
        return None
    args = [a.strip() for a in re.split(r",(?![^<]*>)", match["args"])]
    kernel = match["kernel"]
    if kernel == "kd_loss_fast_kernel":
        s, t, div, ce = args
        return {"kernel": "cuda.kd_loss[fast]", "student": _dtype(s), "teacher": _dtype(t),
                "divergence": _DIVERGENCE_NAMES.get(div, div), "ce": _CE_NAMES.get(ce, ce)}
    if kernel == "kd_loss_general_kernel":
        s, t, _acc, div, staged = args
        return {"kernel": f"cuda.kd_loss[{'staged' if staged == 'true' else 'streamed'}]", "student": _dtype(s),
                "teacher": _dtype(t), "divergence": _DIVERGENCE_NAMES.get(div, div), "ce": "any"}
    if kernel in ("row_stats_kernel", "fill_kernel"):
        return {"kernel": f"cuda.sparse_{kernel.removesuffix('_kernel')}", "student": _dtype(args[0]),
                "teacher": None, "divergence": None, "ce": None, "variant": ", ".join(args[1:])}
    return None


def cuda_include_flags() -> list[str]:
    import torch.utils.cpp_extension as ext

    flags = [f"-I{p}" for p in ext.include_paths("cuda")] + [f"-I{ROOT / 'csrc' / 'include'}"]
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        flags += [f"-I{p}" for p in sorted(Path(root).glob("*/include")) if p.is_dir()]
    return flags


def find_tool(name: str) -> str:
    candidates = [shutil.which(name)]
    import importlib.util

    triton = importlib.util.find_spec("triton")  # found, not imported: its import needs more than its tools
    if triton is not None and triton.origin:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / name))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / name))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit(f"sass_budget: {name} not found (install a CUDA toolkit or triton, which ships {name})")


def compile_cuda(source: Path, workdir: Path) -> tuple[dict[str, Function], str]:
    """Compiles one .cu file for sm_90; returns its functions and the ptxas report."""
    nvcc = find_tool("nvcc")
    cubin = workdir / (source.stem + ".cubin")
    command = [nvcc, "-cubin", f"-arch={ARCH}", "-O3", "-std=c++20", "-lineinfo", "-Xptxas", "-v", "-DNDEBUG",
               "--expt-relaxed-constexpr", *cuda_include_flags(), "-o", str(cubin), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sass_budget: nvcc failed on {source}:\n{result.stderr[-4000:]}")
    listing = subprocess.run([find_tool("nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    return parse_sass(listing), result.stderr


def cuda_reports(workdir: Path) -> list[dict]:
    reports = []
    for source in CUDA_SOURCES:
        loops = marked_loops(source)
        functions, ptxas = compile_cuda(source, workdir)
        resources = parse_ptxas_report(ptxas)
        names = demangle(list(functions))
        for mangled, function in sorted(functions.items()):
            info = describe(names[mangled])
            if info is None:
                continue
            # per column of the problem: a loop over one side's packs counts at the narrower vector
            dtype = min((d for d in (info["student"], info["teacher"]) if d), key=VEC.get)
            costs = loop_costs(function, loops)
            per_loop = {loop.name: round(cost.issued / loop.elements_for(dtype), 2) for loop, cost in costs.items()}
            mufu = {loop.name: cost.mufu / loop.elements_for(dtype) for loop, cost in costs.items()}
            shared = {loop.name: cost.shared_bytes / loop.elements_for(dtype) for loop, cost in costs.items()}
            counted = row_loops(info)
            res = resources.get(mangled)
            reports.append({
                **info,
                "arch": ARCH,
                "registers": res.registers if res else None,
                "spill_bytes": res.spill_bytes if res else None,
                "stack_bytes": res.stack_bytes if res else None,
                "shared_bytes": res.shared_bytes if res else None,
                "instructions_per_element": round(sum(per_loop.get(name, 0) * times for name, times in counted.items()), 2),
                "mufu_per_element": round(sum(mufu.get(name, 0) * times for name, times in counted.items()), 2),
                "shared_bytes_per_element": round(sum(shared.get(name, 0) * times for name, times in counted.items()), 2),
                "loops": per_loop,
                "counted": counted,
                "loops_not_found": sorted(set(counted) - set(per_loop)),
            })
    return reports


KL = ("forward_kl", "reverse_kl")


def row_loops(info: dict) -> dict[str, int]:
    """The marked loops one row of a kernel runs through in the usual case, with how many times:
    the dense kernels stage both rows in one loop (same dtypes) or one after the other (mixed),
    then run their phases (no terms pass for the KL divergences); the sparse kernels run one loop."""
    kernel = info["kernel"]
    if kernel.startswith("cuda.kd_loss["):
        if kernel == "cuda.kd_loss[streamed]":
            counted = {"max": 1}
        elif info["student"] == info["teacher"]:
            counted = {"stage_pair": 1}
        else:
            counted = {"stage_one": 2}
        counted.update({"exp": 1, "gradient": 1})
        if info["divergence"] not in KL:
            counted["terms"] = 1
        return counted
    if kernel == "cuda.sparse_row_stats":
        return {"row_stats": 1}
    if kernel == "cuda.sparse_fill":
        return {"fill": 1}
    return {}


def goal_for(report: dict) -> float | None:
    """The instruction goal of a report: its divergence's, for the kernels that run a 16-bit logit
    pair at 6 bytes per element in the usual training call -- the CUDA fast kernel, and the Triton
    kernel's student-gradient variants (benchmarks/triton_budget.py sets those) -- else none."""
    sixteen_bit = report.get("student") in ("bfloat16", "float16") and report.get("teacher") == report.get("student")
    if report["kernel"] == "cuda.kd_loss[fast]" and sixteen_bit:
        return GOALS[report["divergence"]]
    return report.get("goal")


@dataclass(frozen=True)
class Gpu:
    """What bounds a loss kernel's time: memory bandwidth and the two issue limits that matter."""

    name: str
    sms: int
    clock_hz: float              # SM clock under load
    lanes_per_sm_cycle: int      # 4 schedulers x 32 lanes: one warp instruction each per cycle
    mufu_lanes_per_sm_cycle: int  # the special-function unit (exp2, log2, reciprocal)
    shared_bytes_per_sm_cycle: int  # 32 banks x 4 bytes
    copy_bytes_per_s: float      # a device-to-device copy, bytes read + written


# Figures measured on an H200: 132 SMs, a device-to-device copy at 4.3 TB/s, 1.98 GHz right after
# a matrix product (1.755 GHz is the sustained clock assumed here).
H200 = Gpu("H200", 132, 1.755e9, 128, 16, 128, 4.3e12)
# The problems of ANCHORS.md: bf16 student and teacher logits, N = 8192 rows.
PROBLEMS = ((8192, 32000), (8192, 128256), (8192, 262144))


def prediction(report: dict, n: int, v: int, gpu: Gpu = H200) -> dict:
    """The time a kernel's instruction budget predicts for an [n, v] bf16 problem: the slowest of
    moving 6 bytes per element at the copy rate, issuing its instructions, its MUFU work, and its
    shared-memory traffic (conflict-free: the kernel's accesses are laid out for that)."""
    elements = n * v
    per_cycle = gpu.sms * gpu.clock_hz
    memory = elements * 6 / gpu.copy_bytes_per_s
    issue = elements * report["instructions_per_element"] / (per_cycle * gpu.lanes_per_sm_cycle)
    mufu = elements * report.get("mufu_per_element", 0) / (per_cycle * gpu.mufu_lanes_per_sm_cycle)
    shared = elements * report.get("shared_bytes_per_element", 0) / (per_cycle * gpu.shared_bytes_per_sm_cycle)
    bound, seconds = max((("bandwidth", memory), ("issue", issue), ("mufu", mufu), ("shared memory", shared)),
                         key=lambda x: x[1])
    return {"kernel": report["kernel"], "divergence": report["divergence"], "dtype": report["student"],
            "ce": report.get("ce"), "n": n, "v": v, "gpu": gpu.name, "memory_ms": round(memory * 1e3, 3),
            "issue_ms": round(issue * 1e3, 3), "mufu_ms": round(mufu * 1e3, 3), "shared_ms": round(shared * 1e3, 3),
            "predicted_ms": round(seconds * 1e3, 3), "bound": bound,
            "fraction_of_limit": round(memory / seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any spill, or a marked loop missing from the machine code")
    parser.add_argument("--check-goals", action="store_true", help="exit 1 also on any missed instruction goal")
    parser.add_argument("--skip-triton", action="store_true", help="report the CUDA kernels only")
    parser.add_argument("--predict", action="store_true",
                        help="also print the predicted H200 time of the bf16 kernels on the ANCHORS.md problems")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdcore-sass-") as tmp:
        reports = cuda_reports(Path(tmp))
    if not args.skip_triton:
        from benchmarks.triton_budget import reports as triton_reports

        reports += triton_reports()
    failures, misses = [], []
    lines = []
    for report in reports:
        goal = goal_for(report)
        report["goal"] = goal
        report["meets_goal"] = None if goal is None else report["instructions_per_element"] <= goal
        if report.get("spill_bytes"):
            failures.append(f"{report['kernel']} {report.get('divergence')} {report.get('student')}: "
                            f"{report['spill_bytes']} spill bytes")
        if report["meets_goal"] is False:
            misses.append(f"{report['kernel']} {report['divergence']} {report['student']}: "
                            f"{report['instructions_per_element']} instructions per element > {goal}")
        if report.get("loops_not_found"):
            failures.append(f"{report['kernel']} {report.get('divergence')} {report.get('student')}: marked loops "
                            f"{report['loops_not_found']} not found in the machine code")
        lines.append(json.dumps(report, sort_keys=True))
    if args.predict:
        for report in reports:
            if report["goal"] is not None and report["student"] == "bfloat16" and report.get("ce") in ("none", None):
                lines += [json.dumps(prediction(report, n, v)) for n, v in PROBLEMS]
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    for failure in failures + misses:
        print("sass_budget:", failure, file=sys.stderr)
    return 1 if (args.check and failures) or (args.check_goals and (failures or misses)) else 0


if __name__ == "__main__":
    sys.exit(main())
