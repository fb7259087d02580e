"""The benchmarks run and print their JSON lines (a smoke test on a tiny problem; they assert
nothing about time): every implementation reports, and the peers' losses agree with kdcore's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
