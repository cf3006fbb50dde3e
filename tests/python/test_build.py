"""What the build produced: CUDA code for the configured architectures, an
installable package (pip install ., cmake --install + find_package)."""

import glob
import os
import shutil
import subprocess

import pytest
import torch

import moeyard

LIB = os.path.join(os.path.dirname(moeyard.__file__), "libmoeyard.so")


def _cuobjdump():
    exe = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if os.path.exists(exe):
        return exe
    # triton (a torch dependency) ships one
    hits = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return hits[0] if hits else None


def _cuda_built():
    return torch._C._dispatch_has_kernel_for_dispatch_key("moeyard::router_topk", "CUDA")


def test_every_op_has_cpu_and_meta_kernels():
    for name in ["router_topk", "route_plan", "permute", "unpermute", "grouped_mm", "swiglu"]:
        for op in (name, name + "_backward") if name != "route_plan" else (name,):
            for key in ("CPU", "Meta"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moeyard::{op}", key), (op, key)


@pytest.mark.skipif(not _cuda_built(), reason="built without CUDA (no nvcc or CPU-only torch)")
def test_cuda_kernels_registered_and_sass_for_sm80_sm90():
    for op in ["router_topk", "router_topk_backward", "route_plan", "permute", "permute_backward",
               "unpermute", "unpermute_backward", "grouped_mm", "grouped_mm_backward", "swiglu", "swiglu_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moeyard::{op}", "CUDA"), op
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("no cuobjdump to inspect the library")
    elf = subprocess.run([exe, "--list-elf", LIB], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([exe, "--list-ptx", LIB], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in elf and "sm_90" in elf, elf
    assert "sm_90" in ptx, ptx


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    """scripts/gpu_check.sh is valid bash and, where no GPU is visible,
    names the reason and succeeds without building or running anything."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    # An nvidia-smi that fails first on PATH: the no-GPU branch.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", GPU_CHECK_OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no GPU found" in r.stdout
    assert not (tmp_path / "out").exists()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build"))


def test_find_package_from_another_cmake_project(tmp_path):
    """`cmake --install` of this build, then a project outside moeyard
    finds it (find_package(moeyard), moeyard::moeyard), compiles against
    its headers, links and runs its ops and model."""
    import sys

    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", BUILD, "--prefix", str(prefix)], check=True, capture_output=True)
    assert (prefix / "lib" / "cmake" / "moeyard" / "moeyardConfig.cmake").exists()
    assert (prefix / "include" / "moeyard" / "model" / "transformer.h").exists()
    build = tmp_path / "consumer"
    configure = subprocess.run(
        ["cmake", "-S", os.path.join(ROOT, "tests", "cmake_consumer"), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    made = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    run = subprocess.run([str(build / "consumer")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    gate_up = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 10
    assert float(got["swiglu_sum"]) == pytest.approx(moeyard.ops.swiglu(gate_up).sum().item(), rel=1e-6)
    assert got["logits"] == "1 5 256"


def test_import_refuses_another_torch():
    """The package names the torch it was built against when another is
    installed (here: torch's version string changed before the import)."""
    import sys

    code = "import torch; torch.__version__ = '0.0.1'; import moeyard"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"moeyard was built against torch {torch.__version__} but torch 0.0.1 is installed" in r.stderr, \
        r.stderr[-1500:]


def test_pip_install_gives_a_working_package(tmp_path):
    """`pip install .` (pyproject.toml, scikit-build-core driving CMake)
    installs a package that works without the checkout: its ops compute what
    the in-tree build computes, the shipped configs are in it, and both
    console scripts run. The wheel's build tree (build/wheel) is kept, so a
    second install is incremental; ccache makes a fresh clone's fast."""
    import sys

    target = tmp_path / "site"
    env = dict(os.environ, CCACHE_BASEDIR=ROOT, CCACHE_NOHASHDIR="1",
               CCACHE_DIR=os.environ.get("CCACHE_DIR", os.path.expanduser("~/.cache/moeyard/ccache")))
    made = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--quiet",
         "--target", str(target), ROOT], capture_output=True, text=True, env=env, timeout=1800)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]

    # The installed package alone: no checkout on the path, run from elsewhere.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean["PYTHONPATH"] = str(target)
    code = ("import moeyard, torch, os; "
            "print(moeyard.__file__); "
            "print(moeyard.ops.swiglu(torch.arange(12.).reshape(2, 6) / 10).sum().item()); "
            "print(sorted(os.listdir(moeyard.configs_dir())))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, swiglu_sum, configs = r.stdout.strip().splitlines()
    assert where.startswith(str(target))
    gate_up = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 10
    assert float(swiglu_sum) == pytest.approx(moeyard.ops.swiglu(gate_up).sum().item(), rel=1e-6)
    assert "'tiny.yaml'" in configs
    for script, expect in (("moeyard", "SUBCOMMAND"), ("moeyard-prepare", "--tokenizer")):
        run = subprocess.run([str(target / "bin" / script), "--help"], capture_output=True, text=True, env=clean,
                             cwd=tmp_path, timeout=300)
        assert run.returncode == 0 and expect in run.stdout, run.stdout[-1500:] + run.stderr[-1500:]
