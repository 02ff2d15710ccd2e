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

Quantization is two passes: a PyTorch reduction for K's channel means and V's channel maxima, then one fused
Triton kernel quantizing Q, K and V blocks (smoothing + scales). The attention kernel iterates key blocks exactly
as :mod:`.sparse_attention` does (per-head sink + window from alpha/beta and the row length, or block lists), with
GQA, per-row padding and queries at an offset. :func:`sage_attention_reference` quantizes and dequantizes as the
kernels do; :mod:`.reference` stays the float spec. Triton is imported on first use.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from compressor.kernels.triton_support import interpreting, require_launchable

from . import sparse_attention as sa
from .reference import block_list_allowed, dense_heads, visible_mask, window_sizes

# helpers both kernels share (jitted in _triton_kernels()): row bounds + window, the key-block ranges visited, and
# the token-level mask of boundary blocks
_row_window, _key_block_ranges, _listed_block_range = sa._row_window, sa._key_block_ranges, sa._listed_block_range
_masked_scores = sa._masked_scores

VARIANTS = (
    "int8-qk/fp8-pv", "int8-qk/fp8-pv+qsmooth", "int8-qk/fp16-pv", "int8-qk/fp16-pv+qsmooth", "bf16",
)  # fmt: skip
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn; P in [0, 1] is scaled by it
GPU_BLOCK_M, GPU_BLOCK_N = 128, 64  # SageAttention's quantization granularity (the references' default)
# The kernel's tiles on a GPU, which are also the quantization blocks: (block_m, block_n, num_warps) per P V precision,
# the fastest of a sweep on an H200 at 16k, D=128 (`scripts/bench_sage_attention.py --sweep 16384`)
GPU_TILES = {"fp8": (64, 64, 4), "fp16": (128, 64, 4)}

tl = None  # triton.language, bound by _triton_kernels()


@dataclass(frozen=True)
class Variant:
    """A parsed variant name: ``pv`` is "fp8" or "fp16"; ``quantized`` False means bf16 (plain sparse kernel)."""

    name: str
    quantized: bool
    pv: str
    qsmooth: bool


def parse_variant(name: str) -> Variant:
    """Parse one of :data:`VARIANTS`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown attention quantization variant {name!r}; choose one of {', '.join(VARIANTS)}")
    if name == "bf16":
        return Variant(name, False, "bf16", False)
    return Variant(name, True, "fp8" if "fp8-pv" in name else "fp16", name.endswith("+qsmooth"))


# ---------------------------------------------------------------------------------------------------------------
# Quantization: the PyTorch reference (also the spec of the fused Triton kernel)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizedQKV:
    """Quantized attention inputs. q: int8 [B, H, Nq, D], q_scale [B, H, nQb], q_mean [B, H, nQb, D] (qsmooth);
    k: int8 [B, Hkv, Nk, D] (smoothed), k_scale [B, Hkv, nKb], k_mean [B, Hkv, D]; v: V's 16-bit dtype
    [B, Hkv, Nk, D], or fp8 e4m3 transposed [B, Hkv, D, Nk_padded] with v_scale [B, Hkv, D]."""

    q: torch.Tensor
    q_scale: torch.Tensor
    q_mean: torch.Tensor | None
    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    block_m: int
    block_n: int

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 (q with its block mean added back, smoothed k, v) as [B, heads, tokens, D]."""
        nq, nk = self.q.shape[2], self.k.shape[2]
        q = _per_block(self.q.float(), self.q_scale, self.block_m)
        if self.q_mean is not None:
            q = q + self.q_mean.repeat_interleave(self.block_m, dim=2)[:, :, :nq]
        k = _per_block(self.k.float(), self.k_scale, self.block_n)
        if self.v_scale is None:
            v = self.v.float()
        else:
            v = self.v[..., :nk].transpose(-1, -2).float() * self.v_scale[:, :, None, :]
        return q, k, v


