"""Expert-parallel dispatch on CPU processes: moeyard's all-to-all
dispatcher (counts, variable all-to-all, local re-permutation, experts, reverse
all-to-all) against the plain all-gather baseline (every rank gathers every
token, runs its own experts on the tokens routed to them, and a reduce of the
partial outputs returns each rank its tokens). Same layer, same routing, same
local expert kernels; prints time, bytes each rank sends and the ratio.

Both run interleaved round by round (scripts/bench/limits.py: medians and
spreads over the rounds of the slowest rank's time), with two probes in the
same rounds: an all-to-all of 64 MB per rank (the link's bandwidth here) and
a GEMM of one local expert's rows (the GEMM rate). "of the floor" = (bytes
sent / link bandwidth + the local experts' FLOPs / GEMM rate) / time.

    torchrun --nproc-per-node 2 scripts/bench/bench_dispatch.py [--rounds 5]
    (scripts/launch.sh cannot run Python scripts; call torchrun directly)
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

import moeyard  # noqa: F401
from moeyard import _C

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402

ops = torch.ops.moeyard


def local_experts_on(x, idx, w, lo, El, w_gu, w_dn):
    """Partial layer output of experts [lo, lo + El) for the tokens x."""
    local = torch.where((idx >= lo) & (idx < lo + El), idx - lo, torch.full_like(idx, -1))
    row_token, slot, offsets, _ = ops.route_plan(local, w, El, -1, "position")
    rows = ops.permute(x, row_token)
    h = ops.swiglu(ops.grouped_mm(rows, w_gu, offsets))
    return ops.unpermute(ops.grouped_mm(h, w_dn, offsets), slot, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after one warm-up round)")
    a = ap.parse_args()
    rank, world = _C._ep_init(300.0)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cases = [(1024, 512, 1024, 8 * world, 2), (2048, 1024, 512, 16 * world, 4)]
    link = torch.randn(16 << 20)  # 64 MB, all-to-all in equal parts
    link_out = torch.empty_like(link)
    if rank == 0:
        print(f"{world} processes (Gloo, loopback), 1 thread each, forward only; median (spread) of {a.rounds} "
              "interleaved rounds of the slowest rank's time")
        print("| T/rank | H | F | E | K | implementation | time (ms) | spread (ms) | sent per rank (MB) | "
              "moeyard speed-up | of the floor |")
        print("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for T, H, F, E, K in cases:
        g = torch.Generator().manual_seed(0)
        router = torch.randn(E, H, generator=g) * 0.1
        w_gu = torch.randn(E, 2 * F, H, generator=g) * 0.02
        w_dn = torch.randn(E, H, F, generator=g) * 0.02
        El = E // world
        lo = rank * El
        mine_gu, mine_dn = w_gu[lo:lo + El].contiguous(), w_dn[lo:lo + El].contiguous()
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(10 + rank))

        def ours():
            return _C._moe_forward_ep(x, router, mine_gu, mine_dn, top_k=K)[0]

        def baseline():
            xs = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(xs, x)
            X = torch.cat(xs)
            w, idx, _ = ops.router_topk(X @ router.t(), K)
            part = local_experts_on(X, idx, w, lo, El, mine_gu, mine_dn)
            out = torch.empty_like(x)
            dist.reduce_scatter_tensor(out, part) if hasattr(dist, "reduce_scatter_tensor") else None
            return out

        rows = T * K // El  # one local expert's rows (expected)
        gemm, gemm_flops = limits.gemm_probe(rows, H, 2 * F)

        def slowest(fn):  # every rank starts together and waits for the slowest
            def run():
                dist.barrier()
                fn()
                dist.barrier()
            return run

        fns = {"ours": slowest(ours), "baseline": slowest(baseline),
               "link": slowest(lambda: dist.all_to_all_single(link_out, link)), "gemm": gemm}
        with torch.no_grad():
            y_ours, y_base = ours(), baseline()
            err = (y_ours - y_base).abs().max().item()
            assert err < 1e-3, f"rank {rank}: outputs differ by {err}"
            times = limits.interleaved(fns, a.rounds)
        med = {k: limits.median(v) for k, v in times.items()}
        link_bw = link.numel() * 4 * (world - 1) / world / med["link"]  # bytes each rank sends / s
        rate = gemm_flops / med["gemm"]
        # Bytes this rank sends to others: the all-to-all sends the rows routed
        # to other ranks' experts and receives theirs back (expected
        # T*K*(world-1)/world rows each way); all-gather sends x to every
        # other rank, reduce-scatter sends (world-1)/world of the partial output.
        with torch.no_grad():
            _, idx, _ = ops.router_topk(x @ router.t(), K)
        remote = ((idx // El) != rank).sum().item()
        sent_ours = 2 * remote * H * 4
        sent_base = 2 * (world - 1) * T * H * 4
        expert_flops = 3 * 2.0 * T * K * H * F  # gate/up (2F) and down over this rank's share of rows
        for label, key, sent in (("moeyard all-to-all", "ours", sent_ours),
                                 ("all-gather + reduce-scatter", "baseline", sent_base)):
            floor = sent / link_bw + expert_flops / rate
            if rank == 0:
                print(f"| {T} | {H} | {F} | {E} | {K} | {label} | {med[key] * 1e3:.1f} | "
                      f"{limits.spread(times[key]) * 1e3:.1f} | {sent / 1e6:.1f} | "
                      f"{med['baseline'] / med[key]:.2f}x | {floor / med[key]:.2f} |")
        if rank == 0:
            print(f"(link {link_bw / 1e9:.2f} GB/s per rank, GEMM {rate / 1e9:.1f} GFLOP/s per rank, this case)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
