"""Benchmark: the Triton sparse-attention kernel against SDPA (cuDNN, flash) and FlexAttention on the same masks.

Patterns (causal, bf16, head dim 128, batch 1): dense causal; sink 64 + window 1024 on every head; a MoA-like
per-head mix (a few dense heads, some widening with N, the rest local) near 25% of the causal blocks at 16k.
FLOP counts use the pattern's visited 128 x 128 blocks (FlexAttention's block mask): 4 * D * 128^2 per block.
Accuracy: against a float32 reference at N <= 16k; above, against FlexAttention's bf16 output.

    python scripts/bench_sparse_attention.py --out scripts/results/sparse_attention_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import compressor.kernels.sparse_attention as sa
from compressor.kernels.reference import sparse_attention_reference
from compressor.kernels.sparse_attention import sparse_attention

HEAD_DIM = 128
BLOCK = 128


def moa_mix(q_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head (sink, alpha, beta): 1/8 dense, 1/4 widening with N (1024 + N/8), the rest local (256 to 1024)."""
    sink = torch.full((q_heads,), 64, dtype=torch.int32)
    alpha = torch.empty(q_heads)
    beta = torch.zeros(q_heads)
    for h in range(q_heads):
        kind = h % 8
        if kind == 0:
            alpha[h] = math.inf
        elif kind in (1, 2):
            alpha[h], beta[h] = 1024.0, 0.125
        else:
            alpha[h] = (256.0, 512.0, 1024.0, 256.0, 512.0)[kind - 3]
    return sink, alpha, beta


def pattern(name: str, q_heads: int):
    if name == "dense causal":
        return None, None, None
    if name == "sink64+window1024":
        return (torch.full((q_heads,), 64, dtype=torch.int32), torch.full((q_heads,), 1024.0), torch.zeros(q_heads))
    if name == "MoA mix":
        return moa_mix(q_heads)
    raise ValueError(name)


def flex_block_mask(name: str, q_heads: int, n: int, sink, alpha, beta):
    """FlexAttention's block mask for the same visibility rule (per head for the mix)."""
    if name == "dense causal":
        return create_block_mask(lambda b, h, q, k: q >= k, None, None, n, n, device="cuda", _compile=True)
    window = torch.clamp(torch.floor(alpha + beta * n).nan_to_num(n, n, n), 1, n).to(torch.int32).cuda()
    sinks = sink.cuda()

    def visible(b, h, q, k):
        return (q >= k) & ((q - k < window[h]) | (k < sinks[h]))

    return create_block_mask(visible, None, q_heads if name == "MoA mix" else None, n, n, device="cuda", _compile=True)


def visited_blocks(mask, q_heads: int) -> int:
    """Blocks FlexAttention visits for all heads (partial + full), with a broadcast head dim expanded."""
    blocks = mask.kv_num_blocks.sum().item()
    if mask.full_kv_num_blocks is not None:
        blocks += mask.full_kv_num_blocks.sum().item()
    return int(blocks * (q_heads if mask.kv_num_blocks.shape[1] == 1 else 1))


