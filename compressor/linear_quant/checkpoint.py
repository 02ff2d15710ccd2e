"""Quantized checkpoints in the compressed-tensors format: safetensors with real low-bit weights and a
``quantization_config`` in config.json, which transformers (with compressed-tensors installed) loads by itself.

What the format cannot express (an online Hadamard rotation, a smoothing scale that stays explicit) is not folded:
such a checkpoint gets ``model_type: compressor-online-transform`` (the real one kept as ``compressor_model_type``)
so plain transformers refuses it ("does not recognize this architecture") instead of loading a silently wrong
model (it ignores an unknown ``quant_method``); :func:`load_quantized` reads it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import PlanError
from compressor.linear_quant.apply import APPLIED_FLAG, apply_linear_plan, decoder_layers, plan_precisions
from compressor.linear_quant.formats import PRECISIONS, precision, precision_of_scheme
from compressor.linear_quant.modules import QuantLinear

WEIGHTS_NAME = "model.safetensors"
ONLINE_METHOD = "compressor-online-transform"
ONLINE_NOTE = (
    "this checkpoint rotates some linear-layer inputs online (Hadamard) or keeps explicit smoothing scales, which "
    "compressed-tensors cannot express; load it with compressor.linear_quant.load_quantized (or `compressor` load)"
)


def quantization_config(model: nn.Module, plan: Any) -> dict[str, Any]:
    """The config.json ``quantization_config`` for ``model`` quantized per ``plan``: one group per precision."""
    by_precision: dict[str, list[str]] = {}
    for name, prec in plan_precisions(model, plan).items():
        if precision(prec).quantized:
            by_precision.setdefault(prec, []).append(name)
    quantized = {n for names in by_precision.values() for n in names}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    groups = {}
    for i, (prec, names) in enumerate(sorted(by_precision.items())):
        groups[f"group_{i}"] = PRECISIONS[prec].ct_scheme(names)
    formats = {g["format"] for g in groups.values()}
    online = any(
        isinstance(m, QuantLinear) and (m.hadamard_block or m.input_scale is not None) for m in model.modules()
    )
    config: dict[str, Any] = {
        "quant_method": ONLINE_METHOD if online else "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
    }
    if online:
        config["note"] = ONLINE_NOTE
    return config


@torch.no_grad()
def save_quantized(model: nn.Module, plan: Any, directory: str | os.PathLike) -> Path:
    """Write ``model`` quantized per ``plan`` to ``directory`` (safetensors + config.json with quantization_config).

    A dense model is quantized in place first (the plan's balancing folded, its layers swapped).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    apply_linear_plan(model, plan)
    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" else None
        if key in seen:  # tied weights (lm_head = embed_tokens) are stored once, as transformers does
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model, plan)
    if config["quantization_config"]["quant_method"] == ONLINE_METHOD:
        config["compressor_model_type"], config["model_type"] = config["model_type"], ONLINE_METHOD
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    return out


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def checkpoint_precisions(model: nn.Module, qconfig: dict[str, Any]) -> dict[str, str]:
    """Full module name -> precision for every linear layer ``qconfig`` quantizes (compressed-tensors matching:
    exact names, ``re:`` patterns or class names in targets; ``ignore`` wins)."""
    out = {}
    schemes = [(g.get("targets", []), precision_of_scheme(g)) for g in qconfig.get("config_groups", {}).values()]
    ignore = qconfig.get("ignore") or []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, QuantLinear)) or any(_matches(name, module, t) for t in ignore):
            continue
        for targets, prec in schemes:
            if any(_matches(name, module, t) for t in targets):
                out[name] = prec
                break
    return out


def check_checkpoint_against_plan(model: nn.Module, qconfig: dict[str, Any], plan: Any) -> None:
    """Refuse a checkpoint whose quantization_config and plan disagree, naming both sides."""
    stored = checkpoint_precisions(model, qconfig)
    planned = {n: p for n, p in plan_precisions(model, plan).items() if precision(p).quantized}
    problems = [
        f"{n}: quantization_config {stored.get(n, 'bf16')} vs plan {planned.get(n, 'bf16')}"
        for n in sorted(set(stored) | set(planned)) if stored.get(n) != planned.get(n)
    ]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise PlanError("checkpoint quantization_config disagrees with the plan: " + "; ".join(problems[:6]) + more)


def _quantized_skeleton(model: nn.Module, plan: Any, dtype: torch.dtype) -> None:
    """Swap the planned layers of a meta-device model for empty QuantLinear modules of the right kind."""
    for (lname, layer), layer_plan in zip(decoder_layers(model, len(plan.layers)), plan.layers):
        for rel, s in (layer_plan.linear or {}).items():
            if precision(s["precision"]).quantized:
                _swap_empty(layer, rel, s, dtype)
    for full, s in ((plan.linear or {}).get("modules") or {}).items():
        if precision(s["precision"]).quantized:
            _swap_empty(model, full, s, dtype)


def _swap_empty(root: nn.Module, name: str, s: dict[str, Any], dtype: torch.dtype) -> None:
    lin = root.get_submodule(name)
    rotate = s.get("rotate") or {}
    explicit = bool(s.get("smooth")) and s["smooth"].get("fold") is None
    new = QuantLinear(lin.in_features, lin.out_features, s["precision"], lin.bias is not None,
                      int(rotate.get("online") or 0), explicit, dtype=dtype, device="meta")
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def load_quantized(
    directory: str | os.PathLike, plan: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` onto our QuantLinear modules (no transformers quantizer)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(directory)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == ONLINE_METHOD:
        raw["model_type"] = raw.pop("compressor_model_type")
    raw.pop("transformers_version", None)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        raise PlanError(f"{folder}/config.json has no quantization_config, but the plan quantizes linear layers")
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plan.check_against(model)
    check_checkpoint_against_plan(model, qconfig, plan)
    _quantized_skeleton(model, plan, dtype)
    state = load_file(str(folder / WEIGHTS_NAME), device=str(device))
    for name, tensor in state.items():
        if tensor.is_floating_point() and not name.endswith(("weight_scale", "input_scale")) and tensor.element_size() > 1:
            state[name] = tensor.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise PlanError(f"checkpoint {folder} has tensors the model does not: {unexpected[:5]}")
    model.tie_weights()
    text_config = config.get_text_config()
    for name, module in list(model.named_modules()):  # non-persistent buffers (rotary inv_freq) are rebuilt
        if any(b.is_meta for b in module.buffers(recurse=False)) and "rotary" in name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    type(module)(config=text_config).to(device))
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise PlanError(f"checkpoint {folder} lacks tensors for {still[:5]}")
    setattr(model, APPLIED_FLAG, True)
    return model.eval()
