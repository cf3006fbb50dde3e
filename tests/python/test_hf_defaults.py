"""Keys absent from config.json: every family's importer takes the default of
the family's transformers config class, as transformers does. Each family's
config.json here holds only its model_type and the sizes that keep the model
tiny; everything else (rope_theta, rms_norm_eps, expert counts, top-k, shared
experts, norms, biases, windows, ...) is left to the defaults, read from the
installed transformers, so a default that drifts on either side fails:

- logits of moeyard's import against transformers' model read from the same
  minimal config.json, within 1e-4, on a sequence long enough for positions
  and windows to matter and with small embeddings so that rms_norm_eps shows;
- the config moeyard resolved (written back by its exporter) against the
  attributes of transformers' config object, key by key."""

import json
import math

import pytest
import torch

import moeyard

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

V = 97

# The keys a tiny model must set: sizes only. num_attention_heads and
# num_key_value_heads stay at their defaults wherever the default fits.
TINY = {
    "mixtral": dict(vocab_size=V, hidden_size=128, num_hidden_layers=2, intermediate_size=16),
    "qwen2_moe": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=16,
                      moe_intermediate_size=8),
    "qwen3_moe": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      intermediate_size=16, moe_intermediate_size=8),
    "olmoe": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=8),
    # MLA widths stay at their defaults; 128 heads of them would not be tiny.
    "deepseek_v3": dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        num_key_value_heads=2, intermediate_size=16, moe_intermediate_size=8),
    "gpt_oss": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=8),
}
FAMILIES = list(TINY)
S = 140  # past GPT-OSS's default window of 128


def minimal_config(family, **extra):
    return {"model_type": family, **TINY[family], **extra}


def perturb(model):
    """Random weights away from the init (so a missed norm or bias shows),
    scaled by fan-in so that the wide default MLA projections keep O(1)
    activations, and embeddings so small that rms_norm_eps matters."""
    g = torch.Generator().manual_seed(0)
    transposed = model.config.model_type == "gpt_oss"  # experts [E, in, out]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
            elif p.dim() >= 2:
                fan_in = p.shape[1] if p.dim() == 3 and transposed else p.shape[-1]
                p.copy_(torch.empty_like(p).normal_(0, fan_in**-0.5, generator=g))
            elif n.endswith(("bias", "sinks")):
                p.copy_(torch.empty_like(p).normal_(0, 0.2, generator=g))
        model.get_input_embeddings().weight.mul_(0.01)  # mean square ~1e-5: eps shows
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.empty_like(b).normal_(0, 0.5, generator=g))
    return model


