"""SageAttention-style quantized attention in Triton, with the sparse patterns of :mod:`.sparse_attention`.

Variants (``VARIANTS``, fastest first): ``int8-qk/fp8-pv``, ``int8-qk/fp16-pv``, each optionally ``+qsmooth``, and
``bf16`` (no quantization: the sparse kernel itself).

- K is smoothed: the per-(batch row, KV head, channel) mean over the row's valid keys is subtracted. Every score
  of a query row moves by the same ``q . mean``, so the softmax is unchanged while channel outliers vanish.
- ``+qsmooth`` (SageAttention2): each BLOCK_M block of queries has its mean subtracted before quantization; its
  exact contribution ``q_mean . k`` is added back to the scores as one bias row per query block.
- Q and K are INT8 with one scale per block of tokens (Q: BLOCK_M, K: BLOCK_N, the attention kernel's tiles);
  ``QK^T`` is an INT8 ``tl.dot`` with INT32 accumulation, dequantized with the product of the two scales.
- P V: 16-bit (P in V's dtype: fp16, or bf16 for bf16 inputs) or FP8 e4m3 with a per-channel V scale
  (P scaled by 448 into e4m3's range). Each key block's FP8 product is accumulated by the MMA on its own and then
  added into the fp32 accumulator (two-level accumulation with a period of one block). V in FP8 is stored
  transposed, [D, tokens], so both FP8 operands are K-major as Hopper's FP8 MMA requires.

Quantization (smoothing, scales, the fused kernel) lives in :mod:`.sage_quant`. The attention kernel iterates key blocks exactly
as :mod:`.sparse_attention` does (per-head sink + window from alpha/beta and the row length, or block lists), with
GQA, per-row padding and queries at an offset. :func:`sage_attention_reference` quantizes and dequantizes as the
kernels do; :mod:`.reference` stays the float spec. Triton is imported on first use.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from compressor.kernels.triton_support import interpreting, jit_helpers, require_launchable

from . import sparse_attention as sa
from .sage_quant import (
    FP8_MAX, GPU_BLOCK_M, GPU_BLOCK_N, GPU_TILES, VARIANTS, QuantizedQKV, parse_variant, quantize_qkv,
    quantize_qkv_reference,
)

# the quantization half is re-exported: callers use one module for quantized attention
__all__ = [
    "VARIANTS", "GPU_TILES", "QuantizedQKV", "parse_variant", "quantize_qkv", "quantize_qkv_reference",
    "sage_attention", "sage_attention_reference", "attention", "unsupported_reason",
]
from .reference import block_list_allowed, dense_heads, visible_mask, window_sizes

# helpers both kernels share (jitted in _triton_kernels()): row bounds + window, the key-block ranges visited, and
# the token-level mask of boundary blocks
_row_window, _key_block_ranges, _listed_block_range = sa._row_window, sa._key_block_ranges, sa._listed_block_range
_masked_scores = sa._masked_scores

tl = None  # triton.language, bound by _triton_kernels()


# ---------------------------------------------------------------------------------------------------------------
# Attention on quantized inputs: the PyTorch reference
# ---------------------------------------------------------------------------------------------------------------


def sage_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "int8-qk/fp8-pv",
    sink=None, alpha=None, beta=None, kv_start=None, kv_end=None, causal: bool = True, scale: float | None = None,
    block_index=None, block_count=None, block_size: int | None = None,
    block_m: int = GPU_BLOCK_M, block_n: int = GPU_BLOCK_N, q_chunk: int = 256, smooth_k: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Quantized attention as the kernel computes it: quantize, dequantize, masked softmax in float32.

    Shapes and masking as :func:`.reference.sparse_attention_reference` (block lists as
    :func:`.reference.block_sparse_attention_reference`). P is rounded to the P V dtype block by block against the
    running row maximum of key blocks visited in ascending order, as the kernel does for window patterns (block
    lists it visits in list order: P's rounding grid may then differ). Returns q's dtype.
    """
    var = parse_variant(variant)
    batch, q_heads, nq, head_dim = q.shape
    _, kv_heads, nk, _ = k.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if not var.quantized:
        from .reference import block_sparse_attention_reference, sparse_attention_reference

        kw = dict(sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end, causal=causal, scale=scale)
        cast = [x.to(torch.bfloat16) for x in (q, k, v)]
        if block_index is not None:
            out = block_sparse_attention_reference(*cast, block_index=block_index, block_count=block_count,
                                                   block_size=block_size, **kw)
        else:
            out = sparse_attention_reference(*cast, **kw)
        return out.to(q.dtype)
    if block_index is not None:  # tiles must divide the list's blocks, as in sage_attention()
        block_m, block_n = min(block_m, block_size), min(block_n, block_size)
    quant = quantize_qkv_reference(q, k, v, variant=variant, kv_start=kv_start, kv_end=kv_end,
                                   block_m=block_m, block_n=block_n, smooth_k=smooth_k)
    device = q.device
    group = q_heads // kv_heads
    qk_scale = (head_dim**-0.5 if scale is None else float(scale)) * math.log2(math.e)
    if sink is None or alpha is None or beta is None:
        sink, alpha, beta = dense_heads(q_heads, device)
    start, end = (x.long() for x in sa._check_rows(kv_start, kv_end, batch, nk, device))
    window = window_sizes(alpha.to(device), beta.to(device), end - start)
    sink = sink.to(device, torch.int64)
    allowed = None
    if block_index is not None:
        allowed = block_list_allowed(block_index.to(device), block_count.to(device), -(-nk // block_size))

    # Scores in the log2 domain, as the kernel: int8 products (exact in float32) times the two scales.
    q8 = quant.q.float().reshape(batch, kv_heads, group, nq, head_dim)
    k8 = quant.k.float()[:, :, None]
    row_scale = (quant.q_scale * qk_scale).repeat_interleave(block_m, dim=2)[:, :, :nq]
    row_scale = row_scale.reshape(batch, kv_heads, group, nq, 1)
    col_scale = quant.k_scale.repeat_interleave(block_n, dim=2)[:, :, None, None, :nk]
    bias = None
    if quant.q_mean is not None:  # q_mean . k_deq, one row per query block
        qm = (quant.q_mean * qk_scale).reshape(batch, kv_heads, group, -1, head_dim)
        bias = torch.matmul(qm, k8.transpose(-1, -2)) * col_scale  # [B, Hkv, G, nQb, Nk]
    _, _, vf = quant.dequantize()
    vf = vf[:, :, None]
    n_kb = -(-nk // block_n)
    k_index = torch.arange(nk, device=device)
    out = torch.zeros(batch, kv_heads, group, nq, head_dim, dtype=torch.float32, device=device)
    chunk = max(1, q_chunk // block_m) * block_m
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        q_index = torch.arange(c0, c1, device=device) + nk - nq
        mask = visible_mask(q_index, k_index, sink=sink, window=window, kv_start=start, kv_end=end, causal=causal)
        if allowed is not None:
            listed = allowed[:, :, c0 // block_size : -(-c1 // block_size)]
            listed = listed.repeat_interleave(block_size, dim=2)[:, :, : c1 - c0]
            mask = mask & listed.repeat_interleave(block_size, dim=3)[..., :nk]
        mask = mask.reshape(batch, kv_heads, group, c1 - c0, nk)
        s = torch.matmul(q8[:, :, :, c0:c1], k8.transpose(-1, -2)) * row_scale[:, :, :, c0:c1] * col_scale
        if bias is not None:
            s = s + bias.repeat_interleave(block_m, dim=3)[:, :, :, c0:c1]
        s = s.masked_fill(~mask, -math.inf)
        # Running maximum after each key block (ascending), and the final one; -inf (nothing seen) counts as 0.
        blocks = F.pad(s, (0, n_kb * block_n - nk), value=-math.inf).unflatten(-1, (n_kb, block_n))
        m_run = blocks.amax(dim=-1).cummax(dim=-1).values
        m_run = torch.where(torch.isfinite(m_run), m_run, 0.0)
        m_fin = m_run[..., -1:]
        p = torch.exp2(blocks - m_run[..., None])
        rescale = torch.exp2(m_run - m_fin)[..., None]
        denom = (p * rescale).sum(dim=(-1, -2))[..., None]
        if var.pv == "fp8":
            pq = (p * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX
        else:
            pq = p.to(quant.v.dtype).float()
        pq = (pq * rescale).flatten(-2)[..., :nk]
        out[:, :, :, c0:c1] = torch.matmul(pq, vf) / torch.where(denom > 0, denom, 1.0)
    return out.view(batch, q_heads, nq, head_dim).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (wrapped by triton.jit in _triton_kernels)
# ---------------------------------------------------------------------------------------------------------------


def _attend_blocks_sage(
    acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd,
    q_pos, lo, hi, kv_lo, kv_hi, sink_end, window,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    QSMOOTH: tl.constexpr, PV_FP8: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi): INT8 QK^T, then 16-bit or FP8 P V (see the module docstring)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k_scale = tl.load(ks_base + start_n // BLOCK_N)
        if MASKED:
            in_row = (offs_n >= kv_lo) & (offs_n < kv_hi)
            k = tl.load(k_ptrs, mask=in_row[:, None], other=0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k)).to(tl.float32)
        if QSMOOTH:
            qk = qk * (q_row_scale * k_scale) + (tl.sum(k.to(tl.float32) * q_mean[None, :], 1) * k_scale)[None, :]
            sc = 1.0
        else:
            sc = q_row_scale * k_scale  # applied inside the exponent's FMA below, not as a pass of its own
        if MASKED:
            qk = _masked_scores(qk, q_pos, offs_n, in_row, window, sink_end, IS_CAUSAL)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * sc)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            v = tl.load(v_ptrs, mask=in_row[:, None], other=0.0)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * sc)
            m_use = m_new
            v = tl.load(v_ptrs)
        # FP8 P V: probabilities scaled by 448 (e4m3's largest value) to use its range; the shift enters the exponent,
        # so l_i carries the same factor and it cancels in acc / l_i
        if PV_FP8:
            m_exp = m_use - 8.807354922057604  # log2(448)
        else:
            m_exp = m_use
        p = tl.math.exp2(qk * sc - m_exp[:, None])
        correction = tl.math.exp2(m_i - m_use)
        l_i = l_i * correction + tl.sum(p, 1)
        pv = tl.dot(p.to(v.dtype), v)  # this block's products alone, then into the fp32 accumulator
        acc = acc * correction[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


def _sage_attention_fwd(
    Q8, QScale, QMean, K8, KScale, V, VScale, O, Sink, Alpha, Beta, KvStart, KvEnd, BlockIndex, BlockCount,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om,
    stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
    q_heads, kv_heads, q_tokens, kv_tokens, n_q_blocks, n_k_blocks, max_listed, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LIST_BLOCK: tl.constexpr, QSMOOTH: tl.constexpr, PV_FP8: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, query head); the iteration is _sparse_attention_fwd's."""
    pid_bh = tl.program_id(0)
    m_blk = tl.program_id(1)
    if IS_CAUSAL:
        m_blk = tl.num_programs(1) - 1 - m_blk
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    kvh = h // GROUP

    kv_lo, kv_hi, window, sink_end = _row_window(KvStart, KvEnd, Alpha, Beta, Sink, b, h, kv_tokens)

    m0 = m_blk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offset = kv_tokens - q_tokens
    q_pos = q_offset + offs_m
    first = q_offset + m0
    last = q_offset + tl.minimum(m0 + BLOCK_M, q_tokens) - 1

    q_job = pid_bh.to(tl.int64) * n_q_blocks + m_blk
    q = tl.load(Q8 + pid_bh.to(tl.int64) * q_tokens * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=offs_m[:, None] < q_tokens, other=0)
    q_row_scale = tl.load(QScale + q_job) * qk_scale
    if QSMOOTH:
        q_mean = tl.load(QMean + q_job * HEAD_DIM + offs_d) * qk_scale
    else:
        q_mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    kv_bh = b.to(tl.int64) * kv_heads + kvh
    k_base = K8 + kv_bh * kv_tokens * HEAD_DIM
    ks_base = KScale + kv_bh * n_k_blocks
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if LIST_BLOCK == 0:
        sink_lo_b, sink_stop, win_lo_b, full_lo_b, full_hi_b, win_hi_b = _key_block_ranges(
            first, last, window, kv_lo, kv_hi, sink_end, BLOCK_N, IS_CAUSAL)  # shared with sparse_attention

        acc, l_i, m_i = _attend_blocks_sage(
            acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd, q_pos,
            sink_lo_b, sink_stop, kv_lo, kv_hi, sink_end, window, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, QSMOOTH, PV_FP8,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks_sage(
            acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd, q_pos,
            win_lo_b, full_lo_b, kv_lo, kv_hi, sink_end, window, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, QSMOOTH, PV_FP8,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks_sage(
            acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd, q_pos,
            full_lo_b, full_hi_b, kv_lo, kv_hi, sink_end, window, HEAD_DIM, BLOCK_N, False, IS_CAUSAL, QSMOOTH, PV_FP8,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks_sage(
            acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd, q_pos,
            full_hi_b, win_hi_b, kv_lo, kv_hi, sink_end, window, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, QSMOOTH, PV_FP8,
        )  # fmt: skip
    else:
        q_blk = m0 // LIST_BLOCK
        count = tl.minimum(tl.load(BlockCount + b * stride_cb + h * stride_ch + q_blk), max_listed)
        index_base = BlockIndex + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + q_blk * stride_im
        kv_lo_b = (kv_lo // BLOCK_N) * BLOCK_N
        for c in range(0, count):
            lo, hi = _listed_block_range(index_base, c, kv_lo_b, kv_hi, last, LIST_BLOCK, IS_CAUSAL)
            acc, l_i, m_i = _attend_blocks_sage(
                acc, l_i, m_i, q, q_row_scale, q_mean, k_base, ks_base, v_base, stride_vn, stride_vd, q_pos,
                lo, hi, kv_lo, kv_hi, sink_end, window, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, QSMOOTH, PV_FP8,
            )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if PV_FP8:
        out = out * tl.load(VScale + kv_bh * HEAD_DIM + offs_d)[None, :]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < q_tokens)


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the attention kernel above, once per process."""
    triton = jit_helpers(globals(), _attend_blocks_sage)
    module = globals()
    sa._triton_kernels()  # jits the helpers the two kernels share
    module["_key_block_ranges"] = sa._key_block_ranges
    module["_row_window"] = sa._row_window
    module["_listed_block_range"] = sa._listed_block_range
    module["_masked_scores"] = sa._masked_scores
    return SimpleNamespace(triton=triton, plain=triton.jit(_sage_attention_fwd), interpret=interpreting())


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def sage_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "int8-qk/fp8-pv",
    sink=None, alpha=None, beta=None, kv_start=None, kv_end=None, causal: bool = True, scale: float | None = None,
    block_index=None, block_count=None, block_size: int | None = None, out: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int = 3,
    quantized: QuantizedQKV | None = None,
) -> torch.Tensor:  # fmt: skip
    """Quantized sparse attention in Triton; arguments and result as :func:`sage_attention_reference`.

    q: [batch, q_heads, q_tokens, head_dim]; k, v: [batch, kv_heads, kv_tokens, head_dim]; head_dim 64 or 128;
    float16/bfloat16 (float32 in the interpreter). ``quantized`` reuses a :func:`quantize_qkv` result (benchmarks).
    """
    var = parse_variant(variant)
    if not var.quantized:
        return sa.sparse_attention(q, k, v, sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end,
                                   causal=causal, scale=scale, block_index=block_index, block_count=block_count,
                                   block_size=block_size, out=out)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, tokens, head_dim] with k, v alike; got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    batch, q_heads, nq, d = q.shape
    _, kv_heads, nk, _ = k.shape
    if q_heads % kv_heads or k.shape[0] != batch or k.shape[-1] != d:
        raise ValueError(f"k, v must be [{batch}, kv_heads dividing {q_heads}, kv_tokens, {d}], got {list(k.shape)}")
    if d not in sa.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {sa.SUPPORTED_HEAD_DIMS}, got {d}; use attention() to fall back")
    if nq > nk:
        raise ValueError(f"queries are the last q_tokens keys, so q_tokens ({nq}) <= kv_tokens ({nk})")
    kernels = _triton_kernels()
    device = q.device
    require_launchable(device, kernels.interpret)
    scale = d**-0.5 if scale is None else float(scale)
    sink, alpha, beta = sa._check_pattern(sink, alpha, beta, q_heads, device)
    start, end = sa._check_rows(kv_start, kv_end, batch, nk, device)
    lists = sa._check_block_lists(block_index, block_count, block_size, batch, q_heads, nq, device)
    if block_m is None:
        block_m, block_n, tuned_warps = (16, 16, 4) if kernels.interpret else GPU_TILES[var.pv]
        num_warps = num_warps or tuned_warps
        if lists is not None:
            block_m, block_n = min(block_m, block_size), min(block_n, block_size)
    block_n = block_m if block_n is None else block_n
    if lists is None:
        index = count = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device)
        list_block, max_listed = 0, 0
    else:
        index, count = lists
        list_block, max_listed = block_size, index.shape[-1]
        if list_block % block_m or list_block % block_n:
            raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must divide block_size ({list_block})")
    if quantized is None:
        quantized = quantize_qkv(q, k, v, variant=variant, kv_start=kv_start, kv_end=kv_end, block_m=block_m, block_n=block_n)
    if out is None:
        out = torch.empty(batch, q_heads, nq, d, dtype=q.dtype, device=device)
    if nq == 0 or batch * q_heads == 0:
        return out
    qq = quantized
    if var.pv == "fp8":  # [B, Hkv, D, Nk_pad]: token stride 1
        vt, v_strides = qq.v, (qq.v.stride(0), qq.v.stride(1), 1, qq.v.stride(2))
        vs = qq.v_scale.contiguous()
    else:
        vt, v_strides = qq.v, (qq.v.stride(0), qq.v.stride(1), qq.v.stride(2), 1)
        vs = qq.k_scale
    q_mean = qq.q_mean if qq.q_mean is not None else qq.q_scale
    grid = (batch * q_heads, -(-nq // block_m))
    kernels.plain[grid](
        qq.q, qq.q_scale, q_mean, qq.k, qq.k_scale, vt, vs, out, sink, alpha, beta, start, end, index, count,
        *v_strides, out.stride(0), out.stride(1), out.stride(2),
        index.stride(0), index.stride(1), index.stride(2), count.stride(0), count.stride(1),
        q_heads, kv_heads, nq, nk, qq.q_scale.shape[2], qq.k_scale.shape[2], max_listed, scale * math.log2(math.e),
        GROUP=q_heads // kv_heads, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(causal),
        LIST_BLOCK=list_block, QSMOOTH=var.qsmooth, PV_FP8=var.pv == "fp8",
        num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str) -> str | None:
    """Why :func:`attention` would not use the Triton kernels for these inputs and variant, or None when it would."""
    reason = sa.unsupported_reason(q, k, v)
    if reason is None and parse_variant(variant).pv == "fp8":
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < (8, 9):
            return f"FP8 P V needs compute capability 8.9 or newer, the GPU has {major}.{minor}"
    return reason


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"quantized attention runs the PyTorch reference (slow): {reason}", RuntimeWarning, stacklevel=3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "int8-qk/fp8-pv", **kwargs) -> torch.Tensor:
    """Quantized sparse attention for the runtime: the Triton kernels where they run, else the reference (warns once).

    kwargs: sink, alpha, beta, kv_start, kv_end, causal, scale, block_index, block_count, block_size (as
    :func:`.sparse_attention.attention`). ``variant="bf16"`` is the unquantized sparse kernel.
    """
    var = parse_variant(variant)
    if not var.quantized:
        return sa.attention(q, k, v, **kwargs)
    reason = unsupported_reason(q, k, v, variant)
    if reason is None:
        return sage_attention(q, k, v, variant=variant, **kwargs)
    _warn_once(reason)
    return sage_attention_reference(q, k, v, variant=variant, **kwargs)
