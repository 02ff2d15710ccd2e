"""Sweep the decode GEMV's tiles (kernels/quant_gemv.py) on a CUDA GPU in one run of about two minutes.

For the Llama-3-8B shapes (K -> N: 4096->6144, 4096->4096, 4096->28672, 14336->4096) at M = 1 and 16, int8 and
W4A8 (fp8 takes int8's tiles), every config of a focused grid is timed the way bench_quant_linear times decode
sizes: a CUDA graph of one call per weight copy (8 copies, more bytes than L2), activation quantization included.
The grid keeps what can matter for a weight stream: 8-16 KiB of weight per pipeline stage (16-byte loads along K),
2-9 stages, 4 or 8 warps, split-K from 1 to 16 where it gives about 1-8 programs per SM with at least 16 KiB of
weight each. The best three per case are then timed longer, without programmatic dependent launch and (M = 1) on
codes from the activation kernel. Beside them: bf16 (cuBLAS), the narrow-tile GEMM that quant_linear runs by
default (`old`), and at M = 1 the online-Hadamard diagnostics (why the rotated path was 5x slower in the GEMV).

All compiles happen first, in parallel worker processes (they fill Triton's disk cache), each run checked against
the reference there. The report ends with entries for ``quant_linear.DECODE_ROUTES``.

    python scripts/bench_quant_gemv.py --out gemv_sweep.md      # or: bench_quant_linear.py --gemv-sweep --out ...
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable

import torch

from bench_quant_linear import GRAPH_COPIES, SHAPES, bench_graph, weight_bytes
from provenance import git_commit

SWEEP_MS = (1, 16)
GROUP = 128  # int4 group size
HADAMARD = 128
# (BLOCK_N, BLOCK_K, num_warps, num_stages). int8: a stage is BLOCK_N x BLOCK_K bytes, 8 or 16 KiB.
W8_TILES = [
    (16, 512, 4, 4), (16, 512, 4, 6), (16, 1024, 4, 3), (16, 1024, 8, 4),
    (32, 256, 4, 4), (32, 256, 4, 6), (32, 512, 4, 3), (32, 512, 4, 4), (32, 512, 8, 4),
    (64, 256, 4, 4), (64, 256, 8, 3), (64, 128, 4, 6),
]
# int4: BLOCK_K is the group (128), so a stage is only BLOCK_N x 64 bytes: wider N tiles (the per-step costs that do
# not grow with N, the activation codes and the group's correction, spread over more weight) and deeper pipelines.
W4_TILES = [
    (32, 128, 4, 6), (64, 128, 4, 4), (64, 128, 4, 6), (64, 128, 4, 8), (128, 128, 4, 3), (128, 128, 4, 4),
    (128, 128, 4, 6), (128, 128, 8, 4), (256, 128, 4, 3), (256, 128, 4, 4), (256, 128, 8, 3), (256, 128, 8, 4),
]
SPLITS = (1, 2, 4, 8, 16)
MIN_PROGRAM_BYTES = 16 * 1024  # a split program streams at least this much weight
MAX_PROGRAMS_PER_SM = 8  # beyond, a split only adds partial sums
TOP = 3
GRID_REP_MS, TOP_REP_MS = 20, 40
BUDGET_S = 110.0  # grid runs still untimed after this many seconds are skipped (and counted in the report)
DEVICE = "cuda"  # a dry run of the bookkeeping on the CPU interpreter sets "cpu"


@dataclass(frozen=True)
class SweepRun:
    """One timed way to compute a ``k -> n`` layer on ``m`` tokens. ``kind``: bf16 (cuBLAS), old (the narrow-tile
    GEMM), gemv, or rot+old / rot+gemv (the online Hadamard first); a GEMV's ``tiles`` are (BLOCK_N, BLOCK_K,
    num_warps, num_stages, SPLIT_K), ``inside``: it quantizes float x itself (else the activation kernel runs first)."""

    precision: str  # bf16, int8 or w4a8
    k: int
    n: int
    m: int
    kind: str
    tiles: tuple[int, ...] = ()
    inside: bool = True
    pdl: bool = True
    x_dtype: str = "bf16"

    @property
    def config(self) -> dict:
        bn, bk, warps, stages, split = self.tiles
        return dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)

    @property
    def case(self) -> tuple[str, int, int, int]:
        return self.precision, self.k, self.n, self.m

    def compile_key(self) -> tuple:
        """Runs with equal keys launch the same compiled kernels: SPLIT_K is a runtime value, every K and N here a
        multiple of 16; the old path's autotuner compiles its whole list per K (its absmax chunk follows K)."""
        shape = (self.tiles[:4], self.tiles[4] > 1) if self.tiles else (self.k,)
        return self.precision, self.m, self.kind, self.inside, self.pdl, self.x_dtype, shape

    def label(self) -> str:
        text = self.kind
        if self.tiles:
            bn, bk, warps, stages, split = self.tiles
            text += f" N{bn} K{bk} w{warps} s{stages} split{split}, " + ("scale inside" if self.inside else "codes")
            text += "" if self.pdl else ", no pdl"
        return text + (", x fp32" if self.x_dtype == "fp32" else "")


