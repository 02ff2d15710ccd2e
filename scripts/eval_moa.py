"""MoA vs a uniform sink + window at the same average density vs dense, on SmolLM2-135M on the CPU.

Runs the MoA search (calibration + profile + search + scoring) once per density, sharing the profile, then evaluates
dense, each MoA plan and the uniform elastic window at the MoA plan's density: passkey and lines accuracy and held-out
perplexity at each length. Writes a markdown table with the command, date, versions, timings and peak memory.

    python scripts/eval_moa.py --recipe moa-cpu --densities 0.5 0.25 --lengths 1024 2048 4096 \
        --samples 8 --ppl-samples 2 --out scripts/results/moa_smollm2_cpu.md
    python scripts/eval_moa.py --profile-memory 1024 2048 4096   # influence-profiling peak memory per length
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def profile_memory(length: int) -> dict[str, float]:
    """Peak memory above the loaded model while profiling one passkey sample of ``length`` tokens."""
    import gc

    from compressor.calibration.data import calibration_samples
    from compressor.calibration.influence import profile_sample
    from compressor.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    sample = calibration_samples("passkey", tokenizer, [length], 1, 0)[0]
    gc.collect()
    reset_peak()
    base = rss_mb()
    start = time.perf_counter()
    profile_sample(model, sample, sink=64)
    return {"length": length, "base_mb": round(base), "peak_mb": round(peak_rss_mb()),
            "delta_mb": round(peak_rss_mb() - base), "seconds": round(time.perf_counter() - start, 1)}


def evaluate_config(model, tokenizer, lengths, samples, ppl_samples, seed) -> dict[str, dict[str, float]]:
    from compressor.evaluate import perplexity, retrieval_accuracy

    out: dict[str, dict[str, float]] = {"passkey": {}, "lines": {}, "perplexity": {}}
    for n in lengths:
        for task in ("passkey", "lines"):
            out[task][str(n)] = retrieval_accuracy(model, tokenizer, task, n, samples, seed)
        out["perplexity"][str(n)] = perplexity(model, tokenizer, n, ppl_samples, seed)
    return out


def parse_weighting(text: str) -> dict[str, float]:
    """'passkey:4,lines:2' -> {"passkey": 4.0, "lines": 2.0}; '-' -> {} (every task weighs 1)."""
    if text.strip() in ("-", ""):
        return {}
    out = {}
    for part in text.split(","):
        task, _, weight = part.partition(":")
        out[task.strip()] = float(weight)
    return out


def weighting_label(group: list) -> str:
    names = ["equal" if not w else "/".join(f"{k}:{v:g}" for k, v in sorted(w.items())) for w in group if w is not None]
    return ("joint " if len(names) > 1 else "") + "+".join(names) if names else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="moa-cpu")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--influence", nargs="+", default=[],
                        help="influence estimators to compare (absolute, signed, row); default: the recipe's")
    parser.add_argument("--task-weights", nargs="+", default=[],
                        help="MoA task weightings to compare, each 'task:weight,...' or '-' (all tasks equal), one "
                             "search each (default: the recipe's)")
    parser.add_argument("--refine-rounds", type=int, nargs="+", default=[],
                        help="MoA refinement rounds to compare (re-profile at the chosen plan and search again); "
                             "default: the recipe's")
    parser.add_argument("--refine-mix", type=float, default=-1.0, help="override the recipe's refine_mix")
    parser.add_argument("--retrieval-dense", type=float, nargs="+", default=[],
                        help="override the recipe's retrieval_dense (fractions of KV groups held dense by copy score)")
    parser.add_argument("--window-floors", type=float, nargs="+", default=[],
                        help="override the recipe's window_floors (fractions of the shortest calibration length)")
    parser.add_argument("--text-fraction", type=float, default=0.0,
                        help="override the recipe's text_fraction (scored share of each plain-text calibration sample)")
    parser.add_argument("--length-powers", type=float, nargs="+", default=[],
                        help="override the recipe's length_powers")
    parser.add_argument("--joint-weights", action="store_true",
                        help="one search over all --task-weights (held-out scoring picks), not one per weighting")
    parser.add_argument("--no-baselines", action="store_true",
                        help="evaluate only the MoA plans (dense and the uniform window were measured by another run)")
    parser.add_argument("--no-dense", action="store_true",
                        help="leave out the dense row (e.g. measured by an earlier run)")
    parser.add_argument("--cal-lengths", type=int, nargs="+", default=[], help="override the recipe's profiled lengths")
    parser.add_argument("--cal-samples", type=int, default=0, help="override the recipe's samples per length")
    parser.add_argument("--score-length", type=int, default=-1, help="override the recipe's held-out scoring length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=50, help="retrieval samples per (task, length) cell")
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU runs the Triton kernels)")
    parser.add_argument("--profile-memory", type=int, nargs="*", help="only measure profiling memory at these lengths")
    parser.add_argument("--memory-json", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="scripts/results/moa_smollm2_cpu.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.profile_memory is not None and args.memory_json == "child":
        print(json.dumps(profile_memory(args.profile_memory[0])))
        return
    if args.profile_memory is not None:
        rows = []
        for n in args.profile_memory:  # one process per length: clean peaks
            cmd = [sys.executable, __file__, "--profile-memory", str(n), "--memory-json", "child"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            print(rows[-1], flush=True)
        return

    import transformers

    from compressor import runtime
    from compressor.methods import CompressionContext
    from compressor.methods.moa import moa_plan, plan_from_heads
    from compressor.methods.window import WindowConfig, uniform_window
    from compressor.models import load_model
    from compressor.recipe import load_recipe

    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    model, tokenizer, _ = load_model("smollm2-135m", device=args.device, dtype="float32")
    recipe = load_recipe(args.recipe)
    if args.cal_lengths:
        recipe.calibration.lengths = list(args.cal_lengths)
    if args.cal_samples:
        recipe.calibration.samples = args.cal_samples
    if args.score_length >= 0:
        recipe.attention.score_length = args.score_length
    kinds = args.influence or [recipe.attention.influence]
    rounds = args.refine_rounds or [recipe.attention.refine_rounds]
    if args.refine_mix >= 0:
        recipe.attention.refine_mix = args.refine_mix
    if args.retrieval_dense:
        recipe.attention.retrieval_dense = list(args.retrieval_dense)
    if args.window_floors:
        recipe.attention.window_floors = list(args.window_floors)
    if args.text_fraction:
        recipe.attention.text_fraction = args.text_fraction
    if args.length_powers:
        recipe.attention.length_powers = list(args.length_powers)
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=model.device)

    weightings = [parse_weighting(w) for w in args.task_weights] or [None]  # None: the recipe's task_weights
    groups = [weightings] if args.joint_weights and weightings != [None] else [[w] for w in weightings]
    searches = {}  # (density, influence kind, weighting label) -> search
    for density in args.densities:
        for kind in kinds:
            for group, refine in [(g, r) for g in groups for r in rounds]:
                config = recipe.attention
                config.density = density
                config.influence = kind
                config.refine_rounds = refine
                if group != [None]:
                    config.task_weights = group
                label = weighting_label(group) if len(groups) > 1 or args.joint_weights else ""
                if len(rounds) > 1:
                    label = ", ".join(filter(None, [label, f"refine {refine}"]))
                reset_peak()
                t0 = time.perf_counter()
                result = moa_plan(ctx, config)  # the profile is computed once and shared (ctx.cache)
                searches[density, kind, label] = {"result": result, "seconds": time.perf_counter() - t0,
                                                  "peak_mb": peak_rss_mb()}
                print(f"moa density {density} influence {kind} {label}: {searches[density, kind, label]['seconds']:.0f}s, "
                      f"peak {searches[density, kind, label]['peak_mb']:.0f} MiB", json.dumps(result.calibration), flush=True)

    configs: dict[str, object] = {} if args.no_baselines or args.no_dense else {"dense": None}
    first_label = next(iter(searches))[2] if searches else ""
    for (density, kind, label), s in searches.items():
        plan = plan_from_heads(model, s["result"].heads)
        tags = ([kind] if len(kinds) > 1 else []) + ([label] if label else [])
        configs[f"moa@{density:g}" + (f" ({', '.join(tags)})" if tags else "")] = plan
        if kind != kinds[0] or label != first_label or args.no_baselines:
            continue
        # the uniform elastic window with the MoA plan's density at the longest evaluated length (never above it)
        target = plan.density(max(args.lengths))
        rule = uniform_window(WindowConfig(density=target, sink=64, scaling="elastic", length=max(args.lengths)))
        configs[f"uniform@{density:g}"] = plan_from_heads(model, [[rule] * len(row) for row in s["result"].heads])

    results = {}
    for name, plan in configs.items():
        t0 = time.perf_counter()
        if plan is not None:
            runtime.apply(model, plan)
        try:
            results[name] = evaluate_config(model, tokenizer, args.lengths, args.samples, args.ppl_samples, args.seed)
        finally:
            if plan is not None:
                runtime.remove(model)
        density = {str(n): round(plan.density(n), 3) if plan is not None else 1.0 for n in args.lengths}
        results[name]["density"] = density
        print(name, json.dumps(results[name]), f"{time.perf_counter() - t0:.0f}s", flush=True)
        write_report(args, started_at, searches, results, transformers.__version__)  # after each config: partial runs keep rows


def write_report(args, started_at, searches, results, transformers_version) -> None:
    lines = [
        f"# MoA vs uniform window vs dense — SmolLM2-135M-Instruct, {args.device.upper()}",
        "",
        f"- date: {started_at}; machine: "
        + (torch.cuda.get_device_name() if args.device.startswith("cuda") else
           f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads"),
        f"- versions: torch {torch.__version__}, transformers {transformers_version}, python {platform.python_version()}",
        f"- command: `python scripts/eval_moa.py {' '.join(sys.argv[1:])}`",
        f"- retrieval: {args.samples} held-out samples per (task, length) cell, needle depths spread over 0..1; "
        f"perplexity: {args.ppl_samples} held-out corpus windows per length",
        "- uniform = one elastic sink(64) + beta*N window for every head, at the MoA plan's density at the longest length",
        "",
        "| config | " + " | ".join(f"density@{n}" for n in args.lengths) + " | "
        + " | ".join(f"passkey@{n}" for n in args.lengths) + " | " + " | ".join(f"lines@{n}" for n in args.lengths)
        + " | " + " | ".join(f"ppl@{n}" for n in args.lengths) + " |",
        "|---" * (1 + 4 * len(args.lengths)) + "|",
    ]
    for name, r in results.items():
        cells = [f"{r['density'][str(n)]:.3f}" for n in args.lengths]
        cells += [f"{r['passkey'][str(n)]:.2f}" for n in args.lengths]
        cells += [f"{r['lines'][str(n)]:.2f}" for n in args.lengths]
        cells += [f"{r['perplexity'][str(n)]:.3f}" for n in args.lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Calibration + search", ""]
    for (density, kind, label), s in searches.items():
        res = s["result"]
        lines.append(
            f"- density {density:g}, influence {kind}{', ' + label if label else ''}: {s['seconds']:.0f} s wall, peak RSS {s['peak_mb']:.0f} MiB (model included); "
            f"stages {json.dumps(res.calibration['seconds'])}; {res.search['rules']} rules; "
            f"chosen plan {res.search['chosen']}"
        )
        for p in res.search["plans"]:
            lines.append(
                f"  - {p['name']}: estimated {json.dumps({k: round(v, 4) for k, v in p['estimated_loss'].items()})}, "
                f"measured loss @{res.search['scoring']['length']} {p['measured_loss']} "
                f"{json.dumps(p.get('measured_tasks', {}))}, density {json.dumps(p['density'])}, "
                f"solver {p['solver']['status']} {p['solver']['seconds']} s"
            )
        lines.append(f"  - dense loss @{res.search['scoring']['length']}: {res.search['scoring'].get('dense_loss')} "
                     f"{json.dumps(res.search['scoring'].get('dense_tasks', {}))}")
        retrieval = res.search.get("retrieval", {})
        if retrieval:
            top = [(r["layer"], r["index"], r["copy"]) for r in retrieval["ranked"][:12]]
            lines.append(f"  - KV groups held dense per plan: {retrieval['dense_counts']}; "
                         f"highest copy scores (layer, group, score): {top}")
        for s in res.search.get("skipped", []):
            lines.append(f"  - skipped: {json.dumps(s)}")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
