"""Benchmark: decoding with the plan's sink + window cache against dense caches on SDPA.

Model: Llama-3-8B shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head dim 128, vocab 128256), random bf16
weights built on the meta device and materialised on the GPU. Caches are filled with synthetic state of the
context length (decode speed does not depend on the values), so no prefill is timed.

1. Kernel: our split-K decode kernel vs SDPA (dense, same context) and FlexAttention (same sink + window mask) on
   one layer's shapes; "no PDL" is the same kernel and launch plan without programmatic dependent launch (each
   launch waits for the one before to finish instead of starting its programs while it drains). The cache layer
   step is timed with the fused store kernel and with the torch ops it replaced. "graph" times are GPU times: calls
   back to back in one CUDA graph, cycling through enough copies of the buffers that none is found in L2 (a model
   step evicts L2 between layers too). "eager" times are one call at a time from Python (host overhead included).
   GB/s counts the K/V bytes the kernel must read.
2. End to end: one decode step of the whole model (HF forward, one token per row), eager and replayed from a CUDA
   graph: latency, tokens/s, cache bytes vs the plan's ideal vs dense; the largest batch each cache fits. Before
   capturing, one eager step runs under ``torch.cuda.set_sync_debug_mode("error")`` to find host synchronisations.

    python scripts/bench_decode.py --out scripts/results/decode_h200.md
    python scripts/bench_decode.py --kernel-only --out scripts/results/decode_kernel_h200.md   # about a minute
    python scripts/bench_decode.py --kernel-only --sweep --out /tmp/sweep.md   # + launch settings, a few shapes
    python scripts/bench_decode.py --sweep-only --out /tmp/sweep.md   # launch settings only (about a minute)
    python scripts/bench_decode.py --skip-kernel --out scripts/results/decode_e2e_h200.md   # whole model only
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from compressor import cache as cache_module
from compressor import runtime
from compressor.attention_layers import layer_runtime
from compressor.cache import PlanCache, PlanCacheLayer, head_windows, layer_layout, query_head_params
from compressor.kernels.cache_store import store_decode_token_reference
from compressor.kernels.decode_attention import decode_attention, decode_attention_triton, decode_launch
from compressor.plan import DensePattern, Plan, WindowPattern
from provenance import git_commit

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS
GiB = 1024**3
L2_FLUSH_BYTES = 256 * 1024**2  # several times the H200's L2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke run of the end-to-end part
SINK_WIN, MOA = "sink64+win2048", "MoA-like 25%"
DENSE_DYNAMIC, DENSE_STATIC = "dense (SDPA, DynamicCache)", "dense (SDPA, StaticCache)"


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


def uniform_heads() -> list:
    return [WindowPattern(alpha=2048.0, beta=0.0, sink=64)] * Q_HEADS


def moa_heads(layer: int) -> list:
    """Per KV head (tied across its 4 query heads): one dense, two elastic (512 + N/4), five local (256..2048).
    About 25% of the keys read at 8k-32k; which KV head is dense rotates with the layer."""
    kinds = [DensePattern(), WindowPattern(alpha=512.0, beta=0.25, sink=64), WindowPattern(alpha=512.0, beta=0.25, sink=64)]
    kinds += [WindowPattern(alpha=float(w), beta=0.0, sink=64) for w in (256, 512, 1024, 2048, 1024)]
    kinds = kinds[layer % 8 :] + kinds[: layer % 8]
    return [p for p in kinds for _ in range(GROUP)]


def plan_heads(name: str, layer: int) -> list:
    return uniform_heads() if name == SINK_WIN else moa_heads(layer)


def make_plan(model, name: str) -> Plan:
    plan = Plan.dense(model)
    for i, layer in enumerate(plan.layers):
        layer.attention.heads = plan_heads(name, i)
    return plan


def tokens_read(layout, window: torch.Tensor, n: int) -> int:
    """Stored tokens the kernel reads per row at length ``n``: per KV head, its sink part and its ring from the
    group's widest window on (the kernel's own rule)."""
    total = 0
    for g, (sink_cap, ring_cap) in enumerate(zip(layout.sink_cap, layout.ring_cap)):
        w = int(window[g * GROUP : (g + 1) * GROUP].max())
        ring_lo = max(sink_cap, n - w, n - ring_cap)
        total += min(n, sink_cap) + min(max(n - ring_lo, 0), ring_cap)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Timing


def eager_us(fn) -> float:
    """One call at a time from Python, L2 flushed between calls (triton's do_bench): host overhead included."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3


def graph_us(calls: list, total_calls: int = 120) -> float:
    """GPU time per call: ``total_calls`` calls back to back in one CUDA graph, cycling through ``calls`` (each on
    its own buffers, so that the cycle overflows L2). Median of 5 replays."""
    for call in calls[:2]:  # compile and build launch plans outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(total_calls):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / total_calls)
    del graph
    return sorted(times)[2]


def copy_bandwidth() -> float:
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * GiB / (eager_us(lambda: b.copy_(a)) * 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 1. Kernel microbenchmark


def kernel_case(plan_name: str, n: int, batch: int) -> dict:
    """One layer's decode inputs over a cache of context ``n``, with enough K/V buffer copies to overflow L2."""
    rt = layer_runtime(0, plan_heads(plan_name, 0), None)
    layout = layer_layout(rt, KV_HEADS, n, None)
    sink, alpha, beta = (t.to("cuda") for t in query_head_params(rt, None))
    length = torch.full((batch,), n, dtype=torch.int64, device="cuda")
    window = head_windows(alpha, beta, length, None)
    buf_bytes = 2 * batch * layout.slots * HEAD_DIM * 2
    copies = max(1, min(32, -(-L2_FLUSH_BYTES // buf_bytes)))
    bufs = [(torch.randn(batch, layout.slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
             torch.randn(batch, layout.slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]  # fmt: skip
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    args = dict(region_start=layout.region_start, sink_cap=layout.sink_cap, ring_cap=layout.ring_cap, length=length,
                sink=sink, window=window)  # fmt: skip
    read = tokens_read(layout, window[0].cpu(), n) * batch * HEAD_DIM * 2 * 2
    capacity = tuple(s + r for s, r in zip(layout.sink_cap, layout.ring_cap))
    return dict(q=q, bufs=bufs, args=args, read=read, dense=batch * KV_HEADS * n * HEAD_DIM * 2 * 2, capacity=capacity)


def launch_label(batch: int, launch) -> str:
    merge = "" if not launch.needs_merge else (", fused merge" if launch.fused_merge else ", merge launch")
    return f"{batch * launch.programs} x {launch.chunk_tokens}{merge}"


def time_ours(plan_name: str, n: int, batch: int) -> dict:
    case = kernel_case(plan_name, n, batch)
    q, bufs, args = case["q"], case["bufs"], case["args"]
    launch = decode_launch(batch, case["capacity"], q.device)
    row = {"launch": launch_label(batch, launch), "read": case["read"], "dense": case["dense"]}
    row["ours_graph_us"] = graph_us([lambda k=k, v=v: decode_attention(q, k, v, **args) for k, v in bufs])
    row["nopdl_graph_us"] = graph_us([lambda k=k, v=v: decode_attention_triton(q, k, v, **args, pdl=False) for k, v in bufs])
    k0, v0 = bufs[0]
    row["ours_eager_us"] = eager_us(lambda: decode_attention(q, k0, v0, **args))
    row["window"], row["sink"] = args["window"][0], args["sink"]
    return row


def time_layer_step(plan_name: str, n: int, batch: int, torch_store: bool = False) -> float:
    """GPU µs of one layer's whole decode step through the cache, as the model runs it: ``PlanCacheLayer.update``
    and the attention function's call back (store the new K/V in place, windows at the new lengths, the kernel).
    ``torch_store``: the store as the torch ops the fused store kernel replaced (its reference)."""
    room = 1024  # tokens the warm-up, the capture and the replays append
    rt = layer_runtime(0, plan_heads(plan_name, 0), None)
    layout = layer_layout(rt, KV_HEADS, n + room, None)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    k_new, v_new = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, **dev), torch.randn(batch, KV_HEADS, 1, HEAD_DIM, **dev)
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, **dev)
    mask = torch.ones(batch, n + room, dtype=torch.bool, device="cuda")
    module = SimpleNamespace(compressor_layer=rt)
    layers = []
    for _ in range(max(1, min(32, -(-L2_FLUSH_BYTES // (2 * batch * layout.slots * HEAD_DIM * 2))))):
        layer = PlanCacheLayer(rt, layout, batch, n + room)
        layer.lazy_initialization(k_new, v_new)
        layer.seen, layer.batch = n, batch
        layer.lengths = torch.full((batch,), n, dtype=torch.int64, device="cuda")
        layers.append(layer)

    def step(layer: PlanCacheLayer) -> torch.Tensor:
        pending, _ = layer.update(k_new, v_new)
        return pending.compressor_attend(module, query, mask, None, None)

    fused_store = cache_module.store_decode_token
    cache_module.store_decode_token = store_decode_token_reference if torch_store else fused_store
    try:
        return graph_us([lambda layer=layer: step(layer) for layer in layers])
    finally:
        cache_module.store_decode_token = fused_store


def time_dense(n: int, batch: int, window: torch.Tensor, sink: torch.Tensor) -> dict:
    """SDPA over the dense cache of the same context, and FlexAttention with the plan's mask over it."""
    kv_bytes = 2 * batch * KV_HEADS * n * HEAD_DIM * 2
    dense = [(torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
              torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16))
             for _ in range(max(1, min(16, -(-L2_FLUSH_BYTES // kv_bytes))))]  # fmt: skip
    q4 = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row = {"sdpa_graph_us": graph_us([lambda k=k, v=v: sdpa(q4, k, v, enable_gqa=True) for k, v in dense])}
    kd, vd = dense[0]
    row["sdpa_eager_us"] = eager_us(lambda: sdpa(q4, kd, vd, enable_gqa=True))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        w_h, s_h = window.to(torch.int64), sink.to(torch.int64)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < s_h[h]) | (kv_idx >= n - w_h[h])

        block_mask = create_block_mask(mask_mod, None, Q_HEADS, 1, n, device="cuda")
        flex = torch.compile(flex_attention)
        flex(q4, kd, vd, block_mask=block_mask, enable_gqa=True)
        row["flex_us"] = eager_us(lambda: flex(q4, kd, vd, block_mask=block_mask, enable_gqa=True))
    except Exception as err:  # FlexAttention missing or unable to decode these shapes: say so in the table
        row["flex_us"] = float("nan")
        row["flex_error"] = f"{type(err).__name__}: {str(err)[:80]}"
    return row


def bench_kernel(plan_name: str, n: int, batch: int) -> dict:
    row = time_ours(plan_name, n, batch)
    torch.cuda.empty_cache()
    row["layer_graph_us"] = time_layer_step(plan_name, n, batch)
    torch.cuda.empty_cache()
    row["layer_torch_store_us"] = time_layer_step(plan_name, n, batch, torch_store=True)
    torch.cuda.empty_cache()
    row.update(time_dense(n, batch, row.pop("window"), row.pop("sink")))
    torch.cuda.empty_cache()
    return row


def kernel_section(contexts, batches, copy_bw: float) -> list[str]:
    lines = ["## Decode attention kernel, one layer (32 q heads, 8 KV heads, d 128, bf16)", "",
             "Target: SDPA dense / ours >= 0.7 / (share of keys read), both as GPU time (graph).", "",
             "Cache layer step: the whole decode step of one layer through PlanCacheLayer (store the new K/V, windows, "
             "kernel), in a graph.", "",
             "| context | batch | plan | keys read | programs x chunk | ours graph µs | no PDL graph µs | "
             "ours eager µs | cache layer step graph µs | layer step, torch store µs | "
             "SDPA dense graph µs | SDPA eager µs | Flex (same mask) µs | speedup | target | ours GB/s | % of copy BW |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    flex_note = ""
    for n in contexts:
        for b in batches:
            for p in (SINK_WIN, MOA):
                r = bench_kernel(p, n, b)
                flex_note = r.get("flex_error", flex_note)
                share = r["read"] / r["dense"]
                speedup, target = r["sdpa_graph_us"] / r["ours_graph_us"], 0.7 / share
                gbps = r["read"] / (r["ours_graph_us"] * 1e-6) / 1e9
                row = (f"| {n} | {b} | {p} | {share:.1%} | {r['launch']} | {r['ours_graph_us']:.1f} | "
                       f"{r['nopdl_graph_us']:.1f} | {r['ours_eager_us']:.1f} | "
                       f"{r['layer_graph_us']:.1f} | {r['layer_torch_store_us']:.1f} | {r['sdpa_graph_us']:.1f} | "
                       f"{r['sdpa_eager_us']:.1f} | "
                       f"{r['flex_us']:.1f} | {speedup:.1f}x | {target:.1f}x{'' if speedup >= target else ' (missed)'} | "
                       f"{gbps:.0f} | {gbps / (copy_bw / 1e9):.0%} |")  # fmt: skip
                print(row, flush=True)
                lines.append(row)
    if flex_note:
        lines += ["", f"FlexAttention failed on some shapes: {flex_note}"]
    return lines + [""]


def sweep_section() -> list[str]:
    """Launch settings (tile, programs per SM, stages, merge) on the shapes that missed their targets; GPU time in a
    CUDA graph. Each row's chunking is what decode_launch's cost model picks for those settings; rows with
    programs/SM "-" fix the chunk length instead."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = ["## Launch-setting sweep (graph µs; default: block 64, 4 programs/SM, 4 warps, 2 stages, merge separate)", "",
             "| context | batch | plan | block_n | programs/SM | stages | warps | merge | programs x chunk | µs | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shapes = ((8192, 8, SINK_WIN), (65536, 8, MOA), (8192, 1, SINK_WIN), (32768, 1, MOA), (65536, 1, MOA))
    for n, b, p in shapes:
        case = kernel_case(p, n, b)
        q, bufs, args = case["q"], case["bufs"], case["args"]
        results = []
        for block_n in (32, 64):
            for per_sm in (2, 3, 4, 6):
                for stages in (2, 3):
                    for merge in (None, "separate"):
                        launch = decode_launch(b, case["capacity"], q.device, block_n=block_n, programs=per_sm * sms,
                                               num_stages=stages, merge=merge)  # fmt: skip
                        if merge == "separate" and not launch.needs_merge:
                            continue
                        try:
                            us = graph_us([lambda k=k, v=v: decode_attention_triton(q, k, v, **args, launch=launch) for k, v in bufs], 60)
                        except Exception as err:  # e.g. out of shared memory
                            print(f"sweep {n} {b} {p} {block_n} {per_sm} {stages} {merge}: {type(err).__name__}", flush=True)
                            continue
                        results.append((us, block_n, per_sm, stages, 4, merge or "auto", launch_label(b, launch)))
        for chunk in (64, 128, 256, 512, 1024):  # the cost model's guess at the merge's cost, checked at a few chunks
            launch = decode_launch(b, case["capacity"], q.device, block_n=64, chunk_tokens=chunk)
            us = graph_us([lambda k=k, v=v: decode_attention_triton(q, k, v, **args, launch=launch) for k, v in bufs], 60)
            results.append((us, 64, "-", 2, 4, "auto", launch_label(b, launch)))
        # fewer, longer programs with deeper pipelines: down to one per KV head and row (no merge at all)
        for chunk in (1024, 1 << 20):
            for block_n in (64, 128):
                for stages in (2, 3, 4):
                    for warps in (4, 8):
                        launch = decode_launch(b, case["capacity"], q.device, block_n=block_n, chunk_tokens=chunk,
                                               num_stages=stages, num_warps=warps)  # fmt: skip
                        try:
                            us = graph_us([lambda k=k, v=v: decode_attention_triton(q, k, v, **args, launch=launch) for k, v in bufs], 60)
                        except Exception as err:  # e.g. out of shared memory
                            print(f"sweep {n} {b} {p} chunk {chunk} {block_n} {stages} {warps}: {type(err).__name__}", flush=True)
                            continue
                        results.append((us, block_n, "-", stages, warps, "auto", launch_label(b, launch)))
        results.sort(key=lambda r: r[0])
        for us, block_n, per_sm, stages, warps, merge, label in results[:8]:
            row = (f"| {n} | {b} | {p} | {block_n} | {per_sm} | {stages} | {warps} | {merge} | {label} | {us:.1f} | "
                   f"{case['read'] / us / 1e3:.0f} |")
            print(row, flush=True)
            lines.append(row)
        default = [r for r in results if r[1:6] == (64, 4, 2, 4, "auto")]
        if default:
            rank = results.index(default[0]) + 1
            lines.append(f"| {n} | {b} | {p} | default: rank {rank} of {len(results)} | | | | | {default[0][6]} | "
                         f"{default[0][0]:.1f} | |")
        del bufs, case
        torch.cuda.empty_cache()
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------
# 2. End to end


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def filled_dynamic_cache(model, batch: int, n: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        k = torch.zeros(batch, KV_HEADS, n, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        cache.update(k, torch.zeros_like(k), i)
    return cache


def filled_static_cache(model, batch: int, n: int, extra: int):
    """transformers' StaticCache (in-place updates, CUDA-graph friendly) holding ``n`` tokens, room for ``extra``."""
    from transformers import StaticCache

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = StaticCache(config=config, max_cache_len=n + extra)
    empty = torch.zeros(batch, config.num_key_value_heads, 0, head_dim, device=DEVICE, dtype=torch.bfloat16)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        layer.cumulative_length.fill_(n)
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


def eager_step_ms(model, cache, batch: int, n: int, steps: int) -> float:
    """Mean ms per decode step (one token per row) from Python, after two warm-up steps; masks grow each step."""
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
    return sum(times[2:]) / steps * 1e3


def static_step_inputs(model, cache, batch: int, n: int, mask_len: int | None) -> dict:
    """Inputs of one decode step that stay valid for every replay (a mask at least as long as any step needs)."""
    mask = None if mask_len is None else torch.ones(batch, mask_len, dtype=torch.long, device=DEVICE)
    return dict(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=DEVICE), attention_mask=mask,
                position_ids=torch.full((batch, 1), n, dtype=torch.long, device=DEVICE), use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): cache})  # fmt: skip


def first_host_sync(model, inputs: dict) -> str | None:
    """Where one eager decode step first synchronises with the host, or None (after a warm-up step)."""
    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(**inputs)
        except RuntimeError as err:
            frames = traceback.extract_tb(err.__traceback__)
            ours = [f for f in frames if "compressor/" in f.filename or "transformers/" in f.filename] or frames
            f = ours[-1]
            path = f.filename[max(f.filename.rfind("compressor/"), f.filename.rfind("transformers/"), 0):]
            return f"{path}:{f.lineno} in {f.name}: `{f.line}`"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return None


def graph_step_ms(model, inputs: dict, steps: int) -> float:
    """Mean ms per decode step replayed from a CUDA graph of one whole-model forward (captured after two warm-up
    steps on a side stream). Replays advance the caches on the device; Python-side counters stay put."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(**inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**inputs)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / steps


def dense_bytes_per_row(layers: int, n: int) -> int:
    return 2 * layers * KV_HEADS * n * HEAD_DIM * 2


class GraphReadiness:
    """What capturing a decode step needs per cache kind, found once by :func:`first_host_sync` on a small cache."""

    def __init__(self):
        self.notes: dict[str, str] = {}
        self.capturable: dict[str, bool] = {}

    def check(self, model, kind: str) -> None:
        if kind in self.notes or DEVICE != "cuda":
            return
        cache, inputs = graph_cache_and_inputs(model, kind, 1, 256, 8)
        where = first_host_sync(model, inputs)
        self.capturable[kind] = where is None
        if where is None:
            self.notes[kind] = "no host sync in a decode step: the whole model forward is captured as is"
        else:
            self.notes[kind] = f"host sync at {where}: not captured"
        del cache
        torch.cuda.empty_cache()


def graph_cache_and_inputs(model, kind: str, batch: int, n: int, steps: int):
    """A cache for capture, sized for warm-up, capture and ``steps`` replays, and its static step inputs."""
    room = steps + 16
    if kind == DENSE_STATIC:
        runtime.remove(model, "sdpa")
        cache = filled_static_cache(model, batch, n, room)
        return cache, static_step_inputs(model, cache, batch, n, None)
    runtime.apply(model, make_plan(model, kind))
    cache = filled_plan_cache(model, batch, n, room)
    return cache, static_step_inputs(model, cache, batch, n, n + room)


def run_e2e(model, kind: str, batch: int, n: int, steps: int, readiness: GraphReadiness) -> dict:
    """Eager step (DynamicCache for dense, PlanCache for plans) and graph-replayed step (StaticCache for dense)."""
    layers = model.config.num_hidden_layers
    row = {"dense_GiB": dense_bytes_per_row(layers, n) * batch / GiB}
    if kind == DENSE_DYNAMIC:
        runtime.remove(model, "sdpa")
        cache = filled_dynamic_cache(model, batch, n)
        row.update(cache_GiB=row["dense_GiB"], ideal_GiB=row["dense_GiB"], eager_ms=eager_step_ms(model, cache, batch, n, steps))
        del cache
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
        return row
    if kind != DENSE_STATIC:
        runtime.apply(model, make_plan(model, kind))
        cache = filled_plan_cache(model, batch, n, steps + 4)
        row.update(cache_GiB=cache.nbytes() / GiB, ideal_GiB=cache.ideal_nbytes(n, HEAD_DIM, torch.bfloat16) / GiB,
                   eager_ms=eager_step_ms(model, cache, batch, n, steps))  # fmt: skip
        del cache
    else:
        row.update(cache_GiB=row["dense_GiB"], ideal_GiB=row["dense_GiB"])
    if DEVICE != "cuda":
        return row
    torch.cuda.empty_cache()
    readiness.check(model, kind)
    if not readiness.capturable[kind]:  # a capture would fail at the sync (and could leave the stream capturing)
        row["graph_error"] = "not captured (host sync, see below)"
        return row
    cache, inputs = graph_cache_and_inputs(model, kind, batch, n, steps)
    try:
        row["graph_ms"] = graph_step_ms(model, inputs, steps)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # capture refused: say why in the table
        row["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    del cache, inputs
    torch.cuda.empty_cache()
    return row


def largest_batch(model, kind: str, n: int, steps: int, cap: int, readiness: GraphReadiness) -> tuple[int, dict | None]:
    """Largest batch whose cache fits beside the weights (from the bytes per row, then checked by running it)."""
    layers = model.config.num_hidden_layers
    if kind in (DENSE_DYNAMIC, DENSE_STATIC):
        per_row = dense_bytes_per_row(layers, n) * (1 + 1.0 / layers)  # a layer's torch.cat copy at each step
    else:
        runtime.apply(model, make_plan(model, kind))
        per_row = PlanCache(model, 1, n + steps + 16).ideal_nbytes(n + steps + 16, HEAD_DIM, torch.bfloat16)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    batch = min(cap, int((free - 8 * GiB) / per_row))
    while batch >= 1:
        try:
            return batch, run_e2e(model, kind, batch, n, steps, readiness)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch = int(batch * 0.85)
    return 0, None


def e2e_row(n: int, b: int | str, kind: str, r: dict, batch: int) -> str:
    eager = f"{r['eager_ms']:.1f} | {batch / r['eager_ms'] * 1e3:.0f}" if "eager_ms" in r else "- | -"
    graph = f"{r['graph_ms']:.1f} | {batch / r['graph_ms'] * 1e3:.0f}" if "graph_ms" in r else f"{r.get('graph_error', '-')} | -"
    return f"| {n} | {b} | {kind} | {eager} | {graph} | {r['cache_GiB']:.2f} | {r['ideal_GiB']:.2f} | {r['dense_GiB']:.2f} |"


def e2e_section(model, contexts, batches, steps: int, cap: int, started: float) -> list[str]:
    readiness = GraphReadiness()
    kinds = [DENSE_DYNAMIC, DENSE_STATIC, SINK_WIN, MOA]
    lines = ["## Whole-model decode step (eager: from Python; graph: one forward replayed from a CUDA graph)", "",
             "| context | batch | cache | eager step ms | eager tokens/s | graph step ms | graph tokens/s | cache GiB | ideal GiB | dense GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in contexts:
        for b in batches:
            for kind in kinds:
                try:
                    r = run_e2e(model, kind, b, n, steps, readiness)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    lines.append(f"| {n} | {b} | {kind} | OOM | | | | | | |")
                    continue
                row = e2e_row(n, b, kind, r, b)
                print(row, flush=True)
                lines.append(row)
    lines += ["", "CUDA-graph capture, per cache (one eager step under torch.cuda.set_sync_debug_mode('error')):", ""]
    lines += [f"- {kind}: {note}" for kind, note in readiness.notes.items()]
    lines += ["- dense (SDPA, DynamicCache) is not captured: its update concatenates, so a replay would re-read the "
              "pre-capture tensors; StaticCache is transformers' in-place cache for CUDA graphs and stands for dense there.",
              "- Replays advance each cache on the device (PlanCache lengths and ring slots, StaticCache positions) while "
              "Python-side counters (PlanCacheLayer.seen, the mask length) stay at their capture values: right for timing "
              "a step; a generation loop on graphs must also feed the new token ids and positions into the static inputs.",
              "", f"## Largest batch that fits (capped at {cap})", "",
              "| context | batch | cache | eager step ms | eager tokens/s | graph step ms | graph tokens/s | cache GiB | ideal GiB | dense GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in contexts:
        for kind in kinds[1:]:
            if time.time() - started > 480:
                lines.append(f"| {n} | skipped (time budget) | {kind} | | | | | | | |")
                continue
            b, r = largest_batch(model, kind, n, 3, cap, readiness)
            row = e2e_row(n, b, kind, r, b) if r else f"| {n} | 0 | {kind} | | | | | | | |"
            print(row, flush=True)
            lines.append(row)
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------


def versions() -> str:
    import transformers
    import triton

    commit = git_commit()
    return f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}, commit {commit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="scripts/results/decode_h200.md")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B); fewer to save time")
    parser.add_argument("--contexts", default="8192,32768,65536")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch-cap", type=int, default=256, help="largest batch tried")
    parser.add_argument("--kernel-only", action="store_true", help="only the kernel section (no model; about a minute)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's launch settings on a few shapes")
    parser.add_argument("--skip-kernel", action="store_true", help="only the end-to-end sections")
    parser.add_argument("--sweep-only", action="store_true", help="only the launch-setting sweep (about a minute)")
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    started = time.time()
    torch.manual_seed(0)
    lines = [
        "# Decode with the plan's cache vs dense (Llama-3-8B shapes, random bf16 weights)",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- {versions()}",
        f"- command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`",
        "",
    ]
    copy_bw = copy_bandwidth()
    lines += [f"Measured device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s", ""]
    if args.sweep_only:
        lines += sweep_section()
        args.skip_kernel = args.kernel_only = True
    if not args.skip_kernel:
        lines += kernel_section(contexts, batches, copy_bw)
        if args.sweep:
            lines += sweep_section()
        lines.append(f"Kernel section: {time.time() - started:.0f} s.")
    if not args.kernel_only:
        model = llama3_8b(args.layers)
        lines += ["", f"Model: {args.layers} of 32 layers; caches filled with synthetic state of the context length; "
                  f"{args.steps} timed steps.", ""]  # fmt: skip
        lines += e2e_section(model, contexts, batches, args.steps, args.max_batch_cap, started)
    lines += [f"Total run time {time.time() - started:.0f} s."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
