"""Quantized Hugging Face releases: DeepSeek-V3's block-scaled FP8 and
GPT-OSS's MXFP4.

transformers saves a tiny random model; the test quantizes its weights in
the published formats with its own quantizers (FP8: per-block amax / 448
scales; MXFP4: per-32 shared power-of-two exponents and E2M1 nibbles), writes
them with the quantization_config into a checkpoint directory, and also
writes a reference directory of its own dequantization (unquantized,
without quantization_config). moeyard's import of the quantized directory
must equal its import of the reference bit for bit (dequantization is
exact: fp8 * scale rounded once to float32, fp4 * 2^e), and its logits must
match transformers running the reference weights. Other tensors are stored
in bfloat16, as in the releases."""

import json

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

V, B, S = 61, 2, 10
FP8_MAX = 448.0  # largest float8_e4m3fn
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
GPT_OSS_UNQUANTIZED = ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                       "model.embed_tokens", "lm_head"]


# ---- quantizers and reference dequantizers ------------------------------------

def quantize_fp8(w, block):
    """w [R, C] -> float8_e4m3fn w / scale and float32 scale_inv
    [ceil(R / br), ceil(C / bc)], scale = block amax / 448."""
    (R, C), (br, bc) = w.shape, block
    nR, nC = -(-R // br), -(-C // bc)
    padded = torch.zeros(nR * br, nC * bc)
    padded[:R, :C] = w
    amax = padded.view(nR, br, nC, bc).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.float()


def dequantize_fp8(q, scale, block):
    """Block by block: float(q) * scale_inv[i, j] in float32."""
    br, bc = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def quantize_mxfp4(w):
    """w [E, in, out] (GPT-OSS's layout) -> blocks [E, out, in / 32, 16]
    uint8 (low nibble first) and E8M0 scales [E, out, in / 32] uint8."""
    g = w.transpose(1, 2).double().reshape(w.shape[0], w.shape[2], -1, 32)
    amax = g.abs().amax(-1)
    # The largest E2M1 value is 1.5 * 2^2: the block's exponent minus 2.
    e = (torch.floor(torch.log2(amax.clamp(min=2.0 ** -120))) - 2).clamp(-127, 127)
    nibbles = ((g / torch.exp2(e)[..., None])[..., None] - FP4).abs().argmin(-1).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks, (e + 127).to(torch.uint8)


def dequantize_mxfp4(blocks, scales):
    """FP4 values times 2^(s - 127), back to the [E, in, out] layout."""
    pow2 = torch.tensor([2.0 ** (s - 127) for s in range(256)], dtype=torch.float64)
    vals = torch.stack([FP4[(blocks & 15).long()], FP4[(blocks >> 4).long()]], -1).flatten(-2)
    dense = (vals * pow2[scales.long()][..., None]).flatten(-2).float()
    return dense.transpose(1, 2).contiguous()


def test_references_agree_with_transformers_dequantizers():
    """The test's reference dequantizers read the formats as transformers'
    own (convert_moe_packed_tensors; Fp8Dequantize where blocks divide)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(5)
    blocks, scales = quantize_mxfp4(torch.randn(3, 64, 96))
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales), want)
    q, s = quantize_fp8(torch.randn(48, 192), (16, 24))
    want = Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
    assert torch.equal(dequantize_fp8(q, s, (16, 24)), want)


# ---- tiny models and their quantized directories ------------------------------

def randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    return model.eval()


def deepseek_v3(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=192, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=160, moe_intermediate_size=64, n_routed_experts=4,
        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=48,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
        num_nextn_predict_layers=0)
    return randomize(transformers.DeepseekV3ForCausalLM(cfg))


def gpt_oss(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
        tie_word_embeddings=False)
    return randomize(transformers.GptOssForCausalLM(cfg))


def fp8_quantized(name, t):
    """DeepSeek-V3's release: every linear weight is FP8 except the
    embeddings, lm_head and the router (mlp.gate); norms stay as they are."""
    return (t.dim() == 2 and name.endswith(".weight") and "norm" not in name
            and name not in ("model.embed_tokens.weight", "lm_head.weight")
            and not name.endswith("mlp.gate.weight"))


def write(d, config, tensors):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "model.safetensors"))
    return d


def quantized_dirs(model, tmp_path, method, block=(128, 128)):
    """(quantized dir, reference dir) of `model`."""
    model.save_pretrained(tmp_path / "orig")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    files = load_file(str(tmp_path / "orig" / "model.safetensors"))
    quant, ref = {}, {}
    for name, t in files.items():
        if method == "fp8" and fp8_quantized(name, t):
            q, s = quantize_fp8(t, block)
            quant[name], quant[name[:-len("weight")] + "weight_scale_inv"] = q, s
            ref[name] = dequantize_fp8(q, s, block)
        elif method == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quant[name + "_blocks"], quant[name + "_scales"] = quantize_mxfp4(t)
            ref[name] = dequantize_mxfp4(quant[name + "_blocks"], quant[name + "_scales"])
        else:
            quant[name] = t.to(torch.bfloat16)
            ref[name] = quant[name].float()
    qcfg = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": list(block)} if method == "fp8" else
            {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_UNQUANTIZED})
    return (write(tmp_path / "quant", {**config, "quantization_config": qcfg}, quant),
            write(tmp_path / "ref", config, ref))


def tokens():
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))


def params(model):
    return dict(model.named_parameters())


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for n in pa:
        assert pa[n].dtype == pb[n].dtype, n
        assert torch.equal(pa[n], pb[n]), n


# ---- import equals the reference dequantization --------------------------------

@pytest.mark.parametrize("family,method,block", [
    ("deepseek_v3", "fp8", (128, 128)),  # the release's blocks; 192 = 1.5 blocks
    ("deepseek_v3", "fp8", (16, 24)),  # 40, 160, 48 rows: partial edge blocks
    ("gpt_oss", "mxfp4", None),
])
def test_quantized_release_imports_as_its_dequantization(tmp_path, family, method, block):
    hf = deepseek_v3() if family == "deepseek_v3" else gpt_oss()
    qdir, rdir = quantized_dirs(hf, tmp_path, method, block)
    assert any(t.dtype in (torch.float8_e4m3fn, torch.uint8) for t in load_file(str(qdir / "model.safetensors")).values())
    ours = moeyard.Transformer.from_hf(qdir).eval()
    assert_same_params(ours, moeyard.Transformer.from_hf(rdir))
    # The quantization changed the weights: the comparison is not vacuous.
    orig = params(moeyard.Transformer.from_hf(tmp_path / "orig"))
    assert any(not torch.equal(p, orig[n]) for n, p in params(ours).items() if "moe.w_" in n)
    ref = transformers.AutoModelForCausalLM.from_pretrained(rdir, attn_implementation="eager").eval()
    t = tokens()
    with torch.no_grad():
        want = ref(input_ids=t).logits.float()
    assert (ours(t)["logits"] - want).abs().max().item() < 1e-4


def test_gpt_oss_expert_orientation(tmp_path):
    """The dequantized gate_up blocks [E, 2I, H] are moeyard's w_gate_up
    [E, 2F, H] once gate and up rows are de-interleaved; down [E, H, I] is
    w_down as it is."""
    qdir, _ = quantized_dirs(gpt_oss(), tmp_path, "mxfp4")
    files = load_file(str(qdir / "model.safetensors"))
    x = "model.layers.1.mlp.experts."
    gate_up = dequantize_mxfp4(files[x + "gate_up_proj_blocks"], files[x + "gate_up_proj_scales"])
    down = dequantize_mxfp4(files[x + "down_proj_blocks"], files[x + "down_proj_scales"])
    p = params(moeyard.Transformer.from_hf(qdir))
    gu = gate_up.transpose(1, 2)
    assert torch.equal(p["layers.1.moe.w_gate_up"], torch.cat([gu[:, 0::2], gu[:, 1::2]], 1))
    assert torch.equal(p["layers.1.moe.w_down"], down.transpose(1, 2))


@pytest.mark.parametrize("family,method", [("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_dequantizes_into_bfloat16(tmp_path, family, method):
    hf = deepseek_v3() if family == "deepseek_v3" else gpt_oss()
    qdir, rdir = quantized_dirs(hf, tmp_path, method, (128, 128))
    ours = moeyard.Transformer.from_hf(qdir, dtype="bfloat16").eval()
    assert params(ours)["layers.1.moe.w_down"].dtype == torch.bfloat16
    # The float32 products rounded once to bfloat16.
    assert_same_params(ours, moeyard.Transformer.from_hf(rdir, dtype="bfloat16"))
    f32 = moeyard.Transformer.from_hf(rdir).eval()
    t = tokens()
    got, want = ours(t)["logits"].float(), f32(t)["logits"]
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("family,method", [("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_export_is_unquantized(tmp_path, family, method):
    """The export writes dense weights and drops quantization_config, so
    transformers loads it as an ordinary checkpoint."""
    hf = deepseek_v3() if family == "deepseek_v3" else gpt_oss()
    qdir, _ = quantized_dirs(hf, tmp_path, method)
    ours = moeyard.Transformer.from_hf(qdir).eval()
    ours.save_hf(tmp_path / "out", family, base_config=json.loads((qdir / "config.json").read_text()))
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    dtypes = {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()}
    assert dtypes == {torch.float32}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    t = tokens()
    with torch.no_grad():
        want = back(input_ids=t).logits.float()
    assert (ours(t)["logits"] - want).abs().max().item() < 1e-4


# ---- refused files ------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    qdir, _ = quantized_dirs(deepseek_v3(), d, "fp8")
    return json.loads((qdir / "config.json").read_text()), load_file(str(qdir / "model.safetensors"))


@pytest.fixture(scope="module")
def mxfp4_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mxfp4")
    qdir, _ = quantized_dirs(gpt_oss(), d, "mxfp4")
    return json.loads((qdir / "config.json").read_text()), load_file(str(qdir / "model.safetensors"))


Q = "model.layers.0.self_attn.q_a_proj.weight"  # [48, 192]: 1 x 2 blocks of 128
GU = "model.layers.0.mlp.experts.gate_up_proj"  # blocks [4, 64, 2, 16]


def qc(**kw):
    return lambda c, t: c["quantization_config"].update(kw)


@pytest.mark.parametrize("edit,match", [
    (qc(quant_method="gptq"), "quant_method 'gptq' is not supported \\(fp8"),
    (qc(fmt="e5m2"), "quantization_config: key 'fmt' = \"e5m2\" is not supported"),
    (qc(weight_block_size=[128]), "weight_block_size = \\[128\\], expected two positive block sizes"),
    (qc(weight_block_size=[0, 128]), "weight_block_size = \\[0,128\\], expected two positive"),
    (qc(weight_block_size=None), "weight_block_size is null"),
    (qc(activation_scheme="static"), "'activation_scheme' = \"static\" is not supported"),
    (lambda c, t: c.update(quantization_config=[1]), "quantization_config must be an object"),
    (lambda c, t: c.pop("quantization_config"),
     "weight' is float8_e4m3fn, but .*config.json has no quantization_config \\(expected quant_method 'fp8'"),
    (lambda c, t: t.pop(Q + "_scale_inv"), f"tensor '{Q}' is float8_e4m3fn without its scale '{Q}_scale_inv'"),
    (lambda c, t: t.update({Q + "_scale_inv": torch.ones(2, 2)}),
     f"tensor '{Q}' \\(scale .*: the scale has shape \\[2, 2\\], expected \\[1, 2\\] "
     "for a weight of shape \\[48, 192\\] in 128x128 blocks"),
    (qc(weight_block_size=[64, 64]), "the scale has shape \\[.*\\], expected \\[.*\\] for a weight .* in 64x64 blocks"),
    (lambda c, t: t.update({Q: t[Q].float()}), f"'{Q}_scale_inv' scales '{Q}', which is Float"),
])
def test_bad_fp8_files_are_errors(fp8_files, tmp_path, edit, match):
    config, tensors = json.loads(json.dumps(fp8_files[0])), dict(fp8_files[1])
    edit(config, tensors)
    with pytest.raises(RuntimeError, match=match):
        moeyard.Transformer.from_hf(write(tmp_path / "bad", config, tensors))


def nan_scale(c, t):
    s = t[GU + "_scales"].clone()
    s[1, 2, 0] = 255
    t[GU + "_scales"] = s


@pytest.mark.parametrize("edit,match", [
    (lambda c, t: c.pop("quantization_config"),
     "_blocks' is MXFP4-quantized '.*', but .*config.json has no quantization_config"),
    (qc(quant_method="fp8"), "expected quant_method 'mxfp4'"),
    (lambda c, t: t.pop(GU + "_scales"), f"tensor '{GU}_blocks' has no scales '{GU}_scales'"),
    (lambda c, t: t.update({GU + "_blocks": t[GU + "_blocks"][..., :8].contiguous()}),
     f"'{GU}_blocks' \\(scales .*: blocks of dtype Byte and shape \\[4, 64, 2, 8\\], expected uint8"),
    (lambda c, t: t.update({GU + "_scales": t[GU + "_scales"][:, :32].contiguous()}),
     "scales of dtype Byte and shape \\[4, 32, 2\\], expected uint8 \\(U8\\) \\[4, 64, 2\\]"),
    (lambda c, t: t.update({GU + "_blocks": torch.zeros(4, 8, dtype=torch.uint8)}),
     f"'{GU}_blocks' has shape \\[4, 8\\], expected \\[..., rows, groups, 16\\]"),
    (lambda c, t: t.update({GU + "_blocks": t[GU + "_blocks"][:, :, :1].contiguous(),
                            GU + "_scales": t[GU + "_scales"][:, :, :1].contiguous()}),
     f"'{GU}' has shape \\[4, 64, 32\\], the model expects \\[4, 64, 64\\]"),
    (nan_scale, "scale byte 255 \\(NaN in E8M0\\) at flat index 132"),
])
def test_bad_mxfp4_files_are_errors(mxfp4_files, tmp_path, edit, match):
    config, tensors = json.loads(json.dumps(mxfp4_files[0])), dict(mxfp4_files[1])
    edit(config, tensors)
    with pytest.raises(RuntimeError, match=match):
        moeyard.Transformer.from_hf(write(tmp_path / "bad", config, tensors))
