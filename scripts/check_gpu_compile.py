"""Compile every Triton kernel of compressor.kernels for a GPU target, on a machine without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and accepts programs that the real compiler refuses
(a variable given tiles of two shapes in the arms of a runtime ``if``; two returns of different types). This script
launches the kernel wrappers on CPU tensors with every launch intercepted: instead of running, each launch is
compiled (front end, optimiser, ptxas) for the target, sm_90 by default, with the arguments' real types and the
constexprs and tile configs the wrappers pick for a GPU (every config of an autotuner). Nothing is executed, so the
outputs are garbage and only the compile matters.

    python scripts/check_gpu_compile.py            # all kernels, sm_90
    python scripts/check_gpu_compile.py --arch 80 sparse sage

Exit status 1 names each launch that failed to compile. Needs the ptxas that Triton's wheel bundles.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter (read when triton is imported)
os.environ["COMPRESSOR_COMPILE_ONLY"] = "1"  # the kernel wrappers accept CPU tensors: launches are only compiled

import torch  # noqa: E402

_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}


class Compiler:
    """Stands in for kernel launches: compiles each distinct (kernel, signature, constexprs, config) once."""

    def __init__(self, arch: int, quick: bool = False):
        from triton.backends.compiler import GPUTarget

        self.quick = quick
        self.target = GPUTarget("cuda", arch, 32)
        self.seen: set[str] = set()
        self.failures: list[str] = []
        self.compiled = 0

    def signature(self, fn, args, kwargs):
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        sig, consts, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound.get(p.name, p.default)
            # what the launcher specialises on: an int equal to 1 becomes a constant; pointers (a CUDA allocation is
            # 256-byte aligned) and ints divisible by 16 are marked so, which turns on wide loads and pipelining
            free = getattr(p, "do_not_specialize", False)
            aligned = not free and not getattr(p, "do_not_specialize_on_alignment", False)
            if p.is_constexpr or v is None or (not free and type(v) is int and v == 1):
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _DTYPES[v.dtype]
                if aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if aligned and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
        return sig, consts, attrs

    def compile(self, fn, args, kwargs, num_warps=4, num_stages=3):
        import triton
        from triton.compiler import ASTSource

        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", num_warps)
        num_stages = kwargs.pop("num_stages", num_stages)
        sig, consts, attrs = self.signature(fn, args, kwargs)
        key = (f"{fn.__name__} {sorted(sig.items())} {sorted((k, repr(v)) for k, v in consts.items())} {sorted(attrs)} "
               f"{num_warps} {num_stages}")
        if key in self.seen:
            return
        self.seen.add(key)
        shown = {k: v for k, v in consts.items() if v is not None}
        what = f"{fn.__name__} {shown} warps={num_warps} stages={num_stages}"
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            kernel = triton.compile(src, target=self.target, options={"num_warps": num_warps, "num_stages": num_stages})
            self.compiled += 1
            smem = kernel.metadata.shared
            print(f"ok    {what} (shared memory {smem} B)", flush=True)
            if smem > 232448:
                self.failures.append(f"{what}: needs {smem} B of shared memory, an H100/H200 SM has 232448")
        except Exception as err:  # report every failing launch, keep going
            root = err
            while root.__cause__ is not None:  # the compiler wraps the reason (e.g. a TypeError) in its own error
                root = root.__cause__
            self.failures.append(f"{what}: {type(root).__name__}: {str(root).strip().splitlines()[-1]}")
            print(f"FAIL  {what}\n{''.join(traceback.format_exception_only(err))}", flush=True)

    def install(self):
        """Route ``kernel[grid](...)`` and autotuned launches to :meth:`compile`."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        compiler = self

        def jit_run(self, *args, grid=None, warmup=False, **kwargs):
            compiler.compile(self, args, kwargs)

        def tuned_run(self, *args, **kwargs):
            configs = self.configs[:1] + self.configs[-1:] if compiler.quick and len(self.configs) > 2 else self.configs
            for config in configs:
                kw = {**kwargs, **config.all_kwargs()} if hasattr(config, "all_kwargs") else {
                    **kwargs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                kw = {k: v for k, v in kw.items() if k in self.fn.arg_names or k in ("num_warps", "num_stages")}
                compiler.compile(self.fn, args, kw)

        JITFunction.run = jit_run
        Autotuner.run = tuned_run


def _qkv(b, hq, hk, nq, nk, d, dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, hq, nq, d, generator=g).to(dtype), torch.randn(b, hk, nk, d, generator=g).to(dtype),
            torch.randn(b, hk, nk, d, generator=g).to(dtype))


QUICK = False  # --quick: bf16 only, fewer strides, the first and last config of each autotuner


def _dtypes():
    return (torch.bfloat16,) if QUICK else (torch.bfloat16, torch.float16)


