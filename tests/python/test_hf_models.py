"""The model expresses OLMoE, DeepSeek-V3 and GPT-OSS exactly.

For each family a tiny random ``transformers`` model is built from the
family's own config class, saved with ``save_pretrained`` and read back by
moeyard's C++ importer, and the logits (with and without left/right padding)
and the experts each MoE layer selects must agree. The features under test:
``clip_qkv`` (OLMoE); multi-head latent attention with and without the q
low-rank path, interleaved rotary pairs, YaRN mscale in the softmax scale,
dense first layers and group-limited sigmoid routing (DeepSeek-V3);
attention biases and sinks, alternating sliding/full layers, YaRN without
truncation, router bias, expert biases and the clamped SwiGLU (GPT-OSS).
"""

import json
import math

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

V, H, B, S = 61, 64, 3, 12
TOL = 1e-4


# ---- building and running the transformers models ---------------------------

def randomize(model):
    """Weights away from their init so that a missed norm or bias shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("sinks"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def build(config_cls, model_cls, seed, **kw):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=V, hidden_size=H, max_position_embeddings=64, tie_word_embeddings=False,
                     pad_token_id=None, bos_token_id=None, eos_token_id=None, **kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return randomize(model_cls(cfg))


def tokens_and_mask(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return tokens, mask


def hf_run(model, router_attr, tokens, mask=None):
    """Logits and, per MoE layer, the selected experts [B*S, K] (hooks on the
    router module, whose third output is the indices in all three families)."""
    chosen = []
    hooks = []
    for layer in model.model.layers:
        router = getattr(layer.mlp, router_attr, None)
        if router is not None:
            hooks.append(router.register_forward_hook(lambda m, i, o: chosen.append(o[2])))
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=mask).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def assert_parity(hf, ours, router_attr, k):
    """Logits within TOL without and with padding (real positions), and the
    same experts for every real token of every MoE layer."""
    tokens, mask = tokens_and_mask()
    errors = []
    for m in (None, mask):
        want, hf_idx = hf_run(hf, router_attr, tokens, m)
        with torch.no_grad():
            out = ours(tokens, m)
        real = torch.ones(B, S, dtype=torch.bool) if m is None else m.bool()
        err = (out["logits"][real] - want[real]).abs().max().item()
        errors.append(err)
        assert err < TOL, f"logits differ by {err} (mask={m is not None})"
        assert len(out["moe_layers"]) == len(hf_idx) > 0
        for stats, idx in zip(out["moe_layers"], hf_idx):
            got = stats["indices"].reshape(-1, k)[real.flatten()].sort(-1).values
            exp = idx.reshape(-1, k)[real.flatten()].sort(-1).values
            assert torch.equal(got, exp), f"experts differ in layer {stats['layer']}"
    return max(errors)


def assert_cache_matches_recompute(ours):
    prompt = [5, 17, 3, 42, 8, 1, 29]
    greedy = ours.generate(prompt, 14, temperature=0.0)
    assert greedy == ours.generate(prompt, 14, temperature=0.0, use_cache=False)
    sampled = ours.generate(prompt, 14, temperature=1.0, seed=3)
    assert sampled == ours.generate(prompt, 14, temperature=1.0, seed=3, use_cache=False)


def import_hf(hf, directory):
    """moeyard's model of the directory transformers' save_pretrained writes."""
    hf.save_pretrained(directory)
    return moeyard.Transformer.from_hf(directory).eval()


def reimport(directory, out, edit_config=None, edit_tensor=None):
    """The checkpoint in `directory` with config.json edited in place by
    `edit_config(cfg)` and each tensor replaced by `edit_tensor(name, t)`,
    written to `out` and imported."""
    out.mkdir()
    cfg = json.loads((directory / "config.json").read_text())
    if edit_config is not None:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(directory / "model.safetensors"))
    if edit_tensor is not None:
        tensors = {k: edit_tensor(k, v) for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"))
    return moeyard.Transformer.from_hf(out).eval()


def load(config, state):
    ours = moeyard.Transformer(config).eval()
    ours.load_state_dict(state)
    return ours


# ---- OLMoE -----------------------------------------------------------------

def olmoe_model(clip_qkv=0.6):
    return build(transformers.OlmoeConfig, transformers.OlmoeForCausalLM, seed=0, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=24, num_experts=6,
                 num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=clip_qkv)


def test_olmoe_parity_with_clip_qkv(tmp_path):
    hf = olmoe_model()
    ours = import_hf(hf, tmp_path / "olmoe")
    err = assert_parity(hf, ours, "gate", k=2)
    print(f"olmoe max abs logit error {err:.2e}")
    # the clip matters here: without it the logits move
    unclipped = reimport(tmp_path / "olmoe", tmp_path / "unclipped", lambda c: c.update(clip_qkv=None))
    tokens, _ = tokens_and_mask()
    with torch.no_grad():
        assert (unclipped(tokens)["logits"] - ours(tokens)["logits"]).abs().max() > 1e-2


# ---- DeepSeek-V3 -------------------------------------------------------------

DSV3_YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


def deepseek_model(q_lora_rank, rope_parameters, rope_interleave):
    return build(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, seed=2, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                 routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                 q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=12, rope_parameters=dict(rope_parameters), rope_interleave=rope_interleave)


DEEPSEEK_VARIANTS = {
    "q_lora+yarn+interleave": (32, DSV3_YARN, True),
    "q_proj+default_rope": (None, {"rope_type": "default", "rope_theta": 500.0}, False),
}


@pytest.mark.parametrize("variant", list(DEEPSEEK_VARIANTS))
def test_deepseek_v3_parity(variant, tmp_path):
    hf = deepseek_model(*DEEPSEEK_VARIANTS[variant])
    with torch.no_grad():  # the selection bias must matter
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    ours = import_hf(hf, tmp_path / "deepseek")
    names = {n for n, _ in ours.named_parameters()}
    assert ("layers.1.attn.q_a_proj.weight" in names) == (variant.startswith("q_lora"))
    assert ("layers.1.attn.q_proj.weight" in names) != (variant.startswith("q_lora"))
    assert "layers.0.mlp.gate_up.weight" in names and "layers.1.moe.w_gate_up" in names
    err = assert_parity(hf, ours, "gate", k=2)
    print(f"deepseek-v3 {variant} max abs logit error {err:.2e}")
    assert_cache_matches_recompute(ours)


# deepseek_model(32, DSV3_YARN, True) in moeyard's own config keys.
DSV3_CONFIG = dict(vocab_size=V, hidden_size=H, num_layers=3, num_heads=4, ffn_size=96, norm_eps=1e-6,
                   attention="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=12, rope_theta=500.0, rope_interleave=True, rope_scaling="yarn", rope_factor=4.0,
                   rope_original_max_position=16, yarn_mscale=1.0, yarn_mscale_all_dim=0.8, max_seq_len=64,
                   tie_embeddings=False,
                   moe=dict(num_experts=8, top_k=2, ffn_size=24, first_k_dense=1, score_fn="sigmoid",
                            selection_bias=True, renormalize=True, scale=2.5, num_groups=4, topk_groups=2,
                            num_shared_experts=1, shared_ffn_size=24))


def test_deepseek_v3_mscale_scales_the_softmax(tmp_path):
    """yarn_mscale_all_dim enters MLA's softmax scale (as transformers does):
    dropping it moves the logits, and attention_scale can override it. The
    weights are the importer's; the config is the imported one, in moeyard's
    keys (the same logits as the import)."""
    hf = deepseek_model(32, DSV3_YARN, True)
    imported = import_hf(hf, tmp_path / "deepseek")
    config, state = DSV3_CONFIG, imported.state_dict()
    tokens, _ = tokens_and_mask()
    with torch.no_grad():
        base = load(config, state)(tokens)["logits"]
        torch.testing.assert_close(base, imported(tokens)["logits"], atol=0, rtol=0)
        m = 0.1 * 0.8 * math.log(4.0) + 1.0
        explicit = load(dict(config, attention_scale=24 ** -0.5 * m * m), state)(tokens)["logits"]
        torch.testing.assert_close(explicit, base, atol=1e-6, rtol=1e-6)
        plain = load(dict(config, attention_scale=24 ** -0.5), state)(tokens)["logits"]
        assert (plain - base).abs().max() > 1e-3


# ---- GPT-OSS -----------------------------------------------------------------

GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def gpt_oss_model():
    return build(transformers.GptOssConfig, transformers.GptOssForCausalLM, seed=4, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=24,
                 num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.5,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 rope_parameters=dict(GPT_OSS_YARN))


def test_gpt_oss_parity(tmp_path):
    hf = gpt_oss_model()
    ours = import_hf(hf, tmp_path / "gpt_oss")
    err = assert_parity(hf, ours, "router", k=2)
    print(f"gpt-oss max abs logit error {err:.2e}")
    assert_cache_matches_recompute(ours)  # 21 positions > sliding window 4


def test_gpt_oss_features_matter(tmp_path):
    """Each GPT-OSS feature changes the logits of this tiny model, so the
    parity test above does test it. Each variant is the checkpoint with one
    feature turned off in its files: sinks of -1e4 (no weight in the
    softmax), every layer full, YaRN truncated, no clamp, zero expert biases."""
    hf = gpt_oss_model()
    d = tmp_path / "gpt_oss"
    tokens, _ = tokens_and_mask()

    def rope(**kw):
        return lambda c: c.update(rope_parameters=dict(c["rope_parameters"], **kw))

    variants = {
        "sinks": (None, lambda k, t: t.fill_(-1e4) if k.endswith("sinks") else t),
        "layer_types": (lambda c: c.update(layer_types=["full_attention"] * 3), None),
        "truncate": (rope(truncate=True), None),
        "clamp": (lambda c: c.update(swiglu_limit=100.0), None),
        "expert_bias": (None, lambda k, t: t.zero_() if k.endswith("_proj_bias") else t),
    }
    with torch.no_grad():
        base = import_hf(hf, d)(tokens)["logits"]
        for name, (edit_config, edit_tensor) in variants.items():
            out = reimport(d, tmp_path / name, edit_config, edit_tensor)(tokens)["logits"]
            assert (out - base).abs().max() > 1e-3, name


def test_gpt_oss_router_is_softmax_renormalized():
    """Top-k over the logits then softmax over the k == softmax over all,
    top-k, renormalize (moeyard's form)."""
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    top, idx = logits.topk(3, -1)
    w_hf = top.softmax(-1)
    p = logits.softmax(-1)
    w_my = p.gather(1, idx) / p.gather(1, idx).sum(-1, keepdim=True)
    torch.testing.assert_close(w_my, w_hf, atol=1e-6, rtol=1e-6)


# ---- nn.MoE and the op with the new options ---------------------------------------

def test_moe_op_expert_bias_and_clamped_swiglu_match_a_loop():
    torch.manual_seed(3)
    E, F, K, T = 4, 6, 2, 20
    x = torch.randn(T, H)
    rw, wgu, wd = torch.randn(E, H), torch.randn(E, 2 * F, H) * 0.3, torch.randn(E, H, F) * 0.3
    bgu, bd = torch.randn(E, 2 * F), torch.randn(E, H)
    out = torch.ops.moeyard.moe_forward(x, rw, None, wgu, wd, top_k=K, b_gate_up=bgu, b_down=bd,
                                        activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=0.7)
    w, idx = (x @ rw.t()).softmax(-1).topk(K, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            h = wgu[e] @ x[t] + bgu[e]
            g, u = h[:F].clamp(max=0.7), h[F:].clamp(-0.7, 0.7)
            want[t] += w[t, j] * (wd[e] @ ((u + 1) * g * torch.sigmoid(1.702 * g)) + bd[e])
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=1e-5)
    # capacity mode: the padded plan rows take the same per-expert biases
    out_c = torch.ops.moeyard.moe_forward(x, rw, None, wgu, wd, top_k=K, capacity_factor=4.0, b_gate_up=bgu,
                                          b_down=bd, activation="clamped_swiglu", swiglu_limit=0.7)
    torch.testing.assert_close(out_c[0], want, atol=1e-5, rtol=1e-5)
    # defaults unchanged: nn.MoE still works
    moe = moeyard.MoE(H, F, E, K)
    y, _ = moe(x)
    assert y.shape == x.shape


def test_new_parameter_names():
    m = moeyard.Transformer(dict(vocab_size=V, hidden_size=H, num_layers=2, num_heads=4, attention="mla",
                                 q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                 v_head_dim=8, attention_sinks=True, attention_bias=True,
                                 moe=dict(num_experts=4, expert_bias=True, activation="clamped_swiglu")))
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    for i in range(2):
        a = f"layers.{i}.attn."
        assert shapes[a + "q_a_proj.weight"] == (16, H) and a + "q_a_proj.bias" in shapes
        assert shapes[a + "q_a_norm.weight"] == (16,)
        assert shapes[a + "q_b_proj.weight"] == (4 * 12, 16)
        assert shapes[a + "kv_a_proj.weight"] == (8 + 4, H)
        assert shapes[a + "kv_a_norm.weight"] == (8,)
        assert shapes[a + "kv_b_proj.weight"] == (4 * (8 + 8), 8)
        assert shapes[a + "o_proj.weight"] == (H, 4 * 8) and a + "o_proj.bias" in shapes
        assert shapes[a + "sinks"] == (4,)
        assert shapes[f"layers.{i}.moe.b_gate_up"] == (4, 2 * 512)
        assert shapes[f"layers.{i}.moe.b_down"] == (4, H)
    assert not any(".k_proj" in n or ".v_proj" in n for n in shapes)


# ---- bad configs ---------------------------------------------------------------

BASE = dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, ffn_size=48, max_seq_len=64,
            moe=dict(num_experts=4, top_k=2))
