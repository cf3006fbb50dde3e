#!/usr/bin/env python3
"""Plot a training run: loss curves and a per-layer expert-load heatmap.

    python scripts/plot_run.py runs/tiny [--out runs/tiny/plots]

Reads <run>/metrics.jsonl (written by `moeyard train`; one value per step)
and writes loss.png (train loss, cross-entropy, validation loss, learning
rate, skipped steps as red lines) and
expert_load_layer<N>.png (share of tokens per expert over the steps) per
MoE layer.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(run):
    """One record per step, by step: the last one written wins (a file
    appended to by an older version after a resume may repeat steps), and a
    line torn by a crash is ignored."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    by_step = {}
    with open(path) as f:
        for line in f:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if isinstance(m, dict) and "step" in m:
                by_step[m["step"]] = m
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(ms, out):
    skipped = [m["step"] for m in ms if m.get("skipped")]
    ms = [m for m in ms if not m.get("skipped")]
    steps = [m["step"] for m in ms]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [m["loss"] for m in ms], label="train loss", lw=1)
    ax.plot(steps, [m["ce"] for m in ms], label="train cross-entropy", lw=1, alpha=0.7)
    for i, s in enumerate(skipped):
        ax.axvline(s, color="red", lw=0.6, alpha=0.5, label="skipped step" if i == 0 else None)
    val = [(m["step"], m["valid_loss"]) for m in ms if "valid_loss" in m]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [m["lr"] for m in ms], color="gray", ls="--", lw=0.8, label="lr")
    lr.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loads(ms, out):
    paths = []
    n_layers = len(ms[0].get("moe_layers", []))
    for j in range(n_layers):
        loads = np.array([m["moe_layers"][j]["tokens_per_expert"] for m in ms], dtype=float)
        share = loads / np.maximum(loads.sum(1, keepdims=True), 1)
        layer = ms[0]["moe_layers"][j]["layer"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=[ms[0]["step"], ms[-1]["step"], -0.5, share.shape[1] - 0.5])
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: share of routed tokens per expert (uniform = {1 / share.shape[1]:.3f})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(out, f"expert_load_layer{layer}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (or a metrics.jsonl file)")
    ap.add_argument("--out", help="output directory (default: <run>/plots)")
    a = ap.parse_args(argv)
    ms = load(a.run)
    if not ms:
        raise SystemExit(f"plot_run: no metrics in {a.run}")
    out = a.out or os.path.join(a.run if os.path.isdir(a.run) else os.path.dirname(a.run), "plots")
    os.makedirs(out, exist_ok=True)
    for p in [plot_loss(ms, out)] + plot_loads(ms, out):
        print(f"plot_run: wrote {p}")


if __name__ == "__main__":
    main()
