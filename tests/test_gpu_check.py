"""tools/gpu_check.sh, the one command to run on a machine with a GPU: valid bash, and its dry run names
every step (build, the CUDA tests, the three benchmarks) without running any."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_step(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for step in ("build", "tests", "bench_kd_loss", "bench_fused_linear", "bench_sparse"):
        assert f"== {step} " in done.stdout
    assert "KDCORE_TEST_DEVICE=cuda" in done.stdout and "tests/test_gpu_large.py" in done.stdout
    assert "--divergences all" in done.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().count("dry run") == 5


def test_usage_error_without_outdir():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
