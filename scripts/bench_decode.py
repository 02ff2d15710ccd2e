"""Benchmark: decoding with the plan's sink + window cache against transformers' dense cache on SDPA.

Model: Llama-3-8B shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head dim 128, vocab 128256), random bf16
weights built on the meta device and materialised on the GPU. Caches are filled with synthetic state of the
context length (decode speed does not depend on the values), so no prefill is timed.

1. Kernel: our split-K decode kernel vs SDPA (dense, same context) and FlexAttention (same sink + window mask) on
   one layer's shapes; achieved HBM bandwidth vs a measured device copy.
2. End to end: one decode step of the whole model (eager, HF generate's forward): latency, tokens/s, cache bytes vs
   the plan's ideal vs dense; the largest batch each cache fits.

    python scripts/bench_decode.py --out scripts/results/decode_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import subprocess
import sys
import time

import torch

from compressor import runtime
from compressor.cache import PlanCache, layer_layout
from compressor.kernels.decode_attention import decode_attention_triton
from compressor.plan import DensePattern, Plan, WindowPattern

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GiB = 1024**3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke run of the end-to-end part


def llama3_8b(layers: int) -> torch.nn.Module:
    """Llama-3-8B-shaped model with random bf16 weights on the GPU (meta init, then materialised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device=DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config, device=DEVICE)
    model.set_attn_implementation("sdpa")
    return model.eval()


def uniform_heads() -> list[list]:
    return [WindowPattern(alpha=2048.0, beta=0.0, sink=64)] * Q_HEADS


