"""`compress report`: one self-contained HTML page showing a plan and what it costs and buys.

    write_report(Path("out/smollm2-window"))          # -> out/smollm2-window/report.html

The page opens offline (styles inline, figures as inline SVG, no external reference). Sections: provenance and
predicted density; the attention plan as a layer x head map per length; density against length; linear-layer
precisions and their measured sensitivity; the search's trade-off candidates; dense-vs-plan evaluation. Sections
whose data the plan does not hold are left out or say so.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import CompressorError
from compressor.plan import PLAN_FILENAME, Plan, write_text_atomic
from compressor.report import figures
from compressor.report.page import esc, figure, fmt_number, fmt_percent, is_number, key_values, page, section, table, tabs

REPORT_FILENAME = "report.html"
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192]


def write_report(folder: Path, output: Path | None = None) -> Path:
    """Write the report of the plan in ``folder`` (or of a plan file) to ``output`` (default folder/report.html)."""
    from compressor.checkpoint import EVAL_FILENAME

    folder = Path(folder).expanduser()
    plan = Plan.load(folder)  # PlanError with one line: no plan there, another format version, malformed
    base = folder if folder.is_dir() else folder.parent
    target = Path(output).expanduser() if output is not None else (
        folder / REPORT_FILENAME if folder.is_dir() else folder.with_suffix(".html"))
    evaluation = read_eval(base / EVAL_FILENAME) if folder.is_dir() or folder.name == PLAN_FILENAME else None
    text = render(plan, evaluation)
    try:
        write_text_atomic(target, text)
    except OSError as err:
        raise CompressorError(f"cannot write the report to {target}: {err.strerror or err}") from None
    return target


def read_eval(path: Path) -> dict[str, Any] | None:
    """eval_results.json as a dict, None when absent, ``{"error": ...}`` when unreadable (the page says so)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"error": f"{path.name} could not be read: {err}"}
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        return {"error": f"{path.name} has no \"results\" object; re-run `compress eval`"}
    return data


def render(plan: Plan, evaluation: dict[str, Any] | None = None) -> str:
    """The whole HTML page for ``plan`` (and its evaluation results, when given)."""
    lengths = plan_lengths(plan)
    parts = [header(plan, lengths), attention_section(plan, lengths), density_section(plan, lengths)]
    parts.append(linear_section(plan))
    parts.append(search_section(plan))
    parts.append(eval_section(evaluation))
    parts.append(layers_section(plan, lengths))
    title = f"Compression report — {plan.model.name_or_path or plan.model.architecture}"
    return page(title, "".join(p for p in parts if p))


def plan_lengths(plan: Plan) -> list[int]:
    """The lengths the plan was made to be read at (predicted lengths), else a default set."""
    lengths = [int(n) for n in plan.predicted.get("lengths") or [] if is_number(n) and n > 0]
    return sorted(set(lengths)) or DEFAULT_LENGTHS


# -- sections ------------------------------------------------------------------------------------------------


def header(plan: Plan, lengths: list[int]) -> str:
    """Model, recipe, calibration provenance, software, dates and the predicted density per length."""
    sig, cal, recipe = plan.model, plan.calibration, plan.recipe
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = [f"<h1>{esc(sig.name_or_path or sig.architecture)}</h1>",
           f'<p class="sub">{esc(sig.architecture)} · {sig.num_hidden_layers} layers × {sig.num_attention_heads} heads '
           f"({sig.num_key_value_heads} KV heads, head_dim {sig.head_dim}) · recipe "
           f"<b>{esc(recipe.get('name', '?'))}</b> · plan made {esc(cal.get('date', 'at an unrecorded date'))} · "
           f"report written {esc(generated)}</p>"]
    if plan.is_dense():
        out.append('<p class="banner">This plan changes nothing: every head keeps full attention and nothing is '
                   "quantized, so the model runs exactly as the dense original.</p>")
    predicted = plan.predicted.get("density") or {}
    rows = [(f"{n:,}", fmt_percent(d if is_number(d := predicted.get(str(n))) else plan.density(n))) for n in lengths]
    scalars = [(k, v) for k, v in cal.items() if k not in ("software", "seconds", "date") and not isinstance(v, dict)]
    per_method = [(k, v) for k, v in cal.items() if isinstance(v, dict) and k not in ("software", "seconds")]
    out.append('<div class="grid">')
    out.append(f"<div><h3>Predicted density</h3>{table(['length', 'attention computed'], rows)}</div>")
    out.append("<div><h3>Model</h3>" + key_values([
        ("architecture", sig.architecture), ("name or path", sig.name_or_path), ("layers", sig.num_hidden_layers),
        ("query heads", sig.num_attention_heads), ("KV heads", sig.num_key_value_heads), ("head dim", sig.head_dim),
        ("config hash", sig.config_hash)]) + "</div>")
    out.append("<div><h3>Recipe</h3>" + key_values([
        ("name", recipe.get("name")), ("description", recipe.get("description")),
        *((f"{k}", v) for k, v in (recipe.get("resolved") or {}).items())]) + "</div>")
    out.append("<div><h3>Calibration</h3>" + key_values([*scalars, ("date", cal.get("date")),
                                                         ("seconds", cal.get("seconds"))]) + "</div>")
    out.append("<div><h3>Software</h3>" + key_values(list((cal.get("software") or {}).items())) + "</div>")
    out.append("</div>")
    if per_method:
        out.append("<details><summary>per-method calibration records</summary>" + key_values(per_method) + "</details>")
    return section("overview", "Plan overview", "".join(out))


