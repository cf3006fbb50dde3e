"""What every benchmark shares: implementations timed interleaved round by
round, and the machine's limits measured in the same run.

- ``interleaved(fns, rounds)``: each round calls every function once, in
  order; the first round warms up and is dropped. Medians and spreads of
  the rest. A shared VM's slow spells then hit every implementation alike.
- ``gemm_probe(M, K, N)``: a torch.mm of that shape, its FLOP count: the GEMM
  rate a compute-bound kernel of that shape can reach here.
- ``stream_probe(nbytes)``: a streaming read (a sum) of a buffer much larger
  than the caches, its byte count: the memory bandwidth a memory-bound
  kernel can reach here.
Put the probes among the timed functions so that they run in the same rounds.
"""

import statistics
import time

import torch


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns, rounds, device="cpu", warm_up=True):
    """{name: [seconds per round]} over `rounds` timed rounds (after one
    warm-up round unless warm_up is False)."""
    times = {name: [] for name in fns}
    first = 1 if warm_up else 0
    for r in range(rounds + first):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if r >= first:
                times[name].append(time.perf_counter() - t)
    return times


def median(v):
    return statistics.median(v)


def spread(v):
    """max - min of the timed rounds."""
    return max(v) - min(v)


def gemm_probe(M, K, N, dtype=torch.float32, device="cpu"):
    """(fn, flops): torch.mm of [M, K] x [K, N]."""
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(K, N, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b)), 2.0 * M * K * N


def stream_probe(nbytes=1 << 29, device="cpu"):
    """(fn, bytes): a sum over a float32 buffer of `nbytes` (default 512 MiB)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return (lambda: buf.sum()), buf.numel() * 4.0
