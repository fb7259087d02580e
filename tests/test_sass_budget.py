"""The static performance report (benchmarks/sass_budget.py): its SASS reading on listings written
here, the loop markers of the CUDA sources, and -- where a CUDA toolchain is at hand -- the report
itself: no CUDA kernel spills, and the CUDA fast kernel meets every instruction goal (the Triton
kernels' spills are tests/test_triton_budget.py's; their figures are in docs/gpu.md).

The compiled check needs nvcc, a CUDA build of torch and Triton's nvdisasm. It runs with the
Python named by ``KDCORE_CUDA_PYTHON`` (a separate virtualenv holding the CUDA build of torch;
.ci/run makes one where nvcc exists), or with this one when its torch is a CUDA build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import sass_budget
from benchmarks.sass import parse_ptxas_report, parse_sass

ROOT = Path(__file__).resolve().parent.parent

NVDISASM_LISTING = """
//--------------------- .text._Z6kernelPf --------------------------
.text._Z6kernelPf:
	//## File "/src/k.cu", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
	//## File "/src/k.cu", line 20 inlined at "/src/k.cu", line 12
	//## File "/src/k.cu", line 12
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   NOP ;
.L_x_1:
	//## File "/src/k.cu", line 13
        /*0030*/                   FADD R5, R5, R2 ;
        /*0040*/              @P0 BRA `(.L_x_1) ;
        /*0050*/              @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""

CUOBJDUMP_LISTING = """
		Function : _Z3addPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x00000a0000017a02 */
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;  /* 0x0000000102027810 */
        /*0020*/              @!P0 BRA 0x10 ;               /* 0xfffffffc00088947 */
        /*0030*/                   EXIT ;                    /* 0x000000000000794d */
"""

PTXAS_REPORT = """ptxas info    : Compiling entry function '_Z3addPf' for 'sm_90'
ptxas info    : Function properties for _Z3addPf
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 640 bytes smem
"""


def test_nvdisasm_listing_gives_innermost_loops_and_inlined_locations():
    function = parse_sass(NVDISASM_LISTING)["_Z6kernelPf"]
    assert [i.opcode for i in function.instructions] == ["LDC", "FFMA", "NOP", "FADD", "BRA", "BRA", "EXIT"]
    # both lines of an inlined location belong to the instruction that follows them
    assert function.instructions[1].locations == (("/src/k.cu", 20), ("/src/k.cu", 12), ("/src/k.cu", 12))
    loops = function.loops()
    assert [(loop.start, loop.end) for loop in loops] == [(0x30, 0x40)]  # the outer loop holds it
    assert loops[0].issued == 2


def test_nops_are_not_issued_instructions():
    function = parse_sass(NVDISASM_LISTING.replace("@P0 BRA `(.L_x_1)", "NOP"))["_Z6kernelPf"]
    [loop] = function.loops()
    assert (loop.start, loop.end) == (0x10, 0x50) and loop.issued == 3  # FFMA, FADD, BRA: the NOPs do not count


def test_cuobjdump_listing_with_numeric_targets():
    [loop] = parse_sass(CUOBJDUMP_LISTING)["_Z3addPf"].loops()
    assert (loop.start, loop.end, loop.issued) == (0x10, 0x20, 2)


def test_ptxas_report():
    usage = parse_ptxas_report(PTXAS_REPORT)["_Z3addPf"]
    assert (usage.registers, usage.spill_bytes, usage.stack_bytes, usage.shared_bytes) == (40, 12, 8, 640)


