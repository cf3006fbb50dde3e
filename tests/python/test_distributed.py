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


def listeners(port):
    """(table, local address in /proc's hex) of the sockets listening on
    `port`, from /proc/net/tcp and /proc/net/tcp6."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{table}").read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add((table, addr))
    return found


def other_local_address():
    """An IPv4 address of this machine other than loopback, or None."""
    candidates = []
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    for a in candidates:
        if not a.startswith("127."):
            try:
                with socket.socket() as s:
                    s.bind((a, 0))  # an address of this machine
                return a
            except OSError:
                continue
    return None


def test_store_listens_on_master_addr_only():
    """Rank 0 of a direct (Slurm-style) launch serves the store without
    authentication: with MASTER_ADDR=127.0.0.1 it listens on loopback only,
    not on every interface; the launch still completes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([EXE, "dist-check", "--timeout", "30"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, SLURM_PROCID="0", SLURM_LOCALID="0"))]
    try:
        deadline = time.monotonic() + 30
        while not listeners(port) and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.1)
        assert listeners(port) == {("tcp", "0100007F")}  # 127.0.0.1, and no 0.0.0.0 or [::]
        other = other_local_address()
        if other is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, port), timeout=5).close()
        procs.append(subprocess.Popen([EXE, "dist-check", "--timeout", "30"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=dict(env, SLURM_PROCID="1", SLURM_LOCALID="1")))
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"rank {rank}/2 (slurm): all_reduce ok (3)" in out


def test_store_that_cannot_listen_names_the_address():
    """MASTER_ADDR that is not an address of rank 0's machine, or a port in
    use: rank 0 says where it could not listen, at once."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    base.update(SLURM_PROCID="0", SLURM_NTASKS="2")
    port = free_port()
    # 203.0.113.0/24 is reserved for documentation: no machine has it.
    r = subprocess.run([EXE, "dist-check", "--timeout", "5"], capture_output=True, text=True, timeout=60,
                       env=dict(base, MASTER_ADDR="203.0.113.7", MASTER_PORT=str(port)))
    assert r.returncode == 1
    assert f"rank 0: cannot listen for the rendezvous store on 203.0.113.7:{port} (203.0.113.7: " in r.stderr, \
        r.stderr
    assert "MASTER_ADDR must be an address of rank 0's machine" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([EXE, "dist-check", "--timeout", "5"], capture_output=True, text=True, timeout=60,
                           env=dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    assert r.returncode == 1
    assert f"cannot listen for the rendezvous store on 127.0.0.1:{port} (127.0.0.1: Address already in use)" \
        in r.stderr, r.stderr


# ---- data-parallel training -----------------------------------------------------

CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 32}
moe: {num_experts: 4, top_k: 2, moe_every_n: 1, capacity_factor: 0.0, selection_bias: true, switch_coeff: 0.0}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 2}
train: {steps: 6, micro_batch: MB, grad_accum: 2, eval_every: 3, eval_batches: 2, threads: 1}
schedule: {bias_update_rate: 0.001}
checkpoint: {dir: RUN, every: 3, keep_last: 3}
log: {every: 1}
"""


def dp_config(tmp_path, shards, name, micro_batch):
    text = (CONFIG.replace("TRAIN", str(shards / "train.bin")).replace("VALID", str(shards / "valid.bin"))
            .replace("RUN", str(tmp_path / name)).replace("MB", str(micro_batch)))
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def run_metrics(run):
    import json

    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def final_model(run, step=6):
    from moeyard import checkpoint

    return checkpoint.load(str(run / f"step_{step}"))


def assert_same_run(a, b, tol=2e-5, param_tol=1e-4, moved_picks=0):
    """Metrics, routing and final parameters equal within tolerances;
    `moved_picks`: how many picks per layer and step may land on another
    expert (a near-tie of router scores that rounding can flip)."""
    ma, mb = run_metrics(a), run_metrics(b)
    assert len(ma) == len(mb) == 6
    for x, y in zip(ma, mb):
        for k in ("loss", "ce", "grad_norm"):
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
        if "valid_loss" in x:
            assert abs(x["valid_loss"] - y["valid_loss"]) <= tol
        for la, lb in zip(x["moe_layers"], y["moe_layers"]):
            moved = sum(abs(p - q) for p, q in zip(la["tokens_per_expert"], lb["tokens_per_expert"])) / 2
            assert moved <= moved_picks, (x["step"], la["tokens_per_expert"], lb["tokens_per_expert"])
    pa, pb = final_model(a), final_model(b)
    assert set(pa) == set(pb)
    for n in pa:
        diff = (pa[n] - pb[n]).abs().masked_fill(pa[n] == pb[n], 0)  # equal infinities
        assert diff.max().item() <= param_tol, n


@pytest.mark.parametrize("nproc,ep", [(2, 1), (4, 1), (2, 2), (4, 2), (4, 4)])
def test_parallel_training_matches_one_process(tmp_path, shards, nproc, ep):
    """The same global batch (4 rows) on 1 process and split over N data-
    parallel processes, with the 4 experts sharded over ep of them (DP2, DP4,
    EP2, DP2xEP2, EP4): the losses, gradient norms, routing counts (which drive
    the selection-bias update) and the trained parameters agree, and the
    checkpoint (full tensors) resumes in one process."""
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dp = dp_config(tmp_path, shards, "dp", 4 // nproc)
    r = torchrun(nproc, "train", "--config", str(dp), "--set", f"parallel.expert_parallel={ep}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data parallel: {nproc} processes (torchrun), expert parallel {ep}, tensor parallel 1" \
        in r.stderr + r.stdout
    assert_same_run(tmp_path / "single", tmp_path / "dp")
    # A data-parallel checkpoint resumes in one process.
    import json

    manifest = json.loads((tmp_path / "dp" / "step_3" / "manifest.json").read_text())
    assert manifest["parallel"]["data_parallel"] == nproc
    assert manifest["parallel"]["expert_parallel"] == ep
    resumed = dp_config(tmp_path, shards, "resumed", 4)
    r = subprocess.run([EXE, "train", "--config", str(resumed), "--resume", str(tmp_path / "dp" / "step_3")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pa, pb = final_model(tmp_path / "dp"), final_model(tmp_path / "resumed")
    for n in pa:
        assert (pa[n] - pb[n]).abs().max().item() <= 1e-4, n


def test_lora_with_expert_parallel_matches_one_process(tmp_path, shards):
    """finetune.lora under DP2 x EP2: the expert factors are sliced like the
    expert weights, synchronized over expert-DP, and the run (losses,
    gradient norms, full checkpoint tensors) equals the one-process run."""
    lora = ["--set", "finetune.lora.rank=4", "--set", "finetune.lora.alpha=8"]
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single), *lora], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dp = dp_config(tmp_path, shards, "dp", 1)
    r = torchrun(4, "train", "--config", str(dp), "--set", "parallel.expert_parallel=2", *lora, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "dp")
    p = final_model(tmp_path / "dp")
    assert p["layers.0.moe.lora_down_b"].shape == (4, 32, 4)
    assert p["layers.0.moe.lora_down_b"].abs().amax(dim=(1, 2)).min() > 0  # every expert's factor trained


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, shards):
    import signal

    cfg = dp_config(tmp_path, shards, "sig", 2)
    text = cfg.read_text().replace("steps: 6", "steps: 100000").replace("every: 3,", "every: 0,")
    cfg.write_text(text)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([EXE, "train", "--config", str(cfg)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]  # a requested stop succeeds
    latest = (tmp_path / "sig" / "latest").read_text().strip()
    saved = int(latest.split("_")[1])
    assert saved == len(metrics.read_text().splitlines())  # the step both ranks stopped at
    assert_complete_checkpoint(tmp_path / "sig", saved)


def assert_complete_checkpoint(run, step):
    """`latest` names step_<step>, which is committed (no .tmp left) and whose
    model and optimizer files load with every SHA-256 verified."""
    import json

    from moeyard import checkpoint

    assert (run / "latest").read_text().strip() == f"step_{step}"
    assert not list(run.glob("*.tmp"))
    manifest = json.loads((run / f"step_{step}" / "manifest.json").read_text())
    assert manifest["step"] == step
    for kind in ("model", "optimizer"):
        assert checkpoint.load(str(run / f"step_{step}"), kind)


def moeyard_children(pid):
    """The pids of `pid`'s child processes that run the moeyard executable."""
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out |= {int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()}
        except FileNotFoundError:
            pass

    def is_moeyard(c):
        try:
            return os.readlink(f"/proc/{c}/exe") == os.path.realpath(EXE)
        except OSError:
            return False

    return {c for c in out if is_moeyard(c)}


def proc_env(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)


def test_requested_stop_under_torchrun_exits_0_without_restarts(tmp_path, shards):
    """SIGTERM to one worker of `torchrun --max-restarts 2`: both ranks save
    the same step and exit 0, so torchrun exits 0 and does not start the
    workers again (a non-zero exit would have made it restart them and train
    on past the stop)."""
    import signal

    cfg = dp_config(tmp_path, shards, "elastic", 2)
    cfg.write_text(cfg.read_text().replace("steps: 6", "steps: 100000").replace("every: 3,", "every: 0,"))
    log = open(tmp_path / "torchrun.log", "w+")
    cmd = [TORCHRUN, "--nproc-per-node=2", "--max-restarts=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "--no-python", EXE, "train", "--config", str(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="INFO")  # INFO: torchrun logs its restarts
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    try:
        metrics = tmp_path / "elastic" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and agent.poll() is None and \
                (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        workers = moeyard_children(agent.pid)
        assert len(workers) == 2, (workers, open(tmp_path / "torchrun.log").read()[-3000:])
        rank1 = [w for w in workers if proc_env(w).get("RANK") == "1"]
        assert len(rank1) == 1 and proc_env(rank1[0])["TORCHELASTIC_RESTART_COUNT"] == "0"
        os.kill(rank1[0], signal.SIGTERM)
        deadline = time.monotonic() + 120
        restarted = set()
        while agent.poll() is None and time.monotonic() < deadline and not restarted:
            restarted = moeyard_children(agent.pid) - workers  # workers of a second attempt
            time.sleep(0.1)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)  # the session this test started
            agent.wait()
    log.seek(0)
    out = log.read()
    assert not restarted, "torchrun restarted the workers after the requested stop:\n" + out[-3000:]
    assert agent.returncode == 0, out[-3000:]
    assert "will restart worker group" not in out and "restart_count=1" not in out
    assert "(interrupted; resume with --resume auto)" in out  # rank 0's last line
    lines = metrics.read_text().splitlines()
    saved = int((tmp_path / "elastic" / "latest").read_text().strip().split("_")[1])
    assert saved >= 3 and len(lines) == saved  # no step after the saved one, none trained twice
    assert_complete_checkpoint(tmp_path / "elastic", saved)


def test_requested_stop_of_one_process_exits_0(tmp_path, shards):
    import signal

    cfg = dp_config(tmp_path, shards, "one", 4)
    cfg.write_text(cfg.read_text().replace("steps: 6", "steps: 100000").replace("every: 3,", "every: 0,"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    p = subprocess.Popen([EXE, "train", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=dict(env, OMP_NUM_THREADS="1"))
    metrics = tmp_path / "one" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and \
            (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    assert "(interrupted; resume with --resume auto)" in out
    saved = int((tmp_path / "one" / "latest").read_text().strip().split("_")[1])
    assert saved >= 2 and len(metrics.read_text().splitlines()) == saved
    assert_complete_checkpoint(tmp_path / "one", saved)


def test_layout_must_match_the_launch(tmp_path, shards):
    cfg = dp_config(tmp_path, shards, "bad", 2)
    r = torchrun(2, "train", "--config", str(cfg), "--set", "parallel.data_parallel=4", timeout=120)
    assert r.returncode != 0
    assert "parallel.data_parallel (4) x parallel.tensor_parallel (1) must equal the number of processes " \
           "(WORLD_SIZE 2, from torchrun)" in r.stderr
    r = torchrun(2, "train", "--config", str(cfg), "--set", "parallel.tensor_parallel=2", "--set",
                 "model.vocab_size=255", timeout=120)
    assert r.returncode != 0 and "parallel.tensor_parallel (--set parallel.tensor_parallel=2) = 2 must divide " \
        "model.vocab_size (--set model.vocab_size=255) = 255" in r.stderr
    r = subprocess.run([EXE, "train", "--config", str(cfg), "--set", "parallel.tensor_parallel=2", "--set",
                        "model.num_heads=6", "--set", "model.num_kv_heads=3", "--set", "model.head_dim=8"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and \
        "parallel.tensor_parallel (--set parallel.tensor_parallel=2) = 2 must divide " \
        "model.num_kv_heads (--set model.num_kv_heads=3) = 3 or be a multiple of it" in r.stderr, r.stderr
    r = subprocess.run([EXE, "train", "--config", str(cfg), "--set", "parallel.expert_parallel=3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and " = 4 must be divisible by " \
        "parallel.expert_parallel (--set parallel.expert_parallel=3) = 3" in r.stderr
    r = subprocess.run([EXE, "train", "--config", str(cfg), "--set", "parallel.expert_parallel=2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "parallel.expert_parallel (2) must divide the data-parallel size (1)" in r.stderr


# ---- expert parallelism ----------------------------------------------------------

@pytest.mark.parametrize("nproc,args", [(2, ["0"]), (2, ["1.0"]), (2, ["0.5", "bias"]), (4, ["0.5"])])
def test_expert_parallel_dispatch_matches_all_local_experts(nproc, args):
    """tests/python/ep_worker.py on N processes: each holds E / N experts and
    rows travel by all-to-all (counts, variable splits, local re-permutation);
    outputs and gradients (tokens, router, expert weights and biases) equal the
    all-experts layer, dropless and with capacity."""
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           os.path.join(ROOT, "tests", "python", "ep_worker.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    assert r.stdout.count("expert-parallel output and gradients match") == nproc


def test_checkpoint_reshards_from_one_process_to_dp2_ep2(tmp_path, shards):
    """A one-process checkpoint resumes on 4 processes with the experts
    sharded over 2 (DP2 x EP2) and ends where the one-process run ends."""
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = dp_config(tmp_path, shards, "resharded", 1)
    r = torchrun(4, "train", "--config", str(cfg), "--set", "parallel.expert_parallel=2", "--resume",
                 str(tmp_path / "single" / "step_3"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pa, pb = final_model(tmp_path / "single"), final_model(tmp_path / "resharded")
    for n in pa:
        assert (pa[n] - pb[n]).abs().max().item() <= 1e-4, n
