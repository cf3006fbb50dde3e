"""Activation recompute (`train.recompute`): training with each mode gives the
metrics and the trained parameters of a run without recompute bit for bit,
with router jitter and expert dropout on, in one process and in two (expert
parallelism, tensor parallelism), and keeps fewer bytes of activations for
backward: full < attention, moe < none."""

import json
import os

import pytest
import torch

import moeyard
from test_distributed import torchrun
from test_train import train

CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 3, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 32}
moe: {num_experts: 4, top_k: 2, moe_every_n: 2, capacity_factor: 1.5, noise: jitter,
      noise_eps: 0.1, expert_dropout: 0.2, z_coeff: 0.001, importance_coeff: 0.01}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 2}
train: {steps: 4, micro_batch: MB, grad_accum: 2, eval_every: 2, eval_batches: 2, threads: 1}
checkpoint: {dir: RUN, every: 0}
log: {every: 1}
"""


def config(tmp_path, shards, run, micro_batch=4):
    text = (CONFIG.replace("TRAIN", str(shards / "train.bin")).replace("VALID", str(shards / "valid.bin"))
            .replace("RUN", str(tmp_path / run)).replace("MB", str(micro_batch)))
    p = tmp_path / f"{run}.yaml"
    p.write_text(text)
    return p


def records(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_bitwise_same_run(a, b, steps=4):
    """Every metric (losses, grad norm, aux losses, routing statistics,
    validation; not the step's wall time) equal as written, and every
    trained parameter equal."""
    ra, rb = records(a), records(b)
    assert len(ra) == len(rb) == steps
    for x, y in zip(ra, rb):
        x.pop("step_s"), y.pop("step_s")
        assert x == y, (x, y)
    from moeyard import checkpoint

    pa, pb = checkpoint.load(str(a / f"step_{steps}")), checkpoint.load(str(b / f"step_{steps}"))
    assert set(pa) == set(pb)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def test_each_mode_trains_like_no_recompute_bitwise(tmp_path, shards):
    train(config(tmp_path, shards, "none"))
    for mode in ("moe", "attention", "full"):
        train(config(tmp_path, shards, mode), "--set", f"train.recompute={mode}")
        assert_bitwise_same_run(tmp_path / "none", tmp_path / mode)
    # Only the listed blocks (block 1 is the MoE block).
    train(config(tmp_path, shards, "some"), "--set", "train.recompute=full", "--set", "train.recompute_layers=[1, 2]")
    assert_bitwise_same_run(tmp_path / "none", tmp_path / "some")


@pytest.mark.parametrize("tp,ep,modes", [(1, 2, ("moe", "full")), (2, 1, ("attention", "full"))],
                         ids=["ep2", "tp2"])
def test_two_process_runs_recompute_like_no_recompute_bitwise(tmp_path, shards, tp, ep, modes):
    """Two processes (Gloo): the expert-parallel all-to-all or the tensor-
    parallel reductions inside a recomputed segment run again in backward, in
    the same order on both ranks; the run equals the same layout without
    recompute."""
    layout = ["--set", f"parallel.tensor_parallel={tp}", "--set", f"parallel.expert_parallel={ep}"]
    micro_batch = 4 * tp // 2
    for mode in ("none",) + modes:
        cfg = config(tmp_path, shards, mode, micro_batch)
        r = torchrun(2, "train", "--config", str(cfg), "--set", f"train.recompute={mode}", *layout, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        if mode != "none":
            assert_bitwise_same_run(tmp_path / "none", tmp_path / mode)


# ---- memory ---------------------------------------------------------------------------

def saved_bytes(model, tokens, mask=None):
    """Bytes of the distinct tensors autograd keeps for backward during one
    forward (parameters excluded: they are kept anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = model.loss(tokens, mask)
    r["loss"].backward()  # the graph ran: the hooks saw what backward needs
    return sum(storages.values())


def test_recompute_keeps_fewer_activations():
    torch.manual_seed(0)
    m = moeyard.Transformer(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model_tiny.yaml"))
    m.train()
    tokens = torch.randint(0, 256, (4, 64))
    got = {}
    for mode in ("none", "moe", "attention", "full"):
        m.set_recompute(mode)
        got[mode] = saved_bytes(m, tokens)
    assert got["full"] < got["attention"] < got["none"], got
    assert got["full"] < got["moe"] < got["none"], got
    # One block of four recomputed: in between.
    m.set_recompute("full", [1])
    assert got["full"] < saved_bytes(m, tokens) < got["none"]


def test_bad_mode_from_python_names_the_value():
    m = moeyard.Transformer(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model_tiny.yaml"))
    with pytest.raises(RuntimeError, match="set_recompute: mode must be one of none, moe, attention, full, got 'mlp'"):
        m.set_recompute("mlp")
    with pytest.raises(RuntimeError, match=r"layer 4 is not a layer index in \[0, 4\)"):
        m.set_recompute("full", [4])
