"""Writing and reading compressed checkpoints: a Hugging Face folder plus ``compression_plan.json``.

Every write goes to a temporary folder beside the target and is renamed into place at the end, so an interrupted
run never leaves a half-written output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CompressorError
from compressor.plan import PLAN_FILENAME, Plan, current_umask, write_text_atomic

EVAL_FILENAME = "eval_results.json"


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output path unless ``overwrite``; do it before any expensive work."""
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise CompressorError(f"output {out} already exists: choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``output`` in one rename, on failure it is removed."""
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(
    model: torch.nn.Module, tokenizer: Any, plan: Plan, output: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write weights (safetensors), config, tokenizer and the plan to ``output`` atomically."""
    with atomic_directory(output, overwrite) as tmp:
        if any(layer.linear for layer in plan.layers):
            from compressor.linear_quant import save_quantized

            save_quantized(model, plan, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILENAME)
    return Path(output)


def load(
    path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", apply_plan: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Load a compressed checkpoint written by ``compress`` and apply its plan; returns (model, tokenizer)."""
    from compressor import runtime
    from compressor.models import load_model, resolve_device, resolve_dtype, resolve_model

    folder = Path(path).expanduser()
    plan = Plan.load(folder)
    if any(layer.linear for layer in plan.layers):
        from transformers import AutoTokenizer

        from compressor.linear_quant import load_quantized

        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        model = load_quantized(folder, plan, dev, resolve_dtype(dtype, dev))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer, _ = load_model(resolve_model(str(folder)), device, dtype)
    if apply_plan:
        runtime.apply(model, plan)
    return model, tokenizer


def save_eval_results(folder: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``eval_results.json`` beside the plan (read by the report)."""
    target = Path(folder) / EVAL_FILENAME
    write_text_atomic(target, json.dumps(results, indent=1) + "\n")
    return target
