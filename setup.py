"""Builds frpo_kernels._C, the CPU kernels of csrc/ (metadata lives in pyproject.toml).

pip install --no-build-isolation -e .   compiles it against the torch already installed.
"""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/ops.cpp", "csrc/core/logprob_kernels.cpp", "csrc/core/logprob_kernels_avx2.cpp"]
# torch's ATen parallel backend is OpenMP: at::parallel_for is inlined into our code, so compile with it too
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-parameter"]

setup(
    ext_modules=[CppExtension("frpo_kernels._C", SOURCES, include_dirs=[os.path.join(HERE, "csrc")],
                              extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
