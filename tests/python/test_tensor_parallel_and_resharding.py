"""Tensor-parallel training against one process, checkpoints moving between
layouts (each rank writes what it owns; any layout resumes any other's,
bit for bit), and the NCCL runs on GPUs. Launch helpers and the
data-parallel config come from test_distributed.py."""

import subprocess

import pytest

from test_distributed import EXE, assert_same_run, dp_config, final_model, run_metrics, torchrun

# ---- tensor parallelism ----------------------------------------------------------

# A dense layer (moe_every_n: 2) for the split MLP, per-head q/k norms (a
# replicated weight with per-rank partial gradients); the second variant:
# norms over the split projections, tied vocabulary-parallel embeddings,
# attention biases, sinks and a GELU MLP.
TP_VARIANTS = {
    "head": ["--set", "model.qk_norm=head", "--set", "moe.moe_every_n=2"],
    # DeepSeek's multi-head latent attention: q_b_proj and kv_b_proj split by
    # heads, the low-rank q_a/kv_a projections and their norms replicated with
    # partial gradients.
    "mla": ["--set", "model.attention=mla", "--set", "model.num_kv_heads=0", "--set", "model.kv_lora_rank=8",
            "--set", "model.q_lora_rank=16", "--set", "model.qk_rope_head_dim=4", "--set",
            "model.qk_nope_head_dim=4", "--set", "model.v_head_dim=8", "--set", "moe.moe_every_n=2"],
    "projection": ["--set", "model.qk_norm=projection", "--set", "model.tie_embeddings=true", "--set",
                   "model.attention_bias=true", "--set", "model.attention_sinks=true", "--set", "model.mlp=gelu",
                   "--set", "moe.moe_every_n=2"],
}


@pytest.mark.parametrize("nproc,tp,ep,variant", [
    (2, 2, 1, "head"), (2, 2, 1, "projection"), (2, 2, 1, "mla"), (4, 4, 1, "head"), (4, 4, 1, "projection"),
    (4, 2, 1, "head"), (4, 2, 2, "projection")])