def splits_for(bn: int, bk: int, k: int, n: int, weight_bytes_per_value: float, sms: int) -> list[int]:
    """Split-K counts worth timing for one tile: enough programs, none starved of weight or of K steps."""
    tiles, steps = -(-n // bn), -(-k // bk)
    keep = []
    for split in SPLITS:
        programs = tiles * split
        if split == 1:
            ok = programs >= 0.9 * sms
        else:
            ok = (0.9 * sms <= programs <= MAX_PROGRAMS_PER_SM * sms and steps >= 2 * split
                  and bn * k / split * weight_bytes_per_value >= MIN_PROGRAM_BYTES)
        if ok:
            keep.append(split)
    return keep


def grid_runs(precision: str, k: int, n: int, m: int, sms: int) -> list[SweepRun]:
    """The grid for one case, plus the config gemv_config picks today (first)."""
    from compressor.kernels.quant_gemv import gemv_config

    int4 = precision == "w4a8"
    rule = gemv_config(m, n, k, GROUP if int4 else 0, sms)
    runs = [SweepRun(precision, k, n, m, "gemv", (rule["BLOCK_N"], rule["BLOCK_K"], rule["num_warps"],
                                                   rule["num_stages"], rule["SPLIT_K"]), inside=m == 1)]
    for bn, bk, warps, stages in W4_TILES if int4 else W8_TILES:
        for split in splits_for(bn, bk, k, n, 0.5 if int4 else 1.0, sms):
            run = SweepRun(precision, k, n, m, "gemv", (bn, bk, warps, stages, split), inside=m == 1)
            if run != runs[0]:
                runs.append(run)
    return runs


def variants(run: SweepRun) -> list[SweepRun]:
    """How a top grid run is timed besides: without PDL, and at M = 1 on codes from the activation kernel."""
    return [replace(run, pdl=False)] + ([replace(run, inside=False)] if run.m == 1 else [])


def hadamard_diagnostics(k: int, n: int, rule: SweepRun) -> list[SweepRun]:
    """int8, M = 1: the rotated (fp32) input through the old path, through the GEMV (as before the fix, without PDL,
    on codes), and unrotated fp32 x in the GEMV, to tell the rotation kernel's part from the fp32 input's."""
    return [SweepRun("int8", k, n, 1, "rot+old"), replace(rule, kind="rot+gemv"),
            replace(rule, kind="rot+gemv", pdl=False), replace(rule, kind="rot+gemv", inside=False),
            replace(rule, x_dtype="fp32")]


def run_fn(run: SweepRun) -> Callable:
    """``f(x, weights) -> y`` (bf16) for ``bench_graph``; ``weights`` maps a precision to (weight_q, scale, group, act)."""
    from compressor.kernels.quant_activation import hadamard_rotate, quantize_activation
    from compressor.kernels.quant_gemv import gemv_counters_needed, quant_gemv
    from compressor.kernels.quant_linear import FUSED_MAX_M, triton_gemm, triton_linear_fused

    def old(x, p):
        if x.shape[0] <= FUSED_MAX_M:
            return triton_linear_fused(x, p[0], p[1], None, p[3], p[2], torch.bfloat16)
        return triton_gemm(*quantize_activation(x, p[3]), p[0], p[1], None, torch.bfloat16, p[2])

    counters = {}  # the layer's split-K counters, made once (as QuantLinear does): no fill launch per call

    def gemv(x, p):
        pdl = None if run.pdl else False
        if x.device not in counters:
            counters[x.device] = torch.zeros(gemv_counters_needed(p[0].shape[0]), dtype=torch.int32, device=x.device)
        c = counters[x.device]
        if run.inside:
            return quant_gemv(x, p[0], p[1], None, p[3], p[2], torch.bfloat16, config=run.config, pdl=pdl, counters=c)
        a_q, a_s = quantize_activation(x, p[3])
        return quant_gemv(a_q, p[0], p[1], None, p[3], p[2], torch.bfloat16, x_scale=a_s, config=run.config, pdl=pdl,
                          counters=c)

    body = {"bf16": lambda x, p: x @ p[0].t(), "old": old, "gemv": gemv}[run.kind.removeprefix("rot+")]
    if run.kind.startswith("rot+"):
        return lambda x, weights: body(hadamard_rotate(x, HADAMARD), weights[run.precision])
    return lambda x, weights: body(x, weights[run.precision])


def quantized(w: torch.Tensor) -> dict:
    """The bf16 weight ``[N, K]`` and its int8 and int4 (groups of 128) forms: ``(weight_q, scale, group, act)``."""
    from compressor.kernels import quant_reference as ref

    q4, s4 = ref.quantize_weight_int4_groups(w, GROUP)
    return {"bf16": (w, None, 0, None), "int8": (*ref.quantize_weight_per_channel(w, "int8"), 0, "int8"),
            "w4a8": (ref.pack_int4(q4), s4, GROUP, "int8")}


# ---------------------------------------------------------------------------------------------------------------
# Compiling (worker processes)


@functools.lru_cache(maxsize=2)
def _worker_weights(k: int, n: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(k + n)
    return quantized(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, generator=g) / k**0.5)


def compile_and_check(run: SweepRun) -> tuple[SweepRun, str | None]:
    """In a worker: run once (the compile lands in Triton's disk cache) and compare with the reference; the error."""
    try:
        from compressor.kernels import quant_reference as ref

        weights = _worker_weights(run.k, run.n)
        x = torch.randn(run.m, run.k, device=DEVICE, dtype=torch.bfloat16)
        x = x.float() if run.x_dtype == "fp32" else x
        y = run_fn(run)(x, weights).float()
        wq, ws, group, act = weights[run.precision]
        if run.precision == "bf16":
            want = x.float() @ wq.float().t()
        else:
            had = HADAMARD if run.kind.startswith("rot+") else 0
            want = ref.quant_linear_reference(x.float(), wq, ws, None, act, group, had, torch.float32)
        err = float((y - want).abs().max() / want.abs().max())
        return run, None if err < 2e-2 else f"max rel error {err:.1e} vs the reference"
    except Exception as err:  # a config that does not compile or launch is reported, not fatal
        text = str(err).strip().splitlines()
        return run, f"{type(err).__name__}: {text[-1][:200] if text else ''}"


def precompile(runs: list[SweepRun], workers: int) -> dict[tuple, str]:
    """One run per compile key, in parallel processes; -> {compile key: why it failed}."""
    firsts: dict[tuple, SweepRun] = {}
    for run in runs:
        if run.kind != "bf16":
            firsts.setdefault(run.compile_key(), run)
    todo = sorted(firsts.values(), key=lambda r: (r.kind != "old", r.kind != "rot+old", r.k, r.n))  # autotuners first
    failures = {}
    ctx = multiprocessing.get_context("spawn")  # fresh CUDA contexts, Triton's cache shared on disk
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(compile_and_check, run) for run in todo]
        for i, future in enumerate(as_completed(futures), 1):
            run, error = future.result()
            if error:
                failures[run.compile_key()] = error
                print(f"FAILED {run.label()} ({run.k}->{run.n} M={run.m} {run.precision}): {error}", flush=True)
            if i % 25 == 0 or i == len(todo):
                print(f"compiled {i}/{len(todo)}", flush=True)
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Timing and the report


