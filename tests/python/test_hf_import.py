"""Hugging Face checkpoints: transformers writes a tiny random model of each
family with save_pretrained, moeyard's C++ importer loads it, and logits,
selected experts, the loss and the gradients agree; moeyard's exporter writes
a directory that transformers loads back to the same logits."""

import json
import os

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

V, H, L = 97, 32, 3
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
              tie_word_embeddings=False)


def family_configs():
    t = transformers
    return {
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    dict(intermediate_size=48, num_local_experts=4, sliding_window=5,
                         rope_theta=500.0)),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM,
                      dict(intermediate_size=56, moe_intermediate_size=24, num_experts=4,
                           shared_expert_intermediate_size=40, mlp_only_layers=[1],
                           norm_topk_prob=False)),
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      dict(intermediate_size=56, moe_intermediate_size=24, num_experts=4,
                           head_dim=16, mlp_only_layers=[0], norm_topk_prob=True)),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM,
                  dict(intermediate_size=24, num_experts=4, norm_topk_prob=False, clip_qkv=0.8,
                       pad_token_id=None, eos_token_id=None, bos_token_id=None)),
        "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM,
                        dict(num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=16,
                             n_routed_experts=4, n_group=2, topk_group=1, n_shared_experts=1,
                             routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=16,
                             kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "mscale": 1.0,
                                              "mscale_all_dim": 0.8})),
        "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM,
                    dict(head_dim=16, intermediate_size=24, num_local_experts=4, sliding_window=5,
                         swiglu_limit=1.5, layer_types=["sliding_attention", "full_attention",
                                                        "sliding_attention"],
                         rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                          "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                          "beta_slow": 1.0, "truncate": False})),
    }


FAMILIES = list(family_configs())


def make_hf(family, seed=0, **extra):
    cfg_cls, model_cls, kw = family_configs()[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **kw, **extra})
    cfg._attn_implementation = "eager"
    return perturb(model_cls(cfg).eval())


def perturb(model):
    with torch.no_grad():  # away from the init so a missed norm or bias shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 or n.endswith(("bias", "sinks")):
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    return model


def router_of(layer):
    return getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in FAMILIES:
        model = make_hf(fam)
        model.save_pretrained(root / fam)
        out[fam] = (model, root / fam)
    return out


def hf_logits(model, tokens, mask=None):
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float()


