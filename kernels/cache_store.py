"""One decode step's writes to the plan cache (``compressor.cache``), fused: the new token's K and V into each KV
head's sink or ring slot, the rows' valid lengths advanced, and the windows per (row, query head) at the new lengths.

The cache layout is the one of ``kernels/decode_attention.py``: ``keys, values: [max_batch, slots, head_dim]``; KV
head ``g`` holds token ``j`` at ``region_start[g] + j`` while ``j < sink_cap[g]``, then in a ring at
``region_start[g] + sink_cap[g] + (j - sink_cap[g]) % ring_cap[g]``. A row whose new token is padding
(``valid[b] == 0``) keeps its slots and its length. The reference below is the spec; the Triton kernel does the same
in one launch (one program per row), where the torch version takes about thirty small launches, which cost more
than the attention kernel in a CUDA-graph decode step. Triton is imported on first use.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from compressor.kernels.reference import window_sizes
from compressor.kernels.triton_support import interpreting, next_pow2, triton_available

tl = None  # triton.language, bound by _triton_kernels() on first use


# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------------------------


def store_decode_token_reference(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    region_start: torch.Tensor,
    sink_cap: torch.Tensor,
    ring_cap: torch.Tensor,
    length: torch.Tensor,
    valid: torch.Tensor | None,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    sliding: int | None,
    window_out: torch.Tensor,
) -> None:
    """Store one token per row in place and advance ``length``; write the windows at the new lengths.

    keys, values: [max_batch, slots, dim]; k_new, v_new: [batch, kv_heads, 1, dim]; region_start, sink_cap, ring_cap:
    [kv_heads] int; length: [batch] int64; valid: [batch] (nonzero = a real token) or None (all real); alpha, beta:
    [q_heads]; window_out: [>= batch, q_heads] int32 (or int64), rows ``:batch`` written. No host synchronisation.
    """
    batch = k_new.shape[0]
    start, s_cap, r_cap = (t.to(torch.int64) for t in (region_start, sink_cap, ring_cap))
    token = length.to(torch.int64)[:, None]  # [batch, 1] the new token's index per row
    ring = torch.where(r_cap > 0, r_cap, torch.ones_like(r_cap))
    slot = start + torch.where(token < s_cap, token, s_cap + (token - s_cap) % ring)  # [batch, kv_heads]
    rows = torch.arange(batch, device=keys.device)[:, None]
    keep = torch.ones(batch, dtype=torch.bool, device=keys.device) if valid is None else valid.to(keys.device, torch.bool)
    keys[rows, slot] = torch.where(keep[:, None, None], k_new[:, :, 0], keys[rows, slot])
    values[rows, slot] = torch.where(keep[:, None, None], v_new[:, :, 0], values[rows, slot])
    length.add_(keep.to(length.dtype))  # in place: a CUDA graph of this step advances the same tensor
    window = window_sizes(alpha, beta, length)
    window_out[:batch].copy_(window.clamp(max=sliding) if sliding else window)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel (plain Python until _triton_kernels wraps it with triton.jit and binds `tl`)
# ---------------------------------------------------------------------------------------------------------------


def _store_decode_token(
    Keys, Values, KNew, VNew, RegionStart, SinkCap, RingCap, Length, Valid, Alpha, Beta, WindowOut,
    stride_keys_b, stride_keys_n, stride_values_b, stride_values_n, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_valid, stride_wb, kv_heads, q_heads, key_dim, value_dim, sliding,
    HAS_VALID: tl.constexpr, HAS_SLIDING: tl.constexpr, KV_HEADS_P2: tl.constexpr, Q_HEADS_P2: tl.constexpr,
    KEY_DIM_P2: tl.constexpr, VALUE_DIM_P2: tl.constexpr,
):  # fmt: skip
    """One row: its new K and V into every KV head's slot for token ``length[b]``, the length advanced, the windows.
    One program per row, so that reading the old length and writing the new one cannot race."""
    b = tl.program_id(0)
    n = tl.load(Length + b).to(tl.int64)
    offs_g = tl.arange(0, KV_HEADS_P2)
    g_ok = offs_g < kv_heads
    real = 1
    if HAS_VALID:
        real = (tl.load(Valid + b * stride_valid) != 0).to(tl.int32)
    write = g_ok & (offs_g * 0 + real != 0)  # KV heads to write: all, or none for a padding token
    start = tl.load(RegionStart + offs_g, mask=g_ok, other=0).to(tl.int64)
    s_cap = tl.load(SinkCap + offs_g, mask=g_ok, other=0).to(tl.int64)
    r_cap = tl.load(RingCap + offs_g, mask=g_ok, other=0).to(tl.int64)
    ring = tl.maximum(r_cap, 1)
    slot = start + tl.where(n < s_cap, n, s_cap + (n - s_cap) % ring)  # [KV_HEADS_P2]

    b64 = b.to(tl.int64)
    offs_k = tl.arange(0, KEY_DIM_P2)
    k_ok = g_ok[:, None] & (offs_k < key_dim)[None, :]
    k = tl.load(KNew + b64 * stride_kb + offs_g[:, None] * stride_kh + offs_k[None, :], mask=k_ok)
    k_dst = Keys + b64 * stride_keys_b + slot[:, None] * stride_keys_n + offs_k[None, :]
    tl.store(k_dst, k, mask=k_ok & write[:, None])
    offs_v = tl.arange(0, VALUE_DIM_P2)
    v_ok = g_ok[:, None] & (offs_v < value_dim)[None, :]
    v = tl.load(VNew + b64 * stride_vb + offs_g[:, None] * stride_vh + offs_v[None, :], mask=v_ok)
    v_dst = Values + b64 * stride_values_b + slot[:, None] * stride_values_n + offs_v[None, :]
    tl.store(v_dst, v, mask=v_ok & write[:, None])

    n_new = n + real
    tl.store(Length + b, n_new.to(Length.dtype.element_ty))
    # window_sizes' float32 math: clamp(floor(alpha + beta * N), 1, N), N where it is not finite
    offs_h = tl.arange(0, Q_HEADS_P2)
    h_ok = offs_h < q_heads
    nf = n_new.to(tl.float32)
    raw = tl.math.floor(tl.load(Alpha + offs_h, mask=h_ok, other=0.0) + tl.load(Beta + offs_h, mask=h_ok, other=0.0) * nf)
    finite = (raw == raw) & (raw < float("inf")) & (raw > -float("inf"))
    w = tl.minimum(tl.maximum(tl.where(finite, raw, nf), 1.0), nf).to(tl.int64)
    if HAS_SLIDING:
        w = tl.minimum(w, sliding)
    tl.store(WindowOut + b64 * stride_wb + offs_h, w.to(WindowOut.dtype.element_ty), mask=h_ok)


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the kernel, once per process (TRITON_INTERPRET is read here)."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    return SimpleNamespace(store=triton.jit(_store_decode_token), interpret=interpreting())


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def store_decode_token_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    region_start: torch.Tensor,
    sink_cap: torch.Tensor,
    ring_cap: torch.Tensor,
    length: torch.Tensor,
    valid: torch.Tensor | None,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    sliding: int | None,
    window_out: torch.Tensor,
) -> None:
    """The Triton kernel with the reference's arguments, one launch (CPU tensors under TRITON_INTERPRET=1).

    ``valid`` may be any integer or bool column (a view of the padding mask's last column: no copy), on the
    buffers' device. No host synchronisation and no allocation: a CUDA graph can capture it.
    """
    kern = _triton_kernels()
    batch, kv_heads, tokens, key_dim = k_new.shape
    value_dim = v_new.shape[-1]
    if tokens != 1 or v_new.shape[:3] != k_new.shape[:3]:
        raise ValueError(f"one new token per row: k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("the buffers and the new K/V must be contiguous in their last dimension")
    if length.dtype != torch.int64 or window_out.stride(-1) != 1:
        raise ValueError(f"length must be int64 (got {length.dtype}) and window_out contiguous per row")
    q_heads = alpha.shape[0]
    valid_arg = length if valid is None else (valid.view(torch.uint8) if valid.dtype == torch.bool else valid)
    kern.store[(batch,)](
        keys, values, k_new, v_new, region_start, sink_cap, ring_cap, length, valid_arg, alpha, beta, window_out,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), 0 if valid is None else valid.stride(0), window_out.stride(0),
        kv_heads, q_heads, key_dim, value_dim, int(sliding or 0),
        HAS_VALID=valid is not None, HAS_SLIDING=bool(sliding), KV_HEADS_P2=next_pow2(kv_heads),
        Q_HEADS_P2=next_pow2(q_heads), KEY_DIM_P2=next_pow2(key_dim), VALUE_DIM_P2=next_pow2(value_dim), num_warps=4,
        enable_fp_fusion=False,  # alpha + beta * N rounded as window_sizes rounds it (no FMA)
    )  # fmt: skip


def store_decode_token(keys: torch.Tensor, values: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, **kwargs) -> None:
    """One decode step's cache writes: the Triton kernel on CUDA, the reference elsewhere (arguments as
    :func:`store_decode_token_reference`)."""
    valid = kwargs.get("valid")
    on_cuda = keys.device.type == "cuda" and (valid is None or valid.device == keys.device)
    if on_cuda and triton_available() and kwargs["length"].dtype == torch.int64:
        store_decode_token_triton(keys, values, k_new, v_new, **kwargs)
    else:
        store_decode_token_reference(keys, values, k_new, v_new, **kwargs)
