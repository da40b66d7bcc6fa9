"""Builds frpo_kernels._C, the CPU kernels of csrc/ (metadata lives in pyproject.toml).

pip install --no-build-isolation -e .   compiles it against the torch already installed.
Sources and flags: frpo_kernels/_build.py (shared with CMakeLists.txt and the JIT fallback in backends/cpu.py).
"""
import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_frpo_build", os.path.join(HERE, "frpo_kernels", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

setup(
    ext_modules=[CppExtension("frpo_kernels._C", list(build.EXTENSION_SOURCES),
                              include_dirs=[os.path.join(HERE, d) for d in build.INCLUDE_DIRS],
                              extra_compile_args={"cxx": list(build.CXX_FLAGS + build.OPENMP_FLAGS)},
                              extra_link_args=list(build.OPENMP_FLAGS))],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
