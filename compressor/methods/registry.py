"""The method registry: (recipe section, method name) -> config dataclass and search function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compressor.plan import Pattern


@dataclass
class CompressionContext:
    """What a method's search gets: the dense model, its tokenizer, the parsed recipe and where to run."""

    model: torch.nn.Module
    tokenizer: Any
    recipe: Any  # compressor.recipe.Recipe
    device: torch.device
    model_name: str = ""
    cache: dict[str, Any] = field(default_factory=dict)  # shared between methods of one run (e.g. samples)

    @property
    def calibration_samples(self) -> list[Any]:
        """The recipe's calibration samples (``compressor.calibration.data.RetrievalSample``), loaded once."""
        if "samples" not in self.cache:
            from compressor.calibration.data import calibration_samples

            cal = self.recipe.calibration
            self.cache["samples"] = calibration_samples(
                cal.source, self.tokenizer, cal.lengths, cal.samples, cal.seed, chat=cal.chat
            )
        return self.cache["samples"]


@dataclass
class MethodResult:
    """Plan parts a method produced. Fields a method does not fill stay None.

    heads: per layer, per query head pattern (attention methods);
    attention_quant: per layer quant settings or None (attention-quantization methods);
    linear: per layer {module path inside the layer: settings} (linear methods); linear_model: model-wide settings;
    calibration / search: provenance recorded in the plan.
    """

    heads: list[list[Pattern]] | None = None
    attention_quant: list[dict[str, Any] | None] | None = None
    linear: list[dict[str, dict[str, Any]] | None] | None = None
    linear_model: dict[str, Any] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)


SearchFn = Callable[[CompressionContext, Any], MethodResult]


@dataclass(frozen=True)
class MethodSpec:
    section: str  # "attention", "attention_quant" or "linear"
    name: str
    config: type
    run: SearchFn


METHODS: dict[tuple[str, str], MethodSpec] = {}


def register_method(section: str, name: str, config: type) -> Callable[[SearchFn], SearchFn]:
    """Decorator registering ``fn(ctx, config) -> MethodResult`` as method ``name`` of recipe section ``section``."""

    def wrap(fn: SearchFn) -> SearchFn:
        METHODS[(section, name)] = MethodSpec(section, name, config, fn)
        return fn

    return wrap



def method_name(config: Any) -> str:
    """The registered name of a method config instance."""
    for spec in METHODS.values():
        if isinstance(config, spec.config):
            return spec.name
    raise KeyError(f"{type(config).__name__} is not a registered method config")
