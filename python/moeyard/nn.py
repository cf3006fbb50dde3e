"""``moeyard.nn.MoE``: a drop-in sparse Mixture-of-Experts block.

The layer's math is the C++ function ``moeyard::moe_forward`` reached through
the composite op ``torch.ops.moeyard.moe_forward``; this module only owns the
parameters. The router and its math are float32 whatever the experts' dtype.
Its routing options, their defaults, checks and docs, and the fields of
MoEResult are the rows of the C++ table ``csrc/model/moe_interface.h``, read
here through ``moeyard._C.moe_interface()``.
"""

import inspect
import math
from dataclasses import make_dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _C

_INTERFACE = _C.moe_interface()
# name -> row: type, default, choices or range, doc.
_OPTIONS = {row["name"]: row for row in _INTERFACE["options"]}
_WEIGHTS = [row["name"] for row in _INTERFACE["weights"]]
_RESULT_FIELDS = [row for row in _INTERFACE["outputs"] if row["name"] != "y"]


def _describe(rows, indent="    "):
    lines = []
    for row in rows:
        allowed = row.get("choices") and "one of " + ", ".join(row["choices"]) or row.get("range") or ""
        head = f"{row['name']} ({row.get('type', 'Tensor')}" + (f", default {row['default']!r}" if "default" in row else "")
        lines.append(f"{indent}{head}{', ' + allowed if allowed else ''}): {row['doc']}")
    return "\n".join(lines)


MoEResult = make_dataclass("MoEResult", [(row["name"], Tensor) for row in _RESULT_FIELDS])
MoEResult.__doc__ = (
    "Aux losses (float32 scalars) and routing statistics of one forward.\n\n"
    "Padding tokens (``mask == 0``) are excluded from all of them.\n\n" + _describe(_RESULT_FIELDS)
)


