"""Per-rank memory and load throughput at real-ish size: a generated native
checkpoint of at least 2 GB (random weights; a Qwen3-MoE-shaped model:
per-head q/k norms, GQA, 64 fine-grained experts, top-8) resumed at 1
process, EP2, EP4 and TP2xEP2 under each optimizer sharding mode, and
trained there under each sharding and recompute mode.

For each run and rank it prints the peak resident memory (the kernel's
ru_maxrss of the process) minus the process baseline (the same binary
loading a 2-layer model), divided by the bytes the rank owns (its
parameters and optimizer state, from `moeyard plan`), and the planner's
load peak; for training runs the step's peak against the planner's. Load
throughput: moeyard's piece reader on rank 0 of the 1-process layout
against the `safetensors` Python package reading the same file in the same
run, interleaved round by round.

    python scripts/bench/bench_memory.py [--workdir /tmp/moeyard-bench-memory] [--out table.md]

Targets (docs/benchmarks.md): load peak <= 1.25 x owned + baseline;
steady state within 15% of the planner; load >= 0.8 x safetensors.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

MODEL = """
model: {vocab_size: 32000, hidden_size: 1024, num_layers: 6, num_heads: 16, num_kv_heads: 4, head_dim: 64,
        ffn_size: 2048, max_seq_len: 256, qk_norm: head, tie_embeddings: true, dtype: float32}
moe: {num_experts: 64, ffn_size: 512, top_k: 8, capacity_factor: 0.0, switch_coeff: 0.001}
data: {train: TRAIN, valid: VALID, seq_len: 64}
optim: {lr: 1.0e-4, warmup: 0}
train: {steps: 1, micro_batch: 1, grad_accum: 1, eval_every: 0, threads: 1}
checkpoint: {dir: RUN, every: 0, keep_last: 2}
log: {every: 1}
"""

LAYOUTS = {"1": (1, []), "EP2": (2, ["parallel.expert_parallel=2"]), "EP4": (4, ["parallel.expert_parallel=4"]),
           "TP2xEP2": (4, ["parallel.tensor_parallel=2", "parallel.expert_parallel=2"])}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_peak(nproc, args, log):
    """Starts `moeyard args` as nproc ranks and stops them once rank 0 logs
    its memory after loading; returns rank 0's peak resident bytes then (the
    ranks are symmetric: the layout splits every dimension evenly)."""
    port = free_port()
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if nproc == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k)
        procs.append(subprocess.Popen([EXE, *args], env=env, stdout=open(f"{log}.rank{r}", "w"),
                                      stderr=subprocess.STDOUT))
    pattern = re.compile(r"memory: this rank holds ([\d.]+) MB of parameters and ([\d.]+) MB of optimizer "
                         r"state; resident ([\d.]+) MB, peak ([\d.]+) MB")
    while True:
        text = open(f"{log}.rank0").read()
        m = pattern.search(text)
        if m or procs[0].poll() is not None:
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
        p.wait()
    if not m:
        sys.exit(f"rank 0 ended before loading: {text[-2000:]}")
    # The rate of the largest read (the model's tensors; the optimizer state
    # and small files log their own lines).
    reads = re.findall(r"loading \S+: ([\d.]+) of [\d.]+ MB this rank owns \(([\d.]+) MB/s\)", text)
    rate = max(reads, key=lambda r: float(r[0]))[1] if reads else None
    return float(m.group(4)) * 1e6, (float(rate) if rate else None)


def launch(nproc, args, log):
    """Runs `moeyard args` as nproc ranks; returns each rank's (exit code,
    peak RSS in bytes) from wait4, and rank 0's output."""
    port = free_port()
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if nproc == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k)
        err = open(f"{log}.rank{r}", "w")
        procs.append((subprocess.Popen([EXE, *args], env=env, stdout=err, stderr=subprocess.STDOUT), err))
    out = []
    for p, err in procs:
        _, status, usage = os.wait4(p.pid, 0)
        err.close()
        out.append((os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024))
    for r, (code, _) in enumerate(out):
        if code != 0:
            sys.exit(f"rank {r} failed ({code}): {open(f'{log}.rank{r}').read()[-2000:]}")
    return out, open(f"{log}.rank0").read()


