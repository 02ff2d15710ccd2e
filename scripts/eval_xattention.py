"""Accuracy of XAttention on the embedded SmolLM2-135M-Instruct (CPU): dense vs calibrated per-head thresholds.

Calibrates thresholds (coverage 95%, stride 8, blocks of 64) on a few 1k corpus/passkey samples, then measures at
1k and 2k: the average block density the selection really uses on held-out text, perplexity, passkey and lines
accuracy, dense vs plan. --quick: about 5 minutes on 2 busy cores; the default: about 10.

    python scripts/eval_xattention.py [--quick] [--out scripts/results/xattention_smollm2_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--lengths", default="1024,2048", help="comma-separated evaluation lengths")
    parser.add_argument("--samples", type=int, default=4, help="retrieval samples per task and length")
    parser.add_argument("--ppl-samples", type=int, default=1)
    parser.add_argument("--cal-samples", type=int, default=2)
    parser.add_argument("--out", default="scripts/results/xattention_smollm2_cpu.md")
    parser.add_argument("--coverage", type=float, default=0.95)
    parser.add_argument("--density", type=float, default=None,
                        help="average block-density budget for the global threshold search (default: coverage only)")
    parser.add_argument("--cal-lengths", default="1024", help="comma-separated calibration lengths")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    import transformers

    from compressor import runtime
    from compressor.calibration.data import corpus_token_batches
    from compressor.evaluate import perplexity, retrieval_accuracy
    from compressor.methods import METHODS, CompressionContext
    from compressor.methods.xattention import XAttentionConfig, measure
    from compressor.models import load_model
    from compressor.plan import Plan
    from compressor.recipe import parse_recipe

    # float32 on the CPU; bf16 on a GPU (the dtype the Triton kernels run)
    model, tokenizer, _ = load_model("smollm2-135m", args.device, "float32" if args.device == "cpu" else "bfloat16")
    lengths = [int(x) for x in args.lengths.split(",")]
    cal_lengths = [int(x) for x in args.cal_lengths.split(",")]
    n_ppl, n_ret, n_cal = (1, 2, 1) if args.quick else (args.ppl_samples, args.samples, args.cal_samples)
    attention = {"method": "xattention", "coverage": args.coverage, "stride": 8, "block_size": 64, "density": args.density}
    recipe = parse_recipe({"name": "xattention-eval", "attention": attention,
                           "calibration": {"source": "corpus,passkey", "samples": n_cal, "lengths": cal_lengths}})
    config: XAttentionConfig = recipe.attention
    ctx = CompressionContext(model, tokenizer, recipe, model.device, "smollm2-135m")
    result = METHODS[("attention", "xattention")].run(ctx, config)
    calibrated = time.perf_counter()
    plan = Plan.dense(model)
    for layer, heads in zip(plan.layers, result.heads):
        layer.attention.heads = heads
    tau = torch.tensor([[h.tau for h in heads] for heads in result.heads])

    def scores(label: str) -> dict[str, float]:
        out = {}
        for n in lengths:
            out[f"ppl@{n}"] = perplexity(model, tokenizer, n, n_ppl)
            for task in ("passkey", "lines"):
                out[f"{task}@{n}"] = retrieval_accuracy(model, tokenizer, task, n, n_ret)
        print(label, out, flush=True)
        return out

    dense = scores("dense")
    runtime.apply(model, plan)
    sparse = scores("xattention")
    runtime.remove(model)
    density = {}
    for n in lengths:
        held = [row for row in corpus_token_batches(tokenizer, n, n_ppl, 0, split="heldout")]
        cov, dens = measure(model, held, tau, config)
        density[n] = (float(dens.mean()), float(cov.mean()))
    done = time.perf_counter()

    search = result.search
    lines = [
        f"# XAttention on SmolLM2-135M-Instruct ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'})",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.date.today()}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}",
        f"- calibration: {n_cal} samples (corpus + passkey) at {cal_lengths} tokens, coverage target {config.coverage}, stride "
        f"{config.stride}, blocks of {config.block_size}, density budget {config.density}; {calibrated - started:.0f} s "
        "including model load",
        f"- thresholds: mean tau {float(tau.mean()):.3f} (min {float(tau.min()):.3f}, max {float(tau.max()):.3f}); "
        f"calibration coverage {search['measured']['coverage']:.3f}, block density {search['measured']['density']:.3f}",
        f"- evaluation: perplexity on {n_ppl} held-out corpus windows, retrieval on {n_ret} held-out samples per task "
        f"and length; total {done - started:.0f} s",
        "",
        "| metric | dense | xattention |",
        "|---|---|---|",
        *[f"| {key} | {dense[key]:.3f} | {sparse[key]:.3f} |" for key in dense],
        *[f"| measured block density @{n} (held-out text) | 100% | {d:.1%} (mass kept {c:.1%}) |"
          for n, (d, c) in density.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
