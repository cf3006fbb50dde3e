"""The C++ MoE Transformer (moeyard.Transformer)."""

import math

import pytest
import torch

import moeyard

BASE = dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, ffn_size=48, max_seq_len=64)


def cfg(**kw):
    c = dict(BASE)
    moe = dict(num_experts=4, top_k=2, moe_every_n=1)
    moe.update(kw.pop("moe", {}))
    c.update(kw)
    c["moe"] = moe
    return c


def test_parameter_names_are_stable():
    m = moeyard.Transformer(cfg(qk_norm="head", qkv_bias=True, tie_embeddings=False, moe=dict(
        moe_every_n=2, num_shared_experts=1, shared_gate=True, router_bias=True, selection_bias=True)))
    names = [n for n, _ in m.named_parameters()]
    for expected in ["embed.weight", "lm_head.weight", "norm.weight", "layers.0.attn.q_proj.weight",
                     "layers.0.attn.q_proj.bias", "layers.0.attn.q_norm.weight", "layers.0.mlp.gate_up.weight",
                     "layers.1.moe.router.weight", "layers.1.moe.router.bias", "layers.1.moe.w_gate_up",
                     "layers.1.moe.w_down", "layers.1.moe.shared_gate_up", "layers.1.moe.shared_gate"]:
        assert expected in names, expected
    assert "layers.1.moe.selection_bias" in m.state_dict()
    assert dict(m.named_parameters())["layers.1.moe.router.weight"].dtype == torch.float32


@pytest.mark.parametrize("moe,expected", [
    (dict(moe_every_n=2), [1, 3]),
    (dict(moe_every_n=1, first_k_dense=1), [1, 2, 3]),
    (dict(moe_every_n=2, first_k_dense=2), [3]),
    (dict(layers=[0, 2]), [0, 2]),
    (dict(num_experts=0), []),
])
def test_placement_builds_the_right_layers(moe, expected):
    m = moeyard.Transformer(cfg(num_layers=4, dense_ffn_size=24, moe=moe))
    assert m.moe_layer_indices() == expected
    names = {n for n, _ in m.named_parameters()}
    for i in range(4):
        assert (f"layers.{i}.moe.w_gate_up" in names) == (i in expected)
        assert (f"layers.{i}.mlp.down.weight" in names) == (i not in expected)
    if expected != [] and 0 not in expected:
        # dense layers of an MoE model use dense_ffn_size
        assert dict(m.named_parameters())["layers.0.mlp.down.weight"].shape == (32, 24)
    out = m(torch.randint(0, 32, (2, 5)))
    assert [s["layer"] for s in out["moe_layers"]] == expected


@pytest.mark.parametrize("variant", [
    dict(),
    dict(num_kv_heads=2, qk_norm="head", sliding_window=3),
    dict(num_kv_heads=1, qk_norm="projection", qkv_bias=True, rotary_pct=0.5, norm="layernorm", mlp="gelu"),
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_position=16),
])
def test_causality(variant):
    torch.manual_seed(0)
    m = moeyard.Transformer(cfg(**variant)).eval()
    t = torch.randint(0, 32, (2, 12))
    base = m(t)["logits"]
    for pos in (3, 7, 11):
        t2 = t.clone()
        t2[:, pos] = (t2[:, pos] + 1) % 32
        out = m(t2)["logits"]
        torch.testing.assert_close(out[:, :pos], base[:, :pos], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[:, pos], base[:, pos])


def test_sliding_window_limits_context():
    torch.manual_seed(1)
    m = moeyard.Transformer(cfg(num_layers=1, sliding_window=3, moe=dict(num_experts=0))).eval()
    t = torch.randint(0, 32, (1, 10))
    base = m(t)["logits"]
    t2 = t.clone()
    t2[0, 2] = (t2[0, 2] + 1) % 32
    out = m(t2)["logits"]
    # one layer, window 3: position 2 is seen by positions 2, 3, 4 only
    torch.testing.assert_close(out[0, 5:], base[0, 5:])
    assert not torch.allclose(out[0, 4], base[0, 4])