def tokens_and_mask(seed=1, B=3, S=12):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return tokens, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(saved, family):
    hf, path = saved[family]
    ours = moeyard.Transformer.from_hf(path).eval()
    tokens, mask = tokens_and_mask()
    got = ours(tokens)["logits"]
    want = hf_logits(hf, tokens)
    assert (got - want).abs().max().item() < 1e-4
    got = ours(tokens, mask)["logits"]
    want = hf_logits(hf, tokens, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_experts_match(saved, family):
    hf, path = saved[family]
    ours = moeyard.Transformer.from_hf(path).eval()
    tokens, _ = tokens_and_mask(seed=2)
    chosen = []  # the routers' third output is the selected experts
    hooks = [router_of(layer).register_forward_hook(lambda m, i, o: chosen.append(o[2]))
             for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    try:
        with torch.no_grad():
            hf(input_ids=tokens)
    finally:
        for h in hooks:
            h.remove()
    mine = ours(tokens)["moe_layers"]
    assert len(mine) == len(chosen) > 0
    for stats, idx in zip(mine, chosen):
        want = idx.reshape(-1, 2).sort(-1).values
        got = stats["indices"].reshape(-1, 2).sort(-1).values
        assert torch.equal(got, want), f"layer {stats['layer']}"


def grads_as_moeyard_parameters(hf, directory):
    """transformers' gradients in moeyard's names and layouts, laid out by
    the C++ importer: a copy of the model whose weights are its gradients,
    saved with save_pretrained and imported."""
    model = transformers.AutoModelForCausalLM.from_config(hf.config)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, q in model.named_parameters():
            g = theirs[name].grad
            q.copy_(g if g is not None else torch.zeros_like(q))
    model.save_pretrained(directory)
    return dict(moeyard.Transformer.from_hf(directory).named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match(saved, family, tmp_path):
    hf, path = saved[family]
    ours = moeyard.Transformer.from_hf(path).train()
    hf = hf.train()
    tokens, _ = tokens_and_mask(seed=3)
    out = ours.loss(tokens)
    out["ce"].backward()
    hf.zero_grad()
    ref = hf(input_ids=tokens, labels=tokens)
    ref.loss.backward()
    hf.eval()
    assert abs(out["ce"].item() - ref.loss.item()) < 1e-4
    grads = dict(ours.named_parameters())
    hfp = dict(hf.named_parameters())
    q = "q_a_proj" if f"layers.2.attn.q_a_proj.weight" in grads else "q_proj"
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"),
             ("norm.weight", "model.norm.weight"),
             (f"layers.2.attn.{q}.weight", f"model.layers.2.self_attn.{q}.weight"),
             ("layers.2.attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight")]
    for i in range(L):
        if f"layers.{i}.moe.w_gate_up" in grads:
            router = "router" if family == "gpt_oss" else "gate"
            pairs += [(f"layers.{i}.moe.w_gate_up", f"model.layers.{i}.mlp.experts.gate_up_proj"),
                      (f"layers.{i}.moe.w_down", f"model.layers.{i}.mlp.experts.down_proj"),
                      (f"layers.{i}.moe.router.weight", f"model.layers.{i}.mlp.{router}.weight")]
    if family == "gpt_oss":
        pairs.append(("layers.1.attn.sinks", "model.layers.1.self_attn.sinks"))
    want = grads_as_moeyard_parameters(hf, tmp_path / "grads")
    for mine, theirs in pairs:
        g, r = grads[mine].grad, hfp[theirs].grad
        assert g is not None and r is not None, mine
        assert (g - want[mine]).abs().max().item() < 1e-4, mine


def test_fused_and_sharded_layouts_load(saved, tmp_path):
    hf, path = saved["qwen2_moe"]
    tokens, _ = tokens_and_mask(seed=4)
    want = hf_logits(hf, tokens)
    # Fused 3-D experts: transformers' in-memory names written as they are.
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    got = moeyard.Transformer.from_hf(fused).eval()(tokens)["logits"]
    assert (got - want).abs().max().item() < 1e-4
    # Sharded with an index.
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    got = moeyard.Transformer.from_hf(sharded).eval()(tokens)["logits"]
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_after_fine_tuning(saved, family, tmp_path):
    hf, path = saved[family]
    ours = moeyard.Transformer.from_hf(path).train()
    tokens, _ = tokens_and_mask(seed=5)
    for _ in range(3):  # a few SGD steps so the weights differ from the import
        ours.zero_grad()
        ours.loss(tokens)["loss"].backward()
        with torch.no_grad():
            for p in ours.parameters():
                p -= 0.05 * p.grad
    ours.eval()
    base = json.loads((path / "config.json").read_text())
    out = tmp_path / "export"
    ours.save_hf(out, family, base_config=base, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    probe, mask = tokens_and_mask(seed=6)
    mine = ours(probe, mask)["logits"]
    theirs = hf_logits(back, probe, mask)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-4
    assert (mine - hf_logits(hf, probe, mask))[real].abs().max().item() > 1e-3  # it did change


# ---- bad input --------------------------------------------------------------

def write_dir(tmp_path, config, tensors):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def base_files(path):
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("edit,match", [
    (lambda c, t: c.update(model_type="llama4"), "model_type 'llama4' has no importer"),
    (lambda c, t: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c, t: c.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}),
     "rope type 'dynamic'"),
    (lambda c, t: c.update(num_experts_per_tok="two"), "num_experts_per_tok"),
    (lambda c, t: t.pop("model.layers.0.self_attn.q_proj.weight"),
     "tensor 'model.layers.0.self_attn.q_proj.weight' is missing"),
    (lambda c, t: t.update(extra=torch.zeros(3)), "not used by the model, e.g. extra"),
    (lambda c, t: t.update({"model.norm.weight": torch.ones(H + 1)}),
     "'model.norm.weight' has shape \\[33\\], expected \\[32\\]"),
    (lambda c, t: t.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight"),
     "experts.3.w2.weight' is missing"),
])
def test_bad_checkpoints_name_the_problem(saved, tmp_path, edit, match):
    cfg, tensors = base_files(saved["mixtral"][1])
    edit(cfg, tensors)
    d = write_dir(tmp_path / "bad", cfg, tensors)
    with pytest.raises(RuntimeError, match=match):
        moeyard.Transformer.from_hf(d)


def test_truncated_safetensors_is_an_error(saved, tmp_path):
    path = saved["olmoe"][1]
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(RuntimeError, match="model.safetensors"):
        moeyard.Transformer.from_hf(d)


def test_qwen_sliding_window_is_refused(saved, tmp_path):
    cfg, tensors = base_files(saved["qwen3_moe"][1])
    cfg["use_sliding_window"] = True
    d = write_dir(tmp_path / "sw", cfg, tensors)
    with pytest.raises(RuntimeError, match="use_sliding_window"):
        moeyard.Transformer.from_hf(d)


@pytest.mark.parametrize("falsy", [None, False, 0, "", [], {}])
def test_falsy_rope_scaling_gives_way_to_rope_parameters(saved, tmp_path, falsy):
    """transformers reads rope_scaling only when Python counts it as true;
    otherwise rope_parameters (here YaRN-free with rope_theta 500)."""
    hf, path = saved["mixtral"]
    cfg, tensors = base_files(path)
    cfg["rope_scaling"] = falsy
    d = write_dir(tmp_path / "falsy", cfg, tensors)
    assert transformers.AutoConfig.from_pretrained(d).rope_parameters == hf.config.rope_parameters
    tokens, _ = tokens_and_mask(seed=14)
    got = moeyard.Transformer.from_hf(d).eval()(tokens)["logits"]
    assert (got - hf_logits(hf, tokens)).abs().max().item() < 1e-4


def test_rope_scaling_wins_over_rope_parameters(saved, tmp_path):
    """A set rope_scaling (older files) wins, and its rope_theta falls back to
    the top-level key, else the class default, not rope_parameters'."""
    cfg, tensors = base_files(saved["mixtral"][1])
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    d = write_dir(tmp_path / "scaling", cfg, tensors)
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    assert back.config.rope_parameters["rope_type"] == "linear"
    assert back.config.rope_parameters["rope_theta"] == 1e6
    tokens, _ = tokens_and_mask(seed=15)
    want = hf_logits(back, tokens)
    got = moeyard.Transformer.from_hf(d).eval()(tokens)["logits"]
    assert (got - want).abs().max().item() < 1e-4
    assert (want - hf_logits(saved["mixtral"][0], tokens)).abs().max().item() > 1e-3  # it did change


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    model = moeyard.Transformer(dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                     ffn_size=64, moe=dict(num_experts=4, score_fn="sigmoid")))
    with pytest.raises(RuntimeError, match="cannot express moe.score_fn = sigmoid"):
        model.save_hf(tmp_path / "x", "mixtral")
    assert not os.path.exists(tmp_path / "x" / "config.json")


