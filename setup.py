"""Build script: the Python package, the Triton kernels (top-level kernels/ installed as sam2_fast.kernels) and the
optional C++/CUDA extension sam2_fast._C from csrc/.

Extension switches:
- SAM2_FAST_BUILD_EXT=0: do not build the extension (the package then runs on its Triton and torch backends).
- SAM2_FAST_EXT_REQUIRED=1: a failed extension build fails the install (CI sets this); otherwise a failure only
  warns and leaves a working package on the other backends.
- TORCH_CUDA_ARCH_LIST: the CUDA architectures to build for, when a CUDA build is made.
"""

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("SAM2_FAST_BUILD_EXT", "1") != "0"
EXT_REQUIRED = os.environ.get("SAM2_FAST_EXT_REQUIRED", "0") == "1"


def _sources(pattern):
    return sorted(os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, pattern), recursive=True))


def extension_build():
    """(ext_modules, cmdclass) for the C++/CUDA extension, or ([], {}) where it is not to be built."""
    if not BUILD_EXT:
        return [], {}
    # csrc/: ops.cpp (every schema), common/ (vector, exp, transpose, brgemm helpers, argument checks), cpu/ by op
    # family, cuda/; sources include headers by their path from csrc/.
    cpp_sources = _sources("csrc/**/*.cpp")
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        message = f"sam2_fast: torch is not importable at build time ({error}); building without the C++ extension"
        if EXT_REQUIRED:
            raise RuntimeError(message)
        warnings.warn(message + " (install with --no-build-isolation to build it)")
        return [], {}

    cuda_sources = _sources("csrc/cuda/**/*.cu")
    include_dirs = [os.path.join(HERE, "csrc")]
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    # -g0: no debug info (Python's own CFLAGS add -g), which shortens the compile of the torch-heavy sources.
    # at::parallel_for is an inline OpenMP region in ATen's headers (torch's CPU builds use OpenMP): without
    # -fopenmp the pragma is dropped and every op runs on one thread.
    openmp = ["-fopenmp"] if torch.__config__.parallel_info().find("OpenMP") != -1 and sys.platform != "darwin" else []
    cxx_flags = ["-O3", "-g0", "-std=c++20"] + openmp
    define_macros = [("SAM2_FAST_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        extension = CUDAExtension(
            "sam2_fast._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=openmp,
            define_macros=define_macros,
            include_dirs=include_dirs,
        )
    else:
        extension = CppExtension("sam2_fast._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=openmp,
                                 include_dirs=include_dirs)

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Builds with ninja; a failure warns and leaves the package usable unless SAM2_FAST_EXT_REQUIRED=1."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler errors come as several distutils/setuptools exception types
                if EXT_REQUIRED:
                    raise
                print(f"sam2_fast: the C++ extension failed to build ({error}); "
                      "the package falls back to its other backends", file=sys.stderr)

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    # sam2_fast/kernels is a link to the top-level kernels/ folder, which has no __init__.py: run from the
    # repository root, ``import kernels`` must not find a package of ours under that name (it would shadow Hugging
    # Face's ``kernels`` package, which transformers looks for). find_packages skips a folder without __init__.py,
    # so it is named here.
    packages=[*find_packages(include=["sam2_fast", "sam2_fast.*"]), "sam2_fast.kernels"],
    package_data={"sam2_fast.io.sam2_configs": ["*/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
