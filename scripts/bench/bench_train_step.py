#!/usr/bin/env python3
"""Benchmark one training step of moeyard's C++ trainer against transformers' Mixtral, same run.

    python scripts/bench/bench_train_step.py [--configs tiny,mid] [--rounds 5] [--warmup N]
                                             [--threads 2] [--hf-impls grouped_mm,eager]
                                             [--no-shipped] [--out table.md]

One training step = forward, loss (cross-entropy + router aux loss), backward,
global gradient-norm clip, AdamW step, in float32 on the CPU.

  moeyard       the real trainer: `build/moeyard train --config <yaml> --set ...`
                on the built-in corpus (data/builtin). Step times are read
                from its per-step console line (log.every=1: tokens per step /
                the printed tok/s, i.e. the wall time between two step lines,
                everything in the loop included). After the last timed step
                the process is killed (SIGKILL), so the end-of-run checkpoint
                write is neither timed nor counted in its memory.
  transformers  MixtralForCausalLM with a MixtralConfig of exactly the same
                shapes (parameter counts are checked equal), attention "sdpa",
                each experts implementation in --hf-impls ("grouped_mm" is
                transformers' default and fastest on CPU; "eager" loops over
                experts; "batched_mm" gathers one weight matrix per token-expert
                pair and is left out by default: GBs of gathered weights and
                slower), torch.optim.AdamW with the same lr, betas, eps and
                weight-decay groups (decay on attention/expert matrices; none on
                norms, embeddings, the router), clip_grad_norm_ with the same
                max norm, labels = the batch, output_router_logits=True and
                router_aux_loss_coef = moe.switch_coeff. Batches are random
                windows of the same corpus shard, [micro_batch, seq_len].

Both sides run with the same intra-op thread count, each in its own child
process; all of a config's processes live at once and take turns (scripts/
bench/limits.py's method, with SIGSTOP / SIGCONT between the turns): after
--warmup untimed steps each, every round runs each process for one turn
(tiny: 1 + 3 steps, mid: 1 + 1; the first step of a turn straddles the
pause and is dropped), then the step's floor once; a first, untimed round
warms every process and the floor up. A slow spell of the
shared machine then hits every implementation alike. Step time = the
median over the rounds' timed steps, spread = max - min; "other CPU" is the
share of the machine's CPU that other processes used during the timed
steps (/proc/stat minus the child's own CPU time), with a warning above 10%.
tokens/s = micro_batch * seq_len / median step time. Peak RSS = the child's
VmHWM (/proc/<pid>/status) at the end of the timed steps: the whole process (interpreter or executable, libtorch,
model, gradients, optimizer state, activations); "start RSS" is the process
before the model exists (moeyard: the C++ executable with libtorch loaded;
transformers: Python with torch and transformers imported).

Configs (model shapes, batch, sequence, optimizer and clipping of the yaml):
  tiny  configs/tiny.yaml with the Mixtral architecture: every layer MoE
        (moe_every_n 2 -> 1), no q/k norm, dropless (capacity 1.25 -> 0),
        no z-loss; the shipped tiny.yaml itself is one more moeyard row,
        for information only (different architecture: 2 MoE layers, q/k norm,
        capacity 1.25, z-loss), unless --no-shipped.
  mid   configs/bench_mid.yaml (already Mixtral-shaped): H=512, 8 layers,
        E=8 top-2, F=1024, B=4 x S=512.
Ratios are against the fastest transformers implementation of the same run
(>1: moeyard has more tokens/s, or more peak memory).

The floor of a config's step, measured in the same rounds as the children
(all of them paused, same thread count): every GEMM
of the step at its own shape, forward + backward through autograd (per
layer q, k, v, o, the router, each expert's gate/up and down at T*K/E rows,
then the LM head), and causal SDPA forward + backward, summed with their
counts. "of the floor" = floor time / step time: the share of the step that
its matrix products and attention alone would take at the rates this
machine reaches for those shapes (an MFU against what is reachable here).
"step TFLOP/s" divides the floor's FLOPs (6 x the active matrix parameters
per token, plus attention) by the step time.
"""

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402

