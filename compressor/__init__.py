"""compressor: post-training compression of Hugging Face transformers in one plan.

    model, tokenizer = compressor.load("out/smollm2-window")   # checkpoint + plan applied
    compressor.apply(model, compressor.Plan.load("plan.json"))  # a plan on a model already loaded

Imports are lazy: ``import compressor`` loads neither transformers nor Triton and never touches CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from compressor.plan import Plan

__all__ = ["Plan", "apply", "compress", "load", "__version__"]


def load(path: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """Load a compressed checkpoint written by ``compress`` with its plan applied; returns (model, tokenizer)."""
    from compressor.checkpoint import load as _load

    return _load(path, device=device, dtype=dtype)


def apply(model: Any, plan: Plan) -> Any:
    """Apply ``plan`` to a loaded transformers model in place and return it."""
    from compressor.runtime import apply as _apply

    return _apply(model, plan)


def compress(model: str, recipe: str, output: str | None = None, **kwargs: Any) -> tuple[Plan, Any]:
    """Run a recipe on a model (see ``compressor.pipeline.compress``); returns (plan, output folder)."""
    from compressor.pipeline import compress as _compress

    return _compress(model, recipe, output, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Plan":
        from compressor.plan import Plan

        return Plan
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