def _per_block(x: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, H, N, D] times the scale of its token block: scale [B, H, cdiv(N, block)]."""
    return x * scale.repeat_interleave(block, dim=2)[:, :, : x.shape[2], None]


def _valid_keys(kv_start, kv_end, batch: int, kv_tokens: int, device) -> torch.Tensor | None:
    """Bool [B, 1, Nk, 1]: key j of row b lies in [kv_start[b], kv_end[b]); None when no bounds are given."""
    if kv_start is None and kv_end is None:
        return None
    start, end = sa._check_rows(kv_start, kv_end, batch, kv_tokens, device)
    j = torch.arange(kv_tokens, device=device)
    return ((j[None] >= start[:, None].long()) & (j[None] < end[:, None].long()))[:, None, :, None]


def key_stats(
    k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, pv_fp8: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass one: K's channel mean over valid keys [B, Hkv, D] and (FP8 P V) V's per-channel scale [B, Hkv, D].

    ``valid`` None means every key: then each statistic is one reduction kernel over K or V (no mask, no copy,
    no host sync)."""
    if valid is None:
        k_mean = k.mean(dim=2, dtype=torch.float32)
        v_abs = v
    else:
        count = valid.sum(dim=2).clamp(min=1).float()  # [B, 1, 1]
        k_mean = torch.where(valid, k.float(), 0.0).sum(dim=2) / count
        v_abs = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device))
    if not pv_fp8:
        return k_mean, None
    amax = torch.linalg.vector_norm(v_abs, ord=math.inf, dim=2).float()  # max |v| without an |v| copy
    return k_mean, torch.where(amax > 0, amax / FP8_MAX, 1.0)


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.floor(x + 0.5), -INT8_MAX, INT8_MAX).to(torch.int8)  # as the kernel: half up


def _block_scale(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 x, scale [B, H, nb]) with one symmetric scale per block of ``block`` tokens of x [B, H, N, D]."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    blocks = F.pad(x, (0, 0, 0, nb * block - n)).reshape(b, h, nb, block * d)
    amax = blocks.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, 1.0)
    return _round_int8(x / scale.repeat_interleave(block, dim=2)[:, :, :n, None]), scale


