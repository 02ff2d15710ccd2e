"""Recipes: YAML files naming the calibration data, the methods and their budgets, parsed into typed dataclasses.

```yaml
name: window
calibration: {source: corpus, samples: 4, lengths: [1024, 2048], seed: 0}
attention: {method: window, density: 0.5, sink: 64}
```
Sections ``attention``, ``attention_quant`` and ``linear`` each pick a registered method by ``method:``; the rest of
the section fills that method's config dataclass. Unknown keys and wrong types are refused with the key's path.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from compressor.errors import RecipeError, did_you_mean

SECTIONS = ("attention", "attention_quant", "linear")


@dataclass
class CalibrationConfig:
    """Which data calibration runs on: a built-in source ('corpus', 'passkey', 'lines', 'needle', or a
    comma-separated mix), or a user data file / dataset name; ``samples`` per length."""

    source: str = "corpus"
    samples: int = 4
    lengths: list[int] = field(default_factory=lambda: [1024])
    seed: int = 0
    chat: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not self.lengths or any(n < 16 for n in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of token counts >= 16, got {self.lengths}")


@dataclass
class Recipe:
    """A parsed recipe. ``source`` is the recipe as given (kept in the plan's provenance)."""

    name: str
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    attention: Any = None
    attention_quant: Any = None
    linear: Any = None
    report_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    source: dict[str, Any] = field(default_factory=dict)

    def methods(self) -> list[tuple[str, Any]]:
        """(section, config) for each section the recipe fills, in the order they run."""
        return [(s, getattr(self, s)) for s in SECTIONS if getattr(self, s) is not None]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def builtin_recipes() -> list[str]:
    """Names of the recipes that ship with the package."""
    root = importlib.resources.files("compressor.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file path from a path, or from a built-in name as users type it (``moa`` or ``moa.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent in (Path("."), Path("recipes")):
        candidate = importlib.resources.files("compressor.recipes") / f"{stem}.yaml"
        if candidate.is_file():
            return Path(str(candidate))
    known = builtin_recipes()
    raise RecipeError(
        f"no recipe {name_or_path!r}: not a file, and not a built-in recipe{did_you_mean(stem, known)}; "
        f"built-in: {', '.join(known)}"
    )


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe file or built-in recipe name; ``overrides``: ``SECTION.KEY=VALUE`` strings applied
    to the document first (:func:`apply_overrides`), so the plan records the recipe as it ran."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_recipe(data, default_name=path.stem)


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the recipe document with each ``dotted.key=value`` set (the value read as YAML: ``2``, ``0.5``,
    ``true``, ``[1024, 2048]``, ``{passkey: 4}``); missing sections are created. Validation is parse_recipe's."""
    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. linear.sensitivity_samples=2")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: `{'.'.join(parts[: depth + 1])}` is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_recipe(data: Any, default_name: str = "recipe") -> Recipe:
    """Validate a recipe document (a dict from YAML) into a Recipe."""
    from compressor.methods import METHODS  # registers the built-in methods

    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    known = ["name", "description", "calibration", "report_lengths", *SECTIONS]
    for key in data:
        if key not in known:
            raise RecipeError(f"recipe: unknown key `{key}`{did_you_mean(str(key), known)}; known keys: {', '.join(known)}")
    kwargs: dict[str, Any] = {
        "name": _check(data.get("name", default_name), str, "name"),
        "description": _check(data.get("description", ""), str, "description"),
        "source": data,
    }
    if "calibration" in data:
        kwargs["calibration"] = parse_dataclass(CalibrationConfig, data["calibration"], "calibration")
    if "report_lengths" in data:
        kwargs["report_lengths"] = _check(data["report_lengths"], list[int], "report_lengths")
    for section in SECTIONS:
        if data.get(section) is None:
            continue
        body = data[section]
        if not isinstance(body, dict) or "method" not in body:
            raise RecipeError(f"{section}: expected a mapping with a `method` key, got {body!r}")
        method = body["method"]
        choices = sorted(name for (sec, name) in METHODS if sec == section)
        if (section, method) not in METHODS:
            raise RecipeError(
                f"{section}.method: unknown method {method!r}{did_you_mean(str(method), choices)}; "
                f"available: {', '.join(choices)}"
            )
        config_cls = METHODS[(section, method)].config
        rest = {k: v for k, v in body.items() if k != "method"}
        kwargs[section] = parse_dataclass(config_cls, rest, section)
    return Recipe(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A method config as plain data, with its ``method`` name first."""
    from compressor.methods import method_name

    return {"method": method_name(config), **dataclasses.asdict(config)}


# ---------------------------------------------------------------------------------------------------------------
# Typed parsing with error paths


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; errors name the key's path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"{path}.{key}: unknown key{did_you_mean(str(key), fields)}; known: {', '.join(fields)}")
        values[key] = _check(value, hints[key], f"{path}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path}: {err}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), or raise RecipeError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, path)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return {k: _check(v, args[1], f"{path}.{k}") for k, v in value.items()} if args else value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise RecipeError(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}{did_you_mean(str(value), [str(a) for a in args])}")
        return value
    raise RecipeError(f"{path}: cannot check values of type {tp}")
