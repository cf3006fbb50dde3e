#!/usr/bin/env python3
"""A transformers experts module run by its own implementations and by
moeyard's (moeyard.hf.patch_hf_model), forward + backward on the same
tokens, picks and weights; then the whole sparse MoE block (router
included): transformers' with its fastest experts implementation against
patch_hf_model(blocks=True). Implementations interleaved round by round.

    python scripts/bench/bench_hf_bridge.py [--rounds 7] [--tokens 2048]

Cases: Mixtral-like (8 experts of 2048, top-2, H=1024) and fine-grained
Qwen3-MoE-like (64 experts of 256, top-8, H=1024). Prints per
implementation the median time, its spread, the ratio to transformers'
eager loop (the baseline) and the expert GEMMs' FLOP rate as a fraction of
a torch.mm of one expert-sized GEMM measured in the same run.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
from moeyard import hf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402

CASES = {
    "mixtral (E=8, F=2048, top-2)": ("mixtral", dict(num_local_experts=8, intermediate_size=2048,
                                                     num_experts_per_tok=2)),
    "qwen3_moe (E=64, F=256, top-8)": ("qwen3_moe", dict(num_experts=64, moe_intermediate_size=256,
                                                         num_experts_per_tok=8)),
}


def experts_module(family, extra, hidden):
    import transformers

    cfg_cls = {"mixtral": transformers.MixtralConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[family]
    cfg = cfg_cls(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=256, **extra)
    model_cls = {"mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM}[family]
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    hf.patch_hf_model(model)  # registers moeyard; each round sets the implementation
    experts = next(m for m in model.modules() if hasattr(m, "is_concatenated"))
    return model, experts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    T, H = a.tokens, a.hidden
    print(f"{torch.get_num_threads()} threads, T={T} tokens, H={H}, float32, forward + backward of the experts "
          f"module; medians of {a.rounds} interleaved rounds (the first warms up)")
    for case, (family, extra) in CASES.items():
        model, experts = experts_module(family, extra, H)
        E, K = experts.num_experts, extra["num_experts_per_tok"]
        F = experts.down_proj.shape[-1]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, H, generator=g)
        logits = torch.randn(T, E, generator=g)
        w, idx = logits.softmax(-1).topk(K, -1)
        w = w / w.sum(-1, keepdim=True)
        impls = ["eager"]
        # transformers' grouped_mm where this torch runs it (batched_mm copies
        # every pair's expert weights: 64 GB here).
        for impl in ("grouped_mm",):
            try:
                model.set_experts_implementation(impl)
                experts(x[:8].clone().requires_grad_(True), idx[:8], w[:8]).sum().backward()
                impls.append(impl)
            except Exception as e:  # noqa: BLE001
                print(f"({impl}: not available here: {str(e).splitlines()[0][:100]})")
        impls.append("moeyard")
        def run(impl):
            def call():
                model.set_experts_implementation(impl)
                experts.zero_grad(set_to_none=True)
                experts(x.clone().requires_grad_(True), idx, w).square().mean().backward()
            return call

        fns = {impl: run(impl) for impl in impls}
        fns["gemm"], gemm_flops = limits.gemm_probe(T * K // E, H, 2 * F)
        times = limits.interleaved(fns, a.rounds)
        gemm_rate = gemm_flops / limits.median(times.pop("gemm"))
        flops = 3 * 2 * T * K * 3 * H * F  # 3 GEMMs (gate_up is 2F wide), forward + 2x backward
        base = limits.median(times["eager"])
        print(f"\n{case}: expert-sized GEMM (torch.mm [{T * K // E}x{H}] x [{H}x{2 * F}]) "
              f"{gemm_rate / 1e9:.1f} GFLOP/s in this run")
        print("| implementation | fwd+bwd (ms) | spread (ms) | vs eager | expert GFLOP/s | / GEMM rate |")
        print("|---|---:|---:|---:|---:|---:|")
        for impl in impls:
            med = limits.median(times[impl])
            print(f"| {impl} | {med * 1e3:.1f} | {limits.spread(times[impl]) * 1e3:.1f} | {base / med:.2f}x | "
                  f"{flops / med / 1e9:.1f} | {flops / med / gemm_rate:.2f} |")
        bench_blocks(model, impls[-2], x, a.rounds, flops, gemm_rate)


def bench_blocks(model, hf_impl, x, rounds, flops, gemm_rate):
    """The sparse block as transformers runs it (its router, experts by
    `hf_impl`) against moeyard's whole block on the same weights."""
    import copy

    model.set_experts_implementation(hf_impl)
    ours = hf.patch_hf_model(copy.deepcopy(model), blocks=True)
    blocks = {hf_impl: next(m for m in model.modules() if hasattr(m, "experts")),
              "moeyard blocks": next(m for m in ours.modules() if "moeyard_moe" in m.__dict__)}
    def run(block):
        def call():
            block.zero_grad(set_to_none=True)
            y = block(x[None].clone().requires_grad_(True))
            (y[0] if isinstance(y, tuple) else y).square().mean().backward()
        return call

    times = limits.interleaved({name: run(block) for name, block in blocks.items()}, rounds)
    base = limits.median(times[hf_impl])
    print(f"\nthe whole block (router included), baseline transformers with {hf_impl}:")
    print("| implementation | fwd+bwd (ms) | spread (ms) | vs baseline | expert FLOPs / GEMM rate |")
    print("|---|---:|---:|---:|---:|")
    for name, v in times.items():
        med = limits.median(v)
        print(f"| {name} | {med * 1e3:.1f} | {limits.spread(v) * 1e3:.1f} | {base / med:.2f}x | "
              f"{flops / med / gemm_rate:.2f} |")


if __name__ == "__main__":
    main()
