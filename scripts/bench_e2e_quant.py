"""End to end on a Llama-3-8B-shaped model (random bf16 weights, from its config): quantized linear layers with and
without attention plans, in one run with their bf16 baseline (issue #8, "end to end").

    python scripts/bench_e2e_quant.py --sections prefill,decode --out scripts/results/e2e_quant_h200.md   # ~6 min
    python scripts/bench_e2e_quant.py --sections compress --compress-recipes w4a8 --out scripts/results/e2e_compress_w4a8_h200.md
    python scripts/bench_e2e_quant.py --sections compress --compress-recipes fp8 --out scripts/results/e2e_compress_fp8_h200.md
    python scripts/bench_e2e_quant.py --layers 4 --lengths 16384 --compress-recipes fp8 --out /tmp/e2e_quick.md   # quick
    python scripts/bench_e2e_quant.py --tiny --out /tmp/e2e_tiny.md   # smoke run: tiny config, CPU (the GPU if any)

Sections (``--sections``, default all three):

1. prefill: ``model(ids, logits_to_keep=1)`` without a cache at each ``--lengths`` (median of ``--reps`` after one
   warm-up, bench_prefill_e2e's ``time_prefill``): bf16 on SDPA (cuDNN and flash backends), then the same model with
   every decoder linear layer in w8a8-fp8 (round to nearest; lm_head and embeddings stay bf16) on the faster SDPA
   backend, and with the plans of bench_prefill_e2e on top (sink 64 + window 1024; MoA-like 25%) and the MoA-like
   plan with SageAttention in every layer. Speedups are against the best bf16 SDPA time at that length.
2. decode: for bf16, w8a8-int8 and w4a8 (int4 groups of 128), the bytes of the decoder linear layers and of the whole
   model, and one decode step (one token per row) over a ``--decode-context``-token StaticCache with dense SDPA:
   from Python (bench_decode's ``eager_step_ms``) and replayed from a CUDA graph (``graph_step_ms``) once
   ``first_host_sync`` finds no host synchronisation; tokens/s = batch / step time.
3. compress: a random model saved with SmolLM2's tokenizer (setup, not timed), then ``compressor.pipeline.compress``
   on it per ``--compress-recipes`` on this device, with the wall time of each stage (load, calibration, smoothing,
   sensitivity, search, GPTQ, checkpoint, report); the target is under 30 minutes per recipe.

Random weights measure speed and memory, never accuracy. The sections build their own model (one at a time). A
failing section is reported in the results and the exit status is 1; the other sections still run, and ``--out`` is
rewritten after each section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import itertools
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compressor
from bench_decode import DEVICE, eager_step_ms, filled_static_cache, first_host_sync, graph_step_ms, static_step_inputs
from bench_prefill_e2e import LLAMA3_8B, moa_like_plan, sync, time_prefill, uniform_plan
from compressor import runtime
from compressor.kernels.sage_attention import VARIANTS as SAGE_VARIANTS
from compressor.linear_quant import QuantLinear, apply_linear_plan, select_linears
from compressor.linear_quant.norm_fusion import fuse_input_norms
from compressor.linear_quant.apply import decoder_layers
from compressor.plan import Plan
from provenance import git_commit

GiB = 1024**3
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=4096)  # fmt: skip
SAGE = SAGE_VARIANTS[0]  # the fastest SageAttention variant (int8 QK, fp8 PV)
DECODE_PRECISIONS = ("bf16", "w8a8-int8", "w4a8")
FP8_TARGET = (16384, 1.3)  # issue #8: fp8 linear alone >= 1.3x at 16k
COMPRESS_LIMIT_S = 30 * 60
FALLBACK = "PyTorch reference"  # in the kernels' warnings when they run the reference instead (quant_linear, sage, sparse)
# compress' stages: (module, function, label), each call's time added to its label; apply_gptq_layers runs inside
# save_compressed (the plan's GPTQ rounding happens when the checkpoint is written) and is subtracted from it.
STAGES = [
    ("compressor.pipeline", "load_model", "load model (disk to device)"),
    ("compressor.calibration.data", "calibration_samples", "calibration data (tokenize)"),
    ("compressor.linear_quant.method", "collect_linear_inputs", "calibration forward (linear input statistics)"),
    ("compressor.linear_quant.method", "layer_balance_settings", "smoothing / rotation choice"),
    ("compressor.linear_quant.method", "sensitivity_data", "sensitivity data"),
    ("compressor.linear_quant.method", "measure_sensitivity", "sensitivity (each layer quantized alone)"),
    ("compressor.linear_quant.method", "choose_precisions", "mixed-precision search"),
    ("compressor.linear_quant.gptq", "apply_gptq_layers", "GPTQ + quantize"),
    ("compressor.pipeline", "save_compressed", "save"),
    ("compressor.report", "write_report", "report.html"),
]


# ---------------------------------------------------------------------------------------------------------------
# Model


def llama_config(tiny: bool, layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**(TINY if tiny else LLAMA3_8B), "num_hidden_layers": layers})


def build_model(config: Any) -> nn.Module:
    """Random bf16 weights built on the device (as bench_prefill_e2e builds them), SDPA attention, seed 0."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return model


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def quantize_linears(model: nn.Module, precision_name: str) -> None:
    """Every decoder-layer ``nn.Linear`` (select_linears' defaults: lm_head and embeddings stay bf16) becomes a
    QuantLinear at ``precision_name``: round to nearest, no smoothing, no rotation, no calibration. In place, one
    decoder layer at a time (apply_linear_plan), so the peak is the bf16 model plus one layer's low-bit weights."""
    plan = Plan.dense(model)
    chosen = select_linears(model)
    for (name, _), layer_plan in zip(decoder_layers(model, len(plan.layers)), plan.layers):
        prefix = name + "."
        layer_plan.linear = {c[len(prefix) :]: {"precision": precision_name} for c in chosen if c.startswith(prefix)}
    apply_linear_plan(model, plan)
    free_memory()