def check_sparse():
    from compressor.kernels import sparse_attention as sa

    for dtype in _dtypes():
        for d in (64, 128):
            q, k, v = _qkv(2, 8, 2, 300, 300, d, dtype)
            sa.sparse_attention(q, k, v, causal=True)
            sa.sparse_attention(q, k, v, causal=False)
            h = q.shape[1]
            sa.sparse_attention(q, k, v, sink=torch.full((h,), 64, dtype=torch.int32), alpha=torch.full((h,), 100.0),
                                beta=torch.zeros(h), causal=True)
            n_qb = -(-300 // 128)
            idx = torch.zeros(2, h, n_qb, 8, dtype=torch.int32)
            cnt = torch.ones(2, h, n_qb, dtype=torch.int32)
            sa.sparse_attention(q, k, v, block_index=idx, block_count=cnt, block_size=128, causal=True)


def check_sage():
    from compressor.kernels import sage_attention as sg

    for variant in ("int8-qk/fp16-pv", "int8-qk/fp8-pv", "int8-qk/fp8-pv+qsmooth"):
        for d in (64, 128):
            q, k, v = _qkv(2, 8, 2, 300, 300, d, torch.bfloat16)
            sg.sage_attention(q, k, v, variant=variant, causal=True)
            sg.sage_attention(q, k, v, variant=variant, causal=False)
            h = q.shape[1]
            sg.sage_attention(q, k, v, variant=variant, sink=torch.full((h,), 64, dtype=torch.int32),
                              alpha=torch.full((h,), 100.0), beta=torch.zeros(h), causal=True)


def check_xattention():
    from compressor.kernels import xattention_score as xs
    from compressor.kernels import xattention_select as sel

    for stride in (8, 16) if QUICK else (4, 8, 16):
        for bs in (128,) if QUICK else (64, 128):
            q, k, _ = _qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16)
            scores = xs.xattention_scores(q, k, stride=stride, block_size=bs)
            if stride == 8:
                sel.select_blocks(scores, torch.full((8,), 0.9), q_tokens=1000, kv_tokens=1000, block_size=bs,
                                 use_triton=True)


def check_decode():
    from compressor.kernels import cache_store as cs
    from compressor.kernels import decode_attention as da

    for dtype in _dtypes():
        for d in (64, 128):
            for group, merge in ((1, "fused"), (4, "fused"), (4, "separate"), (8, "fused"), (8, "separate")):
                batch, kv_heads, sink_cap, ring_cap = 2, 2, 64, 2048
                q = torch.zeros(batch, kv_heads * group, d, dtype=dtype)
                buf = torch.zeros(batch, kv_heads * (sink_cap + ring_cap), d, dtype=dtype)
                da.decode_attention_triton(
                    q, buf, buf, region_start=[0, sink_cap + ring_cap], sink_cap=[sink_cap] * kv_heads,
                    ring_cap=[ring_cap] * kv_heads, length=torch.tensor([5000, 300]),
                    sink=torch.full((kv_heads * group,), 64, dtype=torch.int32),
                    window=torch.full((batch, kv_heads * group), 2048, dtype=torch.int32), max_tokens=sink_cap + ring_cap,
                    merge=merge)
                cs.store_decode_token_triton(  # the decode step's cache writes (PlanCacheLayer._store_one)
                    buf, buf, torch.zeros(batch, 1, kv_heads, d, dtype=dtype).transpose(1, 2),
                    torch.zeros(batch, kv_heads, 1, d, dtype=dtype), region_start=torch.tensor([0, sink_cap + ring_cap]),
                    sink_cap=torch.tensor([sink_cap] * kv_heads), ring_cap=torch.tensor([ring_cap] * kv_heads),
                    length=torch.tensor([5000, 300]), valid=torch.ones(batch, 7, dtype=torch.int64)[:, -1],
                    alpha=torch.full((kv_heads * group,), 2048.0), beta=torch.zeros(kv_heads * group),
                    sliding=4096 if group == 8 else None, window_out=torch.zeros(batch, kv_heads * group, dtype=torch.int32))


def check_quant_linear():
    from compressor.kernels import quant_linear as ql
    from compressor.kernels.quant_activation import quantize_activation
    from compressor.kernels.quant_reference import pack_int4, quantize_weight_int4_groups, quantize_weight_per_channel

    g = torch.Generator().manual_seed(0)
    for m in (1, 16, 300, 4096):
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
        for act in ("int8", "fp8"):
            for had in (0, 128):
                quantize_activation(x, act, hadamard_block=had)
        w = torch.randn(384, 512, generator=g)
        a_q = torch.zeros(m, 512, dtype=torch.int8)
        a_s = torch.ones(m)
        wq, ws = quantize_weight_per_channel(w, "int8")
        ql.triton_gemm(a_q, a_s, wq, ws, None, torch.bfloat16)
        q4, s4 = quantize_weight_int4_groups(w, 128)
        ql.triton_gemm(a_q, a_s, pack_int4(q4), s4, None, torch.bfloat16, group_size=128)
        wq8, ws8 = quantize_weight_per_channel(w, "fp8")
        ql.triton_gemm(a_q.to(torch.float8_e4m3fn), a_s, wq8, ws8, torch.zeros(384).to(torch.bfloat16), torch.bfloat16)
        if m <= 16:  # the decode GEMV: float x (scale inside) and codes, split-K and not, int4 groups of 128 and 64
            check_quant_gemv(x, a_q, a_s, w, wq, ws, wq8, ws8)