def bench(fn) -> float:
    """Median ms via triton.testing.do_bench, with enough repeats for long runs."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(25, 2 * est), rep=max(100, 8 * est), return_mode="median")


def accuracy(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    g, w = got.float().flatten(), want.float().flatten()
    return {
        "cos": torch.nn.functional.cosine_similarity(g, w, dim=0).item(),
        "rel_l1": ((g - w).abs().sum() / w.abs().sum()).item(),
        "rmse": (g - w).pow(2).mean().sqrt().item(),
    }


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def run(lengths, head_configs, patterns, fp32_max: int, ceiling: float, flex) -> list[dict]:
    rows = []
    for n in lengths:
        for q_heads, kv_heads in head_configs:
            gen = torch.Generator(device="cuda").manual_seed(n + q_heads + kv_heads)
            q = torch.randn(1, q_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, kv_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(1, kv_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            group = q_heads // kv_heads
            dense = {}
            for name in patterns:
                sink, alpha, beta = pattern(name, q_heads)
                kw = {} if sink is None else dict(sink=sink.cuda(), alpha=alpha.cuda(), beta=beta.cuda())
                mask = flex_block_mask(name, q_heads, n, sink, alpha, beta)
                blocks = visited_blocks(mask, q_heads)
                causal_blocks = q_heads * (n // BLOCK) * (n // BLOCK + 1) // 2
                flops = 4 * HEAD_DIM * BLOCK * BLOCK * blocks
                tuner = sa._triton_kernels().tuned
                tuner.cache.clear()  # tune for this pattern (in a model, the first pattern of a class decides)
                ours_out = sparse_attention(q, k, v, **kw)
                c = tuner.best_config
                tile = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                times = {"ours": bench(lambda: sparse_attention(q, k, v, **kw))}
                flex_out = flex(q, k, v, block_mask=mask, enable_gqa=group > 1)
                times["flex"] = bench(lambda: flex(q, k, v, block_mask=mask, enable_gqa=group > 1))
                if name == "dense causal":
                    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
                        with sdpa_kernel(backend):
                            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)  # noqa: E731
                            times[label] = bench(f)
                            dense[label] = times[label]
                    del ke, ve
                row = dict(n=n, heads=f"{q_heads}/{kv_heads}", pattern=name, density=blocks / causal_blocks, tile=tile, **times)
                row["tflops"] = flops / times["ours"] / 1e9
                row["vs_ceiling"] = row["tflops"] / ceiling
                row["flex_tflops"] = flops / times["flex"] / 1e9
                row["x_flex"] = times["flex"] / times["ours"]
                for label in ("cudnn", "flash"):
                    if label in dense:
                        row[f"x_{label}"] = dense[label] / times["ours"]
                if n <= fp32_max:
                    want = sparse_attention_reference(q.float(), k.float(), v.float(), **kw)
                    row["acc"] = accuracy(ours_out, want)
                    row["acc_flex"] = accuracy(flex_out, want)
                    row["acc_ref"] = "fp32"
                else:
                    row["acc"] = accuracy(ours_out, flex_out)
                    row["acc_ref"] = "Flex bf16"
                rows.append(row)
                print(format_row(row), flush=True)
                del ours_out, flex_out, mask
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    def opt(key, fmt="{:.2f}"):
        return fmt.format(r[key]) if key in r else "-"

    acc = r["acc"]
    acc_flex = r.get("acc_flex")
    flex_acc = f" (Flex cos {acc_flex['cos']:.6f})" if acc_flex else ""
    return (
        f"| {r['n'] // 1024}k | {r['heads']} | {r['pattern']} | {r['density']:.3f} | {r['tile']} | {r['ours']:.3f} | {r['flex']:.3f} | "
        f"{opt('cudnn', '{:.3f}')} | {opt('flash', '{:.3f}')} | {r['tflops']:.0f} | {r['vs_ceiling']:.2f} | "
        f"{r['flex_tflops']:.0f} | {r['x_flex']:.2f} | {opt('x_cudnn')} | {opt('x_flash')} | "
        f"cos {acc['cos']:.6f}, relL1 {acc['rel_l1']:.2e}, RMSE {acc['rmse']:.2e} vs {r['acc_ref']}{flex_acc} |"
    )


HEADER = (
    "| N | heads q/kv | pattern | visited-block density (of causal) | tile (autotuned) | ours ms | Flex ms | cuDNN ms | flash ms | "
    "ours TFLOP/s | ours / matmul | Flex TFLOP/s | x Flex | x cuDNN | x flash | accuracy (ours) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def sweep(lengths, heads, patterns) -> str:
    """Time every autotuning config of the kernel on each pattern: which tile suits which pattern."""
    shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in sa._autotune_configs(triton)]
    lines = ["| N | heads | pattern | " + " | ".join("%dx%d w%d s%d" % c for c in shapes) + " |"]
    lines.append("|---|---|---|" + "---|" * len(shapes))
    for n in lengths:
        for q_heads, kv_heads in heads:
            gen = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(1, q_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, kv_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(1, kv_heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for name in patterns:
                sink, alpha, beta = pattern(name, q_heads)
                kw = {} if sink is None else dict(sink=sink.cuda(), alpha=alpha.cuda(), beta=beta.cuda())
                cells = []
                for bm, bn, w, st in shapes:
                    cfg = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                    cells.append("%.3f" % bench(lambda: sparse_attention(q, k, v, **kw, **cfg)))
                lines.append(f"| {n // 1024}k | {q_heads}/{kv_heads} | {name} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536,131072")
    parser.add_argument("--heads", default="32/8,32/32", help="q_heads/kv_heads configurations")
    parser.add_argument("--mha-max", type=int, default=65536, help="longest N for configurations with no GQA")
    parser.add_argument("--fp32-max", type=int, default=16384, help="longest N checked against float32")
    parser.add_argument("--patterns", default="dense causal,sink64+window1024,MoA mix")
    parser.add_argument("--out", default="scripts/results/sparse_attention_h200.md")
    parser.add_argument("--sweep", action="store_true", help="time every config per pattern instead")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    heads = [tuple(int(y) for y in x.split("/")) for x in args.heads.split(",")]
    patterns = args.patterns.split(",")
    torch._dynamo.config.cache_size_limit = 64
    if args.sweep:
        text = sweep(lengths, heads, patterns)
        with open(args.out, "w") as f:
            f.write(text)
        return
    ceiling = matmul_ceiling()
    print(f"bf16 matmul 8192^3: {ceiling:.0f} TFLOP/s", flush=True)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for n in lengths:
        configs = [h for h in heads if h[0] != h[1] or n <= args.mha_max]
        rows += run([n], configs, patterns, args.fp32_max, ceiling, flex)
    lines = [
        "# Sparse attention: Triton kernel vs SDPA and FlexAttention",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, triton {triton.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- bf16 matmul ceiling (8192^3, same run): {ceiling:.0f} TFLOP/s",
        "- batch 1, head dim 128, bf16, causal; times are `triton.testing.do_bench` medians;"
        " TFLOP/s count the visited 128x128 blocks of each pattern for every method;"
        " the kernel is autotuned afresh for each pattern and size",
        "",
        HEADER,
        *[format_row(r) for r in rows],
    ]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