def tensor_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters and buffers the modules hold themselves (each tensor once)."""
    sizes = {}
    for module in modules:
        for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            sizes[id(t)] = t.numel() * t.element_size()
    return sum(sizes.values())


def linear_bytes(model: nn.Module) -> int:
    """Stored bytes of the decoder layers' linear layers (low-bit weights and their scales once quantized)."""
    layers = decoder_layers(model, model.config.num_hidden_layers)
    return tensor_bytes(m for _, layer in layers for m in layer.modules() if isinstance(m, (nn.Linear, QuantLinear)))


# ---------------------------------------------------------------------------------------------------------------
# 1. Prefill


def sdpa_backends() -> dict[str, Callable[[], Any]]:
    """The SDPA backends the bf16 baseline is timed with (the CPU has one)."""
    if DEVICE != "cuda":
        return {"SDPA": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {"SDPA cuDNN": functools.partial(sdpa_kernel, SDPBackend.CUDNN_ATTENTION),
            "SDPA flash": functools.partial(sdpa_kernel, SDPBackend.FLASH_ATTENTION)}  # fmt: skip


def attention_plans(model: nn.Module, plan_length: int) -> dict[str, Plan]:
    """bench_prefill_e2e's plans (its MoA-like one fitted at ``plan_length``, then used at every length), and the
    MoA-like plan with every layer's ``attention.quant`` set to SageAttention, as the sage method writes it."""
    sage = moa_like_plan(model, 0.25, plan_length)
    for layer in sage.layers:
        layer.attention.quant = {"variant": SAGE}
    return {"sink64+window1024": uniform_plan(model, 1024), "MoA-like 25%": moa_like_plan(model, 0.25, plan_length),
            f"MoA-like 25% + Sage {SAGE}": sage}  # fmt: skip


def timed_row(rows: list[tuple], n: int, label: str, run: Callable[[], float], density: float, errors: list[str]) -> None:
    """Append (label, ms or None, density, note) to ``rows``; a failure is recorded, not raised."""
    try:
        rows.append((label, run(), density, ""))
    except Exception as err:  # e.g. a kernel that does not compile: the other rows still run
        traceback.print_exc()
        note = f"failed: {first_line(err)}"
        errors.append(f"prefill {n} {label}: {note}")
        rows.append((label, None, density, note))
        free_memory()
    print(f"prefill {n}: {label}: {rows[-1][1]} ms {rows[-1][3]}", flush=True)


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:120] if text else ''}"


