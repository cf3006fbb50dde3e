"""The model expresses OLMoE, DeepSeek-V3 and GPT-OSS exactly.

For each family a tiny random ``transformers`` model is built from the
family's own config class, its state_dict is mapped into a
``moeyard.Transformer`` by a small function per family (the C++ importer will
replace these), and the logits (with and without left/right padding) and the
experts each MoE layer selects must agree. The features under test:
``clip_qkv`` (OLMoE); multi-head latent attention with and without the q
low-rank path, interleaved rotary pairs, YaRN mscale in the softmax scale,
dense first layers and group-limited sigmoid routing (DeepSeek-V3);
attention biases and sinks, alternating sliding/full layers, YaRN without
truncation, router bias, expert biases and the clamped SwiGLU (GPT-OSS).
"""

import math

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")

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


def load(config, state):
    ours = moeyard.Transformer(config).eval()
    ours.load_state_dict(state)
    return ours


# ---- OLMoE -----------------------------------------------------------------

def olmoe_model(clip_qkv=0.6):
    return build(transformers.OlmoeConfig, transformers.OlmoeForCausalLM, seed=0, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=24, num_experts=6,
                 num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=clip_qkv)


def olmoe_to_moeyard(hf):
    c = hf.config
    config = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                  num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                  ffn_size=c.intermediate_size, norm_eps=c.rms_norm_eps, qk_norm="projection",
                  clip_qkv=c.clip_qkv or 0.0, rope_theta=c.rope_parameters["rope_theta"], max_seq_len=64,
                  tie_embeddings=False,
                  moe=dict(num_experts=c.num_experts, top_k=c.num_experts_per_tok, renormalize=c.norm_topk_prob))
    sd = hf.state_dict()
    state = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            state[q + f"attn.{n}.weight"] = sd[p + f"self_attn.{n}.weight"]
        state[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        state[q + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        state[q + "moe.router.weight"] = sd[p + "mlp.gate.weight"]
        state[q + "moe.w_gate_up"] = sd[p + "mlp.experts.gate_up_proj"]
        state[q + "moe.w_down"] = sd[p + "mlp.experts.down_proj"]
    return config, state


def test_olmoe_parity_with_clip_qkv():
    hf = olmoe_model()
    config, state = olmoe_to_moeyard(hf)
    ours = load(config, state)
    err = assert_parity(hf, ours, "gate", k=2)
    print(f"olmoe max abs logit error {err:.2e}")
    # the clip matters here: without it the logits move
    unclipped = load(dict(config, clip_qkv=0.0), state)
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


def deepseek_to_moeyard(hf):
    c = hf.config
    rp = c.rope_parameters
    config = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                  num_heads=c.num_attention_heads, ffn_size=c.intermediate_size,
                  dense_ffn_size=c.intermediate_size, norm_eps=c.rms_norm_eps, attention="mla",
                  q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank,
                  qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                  v_head_dim=c.v_head_dim, attention_bias=c.attention_bias, rope_theta=rp["rope_theta"],
                  rope_interleave=bool(c.rope_interleave), max_seq_len=64, tie_embeddings=False,
                  moe=dict(num_experts=c.n_routed_experts, top_k=c.num_experts_per_tok,
                           ffn_size=c.moe_intermediate_size, first_k_dense=c.first_k_dense_replace,
                           score_fn="sigmoid", selection_bias=True, renormalize=c.norm_topk_prob,
                           scale=c.routed_scaling_factor, num_groups=c.n_group, topk_groups=c.topk_group,
                           num_shared_experts=c.n_shared_experts, shared_ffn_size=c.moe_intermediate_size))
    if rp["rope_type"] == "yarn":
        config.update(rope_scaling="yarn", rope_factor=rp["factor"],
                      rope_original_max_position=rp["original_max_position_embeddings"],
                      yarn_beta_fast=rp.get("beta_fast", 32.0), yarn_beta_slow=rp.get("beta_slow", 1.0),
                      yarn_truncate=rp.get("truncate", True), yarn_mscale=rp.get("mscale") or 0.0,
                      yarn_mscale_all_dim=rp.get("mscale_all_dim") or 0.0)
    sd = hf.state_dict()
    state = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    names = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_layernorm": "q_a_norm", "q_b_proj": "q_b_proj",
             "kv_a_proj_with_mqa": "kv_a_proj", "kv_a_layernorm": "kv_a_norm", "kv_b_proj": "kv_b_proj",
             "o_proj": "o_proj"}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for theirs, mine in names.items():
            if p + f"self_attn.{theirs}.weight" in sd:
                state[q + f"attn.{mine}.weight"] = sd[p + f"self_attn.{theirs}.weight"]
        state[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        state[q + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if i < c.first_k_dense_replace:
            state[q + "mlp.gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                         sd[p + "mlp.up_proj.weight"]])
            state[q + "mlp.down.weight"] = sd[p + "mlp.down_proj.weight"]
        else:
            state[q + "moe.router.weight"] = sd[p + "mlp.gate.weight"]
            state[q + "moe.selection_bias"] = sd[p + "mlp.gate.e_score_correction_bias"]
            state[q + "moe.w_gate_up"] = sd[p + "mlp.experts.gate_up_proj"]
            state[q + "moe.w_down"] = sd[p + "mlp.experts.down_proj"]
            state[q + "moe.shared_gate_up"] = torch.cat([sd[p + "mlp.shared_experts.gate_proj.weight"],
                                                         sd[p + "mlp.shared_experts.up_proj.weight"]])
            state[q + "moe.shared_down"] = sd[p + "mlp.shared_experts.down_proj.weight"]
    return config, state


DEEPSEEK_VARIANTS = {
    "q_lora+yarn+interleave": (32, DSV3_YARN, True),
    "q_proj+default_rope": (None, {"rope_type": "default", "rope_theta": 500.0}, False),
}


@pytest.mark.parametrize("variant", list(DEEPSEEK_VARIANTS))
def test_deepseek_v3_parity(variant):
    hf = deepseek_model(*DEEPSEEK_VARIANTS[variant])
    with torch.no_grad():  # the selection bias must matter
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    config, state = deepseek_to_moeyard(hf)
    ours = load(config, state)
    names = {n for n, _ in ours.named_parameters()}
    assert ("layers.1.attn.q_a_proj.weight" in names) == (variant.startswith("q_lora"))
    assert ("layers.1.attn.q_proj.weight" in names) != (variant.startswith("q_lora"))
    assert "layers.0.mlp.gate_up.weight" in names and "layers.1.moe.w_gate_up" in names
    err = assert_parity(hf, ours, "gate", k=2)
    print(f"deepseek-v3 {variant} max abs logit error {err:.2e}")
    assert_cache_matches_recompute(ours)


def test_deepseek_v3_mscale_scales_the_softmax():
    """yarn_mscale_all_dim enters MLA's softmax scale (as transformers does):
    dropping it moves the logits, and attention_scale can override it."""
    hf = deepseek_model(32, DSV3_YARN, True)
    config, state = deepseek_to_moeyard(hf)
    tokens, _ = tokens_and_mask()
    with torch.no_grad():
        base = load(config, state)(tokens)["logits"]
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


def gpt_oss_to_moeyard(hf):
    c = hf.config
    rp = c.rope_parameters
    kinds = {"sliding_attention": "sliding", "full_attention": "full"}
    config = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                  num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                  ffn_size=c.intermediate_size, norm_eps=c.rms_norm_eps, attention_bias=c.attention_bias,
                  attention_sinks=True, sliding_window=c.sliding_window,
                  layer_types=[kinds[t] for t in c.layer_types], rope_theta=rp["rope_theta"],
                  rope_scaling="yarn", rope_factor=rp["factor"],
                  rope_original_max_position=rp["original_max_position_embeddings"],
                  yarn_beta_fast=rp["beta_fast"], yarn_beta_slow=rp["beta_slow"],
                  yarn_truncate=rp.get("truncate", True), max_seq_len=64, tie_embeddings=False,
                  moe=dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, router_bias=True,
                           expert_bias=True, activation="clamped_swiglu", swiglu_alpha=c.swiglu_alpha,
                           swiglu_limit=c.swiglu_limit))
    sd = hf.state_dict()
    state = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[q + f"attn.{n}.weight"] = sd[p + f"self_attn.{n}.weight"]
            state[q + f"attn.{n}.bias"] = sd[p + f"self_attn.{n}.bias"]
        state[q + "attn.sinks"] = sd[p + "self_attn.sinks"]
        state[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        state[q + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        state[q + "moe.router.weight"] = sd[p + "mlp.router.weight"]
        state[q + "moe.router.bias"] = sd[p + "mlp.router.bias"]
        # [E, H, 2F] with gate/up interleaved in columns -> [E, 2F, H] gate rows then up rows
        gu, gub = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.gate_up_proj_bias"]
        state[q + "moe.w_gate_up"] = torch.cat([gu[..., 0::2], gu[..., 1::2]], -1).transpose(1, 2).contiguous()
        state[q + "moe.b_gate_up"] = torch.cat([gub[..., 0::2], gub[..., 1::2]], -1)
        state[q + "moe.w_down"] = sd[p + "mlp.experts.down_proj"].transpose(1, 2).contiguous()
        state[q + "moe.b_down"] = sd[p + "mlp.experts.down_proj_bias"]
    return config, state


def test_gpt_oss_parity():
    hf = gpt_oss_model()
    config, state = gpt_oss_to_moeyard(hf)
    ours = load(config, state)
    err = assert_parity(hf, ours, "router", k=2)
    print(f"gpt-oss max abs logit error {err:.2e}")
    assert_cache_matches_recompute(ours)  # 21 positions > sliding window 4


def test_gpt_oss_features_matter():
    """Each GPT-OSS feature changes the logits of this tiny model, so the
    parity test above does test it."""
    hf = gpt_oss_model()
    config, state = gpt_oss_to_moeyard(hf)
    tokens, _ = tokens_and_mask()
    with torch.no_grad():
        base = load(config, state)(tokens)["logits"]
        variants = {
            "sinks": (dict(config, attention_sinks=False), lambda k: not k.endswith("sinks")),
            "layer_types": (dict(config, layer_types=["full"] * 3), None),
            "truncate": (dict(config, yarn_truncate=True), None),
            "clamp": (dict(config, moe=dict(config["moe"], swiglu_limit=100.0)), None),
            "expert_bias": (dict(config, moe=dict(config["moe"], expert_bias=False)),
                            lambda k: ".b_" not in k),
        }
        for name, (cfg, keep) in variants.items():
            st = {k: v for k, v in state.items() if keep is None or keep(k)}
            out = load(cfg, st)(tokens)["logits"]
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
