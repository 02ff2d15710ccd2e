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
