"""Benchmark (and check) the quantized linear layer on a CUDA GPU against bf16 ``torch.matmul`` in the same run.

Llama-3-8B shapes (K -> N): 4096->6144 (qkv), 4096->4096 (o), 4096->28672 (gate+up), 14336->4096 (down), at
M = 1, 16, 256, 4096, 16384. Times include the activation quantization. Ceilings (bf16 / int8 / fp8 GEMM at 8192^3,
device copy bandwidth) are measured first, in the same run.

    python scripts/bench_quant_linear.py [--out results.md] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys

import torch

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 16, 256, 4096, 16384]


def bench(fn, reps: int = 50) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
    except Exception as err:  # one failing path must not lose the other numbers
        print(f"FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return float("nan")


def ceilings() -> dict[str, float]:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = {"bf16 TFLOP/s": 2 * n**3 / bench(lambda: a @ b) / 1e9}
    ai = torch.randint(-100, 100, (n, n), device="cuda", dtype=torch.int8)
    bi = torch.randint(-100, 100, (n, n), device="cuda", dtype=torch.int8).t()
    out["int8 TOPS (_int_mm)"] = 2 * n**3 / bench(lambda: torch._int_mm(ai, bi)) / 1e9
    af, bf = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    out["fp8 TFLOP/s (_scaled_mm)"] = 2 * n**3 / bench(lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16)) / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    out["copy GB/s"] = 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e6
    return out


def check(prec: str, k: int, n: int, m: int) -> float:
    """Relative error of the fast path vs the float64-accumulated reference on fresh random bf16 inputs."""
    from compressor.kernels import quant_reference as ref
    from compressor.kernels.quant_linear import quant_linear

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, :8] *= 20  # outlier channels
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wq, ws, gs, act = weights(prec, w)
    had = 128 if prec.endswith("+had") else 0
    y = quant_linear(x, wq, ws, bias, act, gs, had)
    yr = ref.quant_linear_reference(x.float(), wq, ws, bias.float(), act, gs, had, torch.float32)
    assert torch.isfinite(y).all()
    return float((y.float() - yr).norm() / yr.norm())


def weights(prec: str, w: torch.Tensor):
    from compressor.kernels import quant_reference as ref

    if prec.startswith("w4a8"):
        q, s = ref.quantize_weight_int4_groups(w, 128)
        return ref.pack_int4(q), s, 128, "int8"
    kind = "fp8" if prec.startswith("fp8") else "int8"
    q, s = ref.quantize_weight_per_channel(w, kind)
    return q, s, 0, kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quant_linear_h200.md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from compressor.kernels.quant_activation import quantize_activation
    from compressor.kernels.quant_linear import quant_linear, torch_gemm, triton_gemm

    import triton

    torch.manual_seed(0)
    lines = []
    ceil = ceilings()
    errors = []
    for prec in ["int8", "fp8", "w4a8", "int8+had"]:
        for m in (1, 16, 300):
            try:
                errors.append((prec, m, check(prec, 4096, 6144, m)))
            except Exception as err:
                print(f"CHECK FAILED {prec} M={m}: {type(err).__name__}: {str(err)[-1500:]}", flush=True)
                errors.append((prec, m, float("nan")))
    ms = [1, 256] if args.quick else MS
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        packs = {p: weights(p, w) for p in ("int8", "fp8", "w4a8")}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            flops = 2 * m * n * k
            t = {"bf16": bench(lambda: x @ w.t())}
            wq, ws, _, _ = packs["int8"]
            t["int8 triton"] = bench(lambda: triton_gemm(*quantize_activation(x, "int8"), wq, ws, None, torch.bfloat16))
            if m > 16:
                t["int8 _int_mm"] = bench(lambda: torch_gemm(*quantize_activation(x, "int8"), wq, ws, None, torch.bfloat16))
            fq, fs, _, _ = packs["fp8"]
            t["fp8 _scaled_mm"] = bench(lambda: quant_linear(x, fq, fs, None, "fp8"))
            pq, ps, _, _ = packs["w4a8"]
            t["w4a8 triton"] = bench(lambda: quant_linear(x, pq, ps, None, "int8", 128))
            t["act quant"] = bench(lambda: quantize_activation(x, "int8"))
            t["act quant+had128"] = bench(lambda: quantize_activation(x, "int8", hadamard_block=128))
            wbytes = {"bf16": 2 * n * k, "int8 triton": n * k, "int8 _int_mm": n * k, "fp8 _scaled_mm": n * k,
                      "w4a8 triton": n * k // 2 + n * (k // 128) * 4}
            for name, ms_ in t.items():
                if name.startswith("act"):
                    rows.append((k, n, m, name, ms_, "", ""))
                    continue
                tflops = flops / ms_ / 1e9
                gbs = (wbytes[name] + 2 * m * k + 2 * m * n) / ms_ / 1e6 if m <= 16 else None
                rows.append((k, n, m, name, ms_, f"{tflops:.1f}", f"{gbs:.0f}" if gbs else ""))
            print(f"{k}->{n} M={m}: " + ", ".join(f"{a} {b:.4f}ms" for a, b in t.items()), flush=True)
    gpu = torch.cuda.get_device_name()
    lines += [
        "# Quantized linear layer, " + gpu, "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        f"- command: `python {' '.join(sys.argv)}`; times: `triton.testing.do_bench` median, activation quantization included",
        "- ceilings measured in the same run (8192^3; copy = read + write): "
        + ", ".join(f"{a} {b:.0f}" for a, b in ceil.items()),
        "", "## Correctness at K=4096, N=6144 (bf16 inputs with outlier channels; rel. error vs the fp32 reference)", "",
        "| precision | M | rel. error |", "|---|---|---|",
        *[f"| {p} | {m} | {e:.2e} |" for p, m, e in errors],
        "", "## Speed", "", "| K->N | M | path | ms | TFLOP/s (TOPS) | GB/s (M<=16) |", "|---|---|---|---|---|---|",
        *[f"| {k}->{n} | {m} | {name} | {t:.4f} | {tf} | {gb} |" for k, n, m, name, t, tf, gb in rows],
    ]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,temperature.gpu", "--format=csv"], check=False)
    main()
