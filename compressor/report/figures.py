"""The report's figures: matplotlib's object API (no pyplot, so no global backend switch), each returned as inline SVG.

matplotlib is imported inside the functions: importing ``compressor.report`` stays cheap.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from compressor.plan import DensePattern, Pattern, Plan, WindowPattern

DENSE_COLOR = "#d62728"  # dense heads stand out in red: no sparse pattern's colour map comes near it
WINDOW_CMAP = "Blues"  # short windows light, long windows dark
OTHER_CMAPS = ["Greens", "Oranges", "Greys"]
THRESHOLD_FIELDS = ("tau", "threshold", "density", "keep", "ratio")


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_svg(fig: Any, salt: str) -> str:
    """The figure as an ``<svg>`` element; ``salt`` keeps element ids distinct between figures of one page."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt, "svg.image_inline": True}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def short_tokens(n: float) -> str:
    return f"{n / 1024:.3g}k" if n >= 1024 else f"{int(n)}"


def pattern_parameter(head: Pattern) -> tuple[str, float] | None:
    """The number a non-window pattern is coloured by: its threshold (``tau``, ...) or else its first numeric field."""
    fields = {k: v for k, v in head.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name in THRESHOLD_FIELDS:
        if name in fields:
            return name, float(fields[name])
    return next(((k, float(v)) for k, v in fields.items()), None)


def attention_heatmap(plan: Plan, length: int, salt: str) -> str:
    """Layer x head map at ``length``: windows by their window in tokens (log colour), other types by their
    threshold, dense heads in red; the layer's attention-quantization variant on the right."""
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.patches import Patch

    layers, heads = len(plan.layers), max(len(layer.attention.heads) for layer in plan.layers)
    rgba = np.ones((layers, heads, 4))
    window_norm = colors.LogNorm(vmin=1, vmax=max(2, length))
    window_cmap = colors.ListedColormap(matplotlib.colormaps[WINDOW_CMAP](np.linspace(0.2, 1, 256)))  # no near-white
    others: dict[str, tuple[str, list[float]]] = {}  # type -> (parameter name, values)
    for layer in plan.layers:
        for head in layer.attention.heads:
            if not isinstance(head, (DensePattern, WindowPattern)) and (param := pattern_parameter(head)):
                others.setdefault(head.type, (param[0], []))[1].append(param[1])
    other_maps = {
        kind: (matplotlib.colormaps[OTHER_CMAPS[k % len(OTHER_CMAPS)]],
               colors.Normalize(vmin=min(vals) - (1e-9 if min(vals) == max(vals) else 0), vmax=max(vals)), name)
        for k, (kind, (name, vals)) in enumerate(sorted(others.items()))
    }
    labels = np.full((layers, heads), "", dtype=object)
    for i, layer in enumerate(plan.layers):
        for j, head in enumerate(layer.attention.heads):
            if isinstance(head, DensePattern):
                rgba[i, j] = colors.to_rgba(DENSE_COLOR)
                labels[i, j] = "D"
            elif isinstance(head, WindowPattern):
                w = head.window_for_length(length)
                rgba[i, j] = window_cmap(window_norm(w))
                labels[i, j] = short_tokens(w)
            elif head.type in other_maps:
                cmap, norm, _ = other_maps[head.type]
                value = pattern_parameter(head)[1]  # type: ignore[index]
                rgba[i, j] = cmap(0.25 + 0.75 * norm(value))
                labels[i, j] = f"{value:.2g}"
            else:
                rgba[i, j] = colors.to_rgba("#9aa4ad")
                labels[i, j] = head.type[:2]
    quant = [layer.attention.quant for layer in plan.layers]
    show_quant = any(q is not None for q in quant)
    width = min(15.0, 3.2 + 0.42 * heads + (1.3 if show_quant else 0) + 1.2 * (1 + len(other_maps)))
    height = min(22.0, max(3.2, 1.6 + 0.3 * layers))
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.tick_params(labelsize=7 if max(heads, layers) > 24 else 8)
    if heads > 32:
        ax.set_xticks(range(0, heads, 4))
    if layers > 40:
        ax.set_yticks(range(0, layers, 2))
    if layers * heads <= 600:
        for i in range(layers):
            for j in range(heads):
                r, g, b, _ = rgba[i, j]
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"
                ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=6.5, color=ink)
    if show_quant:
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(layers), labels=[variant_of(q) for q in quant])
        right.tick_params(labelsize=7)
        right.set_ylabel("attention quantization")
    ax.set_title(f"attention plan at {length:,} tokens")
    fig.colorbar(cm.ScalarMappable(window_norm, window_cmap), ax=ax, shrink=0.8, pad=0.02, label="window (tokens)")
    for kind, (cmap, norm, name) in other_maps.items():
        fig.colorbar(cm.ScalarMappable(norm, cmap), ax=ax, shrink=0.8, pad=0.02, label=f"{kind} {name}")
    ax.legend(handles=[Patch(color=DENSE_COLOR, label="dense")], loc="upper left", bbox_to_anchor=(0, -0.06 - 3 / (72 * height)),
              fontsize=8, frameon=False)
    return to_svg(fig, salt)