CONFIGS = {
    # name: (yaml, overrides that make it Mixtral-shaped, default warmup, timed steps per turn)
    "tiny": ("configs/tiny.yaml",
             {"moe.moe_every_n": 1, "model.qk_norm": "none", "moe.capacity_factor": 0.0,
              "moe.z_coeff": 0.0},
             3, 3),
    "mid": ("configs/bench_mid.yaml", {}, 1, 1),
}

# moeyard model defaults (docs/model.md) of the keys the Mixtral mapping reads
MODEL_DEFAULTS = {"vocab_size": 256, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 0, "head_dim": 0, "ffn_size": 512, "mlp": "swiglu",
                  "norm": "rmsnorm", "norm_eps": 1e-6, "qk_norm": "none", "qkv_bias": False,
                  "sliding_window": 0, "rope_theta": 10000.0, "rotary_pct": 1.0,
                  "rope_scaling": "none", "max_seq_len": 2048, "tie_embeddings": True,
                  "dtype": "float32"}
MOE_DEFAULTS = {"num_experts": 8, "ffn_size": 0, "moe_every_n": 1, "first_k_dense": 0,
                "layers": [], "top_k": 2, "score_fn": "softmax", "renormalize": True, "scale": 1.0,
                "num_groups": 1, "selection_bias": False, "router_bias": False,
                "routing": "token_choice", "weight_on_input": False, "capacity_factor": 0.0,
                "noise": "none", "num_shared_experts": 0, "expert_dropout": 0.0,
                "switch_coeff": 0.01, "switch_per_sequence": False, "importance_coeff": 0.0,
                "load_coeff": 0.0, "z_coeff": 0.001}
# must hold for the model to be exactly a Mixtral
MIXTRAL_MODEL = {"mlp": "swiglu", "norm": "rmsnorm", "qk_norm": "none", "qkv_bias": False,
                 "sliding_window": 0, "rotary_pct": 1.0, "rope_scaling": "none", "dtype": "float32"}
MIXTRAL_MOE = {"moe_every_n": 1, "first_k_dense": 0, "layers": [], "score_fn": "softmax",
               "renormalize": True, "scale": 1.0, "num_groups": 1, "selection_bias": False,
               "router_bias": False, "routing": "token_choice", "weight_on_input": False,
               "capacity_factor": 0.0, "noise": "none", "num_shared_experts": 0,
               "expert_dropout": 0.0, "switch_per_sequence": False, "importance_coeff": 0.0,
               "load_coeff": 0.0, "z_coeff": 0.0}


def proc_status(pid, key):
    """VmRSS / VmHWM of a process in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def proc_state(pid):
    """R, S, T (stopped), ... of /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def machine_busy():
    """(busy jiffies of all CPUs, total jiffies) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def proc_cpu(pid):
    """utime + stime of a process (and its threads) in jiffies."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def other_cpu_share(busy0, busy1, own0, own1):
    d_busy = busy1[0] - busy0[0]
    d_total = busy1[1] - busy0[1]
    return max(0.0, (d_busy - (own1 - own0)) / max(d_total, 1))


def set_key(cfg, dotted, value):
    d = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def load_config(name):
    import yaml

    path, overrides, _, _ = CONFIGS[name]
    with open(os.path.join(ROOT, path)) as f:
        cfg = yaml.safe_load(f)
    for k, v in overrides.items():
        set_key(cfg, k, v)
    return path, overrides, cfg


