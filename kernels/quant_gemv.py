"""Decode-sized (M <= 16 tokens) quantized linear layer: one bandwidth-shaped GEMV launch (Triton).

Spec: ``quant_reference.quant_linear_reference`` (same codes, same int32 / fp32 sums as ``quant_triton``). At M <= 16
the layer is a weight stream: 4096 x 4096 int8 is 16 MiB, ~4.5 µs at the H200's bandwidth, while a kernel launch in
a CUDA graph costs 1-3 µs. So the kernel is shaped to keep bytes in flight and launches once:
- programs = N tiles x K splits, sized to a few per SM; each streams a ``[BLOCK_N, K / SPLIT_K]`` slab of ``W: [N, K]``
  in wide contiguous K steps (16-byte loads, Triton's pipeliner keeps ``num_stages`` of them in flight);
- the step-0 weight tile is loaded before anything that depends on the previous kernel (the grid-dependency wait,
  with programmatic dependent launch on sm_90), so the stream starts while the previous kernel drains;
- the per-token scale is computed by every program from float x (``A_FLOAT``: a few KiB per token, read from L2),
  so no separate activation launch; or x arrives as codes + scales from ``quantize_activation`` (M > ~4, where
  re-reading x in every program costs more than a launch);
- split-K partials (int32 for int8, exact; fp32 otherwise) of the M real rows go to a workspace; the last program of
  an N tile to arrive (an atomic counter) sums them in split order, runs the epilogue and resets the counter, so the
  counters are allocated once (per layer) and no fill launch runs per call: deterministic, one launch in all;
- int4 (packed 8 per int32, group scales): one group per K step. The packed bytes are never interleaved into k
  order: the low nibbles (even k) and high nibbles (odd k) are two int8 operands (``quant_triton._nibbles``: 16 x
  the signed values, a shift and two XOR-ANDs per 32-bit word), multiplied with the activations of even and of odd k
  (two MMAs). The group's exact int32 sum / 16 is scaled once in fp32. Against the interleaving version this is 239
  instead of 801 SASS instructions per group step (sm_90, 128 x 64 bytes, 4 stages), and the weight bytes reach the
  MMAs through Triton's pipeliner (16-byte asynchronous copies).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from compressor.kernels.quant_reference import FP8_MAX, INT8_MAX
from compressor.kernels.quant_triton import _a_tile, _codes, _fused_row_scale, _nibbles, _row_scale, _w8_tile
from compressor.kernels.triton_support import interpreting, next_pow2, pdl_available

BLOCK_M = 16  # the MMA's rows: tokens beyond M wrap onto real rows (their results are never stored)


@triton.jit
def _token_scales(x_ptr, rows, K, stride_xm, BLOCK_M: tl.constexpr, ONE_ROW: tl.constexpr, CHUNK: tl.constexpr,
                  QMAX: tl.constexpr):
    """Per-token scale ``amax / qmax`` of whole rows of float x ``[BLOCK_M]``; ONE_ROW (M = 1) reads the row once."""
    offs = tl.arange(0, CHUNK)
    if ONE_ROW:
        amax1 = tl.zeros((CHUNK,), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            x = tl.load(x_ptr + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax1 = tl.maximum(amax1, tl.abs(x.to(tl.float32)))
        scale = _row_scale(tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.max(amax1, axis=0), QMAX)
    else:
        scale = _fused_row_scale(x_ptr, rows, K, stride_xm, BLOCK_M, CHUNK, QMAX)
    return scale  # one return: Triton 3.6 refuses a helper with several


@triton.jit
def _wait_then_token_scales(x_ptr, xs_ptr, rows, K, stride_xm, BLOCK_M: tl.constexpr, A_FLOAT: tl.constexpr,
                            ONE_ROW: tl.constexpr, CHUNK: tl.constexpr, QMAX: tl.constexpr, GDC: tl.constexpr):
    """After the grid-dependency wait (GDC: x comes from the previous kernel), the per-token scales: computed from
    float x (A_FLOAT) or loaded beside the codes."""
    if GDC:
        tl.extra.cuda.gdc_wait()
    if A_FLOAT:
        scale = _token_scales(x_ptr, rows, K, stride_xm, BLOCK_M, ONE_ROW, CHUNK, QMAX)
    else:
        scale = tl.load(xs_ptr + rows)
    return scale


@triton.jit
def _act_codes(x_ptr, rows, offs, K, stride_xm, a_scale, BLOCK_M: tl.constexpr, MASK_K: tl.constexpr,
               A_FLOAT: tl.constexpr, ONE_ROW: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr):
    """Activation codes ``[BLOCK_M, len(offs)]`` at the k offsets ``offs``: loaded, or (A_FLOAT) quantized here from
    float x; with ONE_ROW the single token is quantized once and broadcast to the MMA's rows."""
    if ONE_ROW:
        if MASK_K:
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptr + offs).to(tl.float32)
        q = _codes(x, tl.max(a_scale, axis=0), IS_FP8, QMAX)  # every row holds the same scale
        a = tl.broadcast_to(q[None, :], (BLOCK_M, offs.shape[0]))
    else:
        a = _a_tile(x_ptr, rows, offs, K, stride_xm, a_scale, A_FLOAT, MASK_K, IS_FP8, QMAX)
    return a