def variant_of(quant: dict[str, Any] | None) -> str:
    """The layer's attention-quantization variant, for labels."""
    if quant is None:
        return "—"
    return str(quant.get("variant") or quant.get("method") or "quantized")


def density_curves(plan: Plan, lengths: Sequence[int], salt: str) -> str:
    """Density against input length: the whole plan (left) and each layer (right)."""
    import matplotlib

    lo, hi = max(16, min(lengths) // 8), max(lengths)
    grid = sorted(set(np.geomspace(lo, hi, 48).astype(int).tolist()) | set(lengths))
    fig = new_figure(11, 3.8)
    whole, per_layer = fig.subplots(1, 2, sharey=True)
    total = [plan.density(n) for n in grid]
    whole.plot(grid, total, color="black", lw=2)
    for n in lengths:
        d = plan.density(n)
        whole.plot([n], [d], "o", color="#2a5d9f")
        whole.annotate(f"{d:.0%}", (n, d), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    whole.set_title("whole plan")
    cmap = matplotlib.colormaps["viridis"]
    count = len(plan.layers)
    for i in range(count):
        per_layer.plot(grid, [plan.layer_density(i, n) for n in grid], color=cmap(i / max(1, count - 1)), lw=1)
    per_layer.plot(grid, total, color="black", lw=1.5, ls="--", label="whole plan")
    per_layer.legend(fontsize=8, loc="upper right")
    per_layer.set_title("per layer")
    from matplotlib import cm, colors

    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, max(1, count - 1)), cmap), ax=per_layer, label="layer", pad=0.01)
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    for ax in (whole, per_layer):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: short_tokens(v)))
    whole.set_ylabel("share of causal attention computed")
    return to_svg(fig, salt)


def precision_bits(name: str) -> float:
    """Weight bits a precision name implies (w4a8 -> 4, bf16 -> 16); unknown names sort last."""
    if m := re.match(r"w(\d+)", name):
        return float(m.group(1))
    if m := re.search(r"(\d+)$", name):
        return float(m.group(1))
    return math.inf


def linear_map(
    modules: list[str], precisions: list[list[str | None]], sensitivity: np.ndarray | None, sens_label: str, salt: str
) -> str:
    """Layer x projection precision map; beside it the measured sensitivity, when recorded."""
    import matplotlib
    from matplotlib import colors
    from matplotlib.patches import Patch

    names = sorted({p for row in precisions for p in row if p}, key=lambda n: (precision_bits(n), n))
    quantized = [n for n in names if precision_bits(n) < 16]  # fewest bits first: darkest colour
    cmap = matplotlib.colormaps["plasma"]
    palette = {n: colors.to_rgba("#cfd8e3") for n in names}
    palette.update({n: cmap(0.1 + 0.75 * k / max(1, len(quantized) - 1)) for k, n in enumerate(quantized)})
    layers = len(precisions)
    rgba = np.ones((layers, len(modules), 4))
    for i, row in enumerate(precisions):
        for j, p in enumerate(row):
            rgba[i, j] = palette[p] if p else colors.to_rgba("white")
    panels = 2 if sensitivity is not None else 1
    height = min(22.0, max(3.0, 1.8 + 0.28 * layers))
    fig = new_figure(min(15.0, 2.5 + panels * (1.6 + 0.75 * len(modules))), height)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    short = [m.split(".")[-1] for m in modules]
    short = short if len(set(short)) == len(short) else modules
    for a in axes:
        a.set_xticks(range(len(modules)), labels=short, rotation=45, ha="right", fontsize=8)
        a.set_yticks(range(layers) if layers <= 40 else range(0, layers, 2))
        a.tick_params(axis="y", labelsize=7)
        a.set_ylabel("layer")
    if layers * len(modules) <= 400:
        for i, row in enumerate(precisions):
            for j, p in enumerate(row):
                r, g, b, _ = rgba[i, j]
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"
                ax.text(j, i, p or "—", ha="center", va="center", fontsize=6, color=ink)
    ax.set_title("precision per linear layer")
    ax.legend(handles=[Patch(color=palette[n], label=n) for n in names], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1), frameon=False)
    if sensitivity is not None:
        s = axes[1]
        finite = sensitivity[np.isfinite(sensitivity) & (sensitivity > 0)]
        norm = colors.LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001)) if finite.size else None
        image = s.imshow(np.ma.masked_invalid(np.where(sensitivity > 0, sensitivity, np.nan)), aspect="auto",
                         interpolation="nearest", cmap="magma_r", norm=norm)
        s.set_title("measured sensitivity")
        fig.colorbar(image, ax=s, label=sens_label, pad=0.02)
    return to_svg(fig, salt)