def time_plan(model: nn.Module, plan: Plan, ids: torch.Tensor, reps: int) -> float:
    runtime.apply(model, plan)
    try:
        return time_prefill(model, ids, reps)
    finally:
        runtime.remove(model, "sdpa")


def prefill_section(config: Any, args: argparse.Namespace, errors: list[str]) -> list[str]:
    model = build_model(config)
    backends = sdpa_backends()
    gen = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(0, config.vocab_size, (1, n), generator=gen).to(DEVICE) for n in args.lengths}
    rows: dict[int, list[tuple]] = {n: [] for n in args.lengths}
    for n in args.lengths:  # the bf16 baseline first: the linear layers are quantized in place below
        for name, backend in backends.items():
            run = functools.partial(run_with, backend, model, ids[n], args.reps)
            timed_row(rows[n], n, f"bf16, {name}", run, 1.0, errors)
    quantize_linears(model, "w8a8-fp8")
    plans = attention_plans(model, min(args.lengths))
    best: dict[int, tuple[str, float]] = {}
    for n in args.lengths:
        timed = [(label, ms) for label, ms, _, _ in rows[n] if ms is not None]
        if not timed:
            raise RuntimeError(f"no bf16 baseline at {n} tokens (see the errors)")
        best[n] = min(timed, key=lambda r: r[1])
        backend = best[n][0].removeprefix("bf16, ")
        run = functools.partial(run_with, backends[backend], model, ids[n], args.reps)
        timed_row(rows[n], n, f"fp8 linear, {backend}", run, 1.0, errors)
    # What compressor.load / runtime.apply do on CUDA: q/k/v and gate/up apply their RMSNorm in the activation pass.
    fused = fuse_input_norms(model)
    print(f"deferred {fused} RMSNorms to their quantized readers", flush=True)
    for n in args.lengths:
        backend = best[n][0].removeprefix("bf16, ")
        run = functools.partial(run_with, backends[backend], model, ids[n], args.reps)
        timed_row(rows[n], n, f"fp8 linear + RMSNorm fused, {backend}", run, 1.0, errors)
        for name, plan in plans.items():
            run = functools.partial(time_plan, model, plan, ids[n], args.reps)
            timed_row(rows[n], n, f"fp8 linear + {name}", run, plan.density(n), errors)
    del model
    free_memory()
    return prefill_lines(rows, best, args)


def run_with(backend: Callable[[], Any], model: nn.Module, ids: torch.Tensor, reps: int) -> float:
    with backend():
        return time_prefill(model, ids, reps)