def checkpoint(tmp_path, config, name="ckpt"):
    """A random transformers model of `config` saved next to that same
    config.json (save_pretrained writes every key; it is put back), and the
    model transformers reads back from the directory."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    cfg = transformers.AutoConfig.from_pretrained(d)
    perturb(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()).save_pretrained(d)
    (d / "config.json").write_text(json.dumps(config))
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    return back, d


def tokens(length=S):
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(1))


def max_logit_diff(ours, hf, toks):
    with torch.no_grad():
        want = hf(input_ids=toks).logits.float()
    return (ours(toks)["logits"] - want).abs().max().item()


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimal")
    return {fam: checkpoint(root, minimal_config(fam), fam) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_minimal_config_logits_match_transformers(minimal, family):
    hf, d = minimal[family]
    ours = moeyard.Transformer.from_hf(d).eval()
    assert max_logit_diff(ours, hf, tokens()) < 1e-4


def same(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if a.get(k) is not None or b.get(k) is not None}
        return all(same(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return a == b


# Exported keys that are not the config class's view of the import: the
# export's dtype, and DeepSeek's MTP layers, which the export does not carry.
NOT_COMPARED = {"model_type", "architectures", "dtype", "num_nextn_predict_layers"}


@pytest.mark.parametrize("family", FAMILIES)
def test_resolved_config_is_transformers_config(minimal, family, tmp_path):
    """moeyard's resolved config, as its exporter writes it, has for every key
    the value transformers' config object has for the same minimal file."""
    _, d = minimal[family]
    hf_cfg = transformers.AutoConfig.from_pretrained(d)
    moeyard.Transformer.from_hf(d).save_hf(tmp_path / "out", family)
    mine = json.loads((tmp_path / "out" / "config.json").read_text())
    compared = []
    for key, value in mine.items():
        if key in NOT_COMPARED:
            continue
        if key == "head_dim":  # absent or None: the modeling code derives it
            theirs = getattr(hf_cfg, key, None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        else:
            assert hasattr(hf_cfg, key), f"{family}: exported key {key} unknown to transformers"
            theirs = getattr(hf_cfg, key)
        assert same(value, theirs), f"{family}: {key}: moeyard {value!r}, transformers {theirs!r}"
        compared.append(key)
    assert {"rope_parameters", "rms_norm_eps", "max_position_embeddings", "num_experts_per_tok"} <= set(compared)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_aux_loss_coef_default(tmp_path, family):
    """router_aux_loss_coef (not in the logits, not exported) reaches the aux
    loss: with one MoE layer moeyard's switch loss is transformers'
    load-balancing loss times the coefficient (DeepSeek-V3 has none)."""
    extra = dict(num_hidden_layers=1, first_k_dense_replace=0) if family == "deepseek_v3" else dict(num_hidden_layers=1)
    hf, d = checkpoint(tmp_path, minimal_config(family, **extra))
    ours = moeyard.Transformer.from_hf(d).train()
    assert ours.moe_layer_indices() == [0]
    toks = tokens(32)
    aux = ours.loss(toks)["aux"].item()
    with torch.no_grad():
        theirs = hf.train()(input_ids=toks, labels=toks, output_router_logits=True).aux_loss
    if family == "deepseek_v3":
        assert not hasattr(hf.config, "router_aux_loss_coef") and aux == 0.0
    else:
        want = hf.config.router_aux_loss_coef * theirs.item()
        assert want > 0 and aux == pytest.approx(want, rel=1e-5)


def test_mixtral_without_rope_theta_is_theta_1e6(tmp_path):
    """A Mixtral config.json with every key but rope_theta: MixtralConfig's
    default_theta is 1e6, not the 1e4 of most other models."""
    config = minimal_config("mixtral", num_attention_heads=32, num_key_value_heads=8, num_local_experts=4,
                            num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
                            tie_word_embeddings=False, hidden_act="silu", sliding_window=None)
    hf, d = checkpoint(tmp_path, config)
    assert hf.config.rope_parameters["rope_theta"] == 1e6
    ours = moeyard.Transformer.from_hf(d).eval()
    toks = tokens()
    assert max_logit_diff(ours, hf, toks) < 1e-4
    # The check can fail: theta 1e4 given explicitly is far off.
    config["rope_theta"] = 1e4
    (d / "config.json").write_text(json.dumps(config))
    assert max_logit_diff(moeyard.Transformer.from_hf(d).eval(), hf, toks) > 1e-2


def test_rope_scaling_wins_over_rope_parameters(tmp_path):
    """A file with both (an older file edited by hand): transformers takes
    rope_scaling, with rope_theta from it, else the top-level rope_theta; so
    does the importer (the same model as a file with only those settings)."""
    config = minimal_config("mixtral", rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=300.0,
                            rope_parameters={"rope_type": "default", "rope_theta": 9000.0})
    hf, d = checkpoint(tmp_path, config)
    assert hf.config.rope_parameters["rope_type"] == "linear"
    assert hf.config.rope_parameters["rope_theta"] == 300.0
    ours = moeyard.Transformer.from_hf(d).eval()
    assert max_logit_diff(ours, hf, tokens()) < 1e-4
    only = dict(minimal_config("mixtral"), rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0})
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "config.json").write_text(json.dumps(only))
    for f in d.glob("*.safetensors"):
        (tmp_path / "only" / f.name).write_bytes(f.read_bytes())
    same = moeyard.Transformer.from_hf(tmp_path / "only").eval()
    with torch.no_grad():
        assert torch.equal(same(tokens())["logits"], ours(tokens())["logits"])


@pytest.mark.xfail(strict=False, reason="Qwen3-MoE with linear rope differs from transformers by ~0.04 in the "
                                        "logits on some machines and matches on others with the same pinned "
                                        "packages (default rope and Mixtral with the same linear rope match); "
                                        "not yet explained")
