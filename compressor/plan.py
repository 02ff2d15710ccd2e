"""The compression plan: plain data (dataclasses <-> versioned JSON), checked against the model it is applied to.

A plan holds, per decoder layer, one attention pattern per query head (``dense``, ``window``, and the types other
methods register), the layer's attention-quantization setting and its linear-layer quantization settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compressor.errors import PlanError, did_you_mean

PLAN_FORMAT = "compressor.plan"
PLAN_VERSION = 1
PLAN_FILENAME = "compression_plan.json"
SCHEMA_PATH = Path(__file__).with_name("plan_schema.json")

# ---------------------------------------------------------------------------------------------------------------
# Attention patterns: one per query head. Registered by their "type" string.

PATTERN_TYPES: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a pattern dataclass loadable from its ``type`` string."""
    PATTERN_TYPES[cls.type] = cls
    return cls


@dataclass(frozen=True)
class Pattern:
    """Base of per-head attention patterns."""

    type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the ``type`` key first."""
        return {"type": self.type, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "pattern") -> Pattern:
        """Build the registered pattern named by ``data["type"]``."""
        if not isinstance(data, dict) or "type" not in data:
            raise PlanError(f"{where}: a pattern must be an object with a 'type', got {data!r}")
        kind = data["type"]
        if kind not in PATTERN_TYPES:
            raise PlanError(
                f"{where}: unknown pattern type {kind!r}{did_you_mean(str(kind), list(PATTERN_TYPES))}; "
                f"known: {', '.join(sorted(PATTERN_TYPES))}"
            )
        cls = PATTERN_TYPES[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - fields - {"type"}
        if extra:
            raise PlanError(f"{where}: unknown field(s) {sorted(extra)} for pattern type {kind!r}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "type"})
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None

    def density(self, length: int) -> float:
        """Share of the causal attention entries this head computes at input length ``length``."""
        return 1.0


@register_pattern
@dataclass(frozen=True)
class DensePattern(Pattern):
    """Full (causal) attention."""

    type: ClassVar[str] = "dense"

    def __repr__(self) -> str:
        return "dense"


@register_pattern
@dataclass(frozen=True)
class WindowPattern(Pattern):
    """Sink + sliding window: the first ``sink`` tokens and the last ``window(N) = alpha + beta * N`` tokens."""

    type: ClassVar[str] = "window"
    alpha: float
    beta: float = 0.0
    sink: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"window sink must be a non-negative integer, got {self.sink!r}")
        if not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"window beta must be in [0, 1], got {self.beta!r}")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"window alpha must be finite, got {self.alpha!r}")

    def window_for_length(self, length: int) -> int:
        """The window in tokens at input length ``length``: clamp(floor(alpha + beta * N), 1, N)."""
        return int(min(max(math.floor(self.alpha + self.beta * length), 1), length))

    def density(self, length: int) -> float:
        return causal_window_density(self.sink, self.window_for_length(length), length)

    def __repr__(self) -> str:
        return f"window(sink={self.sink}, {self.alpha:g}+{self.beta:g}N)"


@register_pattern
@dataclass(frozen=True)
class XAttentionPattern(Pattern):
    """Per input, key blocks by antidiagonal score until their share reaches ``tau``; ``expected_density``: the
    block density measured at calibration (what plan summaries report; the real one depends on the input)."""

    type: ClassVar[str] = "xattention"
    tau: float
    stride: int = 8
    block_size: int = 128
    expected_density: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"xattention tau must be in [0, 1], got {self.tau!r}")
        if self.stride not in (4, 8, 16):
            raise ValueError(f"xattention stride must be 4, 8 or 16, got {self.stride!r}")
        if self.block_size not in (64, 128):
            raise ValueError(f"xattention block_size must be 64 or 128, got {self.block_size!r}")
        if not 0.0 <= float(self.expected_density) <= 1.0:
            raise ValueError(f"xattention expected_density must be in [0, 1], got {self.expected_density!r}")

    def density(self, length: int) -> float:
        return float(self.expected_density)

    def __repr__(self) -> str:
        return f"xattention(tau={self.tau:.3g}, S={self.stride}, bs={self.block_size})"


def causal_window_density(sink: int, window: int, length: int) -> float:
    """Share of the N(N+1)/2 causal entries that a sink + window head reads at length N (closed form)."""
    n, w, s = length, min(window, length), min(sink, length)
    if n <= 0:
        return 0.0
    band = w * n - w * (w - 1) // 2  # row i sees min(i + 1, w) keys
    # sink keys j < s outside the band: row i (i >= w) adds keys j < min(s, i - w + 1)
    extra = 0
    if s > 0 and n > w:
        m = n - w  # rows i = w .. n-1, extra = min(s, i - w + 1) = min(s, t) for t = 1..m
        full = max(0, m - s)
        upto = min(s, m)
        extra = upto * (upto + 1) // 2 + full * s
    return (band + extra) / (n * (n + 1) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Plan structure.


@dataclass
class ModelSignature:
    """What a plan was made for; loading refuses a model whose shape differs."""

    architecture: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    name_or_path: str = ""
    config_hash: str = ""

    @staticmethod
    def of(model_or_config: Any) -> ModelSignature:
        """The signature of a transformers model or config."""
        config = getattr(model_or_config, "config", model_or_config)
        text = getattr(config, "get_text_config", lambda: config)()
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        archs = getattr(config, "architectures", None) or [type(model_or_config).__name__]
        return ModelSignature(
            architecture=archs[0],
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            name_or_path=str(getattr(config, "_name_or_path", "") or ""),
            config_hash=config_hash(text),
        )

    def mismatches(self, other: ModelSignature) -> list[str]:
        """Readable differences in shape (name, path and hash are informative only)."""
        keys = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"]
        return [f"{k}: plan {getattr(self, k)} vs model {getattr(other, k)}" for k in keys if getattr(self, k) != getattr(other, k)]


def config_hash(config: Any) -> str:
    """A short hash of the architecture-defining part of a config."""
    keys = [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
    ]
    data = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class AttentionLayerPlan:
    """Per-head patterns of one layer, and the layer's attention quantization (None: unquantized)."""

    heads: list[Pattern]
    quant: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": [h.to_dict() for h in self.heads]}
        if self.quant is not None:
            out["quant"] = self.quant
        return out


