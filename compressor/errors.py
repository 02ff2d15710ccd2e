"""Errors meant for users: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib


class CompressorError(Exception):
    """A problem with the user's input (model, recipe, plan, data, device); the message says what to change."""


class RecipeError(CompressorError):
    """A recipe that is malformed, names unknown keys or has values of the wrong type."""


class PlanError(CompressorError):
    """A plan that is malformed, of another format version, or made for another model."""


def did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean `x`?)' when a close choice exists, else ''."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
