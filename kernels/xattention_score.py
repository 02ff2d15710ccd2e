"""XAttention block scoring: antidiagonal sums of S x S tiles, softmaxed per query tile, summed per block.

With stride S, query tile r holds call rows [r*S, (r+1)*S) and key tile c holds keys [c*S, (c+1)*S). The tile
score is the antidiagonal sum ``sum_t q[r*S + S-1-t] . k[c*S + t]``: one product of Q taken at offsets S-1..0
(reversed) with K taken at offsets 0..S-1. Scores are scaled by ``scale / S`` (scale = 1/sqrt(d) by default),
softmaxed over the visible key tiles of each query tile (causal at tile granularity: key tile c is visible from
query tile r when it starts at or before r's last query), and summed per (query block, key block) of
``block_size`` tokens. ``xattention_select.select_blocks`` turns the scores into the block lists of the sparse kernel.

Layout conventions are those of ``reference.py``: q: [batch, q_heads, q_tokens, dim], k: [batch, kv_heads,
kv_tokens, dim] (GQA by grouping, K never repeated), queries are the last q_tokens keys, valid keys per row are
[kv_start, kv_end); tokens outside that range count as zero vectors. Imports nothing else of compressor; Triton
is imported lazily.

The Triton scoring kernel makes one pass over Q.K: it is a GEMM of the reshaped queries [tiles, S*d] (query
tokens read in reverse by index arithmetic, no copy) with the reshaped keys, one pipelined loop of S*d/BLOCK_K
steps per key chunk. Per row it keeps the online softmax max and sum and writes, per key block, the block's
partial log-sum-exp to a float32 scratch buffer; once the row's final log-sum-exp is known the same program
reads its scratch rows back (hot in L2) and sums them into block scores. Query heads of one GQA group are
stacked in the rows of a tile so that a K tile loaded once serves all of them.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from compressor.kernels.triton_support import interpreting, jit_helpers, next_pow2, triton_available

STRIDES = (4, 8, 16)
BLOCK_SIZES = (64, 128)
SCRATCH_BYTES = 512 << 20  # default bound of the scoring kernel's float32 scratch (heads are chunked to fit)


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


def key_bounds(batch: int, kv_tokens: int, kv_start, kv_end, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.zeros(batch, dtype=torch.int64, device=device) if kv_start is None else kv_start.to(device, torch.int64)
    end = torch.full((batch,), kv_tokens, dtype=torch.int64, device=device) if kv_end is None else kv_end.to(device, torch.int64)
    return start, end


def key_bounds_int32(batch: int, kv_tokens: int, kv_start, kv_end, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) as contiguous int32 [batch] for the kernels, in as few launches as possible."""
    def as_int32(x, fill):
        if x is None:
            return torch.full((batch,), fill, dtype=torch.int32, device=device)
        return x.to(device, torch.int32).contiguous()
    return as_int32(kv_start, 0), as_int32(kv_end, kv_tokens)


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
    start, end = key_bounds(batch, kv_tokens, kv_start, kv_end, device)
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
# Triton kernels (plain Python until _kernels() wraps them with triton.jit and binds `tl`)


tl = None  # triton.language, bound by _kernels() on first use so that this module imports without Triton


