"""XAttention block scoring: antidiagonal sums of S x S tiles, softmaxed per query tile, summed per block.

With stride S, query tile r holds call rows [r*S, (r+1)*S) and key tile c holds keys [c*S, (c+1)*S). The tile
score is the antidiagonal sum ``sum_t q[r*S + S-1-t] . k[c*S + t]``: one product of Q taken at offsets S-1..0
(reversed) with K taken at offsets 0..S-1. Scores are scaled by ``scale / S`` (scale = 1/sqrt(d) by default),
softmaxed over the visible key tiles of each query tile (causal at tile granularity: key tile c is visible from
query tile r when it starts at or before r's last query), and summed per (query block, key block) of
``block_size`` tokens. :func:`select_blocks` turns the scores into the block lists of the sparse kernel.

Layout conventions are those of ``reference.py``: q: [batch, q_heads, q_tokens, dim], k: [batch, kv_heads,
kv_tokens, dim] (GQA by grouping, K never repeated), queries are the last q_tokens keys, valid keys per row are
[kv_start, kv_end); tokens outside that range count as zero vectors. Imports nothing else of compressor; Triton
is imported lazily.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from compressor.kernels.triton_support import interpreting, triton_available

STRIDES = (4, 8, 16)
BLOCK_SIZES = (64, 128)


def _check(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [batch, heads, tokens, head_dim], got {q.dim()}-D and {k.dim()}-D")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"queries are the last q_tokens keys, so q_tokens ({q.shape[2]}) <= kv_tokens ({k.shape[2]})")
    if stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


def _bounds(batch: int, kv_tokens: int, kv_start, kv_end, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.zeros(batch, dtype=torch.int64, device=device) if kv_start is None else kv_start.to(device, torch.int64)
    end = torch.full((batch,), kv_tokens, dtype=torch.int64, device=device) if kv_end is None else kv_end.to(device, torch.int64)
    return start, end


def _tiles(x: torch.Tensor, offset: int, stride: int, start: torch.Tensor, end: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[batch, heads, tokens, d] -> [batch, heads, tiles, stride * d]: tokens zeroed outside [start, end), padded
    to whole tiles, the S tokens of each tile concatenated (in reverse order for queries)."""
    batch, heads, tokens, dim = x.shape
    pos = torch.arange(tokens, device=x.device) + offset
    valid = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])  # [batch, tokens]
    x = x.float() * valid[:, None, :, None]
    pad = -tokens % stride
    x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    x = x.view(batch, heads, -1, stride, dim)
    if reverse:
        x = x.flip(3)
    return x.reshape(batch, heads, -1, stride * dim)