def moa_heads(layer: int) -> list:
    """Per KV head (tied across its 4 query heads): one dense, two elastic (512 + N/4), five local (256..2048).
    About 25% of the keys read at 8k-32k; which KV head is dense rotates with the layer."""
    kinds = [DensePattern(), WindowPattern(alpha=512.0, beta=0.25, sink=64), WindowPattern(alpha=512.0, beta=0.25, sink=64)]
    kinds += [WindowPattern(alpha=float(w), beta=0.0, sink=64) for w in (256, 512, 1024, 2048, 1024)]
    kinds = kinds[layer % 8 :] + kinds[: layer % 8]
    return [p for p in kinds for _ in range(Q_HEADS // KV_HEADS)]


def make_plan(model, name: str) -> Plan:
    plan = Plan.dense(model)
    for i, layer in enumerate(plan.layers):
        layer.attention.heads = uniform_heads() if name == "sink64+win2048" else moa_heads(i)
    return plan


def read_fraction(plan_name: str, n: int) -> float:
    """Share of the context the plan's decode reads (mean over KV heads of min(N, sink + window(N)) / N)."""
    heads = uniform_heads() if plan_name == "sink64+win2048" else moa_heads(0)
    per_kv = heads[:: Q_HEADS // KV_HEADS]
    return sum(n if isinstance(h, DensePattern) else min(n, h.sink + h.window_for_length(n)) for h in per_kv) / (len(per_kv) * n)


def ms(fn, reps: int = 50) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=reps)


# ---------------------------------------------------------------------------------------------------------------
# 1. Kernel microbenchmark


def copy_bandwidth() -> float:
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * GiB / (ms(lambda: b.copy_(a)) * 1e-3)


def bench_kernel(model, plan_name: str, n: int, batch: int) -> dict:
    plan = make_plan(model, plan_name)
    rt = runtime.layer_runtime(0, plan.layers[0].attention.heads, None)
    layout = layer_layout(rt, KV_HEADS, n, None)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    k_buf = torch.randn(batch, layout.slots, HEAD_DIM, **dev)
    v_buf = torch.randn_like(k_buf)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, **dev)
    length = torch.full((batch,), n, device="cuda")
    from compressor.cache import head_windows

    window = head_windows(rt.alpha.cuda(), rt.beta.cuda(), length, None)
    sink = rt.sink.cuda()
    meta = {k: torch.tensor(getattr(layout, k), dtype=torch.int32, device="cuda") for k in ("region_start", "sink_cap", "ring_cap")}
    max_tokens = max(s + r for s, r in zip(layout.sink_cap, layout.ring_cap))
    ours = ms(lambda: decode_attention_triton(q, k_buf, v_buf, **meta, length=length, sink=sink, window=window, max_tokens=max_tokens))
    read = sum(min(n, s + r) for s, r in zip(layout.sink_cap, layout.ring_cap)) * batch * HEAD_DIM * 2 * 2
    row = {"ours_us": ours * 1e3, "ours_GBps": read / (ours * 1e-3) / 1e9}
    kd = torch.randn(batch, KV_HEADS, n, HEAD_DIM, **dev)
    vd = torch.randn_like(kd)
    q4 = q[:, :, None]
    row["sdpa_dense_us"] = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)) * 1e3
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        w_h, s_h = window[0].to(torch.int64), sink.to(torch.int64)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < s_h[h]) | (kv_idx >= n - w_h[h])

        block_mask = create_block_mask(mask_mod, None, Q_HEADS, 1, n, device="cuda")
        flex = torch.compile(flex_attention)
        flex(q4, kd, vd, block_mask=block_mask, enable_gqa=True)
        row["flex_us"] = ms(lambda: flex(q4, kd, vd, block_mask=block_mask, enable_gqa=True)) * 1e3
    except Exception as err:  # FlexAttention missing or unable to decode these shapes: say so in the table
        row["flex_us"] = float("nan")
        row["flex_error"] = f"{type(err).__name__}: {str(err)[:80]}"
    del kd, vd, k_buf, v_buf
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------------
# 2. End to end


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def filled_dense_cache(model, batch: int, n: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        k = torch.zeros(batch, KV_HEADS, n, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        cache.update(k, torch.zeros_like(k), i)
    return cache


def filled_plan_cache(model, batch: int, n: int, extra: int) -> PlanCache:
    cache = PlanCache(model, batch, n + extra)
    empty = torch.zeros(batch, KV_HEADS, 0, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        layer.seen, layer.batch = n, batch
        layer.lengths = torch.full((batch,), n, dtype=torch.int64, device=DEVICE)
    return cache


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_steps(model, cache, batch: int, n: int, steps: int) -> float:
    """Mean seconds per decode step (one token per row), after two warm-up steps."""
    name = cache_kwarg(model)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=DEVICE)
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            total = n + i + 1
            mask = torch.ones(batch, total, dtype=torch.long, device=DEVICE)
            pos = torch.full((batch, 1), total - 1, device=DEVICE)
            _sync()
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{name: cache})
            _sync()
            times.append(time.perf_counter() - t0)
    return sum(times[2:]) / steps


def dense_bytes_per_row(layers: int, n: int) -> int:
    return 2 * layers * KV_HEADS * n * HEAD_DIM * 2


def run_e2e(model, kind: str, batch: int, n: int, steps: int) -> dict:
    layers = model.config.num_hidden_layers
    if kind == "dense (SDPA, DynamicCache)":
        runtime.remove(model, "sdpa")
        cache = filled_dense_cache(model, batch, n)
        nbytes = dense_bytes_per_row(layers, n) * batch
        ideal = nbytes
    else:
        runtime.apply(model, make_plan(model, kind))
        cache = filled_plan_cache(model, batch, n, steps + 4)
        nbytes = cache.nbytes()
        ideal = cache.ideal_nbytes(n, HEAD_DIM, torch.bfloat16)
    step = decode_steps(model, cache, batch, n, steps)
    del cache
    torch.cuda.empty_cache()
    return {"step_ms": step * 1e3, "tok_s": batch / step, "cache_GiB": nbytes / GiB, "ideal_GiB": ideal / GiB,
            "dense_GiB": dense_bytes_per_row(layers, n) * batch / GiB}  # fmt: skip


def largest_batch(model, kind: str, n: int, steps: int, cap: int) -> tuple[int, dict | None]:
    """Largest batch whose cache fits beside the weights (from the bytes per row, then checked by running it)."""
    layers = model.config.num_hidden_layers
    if kind == "dense (SDPA, DynamicCache)":
        per_row = dense_bytes_per_row(layers, n) * (1 + 1.0 / layers)  # a layer's torch.cat copy at each step
    else:
        runtime.apply(model, make_plan(model, kind))
        per_row = PlanCache(model, 1, n + steps + 4).ideal_nbytes(n + steps + 4, HEAD_DIM, torch.bfloat16)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    batch = min(cap, int((free - 6 * GiB) / per_row))
    while batch >= 1:
        try:
            return batch, run_e2e(model, kind, batch, n, steps)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch = int(batch * 0.85)
    return 0, None


# ---------------------------------------------------------------------------------------------------------------


def versions() -> str:
    import transformers
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}, commit {commit or '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="scripts/results/decode_h200.md")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B); fewer to save time")
    parser.add_argument("--contexts", default="8192,32768,65536")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch-cap", type=int, default=256, help="largest batch tried")
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    started = time.time()
    torch.manual_seed(0)
    model = llama3_8b(args.layers)
    plans = ["sink64+win2048", "MoA-like 25%"]
    kinds = ["dense (SDPA, DynamicCache)"] + plans
    lines = [
        "# Decode with the plan's cache vs dense (Llama-3-8B shapes, random bf16 weights)",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- {versions()}",
        f"- command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`",
        f"- layers: {args.layers} of 32; caches filled with synthetic state of the context length; {args.steps} timed steps",
        "",
    ]

    copy_bw = copy_bandwidth()
    lines += [f"Measured device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s", "",
              "## Decode attention kernel, one layer (32 q heads, 8 KV heads, d 128, bf16)", "",
              "| context | batch | plan | keys read | ours µs | SDPA dense µs | Flex (same mask) µs | ours GB/s | % of copy BW |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    flex_note = ""
    for n in contexts:
        for b in batches:
            for p in plans:
                r = bench_kernel(model, p, n, b)
                flex_note = r.get("flex_error", flex_note)
                row = (f"| {n} | {b} | {p} | {read_fraction(p, n):.1%} | {r['ours_us']:.1f} | {r['sdpa_dense_us']:.1f} | "
                       f"{r['flex_us']:.1f} | {r['ours_GBps']:.0f} | {r['ours_GBps'] / (copy_bw / 1e9):.0%} |")  # fmt: skip
                print(row, flush=True)
                lines.append(row)
    if flex_note:
        lines += ["", f"FlexAttention failed on some shapes: {flex_note}"]

    lines += ["", "## Whole-model decode step", "",
              "| context | batch | cache | step ms | tokens/s | cache GiB | ideal GiB | dense GiB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in contexts:
        for b in batches:
            for kind in kinds:
                try:
                    r = run_e2e(model, kind, b, n, args.steps)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    lines.append(f"| {n} | {b} | {kind} | OOM | | | | |")
                    continue
                row = (f"| {n} | {b} | {kind} | {r['step_ms']:.1f} | {r['tok_s']:.0f} | {r['cache_GiB']:.2f} | "
                       f"{r['ideal_GiB']:.2f} | {r['dense_GiB']:.2f} |")  # fmt: skip
                print(row, flush=True)
                lines.append(row)

    lines += ["", f"## Largest batch that fits (capped at {args.max_batch_cap})", "",
              "| context | cache | largest batch | step ms | tokens/s | cache GiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for n in contexts:
        for kind in kinds:
            if time.time() - started > 400:
                lines.append(f"| {n} | {kind} | skipped (time budget) | | | |")
                continue
            b, r = largest_batch(model, kind, n, 3, args.max_batch_cap)
            row = f"| {n} | {kind} | {b} | " + (f"{r['step_ms']:.1f} | {r['tok_s']:.0f} | {r['cache_GiB']:.2f} |" if r else "| | |")
            print(row, flush=True)
            lines.append(row)
    lines += ["", f"Total run time {time.time() - started:.0f} s."]
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
