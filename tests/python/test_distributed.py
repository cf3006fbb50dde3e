"""Multi-process launches on this machine (Gloo over loopback): torchrun and
Slurm-style environments, collectives that check their results, and the
errors of a dead or hung peer and of a malformed environment."""

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, timeout=120):
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "--no-python", EXE, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_collectives(nproc):
    r = torchrun(nproc, "dist-check", "--timeout", "30")
    assert r.returncode == 0, r.stderr[-2000:]
    want_sum = nproc * (nproc + 1) // 2
    for rank in range(nproc):
        assert f"rank {rank}/{nproc} (torchrun): all_reduce ok ({want_sum}), all_to_all ok" in r.stdout


def test_launch_script():
    env = dict(os.environ, MOEYARD_SKIP_SETUP="1", OMP_NUM_THREADS="1")
    r = subprocess.run([os.path.join(ROOT, "scripts", "launch.sh"), "--nproc", "2", "--master",
                        f"127.0.0.1:{free_port()}", "--", "dist-check"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("all_to_all ok") == 2


def test_slurm_environment():
    """srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the sbatch script
    exports MASTER_ADDR/MASTER_PORT. Rank 0 then serves the store itself."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([EXE, "dist-check", "--timeout", "30"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"rank {rank}/2 (slurm): all_reduce ok (3)" in out


@pytest.mark.parametrize("flag", ["--exit-rank", "--stall-rank"])
def test_dead_or_hung_peer_fails_within_the_timeout(flag):
    start = time.monotonic()
    r = torchrun(2, "dist-check", "--timeout", "3", flag, "1")
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert "collective all_reduce on process group 'world' (2 ranks) failed or timed out after 3 s" in r.stderr
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("env,match", [
    (dict(RANK="x", WORLD_SIZE="2"), "RANK='x' is not an integer"),
    (dict(RANK="0"), "RANK and WORLD_SIZE must be set together"),
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1234"), "rank 2 is outside world size 2"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="2"), "MASTER_ADDR and MASTER_PORT must be set for 2 processes"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="99999"), "MASTER_PORT=99999 is not a port"),
])
def test_malformed_launch_environment(env, match):
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    r = subprocess.run([EXE, "dist-check", "--timeout", "5"], capture_output=True, text=True, timeout=60,
                       env={**base, **env})
    assert r.returncode == 1
    assert match in r.stderr, r.stderr


def test_unreachable_store_names_the_address():
    port = str(free_port())
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    r = subprocess.run([EXE, "dist-check", "--timeout", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert f"cannot reach the rendezvous store at 127.0.0.1:{port} within 2 s" in r.stderr, r.stderr
