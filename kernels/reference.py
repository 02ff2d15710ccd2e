"""Plain-PyTorch reference attention: dense and per-head sink + sliding window.

This is the spec the Triton kernels are tested against, and the path that runs where Triton cannot.

Conventions shared by every attention kernel in this package:
- ``q: [batch, q_heads, q_tokens, head_dim]``, ``k, v: [batch, kv_heads, kv_tokens, head_dim]``; q_heads is a
  multiple of kv_heads (GQA). K/V are never repeated in memory: query heads are grouped instead.
- Queries are the last ``q_tokens`` entries of the key sequence: query ``i`` sits at key index
  ``kv_tokens - q_tokens + i`` (prefill with a KV prefix, chunked prefill and decode all follow this).
- Per batch row, the valid keys are ``[kv_start[b], kv_end[b])`` (left or right padding). The row's length is
  ``N = kv_end - kv_start``; sink tokens are the first ``sink[h]`` valid keys.
- Per query head ``h``: ``window = clamp(floor(alpha[h] + beta[h] * N), 1, N)``; a key at distance
  ``d = q_index - k_index`` is visible when ``0 <= d < window`` (causal) or ``|d| < window`` (not causal), or when it
  is a sink. A dense head has ``alpha = inf`` (see :func:`dense_heads`).
- A query with no visible key returns zeros, never NaN.
"""

from __future__ import annotations

import math

import torch

DENSE_ALPHA = math.inf


def dense_heads(num_heads: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sink, alpha, beta) for ``num_heads`` dense heads."""
    return (
        torch.zeros(num_heads, dtype=torch.int32, device=device),
        torch.full((num_heads,), DENSE_ALPHA, dtype=torch.float32, device=device),
        torch.zeros(num_heads, dtype=torch.float32, device=device),
    )


def window_sizes(alpha: torch.Tensor, beta: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Window per (batch row, head): ``clamp(floor(alpha + beta * N), 1, N)``; float32 math, as in the kernels.

    alpha, beta: [heads]; length: [batch] -> [batch, heads] int64.
    """
    n = length.to(torch.float32)[:, None]
    raw = torch.floor(alpha.to(torch.float32)[None, :] + beta.to(torch.float32)[None, :] * n)
    raw = torch.where(torch.isfinite(raw), raw, n)
    return torch.minimum(torch.clamp(raw, min=1.0), n).to(torch.int64)


