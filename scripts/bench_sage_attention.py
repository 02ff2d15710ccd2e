"""Benchmark the SageAttention-style kernels against SDPA (cuDNN, flash) and the bf16 sparse kernel, on one GPU.

Dense causal and non-causal prefill, B=1, H=32; quantization pass timed alone and inside the total; sparse
(sink 64 + window 1024) quantized vs bf16 at equal density; accuracy (cos, relative L1, RMSE) vs float32.
Writes a markdown table (``--out``) with GPU, date, versions and command.

    python scripts/bench_sage_attention.py --lengths 4096 16384 65536 --out scripts/results/sage_attention_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn) -> float:
    """Median milliseconds (triton.testing.do_bench)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60)


def errors(out: torch.Tensor, ref: torch.Tensor) -> str:
    o, r = out.float().flatten(), ref.float().flatten()
    cos = float(o @ r / (o.norm() * r.norm()))
    rel = float((o - r).abs().sum() / r.abs().sum())
    rmse = float((o - r).pow(2).mean().sqrt())
    return f"{cos:.6f} | {rel:.4f} | {rmse:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--accuracy-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="only time the attention kernel (quantization excluded) over tile configs at length N")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.sweep, args.heads)

    import triton

    from compressor.kernels import sage_attention as sg
    from compressor.kernels import sparse_attention as sa
    from compressor.kernels.reference import sparse_attention_reference

    dev = torch.device("cuda")
    H = args.heads
    lines = [
        "# SageAttention-style kernels on " + torch.cuda.get_device_name(),
        "",
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}; command: `python {' '.join(sys.argv)}`",
        "",
        f"B=1, H={H} (MHA), bf16 inputs, `triton.testing.do_bench` median ms. total = quantization + attention; "
        "speedup = cuDNN / total.",
        "",
    ]
    variants = ["int8-qk/fp8-pv", "int8-qk/fp8-pv+qsmooth", "int8-qk/fp16-pv"]

    for d in args.dims:
        for causal in (True, False):
            lines += [f"## dense, D={d}, {'causal' if causal else 'non-causal'}", "",
                      "| N | cuDNN | flash | " + " | ".join(f"{v} total (quant)" for v in variants)
                      + " | fp8 speedup vs cuDNN |", "|" + "---|" * (4 + len(variants))]
            for n in args.lengths if d == 128 else [n for n in args.lengths if n <= 16384]:
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, H, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_flash = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                cells = []
                t_fp8 = None
                for var in variants:
                    t_total = bench(lambda: sg.sage_attention(q, k, v, variant=var, causal=causal))
                    t_quant = bench(lambda: sg.quantize_qkv(q, k, v, variant=var))
                    cells.append(f"{t_total:.3f} ({t_quant:.3f})")
                    t_fp8 = t_total if t_fp8 is None else t_fp8
                lines.append(f"| {n} | {t_cudnn:.3f} | {t_flash:.3f} | " + " | ".join(cells)
                             + f" | {t_cudnn / t_fp8:.2f}x |")
                print(lines[-1], flush=True)
                del q, k, v
            lines.append("")

    lines += ["## sparse sink 64 + window 1024, causal, D=128: quantized vs bf16 sparse kernel (same density)", "",
              "| N | bf16 sparse | int8-qk/fp8-pv total (quant) | int8-qk/fp16-pv total | fp8 speedup |", "|---|---|---|---|---|"]
    sink = torch.full((H,), 64, dtype=torch.int32, device=dev)
    alpha = torch.full((H,), 1024.0, device=dev)
    beta = torch.zeros(H, device=dev)
    pat = dict(sink=sink, alpha=alpha, beta=beta, causal=True)
    for n in [x for x in args.lengths if x >= 16384]:
        q, k, v = (torch.randn(1, H, n, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        t_bf16 = bench(lambda: sa.sparse_attention(q, k, v, **pat, block_m=128, block_n=64, num_warps=8, num_stages=3))
        t8 = bench(lambda: sg.sage_attention(q, k, v, variant="int8-qk/fp8-pv", **pat))
        tq = bench(lambda: sg.quantize_qkv(q, k, v, variant="int8-qk/fp8-pv"))
        t16 = bench(lambda: sg.sage_attention(q, k, v, variant="int8-qk/fp16-pv", **pat))
        lines.append(f"| {n} | {t_bf16:.3f} | {t8:.3f} ({tq:.3f}) | {t16:.3f} | {t_bf16 / t8:.2f}x |")
        print(lines[-1], flush=True)
    lines.append("")

    lines += ["## accuracy vs float32 attention (random normal q, k, v; causal; D=128)", "",
              "| N | kernel | cos | rel L1 | RMSE |", "|---|---|---|---|---|"]
    for n in args.accuracy_lengths:
        torch.manual_seed(1)
        q, k, v = (torch.randn(1, H, n, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        ref = sparse_attention_reference(q.float(), k.float(), v.float(), causal=True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            lines.append(f"| {n} | SDPA cuDNN bf16 | {errors(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref)} |")
        for var in variants + ["int8-qk/fp16-pv+qsmooth"]:
            lines.append(f"| {n} | {var} | {errors(sg.sage_attention(q, k, v, variant=var), ref)} |")
        print("\n".join(lines[-5:]), flush=True)
        del ref
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def sweep(n: int, heads: int) -> None:
    """Attention-kernel time (inputs quantized once per tile shape) for each tile config, D=128, causal."""
    from compressor.kernels import sage_attention as sg

    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"N={n} H={heads} D=128 causal; cuDNN {t_cudnn:.3f} ms")
    print("| variant | block_m | block_n | warps | stages | kernel ms | vs cuDNN |")
    for var in ("int8-qk/fp8-pv", "int8-qk/fp16-pv"):
        for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2),
                                      (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                                      (128, 32, 8, 4), (128, 128, 16, 2)]:
            try:
                qq = sg.quantize_qkv(q, k, v, variant=var, block_m=bm, block_n=bn)
                t = bench(lambda: sg.sage_attention(q, k, v, variant=var, block_m=bm, block_n=bn, num_warps=warps,
                                                    num_stages=stages, quantized=qq))
                print(f"| {var} | {bm} | {bn} | {warps} | {stages} | {t:.3f} | {t_cudnn / t:.2f}x |", flush=True)
            except Exception as err:  # a config that does not compile (shared memory) is reported, not fatal
                print(f"| {var} | {bm} | {bn} | {warps} | {stages} | failed: {type(err).__name__} | |", flush=True)


if __name__ == "__main__":
    main()
