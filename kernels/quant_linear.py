"""Quantized linear layer on the GPU: per-token activation quantization and a low-bit GEMM with a fused epilogue.

Spec: ``quant_reference.quant_linear_reference``. Paths chosen by :func:`quant_linear` (``backend="auto"``):
- M <= 16 tokens (decode): :func:`decode_route` picks, per (precision, M bucket, K, N), from a table of H200
  measurements (``DECODE_ROUTES``; ``scripts/bench_quant_linear.py --gemv-sweep`` prints entries for it) either
  the split-K decode GEMV of ``quant_gemv`` (explicit tiles, scale taken inside or codes first) or the narrow-tile
  GEMM below, which is the default until the GEMV is measured at least as fast:
  - M <= 4 tokens: ONE launch, ``triton_linear_fused``: each GEMM program takes the per-token absmax of x itself and
    quantizes it in registers; narrow N tiles give N / 16..64 programs, enough to stream the weight at HBM speed;
  - 4 < M <= 16: the activation kernel, then the same narrow-tile GEMM on the codes (every fused program would
    re-read all of x, 16 rows of it, which costs more L2 traffic than the weight slice it reads);
- M > 16: the activation kernel, then a Hopper-tiled GEMM (128x256x128 class, grouped tile order), autotuned per
  (M bucket, N, K); fp8 goes to ``torch._scaled_mm`` there (cuBLAS row-wise fp8: 1000+ TFLOP/s measured);
- W4A8 (int4 packed 8 per int32 along K, group scales): the same kernels unpack the int4 bytes in registers, one
  group per K step.
The online Hadamard is a rotation kernel in front of any of these. Inputs the kernels do not take run the
reference, with a one-time warning naming the reason (``backend="triton"`` raises instead).

Layers that read the same input tensor (q/k/v, gate/up of a decoder layer) can share one activation pass above 16
tokens: pass the same :class:`ActivationMemo` as ``memo``; the codes are reused while the input is the same tensor
object at the same version (an in-place write bumps it) with the same activation format and rotation.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch

from compressor.kernels.quant_activation import MAX_HADAMARD_BLOCK, hadamard_rotate, quantize_activation
from compressor.kernels.quant_reference import FP8_MAX, INT8_MAX, fp8_dtype, quant_linear_reference, rms_norm_as_input
from compressor.kernels import triton_support
from compressor.kernels.triton_support import interpreting, next_pow2, triton_available

SMALL_M = 16  # at most this many tokens: narrow-N decode tiles (M padded to the MMA's 16 rows)
FUSED_MAX_M = 4  # at most this many: the activation is quantized inside the GEMM (one launch)
GEMV_INLINE_SCALE_MAX_M = 4  # decode GEMV: up to this many tokens every program reads x for the scale (no 2nd launch)
# Under the CPU interpreter the launchers use these tiles; on the GPU the autotuner picks from quant_triton's lists.
INTERPRETER_TILES = {
    "small": dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=1),
    "large": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
}
_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:  # once per reason: the per-process record of what was said
        _warned.add(reason)
        warnings.warn(f"quantized linear: {reason}; running the PyTorch reference instead", stacklevel=3)


Norm = tuple[torch.Tensor, float]  # (RMSNorm weight [K], eps): a norm applied inside the activation pass


def activation_codes(
    x2: torch.Tensor, act_dtype: str, hadamard_block: int, norm: Norm | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes and scales of ``x2: [M, K]`` after the optional RMSNorm (fused into the pass) and online
    Hadamard rotation."""
    weight, eps = norm if norm is not None else (None, 1e-6)
    return quantize_activation(x2, act_dtype, norm_weight=weight, eps=eps, hadamard_block=hadamard_block)


class ActivationMemo:
    """The per-token codes of the last input quantized through it, for sibling layers reading the same tensor.

    Refers to that input weakly: when it is freed, the codes go too (and a new tensor can never pass for it).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._source: weakref.ref | None = None
        self._key: tuple = ()
        self._codes: tuple[torch.Tensor, torch.Tensor] | None = None

    def codes(
        self, source: torch.Tensor, x2: torch.Tensor, act_dtype: str, hadamard_block: int, norm: Norm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``activation_codes(x2, ...)`` for ``x2``, a 2-D view of ``source``; reused when ``source`` was seen last,
        unchanged (same version), with the same format, rotation and norm."""
        norm_key = (id(norm[0]), float(norm[1])) if norm is not None else None
        try:
            key = (source._version, act_dtype, hadamard_block, norm_key)
        except RuntimeError:  # an inference-mode tensor has no version counter: in-place writes are invisible
            return activation_codes(x2, act_dtype, hadamard_block, norm)
        if self._source is None or self._source() is not source or self._key != key:
            codes = activation_codes(x2, act_dtype, hadamard_block, norm)
            self.clear()
            self._source, self._key, self._codes = weakref.ref(source, self._forget), key, codes
        return self._codes

    def _forget(self, ref: weakref.ref) -> None:  # the remembered input was freed
        if ref is self._source:
            self.clear()


