"""Quantized linear layer on the GPU: fused activation quantization, then a low-bit GEMM with a fused epilogue.

Spec: ``quant_reference.quant_linear_reference``. Paths:
- W8A8 int8: Triton GEMM with int32 accumulation and the dequant epilogue fused (per-token x per-channel scales,
  bias, out dtype), or ``torch._int_mm`` + a separate epilogue (``backend="torch"``);
- W8A8 fp8: ``torch._scaled_mm`` with row-wise scales (the Triton GEMM with ``backend="triton"``);
- W4A8: Triton GEMM unpacking int4 in its K loop, one weight-scale group per K step.
For M <= 16 (decode) the Triton GEMM splits K over programs (fp32 atomics) so the weight read fills the GPU.
Inputs the kernels do not take run the reference, with a one-time warning naming the reason.
"""

from __future__ import annotations

import warnings

import torch

from compressor.kernels.triton_support import triton_available

from compressor.kernels.quant_activation import MAX_HADAMARD_BLOCK, quantize_activation
from compressor.kernels.quant_reference import quant_linear_reference

SMALL_M = 16
_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:  # once per reason: the per-process record of what was said
        _warned.add(reason)
        warnings.warn(f"quantized linear: {reason}; running the PyTorch reference instead", stacklevel=3)


def unsupported_reason(x: torch.Tensor, weight_q: torch.Tensor, act_dtype: str, group_size: int, hadamard_block: int) -> str | None:
    """Why the fast path cannot take these inputs, or None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if not triton_available():
        return "triton is not installed"
    if act_dtype == "fp8" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return f"fp8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability(x.device)}"
    if hadamard_block and (hadamard_block > MAX_HADAMARD_BLOCK or hadamard_block < 16):
        return f"online Hadamard block {hadamard_block} is outside 16..{MAX_HADAMARD_BLOCK}"
    if group_size and (group_size % 16 or x.shape[-1] % group_size):
        return f"int4 group size {group_size} must be a multiple of 16 dividing in_features {x.shape[-1]}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype} is not fp16, bf16 or fp32"
    return None


def triton_gemm(
    a_q: torch.Tensor, a_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = 0, split_k: int | None = None,
    block_m: int | None = None, block_n: int = 128, block_k: int | None = None, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """``(a_q @ W^T) * a_scale[:, None] * w_scale + bias`` with the Triton GEMM; ``a_q: [M, K]`` int8 / fp8."""
    from compressor.kernels import quant_triton

    m, k = a_q.shape
    n = weight_q.shape[0]
    int4 = weight_q.dtype == torch.int32
    if split_k is None:
        split_k = max(1, min(16, k // 512)) if m <= SMALL_M else 1
    block_m = block_m or (16 if m <= SMALL_M else 128)
    block_k = group_size if int4 else (block_k or (128 if a_q.dtype == torch.int8 else 64))
    if split_k > 1:
        c = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    else:
        c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    ws = weight_scale.float().contiguous()
    grid = ((m + block_m - 1) // block_m, (n + block_n - 1) // block_n, split_k)
    quant_triton.quant_gemm_kernel[grid](
        a_q, weight_q, a_scale, ws, bias if bias is not None else ws, c, m, n, k,
        a_q.stride(0), weight_q.stride(0), ws.stride(0), c.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, W_INT4=int4, IS_INT=a_q.dtype == torch.int8,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        c = c * a_scale[:, None]
        if bias is not None:
            c = c + bias.float()
        c = c.to(out_dtype)
    return c


def torch_gemm(
    a_q: torch.Tensor, a_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The library baseline: ``torch._int_mm`` + epilogue (int8) or row-wise ``torch._scaled_mm`` (fp8)."""
    m = a_q.shape[0]
    pad = (-m) % 16 if m <= SMALL_M else (-m) % 8
    if pad:  # cuBLAS int8 wants M > 16; both want aligned shapes
        a_q = torch.cat([a_q, a_q.new_zeros(pad + (SMALL_M + 1 - m - pad if a_q.dtype == torch.int8 and m + pad <= SMALL_M else 0), a_q.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(a_q.shape[0] - m)])
    if a_q.dtype == torch.int8:
        y = torch._int_mm(a_q, weight_q.t()).float() * a_scale[:, None] * weight_scale.float()[None, :]
        if bias is not None:
            y = y + bias.float()
        return y[:m].to(out_dtype)
    y = torch._scaled_mm(a_q, weight_q.t(), scale_a=a_scale[:, None].float(), scale_b=weight_scale.float()[None, :],
                         bias=bias.to(out_dtype) if bias is not None else None, out_dtype=out_dtype)
    return y[:m]


def quant_linear(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    act_dtype: str = "int8", group_size: int = 0, hadamard_block: int = 0, out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = Q(rotate(x)) @ W^T + bias`` for ``x: [M, K]``; fast kernels on CUDA, the reference elsewhere.

    ``backend``: ``auto`` (the faster measured path per case), ``triton`` or ``torch`` (cuBLAS, 8-bit only).
    """
    out_dtype = out_dtype or x.dtype
    reason = unsupported_reason(x, weight_q, act_dtype, group_size, hadamard_block)
    if reason is not None:
        if x.is_cuda:
            _fallback(reason)
        return quant_linear_reference(x, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype)
    a_q, a_s = quantize_activation(x, act_dtype, hadamard_block=hadamard_block)
    int4 = weight_q.dtype == torch.int32
    use_torch = not int4 and (backend == "torch" or (backend == "auto" and (act_dtype == "fp8" or x.shape[0] > SMALL_M)))
    if use_torch:
        return torch_gemm(a_q, a_s, weight_q, weight_scale, bias, out_dtype)
    try:
        return triton_gemm(a_q, a_s, weight_q, weight_scale, bias, out_dtype, group_size)
    except Exception as err:  # a Triton build that rejects the kernel (seen: int4 unpack on Triton 3.6 GPUs)
        _fallback(f"the Triton GEMM failed to compile or run ({type(err).__name__})")
        return quant_linear_reference(x, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype)
