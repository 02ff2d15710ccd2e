"""SageAttention-style quantization of the attention inputs, consumed by :mod:`.sage_attention`.

- K is smoothed: the per-(batch row, KV head, channel) mean over the row's valid keys is subtracted. Every score
  of a query row moves by the same ``q . mean``, so the softmax is unchanged while channel outliers vanish.
- ``+qsmooth`` (SageAttention2): each BLOCK_M block of queries has its mean subtracted before quantization; the
  attention kernel adds its exact contribution ``q_mean . k`` back to the scores.
- Q and K are INT8 with one scale per block of tokens (Q: BLOCK_M, K: BLOCK_N, the attention kernel's tiles).
- V stays 16-bit, or becomes FP8 e4m3 with a per-channel scale, stored transposed ([D, tokens]) so that both FP8
  operands of P V are K-major as Hopper's FP8 MMA requires.

Two passes: a PyTorch reduction for K's channel means and V's channel maxima (:func:`key_stats`), then one fused
Triton kernel quantizing Q, K and V blocks (:func:`quantize_qkv`). :func:`quantize_qkv_reference` is the spec.
Triton is imported on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import sparse_attention as sa
from .triton_support import interpreting, jit_helpers

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
# The fused Triton kernel (wrapped by triton.jit in _triton_kernels)
# ---------------------------------------------------------------------------------------------------------------


def _int8_block(x):
    """INT8 codes (as float, rounded half up) and the one symmetric scale of a whole ``[tokens, HEAD_DIM]`` block."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    return tl.minimum(tl.maximum(tl.math.floor(x / scale + 0.5), -127.0), 127.0), scale


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
    xq, scale = _int8_block(x)
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
    xq, scale = _int8_block(x)
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


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and jit the quantization kernel, once per process."""
    triton = jit_helpers(globals(), _int8_block, _quantize_q_block, _quantize_kv_block)
    return SimpleNamespace(quant=triton.jit(_quantize_qkv_kernel), interpret=interpreting())


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