def test_every_marker_spans_one_loop_of_the_sources():
    names = {}
    for source in sass_budget.CUDA_SOURCES:
        lines = source.read_text().splitlines()
        for loop in sass_budget.marked_loops(source):
            body = "\n".join(lines[loop.first_line - 1:loop.last_line])
            assert body.lstrip().startswith(("#pragma unroll 1\n", "for", "while")), (source.name, loop.name)
            assert ("for (" in body or "while (" in body) and body.rstrip().endswith(("}", ";")), (source.name, loop.name)
            assert loop.elements_for("bfloat16") >= 1
            names.setdefault(source.name, set()).add(loop.name)
    assert {"stage_pair", "stage_one", "exp", "terms", "gradient", "max"} <= names["kd_loss.cu"]
    assert {"row_stats", "fill"} <= names["kd_loss_sparse.cu"]


def test_a_marker_without_a_loop_is_an_error(tmp_path):
    source = tmp_path / "k.cu"
    source.write_text("// budget-loop: dangling elements=VEC\nint x;\n")
    with pytest.raises(ValueError, match="budget-loop marker without a braced loop"):
        sass_budget.marked_loops(source)


@pytest.mark.parametrize(("divergence", "student", "teacher", "expected"), [
    ("forward_kl", "bfloat16", "bfloat16", {"stage_pair": 1, "exp": 1, "gradient": 1}),
    ("jsd", "bfloat16", "bfloat16", {"stage_pair": 1, "exp": 1, "terms": 1, "gradient": 1}),
    ("reverse_kl", "bfloat16", "float32", {"stage_one": 2, "exp": 1, "gradient": 1}),
])
def test_a_row_counts_the_loops_it_runs(divergence, student, teacher, expected):
    info = {"kernel": "cuda.kd_loss[fast]", "divergence": divergence, "student": student, "teacher": teacher}
    assert sass_budget.row_loops(info) == expected


def _cuda_python() -> str | None:
    named = os.environ.get("KDCORE_CUDA_PYTHON")
    if named:
        return named
    return sys.executable if torch.version.cuda is not None else None


@pytest.mark.slow
def test_compiled_kernels_do_not_spill_and_meet_their_goals(tmp_path):
    python = _cuda_python()
    if python is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and a CUDA build of torch (set KDCORE_CUDA_PYTHON to a Python that has one)")
    output = tmp_path / "budget.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the suite interprets Triton on CPU; this compiles it
    # the Triton kernels' spills are checked by tests/test_triton_budget.py, which needs no CUDA torch
    result = subprocess.run([python, "-m", "benchmarks.sass_budget", "--check", "--skip-triton", "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-6000:]
    reports = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(r["spill_bytes"] == 0 for r in reports if r["spill_bytes"] is not None)
    fast_bf16 = [r for r in reports if r["kernel"] == "cuda.kd_loss[fast]" and r["student"] == r["teacher"] == "bfloat16"]
    assert {r["divergence"] for r in fast_bf16} == set(sass_budget.DIVERGENCES)
    assert all(r["meets_goal"] for r in fast_bf16)


def test_shared_memory_bytes_per_instruction():
    widths = {op: sass_budget.shared_bytes(op) for op in ("LDS.128", "STS.64", "LDS", "LDS.U16", "STS.U8", "FFMA")}
    assert widths == {"LDS.128": 16, "STS.64": 8, "LDS": 4, "LDS.U16": 2, "STS.U8": 1, "FFMA": 0}


def test_prediction_names_the_slowest_limit():
    report = {"kernel": "cuda.kd_loss[fast]", "divergence": "jsd", "student": "bfloat16", "ce": "none",
              "instructions_per_element": 100.0, "mufu_per_element": 2.0, "shared_bytes_per_element": 8.0}
    slow_issue = sass_budget.prediction(report, 8192, 128256)
    assert slow_issue["bound"] == "issue" and slow_issue["fraction_of_limit"] < 0.5
    fast = sass_budget.prediction({**report, "instructions_per_element": 20.0}, 8192, 128256)
    assert fast["bound"] == "bandwidth" and fast["fraction_of_limit"] == 1.0
    assert fast["memory_ms"] == round(8192 * 128256 * 6 / sass_budget.H200.copy_bytes_per_s * 1e3, 3)