def test_padding_changes_no_statistic():
    torch.manual_seed(2)
    m = moeyard.Transformer(cfg()).eval()
    real = torch.randint(0, 32, (1, 8))
    padded = torch.cat([real, torch.randint(0, 32, (1, 4))], 1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1)
    a = m.loss(padded, mask)
    b = m.loss(real)
    torch.testing.assert_close(a["logits"][:, :8], b["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["ce"], b["ce"])
    assert int(a["tokens"]) == 7
    for la, lb in zip(a["moe_layers"], b["moe_layers"]):
        for k in ("tokens_per_expert", "switch_loss", "z_loss", "router_entropy", "importance_loss", "dropped_fraction"):
            torch.testing.assert_close(la[k], lb[k], msg=k)


def test_gradients_match_finite_differences_float64():
    torch.manual_seed(3)
    m = moeyard.Transformer(cfg(dtype="float64", qk_norm="head", num_kv_heads=2,
                                moe=dict(num_shared_experts=1, shared_gate=True)))
    t = torch.randint(0, 32, (2, 6))
    params = dict(m.named_parameters())
    m.zero_grad()
    m.loss(t)["loss"].backward()
    eps = 1e-6
    checked = 0
    for name, p in params.items():
        if p.dtype != torch.float64:
            continue  # the router is float32 by design
        d = torch.randn_like(p)
        with torch.no_grad():
            p.add_(eps * d)
            lp = m.loss(t)["loss"].item()
            p.sub_(2 * eps * d)
            lm = m.loss(t)["loss"].item()
            p.add_(eps * d)
        fd = (lp - lm) / (2 * eps)
        an = (p.grad * d).sum().item()
        assert abs(fd - an) <= 1e-5 * max(1.0, abs(fd)), (name, fd, an)
        checked += 1
    assert checked >= 15


def test_selection_bias_update():
    m = moeyard.Transformer(cfg(moe=dict(selection_bias=True, score_fn="sigmoid")))
    m.update_selection_bias(0, torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.5)
    torch.testing.assert_close(m.state_dict()["layers.0.moe.selection_bias"], torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_state_dict_round_trip():
    a = moeyard.Transformer(cfg())
    b = moeyard.Transformer(cfg())
    t = torch.randint(0, 32, (2, 7))
    assert not torch.allclose(a(t)["logits"], b(t)["logits"])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(t)["logits"], b(t)["logits"])
    with pytest.raises(KeyError):
        b.load_state_dict({"embed.weight": a.state_dict()["embed.weight"]})


@pytest.mark.parametrize("bad,match", [
    (dict(hidden_size=30), r"model.num_heads \(line 1\) = 4 must divide model.hidden_size \(line 1\) = 30"),
    (dict(num_kv_heads=3), r"model.num_kv_heads \(line 1\) = 3 must divide model.num_heads \(line 1\) = 4"),
    (dict(moe=dict(top_k=5)), r"moe.top_k \(line 1\) = 5 is outside \[1, moe.num_experts \(line 1\) = 4\]"),
    (dict(moe=dict(score_fn="relu")), "moe.score_fn must be one of"),
    (dict(moe=dict(routing="random")), "moe.routing must be one of"),
    (dict(moe=dict(num_groups=3)), r"moe.num_groups \(line 1\) = 3 must divide moe.num_experts \(line 1\) = 4"),
    (dict(mlp="relu"), "model.mlp must be one of"),
    (dict(num_heads="four"), "num_heads .*expected an integer, got 'four'"),
    (dict(hidden_sizee=32), "hidden_sizee .*unknown key"),
    (dict(moe=dict(expert_dropout=1.5)), r"moe.expert_dropout \(line 1\): 1.5 is outside \[0, 1\)"),
])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(RuntimeError, match=match):
        moeyard.Transformer(cfg(**bad))


def test_yaml_file_errors_give_the_line(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("vocab_size: 32\nhidden_size: 32\nnum_heads: lots\n")
    with pytest.raises(RuntimeError, match=r"num_heads \(.*m.yaml:3\)"):
        moeyard.Transformer(str(p))


def test_learns_copy_task():
    """A tiny MoE model learns to copy a random sequence (second half = first)."""
    torch.manual_seed(0)
    V, n = 16, 8
    m = moeyard.Transformer(dict(vocab_size=V + 1, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128,
                                 max_seq_len=32, moe=dict(num_experts=4, top_k=2, capacity_factor=2.0)))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)

    def batch():
        x = torch.randint(0, V, (32, n))
        return torch.cat([x, torch.full((32, 1), V), x], 1)

    def copy_loss(t):
        out = m.loss(t)
        logits = out["logits"][:, n:-1]  # predicts positions n+1 .. 2n
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V + 1), t[:, n + 1:].reshape(-1))
        return ce, out

    for _ in range(300):
        ce, out = copy_loss(batch())
        opt.zero_grad()
        (ce + out["aux"]).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        ce, _ = copy_loss(batch())
    assert ce.item() < 0.25 * math.log(V), ce.item()


