"""The ``sage`` attention-quantization method: per layer, the fastest SageAttention variant that stays accurate.

Calibration runs each calibration sample through the model once with a capturing attention function; for every
layer it computes the float32 attention output of the captured q/k/v (dense causal, the model's own attention) and
the output of each candidate variant (:mod:`compressor.kernels.sage_attention`: the Triton kernels on a GPU, their
reference elsewhere), and records cosine similarity, relative L1 and RMSE. A layer gets the first variant of
``variants`` (fastest first) whose cosine similarity is >= ``cos_min`` and relative L1 <= ``rel_l1_max`` on every
sample (with ``per_head``: for every head, too), else ``bf16``. The plan's ``layers[i].attention.quant`` is
``{"variant": ..., "errors": {variant: {"cos": worst, "rel_l1": worst, "rmse": worst}}}``.

Quantized layers run through the sage kernels at prefill (compressor.runtime); decode stays unquantized.
XAttention layers with a quant setting are handled here (a layer handler placed before XAttention's own).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from compressor.calibration.probe import run_probed
from compressor.kernels import sage_attention as sage
from compressor.kernels.reference import sparse_attention_reference
from compressor.methods.registry import CompressionContext, MethodResult, register_method
from compressor.plan import ModelSignature

DEFAULT_VARIANTS = [v for v in sage.VARIANTS if v != "bf16"]  # fastest first


@dataclass
class SageConfig:
    """Error bounds against float32 attention, candidate variants (fastest first), and whether the bound must hold
    per head (True) or on the layer's whole output (False)."""

    cos_min: float = 0.999
    rel_l1_max: float = 0.02
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    per_head: bool = False

    def __post_init__(self) -> None:
        if not -1.0 <= self.cos_min <= 1.0:
            raise ValueError(f"cos_min must be in [-1, 1], got {self.cos_min}")
        if not self.rel_l1_max >= 0.0:
            raise ValueError(f"rel_l1_max must be >= 0, got {self.rel_l1_max}")
        if not self.variants:
            raise ValueError(f"variants must list at least one of {', '.join(sage.VARIANTS)}")
        for v in self.variants:
            sage.parse_variant(v)  # raises with the list of known variants


# ---------------------------------------------------------------------------------------------------------------
# Error metrics


def attention_errors(out: torch.Tensor, ref: torch.Tensor, per_head: bool) -> dict[str, float]:
    """Worst cosine similarity, relative L1 and RMSE of ``out`` against ``ref`` ([batch, heads, tokens, dim]),
    over the whole tensor or (per_head) over heads."""
    o, r = out.float(), ref.float()
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)
    cos = (o * r).sum(dims) / ((o * o).sum(dims) * (r * r).sum(dims)).sqrt().clamp(min=1e-30)
    rel_l1 = (o - r).abs().sum(dims) / r.abs().sum(dims).clamp(min=1e-30)
    rmse = (o - r).pow(2).mean(dims).sqrt()
    return {"cos": float(cos.min()), "rel_l1": float(rel_l1.max()), "rmse": float(rmse.max())}


def variant_errors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variants: list[str], *, scale: float | None = None,
    causal: bool = True, per_head: bool = False,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Errors of each variant against float32 attention. q: [batch, q_heads, tokens, dim]; k, v: [batch, kv_heads,
    tokens, dim]. Float32 inputs are given to the variants in bfloat16 (what a served model feeds them)."""
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), causal=causal, scale=scale)
    low = [x.to(torch.bfloat16) if x.dtype == torch.float32 else x for x in (q, k, v)]
    return {name: attention_errors(sage.attention(*low, variant=name, causal=causal, scale=scale), ref, per_head)
            for name in variants}


def within_bound(errors: dict[str, float], config: SageConfig) -> bool:
    """True when measured errors meet the config's bounds."""
    return errors["cos"] >= config.cos_min and errors["rel_l1"] <= config.rel_l1_max


def choose_variant(errors: dict[str, dict[str, float]], config: SageConfig) -> str:
    """The first variant of ``config.variants`` within the bounds, else "bf16". errors: worst case per variant."""
    for name in config.variants:
        if name == "bf16" or within_bound(errors[name], config):
            return name
    return "bf16"


def worst(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    """Elementwise worst of two error records."""
    if a is None:
        return dict(b)
    return {"cos": min(a["cos"], b["cos"]), "rel_l1": max(a["rel_l1"], b["rel_l1"]), "rmse": max(a["rmse"], b["rmse"])}


def calibrate(model: torch.nn.Module, input_ids: list[torch.Tensor], config: SageConfig) -> list[dict[str, dict[str, float]]]:
    """Per layer: {variant: worst errors over the samples}."""
    layers: list[dict[str, Any]] = [{} for _ in range(ModelSignature.of(model).num_hidden_layers)]

    def probe(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
        errors = variant_errors(q, k, v, config.variants, scale=scale, per_head=config.per_head)
        for name, e in errors.items():
            layers[idx][name] = worst(layers[idx].get(name), e)

    run_probed(model, input_ids, probe, "sage calibration")
    return layers


def _rounded(errors: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {m: round(x, 6) for m, x in e.items()} for name, e in errors.items()}


@register_method("attention_quant", "sage", SageConfig)
def sage_plan(ctx: CompressionContext, config: SageConfig) -> MethodResult:
    """Pick each layer's fastest SageAttention variant within the error bounds on the calibration samples."""
    started = time.perf_counter()
    samples = [s.input_ids for s in ctx.calibration_samples]
    errors = calibrate(ctx.model, samples, config)
    quant = [{"variant": choose_variant(e, config), "errors": _rounded(e)} for e in errors]
    chosen = [q["variant"] for q in quant]
    search = {
        "bounds": {"cos_min": config.cos_min, "rel_l1_max": config.rel_l1_max, "per_head": config.per_head},
        "variants": list(config.variants),
        "chosen": {name: chosen.count(name) for name in dict.fromkeys(chosen)},
        "errors": [_rounded(e) for e in errors],
    }
    calibration = {"samples": len(samples), "lengths": sorted({int(s.numel()) for s in samples}),
                   "seconds": round(time.perf_counter() - started, 2)}
    return MethodResult(attention_quant=quant, calibration=calibration, search=search)


