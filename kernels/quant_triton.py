"""Triton kernels of the quantized linear layer (imported lazily by ``quant_activation`` / ``quant_linear``).

Reads top-down: activation quantization, the block Hadamard rotation, the low-bit GEMM with its fused dequant
epilogue, then the tile configurations the GPU autotunes over. Spec: ``quant_reference``.

Numerics shared with the reference: per-token scale ``amax / qmax`` of the whole row (IEEE division, as torch),
int8 codes rounded half away from zero and clamped, fp8 codes by round-to-nearest-even with saturation; int8 x int8
products are summed in int32 (exact at any K; the reference's fp32 sum is exact only below 2^24) and converted to
fp32 once, in the epilogue; int4 groups are summed in int32 and scaled in fp32 per group.

Helpers keep one ``return`` at their end: Triton 3.6 type-checks the code after a ``constexpr`` early return and
rejects different return types (the int4 GEMM failed to compile on the GPU for that reason, not for its reshape).
"""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# Activation quantization


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr):
    """Per-row scale ``amax / qmax``; an all-zero row gets 1."""
    return tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 1.0)


@triton.jit
def _codes(x, scale, IS_FP8: tl.constexpr, QMAX: tl.constexpr):
    """fp32 ``x`` divided by its row scale (broadcast) -> int8 or fp8 e4m3 codes."""
    y = tl.math.div_rn(x, tl.broadcast_to(scale, x.shape))  # `/` would be div.full.f32, not torch's IEEE division
    if IS_FP8:
        q = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(tl.float8e4nv)
    else:
        r = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        q = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)
    return q


