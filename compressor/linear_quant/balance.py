"""Channel balancing: SmoothQuant scale migration and Hadamard rotation (QuaRot form), folded into weights.

A linear layer's settings in the plan may carry
- ``smooth: {"alpha", "scales": [in], "fold": producer or None, "head_dim"?}``: ``W[:, j] *= s_j`` and the input is
  divided by ``s`` upstream: by the preceding RMSNorm's weight (shared by all its consumers), by the rows of the
  producing linear (``v_proj`` for ``o_proj``, ``up_proj`` for ``down_proj``), or explicitly at run time (fold None).
- ``clip: {"grid": [ratios], "importance": [in]}``: int4 group scales searched over clipping ratios, each input
  channel's weight error weighted by its mean squared (balanced, rotated) calibration input.
- ``rotate: {"fold": "self_attn.v_proj", "block": head_dim}``: a per-head Hadamard folded into v_proj rows and
  o_proj columns (exact: attention mixes value vectors linearly per head); or ``{"online": block}``: the weight's
  columns are rotated offline and the input is rotated at run time (down_proj: after the SwiGLU nonlinearity).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.kernels.quant_reference import hadamard_block_for, hadamard_matrix, hadamard_reference, quant_linear_reference
from compressor.kernels.quant_reference import quantize_weight_int4_groups, quantize_weight_per_channel, dequantize_weight
from compressor.linear_quant.formats import Precision

# Which norm feeds which linear layers, and which linear produces another's input (Llama / Mistral / Qwen names).
NORM_CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
PRODUCERS = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}


def _foldable_norm(norm: nn.Module) -> bool:
    # Gemma-style norms scale by (1 + weight): dividing the weight would not divide the output.
    return "gemma" not in type(norm).__name__.lower() and isinstance(getattr(norm, "weight", None), torch.Tensor)


def _find(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _rotate_columns(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``W @ blockdiag(H)``: the weight that, fed a rotated input, gives the unrotated output."""
    out_f, in_f = weight.shape
    h = hadamard_matrix(block, weight.device)
    return (weight.float().reshape(out_f, in_f // block, block) @ h).reshape(out_f, in_f).to(weight.dtype)


def _expand_to_producer(scales: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor:
    """Scales on a consumer's inputs -> scales on its producer's rows (GQA: one value head serves several heads)."""
    if scales.numel() == rows:
        return scales
    g = scales.numel() // rows
    per = scales.reshape(rows // head_dim, g, head_dim)
    if not torch.allclose(per, per[:, :1].expand_as(per)):
        raise CompressorError("smoothing scales differ between query heads sharing a value head: cannot fold into v_proj")
    return per[:, 0].reshape(rows)


@torch.no_grad()
def fold_layer_balancing(layer: nn.Module, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold every ``smooth`` and ``rotate`` setting of one layer into its weights (in place).

    Returns per module the run-time settings ``quantize_modules`` takes: precision, online Hadamard block and any
    smoothing scale that stays explicit.
    """
    runtime: dict[str, dict[str, Any]] = {}
    folded: dict[str, torch.Tensor] = {}
    for name, s in settings.items():
        lin = layer.get_submodule(name)
        rt: dict[str, Any] = {"precision": s["precision"]}
        if s.get("clip"):
            rt["clip"] = s["clip"]
        smooth = s.get("smooth")
        if smooth:
            scales = torch.tensor(smooth["scales"], dtype=torch.float32, device=lin.weight.device)
            lin.weight.copy_((lin.weight.float() * scales[None, :]).to(lin.weight.dtype))
            fold = smooth.get("fold")
            if fold is None:
                rt["input_scale"] = 1.0 / scales
            elif fold in folded:
                if not torch.equal(folded[fold], scales):
                    raise CompressorError(f"{name}: smoothing scales differ from the other consumers of {fold}")
            else:
                folded[fold] = scales
                target = layer.get_submodule(fold)
                if isinstance(target, nn.Linear):
                    rows = _expand_to_producer(scales, target.out_features, int(smooth.get("head_dim", 1)))
                    target.weight.copy_((target.weight.float() / rows[:, None]).to(target.weight.dtype))
                    if target.bias is not None:
                        target.bias.copy_((target.bias.float() / rows).to(target.bias.dtype))
                else:
                    target.weight.copy_((target.weight.float() / scales).to(target.weight.dtype))
        runtime[name] = rt
    for name, s in settings.items():
        rotate = s.get("rotate")
        if not rotate:
            continue
        lin = layer.get_submodule(name)
        if "online" in rotate:
            lin.weight.copy_(_rotate_columns(lin.weight, int(rotate["online"])))
            runtime[name]["hadamard"] = int(rotate["online"])
        else:
            block = int(rotate["block"])
            producer = layer.get_submodule(rotate["fold"])
            lin.weight.copy_(_rotate_columns(lin.weight, block))
            h = hadamard_matrix(block, producer.weight.device)
            w = producer.weight.float().reshape(-1, block, producer.in_features)
            producer.weight.copy_(torch.einsum("ij,kjn->kin", h, w).reshape_as(producer.weight).to(producer.weight.dtype))
            if producer.bias is not None:
                b = producer.bias.float().reshape(-1, block) @ h
                producer.bias.copy_(b.reshape(-1).to(producer.bias.dtype))
    return runtime


# ---------------------------------------------------------------------------------------------------------------
# Calibration: per-channel activation maxima, sampled input rows, and the smoothing strength per group.


def smooth_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: ``s_j = max|X_j|^a / max|W_j|^(1-a)``, clamped away from 0 and inf."""
    s = act_amax.clamp(min=1e-5).pow(alpha) / weight_amax.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4)


def input_importance(x: torch.Tensor, scales: torch.Tensor | None, hadamard: int) -> torch.Tensor:
    """Mean squared input per channel ``[in]`` of a layer fed ``x: [rows, in]`` balanced by ``scales`` and rotated."""
    xs = x.float() if scales is None else x.float() / scales
    if hadamard:
        xs = hadamard_reference(xs, hadamard)
    return xs.pow(2).mean(dim=0)


def quantized_output_error(
    x: torch.Tensor, weights: list[torch.Tensor], prec: Precision, scales: torch.Tensor | None, hadamard: int,
    clip_grid: list[float] | None = None,
) -> float:
    """Relative squared error of the layer outputs when ``x: [rows, in]`` and each weight are balanced, rotated and
    quantized at ``prec`` (int4 scales searched over ``clip_grid`` when given), summed over the consumers."""
    total = 0.0
    xs = x if scales is None else x / scales
    imp = input_importance(x, scales, hadamard) if clip_grid and prec.weight == "int4" else None
    for w in weights:
        y_ref = x @ w.float().t()
        wb = w.float() if scales is None else w.float() * scales[None, :]
        if hadamard:
            wb = _rotate_columns(wb, hadamard)
        if prec.weight == "int4":
            q, sc = quantize_weight_int4_groups(wb, prec.group_size, clip_grid, imp)
        else:
            q, sc = quantize_weight_per_channel(wb, prec.weight)
        y = quant_linear_reference(xs, q, sc, None, prec.act, prec.group_size, hadamard, torch.float32)
        total += float((y - y_ref).pow(2).sum() / y_ref.pow(2).sum().clamp(min=1e-12))
    return total


def choose_smoothing(
    x: torch.Tensor,
    act_amax: torch.Tensor,
    weights: list[torch.Tensor],
    prec: Precision,
    grid: list[float],
    hadamard: int = 0,
    head_groups: tuple[int, int] | None = None,
    clip_grid: list[float] | None = None,
) -> tuple[float | None, torch.Tensor | None, dict[str, float]]:
    """The smoothing strength in ``grid`` (or none) with the lowest quantized-output error on the rows ``x``.

    ``head_groups = (group, head_dim)`` ties scales across query heads that share a value head (folding into v_proj).
    Returns ``(alpha or None, scales or None, error per candidate)``.
    """
    device = weights[0].device  # calibration rows may be kept on the CPU while the model runs on a GPU
    x = x.to(device)
    w_amax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a_amax = act_amax.float().to(device)
    if head_groups is not None:
        g, d = head_groups
        tie = lambda v: v.reshape(-1, g, d).amax(dim=1, keepdim=True).expand(-1, g, d).reshape(-1)  # noqa: E731
        w_amax, a_amax = tie(w_amax), tie(a_amax)
    errors = {"none": quantized_output_error(x, weights, prec, None, hadamard, clip_grid)}
    best: tuple[float, float | None, torch.Tensor | None] = (errors["none"], None, None)
    for alpha in grid:
        s = smooth_scales(a_amax, w_amax, alpha)
        err = quantized_output_error(x, weights, prec, s, hadamard, clip_grid)
        errors[f"{alpha:g}"] = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


def online_block(features: int, max_block: int) -> int:
    """The online Hadamard block for ``features`` inputs (largest power of two dividing it, capped)."""
    block = hadamard_block_for(features, max_block)
    if block < 2:
        raise CompressorError(f"no Hadamard block fits {features} input features (odd size)")
    return block


def dequantized_error_weight(w: torch.Tensor, prec: Precision) -> torch.Tensor:
    """``W`` after a round trip through ``prec``'s weight quantization (for tests and diagnostics)."""
    if prec.weight == "int4":
        q, s = quantize_weight_int4_groups(w, prec.group_size)
        return dequantize_weight(q, s, prec.group_size)
    q, s = quantize_weight_per_channel(w, prec.weight)
    return dequantize_weight(q, s)
