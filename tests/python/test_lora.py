"""LoRA fine-tuning (finetune.lora): training from a Hugging Face init changes
only the LoRA factors; the PEFT adapter export loads into transformers with
peft and reproduces moeyard's logits; the merged export loads into plain
transformers and does too; frozen weights stored in bfloat16; the experts'
LoRA gradients against the chain rule through the merged weights; under
tensor parallelism, the same run as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_finetune import overrides, run, small_tokenizer  # noqa: E402
from test_hf_import import make_hf  # noqa: E402

# Mixtral: every layer MoE, sliding window. Qwen3-MoE: a dense MLP layer, q/k
# norm. DeepSeek-V3: multi-head latent attention, shared experts. GPT-OSS:
# experts stored transposed with gate/up interleaved, biases everywhere.
FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]
LORA = {"finetune.lora.rank": 4, "finetune.lora.alpha": 8, "finetune.lora.base_dtype": "model"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data")
    small_tokenizer(root / "tokenizer.json")
    out = root / "shards"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--out", str(out),
                    "--tokenizer", str(root), "--max-bytes", "200000",
                    "--builtin"],  # the standard library's sources: a docs edit must not move the runs
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_hf")
    out = {}
    for fam in FAMILIES:
        make_hf(fam, seed=3).save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def lora_args(extra=None):
    args = ["--set", "parallel.expert_parallel=1"]  # the config's layout is for 8 GPUs
    for k, v in {**LORA, **(extra or {})}.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.fixture(scope="module")
def trained(hf_dirs, data, tmp_path_factory):
    """family -> run directory of a 30-step LoRA fine-tune."""
    out = {}
    cfg = os.path.join(ROOT, "configs", "finetune_lora.yaml")
    for fam in FAMILIES:
        run_dir = tmp_path_factory.mktemp("lora_run") / fam
        run("train", "--config", cfg, *overrides(hf_dirs[fam], data, run_dir, steps=30),
            "--set", "optim.lr=1e-2", "--set", "moe.capacity_factor=0", *lora_args())
        out[fam] = run_dir
    return out


def tokens(seed=0, B=2, S=16):
    return torch.randint(0, 90, (B, S), generator=torch.Generator().manual_seed(seed))


def step_dir(run_dir):
    return run_dir / open(run_dir / "latest").read().strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_changes_only_the_factors(hf_dirs, trained, family):
    run_dir = trained[family]
    rec = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    first = sum(r["ce"] for r in rec[:3]) / 3
    last = sum(r["ce"] for r in rec[-3:]) / 3
    assert last < first - 0.3, (first, last)
    base = dict(moeyard.Transformer.from_hf(hf_dirs[family]).named_parameters())
    ours = dict(moeyard.Transformer.from_checkpoint(run_dir).named_parameters())
    lora = sorted(n for n in ours if ".lora_" in n)
    assert set(ours) - set(lora) == set(base)
    for n, p in base.items():  # the base, bit for bit
        assert torch.equal(ours[n], p), n
    # Every kind of target got factors, and the B factors (zero at the
    # start) moved.
    kinds = {n.split(".")[2] for n in lora}
    assert {"moe", "attn"} <= kinds, kinds
    if family == "qwen3_moe":
        assert "layers.0.mlp.gate_up.lora_b" in lora
    if family == "deepseek_v3":
        assert "layers.0.attn.kv_a_proj.lora_a" in lora and "layers.1.moe.lora_down_b" in lora
    if family == "gpt_oss":
        assert "layers.0.moe.lora_gate_up_b" in lora
    for n in lora:
        if n.endswith("_b"):
            assert ours[n].abs().max() > 0, n
    # The optimizer holds state for the factors only.
    opt = moeyard._C.load_checkpoint(str(step_dir(run_dir)), "optimizer")
    named = {k.rsplit(".", 1)[0] for k in opt}
    assert named == set(lora), sorted(named ^ set(lora))[:5]


def peft_model(hf_dir, adapter):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_reproduces_the_logits(hf_dirs, trained, family, tmp_path):
    out = tmp_path / "adapter"
    run("convert", "--to", "peft", "--checkpoint", str(trained[family]), "--out", str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_parameters"]
    ours = moeyard.Transformer.from_checkpoint(trained[family])
    t = tokens()
    want = ours(t)["logits"]
    model = peft_model(hf_dirs[family], out)
    # Every tensor of the file is in the model (none silently dropped).
    sd = model.state_dict()
    for k, v in load_file(str(out / "adapter_model.safetensors")).items():
        k = k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight")
        assert torch.equal(sd[k], v), k
    with torch.no_grad():
        got = model(input_ids=t).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()(input_ids=t).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() > 1e-2  # the adapter matters


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_reproduces_the_logits(trained, family, tmp_path):
    out = tmp_path / "merged"
    run("convert", "--to", "hf", "--checkpoint", str(trained[family]), "--out", str(out))
    ours = moeyard.Transformer.from_checkpoint(trained[family])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    t = tokens(1)
    with torch.no_grad():
        got = merged(input_ids=t).logits
    assert (got - ours(t)["logits"]).abs().max().item() < 1e-4
    # moeyard reads the merged export back to the same model.
    again = moeyard.Transformer.from_hf(out).eval()
    assert (again(t)["logits"] - ours(t)["logits"]).abs().max().item() < 1e-4


def test_peft_adapter_of_attention_only_keeps_dropout(hf_dirs, data, tmp_path):
    run_dir = tmp_path / "run"
    run("train", "--config", os.path.join(ROOT, "configs", "finetune_lora.yaml"),
        *overrides(hf_dirs["mixtral"], data, run_dir, steps=3),
        *lora_args({"finetune.lora.targets": "[q_proj,v_proj]", "finetune.lora.dropout": 0.1}))
    out = tmp_path / "adapter"
    run("convert", "--to", "peft", "--checkpoint", str(run_dir), "--out", str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] is None and cfg["lora_dropout"] == 0.1
    assert sorted(m.rsplit(".", 1)[1] for m in cfg["target_modules"]) == ["q_proj"] * 3 + ["v_proj"] * 3
    ours = moeyard.Transformer.from_checkpoint(run_dir)
    t = tokens(2)
    with torch.no_grad():
        got = peft_model(hf_dirs["mixtral"], out)(input_ids=t).logits
    assert (got - ours(t)["logits"]).abs().max().item() < 1e-5


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n and n.endswith("_b"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def test_bfloat16_base_storage(hf_dirs):
    path = hf_dirs["qwen3_moe"]
    m = moeyard.Transformer.from_hf(path).eval()
    m.add_lora(rank=4, alpha=8, base_dtype="bfloat16")
    params = dict(m.named_parameters())
    assert params["layers.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert params["layers.1.moe.w_gate_up"].dtype == torch.bfloat16
    assert params["layers.0.attn.q_proj.lora_a"].dtype == torch.float32
    assert params["embed.weight"].dtype == torch.float32  # not a LoRA target
    assert all(p.requires_grad == (".lora_" in n) for n, p in params.items())
    randomize_b(m)
    # Reference: the float32 model with the bf16-rounded base plus s * B A.
    ref = moeyard.Transformer.from_hf(path).eval()
    merged = m.lora_merged_weights()
    ref.load_state_dict({n: (merged[n] if n in merged else p.float()) for n, p in params.items()
                         if ".lora_" not in n})
    q = "layers.0.attn.q_proj."
    want = params[q + "weight"].float() + 2 * params[q + "lora_b"] @ params[q + "lora_a"]
    torch.testing.assert_close(merged[q + "weight"], want, rtol=0, atol=1e-6)
    t = tokens(3)
    assert (m(t)["logits"] - ref(t)["logits"]).abs().max().item() < 1e-4


def test_bfloat16_base_trains(hf_dirs, data, tmp_path):
    run_dir = tmp_path / "run"
    run("train", "--config", os.path.join(ROOT, "configs", "finetune_lora.yaml"),
        *overrides(hf_dirs["mixtral"], data, run_dir, steps=4),
        *lora_args({"finetune.lora.base_dtype": "bfloat16"}))
    ckpt = moeyard._C.load_checkpoint(str(step_dir(run_dir)), "model")
    assert ckpt["layers.0.moe.w_down"].dtype == torch.bfloat16
    assert ckpt["layers.0.moe.lora_down_b"].dtype == torch.float32
    want = moeyard.Transformer.from_hf(hf_dirs["mixtral"]).state_dict()["layers.0.moe.w_down"]
    assert torch.equal(ckpt["layers.0.moe.w_down"], want.to(torch.bfloat16))


TINY = {"vocab_size": 61, "hidden_size": 16, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "ffn_size": 24, "max_seq_len": 32, "dtype": "float64",
        "moe": {"num_experts": 4, "top_k": 2, "moe_every_n": 2, "capacity_factor": 0.0}}


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_expert_lora_gradients_follow_the_chain_rule(capacity):
    """dL/dB_e = s G_e A_e^T and dL/dA_e = s B_e^T G_e, G_e the gradient of
    expert e's merged weight computed by the plain (LoRA-free) model; the
    same for every Linear. float64; dropless and with a capacity."""
    cfg = {**TINY, "moe": {**TINY["moe"], "capacity_factor": capacity}}
    torch.manual_seed(0)
    m = moeyard.Transformer(cfg).train()
    m._impl.init_weights(0.3)
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.add_lora(rank=3, alpha=6, dropout=0.0)
    randomize_b(m)
    t = tokens(4, B=3, S=12) % 61
    m.loss(t)["loss"].backward()
    params = dict(m.named_parameters())

    ref = moeyard.Transformer(cfg).train()
    merged = m.lora_merged_weights()
    ref.load_state_dict({n: merged.get(n, base[n]) for n in base})
    ref.loss(t)["loss"].backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    s = 2.0
    checked = 0
    for n, g in ((n, grads[n]) for n in merged):
        stem, leaf = n.rsplit(".", 1)
        # Linear: <stem>.lora_{a,b}; experts: <stem>.lora_{gate_up,down}_{a,b}.
        pre = stem + ".lora_" if leaf == "weight" else stem + ".lora_" + leaf[2:] + "_"
        a, b = params[pre + "a"], params[pre + "b"]
        torch.testing.assert_close(b.grad, s * g @ a.detach().transpose(-2, -1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.grad, s * b.detach().transpose(-2, -1) @ g, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked >= 2 + 4 * 2  # the expert pairs and every attention projection
    assert params["layers.1.moe.lora_gate_up_a"].grad.abs().sum() > 0
    # The base gets no gradient.
    assert all(p.grad is None for n, p in params.items() if ".lora_" not in n)


def test_lora_target_matching_nothing_is_an_error(hf_dirs, data, tmp_path):
    r = run("train", "--config", os.path.join(ROOT, "configs", "finetune_lora.yaml"),
            *overrides(hf_dirs["mixtral"], data, tmp_path / "r", steps=2),
            *lora_args({"finetune.lora.targets": "[kv_b_proj]"}), check=False)
    assert r.returncode == 1
    assert "finetune.lora.targets: 'kv_b_proj' matches no layer of this model" in r.stderr, r.stderr


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_lora_under_tensor_parallelism_equals_one_process(data, tmp_path, family):
    """TP2 cuts each factor like its weight (B by rows beside q/k/v and
    gate_up, A by columns beside o_proj and down; MLA's low-rank projections
    whole) and sums the whole factors' gradients over TP: the losses and the
    trained factors equal the one-process run's."""
    from test_distributed import torchrun

    hf = tmp_path / "hf"  # a vocabulary that splits in two
    make_hf(family, seed=3, vocab_size=96).save_pretrained(hf)
    cfg = os.path.join(ROOT, "configs", "finetune_lora.yaml")
    common = [*lora_args(), "--set", "moe.capacity_factor=0", "--set", "optim.lr=1e-2",
              "--set", "train.micro_batch=2"]
    run("train", "--config", cfg, *overrides(hf, data, tmp_path / "one", steps=4), *common)
    r = torchrun(2, "train", "--config", cfg, *overrides(hf, data, tmp_path / "two", steps=4), *common,
                 "--set", "parallel.tensor_parallel=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses
    one = dict(moeyard.Transformer.from_checkpoint(tmp_path / "one").named_parameters())
    two = dict(moeyard.Transformer.from_checkpoint(tmp_path / "two").named_parameters())
    lora = [n for n in one if ".lora_" in n]
    assert {"layers.0.attn.o_proj.lora_a", "layers.0.mlp.down.lora_b"} <= set(lora)
    # Adam turns summation-order differences of near-zero gradients into
    # update differences: 2e-4 is 0.5% of the 4 steps' largest move (4 lr).
    for n in lora:
        assert one[n].shape == two[n].shape, n
        assert (one[n] - two[n]).abs().max().item() < 2e-4, n
        if n.endswith("_b"):
            assert one[n].abs().max() > 0, n  # trained