def _antidiagonal_dot(q_row, k_col, q_a, q_b, k_a, k_b, stride_qt, stride_kt,
                      STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MASKED: tl.constexpr, DOT_IEEE: tl.constexpr):
    """[BLOCK_M, BLOCK_C] float32: sum over t of q[row*S + S-1-t] . k[col*S + t], one K-loop of S*d/BLOCK_K steps.

    q_row: pointers to each row's query at t = 0 (its last token); k_col: to each key tile's first token. MASKED
    zeroes tokens outside the valid ranges: q at t valid iff q_a >= t > q_b, k at t iff k_a >= -t > k_b."""
    D_STEPS: tl.constexpr = BLOCK_D // BLOCK_K
    dk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for step in range(STRIDE * D_STEPS):
        t = step // D_STEPS
        d = (step % D_STEPS) * BLOCK_K + dk
        q_ptrs = q_row[:, None] + (d[None, :] - t * stride_qt)
        k_ptrs = k_col[:, None] + (d[None, :] + t * stride_kt)
        if MASKED:
            q_ok = ((q_a >= t) & (q_b < t))[:, None]
            k_ok = ((k_a >= -t) & (k_b < -t))[:, None]
            if HEAD_DIM < BLOCK_D:
                q_ok = q_ok & (d < HEAD_DIM)[None, :]
                k_ok = k_ok & (d < HEAD_DIM)[None, :]
            qv = tl.load(q_ptrs, mask=q_ok, other=0.0)
            kv = tl.load(k_ptrs, mask=k_ok, other=0.0)
        elif HEAD_DIM < BLOCK_D:
            qv = tl.load(q_ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
            kv = tl.load(k_ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
        else:
            qv = tl.load(q_ptrs)
            kv = tl.load(k_ptrs)
        if DOT_IEEE:  # float32 inputs and the CPU interpreter (bf16 is wrong there): exact float32 products
            acc = tl.dot(qv.to(tl.float32), tl.trans(kv.to(tl.float32)), acc, input_precision="ieee")
        else:  # tensor cores on the 16-bit operands, float32 accumulation
            acc = tl.dot(qv, tl.trans(kv), acc)
    return acc


def _key_chunk(c0, m, l, q_row, q_a, q_b, k_head, start, k_hi, vis_lo, vis_hi, part_row, scale_log2,
               stride_qt, stride_kt,
               STRIDE: tl.constexpr, TPB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, MASKED: tl.constexpr,
               DOT_IEEE: tl.constexpr):
    """Key tiles [c0, c0 + BLOCK_C): online max/sum update (log2 units) and each key block's partial log2-sum-exp
    ``m + log2(sum of the block's exp2(s - m))`` stored to the scratch rows. MASKED: tile c is visible from row r
    iff vis_lo <= c < vis_hi[r]. Returns (m, l)."""
    col = c0 + tl.arange(0, BLOCK_C)
    k_col = k_head + (col * STRIDE).to(tl.int64) * stride_kt
    acc = _antidiagonal_dot(q_row, k_col, q_a, q_b, col * STRIDE - start, col * STRIDE - k_hi, stride_qt, stride_kt,
                            STRIDE, HEAD_DIM, BLOCK_D, BLOCK_K, BLOCK_M, BLOCK_C, MASKED, DOT_IEEE)
    s = acc * scale_log2
    if MASKED:  # column offsets inside the chunk against per-row bounds: two compares per element
        offs = tl.arange(0, BLOCK_C)[None, :]
        s = tl.where((offs >= vis_lo - c0) & (offs < (vis_hi - c0)[:, None]), s, -float("inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if MASKED:  # a row with no visible tile yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_use = m_new
    NKB: tl.constexpr = BLOCK_C // TPB
    block_sum = tl.sum(tl.reshape(tl.exp2(s - m_use[:, None]), (BLOCK_M, NKB, TPB)), 2)  # [BLOCK_M, NKB]
    l = l * tl.exp2(m - m_use) + tl.sum(block_sum, 1)
    kb = tl.multiple_of(c0 // TPB, NKB) + tl.arange(0, NKB)  # chunks start at multiples of BLOCK_C tiles
    tl.store(part_row[:, None] + kb[None, :], m_use[:, None] + tl.log2(block_sum))  # -inf: nothing visible
    return m_new, l


def _scores_fwd(q_ptr, k_ptr, out_ptr, part_ptr, start_ptr, end_ptr,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_ob, stride_oh, stride_oq, stride_pb, stride_ph, stride_pr,
                batch0, slice0, q_tokens, kv_tokens, n_rows, scale_log2, size_class,
                GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                STRIDE: tl.constexpr, TPB: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_IEEE: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: ROWS query tiles of HEADS query heads of one KV head (BLOCK_M rows), every key tile they see.

    Grid: (row tiles, head slices of this launch, batch rows of this launch). Scratch rows hold whole chunks
    (columns padded past the last block). size_class only keys the autotuner."""
    ROWS: tl.constexpr = BLOCK_M // HEADS
    tile = tl.program_id(0)
    if IS_CAUSAL:
        tile = tl.num_programs(0) - 1 - tile  # the longest rows first: better balance at the tail
    head_slice = slice0 + tl.program_id(1)
    batch_row = tl.program_id(2)
    b = batch0 + batch_row
    h_first = head_slice * HEADS
    kv_head = h_first // GROUP
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    q_offset = kv_tokens - q_tokens
    k_hi = tl.maximum(tl.minimum(end, kv_tokens), 0)
    q_lo = tl.maximum(start - q_offset, 0)  # valid query positions [q_lo, q_hi)
    q_hi = tl.minimum(end - q_offset, q_tokens)

    i = tl.arange(0, BLOCK_M)
    head = h_first + i // ROWS
    row = tile * ROWS + i % ROWS
    row_last = row * STRIDE + STRIDE - 1  # the query taken at t = 0 (reverse order)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row_last.to(tl.int64) * stride_qt
    q_a = row_last - q_lo
    q_b = row_last - q_hi
    part_row = (part_ptr + batch_row.to(tl.int64) * stride_pb + (head - slice0 * HEADS).to(tl.int64) * stride_ph
                + row.to(tl.int64) * stride_pr)
    k_head = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    # visible key tiles of row r: [vis_lo, vis_hi[r]) (empty for rows past the last query tile)
    vis_lo = start // STRIDE
    vis_hi = tl.zeros((BLOCK_M,), tl.int32) + (k_hi + STRIDE - 1) // STRIDE
    if IS_CAUSAL:
        vis_hi = tl.minimum(vis_hi, (q_offset + tl.minimum(row * STRIDE + STRIDE, q_tokens) - 1) // STRIDE + 1)
    vis_hi = tl.where(row < n_rows, vis_hi, vis_lo)

    # key tiles [c_lo, c_hi) in chunks of BLOCK_C tiles from a multiple of BLOCK_C (block sums stay in a chunk)
    first_row = tile * ROWS
    c_lo = (start // (BLOCK_C * STRIDE)) * BLOCK_C
    c_hi = (k_hi + STRIDE - 1) // STRIDE
    inner_hi = k_hi // STRIDE  # key tiles below it hold only valid tokens...
    if IS_CAUSAL:
        c_hi = tl.minimum(c_hi, (q_offset + tl.minimum((first_row + ROWS) * STRIDE, q_tokens) - 1) // STRIDE + 1)
        inner_hi = tl.minimum(inner_hi, (q_offset + first_row * STRIDE + STRIDE - 1) // STRIDE + 1)  # ...and all visible
    n_chunks = tl.cdiv(tl.maximum(c_hi - c_lo, 0), BLOCK_C)
    # chunks [j_a, j_b) need no mask: every row and key token valid, every tile visible
    q_full = (first_row * STRIDE >= q_lo) & ((first_row + ROWS) * STRIDE <= q_hi)
    j_a = tl.minimum(tl.cdiv(tl.cdiv(start, STRIDE) - c_lo, BLOCK_C), n_chunks)
    j_b = tl.minimum(tl.maximum(tl.maximum(inner_hi - c_lo, 0) // BLOCK_C, j_a), n_chunks)
    j_b = tl.where(q_full, j_b, j_a)

    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for j in range(j_a, j_b):
        m, l = _key_chunk(c_lo + j * BLOCK_C, m, l, q_row, q_a, q_b, k_head, start, k_hi, vis_lo, vis_hi, part_row,
                          scale_log2, stride_qt, stride_kt, STRIDE, TPB, HEAD_DIM, BLOCK_D, BLOCK_K, BLOCK_M, BLOCK_C,
                          False, DOT_IEEE)
    for j in range(0, n_chunks - (j_b - j_a)):  # the edge chunks: [0, j_a) and [j_b, n_chunks)
        jj = j + (j >= j_a).to(tl.int32) * (j_b - j_a)
        m, l = _key_chunk(c_lo + jj * BLOCK_C, m, l, q_row, q_a, q_b, k_head, start, k_hi, vis_lo, vis_hi, part_row,
                          scale_log2, stride_qt, stride_kt, STRIDE, TPB, HEAD_DIM, BLOCK_D, BLOCK_K, BLOCK_M, BLOCK_C,
                          True, DOT_IEEE)

    # block score = sum over the block's rows of exp2(partial - row log2-sum-exp); rows with nothing visible give 0
    lse = tl.where(l > 0, tl.where(m == -float("inf"), 0.0, m) + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))
    tl.debug_barrier()  # the scratch rows were written by other threads of this program
    NQB: tl.constexpr = BLOCK_M // TPB
    blk = tl.arange(0, NQB)
    qb = tile * (ROWS // TPB) + blk % (ROWS // TPB)
    out_head = h_first + blk // (ROWS // TPB)
    out_row = out_ptr + b.to(tl.int64) * stride_ob + out_head.to(tl.int64) * stride_oh + qb.to(tl.int64) * stride_oq
    qb_live = qb * (TPB * STRIDE) < q_tokens
    kb_hi = (c_hi + TPB - 1) // TPB
    for kb0 in range(c_lo // TPB, kb_hi, BLOCK_O):
        kb = tl.multiple_of(kb0, BLOCK_C // TPB) + tl.arange(0, BLOCK_O)  # c_lo is a multiple of BLOCK_C tiles
        part = tl.load(part_row[:, None] + kb[None, :], mask=(kb < kb_hi)[None, :], other=-float("inf"))
        p = tl.sum(tl.reshape(tl.exp2(part - lse[:, None]), (NQB, TPB, BLOCK_O)), 1)
        tl.store(out_row[:, None] + kb[None, :], p, mask=qb_live[:, None] & (kb < kb_hi)[None, :])


# Scoring tiles tried by the autotuner on the GPU (16-bit inputs): BLOCK_M query-tile rows (all stacked heads),
# BLOCK_C key tiles, BLOCK_K contraction step, warps, pipeline stages, register cap. Shared memory is the pipeline's
# stages x (BLOCK_M + BLOCK_C) x BLOCK_K x 2 B (the epilogue reuses it); registers as ptxas reports them for sm_90
# (S=8, d=128), and so how many programs share an SM (228 KB, 64K registers): the epilogue (exp2, block sums) of
# one program then overlaps the tensor-core loop of another. A config that does not fit is skipped by the autotuner.
_GPU_SCORE_CONFIGS = (  # (BLOCK_M, BLOCK_C, BLOCK_K, num_warps, num_stages, maxnreg)
    (128, 128, 64, 8, 3, None),  # 96 KB, ~200 registers: 1 per SM
    (128, 128, 64, 8, 3, 128),  # 96 KB, capped at 128 (spills outside the K loop): 2 per SM
    (128, 128, 64, 4, 3, None),  # 96 KB, 255: 2 per SM
    (64, 128, 64, 4, 3, 168),  # 72 KB, 168: 3 per SM
    (64, 128, 64, 4, 4, None),  # 96 KB, ~215: 2 per SM
    (128, 256, 64, 8, 3, None),  # 144 KB, 255: 1 per SM
    (256, 128, 64, 8, 3, None),  # 144 KB, 255 + spills: 1 per SM
)


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Import Triton and jit the kernels above, once per process (TRITON_INTERPRET is read here)."""
    triton = jit_helpers(globals(), _antidiagonal_dot, _key_chunk)
    scores = triton.jit(do_not_specialize=["batch0", "slice0", "size_class"])(_scores_fwd)
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_K": bk}, num_warps=w, num_stages=s, maxnreg=r)
        for bm, bc, bk, w, s, r in _GPU_SCORE_CONFIGS
    ]
    tuned = triton.autotune(configs=configs, key=["STRIDE", "HEAD_DIM", "HEADS", "TPB", "IS_CAUSAL", "size_class"])(scores)
    return SimpleNamespace(scores=scores, scores_tuned=tuned)


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
    scratch_bytes: int = SCRATCH_BYTES,
) -> torch.Tensor:
    """Triton block scores; same arguments and result as :func:`xattention_scores_reference`.

    CUDA tensors (or CPU ones under TRITON_INTERPRET=1); float16, bfloat16 or float32, any head dim. Tiles are
    autotuned on the GPU for 16-bit inputs (once per stride, head dim, dtype and size class); ``block_r`` (rows per
    program, all stacked heads) fixes them instead. Scratch: float32 [batch x heads, q tiles, key blocks] (rows
    padded to 256, columns to 64), 512 MB for 32 heads at 64k tokens; heads (and batch rows) go in chunks of at
    most ``scratch_bytes``, one launch each (never less than one program's stacked heads).
    """
    _check(q, k, stride, block_size)
    batch, q_heads, q_tokens, dim = q.shape
    kv_heads, kv_tokens = k.shape[1], k.shape[2]
    device = q.device
    start, end = key_bounds_int32(batch, kv_tokens, kv_start, kv_end, device)
    tpb = block_size // stride
    n_qb, n_kb = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    out = torch.zeros(batch, q_heads, n_qb, n_kb, dtype=torch.float32, device=device)
    if q_tokens == 0 or batch * q_heads == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    group = q_heads // kv_heads
    heads = math.gcd(group, max(1, 64 // tpb))  # heads of a group stacked per program: a power of two dividing it
    n_rows = -(-q_tokens // stride)
    rows_pad = -(-n_rows // 256) * 256  # whole row tiles for every config (ROWS = BLOCK_M / heads <= 256)
    cols_pad = -(-n_kb // 64) * 64  # whole chunks of blocks for every config (BLOCK_C / tpb <= 64)
    small = interpreting() or q.dtype == torch.float32
    block_d = max(16 if small else 64, next_pow2(dim))  # a multiple of BLOCK_K
    kernels = _kernels()
    if small or block_r:
        block_m = block_r or (heads * max(tpb, 16 // heads) if interpreting() else 64)
        if block_m % (heads * tpb):
            raise ValueError(f"block_r must be a multiple of {heads * tpb} (stacked heads x tiles per block), got {block_m}")
        if small:  # float32 products (CUDA cores on the GPU): small tiles
            block_c = max(16, tpb) if interpreting() else 64
            fixed = dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=min(block_d, 32), num_warps=4, num_stages=2)
        else:
            fixed = dict(BLOCK_M=block_m, BLOCK_C=128, BLOCK_K=64, num_warps=8, num_stages=3)
        kernel = kernels.scores
    else:
        fixed = {}
        kernel = kernels.scores_tuned
    block_o = 16 if interpreting() else 64
    size_class = min(n_rows.bit_length(), 16) // 2
    # chunk (batch rows) x (head slices) so that the scratch stays within scratch_bytes
    n_slices = q_heads // heads
    per_slice = heads * rows_pad * cols_pad * 4
    units = max(1, scratch_bytes // per_slice)
    slice_step = min(n_slices, units)
    batch_step = min(batch, max(1, units // n_slices)) if slice_step == n_slices else 1
    part = torch.empty(batch_step, slice_step * heads, rows_pad, cols_pad, dtype=torch.float32, device=device)
    scale_log2 = (dim**-0.5 if scale is None else float(scale)) / stride * math.log2(math.e)
    for b0 in range(0, batch, batch_step):
        nb = min(batch_step, batch - b0)
        for s0 in range(0, n_slices, slice_step):
            ns = min(slice_step, n_slices - s0)
            grid = lambda meta, ns=ns, nb=nb: (-(-n_rows // (meta["BLOCK_M"] // heads)), ns, nb)  # noqa: E731
            kernel[grid](
                q, k, out, part, start, end,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                out.stride(0), out.stride(1), out.stride(2), part.stride(0), part.stride(1), part.stride(2),
                b0, s0, q_tokens, kv_tokens, n_rows, scale_log2, size_class,
                GROUP=group, HEADS=heads, HEAD_DIM=dim, BLOCK_D=block_d, STRIDE=stride, TPB=tpb,
                IS_CAUSAL=bool(causal), DOT_IEEE=small, BLOCK_O=block_o, **fixed,
            )  # fmt: skip
    return out


def block_scores(q: torch.Tensor, k: torch.Tensor, **kwargs) -> torch.Tensor:
    """Block scores by the Triton kernel on CUDA when Triton is importable, else the reference."""
    if q.is_cuda and triton_available():
        return xattention_scores(q, k, **kwargs)
    return xattention_scores_reference(q, k, **kwargs)