def test_qwen3_moe_linear_rope_matches_transformers(tmp_path):
    config = minimal_config("qwen3_moe", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0})
    hf, d = checkpoint(tmp_path, config)
    assert max_logit_diff(moeyard.Transformer.from_hf(d).eval(), hf, tokens()) < 1e-4


@pytest.mark.parametrize("family,alias", [
    ("mixtral", "num_experts"), ("qwen3_moe", "num_local_experts"), ("olmoe", "num_local_experts"),
    ("deepseek_v3", "num_local_experts"), ("gpt_oss", "num_experts"),
])
def test_expert_count_aliases(tmp_path, family, alias):
    """transformers' attribute_map aliases name the expert count too."""
    extra = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    hf, d = checkpoint(tmp_path, minimal_config(family, num_experts_per_tok=2, **{alias: 6}, **extra))
    ours = moeyard.Transformer.from_hf(d).eval()
    assert ours.state_dict()[f"layers.{ours.moe_layer_indices()[0]}.moe.w_down"].shape[0] == 6
    assert max_logit_diff(ours, hf, tokens()) < 1e-4


def test_qwen2_moe_has_no_num_local_experts_alias(tmp_path):
    """Qwen2MoeConfig has no alias: num_local_experts is an unused key and the
    expert count is num_experts' default, 60."""
    hf, d = checkpoint(tmp_path, minimal_config("qwen2_moe", num_local_experts=6))
    assert hf.config.num_experts == 60
    ours = moeyard.Transformer.from_hf(d).eval()
    assert ours.state_dict()["layers.0.moe.w_down"].shape[0] == 60
    assert max_logit_diff(ours, hf, tokens()) < 1e-4


def test_deepseek_mtp_layers_default_to_one(minimal, tmp_path):
    """Without num_nextn_predict_layers, DeepseekV3Config has one MTP module:
    model.layers.{L}.* is skipped (it is not part of the causal LM), a tensor
    of a layer past it is still an unknown tensor."""
    hf, src = minimal["deepseek_v3"]
    L = hf.config.num_hidden_layers
    config = json.loads((src / "config.json").read_text())
    assert "num_nextn_predict_layers" not in config and hf.config.num_mtp_layers == 1
    tensors = load_file(str(src / "model.safetensors"))
    d = tmp_path / "mtp"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({**tensors, f"model.layers.{L}.eh_proj.weight": torch.zeros(32, 64)}, str(d / "model.safetensors"))
    ours = moeyard.Transformer.from_hf(d).eval()
    assert max_logit_diff(ours, hf, tokens()) < 1e-4
    save_file({**tensors, f"model.layers.{L + 1}.eh_proj.weight": torch.zeros(32, 64)}, str(d / "model.safetensors"))
    with pytest.raises(RuntimeError, match=f"model.layers.{L + 1}.eh_proj"):
        moeyard.Transformer.from_hf(d)
    # The export holds no MTP layers and says so.
    ours.save_hf(tmp_path / "out", "deepseek_v3", base_config=config)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["num_nextn_predict_layers"] == 0


def test_null_key_is_the_class_none(tmp_path):
    """A key given as null is transformers' None, not the class default:
    DeepSeek's rope_interleave and norm_topk_prob default to true, and null
    is false (not interleaved, not renormalized)."""
    hf, d = checkpoint(tmp_path, minimal_config("deepseek_v3", rope_interleave=None, norm_topk_prob=None))
    assert hf.config.rope_interleave is None and hf.config.norm_topk_prob is None
    ours = moeyard.Transformer.from_hf(d).eval()
    toks = tokens(48)  # transformers' float32 rotary angles drift further on
    assert max_logit_diff(ours, hf, toks) < 1e-4
    # The check can fail: the defaults (both true) are far off.
    config = json.loads((d / "config.json").read_text())
    del config["rope_interleave"], config["norm_topk_prob"]
    (d / "config.json").write_text(json.dumps(config))
    assert max_logit_diff(moeyard.Transformer.from_hf(d).eval(), hf, toks) > 1e-2
