"""Builds the optional extension ecoflap_fast._C (all metadata lives in pyproject.toml).

C++ (CPU) sources are always built; CUDA sources are added when the installed torch has CUDA and
nvcc is found. Environment flags:
  ECOFLAP_SKIP_EXT=1   build no extension (ops fall back to the pure-torch paths)
  ECOFLAP_SKIP_CUDA=1  build only the C++ part even where CUDA is available
  ECOFLAP_CUDA_ARCHS   semicolon list of SM targets, default "80;90"
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension():
    if os.environ.get("ECOFLAP_SKIP_EXT", "0") == "1":
        print("ecoflap_fast: ECOFLAP_SKIP_EXT=1, not building ecoflap_fast._C", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    reason = None
    if os.environ.get("ECOFLAP_SKIP_CUDA", "0") == "1":
        reason = "ECOFLAP_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    elif not cuda_sources:
        reason = "no CUDA sources"
    if reason is None:
        archs = os.environ.get("ECOFLAP_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        for a in archs:
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = CUDAExtension(
            "ecoflap_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("ECOFLAP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        print(f"ecoflap_fast: building ecoflap_fast._C with CUDA for sm_{', sm_'.join(archs)}", file=sys.stderr)
    else:
        ext = CppExtension(
            "ecoflap_fast._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
        print(f"ecoflap_fast: building ecoflap_fast._C for CPU only ({reason})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
