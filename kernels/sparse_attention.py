"""Block-sparse FlashAttention forward in Triton: every head of a layer in one launch, each with its own pattern.

Semantics are exactly those of :func:`compressor.kernels.reference.sparse_attention_reference` (per-head sink +
window, computed in the kernel from alpha, beta and the row length) and of
:func:`compressor.kernels.reference.block_sparse_attention_reference` (explicit block lists). One program owns
``BLOCK_M`` queries of one query head and reads its K/V head through ``h // group`` (GQA without copies). It visits
only the key blocks its pattern can reach: the sink blocks, then the window's blocks; blocks every row of the tile
sees in full run without a mask, edge blocks apply the token-level mask.

Triton is imported on first use, never at import: this module loads (and falls back) where Triton is missing.
The kernel functions below are plain Python until :func:`_triton_kernels` wraps them with ``triton.jit``.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

import torch

from compressor.kernels.triton_support import interpreting, jit_helpers, require_launchable, triton_available

from .reference import block_sparse_attention_reference, sparse_attention_reference

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
LIST_BLOCK_SIZES = (16, 32, 64, 128)

tl = None  # triton.language, bound by _triton_kernels() on first use so that this module imports without Triton

# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (wrapped by triton.jit in _triton_kernels; `tl` is bound there too).
# ---------------------------------------------------------------------------------------------------------------


def _masked_scores(qk, q_pos, offs_n, in_row, window, sink_end, IS_CAUSAL: tl.constexpr):
    """``qk`` [BLOCK_M, BLOCK_N] with -inf where a key is neither in the row's window nor in its sink, or lies outside
    the row's valid range ``in_row`` (token-level rule of the boundary blocks; shared with the Sage kernel)."""
    dist = q_pos[:, None] - offs_n[None, :]
    if IS_CAUSAL:
        near = (dist >= 0) & (dist < window)
        in_sink = (offs_n[None, :] < sink_end) & (dist >= 0)
    else:
        near = (dist < window) & (dist > -window)
        in_sink = offs_n[None, :] < sink_end
    return tl.where((near | in_sink) & in_row[None, :], qk, float("-inf"))