def plan(cfg, nproc, sets):
    args = [EXE, "plan", "--config", cfg, "--world", str(nproc), "--json"]
    for s in sets:
        args += ["--set", s]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def sets_of(items):
    return [a for s in items for a in ("--set", s)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/moeyard-bench-memory")
    ap.add_argument("--layouts", default="1,EP2,EP4,TP2xEP2")
    ap.add_argument("--shards", default="none,optimizer,optimizer+grads")
    ap.add_argument("--rounds", type=int, default=5, help="load-throughput rounds")
    ap.add_argument("--train-layouts", default="1,EP2,EP4,TP2xEP2", help="layouts of the training runs (step peak)")
    ap.add_argument("--recompute", default="moe,attention,full",
                    help="recompute modes of the training runs besides none (with optim.shard none)")
    ap.add_argument("--train-sets", default="data.seq_len=256,train.micro_batch=2,train.steps=3",
                    help="settings of the training runs (activations large enough to see recompute)")
    ap.add_argument("--throughput-only", action="store_true", help="only the load-throughput rounds")
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--num-layers", type=int, default=6,
                    help="layers of the generated model (6: a 2.61 GB checkpoint; fewer where the ranks of a "
                         "layout would not fit in memory together)")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    data = os.path.join(ROOT, "data", "builtin")
    if not os.path.exists(os.path.join(data, "train.bin")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--builtin", "--out", data,
                        "--max-bytes", "20000000"], check=True)
    run = os.path.join(a.workdir, "run")
    cfg = os.path.join(a.workdir, "model.yaml")
    with open(cfg, "w") as f:
        f.write(MODEL.replace("TRAIN", os.path.join(data, "train.bin")).replace("VALID", os.path.join(data, "valid.bin"))
                .replace("RUN", run).replace("num_layers: 6", f"num_layers: {a.num_layers}"))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    # The checkpoint: one step at EP4 with the sharded optimizer (each rank
    # holds a quarter of the experts), then resumed everywhere.
    step = os.path.join(run, "step_1")
    if not os.path.exists(os.path.join(step, "manifest.json")):
        print("[bench] writing the checkpoint (1 step at EP4) ...", flush=True)
        launch(4, ["train", "--config", cfg, "--overwrite", *sets_of(["parallel.expert_parallel=4",
                                                                       "optim.shard=optimizer+grads"])],
               os.path.join(a.workdir, "make"))
    model_bytes = sum(os.path.getsize(os.path.join(step, f)) for f in os.listdir(step) if f.startswith("model"))
    say(f"checkpoint: {model_bytes / 1e9:.2f} GB of model tensors (float32), optimizer state beside it")

    # Baseline: the same binary resuming a 2-layer, 64-wide model.
    tiny_run = os.path.join(a.workdir, "tiny")
    tiny = os.path.join(a.workdir, "tiny.yaml")
    with open(tiny, "w") as f:
        f.write(open(cfg).read().replace("hidden_size: 1024", "hidden_size: 64")
                .replace(f"num_layers: {a.num_layers}", "num_layers: 2").replace("vocab_size: 32000", "vocab_size: 256").replace("num_experts: 64", "num_experts: 8")
                .replace("head_dim: 64", "head_dim: 16").replace("top_k: 8", "top_k: 2").replace(run, tiny_run))
    launch(1, ["train", "--config", tiny, "--overwrite"], os.path.join(a.workdir, "tiny"))
    base = load_peak(1, ["train", "--config", tiny, "--resume", "auto"], os.path.join(a.workdir, "tiny2"))[0]
    say(f"process baseline (peak RSS resuming a tiny model): {base / 1e6:.0f} MB")
    if a.throughput_only:
        a.layouts, a.train_layouts = "", ""
    say()
    say("| layout | optim.shard | owned per rank (GB) | load peak RSS - baseline (GB) | / owned | "
        "planner load peak (GB) | load rate (MB/s) |")
    say("|---|---|---:|---:|---:|---:|---:|")
    for name in filter(None, a.layouts.split(",")):
        nproc, layout_sets = LAYOUTS[name]
        for shard in a.shards.split(","):
            sets = layout_sets + [f"optim.shard={shard}"]
            p = plan(cfg, nproc, sets)
            peak, rate = load_peak(nproc, ["train", "--config", cfg, "--resume", step, "--overwrite",
                                           *sets_of(sets)], os.path.join(a.workdir, f"load-{name}-{shard}"))
            rp = p["ranks"][0]
            owned = rp["params"] + rp["optimizer"]
            say(f"| {name} | {shard} | {owned / 1e9:.3f} | {(peak - base) / 1e9:.3f} | "
                f"{(peak - base) / owned:.2f} | {rp['load_peak'] / 1e9:.3f} | {f'{rate:.0f}' if rate else '-'} |")
    say()
    say("| layout | optim.shard | train.recompute | rank | planner step peak (GB) | peak RSS - baseline (GB) | "
        "measured / planner |")
    say("|---|---|---|---:|---:|---:|---:|")
    runs = [(shard, "none") for shard in a.shards.split(",")] + \
        [("none", mode) for mode in filter(None, a.recompute.split(","))]
    for name in filter(None, a.train_layouts.split(",")):
        nproc, layout_sets = LAYOUTS[name]
        for shard, mode in runs:
            sets = layout_sets + [f"optim.shard={shard}", f"train.recompute={mode}", *a.train_sets.split(",")]
            p = plan(cfg, nproc, sets)
            ranks, _ = launch(nproc, ["train", "--config", cfg, "--resume", step, "--overwrite", "--allow-data-change",
                               *sets_of(sets)],
                              os.path.join(a.workdir, f"train-{name}-{shard}-{mode}"))
            for r, (_, peak) in enumerate(ranks):
                rp = next(x for x in p["ranks"] if r in x["ranks"])
                want = max(rp["step_peak"], rp["load_peak"])
                say(f"| {name} | {shard} | {mode} | {r} | {want / 1e9:.3f} | {(peak - base) / 1e9:.3f} | "
                    f"{(peak - base) / want:.2f} |")
    # Load throughput: moeyard's reader (rank 0's log line) against
    # safetensors.torch.load_file of the same model file, interleaved.
    # The memory bandwidth of a streaming read in the same rounds: a load
    # from the page cache copies each byte once.
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import limits

    stream, stream_bytes = limits.stream_probe()
    ours, theirs, bandwidth = [], [], []
    for _ in range(a.rounds):
        t = time.perf_counter()
        stream()
        bandwidth.append(stream_bytes / 1e6 / (time.perf_counter() - t))
        _, rate = load_peak(1, ["train", "--config", cfg, "--resume", step, "--overwrite"],
                            os.path.join(a.workdir, "tp"))
        if rate:
            ours.append(rate)
        t = time.perf_counter()
        # load_file maps the file: clone() reads the bytes, as moeyard does.
        tensors = {k: v.clone() for f in sorted(os.listdir(step)) if f.startswith("model")
                   for k, v in load_file(os.path.join(step, f)).items()}
        n = sum(v.numel() * v.element_size() for v in tensors.values())
        theirs.append(n / 1e6 / (time.perf_counter() - t))
        del tensors
    say()
    if ours:
        say(f"load throughput, median of {a.rounds} interleaved rounds: moeyard {statistics.median(ours):.0f} MB/s "
            f"(spread {min(ours):.0f}-{max(ours):.0f}), safetensors {statistics.median(theirs):.0f} MB/s "
            f"(spread {min(theirs):.0f}-{max(theirs):.0f}): {statistics.median(ours) / statistics.median(theirs):.2f}x; "
            f"{statistics.median(ours) / statistics.median(bandwidth):.2f} of the memory bandwidth "
            f"({statistics.median(bandwidth):.0f} MB/s, a streaming read in the same rounds)")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
