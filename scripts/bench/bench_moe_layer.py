#!/usr/bin/env python3
"""One MoE layer against its peers and against the machine's limits.

    python scripts/bench/bench_moe_layer.py [--device cpu|cuda] [--dtype float32 bfloat16]
                                            [--rounds 5] [--quick] [--cases all|decode|train] [--profile]
                                            [--out table.md]

Configurations: coarse H=1024 F=2048 E=8 K=2 and fine-grained H=1024 F=512
E=64 K=8, forward+backward at T=4096 tokens, and decode-like T=32 forward.
Implementations, all on the same weights (and the loop baselines on the same
routing), run interleaved round by round (scripts/bench/limits.py):
  transformers <impl>  transformers' Mixtral (E=8) or Qwen3-MoE (E=64) sparse
                       block with each experts implementation that runs here;
                       the fastest is the baseline
  naive loop           a per-expert Python loop (index_select, MLP, index_add)
  bound a              one dense GEMM chain with the same FLOPs (T x K*F)
  bound b              per-expert GEMMs on pre-permuted rows with the same
                       routing histogram (no routing work at all)
On CUDA, torch._grouped_mm on pre-permuted rows is one more.
Each table prints the median, the spread (max - min) of the rounds, the
ratio to the baseline (> 1: faster) and the fraction of the limit measured
in the same rounds: forward+backward, expert FLOPs / (time x the rate of a
torch.mm of one expert's share of rows); decode, the bytes of the experts
the tokens hit (plus the router) / (time x the bandwidth of a streaming
read). Also router_topk against the unfused ATen sequence, and permute /
unpermute at the memory bandwidth against ATen's index_select / index_add.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import moeyard  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402


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


def profile_layer(call, work, rate, unit, reps=3):
    """What bounds moeyard's layer: the torch profiler's time per op over
    `reps` calls, the expert GEMMs' share of the layer's time, and their
    rate (`work` per call, FLOPs or bytes) against the limit's `rate`
    (the layer's fraction of the limit = share x that)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            call()
    ev = prof.key_averages()
    gemm_ops = ("moeyard::grouped_mm", "moeyard::grouped_mm_backward")
    total = sum(e.self_cpu_time_total for e in ev)
    gemm = sum(e.cpu_time_total for e in ev if e.key in gemm_ops)
    print(f"  profile of moeyard ({reps} calls): expert GEMMs (grouped_mm, grouped_mm_backward) "
          f"{gemm / total:.2f} of the time, at {work * reps / (gemm * 1e-6) / rate:.2f} of the limit's "
          f"{unit}; the rest by op (self time):")
    rest = sorted((e for e in ev if e.key not in gemm_ops and e.self_cpu_time_total > 0.01 * total),
                  key=lambda e: -e.self_cpu_time_total)
    for e in rest[:8]:
        print(f"    {e.key:40s} {e.self_cpu_time_total / total:.3f}")


def run_case(T, H, F_, E, K, dtype, device, backward, rounds, table, profile=False):
    torch.manual_seed(0)
    moe = moeyard.MoE(H, F_, E, K, dtype=dtype, device=device)
    x = torch.randn(T, H, dtype=dtype, device=device)
    g = torch.randn(T, H, dtype=dtype, device=device)
    grad_ctx = torch.enable_grad if backward else torch.no_grad

    def step(fn):
        def call():
            with grad_ctx():
                # A training step's first micro-batch: the weights' gradients
                # are new tensors, not added to the last call's.
                moe.zero_grad(set_to_none=True)
                for b in hf_blocks:
                    b.zero_grad(set_to_none=True)
                xx = x.clone().requires_grad_(backward)
                y = fn(xx)
                if backward:
                    y.backward(g)
        return call

    fns = {"moeyard": step(lambda xx: moe(xx)[0])}
    # transformers' block with each experts implementation that runs here
    # (batched_mm is left out: it gathers a weight matrix per token, tens of GiB)
    hf_names, hf_blocks = [], []
    for impl in ["grouped_mm", "eager"]:
        try:
            blk = hf_block(E, H, F_, K, impl, dtype, device, moe)
            hf_blocks.append(blk)

            def hf(xx, blk=blk):
                out = blk(xx.view(1, T, H))
                return (out[0] if isinstance(out, tuple) else out).view(T, H)
            step(hf)()
            fns[f"transformers {impl}"] = step(hf)
            hf_names.append(f"transformers {impl}")
        except Exception as e:  # an implementation that cannot run here
            print(f"  (transformers experts '{impl}' skipped: {type(e).__name__}: {str(e)[:60]})")

    with torch.no_grad():  # the routing of the loop baselines
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
    fns["naive loop"] = step(naive)

    w1 = (torch.randn(H, K * 2 * F_, dtype=dtype, device=device) * 0.01).requires_grad_(backward)
    w2 = (torch.randn(K * F_, H, dtype=dtype, device=device) * 0.01).requires_grad_(backward)

    def bound_a(xx):
        w1.grad = w2.grad = None
        h = xx @ w1
        return (F.silu(h[:, : K * F_]) * h[:, K * F_:]) @ w2
    fns["bound a (dense, same FLOPs)"] = step(bound_a)

    rows = torch.randn(T * K, H, dtype=dtype, device=device)
    # separate leaf weights per expert: indexing one 3-D tensor per expert
    # would make autograd build a full-size gradient for every expert
    wg = [moe.w_gate_up[e].detach().clone().requires_grad_(backward) for e in range(E)]
    wd = [moe.w_down[e].detach().clone().requires_grad_(backward) for e in range(E)]
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)

    def bound_b():
        with grad_ctx():
            for t in wg + wd:
                t.grad = None
            r = rows.clone().requires_grad_(backward)
            outs = []
            for e in range(E):
                h = r[offs[e]:offs[e + 1]] @ wg[e].T
                outs.append((F.silu(h[:, :F_]) * h[:, F_:]) @ wd[e].T)
            y = torch.cat(outs)
            if backward:
                y.backward(torch.ones_like(y))
    fns["bound b (per-expert GEMMs)"] = bound_b

    if device == "cuda" and hasattr(torch, "_grouped_mm"):
        offs_t = torch.tensor(offs[1:], dtype=torch.int32, device=device)

        def grouped():
            with grad_ctx():
                moe.zero_grad(set_to_none=True)
                r = rows.clone().requires_grad_(backward)
                h = torch._grouped_mm(r, moe.w_gate_up.transpose(1, 2), offs=offs_t)
                y = torch._grouped_mm(F.silu(h[:, :F_]) * h[:, F_:], moe.w_down.transpose(1, 2), offs=offs_t)
                if backward:
                    y.backward(torch.ones_like(y))
        try:
            grouped()
            fns["torch._grouped_mm"] = grouped
        except Exception as e:  # noqa: BLE001
            print(f"  (torch._grouped_mm skipped: {e})")

    # The limits, in the same rounds: the rate of an expert-sized GEMM
    # (compute-bound cases), a streaming read (decode).
    rows_per_expert = max(1, T * K // E)
    gemm, gemm_flops = limits.gemm_probe(rows_per_expert, H, 2 * F_, dtype, device)
    fns["limit: expert-sized GEMM"] = gemm
    stream, stream_bytes = limits.stream_probe(device=device)
    fns["limit: streaming read"] = stream

    times = limits.interleaved(fns, rounds, device)
    gemm_rate = gemm_flops / limits.median(times.pop("limit: expert-sized GEMM"))
    bandwidth = stream_bytes / limits.median(times.pop("limit: streaming read"))
    # What the roofline counts: expert FLOPs (forward 2 T K H 3F; backward
    # twice that), or for decode the bytes of the experts actually read.
    flops = (3 if backward else 1) * 2 * T * K * H * 3 * F_
    hit = sum(1 for c in counts if c > 0)
    expert_bytes = hit * 3 * H * F_ * moe.w_down.element_size() + E * H * 4
    baseline = min(hf_names, key=lambda n: limits.median(times[n])) if hf_names else "naive loop"

    name = f"T={T} H={H} F={F_} E={E} K={K} {str(dtype).replace('torch.', '')} {'fwd+bwd' if backward else 'fwd'}"
    limit = (f"expert-sized GEMM [{rows_per_expert}x{H}]x[{H}x{2 * F_}] {gemm_rate / 1e9:.1f} GFLOP/s"
             if backward else f"streaming read {bandwidth / 1e9:.1f} GB/s")
    print(f"\n{name}: {rounds} interleaved rounds; baseline {baseline}; limit in this run: {limit}")
    print("| implementation | median (ms) | spread (ms) | vs baseline | of the limit |")
    print("|---|---:|---:|---:|---:|")
    rows_out = []
    for impl, v in times.items():
        med = limits.median(v)
        frac = flops / (med * gemm_rate) if backward else expert_bytes / (med * bandwidth)
        rows_out.append((impl, med, limits.spread(v), limits.median(times[baseline]) / med, frac))
        print(f"| {impl} | {med * 1e3:.2f} | {limits.spread(v) * 1e3:.2f} | {rows_out[-1][3]:.2f}x | {frac:.2f} |")
    table.append((name, baseline, limit, rows_out))
    if profile and device == "cpu":
        if backward:
            profile_layer(fns["moeyard"], flops, gemm_rate, "GEMM rate")
        else:  # the experts' weight bytes, without the router's
            profile_layer(fns["moeyard"], expert_bytes - E * H * 4, bandwidth, "bandwidth")


def bench_router(T, E, K, device, rounds, table):
    logits = torch.randn(T, E, device=device)

    def unfused():
        s = logits.softmax(-1)
        w, i = s.topk(K, -1)
        w = torch.gather(s, 1, i)
        return w / w.sum(-1, keepdim=True), i, s
    times = limits.interleaved({"moeyard router_topk": lambda: moeyard.ops.router_topk(logits, K),
                                "ATen softmax+topk+gather+renorm": unfused}, rounds, device)
    base = limits.median(times["ATen softmax+topk+gather+renorm"])
    rows_out = [(k, limits.median(v), limits.spread(v), base / limits.median(v), None) for k, v in times.items()]
    name = f"router_topk T={T} E={E} K={K}"
    print(f"\n{name}: " + ", ".join(f"{k} {m * 1e3:.3f} ms (x{r:.2f})" for k, m, _, r, _ in rows_out))
    table.append((name, "ATen softmax+topk+gather+renorm", "", rows_out))


def bench_dispatch_ops(T, H, E, K, dtype, device, rounds, table):
    """permute and unpermute (forward) at the memory bandwidth: the bytes
    each must move (rows read and written, indices and weights) / (time x a
    streaming read's bandwidth), against ATen's index_select and a
    weighted index_add doing the same."""
    x = torch.randn(T, H, dtype=dtype, device=device)
    w, idx, _ = moeyard.ops.router_topk(torch.randn(T, E, device=device), K)
    row_token, slot, _, _ = moeyard.ops.route_plan(idx, w, E)
    rows = moeyard.ops.permute(x, row_token)
    token_of_slot = torch.arange(T, device=device).repeat_interleave(K)
    order = slot.flatten()
    stream, stream_bytes = limits.stream_probe(device=device)
    times = limits.interleaved({
        "moeyard permute": lambda: moeyard.ops.permute(x, row_token),
        "ATen index_select": lambda: x.index_select(0, row_token.clamp_min(0)),
        "moeyard unpermute": lambda: moeyard.ops.unpermute(rows, slot, w),
        "ATen weighted index_add": lambda: torch.zeros_like(x).index_add_(
            0, token_of_slot, rows[order] * w.flatten()[:, None].to(dtype)),
        "limit: streaming read": stream}, rounds, device)
    bandwidth = stream_bytes / limits.median(times.pop("limit: streaming read"))
    kind = {"moeyard permute": "permute", "ATen index_select": "permute",
            "moeyard unpermute": "unpermute", "ATen weighted index_add": "unpermute"}
    n, b = T * K, x.element_size()
    moved = {"permute": (T + n) * H * b + n * 8, "unpermute": (n + T) * H * b + n * (8 + 4)}
    name = f"permute/unpermute T={T} H={H} K={K} {str(dtype).replace('torch.', '')}"
    print(f"\n{name}: {rounds} interleaved rounds; streaming read {bandwidth / 1e9:.1f} GB/s")
    print("| implementation | median (ms) | spread (ms) | of the bandwidth |")
    print("|---|---:|---:|---:|")
    rows_out = []
    for impl, v in times.items():
        med = limits.median(v)
        frac = moved[kind[impl]] / (med * bandwidth)
        print(f"| {impl} | {med * 1e3:.3f} | {limits.spread(v) * 1e3:.3f} | {frac:.2f} |")
        rows_out.append((impl, med, limits.spread(v), 1.0, frac))
    table.append((name, "", f"streaming read {bandwidth / 1e9:.1f} GB/s", rows_out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="T=512 and 2 rounds: a smoke run")
    ap.add_argument("--out", help="also write a markdown table here")
    ap.add_argument("--cases", choices=["all", "decode", "train"], default="all",
                    help="decode: the T=32 forward cases and router_topk; train: the forward+backward cases "
                         "(bfloat16 baselines on CPUs without bf16 GEMM units take minutes per round)")
    ap.add_argument("--profile", action="store_true",
                    help="after each case, profile moeyard's layer: the expert GEMMs' share of its time "
                         "and their rate (of the GEMM rate or the bandwidth), the rest by op")
    a = ap.parse_args()
    T = 512 if a.quick else 4096
    rounds = 2 if a.quick else a.rounds
    print(f"moeyard {moeyard.__version__}, torch {torch.__version__}, device {a.device}, "
          f"threads {torch.get_num_threads()}")
    table = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        for (H, F_, E, K) in [(1024, 2048, 8, 2), (1024, 512, 64, 8)]:
            if a.cases in ("all", "train"):
                run_case(T, H, F_, E, K, dtype, a.device, True, rounds, table, a.profile)
            if a.cases in ("all", "decode"):
                run_case(32, H, F_, E, K, dtype, a.device, False, max(rounds, 9), table, a.profile)
    if a.cases in ("all", "decode"):
        for (E, K) in [(8, 2), (64, 8)]:
            bench_router(T, E, K, a.device, max(rounds, 9), table)
        for dt in a.dtype:
            bench_dispatch_ops(T, 1024, 64, 8, getattr(torch, dt), a.device, max(rounds, 9), table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"torch {torch.__version__}, device {a.device}, {torch.get_num_threads()} threads\n\n")
            f.write("| case | implementation | median (ms) | spread (ms) | vs baseline | of the limit |\n"
                    "|---|---|---:|---:|---:|---:|\n")
            for name, baseline, limit, rows_out in table:
                for impl, med, spr, ratio, frac in rows_out:
                    f.write(f"| {name} | {impl} | {med * 1e3:.2f} | {spr * 1e3:.2f} | {ratio:.2f}x | "
                            f"{'' if frac is None else f'{frac:.2f}'} |\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
