"""``moeyard.nn.MoE``: a drop-in sparse Mixture-of-Experts block.

The layer's math is the C++ function ``moeyard::moe_forward`` reached through
the composite op ``torch.ops.moeyard.moe_forward``; this module only owns the
parameters. The router and its math are float32 whatever the experts' dtype.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

_SCORE_FNS = ("softmax", "sigmoid")
_ROUTINGS = ("token_choice", "expert_choice")
_DROP_POLICIES = ("position", "probs")
_NOISES = ("none", "noisy_topk", "gumbel", "jitter")


@dataclass
class MoEResult:
    """Aux losses (float32 scalars) and routing statistics of one forward.

    Padding tokens (``mask == 0``) are excluded from all of them.
    """

    switch_loss: Tensor  # E * sum_e f_e * P_e (Switch Transformer)
    importance_loss: Tensor  # CV^2 of per-expert summed router probabilities
    load_loss: Tensor  # CV^2 of per-expert assignment counts (no gradient)
    z_loss: Tensor  # mean over tokens of logsumexp(logits)^2
    tokens_per_expert: Tensor  # [E] assignments before capacity drops
    dropped_fraction: Tensor  # dropped / valid (token, slot) assignments
    router_entropy: Tensor  # mean entropy of the routing distribution
    capacity_utilization: Tensor  # filled / allocated expert rows
    indices: Tensor  # token choice: [T, K] experts (-1 = padding); EC: [E, C] tokens


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"MoE: {name} must be one of {', '.join(choices)}, got {value!r}")


class MoE(nn.Module):
    """Sparse MoE feed-forward block with SwiGLU experts.

    Args:
        hidden_size: model width H.
        ffn_size: width F of each routed expert.
        num_experts: number of routed experts E.
        top_k: experts per token K (token choice) or the average experts per
            token used to size expert-choice capacity.
        score_fn: ``"softmax"`` or ``"sigmoid"`` router scores.
        renormalize: divide the k selected weights by their sum.
        scale: multiply the weights (DeepSeek's ``routed_scaling_factor``).
        num_groups, topk_groups: group-limited top-k (DeepSeek-V3).
        selection_bias: keep a float32 buffer ``selection_bias [E]`` added to
            the scores for selection only (aux-loss-free balancing).
        router_bias: the router linear has a bias (GPT-OSS).
        routing: ``"token_choice"`` or ``"expert_choice"``.
        weight_on_input: scale each expert's input by the routing weight
            instead of its output (Llama-4).
        capacity_factor: ``C = ceil(factor * T * K / E)`` slots per expert;
            ``<= 0`` is dropless.
        min_capacity: lower bound on C.
        drop_policy: ``"position"`` keeps the earliest tokens, ``"probs"``
            the highest routing weights.
        num_shared_experts, shared_ffn_size: always-on SwiGLU experts, fused
            into one MLP of width ``num_shared_experts * shared_ffn_size``.
        shared_gate: scale the shared output by ``sigmoid(x @ w)`` (Qwen2-MoE).
        noise: training-only router noise: ``"noisy_topk"`` (learned,
            Shazeer et al. 2017), ``"gumbel"``, ``"jitter"`` (multiplicative
            on the router input), or ``"none"``.
        noise_eps: jitter amplitude. temperature: Gumbel temperature.
        expert_dropout: dropout on the experts' hidden activations (training).
        activation: the routed experts' ``"swiglu"``, or GPT-OSS's
            ``"clamped_swiglu"`` (``swiglu_alpha``, ``swiglu_limit``).
        expert_bias: per-expert biases ``b_gate_up [E, 2F]`` and
            ``b_down [E, H]`` (GPT-OSS).
        dtype, device: of the experts and shared experts (the router is
            float32 always).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        score_fn: str = "softmax",
        renormalize: bool = True,
        scale: float = 1.0,
        num_groups: int = 1,
        topk_groups: int = 1,
        selection_bias: bool = False,
        router_bias: bool = False,
        routing: str = "token_choice",
        weight_on_input: bool = False,
        capacity_factor: float = 0.0,
        min_capacity: int = 1,
        drop_policy: str = "position",
        num_shared_experts: int = 0,
        shared_ffn_size: Optional[int] = None,
        shared_gate: bool = False,
        noise: str = "none",
        noise_eps: float = 1e-2,
        temperature: float = 1.0,
        expert_dropout: float = 0.0,
        activation: str = "swiglu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        expert_bias: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
            if v < 1:
                raise ValueError(f"MoE: {name} must be >= 1, got {v}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        _check_choice("score_fn", score_fn, _SCORE_FNS)
        _check_choice("routing", routing, _ROUTINGS)
        _check_choice("drop_policy", drop_policy, _DROP_POLICIES)
        _check_choice("noise", noise, _NOISES)
        if num_experts % num_groups != 0 or not 1 <= topk_groups <= num_groups:
            raise ValueError(
                f"MoE: num_groups ({num_groups}) must divide num_experts ({num_experts}) "
                f"and topk_groups ({topk_groups}) must be in [1, num_groups]"
            )
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.num_experts, self.top_k = num_experts, top_k
        self.score_fn, self.renormalize, self.scale = score_fn, renormalize, scale
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routing, self.weight_on_input = routing, weight_on_input
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.drop_policy = drop_policy
        self.noise, self.noise_eps, self.temperature = noise, noise_eps, temperature
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"MoE: expert_dropout must be in [0, 1), got {expert_dropout}")
        self.expert_dropout = expert_dropout
        _check_choice("activation", activation, ("swiglu", "clamped_swiglu"))
        if activation == "clamped_swiglu" and not swiglu_limit > 0:
            raise ValueError(f"MoE: swiglu_limit must be > 0, got {swiglu_limit}")
        self.activation, self.swiglu_alpha, self.swiglu_limit = activation, swiglu_alpha, swiglu_limit

        fp32 = dict(device=device, dtype=torch.float32)
        dd = dict(device=device, dtype=dtype)
        self.router = nn.Linear(hidden_size, num_experts, bias=router_bias, **fp32)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size, **dd))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **dd))
        self.b_gate_up = self.b_down = None
        if expert_bias:
            self.b_gate_up = nn.Parameter(torch.zeros(num_experts, 2 * ffn_size, **dd))
            self.b_down = nn.Parameter(torch.zeros(num_experts, hidden_size, **dd))
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, **fp32))
        else:
            self.selection_bias = None
        self.noise_weight = (
            nn.Parameter(torch.zeros(num_experts, hidden_size, **fp32)) if noise == "noisy_topk" else None
        )
        self.shared_gate_up = self.shared_down = self.shared_gate = None
        if num_shared_experts > 0:
            fs = num_shared_experts * (shared_ffn_size or ffn_size)
            self.shared_gate_up = nn.Parameter(torch.empty(2 * fs, hidden_size, **dd))
            self.shared_down = nn.Parameter(torch.empty(hidden_size, fs, **dd))
            if shared_gate:
                self.shared_gate = nn.Parameter(torch.empty(1, hidden_size, **dd))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init, applied per expert."""
        self.router.reset_parameters()
        for p in (self.w_gate_up, self.w_down, self.shared_gate_up, self.shared_down, self.shared_gate):
            if p is not None:
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.uniform_(-bound, bound)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, MoEResult]:
        """x [..., H]; mask [...] (nonzero = real token). Returns (y, MoEResult)."""
        out = torch.ops.moeyard.moe_forward(
            x,
            self.router.weight,
            self.router.bias,
            self.w_gate_up,
            self.w_down,
            self.shared_gate_up,
            self.shared_down,
            self.shared_gate,
            self.selection_bias,
            self.noise_weight,
            mask,
            self.top_k,
            self.score_fn,
            self.renormalize,
            self.scale,
            self.num_groups,
            self.topk_groups,
            self.routing,
            self.weight_on_input,
            self.capacity_factor,
            self.min_capacity,
            self.drop_policy,
            self.noise,
            self.noise_eps,
            self.temperature,
            self.expert_dropout,
            0,
            self.training,
            self.b_gate_up,
            self.b_down,
            self.activation,
            self.swiglu_alpha,
            self.swiglu_limit,
        )
        return out[0], MoEResult(*out[1:])

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert: Tensor, rate: float) -> None:
        """Aux-loss-free balancing: ``bias += rate * sign(mean_load - load_e)``."""
        if self.selection_bias is None:
            raise RuntimeError("MoE: update_selection_bias needs selection_bias=True")
        load = tokens_per_expert.float()
        self.selection_bias += rate * torch.sign(load.mean() - load)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, ffn={self.ffn_size}, experts={self.num_experts}, "
            f"top_k={self.top_k}, score_fn={self.score_fn}, routing={self.routing}, "
            f"capacity_factor={self.capacity_factor}"
        )


__all__ = ["MoE", "MoEResult"]
