"""Linear-layer precisions: what each stores, how many bits it costs, and its compressed-tensors description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.errors import CompressorError, did_you_mean


SCALE_BITS = 16.0  # bits counted per stored weight scale


@dataclass(frozen=True)
class Precision:
    """One linear-layer precision. ``weight``/``act``: 'int8', 'fp8', 'int4' or None (kept in the model's dtype)."""

    name: str
    weight: str | None
    act: str | None
    group_size: int = 0  # int4: input channels per weight scale
    ct_format: str = ""  # compressed-tensors format of the stored weights
    relative_latency: float = 1.0  # predicted GEMM time relative to bf16 (H200, from scripts/bench_quant_linear.py)

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    def weight_bits(self, in_features: int | None = None) -> float:
        """Average stored bits per weight, scales included: one 16-bit scale (bf16, as compressed-tensors / vLLM store
        them) per int4 group, or per output channel (``in_features`` weights; ignored when None) for 8-bit weights."""
        if self.weight is None:
            return 16.0
        if self.weight == "int4":
            return 4.0 + SCALE_BITS / self.group_size
        return 8.0 + (SCALE_BITS / in_features if in_features else 0.0)

    def ct_scheme(self, targets: list[str]) -> dict[str, Any]:
        """The compressed-tensors ``config_groups`` entry for this precision."""
        kind = "float" if self.weight == "fp8" else "int"
        weights: dict[str, Any] = {
            "num_bits": 4 if self.weight == "int4" else 8,
            "type": kind,
            "symmetric": True,
            "strategy": "group" if self.weight == "int4" else "channel",
            "dynamic": False,
        }
        if self.weight == "int4":
            weights["group_size"] = self.group_size
        act = {"num_bits": 8, "type": "float" if self.act == "fp8" else "int", "symmetric": True,
               "strategy": "token", "dynamic": True}
        return {"targets": targets, "weights": weights, "input_activations": act, "format": self.ct_format}


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("bf16", None, None),
        Precision("w8a8-int8", "int8", "int8", ct_format="int-quantized", relative_latency=0.55),
        Precision("w8a8-fp8", "fp8", "fp8", ct_format="float-quantized", relative_latency=0.55),
        Precision("w4a8", "int4", "int8", group_size=128, ct_format="pack-quantized", relative_latency=0.45),
        # for layers whose in_features is not a multiple of 128 (SmolLM2's 576): smaller groups, same kernels
        Precision("w4a8-g64", "int4", "int8", group_size=64, ct_format="pack-quantized", relative_latency=0.47),
    )
}


def precision(name: str) -> Precision:
    """The precision called ``name``; refuses unknown names with the known ones."""
    if name not in PRECISIONS:
        raise CompressorError(
            f"unknown linear precision {name!r}{did_you_mean(str(name), list(PRECISIONS))}; known: {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[name]


def precision_of_scheme(scheme: dict[str, Any]) -> str:
    """Our precision name for a compressed-tensors scheme dict (the inverse of :meth:`Precision.ct_scheme`)."""
    w = scheme.get("weights") or {}
    a = scheme.get("input_activations") or {}
    for p in PRECISIONS.values():
        if not p.quantized:
            continue
        mine = p.ct_scheme([])
        if all(w.get(k) == v for k, v in mine["weights"].items()) and all(
            a.get(k) == v for k, v in mine["input_activations"].items() if k in ("num_bits", "type", "strategy")
        ):
            return p.name
    raise CompressorError(f"compressed-tensors scheme {scheme!r} matches none of our precisions ({', '.join(PRECISIONS)})")


def fitting_precision(name: str, in_features: int) -> str:
    """``name``, or the nearest precision whose weight layout fits ``in_features`` (int4 groups must divide it)."""
    p = precision(name)
    if p.weight != "int4" or in_features % p.group_size == 0:
        return name
    for other in PRECISIONS.values():
        if other.weight == "int4" and in_features % other.group_size == 0:
            return other.name
    return "w8a8-int8"


def layer_weight_bits(name: str, in_features: int) -> float:
    """Stored bits per weight of a linear layer with ``in_features`` inputs planned at ``name``, scales included,
    after :func:`fitting_precision` (SmolLM2's 576 inputs get int4 groups of 64): the one count the mixed-precision
    budget and the reports share."""
    return precision(fitting_precision(name, in_features)).weight_bits(in_features)