def attention_section(plan: Plan, lengths: list[int]) -> str:
    """The layer x head map of the attention plan, one tab per length."""
    panels = [(f"{n:,} tokens", figure(figures.attention_heatmap(plan, n, f"heatmap-{n}"),
                                       f"Density at {n:,} tokens: {plan.density(n):.1%}")) for n in lengths]
    sub = ("Each cell is one query head. Window heads are coloured by their window in tokens at the chosen length "
           "(sink tokens come on top), other sparse patterns by their threshold; dense heads are red (D). "
           "The right-hand labels give each layer's attention-quantization variant.")
    return section("attention", "Attention plan: layer × head", tabs("len", panels, element_id="attention-heatmap"), sub)


def density_section(plan: Plan, lengths: list[int]) -> str:
    """Density against input length, whole plan and per layer."""
    svg = figures.density_curves(plan, lengths, "density")
    return section("density", "Density against input length", figure(svg),
                   "Share of the causal attention entries computed, for the whole plan and for each layer.")


def linear_section(plan: Plan) -> str:
    """Linear-layer precisions (layer x projection) and measured sensitivity; empty when nothing is quantized."""
    linear_search = plan.search.get("linear") if isinstance(plan.search.get("linear"), dict) else {}
    if not any(layer.linear for layer in plan.layers) and not plan.linear:
        return ""
    modules: list[str] = []
    for layer in plan.layers:
        modules.extend(m for m in layer.linear or {} if m not in modules)
    sens, sens_label = sensitivity_grid(linear_search.get("sensitivity"), modules, len(plan.layers))
    grid = [[str((layer.linear or {}).get(m, {}).get("precision")) if m in (layer.linear or {}) else None
             for m in modules] for layer in plan.layers]
    body = []
    if modules:
        body.append(figure(figures.linear_map(modules, grid, sens, sens_label, "linear"),
                           "Blank cells: the module is not quantized in that layer."))
    counts: dict[str, int] = {}
    for row in grid:
        for p in row:
            if p:
                counts[p] = counts.get(p, 0) + 1
    body.append(table(["precision", "linear layers"], sorted(counts.items(), key=lambda kv: figures.precision_bits(kv[0]))))
    if plan.linear:
        body.append("<h3>Model-wide settings (outside decoder layers)</h3>" + key_values(list(plan.linear.items())))
    if sens is None:
        body.append('<p class="sub">No sensitivity measurements in the plan (a single precision was asked for).</p>')
    return section("linear", "Linear layers: precision per projection", "".join(body))


def sensitivity_grid(record: Any, modules: list[str], layers: int) -> tuple[np.ndarray | None, str]:
    """[layers, modules] sensitivity at the fewest-bit quantized precision, from ``search.linear.sensitivity``."""
    if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
        return None, ""
    precisions = [str(p) for p in record.get("precisions") or []]
    quantized = [k for k, p in enumerate(precisions) if figures.precision_bits(p) < 16]
    column = min(quantized, key=lambda k: figures.precision_bits(precisions[k])) if quantized else None
    grid = np.full((layers, len(modules)), np.nan)
    metric = "kl"
    for item in record["layers"]:
        if not isinstance(item, dict) or item.get("module") not in modules or not is_number(item.get("layer")):
            continue
        value = item.get(metric)
        if isinstance(value, list) and column is not None and column < len(value):
            value = value[column]
        if is_number(value) and 0 <= int(item["layer"]) < layers:
            grid[int(item["layer"]), modules.index(item["module"])] = value
    if np.isnan(grid).all():
        return None, ""
    at = f" at {precisions[column]}" if column is not None else ""
    return grid, f"KL on text,\nquantized alone{at}"


