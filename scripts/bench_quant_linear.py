"""Benchmark (and check) the quantized linear layer on a CUDA GPU against bf16 ``torch.matmul`` in the same run.

Llama-3-8B shapes (K -> N): 4096->6144 (qkv), 4096->4096 (o), 4096->28672 (gate+up), 14336->4096 (down), at
M = 1, 16, 256, 4096, 16384. At M <= 16 `triton` is quant_linear's routed decode path (quant_linear.DECODE_ROUTES:
the decode GEMV of kernels/quant_gemv.py where it was measured faster, else the narrow-tile GEMM), timed next to
the narrow-tile GEMM alone (`old`: fused GEMM / activation kernel + narrow-tile GEMM) and GEMV variants with
gemv_config's tiles (scale inside at M = 16, no programmatic dependent launch); `--gemv-sweep` times the GEMV's
tiles instead (scripts/bench_quant_gemv.py). Every time includes the activation quantization (and the rotation for
+had128).
First the ceilings (bf16 / int8 / fp8 GEMM at 8192^3, device copy bandwidth), then every path is checked against the
fp32 reference at K=4096, N=6144 (a failure prints its traceback), then timed. About 4-5 minutes on an H200, most of
it compiling and autotuning the Triton kernels.

    python scripts/bench_quant_linear.py --out results.md [--quick]
    python scripts/bench_quant_linear.py --gemv-sweep --out gemv_sweep.md   # the decode GEMV's tiles, about 2 minutes
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from provenance import git_commit

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 16, 256, 4096, 16384]
GROUP = 128  # int4 group size of the w4a8 rows
HADAMARD = 128


@dataclass
class Path:
    """One way to compute the layer: ``run(x, weights, out_dtype)``; ``precision`` keys the weights it takes."""

    name: str
    precision: str
    run: Callable
    takes: Callable[[int], bool] = lambda m: True


def make_weights(w: torch.Tensor) -> dict:
    """The bf16 weight and its int8, fp8 and int4 (groups of 128) quantizations: ``(weight_q, scale, group, act)``."""
    from compressor.kernels import quant_reference as ref

    q4, s4 = ref.quantize_weight_int4_groups(w, GROUP)
    q64, s64 = ref.quantize_weight_int4_groups(w, 64)
    return {"bf16": (w, None, 0, None), "int8": (*ref.quantize_weight_per_channel(w, "int8"), 0, "int8"),
            "fp8": (*ref.quantize_weight_per_channel(w, "fp8"), 0, "fp8"), "w4a8": (ref.pack_int4(q4), s4, GROUP, "int8"),
            "w4a8g64": (ref.pack_int4(q64), s64, 64, "int8")}


def paths() -> list[Path]:
    from compressor.kernels.quant_activation import quantize_activation
    from compressor.kernels.quant_gemv import gemv_counters_needed, quant_gemv
    from compressor.kernels.quant_linear import (
        FUSED_MAX_M, GEMV_INLINE_SCALE_MAX_M, SMALL_M, quant_linear, triton_gemm, triton_linear_fused,
    )

    def counters(x, p):  # a layer's split-K counters for the decode GEMV, made once per weight (as QuantLinear does)
        key = (x.device, p[0].data_ptr())
        if key not in _COUNTERS:
            _COUNTERS[key] = torch.zeros(gemv_counters_needed(p[0].shape[0]), dtype=torch.int32, device=x.device)
        return _COUNTERS[key]

    def layer(backend: str, hadamard: int = 0):
        return lambda x, p, od: quant_linear(x, p[0], p[1], None, p[3], p[2], hadamard, od, backend,
                                             counters=counters(x, p))

    def old_decode(x, p, od):  # the decode path before quant_gemv: fused GEMM up to 4 tokens, else two launches
        if x.shape[0] <= FUSED_MAX_M:
            return triton_linear_fused(x, p[0], p[1], None, p[3], p[2], od)
        return triton_gemm(*quantize_activation(x, p[3]), p[0], p[1], None, od, p[2])

    def gemv(inline: bool, pdl: bool | None = None):
        """The decode GEMV on float x (scale inside) or on codes from the activation kernel."""
        def run(x, p, od):
            if inline:
                return quant_gemv(x, p[0], p[1], None, p[3], p[2], od, pdl=pdl, counters=counters(x, p))
            a_q, a_s = quantize_activation(x, p[3])
            return quant_gemv(a_q, p[0], p[1], None, p[3], p[2], od, x_scale=a_s, pdl=pdl, counters=counters(x, p))
        return run

    decode = lambda m: m <= SMALL_M  # noqa: E731
    decode_two_launch = lambda m: GEMV_INLINE_SCALE_MAX_M < m <= SMALL_M  # noqa: E731
    return [
        Path("bf16", "bf16", lambda x, p, od: (x @ p[0].t()).to(od)),
        Path("int8 old decode", "int8", old_decode, decode),
        Path("fp8 old decode", "fp8", old_decode, decode),
        Path("w4a8 old decode", "w4a8", old_decode, decode),
        Path("w4a8g64 triton", "w4a8g64", layer("triton"), decode),
        Path("int8 gemv scale inside", "int8", gemv(True), decode_two_launch),
        Path("w4a8 gemv scale inside", "w4a8", gemv(True), decode_two_launch),
        Path("int8 gemv no-pdl", "int8", lambda x, p, od: gemv(x.shape[0] <= GEMV_INLINE_SCALE_MAX_M, False)(x, p, od), decode),
        Path("w4a8 gemv no-pdl", "w4a8", lambda x, p, od: gemv(x.shape[0] <= GEMV_INLINE_SCALE_MAX_M, False)(x, p, od), decode),
        Path("int8 triton", "int8", layer("triton")),
        Path("int8 _int_mm", "int8", layer("torch"), lambda m: m > SMALL_M),
        Path("fp8 triton", "fp8", layer("triton")),
        Path("fp8 _scaled_mm", "fp8", layer("torch")),
        Path("w4a8 triton", "w4a8", layer("triton")),
        Path("int8+had128 triton", "int8", layer("triton", HADAMARD)),
        Path("act quant int8", "int8", lambda x, p, od: quantize_activation(x, "int8")),
        Path("act quant+had128", "int8", lambda x, p, od: quantize_activation(x, "int8", hadamard_block=HADAMARD)),
    ]


def bench(fn: Callable, rep: int = 30) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def bench_graph(run: Callable, x: torch.Tensor, weight_sets: list, rep: int = 40) -> float:
    """Per-call ms of ``run`` on decode-sized inputs, replayed from a CUDA graph of one call per weight copy (as a
    decode step runs under graphs): no Python launch cost, and the copies together overflow L2 so weights come from
    HBM. Eager timing of such small calls measures the host (Triton's launcher costs ~20-40 µs per call)."""
    import triton.testing

    for w in weight_sets:  # compile and autotune outside the capture
        run(x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in weight_sets:
            run(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weight_sets:
            run(x, w)
    graph.replay()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=rep, return_mode="median") / len(weight_sets)


GRAPH_COPIES = 8
_COUNTERS: dict = {}  # (device, weight pointer) -> the decode GEMV counters of that layer


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
    fp8_mm = lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    out["fp8 TFLOP/s (_scaled_mm)"] = 2 * n**3 / bench(fp8_mm) / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    out["copy GB/s"] = 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e6
    return out


def check(path: Path, weights: dict, x: torch.Tensor) -> str:
    """Max and norm relative error of one path vs the fp32 reference (fp32 output, so only the kernel's numerics
    count), or for the activation rows the share of codes that differ from the reference's."""
    from compressor.kernels import quant_reference as ref

    wq, ws, group, act = weights[path.precision]
    had = HADAMARD if "had128" in path.name else 0
    if path.name.startswith("act quant"):
        q, s = path.run(x, weights[path.precision], torch.float32)
        qr, sr = ref.quantize_activation_reference(x.float(), "int8", hadamard_block=had)
        off_by = (q.int() - qr.int()).abs().max()
        return f"codes differing {(q != qr).float().mean():.1e} (max {off_by}), scale rel {((s - sr).abs() / sr).max():.1e}"
    y = path.run(x, weights[path.precision], torch.float32)
    torch.cuda.synchronize()
    yr = ref.quant_linear_reference(x.float(), wq, ws, None, act, group, had, torch.float32)
    if not torch.isfinite(y).all():
        return "NON-FINITE OUTPUT"
    return f"max rel {(y - yr).abs().max() / yr.abs().max():.1e}, norm rel {(y - yr).norm() / yr.norm():.1e}"


def weight_bytes(precision: str, n: int, k: int) -> int:
    return {"bf16": 2 * n * k, "int8": n * k, "fp8": n * k, "w4a8": n * k // 2 + n * (k // GROUP) * 4,
            "w4a8g64": n * k // 2 + n * (k // 64) * 4}[precision]


def autotuned_configs() -> list[str]:
    """What the autotuner chose, per kernel and key (M bucket, N, K, dtypes): the data to freeze a table from."""
    from compressor.kernels import quant_triton

    lines = []
    for (size, weight), tuner in quant_triton.GEMM_TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            lines.append(f"| {size} {weight} | {key} | {cfg} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="markdown file to write the results to (quant_linear_h200.md, or gemv_sweep.md)")
    parser.add_argument("--quick", action="store_true", help="M = 1, 16, 4096 on two shapes")
    parser.add_argument("--gemv-sweep", action="store_true",
                        help="instead: the decode GEMV over a grid of tiles at M = 1, 16 (scripts/bench_quant_gemv.py)")
    args = parser.parse_args()
    if args.gemv_sweep:
        import bench_quant_gemv  # beside this script

        bench_quant_gemv.sweep(args.out or "gemv_sweep.md")
        return
    args.out = args.out or "quant_linear_h200.md"
    import triton

    torch.manual_seed(0)
    ceil = ceilings()
    print("ceilings:", ", ".join(f"{a} {b:.0f}" for a, b in ceil.items()), flush=True)
    all_paths = paths()

    k, n = 4096, 6144  # correctness first: a path that fails here prints why, and is still timed (it may fail again)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    weights = make_weights(w)
    checks = []
    for m in (1, 16, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, :8] *= 20  # outlier channels
        for path in all_paths:
            if path.name == "bf16" or not path.takes(m):
                continue
            try:
                result = check(path, weights, x)
            except Exception:
                print(f"CHECK FAILED {path.name} M={m}:\n{traceback.format_exc()}", flush=True)
                result = "FAILED: " + traceback.format_exc().strip().splitlines()[-1][:200]
            checks.append((path.name, m, result))
            print(f"check {path.name} M={m}: {result}", flush=True)

    shapes = SHAPES[1::2] if args.quick else SHAPES
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        copies = [make_weights(w * (1 + i / 64)) for i in range(GRAPH_COPIES)]  # for decode sizes under graphs
        weights = copies[0]
        for m in ([1, 16, 4096] if args.quick else MS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times, eager = {}, {}
            for path in all_paths:
                if not path.takes(m):
                    continue
                try:
                    eager[path.name] = bench(lambda: path.run(x, weights[path.precision], torch.bfloat16))
                    times[path.name] = eager[path.name]
                    if m <= 16:
                        times[path.name] = bench_graph(lambda xx, ws: path.run(xx, ws[path.precision], torch.bfloat16),
                                                       x, copies)
                except Exception:
                    print(f"FAILED {path.name} {k}->{n} M={m}:\n{traceback.format_exc()}", flush=True)
                    times[path.name] = eager[path.name] = float("nan")
            for name, t in times.items():
                path = next(p for p in all_paths if p.name == name)
                if name.startswith("act"):
                    rows.append((k, n, m, name, t, "", "", "", "", f"{eager[name]:.4f}"))
                    continue
                gbs = (weight_bytes(path.precision, n, k) + 2 * m * k + 2 * m * n) / t / 1e6
                decode = m <= 16
                rows.append((k, n, m, name, t, f"{times['bf16'] / t:.2f}", f"{2 * m * n * k / t / 1e9:.1f}",
                             f"{gbs:.0f}" if decode else "", f"{100 * gbs / ceil['copy GB/s']:.0f}%" if decode else "",
                             f"{eager[name]:.4f}"))
            print(f"{k}->{n} M={m}: " + ", ".join(f"{a} {b:.4f}ms" for a, b in times.items()), flush=True)

    commit = git_commit()
    lines = [
        "# Quantized linear layer, " + torch.cuda.get_device_name(), "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; commit {commit}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        f"- command: `python {' '.join(sys.argv)}`; times: `triton.testing.do_bench` median (L2 flushed), activation"
        " quantization included; `x bf16` = bf16 time / this time; for M <= 16, `ms` is per call replayed from a CUDA"
        f" graph of {GRAPH_COPIES} calls over {GRAPH_COPIES} weight copies (eager: one call from Python, host-bound)",
        "- ceilings measured in the same run (8192^3; copy = read + write): " + ", ".join(f"{a} {b:.0f}" for a, b in ceil.items()),
        "", "## Correctness at K=4096, N=6144 (bf16 x with outlier channels, fp32 output vs the fp32 reference)", "",
        "| path | M | result |", "|---|---|---|",
        *[f"| {p} | {m} | {r} |" for p, m, r in checks],
        "", "## Speed", "",
        "| K->N | M | path | ms | x bf16 | TFLOP/s (TOPS) | GB/s (M<=16) | % of copy | eager ms |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {k}->{n} | {m} | {name} | {t:.4f} | {sp} | {tf} | {gb} | {pc} | {ea} |"
          for k, n, m, name, t, sp, tf, gb, pc, ea in rows],
        "", "## Autotuned GEMM configs", "", "| kernel | key | config |", "|---|---|---|", *autotuned_configs(),
    ]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,temperature.gpu", "--format=csv"], check=False)
    main()
