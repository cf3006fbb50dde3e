#!/usr/bin/env python3
"""Benchmark one MoE layer (forward + backward) against baselines, same run.

    python scripts/bench/bench_moe_layer.py [--device cpu|cuda] [--dtype float32 bfloat16]
                                            [--quick] [--reps N] [--cases all|decode]
                                            [--out docs/bench_moe_layer.md]

Configurations (issue 2): coarse T=4096 H=1024 F=2048 E=8 K=2 and fine-grained
T=4096 H=1024 F=512 E=64 K=8, forward+backward; a decode-like T=32 forward
only for both. Baselines, all on the same routing and weights:
  hf_best / hf_eager  transformers' Mixtral (E=8) or Qwen3-MoE (E=64) sparse
                      block with its best experts implementation (fastest of
                      the ones that run here) and with "eager"
  naive               a per-expert Python loop (index_select, MLP, index_add)
  bound_a             one dense GEMM chain with the same FLOPs (T x K*F)
  bound_b             per-expert GEMMs on pre-permuted rows with the same
                      routing histogram (no routing work at all)
On CUDA, torch._grouped_mm on pre-permuted rows is one more baseline.
Also router_topk against the unfused ATen sequence (softmax, topk, gather,
renormalize). Ratios > 1 mean moeyard is faster. Medians of --reps runs after
one warm-up.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import moeyard  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps, device):
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def hf_block(E, H, F_, K, impl, dtype, device, moe):
    if E == 8:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=H, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True)
    cfg._experts_implementation = impl
    blk = Block(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # same weights as moeyard's layer
        blk.gate.weight.copy_(moe.router.weight)
        blk.experts.gate_up_proj.copy_(moe.w_gate_up)
        blk.experts.down_proj.copy_(moe.w_down)
    return blk


def run_case(T, H, F_, E, K, dtype, device, backward, reps, table):
    torch.manual_seed(0)
    moe = moeyard.MoE(H, F_, E, K, dtype=dtype, device=device)
    x = torch.randn(T, H, dtype=dtype, device=device)
    g = torch.randn(T, H, dtype=dtype, device=device)
    results = {}

    def step(fn):
        def call():
            xx = x.clone().requires_grad_(backward)
            y = fn(xx)
            if backward:
                y.backward(g)
        return call

    def ours(xx):
        return moe(xx)[0]

    grad_ctx = torch.enable_grad if backward else torch.no_grad
    with grad_ctx():
        results["moeyard"] = timeit(step(ours), reps, device)
        hf_times = {}
        # batched_mm is left out: it gathers a weight matrix per token (tens of GiB here)
        for impl in ["eager", "grouped_mm"]:
            try:
                blk = hf_block(E, H, F_, K, impl, dtype, device, moe)

                def hf(xx, blk=blk):
                    out = blk(xx.view(1, T, H))
                    return (out[0] if isinstance(out, tuple) else out).view(T, H)
                hf_times[impl] = timeit(step(hf), reps, device)
            except Exception as e:  # an implementation that cannot run here
                print(f"  (transformers experts '{impl}' skipped: {type(e).__name__}: {str(e)[:60]})")
        if hf_times:
            best = min(hf_times, key=hf_times.get)
            results[f"hf_best ({best})"] = hf_times[best]
        if "eager" in hf_times:
            results["hf_eager"] = hf_times["eager"]

        # routing shared by the loop baselines
        with torch.no_grad():
            w, idx, _ = moeyard.ops.router_topk(x.float() @ moe.router.weight.T, K)
        counts = torch.bincount(idx.flatten(), minlength=E).tolist()

        def naive(xx):
            logits = xx.float() @ moe.router.weight.T
            ww, ii = logits.softmax(-1).topk(K, -1)
            ww = ww / ww.sum(-1, keepdim=True)
            out = torch.zeros_like(xx)
            for e in range(E):
                tok, slot = torch.where(ii == e)
                if tok.numel() == 0:
                    continue
                h = xx[tok] @ moe.w_gate_up[e].T
                a = F.silu(h[:, :F_]) * h[:, F_:]
                out = out.index_add(0, tok, (a @ moe.w_down[e].T) * ww[tok, slot, None].to(xx.dtype))
            return out
        results["naive loop"] = timeit(step(naive), reps, device)

        w1 = (torch.randn(H, K * 2 * F_, dtype=dtype, device=device) * 0.01).requires_grad_(backward)
        w2 = (torch.randn(K * F_, H, dtype=dtype, device=device) * 0.01).requires_grad_(backward)

        def bound_a(xx):
            h = xx @ w1
            return (F.silu(h[:, : K * F_]) * h[:, K * F_:]) @ w2
        results["bound a (dense)"] = timeit(step(bound_a), reps, device)

        rows = torch.randn(T * K, H, dtype=dtype, device=device)
        # separate leaf weights per expert: indexing one 3-D tensor per expert
        # would make autograd build a full-size gradient for every expert
        wg = [moe.w_gate_up[e].detach().clone().requires_grad_(backward) for e in range(E)]
        wd = [moe.w_down[e].detach().clone().requires_grad_(backward) for e in range(E)]
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)

        def bound_b_call():
            r = rows.clone().requires_grad_(backward)
            outs = []
            for e in range(E):
                h = r[offs[e]:offs[e + 1]] @ wg[e].T
                outs.append((F.silu(h[:, :F_]) * h[:, F_:]) @ wd[e].T)
            y = torch.cat(outs)
            if backward:
                y.backward(torch.ones_like(y))
        results["bound b (per-expert GEMMs)"] = timeit(bound_b_call, reps, device)

        if device == "cuda" and hasattr(torch, "_grouped_mm"):
            offs_t = torch.tensor(offs[1:], dtype=torch.int32, device=device)

            def grouped_call():
                r = rows.clone().requires_grad_(backward)
                h = torch._grouped_mm(r, moe.w_gate_up.transpose(1, 2), offs=offs_t)
                y = torch._grouped_mm(F.silu(h[:, :F_]) * h[:, F_:], moe.w_down.transpose(1, 2), offs=offs_t)
                if backward:
                    y.backward(torch.ones_like(y))
            try:
                results["torch._grouped_mm"] = timeit(grouped_call, reps, device)
            except Exception as e:
                print(f"  (torch._grouped_mm skipped: {e})")

    name = f"T={T} H={H} F={F_} E={E} K={K} {str(dtype).replace('torch.', '')} {'fwd+bwd' if backward else 'fwd'}"
    ours_t = results["moeyard"]
    print(f"\n{name}")
    for k, v in results.items():
        print(f"  {k:28s} {v * 1000:10.1f} ms   moeyard speed-up x{v / ours_t:5.2f}")
    bb = results["bound b (per-expert GEMMs)"]
    overhead = (ours_t - bb) / ours_t
    print(f"  routing overhead (moeyard - bound b) / moeyard: {100 * overhead:.1f}%")
    table.append((name, results, overhead))


def bench_router(T, E, K, device, reps, table):
    logits = torch.randn(T, E, device=device)

    def fused():
        moeyard.ops.router_topk(logits, K)

    def unfused():
        s = logits.softmax(-1)
        w, i = s.topk(K, -1)
        w = torch.gather(s, 1, i)
        return w / w.sum(-1, keepdim=True), i, s
    a, b = timeit(fused, reps, device), timeit(unfused, reps, device)
    print(f"router_topk T={T} E={E} K={K}: fused {a * 1e3:.3f} ms, ATen sequence {b * 1e3:.3f} ms, x{b / a:.2f}")
    table.append((f"router_topk T={T} E={E} K={K}", {"moeyard": a, "ATen softmax+topk+gather+renorm": b}, None))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="T=512 and 1 rep: a smoke run")
    ap.add_argument("--out", help="also write a markdown table here")
    ap.add_argument("--cases", choices=["all", "decode"], default="all",
                    help="decode: only the T=32 forward cases and router_topk (bfloat16 baselines on CPUs "
                         "without bf16 GEMM units take ~13 min per T=4096 forward+backward)")
    a = ap.parse_args()
    T = 512 if a.quick else 4096
    reps = 1 if a.quick else a.reps
    print(f"moeyard {moeyard.__version__}, torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    table = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        for (H, F_, E, K) in [(1024, 2048, 8, 2), (1024, 512, 64, 8)]:
            if a.cases == "all":
                run_case(T, H, F_, E, K, dtype, a.device, True, reps, table)
            run_case(32, H, F_, E, K, dtype, a.device, False, max(reps, 5), table)
    for (E, K) in [(8, 2), (64, 8)]:
        bench_router(T, E, K, a.device, max(reps, 10), table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"torch {torch.__version__}, device {a.device}, {torch.get_num_threads()} threads\n\n")
            f.write("| case | implementation | time (ms) | moeyard speed-up |\n|---|---|---:|---:|\n")
            for name, res, overhead in table:
                ours_t = res["moeyard"]
                for k, v in res.items():
                    f.write(f"| {name} | {k} | {v * 1000:.1f} | {v / ours_t:.2f}x |\n")
                if overhead is not None:
                    f.write(f"| {name} | routing overhead vs bound b | | {100 * overhead:.1f}% |\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
