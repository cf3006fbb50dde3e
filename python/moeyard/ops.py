"""Python entry points of the moeyard custom ops (``torch.ops.moeyard.*``).

Each function is a thin documented wrapper over the registered operator; the
math lives in C++ (``csrc/ops``). All ops support autograd (their backward is
itself a registered op), ``torch.compile`` (Meta kernels) and float32,
float64, bfloat16 and float16.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.moeyard


def router_topk(
    logits: Tensor,
    k: int,
    score_fn: str = "softmax",
    renormalize: bool = True,
    scale: float = 1.0,
    selection_bias: Optional[Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scores experts and picks each token's top ``k``.

    Returns ``(weights [T, k], indices [T, k] int64, scores [T, E])``. The
    selection uses ``scores + selection_bias`` (limited to the best
    ``topk_groups`` of ``num_groups`` groups, each scored by the sum of its
    top-2); the weights are the unbiased scores, renormalized to sum to one if
    ``renormalize``, times ``scale``. Ties go to the lower expert index.
    """
    return _ops.router_topk(
        logits, k, score_fn, renormalize, scale, selection_bias, num_groups, topk_groups
    )


def route_plan(
    indices: Tensor,
    weights: Tensor,
    num_experts: int,
    capacity: int = -1,
    drop_policy: str = "position",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Expert-contiguous row layout of top-k choices.

    Returns ``(row_token [N], slot [T, K], expert_offsets [E+1], counts [E])``.
    ``capacity=-1`` is dropless (``N = T*K``); otherwise ``N = E*capacity`` and
    ``drop_policy`` ``"position"`` keeps the earliest pairs, ``"probs"`` the
    highest weights. ``indices == -1`` marks a pair with no expert (padding).
    """
    return _ops.route_plan(indices, weights, num_experts, capacity, drop_policy)


def permute(x: Tensor, row_token: Tensor) -> Tensor:
    """``rows[i] = x[row_token[i]]``, zero rows where ``row_token[i] == -1``."""
    return _ops.permute(x, row_token)


def unpermute(rows: Tensor, slot: Tensor, weights: Tensor) -> Tensor:
    """``y[t] = sum_k weights[t, k] * rows[slot[t, k]]`` (skips ``slot == -1``)."""
    return _ops.unpermute(rows, slot, weights)


def grouped_mm(input: Tensor, weight: Tensor, expert_offsets: Tensor) -> Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of ``input`` times ``weight[e].T``."""
    return _ops.grouped_mm(input, weight, expert_offsets)


def swiglu(gate_up: Tensor, expert_offsets: Optional[Tensor] = None) -> Tensor:
    """``silu(gate_up[:, :F]) * gate_up[:, F:]`` for ``gate_up [N, 2F]``;
    with ``expert_offsets`` (grouped_mm's) only rows ``offsets[0]:offsets[-1]``
    are computed, the others are zero."""
    return _ops.swiglu(gate_up, expert_offsets)


__all__ = ["router_topk", "route_plan", "permute", "unpermute", "grouped_mm", "swiglu"]
