"""``moeyard.Transformer``: the C++ MoE Transformer from Python.

The model, its forward pass and its loss are C++ (``csrc/model``); this class
holds the native module and gives it the parts of the ``nn.Module`` API that
training code uses: ``parameters()``, ``named_parameters()``,
``state_dict()``, ``load_state_dict()``, ``train()``/``eval()``.
"""

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C


def _build(config: Union[str, os.PathLike, Dict[str, Any]]):
    if isinstance(config, dict):
        return _C.TransformerImpl(json.dumps(config))  # JSON is YAML
    text = os.fspath(config)
    if os.path.exists(text):
        return _C.TransformerImpl.from_file(text)  # errors cite file:line
    return _C.TransformerImpl(text)


class Transformer:
    """Decoder-only MoE Transformer. ``config``: a dict, a YAML string or a
    YAML file with the fields of ``docs/model.md`` (``moe:`` nested)."""

    def __init__(self, config: Union[str, os.PathLike, Dict[str, Any]]) -> None:
        self._impl = _build(config)
        self.training = True

    @classmethod
    def from_hf(cls, path: Union[str, os.PathLike], dtype: str = "float32") -> "Transformer":
        """The model of a Hugging Face checkpoint directory (config.json +
        safetensors; families in ``docs/checkpoints.md``), in ``dtype``
        (``float32``, ``bfloat16`` or ``float64``). Quantized releases (FP8,
        MXFP4) are dequantized into ``dtype`` tensor by tensor."""
        self = cls.__new__(cls)
        self._impl = _C.load_hf(os.fspath(path), dtype)
        self.training = True
        return self

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike]) -> "Transformer":
        """The model of a ``moeyard train`` checkpoint: a ``step_<N>``
        directory, or a run directory (its ``latest``). LoRA factors of a
        ``finetune.lora`` run are included. Returned in eval mode."""
        path = os.fspath(path)
        latest = os.path.join(path, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                path = os.path.join(path, f.read().strip())
        self = cls.__new__(cls)
        self._impl = _C.load_trained(path)
        self.training = False
        return self

    def add_lora(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets=("attention", "mlp", "experts"), base_dtype: str = "model") -> int:
        """Adds LoRA factors (``finetune.lora`` of docs/training.md) and
        freezes every other parameter; returns the number of LoRA
        parameters."""
        return self._impl.add_lora(rank, alpha, dropout, list(targets), base_dtype)

    def lora_merged_weights(self) -> Dict[str, Tensor]:
        """The weights LoRA changes, merged (base + alpha/rank * B A), by
        base parameter name."""
        return self._impl.lora_merged_weights()

    def save_peft(self, path: Union[str, os.PathLike], family: str, base_model: str = "") -> None:
        """Writes the LoRA factors as a PEFT adapter (``adapter_config.json``
        + ``adapter_model.safetensors``) for ``family``'s transformers
        model."""
        _C.save_peft(self._impl, family, os.fspath(path), base_model)

    def save_hf(self, path: Union[str, os.PathLike], family: str,
                base_config: Optional[Dict[str, Any]] = None,
                max_shard_bytes: int = 5 << 30) -> None:
        """Writes ``config.json`` and safetensors in ``family``'s own layout
        (``transformers`` loads the directory). ``base_config``: the original
        config.json, whose other keys are kept."""
        _C.save_hf(self._impl, family, os.fspath(path),
                   json.dumps(base_config) if base_config else "", max_shard_bytes)

    def __call__(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Any]:
        return self.forward(tokens, mask)

    def forward(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Any]:
        """Returns ``{"logits": [B, S, V], "moe_layers": [per-layer stats]}``."""
        return self._impl.forward(tokens, mask)

    def loss(self, tokens: Tensor, mask: Optional[Tensor] = None,
             loss_mask: Optional[Tensor] = None) -> Dict[str, Any]:
        """Next-token loss plus weighted aux losses: keys loss, ce, aux, tokens,
        logits, moe_layers. ``mask`` marks real tokens (padding is neither
        attended to nor predicted); ``loss_mask`` the tokens to predict (a
        chat's answers: the prompt is attended to, not trained on)."""
        return self._impl.loss(tokens, mask, loss_mask)

    def named_parameters(self) -> Iterator[Tuple[str, Tensor]]:
        yield from self._impl.named_parameters()

    def parameters(self) -> Iterator[Tensor]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[Tuple[str, Tensor]]:
        yield from self._impl.named_buffers()

    def state_dict(self) -> Dict[str, Tensor]:
        sd = {n: p.detach() for n, p in self.named_parameters()}
        sd.update({n: b for n, b in self.named_buffers()})
        return sd

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Tensor], strict: bool = True) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing}, unexpected {unexpected}")
        for name, t in state.items():
            if name in own:
                if own[name].shape != t.shape:
                    raise ValueError(f"load_state_dict: {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(t)

    def train(self, mode: bool = True) -> "Transformer":
        self._impl.train(mode)
        self.training = mode
        return self

    def eval(self) -> "Transformer":
        return self.train(False)

    def set_recompute(self, mode: str, layers: Sequence[int] = ()) -> "Transformer":
        """Activation recompute in backward: ``none``, ``moe`` (the feed-forward
        sub-block), ``attention`` (the attention sub-block) or ``full`` (the
        block), in the blocks ``layers`` (empty: every block); docs/training.md."""
        self._impl.set_recompute(mode, list(layers))
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_cache: bool = True):
        """Sampled continuation token ids of ``prompt`` (a list of ids), with a
        KV cache (``use_cache=False`` recomputes the prefix every step)."""
        return self._impl.generate(list(prompt), max_new_tokens, temperature, top_p, seed, use_cache)

    def moe_layer_indices(self):
        return self._impl.moe_layer_indices()

    def critic_predictions(self, tokens: Tensor) -> List[Tensor]:
        """The routing critics' predictions (``moe.critic_hidden``): per MoE
        layer, [B, S] loss increases if each token's lowest-weight pick were
        skipped. A layer skips where its prediction is below its
        ``layers.<i>.moe.critic_threshold`` buffer (-inf: never), at
        evaluation."""
        return self._impl.critic_predictions(tokens)

    def update_selection_bias(self, layer: int, tokens_per_expert: Tensor, rate: float) -> None:
        self._impl.update_selection_bias(layer, tokens_per_expert, rate)