def test_per_sequence_switch_loss():
    torch.manual_seed(4)
    m = moeyard.Transformer(cfg(moe=dict(switch_per_sequence=True))).eval()
    m_batch = moeyard.Transformer(cfg()).eval()
    m_batch.load_state_dict(m.state_dict())
    same = torch.randint(0, 32, (1, 9)).repeat(3, 1)
    a, b = m(same)["moe_layers"], m_batch(same)["moe_layers"]
    for la, lb in zip(a, b):  # identical sequences: per-sequence == whole batch
        torch.testing.assert_close(la["switch_loss"], lb["switch_loss"])
    diff = torch.randint(0, 32, (3, 9))
    a, b = m(diff)["moe_layers"], m_batch(diff)["moe_layers"]
    assert any(not torch.allclose(la["switch_loss"], lb["switch_loss"]) for la, lb in zip(a, b))


def test_expert_dropout_only_in_training():
    torch.manual_seed(5)
    m = moeyard.Transformer(cfg(moe=dict(expert_dropout=0.5)))
    t = torch.randint(0, 32, (2, 8))
    assert not torch.equal(m(t)["logits"], m(t)["logits"])
    m.eval()
    assert torch.equal(m(t)["logits"], m(t)["logits"])


def test_capacity_stats():
    torch.manual_seed(6)
    m = moeyard.Transformer(cfg(moe=dict(capacity_factor=0.5))).eval()
    out = m(torch.randint(0, 32, (2, 16)))
    for s in out["moe_layers"]:
        C = math.ceil(0.5 * 32 * 2 / 4)
        kept = s["tokens_per_expert"].clamp(max=C).sum()
        torch.testing.assert_close(s["capacity_utilization"], kept / (4 * C))
        assert int(s["dead_experts"]) == int((s["tokens_per_expert"] == 0).sum())


@pytest.mark.parametrize("scaling", ["none", "linear", "yarn"])
def test_rope_tables_match_transformers(scaling):
    import json

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default" if scaling == "none" else scaling, "rope_theta": 500.0}
    if scaling != "none":
        params["factor"] = 4.0
    if scaling == "yarn":
        params["original_max_position_embeddings"] = 16
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params)
    ours = dict(BASE, hidden_size=64, num_heads=4, rope_theta=500.0, rope_scaling=scaling,
                rope_factor=4.0 if scaling != "none" else 1.0, rope_original_max_position=16, max_seq_len=64)
    cos, sin = moeyard._C.rotary_tables(json.dumps(ours))
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if init is None:  # default rope
        inv_freq = 1.0 / (500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
        factor = 1.0
    else:
        inv_freq, factor = init(hf, "cpu")
    pos = torch.arange(64, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq.double())
    emb = torch.cat([freqs, freqs], -1)
    torch.testing.assert_close(cos, (emb.cos() * factor).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, (emb.sin() * factor).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(sliding_window=4, num_kv_heads=1, qk_norm="projection")])
