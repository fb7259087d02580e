"""Builds kdcore's compiled parts against the torch that is already installed.

- ``kdcore._C``: the op schemas (csrc/bindings.cpp), plus the CUDA kernels (csrc/cuda) when a CUDA
  toolkit and a CUDA build of torch are both present.
- ``kdcore._cpu_<isa>``: the CPU kernels (csrc/cpu), compiled once per instruction set so one build
  runs at full speed on any x86-64 processor; ``kdcore/_ext.py`` loads the best one the processor
  supports (honouring ``ATEN_CPU_CAPABILITY`` as torch does).

Build with ``pip install --no-build-isolation -e .``: an isolated build would compile against a
different torch than the one kdcore then runs with.

Environment knobs: ``MAX_JOBS`` (parallel compile jobs), ``KDCORE_CPU_ISAS`` (comma list of
``default,avx2,avx512`` to build; default all that apply to this architecture),
``KDCORE_WITH_CUDA=0|1`` (force the CUDA part off/on), ``TORCH_CUDA_ARCH_LIST``.
"""

import os
import platform
from pathlib import Path

from setuptools import find_packages, setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = Path(__file__).parent
INCLUDE = [str(ROOT / "csrc" / "include")]
OPTIMIZE = ["-O3", "-Wno-unknown-pragmas"]  # torch's vec headers carry #pragma unroll

# Flags per instruction set; the names match torch.backends.cpu.get_cpu_capability().
X86_ISAS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # GCC 12 warns inside its own avx512fintrin.h (a false positive); silence only that here
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-Wno-maybe-uninitialized"],
}


def cpu_isas():
    wanted = os.environ.get("KDCORE_CPU_ISAS")
    available = X86_ISAS if platform.machine().lower() in ("x86_64", "amd64") else {"default": []}
    if not wanted:
        return available
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"KDCORE_CPU_ISAS: unknown {unknown}; choose from {sorted(available)}")
    return {name: available[name] for name in names}


def cpu_extensions():
    extensions = []
    for isa, flags in cpu_isas().items():
        capability = isa.upper()
        defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        extensions.append(
            CppExtension(
                name=f"kdcore._cpu_{isa}",
                sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
                include_dirs=INCLUDE,
                extra_compile_args={"cxx": OPTIMIZE + ["-fopenmp"] + flags + defines},
            )
        )
    return extensions


def want_cuda():
    forced = os.environ.get("KDCORE_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def core_extension():
    sources = ["csrc/bindings.cpp"]
    if not want_cuda():
        return CppExtension(
            name="kdcore._C", sources=sources, include_dirs=INCLUDE, extra_compile_args={"cxx": OPTIMIZE}
        )
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    return CUDAExtension(
        name="kdcore._C",
        sources=sources,
        include_dirs=INCLUDE,
        define_macros=[("KDCORE_WITH_CUDA", None)],
        extra_compile_args={"cxx": OPTIMIZE, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
    )


setup(
    # the built-in plugins live in plugins/ and install as the package kdcore_plugins
    packages=[*find_packages(include=["kdcore", "kdcore.*"]), "kdcore_plugins"],
    package_dir={"kdcore_plugins": "plugins"},
    package_data={"kdcore_plugins": ["data/*.csv.gz", "data/*.txt.gz", "data/README.md", "data/tokenizers/*.json"]},
    ext_modules=[core_extension(), *cpu_extensions()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
