"""Run a model with its attention computed normally (causal SDPA) while each layer's q/k/v go to a probe.

Calibration steps that only need to look at attention inputs (XAttention's block mass, Sage's quantization
error) share this: one attention function registered with transformers, installed for one forward and removed after.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from compressor.errors import CompressorError

PROBE_ATTENTION = "compressor-probe"

# (layer_idx, q [1, q_heads, tokens, dim], k, v [1, kv_heads, tokens, dim], scale or None for 1/sqrt(dim))
Probe = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], None]


def require_plain_causal(module: torch.nn.Module, kwargs: dict[str, Any], what: str) -> None:
    """Calibration computes plain causal softmax attention: refuse soft-capped or sliding-window layers."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise CompressorError(f"{what} supports plain causal attention (no softcap, no sliding window in the model)")


def probed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA (GQA without repeating K/V) after handing q/k/v to ``module.compressor_probe``."""
    what = getattr(module, "compressor_probe_what", "calibration")
    require_plain_causal(module, kwargs, what)
    if query.shape[0] != 1:
        raise CompressorError(f"{what} runs one unpadded sequence at a time, got batch {query.shape[0]}")
    module.compressor_probe(module.layer_idx, query, key, value, scaling)
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE_ATTENTION, probed_attention)


def run_probed(model: torch.nn.Module, input_ids: list[torch.Tensor], probe: Probe, what: str) -> None:
    """One forward per sequence in ``input_ids`` (each [tokens]) with ``probe`` called on every layer's q/k/v."""
    from compressor.attention_layers import attention_modules

    modules = attention_modules(model)
    if not modules:
        raise CompressorError(f"{type(model).__name__} has no attention modules with a layer_idx: {what} cannot run on it")
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    try:
        for module in modules.values():
            module.compressor_probe, module.compressor_probe_what = probe, what
        model.set_attn_implementation(PROBE_ATTENTION)
        with torch.no_grad():
            for ids in input_ids:
                model(ids.to(device)[None], use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
        for module in modules.values():
            for name in ("compressor_probe", "compressor_probe_what"):
                if hasattr(module, name):
                    delattr(module, name)
