"""The smallest layout that fits, per model and cluster, from `moeyard plan`.

For each model config in configs/plan/ and each cluster (GPUs x GB), tries
layouts from the least model parallelism up (tensor_parallel x
expert_parallel, then optimizer sharding, then recompute) and prints a
markdown table of the first whose every rank's training-step peak and load
peak fit in the GPU's memory less a margin for the allocator.

    python scripts/plan_table.py [--clusters 8x80,64x80] [--margin 0.9] [--set train.micro_batch=1 ...]
"""

import argparse
import glob
import json
import os
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")
SHARDS = ["none", "optimizer", "optimizer+grads"]
RECOMPUTE = ["none", "moe", "attention", "full"]


def plan(config, world, sets):
    args = [EXE, "plan", "--config", config, "--world", str(world), "--json"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        return None  # a layout the config does not allow
    return json.loads(r.stdout)


def peaks(p, mode):
    # RankPlan::step_peak's sum, with the activations of `mode`.
    step = max(r["params"] + r["grads"] + r["optimizer"] + r["grad_buffer"] + r["logits"]
               + r["teacher"] + r["activations"][mode] for r in p["ranks"])
    load = max(r["load_peak"] for r in p["ranks"])
    return step, load


def experts_of(config):
    import re

    m = re.search(r"num_experts:\s*(\d+)", open(config).read())
    return int(m.group(1)) if m else 1


def smallest_fit(config, gpus, gb, margin, extra):
    limit = gb * 1e9 * margin
    E = experts_of(config)
    candidates = []
    for tp in (1, 2, 4, 8):
        if gpus % tp:
            continue
        dp = gpus // tp
        for ep in range(1, dp + 1):
            if dp % ep == 0 and E % ep == 0:
                candidates.append((tp * ep, tp, ep))
    for _, tp, ep in sorted(candidates):
        for shard in SHARDS:
            p = plan(config, gpus, [f"parallel.tensor_parallel={tp}", f"parallel.expert_parallel={ep}",
                                    f"optim.shard={shard}", *extra])
            if p is None:
                continue
            for mode in RECOMPUTE:
                step, load = peaks(p, mode)
                if max(step, load) <= limit:
                    return dict(tp=tp, ep=ep, dp=gpus // tp, shard=shard, recompute=mode, step=step, load=load,
                                params=p["total_params"])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", default="8x80,64x80")
    ap.add_argument("--margin", type=float, default=0.9, help="usable fraction of a GPU's memory")
    ap.add_argument("--set", action="append", default=[], help="override a key of every config")
    a = ap.parse_args()
    print("| model | parameters | GPUs | smallest layout that fits | optim.shard | recompute | "
          "step peak / GPU (GB) | load peak / GPU (GB) |")
    print("|---|---:|---|---|---|---|---:|---:|")
    for config in sorted(glob.glob(os.path.join(ROOT, "configs", "plan", "*.yaml"))):
        name = os.path.basename(config)[:-5]
        for cluster in a.clusters.split(","):
            gpus, gb = (int(x) for x in cluster.split("x"))
            fit = smallest_fit(config, gpus, gb, a.margin, a.set)
            if fit is None:
                p = plan(config, 1, a.set)
                n = p["total_params"] / 1e9 if p else float("nan")
                print(f"| {name} | {n:.1f}B | {gpus} x {gb} GB | does not fit | | | | |")
                continue
            print(f"| {name} | {fit['params'] / 1e9:.1f}B | {gpus} x {gb} GB | TP{fit['tp']} x EP{fit['ep']} "
                  f"(DP {fit['dp']}) | {fit['shard']} | {fit['recompute']} | {fit['step'] / 1e9:.1f} | "
                  f"{fit['load'] / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
