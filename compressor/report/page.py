"""HTML building blocks of the report: escaped text, tables, CSS-only tabs and the self-contained page shell.

Nothing here fetches anything: styles and the one small script are inline, figures arrive as inline SVG.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; margin: 0;
       background: #f6f7f9; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 12px 0 4px; } h2 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 15px; margin: 12px 0 6px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 14px 18px; margin: 14px 0; }
.sub { color: #5b6670; margin: 0 0 8px; }
.note { background: #fff8e1; border: 1px solid #f0d48a; border-radius: 4px; padding: 8px 12px; }
.banner { background: #e8f4ff; border: 1px solid #9cc7f0; border-radius: 4px; padding: 10px 14px; font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #dde1e6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #e6f6e6; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f6f7f9; padding: 8px; overflow-x: auto; margin: 4px 0; white-space: pre-wrap; }
figure { margin: 8px 0; } figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: #5b6670; font-size: 12px; }
details > summary { cursor: pointer; color: #2a5d9f; margin: 4px 0; }
.tabs > input { position: absolute; opacity: 0; pointer-events: none; }
.tabs > label { display: inline-block; padding: 4px 12px; margin: 0 4px 6px 0; border: 1px solid #c4cbd3;
                border-radius: 14px; cursor: pointer; font-size: 13px; background: #fff; }
.tabs > .panel { display: none; }
"""

# Lets a person (or a headless browser in the tests) see that the page rendered: the heatmap's drawn size, the number
# of figures drawn, and any script or resource error land as data attributes on <html>.
SELF_CHECK = """
(function () {
  var root = document.documentElement;
  window.addEventListener('error', function (e) {
    var what = e.message || ((e.target && (e.target.src || e.target.href)) || 'error');
    root.dataset.errors = (root.dataset.errors || '') + what + ';';
  }, true);
  window.addEventListener('load', function () {
    var sizes = Array.prototype.map.call(document.querySelectorAll('#attention-heatmap svg'), function (s) {
      var b = s.getBoundingClientRect(); return [Math.round(b.width), Math.round(b.height)];
    }).filter(function (wh) { return wh[0] > 0 && wh[1] > 0; });
    root.dataset.heatmapSize = sizes.length ? sizes[0][0] + 'x' + sizes[0][1] : '0x0';
    root.dataset.figuresDrawn = String(Array.prototype.filter.call(document.querySelectorAll('figure svg'),
      function (s) { var b = s.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length);
    root.dataset.loaded = 'true';
  });
})();
"""


def esc(value: Any) -> str:
    """Text escaped for HTML."""
    return html.escape(str(value), quote=True)


def is_number(value: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_number(value: Any, digits: int = 4) -> str:
    """Numbers short and readable: integers as they are, floats with ``digits`` significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_percent(value: Any) -> str:
    """A share as a percentage, '—' when missing."""
    return f"{value:.1%}" if is_number(value) else "—"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """A plain HTML table; numeric cells are right-aligned, cells already formatted are strings."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        cls = row_classes[k] if row_classes and k < len(row_classes) and row_classes[k] else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        for cell in row:
            numeric = is_number(cell) or (isinstance(cell, str) and _looks_numeric(cell))
            text = fmt_number(cell) if not isinstance(cell, str) else esc(cell)
            out.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _looks_numeric(text: str) -> bool:
    try:
        float(text.strip().removesuffix(" pts").rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of what/value; dict and list values print as compact JSON."""
    rows = []
    for key, value in pairs:
        if value is None or value == "" or value == {} or value == []:
            continue
        if isinstance(value, (dict, list)):
            text = json.dumps(value, separators=(", ", ": "), default=str)
            rows.append(f"<tr><th>{esc(key)}</th><td><code>{esc(text)}</code></td></tr>")
        else:
            rows.append(f"<tr><th>{esc(key)}</th><td>{esc(fmt_number(value))}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else '<p class="sub">(not recorded)</p>'


def figure(svg: str, caption: str = "") -> str:
    """One inline figure."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart">{svg}{cap}</figure>'


def tabs(name: str, items: Sequence[tuple[str, str]], element_id: str = "") -> str:
    """CSS-only tabs (radio inputs + labels): ``items`` are (label, html); the first is shown."""
    ident = f' id="{esc(element_id)}"' if element_id else ""
    out = [f'<div class="tabs"{ident}>']
    for k, (label, _) in enumerate(items):
        checked = " checked" if k == 0 else ""
        out.append(f'<input type="radio" name="{name}" id="{name}-{k}"{checked}><label for="{name}-{k}">{esc(label)}</label>')
    out.extend(f'<div class="panel">{body}</div>' for _, body in items)
    out.append("</div>")
    # one rule per tab: the checked radio shows its panel and highlights its label
    rules = [
        f"#{name}-{k}:checked ~ .panel:nth-of-type({k + 1}) {{ display: block; }}"
        f"#{name}-{k}:checked + label {{ background: #2a5d9f; color: #fff; border-color: #2a5d9f; }}"
        for k in range(len(items))
    ]
    return f"<style>{''.join(rules)}</style>" + "".join(out)


def section(section_id: str, title: str, body: str, subtitle: str = "") -> str:
    """One titled card of the page."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{sub}{body}</section>'


def page(title: str, body: str) -> str:
    """The whole document: inline style and self-check script, no external reference."""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style><script>{SELF_CHECK}</script></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