@dataclass(frozen=True)
class DecodeRoute:
    """How :func:`quant_linear` runs M <= 16 tokens. ``kernel``: ``"gemm"`` (the fused / two-launch narrow-tile GEMM)
    or ``"gemv"`` (``quant_gemv``); for the GEMV, ``config`` its tiles (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``,
    ``num_warps``, ``num_stages``; None: ``gemv_config``'s rule), ``scale_inside`` whether it quantizes float x itself
    (else ``quantize_activation`` runs first) and ``pdl`` programmatic dependent launch (sm_90+)."""

    kernel: str = "gemm"
    config: dict | None = field(default=None, hash=False)
    scale_inside: bool = True
    pdl: bool = True

    def __post_init__(self):
        if self.kernel not in ("gemm", "gemv"):
            raise ValueError(f"DecodeRoute.kernel must be 'gemm' or 'gemv', got {self.kernel!r}")


OLD_DECODE = DecodeRoute("gemm")
# (precision "int8" / "fp8" / "w4a8", M bucket: 1 for M <= GEMV_INLINE_SCALE_MAX_M else 16, K, N) -> route. Where the
# H200 sweep (scripts/results/quant_gemv_sweep_h200.md, CUDA-graph replay, activation quantization included) measured
# the GEMV at least 3% faster than the narrow-tile GEMM; fp8 was not swept and keeps the GEMM. W4A8 shapes not listed
# take the GEMV with gemv_config's tiles (every W4A8 case measured 1.4-3.1x faster than the GEMM).
def _gemv(n: int, k: int, split: int, warps: int, stages: int, scale_inside: bool, pdl: bool) -> DecodeRoute:
    tiles = {"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}
    return DecodeRoute("gemv", tiles, scale_inside=scale_inside, pdl=pdl)


DECODE_ROUTES: dict[tuple[str, int, int, int], DecodeRoute] = {
    ("int8", 1, 4096, 4096): _gemv(64, 256, 8, 4, 4, True, True),  # 0.0103 ms vs 0.0121 (bf16 0.0145)
    ("int8", 1, 4096, 6144): _gemv(64, 256, 2, 4, 4, True, True),  # 0.0132 vs 0.0138 (bf16 0.0166)
    ("int8", 1, 14336, 4096): _gemv(64, 256, 8, 8, 3, True, True),  # 0.0242 vs 0.0304 (bf16 0.0326)
    ("int8", 16, 14336, 4096): _gemv(32, 256, 2, 4, 4, False, False),  # 0.0267 vs 0.0290 (bf16 0.0334)
    ("w4a8", 1, 4096, 4096): _gemv(128, 128, 16, 4, 4, True, True),  # 0.0094 vs 0.0161 (bf16 0.0145)
    ("w4a8", 16, 4096, 4096): _gemv(64, 128, 4, 4, 4, False, False),  # 0.0124 vs 0.0178 (bf16 0.0146)
    ("w4a8", 1, 4096, 6144): _gemv(128, 128, 8, 8, 4, True, True),  # 0.0108 vs 0.0197 (bf16 0.0166)
    ("w4a8", 16, 4096, 6144): _gemv(64, 128, 4, 4, 4, False, False),  # 0.0134 vs 0.0211 (bf16 0.0170)
    ("w4a8", 1, 4096, 28672): _gemv(256, 128, 2, 8, 3, True, True),  # 0.0280 vs 0.0483 (bf16 0.0571)
    ("w4a8", 16, 4096, 28672): _gemv(64, 128, 1, 4, 4, False, False),  # 0.0290 vs 0.0502 (bf16 0.0576)
    ("w4a8", 1, 14336, 4096): _gemv(256, 128, 16, 8, 3, True, True),  # 0.0183 vs 0.0566 (bf16 0.0326)
    ("w4a8", 16, 14336, 4096): _gemv(64, 128, 8, 4, 4, False, False),  # 0.0223 vs 0.0492 (bf16 0.0334)
}


def decode_bucket(m: int) -> int:
    """The M bucket that keys ``DECODE_ROUTES``: 1 (one launch can take the scale inside) or 16."""
    return 1 if m <= GEMV_INLINE_SCALE_MAX_M else SMALL_M


def decode_route(precision: str, m: int, k: int, n: int, hadamard_block: int = 0) -> DecodeRoute:
    """The measured route for ``m <= 16`` tokens of a ``k -> n`` layer (``precision``: int8, fp8 or w4a8); where
    nothing was measured, the GEMV with ``gemv_config``'s tiles for w4a8 and the narrow-tile GEMM otherwise. A rotated
    input (online Hadamard: fp32 x) always takes the GEMM: the GEMV on the rotated row measured 5x slower (0.072 vs
    0.015 ms at 4096->4096, M = 1)."""
    if hadamard_block:
        return OLD_DECODE
    route = DECODE_ROUTES.get((precision, decode_bucket(m), k, n))
    if route is None:
        route = DecodeRoute("gemv", scale_inside=m <= GEMV_INLINE_SCALE_MAX_M) if precision == "w4a8" else OLD_DECODE
    return route


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def unsupported_reason(x: torch.Tensor, weight_q: torch.Tensor, act_dtype: str, group_size: int, hadamard_block: int) -> str | None:
    """Why the fast path cannot take these inputs, or None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if not triton_available():
        return "triton is not installed"
    if act_dtype == "fp8" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return f"fp8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability(x.device)}"
    k = x.shape[-1]
    wanted = {torch.int32: "int8", torch.int8: "int8", fp8_dtype(): "fp8"}.get(weight_q.dtype)
    if wanted != act_dtype:
        return f"weights of dtype {weight_q.dtype} do not pair with {act_dtype} activations"
    if hadamard_block and (hadamard_block > MAX_HADAMARD_BLOCK or hadamard_block < 16 or k % hadamard_block
                           or hadamard_block & (hadamard_block - 1)):
        return f"online Hadamard block {hadamard_block} is not a power of two in 16..{MAX_HADAMARD_BLOCK} dividing {k}"
    if weight_q.dtype == torch.int32 and (group_size < 32 or group_size % 32 or k % group_size):
        return f"int4 group size {group_size} must be a multiple of 32 (the int8 MMA's K) dividing in_features {k}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype} is not fp16, bf16 or fp32"
    tokens = x.numel() // max(k, 1)
    if max(x.numel(), tokens * weight_q.shape[0]) >= 2**31:
        return f"{tokens} tokens x {k} -> {weight_q.shape[0]} features need 64-bit offsets (the kernels use 32-bit)"
    return None


def _launch_gemm(
    a: torch.Tensor, a_scale: torch.Tensor | None, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int, act_dtype: str, config: dict | None,
) -> torch.Tensor:
    """Run ``quant_gemm_kernel``; ``a_scale`` None means ``a`` is float x, quantized inside (the fused path)."""
    from compressor.kernels import quant_triton

    m, k = a.shape
    n = weight_q.shape[0]
    int4 = weight_q.dtype == torch.int32
    b = weight_q if weight_q.stride(-1) == 1 else weight_q.contiguous()  # the kernel reads rows along K
    b = b.view(torch.uint8) if int4 else b  # int4: the packed words seen as bytes [N, K / 2]
    ws = weight_scale.float().contiguous()
    bias = bias.contiguous() if bias is not None else None
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    small = m <= SMALL_M
    fused = a_scale is None
    meta = dict(A_FUSED=fused, W_INT4=int4, IS_FP8=act_dtype == "fp8", HAS_BIAS=bias is not None,
                QMAX=FP8_MAX if act_dtype == "fp8" else INT8_MAX,
                ASM=not triton_support.interpreting())  # the interpreter runs no PTX
    if small:
        meta["BLOCK_M"] = next_pow2(m)
    rows = meta.get("BLOCK_M", 16)  # the fused absmax pass: one long chunk for a token or few (registers allow)
    meta["AMAX_CHUNK"] = min(next_pow2(k), 16384 // rows if rows <= 4 else 4096 // rows)
    if int4:
        meta["BLOCK_K"] = group_size
    args = (a, ws if fused else a_scale, b, ws, bias if bias is not None else ws, c, m, n, k,
            a.stride(0), b.stride(0), ws.stride(0), c.stride(0), next_pow2(m))
    if config is None and not interpreting():
        tuned = quant_triton.GEMM_TUNED[("small" if small else "large", "w4" if int4 else "w8")]
        # K tails are masked only when some candidate's BLOCK_K does not divide K (never for Llama's 4096 / 14336)
        meta["EVEN_K"] = all(k % cfg.kwargs.get("BLOCK_K", group_size) == 0 for cfg in tuned.configs)
        tuned[lambda t: (_cdiv(m, t["BLOCK_M"]) * _cdiv(n, t["BLOCK_N"]),)](*args, **meta)
        return c
    tiles = dict(config or INTERPRETER_TILES["small" if small else "large"])
    launch = dict(num_warps=tiles.pop("num_warps", 4), num_stages=tiles.pop("num_stages", 2))
    meta = {**tiles, **meta}  # the caller's BLOCK_M (small M) and BLOCK_K (int4: the group) win
    meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
    grid = (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)
    quant_triton.quant_gemm_kernel[grid](*args, **meta, **launch)
    return c


def triton_gemm(
    a_q: torch.Tensor, a_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int = 0, config: dict | None = None,
) -> torch.Tensor:
    """``(a_q @ W^T) * a_scale[:, None] * w_scale + bias`` for codes ``a_q: [M, K]`` int8 / fp8 from
    ``quantize_activation``; ``weight_q`` int8 / fp8 ``[N, K]`` or packed int4 ``[N, K / 8]`` (``group_size`` > 0).

    ``config``: explicit tiles (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``num_warps``, ``num_stages``)
    instead of the autotuner; M <= 16 takes BLOCK_M from M and int4 takes BLOCK_K from the group size.
    """
    act = "fp8" if a_q.dtype == fp8_dtype() else "int8"
    a_q = a_q if a_q.stride(1) == 1 else a_q.contiguous()
    a_scale = a_scale.float().contiguous()
    return _launch_gemm(a_q, a_scale, weight_q, weight_scale, bias, out_dtype, group_size, act, config)


def triton_linear_fused(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    act_dtype: str, group_size: int, out_dtype: torch.dtype, config: dict | None = None,
) -> torch.Tensor:
    """One launch for decode: ``x: [M <= 16, K]`` float is quantized per token inside the GEMM (every program reads
    all of x for the row absmax, then quantizes its K tiles in registers). Same weights and result as ``triton_gemm``
    after ``quantize_activation``."""
    if x.shape[0] > SMALL_M:
        raise ValueError(f"the fused path takes at most {SMALL_M} tokens, got {x.shape[0]}: use triton_gemm")
    if x.stride(1) != 1:
        x = x.contiguous()
    return _launch_gemm(x, None, weight_q, weight_scale, bias, out_dtype, group_size, act_dtype, config)


def torch_gemm(
    a_q: torch.Tensor, a_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The library baseline: ``torch._int_mm`` + epilogue (int8) or row-wise ``torch._scaled_mm`` (fp8)."""
    m = a_q.shape[0]
    pad = (-m) % 16 if m <= SMALL_M else (-m) % 8
    if pad:  # cuBLAS int8 wants M > 16; both want aligned shapes
        a_q = torch.cat([a_q, a_q.new_zeros(pad + (SMALL_M + 1 - m - pad if a_q.dtype == torch.int8 and m + pad <= SMALL_M else 0), a_q.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(a_q.shape[0] - m)])
    if a_q.dtype == torch.int8:
        y = torch._int_mm(a_q, weight_q.t()).float() * a_scale[:, None] * weight_scale.float()[None, :]
        if bias is not None:
            y = y + bias.float()
        return y[:m].to(out_dtype)
    y = torch._scaled_mm(a_q, weight_q.t(), scale_a=a_scale[:, None].float(), scale_b=weight_scale.float()[None, :],
                         bias=bias.to(out_dtype) if bias is not None else None, out_dtype=out_dtype)
    return y[:m]


def _decode_linear(
    x2: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, act_dtype: str,
    group_size: int, hadamard_block: int, out_dtype: torch.dtype, counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """M <= 16 tokens (``x2`` already rotated) along :func:`decode_route`'s route; ``counters``: the GEMV's
    split-K counters (``quant_gemv``)."""
    m, k = x2.shape
    int4 = weight_q.dtype == torch.int32
    route = decode_route("w4a8" if int4 else act_dtype, m, k, weight_q.shape[0], hadamard_block)
    if route.kernel == "gemv":
        from compressor.kernels.quant_gemv import quant_gemv

        pdl = None if route.pdl else False  # None: where the GPU has it (sm_90+, not under the interpreter)
        if route.scale_inside:
            return quant_gemv(x2, weight_q, weight_scale, bias, act_dtype, group_size, out_dtype, config=route.config,
                              pdl=pdl, counters=counters)
        a_q, a_s = quantize_activation(x2, act_dtype)
        return quant_gemv(a_q, weight_q, weight_scale, bias, act_dtype, group_size, out_dtype, x_scale=a_s,
                          config=route.config, pdl=pdl, counters=counters)
    if m <= FUSED_MAX_M:
        return triton_linear_fused(x2, weight_q, weight_scale, bias, act_dtype, group_size, out_dtype)
    a_q, a_s = quantize_activation(x2, act_dtype)
    return triton_gemm(a_q, a_s, weight_q, weight_scale, bias, out_dtype, group_size)


def _fast_linear(
    x2: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, act_dtype: str,
    group_size: int, hadamard_block: int, out_dtype: torch.dtype, backend: str,
    shared: tuple[ActivationMemo, torch.Tensor] | None = None, norm: Norm | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``shared``: ``(memo, x)`` when the activation codes of ``x`` (whose 2-D view is ``x2``) may come from a memo;
    ``norm``: an RMSNorm to apply to ``x2`` first (fused into the activation pass above 16 tokens)."""
    m = x2.shape[0]
    int4 = weight_q.dtype == torch.int32
    if m <= SMALL_M:
        if norm is not None:  # the decode kernels take no norm
            x2 = rms_norm_as_input(x2, *norm)
        xin = hadamard_rotate(x2, hadamard_block) if hadamard_block else x2
        if int4 or backend != "torch":
            return _decode_linear(xin, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype,
                                  counters)
        return torch_gemm(*quantize_activation(xin, act_dtype), weight_q, weight_scale, bias, out_dtype)
    codes = (shared[0].codes(shared[1], x2, act_dtype, hadamard_block, norm) if shared
             else activation_codes(x2, act_dtype, hadamard_block, norm))
    if not int4 and (backend == "torch" or (backend == "auto" and act_dtype == "fp8")):
        return torch_gemm(*codes, weight_q, weight_scale, bias, out_dtype)
    return triton_gemm(*codes, weight_q, weight_scale, bias, out_dtype, group_size)


def quant_linear(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    act_dtype: str = "int8", group_size: int = 0, hadamard_block: int = 0, out_dtype: torch.dtype | None = None,
    backend: str = "auto", memo: ActivationMemo | None = None, norm: Norm | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = Q(rotate(norm(x))) @ W^T + bias`` for ``x: [..., K]``; fast kernels on CUDA, the reference elsewhere.

    ``norm``: ``(weight, eps)`` of an RMSNorm the caller left to this layer (None: ``x`` is used as it is). Above 16
    tokens it runs inside the activation quantization pass: one read of ``x`` instead of the norm's read and write
    and the quantizer's read.

    ``backend``: ``auto`` (the faster measured path per case; falls back to the reference with a warning if a kernel
    fails), ``triton`` or ``torch`` (cuBLAS for the 8-bit GEMM); these two raise instead of falling back.
    ``memo``: shared with the layers that read the same ``x`` (above 16 tokens; module docstring).
    ``counters``: the decode GEMV's split-K counters, owned by the calling layer (``quant_gemv``; None: per call).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    out_dtype = out_dtype or x.dtype
    reason = unsupported_reason(x, weight_q, act_dtype, group_size, hadamard_block)
    if reason is not None:
        if x.is_cuda and backend != "auto":
            raise ValueError(f"quantized linear: {reason} (backend={backend!r})")
        if x.is_cuda:
            _fallback(reason)
        x = rms_norm_as_input(x, *norm) if norm is not None else x
        return quant_linear_reference(x, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return torch.empty(*x.shape[:-1], weight_q.shape[0], dtype=out_dtype, device=x.device)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    try:
        y = _fast_linear(x2, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype, backend,
                         (memo, x) if memo is not None else None, norm, counters)
    except Exception as err:  # a Triton build that rejects a kernel: keep the model running, say why once
        if backend != "auto":
            raise
        _fallback(f"the Triton kernels failed ({type(err).__name__}: {str(err)[:200]})")
        x = rms_norm_as_input(x, *norm) if norm is not None else x
        return quant_linear_reference(x, weight_q, weight_scale, bias, act_dtype, group_size, hadamard_block, out_dtype)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])