@triton.jit
def _normed_chunk(x_rows, w_ptr, rstd, row_ok, k0, offs, K, HAS_NORM: tl.constexpr):
    """Columns ``[k0, k0 + BLOCK_K)`` of the program's rows in float32, RMS-normalised when HAS_NORM; and their mask."""
    mask = row_ok[:, None] & (k0 + offs[None, :] < K)
    x = tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(w_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
    return x, mask


@triton.jit
def quantize_rows_kernel(
    x_ptr, w_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, HAS_NORM: tl.constexpr,
    IS_FP8: tl.constexpr, QMAX: tl.constexpr,
):
    """Per-token quantization of ``x: [M, K]`` (optionally RMSNorm first). With ONE_PASS (BLOCK_K >= K) a program
    holds its rows in registers and reads x once; otherwise it sweeps the row three times in BLOCK_K chunks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm
    if ONE_PASS:
        mask = row_ok[:, None] & (offs[None, :] < K)
        x = tl.load(x_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / K + eps)
            w = tl.load(w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            x = x * rstd[:, None] * w[None, :]
        scale = _row_scale(tl.max(tl.abs(x), axis=1), QMAX)
        tl.store(q_rows + offs[None, :], _codes(x, scale[:, None], IS_FP8, QMAX), mask=mask)
    else:
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_NORM:
            ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (k0 + offs[None, :] < K)
                x = tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0.0).to(tl.float32)
                ss += tl.sum(x * x, axis=1)
            rstd = 1.0 / tl.sqrt_rn(ss / K + eps)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, mask = _normed_chunk(x_rows, w_ptr, rstd, row_ok, k0, offs, K, HAS_NORM)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = _row_scale(amax, QMAX)
        for k0 in range(0, K, BLOCK_K):
            x, mask = _normed_chunk(x_rows, w_ptr, rstd, row_ok, k0, offs, K, HAS_NORM)
            tl.store(q_rows + k0 + offs[None, :], _codes(x, scale[:, None], IS_FP8, QMAX), mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Block Hadamard rotation


@triton.jit
def _sylvester(HB: tl.constexpr, DTYPE: tl.constexpr):
    """The unnormalised Sylvester Hadamard matrix ``[HB, HB]`` (HB <= 128): ``(-1) ** popcount(i & j)``, exact +-1."""
    i = tl.arange(0, HB)
    v = i[:, None] & i[None, :]
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return (1 - 2 * (v & 1)).to(DTYPE)


@triton.jit
def _dot_fp32_exact(x, h, DOT_BF16: tl.constexpr):
    """``x @ h`` for fp32 x and a +-1 matrix h (bf16 with DOT_BF16, else fp32), to fp32 accuracy: x is split into
    three bf16 parts whose sum is x exactly (8 + 8 + 8 mantissa bits), so every product is exact and the tensor cores
    only round the fp32 sums. Without DOT_BF16 (the CPU interpreter, whose bf16 dot is broken) the same parts are
    multiplied in fp32."""
    x1 = x.to(tl.bfloat16)
    r = x - x1.to(tl.float32)
    x2 = r.to(tl.bfloat16)
    x3 = (r - x2.to(tl.float32)).to(tl.bfloat16)
    if DOT_BF16:
        y = tl.dot(x3, h)
        y = tl.dot(x2, h, y)
        y = tl.dot(x1, h, y)
    else:
        y = tl.dot(x3.to(tl.float32), h, input_precision="ieee")
        y = tl.dot(x2.to(tl.float32), h, y, input_precision="ieee")
        y = tl.dot(x1.to(tl.float32), h, y, input_precision="ieee")
    return y


@triton.jit
def hadamard_rows_kernel(
    x_ptr, y_ptr, M, K, stride_xm, stride_ym, inv_sqrt_block,
    BLOCK_M: tl.constexpr, HB: tl.constexpr, CHUNKS: tl.constexpr, DOT_BF16: tl.constexpr,
):
    """``y = blockdiag(H_HB) x`` in fp32 for ``x: [M, K]``; a program rotates BLOCK_M rows x CHUNKS blocks of HB.
    The matrix is built in registers (no host matrix, no copy per call)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, HB)
    h = _sylvester(HB, tl.bfloat16 if DOT_BF16 else tl.float32)
    for c in tl.static_range(CHUNKS):
        k0 = (tl.program_id(1) * CHUNKS + c) * HB
        mask = (rows[:, None] < M) & (k0 + offs[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _dot_fp32_exact(x, h, DOT_BF16) * inv_sqrt_block
        tl.store(y_ptr + rows[:, None] * stride_ym + k0 + offs[None, :], y, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# The low-bit GEMM


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the N tiles together, so each B tile is read from L2 by all of them."""
    pid = tl.program_id(0)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here
    return pid_m, pid_n


@triton.jit
def _fused_row_scale(x_ptr, rows, K, stride_xm, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, QMAX: tl.constexpr):
    """Per-token scale of the whole row of x, computed by the GEMM program itself (x is small when M is)."""
    offs = tl.arange(0, CHUNK)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs[None, :], mask=k0 + offs[None, :] < K, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return _row_scale(amax, QMAX)


@triton.jit
def _a_tile(a_ptr, rows, offs, K, stride_am, a_scale, A_FUSED: tl.constexpr, MASK_K: tl.constexpr,
            IS_FP8: tl.constexpr, QMAX: tl.constexpr):
    """The activation codes ``[BLOCK_M, len(offs)]`` at the k offsets ``offs``: loaded, or (A_FUSED) quantized here
    from float x."""
    ptrs = a_ptr + rows[:, None] * stride_am + offs[None, :]
    if MASK_K:
        a = tl.load(ptrs, mask=offs[None, :] < K, other=0.0)
    else:
        a = tl.load(ptrs)
    if A_FUSED:
        a = _codes(a.to(tl.float32), a_scale[:, None], IS_FP8, QMAX)
    return a


@triton.jit
def _w8_tile(b_ptr, cols, k0, K, stride_bn, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` int8 / fp8 weight tile at k0 of ``B: [N, K]`` (K contiguous: K-major for the MMA)."""
    offs = k0 + tl.arange(0, BLOCK_K)
    ptrs = b_ptr + cols[None, :] * stride_bn + offs[:, None]
    if MASK_K:
        b = tl.load(ptrs, mask=offs[:, None] < K, other=0.0)
    else:
        b = tl.load(ptrs)
    return b


@triton.jit
def _nibbles(byte, ASM: tl.constexpr):
    """Packed int4 bytes ``[BLOCK_N, GROUP / 2]`` (byte i: k = 2i in the low nibble, 2i + 1 in the high one, each
    stored as value + 8) as two int8 tiles ``[GROUP / 2, BLOCK_N]``: 16 x the signed values of the even k and of the
    odd k. Flipping a nibble's top bit turns value + 8 into the value's 4-bit two's complement; placed in the high
    half of a byte it reads as 16 x the value, so no sign extension and no offset correction is needed (the MMA's
    sums are exact multiples of 16). Nothing is interleaved: the activations are split by parity instead. ASM (the
    GPU): a shift and two XOR-ANDs per 32-bit word unpack four bytes; the interpreter runs the same arithmetic per
    byte."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; shl.b32 a, $2, 4; xor.b32 b, $2, 0x80808080; xor.b32 a, a, 0x80808080; "
            "and.b32 $0, a, 0xF0F0F0F0; and.b32 $1, b, 0xF0F0F0F0; }",
            "=r,=r,r", [byte], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        lo = (((byte << 4) ^ 0x80) & 0xF0).to(tl.int8, bitcast=True)
        hi = ((byte ^ 0x80) & 0xF0).to(tl.int8, bitcast=True)
    return tl.trans(lo), tl.trans(hi)


@triton.jit
def quant_gemm_kernel(
    a_ptr, as_ptr, b_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_wsn, stride_cm, M_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_FUSED: tl.constexpr, AMAX_CHUNK: tl.constexpr, W_INT4: tl.constexpr, IS_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, QMAX: tl.constexpr, ASM: tl.constexpr,
):
    """``C = (A @ B^T) * a_scale[m] * w_scale[n] + bias`` for int8 / fp8 ``A: [M, K]`` (or, with A_FUSED, float x
    quantized per token inside the kernel: one launch for decode) and ``B: [N, K]`` int8 / fp8, or packed int4 with
    group scales ``[N, K / BLOCK_K]`` (BLOCK_K = group size). ``M_KEY`` only keys the autotuner (M's bucket)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped indices keep every load in bounds: no M / N masks in the K loop
    cols = offs_n % N
    if A_FUSED:
        a_scale = _fused_row_scale(a_ptr, rows, K, stride_am, BLOCK_M, AMAX_CHUNK, QMAX)
    else:
        a_scale = tl.load(as_ptr + rows)
    if W_INT4:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_groups = K // BLOCK_K
        # the group scales are not an MMA operand, so Triton's pipeliner leaves them alone: fetch one step ahead
        gs_next = tl.load(ws_ptr + cols * stride_wsn)
        for g in range(n_groups):
            gs = gs_next
            gs_next = tl.load(ws_ptr + cols * stride_wsn + tl.minimum(g + 1, n_groups - 1))
            a = _a_tile(a_ptr, rows, g * BLOCK_K + tl.arange(0, BLOCK_K), K, stride_am, a_scale, A_FUSED, False, False,
                        QMAX)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # k pairs sit in one thread: free
            offs = g * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            lo, hi = _nibbles(tl.load(b_ptr + cols[:, None] * stride_bn + offs[None, :]), ASM)
            s = tl.dot(a_even, lo, out_dtype=tl.int32)
            s = tl.dot(a_odd, hi, s, out_dtype=tl.int32)
            acc += s.to(tl.float32) * (gs * 0.0625)[None, :]  # the MMAs summed 16 x the values (_nibbles)
    else:
        if IS_FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = _a_tile(a_ptr, rows, k0 + tl.arange(0, BLOCK_K), K, stride_am, a_scale, A_FUSED, not EVEN_K, IS_FP8,
                        QMAX)
            b = _w8_tile(b_ptr, cols, k0, K, stride_bn, BLOCK_K, not EVEN_K)
            if IS_FP8:
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        acc = acc.to(tl.float32) * tl.load(ws_ptr + cols)[None, :]
    acc = acc * a_scale[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Tile configurations (GPU). Shared memory per stage = (BLOCK_M + BLOCK_N) * BLOCK_K bytes for 8-bit operands; the
# largest, 128x256x128 in 4 stages, takes 192 KiB of the 227 KiB an H100/H200 block may use.


def _cfg(warps: int, stages: int, **tiles: int) -> triton.Config:
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


LARGE_W8 = [  # M > 16, int8 / fp8 weights: Hopper wgmma tiles, 8 warps = two warpgroups
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 5, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
]
LARGE_W4 = [  # M > 16, packed int4 weights; BLOCK_K is the group size, set by the caller. Two accumulators (the
    # group's int32 and the fp32 sum), the unpacked nibbles and the activations split by parity live in registers:
    # 128x128 and 256x64 on 8 warps spill (sm_90, offline compile), these do not. The small tiles give a few hundred
    # programs at a few hundred tokens
    _cfg(8, 4, BLOCK_M=64, BLOCK_N=256, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=128, GROUP_M=8),
]
SMALL_W8 = [  # M <= 16 (BLOCK_M set by the caller): narrow N tiles so that N / BLOCK_N programs fill the GPU
    _cfg(4, 4, BLOCK_N=16, BLOCK_K=512, GROUP_M=1),
    _cfg(4, 6, BLOCK_N=16, BLOCK_K=256, GROUP_M=1),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=256, GROUP_M=1),
    _cfg(4, 3, BLOCK_N=32, BLOCK_K=512, GROUP_M=1),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, GROUP_M=1),
    _cfg(4, 6, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
]
SMALL_W4 = [  # a group of 128 is only BLOCK_N x 64 bytes per K step: deep pipelines keep enough of it in flight
    _cfg(4, 8, BLOCK_N=16, GROUP_M=1),
    _cfg(4, 12, BLOCK_N=16, GROUP_M=1),
    _cfg(4, 6, BLOCK_N=32, GROUP_M=1),
    _cfg(4, 10, BLOCK_N=32, GROUP_M=1),
    _cfg(4, 6, BLOCK_N=64, GROUP_M=1),
    _cfg(8, 8, BLOCK_N=64, GROUP_M=1),
]


def _quick_bench(fn, quantiles):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _tuned(configs: list):
    return triton.autotune(configs, key=["M_KEY", "N", "K"], do_bench=_quick_bench)(quant_gemm_kernel)


# The GPU launchers use these; under the interpreter (and in tests) the launchers pass one explicit config instead.
GEMM_TUNED = {
    ("large", "w8"): _tuned(LARGE_W8),
    ("large", "w4"): _tuned(LARGE_W4),
    ("small", "w8"): _tuned(SMALL_W8),
    ("small", "w4"): _tuned(SMALL_W4),
}