def quantize_qkv_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str, kv_start=None, kv_end=None,
    block_m: int = GPU_BLOCK_M, block_n: int = GPU_BLOCK_N, smooth_k: bool = True,
) -> QuantizedQKV:  # fmt: skip
    """Quantize as the fused kernel does (PyTorch). q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D]; keys outside a row's
    valid range are zeroed so that they never set a scale. ``smooth_k=False`` (tests: shows what smoothing buys)
    keeps K's mean in K."""
    var = parse_variant(variant)
    if not var.quantized:
        raise ValueError("variant bf16 is not quantized")
    batch, _, nq, _ = q.shape
    nk = k.shape[2]
    valid = _valid_keys(kv_start, kv_end, batch, nk, q.device)
    k_mean, v_scale = key_stats(k, v, valid, var.pv == "fp8")
    if valid is None:
        valid = torch.ones((), dtype=torch.bool, device=q.device)
    if not smooth_k:
        k_mean = torch.zeros_like(k_mean)
    qf = q.float()
    q_mean = None
    if var.qsmooth:
        nb = -(-nq // block_m)
        rows = torch.arange(nb * block_m, device=q.device) < nq
        padded = F.pad(qf, (0, 0, 0, nb * block_m - nq)).reshape(*q.shape[:2], nb, block_m, -1)
        count = rows.view(nb, block_m).sum(-1).clamp(min=1)[None, None, :, None]
        q_mean = padded.sum(dim=3) / count
        qf = qf - q_mean.repeat_interleave(block_m, dim=2)[:, :, :nq]
    q8, q_scale = _block_scale(qf, block_m)
    ks = torch.where(valid, k.float() - k_mean[:, :, None, :], 0.0)
    k8, k_scale = _block_scale(ks, block_n)
    if var.pv == "fp8":
        vq = torch.where(valid, v.float() / v_scale[:, :, None, :], 0.0).to(torch.float8_e4m3fn)
        pad = -(-nk // block_n) * block_n - nk
        vq = F.pad(vq.transpose(-1, -2).view(torch.int8), (0, pad)).view(torch.float8_e4m3fn).contiguous()
    else:
        vq = v if v.dtype in (torch.float16, torch.bfloat16) else v.to(torch.float16)
    return QuantizedQKV(q8, q_scale, q_mean, k8, k_scale, k_mean, vq, v_scale, block_m, block_n)


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


def _quantize_q_block(
    Q, Q8, QScale, QMean, stride_qb, stride_qh, stride_qm, pid, q_heads, q_tokens, n_q_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, QSMOOTH: tl.constexpr,
):  # fmt: skip
    """Quantize Q block ``pid`` (optionally smoothed by its mean) to INT8 with one scale for the block."""
    offs_d = tl.arange(0, HEAD_DIM)
    blk = pid % n_q_blocks
    bh = pid // n_q_blocks
    b = bh // q_heads
    h = bh % q_heads
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < q_tokens
    base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    x = tl.load(base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    if QSMOOTH:
        count = tl.minimum(q_tokens - blk * BLOCK_M, BLOCK_M).to(tl.float32)
        mean = tl.sum(x, 0) / count
        tl.store(QMean + pid.to(tl.int64) * HEAD_DIM + offs_d, mean)
        x = tl.where(rows[:, None], x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    xq = tl.minimum(tl.maximum(tl.math.floor(x / scale + 0.5), -127.0), 127.0)
    tl.store(QScale + pid, scale)
    out = Q8 + bh.to(tl.int64) * q_tokens * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out, xq.to(tl.int8), mask=rows[:, None])


def _quantize_kv_block(
    K, V, K8, KScale, KMean, V8, VScale, KvStart, KvEnd, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
    stride_vn, job, kv_heads, kv_tokens, n_k_blocks, v8_stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
):  # fmt: skip
    """Quantize K block ``job`` (smoothed by the per-head key mean) to INT8, and its V block to FP8 (transposed)."""
    offs_d = tl.arange(0, HEAD_DIM)
    blk = job % n_k_blocks
    bh = job // n_k_blocks
    b = bh // kv_heads
    h = bh % kv_heads
    start = tl.load(KvStart + b)
    end = tl.load(KvEnd + b)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (offs_n >= start) & (offs_n < end) & (offs_n < kv_tokens)
    base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    x = tl.load(base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    mean = tl.load(KMean + bh.to(tl.int64) * HEAD_DIM + offs_d)
    x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    xq = tl.minimum(tl.maximum(tl.math.floor(x / scale + 0.5), -127.0), 127.0)
    tl.store(KScale + job, scale)
    inside = offs_n < kv_tokens
    out = K8 + bh.to(tl.int64) * kv_tokens * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out, xq.to(tl.int8), mask=inside[:, None])
    if PV_FP8:
        vbase = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        y = tl.load(vbase + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        vs = tl.load(VScale + bh.to(tl.int64) * HEAD_DIM + offs_d)
        y = tl.where(valid[:, None], y.to(tl.float32) / vs[None, :], 0.0)
        # transposed [D, tokens_padded]; the padded tail of the last block is written as zeros
        vout = V8 + bh.to(tl.int64) * HEAD_DIM * v8_stride_d + offs_d[None, :] * v8_stride_d + offs_n[:, None]
        tl.store(vout, y.to(V8.dtype.element_ty))


def _quantize_qkv_kernel(
    Q, K, V, Q8, QScale, QMean, K8, KScale, KMean, V8, VScale, KvStart, KvEnd,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    q_heads, kv_heads, q_tokens, kv_tokens, n_q_blocks, n_k_blocks, n_q_jobs, v8_stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QSMOOTH: tl.constexpr,
    PV_FP8: tl.constexpr,
):  # fmt: skip
    """One program quantizes one Q block (pid < n_q_jobs) or one K block with its V block. Outputs contiguous.
    The two jobs live in functions of their own: their tiles differ in shape, which Triton refuses for a variable
    assigned in both arms of a runtime ``if``."""
    pid = tl.program_id(0)
    if pid < n_q_jobs:
        _quantize_q_block(Q, Q8, QScale, QMean, stride_qb, stride_qh, stride_qm, pid, q_heads, q_tokens, n_q_blocks,
                          HEAD_DIM, BLOCK_M, QSMOOTH)
    else:
        _quantize_kv_block(K, V, K8, KScale, KMean, V8, VScale, KvStart, KvEnd, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, pid - n_q_jobs, kv_heads, kv_tokens, n_k_blocks,
                           v8_stride_d, HEAD_DIM, BLOCK_N, PV_FP8)


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
    """Import Triton and jit the kernels above, once per process."""
    import triton
    import triton.language

    module = globals()
    module["tl"] = triton.language
    module["_attend_blocks_sage"] = triton.jit(_attend_blocks_sage)
    module["_quantize_q_block"] = triton.jit(_quantize_q_block)
    module["_quantize_kv_block"] = triton.jit(_quantize_kv_block)
    sa._triton_kernels()  # jits the helpers the two kernels share
    module["_key_block_ranges"] = sa._key_block_ranges
    module["_row_window"] = sa._row_window
    module["_listed_block_range"] = sa._listed_block_range
    module["_masked_scores"] = sa._masked_scores
    quant = triton.jit(_quantize_qkv_kernel)
    plain = triton.jit(_sage_attention_fwd)
    return SimpleNamespace(triton=triton, quant=quant, plain=plain, interpret=interpreting())


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str, kv_start=None, kv_end=None,
    block_m: int | None = None, block_n: int | None = None,
) -> QuantizedQKV:  # fmt: skip
    """The fused Triton quantization (after the PyTorch stats pass); same result as :func:`quantize_qkv_reference`.
    Blocks default to the attention kernel's GPU tiles for the variant."""
    var = parse_variant(variant)
    if not var.quantized:
        raise ValueError("variant bf16 is not quantized")
    if block_m is None:
        block_m, block_n = GPU_TILES[var.pv][:2]
    kernels = _triton_kernels()
    batch, q_heads, nq, d = q.shape
    _, kv_heads, nk, _ = k.shape
    device = q.device
    valid = _valid_keys(kv_start, kv_end, batch, nk, device)
    start, end = sa._check_rows(kv_start, kv_end, batch, nk, device)
    fp8 = var.pv == "fp8"
    k_mean, v_scale = key_stats(k, v, valid, fp8)
    k_mean = k_mean.contiguous()
    n_qb, n_kb = -(-nq // block_m), -(-nk // block_n)
    q8 = torch.empty(batch, q_heads, nq, d, dtype=torch.int8, device=device)
    q_scale = torch.empty(batch, q_heads, n_qb, dtype=torch.float32, device=device)
    q_mean = torch.empty(batch, q_heads, n_qb, d, dtype=torch.float32, device=device) if var.qsmooth else q_scale
    k8 = torch.empty(batch, kv_heads, nk, d, dtype=torch.int8, device=device)
    k_scale = torch.empty(batch, kv_heads, n_kb, dtype=torch.float32, device=device)
    if fp8:
        v8 = torch.empty(batch, kv_heads, d, n_kb * block_n, dtype=torch.float8_e4m3fn, device=device)
        vs = v_scale.contiguous()
    else:
        v8, vs = k_scale, k_scale  # unused
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n_q_jobs = batch * q_heads * n_qb
    grid = (n_q_jobs + batch * kv_heads * n_kb,)
    if grid[0]:
        kernels.quant[grid](
            q, k, v, q8, q_scale, q_mean, k8, k_scale, k_mean, v8, vs, start, end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            q_heads, kv_heads, nq, nk, n_qb, n_kb, n_q_jobs, n_kb * block_n,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, QSMOOTH=var.qsmooth, PV_FP8=fp8,
            num_warps=4 if block_m * d <= 8192 else 8,
        )  # fmt: skip
    vq = v8 if fp8 else (v if v.dtype in (torch.float16, torch.bfloat16) else v.to(torch.float16))
    return QuantizedQKV(q8, q_scale, q_mean if var.qsmooth else None, k8, k_scale, k_mean, vq,
                        v_scale if fp8 else None, block_m, block_n)


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