def _attend_blocks(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
    q_pos, lo, hi, kv_lo, kv_hi, sink_end, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi) (lo a multiple of BLOCK_N); MASKED applies the token-level rule."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            in_row = (offs_n >= kv_lo) & (offs_n < kv_hi)
            k = tl.load(k_ptrs, mask=in_row[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            qk = _masked_scores(qk, q_pos, offs_n, in_row, window, sink_end, IS_CAUSAL)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # A row that has seen no visible key yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            v = tl.load(v_ptrs, mask=in_row[:, None], other=0.0)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            v = tl.load(v_ptrs)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # scale folded into one multiply-add (qk_scale > 0)
        correction = tl.math.exp2(m_i - m_use)
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _row_window(KvStart, KvEnd, Alpha, Beta, Sink, b, h, kv_tokens):
    """Row b's valid keys [kv_lo, kv_hi), head h's window from the row length N (float32, as the reference does),
    and the end of its sink."""
    start_raw = tl.load(KvStart + b)
    end_raw = tl.load(KvEnd + b)
    kv_lo = tl.minimum(tl.maximum(start_raw, 0), kv_tokens)
    kv_hi = tl.maximum(tl.minimum(end_raw, kv_tokens), kv_lo)
    length = (end_raw - start_raw).to(tl.float32)
    w = tl.load(Alpha + h) + tl.load(Beta + h) * length
    not_finite = (w != w) | (w > 3.0e38) | (w < -3.0e38)
    w = tl.where(not_finite | (w > length), length, w)
    w = tl.minimum(tl.maximum(tl.math.floor(w), 1.0), length)
    window = w.to(tl.int32)
    sink_end = start_raw + tl.load(Sink + h)
    return kv_lo, kv_hi, window, sink_end


def _key_block_ranges(first, last, window, kv_lo, kv_hi, sink_end, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Key-block ranges a query tile (rows at key positions first..last) visits, in order: sinks
    [sink_lo_b, sink_stop), window edge [win_lo_b, full_lo_b), blocks every row sees unmasked [full_lo_b, full_hi_b),
    window edge [full_hi_b, win_hi_b)."""
    # Keys some row of the tile sees through the window, and keys every row sees (no mask needed there).
    win_lo = tl.maximum(first - window + 1, kv_lo)
    full_lo = tl.maximum(last - window + 1, kv_lo)
    if IS_CAUSAL:
        win_hi = tl.minimum(last + 1, kv_hi)
        full_hi = tl.minimum(first + 1, kv_hi)
    else:
        win_hi = tl.minimum(last + window, kv_hi)
        full_hi = tl.minimum(first + window, kv_hi)
    win_hi = tl.maximum(win_hi, win_lo)
    full_hi = tl.maximum(full_hi, full_lo)
    sink_hi = tl.minimum(sink_end, kv_hi)
    if IS_CAUSAL:
        sink_hi = tl.minimum(sink_hi, last + 1)
    sink_hi = tl.maximum(sink_hi, kv_lo)
    # The same ranges in whole key blocks (every bound is >= 0 here, so // is a floor).
    sink_lo_b = tl.where(sink_hi > kv_lo, (kv_lo // BLOCK_N) * BLOCK_N, 0)
    sink_hi_b = tl.where(sink_hi > kv_lo, tl.cdiv(sink_hi, BLOCK_N) * BLOCK_N, 0)
    win_lo_b = tl.where(win_hi > win_lo, (win_lo // BLOCK_N) * BLOCK_N, sink_hi_b)
    win_hi_b = tl.where(win_hi > win_lo, tl.cdiv(win_hi, BLOCK_N) * BLOCK_N, sink_hi_b)
    full_lo_b = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi_b = (full_hi // BLOCK_N) * BLOCK_N
    no_full = full_hi_b <= full_lo_b
    full_lo_b = tl.where(no_full, win_hi_b, full_lo_b)
    full_hi_b = tl.where(no_full, win_hi_b, full_hi_b)
    # Sink blocks before the window's first block; sink blocks reaching into or past the window extend it.
    sink_stop = tl.minimum(sink_hi_b, win_lo_b)
    win_hi_b = tl.maximum(win_hi_b, sink_hi_b)
    return sink_lo_b, sink_stop, win_lo_b, full_lo_b, full_hi_b, win_hi_b


def _listed_block_range(index_base, c, kv_lo_b, kv_hi, last, LIST_BLOCK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys [lo, hi) of the c-th listed key block, clipped to the row's valid (and causal) range."""
    j = tl.load(index_base + c)
    lo = tl.maximum(j * LIST_BLOCK, kv_lo_b)
    hi = tl.minimum(j * LIST_BLOCK + LIST_BLOCK, kv_hi)
    if IS_CAUSAL:
        hi = tl.minimum(hi, last + 1)
    return lo, hi


def _sparse_attention_fwd(
    Q, K, V, O, Sink, Alpha, Beta, KvStart, KvEnd, BlockIndex, BlockCount,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
    q_heads, q_tokens, kv_tokens, max_listed, qk_scale, size_class, pattern_class,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LIST_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, query head). LIST_BLOCK = 0: sink + window; else block lists."""
    pid_bh = tl.program_id(0)  # heads vary fastest, so the query heads of one group run side by side and share K/V in L2
    m_blk = tl.program_id(1)
    if IS_CAUSAL:
        m_blk = tl.num_programs(1) - 1 - m_blk  # longest rows first: better tail balance
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    kvh = h // GROUP

    # Row bounds and this head's window, from the row length N (as the reference does, in float32).
    kv_lo, kv_hi, window, sink_end = _row_window(KvStart, KvEnd, Alpha, Beta, Sink, b, h, kv_tokens)

    m0 = m_blk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offset = kv_tokens - q_tokens
    q_pos = q_offset + offs_m
    first = q_offset + m0  # absolute positions of the tile's first and last real query
    last = q_offset + tl.minimum(m0 + BLOCK_M, q_tokens) - 1

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=offs_m[:, None] < q_tokens, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if LIST_BLOCK == 0:
        sink_lo_b, sink_stop, win_lo_b, full_lo_b, full_hi_b, win_hi_b = _key_block_ranges(
            first, last, window, kv_lo, kv_hi, sink_end, BLOCK_N, IS_CAUSAL)

        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, sink_lo_b, sink_stop,
            kv_lo, kv_hi, sink_end, window, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, win_lo_b, full_lo_b,
            kv_lo, kv_hi, sink_end, window, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, full_lo_b, full_hi_b,
            kv_lo, kv_hi, sink_end, window, qk_scale, HEAD_DIM, BLOCK_N, False, IS_CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, full_hi_b, win_hi_b,
            kv_lo, kv_hi, sink_end, window, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION,
        )  # fmt: skip
    else:
        # Block lists: the tile's row of the list, each listed key block clipped to the valid (and causal) range.
        q_blk = m0 // LIST_BLOCK
        count = tl.minimum(tl.load(BlockCount + b * stride_cb + h * stride_ch + q_blk), max_listed)
        index_base = BlockIndex + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + q_blk * stride_im
        kv_lo_b = (kv_lo // BLOCK_N) * BLOCK_N
        for c in range(0, count):
            lo, hi = _listed_block_range(index_base, c, kv_lo_b, kv_hi, last, LIST_BLOCK, IS_CAUSAL)
            acc, l_i, m_i = _attend_blocks(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, lo, hi,
                kv_lo, kv_hi, sink_end, window, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION,
            )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # rows with no visible key: acc = 0, so 0
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_tokens)


def _autotune_configs(triton: object) -> list:
    """Tiles, warps and pipeline depths tried on the GPU (pruned per head dim and block-list granularity)."""
    shapes = [
        (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 4, 3),
        (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 3),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """With block lists the tile must divide the list's block size."""
    list_block = kwargs["LIST_BLOCK"]
    if not list_block:
        return configs
    kept = [c for c in configs if list_block % c.kwargs["BLOCK_M"] == 0 and list_block % c.kwargs["BLOCK_N"] == 0]
    return kept or [type(configs[0])({"BLOCK_M": list_block, "BLOCK_N": list_block}, num_warps=4, num_stages=2)]


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the kernels above, once per process (the interpreter is chosen here, by TRITON_INTERPRET)."""
    triton = jit_helpers(globals(), _masked_scores, _attend_blocks, _key_block_ranges, _row_window, _listed_block_range)
    plain = triton.jit(do_not_specialize=["size_class", "pattern_class"])(_sparse_attention_fwd)
    tuned = triton.autotune(
        configs=_autotune_configs(triton),
        key=["HEAD_DIM", "IS_CAUSAL", "LIST_BLOCK", "size_class", "pattern_class"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(plain)
    return SimpleNamespace(triton=triton, plain=plain, tuned=tuned, interpret=interpreting())



# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------


def _check_pattern(sink, alpha, beta, q_heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    given = [x is not None for x in (sink, alpha, beta)]
    if any(given) and not all(given):
        raise ValueError("give sink, alpha and beta together (or none of them for dense heads)")
    if not any(given):
        sink = torch.zeros(q_heads, dtype=torch.int32, device=device)
        alpha = torch.full((q_heads,), math.inf, dtype=torch.float32, device=device)
        beta = torch.zeros(q_heads, dtype=torch.float32, device=device)
    for name, x in (("sink", sink), ("alpha", alpha), ("beta", beta)):
        if x.shape != (q_heads,):
            raise ValueError(f"{name} must have shape [q_heads] = [{q_heads}], got {list(x.shape)}")
    return (
        sink.to(device, torch.int32).contiguous(),
        alpha.to(device, torch.float32).contiguous(),
        beta.to(device, torch.float32).contiguous(),
    )


def _check_rows(kv_start, kv_end, batch: int, kv_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    start = torch.zeros(batch, dtype=torch.int32, device=device) if kv_start is None else kv_start
    end = torch.full((batch,), kv_tokens, dtype=torch.int32, device=device) if kv_end is None else kv_end
    for name, x in (("kv_start", start), ("kv_end", end)):
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape [batch] = [{batch}], got {list(x.shape)}")
    return start.to(device, torch.int32).contiguous(), end.to(device, torch.int32).contiguous()


def _check_block_lists(block_index, block_count, block_size, batch, q_heads, q_tokens, device):
    given = [x is not None for x in (block_index, block_count, block_size)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("give block_index, block_count and block_size together")
    if block_size not in LIST_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {LIST_BLOCK_SIZES}, got {block_size}")
    n_q_blocks = -(-q_tokens // block_size)
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (batch, q_heads, n_q_blocks):
        raise ValueError(
            f"block_index must be [batch, q_heads, n_q_blocks, max_kv_blocks] = [{batch}, {q_heads}, {n_q_blocks}, *] "
            f"for {q_tokens} queries in blocks of {block_size}, got {list(block_index.shape)}"
        )
    if tuple(block_count.shape) != (batch, q_heads, n_q_blocks):
        raise ValueError(f"block_count must be [{batch}, {q_heads}, {n_q_blocks}], got {list(block_count.shape)}")
    return block_index.to(device, torch.int32).contiguous(), block_count.to(device, torch.int32).contiguous()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sink: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_index: torch.Tensor | None = None,
    block_count: torch.Tensor | None = None,
    block_size: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton sparse attention; same arguments and result as the references (block lists when block_index is given).

    q: [batch, q_heads, q_tokens, head_dim]; k, v: [batch, kv_heads, kv_tokens, head_dim]; head_dim 64 or 128;
    float16, bfloat16 (or float32). ``out`` is written in place if given. ``block_m``/``block_n`` fix the tile and
    skip autotuning (tests, the CPU interpreter, config sweeps; with ``num_warps``/``num_stages``). Block-list rows must hold distinct indices.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, tokens, head_dim], got {q.dim()}, {k.dim()}, {v.dim()}")
    batch, q_heads, q_tokens, head_dim = q.shape
    _, kv_heads, kv_tokens, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"k and v must be [{batch}, kv_heads, kv_tokens, {head_dim}], got {list(k.shape)}, {list(v.shape)}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}; use attention() to fall back")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (*SUPPORTED_DTYPES, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_tokens > kv_tokens:
        raise ValueError(f"queries are the last q_tokens keys, so q_tokens ({q_tokens}) <= kv_tokens ({kv_tokens})")
    device = q.device
    kernels = _triton_kernels()
    require_launchable(device, kernels.interpret)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    patterned = int(sink is not None)  # dense heads and per-head patterns are tuned apart
    sink, alpha, beta = _check_pattern(sink, alpha, beta, q_heads, device)
    start, end = _check_rows(kv_start, kv_end, batch, kv_tokens, device)
    lists = _check_block_lists(block_index, block_count, block_size, batch, q_heads, q_tokens, device)
    if lists is None:
        index = count = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device)
        list_block, max_listed = 0, 0
    else:
        index, count = lists
        list_block, max_listed = block_size, index.shape[-1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(batch, q_heads, q_tokens, head_dim, dtype=q.dtype, device=device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {list(q.shape)} on {device} with unit last stride")
    if q_tokens == 0 or batch * q_heads == 0:
        return out

    args = (
        q, k, v, out, sink, alpha, beta, start, end, index, count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), index.stride(0), index.stride(1), index.stride(2),
        count.stride(0), count.stride(1),
        q_heads, q_tokens, kv_tokens, max_listed, scale * math.log2(math.e), _size_class(q_tokens), patterned,
    )  # fmt: skip
    meta = dict(
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, IS_CAUSAL=bool(causal), LIST_BLOCK=list_block,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip

    def grid(config: dict) -> tuple[int, int]:
        return (batch * q_heads, _cdiv(q_tokens, config["BLOCK_M"]))

    if block_m is None and (kernels.interpret or q.dtype == torch.float32):
        block_m = block_n = 64 if kernels.interpret else 32
    if block_m is not None:
        block_n = block_m if block_n is None else block_n
        if list_block and (list_block % block_m or list_block % block_n):
            raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must divide block_size ({list_block})")
        kernels.plain[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    else:
        kernels.tuned[grid](*args, **meta)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size_class(q_tokens: int) -> int:
    """Autotuning bucket: one tuning per factor of 4 in query count (from 1k up)."""
    return max(0, (max(q_tokens, 1).bit_length() - 10) // 2)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: the Triton kernel where it can run, the reference elsewhere
# ---------------------------------------------------------------------------------------------------------------




def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why :func:`attention` would not use the Triton kernel for these inputs, or None when it would."""
    if not triton_available():
        return "triton is not installed"
    if q.device.type != "cuda":
        return f"the tensors are on {q.device.type}, not CUDA"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the kernel needs 8.0 (Ampere) or newer"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (k {k.dtype}, v {v.dtype}); the kernel takes float16 or bfloat16"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (v {v.shape[-1]}); the kernel takes {SUPPORTED_HEAD_DIMS}"
    return None


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"sparse attention runs the PyTorch reference (slow): {reason}", RuntimeWarning, stacklevel=3)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sink: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_index: torch.Tensor | None = None,
    block_count: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Sparse attention for the runtime: the Triton kernel when it supports the inputs, else the reference (warns once)."""
    if len({x is None for x in (sink, alpha, beta)}) > 1:
        raise ValueError("give sink, alpha and beta together (or none of them for dense heads)")
    kwargs = dict(sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end, causal=causal, scale=scale)
    lists = dict(block_index=block_index, block_count=block_count, block_size=block_size)
    reason = unsupported_reason(q, k, v)
    if reason is None:
        return sparse_attention(q, k, v, **kwargs, **lists)
    _warn_once(reason)
    if any(x is not None for x in lists.values()):
        return block_sparse_attention_reference(q, k, v, **kwargs, **lists)
    return sparse_attention_reference(q, k, v, **kwargs)
