"""`moeyard train`: the C++ trainer end to end on a tiny config."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 32}
moe: {num_experts: 4, top_k: 2, moe_every_n: 2, capacity_factor: 1.5, selection_bias: true}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 5}
train: {steps: 20, micro_batch: 4, grad_accum: 2, eval_every: 10, eval_batches: 2}
schedule:
  capacity_factor: {type: linear, start: 2.0, end: 1.0}
  bias_update_rate: 0.001
checkpoint: {dir: RUN, every: 10, keep_last: 1}
log: {every: 5}
"""


def write_config(tmp_path, shards, run="run", **replace):
    text = CONFIG.replace("TRAIN", str(shards / "train.bin")).replace("VALID", str(shards / "valid.bin"))
    text = text.replace("RUN", str(tmp_path / run))
    for k, v in replace.items():
        text = text.replace(k, v)
    p = tmp_path / f"{run}.yaml"
    p.write_text(text)
    return p


def train(config, *args, check=True):
    r = subprocess.run([EXE, "train", "--config", str(config), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact(tmp_path, shards):
    full = write_config(tmp_path, shards, "full")
    train(full, "--resume", "never", "--set", "checkpoint.keep_last=3")
    half = write_config(tmp_path, shards, "half")
    os.makedirs(tmp_path / "half")
    shutil.copytree(tmp_path / "full" / "step_10", tmp_path / "half" / "step_10")
    (tmp_path / "half" / "latest").write_text("step_10\n")
    r = train(half)
    assert "resumed from" in r.stdout + r.stderr
    a = {m["step"]: m for m in metrics(tmp_path / "full")}
    b = {m["step"]: m for m in metrics(tmp_path / "half")}
    for step in range(11, 21):
        assert a[step]["loss"] == b[step]["loss"], step  # bit-identical
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "full" / "step_20" / f).read_bytes() == (tmp_path / "half" / "step_20" / f).read_bytes()


def test_loss_falls_metrics_and_checkpoints(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run", **{"steps: 20": "steps: 60"})
    train(cfg)
    ms = metrics(tmp_path / "run")
    assert len(ms) == 60
    assert ms[-1]["loss"] < ms[0]["loss"] - 1.0
    assert "valid_loss" in ms[9] and "valid_ppl" in ms[59]
    layer = ms[-1]["moe_layers"][0]
    assert len(layer["tokens_per_expert"]) == 4 and sum(layer["tokens_per_expert"]) == 2 * 4 * 32 * 2
    for key in ("dropped_fraction", "router_entropy", "dead_experts", "capacity_utilization"):
        assert key in layer
    assert ms[0]["capacity_factor"] == 2.0 and ms[-1]["capacity_factor"] < 1.05
    # keep_last: 1 -> only the final checkpoint remains; latest points at it
    dirs = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("step_"))
    assert dirs == ["step_60"]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_60"
    manifest = json.loads((tmp_path / "run" / "step_60" / "manifest.json").read_text())
    assert manifest["step"] == 60 and "model:" in manifest["config"]
    assert set(manifest["sha256"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}


def test_an_aux_loss_coefficient_follows_its_schedule(tmp_path, shards):
    """schedule.z_coeff drives the z-loss weight step by step: the metrics log
    the scheduled value, and with only the z loss weighted, the step's aux
    loss is that value times the layer's z loss."""
    cfg = write_config(tmp_path, shards, "run", **{
        "steps: 20": "steps: 4",
        "bias_update_rate: 0.001": "z_coeff: {type: linear, start: 0.5, end: 0.0, steps: 4}",
        "selection_bias: true}": "selection_bias: true, switch_coeff: 0.0}"})
    train(cfg)
    ms = metrics(tmp_path / "run")
    assert [m["z_coeff"] for m in ms] == [0.5, 0.375, 0.25, 0.125]
    for m in ms:
        (layer,) = m["moe_layers"]
        assert m["aux"] == pytest.approx(m["z_coeff"] * layer["z_loss"], rel=1e-5)


def test_corrupt_checkpoint_is_refused(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run", **{"steps: 20": "steps: 10"})
    train(cfg)
    f = tmp_path / "run" / "step_10" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    r = train(cfg, "--set", "train.steps=12", check=False)
    assert r.returncode == 1
    assert "SHA-256 mismatch" in r.stderr and "model.safetensors" in r.stderr


def test_sigterm_saves_and_exits(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run", **{"steps: 20": "steps: 100000"})
    p = subprocess.Popen([EXE, "train", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    step = int((tmp_path / "run" / "latest").read_text().strip().split("_")[1])
    assert step >= 1 and len(metrics(tmp_path / "run")) == step
    assert "interrupted" in out


def test_non_finite_steps_are_skipped_then_abort(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run")
    r = train(cfg, "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0", "--set", "train.max_bad_steps=3", check=False)
    assert r.returncode == 1
    assert "non-finite" in r.stderr + r.stdout and "train.max_bad_steps" in r.stderr


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", r"optim.lrr .*unknown key"),
    ("train.steps=many", r"train.steps .*expected an integer, got 'many'"),
    ("train.steps=0", r"train.steps \(--set train.steps=0\): 0 is outside \[1, inf\)"),
    ("moe.top_k=9", r"moe.top_k \(--set moe.top_k=9\) = 9 is outside \[1, moe.num_experts \(\S+.yaml:3\) = 4\]"),
    ("data.seq_len=64", r"data.seq_len \(--set data.seq_len=64\) = 64 exceeds model.max_seq_len \(\S+.yaml:2\) = 32"),
    ("optim.freeze=[\".\"]", r"optim.freeze freezes all \d+ parameter tensors; nothing would train"),
    ("parallel.tensor_parallel=0", r"parallel.tensor_parallel \(--set parallel.tensor_parallel=0\): 0 is outside \[1, inf\)"),
    ("parallel.tensor_parallel=3", r"parallel.tensor_parallel \(--set parallel.tensor_parallel=3\) = 3 must divide "
                                   r"model.num_heads \(\S+.yaml:2\) = 4"),
    ("parallel.tensor_parallel=8", r"parallel.tensor_parallel \(--set parallel.tensor_parallel=8\) = 8 must divide "
                                   r"model.num_heads \(\S+.yaml:2\) = 4"),
    ("parallel.tensor_parallel=2", r"parallel.tensor_parallel \(2\) must divide the number of processes "
                                   r"\(WORLD_SIZE 1, from single\)"),
    ("parallel.expert_parallel=3", r"moe.num_experts \(\S+.yaml:3\) = 4 must be divisible by "
                                   r"parallel.expert_parallel \(--set parallel.expert_parallel=3\) = 3"),
])
def test_bad_config(tmp_path, shards, override, match):
    import re

    r = train(write_config(tmp_path, shards), "--set", override, check=False)
    assert r.returncode == 1 and re.search(match, r.stderr), r.stderr


def test_bad_shard(tmp_path, shards):
    bad = tmp_path / "bad.bin"
    bad.write_bytes((shards / "train.bin").read_bytes()[:1000])
    r = train(write_config(tmp_path, shards), "--set", f"data.train={bad}", check=False)
    assert r.returncode == 1 and "bad.bin" in r.stderr and "truncated or corrupt" in r.stderr
    bad.write_bytes(b"NOTASHARD" * 10)
    r = train(write_config(tmp_path, shards), "--set", f"data.train={bad}", check=False)
    assert "bad magic" in r.stderr


def test_python_train_runs_the_same_trainer(tmp_path, shards):
    import moeyard

    cfg = write_config(tmp_path, shards, "py")
    r = moeyard.train(cfg, {"train.steps": 10}, resume="never")
    assert r["steps"] == 10 and not r["interrupted"]
    ms = metrics(tmp_path / "py")
    assert len(ms) == 10 and ms[-1]["loss"] == pytest.approx(r["final_loss"])
    # the CLI with the same config and overrides gives bit-identical losses
    cli = write_config(tmp_path, shards, "cli")
    train(cli, "--set", "train.steps=10", "--resume", "never")
    assert [m["loss"] for m in metrics(tmp_path / "cli")] == [m["loss"] for m in ms]


def test_bfloat16_model_trains_with_fp32_masters(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "bf16")
    train(cfg, "--set", "model.dtype=bfloat16", "--set", "train.steps=30", "--resume", "never")
    ms = metrics(tmp_path / "bf16")
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5
    import safetensors.torch

    opt = safetensors.torch.load_file(str(tmp_path / "bf16" / "step_30" / "optimizer.safetensors"))
    model = safetensors.torch.load_file(str(tmp_path / "bf16" / "step_30" / "model.safetensors"))
    assert model["layers.1.moe.w_gate_up"].dtype.__str__() == "torch.bfloat16"
    assert model["layers.1.moe.router.weight"].dtype.__str__() == "torch.float32"
    master = opt["layers.1.moe.w_gate_up.master"]
    assert master.dtype.__str__() == "torch.float32"
    assert (master.bfloat16() == model["layers.1.moe.w_gate_up"]).all()


def test_plot_run_writes_pngs(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "plot", **{"steps: 20": "steps: 8"})
    train(cfg, "--resume", "never")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_run.py"), str(tmp_path / "plot")],
                   check=True, capture_output=True)
    for name in ("loss.png", "expert_load_layer1.png"):
        data = (tmp_path / "plot" / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_generate_from_checkpoint(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "gen", **{"steps: 20": "steps: 5"})
    train(cfg, "--resume", "never")
    r = subprocess.run([EXE, "generate", "--checkpoint", str(tmp_path / "gen"), "--prompt", "def ",
                        "-n", "20", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout.rstrip("\n").encode("utf-8", "surrogateescape")) >= 4
    again = subprocess.run([EXE, "generate", "--checkpoint", str(tmp_path / "gen" / "step_5"), "--prompt", "def ",
                            "-n", "20", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert again.stdout == r.stdout  # greedy is deterministic; run dir resolves to latest
    assert re.search(r"20 tokens, [0-9.]+ tokens/s", r.stderr), r.stderr
    # Skipping the second pick where its weight is below 0.9 x the first's:
    # the rate beside plain top-K's, on the same prompt.
    skip = subprocess.run([EXE, "generate", "--checkpoint", str(tmp_path / "gen"), "--prompt", "def ",
                           "-n", "20", "--temperature", "0", "--skip-ratio", "0.9"],
                          capture_output=True, text=True, timeout=120)
    assert skip.returncode == 0, skip.stderr
    assert re.search(r"tokens/s with skip_ratio 0.9, [0-9.]+ tokens/s with plain top-K \(x[0-9.]+\)", skip.stderr)
    bad = subprocess.run([EXE, "generate", "--checkpoint", str(tmp_path / "gen"), "--prompt", "def ",
                          "--skip-ratio", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--skip-ratio must be in [0, 1), got 1.5" in bad.stderr


def _weights(run, step):
    import safetensors.torch

    return safetensors.torch.load_file(str(run / f"step_{step}" / "model.safetensors"))


def test_group_overrides_and_expert_clipping(tmp_path, shards):
    import torch

    groups = "optim: {lr: 3.0e-3, warmup: 5, groups: [{pattern: attn., lr_mult: 0.0}, {pattern: moe.w_, lr_mult: 1.0, weight_decay: 0.0}]}"
    cfg = write_config(tmp_path, shards, "g", **{"optim: {lr: 3.0e-3, warmup: 5}": groups, "steps: 20": "steps: 5",
                                                 "every: 10, keep_last: 1": "every: 1, keep_last: 10"})
    train(cfg, "--resume", "never")
    a, b = _weights(tmp_path / "g", 1), _weights(tmp_path / "g", 5)
    assert torch.equal(a["layers.0.attn.q_proj.weight"], b["layers.0.attn.q_proj.weight"])  # lr_mult 0
    assert not torch.equal(a["layers.0.mlp.down.weight"], b["layers.0.mlp.down.weight"])
    moved = (b["layers.1.moe.w_down"] - a["layers.1.moe.w_down"]).abs().max()
    clip = write_config(tmp_path, shards, "c", **{"optim: {lr: 3.0e-3, warmup: 5}": groups, "steps: 20": "steps: 5",
                                                  "every: 10, keep_last: 1": "every: 1, keep_last: 10"})
    train(clip, "--resume", "never", "--set", "optim.expert_grad_clip=1e-12")
    c, d = _weights(tmp_path / "c", 1), _weights(tmp_path / "c", 5)
    clipped = (d["layers.1.moe.w_down"] - c["layers.1.moe.w_down"]).abs().max()
    assert clipped < 0.1 * moved  # Adam steps shrink once gradients fall below eps
    bad = write_config(tmp_path, shards, "bad")
    r = train(bad, "--set", "optim.groups=[{lr_mult: 2}]", check=False)
    assert r.returncode == 1 and "optim.groups[0].pattern" in r.stderr
    r = train(bad, "--set", "train.device=tpu", check=False)
    assert r.returncode == 1 and "train.device" in r.stderr


def test_shipped_configs_parse(tmp_path):
    """configs/*.yaml parse and validate (a 1-step dry run would need data)."""
    import moeyard

    for name in ("tiny.yaml", "gpu_moe_1b.yaml"):
        r = train(os.path.join(ROOT, "configs", name), "--set", "data.train=/nonexistent.bin",
                  "--set", "train.device=cpu", "--set", "model.vocab_size=1024", check=False)
        assert r.returncode == 1 and "/nonexistent.bin" in r.stderr, r.stderr  # got past config parsing
    import yaml as _yaml  # noqa: F401 (transformers depends on PyYAML)

    cfg = _yaml.safe_load(open(os.path.join(ROOT, "configs", "gpu_moe_1b.yaml")))
    model = dict(cfg["model"], moe=cfg["moe"], dtype="float32", num_layers=2, vocab_size=1024)
    m = moeyard.Transformer(model)
    total = sum(p.numel() for p in m.parameters())
    assert total > 1e8


# ---- data sources: raw token files, lists, globs, mixtures ----------------------


def shard_tokens(path):
    import numpy as np

    data = open(path, "rb").read()
    width = int.from_bytes(data[12:16], "little")
    return np.frombuffer(data[32:], dtype=np.uint16 if width == 2 else np.uint32)


def data_run(tmp_path, shards, name, *sets):
    cfg = write_config(tmp_path, shards, name)
    return subprocess.run([EXE, "train", "--config", str(cfg), "--set", "train.steps=3", "--set",
                           "train.eval_every=0", "--set", "checkpoint.every=0", *sets],
                          capture_output=True, text=True, timeout=300)


def losses(run):
    import json

    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_raw_token_files_train_as_their_shard(tmp_path, shards, dtype):
    """A raw token file (no header) of the shard's tokens, with
    data.raw_dtype, gives the shard's run exactly; without it the file is
    refused, naming data.raw_dtype."""
    raw = tmp_path / f"train.{dtype}"
    shard_tokens(shards / "train.bin").astype(dtype).tofile(raw)
    a = data_run(tmp_path, shards, "shard", "--set", f"data.train={shards / 'train.bin'}")
    b = data_run(tmp_path, shards, "raw", "--set", f"data.train={raw}", "--set", f"data.raw_dtype={dtype}")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    assert losses(tmp_path / "shard") == losses(tmp_path / "raw")
    c = data_run(tmp_path, shards, "refused", "--set", f"data.train={raw}")
    assert c.returncode != 0 and "needs data.raw_dtype: uint16 or uint32" in c.stderr, c.stderr[-1500:]


def test_lists_globs_and_weights(tmp_path, shards):
    """A glob or a list naming one file is that file's run; a list of
    {path, weight} trains on a mixture; the bad forms are errors naming
    data.train."""
    d = tmp_path / "parts"
    d.mkdir()
    tokens = shard_tokens(shards / "train.bin")
    half = tokens.size // 2
    for i, part in enumerate((tokens[:half], tokens[half:])):
        raw = d / f"part{i}.tok"
        part.astype("uint16").tofile(raw)
    one = data_run(tmp_path, shards, "one", "--set", f"data.train={shards / 'train.bin'}")
    glob1 = data_run(tmp_path, shards, "glob1", "--set", f"data.train={shards}/tr*.bin")
    list1 = data_run(tmp_path, shards, "list1", "--set", f"data.train=[{shards / 'train.bin'}]")
    for r in (one, glob1, list1):
        assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path / "one") == losses(tmp_path / "glob1") == losses(tmp_path / "list1")
    mix = data_run(tmp_path, shards, "mix", "--set", "data.raw_dtype=uint16", "--set",
                   f"data.train=[{{path: '{d}/part0.tok', weight: 0.7}}, {{path: '{d}/part1.tok', weight: 0.3}}]")
    assert mix.returncode == 0, mix.stderr[-2000:]
    assert len(losses(tmp_path / "mix")) == 3
    for sets, match in (
        ([f"data.train=[{{path: '{d}/part0.tok'}}]"], r"data.train\[0\].weight.*is required"),
        ([f"data.train={d}/nothing*.tok"], r"data.train: the glob '.*nothing\*.tok' matches no file"),
        ([f"data.train=[{{path: '{d}/part0.tok', weight: -1}}]"], r"data.train\[0\].weight.*\(0, inf\)"),
        (["data.raw_dtype=int8"], r"data.raw_dtype.*must be uint16, uint32"),
    ):
        r = data_run(tmp_path, shards, "bad", *[x for s in sets for x in ("--set", s)])
        assert r.returncode != 0 and re.search(match, r.stderr), (sets, r.stderr[-1500:])


def test_loss_masks_train_the_marked_tokens_only(tmp_path, shards):
    """<name>.mask.bin beside a shard (prepare_data --chat): a mask of
    zeros leaves nothing to learn (cross-entropy 0, gradient 0 with the aux
    losses off), a mask of ones is the shard's own run."""
    import numpy as np

    tokens = shard_tokens(shards / "train.bin")
    no_aux = ["--set", "moe.switch_coeff=0", "--set", "moe.z_coeff=0"]
    runs = {}
    for name, value in (("zeros", 0), ("ones", 1), ("plain", None)):
        d = tmp_path / f"data_{name}"
        d.mkdir()
        shutil.copy(shards / "train.bin", d / "train.bin")
        if value is not None:
            mask = np.full(tokens.size, value, dtype=np.uint8)
            (d / "train.mask.bin").write_bytes(b"MOEYTOK1" + struct.pack("<IIQQ", 1, 1, mask.size, 2)
                                               + mask.tobytes())
        r = data_run(tmp_path, shards, name, "--set", f"data.train={d / 'train.bin'}", *no_aux)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert all(m["ce"] == 0 and m["grad_norm"] == 0 for m in runs["zeros"]), runs["zeros"]
    for a, b in zip(runs["ones"], runs["plain"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
    bad = tmp_path / "data_zeros" / "train.mask.bin"
    bad.write_bytes(bad.read_bytes()[:-1].replace(struct.pack("<Q", tokens.size), struct.pack("<Q", tokens.size - 1), 1))
    r = data_run(tmp_path, shards, "bad", "--set", f"data.train={tmp_path / 'data_zeros' / 'train.bin'}")
    assert r.returncode != 0 and "expected one 0/1 (vocabulary 2) per token" in r.stderr, r.stderr[-1500:]


def test_loss_mask_in_python_leaves_masked_positions_without_gradient():
    """Transformer.loss(tokens, loss_mask=...): the cross-entropy of the
    marked targets only (computed again from the logits), no gradient at
    the other positions, attention still over every token."""
    import torch

    import moeyard

    torch.manual_seed(0)
    model = moeyard.Transformer({"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                 "ffn_size": 64, "max_seq_len": 16, "moe": {"num_experts": 4, "top_k": 2}})
    tokens = torch.randint(0, 64, (3, 12))
    loss_mask = torch.rand(3, 12) < 0.5
    out = model.loss(tokens, loss_mask=loss_mask)
    logits = out["logits"]
    keep = loss_mask[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1][keep], tokens[:, 1:][keep])
    torch.testing.assert_close(out["ce"], want, atol=1e-6, rtol=1e-6)
    assert out["tokens"].item() == keep.sum().item()
    (g,) = torch.autograd.grad(out["ce"], logits)
    assert g[:, :-1][~keep].abs().max().item() == 0 and g[:, :-1][keep].abs().max().item() > 0
    none = model.loss(tokens, loss_mask=torch.zeros(3, 12, dtype=torch.bool))
    assert none["ce"].item() == 0


def test_tensorboard_event_files_hold_the_metrics(tmp_path, shards):
    """log.tensorboard: TensorBoard's own reader finds every number of
    metrics.jsonl at its step (per MoE layer under moe/<stat>/layer<i>), the
    throughput, and the expert-load heatmap as a PNG of one row of cells per
    MoE layer. The progress line shows TFLOP/s, MFU, parameters and memory."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    r = data_run(tmp_path, shards, "run", "--set", f"log.tensorboard={tb}", "--set", "log.every=1",
                 "--set", "log.peak_tflops=100")
    assert r.returncode == 0, r.stderr[-2000:]
    line = re.compile(r"tok/s \| [\d.e+-]+ TFLOP/s \(MFU [\d.]+%\) \| [\d.]+B params \| mem \d+ MB")
    assert line.search(r.stdout + r.stderr), r.stdout[-1500:]
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    tags = acc.Tags()["scalars"]
    for rec in records:
        for key in ("loss", "ce", "lr", "grad_norm"):
            got = {e.step: e.value for e in acc.Scalars(key)}
            assert got[rec["step"]] == pytest.approx(rec[key], rel=1e-6)
        for layer in rec["moe_layers"]:
            got = {e.step: e.value for e in acc.Scalars(f"moe/real_experts_per_token/layer{layer['layer']}")}
            assert got[rec["step"]] == pytest.approx(layer["real_experts_per_token"], rel=1e-6)
    assert "tokens_per_s" in tags
    images = acc.Images("moe/expert_load")
    assert [i.step for i in images] == [rec["step"] for rec in records]
    img = Image.open(io.BytesIO(images[-1].encoded_image_string))
    layers, experts = len(records[-1]["moe_layers"]), len(records[-1]["moe_layers"][0]["tokens_per_expert"])
    assert img.size == (experts * 16, layers * 16) and img.mode == "L"
    counts = records[-1]["moe_layers"][0]["tokens_per_expert"]
    busiest = max(max(layer["tokens_per_expert"]) for layer in records[-1]["moe_layers"])
    assert [img.getpixel((16 * e + 8, 8)) for e in range(experts)] == [round(c / busiest * 255) for c in counts]