def copy_bandwidth() -> float:
    import triton.testing

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / triton.testing.do_bench(lambda: y.copy_(x), return_mode="median") / 1e6


def gb_per_s(run: SweepRun, ms: float) -> float:
    return (weight_bytes(run.precision, run.n, run.k) + 2 * run.m * run.k + 2 * run.m * run.n) / ms / 1e6


def route_entries(best: dict, old: dict, bf16: dict) -> list[str]:
    """``DECODE_ROUTES`` lines: the fastest GEMV run per case where it is at least as fast as the old path."""
    lines = []
    for (precision, k, n, m), (run, ms) in sorted(best.items()):
        key = (k, n, m)
        note = f"{ms:.4f} ms vs old {old.get((precision, k, n, m), float('nan')):.4f}, bf16 {bf16.get(key, float('nan')):.4f}"
        if not ms <= old.get((precision, k, n, m), float("inf")):
            lines.append(f"    # ({precision!r}, {m}, {k}, {n}): the old path stays ({note})")
            continue
        entry = f'DecodeRoute("gemv", {run.config!r}, scale_inside={run.inside}, pdl={run.pdl})'
        lines.append(f"    ({precision!r}, {m}, {k}, {n}): {entry},  # {note}")
        if precision == "int8":
            lines.append(f"    ('fp8', {m}, {k}, {n}): {entry},  # fp8 takes int8's tiles (not swept)")
    return lines


