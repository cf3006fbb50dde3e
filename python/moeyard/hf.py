"""A bridge to ``transformers``: moeyard runs the MoE of a loaded Hugging
Face model, its experts only or its whole sparse blocks.

``patch_hf_model(model)`` registers moeyard as an experts implementation of
transformers' ``ExpertsInterface`` and selects it on ``model``: every
experts module (the ``@use_experts_implementation`` classes of Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...) then computes with
``route_plan``, ``permute``, ``grouped_mm`` (over each expert's rows only),
``swiglu`` and ``unpermute``, on the model's own weights (shared, not
copied). The router stays the model's, so the picks, and the logits up to
rounding, are the unpatched model's.

``patch_hf_model(model, blocks=True)`` computes each whole sparse MoE block
with ``moeyard.MoE.from_hf_block`` instead: moeyard's fused router and
experts in one op, with its aux losses and routing statistics.
"""

import torch
from torch import Tensor

from . import ops

NAME = "moeyard"


def _expert_of_rows(offsets: Tensor, rows: int) -> Tensor:
    """The expert of each of `rows` expert-contiguous rows, on the device
    (no host read of the offsets); padding rows get the last expert (their
    values are never read)."""
    ends = offsets[1:]
    row = torch.arange(rows, device=offsets.device, dtype=ends.dtype)
    return torch.searchsorted(ends, row, right=True).clamp(max=ends.numel() - 1)


def _weight(w: Tensor, transposed: bool) -> Tensor:
    # grouped_mm takes [E, out, in]; transposed layouts store [E, in, out].
    return w.transpose(1, 2) if transposed else w


def experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts call (hidden [T, H], top-k indices and weights
    [T, K]) through moeyard's ops. Indices outside [0, E) (expert-parallel
    sentinels) make no row."""
    E = self.num_experts
    index = top_k_index.long()
    index = torch.where((index >= 0) & (index < E), index, -1)
    weights = top_k_weights.float()
    row_token, slot, offsets, _ = ops.route_plan(index, weights, E)
    rows = ops.permute(hidden_states, row_token)
    row_expert = _expert_of_rows(offsets, rows.size(0)) if self.has_bias else None

    def project(x, weight, bias):
        y = ops.grouped_mm(x, _weight(weight, self.is_transposed).to(x.dtype), offsets)
        return y if bias is None else y + bias[row_expert].to(y.dtype)

    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    h = project(rows, up, up_bias)
    if not self.has_gate:
        act = self.act_fn(h)
    elif _plain_swiglu(self):
        act = ops.swiglu(h, offsets)
    else:  # the model's own gate (GPT-OSS's clamped, interleaved SwiGLU)
        act = self._apply_gate(h)
    out = project(act, self.down_proj, self.down_proj_bias if self.has_bias else None)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return ops.unpermute(out, slot, weights).to(hidden_states.dtype)


def _plain_swiglu(experts) -> bool:
    """Whether the module's gate is silu(gate) * up on [gate; up] halves."""
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(experts), "_apply_gate", None)
    act = getattr(experts, "act_fn", None)
    return (getattr(experts, "is_concatenated", True) and gate in (None, _default_apply_gate)
            and isinstance(act, torch.nn.SiLU))


def patch_hf_model(model: torch.nn.Module, blocks: bool = False) -> torch.nn.Module:
    """Runs the MoE of a loaded transformers model with moeyard (returns the
    model; its parameters, their names and ``save_pretrained`` are
    unchanged).

    ``blocks=False``: the experts only, through transformers'
    ``ExpertsInterface``; the model's router makes the picks.
    ``blocks=True``: every sparse MoE block is computed by
    ``MoE.from_hf_block`` (moeyard's fused router, the family's routing
    read from the config); each block keeps its last ``MoEResult`` (aux
    losses, routing statistics) as ``block.moeyard_result``.

    Raises a ValueError naming the model when it has no experts module that
    takes an experts implementation."""
    from transformers.integrations.moe import ExpertsInterface

    experts = [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "num_experts")]
    if not experts or not hasattr(model, "set_experts_implementation"):
        raise ValueError(f"patch_hf_model: {type(model).__name__} has no experts module that takes an experts "
                         "implementation (transformers' @use_experts_implementation)")
    if blocks:
        for block in [m for m in model.modules() if any(c in experts for c in m.children())]:
            _run_block_with_moeyard(block, model.config)
        return model
    ExpertsInterface.register(NAME, experts_forward)
    model.set_experts_implementation(NAME)
    return model


def _run_block_with_moeyard(block: torch.nn.Module, config) -> None:
    from .nn import MoE

    moe = MoE.from_hf_block(block, config)
    weight = next(block.parameters())
    with torch.no_grad():  # does the block return (hidden, router scores)? (GPT-OSS)
        returns_tuple = isinstance(block(torch.zeros(1, 1, moe.hidden_size, dtype=weight.dtype,
                                                     device=weight.device)), tuple)

    def forward(hidden_states: Tensor, *args, **kwargs):
        moe.train(block.training)
        y, result = moe(hidden_states)
        block.moeyard_result = result
        return (y, None) if returns_tuple else y

    # Not registered as a submodule: the model's parameters keep their names.
    block.__dict__["moeyard_moe"] = moe
    block.forward = forward
