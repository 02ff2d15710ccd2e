"""Which linear layers a recipe quantizes, and swapping them per a plan: balance (fold), rotate, quantize."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.linear_quant.balance import fold_layer_balancing
from compressor.linear_quant.formats import layer_weight_bits, precision
from compressor.linear_quant.modules import QuantLinear

APPLIED_FLAG = "compressor_linear_applied"

# lm_head, embeddings, MoE routers and DiT adaLN modulation stay in the model's dtype unless a recipe says otherwise.
DEFAULT_EXCLUDE = [
    r"(^|\.)lm_head$",
    r"(^|\.)(embed_tokens|wte|wpe|embeddings?)(\.|$)",
    r"(^|\.)(mlp|block_sparse_moe|moe)\.gate$",
    r"(^|\.)router(\.|$)",
    r"(^|\.)(adaLN_modulation|adaln|modulation)(\.|$)",
]


def select_linears(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` modules matching any ``include`` regex (all when None) and no ``exclude``
    regex (``DEFAULT_EXCLUDE`` when None), in model order."""
    inc = [re.compile(p) for p in (include or [r".*"])]
    exc = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)
    ]


def decoder_layers(model: nn.Module, count: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of the ``count`` decoder layers: the ModuleList of that length holding attention modules."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and all(
            any(hasattr(m, "layer_idx") for m in child.modules()) for child in module
        ):
            return [(f"{name}.{i}", child) for i, child in enumerate(module)]
    raise CompressorError(
        f"found no list of {count} decoder layers in {type(model).__name__}; linear quantization needs a "
        "transformers decoder (model.layers)"
    )


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_modules(
    root: nn.Module, settings: dict[str, dict[str, Any]], codes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, nn.Module]:
    """Replace each ``nn.Linear`` named in ``settings`` (names relative to ``root``) by a QuantLinear.

    Settings: ``precision`` (required), ``hadamard`` (online block, optional), ``input_scale`` (tensor, optional),
    ``clip`` (int4 scale search, optional). ``codes`` gives chosen ``(q, scale)`` per name (GPTQ); the others are
    rounded to nearest. Layers whose precision is ``bf16`` are left as they are. Returns the new modules by name.
    """
    out = {}
    for name, s in settings.items():
        p = precision(s["precision"])
        module = root.get_submodule(name)
        if not p.quantized:
            continue
        if isinstance(module, QuantLinear):
            raise CompressorError(f"{name} is already quantized ({module.precision.name}); apply a plan to a dense model")
        if not isinstance(module, nn.Linear):
            raise CompressorError(f"{name} is a {type(module).__name__}, not an nn.Linear: cannot quantize it")
        new = QuantLinear.from_linear(module, p.name, int(s.get("hadamard") or 0), s.get("input_scale"), s.get("clip"),
                                      (codes or {}).get(name))
        _set_module(root, name, new)
        out[name] = new
    return out


@torch.no_grad()
def apply_layer_settings(
    layer: nn.Module, settings: dict[str, dict[str, Any]], hessians: dict[str, torch.Tensor] | None = None,
    gptq: dict[str, Any] | None = None,
) -> dict[str, nn.Module]:
    """Fold balancing and rotations of one decoder layer (or any module) into its weights, then quantize: GPTQ
    (options ``gptq``) for the modules with a Hessian (``[in, in]`` of their balanced, rotated inputs), else nearest."""
    from compressor.linear_quant.gptq import gptq_quantize

    runtime = fold_layer_balancing(layer, settings)
    codes = {}
    for name, h in (hessians or {}).items():
        opts = gptq or {}
        clip = runtime[name].get("clip") or {}
        codes[name] = gptq_quantize(
            layer.get_submodule(name).weight, h, precision(runtime[name]["precision"]), float(opts.get("damp", 0.01)),
            int(opts.get("block", 128)), bool(opts.get("act_order", True)), clip.get("grid"),
        )
    return quantize_modules(layer, runtime, codes)


@torch.no_grad()
def apply_linear_plan(model: nn.Module, plan: Any) -> nn.Module:
    """Swap the model's ``nn.Linear`` layers for QuantLinear per ``plan`` (``compressor.plan.Plan``); in place.

    Per decoder layer, ``plan.layers[i].linear`` maps module paths inside the layer to settings; ``plan.linear``
    (``{"modules": {full name: settings}}``) covers linear layers outside the decoder layers.
    """
    layers = decoder_layers(model, len(plan.layers))
    if getattr(model, APPLIED_FLAG, False):  # loaded quantized, or applied before: check, never quantize twice
        check_applied(model, plan)
        return model
    for (name, layer), layer_plan in zip(layers, plan.layers):
        missing = [k for k in (layer_plan.linear or {}) if not _has_module(layer, k)]
        if missing:
            raise CompressorError(f"plan names linear layers {missing} that {name} does not have")
    if any(s.get("rounding") == "gptq" for lp in plan.layers for s in (lp.linear or {}).values()):
        from compressor.linear_quant.gptq import apply_gptq_layers

        apply_gptq_layers(model, layers, [lp.linear for lp in plan.layers], (plan.linear or {}).get("gptq") or {})
    else:
        for (_, layer), layer_plan in zip(layers, plan.layers):
            if layer_plan.linear:
                apply_layer_settings(layer, layer_plan.linear)
    outside = (plan.linear or {}).get("modules") or {}
    if outside:
        apply_layer_settings(model, outside)
    setattr(model, APPLIED_FLAG, True)
    return model


def plan_precisions(model: nn.Module, plan: Any) -> dict[str, str]:
    """Full module name -> precision name for every linear layer the plan names."""
    out = {}
    for (name, _), layer_plan in zip(decoder_layers(model, len(plan.layers)), plan.layers):
        for rel, s in (layer_plan.linear or {}).items():
            out[f"{name}.{rel}"] = s["precision"]
    for full, s in ((plan.linear or {}).get("modules") or {}).items():
        out[full] = s["precision"]
    return out


def average_weight_bits(model: nn.Module, plan: Any) -> float:
    """Parameter-weighted stored bits per weight (scales included) over every ``nn.Linear`` of the decoder layers,
    at the precision the plan gives it (bf16 when it names none); ``model`` is the dense model."""
    total = bits = 0.0
    for (_, layer), layer_plan in zip(decoder_layers(model, len(plan.layers)), plan.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                prec = (layer_plan.linear or {}).get(name, {}).get("precision", "bf16")
                total += module.weight.numel()
                bits += module.weight.numel() * layer_weight_bits(prec, module.in_features)
    return bits / total


def check_applied(model: nn.Module, plan: Any) -> None:
    """Refuse a model whose quantized layers differ from the plan's, naming both sides."""
    problems = []
    for name, prec in plan_precisions(model, plan).items():
        module = model.get_submodule(name)
        have = module.precision.name if isinstance(module, QuantLinear) else "bf16"
        if (have == "bf16") != (not precision(prec).quantized) or (have != "bf16" and have != prec):
            problems.append(f"{name}: plan {prec} vs model {have}")
    if problems:
        raise CompressorError("model's quantized linear layers do not match the plan: " + "; ".join(problems[:8]))


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False
