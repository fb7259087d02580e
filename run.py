#!/usr/bin/env python3
"""Sets up a virtual environment with kdcore built in it, then runs one job.

    python3 run.py demo [args]    # kdcore demo: the distillation methods compared on real data
    python3 run.py test [args]    # the fast test tier (every module and backend); extra args go to pytest
    python3 run.py test --slow    # the slow tier only: the exhaustive sweeps and end-to-end runs
    python3 run.py test --all     # both tiers
    python3 run.py bench [args]   # python -m benchmarks.kd_loss [args]

Needs only Python >= 3.10. The environment is .venv (or $KDCORE_VENV). torch is installed from
$KDCORE_TORCH (default "torch>=2.6"; e.g. "torch==2.13.0" for a CPU-only build where that is the
CPU wheel). kdcore is built with `pip install --no-build-isolation -e .`, so its extension
links against that same torch; it is rebuilt only when the build inputs change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KDCORE_VENV", ROOT / ".venv"))
TORCH = os.environ.get("KDCORE_TORCH", "torch>=2.6")
BUILD_TOOLS = ["setuptools>=69", "wheel", "ninja", "pybind11"]
EXTRAS = {"demo": "[demo]", "bench": "", "test": "[test]"}
# third-party packages a job installs next to kdcore: the tests check that kdcore finds the example plugin
EXAMPLE_PLUGIN = ROOT / "examples" / "kdcore-plugin-example"
JOB_PACKAGES = {"test": [EXAMPLE_PLUGIN]}


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def sh(*cmd, **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def build_fingerprint(extras: str) -> str:
    digest = hashlib.sha256(f"{TORCH}|{extras}|{os.environ.get('KDCORE_CPU_ISAS', '')}".encode())
    inputs = [ROOT / "pyproject.toml", ROOT / "setup.py", *sorted((ROOT / "csrc").rglob("*")),
              *sorted(EXAMPLE_PLUGIN.glob("*"))]
    for path in inputs:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_environment(job: str) -> Path:
    python = venv_python()
    if not python.exists():
        sh(sys.executable, "-m", "venv", VENV)
    extras = EXTRAS[job]
    stamp = VENV / f".kdcore-build{extras or '[base]'}"
    fingerprint = build_fingerprint(extras)
    if stamp.exists() and stamp.read_text() == fingerprint:
        return python
    sh(python, "-m", "pip", "install", "--upgrade", "pip")
    sh(python, "-m", "pip", "install", TORCH, *BUILD_TOOLS)
    sh(python, "-m", "pip", "install", "--no-build-isolation", "-e", f".{extras}", cwd=ROOT)
    for package in JOB_PACKAGES.get(job, []):
        sh(python, "-m", "pip", "install", "--no-build-isolation", "--force-reinstall", "--no-deps", package)
    stamp.write_text(fingerprint)
    return python


def test_selection(args: list[str]) -> list[str]:
    """pytest arguments for a test job: ``--all`` runs every test, ``--slow`` the tests marked slow,
    anything else the fast tier (not slow), unless the arguments choose markers themselves."""
    if "--all" in args:
        return [a for a in args if a != "--all"]
    if "--slow" in args:
        return ["-m", "slow", *(a for a in args if a != "--slow")]
    if "-m" in args:
        return args
    return ["-m", "not slow", *args]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    job, args = argv[0], argv[1:]
    if job == "test":
        args = test_selection(args)
    python = ensure_environment(job)
    commands = {
        "demo": [python, "-m", "kdcore", "demo", *args],
        "bench": [python, "-m", "benchmarks.kd_loss", *args],
        "test": [python, "-m", "pytest", *args],
    }
    env = {**os.environ, "KDCORE_EXPECT_EXAMPLE_PLUGIN": "1"} if job == "test" else None
    return subprocess.run([str(c) for c in commands[job]], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
