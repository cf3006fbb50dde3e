"""A run is never lost: which checkpoint a run starts from, what pruning may
delete, crashes at every instant of a save, config and data changes on
resume, metrics that tell the truth (skipped steps, one record per step,
routing statistics over every data-parallel rank) and the loss-spike guard.
Each test does the bad thing for real (a kill at a chosen instant, a flipped
byte, an emptied `latest`) through the `moeyard` executable."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 32}
moe: {num_experts: 4, top_k: 2, moe_every_n: 1, capacity_factor: 1.5}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 2}
train: {steps: 16, micro_batch: 2, grad_accum: 1, eval_every: 0, threads: 1}
checkpoint: {dir: RUN, every: 4, keep_last: 2}
log: {every: 4}
"""


def config(tmp_path, shards, run="run", text=CONFIG):
    p = tmp_path / f"{run}.yaml"
    p.write_text(text.replace("TRAIN", str(shards / "train.bin")).replace("VALID", str(shards / "valid.bin"))
                 .replace("RUN", str(tmp_path / run)))
    return p


def train(cfg, *args, env=None, check=True):
    r = subprocess.run([EXE, "train", "--config", str(cfg), *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def steps_in(run):
    return sorted(int(p.name[5:]) for p in run.iterdir() if p.is_dir() and p.name[5:].isdigit()
                  and p.name.startswith("step_"))


def latest(run):
    return (run / "latest").read_text().strip()


def records(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- where a run starts, what pruning deletes ------------------------------------------------


def test_resume_never_refuses_another_runs_checkpoints(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg)
    run = tmp_path / "run"
    assert steps_in(run) == [12, 16] and latest(run) == "step_16"
    r = train(cfg, "--resume", "never", "--set", "train.steps=4", check=False)
    assert r.returncode == 1
    assert str(run) in r.stderr and "step_16" in r.stderr and "--overwrite" in r.stderr
    assert steps_in(run) == [12, 16]  # nothing touched
    # With --overwrite: the new run's step_4 is committed, named by latest,
    # never pruned; the other run's checkpoints go once it is committed.
    train(cfg, "--resume", "never", "--overwrite", "--set", "train.steps=4")
    assert steps_in(run) == [4] and latest(run) == "step_4"
    r = train(cfg, "--set", "train.steps=8")
    assert "resumed from" in r.stdout + r.stderr and f"{run}/step_4" in r.stdout + r.stderr
    assert steps_in(run) == [4, 8] and latest(run) == "step_8"


def test_resume_of_an_older_step_needs_overwrite_and_keeps_latest(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg, "--set", "checkpoint.keep_last=4")
    run = tmp_path / "run"
    assert steps_in(run) == [4, 8, 12, 16]
    r = train(cfg, "--resume", str(run / "step_4"), check=False)
    assert r.returncode == 1 and "step_8, step_12, step_16" in r.stderr and "--overwrite" in r.stderr
    train(cfg, "--resume", str(run / "step_4"), "--overwrite", "--set", "train.steps=8",
          "--set", "checkpoint.keep_last=1")
    # step_8 was re-saved by this run; latest names it; the abandoned future
    # (12, 16) and the older step_4 (keep_last 1) are gone.
    assert steps_in(run) == [8] and latest(run) == "step_8"
    train(cfg, "--set", "train.steps=12")
    assert latest(run) == "step_12"


def test_pruning_keeps_the_newest_of_this_run(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg, "--set", "train.steps=12")
    run = tmp_path / "run"
    assert steps_in(run) == [8, 12]
    # A step directory of another run (copied in) is never pruned.
    other = tmp_path / "other"
    train(config(tmp_path, shards, "other"), "--set", "train.steps=4")
    shutil.copytree(other / "step_4", run / "step_2")
    train(cfg, "--set", "train.steps=20")
    assert steps_in(run) == [2, 16, 20]


# ---- `latest` unusable -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "garbage", "missing_dir", "deleted"])
def test_unusable_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, shards, damage):
    cfg = config(tmp_path, shards)
    train(cfg)
    run = tmp_path / "run"
    # The newest checkpoint is corrupt too: the fallback must skip it.
    f = run / "step_16" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    if damage == "empty":
        (run / "latest").write_text("")
    elif damage == "garbage":
        (run / "latest").write_bytes(b"\x00\xff")
    elif damage == "missing_dir":
        (run / "latest").write_text("step_99\n")
    else:
        (run / "latest").unlink()
    r = train(cfg, "--set", "train.steps=20", "--overwrite")
    out = r.stdout + r.stderr
    assert "SHA-256 mismatch" in out and "resuming from the newest checkpoint that verifies" in out
    assert f"resumed from {run}/step_12 at step 12" in out
    assert records(run)[-1]["step"] == 20 and latest(run) == "step_20"


def test_no_verifiable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg)
    run = tmp_path / "run"
    (run / "latest").write_text("")
    for s in (12, 16):
        (run / f"step_{s}" / "manifest.json").write_text("{")
    r = train(cfg, check=False)
    assert r.returncode == 1
    assert "no checkpoint in" in r.stderr and "step_12" in r.stderr and "step_16" in r.stderr
    assert steps_in(run) == [12, 16]
    # A latest naming a missing checkpoint in an otherwise empty directory.
    shutil.rmtree(run / "step_12")
    shutil.rmtree(run / "step_16")
    (run / "latest").write_text("step_16\n")
    r = train(cfg, check=False)
    assert r.returncode == 1 and "names step_16, which does not exist" in r.stderr


# ---- a kill at every instant of a save ---------------------------------------------------------

CRASH_POINTS = ["save:written", "commit:files", "publish:before", "publish:aside", "publish:renamed",
                "publish:latest", "prune:one"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_at_any_instant_of_a_save_loses_nothing(tmp_path, shards, point):
    """A run killed (SIGKILL) at `point` while re-saving an existing step (the
    riskiest save: step_8 is replaced while `latest` names it) resumes, and
    the resumed run ends bit-identical to one that was never interrupted."""
    ref = config(tmp_path, shards, "ref")
    train(ref, "--set", "train.steps=12", "--set", "checkpoint.keep_last=1")
    cfg = config(tmp_path, shards)
    run = tmp_path / "run"
    # Killed once step_8 is committed: the same schedule as the reference.
    r = train(cfg, "--set", "train.steps=12", "--set", "checkpoint.keep_last=3",
              env={"MOEYARD_CRASH_AT": "publish:renamed#2"}, check=False)
    assert r.returncode == -signal.SIGKILL and steps_in(run) == [4, 8] and latest(run) == "step_8"
    # Replay from step 4: re-saves step_8 (killed there), then step_12.
    r = train(cfg, "--resume", str(run / "step_4"), "--overwrite", "--set", "train.steps=12",
              "--set", "checkpoint.keep_last=1", env={"MOEYARD_CRASH_AT": point}, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # Whatever the instant, `--resume auto` finds a complete checkpoint.
    r = train(cfg, "--set", "train.steps=12", "--set", "checkpoint.keep_last=1")
    assert "resumed from" in r.stdout + r.stderr
    ms = records(run)
    assert [m["step"] for m in ms] == list(range(1, 13))  # one record per step
    assert [m["loss"] for m in ms] == [m["loss"] for m in records(tmp_path / "ref")]
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert (run / "step_12" / f).read_bytes() == (tmp_path / "ref" / "step_12" / f).read_bytes()
    assert not [p for p in run.iterdir() if p.name.endswith((".tmp", ".old", ".deleting"))]


def test_a_kill_while_overwrite_discards_the_old_run_resumes_the_new_run(tmp_path, shards):
    cfg = config(tmp_path, shards)
    run = tmp_path / "run"
    train(cfg, "--set", "checkpoint.keep_last=4")
    assert steps_in(run) == [4, 8, 12, 16]
    # The new run's step_4 is committed; killed while deleting the old run's.
    r = train(cfg, "--resume", "never", "--overwrite", "--set", "train.steps=8",
              env={"MOEYARD_CRASH_AT": "prune:one"}, check=False)
    assert r.returncode == -signal.SIGKILL and latest(run) == "step_4"
    # --resume auto continues the new run (never the old run's newer
    # checkpoints) and finishes discarding them without --overwrite.
    r = train(cfg, "--set", "train.steps=8")
    assert f"resumed from {run}/step_4 at step 4" in r.stdout + r.stderr
    assert steps_in(run) == [4, 8] and latest(run) == "step_8"
    assert not [p for p in run.iterdir() if p.name.endswith((".tmp", ".old", ".deleting"))]
    assert [m["step"] for m in records(run)] == list(range(1, 9))
    assert (run / "metrics.jsonl.before-overwrite").exists()


def test_every_committed_file_and_directory_is_fsynced_before_it_is_published(tmp_path, shards):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    cfg = config(tmp_path, shards)
    run = tmp_path / "run"
    cmd = ["strace", "-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(tmp_path / "trace"),
           EXE, "train", "--config", str(cfg), "--set", "train.steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip("ptrace is not permitted here")
    assert r.returncode == 0, r.stderr[-2000:]
    calls = [line.split(None, 1)[1] for line in (tmp_path / "trace").read_text().splitlines() if " " in line]

    def index(pred, what):
        hits = [i for i, c in enumerate(calls) if pred(c)]
        assert hits, f"no {what} in the trace"
        return hits[0]

    tmp = f"{run}/step_4.tmp"
    publish = index(lambda c: c.startswith("rename") and f'"{tmp}"' in c, "rename of step_4.tmp")
    for f in sorted(os.listdir(run / "step_4")):
        # Each file is written under a temporary name, fsynced, then renamed.
        synced = index(lambda c: c.startswith("fsync(") and (f"{tmp}/{f}>" in c or f"{tmp}/{f}.tmp>" in c),
                       f"fsync of {f}")
        assert synced < publish, f
    dir_synced = [i for i, c in enumerate(calls) if c.startswith("fsync(") and f"<{tmp}>" in c]
    assert dir_synced and dir_synced[-1] < publish  # after its last file was renamed into it
    assert any(c.startswith("fsync(") and f"<{run}>" in c for c in calls[publish:]), "run directory not fsynced"
    # `latest` (the commit point) is durable before the directory is renamed.
    latest_sync = index(lambda c: c.startswith("fsync(") and f"{run}/latest.tmp>" in c, "fsync of latest.tmp")
    latest_publish = index(lambda c: c.startswith("rename") and f'"{run}/latest.tmp"' in c, "rename of latest")
    assert dir_synced[-1] < latest_sync < latest_publish < publish


# ---- what may change on resume -----------------------------------------------------------------


def test_resume_refuses_a_different_model_or_routing_naming_every_field(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg, "--set", "train.steps=4")
    r = train(cfg, "--set", "train.steps=8", "--set", "model.rope_theta=500000", "--set", "moe.score_fn=sigmoid",
              "--set", "model.norm_eps=1e-5", check=False)
    assert r.returncode == 1
    for line in ("model.rope_theta: checkpoint 10000, this config 500000",
                 "moe.score_fn: checkpoint softmax, this config sigmoid",
                 "model.norm_eps: checkpoint 1e-06, this config 1e-05"):
        assert line in r.stderr, r.stderr
    assert "docs/training.md" in r.stderr
    # What may change: learning rate, steps, logging, checkpoint cadence.
    r = train(cfg, "--set", "train.steps=8", "--set", "optim.lr=1e-3", "--set", "log.every=1",
              "--set", "checkpoint.every=2", "--set", "train.micro_batch=4")
    assert "resumed from" in r.stdout + r.stderr


def test_resume_of_a_checkpoint_older_than_an_option(tmp_path, shards):
    """A checkpoint written before an option existed (its manifest does not
    record the key) resumes when the option is at its default, and is
    refused when it is not."""
    cfg = config(tmp_path, shards)
    train(cfg, "--set", "train.steps=4")
    step = tmp_path / "run" / latest(tmp_path / "run")
    manifest = json.loads((step / "manifest.json").read_text())
    resolved = manifest["resolved_config"]
    for key in [k for k in resolved if k.startswith("moe.null_")]:
        del resolved[key]
    (step / "manifest.json").write_text(json.dumps(manifest))
    r = train(cfg, "--set", "train.steps=8", "--set", "moe.null_experts=2", check=False)
    assert r.returncode == 1 and "moe.null_experts: checkpoint 0, this config 2" in r.stderr, r.stderr
    r = train(cfg, "--set", "train.steps=8")
    assert "resumed from" in r.stdout + r.stderr


def test_resume_refuses_changed_data_unless_allowed(tmp_path, shards):
    cfg = config(tmp_path, shards)
    train(cfg, "--set", "train.steps=4")
    other = tmp_path / "other.bin"
    shutil.copy(shards / "valid.bin", other)
    r = train(cfg, "--set", "train.steps=8", "--set", f"data.train={other}", check=False)
    assert r.returncode == 1 and "data.train" in r.stderr and "--allow-data-change" in r.stderr
    r = train(cfg, "--set", "train.steps=8", "--set", "data.seed=7", check=False)
    assert r.returncode == 1 and "data.seed: checkpoint 1234, this config 7" in r.stderr
    # The same content at another path resumes.
    moved = tmp_path / "moved.bin"
    shutil.copy(shards / "train.bin", moved)
    r = train(cfg, "--set", "train.steps=6", "--set", f"data.train={moved}")
    assert "moved to" in r.stdout + r.stderr
    r = train(cfg, "--set", "train.steps=8", "--set", "data.seed=7", "--allow-data-change")
    assert "resumed from" in r.stdout + r.stderr


# ---- metrics that tell the truth ---------------------------------------------------------------


def test_skipped_steps_are_recorded(tmp_path, shards):
    cfg = config(tmp_path, shards)
    r = train(cfg, "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0", "--set", "train.max_bad_steps=3",
              check=False)
    assert r.returncode == 1
    ms = records(tmp_path / "run")
    skipped = [m for m in ms if m.get("skipped")]
    assert len(skipped) == 2 and all(m["skip_reason"] == "non-finite" for m in skipped)
    assert [m["step"] for m in ms] == list(range(1, len(ms) + 1))


def test_the_host_reads_the_steps_once_per_logging_interval(tmp_path):
    """Nothing in a step waits for a value on the device: the losses, the
    routing statistics, the gradient norm and the skip guard's verdict stay
    there (AdamW skips inside its kernel), and the host reads them once per
    logging interval. Every step still gets its record, and the records
    (loss-spike skips included: a corpus with a stretch of noise) equal
    those of a run that reads each step."""
    import moeyard

    shards = spike_shards(tmp_path / "data")
    text = (CONFIG.replace("steps: 16", "steps: 24, spike_factor: 1.05, spike_window: 6, max_bad_steps: 50")
            .replace("optim: {lr: 3.0e-3, warmup: 2}", "optim: {lr: 1.0e-2, warmup: 0, lr_schedule: constant}")
            .replace("every: 4, keep_last", "every: 0, keep_last"))
    r4 = moeyard.train(config(tmp_path, shards, "every4", text), ["log.every=4"], resume="never")
    r1 = moeyard.train(config(tmp_path, shards, "every1", text), ["log.every=1"], resume="never")
    assert (r4["host_reads"], r1["host_reads"]) == (6, 24)
    a, b = records(tmp_path / "every4"), records(tmp_path / "every1")
    for m in a + b:
        m.pop("step_s")
    assert [m["step"] for m in a] == list(range(1, 25)) and a == b
    assert any(m.get("skip_reason") == "loss spike" for m in a)
    assert r4["skipped_steps"] == r1["skipped_steps"] == sum(bool(m.get("skipped")) for m in a)


def test_plot_run_reads_one_value_per_step(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run", os.path.join(ROOT, "scripts", "plot_run.py"))
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    layer = {"layer": 0, "tokens_per_expert": [1, 2]}
    recs = [{"step": 1, "loss": 3.0, "ce": 3.0, "lr": 1e-3, "moe_layers": [layer]},
            {"step": 2, "loss": 9.0, "ce": 9.0, "lr": 1e-3, "moe_layers": [layer]},
            {"step": 2, "loss": 2.5, "ce": 2.5, "lr": 1e-3, "moe_layers": [layer]},
            {"step": 3, "loss": None, "ce": None, "lr": 1e-3, "skipped": True, "skip_reason": "non-finite",
             "moe_layers": [layer]}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 4, "lo')
    ms = plot_run.load(str(tmp_path))
    assert [m["step"] for m in ms] == [1, 2, 3] and ms[1]["loss"] == 2.5
    plot_run.main([str(tmp_path)])
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0


def spike_shards(d):
    """A corpus that is one repeated sentence (learned within a few steps)
    with a stretch of random bytes in it: a window drawn there is a loss
    spike on every machine, since the windows come from a seeded generator
    and only the losses depend on the arithmetic."""
    import struct

    import numpy as np

    d.mkdir()
    sentence = np.frombuffer(b"the quick brown fox jumps over the lazy dog. ", dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)
    train = np.concatenate([np.tile(sentence, 200), noise, np.tile(sentence, 200)])
    for name, tokens in (("train.bin", train), ("valid.bin", np.tile(sentence, 4))):
        (d / name).write_bytes(b"MOEYTOK1" + struct.pack("<IIQQ", 1, 2, tokens.size, 256)
                               + tokens.astype("<u2").tobytes())
    return d


def test_spike_guard_skips_spikes_and_its_state_survives_resume(tmp_path):
    shards = spike_shards(tmp_path / "data")
    text = (CONFIG.replace("steps: 16", "steps: 24, spike_factor: 1.05, spike_window: 6, max_bad_steps: 50")
            .replace("optim: {lr: 3.0e-3, warmup: 2}", "optim: {lr: 1.0e-2, warmup: 0, lr_schedule: constant}"))
    full = config(tmp_path, shards, "full", text)
    train(full)
    ms = records(tmp_path / "full")
    # The rule, replayed from the records: a step is skipped exactly when
    # its loss exceeds 1.05 x the median of the last 6 accepted losses.
    accepted = []
    for m in ms:
        spike = len(accepted) >= 5 and m["loss"] > 1.05 * sorted(accepted[-6:])[len(accepted[-6:]) // 2]
        assert bool(m.get("skipped")) == spike, m["step"]
        if not spike:
            accepted.append(m["loss"])
    assert any(m.get("skip_reason") == "loss spike" for m in ms)
    # Stopped at 12 and resumed: the window resumes too, so every later step
    # (skipped or not) is bit-identical.
    half = config(tmp_path, shards, "half", text)
    train(half, "--set", "train.steps=12")
    train(half)
    assert [(m["loss"], m.get("skipped")) for m in records(tmp_path / "half")] == \
        [(m["loss"], m.get("skipped")) for m in ms]


def test_dropped_fraction_is_zero_without_real_tokens():
    import torch

    import moeyard

    moe = moeyard.MoE(hidden_size=8, ffn_size=16, num_experts=4, top_k=2, capacity_factor=1.0)
    x = torch.randn(2, 3, 8)
    _, r = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert r.dropped_fraction.item() == 0.0
    _, r = moe(torch.randn(0, 3, 8))
    assert r.dropped_fraction.item() == 0.0
    # With real tokens: a capacity of 1 row per expert keeps one assignment
    # of each expert that was chosen.
    moe = moeyard.MoE(hidden_size=8, ffn_size=16, num_experts=4, top_k=2, capacity_factor=0.01, min_capacity=1)
    _, r = moe(torch.randn(1, 6, 8))
    kept = (r.tokens_per_expert > 0).sum().item()
    assert abs(r.dropped_fraction.item() - (1 - kept / 12)) < 1e-6


# ---- data parallelism: statistics, config print, the stop message ------------------------------

DP_CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 32}
moe: {num_experts: 4, top_k: 2, moe_every_n: 1, capacity_factor: 0.0, switch_coeff: 0.0}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 2}
train: {steps: 3, micro_batch: MB, grad_accum: 2, eval_every: 0, threads: 1}
checkpoint: {dir: RUN, every: 0, keep_last: 1}
log: {every: 1}
"""


def launch(cfg, nproc, *args):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([EXE, "train", "--config", str(cfg), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    return procs


def test_routing_statistics_are_those_of_the_whole_batch_under_data_parallelism(tmp_path, shards):
    one = config(tmp_path, shards, "one", DP_CONFIG.replace("MB", "4"))
    train(one)
    two = config(tmp_path, shards, "two", DP_CONFIG.replace("MB", "2"))
    procs = launch(two, 2)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    # Only rank 0 prints the resolved config.
    assert sum((o[0] + o[1]).count("resolved config") for o in outs) == 1
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for la, lb in zip(x["moe_layers"], y["moe_layers"]):
            assert la["tokens"] == lb["tokens"] == 2 * 4 * 32
            assert la["tokens_per_expert"] == lb["tokens_per_expert"]
            for k in ("z_loss", "router_entropy", "switch_loss", "dropped_fraction", "capacity_utilization"):
                tol = 1e-6 if x["step"] == 1 else 1e-4
                assert abs(la[k] - lb[k]) <= tol * max(1.0, abs(la[k])), (x["step"], k, la[k], lb[k])


def test_a_stop_names_the_signal_on_every_rank(tmp_path, shards):
    cfg = config(tmp_path, shards, "sig", DP_CONFIG.replace("MB", "2").replace("steps: 3", "steps: 100000"))
    procs = launch(cfg, 2)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    logs = [o[0] + o[1] for o in outs]
    assert "SIGTERM received: saving a checkpoint" in logs[1]
    assert "stop requested by another rank (SIGTERM)" in logs[0]
    assert not any("signal 0" in log for log in logs)
    step = int(latest(tmp_path / "sig").split("_")[1])
    assert "verified" in logs[0] and f"step_{step}" in logs[0]
