"""Per-token activation quantization (Triton): optional RMSNorm, optional block Hadamard, int8 or fp8 codes.

Spec: ``quant_reference.quantize_activation_reference``. A program holds whole rows in registers when they fit
(K <= 16384) and reads x once; longer rows are swept three times. The online Hadamard is a kernel of its own,
:func:`hadamard_rotate`: fp32 rows rotated block by block on the tensor cores (an exact three-way bf16 split of x, the
+-1 matrix built in registers), spread over rows x blocks so that even one token keeps K / block programs busy.
Triton is imported lazily; importing this module never initialises CUDA.
"""

from __future__ import annotations

import math

import torch

from compressor.kernels.quant_reference import (
    FP8_MAX, INT8_MAX, fp8_dtype, quantize_activation_reference, rms_norm_reference,
)
from compressor.kernels.triton_support import interpreting, next_pow2

MAX_HADAMARD_BLOCK = 128
ONE_PASS_MAX_K = 16384  # longest row a program keeps in registers (16 warps x 32 fp32 each)


def _triton_kernels():
    from compressor.kernels import quant_triton  # triton is imported here, on first use

    return quant_triton


def check_hadamard_block(block: int, features: int) -> None:
    """Raise ValueError unless ``block`` is a power of two in 16..128 dividing ``features``."""
    if block < 16 or block > MAX_HADAMARD_BLOCK or block & (block - 1) or features % block:
        raise ValueError(f"Hadamard block {block} must be a power of two in 16..{MAX_HADAMARD_BLOCK} dividing "
                         f"{features} features; use quant_reference.hadamard_block_for({features})")


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal Hadamard rotation of ``x: [tokens, features]`` -> float32, as ``hadamard_reference``."""
    check_hadamard_block(block, x.shape[1])
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, k, dtype=torch.float32, device=x.device)
    # decode: one block per program, so one token still spreads over k / block programs; prefill: 64 rows x 4 blocks
    block_m, chunks = (16, 1) if m <= 16 else (64, 4)
    grid = ((m + block_m - 1) // block_m, (k // block + chunks - 1) // chunks)
    _triton_kernels().hadamard_rows_kernel[grid](
        x, y, m, k, x.stride(0), y.stride(0), 1.0 / math.sqrt(block),
        BLOCK_M=block_m, HB=block, CHUNKS=chunks, DOT_BF16=not interpreting(),
        num_warps=8 if block_m * block >= 8192 else 4,
    )
    return y


def quantize_activation(
    x: torch.Tensor,
    dtype: str = "int8",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    hadamard_block: int = 0,
    block_m: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x: [tokens, features]`` with the Triton kernels -> ``(q, scale [tokens] fp32)``.

    ``block_m`` rows per program and ``block_k`` (a chunk length: forces the three-sweep path) override the tiling.
    Raises ValueError for inputs the kernels do not take (callers fall back to the reference).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, features], got shape {tuple(x.shape)}")
    if dtype not in ("int8", "fp8"):
        raise ValueError(f"activation dtype must be 'int8' or 'fp8', got {dtype!r}")
    if hadamard_block:
        if norm_weight is not None:  # the norm needs the whole row before the rotation: it runs in PyTorch here
            x, norm_weight = rms_norm_reference(x, norm_weight, eps), None
        x = hadamard_rotate(x, hadamard_block)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    one_pass = block_k is None and next_pow2(k) <= ONE_PASS_MAX_K
    block_k = next_pow2(k) if one_pass else (block_k or 2048)
    if block_m is None:  # decode: a row per program; prefill: about 8K elements per program
        block_m = 1 if m <= 64 else max(1, min(16, 8192 // block_k))
    q = torch.empty(m, k, dtype=torch.int8 if dtype == "int8" else fp8_dtype(), device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    w = norm_weight if norm_weight is not None else scale  # unused pointer without a norm
    grid = ((m + block_m - 1) // block_m,)
    _triton_kernels().quantize_rows_kernel[grid](
        x, w, q, scale, m, k, x.stride(0), q.stride(0), eps,
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass, HAS_NORM=norm_weight is not None,
        IS_FP8=dtype == "fp8", QMAX=INT8_MAX if dtype == "int8" else FP8_MAX,
        num_warps=min(16, max(4, block_m * block_k // 1024)),
    )
    return q, scale


__all__ = ["hadamard_rotate", "quantize_activation", "quantize_activation_reference"]