def test_deepseek_multi_token_prediction_layers_are_skipped(saved, tmp_path):
    """DeepSeek-V3 files carry MTP layers past num_hidden_layers, which the
    causal LM does not use (transformers skips them too); with
    num_nextn_predict_layers = 0 they are unknown tensors."""
    cfg, tensors = base_files(saved["deepseek_v3"][1])
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(H, 2 * H)
    cfg["num_nextn_predict_layers"] = 1
    hf, _ = saved["deepseek_v3"]
    tokens, _ = tokens_and_mask(seed=8)
    got = moeyard.Transformer.from_hf(write_dir(tmp_path / "mtp", cfg, tensors)).eval()(tokens)["logits"]
    assert (got - hf_logits(hf, tokens)).abs().max().item() < 1e-4
    cfg["num_nextn_predict_layers"] = 0
    with pytest.raises(RuntimeError, match="eh_proj"):
        moeyard.Transformer.from_hf(write_dir(tmp_path / "no_mtp", cfg, tensors))


def _raw_safetensors(header, data=b""):
    import struct

    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("raw,match", [
    (b"\x01\x02", "file too small"),
    (b"\xff" * 8 + b"{}", "header length .* is impossible"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2]}})[:-1] + b"!", "header is not valid JSON"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2]}}), "tensor 'w': needs dtype, shape and data_offsets"),
    (_raw_safetensors({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'w'.*Q4"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8),
     "tensor 'w': data_offsets \\[0, 16\\) outside the 8-byte data section"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'w': 8 bytes for shape \\[3\\] of F32, expected 12"),
    (_raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "tensors overlap"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad shape"),
])
def test_corrupt_safetensors_name_file_and_tensor(saved, tmp_path, raw, match):
    """The reader checks the header against the file before any weight is
    used: errors name the file, the tensor and the inconsistency."""
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((saved["mixtral"][1] / "config.json").read_text())
    (d / "model.safetensors").write_bytes(raw)
    with pytest.raises(RuntimeError, match=match) as e:
        moeyard.Transformer.from_hf(d)
    assert "model.safetensors" in str(e.value)


def test_index_naming_a_missing_shard_is_an_error(saved, tmp_path):
    hf, _ = saved["olmoe"]
    d = tmp_path / "sh"
    hf.save_pretrained(d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match="model-99999-of-99999.safetensors"):
        moeyard.Transformer.from_hf(d)


# ---- keys absent from config.json: transformers' config-class defaults -----

def hf_from_minimal_config(tmp_path, config, seed=0):
    """A random transformers model of a config.json that has only the keys in
    `config` (transformers fills in its class defaults), saved next to that
    same minimal config.json: (model read back by transformers, directory)."""
    d = tmp_path / "minimal"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    cfg = transformers.AutoConfig.from_pretrained(d)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    perturb(transformers.AutoModelForCausalLM.from_config(cfg).eval()).save_pretrained(d)
    (d / "config.json").write_text(json.dumps(config))  # save_pretrained wrote every key
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    return back, d


def hf_moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def test_gpt_oss_without_layer_types_alternates_sliding_and_full(tmp_path):
    """GptOssConfig without layer_types: even layers sliding, odd layers full."""
    hf = make_hf("gpt_oss", num_hidden_layers=4, layer_types=None)
    assert hf.config.layer_types == ["sliding_attention", "full_attention"] * 2
    d = tmp_path / "no_types"
    hf.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["layer_types"]
    (d / "config.json").write_text(json.dumps(cfg))
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    assert back.config.layer_types == hf.config.layer_types
    tokens, mask = tokens_and_mask(seed=9)  # 12 tokens, window 5: the kinds matter
    want = hf_logits(back, tokens, mask)
    real = mask.bool()
    got = moeyard.Transformer.from_hf(d).eval()(tokens, mask)["logits"]
    assert (got[real] - want[real]).abs().max().item() < 1e-4
    # The check can fail: every layer sliding (the old reading) is far off.
    cfg["layer_types"] = ["sliding_attention"] * 4
    (d / "config.json").write_text(json.dumps(cfg))
    wrong = moeyard.Transformer.from_hf(d).eval()(tokens, mask)["logits"]
    assert (wrong[real] - want[real]).abs().max().item() > 1e-3


def test_gpt_oss_minimal_config_takes_class_defaults(tmp_path):
    """Absent: layer_types, sliding_window (128), head_dim (64),
    num_key_value_heads (8), rope (YaRN x32, theta 150000), rms_norm_eps
    (1e-5), num_experts_per_tok (4), swiglu_*, attention_bias, ..."""
    config = dict(model_type="gpt_oss", vocab_size=V, hidden_size=H, num_hidden_layers=3,
                  num_attention_heads=16, intermediate_size=24, num_local_experts=8)
    hf, d = hf_from_minimal_config(tmp_path, config)
    assert hf.config.sliding_window == 128 and hf.config.num_key_value_heads == 8
    g = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, V, (2, 140), generator=g)  # past the 128 window
    ours = moeyard.Transformer.from_hf(d).eval()
    assert (ours(tokens)["logits"] - hf_logits(hf, tokens)).abs().max().item() < 1e-4
    assert ours.moe_layer_indices() == hf_moe_layers(hf) == [0, 1, 2]


def test_deepseek_minimal_config_takes_class_defaults(tmp_path):
    """Absent: first_k_dense_replace (3), n_shared_experts (1),
    n_routed_experts (256), num_experts_per_tok (8), n_group (8), topk_group
    (4), routed_scaling_factor (2.5), norm_topk_prob, q_lora_rank (1536),
    kv_lora_rank (512), qk_{nope,rope}_head_dim (128, 64), v_head_dim (128),
    rope_interleave, max_position_embeddings, rope."""
    config = dict(model_type="deepseek_v3", vocab_size=V, hidden_size=H, num_hidden_layers=5,
                  num_attention_heads=2, num_key_value_heads=2,  # transformers' own needs it
                  intermediate_size=56, moe_intermediate_size=8)
    hf, d = hf_from_minimal_config(tmp_path, config)
    c = hf.config
    assert (c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok) == (256, 8, 4, 8)
    assert (c.first_k_dense_replace, c.n_shared_experts, c.routed_scaling_factor) == (3, 1, 2.5)
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    ours = moeyard.Transformer.from_hf(d).eval()
    assert ours.moe_layer_indices() == hf_moe_layers(hf) == [3, 4]
    tokens, mask = tokens_and_mask(seed=11)
    assert (ours(tokens)["logits"] - hf_logits(hf, tokens)).abs().max().item() < 1e-4
    chosen = []
    hooks = [router_of(hf.model.layers[i]).register_forward_hook(
        lambda mod, inp, out: chosen.append(out[2])) for i in hf_moe_layers(hf)]
    try:
        hf_logits(hf, tokens)
    finally:
        for h in hooks:
            h.remove()
    mine = ours(tokens)["moe_layers"]
    assert len(mine) == len(chosen) == 2
    for stats, idx in zip(mine, chosen):
        assert torch.equal(stats["indices"].reshape(-1, 8).sort(-1).values,
                           idx.reshape(-1, 8).sort(-1).values)


def test_deepseek_q_lora_rank_null_is_a_plain_q_proj(tmp_path):
    """q_lora_rank: null is transformers' None (q_proj), unlike an absent key."""
    config = dict(model_type="deepseek_v3", vocab_size=V, hidden_size=H, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, intermediate_size=56,
                  moe_intermediate_size=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                  first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=12,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    hf, d = hf_from_minimal_config(tmp_path, config)
    assert hf.config.q_lora_rank is None
    ours = moeyard.Transformer.from_hf(d).eval()
    assert "layers.0.attn.q_proj.weight" in dict(ours.named_parameters())
    tokens, _ = tokens_and_mask(seed=12)
    assert (ours(tokens)["logits"] - hf_logits(hf, tokens)).abs().max().item() < 1e-4


def test_deepseek_moe_layers_follow_first_k_dense_replace_only(tmp_path):
    """transformers' DeepseekV3DecoderLayer is MoE iff layer >=
    first_k_dense_replace; moe_layer_freq in config.json is not read."""
    hf = make_hf("deepseek_v3", num_hidden_layers=5, first_k_dense_replace=1)
    d = tmp_path / "freq"
    hf.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_layer_freq"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    assert hf_moe_layers(back) == [1, 2, 3, 4]
    ours = moeyard.Transformer.from_hf(d).eval()
    assert ours.moe_layer_indices() == [1, 2, 3, 4]
    tokens, _ = tokens_and_mask(seed=13)
    assert (ours(tokens)["logits"] - hf_logits(back, tokens)).abs().max().item() < 1e-4
