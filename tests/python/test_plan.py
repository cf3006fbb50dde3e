"""The memory planner (`moeyard plan`) against what the trainer holds: each
rank's parameter and optimizer bytes equal those the trainer reports after
loading (1 process, DP2 x EP2, TP2, sharded and not), and the measured peak
resident memory of a training run is within 15% of the planned step peak."""

import json
import os
import re
import subprocess

import pytest

from test_distributed import EXE, dp_config, torchrun


def plan(cfg, world, *sets):
    args = [EXE, "plan", "--config", str(cfg), "--world", str(world), "--json"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logged_memory(stderr):
    m = re.search(r"this rank holds ([\d.]+) MB of parameters and ([\d.]+) MB of optimizer state", stderr)
    assert m, stderr[-2000:]
    return float(m.group(1)) * 1e6, float(m.group(2)) * 1e6


@pytest.mark.parametrize("nproc,sets", [
    (1, []),
    (4, ["parallel.expert_parallel=2"]),
    (4, ["parallel.expert_parallel=2", "optim.shard=optimizer+grads"]),
    (2, ["parallel.tensor_parallel=2", "optim.shard=optimizer"]),
], ids=["one", "dp2ep2", "dp2ep2-sharded", "tp2-sharded"])
def test_planned_bytes_are_what_rank_0_holds(tmp_path, shards, nproc, sets):
    cfg = dp_config(tmp_path, shards, "run", 4 // (nproc // (2 if "parallel.tensor_parallel=2" in sets else 1)))
    cfg.write_text(cfg.read_text().replace("every: 3, keep_last: 3", "every: 1, keep_last: 3"))
    args = [a for s in sets + ["train.steps=1"] for a in ("--set", s)]
    r = (subprocess.run([EXE, "train", "--config", str(cfg), *args], capture_output=True, text=True, timeout=300)
         if nproc == 1 else torchrun(nproc, "train", "--config", str(cfg), *args, timeout=300))
    assert r.returncode == 0, r.stderr[-3000:]
    # The resume loads the optimizer state the first step created.
    resume = [a for s in sets + ["train.steps=2"] for a in ("--set", s)]
    r = (subprocess.run([EXE, "train", "--config", str(cfg), *resume], capture_output=True, text=True, timeout=300)
         if nproc == 1 else torchrun(nproc, "train", "--config", str(cfg), *resume, timeout=300))
    assert r.returncode == 0, r.stderr[-3000:]
    params, state = logged_memory(r.stderr + r.stdout)
    p = plan(cfg, nproc, *sets)
    rank0 = next(x for x in p["ranks"] if 0 in x["ranks"])
    assert abs(rank0["params"] - params) <= 500, (rank0["params"], params)  # the log rounds to 1 kB
    # Sharded: the planner pads each tensor, the optimizer each bucket.
    assert abs(rank0["optimizer"] - state) <= 2000, (rank0["optimizer"], state)
    assert sum(len(x["ranks"]) for x in p["ranks"]) == nproc


def test_plan_errors_name_the_key(tmp_path, shards):
    cfg = dp_config(tmp_path, shards, "run", 4)
    r = subprocess.run([EXE, "plan", "--config", str(cfg), "--world", "3", "--set", "parallel.expert_parallel=2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "expert_parallel" in r.stderr


def test_plan_prints_every_figure(tmp_path, shards):
    cfg = dp_config(tmp_path, shards, "run", 4)
    r = subprocess.run([EXE, "plan", "--config", str(cfg), "--world", "4", "--set", "parallel.expert_parallel=2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for what in ("parameters", "gradients", "optimizer state", "activations (full)", "step peak",
                 "load peak (resume)", "all-to-all", "TP1 x EP2 x EDP2 (DP 4)"):
        assert what in r.stdout, what


def _peak_rss(args, tmp_path):
    """Peak anonymous resident bytes of one `moeyard` process, sampled every
    5 ms from /proc (file-backed pages, such as the PyTorch libraries, come
    and go with the machine's memory pressure; what the process allocates
    does not)."""
    import time

    peak = 0
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([EXE, *args], stdout=subprocess.DEVNULL, stderr=err)
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.005)
    assert p.wait() == 0, open(tmp_path / "err").read()[-2000:]
    return peak


def test_planned_step_peak_is_within_15_percent_of_the_measured(tmp_path, shards):
    """A ~25M-parameter model trained 2 steps in one process (float32, no
    sharding): its peak anonymous resident memory less the baseline (the
    same binary training a tiny model) is within 15% of the planner's step
    peak."""
    cfg = dp_config(tmp_path, shards, "mid", 4)
    text = cfg.read_text()
    mid = (text.replace("hidden_size: 32", "hidden_size: 256").replace("ffn_size: 64", "ffn_size: 1024")
           .replace("num_layers: 2", "num_layers: 4").replace("num_experts: 4", "num_experts: 16")
           .replace("vocab_size: 256", "vocab_size: 256").replace("seq_len: 32", "seq_len: 128")
           .replace("max_seq_len: 32", "max_seq_len: 128").replace("steps: 6", "steps: 2")
           .replace("every: 3", "every: 0").replace("eval_every: 3", "eval_every: 0"))
    cfg.write_text(mid)
    tiny = dp_config(tmp_path, shards, "tiny", 4)
    tiny.write_text(tiny.read_text().replace("steps: 6", "steps: 2").replace("every: 3", "every: 0"))
    base = _peak_rss(["train", "--config", str(tiny)], tmp_path)
    peak = _peak_rss(["train", "--config", str(cfg)], tmp_path)
    p = plan(cfg, 1)["ranks"][0]
    want = max(p["step_peak"], p["load_peak"])
    got = peak - base
    print(f"measured {got / 1e6:.1f} MB, planned {want / 1e6:.1f} MB")
    assert abs(got - want) <= 0.15 * want, (got / 1e6, want / 1e6, p)