def sweep(out_path: str, budget_s: float = BUDGET_S, workers: int | None = None) -> None:
    """Compile, time and write the report (see the module docstring)."""
    import triton

    start = time.perf_counter()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan: dict[tuple[int, int, int], list[SweepRun]] = {}
    grids: dict[tuple, list[SweepRun]] = {}
    for k, n in SHAPES:
        for m in SWEEP_MS:
            runs = [SweepRun("bf16", k, n, m, "bf16")]
            for precision in ("int8", "w4a8"):
                grids[(precision, k, n, m)] = grid_runs(precision, k, n, m, sms)
                runs.append(SweepRun(precision, k, n, m, "old"))
            if m == 1 and n == 4096:
                runs += hadamard_diagnostics(k, n, grids[("int8", k, n, m)][0])
            plan[(k, n, m)] = runs
    every = [r for runs in plan.values() for r in runs] + [r for g in grids.values() for r in g]
    every += [v for g in grids.values() for r in g for v in variants(r)]
    workers = workers or max(2, min(14, (os.cpu_count() or 4) - 2))
    print(f"{len(every)} runs, {len({r.compile_key() for r in every})} compile keys, {workers} workers", flush=True)
    failures = precompile(every, workers)
    compiled_s = time.perf_counter() - start
    copy_gbs = copy_bandwidth()
    torch.cuda.empty_cache()

    times: dict[SweepRun, float] = {}

    def timed(run: SweepRun, rep: int, xs: dict, copies: list) -> None:
        if run.compile_key() in failures:
            return
        try:
            times[run] = bench_graph(run_fn(run), xs[run.x_dtype], copies, rep=rep)
        except Exception as err:
            failures[run.compile_key()] = f"{type(err).__name__}: {str(err)[:200]}"
            print(f"FAILED timing {run.label()} {run.k}->{run.n} M={run.m}: {err}", flush=True)

    skipped = 0
    for k, n in SHAPES:
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        copies = [quantized(w * (1 + i / 64)) for i in range(GRAPH_COPIES)]

        for m in SWEEP_MS:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            xs = {"bf16": x, "fp32": x.float()}
            for run in plan[(k, n, m)]:
                timed(run, TOP_REP_MS, xs, copies)
            for precision in ("int8", "w4a8"):
                for run in grids[(precision, k, n, m)]:
                    if time.perf_counter() - start > budget_s and run is not grids[(precision, k, n, m)][0]:
                        skipped += 1
                        continue
                    timed(run, GRID_REP_MS, xs, copies)
                timed_grid = [r for r in grids[(precision, k, n, m)] if r in times]
                for run in sorted(timed_grid, key=times.get)[:TOP]:
                    timed(run, TOP_REP_MS, xs, copies)  # again, longer: the ranking's noise
                    for variant in variants(run):
                        timed(variant, TOP_REP_MS, xs, copies)
            print(f"{k}->{n} M={m}: {sum(r.k == k and r.n == n and r.m == m for r in times)} timed, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        copies = w = None  # the next shape's copies fit beside what the caching allocator keeps
        torch.cuda.empty_cache()

    bf16 = {(r.k, r.n, r.m): t for r, t in times.items() if r.kind == "bf16"}
    old = {r.case: t for r, t in times.items() if r.kind == "old"}
    best = {}
    for run, t in times.items():
        if run.kind == "gemv" and run.x_dtype == "bf16" and (run.case not in best or t < best[run.case][1]):
            best[run.case] = (run, t)

    def row(run: SweepRun, t: float) -> str:
        base = bf16.get((run.k, run.n, run.m), float("nan"))
        ref_old = old.get(run.case, float("nan"))
        programs = f"{-(-run.n // run.tiles[0]) * run.tiles[4] / sms:.1f}" if run.tiles else ""
        gbs = gb_per_s(run, t)
        return (f"| {run.k}->{run.n} | {run.m} | {run.precision} | {run.label()} | {programs} | {t:.4f} | "
                f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {base / t:.2f} | {ref_old / t:.2f} |")

    header = ["| K->N | M | precision | path | programs / SM | ms | GB/s | % of copy | x bf16 | x old |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    best_rows, top_rows, all_rows, diag_rows = [], [], [], []
    for k, n in SHAPES:
        for m in SWEEP_MS:
            if SweepRun("bf16", k, n, m, "bf16") in times:
                best_rows.append(row(SweepRun("bf16", k, n, m, "bf16"), times[SweepRun("bf16", k, n, m, "bf16")]))
            for precision in ("int8", "w4a8"):
                case = (precision, k, n, m)
                if SweepRun(precision, k, n, m, "old") in times:
                    best_rows.append(row(SweepRun(precision, k, n, m, "old"), times[SweepRun(precision, k, n, m, "old")]))
                if case in best:
                    best_rows.append(row(*best[case]))
                grid = [r for r in grids[case] if r in times]
                ranked = sorted(grid, key=times.get)
                for run in ranked[:TOP]:
                    top_rows += [row(v, times[v]) for v in [run] + variants(run) if v in times]
                all_rows += [row(r, times[r]) for r in ranked]
            diagnostics = [r for r in plan[(k, n, m)] if r.kind.startswith("rot+") or r.x_dtype == "fp32"]
            diag_rows += [row(r, times[r]) for r in diagnostics if r in times]

    commit = git_commit()
    lines = [
        "# Decode GEMV sweep, " + torch.cuda.get_device_name(), "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; commit "
        f"{commit} (plus the working tree)",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; {sms} SMs",
        f"- command: `python {' '.join(sys.argv)}`; ms = per call, replayed from a CUDA graph of {GRAPH_COPIES} calls"
        f" over {GRAPH_COPIES} weight copies (`triton.testing.do_bench` median, {GRID_REP_MS} ms per grid config, "
        f"{TOP_REP_MS} ms for baselines and the top {TOP}), activation quantization included",
        f"- copy bandwidth {copy_gbs:.0f} GB/s; {len(times)} timed, {skipped} grid configs skipped over the "
        f"{budget_s:.0f} s budget, {len(failures)} compile keys failed; compiles took {compiled_s:.0f} s, "
        f"all {time.perf_counter() - start:.0f} s",
        "- `programs / SM`: N tiles x splits / SMs; `x old`: the old path's time / this time (the GEMV is routed"
        " where >= 1.00)", "",
        "## Best GEMV per case, next to bf16 and the old path", "", *header, *best_rows, "",
        f"## Top {TOP} per case (timed again) with their variants", "", *header, *top_rows, "",
        "## Online Hadamard diagnostics (int8, M = 1)", "",
        "rot+old is what quant_linear runs now; rot+gemv with programmatic dependent launch is what regressed.", "",
        *header, *diag_rows, "",
        "## Entries for quant_linear.DECODE_ROUTES (M bucket 1 was measured at M = 1, bucket 16 at M = 16)", "",
        "```python", *route_entries(best, old, bf16), "```", "",
        "## Compile / check / timing failures", "", *[f"- {key}: {why}" for key, why in failures.items()], "",
        "## Every timed grid config", "", *header, *all_rows,
    ]
    text = "\n".join(lines) + "\n"
    with open(out_path, "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gemv_sweep.md", help="markdown file to write the results to")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which grid configs are skipped")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPUs - 2, at most 14)")
    args = parser.parse_args()
    subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,temperature.gpu", "--format=csv"], check=False)
    sweep(args.out, args.budget, args.workers)


if __name__ == "__main__":
    main()