LOSS_HINTS = ("loss", "kl", "cost", "error", "perplexity", "ppl", "accuracy", "score")
X_PREFERENCE = ("density", "avg_bits", "bits", "budget", "budget_value", "latency", "memory", "size", "params")


def numeric_fields(points: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is a finite number in every point, in first-seen order."""
    keys: list[str] = []
    for p in points:
        keys.extend(k for k in p if k not in keys)
    return [k for k in keys if all(isinstance(p.get(k), (int, float)) and not isinstance(p.get(k), bool)
                                  and math.isfinite(p[k]) for p in points)]


def tradeoff_axes(points: list[dict[str, Any]]) -> tuple[str, list[list[str]]] | None:
    """(x field, groups of y fields sharing an axes) for a list of trade-off points, or None when it is not one."""
    fields = numeric_fields(points)
    losses = [f for f in fields if any(h in f.lower() for h in LOSS_HINTS)]
    x = next((f for f in X_PREFERENCE if f in fields), None) or next((f for f in fields if f not in losses), None)
    losses = [f for f in losses if f != x]
    if x is None or not losses:
        return None
    plain = [f for f in losses if f.endswith("loss") and f != "answer_loss"]
    groups = ([plain] if plain else []) + [[f] for f in losses if f not in plain]
    return x, groups[:3]


def tradeoff(lists: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]], salt: str) -> str:
    """One row per list of candidate plans: loss against the budget's measure, the chosen plan as a star."""
    rows = [(label, points, chosen, axes) for label, points, chosen in lists if (axes := tradeoff_axes(points))]
    cols = max(len(a[1]) for *_, a in rows)
    fig = new_figure(min(15.0, 4.2 * cols + 0.5), 3.3 * len(rows))
    grid = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, points, chosen, (x, groups)) in enumerate(rows):
        order = sorted(range(len(points)), key=lambda k: points[k][x])
        for c in range(cols):
            ax = grid[r][c]
            if c >= len(groups):
                ax.set_visible(False)
                continue
            for y in groups[c]:
                line, = ax.plot([points[k][x] for k in order], [points[k][y] for k in order], "o-", ms=4, label=y)
                marked = [p for p in points if p.get("chosen") is True]
                if chosen is not None and isinstance(chosen.get(x), (int, float)) and isinstance(chosen.get(y), (int, float)):
                    marked.append(chosen)
                for p in marked:
                    ax.plot([p[x]], [p[y]], marker="*", ms=15, color=line.get_color(), mec="black", ls="none")
            ax.plot([], [], marker="*", ms=10, color="white", mec="black", ls="none", label="chosen")
            ax.set_xlabel(x)
            ax.set_ylabel(", ".join(groups[c]))
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return to_svg(fig, salt)


def evaluation(results: dict[str, dict[str, dict[str, Any]]], tasks: list[str], lengths: list[int], salt: str) -> str:
    """Dense vs plan per task against length, one panel per task."""
    fig = new_figure(min(15.0, 0.5 + 3.8 * len(tasks)), 3.3)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    styles = {"dense": dict(color="black", marker="o"), "plan": dict(color="#2a5d9f", marker="s")}
    for ax, task in zip(axes, tasks):
        for column, per_task in results.items():
            values = per_task.get(task) if isinstance(per_task, dict) else None
            values = values if isinstance(values, dict) else {}
            xs = [n for n in lengths if isinstance(values.get(str(n)), (int, float))]
            ys = [values[str(n)] for n in xs]
            if task != "perplexity":
                ys = [100 * v for v in ys]
            ax.plot(xs, ys, label=column, **styles.get(column, {"marker": "^"}))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, labels=[short_tokens(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("perplexity (lower is better)" if task == "perplexity" else "accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return to_svg(fig, salt)