def mixtral_kwargs(cfg):
    """MixtralConfig arguments of a moeyard training config; fails if it is not a Mixtral."""
    m = {**MODEL_DEFAULTS, **cfg.get("model", {})}
    e = {**MOE_DEFAULTS, **cfg.get("moe", {})}
    for want, have, sec in [(MIXTRAL_MODEL, m, "model"), (MIXTRAL_MOE, e, "moe")]:
        for k, v in want.items():
            if have[k] != v:
                raise SystemExit(f"{sec}.{k} = {have[k]!r}: not a Mixtral architecture (needs {v!r})")
    heads = m["num_heads"]
    return dict(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
        intermediate_size=e["ffn_size"] or m["ffn_size"], num_hidden_layers=m["num_layers"],
        num_attention_heads=heads, num_key_value_heads=m["num_kv_heads"] or heads,
        head_dim=m["head_dim"] or m["hidden_size"] // heads, hidden_act="silu",
        max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["norm_eps"],
        tie_word_embeddings=m["tie_embeddings"], num_local_experts=e["num_experts"],
        num_experts_per_tok=e["top_k"], output_router_logits=True,
        router_aux_loss_coef=e["switch_coeff"], router_jitter_noise=0.0, attention_dropout=0.0,
        sliding_window=None, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])})


def optim_settings(cfg):
    o = {"lr": 3e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0,
         **cfg.get("optim", {})}
    t = {"micro_batch": 8, "grad_accum": 1, **cfg.get("train", {})}
    d = {"train": "data/builtin/train.bin", "seq_len": 128, **cfg.get("data", {})}
    if t["grad_accum"] != 1:
        raise SystemExit("the benchmark times grad_accum = 1 steps")
    return o, t["micro_batch"], d["seq_len"], d["train"]


