"""Decode attention over a per-KV-head sink + ring cache: split-K (flash-decoding) in Triton, and its reference.

The cache layout (built by ``compressor.cache``) is one flat ragged buffer per layer and per K/V:
``k_buf, v_buf: [batch, slots, head_dim]``. KV head ``g`` owns slots ``[region_start[g], region_start[g] +
sink_cap[g] + ring_cap[g])``: its first ``sink_cap[g]`` slots hold the row's first valid tokens (token ``j`` in slot
``j``), the next ``ring_cap[g]`` slots are a ring holding token ``j >= sink_cap`` at ``sink_cap + (j - sink_cap) %
ring_cap``. A dense head has ``sink_cap = max_length, ring_cap = 0``.

Semantics (the reference below is the spec): one query per row, the row's newest token ``N - 1`` with
``N = length[b]``. Query head ``h`` (KV head ``h // group``) sees stored token ``j`` when ``j < sink[h]`` or
``N - 1 - j < window[b, h]``. A row with nothing visible returns zeros.

The kernel: one program per (chunk of one KV head's stored tokens, row) loads each K/V tile once for all query heads
of its GQA group (``tl.dot`` of a ``[BLOCK_H, D]`` query tile) and runs an online softmax over its chunk, reading
only the tokens the group can see (the sink part, then the ring from the widest window on). Chunks are sized once per
shape (``kernels/decode_launch.py``, cached) so that the batch makes one wave of programs where it can, each KV head
cut in proportion to its capacity; a head cut into one chunk writes its output directly, others write partials with
their log-sum-exp, and the last of the head's programs to finish merges them (an arrival counter per row and KV head,
reset by that program: no second launch, nothing to clear between calls; heads cut into very many chunks are merged
by a second launch instead). A call does no host synchronisation and allocates only by shape (CUDA-graph capturable).
Triton is imported on first use; this module imports nothing of compressor outside kernels/.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from compressor.kernels.decode_launch import DecodeLaunch, decode_launch
from compressor.kernels.triton_support import interpreting, jit_helpers, next_pow2, pdl_available, triton_available

tl = None  # triton.language, bound by _triton_kernels() on first use

# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------------------------


def slot_tokens(length: torch.Tensor, sink_cap: int, ring_cap: int) -> torch.Tensor:
    """Token index held by each slot of one KV head's region, per row; -1 where the slot is empty.

    length: [batch] tokens written so far -> [batch, sink_cap + ring_cap] int64.
    """
    n = length.to(torch.int64)[:, None]
    s = torch.arange(sink_cap + ring_cap, device=length.device)[None, :]
    in_sink = s < sink_cap
    r = s - sink_cap
    m = n - sink_cap  # tokens written to the ring part
    ring = max(ring_cap, 1)
    newest = sink_cap + r + ring * torch.div(m - 1 - r, ring, rounding_mode="floor")
    token = torch.where(in_sink, s.expand_as(newest), newest)
    valid = torch.where(in_sink, s < n, r < m)
    return torch.where(valid, token, torch.full_like(token, -1))


def decode_attention_reference(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    region_start: list[int],
    sink_cap: list[int],
    ring_cap: list[int],
    length: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention over the ragged sink + ring buffers, in float32.

    q: [batch, q_heads, head_dim]; k_buf, v_buf: [batch, slots, head_dim]; region_start, sink_cap, ring_cap:
    per KV head; length: [batch]; sink: [q_heads]; window: [batch, q_heads]. Returns [batch, q_heads, head_dim].
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = len(region_start)
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    n = length.to(q.device, torch.int64)
    out = torch.zeros(batch, q_heads, v_buf.shape[-1], dtype=torch.float32, device=q.device)
    for g in range(kv_heads):
        lo, cap = region_start[g], sink_cap[g] + ring_cap[g]
        token = slot_tokens(n, sink_cap[g], ring_cap[g])  # [batch, cap]
        heads = slice(g * group, (g + 1) * group)
        s = sink[heads].to(q.device, torch.int64)[None, :, None]
        w = window[:, heads].to(q.device, torch.int64)[:, :, None]
        j = token[:, None, :]
        visible = (j >= 0) & ((j < s) | (n[:, None, None] - 1 - j < w))  # [batch, group, cap]
        k = k_buf[:, lo : lo + cap].float()
        v = v_buf[:, lo : lo + cap].float().masked_fill((token < 0)[..., None], 0.0)  # empty slots may hold NaN
        scores = torch.einsum("bhd,bsd->bhs", q[:, heads].float(), k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~visible, -math.inf)
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, heads] = torch.einsum("bhs,bsd->bhd", p, v)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (plain Python until _triton_kernels wraps them with triton.jit and binds `tl`)
# ---------------------------------------------------------------------------------------------------------------


def _merge_partials(
    OPart, LsePart, Out, b, g, first, count, programs, stride_outb, stride_outh, h0, d0,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """Out for query heads ``h0 .. h0 + HEADS`` (of the GROUP of KV head ``g``; those past the group are skipped) in
    row ``b``, head-dim slice ``d0 .. d0 + BLOCK_D``: the ``count`` partials of programs ``first ..`` weighted by their
    share of the softmax mass, SPLITS partials per round trip to memory. Loads bypass L1 (.cg): the partials were
    written by other SMs during this launch."""
    offs_h = h0 + tl.arange(0, HEADS)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    h_ok = offs_h < GROUP
    m_i = tl.full([HEADS], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, count, SPLITS):
        offs_s = s0 + tl.arange(0, SPLITS)
        ok = (offs_s < count)[:, None] & h_ok[None, :]  # [SPLITS, HEADS]
        row = (b * programs + first + offs_s)[:, None] * GROUP + offs_h[None, :]
        lse = tl.load(LsePart + row, mask=ok, other=-float("inf"), cache_modifier=".cg")
        parts = tl.load(OPart + row[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                        cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(lse, axis=0))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        w = tl.exp2(lse - m_use[None, :])  # [SPLITS, HEADS]; 0 where a chunk saw nothing
        corr = tl.exp2(m_i - m_use)
        acc = acc * corr[:, None] + tl.sum(parts * w[:, :, None], axis=0)
        l_i = l_i * corr + tl.sum(w, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_outb + (g * GROUP + offs_h)[:, None] * stride_outh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=h_ok[:, None])


def _decode_chunk(
    Q, K, V, RegionStart, SinkCap, RingCap, Table, Length, Sink, Window, Out, OPart, LsePart, Arrived,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn, stride_wb, stride_wh, stride_outb, stride_outh,
    kv_heads, programs, chunk_tokens, scale, softcap,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED_MERGE: tl.constexpr, GROUP_P2: tl.constexpr,
    SPLITS: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    """One (chunk of one KV head, row): online softmax of the group's query heads over ``chunk_tokens`` of the stored
    tokens the group can see. A head cut into one chunk writes its output; others write a partial and its lse, and
    with FUSED_MERGE the last of a head's programs to finish merges them (an arrival counter per row and KV head).
    GDC (programmatic dependent launch): read what no kernel writes between calls (the launch table, the layout, the
    sinks) while the kernel before drains, then wait for it (it wrote the new token's K/V, the lengths and the
    windows) and let the merge launch start its programs, which wait in turn for this whole grid."""
    r = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.load(Table + r)
    c = tl.load(Table + programs + r)
    head_chunks = tl.load(Table + 2 * programs + kv_heads + g)
    region = tl.load(RegionStart + g)
    sink_cap = tl.load(SinkCap + g)
    ring_cap = tl.load(RingCap + g)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    heads = g * GROUP + offs_h
    sink_h = tl.load(Sink + heads, mask=h_ok, other=0).to(tl.int32)
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    n = tl.load(Length + b).to(tl.int32)
    win_h = tl.load(Window + b * stride_wb + heads * stride_wh, mask=h_ok, other=0).to(tl.int32)
    # stored tokens worth reading: the sink part, then the ring from the group's widest window on (never more than
    # the ring holds); stored index u < n_sink is slot u, u >= n_sink is token ring_lo + u - n_sink
    n_sink = tl.minimum(n, sink_cap)
    ring_lo = tl.maximum(tl.maximum(sink_cap, n - tl.max(win_h, axis=0)), n - ring_cap)
    n_ring = tl.minimum(tl.maximum(n - ring_lo, 0), ring_cap)
    t0 = c * chunk_tokens
    t1 = tl.minimum(n_sink + n_ring, t0 + chunk_tokens)
    ring = tl.maximum(ring_cap, 1)
    ring_first = (ring_lo - sink_cap) % ring  # ring position of token ring_lo: one modulo per program, not per key

    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    # 64-bit row and region base once; offsets inside a region stay 32-bit in the loop
    k_base = K + b.to(tl.int64) * stride_kb + region.to(tl.int64) * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + region.to(tl.int64) * stride_vn
    m_i = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    log2e: tl.constexpr = 1.4426950408889634
    for t in range(t0, t1, BLOCK_N):
        offs_t = t + tl.arange(0, BLOCK_N)
        in_range = offs_t < t1
        in_sink_part = offs_t < n_sink
        pos = ring_first + offs_t - n_sink
        pos = tl.where(pos >= ring, pos - ring, pos)
        slot = tl.where(in_sink_part, offs_t, sink_cap + pos)
        j = tl.where(in_sink_part, offs_t, ring_lo + offs_t - n_sink)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if HAS_SOFTCAP:  # tanh(x) = 2 sigmoid(2x) - 1
            qk = softcap * (2.0 * tl.sigmoid(2.0 * qk / softcap) - 1.0)
        visible = in_range[None, :] & ((j[None, :] < sink_h[:, None]) | (n - 1 - j[None, :] < win_h[:, None]))
        qk = tl.where(visible, qk * log2e, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(qk - m_use[:, None])
        corr = tl.exp2(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if head_chunks == 1:
        o_ptrs = Out + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=h_ok[:, None])
    else:  # OPart: [batch, programs, GROUP, HEAD_DIM] partial outputs; LsePart: [batch, programs, GROUP] (log2)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -float("inf"))
        row = (b * programs + r) * GROUP + offs_h
        tl.store(OPart + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=h_ok[:, None])
        tl.store(LsePart + row, lse, mask=h_ok)
        if FUSED_MERGE:
            # every thread's partial stores come before the counter's release (one thread does the atomic); the
            # acquire makes the other programs' partials visible to the one that arrives last
            tl.debug_barrier()
            counter = Arrived + b * kv_heads + g
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == head_chunks - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next launch: no program of this one is left
                first = tl.load(Table + 2 * programs + g)
                _merge_partials(
                    OPart, LsePart, Out, b, g, first, head_chunks, programs, stride_outb, stride_outh, 0, 0,
                    GROUP=GROUP, HEADS=GROUP_P2, HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, SPLITS=SPLITS,
                )  # fmt: skip


def _decode_merge(
    OPart, LsePart, Table, Out, stride_outb, stride_outh, kv_heads, programs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    """The merge as a second launch (``merge="separate"``): one program per (query head, row, BLOCK_D slice of the
    head dim) of a KV head cut into several chunks, so that many chunks merge in parallel. GDC: launched early,
    it reads the launch table, then waits until the chunk launch has finished and its partials are visible."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    g = h // GROUP
    first = tl.load(Table + 2 * programs + g)
    count = tl.load(Table + 2 * programs + kv_heads + g)
    if GDC:
        tl.extra.cuda.gdc_wait()
    if count > 1:
        _merge_partials(
            OPart, LsePart, Out, b, g, first, count, programs, stride_outb, stride_outh, h % GROUP,
            tl.program_id(2) * BLOCK_D, GROUP=GROUP, HEADS=1, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, SPLITS=SPLITS,
        )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the kernels, once per process (TRITON_INTERPRET is read here)."""
    triton = jit_helpers(globals(), _merge_partials)
    return SimpleNamespace(
        triton=triton, chunk=triton.jit(_decode_chunk), merge=triton.jit(_decode_merge), interpret=interpreting()
    )


@functools.lru_cache(maxsize=256)
def _layout_on_device(
    region_start: tuple[int, ...], sink_cap: tuple[int, ...], ring_cap: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, ...]:
    layout = torch.tensor([region_start, sink_cap, ring_cap], dtype=torch.int32, device=device)
    return layout[0], layout[1], layout[2]


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def decode_attention_triton(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    region_start: torch.Tensor | list[int],
    sink_cap: torch.Tensor | list[int],
    ring_cap: torch.Tensor | list[int],
    length: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    max_tokens: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    merge: str | None = None,
    launch: DecodeLaunch | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """The Triton kernel with the reference's arguments (runs on CPU tensors under TRITON_INTERPRET=1).

    The layout as lists lets each KV head get programs for its own capacity; as device tensors it needs
    ``max_tokens`` (the largest ``sink_cap + ring_cap``) and every head is sized for it. ``length`` and ``window`` may
    be int32 or int64. No host synchronisation and no value-dependent allocation: a CUDA graph can capture it once
    the same shape ran eagerly. ``block_n``, ``num_splits`` and ``merge`` go to :func:`decode_launch`; ``launch``
    overrides the cached launch plan (benchmarks). ``pdl``: programmatic dependent launch for both launches (None:
    where the GPU has it, sm_90+), so that each starts while the kernel before it drains. With it, the launch table,
    the layout and ``sink`` are read before waiting for the kernel before: they must not be written by it (the cache
    builds them once per plan); the lengths, windows, query and K/V are read after the wait.
    """
    kern = _triton_kernels()
    batch, q_heads, head_dim = q.shape
    kv_heads = len(region_start)
    if q_heads % kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}; head_dim {head_dim} a power of 2 >= 16")
    device = q.device
    if isinstance(region_start, torch.Tensor):
        if max_tokens is None:
            raise ValueError("pass max_tokens (the largest sink_cap + ring_cap) with a layout given as tensors")
        capacity = (max_tokens,) * kv_heads
        layout = (region_start, sink_cap, ring_cap)
    else:
        capacity = tuple(s + r for s, r in zip(sink_cap, ring_cap))
        layout = _layout_on_device(tuple(region_start), tuple(sink_cap), tuple(ring_cap), device)
    launch = launch or decode_launch(batch, capacity, device, block_n, num_splits, merge=merge)
    group = q_heads // kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_buf = k_buf if k_buf.stride(-1) == 1 else k_buf.contiguous()
    v_buf = v_buf if v_buf.stride(-1) == 1 else v_buf.contiguous()
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=device)
    programs = launch.programs
    if launch.arrived.numel() != batch * kv_heads or len(launch.chunks_per_head) != kv_heads:
        raise ValueError(f"the launch plan was built for other shapes than batch {batch} x {kv_heads} KV heads")
    if launch.needs_merge:  # partial outputs, then their lse, in one buffer
        parts = batch * programs * group
        scratch = torch.empty(parts * (head_dim + 1), dtype=torch.float32, device=device)
        o_part, lse_part = scratch[: parts * head_dim], scratch[parts * head_dim :]
    else:
        o_part = lse_part = out  # not read
    pdl = pdl_available(q) if pdl is None else pdl
    pdl_launch = {"launch_pdl": True} if pdl else {}
    kern.chunk[(programs, batch)](
        q, k_buf, v_buf, *layout, launch.table, length, sink, window, out, o_part, lse_part, launch.arrived,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        window.stride(0), window.stride(1), out.stride(0), out.stride(1),
        kv_heads, programs, launch.chunk_tokens, float(head_dim**-0.5 if scale is None else scale), float(softcap or 1.0),
        BLOCK_H=max(16, next_pow2(group)), BLOCK_N=launch.block_n, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FUSED_MERGE=launch.fused_merge,
        GROUP=group, HEAD_DIM=head_dim, GROUP_P2=next_pow2(group), SPLITS=launch.fused_merge_splits(group, head_dim),
        GDC=pdl, num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_launch,
    )  # fmt: skip
    if launch.needs_merge and not launch.fused_merge:
        splits, block_d = launch.separate_merge_tiles(head_dim)
        kern.merge[(q_heads, batch, head_dim // block_d)](
            o_part, lse_part, launch.table, out, out.stride(0), out.stride(1), kv_heads, programs,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits, GDC=pdl, num_warps=4, **pdl_launch,
        )  # fmt: skip
    return out


def unsupported_reason(q: torch.Tensor, k_buf: torch.Tensor) -> str | None:
    """Why :func:`decode_attention` would run the reference instead of the kernel, or None."""
    if q.device.type != "cuda":
        return f"the tensors are on {q.device.type}, not CUDA"
    if not triton_available():
        return "triton is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_buf.dtype != q.dtype:
        return f"dtype {q.dtype} (cache {k_buf.dtype})"
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head dim {d} is not a power of two >= 16"
    return None


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    region_start: list[int],
    sink_cap: list[int],
    ring_cap: list[int],
    length: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention for the cache: the Triton kernel on CUDA, the reference elsewhere.

    Shapes as :func:`decode_attention_reference`. The layout's device copy and the launch plan are built once per
    shape and cached, so a step makes no copies.
    """
    if unsupported_reason(q, k_buf) is not None:
        return decode_attention_reference(
            q, k_buf, v_buf, region_start=region_start, sink_cap=sink_cap, ring_cap=ring_cap, length=length,
            sink=sink, window=window, scale=scale, softcap=softcap,
        )  # fmt: skip
    return decode_attention_triton(
        q, k_buf, v_buf, region_start=region_start, sink_cap=sink_cap, ring_cap=ring_cap, length=length, sink=sink,
        window=window, scale=scale, softcap=softcap,
    )  # fmt: skip