@triton.jit
def _packed_group(w_ptr, cols, g, stride_wn, GROUP: tl.constexpr):
    """Group g of the packed int4 weight (bytes ``[N, K / 2]``): ``[BLOCK_N, GROUP / 2]`` bytes, contiguous along k."""
    offs = g * (GROUP // 2) + tl.arange(0, GROUP // 2)
    return tl.load(w_ptr + cols[:, None] * stride_wn + offs[None, :])


@triton.jit
def _act_by_parity(x_ptr, rows, k0, stride_xm, a_scale, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                   A_FLOAT: tl.constexpr, ONE_ROW: tl.constexpr, QMAX: tl.constexpr):
    """The int8 activation codes of the group at k0, read contiguously and split into the even and the odd k
    (``[BLOCK_M, GROUP / 2]`` each); ONE_ROW: one token, quantized once and broadcast to the MMA's rows."""
    offs = k0 + tl.arange(0, GROUP)
    if ONE_ROW:
        q = _codes(tl.load(x_ptr + offs).to(tl.float32), tl.max(a_scale, axis=0), False, QMAX)
        q_even, q_odd = tl.split(tl.reshape(q, (GROUP // 2, 2)))
        a_even = tl.broadcast_to(q_even[None, :], (BLOCK_M, GROUP // 2))
        a_odd = tl.broadcast_to(q_odd[None, :], (BLOCK_M, GROUP // 2))
    else:
        a = _a_tile(x_ptr, rows, offs, 0, stride_xm, a_scale, A_FLOAT, False, False, QMAX)
        a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, GROUP // 2, 2)))
    return a_even, a_odd


@triton.jit
def _int4_step(acc, byte, gs, x_ptr, rows, k0, stride_xm, a_scale, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
               A_FLOAT: tl.constexpr, ONE_ROW: tl.constexpr, QMAX: tl.constexpr, ASM: tl.constexpr):
    """acc += one int4 group (its bytes and fp32 scales ``gs`` loaded by the caller) times the activations at k0:
    the group's exact int32 sum (the MMAs' sum / 16) times ``gs``. W4A8 pairs int4 weights with int8 codes."""
    lo, hi = _nibbles(byte, ASM)
    a_even, a_odd = _act_by_parity(x_ptr, rows, k0, stride_xm, a_scale, BLOCK_M, GROUP, A_FLOAT, ONE_ROW, QMAX)
    s = tl.dot(a_even, lo, out_dtype=tl.int32)
    s = tl.dot(a_odd, hi, s, out_dtype=tl.int32)
    return acc + s.to(tl.float32) * (gs * 0.0625)[None, :]  # = (s / 16) * gs exactly: 1/16 is a power of two


@triton.jit
def _w8_mac(acc, a, w, IS_FP8: tl.constexpr):
    """acc += a @ w: int32 for int8 (exact), fp32 for fp8."""
    if IS_FP8:
        acc = tl.dot(a, w, acc)
    else:
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _epilogue(acc, a_scale, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om,
              W_INT4: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out = acc * a_scale[m] (* w_scale[n]) + bias``, rows < M and columns < N only."""
    y = acc.to(tl.float32)
    if not W_INT4:
        y = y * tl.load(ws_ptr + cols)[None, :]
    y = y * a_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["steps_per_split", "n_splits"])  # a value of 1 or 16 would otherwise recompile
def quant_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_wsn, stride_om, steps_per_split, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    A_FLOAT: tl.constexpr, ONE_ROW: tl.constexpr, AMAX_CHUNK: tl.constexpr, W_INT4: tl.constexpr,
    IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, QMAX: tl.constexpr, GDC: tl.constexpr,
    ASM: tl.constexpr,
):
    """``out = Q(x) @ W^T * scales + bias`` for ``x: [M <= 16, K]`` (float with A_FLOAT, else codes with scales
    ``xs: [M]``) and ``W: [N, K]`` int8 / fp8, or packed int4 bytes ``[N, K / 2]`` with group scales
    ``[N, K / BLOCK_K]``. Program (n tile, split) covers K steps ``[split, split + 1) * steps_per_split``; the split
    count is a runtime value (one compile serves every split), SPLIT only says whether there is more than one.
    ``count_ptr``: one zeroed int32 per N tile, left zeroed (the tile's last split resets it)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped: every load stays in bounds without an M mask
    cols = offs_n % N
    n_steps = tl.minimum(steps_per_split, tl.cdiv(K, BLOCK_K) - split * steps_per_split)
    k_first = split * steps_per_split * BLOCK_K
    if W_INT4:
        # int4: one group per step; even and odd k are two MMAs, so the nibbles need no interleave (the packed bytes
        # go through Triton's pipeliner as 16-byte asynchronous copies, then a shift and XOR-ANDs per 32-bit word)
        g_first = split * steps_per_split
        last = n_steps - 1
        # The weights do not depend on the previous kernel: start streaming them before waiting for it. The group
        # scales are not an MMA operand, so Triton's pipeliner leaves their load in place: fetch them a step ahead
        # (two steps ahead, measured offline on sm_90, stops the pipeliner from taking the weight loads).
        byte = _packed_group(w_ptr, cols, g_first, stride_wn, BLOCK_K)
        gs = tl.load(ws_ptr + cols * stride_wsn + g_first)
        gs_1 = tl.load(ws_ptr + cols * stride_wsn + g_first + tl.minimum(1, last))
        a_scale = _wait_then_token_scales(x_ptr, xs_ptr, rows, K, stride_xm, BLOCK_M, A_FLOAT, ONE_ROW, AMAX_CHUNK, QMAX,
                                          GDC)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _int4_step(acc, byte, gs, x_ptr, rows, g_first * BLOCK_K, stride_xm, a_scale, BLOCK_M, BLOCK_K, A_FLOAT,
                         ONE_ROW, QMAX, ASM)
        for i in range(1, n_steps):
            byte = _packed_group(w_ptr, cols, g_first + i, stride_wn, BLOCK_K)
            gs_2 = tl.load(ws_ptr + cols * stride_wsn + g_first + tl.minimum(i + 1, last))
            acc = _int4_step(acc, byte, gs_1, x_ptr, rows, (g_first + i) * BLOCK_K, stride_xm, a_scale, BLOCK_M,
                             BLOCK_K, A_FLOAT, ONE_ROW, QMAX, ASM)
            gs_1 = gs_2
    else:
        offs_k = tl.arange(0, BLOCK_K)
        w = _w8_tile(w_ptr, cols, k_first, K, stride_wn, BLOCK_K, not EVEN_K)
        a_scale = _wait_then_token_scales(x_ptr, xs_ptr, rows, K, stride_xm, BLOCK_M, A_FLOAT, ONE_ROW, AMAX_CHUNK, QMAX,
                                          GDC)
        if IS_FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        a = _act_codes(x_ptr, rows, k_first + offs_k, K, stride_xm, a_scale, BLOCK_M, not EVEN_K, A_FLOAT, ONE_ROW,
                       IS_FP8, QMAX)
        acc = _w8_mac(acc, a, w, IS_FP8)
        for i in range(1, n_steps):
            k0 = k_first + i * BLOCK_K
            w = _w8_tile(w_ptr, cols, k0, K, stride_wn, BLOCK_K, not EVEN_K)
            a = _act_codes(x_ptr, rows, k0 + offs_k, K, stride_xm, a_scale, BLOCK_M, not EVEN_K, A_FLOAT, ONE_ROW,
                           IS_FP8, QMAX)
            acc = _w8_mac(acc, a, w, IS_FP8)
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()  # the next layer may start streaming its weights
    if not SPLIT:
        _epilogue(acc, a_scale, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, W_INT4, HAS_BIAS)
    else:
        # partials of the real rows only (M = 1 writes one row, not the MMA's 16)
        tile = BLOCK_M * BLOCK_N
        here = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        real = (offs_m < M)[:, None]
        n_tiles = tl.num_programs(0)
        tl.store(part_ptr + (split * n_tiles + pid_n) * tile + here, acc, mask=real)
        tl.debug_barrier()  # every thread's partial is written before the counter says so (release below)
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:  # the last split of this tile: sum all partials in split order
            tl.debug_barrier()
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
            for s in range(n_splits):
                total += tl.load(part_ptr + (s * n_tiles + pid_n) * tile + here, mask=real, other=0,
                                 cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)  # left zeroed for the next call: no fill launch per call
            _epilogue(total, a_scale, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, W_INT4,
                      HAS_BIAS)


# ---------------------------------------------------------------------------------------------------------------
# Launcher

MAX_SPLIT_K = 8
MIN_BLOCK_N = 16
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(m: int, n: int, k: int, group_size: int, sms: int = 132) -> dict:
    """Tiles for the decode GEMV where no route was measured. int8 / fp8: BLOCK_N narrow for one to four tokens (many
    programs), wider above, where every N tile re-reads the activation; K split until ~1.5 programs per SM. int4: wide
    N tiles (each step's activation work spread over more weight) and K split until ~3 programs per SM, up to 16
    (the H200 sweep's best W4A8 tiles: 2-4 programs per SM)."""
    if group_size:
        block_n, block_k, stages, per_sm, max_split = (128 if m <= 4 else 64), group_size, 4, 3.0, 16
    else:
        block_n, block_k, stages, per_sm, max_split = (16 if m <= 4 else 64), 256, 4, 1.5, MAX_SPLIT_K
    tiles, steps = -(-n // block_n), -(-k // block_k)
    split = 1
    while tiles * split < per_sm * sms and split * 2 <= min(max_split, steps):
        split *= 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=stages)


def quant_gemv(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, act_dtype: str,
    group_size: int, out_dtype: torch.dtype, x_scale: torch.Tensor | None = None, config: dict | None = None,
    pdl: bool | None = None, counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode GEMV ``[M <= 16, K] -> [M, N]``: ``x`` float (quantized per token inside, one launch) or, with
    ``x_scale: [M]``, int8 / fp8 codes from ``quantize_activation``. ``config``: explicit ``BLOCK_N``, ``BLOCK_K``
    (int4: the group size), ``SPLIT_K``, ``num_warps``, ``num_stages``; ``pdl``: programmatic dependent launch (None:
    on sm_90+ outside the interpreter).

    ``counters``: split-K's arrival counters, a zeroed int32 tensor of at least ``gemv_counters_needed(N)`` elements on
    x's device that every call leaves zeroed again (the last split of each N tile resets its counter). A layer passes
    its own, so a decode step launches nothing but the GEMV (a fresh zeroed tensor per call is one more launch, and
    in a CUDA graph it also stops programmatic dependent launch from overlapping the kernels). Two calls may share
    one only if they never run concurrently (the same stream does that)."""
    m, k = x.shape
    if m > BLOCK_M or m < 1:
        raise ValueError(f"the decode GEMV takes 1..{BLOCK_M} tokens, got {m}: use quant_linear.triton_gemm")
    n = weight_q.shape[0]
    int4 = weight_q.dtype == torch.int32
    x = x if x.stride(1) == 1 else x.contiguous()
    w = weight_q if weight_q.stride(-1) == 1 else weight_q.contiguous()
    w = w.view(torch.uint8) if int4 else w  # packed int4 as bytes [N, K / 2]
    ws = weight_scale.float().contiguous()
    a_float = x_scale is None
    if config is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 132
        config = INTERPRETER_CONFIG if interpreting() else gemv_config(m, n, k, group_size, sms)
    tiles = dict(config)
    launch = dict(num_warps=tiles.pop("num_warps", 4), num_stages=tiles.pop("num_stages", 3))
    block_n, block_k = tiles["BLOCK_N"], group_size if int4 else tiles["BLOCK_K"]
    if block_n < MIN_BLOCK_N:
        raise ValueError(f"BLOCK_N must be at least {MIN_BLOCK_N}, got {block_n}")
    steps = -(-k // block_k)
    per_split = -(-steps // max(1, min(tiles.get("SPLIT_K", 1), steps)))
    split = -(-steps // per_split)  # no empty split
    n_tiles = -(-n // block_n)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if split > 1:
        acc_dtype = torch.float32 if int4 or act_dtype == "fp8" else torch.int32
        part = torch.empty(split * n_tiles * BLOCK_M * block_n, dtype=acc_dtype, device=x.device)
        if counters is None:
            count = torch.zeros(n_tiles, dtype=torch.int32, device=x.device)
        elif counters.dtype != torch.int32 or counters.numel() < n_tiles or counters.device != x.device:
            raise ValueError(f"counters must be int32 with >= {n_tiles} elements on {x.device}, got "
                             f"{counters.dtype} x {counters.numel()} on {counters.device}")
        else:
            count = counters
    else:
        part = count = ws  # unused pointers
    if pdl is None:
        pdl = pdl_available(x)
    if pdl:
        launch["launch_pdl"] = True
    xs = x_scale.float().contiguous() if x_scale is not None else ws
    quant_gemv_kernel[(n_tiles, split)](
        x, xs, w, ws, bias if bias is not None else ws, out, part, count,
        m, n, k, x.stride(0), w.stride(0), ws.stride(0), out.stride(0), per_split, split,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split > 1, A_FLOAT=a_float,
        ONE_ROW=a_float and m == 1, AMAX_CHUNK=min(next_pow2(k), 4096 if m == 1 else 8192 // BLOCK_M),
        W_INT4=int4, IS_FP8=act_dtype == "fp8", HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        QMAX=FP8_MAX if act_dtype == "fp8" else INT8_MAX, GDC=pdl, ASM=not interpreting(), **launch,
    )
    return out


def gemv_counters_needed(n: int) -> int:
    """Counters :func:`quant_gemv` may use for ``n`` output features: one per N tile of the narrowest tile."""
    return -(-n // MIN_BLOCK_N)


__all__ = ["gemv_config", "gemv_counters_needed", "quant_gemv", "quant_gemv_kernel"]
