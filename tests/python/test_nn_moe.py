"""moeyard.nn.MoE against a naive per-token loop, torch.compile, masks, noise."""

import math

import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import MoE


def expert_mlp(x, w_gate_up, w_down):
    f = w_down.shape[-1]
    h = x @ w_gate_up.T
    return (F.silu(h[..., :f]) * h[..., f:]) @ w_down.T


def reference(m: MoE, x: torch.Tensor):
    """Token choice MoE written as a plain loop over tokens and their k experts."""
    H, E, K = m.hidden_size, m.num_experts, m.top_k
    x2 = x.reshape(-1, H)
    T = x2.shape[0]
    logits = x2.float() @ m.router.weight.T
    if m.router.bias is not None:
        logits = logits + m.router.bias
    scores = logits.softmax(-1) if m.score_fn == "softmax" else logits.sigmoid()
    sel = scores + (m.selection_bias if m.selection_bias is not None else 0)
    cap = math.ceil(m.capacity_factor * T * K / E) if m.capacity_factor > 0 else None
    if cap is not None:
        cap = max(cap, m.min_capacity)
    filled = [0] * E
    y = torch.zeros(T, H, dtype=torch.float32)
    for t in range(T):
        s = sel[t].tolist()
        allowed = set(range(E))
        if m.num_groups > 1:
            gs = E // m.num_groups
            gscore = [sum(sorted(s[g * gs:(g + 1) * gs], reverse=True)[:2]) for g in range(m.num_groups)]
            keep = sorted(range(m.num_groups), key=lambda g: (-gscore[g], g))[: m.topk_groups]
            allowed = {e for g in keep for e in range(g * gs, (g + 1) * gs)}
        chosen = sorted(allowed, key=lambda e: (-s[e], e))[:K]
        w = torch.stack([scores[t, e] for e in chosen])
        if m.renormalize:
            w = w / (w.sum() + 1e-20)
        w = w * m.scale
        for e, wk in zip(chosen, w):
            if cap is not None:
                filled[e] += 1
                if filled[e] > cap:
                    continue
            if m.weight_on_input:
                y[t] += expert_mlp((x2[t].float() * wk).to(x2.dtype), m.w_gate_up[e], m.w_down[e]).float()
            else:
                y[t] += wk * expert_mlp(x2[t], m.w_gate_up[e], m.w_down[e]).float()
    if m.shared_gate_up is not None:
        shared = expert_mlp(x2, m.shared_gate_up, m.shared_down)
        if m.shared_gate is not None:
            shared = shared * torch.sigmoid(x2 @ m.shared_gate.T)
        y = y + shared.float()
    return y.to(x.dtype).view_as(x)


