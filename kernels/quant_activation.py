"""Fused per-token activation quantization (Triton): optional RMSNorm, optional block Hadamard, int8 or fp8 out.

Spec: ``quant_reference.quantize_activation_reference``. One program quantizes ``BLOCK_M`` rows in three sweeps over
the row (sum of squares for the norm, absolute maximum, quantize and store), so any row length works in registers
of fixed size. The Hadamard block is a ``[B, B]`` fp32 product per chunk (B <= 128: a few % of the GEMM's work).
Triton is imported lazily; importing this module never initialises CUDA.
"""

from __future__ import annotations

import torch

from compressor.kernels.quant_reference import FP8_MAX, INT8_MAX, fp8_dtype, hadamard_matrix, quantize_activation_reference

MAX_HADAMARD_BLOCK = 128


def _kernels():
    from compressor.kernels import quant_triton  # triton is imported here, on first use

    return quant_triton.quantize_rows_kernel


def quantize_activation(
    x: torch.Tensor,
    dtype: str = "int8",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    hadamard_block: int = 0,
    block_m: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x: [tokens, features]`` with the Triton kernel -> ``(q, scale [tokens] fp32)``.

    Raises ValueError for inputs the kernel does not take (callers fall back to the reference).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, features], got shape {tuple(x.shape)}")
    if hadamard_block and (hadamard_block > MAX_HADAMARD_BLOCK or x.shape[1] % hadamard_block or hadamard_block < 16):
        raise ValueError(f"Hadamard block {hadamard_block} must be in 16..{MAX_HADAMARD_BLOCK} and divide {x.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    block_k = hadamard_block or 128
    q = torch.empty(m, k, dtype=torch.int8 if dtype == "int8" else fp8_dtype(), device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    h = hadamard_matrix(hadamard_block, x.device) if hadamard_block else scale  # unused pointer when no rotation
    w = norm_weight if norm_weight is not None else scale
    kernel = _kernels()
    grid = ((m + block_m - 1) // block_m,)
    kernel[grid](
        x, w, h, q, scale, m, k, x.stride(0), q.stride(0), eps,
        BLOCK_M=block_m, BLOCK_K=block_k, HAS_NORM=norm_weight is not None, HAS_HAD=bool(hadamard_block),
        IS_FP8=dtype == "fp8", QMAX=INT8_MAX if dtype == "int8" else FP8_MAX,
    )
    return q, scale


__all__ = ["quantize_activation", "quantize_activation_reference"]