def point_lists(node: Any, path: str = "", depth: int = 0) -> list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]]:
    """Every list of trade-off points in a search record: (where, points, the parent's ``chosen`` point or None)."""
    found: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]] = []
    if not isinstance(node, dict) or depth > 3:
        return found
    chosen = node.get("chosen") if isinstance(node.get("chosen"), dict) else None
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key == "sensitivity":
            continue
        if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
            if figures.tradeoff_axes(value):
                found.append((where, value, chosen))
        elif isinstance(value, dict):
            found.extend(point_lists(value, where, depth + 1))
    return found


def search_section(plan: Plan) -> str:
    """The search's candidate plans along the budget, chosen one marked; empty when the plan records none."""
    lists = point_lists(plan.search)
    if not lists:
        return ""
    body = [figure(figures.tradeoff(lists, "tradeoff"), "Stars mark the chosen plan.")]
    for where, points, chosen in lists:
        fields = figures.numeric_fields(points)
        marks = ["chosen" if p.get("chosen") is True or (chosen and all(chosen.get(f) == p.get(f) for f in fields))
                 else "" for p in points]
        body.append(f"<h3>{esc(where)}</h3>")
        body.append(table(["", *fields], [["★" if m else "", *(p[f] for f in fields)] for p, m in zip(points, marks)], marks))
    return section("search", "Search: candidates along the budget", "".join(body),
                   "Each point is one candidate plan the search weighed; the chosen one is marked.")


def eval_section(evaluation: dict[str, Any] | None) -> str:
    """Dense vs plan per task and length (table and chart), or a line saying how to get them."""
    if evaluation is None:
        return section("evaluation", "Evaluation", '<p class="sub">No eval_results.json beside the plan: run '
                       "<code>compress eval --model DIR</code> to compare dense and plan.</p>")
    if "error" in evaluation:
        return section("evaluation", "Evaluation", f'<p class="note">{esc(evaluation["error"])}</p>')
    results = {c: v for c, v in evaluation["results"].items() if isinstance(v, dict)}
    tasks = [str(t) for t in evaluation.get("tasks") or sorted({t for col in results.values() for t in col})]
    lengths = sorted({int(n) for n in evaluation.get("lengths") or [] if is_number(n)} or
                     {int(n) for col in results.values() for per in col.values() if isinstance(per, dict)
                      for n in per if str(n).isdigit()})

    def value(column: str, task: str, n: int) -> Any:
        per_task = results.get(column, {}).get(task)
        return per_task.get(str(n)) if isinstance(per_task, dict) else None

    compare = "dense" in results and "plan" in results
    density = evaluation.get("density") or {}
    rows = []
    for task in tasks:
        show = fmt_number if task == "perplexity" else fmt_percent
        for n in lengths:
            cells = [show(value(c, task, n)) for c in results]
            if compare:
                d, p = value("dense", task, n), value("plan", task, n)
                change = "—" if not (is_number(d) and is_number(p)) else (
                    f"{p - d:+.3f}" if task == "perplexity" else f"{100 * (p - d):+.1f} pts")
                cells.append(change)
            rows.append([task, f"{n:,}", *cells, fmt_percent(density.get(str(n)))])
    header = ["task", "length", *results, *(["plan − dense"] if compare else []), "plan density"]
    meta = key_values([("model", evaluation.get("model")), ("samples per task and length", evaluation.get("samples")),
                       ("seed", evaluation.get("seed")), ("date", evaluation.get("date")),
                       ("software", evaluation.get("software"))])
    body = [figure(figures.evaluation(results, tasks, lengths, "eval"))] if tasks and lengths else []
    body += [table(header, rows), "<details><summary>how it was measured</summary>", meta, "</details>"]
    return section("evaluation", "Evaluation: dense vs plan", "".join(body),
                   "Perplexity on held-out built-in text (lower is better) and retrieval accuracy, per length.")


def layers_section(plan: Plan, lengths: list[int]) -> str:
    """One row per layer: density per length, heads, attention quantization, linear precisions."""
    rows = []
    for i, layer in enumerate(plan.layers):
        kinds: dict[str, int] = {}
        for h in layer.attention.heads:
            kinds[repr(h)] = kinds.get(repr(h), 0) + 1
        linear = sorted({str(s.get("precision")) for s in (layer.linear or {}).values()})
        rows.append([i, *(fmt_percent(plan.layer_density(i, n)) for n in lengths),
                     ", ".join(f"{c}× {k}" for k, c in kinds.items()), figures.variant_of(layer.attention.quant),
                     "/".join(linear) or "—"])
    header = ["layer", *(f"@{n:,}" for n in lengths), "heads", "attention quant", "linear"]
    return section("layers", "Per layer", f"<details open><summary>{len(rows)} layers</summary>{table(header, rows)}</details>")


__all__ = ["REPORT_FILENAME", "render", "write_report"]