def test_kv_cache_generation_matches_full_recompute(variant):
    torch.manual_seed(7)
    m = moeyard.Transformer(cfg(**variant))
    prompt = [3, 1, 4, 1, 5, 9]
    greedy = m.generate(prompt, 12, temperature=0.0)
    assert greedy == m.generate(prompt, 12, temperature=0.0, use_cache=False)
    sampled = m.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=5)
    assert sampled == m.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=5, use_cache=False)
    assert len(sampled) == 12 and all(0 <= t < 32 for t in sampled)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        m.generate([99], 3)


def test_dropless_capacity_utilization_ignores_padding():
    m = moeyard.Transformer(cfg()).eval()
    t = torch.randint(0, 32, (1, 10))
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1)
    for s in m(t, mask)["moe_layers"]:
        torch.testing.assert_close(s["capacity_utilization"], torch.tensor(1.0))


def test_transformer_is_an_nn_module_sharing_the_native_tensors():
    """moeyard.Transformer is a torch.nn.Module whose parameters are the C++
    model's own tensors: a parent module lists them, an optimizer's update
    changes the C++ forward, hooks fire, state_dict round-trips, .to(device)
    works and a dtype conversion is refused with the reason."""
    import torch

    import moeyard

    cfg = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_size": 64, "max_seq_len": 16,
           "moe": {"num_experts": 4, "top_k": 2}}
    torch.manual_seed(0)
    m = moeyard.Transformer(cfg)
    assert isinstance(m, torch.nn.Module)
    names = [n for n, _ in m._impl.named_parameters()]
    assert [n for n, _ in m.named_parameters()] == names
    assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = m
            self.head = torch.nn.Linear(2, 2)

    holder = Holder()
    assert {n for n, _ in holder.named_parameters()} == {f"lm.{n}" for n in names} | {"head.weight", "head.bias"}
    tokens = torch.randint(0, 64, (2, 10))
    seen = []
    m.register_forward_hook(lambda mod, args, out: seen.append(out["logits"].shape))
    before = m(tokens)["logits"].detach().clone()
    assert seen == [before.shape]
    opt = torch.optim.AdamW(holder.parameters(), lr=1e-2)
    m.loss(tokens)["loss"].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "embed" in n)
    opt.step()
    after = m(tokens)["logits"].detach()
    assert not torch.equal(before, after)  # the C++ forward sees the update
    other = moeyard.Transformer(cfg)
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other(tokens)["logits"], after)
    assert m.to("cpu") is m and m.cpu() is m
    with pytest.raises(TypeError, match=r"keeps each tensor's dtype .*set the model's dtype in its config"):
        m.to(torch.float64)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_few_row_products_without_autograd_match_the_autograd_path(dtype):
    """Without autograd, products of at most 32 rows (decoding) stream their
    weights through grouped_mm's kernel; logits equal the autograd path's
    (ATen's GEMMs) for 1 and 32 tokens."""
    import moeyard

    torch.manual_seed(0)
    model = moeyard.Transformer({"vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                 "ffn_size": 96, "max_seq_len": 64, "dtype": dtype,
                                 "moe": {"num_experts": 4, "top_k": 2}})
    for seq in (1, 32):
        tokens = torch.randint(0, 300, (1, seq))
        with torch.no_grad():
            streamed = model.loss(tokens)["logits"].float()
        with torch.enable_grad():
            aten = model.loss(tokens)["logits"].detach().float()
        tol = 1e-5 if dtype == "float32" else 3e-2
        torch.testing.assert_close(streamed, aten, atol=tol, rtol=tol)
