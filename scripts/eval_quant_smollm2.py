"""Accuracy of linear-layer quantization on the embedded SmolLM2-135M-Instruct.

Held-out perplexity and passkey / lines retrieval (teacher-forced exact answer) at each of ``--lengths`` for dense vs
each precision: the balancing ablation (none / smooth / rotate / both) for w8a8-int8 and w4a8 with round-to-nearest
and with GPTQ rounding, fp8 variants, and searched mixed precision (w4a8 at <= 5 average weight bits; fp8 with a
few bf16 layers).

    python scripts/eval_quant_smollm2.py [--device cuda] [--only "fp8 gptq,w4a8 both gptq"] [--out FILE]

With ``--only``, the named variants (and dense) are re-measured and replace their rows in ``--out`` when the file was
written with the same protocol (windows, samples, lengths, device); other rows stay. ``--list`` prints the variants.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import torch

CALIBRATION = {"source": "corpus", "samples": 4, "lengths": [512], "seed": 0}
EARLIER = "## Earlier runs"  # everything from this heading on is kept verbatim


def variants() -> dict[str, dict | None]:
    """Variant name -> the ``linear`` recipe section it runs (None: dense)."""
    out: dict[str, dict | None] = {"dense": None}
    fp8 = {"precision": "w8a8-fp8"}
    out["fp8"] = fp8
    out["fp8 smooth"] = {**fp8, "smooth": True}
    out["fp8 rotate"] = {**fp8, "rotate": True}
    out["fp8 gptq"] = {**fp8, "rounding": "gptq"}
    out["fp8 rotate gptq"] = {**fp8, "rotate": True, "rounding": "gptq"}
    mixed = {"precision": "mixed", "budget": "bits", "sensitivity_samples": 1, "sensitivity_length": 128}
    for budget in (8.5, 9.0):
        for tag, extra in (("", {}), (" rotate", {"rotate": True}),
                           (" sens16x512", {"sensitivity_samples": 16, "sensitivity_length": 512})):
            out[f"fp8 mixed<={budget:g}{tag} gptq"] = {**mixed, "candidates": ["bf16", "w8a8-fp8"], "budget_value": budget,
                                                        "rounding": "gptq", **extra}
    balance = (("none", {}), ("smooth", {"smooth": True}), ("rotate", {"rotate": True}),
               ("both", {"smooth": True, "rotate": True}))
    for prec in ("w8a8-int8", "w4a8"):
        for rounding in ("nearest", "gptq"):
            for tag, extra in balance:
                name = f"{prec} {tag}" + (" gptq" if rounding == "gptq" else "")
                out[name] = {"precision": prec, "rounding": rounding, **extra}
    for tag, extra in (("smooth+clip", {"smooth": True}), ("both+clip", {"smooth": True, "rotate": True})):
        out[f"w4a8 {tag}"] = {"precision": "w4a8", "clip_search": True, **extra}
        out[f"w4a8 {tag} gptq"] = {"precision": "w4a8", "clip_search": True, "rounding": "gptq", **extra}
    w4 = {**mixed, "candidates": ["bf16", "w8a8-int8", "w4a8"], "budget_value": 5.0}
    out["mixed<=5 both"] = {**w4, "smooth": True, "rotate": True}
    out["mixed<=5 both gptq"] = {**w4, "smooth": True, "rotate": True, "rounding": "gptq"}
    out["mixed<=5 gptq"] = {**w4, "rounding": "gptq"}
    out["mixed<=5 rotate gptq"] = {**w4, "rotate": True, "rounding": "gptq"}
    # sensitivities on more text (the variants above measure 1 sample of 128 tokens; the recipe default is 2 x 256)
    for n in (4, 16):
        out[f"mixed<=5 both gptq sens{n}x512"] = {**w4, "smooth": True, "rotate": True, "rounding": "gptq",
                                                  "sensitivity_samples": n, "sensitivity_length": 512}
    out["mixed<=5 both gptq sens16x512 +fp8"] = {**out["mixed<=5 both gptq sens16x512"],
                                                 "candidates": ["bf16", "w8a8-fp8", "w8a8-int8", "w4a8"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA runs the Triton fp8 / int8 / w4a8 kernels)")
    parser.add_argument("--dtype", default="auto", help="model dtype; auto: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--ppl-windows", type=int, default=16, help="held-out perplexity windows")
    parser.add_argument("--ppl-length", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--retrieval-samples", type=int, default=25, help="held-out samples per task and length (0: none)")
    parser.add_argument("--lengths", default="1024,2048", help="retrieval lengths")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 windows, 4 samples at 1024 (a smoke run)")
    parser.add_argument("--out", default="scripts/results/quant_smollm2_cpu.md")
    parser.add_argument("--cal-samples", type=int, default=CALIBRATION["samples"], help="calibration windows of 512 tokens")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (dense always runs)")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    args = parser.parse_args()
    table = variants()
    if args.list:
        print("\n".join(table))
        return
    if args.quick:
        args.ppl_windows, args.retrieval_samples, args.lengths = 2, 4, "1024"
    lengths = [int(n) for n in args.lengths.split(",") if n] if args.retrieval_samples else []
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        unknown = [k for k in keep if k not in table]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; --list prints the known ones")
        table = {k: v for k, v in table.items() if k in keep or k == "dense"}
    torch.set_num_threads(args.threads)

    from compressor.evaluate import perplexity, retrieval_accuracy
    from compressor.linear_quant import apply_linear_plan
    from compressor.linear_quant.apply import average_weight_bits
    from compressor.methods import METHODS, CompressionContext, MethodResult
    from compressor.models import load_model
    from compressor.pipeline import build_plan
    from compressor.recipe import parse_recipe

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tokenizer, _ = load_model("smollm2-135m", args.device, dtype)
    device = next(model.parameters()).device
    protocol = (f"perplexity: held-out corpus, {args.ppl_windows} windows of {args.ppl_length} tokens; retrieval: "
                f"{args.retrieval_samples} held-out samples per task at {', '.join(map(str, lengths)) or '-'} tokens "
                f"(teacher-forced exact answer); calibration: {args.cal_samples} corpus windows of 512 tokens; device {device.type}, "
                f"{dtype}")
    before = open(args.out).read() if os.path.exists(args.out) else ""  # the file as this run found it
    rows, ctx = [], None
    for name, linear in table.items():
        t0 = time.perf_counter()
        net, bits = model, 16.0
        if linear is not None:
            recipe = parse_recipe({"name": name, "calibration": {**CALIBRATION, "samples": args.cal_samples}, "linear": {"method": "vidit-q", **linear}})
            ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=device,
                                     cache=ctx.cache if ctx else {})
            result: MethodResult = METHODS[("linear", "vidit-q")].run(ctx, recipe.linear)
            plan = build_plan(model, recipe, {"linear": result}, {})
            net = apply_linear_plan(copy.deepcopy(model), plan)
            bits = average_weight_bits(model, plan)
        ppl = perplexity(net, tokenizer, args.ppl_length, args.ppl_windows, seed=1)
        retrieval = [retrieval_accuracy(net, tokenizer, task, n, args.retrieval_samples, seed=1)
                     for n in lengths for task in ("passkey", "lines")]
        rows.append((name, bits, ppl, retrieval, time.perf_counter() - t0))
        write_table(args.out, before, rows, protocol, lengths, rerun=bool(args.only), device=device)
        print(f"{name:24s} bits {bits:5.2f} ppl {ppl:8.3f} retrieval {' '.join(f'{r:.2f}' for r in retrieval)} "
              f"({rows[-1][-1]:.0f}s)", flush=True)
        del net


def read_results(before: str) -> tuple[list[str], dict[str, str], list[str], list[str]]:
    """(header notes, rows of the results table by variant name, the hand-written lines after that table, the verbatim
    ``## Earlier runs`` section) of a results file's text."""
    text = before.splitlines()
    cut = text.index(EARLIER) if EARLIER in text else len(text)
    head, earlier = text[:cut], text[cut:]
    start = next((i for i, line in enumerate(head) if line.startswith("| variant")), len(head))
    end = next((i for i in range(start, len(head)) if not head[i].startswith("|")), len(head))
    rows = head[start + 2 : end]
    notes = [line for line in head[:start] if line.startswith("- ")]
    tail = head[end:]
    while tail and not tail[-1].strip():
        tail.pop()
    return notes, {line.split("|")[1].strip().removesuffix(" *"): line for line in rows}, tail, earlier


def write_table(
    out: str, before: str, rows: list, protocol: str, lengths: list[int], rerun: bool, device: torch.device
) -> None:
    """(Re)write the results file (``before``: its text when the run started) with the rows measured so far.
    With ``rerun`` and a file of the same protocol, rows
    not measured again are kept (the re-measured ones marked ``*``) and this run's command and date added as a note.
    A file of another protocol keeps its header and rows under ``## Earlier runs``."""
    from compressor.pipeline import software_versions

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    notes, kept, tail, earlier = read_results(before)
    same = any(n == f"- {protocol}" for n in notes)
    if not same and (notes or kept):  # another protocol: the old table moves under "Earlier runs"
        old = before.splitlines()
        cut = old.index(EARLIER) if EARLIER in old else len(old)
        earlier = [EARLIER, "", f"### {old[0].lstrip('# ')} (another protocol)", ""] + old[1:cut] + [""] + earlier[1:]
        notes, kept, tail = [], {}, []
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch threads {torch.get_num_threads()}"
    else:
        machine = f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    command = f"`python {' '.join(sys.argv)}`"
    if rerun and kept:
        header = [n for n in notes] + [f"- rows marked *: re-run {now} with {command}, versions {software_versions()}"]
        header = list(dict.fromkeys(header))
    else:
        header = [f"- date: {now}", f"- machine: {machine}", f"- versions: {software_versions()}",
                  f"- command: {command}", f"- {protocol}",
                  "- SmolLM2's hidden size 576 is not a multiple of 128: its w4a8 layers with 576 inputs use int4 groups "
                  "of 64 (`w4a8-g64`), down_proj (1536 inputs) groups of 128. Bits count one 16-bit scale per int4 group "
                  "and per 8-bit output channel (`compressor.linear_quant.apply.average_weight_bits`), the count the "
                  "mixed-precision budget uses. `gptq`: error-compensating rounding (`rounding: gptq`); `+clip`: int4 "
                  "group scales searched over clipping ratios (`clip_search: true`); `mixed<=B`: per-layer precision "
                  "searched from measured sensitivity at <= B average weight bits."]
    cols = [f"{task}@{n // 1024}k" if n % 1024 == 0 else f"{task}@{n}" for n in lengths for task in ("passkey", "lines")]
    title = "# Linear quantization accuracy, SmolLM2-135M-Instruct" + (" (CPU)" if device.type == "cpu" else "")
    lines_md = [title, ""] + header + ["", "| variant | avg weight bits | ppl | ppl vs dense | " + " | ".join(cols + ["seconds"]) + " |",
                                       "|---" * (len(cols) + 5) + "|"]
    dense_ppl = rows[0][2]
    fresh = {
        name: f"| {name}{' *' if rerun and kept else ''} | {bits:.2f} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.2f}% | "
              + " | ".join(f"{r:.2f}" for r in retrieval) + (" | " if retrieval else "") + f"{secs:.0f} |"
        for name, bits, ppl, retrieval, secs in rows
    }
    order = list(kept) + [n for n in fresh if n not in kept]
    lines_md += [fresh.get(n, kept.get(n, "")) for n in order]
    if tail:  # what was written by hand below the table (notes, targets) stays
        lines_md += tail
    if earlier:
        lines_md += [""] + earlier
    with open(out, "w") as f:
        f.write("\n".join(lines_md) + "\n")


if __name__ == "__main__":
    main()
