"""moeyard.nn.MoE against transformers' own sparse MoE blocks, same weights.

Mixtral's and Qwen3-MoE's blocks and DeepSeek-V3's MoE (sigmoid scores,
e_score_correction_bias, group-limited top-k, routed scaling, shared experts):
outputs and gradients (input, router, experts, shared experts) within 1e-5 in
float32.
"""

import pytest
import torch

import moeyard

H, F, B, S = 32, 24, 3, 11
TOL = dict(atol=1e-5, rtol=1e-5)


def _copy_experts(moe, experts):
    with torch.no_grad():
        moe.w_gate_up.copy_(experts.gate_up_proj)  # [E, 2F, H]: gate rows, then up
        moe.w_down.copy_(experts.down_proj)  # [E, H, F]


def _compare(hf, moe, pairs, x):
    """pairs: (name, hf_param, moeyard_param, transform of the hf grad)."""
    x_hf = x.clone().requires_grad_(True)
    x_my = x.clone().requires_grad_(True)
    y_hf = hf(x_hf)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    y_my, _ = moe(x_my)
    torch.testing.assert_close(y_my, y_hf, **TOL)
    g = torch.randn_like(y_hf)
    y_hf.backward(g)
    y_my.backward(g)
    torch.testing.assert_close(x_my.grad, x_hf.grad, **TOL)
    for name, p_hf, p_my, fn in pairs:
        torch.testing.assert_close(p_my.grad, fn(p_hf.grad), **TOL, msg=name)


def _ident(t):
    return t


def test_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=6, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = moeyard.MoE(H, F, 6, 2).eval()
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
    _copy_experts(moe, hf.experts)
    _compare(hf, moe, [("router", hf.gate.weight, moe.router.weight, _ident),
                       ("w_gate_up", hf.experts.gate_up_proj, moe.w_gate_up, _ident),
                       ("w_down", hf.experts.down_proj, moe.w_down, _ident)], torch.randn(B, S, H))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_sparse_block(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=8, num_experts_per_tok=3,
                         norm_topk_prob=norm_topk_prob)
    cfg._experts_implementation = "eager"
    hf = Qwen3MoeSparseMoeBlock(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = moeyard.MoE(H, F, 8, 3, renormalize=norm_topk_prob).eval()
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
    _copy_experts(moe, hf.experts)
    _compare(hf, moe, [("router", hf.gate.weight, moe.router.weight, _ident),
                       ("w_gate_up", hf.experts.gate_up_proj, moe.w_gate_up, _ident),
                       ("w_down", hf.experts.down_proj, moe.w_down, _ident)], torch.randn(B, S, H))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_moe(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(2)
    E, K, G, TG, NS = 16, 4, 4, 2, 2
    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
                           n_group=G, topk_group=TG, n_shared_experts=NS, routed_scaling_factor=2.5,
                           norm_topk_prob=norm_topk_prob)
    cfg._experts_implementation = "eager"
    hf = DeepseekV3MoE(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.5)  # the bias must matter
    moe = moeyard.MoE(H, F, E, K, score_fn="sigmoid", renormalize=norm_topk_prob, scale=2.5,
                      num_groups=G, topk_groups=TG, selection_bias=True,
                      num_shared_experts=NS, shared_ffn_size=F).eval()
    sh = hf.shared_experts
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
        moe.selection_bias.copy_(hf.gate.e_score_correction_bias)
        moe.shared_gate_up.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
        moe.shared_down.copy_(sh.down_proj.weight)
    _copy_experts(moe, hf.experts)
    x = torch.randn(B, S, H)
    # the bias changes the choice somewhere (otherwise the test would not test it)
    with torch.no_grad():
        _, _, idx_b = hf.gate(x)
        saved = hf.gate.e_score_correction_bias.clone()
        hf.gate.e_score_correction_bias.zero_()
        _, _, idx_0 = hf.gate(x)
        hf.gate.e_score_correction_bias.copy_(saved)
    assert not torch.equal(idx_b.sort(-1).values, idx_0.sort(-1).values)
    fi = F
    _compare(hf, moe, [
        ("router", hf.gate.weight, moe.router.weight, _ident),
        ("w_gate_up", hf.experts.gate_up_proj, moe.w_gate_up, _ident),
        ("w_down", hf.experts.down_proj, moe.w_down, _ident),
        ("shared_down", sh.down_proj.weight, moe.shared_down, _ident),
    ], x)
    torch.testing.assert_close(moe.shared_gate_up.grad[: NS * fi], sh.gate_proj.weight.grad, **TOL)
    torch.testing.assert_close(moe.shared_gate_up.grad[NS * fi:], sh.up_proj.weight.grad, **TOL)
