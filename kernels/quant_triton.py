"""Triton kernels of the quantized linear layer (imported lazily by ``quant_activation`` / ``quant_linear``).

Kernels read top-down: activation quantization, then the low-bit GEMM with its K-step helper.
"""

import triton
import triton.language as tl

@triton.jit
def _transform(x, w_ptr, rstd, h, k0, offs_k, HAS_NORM: tl.constexpr, HAS_HAD: tl.constexpr):
    if HAS_NORM:
        w = tl.load(w_ptr + k0 + offs_k).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
    if HAS_HAD:
        x = tl.dot(x, h, input_precision="ieee")
    return x

@triton.jit
def quantize_rows_kernel(
    x_ptr, w_ptr, h_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_HAD: tl.constexpr,
    IS_FP8: tl.constexpr, QMAX: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    h = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    if HAS_HAD:
        h = tl.load(h_ptr + offs_k[:, None] * BLOCK_K + offs_k[None, :])
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_NORM:
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + offs_k[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + offs_k[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _transform(x, w_ptr, rstd, h, k0, offs_k, HAS_NORM, HAS_HAD)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.where(amax > 0, amax / QMAX, 1.0)
    tl.store(s_ptr + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + offs_k[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _transform(x, w_ptr, rstd, h, k0, offs_k, HAS_NORM, HAS_HAD)
        y = x / scale[:, None]
        if IS_FP8:
            q = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(q_ptr.dtype.element_ty)
        else:
            q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
            q = tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * stride_qm + k0 + offs_k[None, :], q, mask=mask)


@triton.jit
def _weight_tile(b_ptr, offs_n, k0, offs_k, N, K, stride_bn, W_INT4: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` weight tile at ``k0`` (int4 unpacked to int8 here, inside the K loop)."""
    if W_INT4:
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mask = (offs_w[:, None] < K // 8) & (offs_n[None, :] < N)
        packed = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_w[:, None], mask=mask, other=0)
        shifts = tl.arange(0, 8) * 4
        nib = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        return (tl.reshape(nib, (BLOCK_K, BLOCK_N)) - 8).to(tl.int8)
    mask = (k0 + offs_k[:, None] < K) & (offs_n[None, :] < N)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k0 + offs_k[:, None], mask=mask)
    return tl.where(mask, b, tl.zeros_like(b))


@triton.jit
def quant_gemm_kernel(
    a_ptr, b_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_wsn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_INT4: tl.constexpr, IS_INT: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``C = (A @ B^T) * a_scale[m] * w_scale[n] + bias``; A int8/fp8 ``[M, K]``, B ``[N, K]`` (or packed int4 with
    group scales, one group per K step). SPLIT_K > 1 adds fp32 partial sums atomically and leaves the epilogue's
    per-token scale and bias to the caller."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    for step in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_steps)):
        k0 = step * BLOCK_K
        a_mask = (offs_m[:, None] < M) & (k0 + offs_k[None, :] < K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k0 + offs_k[None, :], mask=a_mask)
        a = tl.where(a_mask, a, tl.zeros_like(a))  # masked lanes are undefined: zero them in the operand's dtype
        b = _weight_tile(b_ptr, offs_n, k0, offs_k, N, K, stride_bn, W_INT4, BLOCK_K, BLOCK_N)
        if W_INT4:
            part = tl.dot(a, b, out_dtype=tl.int32)
            gs = tl.load(ws_ptr + offs_n * stride_wsn + step, mask=offs_n < N, other=0.0)
            acc += part.to(tl.float32) * gs[None, :]
        elif IS_INT:
            acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
    if not W_INT4:
        if IS_INT:
            acc = acc_i.to(tl.float32)
        ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * ws[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = acc * a_s[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
