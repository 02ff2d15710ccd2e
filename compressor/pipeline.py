"""The main job: load a model, run the recipe's methods on calibration data, write the plan and the checkpoint."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from compressor.checkpoint import check_output, save_compressed
from compressor.methods import METHODS, CompressionContext, MethodResult
from compressor.models import check_lengths, load_model, resolve_device, resolve_dtype, resolve_model
from compressor.plan import AttentionLayerPlan, DensePattern, LayerPlan, ModelSignature, Plan
from compressor.recipe import Recipe, config_to_dict, load_recipe


def software_versions() -> dict[str, str]:
    """Versions recorded in every plan's provenance."""
    import transformers

    from compressor import __version__

    versions = {"compressor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def build_plan(model: torch.nn.Module, recipe: Recipe, results: dict[str, MethodResult], provenance: dict[str, Any]) -> Plan:
    """Merge the methods' results into one plan."""
    sig = ModelSignature.of(model)
    heads = [[DensePattern() for _ in range(sig.num_attention_heads)] for _ in range(sig.num_hidden_layers)]
    attention_quant: list[Any] = [None] * sig.num_hidden_layers
    linear: list[Any] = [None] * sig.num_hidden_layers
    linear_model = None
    calibration, search = dict(provenance), {}
    for section, result in results.items():
        if result.heads is not None:
            heads = result.heads
        if result.attention_quant is not None:
            attention_quant = result.attention_quant
        if result.linear is not None:
            linear = result.linear
        if result.linear_model is not None:
            linear_model = result.linear_model
        if result.calibration:
            calibration[section] = result.calibration
        if result.search:
            search[section] = result.search
    layers = [LayerPlan(AttentionLayerPlan(heads[i], attention_quant[i]), linear[i]) for i in range(sig.num_hidden_layers)]
    recipe_doc = {"name": recipe.name, "description": recipe.description, "source": recipe.source,
                  "resolved": {s: config_to_dict(c) for s, c in recipe.methods()}}
    plan = Plan(model=sig, layers=layers, recipe=recipe_doc, calibration=calibration, search=search, linear=linear_model)
    lengths = [n for n in recipe.report_lengths if (ctx := getattr(model.config, "max_position_embeddings", None)) is None or n <= ctx]
    plan.predicted = {"lengths": lengths, "density": {str(n): round(plan.density(n), 6) for n in lengths}}
    return plan


def compress(
    model: str,
    recipe: str | Recipe,
    output: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int | None = None,
    overwrite: bool = False,
    report: bool = True,
    log: Any = print,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[Plan, Path | None]:
    """Run the recipe on the model; write the checkpoint + plan to ``output`` (if given). Returns (plan, output).
    ``overrides``: ``SECTION.KEY=VALUE`` settings applied to a recipe given by name or path (``compress --set``)."""
    if overrides and isinstance(recipe, Recipe):
        raise ValueError("overrides apply to a recipe name or path, not to a parsed Recipe (change its fields instead)")
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if seed is not None:
        parsed.calibration.seed = seed
    if output is not None:
        check_output(output, overwrite)  # before the expensive part
    source = resolve_model(model)
    resolve_dtype(dtype, resolve_device(device))  # refuse bad values before the expensive part
    started = time.perf_counter()
    timings: dict[str, float] = {}
    log(f"loading {source.name} ({source.kind}: {source.folder}{'/' + source.gguf_file if source.gguf_file else ''})")
    net, tokenizer, _ = load_model(source, device, dtype)
    timings["load"] = round(time.perf_counter() - started, 2)
    check_lengths(net, parsed.calibration.lengths, "calibration.lengths")
    torch.manual_seed(parsed.calibration.seed)
    ctx = CompressionContext(model=net, tokenizer=tokenizer, recipe=parsed, device=net.device, model_name=source.name)
    results: dict[str, MethodResult] = {}
    for section, config in parsed.methods():
        spec = next(s for s in METHODS.values() if s.section == section and isinstance(config, s.config))
        log(f"{section}: {spec.name}")
        t0 = time.perf_counter()
        results[section] = spec.run(ctx, config)
        timings[f"{section}:{spec.name}"] = round(time.perf_counter() - t0, 2)
        log(f"{section}: {spec.name} took {timings[f'{section}:{spec.name}']:.1f}s")
    cal = parsed.calibration
    provenance = {
        "model_spec": source.name,
        "data": cal.source, "samples": cal.samples, "lengths": cal.lengths, "seed": cal.seed, "chat": cal.chat,
        "software": software_versions(),
        "device": torch.cuda.get_device_name(net.device) if net.device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": timings,
    }
    plan = build_plan(net, parsed, results, provenance)
    if source.kind == "gguf":  # the config only knows the unpacked GGUF's folder: name the model as the user did
        plan.model.name_or_path = f"{source.name} ({source.gguf_file})"
    if output is None:
        return plan, None
    t0 = time.perf_counter()
    out = save_compressed(net, tokenizer, plan, output, overwrite)
    stages = dict(timings, save=round(time.perf_counter() - t0, 2))  # save applies the plan (GPTQ rounding runs here)
    if report:
        from compressor.report import write_report

        t0 = time.perf_counter()
        write_report(out)
        stages["report"] = round(time.perf_counter() - t0, 2)
    log("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    log(f"wrote {out} in {time.perf_counter() - started:.1f}s; density " +
        ", ".join(f"{n}: {d:.1%}" for n, d in plan.predicted["density"].items()))
    return plan, out