VARIANTS = {
    "mixtral": dict(),
    "no_renorm_scaled": dict(renormalize=False, scale=2.5),
    "capacity_position": dict(capacity_factor=0.5),
    "sigmoid_groups_shared": dict(
        score_fn="sigmoid", selection_bias=True, num_groups=4, topk_groups=2, scale=2.0,
        num_shared_experts=2, shared_ffn_size=8,
    ),
    "shared_gate_router_bias": dict(num_shared_experts=1, shared_gate=True, router_bias=True),
    "llama4_weight_on_input": dict(score_fn="sigmoid", renormalize=False, weight_on_input=True, top_k=1),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_reference_loop(name):
    torch.manual_seed(0)
    kw = dict(top_k=2)
    kw.update(VARIANTS[name])
    m = MoE(16, 12, 8, **kw)
    if m.selection_bias is not None:
        m.selection_bias.copy_(torch.randn(8) * 0.3)
    if m.router.bias is not None:
        torch.nn.init.normal_(m.router.bias)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, r = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(m, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + [p for p in m.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + [p for p in m.parameters()], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-5, rtol=1e-5)
    assert r.indices.shape == (21, m.top_k)


def test_capacity_drops_are_counted():
    torch.manual_seed(1)
    m = MoE(8, 8, 4, 2, capacity_factor=0.25, min_capacity=1)
    x = torch.randn(40, 8)
    _, r = m(x)
    C = math.ceil(0.25 * 40 * 2 / 4)
    kept = torch.clamp(r.tokens_per_expert, max=C).sum()
    assert torch.isclose(r.dropped_fraction, 1 - kept / 80)
    assert r.tokens_per_expert.sum() == 80
    assert r.dropped_fraction > 0


def test_expert_choice_every_expert_takes_C_tokens():
    torch.manual_seed(2)
    m = MoE(16, 8, 4, 2, routing="expert_choice", capacity_factor=1.0)
    x = torch.randn(10, 16, requires_grad=True)
    y, r = m(x)
    C = math.ceil(1.0 * 10 * 2 / 4)
    assert r.indices.shape == (4, C)
    assert torch.equal(r.tokens_per_expert, torch.full((4,), float(C)))
    scores = (x.detach() @ m.router.weight.T).softmax(-1)
    y_ref = torch.zeros(10, 16)
    for e in range(4):
        top = sorted(range(10), key=lambda t: (-scores[t, e].item(), t))[:C]
        assert sorted(top) == r.indices[e].tolist()
        for t in top:
            y_ref[t] += scores[t, e] * expert_mlp(x.detach()[t], m.w_gate_up[e], m.w_down[e])
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_padding_changes_no_statistic(routing):
    torch.manual_seed(3)
    m = MoE(16, 8, 4, 2, routing=routing)
    real = torch.randn(9, 16)
    padded = torch.cat([real, torch.randn(5, 16) * 10])
    mask = torch.cat([torch.ones(9), torch.zeros(5)])
    y_pad, r_pad = m(padded, mask)
    y_real, r_real = m(real)
    for f in ("switch_loss", "importance_loss", "load_loss", "z_loss", "tokens_per_expert", "dropped_fraction", "router_entropy"):
        if routing == "expert_choice" and f in ("tokens_per_expert", "load_loss", "switch_loss", "dropped_fraction"):
            continue  # C depends on the padded length by definition
        torch.testing.assert_close(getattr(r_pad, f), getattr(r_real, f), msg=f)
    if routing == "token_choice":
        torch.testing.assert_close(y_pad[:9], y_real)
        assert (r_pad.indices[9:] == -1).all()
    else:
        assert not any(t >= 9 for t in r_pad.indices.flatten().tolist())


def test_aux_losses_match_formulas():
    torch.manual_seed(4)
    m = MoE(16, 8, 6, 2)
    x = torch.randn(20, 16)
    _, r = m(x)
    logits = x @ m.router.weight.T
    p = logits.softmax(-1)
    idx = p.topk(2, -1).indices
    counts = torch.bincount(idx.flatten(), minlength=6).float()
    torch.testing.assert_close(r.tokens_per_expert, counts)
    torch.testing.assert_close(r.switch_loss, 6 * ((counts / 40) * p.mean(0)).sum())
    imp = p.sum(0)
    torch.testing.assert_close(r.importance_loss, imp.var(unbiased=False) / imp.mean() ** 2)
    torch.testing.assert_close(r.load_loss, counts.var(unbiased=False) / counts.mean() ** 2)
    torch.testing.assert_close(r.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    torch.testing.assert_close(r.router_entropy, -(p * p.log()).sum(-1).mean())


@pytest.mark.parametrize("noise", ["noisy_topk", "gumbel", "jitter"])
def test_noise_only_in_training(noise):
    torch.manual_seed(5)
    m = MoE(16, 8, 8, 2, noise=noise)
    x = torch.randn(64, 16)
    m.eval()
    y1, _ = m(x)
    y2, _ = m(x)
    assert torch.equal(y1, y2)
    m.train()
    ys = [m(x)[0] for _ in range(2)]
    assert not torch.equal(ys[0], ys[1])
    if noise == "noisy_topk":
        torch.nn.init.normal_(m.noise_weight)
        y, r = m(x)
        (y.square().sum() + r.switch_loss).backward()
        assert m.noise_weight.grad is not None and m.noise_weight.grad.abs().sum() > 0


def test_update_selection_bias():
    m = MoE(8, 8, 4, 1, selection_bias=True)
    m.update_selection_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.1)
    torch.testing.assert_close(m.selection_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_bfloat16_experts_fp32_router():
    torch.manual_seed(6)
    m = MoE(32, 16, 4, 2)
    m_bf = MoE(32, 16, 4, 2, dtype=torch.bfloat16)
    m_bf.load_state_dict({k: v.to(m_bf.state_dict()[k].dtype) for k, v in m.state_dict().items()})
    assert m_bf.router.weight.dtype == torch.float32
    x = torch.randn(24, 32)
    y_bf, r = m_bf(x.bfloat16())
    assert y_bf.dtype == torch.bfloat16 and r.switch_loss.dtype == torch.float32
    y, _ = m(x.bfloat16().float())
    torch.testing.assert_close(y_bf.float(), y, atol=3e-2, rtol=3e-2)
    y_bf.float().sum().backward()
    assert m_bf.w_gate_up.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["mixtral", "capacity_position", "sigmoid_groups_shared"])
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(7)
    kw = dict(top_k=2)
    kw.update(VARIANTS[name])
    m = MoE(16, 12, 8, **kw)
    x = torch.randn(2, 9, 16)

    def step(mod, inp):
        inp = inp.clone().requires_grad_(True)
        y, r = mod(inp)
        loss = y.square().mean() + 0.01 * r.switch_loss + 0.001 * r.z_loss
        loss.backward()
        return loss.detach(), inp.grad, [p.grad.clone() for p in mod.parameters()]

    loss_e, gx_e, gp_e = step(m, x)
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss_c, gx_c, gp_c = step(compiled, x)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gx_c, gx_e)
    for a, b in zip(gp_c, gp_e):
        torch.testing.assert_close(a, b)


def test_compile_inductor_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(8)
    m = MoE(16, 12, 4, 2)
    x = torch.randn(11, 16, requires_grad=True)
    y_e, _ = m(x)
    g_e = torch.autograd.grad(y_e.sum(), x)[0]
    cm = torch.compile(m, fullgraph=True)
    y_c, _ = cm(x)
    g_c = torch.autograd.grad(y_c.sum(), x)[0]
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=9), "top_k must be in"),
        (dict(score_fn="tanh"), "score_fn must be one of"),
        (dict(routing="random"), "routing must be one of"),
        (dict(drop_policy="random"), "drop_policy must be one of"),
        (dict(noise="dropout"), "noise must be one of"),
        (dict(num_groups=3), "num_groups"),
    ],
)
def test_bad_config(kw, match):
    args = dict(top_k=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MoE(16, 8, 8, **args)


def test_wrong_input_shape_names_the_field():
    m = MoE(16, 8, 4, 2)
    with pytest.raises(RuntimeError, match="router_weight must be"):
        m(torch.randn(3, 15))
    with pytest.raises(RuntimeError, match="mask must have one entry per token"):
        m(torch.randn(3, 16), torch.ones(4))


def test_package_exports():
    assert moeyard.__version__ == "0.1.0"
    assert callable(moeyard.ops.router_topk)


@pytest.mark.parametrize("null_experts", [0, 3])
def test_gpt_oss_style_experts_match_a_loop(null_experts):
    """nn.MoE with expert biases and the clamped SwiGLU (GPT-OSS) against a
    per-token loop, outputs and gradients of the biases, with and without
    null experts (whose padding rows must not reach the output)."""
    torch.manual_seed(11)
    H, F, E, K, T = 16, 8, 4, 2, 12
    moe = moeyard.MoE(H, F, E, K, router_bias=True, expert_bias=True, activation="clamped_swiglu",
                      swiglu_limit=0.8, null_experts=null_experts)
    with torch.no_grad():
        moe.b_gate_up.normal_()
        moe.b_down.normal_()
        moe.router.bias.normal_()
    x = torch.randn(T, H)
    y, _ = moe(x)
    p = (x @ moe.router.weight.t() + moe.router.bias).softmax(-1)
    w, idx = p.topk(K, -1)
    w = w / w.sum(-1, keepdim=True)
    assert bool((idx >= E).any()) == (null_experts > 0)
    want = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            if e >= E:  # a null pick adds nothing
                continue
            h = moe.w_gate_up[e] @ x[t] + moe.b_gate_up[e]
            g, u = h[:F].clamp(max=0.8), h[F:].clamp(-0.8, 0.8)
            want[t] += w[t, j] * (moe.w_down[e] @ ((u + 1) * g * torch.sigmoid(1.702 * g)) + moe.b_down[e])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(y.sum(), [moe.b_down])
    (g2,) = torch.autograd.grad(want.sum(), [moe.b_down])
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of swiglu, clamped_swiglu, got 'relu'"):
        moeyard.MoE(H, F, E, K, activation="relu")
