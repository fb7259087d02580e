"""The benchmarks run and print their JSON lines (a smoke test on a tiny problem; they assert
nothing about time): every implementation reports, and the peers' losses agree with kdcore's. The
torch.compile peer runs compiled on every problem, and a row whose peer fell back to eager says so."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks import kd_loss
from benchmarks.common import compile_peer, measure_student_losses, results

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"benchmark", "impl", "problem", "device", "median_ms", "p20_ms", "p80_ms", "extra_bytes", "limit_ms",
          "fraction_of_limit", "limit", "peers", "note"}


@pytest.mark.parametrize("module, problem", [
    ("benchmarks.kd_loss", "float32:64x1000"),
    ("benchmarks.kd_loss_sparse", "float32:64x1000:16"),
    ("benchmarks.fused_linear_kd", "float32:64x32x48x1000"),
])
def test_benchmark_prints_results(module, problem):
    command = [sys.executable, "-m", module, "--device", "cpu", "--problems", problem, "--impls", "cpp,eager",
               "--budget", "0.1", "--max-reps", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["impl"] for line in lines] == ["kdcore-cpp", "torch-eager"]
    for line in lines:
        assert set(line) == FIELDS and line["median_ms"] > 0 and line["limit_ms"] > 0
        assert line["note"] is None, line["note"]  # the loss agrees with kdcore's
        assert list(line["peers"]) == [name for name in ("kdcore-cpp", "torch-eager") if name != line["impl"]]


def kd_loss_args(impls: str) -> argparse.Namespace:
    """The options benchmarks.kd_loss.main would parse, with the shortest timing budget."""
    return argparse.Namespace(impls=impls, temperature=2.0, beta=0.5, alpha=0.1, budget=0.01, max_reps=1)


def test_compile_peer_compiles_every_problem():
    """More problems than dynamo's recompile limit in one process: every problem's torch-compile
    peer still compiles its graph (none reaches the limit and runs eagerly) and its row carries no
    note of a fallback. The limit is lowered to 2 so that three problems exceed it; the default, 8,
    is exceeded the same way by the ninth divergence, shape or dtype."""
    problems = [("float32:8x64", "forward_kl"), ("float32:8x64", "jsd"), ("float32:16x64", "forward_kl")]
    before = {group: Counter(counters[group]) for group in ("stats", "unimplemented")}
    with torch._dynamo.config.patch(recompile_limit=2):
        rows = [row for spec, divergence in problems for row in kd_loss.run_problem(
            spec, divergence, torch.device("cpu"), 1.0, kd_loss_args("compile"))]
    assert not counters["unimplemented"] - before["unimplemented"]  # no "recompile limit exceeded"
    assert (counters["stats"] - before["stats"])["unique_graphs"] >= len(problems)
    assert [row.impl for row in rows] == ["torch-compile"] * len(problems)
    assert all(row.note is None and row.median_ms > 0 for row in rows), [row.note for row in rows]


def test_compile_fallback_is_noted_recompile_limit():
    """A torch-compile peer dynamo refuses to compile (a recompile limit of 0) runs eagerly: its
    row says so, and the other rows do not list it as a peer."""
    with torch._dynamo.config.patch(recompile_limit=0):
        rows = {row.impl: row for row in kd_loss.run_problem("float32:8x64", "forward_kl", torch.device("cpu"), 1.0,
                                                             kd_loss_args("cpp,compile"))}
    assert rows["kdcore-cpp"].note is None and rows["kdcore-cpp"].peers == {}
    assert rows["torch-compile"].note.startswith("torch-compile fell back to eager: Dynamo recompile limit exceeded")
    assert list(rows["torch-compile"].peers) == ["kdcore-cpp"]


def test_compile_fallback_is_noted_graph_break():
    """A graph break leaves part of the compiled peer's loss in eager: its row says so."""
    student = torch.randn(8, 64, requires_grad=True)

    def loss_with_break(s):
        log_q = s.log_softmax(-1)
        torch._dynamo.graph_break()
        return -log_q.mean()

    compiled = compile_peer(loss_with_break)
    measured = measure_student_losses({"torch-compile": compiled}, student, torch.device("cpu"),
                                      kd_loss_args("compile"))
    [row] = results("test", measured, {}, torch.device("cpu"), 1.0, "")
    assert row.note.startswith("torch-compile fell back to eager: graph break: Call to `torch._dynamo.graph_break()`")
