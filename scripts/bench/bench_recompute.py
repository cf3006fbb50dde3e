"""Activation recompute: bytes autograd keeps for backward and the time of one
forward + backward, per `train.recompute` mode, for the tiny model
(configs/model_tiny.yaml) and the mid-size one (configs/bench_mid.yaml's
model). Saved bytes: the distinct storages the saved-tensor hooks see during
the forward, parameters excluded (they are kept anyway). Times: the modes
interleaved round by round (scripts/bench/limits.py: medians, spreads),
with a GEMM of the model's expert shape in the same rounds; "of the GEMM
rate" = the step's matrix FLOPs (6 x active matrix parameters x tokens,
without recomputation's extra forward) / (time x that GEMM's rate).

    source scripts/env.sh && python scripts/bench/bench_recompute.py [--rounds 5]
"""

import argparse
import os
import sys

import torch
import yaml

import moeyard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402
MODES = ("none", "moe", "attention", "full")


def models():
    with open(os.path.join(ROOT, "configs", "bench_mid.yaml")) as f:
        mid = yaml.safe_load(f)
    with open(os.path.join(ROOT, "configs", "model_tiny.yaml")) as f:
        tiny = yaml.safe_load(f)
    return [("tiny", tiny, 8, 128),
            ("mid", dict(mid["model"], moe=mid["moe"]), 2, 512)]


def saved_bytes(model, tokens):
    """Bytes of the distinct storages autograd saves in one forward."""
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
    model.zero_grad()
    return sum(storages.values())


def matrix_flops(model, cfg, tokens):
    """6 x the active matrix parameters x tokens: every 2-D weight, the
    experts' at top_k / num_experts."""
    moe = cfg["moe"]
    share = moe.get("top_k", 2) / moe.get("num_experts", 8)
    n = 0.0
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name:
            n += p.numel() * (share if p.dim() == 3 else 1.0)
    return 6.0 * n * tokens.numel()


def expert_gemm(model, cfg, tokens):
    """A torch.mm of one expert's share of the rows x H x F: the GEMM rate
    this model's products can reach here."""
    moe = cfg["moe"]
    H = cfg["hidden_size"]
    F = moe.get("ffn_size") or cfg.get("ffn_size", 512)
    rows = max(1, tokens.numel() * moe.get("top_k", 2) // moe.get("num_experts", 8))
    return limits.gemm_probe(rows, H, F)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after one warm-up round)")
    a = ap.parse_args()
    print("| model | batch | mode | saved for backward | vs none | forward + backward | spread | vs none | "
          "of the GEMM rate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg, batch, seq in models():
        torch.manual_seed(0)
        m = moeyard.Transformer(cfg)
        m.train()
        tokens = torch.randint(0, 256, (batch, seq))
        saved = {}
        for mode in MODES:
            m.set_recompute(mode)
            saved[mode] = saved_bytes(m, tokens)

        def step(mode):
            def run():
                m.set_recompute(mode)
                m.zero_grad(set_to_none=True)
                m.loss(tokens)["loss"].backward()
            return run

        fns = {mode: step(mode) for mode in MODES}
        gemm, gemm_flops = expert_gemm(m, cfg, tokens)
        fns["gemm"] = gemm
        times = limits.interleaved(fns, a.rounds)
        rate = gemm_flops / limits.median(times.pop("gemm"))
        flops = matrix_flops(m, cfg, tokens)
        base_t = limits.median(times["none"])
        for mode in MODES:
            t = limits.median(times[mode])
            print(f"| {name} | {batch}x{seq} | `{mode}` | {saved[mode] / 2**20:.1f} MiB | "
                  f"{saved[mode] / saved['none']:.2f} | {t * 1e3:.0f} ms | {limits.spread(times[mode]) * 1e3:.0f} ms | "
                  f"{t / base_t:.2f} | {flops / t / rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