def xattention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_block_chunk: int = 16,
) -> torch.Tensor:
    """Block scores float32 [batch, q_heads, cdiv(q_tokens, bs), cdiv(kv_tokens, bs)] (zero where not visible).

    Each query tile's softmax sums to 1, so a query block's row sums to its number of query tiles with a visible
    key. Work memory: q_heads x (q_block_chunk * bs / S) x kv_tokens / S floats.
    """
    _check(q, k, stride, block_size)
    batch, q_heads, q_tokens, dim = q.shape
    kv_heads, kv_tokens = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    device = q.device
    scale = (dim**-0.5 if scale is None else float(scale)) / stride
    start, end = _bounds(batch, kv_tokens, kv_start, kv_end, device)
    q_offset = kv_tokens - q_tokens
    qt = _tiles(q, q_offset, stride, start, end, reverse=True).view(batch, kv_heads, group, -1, stride * dim)
    kt = _tiles(k, 0, stride, start, end, reverse=False)[:, :, None]  # [batch, kv_heads, 1, kv_tiles, S*d]
    n_qt, n_kt = qt.shape[3], kt.shape[3]
    tpb = block_size // stride
    n_qb, n_kb = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    key_first = torch.arange(n_kt, device=device) * stride
    key_ok = (key_first[None] < end[:, None]) & (key_first[None] + stride > start[:, None])  # [batch, kv_tiles]
    out = torch.zeros(batch, q_heads, n_qb, n_kb, dtype=torch.float32, device=device)
    rows_per_chunk = q_block_chunk * tpb
    for r0 in range(0, n_qt, rows_per_chunk):
        r1 = min(n_qt, r0 + rows_per_chunk)
        s = torch.matmul(qt[:, :, :, r0:r1], kt.transpose(-1, -2)) * scale  # [batch, kv_heads, group, R, kv_tiles]
        visible = key_ok[:, None, None, None, :].expand(batch, 1, 1, r1 - r0, n_kt)
        if causal:
            last_query = q_offset + torch.clamp(torch.arange(r0, r1, device=device) * stride + stride, max=q_tokens) - 1
            visible = visible & (key_first[None, :] <= last_query[:, None])[None, None, None]
        s = s.masked_fill(~visible, -math.inf)
        row_max = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
        denom = p.sum(dim=-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        p = p.reshape(batch, q_heads, r1 - r0, n_kt)
        p = torch.nn.functional.pad(p, (0, n_kb * tpb - n_kt, 0, -(r1 - r0) % tpb))
        p = p.view(batch, q_heads, -1, tpb, n_kb, tpb).sum(dim=(3, 5))
        out[:, :, r0 // tpb : r0 // tpb + p.shape[2]] += p
    return out


# ---------------------------------------------------------------------------------------------------------------
# Block selection: per query block, blocks in descending score until the cumulative share reaches tau.


def visible_blocks(
    batch: int, q_tokens: int, kv_tokens: int, block_size: int, kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None, causal: bool, device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, forced), bool [batch, n_q_blocks, n_kv_blocks]: blocks holding a valid key that a query of the block
    may see, and the blocks always kept (the first valid block: sinks; the blocks holding the block's own queries)."""
    start, end = _bounds(batch, kv_tokens, kv_start, kv_end, device)
    n_qb, n_kb = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    q_offset = kv_tokens - q_tokens
    first_q = torch.arange(n_qb, device=device) * block_size + q_offset
    last_q = torch.clamp(torch.arange(1, n_qb + 1, device=device) * block_size, max=q_tokens) - 1 + q_offset
    kb_first = torch.arange(n_kb, device=device) * block_size
    kb_last = kb_first + block_size - 1
    valid = (kb_first[None] < end[:, None]) & (kb_last[None] >= start[:, None])  # [batch, n_kb]
    visible = valid[:, None, :].expand(batch, n_qb, n_kb)
    if causal:
        visible = visible & (kb_first[None, :] <= last_q[:, None])[None]
    own = (kb_last[None, :] >= first_q[:, None]) & (kb_first[None, :] <= last_q[:, None])  # [n_qb, n_kb]
    sink = kb_first[None, :] == (start // block_size * block_size)[:, None]  # [batch, n_kb]
    forced = visible & (own[None] | sink[:, None, :])
    return visible, forced


def rank_blocks(
    scores: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each row's blocks: forced first, then by descending score, ties by ascending index (stable sort).

    scores: [batch, heads, n_qb, n_kb]; visible/forced: [batch, n_qb, n_kb]. Returns (order int64, exclusive
    cumulative share of the sorted blocks, forced count, visible count), the last two [batch, heads, n_qb].
    """
    vis, frc = visible[:, None].expand_as(scores), forced[:, None].expand_as(scores)
    s = torch.where(vis, scores.float().clamp_min(0.0), torch.zeros_like(scores, dtype=torch.float32))
    key = torch.where(frc, torch.full_like(s, math.inf), torch.where(vis, s, torch.full_like(s, -1.0)))
    key, order = torch.sort(key, dim=-1, descending=True, stable=True)
    total = s.sum(dim=-1, keepdim=True)
    share = torch.gather(s, -1, order) / torch.where(total > 0, total, torch.ones_like(total))
    exclusive = torch.cumsum(share, dim=-1) - share
    return order, exclusive, frc.sum(-1), vis.sum(-1)


def kept_counts(exclusive: torch.Tensor, n_forced: torch.Tensor, n_visible: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """How many leading sorted blocks each row keeps: those whose preceding share is < tau (all visible ones at
    tau >= 1), at least the forced ones. tau: [heads] (or broadcastable to [batch, heads, n_qb])."""
    tau = tau.to(exclusive.device, torch.float32)
    while tau.dim() < 3:
        tau = tau[None] if tau.dim() < 2 else tau[..., None]
    need = (exclusive < tau[..., None]).sum(-1)
    need = torch.where(tau >= 1.0, n_visible, need)
    return torch.minimum(torch.maximum(need, n_forced), n_visible)


def select_blocks(
    scores: torch.Tensor,
    tau: torch.Tensor,
    *,
    q_tokens: int,
    kv_tokens: int,
    block_size: int,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists from block scores, on the scores' device (no host round trip).

    scores: [batch, heads, n_qb, n_kb]; tau: [heads]. Returns (block_index int32 [batch, heads, n_qb, n_kb], kept
    indices first in ascending order, then padding; block_count int32 [batch, heads, n_qb]).
    """
    batch, heads, n_qb, n_kb = scores.shape
    visible, forced = visible_blocks(batch, q_tokens, kv_tokens, block_size, kv_start, kv_end, causal, scores.device)
    order, exclusive, n_forced, n_visible = rank_blocks(scores, visible, forced)
    count = kept_counts(exclusive, n_forced, n_visible, tau)
    kept = torch.arange(n_kb, device=scores.device) < count[..., None]
    index = torch.where(kept, order, torch.full_like(order, n_kb)).sort(dim=-1).values
    index = torch.where(index < n_kb, index, torch.zeros_like(index))
    return index.to(torch.int32), count.to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel


tl = None  # triton.language, bound by _kernels() on first use so that this module imports without Triton


def _tile_scores(q_ptr, k_ptr, rows, cols, d_off, d_ok, start, end, q_offset, q_tokens, kv_tokens,
                 stride_qt, stride_kt, STRIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """Antidiagonal sums [BLOCK_R, BLOCK_C]: sum over t of q[rows*S + S-1-t] . k[cols*S + t] (invalid tokens 0)."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t in tl.static_range(STRIDE):
        q_pos = rows * STRIDE + (STRIDE - 1 - t)
        q_ok = (q_pos < q_tokens) & (q_pos + q_offset >= start) & (q_pos + q_offset < end)
        k_pos = cols * STRIDE + t
        k_ok = (k_pos >= start) & (k_pos < end) & (k_pos < kv_tokens)
        qv = tl.load(q_ptr + q_pos[:, None] * stride_qt + d_off[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        kv = tl.load(k_ptr + k_pos[None, :] * stride_kt + d_off[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:  # the CPU interpreter (bf16 is wrong there) and float32 inputs: exact float32 products
            acc += tl.dot(qv.to(tl.float32), kv.to(tl.float32), input_precision="ieee")
        else:  # tensor cores on the 16-bit operands, float32 accumulation
            acc += tl.dot(qv, kv)
    return acc

def _scores_fwd(q_ptr, k_ptr, out_ptr, start_ptr, end_ptr,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_ob, stride_oh, stride_oq,
                q_heads, q_tokens, kv_tokens, n_kb, scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE: tl.constexpr,
                TPB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IS_CAUSAL: tl.constexpr,
                DOT_FP32: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // q_heads
    h = bh % q_heads
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + (h // GROUP) * stride_kh
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    q_offset = kv_tokens - q_tokens
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d_off = tl.arange(0, BLOCK_D)
    d_ok = d_off < HEAD_DIM
    last_q = q_offset + tl.minimum(rows * STRIDE + STRIDE, q_tokens) - 1  # [R]
    row_live = rows * STRIDE < q_tokens
    hi = tl.minimum(kv_tokens, end)
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.max(tl.where(row_live, last_q, 0), 0) + 1)
    c_lo = (start // (TPB * STRIDE)) * TPB  # first key tile of the first valid block
    c_hi = (hi + STRIDE - 1) // STRIDE
    m = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        s = _tile_scores(q_ptr, k_ptr, rows, cols, d_off, d_ok, start, end, q_offset, q_tokens, kv_tokens,
                         stride_qt, stride_kt, STRIDE, BLOCK_R, BLOCK_C, DOT_FP32) * scale
        vis = ((cols * STRIDE < end) & (cols * STRIDE + STRIDE > start))[None, :] & row_live[:, None]
        if IS_CAUSAL:
            vis = vis & (cols[None, :] * STRIDE <= last_q[:, None])
        s = tl.where(vis, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    inv_l = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    NQB: tl.constexpr = BLOCK_R // TPB
    NKB: tl.constexpr = BLOCK_C // TPB
    qb = tl.program_id(1) * NQB + tl.arange(0, NQB)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        s = _tile_scores(q_ptr, k_ptr, rows, cols, d_off, d_ok, start, end, q_offset, q_tokens, kv_tokens,
                         stride_qt, stride_kt, STRIDE, BLOCK_R, BLOCK_C, DOT_FP32) * scale
        vis = ((cols * STRIDE < end) & (cols * STRIDE + STRIDE > start))[None, :] & row_live[:, None]
        if IS_CAUSAL:
            vis = vis & (cols[None, :] * STRIDE <= last_q[:, None])
        p = tl.where(vis, tl.exp(s - m_safe[:, None]) * inv_l[:, None], 0.0)
        p = tl.sum(tl.reshape(p, (NQB, TPB, NKB, TPB)), 3)
        p = tl.sum(p, 1)  # [NQB, NKB]
        kb = c0 // TPB + tl.arange(0, NKB)
        optr = out_ptr + b * stride_ob + h * stride_oh + qb[:, None] * stride_oq + kb[None, :]
        tl.store(optr, p, mask=(qb[:, None] * TPB * STRIDE < q_tokens) & (kb[None, :] < n_kb))



@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Import Triton and jit the kernels above, once per process (TRITON_INTERPRET is read here)."""
    import triton
    import triton.language

    module = globals()
    module["tl"] = triton.language
    module["_tile_scores"] = triton.jit(_tile_scores)
    return SimpleNamespace(fwd=triton.jit(_scores_fwd))


def xattention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_r: int | None = None,
) -> torch.Tensor:
    """Triton block scores; same arguments and result as :func:`xattention_scores_reference`.

    CUDA tensors (or CPU ones under TRITON_INTERPRET=1); float16, bfloat16 or float32, any head dim.
    """
    _check(q, k, stride, block_size)
    batch, q_heads, q_tokens, dim = q.shape
    kv_heads, kv_tokens = k.shape[1], k.shape[2]
    device = q.device
    start, end = _bounds(batch, kv_tokens, kv_start, kv_end, device)
    start, end = start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()
    tpb = block_size // stride
    n_qb, n_kb = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    out = torch.zeros(batch, q_heads, n_qb, n_kb, dtype=torch.float32, device=device)
    if q_tokens == 0 or batch * q_heads == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # at least 16 rows/cols for tl.dot; whole blocks per tile so the per-block sums stay inside one program
    interpret = interpreting()
    small = interpret or q.dtype == torch.float32
    block_r = block_r or (max(16, tpb) if small else max(64, tpb))
    block_c = max(16, tpb) if small else max(64, tpb)
    scale = (dim**-0.5 if scale is None else float(scale)) / stride
    grid = (batch * q_heads, -(-q_tokens // (block_r * stride)))
    _kernels().fwd[grid](
        q, k, out, start, end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_heads, q_tokens, kv_tokens, n_kb, scale,
        GROUP=q_heads // kv_heads, HEAD_DIM=dim, BLOCK_D=max(16, 1 << (dim - 1).bit_length()), STRIDE=stride,
        TPB=tpb, BLOCK_R=block_r, BLOCK_C=block_c, IS_CAUSAL=bool(causal),
        DOT_FP32=small, num_warps=4 if small else 8,
        num_stages=1,  # each key step unrolls STRIDE strided loads: pipelining them overflows shared memory
    )  # fmt: skip
    return out




def block_scores(q: torch.Tensor, k: torch.Tensor, **kwargs) -> torch.Tensor:
    """Block scores by the Triton kernel on CUDA when Triton is importable, else the reference."""
    if q.is_cuda and triton_available():
        return xattention_scores(q, k, **kwargs)
    return xattention_scores_reference(q, k, **kwargs)