def test_tensor_parallel_training_matches_one_process(tmp_path, shards, nproc, tp, ep, variant):
    """TP2, TP4 (2 kv heads: whole on every rank, each rank using its query
    heads' one), TP2 x DP2 and TP2 x DP2 x EP2 (heads, dense-MLP width and
    vocabulary split; experts computed alike on the TP ranks and sharded over
    EP): losses, gradient norms, routing counts and the trained parameters
    (gathered into full tensors in the checkpoint) equal the one-process run."""
    extra = TP_VARIANTS[variant]
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single), *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = dp_config(tmp_path, shards, "tp", 4 * tp // nproc)
    r = torchrun(nproc, "train", "--config", str(cfg), "--set", f"parallel.tensor_parallel={tp}", "--set",
                 f"parallel.expert_parallel={ep}", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data parallel: {nproc // tp} processes (torchrun), expert parallel {ep}, tensor parallel {tp}" \
        in r.stderr + r.stdout
    assert_same_run(tmp_path / "single", tmp_path / "tp")
    import json

    manifest = json.loads((tmp_path / "tp" / "step_3" / "manifest.json").read_text())
    assert manifest["parallel"] == {"tensor_parallel": tp, "data_parallel": nproc // tp, "expert_parallel": ep}


def test_checkpoint_reshards_from_dp2_ep2_to_tp2_and_one_process(tmp_path, shards):
    """Saved at DP2 x EP2, resumed at TP2 (2 processes) and in one process:
    both end where the uninterrupted one-process run ends."""
    extra = TP_VARIANTS["head"]
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single), *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = dp_config(tmp_path, shards, "dp2ep2", 2)
    r = torchrun(4, "train", "--config", str(saved), "--set", "parallel.expert_parallel=2", "--set",
                 "train.micro_batch=1", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = str(tmp_path / "dp2ep2" / "step_3")
    tp2 = dp_config(tmp_path, shards, "tp2", 4)
    r = torchrun(2, "train", "--config", str(tp2), "--set", "parallel.tensor_parallel=2", "--resume", ckpt, *extra,
                 timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = dp_config(tmp_path, shards, "one", 4)
    r = subprocess.run([EXE, "train", "--config", str(one), "--resume", ckpt, *extra], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    want = final_model(tmp_path / "single")
    for run in ("tp2", "one"):
        got = final_model(tmp_path / run)
        assert set(got) == set(want)
        for n in want:
            assert (got[n] - want[n]).abs().max().item() <= 1e-4, (run, n)


def test_each_rank_writes_what_it_owns(tmp_path, shards):
    """TP2 x DP2 x EP2 on 4 processes: the TP pieces come from ranks 0 and 1
    (data-parallel replica 0), the expert slices from ranks 0 and 2 (TP rank 0
    of each expert-parallel rank), replicated tensors from rank 0 only; every
    piece says where it sits in the full tensor, and a missing rank file is
    named when loading."""
    import json

    from safetensors import safe_open

    cfg = dp_config(tmp_path, shards, "own", 2)
    r = torchrun(4, "train", "--config", str(cfg), "--set", "parallel.tensor_parallel=2", "--set",
                 "parallel.expert_parallel=2", *TP_VARIANTS["head"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    step = tmp_path / "own" / "step_6"
    files = {f.name for f in step.iterdir()}
    assert {"model-rank0.safetensors", "model-rank1.safetensors", "model-rank2.safetensors"} <= files
    assert "model-rank3.safetensors" not in files  # owns nothing another rank does not write
    assert {"rng-dp0.safetensors", "rng-dp1.safetensors"} <= files

    def contents(rank):
        with safe_open(str(step / f"model-rank{rank}.safetensors"), "pt") as f:
            return set(f.keys()), f.metadata() or {}

    k0, m0 = contents(0)
    k1, m1 = contents(1)
    k2, m2 = contents(2)
    assert "norm.weight" in k0 and "norm.weight" not in k1 | k2
    assert json.loads(m0["embed.weight"]) == {"dim": 0, "parts": 1, "index": 0, "count": 2}
    assert json.loads(m1["embed.weight"]) == {"dim": 0, "parts": 1, "index": 1, "count": 2}
    assert json.loads(m1["layers.0.mlp.gate_up.weight"])["parts"] == 2
    assert json.loads(m2["layers.1.moe.w_gate_up"]) == {"dim": 0, "parts": 1, "index": 1, "count": 2}
    assert "layers.1.moe.w_gate_up" not in k1 and "embed.weight" not in k2
    gen = [EXE, "generate", "--checkpoint", str(step), "--prompt", "a", "-n", "2", "-t", "0"]
    r = subprocess.run(gen, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # the pieces join into the full model
    # Without rank 1's file (and its manifest entry), loading names the gap.
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["sha256"]["model-rank1.safetensors"]
    (step / "model-rank1.safetensors").unlink()
    (step / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run(gen, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "elements this rank needs (a rank's file is missing)" in r.stderr, r.stderr


def test_resume_is_exact_per_data_parallel_rank_with_router_noise(tmp_path, shards):
    """Router jitter and expert dropout draw from one random stream per
    data-parallel rank, saved per rank: DP2 for 6 steps equals DP2 for 3
    steps resumed for 3, bit for bit."""
    noisy = ["--set", "moe.noise=jitter", "--set", "moe.expert_dropout=0.1"]
    full = dp_config(tmp_path, shards, "full", 2)
    r = torchrun(2, "train", "--config", str(full), *noisy, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    half = dp_config(tmp_path, shards, "half", 2)
    r = torchrun(2, "train", "--config", str(half), *noisy, "--set", "train.steps=3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Stopped at step 3 of 3: resume the same run to 6 steps.
    r = torchrun(2, "train", "--config", str(half), *noisy, "--resume", str(tmp_path / "half" / "step_3"),
                 timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    states = [load_file(str(tmp_path / "half" / "step_3" / f"rng-dp{k}.safetensors"))["cpu"] for k in (0, 1)]
    assert not torch_equal(states[0], states[1])  # the ranks' streams differ, so each must come back
    a, b = final_model(tmp_path / "full"), final_model(tmp_path / "half")
    for n in a:
        assert torch_equal(a[n], b[n]), n
    la = [m["loss"] for m in run_metrics(tmp_path / "full")]
    lb = [m["loss"] for m in run_metrics(tmp_path / "half")]
    assert la == lb


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


# ---- NCCL (GPUs) -----------------------------------------------------------------

def _gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
def test_nccl_dist_check():
    if _gpus() < 2:
        pytest.skip("NCCL groups need 2 GPUs (one per process)")
    r = torchrun(2, "dist-check", "--device", "cuda", "--timeout", "60")
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in range(2):
        assert f"rank {rank}/2 (torchrun, NCCL): all_reduce ok (3), all_to_all ok" in r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_nccl_training_matches_one_process(tmp_path, shards, tp, ep):
    """EP2 and TP2 on 2 GPUs with NCCL groups train like one CPU process
    (float32; GPU kernels round differently, hence the looser tolerance)."""
    if _gpus() < 2:
        pytest.skip("NCCL groups need 2 GPUs (one per process)")
    extra = TP_VARIANTS["head"]
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single), *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = dp_config(tmp_path, shards, "gpu", 4 * tp // 2)
    r = torchrun(2, "train", "--config", str(cfg), "--set", "train.device=cuda", "--set",
                 f"parallel.tensor_parallel={tp}", "--set", f"parallel.expert_parallel={ep}", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ", NCCL" in r.stderr + r.stdout
    assert_same_run(tmp_path / "single", tmp_path / "gpu", tol=1e-3, param_tol=1e-3)


@pytest.mark.parametrize("layout", [["--set", "parallel.tensor_parallel=2", "--set", "parallel.expert_parallel=2"],
                                    ["--set", "parallel.tensor_parallel=4"]])
def test_resharding_is_bit_identical(tmp_path, shards, layout):
    """A DP2 x EP2 checkpoint loaded at TP2 x EP2 (4 processes), TP4 and in one
    process, and saved again without a step: every model tensor and every
    optimizer state tensor comes back bit for bit."""
    import torch

    from moeyard import checkpoint

    extra = TP_VARIANTS["head"] + ["--set", "model.num_kv_heads=4"]
    saved = dp_config(tmp_path, shards, "dp2ep2", 1)
    r = torchrun(4, "train", "--config", str(saved), "--set", "parallel.expert_parallel=2", "--set", "train.steps=3",
                 *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    src = tmp_path / "dp2ep2" / "step_3"
    again = dp_config(tmp_path, shards, "again", 4)
    r = torchrun(4, "train", "--config", str(again), "--set", "train.steps=3", "--set", "train.micro_batch=2",
                 "--resume", str(src), *layout, *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = dp_config(tmp_path, shards, "one", 4)
    r = subprocess.run([EXE, "train", "--config", str(one), "--set", "train.steps=3", "--resume", str(src), *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for kind in ("model", "optimizer"):
        want = checkpoint.load(str(src), kind)
        for run in ("again", "one"):
            got = checkpoint.load(str(tmp_path / run / "step_3"), kind)
            assert set(got) == set(want), (run, kind)
            for n in want:
                assert torch.equal(got[n], want[n]), (run, kind, n)
