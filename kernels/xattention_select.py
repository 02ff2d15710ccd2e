"""XAttention block selection: per query block, blocks in descending score until their cumulative share of the row
reaches the head's threshold tau, the first valid block (sinks) and the blocks holding the row's own queries always
kept; output in the block-list format of the sparse kernel.

:func:`select_blocks_reference` is the spec (PyTorch ops); :func:`select_blocks` runs it as one Triton launch on the
scores' device (no host round trip). Scores come from ``xattention_score``. Triton is imported lazily.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from compressor.kernels.triton_support import next_pow2, triton_available
from compressor.kernels.xattention_score import key_bounds, key_bounds_int32


# ---------------------------------------------------------------------------------------------------------------
# Block selection: per query block, blocks in descending score until the cumulative share reaches tau.


def visible_blocks(
    batch: int, q_tokens: int, kv_tokens: int, block_size: int, kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None, causal: bool, device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, forced), bool [batch, n_q_blocks, n_kv_blocks]: blocks holding a valid key that a query of the block
    may see, and the blocks always kept (the first valid block: sinks; the blocks holding the block's own queries)."""
    start, end = key_bounds(batch, kv_tokens, kv_start, kv_end, device)
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


def _tau_rows(tau: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """tau as float32 with three dims: [heads] -> [1, heads, 1]; broadcastable to [batch, heads, n_qb]."""
    tau = tau.to(device, torch.float32)
    while tau.dim() < 3:
        tau = tau[None] if tau.dim() < 2 else tau[..., None]
    return tau


def kept_counts(exclusive: torch.Tensor, n_forced: torch.Tensor, n_visible: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """How many leading sorted blocks each row keeps: those whose preceding share is < tau (all visible ones at
    tau >= 1), at least the forced ones. tau: [heads] (or broadcastable to [batch, heads, n_qb])."""
    tau = _tau_rows(tau, exclusive.device)
    need = (exclusive < tau[..., None]).sum(-1)
    need = torch.where(tau >= 1.0, n_visible, need)
    return torch.minimum(torch.maximum(need, n_forced), n_visible)


def select_blocks_reference(
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
    """:func:`select_blocks` in PyTorch ops (the spec of the Triton selection kernel; used off the GPU)."""
    batch, heads, n_qb, n_kb = scores.shape
    visible, forced = visible_blocks(batch, q_tokens, kv_tokens, block_size, kv_start, kv_end, causal, scores.device)
    order, exclusive, n_forced, n_visible = rank_blocks(scores, visible, forced)
    count = kept_counts(exclusive, n_forced, n_visible, tau)
    kept = torch.arange(n_kb, device=scores.device) < count[..., None]
    index = torch.where(kept, order, torch.full_like(order, n_kb)).sort(dim=-1).values
    index = torch.where(index < n_kb, index, torch.zeros_like(index))
    return index.to(torch.int32), count.to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel (plain Python until _kernels() wraps it with triton.jit and binds `tl`)


tl = None  # triton.language, bound by _kernels() on first use so that this module imports without Triton


def _select_fwd(scores_ptr, tau_ptr, start_ptr, end_ptr, index_ptr, count_ptr,
                stride_sb, stride_sh, stride_sq, stride_tb, stride_th, stride_tq,
                stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                q_tokens, kv_tokens, n_kb,
                BLOCK_SIZE: tl.constexpr, N_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One (batch, head, query block) row of :func:`select_blocks_reference`: visibility, ranking by one sort of
    (rank code, block index) keys, cumulative share, count, kept indices in ascending order."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    q_offset = kv_tokens - q_tokens
    kb = tl.arange(0, N_PAD)  # block index, and also the position in the sorted row
    real = kb < n_kb
    first = kb * BLOCK_SIZE
    last = first + BLOCK_SIZE - 1
    first_q = qb * BLOCK_SIZE + q_offset
    last_q = tl.minimum((qb + 1) * BLOCK_SIZE, q_tokens) - 1 + q_offset
    visible = real & (first < end) & (last >= start)
    if IS_CAUSAL:
        visible = visible & (first <= last_q)
    forced = visible & (((last >= first_q) & (first <= last_q)) | (first == (start // BLOCK_SIZE) * BLOCK_SIZE))
    row = scores_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + qb.to(tl.int64) * stride_sq
    s = tl.load(row + kb, mask=real, other=0.0)
    s = tl.where(visible & (s > 0.0), s, 0.0)
    total = tl.sum(s, 0)
    # rank code, ascending = the reference's order: forced (0), visible by descending score (the bits of s >= 0
    # grow with s), invisible, padding; the block index in the low half breaks ties by ascending index
    code = tl.where(forced, 0, tl.where(visible, 0x7F800000 - s.to(tl.int32, bitcast=True),
                                        tl.where(real, 0x7F800001, 0x7F800002)))
    key = (code.to(tl.int64) << 32) + kb.to(tl.int64)
    ranked = tl.sort(key, dim=0)
    ranked_code = ranked >> 32
    order = (ranked - (ranked_code << 32)).to(tl.int32)
    s_ranked = tl.load(row + order, mask=ranked_code <= 0x7F800000, other=0.0)
    s_ranked = tl.where(s_ranked > 0.0, s_ranked, 0.0)
    share = tl.math.div_rn(s_ranked, tl.where(total > 0, total, 1.0))
    exclusive = tl.cumsum(share, axis=0) - share
    tau = tl.load(tau_ptr + b.to(tl.int64) * stride_tb + h * stride_th + qb.to(tl.int64) * stride_tq)
    n_visible = tl.sum(visible.to(tl.int32), 0)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    need = tl.sum(((exclusive < tau) & real).to(tl.int32), 0)
    need = tl.where(tau >= 1.0, n_visible, need)
    count = tl.minimum(tl.maximum(need, n_forced), n_visible)
    # the kept blocks are the `count` smallest keys: keys up to the count-th, in block order via a running count
    threshold = tl.max(tl.where(kb < count, ranked, -1), 0)
    kept = key <= threshold
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    out = index_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
    tl.store(out + slot, kb, mask=kept)
    tl.store(out + kb, tl.zeros_like(kb), mask=real & (kb >= count))
    tl.store(count_ptr + b.to(tl.int64) * stride_cb + h * stride_ch + qb, count)


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Import Triton and jit the selection kernel, once per process (TRITON_INTERPRET is read here)."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    return SimpleNamespace(select=triton.jit(_select_fwd))


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
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists from block scores, on the scores' device (no host round trip): one Triton launch (default on
    CUDA when Triton is importable; CPU tensors need TRITON_INTERPRET=1), else :func:`select_blocks_reference`.

    scores: [batch, heads, n_qb, n_kb]; tau: [heads]. Returns (block_index int32 [batch, heads, n_qb, n_kb], kept
    indices first in ascending order, then padding; block_count int32 [batch, heads, n_qb]).
    """
    if use_triton is None:
        use_triton = scores.is_cuda and triton_available()
    if not use_triton:
        return select_blocks_reference(scores, tau, q_tokens=q_tokens, kv_tokens=kv_tokens, block_size=block_size,
                                       kv_start=kv_start, kv_end=kv_end, causal=causal)
    batch, heads, n_qb, n_kb = scores.shape
    device = scores.device
    index = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.int32, device=device)
    count = torch.empty(batch, heads, n_qb, dtype=torch.int32, device=device)
    if index.numel() == 0:
        return index, count.zero_()
    scores = scores if scores.dtype == torch.float32 and scores.stride(-1) == 1 else scores.float().contiguous()
    start, end = key_bounds_int32(batch, kv_tokens, kv_start, kv_end, device)
    tau = torch.broadcast_to(_tau_rows(tau, device), (batch, heads, n_qb))  # stride 0 where broadcast: no copy
    _kernels().select[(n_qb, heads, batch)](
        scores, tau, start, end, index, count,
        scores.stride(0), scores.stride(1), scores.stride(2), tau.stride(0), tau.stride(1), tau.stride(2),
        index.stride(0), index.stride(1), index.stride(2), count.stride(0), count.stride(1),
        q_tokens, kv_tokens, n_kb,
        BLOCK_SIZE=block_size, N_PAD=max(16, next_pow2(n_kb)), IS_CAUSAL=bool(causal), num_warps=4,
    )  # fmt: skip
    return index, count
