"""What every results file records about where it was measured (shared by the benchmark scripts)."""

from __future__ import annotations

import subprocess


def git_commit() -> str:
    """The short commit of the checkout the script runs in, or "unknown" (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def emit(lines: list[str], out: str | None) -> str:
    """Print a results file's lines and write them to ``out`` (when given); returns the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


def relative_table(rows: list[dict[str, object]], dense: dict[str, object]) -> list[str]:
    """A markdown table of ``rows`` (each a dict with a "config" name), one column per key seen; perplexity columns
    (``ppl@...``) also show the change against ``dense``'s."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "config"))
    lines = ["| config | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            if isinstance(v, float) and k.startswith("ppl"):
                cells.append(f"{v:.3f} ({100 * (v / dense[k] - 1):+.1f}%)")
            else:
                cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return lines
