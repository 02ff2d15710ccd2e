"""Calibration for linear quantization: what the inputs of each linear layer look like on calibration data, and
the per-layer balancing settings (smoothing strength, rotations) chosen from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.linear_quant.balance import (
    NORM_CONSUMERS, PRODUCERS, _find, _foldable_norm, choose_smoothing, input_importance, online_block,
)
from compressor.linear_quant.formats import Precision, precision
from compressor.memory import release_host_memory


@dataclass
class InputStats:
    """Inputs of one linear layer on calibration data: per-channel max |x| ``[in]`` and sampled rows ``[rows, in]``."""

    amax: torch.Tensor
    rows: torch.Tensor

    def __repr__(self) -> str:
        return f"InputStats(in={self.amax.numel()}, rows={self.rows.shape[0]}, max={float(self.amax.max()):.3g})"


@torch.no_grad()
def collect_linear_inputs(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], rows: int = 128, seed: int = 0
) -> dict[str, InputStats]:
    """Run ``model`` on each ``[1, tokens]`` batch of ids, recording the inputs of the named ``nn.Linear`` modules.

    The kept rows and maxima live in buffers made once per module and filled in place: small long-lived tensors
    allocated between each forward's temporaries fragmented glibc's heap on the CPU (RSS grew by GBs over 128
    calibration windows), and the heap is trimmed after each batch.
    """
    gen = torch.Generator().manual_seed(seed)
    amax: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    per_batch = max(1, rows // max(1, len(batches)))
    capacity = min(rows, per_batch * len(batches))

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if name not in amax:
                amax[name] = torch.zeros(x.shape[-1], dtype=torch.float32)
                kept[name] = torch.empty(capacity, x.shape[-1], dtype=torch.float32)
                filled[name] = 0
            torch.maximum(amax[name], x.abs().amax(dim=0).float().cpu(), out=amax[name])
            take = min(per_batch, x.shape[0], capacity - filled[name])
            if take > 0:
                pick = torch.randperm(x.shape[0], generator=gen)[:take].to(x.device)
                kept[name][filled[name] : filled[name] + take] = x[pick].float().cpu()
                filled[name] += take
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
            release_host_memory()
    finally:
        for h in handles:
            h.remove()
    return {n: InputStats(amax[n], kept[n][: filled[n]]) for n in names if n in amax}


def balance_groups(layer: nn.Module, names: list[str]) -> list[tuple[str | None, list[str]]]:
    """Groups of linear layers (relative names) that must share one smoothing scale, with the fold target:
    a norm's consumers, a producer's consumer, or a lone layer with an explicit scale (fold None)."""
    groups: list[tuple[str | None, list[str]]] = []
    placed: set[str] = set()
    for norm_name, consumers in NORM_CONSUMERS.items():
        present = [c for c in consumers if _find(layer, c) is not None]
        norm = _find(layer, norm_name)
        if present and norm is not None and _foldable_norm(norm) and any(c in names for c in present):
            groups.append((norm_name, present))
            placed.update(present)
    for consumer, producer in PRODUCERS.items():
        if consumer in names and consumer not in placed and isinstance(_find(layer, producer), nn.Linear):
            groups.append((producer, [consumer]))
            placed.add(consumer)
    groups += [(None, [n]) for n in names if n not in placed]
    return groups


def _head_geometry(layer: nn.Module) -> tuple[int, int] | None:
    """(query heads per value head, head_dim) of the layer's attention, or None when unknown."""
    attn = _find(layer, "self_attn")
    head_dim = getattr(attn, "head_dim", None)
    groups = getattr(attn, "num_key_value_groups", None)
    return (int(groups), int(head_dim)) if head_dim and groups else None


@torch.no_grad()
def layer_balance_settings(
    layer: nn.Module,
    layer_name: str,
    precisions: dict[str, str],
    stats: dict[str, InputStats],
    smooth: bool,
    grid: list[float],
    rotate: bool,
    rotate_online: list[str],
    max_block: int = 128,
    balance_precision: str | None = None,
    clip_grid: list[float] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-module plan settings of one layer (precision, smooth, rotate) and the calibration record.

    ``precisions`` maps relative module names to precision names; ``stats`` is keyed by full names
    (``layer_name + "." + relative``). Smoothing is calibrated at ``balance_precision`` (default: each group's lowest).
    With ``clip_grid``, every quantized layer gets ``clip`` settings: int4 group scales searched over the grid, weighted
    by the mean squared input each channel sees (after its smoothing and rotation), and the smoothing search sees them.
    """
    settings: dict[str, dict[str, Any]] = {n: {"precision": p} for n, p in precisions.items()}
    record: dict[str, Any] = {}
    geometry = _head_geometry(layer)
    rotations: dict[str, dict[str, Any]] = {}
    if rotate:
        for name in precisions:
            if not precision(precisions[name]).quantized:
                continue
            lin = layer.get_submodule(name)
            head_dim = geometry[1] if geometry else 0
            if name in PRODUCERS and name.endswith("o_proj") and head_dim and not head_dim & (head_dim - 1) \
                    and isinstance(_find(layer, PRODUCERS[name]), nn.Linear):
                rotations[name] = {"fold": PRODUCERS[name], "block": min(head_dim, max_block)}
            elif any(re.search(p, name) for p in rotate_online):
                rotations[name] = {"online": online_block(lin.in_features, max_block)}
    if smooth or clip_grid:
        for fold, members in balance_groups(layer, list(precisions)):
            quantized = [m for m in members if m in precisions and precision(precisions[m]).quantized]
            if not quantized:
                continue
            key = f"{layer_name}.{members[0]}"
            if key not in stats:
                continue
            names_bits = sorted(quantized, key=lambda m: precision(precisions[m]).weight_bits())
            prec: Precision = precision(balance_precision or precisions[names_bits[0]])
            rot = rotations.get(members[0], {})
            hadamard = int(rot.get("online") or rot.get("block") or 0)
            ties = geometry if (fold and fold.endswith("v_proj") and geometry and geometry[0] > 1) else None
            weights = [layer.get_submodule(m).weight for m in members]
            alpha, scales, errors = choose_smoothing(
                stats[key].rows, stats[key].amax, weights, prec, grid if smooth else [], hadamard, ties, clip_grid
            )
            if smooth:
                record[members[0] if len(members) == 1 else (fold or members[0])] = {"alpha": alpha, "errors": errors}
            if clip_grid:
                importance = [float(v) for v in input_importance(stats[key].rows, scales, hadamard).tolist()]
                for m in quantized:
                    settings[m]["clip"] = {"grid": list(clip_grid), "importance": importance}
            if alpha is None:
                continue
            for m in members:
                entry = settings.setdefault(m, {"precision": "bf16"})
                entry["smooth"] = {"alpha": alpha, "scales": [float(v) for v in scales.tolist()], "fold": fold}
                if fold and fold.endswith("v_proj") and geometry:
                    entry["smooth"]["head_dim"] = geometry[1]
    for name, rot in rotations.items():
        settings[name]["rotate"] = rot
    return settings, record
