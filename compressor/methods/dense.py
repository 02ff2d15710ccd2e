"""The ``dense`` attention method: every head keeps full attention (a baseline, and the identity plan)."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.methods.registry import CompressionContext, MethodResult, register_method
from compressor.plan import DensePattern, ModelSignature


@dataclass
class DenseConfig:
    """No options: dense attention everywhere."""


@register_method("attention", "dense", DenseConfig)
def dense_plan(ctx: CompressionContext, config: DenseConfig) -> MethodResult:
    """Every head of every layer dense."""
    sig = ModelSignature.of(ctx.model)
    heads = [[DensePattern() for _ in range(sig.num_attention_heads)] for _ in range(sig.num_hidden_layers)]
    return MethodResult(heads=heads)