def floor_fns(mx, B, S, threads):
    """({name: fn}, {name: count per step}, FLOPs) of the GEMMs and attention
    of one training step of Mixtral-shaped `mx` at B x S tokens, each shape
    forward + backward through autograd (fresh gradients, no accumulation
    into .grad)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    T, H, L = B * S, mx["hidden_size"], mx["num_hidden_layers"]
    nh, nkv, hd = mx["num_attention_heads"], mx["num_key_value_heads"], mx["head_dim"]
    E, K, Fe, V = mx["num_local_experts"], mx["num_experts_per_tok"], mx["intermediate_size"], mx["vocab_size"]
    rows = max(1, T * K // E)
    shapes = {  # name: (M, K, N, count per step)
        "q, o": (T, H, nh * hd, 2 * L), "k, v": (T, H, nkv * hd, 2 * L), "router": (T, H, E, L),
        "expert gate/up": (rows, H, 2 * Fe, E * L), "expert down": (rows, Fe, H, E * L), "lm head": (T, H, V, 1)}
    fns, counts, flops = {}, {}, 0.0
    for name, (m, k, n, count) in shapes.items():
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(k, n, requires_grad=True)
        g = torch.randn(m, n)
        fns[name] = lambda x=x, w=w, g=g: torch.autograd.grad(x @ w, (x, w), g)
        counts[name] = count
        flops += 3 * 2.0 * m * k * n * count
    q = torch.randn(B, nh, S, hd, requires_grad=True)
    kv = [torch.randn(B, nkv, S, hd, requires_grad=True) for _ in range(2)]
    go = torch.randn(B, nh, S, hd)
    fns["attention"] = lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True), (q, *kv), go)
    counts["attention"] = L
    flops += 3 * 2.0 * B * nh * S * S * hd * L  # QK^T and PV, causal half of 2 x 2 S^2 hd
    return fns, counts, flops


def moeyard_param_count(cfg):
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import moeyard

    model = dict(cfg["model"])
    model["moe"] = cfg["moe"]
    m = moeyard.Transformer(model)
    n = sum(p.numel() for p in m.parameters())
    del m
    return n


# ---------------------------------------------------------------- the timed processes

STEP_RE = re.compile(r"step\s+(\d+)/(\d+) \|.*\|\s+([\d.]+) tok/s")
HF_STEP_RE = re.compile(r"^STEP ([\d.eE+-]+)$")


class Child:
    """One implementation's training process, run only in its turns: SIGCONT,
    `lines` step lines, SIGSTOP. Lines the process printed before it
    stopped are drained first; the next step began before the pause, so
    its time includes the pause and is dropped; the turn's later steps are
    timed, each with the share of the machine's CPU that other processes
    used meanwhile."""

    def __init__(self, name, cmd, seconds_of):
        self.name, self.seconds_of = name, seconds_of
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.fd, self.pending = self.p.stdout.fileno(), b""
        self.log, self.times, self.other = [], [], []
        self.start_mb = None

    def _read_line(self, timeout=None):
        """The next line (None: none within `timeout` seconds)."""
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"{self.name} stopped early:\n" + "".join(self.log[-30:]))
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        line = line.decode(errors="replace") + "\n"
        self.log.append(line)
        if self.start_mb is None:  # the process before the model exists
            self.start_mb = proc_status(self.p.pid, "VmRSS")
        return line

    def _next_step(self):
        while True:
            dt = self.seconds_of(self._read_line())
            if dt is not None:
                return dt

    def _pause(self):
        os.kill(self.p.pid, signal.SIGSTOP)
        while proc_state(self.p.pid) != "T":
            time.sleep(0.001)
        while self._read_line(timeout=0) is not None:  # printed before the stop
            pass

    def warm_up(self, steps):
        """Starts the process and runs `steps` untimed steps, then pauses it."""
        for _ in range(steps):
            self._next_step()
        self._pause()

    def turn(self, lines=2, timed=True):
        os.kill(self.p.pid, signal.SIGCONT)
        self._next_step()  # straddled the pause
        for _ in range(lines - 1):
            busy0, own0 = machine_busy(), proc_cpu(self.p.pid)
            dt = self._next_step()
            if timed:
                self.times.append(dt)
                self.other.append(other_cpu_share(busy0, machine_busy(), own0, proc_cpu(self.p.pid)))
        self._pause()

    def finish(self):
        """Peak memory of the timed steps, then the process is killed (an
        end-of-run checkpoint write is neither timed nor counted)."""
        self.peak_mb = proc_status(self.p.pid, "VmHWM")
        self.p.kill()
        self.p.wait()
        return {"times": self.times, "other_cpu": statistics.mean(self.other), "peak_mb": self.peak_mb,
                "start_mb": self.start_mb}


def moeyard_child(name, path, overrides, B, S, steps, threads, run_dir):
    exe = os.environ.get("MOEYARD_EXE", os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard"))
    sets = {**overrides, "train.steps": steps, "train.threads": threads, "log.every": 1,
            "checkpoint.dir": run_dir, "checkpoint.every": 0, "data.valid": '""',
            "train.eval_every": 0}
    cmd = [exe, "train", "--config", path, "--resume", "never"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]

    def seconds_of(line):  # the wall time between two step lines
        mt = STEP_RE.search(line)
        return B * S / float(mt.group(3)) if mt else None

    return Child(name, cmd, seconds_of)


def hf_child(spec):
    """Runs in its own process: MixtralForCausalLM training steps, one
    "STEP <seconds>" line each, until killed."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import MixtralConfig, MixtralForCausalLM

    print("START", flush=True)  # the parent reads the resident memory here
    torch.manual_seed(0)
    cfg = MixtralConfig(**spec["mixtral"])
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = spec["impl"]
    model = MixtralForCausalLM(cfg).to(torch.float32)
    model.train()
    got = (model.config._attn_implementation, model.config._experts_implementation)
    if got != ("sdpa", spec["impl"]):
        raise SystemExit(f"transformers chose attention/experts {got}, asked sdpa/{spec['impl']}")
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise SystemExit("lm_head is not tied")
    params = list(model.parameters())
    print(f"PARAMS {sum(p.numel() for p in params)}", flush=True)
    o = spec["optim"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # moeyard's groups: no decay on norms, embeddings, router
        if p.dim() >= 2 and "embed" not in name and "lm_head" not in name and ".gate." not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    # the corpus shard: 32-byte header (magic, version, bytes per token, count, vocab), then tokens
    with open(spec["data"], "rb") as f:
        head = f.read(32)
    width = int.from_bytes(head[12:16], "little")
    count = int.from_bytes(head[16:24], "little")
    tokens = np.memmap(spec["data"], dtype=np.uint16 if width == 2 else np.uint32, mode="r",
                       offset=32, shape=(count,))
    rng = np.random.default_rng(1234)
    B, S = spec["B"], spec["S"]
    while True:
        t = time.perf_counter()
        starts = rng.integers(0, count - S, B)
        x = torch.from_numpy(np.stack([tokens[s:s + S] for s in starts]).astype(np.int64))
        out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()
        print(f"STEP {time.perf_counter() - t}", flush=True)


def transformers_child(impl, mixtral, optim, B, S, data, threads):
    spec = {"impl": impl, "mixtral": mixtral, "optim": optim, "B": B, "S": S,
            "data": os.path.join(ROOT, data), "threads": threads}
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-child", json.dumps(spec)]

    def seconds_of(line):
        m = HF_STEP_RE.match(line.strip())
        return float(m.group(1)) if m else None

    return Child(f"transformers {impl}", cmd, seconds_of)


def hf_params(child):
    for line in child.log:
        if line.startswith("PARAMS "):
            return int(line.split()[1])
    return None


# ---------------------------------------------------------------- main

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians and spreads over them)")
    ap.add_argument("--warmup", type=int, help="untimed steps of each process first (default: tiny 3, mid 1)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both sides")
    ap.add_argument("--hf-impls", default="grouped_mm,eager",
                    help="transformers experts implementations (also: batched_mm)")
    ap.add_argument("--no-shipped", action="store_true", help="skip the shipped tiny.yaml row")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_child:
        hf_child(json.loads(a.hf_child))
        return

    import torch
    import transformers

    sys.path.insert(0, os.path.join(ROOT, "python"))
    import moeyard

    if not os.path.exists(os.path.join(ROOT, "data/builtin/train.bin")):
        raise SystemExit("no data/builtin/train.bin: python scripts/prepare_data.py --builtin "
                         "--out data/builtin --max-bytes 20000000")
    header = (f"{cpu_name()}, {os.cpu_count()} cores; moeyard {moeyard.__version__}, torch "
              f"{torch.__version__}, transformers {transformers.__version__}; float32, "
              f"{a.threads} threads both sides")
    print(header)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: other processes share the CPU")
    rows = []  # (config, implementation, tok/s, step ms, spread, peak, start, other, ratios, TFLOP/s, frac)
    for name in a.configs.split(","):
        path, overrides, cfg = load_config(name)
        warmup = CONFIGS[name][2] if a.warmup is None else a.warmup
        mixtral = mixtral_kwargs(cfg)
        optim, B, S, data = optim_settings(cfg)
        n_ours = moeyard_param_count(cfg)
        label = f"{name} (B={B} S={S} H={mixtral['hidden_size']} L={mixtral['num_hidden_layers']} " \
                f"E={mixtral['num_local_experts']} K={mixtral['num_experts_per_tok']} " \
                f"F={mixtral['intermediate_size']})"
        print(f"\n{label}: {warmup} warm-up steps, then {a.rounds} interleaved rounds")
        print(f"  overrides of {path}: {overrides or 'none'}")
        per_turn = CONFIGS[name][3]
        # (a process may run a step or two past a turn's last line before
        # it stops: room for them; it is killed after the last round)
        steps = warmup + 1 + 3 * (per_turn + 1) * (a.rounds + 1) + 20
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
            children = [moeyard_child("moeyard", path, overrides, B, S, steps, a.threads, f"{tmp}/a")]
            children += [transformers_child(impl, mixtral, optim, B, S, data, a.threads)
                         for impl in a.hf_impls.split(",")]
            if name == "tiny" and not a.no_shipped:
                children.append(moeyard_child("moeyard, tiny.yaml as shipped (info)", path, {}, B, S, steps,
                                              a.threads, f"{tmp}/b"))
            try:
                for c in children:  # one at a time: start-up, warm-up, pause
                    c.warm_up(warmup + 1)
                for c in children:
                    n = hf_params(c)
                    if n is not None and n != n_ours:
                        raise SystemExit(f"parameter counts differ: moeyard {n_ours}, {c.name} {n}")
                fns, counts, floor_flops = floor_fns(mixtral, B, S, a.threads)
                floor = {k: [] for k in fns}
                for c in children:  # an untimed round first, as in limits.interleaved
                    c.turn(per_turn + 1, timed=False)
                limits.interleaved(fns, 0)
                for r in range(a.rounds):
                    for c in children:
                        c.turn(per_turn + 1)
                    for k, t in limits.interleaved(fns, 1, warm_up=False).items():
                        floor[k] += t
                    print(f"  round {r + 1}/{a.rounds}: " + ", ".join(
                        f"{c.name} {c.times[-1] * 1e3:.0f} ms" for c in children), flush=True)
                results = {c.name: c.finish() for c in children}
            finally:
                for c in children:
                    if c.p.poll() is None:
                        c.p.kill()
                        c.p.wait()
        print(f"  moeyard: {n_ours} parameters (transformers' checked equal)")
        floor_rounds = [sum(floor[k][r] * counts[k] for k in fns) for r in range(a.rounds)]
        floor_s = limits.median(floor_rounds)
        print(f"  floor (GEMMs + attention of one step, same rounds): {floor_s * 1e3:.1f} ms "
              f"(spread {limits.spread(floor_rounds) * 1e3:.1f}), {floor_flops / floor_s / 1e9:.1f} GFLOP/s")
        hf = {k: v for k, v in results.items() if k.startswith("transformers ")}
        best = min(hf, key=lambda k: limits.median(hf[k]["times"]))
        ordered = [("moeyard", results["moeyard"]), (f"{best} (best)", hf[best])]
        ordered += [(k, v) for k, v in hf.items() if k != best]
        ordered += [(k, v) for k, v in results.items() if "(info)" in k]
        base = hf[best]
        base_tps = B * S / limits.median(base["times"])
        for impl, r in ordered:
            med = limits.median(r["times"])
            # the shipped tiny.yaml has other shapes than the floor's
            frac = None if "(info)" in impl else floor_s / med
            tps = B * S / med
            rows.append((label, impl, tps, med * 1e3, limits.spread(r["times"]) * 1e3, r["peak_mb"],
                         r["start_mb"], r["other_cpu"], tps / base_tps, r["peak_mb"] / base["peak_mb"],
                         None if frac is None else floor_flops / med / 1e12, frac))
            print(f"  {impl:44s} {tps:9.0f} tok/s  {med * 1e3:8.1f} ms/step (spread "
                  f"{limits.spread(r['times']) * 1e3:.1f})  peak RSS {r['peak_mb']:7.0f} MB (start "
                  f"{r['start_mb']:.0f})  other CPU {100 * r['other_cpu']:.0f}%  x{tps / base_tps:.2f} tok/s, "
                  f"x{r['peak_mb'] / base['peak_mb']:.2f} peak vs {best}"
                  + ("" if frac is None else f"  {frac:.2f} of the floor"))
            if r["other_cpu"] > 0.10:
                print(f"  warning: other processes used {100 * r['other_cpu']:.0f}% of the CPU during "
                      f"{impl}'s steps; re-run on a quiet machine")
    md = [header, "",
          "| config | implementation | tokens/s | step (ms) | spread (ms) | peak RSS (MB) | start RSS (MB) | "
          "other CPU | tokens/s vs transformers best | peak RSS vs transformers best | "
          "step TFLOP/s | of the floor |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, impl, tps, ms, spr, peak, start, other, rt, rp, tflops, frac) in rows:
        md.append(f"| {label} | {impl} | {tps:.0f} | {ms:.1f} | {spr:.1f} | {peak:.0f} | {start:.0f} | "
                  f"{100 * other:.0f}% | {rt:.2f}x | {rp:.2f}x | {'' if frac is None else f'{tflops:.3f}'} | "
                  f"{'' if frac is None else f'{frac:.2f}'} |")
    print("\n" + "\n".join(md))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