class MoE(nn.Module):
    """Sparse MoE feed-forward block with SwiGLU experts.

    Args:
        hidden_size: model width H.
        ffn_size: width F of each routed expert.
        num_experts: number of routed experts E.
        top_k: experts per token K (token choice) or the average experts per
            token used to size expert-choice capacity.
        selection_bias: keep a float32 buffer ``selection_bias [E + Z]`` added
            to the scores for selection only (aux-loss-free balancing; Z =
            ``null_experts``).
        router_bias: the router linear has a bias (GPT-OSS).
        num_shared_experts, shared_ffn_size: always-on SwiGLU experts, fused
            into one MLP of width ``num_shared_experts * shared_ffn_size``.
        shared_gate: scale the shared output by ``sigmoid(x @ w)`` (Qwen2-MoE).
        expert_bias: per-expert biases ``b_gate_up [E, 2F]`` and
            ``b_down [E, H]`` (GPT-OSS).
        dtype, device: of the experts and shared experts (the router is
            float32 always).
        **options: the routing options below, keyword-only; each is also an
            attribute that the next forward reads.

    Routing options:
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int = _OPTIONS["top_k"]["default"],
        *,
        selection_bias: bool = False,
        router_bias: bool = False,
        num_shared_experts: int = 0,
        shared_ffn_size: Optional[int] = None,
        shared_gate: bool = False,
        expert_bias: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        **options,
    ) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
            if v < 1:
                raise ValueError(f"MoE: {name} must be >= 1, got {v}")
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"MoE: unknown option '{unknown[0]}'; options: {', '.join(_OPTIONS)}")
        options["top_k"] = top_k
        _C.check_moe_options(num_experts, **options)  # types and values
        if selection_bias and options.get("routing", "token_choice") != "token_choice":
            raise ValueError(f"MoE: selection_bias needs routing 'token_choice', got '{options['routing']}'")
        self.hidden_size, self.ffn_size, self.num_experts = hidden_size, ffn_size, num_experts
        for name, row in _OPTIONS.items():
            setattr(self, name, options.get(name, row["default"]))

        fp32 = dict(device=device, dtype=torch.float32)
        dd = dict(device=device, dtype=dtype)
        routed = num_experts + self.null_experts  # router rows: the null experts last
        self.router = nn.Linear(hidden_size, routed, bias=router_bias, **fp32)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size, **dd))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **dd))
        self.b_gate_up = self.b_down = None
        if expert_bias:
            self.b_gate_up = nn.Parameter(torch.zeros(num_experts, 2 * ffn_size, **dd))
            self.b_down = nn.Parameter(torch.zeros(num_experts, hidden_size, **dd))
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(routed, **fp32))
        else:
            self.selection_bias = None
        self.noise_weight = (
            nn.Parameter(torch.zeros(routed, hidden_size, **fp32)) if self.noise == "noisy_topk" else None
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

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, token_ids: Optional[Tensor] = None,
                drop_lowest: Optional[Tensor] = None) -> Tuple[Tensor, MoEResult]:
        """x [..., H]; mask [...] (nonzero = real token); token_ids [...]
        (integers; needed by ``routing="hash"``); drop_lowest [...] (bool:
        skip the token's lowest-weight real pick where it has two or more).
        Returns (y, MoEResult)."""
        weights = {name: self._weight(name) for name in _WEIGHTS}
        options = {name: getattr(self, name) for name in _OPTIONS}
        out = torch.ops.moeyard.moe_forward(x, **weights, mask=mask, token_ids=token_ids,
                                            drop_lowest=drop_lowest, training=self.training,
                                            **options)
        return out[0], MoEResult(*out[1:])

    def _weight(self, name: str) -> Optional[Tensor]:
        if self._hf_weights is not None:
            view = self._hf_weights.get(name)
            return view() if view is not None else None
        if name.startswith("router_"):
            return getattr(self.router, name[len("router_"):])
        return getattr(self, name)

    _hf_weights = None  # from_hf_block: weight name -> its view of the block's tensors

    @classmethod
    def from_hf_block(cls, block: nn.Module, config) -> "MoE":
        """The moeyard MoE of a transformers sparse MoE block (Mixtral,
        Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...; ``config`` is the
        model's config): the family's routing (read from the config as
        ``Transformer.from_hf`` reads it) computed by moeyard's fused op on
        the block's own tensors, which are this module's parameters (the
        block is its submodule ``hf_block``). Where the family stores a
        weight in another layout (shared experts' separate gate and up,
        GPT-OSS's transposed, interleaved experts), each forward builds
        moeyard's layout from it (a copy that autograd keeps until the
        backward), and gradients reach the block's tensors. Blocks with
        per-expert modules instead of fused expert tensors are refused."""
        import json

        text = config.to_json_string() if hasattr(config, "to_json_string") else json.dumps(config)
        args, rules = _C.hf_moe_block(text)
        # The aux-loss coefficients are the caller's (MoEResult has the losses).
        structure = set(inspect.signature(MoE.__init__).parameters)
        args = {k: v for k, v in args.items() if k in _OPTIONS or k in structure}
        tensors = dict(block.named_parameters())
        tensors.update(block.named_buffers())
        experts = next(r for r in rules if r["ours"] == "w_gate_up")
        name = experts["fused"] if experts["fused"] in tensors else experts["theirs"][0]
        if name not in tensors:
            raise ValueError(f"MoE.from_hf_block: {type(block).__name__} has no tensor '{name}' (its experts' "
                             f"gate/up weights, fused as transformers keeps them); its tensors: "
                             f"{', '.join(sorted(tensors))}")
        dtype = tensors[name].dtype
        moe = cls(**args, dtype=dtype, device="meta")
        for name in [n for n, _ in moe.named_parameters(recurse=False)] + ["selection_bias", "noise_weight"]:
            setattr(moe, name, None)
        moe.router = None
        moe.hf_block = block
        moe._hf_weights = {}
        for rule in rules:
            view = _hf_view(rule, tensors, type(block).__name__)
            if view is not None:
                moe._hf_weights[rule["ours"].replace(".", "_")] = view
        return moe

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert: Tensor, rate: float) -> None:
        """Aux-loss-free balancing of the real experts: ``bias += rate *
        sign(mean_load - load_e)``."""
        if self.selection_bias is None:
            raise RuntimeError("MoE: update_selection_bias needs selection_bias=True")
        load = tokens_per_expert.float()[: self.num_experts]
        self.selection_bias[: self.num_experts] += rate * torch.sign(load.mean() - load)

    @torch.no_grad()
    def update_null_bias(self, tokens_per_expert: Tensor, target: float, rate: float) -> None:
        """Null-fraction controller: the null experts' selection bias moves by
        ``rate * sign(target - null share of tokens_per_expert)``."""
        if self.selection_bias is None or self.null_experts == 0:
            raise RuntimeError("MoE: update_null_bias needs null_experts > 0 and selection_bias=True")
        load = tokens_per_expert.float()
        share = load[self.num_experts:].sum() / load.sum().clamp_min(1)
        self.selection_bias[self.num_experts:] += rate * torch.sign(target - share)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, ffn={self.ffn_size}, experts={self.num_experts}, "
            f"top_k={self.top_k}, score_fn={self.score_fn}, routing={self.routing}, "
            f"capacity_factor={self.capacity_factor}"
        )


def _hf_view(rule: dict, tensors: dict, block: str):
    """A function giving weight ``rule["ours"]`` from the block's tensors
    (None when an optional one is absent)."""
    names = [rule["fused"]] if rule["fused"] in tensors else rule["theirs"]
    missing = [n for n in names if n not in tensors]
    if missing:
        if rule["optional"]:
            return None
        raise ValueError(f"MoE.from_hf_block: {block} has no tensor '{missing[0]}' (for moeyard's "
                         f"{rule['ours']}); its tensors: {', '.join(sorted(tensors))}")
    sources = [tensors[n] for n in names]
    router = rule["ours"].startswith("router.") or rule["ours"] == "selection_bias"

    def view() -> Tensor:
        w = sources[0] if len(sources) == 1 else torch.cat(sources, dim=0)  # [gate; up]
        if rule["transposed"]:
            w = w.transpose(-1, -2)
        if rule["interleaved"]:  # gate, up alternating along the width -> stacked
            w = torch.cat((w[:, 0::2], w[:, 1::2]), dim=1)
        return w.float() if router else w  # the router is float32

    return view


def _signature():
    """MoE.__init__'s signature with every routing option as a keyword."""
    sig = inspect.signature(MoE.__init__)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=row["default"], annotation=kinds[row["type"]])
        for name, row in _OPTIONS.items() if name != "top_k"
    ]
    return sig.replace(parameters=params)


MoE.__doc__ = MoE.__doc__.rstrip() + "\n" + _describe(_INTERFACE["options"], indent="        ") + "\n"
MoE.__init__.__signature__ = _signature()


__all__ = ["MoE", "MoEResult"]
