"""The ``vidit-q`` linear method: W8A8 (int8 or fp8) or W4A8 for the chosen linear layers, optional SmoothQuant
balancing and Hadamard rotation, and optional mixed precision searched from measured sensitivity.

```yaml
linear: {method: vidit-q, precision: w8a8-int8, smooth: true, rotate: false}
linear: {method: vidit-q, precision: mixed, candidates: [bf16, w8a8-int8, w4a8], budget: bits, budget_value: 5.0}
linear: {method: vidit-q, precision: w4a8, smooth: true, rounding: gptq}
```
``rounding: gptq`` chooses the codes with GPTQ's error compensation (``compressor.linear_quant.gptq``) instead of
rounding to nearest; the plan then carries the calibration token ids it needs (``plan.linear["gptq"]``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

from compressor.errors import CompressorError
from compressor.linear_quant.apply import decoder_layers, select_linears
from compressor.linear_quant.calibrate import balance_groups, collect_linear_inputs, layer_balance_settings
from compressor.linear_quant.formats import PRECISIONS, fitting_precision, precision
from compressor.linear_quant.gptq import ROUNDINGS
from compressor.linear_quant.sensitivity import choose_precisions, measure_sensitivity
from compressor.methods.registry import CompressionContext, MethodResult, register_method


@dataclass
class LinearQuantConfig:
    """Linear-layer quantization. ``precision``: one of ``PRECISIONS`` for every chosen layer, or ``mixed``."""

    precision: str = "w8a8-int8"
    include: list[str] = field(default_factory=lambda: [r".*"])
    exclude: list[str] | None = None  # None: lm_head, embeddings, MoE routers, adaLN modulation
    smooth: bool = False
    smooth_grid: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    rotate: bool = False
    rotate_online: list[str] = field(default_factory=lambda: [r"down_proj$"])
    rotate_block: int = 128
    clip_search: bool = False  # int4 group scales: search clipping ratios on calibration inputs (AWQ-style)
    clip_grid: list[float] = field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6])
    rounding: Literal["nearest", "gptq"] = "nearest"  # gptq: error-compensating rounding on calibration Hessians
    gptq_damp: float = 0.01  # added to the Hessian's diagonal, relative to its mean
    gptq_block: int = 128  # columns updated lazily together (a multiple of the int4 group)
    gptq_act_order: bool = True  # quantize the input channels of largest mean square first
    calibration_rows: int = 256
    candidates: list[str] = field(default_factory=lambda: ["bf16", "w8a8-int8", "w4a8"])
    budget: Literal["bits", "memory", "latency"] = "bits"
    budget_value: float = 5.0
    sensitive_factor: float = 8.0
    sensitivity_samples: int = 2
    sensitivity_length: int = 256
    retrieval_task: str = "passkey"
    pareto_points: int = 6

    def __post_init__(self) -> None:
        names = [self.precision] if self.precision != "mixed" else self.candidates
        for name in names:
            precision(name)  # raises with the known names
        if self.precision == "mixed" and not any(PRECISIONS[n].quantized for n in self.candidates):
            raise ValueError(f"mixed precision needs a quantized candidate, got {self.candidates}")
        if self.budget_value <= 0:
            raise ValueError(f"budget_value must be > 0, got {self.budget_value}")
        if self.rotate_block < 2 or self.rotate_block & (self.rotate_block - 1):
            raise ValueError(f"rotate_block must be a power of two >= 2, got {self.rotate_block}")
        if not all(0.0 <= a <= 1.0 for a in self.smooth_grid):
            raise ValueError(f"smooth_grid values must lie in [0, 1], got {self.smooth_grid}")
        if not self.clip_grid or not all(0.0 < r <= 1.0 for r in self.clip_grid):
            raise ValueError(f"clip_grid needs ratios in (0, 1], got {self.clip_grid}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp must lie in (0, 1), got {self.gptq_damp}")
        if self.gptq_block < 1:
            raise ValueError(f"gptq_block must be >= 1, got {self.gptq_block}")

    def used_precisions(self) -> list[str]:
        return self.candidates if self.precision == "mixed" else [self.precision]


def check_device_supports(precisions: list[str], device: torch.device) -> None:
    """Refuse fp8 on a CUDA GPU below compute capability 8.9 (no fp8 matrix units)."""
    if device.type == "cuda" and any(PRECISIONS[p].weight == "fp8" for p in precisions):
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise CompressorError(
                f"fp8 linear layers need a GPU of compute capability >= 8.9 (Ada, Hopper); this one is {cap[0]}.{cap[1]}: "
                "use precision w8a8-int8, or compress on --device cpu"
            )


@register_method("linear", "vidit-q", LinearQuantConfig)
def linear_quant_plan(ctx: CompressionContext, config: LinearQuantConfig) -> MethodResult:
    """Calibrate balancing per layer, measure sensitivity when mixed, and emit per-layer linear settings."""
    check_device_supports(config.used_precisions(), ctx.device)
    model = ctx.model
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = decoder_layers(model, n_layers)
    chosen = set(select_linears(model, config.include, config.exclude))
    base = config.precision if config.precision != "mixed" else min(
        (p for p in config.candidates if PRECISIONS[p].quantized), key=lambda p: PRECISIONS[p].weight_bits()
    )
    per_layer = []
    for lname, layer in layers:
        rel = [n[len(lname) + 1 :] for n in chosen if n.startswith(lname + ".")]
        per_layer.append({r: fitting_precision(base, layer.get_submodule(r).in_features) for r in sorted(rel)})
    inside = {f"{lname}.{r}" for (lname, _), d in zip(layers, per_layer) for r in d}
    outside = sorted(chosen - inside)

    stats = {}
    if config.smooth or config.clip_search:
        names = []
        for (lname, layer), d in zip(layers, per_layer):
            names += [f"{lname}.{members[0]}" for _, members in balance_groups(layer, list(d))]
        batches = [s.input_ids for s in ctx.calibration_samples]
        stats = collect_linear_inputs(model, names, batches, config.calibration_rows, ctx.recipe.calibration.seed)
    settings, records = [], {}
    for i, ((lname, layer), d) in enumerate(zip(layers, per_layer)):
        s, rec = layer_balance_settings(
            layer, lname, d, stats, config.smooth, config.smooth_grid, config.rotate, config.rotate_online,
            config.rotate_block, clip_grid=config.clip_grid if config.clip_search else None,
        )
        settings.append(s)
        records[str(i)] = rec
    search: dict = {}
    if config.precision == "mixed":
        settings, search = _mixed(ctx, config, settings)
    linear_model = {"modules": {n: {"precision": base if config.precision != "mixed" else "bf16"} for n in outside}} if outside else None
    if config.rounding == "gptq":
        for layer in settings:
            for s in layer.values():
                if PRECISIONS[s["precision"]].quantized:
                    s["rounding"] = "gptq"
        linear_model = dict(linear_model or {}, gptq={
            "damp": config.gptq_damp, "block": config.gptq_block, "act_order": config.gptq_act_order,
            "ids": [[int(t) for t in s.input_ids.reshape(-1).tolist()] for s in ctx.calibration_samples],
        })
    calibration = {"smooth": records} if config.smooth else {}
    return MethodResult(linear=[s or None for s in settings], linear_model=linear_model, calibration=calibration, search=search)


def sensitivity_data(ctx: CompressionContext, config: LinearQuantConfig) -> tuple[torch.Tensor, list]:
    """Natural text ``[samples, tokens]`` and retrieval samples the sensitivity is measured on (calibration split)."""
    from compressor.calibration.data import corpus_token_batches, retrieval_samples

    seed = ctx.recipe.calibration.seed
    text = corpus_token_batches(ctx.tokenizer, config.sensitivity_length, config.sensitivity_samples, seed, "calibration")
    answers = retrieval_samples(ctx.tokenizer, config.retrieval_task, config.sensitivity_length,
                                config.sensitivity_samples, seed, chat=ctx.recipe.calibration.chat, split="calibration")
    return text, answers


def _mixed(ctx: CompressionContext, config: LinearQuantConfig, settings: list[dict]) -> tuple[list[dict], dict]:
    model = ctx.model
    text, answers = sensitivity_data(ctx, config)
    layer_list = _layer_list(model, len(settings))
    planned = [{m: s for m, s in layer.items() if PRECISIONS[s["precision"]].quantized} for layer in settings]
    sens = measure_sensitivity(model, layer_list, planned, config.candidates, text, answers)
    names, record = choose_precisions(sens, config.budget, config.budget_value, config.sensitive_factor, config.pareto_points)
    final = copy.deepcopy(settings)
    for (i, m), prec in zip(sens.items, names):
        final[i][m]["precision"] = fitting_precision(prec, layer_list[i].get_submodule(m).in_features)
        if not PRECISIONS[prec].quantized:
            final[i][m].pop("rotate", None)
    for layer in final:  # smoothing of a group none of whose members stayed quantized is dropped
        groups: dict = {}
        for m, s in layer.items():
            if s.get("smooth"):
                groups.setdefault(s["smooth"]["fold"] or m, []).append(m)
        for members in groups.values():
            if not any(PRECISIONS[layer[m]["precision"]].quantized for m in members):
                for m in members:
                    layer[m].pop("smooth")
    record["sensitivity"] = sens.to_dict()
    return final, record


def _layer_list(model: torch.nn.Module, count: int) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise CompressorError(f"no list of {count} decoder layers in {type(model).__name__}")
