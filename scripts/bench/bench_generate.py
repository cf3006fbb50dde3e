#!/usr/bin/env python3
"""Greedy generation: moeyard's C++ Transformer (`Transformer.generate`, the
engine of `moeyard generate`) against transformers' `generate` on the same
Mixtral-shaped checkpoint, batch 1, KV caches on both sides; interleaved
rounds (scripts/bench/limits.py).

    python scripts/bench/bench_generate.py [--rounds 5] [--new 64] [--prompt 16]
                                           [--hidden 1024] [--layers 4] [--experts 8] [--ffn 2048]

Prints tokens/s of each, the ratio to transformers (the baseline), whether
the greedy continuations agree, and the fraction of the memory roofline:
the weight bytes one token reads (embedding row, attention, router, the
K experts it picks, norms, the LM head) / (time per new token x the
bandwidth of a streaming read measured in the same rounds).
"""

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402
import moeyard  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 256),
        num_local_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=4096,
        tie_word_embeddings=False)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = moeyard.Transformer.from_hf(d, dtype="float32")
    prompt = torch.randint(0, a.vocab, (1, a.prompt))
    out = {}

    def run_hf():
        with torch.no_grad():
            out["hf"] = hf.generate(prompt, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                    pad_token_id=0)[0, a.prompt:].tolist()

    def run_ours():
        out["moeyard"] = ours.generate(prompt[0].tolist(), max_new_tokens=a.new, temperature=0.0)

    stream, stream_bytes = limits.stream_probe()
    times = limits.interleaved({"transformers generate": run_hf, "moeyard generate": run_ours,
                                "limit: streaming read": stream}, a.rounds)
    bandwidth = stream_bytes / limits.median(times.pop("limit: streaming read"))
    H, F, E, K, L, V = a.hidden, a.ffn, a.experts, a.top_k, a.layers, a.vocab
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    per_layer = H * (2 * H + 2 * kv) + E * H + K * 3 * H * F + 2 * H
    token_bytes = 4 * (L * per_layer + H + V * H + H)
    agree = sum(x == y for x, y in zip(out["hf"], out["moeyard"]))
    print(f"{torch.get_num_threads()} threads; Mixtral-shaped H={H} L={L} E={E} K={K} F={F} V={V}, float32, "
          f"batch 1, prompt {a.prompt}, {a.new} new tokens, greedy; {a.rounds} interleaved rounds; "
          f"streaming read {bandwidth / 1e9:.1f} GB/s; {token_bytes / 1e6:.1f} MB of weights per token")
    print("| implementation | median (s) | spread (s) | tokens/s | vs transformers | of the memory roofline |")
    print("|---|---:|---:|---:|---:|---:|")
    base = limits.median(times["transformers generate"])
    for name, v in times.items():
        med = limits.median(v)
        print(f"| {name} | {med:.3f} | {limits.spread(v):.3f} | {a.new / med:.1f} | {base / med:.2f}x | "
              f"{token_bytes * a.new / med / bandwidth:.2f} |")
    print(f"greedy continuations agree on {agree}/{a.new} tokens (ties in float32 rounding may differ)")


if __name__ == "__main__":
    main()
