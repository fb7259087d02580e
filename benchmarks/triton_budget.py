"""Static report of kdcore's Triton kernels, read from their sm_90 machine code (no GPU needed).

    python -m benchmarks.triton_budget [--python PYTHON]

Compiles the dense kd_loss kernel (single-tile and multi-tile, at the sizes ``GPU_TILING`` picks)
per divergence x dtype x features -- ``student_grad`` (the usual training call: the student's
gradient, no labels, no mask, no fused CE; the goals apply to it) and ``all`` (labels, mask, the
fused CE, student and teacher gradients) -- and the sparse family's ``row_stats`` and ``fill``
kernels per dtype, and prints one JSON line per variant: registers, spill bytes, shared memory and
instructions per logit element.

The compiles run in a subprocess of ``--python`` (default: this interpreter), which needs Triton
with its NVIDIA backend (ptxas, nvdisasm) -- a CUDA build of torch is not required. The subprocess
loads only kdcore's kernel modules, so that interpreter need not have kdcore's dependencies.

How instructions per element are counted: SASS instructions (padding NOPs excluded) one thread
issues, over the logit columns that thread handles in the same stretch of code. A kernel that
sweeps a row tile by tile: the sum over its sweep loops of the loop body's count (a nested loop's
body counted once: one pass of the sparse kernel's top-k window), over the columns one thread
takes per iteration (BLOCK / threads). A row held in one tile (no sweep loop): the whole kernel's
count, minus the loops that only fill dropped or failed rows, over BLOCK / threads. That is an
upper bound (it includes every branch of the row prologue).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from benchmarks.sass import Function, parse_ptxas_report, parse_sass
from benchmarks.sass_budget import DIVERGENCES, GOALS

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# The kd_loss kernel's feature flags: the usual training call, and everything on.
FEATURES = {
    "student_grad": {"HAS_LABELS": False, "HAS_MASK": False, "HAS_CE": False, "TEACHER_GRAD": False},
    "all": {"HAS_LABELS": True, "HAS_MASK": True, "HAS_CE": True, "TEACHER_GRAD": True},
}


def dense_variants() -> list[dict]:
    """The dense kernel's variants: divergence x dtype x features x (single tile, multi tile)."""
    from kdcore.ops.triton.kd_loss import GPU_TILING, MULTI_TILE_WARPS, register_cap, single_tile_warps

    variants = []
    for (dtype, short), (features, flags) in ((d, f) for d in DTYPES.items() for f in FEATURES.items()):
        for code, divergence in enumerate(DIVERGENCES):
            for single_tile in (True, False):
                block = GPU_TILING["max_single_tile"] if single_tile else GPU_TILING["block"]
                variants.append({
                    "kernel": "kd_loss", "name": f"triton.kd_loss[{'single_tile' if single_tile else 'multi_tile'}]",
                    "divergence": divergence, "dtype": dtype, "features": features, "block": block,
                    "loop": not single_tile,
                    "num_warps": single_tile_warps(block) if single_tile else MULTI_TILE_WARPS,
                    "maxnreg": register_cap(single_tile_warps(block) if single_tile else MULTI_TILE_WARPS),
                    "signature": {"S": f"*{short}", "T": f"*{short}", "GS": f"*{short}", "GT": f"*{short}",
                                  "LABELS": "*i64", "MASK": "*i1", "DIVISOR": "*fp32", "PARAMS": "*fp32",
                                  "ROW_LOSS": "*fp32", "STATUS": "*i8", "s_stride": "i64", "t_stride": "i64",
                                  "gs_stride": "i64", "gt_stride": "i64", "n_cols": "i32", "ignore_index": "i64"},
                    "constexprs": {"DIVERGENCE": code, **flags, "STUDENT_GRAD": True, "NEEDS_ROW_SUMS": code != 0,
                                   "BLOCK": block, "SINGLE_TILE": single_tile, "ACC": "tl.float32",
                                   "FAST": dtype != "float32"},
                })
    return variants


def sparse_variants() -> list[dict]:
    """The sparse family's two row kernels per dtype (tail and T=1 statistics, the CE on)."""
    from kdcore.ops.triton.kd_loss_sparse import FILL_WARPS, GPU_BLOCK, MAX_WINDOW, ROW_STATS_WARPS

    variants = []
    for dtype, short in DTYPES.items():
        common = {"dtype": dtype, "divergence": None, "block": GPU_BLOCK, "loop": True}
        variants.append({**common, "kernel": "row_stats", "num_warps": ROW_STATS_WARPS,
                         "name": "triton.kd_loss_sparse[row_stats]",
                         "signature": {"S": f"*{short}", "IDX": "*i64", "OUT": "*fp64", "INV_T": "*fp32",
                                       "s_stride": "i64", "n_cols": "i32", "k": "i32"},
                         "constexprs": {"WITH_TAIL": True, "WITH_T1": True, "BLOCK": GPU_BLOCK, "WINDOW": MAX_WINDOW,
                                        "ACC": "tl.float32"}})
        variants.append({**common, "kernel": "fill", "num_warps": FILL_WARPS, "name": "triton.kd_loss_sparse[fill]",
                         "signature": {"S": f"*{short}", "G": f"*{short}", "KEPT": "*i1", "LABELS": "*i64",
                                       "PARAMS": "*fp32", "INV_T": "*fp32", "s_stride": "i64", "g_stride": "i64",
                                       "n_cols": "i32"},
                         "constexprs": {"HAS_CE": True, "BLOCK": GPU_BLOCK, "ACC": "tl.float32"}})
    return variants


