"""Activation recompute: bytes autograd keeps for backward and the time of one
forward + backward, per `train.recompute` mode, for the tiny model
(configs/model_tiny.yaml) and the mid-size one (configs/bench_mid.yaml's
model). Saved bytes: the distinct storages the saved-tensor hooks see during
the forward, parameters excluded (they are kept anyway).

    source scripts/env.sh && python scripts/bench/bench_recompute.py [--reps 3]
"""

import argparse
import os
import statistics
import time

import torch
import yaml

import moeyard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("none", "moe", "attention", "full")


def models():
    with open(os.path.join(ROOT, "configs", "bench_mid.yaml")) as f:
        mid = yaml.safe_load(f)
    return [("tiny", os.path.join(ROOT, "configs", "model_tiny.yaml"), 8, 128),
            ("mid", dict(mid["model"], moe=mid["moe"]), 2, 512)]


def measure(model, tokens, reps):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = model.loss(tokens)
    r["loss"].backward()
    times = []
    for _ in range(reps):
        model.zero_grad()
        t0 = time.perf_counter()
        model.loss(tokens)["loss"].backward()
        times.append(time.perf_counter() - t0)
    return sum(storages.values()), statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print("| model | batch | mode | saved for backward | vs none | forward + backward | vs none |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg, batch, seq in models():
        torch.manual_seed(0)
        m = moeyard.Transformer(cfg)
        m.train()
        tokens = torch.randint(0, 256, (batch, seq))
        base = None
        for mode in MODES:
            m.set_recompute(mode)
            saved, secs = measure(m, tokens, a.reps)
            base = base or (saved, secs)
            print(f"| {name} | {batch}x{seq} | `{mode}` | {saved / 2**20:.1f} MiB | {saved / base[0]:.2f} | "
                  f"{secs * 1e3:.0f} ms | {secs / base[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
