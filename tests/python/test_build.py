"""What the build produced: CUDA code for the configured architectures."""

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
