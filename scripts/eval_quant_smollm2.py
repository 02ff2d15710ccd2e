"""Accuracy of linear-layer quantization on the embedded SmolLM2-135M-Instruct (CPU).

Held-out perplexity and passkey / lines retrieval at 1k tokens for dense vs each precision, the balancing ablation
(none / smooth / rotate / both) for w8a8-int8 and w4a8, and searched mixed precision at <= 5 average weight bits.

    python scripts/eval_quant_smollm2.py [--quick] [--out scripts/results/quant_smollm2_cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time

import torch


def average_bits(model: torch.nn.Module, plan) -> float:
    """Parameter-weighted average weight bits over the decoder layers' linear layers the plan names."""
    from compressor.linear_quant.apply import decoder_layers
    from compressor.linear_quant.formats import precision

    total = bits = 0.0
    for (_, layer), lp in zip(decoder_layers(model, len(plan.layers)), plan.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                p = (lp.linear or {}).get(name, {}).get("precision", "bf16")
                total += module.weight.numel()
                bits += module.weight.numel() * precision(p).weight_bits()
    return bits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--out", default="scripts/results/quant_smollm2_cpu.md")
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from compressor.evaluate import perplexity, retrieval_accuracy
    from compressor.linear_quant import apply_linear_plan
    from compressor.methods import METHODS, CompressionContext, MethodResult
    from compressor.models import load_model
    from compressor.pipeline import build_plan, software_versions
    from compressor.recipe import parse_recipe

    model, tokenizer, _ = load_model("smollm2-135m", "cpu", "float32")
    n_ppl, ret = (2, 4) if args.quick else (4, 8)
    calibration = {"source": "corpus", "samples": 4, "lengths": [512], "seed": 0}
    base = {"method": "vidit-q"}
    variants: dict[str, dict | None] = {"dense": None, "fp8": {"precision": "w8a8-fp8"}}
    for prec in ("w8a8-int8", "w4a8"):
        for tag, extra in (("none", {}), ("smooth", {"smooth": True}), ("rotate", {"rotate": True}),
                           ("both", {"smooth": True, "rotate": True})):
            variants[f"{prec} {tag}"] = {"precision": prec, **extra}
    variants["mixed<=5 both"] = {"precision": "mixed", "smooth": True, "rotate": True, "budget": "bits",
                                 "budget_value": 5.0, "sensitivity_samples": 1, "sensitivity_length": 128}
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
            bits = average_bits(model, plan)
        ppl = perplexity(net, tokenizer, 512, n_ppl, seed=1)
        passkey = retrieval_accuracy(net, tokenizer, "passkey", 1024, ret, seed=1)
        lines = retrieval_accuracy(net, tokenizer, "lines", 1024, ret, seed=1)
        rows.append((name, bits, ppl, passkey, lines, time.perf_counter() - t0))
        write_table(args.out, rows, n_ppl, ret)
        print(f"{name:18s} bits {bits:5.2f} ppl {ppl:8.3f} passkey {passkey:.2f} lines {lines:.2f} ({rows[-1][-1]:.0f}s)",
              flush=True)



def write_table(out: str, rows: list, n_ppl: int, ret: int) -> None:
    """(Re)write the results file with the rows measured so far."""
    from compressor.pipeline import software_versions

    dense_ppl = rows[0][2]
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
        "(`w4a8-g64`), down_proj (1536 inputs) groups of 128. Bits count the weight scales.",
        "",
        "| variant | avg weight bits | ppl | ppl vs dense | passkey@1k | lines@1k | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bits, ppl, passkey, lines, secs in rows:
        lines_md.append(
            f"| {name} | {bits:.2f} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.2f}% | {passkey:.2f} | {lines:.2f} | {secs:.0f} |"
        )
    with open(out, "w") as f:
        f.write("\n".join(lines_md) + "\n")


if __name__ == "__main__":
    main()
