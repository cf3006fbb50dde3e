"""A small MoE layer trained for a few steps on CPU.

    python -m moeyard.examples.moe_layer [--steps 30] [--experts 8] [--top-k 2]

The layer learns to map random inputs to a fixed random teacher (a dense
SwiGLU MLP). It prints the loss, the aux losses and the routing statistics
(tokens per expert, dropped fraction, router entropy) as it trains.
"""

import argparse
import time

import torch

import moeyard


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-coeff", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    layer = moeyard.MoE(a.hidden, a.ffn, a.experts, a.top_k, capacity_factor=a.capacity_factor, noise="jitter")
    teacher = torch.nn.Sequential(
        torch.nn.Linear(a.hidden, a.ffn), torch.nn.SiLU(), torch.nn.Linear(a.ffn, a.hidden)
    ).requires_grad_(False)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    print(f"moeyard {moeyard.__version__}: {layer}")
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        x = torch.randn(a.tokens, a.hidden)
        y, r = layer(x)
        mse = torch.nn.functional.mse_loss(y, teacher(x))
        loss = mse + a.aux_coeff * r.switch_loss + 1e-3 * r.z_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == a.steps:
            tpe = " ".join(f"{int(v)}" for v in r.tokens_per_expert.tolist())
            print(
                f"step {step:4d}  mse {mse.item():.4f}  switch {r.switch_loss.item():.3f}  "
                f"z {r.z_loss.item():.3f}  dropped {100 * r.dropped_fraction.item():.1f}%  "
                f"entropy {r.router_entropy.item():.3f}  tokens/expert [{tpe}]"
            )
    dt = time.perf_counter() - t0
    print(f"{a.steps} steps in {dt:.2f}s ({a.steps * a.tokens / dt:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
