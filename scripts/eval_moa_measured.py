"""Does a 50%-dense sink + window plan within 2% of dense perplexity exist for SmolLM2 at 1k? MoA's search with
measured instead of first-order costs, as a reference for what the first-order search leaves on the table.

1. MoA as shipped (first-order row-wise estimate, the ``--k`` KV groups of highest copy score held dense): plan P0.
2. At the operating point P0, for every KV group g and window w of a grid (``--windows`` tokens at 1k, scaled with N
   at other lengths), measure the held-in loss (MoA's per-task mean answer loss on the calibration samples) with g
   alone set to sink + w and every other group as in P0, and with g dense. cost[g, w, N] = L(g -> w) - L(g dense):
   a first-order expansion in groups around the sparse operating point (redundant heads are priced with the others
   already cut), zeroth-order (measured) in the masking itself.
3. The same knapsack (every rule's window interpolated on the grid, log-linear) gives P1; repeat from P1 for
   ``--rounds``. Every plan is evaluated on held-out perplexity and passkey.

    python scripts/eval_moa_measured.py --device cuda --cal-lengths 1024 2048 4096 --cal-samples 8 \
        --lengths 1024 2048 4096 8192 --ppl-samples 8 --passkey-samples 20
"""

from __future__ import annotations

import time

import numpy as np
from eval_moa_ranking import header, measure, parse, probe_parser, profiled
from provenance import emit, relative_table


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--k", type=int, default=27, help="KV groups of highest copy score held dense in P0")
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="window grid at 1k tokens (scaled by N / 1024 at other lengths); window 1 is always in")
    parser.add_argument("--rounds", type=int, default=2)
    args = parse(parser)

    from compressor.methods.moa import candidate_rules, estimated_loss, measured_loss, scored_samples, search_plan
    from compressor.plan import DensePattern, WindowPattern

    began = time.perf_counter()
    run = profiled(args)
    model, tokenizer, config, lengths, samples, profiles = (
        run.model, run.tokenizer, run.config, run.lengths, run.samples, run.profiles)

    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    kv = model.config.num_key_value_heads
    group = heads // kv
    items = layers * kv
    rules = candidate_rules(config, lengths)
    dense_rule = next(i for i, r in enumerate(rules) if isinstance(r, DensePattern))
    first_order = estimated_loss(profiles, rules, config.influence)
    copy = sum(p.copy for p in profiles.values()).reshape(layers, kv, group).sum(-1).flatten().numpy()
    held = sorted(int(i) for i in np.argsort(-copy, kind="stable")[: args.k])
    plans = {}
    heads0, _ = search_plan(first_order, rules, lengths, args.density, [1.0] * len(lengths), group, None,
                            dense_items=held)
    plans[f"P0 (first order, {args.k} held)"] = heads0
    scored = {n: scored_samples([s for s in samples if s.length == n], config.text_fraction) for n in lengths}

    def with_group(base: list, item: int, pattern) -> list:
        layer, g = divmod(item, kv)
        out = [list(row) for row in base]
        for h in range(g * group, (g + 1) * group):
            out[layer][h] = pattern
        return out

    windows = sorted({1, *args.windows})  # narrower rules must not be priced like the narrowest grid point
    current = heads0
    for round_ in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        cost = np.zeros((items, len(windows), len(lengths)))
        for li, n in enumerate(lengths):
            grid = [max(1, round(w * n / 1024)) for w in windows]
            for item in range(items):
                dense_loss = measured_loss(model, with_group(current, item, DensePattern()), scored[n])[0]
                for wi, w in enumerate(grid):
                    pattern = WindowPattern(alpha=float(w), beta=0.0, sink=config.sink)
                    cost[item, wi, li] = measured_loss(model, with_group(current, item, pattern), scored[n])[0] - dense_loss
            print(f"round {round_}: length {n} measured at {time.perf_counter() - t0:.0f} s", flush=True)
        measured_s = time.perf_counter() - t0
        # every rule's cost: log-linear in the window between grid points, 0 at the whole length (dense)
        table = np.zeros((layers, heads, len(rules), len(lengths)))
        for li, n in enumerate(lengths):
            grid = np.log([max(1, round(w * n / 1024)) for w in windows] + [n])
            for ri, rule in enumerate(rules):
                if ri == dense_rule:
                    continue
                x = np.log(rule.window_for_length(n))
                for item in range(items):
                    curve = np.append(np.maximum(cost[item, :, li], 0.0), 0.0)
                    layer, g = divmod(item, kv)
                    table[layer, g * group:(g + 1) * group, ri, li] = np.interp(x, grid, curve) / group
        current, solver = search_plan(table, rules, lengths, args.density, [1.0] * len(lengths), group, None)
        plans[f"P{round_} (measured at P{round_ - 1})"] = current
        dense_count = sum(isinstance(current[i // kv][(i % kv) * group], DensePattern) for i in range(items))
        print(f"round {round_}: measured {items} groups x {len(windows) + 1} x {len(lengths)} lengths in "
              f"{measured_s:.0f} s; solver {solver}; {dense_count} groups dense", flush=True)

    rows = []
    dense = measure(model, tokenizer, args, "dense", None)
    rows.append(dense)
    for name, heads_ in plans.items():
        rows.append(measure(model, tokenizer, args, name, heads_))

    lines = header(f"Measured-cost MoA search at density {args.density}", "eval_moa_measured.py", args)
    lines += [f"- total {time.perf_counter() - began:.0f} s", ""]
    lines += relative_table(rows, dense)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
