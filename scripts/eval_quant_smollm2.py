"""Accuracy of linear-layer quantization on the embedded SmolLM2-135M-Instruct (CPU).

Held-out perplexity and passkey / lines retrieval at 1k tokens for dense vs each precision, the balancing ablation
(none / smooth / rotate / both) for w8a8-int8 and w4a8 (fp8: none / smooth / rotate; w4a8 also with the int4 clipping
search), and searched mixed precision at <= 5 average weight bits.

    python scripts/eval_quant_smollm2.py [--quick] [--only "fp8,w4a8 both+clip"] [--out scripts/results/quant_smollm2_cpu.md]

With ``--only``, the named variants (and dense) are re-measured and replace their rows in ``--out``; other rows stay.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--out", default="scripts/results/quant_smollm2_cpu.md")
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from compressor.evaluate import perplexity, retrieval_accuracy
    from compressor.linear_quant import apply_linear_plan
    from compressor.linear_quant.apply import average_weight_bits
    from compressor.methods import METHODS, CompressionContext, MethodResult
    from compressor.models import load_model
    from compressor.pipeline import build_plan
    from compressor.recipe import parse_recipe

    model, tokenizer, _ = load_model("smollm2-135m", "cpu", "float32")
    n_ppl, ret = (2, 4) if args.quick else (4, 8)
    calibration = {"source": "corpus", "samples": 4, "lengths": [512], "seed": 0}
    base = {"method": "vidit-q"}
    variants: dict[str, dict | None] = {"dense": None, "fp8": {"precision": "w8a8-fp8"},
                                        "fp8 smooth": {"precision": "w8a8-fp8", "smooth": True},
                                        "fp8 rotate": {"precision": "w8a8-fp8", "rotate": True}}
    for prec in ("w8a8-int8", "w4a8"):
        for tag, extra in (("none", {}), ("smooth", {"smooth": True}), ("rotate", {"rotate": True}),
                           ("both", {"smooth": True, "rotate": True})):
            variants[f"{prec} {tag}"] = {"precision": prec, **extra}
    variants["mixed<=5 both"] = {"precision": "mixed", "smooth": True, "rotate": True, "budget": "bits",
                                 "budget_value": 5.0, "sensitivity_samples": 1, "sensitivity_length": 128}
    for tag, extra in (("smooth+clip", {"smooth": True}), ("both+clip", {"smooth": True, "rotate": True})):
        variants[f"w4a8 {tag}"] = {"precision": "w4a8", "clip_search": True, **extra}
    variants["mixed<=5 both+clip"] = {**variants["mixed<=5 both"], "clip_search": True}
    if args.only:
        keep = set(args.only.split(","))
        variants = {k: v for k, v in variants.items() if k in keep or k == "dense"}

    rows, ctx = [], None
    for name, linear in variants.items():
        t0 = time.perf_counter()
        net, bits = model, 16.0
        if linear is not None:
            recipe = parse_recipe({"name": name, "calibration": calibration, "linear": {**base, **linear}})
            ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"),
                                     cache=ctx.cache if ctx else {})
            result: MethodResult = METHODS[("linear", "vidit-q")].run(ctx, recipe.linear)
            plan = build_plan(model, recipe, {"linear": result}, {})
            net = apply_linear_plan(copy.deepcopy(model), plan)
            bits = average_weight_bits(model, plan)
        ppl = perplexity(net, tokenizer, 512, n_ppl, seed=1)
        passkey = retrieval_accuracy(net, tokenizer, "passkey", 1024, ret, seed=1)
        lines = retrieval_accuracy(net, tokenizer, "lines", 1024, ret, seed=1)
        rows.append((name, bits, ppl, passkey, lines, time.perf_counter() - t0))
        write_table(args.out, rows, n_ppl, ret, rerun=bool(args.only))
        print(f"{name:18s} bits {bits:5.2f} ppl {ppl:8.3f} passkey {passkey:.2f} lines {lines:.2f} ({rows[-1][-1]:.0f}s)",
              flush=True)



def previous_rows(out: str) -> dict[str, str]:
    """Table rows of an existing results file, by variant name (so ``--only`` updates rows instead of dropping them)."""
    try:
        text = open(out).read().splitlines()
    except FileNotFoundError:
        return {}
    rows = [line for line in text if line.startswith("| ") and not line.startswith("| variant")]
    return {line.split("|")[1].strip().removesuffix(" *"): line for line in rows}


def write_table(out: str, rows: list, n_ppl: int, ret: int, rerun: bool = False) -> None:
    """(Re)write the results file with the rows measured so far; with ``rerun``, rows of the previous file that were
    not measured again are kept (the re-measured ones marked ``*``), and the header notes which run is which."""
    from compressor.pipeline import software_versions

    dense_ppl = rows[0][2]
    kept = previous_rows(out) if rerun else {}
    notes = [line for line in (open(out).read().splitlines() if rerun and kept else []) if line.startswith("- ")]
    lines_md = [
        "# Linear quantization accuracy, SmolLM2-135M-Instruct (CPU)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or platform.machine()}, torch threads 2",
        f"- versions: {software_versions()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- perplexity: held-out corpus, {n_ppl} windows of 512 tokens; retrieval: {ret} held-out samples at 1024 "
        "tokens (teacher-forced exact answer); calibration: 4 corpus windows of 512 tokens.",
        "- SmolLM2's hidden size 576 is not a multiple of 128: its w4a8 layers with 576 inputs use int4 groups of 64 "
        "(`w4a8-g64`), down_proj (1536 inputs) groups of 128. Bits count one 16-bit scale per int4 group and per 8-bit "
        "output channel (`compressor.linear_quant.apply.average_weight_bits`), the count the mixed-precision budget uses. "
        "`+clip`: int4 group scales searched over clipping ratios 1.0..0.6 on calibration inputs (`clip_search: true`).",
        "",
        "| variant | avg weight bits | ppl | ppl vs dense | passkey@1k | lines@1k | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    fresh = {
        name: f"| {name}{' *' if rerun else ''} | {bits:.2f} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.2f}% | "
              f"{passkey:.2f} | {lines:.2f} | {secs:.0f} |"
        for name, bits, ppl, passkey, lines, secs in rows
    }
    if rerun and kept:  # the header of the full run stays; this run's command and date are added as a note
        lines_md[2:6] = [n for n in notes if not n.startswith(("- perplexity", "- SmolLM2"))] + [
            f"- rows marked *: re-run {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} with "
            f"`python {' '.join(sys.argv)}`, versions {software_versions()}"
        ]
    order = list(kept) + [n for n in fresh if n not in kept]
    lines_md += [fresh.get(n, kept.get(n, "")) for n in order]
    with open(out, "w") as f:
        f.write("\n".join(lines_md) + "\n")


if __name__ == "__main__":
    main()
