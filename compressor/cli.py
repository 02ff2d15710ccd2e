"""The ``compress`` command.

    compress --model smollm2-135m --recipe window --output out/smollm2-window
    compress eval --model out/smollm2-window --tasks perplexity,passkey --lengths 1024,2048
    compress export-plan out/smollm2-window --output plan.json
    compress show out/smollm2-window
    compress report out/smollm2-window
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from compressor.errors import CompressorError

SUBCOMMANDS = ("eval", "export-plan", "show", "report")
EVAL_TASKS = ("perplexity", "passkey", "lines", "needle")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    return values


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; choose from {', '.join(EVAL_TASKS)}")
    return tasks


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compress",
        description="Compress a Hugging Face causal LM with a recipe: calibrate, search a plan, write a checkpoint.",
        epilog="example: compress --model smollm2-135m --recipe window --output out/smollm2-window\n"
        f"subcommands: {', '.join(SUBCOMMANDS)} (compress SUBCOMMAND --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="alias (smollm2-135m, llama3-8b, ...), local folder, .gguf file or hub id")
    p.add_argument("--recipe", required=True, help="recipe file or built-in name (window, moa.yaml, ...)")
    p.add_argument("--output", help="folder for the compressed checkpoint and compression_plan.json")
    _add_device(p)
    p.add_argument("--seed", type=int, help="overrides the recipe's calibration seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe setting (repeatable), e.g. --set calibration.samples=16 "
                        "--set linear.sensitivity_samples=1; the plan records the recipe as it ran")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--no-report", action="store_true", help="do not write report.html into --output")
    return p


def sub_parser(name: str) -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    if name == "eval":
        p = argparse.ArgumentParser(
            prog="compress eval", formatter_class=fmt,
            description="Evaluate dense vs plan side by side (perplexity on held-out built-in text, retrieval accuracy) "
            "per length. For a compressed folder, results are also written to eval_results.json beside the plan.",
            epilog="example: compress eval --model out/smollm2-window --tasks perplexity,passkey --lengths 1024,2048",
        )
        p.add_argument("--model", required=True, help="a compressed folder, or any --model accepted by compress")
        p.add_argument("--tasks", type=_task_list, default=["perplexity", "passkey"], help=",".join(EVAL_TASKS))
        p.add_argument("--lengths", type=_int_list, default=[1024, 2048], help="comma-separated token counts")
        p.add_argument("--samples", type=int, default=8, help="samples per task and length")
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        _add_device(p)
        return p
    if name == "export-plan":
        p = argparse.ArgumentParser(
            prog="compress export-plan", formatter_class=fmt,
            description="Write a compressed folder's plan to a file, or to stdout.",
            epilog="example: compress export-plan out/smollm2-window --output plan.json",
        )
        p.add_argument("path", help="compressed folder or plan file")
        p.add_argument("--output", help="file to write (default: stdout)")
        return p
    if name == "show":
        p = argparse.ArgumentParser(
            prog="compress show", formatter_class=fmt,
            description="Print a readable per-layer summary of a plan: density per length and each layer's heads.",
            epilog="example: compress show out/smollm2-window --lengths 1024,4096",
        )
        p.add_argument("path", help="compressed folder or plan file")
        p.add_argument("--lengths", type=_int_list, help="lengths to show density at")
        return p
    p = argparse.ArgumentParser(
        prog="compress report", formatter_class=fmt,
        description="Write one self-contained HTML page showing a plan and what it costs and buys.",
        epilog="example: compress report out/smollm2-window --output report.html",
    )
    p.add_argument("path", help="compressed folder")
    p.add_argument("--output", help="HTML file (default: DIR/report.html)")
    return p


def run_compress(args: argparse.Namespace) -> int:
    from compressor.pipeline import compress

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    plan, out = compress(
        args.model, args.recipe, args.output, device=args.device, dtype=args.dtype, seed=args.seed,
        overwrite=args.overwrite, report=not args.no_report, log=log, overrides=args.overrides,
    )
    if out is None:
        print(plan.to_json())
    else:
        print(plan.summary())
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from compressor import runtime
    from compressor.checkpoint import save_eval_results
    from compressor.evaluate import evaluate
    from compressor.models import check_lengths, load_model, resolve_model
    from compressor.pipeline import software_versions
    from compressor.plan import PLAN_FILENAME, Plan

    folder = Path(args.model).expanduser()
    plan = Plan.load(folder) if (folder / PLAN_FILENAME).is_file() else None
    columns: dict[str, dict] = {}
    if plan is not None and any(layer.linear for layer in plan.layers):
        from compressor.checkpoint import load

        base, base_tok, _ = load_model(plan.calibration.get("model_spec", plan.model.name_or_path), args.device, args.dtype)
        check_lengths(base, args.lengths, "--lengths")
        columns["dense"] = evaluate(base, base_tok, args.tasks, args.lengths, args.samples, args.seed)
        del base
        model, tokenizer = load(folder, args.device, args.dtype)
        columns["plan"] = evaluate(model, tokenizer, args.tasks, args.lengths, args.samples, args.seed)
    else:
        model, tokenizer, _ = load_model(resolve_model(args.model), args.device, args.dtype)
        check_lengths(model, args.lengths, "--lengths")
        if plan is not None:
            plan.check_against(model)  # before spending time on the dense side
        columns["dense"] = evaluate(model, tokenizer, args.tasks, args.lengths, args.samples, args.seed)
        if plan is not None:
            runtime.apply(model, plan)
            columns["plan"] = evaluate(model, tokenizer, args.tasks, args.lengths, args.samples, args.seed)
    results = {
        "model": str(args.model), "tasks": args.tasks, "lengths": args.lengths, "samples": args.samples,
        "seed": args.seed, "results": columns,
        "density": {str(n): plan.density(n) for n in args.lengths} if plan is not None else None,
        "software": software_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if plan is not None:
        save_eval_results(folder, results)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_eval_table(results))
    return 0


def format_eval_table(results: dict) -> str:
    """Dense vs plan per task and length, as aligned text."""
    cols = list(results["results"])
    header = f"{'task':<12}{'length':>8}" + "".join(f"{c:>12}" for c in cols)
    lines = [header, "-" * len(header)]
    for task in results["tasks"]:
        for n in results["lengths"]:
            vals = [results["results"][c][task][str(n)] for c in cols]
            fmt = "{:>12.3f}" if task == "perplexity" else "{:>12.1%}"
            lines.append(f"{task:<12}{n:>8}" + "".join(fmt.format(v) for v in vals))
    if results.get("density"):
        lines.append("plan density: " + ", ".join(f"{n}: {d:.1%}" for n, d in results["density"].items()))
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    from compressor.plan import Plan, write_text_atomic

    plan = Plan.load(args.path)
    if args.output:
        write_text_atomic(Path(args.output), plan.to_json() + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(plan.to_json())
    return 0


def run_show(args: argparse.Namespace) -> int:
    from compressor.plan import Plan

    print(Plan.load(args.path).summary(args.lengths))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from compressor.report import write_report

    out = write_report(Path(args.path), Path(args.output) if args.output else None)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; user errors print one line and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            args = sub_parser(argv[0]).parse_args(argv[1:])
            runner = {"eval": run_eval, "export-plan": run_export, "show": run_show, "report": run_report}[argv[0]]
            return runner(args)
        return run_compress(main_parser().parse_args(argv))
    except CompressorError as err:
        print(f"compress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
