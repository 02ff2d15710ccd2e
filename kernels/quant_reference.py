"""Plain-PyTorch reference for quantized linear layers: the spec the Triton kernels in ``quant_linear.py`` and
``quant_activation.py`` are tested against, and the path that runs where they cannot (CPU, odd shapes).

Conventions shared by every quantized-linear kernel in this package:
- Activations ``x: [tokens, in_features]`` are quantized per token (row), symmetric, dynamically:
  int8 ``q = clamp(round(x / s), -127, 127)`` with ``s = amax(|x_row|) / 127``; fp8 e4m3 ``q = (x / s).to(fp8)`` with
  ``s = amax / 448``. ``scale: [tokens]`` float32. An all-zero row gets scale 1 (never a division by zero).
- Weights ``[out_features, in_features]`` are quantized offline, symmetric: int8 or fp8 per output channel
  (``w_scale: [out_features]``), or int4 in groups of ``group_size`` along ``in_features``
  (``w_scale: [out_features, in_features // group_size]``, values in [-8, 7]).
- Packed int4 follows compressed-tensors' ``pack-quantized`` layout: value + 8 as an unsigned nibble, eight per
  int32, element ``k`` at bits ``4 * (k % 8)`` of word ``k // 8``: ``packed: [out_features, in_features // 8]``.
- The online Hadamard rotation is block-diagonal: ``x.view(..., in_features // block, block) @ H_block`` with the
  normalised Sylvester matrix (symmetric, orthogonal), ``block`` a power of two dividing ``in_features``.
"""

from __future__ import annotations

import functools
import math

import torch

INT8_MAX = 127.0
INT4_MAX = 7.0
FP8_MAX = 448.0  # torch.float8_e4m3fn


def fp8_dtype() -> torch.dtype:
    """The fp8 storage dtype (e4m3, finite-only, as compressed-tensors and ``torch._scaled_mm`` use)."""
    return torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------------------
# Hadamard


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).to(torch.float32)


def hadamard_matrix(block: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix ``[block, block]`` (block a power of two): H = H^T, H @ H = I."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    return _hadamard_cpu(block).to(device=device, dtype=dtype)


def hadamard_block_for(features: int, max_block: int = 128) -> int:
    """The largest power of two dividing ``features``, capped at ``max_block``."""
    return min(features & -features, max_block)


def hadamard_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal Hadamard rotation of the last dim, in float32: ``x: [..., features]`` -> same shape."""
    features = x.shape[-1]
    if features % block:
        raise ValueError(f"Hadamard block {block} does not divide {features} features")
    h = hadamard_matrix(block, x.device)
    return (x.float().reshape(*x.shape[:-1], features // block, block) @ h).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------------
# Activations


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what the kernels compute: floor(y + 0.5) / ceil(y - 0.5))."""
    return torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (as Llama's): ``x * rsqrt(mean(x^2) + eps) * weight``."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm_as_input(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_reference` returned in ``x``'s dtype: what a layer that was handed the norm feeds its path."""
    return rms_norm_reference(x, weight, eps).to(x.dtype)


def quantize_activation_reference(
    x: torch.Tensor,
    dtype: str = "int8",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    hadamard_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of ``x: [tokens, features]`` (optionally RMSNorm, then Hadamard first).

    Returns ``(q: [tokens, features] int8 or fp8, scale: [tokens] float32)``; ``q * scale[:, None]`` approximates x.
    """
    xf = x.float() if norm_weight is None else rms_norm_reference(x, norm_weight, eps)
    if hadamard_block:
        xf = hadamard_reference(xf, hadamard_block)
    amax = xf.abs().amax(dim=-1)
    qmax = INT8_MAX if dtype == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = xf / scale[:, None]
    if dtype == "int8":
        q = round_half_away(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif dtype == "fp8":
        q = y.clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype())
    else:
        raise ValueError(f"activation dtype must be 'int8' or 'fp8', got {dtype!r}")
    return q, scale


# ---------------------------------------------------------------------------------------------------------------
# Weights


def quantize_weight_per_channel(weight: torch.Tensor, dtype: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of ``weight: [out, in]`` -> ``(q [out, in], scale [out] fp32)``."""
    wf = weight.float()
    amax = wf.abs().amax(dim=1)
    qmax = INT8_MAX if dtype == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = wf / scale[:, None]
    if dtype == "int8":
        return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    if dtype == "fp8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype()), scale
    raise ValueError(f"weight dtype must be 'int8' or 'fp8', got {dtype!r}")


def quantize_weight_int4_groups(
    weight: torch.Tensor, group_size: int = 128, clip_grid: list[float] | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in groups of ``group_size`` input channels: ``(q [out, in] int8 in [-8, 7], scale [out, in/g])``.

    With ``clip_grid`` (ratios in (0, 1]), each group's scale is ``ratio * amax / 7`` with the ratio of the grid that
    minimises the group's weight error ``sum_j importance_j (w_j - dequant(q)_j)^2`` (``importance: [in]``, e.g. the
    mean squared input of each channel on calibration data; uniform when None): clipping a few large weights buys a
    finer step for all the others, which at 4 bits usually wins.
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group_size}")
    wg = weight.float().reshape(out_f, in_f // group_size, group_size)
    amax = wg.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    if clip_grid:
        imp = torch.ones(in_f) if importance is None else importance.float().reshape(in_f)
        imp = imp.to(wg.device).reshape(1, in_f // group_size, group_size)
        best_err, best = None, scale
        for ratio in clip_grid:
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"int4 clip ratios must lie in (0, 1], got {ratio}")
            s = scale * ratio
            err = ((wg - (wg / s[..., None]).round().clamp(-8, 7) * s[..., None]).pow(2) * imp).sum(-1)
            if best_err is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        scale = best
    q = (wg / scale[..., None]).round().clamp(-8, 7).to(torch.int8).reshape(out_f, in_f)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``q: [rows, cols]`` (int8 in [-8, 7], cols % 8 == 0) into ``[rows, cols // 8]`` int32."""
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"int4 packing needs a column count divisible by 8, got {cols}")
    nib = (q.to(torch.int64) + 8).reshape(rows, cols // 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (nib << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[rows, cols // 8]`` int32 -> ``[rows, cols]`` int8 in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nib = (packed[..., None] >> shifts) & 0xF
    return (nib - 8).to(torch.int8).reshape(packed.shape[0], -1)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Float32 weight from per-channel (``scale: [out]``) or grouped (``scale: [out, in/g]``) quantized values."""
    if q.dtype == torch.int32:  # packed int4
        q = unpack_int4(q)
    qf = q.float()
    if group_size:
        out_f, in_f = qf.shape
        return (qf.reshape(out_f, in_f // group_size, group_size) * scale.float()[..., None]).reshape(out_f, in_f)
    return qf * scale.float()[:, None]


# ---------------------------------------------------------------------------------------------------------------
# The quantized linear layer


def quant_linear_reference(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_dtype: str = "int8",
    group_size: int = 0,
    hadamard_block: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = Q(rotate(x)) @ W^T + bias`` with dynamic per-token activation quantization; ``x: [..., in]``.

    ``weight_q``: int8 / fp8 ``[out, in]`` or packed int4 ``[out, in / 8]`` int32 (then ``group_size`` > 0).
    The product runs in float32 on the dequantized operands (exact for int8 x int8 sums below 2^24).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, s = quantize_activation_reference(x2, act_dtype, hadamard_block=hadamard_block)
    w = dequantize_weight(weight_q, weight_scale, group_size)
    y = (q.float() @ w.t()) * s[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*shape[:-1], w.shape[0])
