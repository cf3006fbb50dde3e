"""Run under torchrun by tests/python/test_distributed.py: expert-parallel
moe_forward (each rank holds E / ep experts, rows travel by all-to-all) must
give every rank the outputs and gradients of the single-process layer with all
experts, for that rank's own tokens. Exits non-zero with a message if not."""

import sys

import torch
import torch.distributed as dist

import moeyard  # noqa: F401 (loads the ops)
from moeyard import _C


def main():
    capacity = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    bias = len(sys.argv) > 2 and sys.argv[2] == "bias"
    rank, world = _C._ep_init(60.0)
    dist.init_process_group("gloo")  # reference reductions only
    E, H, F, K, T = 4 * world, 16, 12, 2, 24 + 5 * rank  # ranks differ in T
    g = torch.Generator().manual_seed(0)  # the same full layer everywhere
    router = torch.randn(E, H, generator=g, dtype=torch.float64).float()
    w_gu = (torch.randn(E, 2 * F, H, generator=g) * 0.3)
    w_dn = (torch.randn(E, H, F, generator=g) * 0.3)
    b_gu = torch.randn(E, 2 * F, generator=g) if bias else None
    b_dn = torch.randn(E, H, generator=g) if bias else None
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(100 + rank))
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(200 + rank))
    El = E // world
    mine = slice(rank * El, (rank + 1) * El)
    act = "clamped_swiglu" if bias else "swiglu"

    def leaf(t):
        return None if t is None else t.clone().requires_grad_(True)

    # Reference: every expert here, this rank's tokens.
    rx, rr, rgu, rdn, rbg, rbd = map(leaf, (x, router, w_gu, w_dn, b_gu, b_dn))
    ref = torch.ops.moeyard.moe_forward(rx, rr, None, rgu, rdn, top_k=K, capacity_factor=capacity,
                                        b_gate_up=rbg, b_down=rbd, activation=act)
    (ref[0] * dy).sum().backward()
    # Expert parallel: this rank's slice of the experts.
    ex, er = leaf(x), leaf(router)
    egu, edn = leaf(w_gu[mine]), leaf(w_dn[mine])
    ebg = leaf(b_gu[mine]) if bias else None
    ebd = leaf(b_dn[mine]) if bias else None
    y, idx = _C._moe_forward_ep(ex, er, egu, edn, ebg, ebd, top_k=K, capacity_factor=capacity, activation=act)
    (y * dy).sum().backward()

    def check(name, got, want, tol=1e-5):
        err = (got - want).abs().max().item()
        if not err <= tol:
            sys.exit(f"rank {rank}: {name} differs by {err}")

    check("output", y, ref[0])
    check("grad x", ex.grad, rx.grad)
    check("grad router", er.grad, rr.grad)
    # Expert weights: the reference's gradient summed over every rank's tokens.
    pairs = [("w_gate_up", egu, rgu), ("w_down", edn, rdn)]
    if bias:
        pairs += [("b_gate_up", ebg, rbg), ("b_down", ebd, rbd)]
    for name, got, full in pairs:
        total = full.grad.clone()
        dist.all_reduce(total)
        check(f"grad {name}", got.grad, total[mine], 1e-4)
    print(f"rank {rank}/{world}: expert-parallel output and gradients match (E={E}, capacity={capacity})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
