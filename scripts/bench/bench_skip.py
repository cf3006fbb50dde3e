#!/usr/bin/env python3
"""Does skipping with null experts save expert time? One MoE layer
(moeyard.MoE, E real + Z null experts, top-2, dropless) timed forward +
backward at null fractions {0, 0.25, 0.5} and at 1 (every pick null: the
layer without any expert row, i.e. its routing and bookkeeping), the
fractions interleaved round by round on the same tokens and weights.

    python scripts/bench/bench_skip.py [--tokens 2048] [--hidden 512] [--ffn 1024] [--rounds 7]
        [--device cuda] [--dtype bfloat16]

The null share is set through the null experts' selection bias (found by
bisection before timing). Timing: scripts/bench/limits.py (medians and
spreads of interleaved rounds). Expert time = layer time - layer time at
fraction 1; the ideal expert time at fraction f is (1 - f) times that at 0,
so the saving achieved is (expert(0) - expert(f)) / (f expert(0)) (target
>= 0.8). The expert GEMMs' FLOP rate at fraction 0 is printed against a
plain torch.mm of the same shape measured in the same run (the machine's
GEMM rate).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
from moeyard import MoE  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402


def null_share(m, x):
    with torch.no_grad():
        return m(x)[1].null_fraction.item()


def set_fraction(m, x, target):
    """Bisection on the null experts' selection bias until the share of
    null picks is within 0.01 of target (1: all null)."""
    E = m.num_experts
    if target >= 1.0:
        m.selection_bias[E:] = 1e3
        return null_share(m, x)
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        m.selection_bias[E:] = mid
        f = null_share(m, x)
        if abs(f - target) < 0.01:
            return f
        lo, hi = (mid, hi) if f < target else (lo, mid)
    return f


def step(m, x, g):
    y, r = m(x)
    y.backward(g)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with a device synchronize)")
    ap.add_argument("--dtype", default="float32", help="the experts' dtype (the router stays float32)")
    a = ap.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T, H, F, E, K = a.tokens, a.hidden, a.ffn, a.experts, 2
    m = MoE(H, F, E, top_k=K, null_experts=E, selection_bias=True, dtype=dt, device=dev)
    x = torch.randn(T, H, device=dev, dtype=dt)
    g = torch.randn(T, H, device=dev, dtype=dt)
    fractions = [0.0, 0.25, 0.5, 1.0]
    biases, shares = {}, {}
    for f in fractions:
        if f == 0:  # no null pick at all
            m.selection_bias[E:] = -1e3
            shares[f] = null_share(m, x)
        else:
            shares[f] = set_fraction(m, x, f)
        biases[f] = m.selection_bias.clone()
    a_mm = torch.randn(T * K, H, device=dev, dtype=dt)
    b_mm = torch.randn(H, 2 * F, device=dev, dtype=dt)

    def at_fraction(f):
        def run():
            m.selection_bias.copy_(biases[f])
            m.zero_grad(set_to_none=True)
            step(m, x, g)
        return run

    fns = {f: at_fraction(f) for f in fractions}
    fns["gemm"] = lambda: torch.mm(a_mm, b_mm)
    times = limits.interleaved(fns, a.rounds, device=dev)
    gemm = times.pop("gemm")
    med = {f: limits.median(v) for f, v in times.items()}
    gemm_rate = 2 * T * K * H * 2 * F / limits.median(gemm) / 1e9
    base = med[1.0]
    expert0 = med[0.0] - base
    # Forward + backward of the expert MLPs: 3 GEMMs forward (gate_up is 2F
    # wide), twice that backward, over T K (1 - f) rows.
    flops0 = 3 * 2 * T * K * 3 * H * F
    print(f"MoE layer T={T} H={H} F={F} E={E} (+{E} null) top-{K}, {a.dtype} on {dev}, "
          f"{torch.get_num_threads()} threads; "
          f"medians of {a.rounds} interleaved rounds")
    print(f"machine GEMM rate (torch.mm [{T * K}x{H}] x [{H}x{2 * F}]) in this run: {gemm_rate:.1f} GFLOP/s")
    print()
    print("| null fraction | layer fwd+bwd (ms) | spread (ms) | expert time (ms) | vs fraction 0 | ideal | "
          "saving achieved | expert GFLOP/s | / machine GEMM rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in fractions:
        expert = med[f] - base
        share = shares[f]
        rel = expert / expert0 if expert0 > 0 else float("nan")
        achieved = (1 - rel) / share if 0 < share < 1 else float("nan")
        rate = flops0 * (1 - share) / expert / 1e9 if expert > 0 and share < 1 else float("nan")
        print(f"| {share:.3f} | {med[f] * 1e3:.1f} | {limits.spread(times[f]) * 1e3:.1f} | {expert * 1e3:.1f} | {rel:.2f} | {1 - share:.2f} | "
              f"{achieved:.2f} | {rate:.1f} | {rate / gemm_rate:.2f} |")


if __name__ == "__main__":
    main()