def check_quant_gemv(x, a_q, a_s, w, wq, ws, wq8, ws8):
    from compressor.kernels.quant_gemv import gemv_config, quant_gemv
    from compressor.kernels.quant_reference import pack_int4, quantize_weight_int4_groups

    m, k = x.shape
    bias = torch.zeros(w.shape[0]).to(torch.bfloat16)
    for group in (128, 64):
        q4, s4 = quantize_weight_int4_groups(w, group)
        quant_gemv(x, pack_int4(q4), s4, None, "int8", group, torch.bfloat16)
        quant_gemv(a_q, pack_int4(q4), s4, bias, "int8", group, torch.bfloat16, x_scale=a_s)
    quant_gemv(x, wq, ws, bias, "int8", 0, torch.bfloat16)
    quant_gemv(a_q, wq, ws, None, "int8", 0, torch.bfloat16, x_scale=a_s)
    quant_gemv(x, wq8, ws8, None, "fp8", 0, torch.bfloat16)
    quant_gemv(a_q.to(torch.float8_e4m3fn), wq8, ws8, bias, "fp8", 0, torch.bfloat16, x_scale=a_s)
    one_split = {**gemv_config(m, 4096, k, 0), "SPLIT_K": 1}
    quant_gemv(x, wq, ws, None, "int8", 0, torch.bfloat16, config=one_split, pdl=False)


def check_quant_gemv_sweep():
    """Every tile config of the decode GEMV sweep (scripts/bench_quant_gemv.py) as it launches them: M = 1 with the
    scale inside and on codes, M = 16 on codes, split-K and not (--quick: the first and last tiles, split only)."""
    import bench_quant_gemv as sweep  # beside this script

    from compressor.kernels.quant_gemv import quant_gemv
    from compressor.kernels.quant_reference import pack_int4, quantize_weight_int4_groups, quantize_weight_per_channel

    g = torch.Generator().manual_seed(0)
    k, n = 2048, 256  # two K steps per split even at BLOCK_K = 1024
    w = torch.randn(n, k, generator=g)
    q4, s4 = quantize_weight_int4_groups(w, sweep.GROUP)
    x1 = torch.randn(1, k, generator=g).to(torch.bfloat16)
    for weights, tiles in ((quantize_weight_per_channel(w, "int8") + (0,), sweep.W8_TILES),
                           ((pack_int4(q4), s4, sweep.GROUP), sweep.W4_TILES)):
        for bn, bk, warps, stages in tiles[:1] + tiles[-1:] if QUICK else tiles:
            for split in (2,) if QUICK else (1, 2):
                cfg = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)
                quant_gemv(x1, *weights[:2], None, "int8", weights[2], torch.bfloat16, config=cfg)
                for m in (16,) if QUICK else (1, 16):
                    quant_gemv(torch.zeros(m, k, dtype=torch.int8), *weights[:2], None, "int8", weights[2],
                               torch.bfloat16, x_scale=torch.ones(m), config=cfg)


CHECKS = {"sparse": check_sparse, "sage": check_sage, "xattention": check_xattention, "decode": check_decode,
          "quant_linear": check_quant_linear, "quant_gemv_sweep": check_quant_gemv_sweep}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"some of {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--quick", action="store_true",
                        help="bf16 only, fewer variants, the first and last config of each autotuner (the test's mode)")
    args = parser.parse_args(argv)
    global QUICK
    QUICK = args.quick
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    compiler = Compiler(args.arch, quick=args.quick)
    compiler.install()
    for name in args.checks or list(CHECKS):
        print(f"== {name}", flush=True)
        try:
            CHECKS[name]()
        except Exception:  # a wrapper that fails before its launch is a failure too
            compiler.failures.append(f"{name}: wrapper raised\n{traceback.format_exc()}")
            traceback.print_exc()
    print(f"\n{compiler.compiled} kernels compiled for sm_{args.arch}, {len(compiler.failures)} failures")
    for f in compiler.failures:
        print("FAILED:", f)
    return 1 if compiler.failures else 0


if __name__ == "__main__":
    sys.exit(main())
