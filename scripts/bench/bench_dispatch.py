"""Expert-parallel dispatch on CPU processes: moeyard's all-to-all
dispatcher (counts, variable all-to-all, local re-permutation, experts, reverse
all-to-all) against the plain all-gather baseline (every rank gathers every
token, runs its own experts on the tokens routed to them, and a reduce of the
partial outputs returns each rank its tokens). Same layer, same routing, same
local expert kernels; prints time, bytes each rank sends and the ratio.

    torchrun --nproc-per-node 2 scripts/bench/bench_dispatch.py [--reps 5]
    (scripts/launch.sh cannot run Python scripts; call torchrun directly)
"""

import argparse
import time

import torch
import torch.distributed as dist

import moeyard  # noqa: F401
from moeyard import _C

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
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rank, world = _C._ep_init(300.0)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cases = [(1024, 512, 1024, 8 * world, 2), (2048, 1024, 512, 16 * world, 4)]
    if rank == 0:
        print(f"{world} processes (Gloo, loopback), 1 thread each, forward only, times are medians over ranks' max")
        print("| T/rank | H | F | E | K | implementation | time (ms) | sent per rank (MB) | moeyard speed-up |")
        print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
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

        def timed(fn):
            with torch.no_grad():
                fn()
                ts = []
                for _ in range(a.reps):
                    dist.barrier()
                    t = time.perf_counter()
                    fn()
                    t = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    ts.append(t.item())
                return sorted(ts)[len(ts) // 2]

        with torch.no_grad():
            y_ours, y_base = ours(), baseline()
        err = (y_ours - y_base).abs().max().item()
        assert err < 1e-3, f"rank {rank}: outputs differ by {err}"
        t_ours, t_base = timed(ours), timed(baseline)
        # Bytes this rank sends to others: the all-to-all sends the rows routed
        # to other ranks' experts and receives theirs back (expected
        # T*K*(world-1)/world rows each way); all-gather sends x to every
        # other rank, reduce-scatter sends (world-1)/world of the partial output.
        with torch.no_grad():
            _, idx, _ = ops.router_topk(x @ router.t(), K)
        remote = ((idx // El) != rank).sum().item()
        mb_ours = 2 * remote * H * 4 / 1e6
        mb_base = ((world - 1) * T * H * 4 + (world - 1) * T * H * 4) / 1e6
        if rank == 0:
            print(f"| {T} | {H} | {F} | {E} | {K} | moeyard all-to-all | {t_ours * 1e3:.1f} | {mb_ours:.1f} | 1.00x |")
            print(f"| {T} | {H} | {F} | {E} | {K} | all-gather + reduce-scatter | {t_base * 1e3:.1f} | {mb_base:.1f} "
                  f"| {t_base / t_ours:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