MLA = dict(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


@pytest.mark.parametrize("bad,match", [
    (dict(clip_qkv=-1.0), r"clip_qkv \(line 1\): -1.0 is outside \[0, inf\)"),
    (dict(attention="gqa"), r"model.attention must be one of mha, mla, got 'gqa'"),
    (dict(MLA, kv_lora_rank=0), r"model.kv_lora_rank \(line 1\) = 0 must be >= 1 with model.attention \(line 1\) = 'mla'"),
    (dict(MLA, qk_rope_head_dim=5), r"model.qk_rope_head_dim \(line 1\) = 5 must be even"),
    (dict(MLA, v_head_dim=0), r"model.v_head_dim \(line 1\) = 0 must be >= 1 with model.attention \(line 1\) = 'mla'"),
    (dict(MLA, num_kv_heads=2), r"model.num_kv_heads \(line 1\) = 2 must be 0 or model.num_heads \(line 1\) = 4"),
    (dict(MLA, qk_norm="head"),
     r"model.qk_norm \(line 1\) = 'head' must be 'none' with model.attention \(line 1\) = 'mla'"),
    (dict(MLA, clip_qkv=1.0), r"model.clip_qkv \(line 1\) = 1 must be 0 with model.attention \(line 1\) = 'mla'"),
    (dict(attention_scale=-0.5), r"attention_scale \(line 1\): -0.5 is outside \[0, inf\)"),
    (dict(yarn_mscale=-1.0), r"yarn_mscale \(line 1\): -1.0 is outside \[0, inf\)"),
    (dict(layer_types=["full"]), r"model.layer_types \(line 1\) has 1 entries, model.num_layers \(line 1\) = 2"),
    (dict(layer_types=["full", "local"], sliding_window=4),
     r"model.layer_types entry must be one of full, sliding, got 'local'"),
    (dict(layer_types=["full", "sliding"]), r"'sliding' layer but model.sliding_window \(default\) = 0"),
    (dict(layer_types="full sliding"), r"layer_types .*expected a list of strings, got 'full sliding'"),
    (dict(moe=dict(num_experts=4, activation="gelu")),
     r"moe.activation must be one of swiglu, clamped_swiglu, got 'gelu'"),
    (dict(moe=dict(num_experts=4, activation="clamped_swiglu", swiglu_limit=0.0)),
     r"moe.swiglu_limit \(line 1\): 0.0 is outside \(0, inf\)"),
])
def test_bad_config_names_the_field(bad, match):
    cfg = dict(BASE)
    cfg.update(bad)
    with pytest.raises(RuntimeError, match=match):
        moeyard.Transformer(cfg)


def test_bad_expert_bias_shape_names_it():
    x = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match=r"b_gate_up must be \[4, 12\], got \[4, 6\]"):
        torch.ops.moeyard.moe_forward(x, torch.randn(4, 8), None, torch.randn(4, 12, 8), torch.randn(4, 8, 6),
                                      b_gate_up=torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="activation must be one of swiglu, clamped_swiglu, got 'relu'"):
        torch.ops.moeyard.moe_forward(x, torch.randn(4, 8), None, torch.randn(4, 12, 8), torch.randn(4, 8, 6),
                                      activation="relu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_variants_train(dtype):
    """loss().backward() reaches every new parameter (MLA, sinks, expert
    biases), in float32 and bfloat16."""
    torch.manual_seed(5)
    m = moeyard.Transformer(dict(BASE, dtype=dtype, num_layers=3, sliding_window=3,
                                 layer_types=["sliding", "full", "sliding"], attention_sinks=True,
                                 attention_bias=True, **MLA, q_lora_rank=16,
                                 moe=dict(num_experts=4, top_k=2, expert_bias=True, activation="clamped_swiglu",
                                          swiglu_limit=1.0, capacity_factor=1.0)))
    out = m.loss(torch.randint(0, 32, (2, 10)), torch.tensor([[1] * 10, [0] * 3 + [1] * 7]))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    for n in ("layers.0.attn.sinks", "layers.1.attn.kv_b_proj.weight", "layers.2.attn.q_a_proj.bias",
              "layers.0.moe.b_gate_up", "layers.2.moe.b_down"):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