def prefill_lines(rows: dict[int, list[tuple]], best: dict[int, tuple[str, float]], args: argparse.Namespace) -> list[str]:
    lines = [f"## Prefill (batch 1, logits_to_keep=1, no cache; median of {args.reps} after one warm-up)", "",
             "fp8 linear: every decoder nn.Linear in w8a8-fp8 (per-channel fp8 weights, per-token fp8 activations, "
             "round to nearest), on the SDPA backend that was faster in bf16 at that length. The MoA-like plan is "
             f"fitted to 25% at {min(args.lengths)} tokens and used as is at every length. From the \"RMSNorm fused\" row "
             "on, q/k/v and gate/up apply their RMSNorm inside their activation pass (what compressor.load does on "
             "CUDA), the plan rows included.", "",
             "| N | variant | ms | speedup vs best bf16 SDPA | attention density |", "|---|---|---|---|---|"]  # fmt: skip
    summary = []
    for n, cells in rows.items():
        base = best[n][1]
        for label, ms, density, note in cells:
            time_cell = f"{ms:.1f}" if ms is not None else note
            speed = f"{base / ms:.2f}x" if ms is not None else "-"
            lines.append(f"| {n} | {label} | {time_cell} | {speed} | {density:.1%} |")
        fastest = min((c for c in cells if c[1] is not None and c[0].startswith("fp8")), key=lambda c: c[1], default=None)
        if fastest:
            summary.append(f"- {n}: fastest is {fastest[0]}, {base / fastest[1]:.2f}x the best bf16 SDPA ({best[n][0]}).")
        fp8 = next((c for c in cells if c[0].startswith("fp8 linear,") and c[1] is not None), None)
        if n == FP8_TARGET[0] and fp8:
            met = "met" if base / fp8[1] >= FP8_TARGET[1] else "MISSED"
            summary.append(f"- target fp8 linear alone >= {FP8_TARGET[1]}x at {n}: {base / fp8[1]:.2f}x ({met}).")
        norm = next((c for c in cells if c[0].startswith("fp8 linear + RMSNorm fused") and c[1] is not None), None)
        if fp8 and norm:
            summary.append(f"- {n}: fusing the RMSNorm into the activation pass: {fp8[1]:.1f} -> {norm[1]:.1f} ms "
                           f"({base / norm[1]:.2f}x the best bf16 SDPA).")
    return lines + [""] + summary + [""]


# ---------------------------------------------------------------------------------------------------------------
# 2. Decode


def decode_step(model: nn.Module, batch: int, n: int, steps: int) -> dict[str, Any]:
    """ms per decode step from Python and from a CUDA graph over a StaticCache of ``n`` tokens, or why no graph."""
    row: dict[str, Any] = {"eager_ms": eager_step_ms(model, filled_static_cache(model, batch, n, steps + 4), batch, n, steps)}
    if DEVICE != "cuda":
        row["graph_note"] = "no CUDA device"
        return row
    cache = filled_static_cache(model, batch, n, steps + 16)  # first_host_sync, warm-up, capture and replays
    inputs = static_step_inputs(model, cache, batch, n, None)
    where = first_host_sync(model, inputs)
    if where is not None:  # a capture would fail at the sync (and could leave the stream capturing)
        row["graph_note"] = f"not captured: host sync at {where}"
        return row
    try:
        row["graph_ms"] = graph_step_ms(model, inputs, steps)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # capture refused: say why
        row["graph_note"] = f"capture failed: {first_line(err)}"
    return row


def decode_section(config: Any, args: argparse.Namespace, errors: list[str]) -> list[str]:
    results: dict[str, dict[str, Any]] = {}
    for prec in DECODE_PRECISIONS:
        try:
            results[prec] = decode_precision(config, prec, args)
        except Exception as err:  # the other precisions still run
            traceback.print_exc()
            errors.append(f"decode {prec}: {first_line(err)}")
            results[prec] = {"error": first_line(err)}
        free_memory()
    return decode_lines(results, args)