def _import_kernels() -> dict:
    """kdcore's Triton kernel modules, imported without running kdcore's package __init__ files (the
    compiling interpreter may lack kdcore's dependencies): stub packages point at the sources."""
    for name in ("kdcore", "kdcore.ops", "kdcore.ops.triton"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(ROOT.joinpath(*name.split(".")))]
            sys.modules[name] = package
    from kdcore.ops.triton import kd_loss, kd_loss_sparse

    return {"kd_loss": kd_loss.kd_loss_kernel, "row_stats": kd_loss_sparse.row_stats_kernel,
            "fill": kd_loss_sparse.fill_kernel, "fill_row": kd_loss._fill_row}


def _compile(variant: dict, kernels: dict) -> dict:
    """One variant compiled for sm_90: the ptxas report, the SASS listing and the shared memory."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernels[variant["kernel"]]
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in variant["constexprs"].items()}
    signature = {**variant["signature"], **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": variant["num_warps"]}
    if "maxnreg" in variant:
        options["maxnreg"] = variant["maxnreg"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v report
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", "-gi", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    # newer Triton runs its ptxas as "ptxas-blackwell", which prefixes the report with that name
    report = log.getvalue().replace("ptxas-blackwell info", "ptxas info")
    return {"ptxas": report, "sass": sass, "shared": compiled.metadata.shared}


def _compile_all() -> None:
    """The compiling subprocess: every variant, with the fill loop's source lines, as JSON on stdout."""
    kernels = _import_kernels()
    variants = dense_variants() + sparse_variants()
    results = [_compile(variant, kernels) for variant in variants]
    json.dump({"variants": variants, "results": results, "fill_source": _source_lines(kernels["fill_row"])},
              sys.stdout)


def compile_variants(python: str) -> dict:
    """Runs _compile_all in ``python`` (a fresh Triton cache, so ptxas runs and reports)."""
    with tempfile.TemporaryDirectory(prefix="kdcore-triton-cache-") as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
               "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([python, "-c", "from benchmarks.triton_budget import _compile_all; _compile_all()"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"triton_budget: compiling the Triton kernels failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _source_lines(function) -> tuple[str, int, int]:
    """(file, first line, last line) of a jitted function's source."""
    fn = getattr(function, "fn", function)
    lines, first = inspect.getsourcelines(fn)
    return os.path.realpath(inspect.getsourcefile(fn)), first, first + len(lines) - 1


def _outermost_loops(function: Function) -> list[tuple[int, int]]:
    """(start, end) address spans of the loops not nested in another loop."""
    spans = sorted({(i.target, i.address) for i in function.instructions
                    if i.target is not None and i.target <= i.address})
    return [(s, e) for s, e in spans if not any((s2, e2) != (s, e) and s2 <= s and e <= e2 for s2, e2 in spans)]


def _in_source(instruction, source: tuple[str, int, int]) -> bool:
    file, first, last = source
    return any(os.path.realpath(f) == file and first <= line <= last for f, line in instruction.locations)


def count_instructions(function: Function, fill_source: tuple[str, int, int] | None, loop: bool) -> tuple[int, str]:
    """(instructions one thread issues per stretch of columns, how): the sweep loops' bodies for a
    looping kernel, else the whole kernel; loops that only fill rows (fill_source) are left out."""
    issued = [i for i in function.instructions if not i.is_nop]
    spans = _outermost_loops(function)

    def is_fill(span):
        body = [i for i in issued if span[0] <= i.address <= span[1]]
        return fill_source is not None and sum(_in_source(i, fill_source) for i in body) * 2 > len(body)

    sweeps = [s for s in spans if not is_fill(s)]
    if loop:
        count = sum(1 for i in issued if any(s <= i.address <= e for s, e in sweeps))
        return count, f"sum of {len(sweeps)} sweep loop bodies (SASS, NOPs excluded) / columns per thread per iteration"
    fills = [s for s in spans if is_fill(s)]
    count = sum(1 for i in issued if not any(s <= i.address <= e for s, e in fills))
    return count, "whole kernel without its row-fill loops (SASS, NOPs excluded; no sweep loop) / columns per thread"


def reports(python: str | None = None) -> list[dict]:
    """One dict per Triton kernel variant (see the module docstring)."""
    compiled = compile_variants(python or sys.executable)
    fill_source = tuple(compiled["fill_source"])
    out = []
    for variant, result in zip(compiled["variants"], compiled["results"]):
        functions = parse_sass(result["sass"])
        (name, function), = functions.items()
        resources = parse_ptxas_report(result["ptxas"]).get(name)
        count, how = count_instructions(function, fill_source if variant["kernel"] == "kd_loss" else None,
                                        variant["loop"])
        columns_per_thread = variant["block"] / (32 * variant["num_warps"])
        report = {
            "kernel": variant["name"], "divergence": variant["divergence"], "dtype": variant["dtype"],
            "student": variant["dtype"], "teacher": variant["dtype"], "features": variant.get("features"),
            "arch": "sm_90", "block": variant["block"],
            "num_warps": variant["num_warps"],
            "registers": resources.registers if resources else None,
            "spill_bytes": resources.spill_bytes if resources else None,
            "shared_bytes": max(result["shared"], resources.shared_bytes if resources else 0),
            "instructions_per_element": round(count / columns_per_thread, 2),
            "method": f"{how} ({columns_per_thread:g})",
        }
        if variant["kernel"] == "kd_loss" and variant["dtype"] != "float32" and variant["features"] == "student_grad":
            report["goal"] = GOALS[variant["divergence"]]
        out.append(report)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="the interpreter whose Triton compiles the kernels (default: this one)")
    args = parser.parse_args(argv)
    for report in reports(args.python):
        print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
