"""Decode attention over a per-KV-head sink + ring cache: split-K (flash-decoding) in Triton, and its reference.

The cache layout (built by ``compressor.cache``) is one flat ragged buffer per layer and per K/V:
``k_buf, v_buf: [batch, slots, head_dim]``. KV head ``g`` owns slots ``[region_start[g], region_start[g] +
sink_cap[g] + ring_cap[g])``: its first ``sink_cap[g]`` slots hold the row's first valid tokens (token ``j`` in slot
``j``), the next ``ring_cap[g]`` slots are a ring holding token ``j >= sink_cap`` at ``sink_cap + (j - sink_cap) %
ring_cap``. A dense head has ``sink_cap = max_length, ring_cap = 0``.

Semantics (the reference below is the spec): one query per row, the row's newest token ``N - 1`` with
``N = length[b]``. Query head ``h`` (KV head ``h // group``) sees stored token ``j`` when ``j < sink[h]`` or
``N - 1 - j < window[b, h]``. A row with nothing visible returns zeros.

The kernel: one program per (row, KV head, split) loads each K/V tile once for all query heads of its GQA group
(``tl.dot`` of a ``[BLOCK_H, D]`` query tile), an online softmax over its share of the stored tokens, and writes a
partial result with its log-sum-exp; a second kernel merges the splits per query head. Triton is imported on first
use; this module imports nothing else of compressor.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from compressor.kernels.triton_support import interpreting, triton_available

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


def _decode_split(
    Q, K, V, RegionStart, SinkCap, RingCap, Length, Sink, Window, OPart, LsePart,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn, stride_wb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    kv_heads, split_size, scale, softcap,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (row, KV head, split): online softmax of the group's query heads over a slice of the stored tokens."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // kv_heads
    g = pid % kv_heads
    n = tl.load(Length + b).to(tl.int32)
    region = tl.load(RegionStart + g)
    sink_cap = tl.load(SinkCap + g)
    ring_cap = tl.load(RingCap + g)

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    heads = g * GROUP + offs_h
    sink_h = tl.load(Sink + heads, mask=h_ok, other=0)
    win_h = tl.load(Window + b * stride_wb + heads, mask=h_ok, other=0)
    w_max = tl.max(win_h, axis=0)
    # stored tokens worth reading: the sink part, then the ring from the group's widest window on
    n_sink = tl.minimum(n, sink_cap)
    ring_lo = tl.maximum(sink_cap, n - w_max)
    n_ring = tl.minimum(tl.maximum(n - ring_lo, 0), ring_cap)
    total = n_sink + n_ring
    t0 = split * split_size
    t1 = tl.minimum(total, t0 + split_size)

    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    log2e: tl.constexpr = 1.4426950408889634
    ring = tl.maximum(ring_cap, 1)
    for t in range(t0, t1, BLOCK_N):
        offs_t = t + tl.arange(0, BLOCK_N)
        in_range = offs_t < t1
        in_sink_part = offs_t < n_sink
        j = tl.where(in_sink_part, offs_t, ring_lo + offs_t - n_sink)
        slot = tl.where(in_sink_part, offs_t, sink_cap + (j - sink_cap) % ring)
        rows = (region + slot).to(tl.int64)
        k = tl.load(K + b * stride_kb + rows[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + rows[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
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
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -float("inf"))  # log2 domain
    o_ptrs = OPart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out, mask=h_ok[:, None])
    tl.store(LsePart + b * stride_lb + heads * stride_lh + split, lse, mask=h_ok)


def _decode_merge(
    OPart, LsePart, Out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    q_heads, num_splits,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One (row, query head): weight each split's partial output by its share of the softmax mass."""
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    offs_s = tl.arange(0, SPLITS)
    s_ok = offs_s < num_splits
    lse = tl.load(LsePart + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=-float("inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == -float("inf"), 0.0, m)
    w = tl.where(s_ok, tl.exp2(lse - m_use), 0.0)
    denom = tl.sum(w, axis=0)
    offs_d = tl.arange(0, HEAD_DIM)
    parts = tl.load(
        OPart + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=s_ok[:, None] & (w[:, None] > 0), other=0.0,
    )
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d, out.to(Out.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the kernels, once per process (TRITON_INTERPRET is read here)."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    return SimpleNamespace(
        triton=triton, split=triton.jit(_decode_split), merge=triton.jit(_decode_merge), interpret=interpreting()
    )



@functools.lru_cache(maxsize=None)
def _program_target(device_index: int) -> int:
    """Programs worth launching to fill the GPU: two per SM."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _as_int32(x: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32)
    return torch.tensor(x, dtype=torch.int32, device=device)


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
    max_tokens: int,
    scale: float | None = None,
    softcap: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The Triton kernel with the reference's arguments (runs on CPU tensors under TRITON_INTERPRET=1).

    ``max_tokens``: the largest ``sink_cap + ring_cap`` (known to the caller; keeps the launch free of host syncs).
    """
    kern = _triton_kernels()
    batch, q_heads, head_dim = q.shape
    kv_heads = len(region_start)
    group = q_heads // kv_heads
    if q_heads % kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}; head_dim {head_dim} a power of 2 >= 16")
    device = q.device
    q = q.contiguous()
    k_buf, v_buf = k_buf.contiguous(), v_buf.contiguous()
    window = window.to(device=device, dtype=torch.int32).contiguous()
    block_n = block_n or (16 if kern.interpret else 64)
    tiles = max(1, -(-max_tokens // block_n))
    if num_splits is None:
        target = 4 if device.type != "cuda" else _program_target(device.index or 0)
        num_splits = min(tiles, max(1, -(-target // (batch * kv_heads))), 64)
    split_tiles = -(-tiles // num_splits)
    num_splits = -(-tiles // split_tiles)
    o_part = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    lse_part = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=device)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    kern.split[(batch * kv_heads, num_splits)](
        q, k_buf, v_buf,
        _as_int32(region_start, device), _as_int32(sink_cap, device), _as_int32(ring_cap, device),
        length.to(device=device, dtype=torch.int32), _as_int32(sink, device), window, o_part, lse_part,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), window.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        kv_heads, split_tiles * block_n, float(head_dim**-0.5 if scale is None else scale), float(softcap or 1.0),
        GROUP=group, BLOCK_H=max(16, triton_next_pow2(group)), HEAD_DIM=head_dim, BLOCK_N=block_n,
        HAS_SOFTCAP=softcap is not None, DOT_PRECISION=precision, num_warps=4, num_stages=2,
    )  # fmt: skip
    kern.merge[(batch * q_heads,)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), q_heads, num_splits,
        SPLITS=max(2, triton_next_pow2(num_splits)), HEAD_DIM=head_dim, num_warps=4,
    )  # fmt: skip
    return out


def triton_next_pow2(x: int) -> int:
    """Smallest power of two >= x."""
    return 1 << max(0, int(x) - 1).bit_length()


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
    device_meta: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention for the cache: the Triton kernel on CUDA, the reference elsewhere.

    Shapes as :func:`decode_attention_reference`; ``device_meta`` may carry ``region_start``, ``sink_cap`` and
    ``ring_cap`` already on the device (int32), so that a decode step makes no host-to-device copies.
    """
    if unsupported_reason(q, k_buf) is not None:
        return decode_attention_reference(
            q, k_buf, v_buf, region_start=region_start, sink_cap=sink_cap, ring_cap=ring_cap, length=length,
            sink=sink, window=window, scale=scale, softcap=softcap,
        )  # fmt: skip
    meta = device_meta or {}
    return decode_attention_triton(
        q, k_buf, v_buf,
        region_start=meta.get("region_start", region_start), sink_cap=meta.get("sink_cap", sink_cap),
        ring_cap=meta.get("ring_cap", ring_cap), length=length, sink=sink, window=window,
        max_tokens=max(s + r for s, r in zip(sink_cap, ring_cap)), scale=scale, softcap=softcap,
    )  # fmt: skip
