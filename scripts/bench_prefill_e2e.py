"""End-to-end prefill of a Llama-3-8B-shaped model (random bf16 weights) with a plan applied vs SDPA, on a GPU.

    python scripts/bench_prefill_e2e.py --lengths 16384,65536 --out scripts/results/prefill_e2e_h200.md

Random weights are fine for speed, never for accuracy. Each row times ``model(ids, logits_to_keep=1)`` without a
cache (median of a few runs after a warm-up); attention-only share is the difference to a no-op attention.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import compressor
from compressor import runtime
from compressor.plan import DensePattern, Plan, WindowPattern
from provenance import emit

# Meta-Llama-3-8B's config (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, ffn 14336, vocab 128256).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


def uniform_plan(model, window: int, sink: int = 64) -> Plan:
    plan = Plan.dense(model)
    for layer in plan.layers:
        layer.attention.heads = [WindowPattern(alpha=float(window), beta=0.0, sink=sink)] * len(layer.attention.heads)
    return plan


def moa_like_plan(model, density: float, length: int, seed: int = 0) -> Plan:
    """Heterogeneous per-head windows (one rule per KV group, ~10% dense groups) averaging ``density`` at ``length``."""
    gen = torch.Generator().manual_seed(seed)
    plan = Plan.dense(model)
    groups = len(plan.layers) * plan.model.num_key_value_heads
    shares = torch.exp(torch.randn(groups, generator=gen) * 1.2)
    dense = torch.rand(groups, generator=gen) < 0.1

    def build(scale: float) -> Plan:
        g = 0
        for layer in plan.layers:
            heads = []
            for _ in range(plan.model.num_key_value_heads):
                w = max(64, int(scale * float(shares[g]) * length))
                pat = DensePattern() if dense[g] or w >= length else WindowPattern(alpha=float(w), beta=0.0, sink=64)
                heads += [pat] * (plan.model.num_attention_heads // plan.model.num_key_value_heads)
                g += 1
            layer.attention.heads = heads
        return plan

    lo, hi = 0.0, 2.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if build(mid).density(length) <= density else (lo, mid)
    return build(lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, ids: torch.Tensor, reps: int) -> float:
    """Median ms of ``reps`` cache-free forwards (one warm-up first); on the CPU too (for smoke runs)."""
    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)
        sync(ids.device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            sync(ids.device)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    import transformers
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real 8B)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, config.vocab_size, (1, n), device="cuda")
        res: dict[str, float] = {}
        for name, backend in [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)]:
            with sdpa_kernel(backend):
                res[name] = time_prefill(model, ids, args.reps)
        plans = {"window-1024": uniform_plan(model, 1024), "moa-like-25%": moa_like_plan(model, 0.25, 16384)}
        for name, plan in plans.items():
            runtime.apply(model, plan)
            res[name] = time_prefill(model, ids, args.reps)
            res[name + " density"] = plan.density(n)
            runtime.remove(model, "sdpa")
        best = min(res["sdpa-cudnn"], res["sdpa-flash"])
        rows.append((n, res, best))
        print(n, {k: round(v, 3) for k, v in res.items()}, flush=True)
    lines = [
        "# End-to-end prefill, Llama-3-8B-shaped (random bf16 weights), batch 1, logits_to_keep=1, no cache",
        "",
        f"- device: {torch.cuda.get_device_name()}; date: {datetime.date.today()}; torch {torch.__version__}, "
        f"triton {triton.__version__}, transformers {transformers.__version__}, compressor {compressor.__version__}",
        f"- layers: {args.layers}; median of {args.reps} runs after one warm-up",
        f"- command: `python scripts/bench_prefill_e2e.py --lengths {args.lengths} --layers {args.layers}`",
        "",
        "| N | SDPA cuDNN ms | SDPA flash ms | sink64+window1024 ms (density) | speedup vs best SDPA | MoA-like ms (density) | speedup vs best SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r, best in rows:
        lines.append(
            f"| {n} | {r['sdpa-cudnn']:.1f} | {r['sdpa-flash']:.1f} | {r['window-1024']:.1f} ({r['window-1024 density']:.1%}) | "
            f"{best / r['window-1024']:.2f}x | {r['moa-like-25%']:.1f} ({r['moa-like-25% density']:.1%}) | {best / r['moa-like-25%']:.2f}x |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
