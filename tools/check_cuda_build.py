"""Compiles kdcore's CUDA kernels and checks that they register, on a machine with no GPU.

Run it with a Python whose torch is a CUDA build (the CPU wheel has no CUDA headers), for example
a separate virtualenv:

    python -m venv /tmp/venv-cuda && /tmp/venv-cuda/bin/pip install torch==2.14.1 ninja setuptools
    /tmp/venv-cuda/bin/python tools/check_cuda_build.py            # sm_90 (H100) by default

It builds ``kdcore._C`` exactly as ``pip install --no-build-isolation -e .`` would on a GPU machine
(setup.py with the CUDA extension forced on), into a temporary directory, then loads the library
in a fresh process and checks that every CUDA op has a CUDA kernel. Loading needs no GPU, so this
catches compile errors, link errors and missing registrations. Exit status 0 means all passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_OPS = ("kdcore::kd_loss_cuda", "kdcore::kd_loss_cuda_inplace", "kdcore::sparse_row_stats_cuda",
            "kdcore::sparse_fill_cuda", "kdcore::scale_grad_unless_one_cuda")

_CHECK_REGISTRATION = """
import sys, torch
torch.ops.load_library(sys.argv[1])
missing = [op for op in sys.argv[2:] if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
if missing:
    sys.exit(f"no CUDA kernel registered for {missing}")
print("registered:", ", ".join(sys.argv[2:]))
"""


def _nvidia_wheel_include_dirs() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p for root in spec.submodule_search_locations for p in Path(root).glob("*/include") if p.is_dir())


def _cuda_home() -> dict[str, str]:
    """CUDA_HOME for torch's build helpers when the environment does not set it: torch guesses it
    from the nvcc on PATH, which on some machines is a wrapper outside the toolkit, and then
    cannot find the toolkit's libraries to link against."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return {}
    default = Path("/usr/local/cuda")
    return {"CUDA_HOME": str(default.resolve())} if (default / "bin" / "nvcc").exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST value (default 9.0, the H100)")
    args = parser.parse_args()

    import torch

    if torch.version.cuda is None:
        print(f"check_cuda_build: torch {torch.__version__} is a CPU build; run this with a CUDA build of torch",
              file=sys.stderr)
        return 2
    env = {**os.environ, **_cuda_home(), "KDCORE_WITH_CUDA": "1", "KDCORE_CPU_ISAS": "default", "TORCH_CUDA_ARCH_LIST": args.arch,
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    # A toolkit installed as compiler + runtime only takes the library headers torch includes
    # (cuSPARSE, cuBLAS, ...) from the nvidia-* wheels that came with the CUDA build of torch.
    wheel_headers = [str(p) for p in _nvidia_wheel_include_dirs()]
    if wheel_headers:
        env["NVCC_APPEND_FLAGS"] = " ".join([os.environ.get("NVCC_APPEND_FLAGS", "")] + [f"-I{d}" for d in wheel_headers]).strip()
    with tempfile.TemporaryDirectory(prefix="kdcore-cuda-build-") as tmp:
        build = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", f"{tmp}/lib", "--build-temp", f"{tmp}/obj"],
            cwd=ROOT, env=env,
        )
        if build.returncode != 0:
            print("check_cuda_build: the CUDA build failed", file=sys.stderr)
            return build.returncode
        library = next(Path(tmp, "lib", "kdcore").glob("_C.*"))
        check = subprocess.run([sys.executable, "-c", _CHECK_REGISTRATION, str(library), *CUDA_OPS])
        return check.returncode


if __name__ == "__main__":
    sys.exit(main())
