"""Which KV groups should a MoA plan hold dense? Rankings compared by held-out perplexity and passkey accuracy.

MoA's search prices every head by a first-order estimate, which misses redundancy: when several heads can each
fetch the same far token, cutting one alone costs nothing, so the search cuts them all. Holding some groups dense
before the search is the remedy (``MoAConfig.retrieval_dense``); this script compares what to rank them by, on one
shared profile:

- ``copy``: the answer rows' attention on prompt copies of the answer token (retrieval tasks);
- ``recall``: plain text's attention on earlier copies of the next token at least ``RECALL_DISTANCE`` back;
- ``both``: each of the two divided by its largest group, then the larger of the two per group;

For every ranking and every count of groups held, the rest are searched at ``--density`` as MoA does, and the plan's
perplexity (and passkey accuracy) is measured on held-out data at each length.

    python scripts/eval_moa_ranking.py --device cuda --cal-lengths 1024 2048 4096 --cal-samples 8 \
        --ks 0 9 18 27 36 --rankings copy recall both --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import numpy as np
import torch
from provenance import emit, relative_table


def group_scores(table: torch.Tensor, kv_heads: int) -> np.ndarray:
    """[layers, q_heads] -> [layers * kv_heads] sums over each KV group's query heads."""
    layers, heads = table.shape
    return table.reshape(layers, kv_heads, heads // kv_heads).sum(-1).flatten().double().numpy()


def profiled(args, recall_distance: int | None = None):
    """Load SmolLM2, build ``args.recipe``'s calibration samples (``--cal-lengths`` / ``--cal-samples`` override),
    regenerate their answers with the dense model and profile them per task. Returns a namespace with model,
    tokenizer, config (the recipe's attention section), lengths, samples, profiles (tasks merged) and seconds."""
    from types import SimpleNamespace

    from compressor.calibration.data import calibration_samples
    from compressor.calibration.influence import merge_profiles, model_aligned_samples, profile_influence
    from compressor.models import load_model
    from compressor.recipe import load_recipe

    began = time.perf_counter()
    model, tokenizer, _ = load_model("smollm2-135m", device=args.device, dtype="float32")
    recipe = load_recipe(args.recipe)
    cal, config = recipe.calibration, recipe.attention
    lengths = sorted(args.cal_lengths or cal.lengths)
    samples = calibration_samples(cal.source, tokenizer, lengths, args.cal_samples or cal.samples, cal.seed, chat=cal.chat)
    samples = model_aligned_samples(model, samples, config.answer_tokens)
    by_task = {
        task: profile_influence(model, [s for s in samples if s.task == task], sink=config.sink,
                                text_fraction=config.text_fraction, chunk=config.chunk, recall_distance=recall_distance)
        for task in dict.fromkeys(s.task for s in samples)
    }
    profiles = {n: merge_profiles([(p[n], 1.0) for p in by_task.values() if n in p]) for n in lengths}
    seconds = time.perf_counter() - began
    print(f"profiled {len(samples)} samples at {lengths} in {seconds:.0f} s", flush=True)
    return SimpleNamespace(model=model, tokenizer=tokenizer, config=config, lengths=lengths, samples=samples,
                           profiles=profiles, seconds=seconds)


def measure(model, tokenizer, args, name: str, heads: list | None) -> dict[str, object]:
    """One table row: the plan's density and held-out perplexity (and passkey accuracy) at ``args.lengths``."""
    from compressor import runtime
    from compressor.evaluate import perplexity, retrieval_accuracy
    from compressor.methods.moa import plan_from_heads

    row: dict[str, object] = {"config": name}
    if heads is not None:
        plan = plan_from_heads(model, heads)
        row["density"] = "/".join(f"{plan.density(n):.3f}" for n in args.lengths)
        runtime.apply(model, plan)
    try:
        for n in args.lengths:
            row[f"ppl@{n}"] = perplexity(model, tokenizer, n, args.ppl_samples, 0)
        for n in args.lengths if args.passkey_samples else []:
            row[f"passkey@{n}"] = retrieval_accuracy(model, tokenizer, "passkey", n, args.passkey_samples, 0)
    finally:
        if heads is not None:
            runtime.remove(model)
    print(json.dumps(row), flush=True)
    return row


def header(title: str, script: str, args) -> list[str]:
    """A results file's title and where it was measured: date, machine, versions, command."""
    import transformers

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; machine: {machine}",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- command: `python scripts/{script} {' '.join(sys.argv[1:])}`",
    ]


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options both MoA probes take: recipe, device, budget, calibration, evaluation, output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="moa-cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--cal-lengths", type=int, nargs="+", default=[])
    parser.add_argument("--cal-samples", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--passkey-samples", type=int, default=0, help="passkey samples per length (0: skip)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--rankings", nargs="+", default=["copy", "recall", "both"])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 9, 18, 27, 36])
    parser.add_argument("--min-windows", type=int, nargs="+", default=[0],
                        help="also search with only the rules whose window is at least this at every length")
    parser.add_argument("--uniform-densities", type=float, nargs="*", default=[],
                        help="reference rows: one sink + window for every head at this density at the first length")
    args = parse(parser)

    from compressor.calibration.influence import RECALL_DISTANCE
    from compressor.methods.moa import candidate_rules, estimated_loss, rules_at_least, search_plan
    from compressor.plan import WindowPattern, causal_window_density

    run = profiled(args, recall_distance=RECALL_DISTANCE)
    model, tokenizer, config, lengths, samples, profiles = (
        run.model, run.tokenizer, run.config, run.lengths, run.samples, run.profiles)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    kv = model.config.num_key_value_heads
    group = heads // kv
    copy = group_scores(sum(p.copy for p in profiles.values()), kv)
    recall = group_scores(sum(p.recall for p in profiles.values()), kv)
    scores = {"copy": copy, "recall": recall,
              "both": np.maximum(copy / max(copy.max(), 1e-12), recall / max(recall.max(), 1e-12))}
    top = {name: [(int(i) // kv, int(i) % kv, round(float(s[i]), 4)) for i in np.argsort(-s, kind="stable")[:12]]
           for name, s in scores.items()}
    print(json.dumps(top), flush=True)

    rules = candidate_rules(config, lengths)
    loss = estimated_loss(profiles, rules, config.influence)
    rows = []

    dense = measure(model, tokenizer, args, "dense", None)
    rows.append(dense)
    for d in args.uniform_densities:
        n0 = args.lengths[0]
        w = next(w for w in range(1, n0 + 1) if causal_window_density(config.sink, w, n0) >= d)
        uniform = WindowPattern(alpha=float(w), beta=0.0, sink=config.sink)
        rows.append(measure(model, tokenizer, args, f"uniform window {w} (density {d:g} at {n0})", [[uniform] * heads for _ in range(layers)]))
    seen: dict[tuple, dict] = {}
    for min_window in args.min_windows:
        keep = rules_at_least(rules, lengths, min_window)
        sub_rules, sub_loss = [rules[i] for i in keep], loss[:, :, keep]
        tag = f", window >= {min_window}" if min_window else ""
        for ranking in args.rankings:
            order = [int(i) for i in np.argsort(-scores[ranking], kind="stable")]
            for k in args.ks:
                held = tuple(sorted(order[:k]))
                if (held, min_window) in seen:
                    rows.append({**seen[held, min_window], "config": f"{ranking} k={k}{tag} (same groups)"})
                    continue
                t0 = time.perf_counter()
                try:
                    heads_, _ = search_plan(sub_loss, sub_rules, lengths, args.density, [1.0] * len(lengths), group,
                                            None, dense_items=list(held))
                except Exception as err:  # the budget cannot hold k dense groups
                    print(f"{ranking} k={k}{tag}: {err}", flush=True)
                    continue
                row = measure(model, tokenizer, args, f"{ranking} k={k}{tag}", heads_)
                row["search_s"] = round(time.perf_counter() - t0, 1)
                at = lengths[0]
                windows = sorted(p.window_for_length(at) for row_ in heads_ for p in row_ if isinstance(p, WindowPattern))
                row[f"windows@{at} q10/50/90"] = "/".join(
                    str(windows[int(q * (len(windows) - 1))]) for q in (0.1, 0.5, 0.9)) if windows else "-"
                seen[held, min_window] = row
                rows.append(row)

    lines = header(f"Which KV groups to hold dense: rankings at density {args.density}", "eval_moa_ranking.py", args)
    lines += [
        f"- profile: {len(samples)} samples at {lengths} ({run.seconds:.0f} s); rules of `{args.recipe}` ({len(rules)})",
        f"- top groups (layer, KV head, score) per ranking: `{json.dumps(top)}`",
        "",
    ]
    lines += relative_table(rows, dense)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