def decode_precision(config: Any, prec: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh model with its decoder linear layers at ``prec``: its bytes and a decode step per batch."""
    model = build_model(config)
    if prec != "bf16":
        quantize_linears(model, prec)
    res: dict[str, Any] = {"linear": linear_bytes(model), "model": tensor_bytes(model.modules())}
    for b in args.batches:
        res[b] = decode_step(model, b, args.decode_context, args.decode_steps)
        print(f"decode {prec}, batch {b}: {res[b]}", flush=True)
    return res


def step_ms(row: dict[str, Any], graphed: bool) -> float:
    return row["graph_ms"] if graphed else row["eager_ms"]


def speedup(row: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """bf16's step time over this one: graphed when both were, else eager."""
    if ref is None:
        return "-"
    graphed = "graph_ms" in row and "graph_ms" in ref
    return f"{step_ms(ref, graphed) / step_ms(row, graphed):.2f}x{'' if graphed else ' (eager)'}"


def decode_lines(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    done = {p: r for p, r in results.items() if "error" not in r}
    base = done.get("bf16")
    unit, size = ("GiB", GiB) if max((r["model"] for r in done.values()), default=0) >= GiB else ("MiB", 1024**2)
    lines = [f"## Decode (one token per row over a {args.decode_context}-token StaticCache, dense SDPA; "
             f"mean of {args.decode_steps} steps)", "",
             "Quantized: weights rounded to nearest, per-token int8 activations; w4a8: int4 groups of 128. lm_head and "
             "embeddings stay bf16. Linear bytes: the decoder layers' nn.Linear / QuantLinear tensors (scales included).",
             "", f"| weights | decoder linear {unit} | vs bf16 | whole model {unit} |", "|---|---|---|---|"]  # fmt: skip
    for prec, r in done.items():
        ratio = f"{r['linear'] / base['linear']:.2f}x" if base else "-"
        lines.append(f"| {prec} | {r['linear'] / size:.2f} | {ratio} | {r['model'] / size:.2f} |")
    lines += ["", "| weights | batch | eager step ms | eager tokens/s | graph step ms | graph tokens/s | "
              "speedup vs bf16 (graph; eager where no graph) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    notes = [f"- {prec}: failed ({r['error']})" for prec, r in results.items() if "error" in r]
    for prec, r in done.items():
        for b in args.batches:
            row = r[b]
            graph = f"{row['graph_ms']:.2f} | {b / row['graph_ms'] * 1e3:.0f}" if "graph_ms" in row else "- | -"
            lines.append(f"| {prec} | {b} | {row['eager_ms']:.2f} | {b / row['eager_ms'] * 1e3:.0f} | {graph} | "
                         f"{speedup(row, base[b] if base else None)} |")  # fmt: skip
            if "graph_note" in row:
                notes.append(f"- {prec}, batch {b}: no graph ({row['graph_note']})")
    return lines + [""] + notes + ([""] if notes else [])


# ---------------------------------------------------------------------------------------------------------------
# 3. compress


def _timed(fn: Callable, label: str, seconds: dict[str, float]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sync(torch.device(DEVICE))
            seconds[label] += time.perf_counter() - t0

    return wrapper


@contextlib.contextmanager
def timed_stages() -> Iterator[dict[str, float]]:
    """Wrap the functions of STAGES (module attributes, so calls through the module see the wrapper) for the block;
    yields seconds per stage label."""
    seconds = {label: 0.0 for _, _, label in STAGES}
    saved = []
    try:
        for module_name, attr, label in STAGES:
            module = importlib.import_module(module_name)
            original = getattr(module, attr)  # AttributeError: a stage was renamed; update STAGES
            saved.append((module, attr, original))
            setattr(module, attr, _timed(original, label, seconds))
        yield seconds
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def save_random_model(config: Any, folder: Path, tokenizer_dir: str | None = None) -> None:
    """The random bf16 model (vocab at least the tokenizer's) and SmolLM2's tokenizer (from the embedded model, or a
    folder it was saved to), as a Hugging Face folder."""
    from compressor.models import load_model

    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        _, tokenizer, _ = load_model("smollm2-135m", device="cpu")
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # every token id valid (49152 <= 128256)
    model = build_model(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    free_memory()


def compress_one(model_dir: Path, recipe: str, output: Path) -> dict[str, Any]:
    """Run compress (what the CLI runs) on ``model_dir`` with ``recipe`` on this device; stage seconds and the plan's
    mixed-precision choice."""
    from compressor.pipeline import compress

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[compress {recipe} +{time.perf_counter() - started:.0f}s] {msg}", flush=True)

    with timed_stages() as seconds:
        plan, _ = compress(str(model_dir), recipe, output, device=DEVICE, log=log)
        total = time.perf_counter() - started
    chosen = (plan.search.get("linear") or {}).get("chosen")
    return {"seconds": dict(seconds), "total": total, "method": plan.calibration.get("seconds", {}), "chosen": chosen}


def exclusive_stages(r: dict[str, Any]) -> dict[str, float]:
    """Stage seconds that add up to the total: GPTQ taken out of the save, the rest of the method and of the run."""
    s = dict(r["seconds"])
    save, report = s.pop("save"), s.pop("report.html")
    s["write checkpoint"] = save - s["GPTQ + quantize"]
    s["report.html"] = report
    method = sum(v for k, v in r["method"].items() if k != "load")
    inside = sum(s[label] for m, _, label in STAGES if m.endswith("method") or m.endswith("calibration.data"))
    s["rest of the methods (per-layer settings)"] = method - inside
    s["other (plan, logging)"] = r["total"] - sum(s.values())
    return s


def compress_section(config: Any, args: argparse.Namespace, errors: list[str]) -> list[str]:
    from compressor.recipe import load_recipe

    for recipe in args.compress_recipes:  # a wrong name fails now, not after saving a 16 GB model
        load_recipe(recipe)
    root = Path(tempfile.mkdtemp(prefix="bench_e2e_quant_"))
    results: dict[str, dict[str, Any]] = {}
    try:
        t0 = time.perf_counter()
        save_random_model(config, root / "model", args.tokenizer)
        setup = time.perf_counter() - t0
        print(f"random model saved in {setup:.0f} s", flush=True)
        for recipe in args.compress_recipes:
            try:
                results[recipe] = compress_one(root / "model", recipe, root / f"out-{recipe}")
            except Exception as err:  # the other recipes still run
                traceback.print_exc()
                errors.append(f"compress {recipe}: {type(err).__name__}: {err}")
            finally:
                shutil.rmtree(root / f"out-{recipe}", ignore_errors=True)
                free_memory()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return compress_lines(results, f"vocab {config.vocab_size}, saved in {setup:.0f} s", args)


def compress_lines(results: dict[str, dict[str, Any]], setup: str, args: argparse.Namespace) -> list[str]:
    recipes = list(results)
    lines = [f"## compress ({', '.join(args.compress_recipes)}) on this device, seconds per stage", "",
             f"Setup, not timed: random bf16 model with SmolLM2's tokenizer as safetensors ({setup}). "
             "GPTQ rounding runs while the checkpoint is written (save_compressed applies the plan).", ""]  # fmt: skip
    if not recipes:
        return lines + ["No recipe finished (see Errors).", ""]
    stages = {r: exclusive_stages(results[r]) for r in recipes}
    lines += ["| stage | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    for label in stages[recipes[0]]:
        lines.append(f"| {label} | " + " | ".join(f"{round(stages[r][label], 1) + 0.0:.1f}" for r in recipes) + " |")
    lines.append("| **total** | " + " | ".join(f"**{results[r]['total']:.1f}**" for r in recipes) + " |")
    lines.append("| under 30 min | " + " | ".join("yes" if results[r]["total"] < COMPRESS_LIMIT_S else "NO" for r in recipes) + " |")
    lines.append("")
    for r in recipes:
        chosen = results[r]["chosen"]
        if chosen:
            lines.append(f"- {r}: mixed precision chose {chosen.get('counts')} at {chosen.get('avg_bits')} average bits.")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------


SECTIONS: dict[str, Callable[[Any, argparse.Namespace, list[str]], list[str]]] = {
    "prefill": prefill_section, "decode": decode_section, "compress": compress_section,
}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="prefill,decode,compress", help="comma-separated: prefill, decode, compress")
    ap.add_argument("--layers", type=int, help="decoder layers (default 32 = Llama-3-8B; 2 with --tiny)")
    ap.add_argument("--lengths", type=int_list, help="prefill lengths (default 16384,65536; 64,128 with --tiny)")
    ap.add_argument("--reps", type=int, default=3, help="timed prefill runs per variant (after one warm-up)")
    ap.add_argument("--batches", type=int_list, default=[1, 16], help="decode batch sizes")
    ap.add_argument("--decode-context", type=int, default=1024, help="tokens in the decode cache")
    ap.add_argument("--decode-steps", type=int, default=8, help="timed decode steps")
    ap.add_argument("--compress-recipes", default="w4a8,fp8", type=lambda s: [x for x in s.split(",") if x],
                    help="recipes (built-in names or files) the compress section runs, one after the other")
    ap.add_argument("--tokenizer", help="a folder holding SmolLM2's saved tokenizer (default: the embedded model's)")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama config (hidden 256, 2 layers) for a smoke run")
    ap.add_argument("--out", help="markdown results file")
    args = ap.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.layers = args.layers or (TINY["num_hidden_layers"] if args.tiny else LLAMA3_8B["num_hidden_layers"])
    args.lengths = args.lengths or ([64, 128] if args.tiny else [16384, 65536])
    return args


def header(args: argparse.Namespace) -> list[str]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU ({platform.machine()}, no CUDA)"
    shape = (f"tiny Llama config ({', '.join(f'{k} {v}' for k, v in TINY.items() if k != 'num_hidden_layers')})"
             if args.tiny else "Meta-Llama-3-8B's config (hidden 4096, 32 heads, 8 KV heads, head_dim 128, ffn 14336, "
             "vocab 128256)")  # fmt: skip
    return [
        "# End to end: quantized linear layers and attention plans, Llama-3-8B-shaped model (random bf16 weights)", "",
        f"- device: {device}; date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}, "
        f"compressor {compressor.__version__}, commit {git_commit()}",
        f"- command: `{shlex.join(['python'] + sys.argv)}`",
        f"- model: {shape}, {args.layers} decoder layers; random weights: speed and memory only, never accuracy", "",
    ]  # fmt: skip


def section_warnings(section: str, caught: list[warnings.WarningMessage], errors: list[str]) -> list[str]:
    """Print the section's warnings once each; list the kernels' warnings that they ran the PyTorch reference:
    expected without CUDA, an error with it (the times would not be the kernels')."""
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    for message in messages:  # recording silenced them: show each once
        print(f"warning ({section}) {message[:300]}", file=sys.stderr)
    found = list(dict.fromkeys(str(w.message) for w in caught if FALLBACK in str(w.message)))
    if not found:
        return []
    if DEVICE == "cuda":
        errors += [f"{section}: {m}" for m in found]
    expected = " (expected: no CUDA device)" if DEVICE != "cuda" else ""
    return [f"Reference fallbacks in {section}{expected}:", ""] + [f"- {m}" for m in found] + [""]


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    lines, errors = header(args), []
    for section in args.sections:
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lines += SECTIONS[section](llama_config(args.tiny, args.layers), args, errors)
        except Exception as err:  # the other sections still run; the exit status says it failed
            traceback.print_exc()
            errors.append(f"{section}: {first_line(err)}")
            lines += [f"## {section}: FAILED", "", "```", traceback.format_exc().rstrip()[-3000:], "```", ""]
            free_memory()
        lines += section_warnings(section, caught, errors)
        lines += [f"{section} section: {time.perf_counter() - t0:.0f} s.", ""]
        write(args.out, lines, errors, started)
    text = write(args.out, lines, errors, started)
    print(text)
    if errors:
        print(f"bench_e2e_quant: {len(errors)} error(s):\n" + "\n".join(errors), file=sys.stderr)
    return 1 if errors else 0


def write(out: str | None, lines: list[str], errors: list[str], started: float) -> str:
    """The results so far as markdown (written to ``out`` when given)."""
    tail = (["## Errors", ""] + [f"- {e}" for e in errors] + [""]) if errors else []
    text = "\n".join(lines + tail + [f"Total run time {time.perf_counter() - started:.0f} s."]) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
