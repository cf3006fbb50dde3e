"""``moeyard.Transformer``: the C++ MoE Transformer from Python.

The model, its forward pass and its loss are C++ (``csrc/model``); this class
is a ``torch.nn.Module`` holding the native module. Its parameters and
buffers are the C++ module's own tensors (as ``nn.Parameter``), registered
under their names, so optimizers, ``state_dict()``, ``.to(device)``, hooks
and parent modules see and update exactly what the C++ forward uses.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

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


class Transformer(torch.nn.Module):
    """Decoder-only MoE Transformer. ``config``: a dict, a YAML string or a
    YAML file with the fields of ``docs/model.md`` (``moe:`` nested)."""

    def __init__(self, config: Union[str, os.PathLike, Dict[str, Any]]) -> None:
        super().__init__()
        self._impl = _build(config)
        self._adopt()

    @classmethod
    def _wrap(cls, impl, training: bool) -> "Transformer":
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self._impl = impl
        self._adopt()
        return self.train(training)

    def _adopt(self) -> None:
        """Registers the C++ module's tensors under their names: the same
        Python objects (parameters become ``nn.Parameter`` in place), so a
        gradient, an optimizer's update or a device move reaches the C++
        model."""
        self._parameters.clear()
        self._buffers.clear()
        for name, p in self._impl.named_parameters():
            if not isinstance(p, torch.nn.Parameter):
                p.__class__ = torch.nn.Parameter
            self._parameters[name] = p
        for name, b in self._impl.named_buffers():
            self._buffers[name] = b

    def _apply(self, fn, recurse: bool = True):
        # Each tensor keeps its dtype (the router and the norms are float32
        # in a bfloat16 model): only the device may change, in place.
        with torch.no_grad():
            for name, t in list(self._parameters.items()) + list(self._buffers.items()):
                moved = fn(t)
                if moved.dtype != t.dtype:
                    raise TypeError(f"moeyard.Transformer keeps each tensor's dtype ({name} is {t.dtype}); set "
                                    f"the model's dtype in its config (model.dtype) instead of converting")
                t.data = moved
        return self

    @classmethod
    def from_hf(cls, path: Union[str, os.PathLike], dtype: str = "float32",
                device: Union[str, torch.device, None] = None) -> "Transformer":
        """The model of a Hugging Face checkpoint directory (config.json +
        safetensors; families in ``docs/checkpoints.md``), in ``dtype``
        (``float32``, ``bfloat16`` or ``float64``), on ``device``. Quantized
        releases (FP8, MXFP4) are dequantized into ``dtype`` tensor by
        tensor."""
        self = cls._wrap(_C.load_hf(os.fspath(path), dtype), True)
        return self.to(device) if device is not None else self

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
        return cls._wrap(_C.load_trained(path), False)

    def add_lora(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets=("attention", "mlp", "experts"), base_dtype: str = "model") -> int:
        """Adds LoRA factors (``finetune.lora`` of docs/training.md) and
        freezes every other parameter; returns the number of LoRA
        parameters."""
        n = self._impl.add_lora(rank, alpha, dropout, list(targets), base_dtype)
        self._adopt()  # the factors are new parameters
        return n

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

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> Dict[str, Tensor]:
        sd = {} if destination is None else destination
        for n, p in self.named_parameters():
            sd[prefix + n] = p if keep_vars else p.detach()
        for n, b in self.named_buffers():
            sd[prefix + n] = b
        return sd

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Tensor], strict: bool = True, assign: bool = False) -> None:
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

    def set_recompute(self, mode: str, layers: Sequence[int] = ()) -> "Transformer":
        """Activation recompute in backward: ``none``, ``moe`` (the feed-forward
        sub-block), ``attention`` (the attention sub-block) or ``full`` (the
        block), in the blocks ``layers`` (empty: every block); docs/training.md."""
        self._impl.set_recompute(mode, list(layers))
        return self

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
