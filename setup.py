"""pip install . : builds libmoeyard, moeyard._C and the moeyard executable
with the project's CMake build (same targets as scripts/setup.sh) and installs
the Python package `moeyard`.

Build requirements: torch (the CMake build links against the installed
wheel's LibTorch), pybind11, cmake, ninja and a C++20 compiler. Use
`pip install --no-build-isolation .` so the build sees the torch you run.
Set MOEYARD_CMAKE_ARGS for extra CMake flags (e.g. -DMOEYARD_WITH_CUDA=ON).
"""

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.environ.get("MOEYARD_WHEEL_BUILD_DIR", os.path.join(ROOT, "build", "wheel"))
        os.makedirs(out_dir, exist_ok=True)
        cfg = [
            "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMOEYARD_PYTHON_OUT={out_dir}",
            "-DMOEYARD_BUILD_TESTS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ] + shlex.split(os.environ.get("MOEYARD_CMAKE_ARGS", ""))
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 2)])
        os.makedirs(os.path.join(out_dir, "bin"), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, "moeyard"), os.path.join(out_dir, "bin", "moeyard"))
        # The shipped configs, found by moeyard.configs_dir().
        shutil.copytree(os.path.join(ROOT, "configs"), os.path.join(out_dir, "configs"), dirs_exist_ok=True)


setup(
    name="moeyard",
    version="0.1.0",
    description="Sparse Mixture-of-Experts ops, layers and training for PyTorch (LibTorch C++)",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[Extension("moeyard._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["moeyard=moeyard.cli:main", "moeyard-prepare=moeyard.prepare_data:main"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tqdm"],
    extras_require={"data": ["tokenizers", "datasets", "transformers"]},
)