def _row_bounds(
    batch: int, kv_tokens: int, kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.zeros(batch, dtype=torch.int64, device=device) if kv_start is None else kv_start.to(device, torch.int64)
    end = torch.full((batch,), kv_tokens, dtype=torch.int64, device=device) if kv_end is None else kv_end.to(device, torch.int64)
    return start, end


def visible_mask(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    *,
    sink: torch.Tensor,
    window: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Boolean visibility [batch, heads, q, k] for the given absolute query and key indices.

    q_index: [q]; k_index: [k]; sink: [heads]; window: [batch, heads]; kv_start, kv_end: [batch].
    """
    d = q_index[:, None] - k_index[None, :]  # [q, k]
    d = d[None, None]
    w = window[:, :, None, None]
    near = (d >= 0) & (d < w) if causal else d.abs() < w
    kk = k_index[None, None, None, :]
    start = kv_start[:, None, None, None]
    end = kv_end[:, None, None, None]
    valid = (kk >= start) & (kk < end)
    in_sink = kk < start + sink.to(kk.device, torch.int64)[None, :, None, None]
    if causal:
        in_sink = in_sink & (d >= 0)
    return (near | in_sink) & valid


def sparse_attention_reference(
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
    softcap: float | None = None,
    q_chunk: int = 512,
) -> torch.Tensor:
    """Attention with per-head sink + window patterns, chunked over queries.

    q: [batch, q_heads, q_tokens, head_dim]; k, v: [batch, kv_heads, kv_tokens, head_dim];
    sink/alpha/beta: [q_heads] (default: dense). Returns [batch, q_heads, q_tokens, head_dim_v] in q's dtype.
    Each chunk of queries reads only the keys its widest window can reach plus the sinks, so memory grows with
    ``chunk * (chunk + window)``, not with the square of the length. Math is done in float32.
    ``softcap`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)`` before masking.
    """
    batch, q_heads, q_tokens, head_dim = q.shape
    _, kv_heads, kv_tokens, _ = k.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    device = q.device
    if sink is None or alpha is None or beta is None:
        sink, alpha, beta = dense_heads(q_heads, device)
    scale = head_dim**-0.5 if scale is None else scale
    start, end = _row_bounds(batch, kv_tokens, kv_start, kv_end, device)
    window = window_sizes(alpha.to(device), beta.to(device), end - start)  # [batch, heads]
    sink = sink.to(device, torch.int64)
    max_window = int(window.max().item()) if window.numel() else 0
    max_sink = int(sink.max().item()) if sink.numel() else 0
    q_offset = kv_tokens - q_tokens

    qf = q.float().view(batch, kv_heads, group, q_tokens, head_dim)
    kf, vf = k.float(), v.float()
    out = torch.zeros(batch, kv_heads, group, q_tokens, v.shape[-1], dtype=torch.float32, device=device)
    sink_hi = min(kv_tokens, int(start.max().item()) + max_sink)  # every sink key lies below this index
    for c0 in range(0, q_tokens, q_chunk):
        c1 = min(q_tokens, c0 + q_chunk)
        q_index = torch.arange(c0, c1, device=device) + q_offset
        if causal:
            lo, hi = max(0, c0 + q_offset - max_window + 1), c1 + q_offset
        else:
            lo, hi = max(0, c0 + q_offset - max_window + 1), min(kv_tokens, c1 + q_offset + max_window - 1)
        spans = [torch.arange(0, min(sink_hi, lo), device=device), torch.arange(lo, hi, device=device)]
        k_index = torch.cat(spans)
        if k_index.numel() == 0:
            continue
        mask = visible_mask(q_index, k_index, sink=sink, window=window, kv_start=start, kv_end=end, causal=causal)
        mask = mask.view(batch, kv_heads, group, c1 - c0, -1)
        kc = kf[:, :, k_index][:, :, None]  # [batch, kv_heads, 1, k, d]: broadcast over the group, no copy per head
        vc = vf[:, :, k_index][:, :, None]
        scores = torch.matmul(qf[:, :, :, c0:c1], kc.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, -math.inf)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        out[:, :, :, c0:c1] = torch.matmul(p, vc) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.view(batch, q_heads, q_tokens, -1).to(q.dtype)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Materialised masked softmax attention in float32, the oracle for the oracle (tests only).

    mask: boolean, broadcastable to [batch, q_heads, q, k]; fully masked rows give zeros.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, vf).to(q.dtype)


def block_list_allowed(block_index: torch.Tensor, block_count: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """Boolean [batch, heads, n_q_blocks, n_kv_blocks]: key block j is listed for query block i.

    block_index: int [batch, heads, n_q_blocks, max_kv_blocks], of which the first ``block_count[b, h, i]`` entries
    count; indices outside [0, n_kv_blocks) are ignored.
    """
    listed = block_index.to(torch.int64)
    used = torch.arange(listed.shape[-1], device=listed.device) < block_count.to(listed.device, torch.int64)[..., None]
    used = used & (listed >= 0) & (listed < n_kv_blocks)
    allowed = torch.zeros(*listed.shape[:-1], n_kv_blocks + 1, dtype=torch.bool, device=listed.device)
    allowed.scatter_(-1, torch.where(used, listed, n_kv_blocks), True)  # unused entries land in the spare column
    return allowed[..., :n_kv_blocks]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    sink: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_chunk: int = 256,
) -> torch.Tensor:
    """Attention restricted to listed blocks: query block i (rows [i*bs, (i+1)*bs) of this call) sees the keys of
    its listed key blocks j (keys [j*bs, (j+1)*bs)), intersected with the token-level rule of
    :func:`sparse_attention_reference` (validity, causality, and sink + window; dense heads by default).

    block_index: int [batch, q_heads, cdiv(q_tokens, bs), max_kv_blocks]; block_count: int [batch, q_heads,
    cdiv(q_tokens, bs)]. Shapes and result as :func:`sparse_attention_reference`; math in float32.
    """
    batch, q_heads, q_tokens, head_dim = q.shape
    _, kv_heads, kv_tokens, _ = k.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    n_q_blocks = -(-q_tokens // block_size)
    if tuple(block_index.shape[:3]) != (batch, q_heads, n_q_blocks) or tuple(block_count.shape) != (
        batch,
        q_heads,
        n_q_blocks,
    ):
        raise ValueError(
            f"block_index must be [{batch}, {q_heads}, {n_q_blocks}, *] and block_count [{batch}, {q_heads}, "
            f"{n_q_blocks}] for {q_tokens} queries in blocks of {block_size}; got {list(block_index.shape)}, "
            f"{list(block_count.shape)}"
        )
    group = q_heads // kv_heads
    device = q.device
    if sink is None or alpha is None or beta is None:
        sink, alpha, beta = dense_heads(q_heads, device)
    scale = head_dim**-0.5 if scale is None else scale
    start, end = _row_bounds(batch, kv_tokens, kv_start, kv_end, device)
    window = window_sizes(alpha.to(device), beta.to(device), end - start)
    sink = sink.to(device, torch.int64)
    n_kv_blocks = -(-kv_tokens // block_size)
    allowed = block_list_allowed(block_index.to(device), block_count.to(device), n_kv_blocks)
    q_offset = kv_tokens - q_tokens
    k_index = torch.arange(kv_tokens, device=device)

    qf = q.float().view(batch, kv_heads, group, q_tokens, head_dim)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    out = torch.zeros(batch, kv_heads, group, q_tokens, v.shape[-1], dtype=torch.float32, device=device)
    chunk = max(1, q_chunk // block_size) * block_size  # whole query blocks per chunk
    for c0 in range(0, q_tokens, chunk):
        c1 = min(q_tokens, c0 + chunk)
        q_index = torch.arange(c0, c1, device=device) + q_offset
        mask = visible_mask(q_index, k_index, sink=sink, window=window, kv_start=start, kv_end=end, causal=causal)
        listed = allowed[:, :, c0 // block_size : -(-c1 // block_size)]
        listed = listed.repeat_interleave(block_size, dim=2)[:, :, : c1 - c0]
        listed = listed.repeat_interleave(block_size, dim=3)[..., :kv_tokens]
        mask = (mask & listed).view(batch, kv_heads, group, c1 - c0, kv_tokens)
        scores = torch.matmul(qf[:, :, :, c0:c1], kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, -math.inf)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        out[:, :, :, c0:c1] = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.view(batch, q_heads, q_tokens, -1).to(q.dtype)
