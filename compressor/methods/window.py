"""The ``window`` attention method: one uniform sink + sliding window for every head, at a target density.

``scaling: elastic`` (default) makes the window proportional to the input length (window(N) = beta * N) so the
density stays near the target at every length; ``scaling: fixed`` uses one window in tokens, sized to reach the
target density at ``length`` (or given directly as ``window``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.methods.registry import CompressionContext, MethodResult, register_method
from compressor.plan import ModelSignature, WindowPattern, causal_window_density


@dataclass
class WindowConfig:
    """Uniform sink + window. ``density`` is the share of causal attention entries kept at ``length``."""

    density: float = 0.5
    sink: int = 64
    scaling: Literal["elastic", "fixed"] = "elastic"
    length: int = 4096
    window: int | None = None  # fixed window in tokens; overrides density

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")


def uniform_window(config: WindowConfig) -> WindowPattern:
    """The single pattern every head gets: the widest rule whose density at ``config.length`` is <= the target."""
    n = config.length
    if config.window is not None:
        return WindowPattern(alpha=float(config.window), beta=0.0, sink=config.sink)
    if config.scaling == "fixed":
        lo, hi = 1, n  # largest window with density <= target (density grows with the window)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if causal_window_density(config.sink, mid, n) <= config.density:
                lo = mid
            else:
                hi = mid - 1
        return WindowPattern(alpha=float(lo), beta=0.0, sink=config.sink)
    steps = 1024  # beta on a 1/1024 grid keeps the rule exact in float32
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if WindowPattern(alpha=0.0, beta=mid / steps, sink=config.sink).density(n) <= config.density:
            lo = mid
        else:
            hi = mid - 1
    return WindowPattern(alpha=0.0, beta=lo / steps, sink=config.sink)


@register_method("attention", "window", WindowConfig)
def window_plan(ctx: CompressionContext, config: WindowConfig) -> MethodResult:
    """Every head of every layer gets the same sink + window."""
    sig = ModelSignature.of(ctx.model)
    pattern = uniform_window(config)
    heads = [[pattern for _ in range(sig.num_attention_heads)] for _ in range(sig.num_hidden_layers)]
    return MethodResult(heads=heads, search={"window": {"rule": pattern.to_dict(), "target_density": config.density}})