@dataclass
class LayerPlan:
    """One decoder layer: attention, and linear-layer settings keyed by module path inside the layer."""

    attention: AttentionLayerPlan
    linear: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attention": self.attention.to_dict()}
        if self.linear is not None:
            out["linear"] = self.linear
        return out


@dataclass
class Plan:
    """The whole plan. ``recipe``, ``calibration``, ``predicted`` and ``search`` are free-form provenance."""

    model: ModelSignature
    layers: list[LayerPlan]
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    linear: dict[str, Any] | None = None  # model-wide linear-quantization settings (modules outside decoder layers)

    @staticmethod
    def dense(model: Any) -> Plan:
        """A plan that changes nothing: every head dense."""
        sig = ModelSignature.of(model)
        layers = [
            LayerPlan(AttentionLayerPlan([DensePattern() for _ in range(sig.num_attention_heads)]))
            for _ in range(sig.num_hidden_layers)
        ]
        return Plan(model=sig, layers=layers)

    # -- density -------------------------------------------------------------------------------------------
    def density(self, length: int) -> float:
        """Average share of causal attention entries computed at ``length``, over all heads of all layers."""
        heads = [h for layer in self.layers for h in layer.attention.heads]
        return sum(h.density(length) for h in heads) / max(1, len(heads))

    def layer_density(self, layer: int, length: int) -> float:
        """Average density of one layer's heads at ``length``."""
        heads = self.layers[layer].attention.heads
        return sum(h.density(length) for h in heads) / max(1, len(heads))

    def is_dense(self) -> bool:
        """True when the plan changes nothing in the model."""
        return (
            all(isinstance(h, DensePattern) for layer in self.layers for h in layer.attention.heads)
            and all(layer.attention.quant is None and not layer.linear for layer in self.layers)
            and not self.linear
        )

    # -- JSON ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (format, version, model, provenance, layers)."""
        out: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": dataclasses.asdict(self.model),
            "recipe": self.recipe,
            "calibration": self.calibration,
            "predicted": self.predicted,
            "search": self.search,
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.linear is not None:
            out["linear"] = self.linear
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Plan:
        """Parse and validate a plan document (schema first, then pattern fields)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a compressor plan: expected \"format\": \"{PLAN_FORMAT}\"")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan format version {data.get('version')!r} is not supported by this compressor "
                f"(it reads version {PLAN_VERSION}); re-run `compress` with this version"
            )
        validate_schema(data)
        layers = []
        for i, layer in enumerate(data["layers"]):
            att = layer["attention"]
            heads = [Pattern.from_dict(h, f"layers[{i}].attention.heads[{j}]") for j, h in enumerate(att["heads"])]
            layers.append(LayerPlan(AttentionLayerPlan(heads, att.get("quant")), layer.get("linear")))
        return Plan(
            model=ModelSignature(**data["model"]),
            layers=layers,
            recipe=data.get("recipe", {}),
            calibration=data.get("calibration", {}),
            predicted=data.get("predicted", {}),
            search=data.get("search", {}),
            linear=data.get("linear"),
        )

    @staticmethod
    def from_json(text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from None
        return Plan.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename)."""
        write_text_atomic(Path(path), self.to_json() + "\n")

    @staticmethod
    def load(path: str | os.PathLike) -> Plan:
        """Read a plan file, or the plan inside a compressed-model directory."""
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILENAME
        if not p.is_file():
            raise PlanError(f"no plan at {p}: expected a {PLAN_FILENAME} written by `compress`")
        return Plan.from_json(p.read_text())

    # -- checks --------------------------------------------------------------------------------------------
    def check_against(self, model: Any) -> None:
        """Refuse a model whose shape differs from the plan's, naming both sides."""
        other = ModelSignature.of(model)
        problems = self.model.mismatches(other)
        if len(self.layers) != other.num_hidden_layers:
            problems.append(f"layers listed: plan {len(self.layers)} vs model {other.num_hidden_layers}")
        for i, layer in enumerate(self.layers):
            if len(layer.attention.heads) != other.num_attention_heads:
                problems.append(
                    f"layer {i} heads: plan {len(layer.attention.heads)} vs model {other.num_attention_heads}"
                )
                break
        if problems:
            raise PlanError(
                f"plan made for {self.model.architecture} ({self.model.name_or_path or 'unnamed'}) does not match "
                f"model {other.architecture} ({other.name_or_path or 'unnamed'}): " + "; ".join(problems)
            )

    def summary(self, lengths: list[int] | None = None) -> str:
        """A readable per-layer summary (what `compress show` prints)."""
        lengths = lengths or self.predicted.get("lengths") or [1024, 4096]
        sig = self.model
        lines = [
            f"plan for {sig.architecture} {sig.name_or_path} — {sig.num_hidden_layers} layers x "
            f"{sig.num_attention_heads} heads ({sig.num_key_value_heads} KV heads, head_dim {sig.head_dim})",
            "recipe: " + str(self.recipe.get("name", "?")),
            "density: " + ", ".join(f"{n}: {self.density(n):.1%}" for n in lengths),
        ]
        header = "layer  " + "  ".join(f"{'@' + str(n):>7}" for n in lengths) + "  heads"
        lines.append(header)
        for i, layer in enumerate(self.layers):
            dens = "  ".join(f"{self.layer_density(i, n):7.1%}" for n in lengths)
            kinds: dict[str, int] = {}
            for h in layer.attention.heads:
                kinds[repr(h)] = kinds.get(repr(h), 0) + 1
            heads = ", ".join(f"{c}x {k}" for k, c in kinds.items())
            extra = ""
            if layer.attention.quant:
                extra += f"  attn-quant={layer.attention.quant.get('variant', layer.attention.quant)}"
            if layer.linear:
                precisions = sorted({str(s.get('precision')) for s in layer.linear.values()})
                extra += f"  linear={'/'.join(precisions)}"
            lines.append(f"{i:5d}  {dens}  {heads}{extra}")
        return "\n".join(lines)


def validate_schema(data: dict[str, Any]) -> None:
    """Validate a plan document against plan_schema.json, raising PlanError with the failing path."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as err:
        path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise PlanError(f"plan does not match its schema at {path}: {err.message}") from None


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
