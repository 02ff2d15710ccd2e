"""GPTQ-style error-compensating weight rounding: the integer (or fp8) codes and scales are chosen column by column,
each column's rounding error pushed onto the columns not yet quantized through the inverse Hessian
``H = X^T X`` of the layer's calibration inputs. Only the choice of codes changes: the stored format, the kernels
and the checkpoint are those of round-to-nearest.

The plan asks for it per module (``"rounding": "gptq"``) and carries what it needs model-wide in
``plan.linear["gptq"]``: ``{"damp", "block", "act_order", "ids": [[token ids] per calibration sample]}``, so
applying a plan stays a function of the plan and the dense model. Layers are quantized in order, each one's
Hessians measured on the outputs of the layers already quantized before it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.kernels.quant_reference import FP8_MAX, INT4_MAX, INT8_MAX, fp8_dtype, hadamard_reference
from compressor.kernels.quant_reference import quantize_weight_int4_groups
from compressor.linear_quant.formats import Precision, precision
from compressor.memory import release_host_memory

ROUNDINGS = ("nearest", "gptq")


def _round_column(w: torch.Tensor, scale: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one weight column ``w: [out]`` with per-row ``scale: [out]``."""
    y = w / scale
    if kind == "fp8":
        q = y.clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype())
        return q, q.float() * scale
    lo, hi = (-8.0, INT4_MAX) if kind == "int4" else (-INT8_MAX, INT8_MAX)
    q = y.round().clamp(lo, hi)
    return q, q * scale


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    prec: Precision,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    clip_grid: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight: [out, in]`` at ``prec`` minimising ``||X W^T - X Q^T||`` for ``hessian = X^T X: [in, in]``.

    Returns what round-to-nearest returns: ``(q [out, in] int8 (int4 codes in [-8, 7]) or fp8, scale [out] or
    [out, in / group])``. ``damp`` adds ``damp * mean(diag H)`` to the diagonal; ``act_order`` quantizes the columns
    of largest ``H_jj`` first; ``clip_grid`` searches each int4 group's clipping ratio (weighted by ``diag H``).
    """
    if not prec.quantized:
        raise ValueError(f"GPTQ needs a quantized precision, got {prec.name}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {in_f} inputs")
    g = prec.group_size if prec.weight == "int4" else 0
    if g and in_f % g:
        raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {g}")
    device = weight.device
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # a channel that never carries input: its weights cost nothing, quantize them as zero

    # Scales: per output channel (8-bit) or per int4 group, from the weight before any error update when columns are
    # reordered (a group's columns are then spread over the whole pass); otherwise each group's from its updated
    # columns when the pass reaches it.
    diag_h = torch.diag(h).float()
    if g:
        scale = torch.ones(out_f, in_f // g, device=device)
        if act_order:
            _, scale = quantize_weight_int4_groups(w, g, clip_grid, diag_h)
    else:
        amax = w.abs().amax(dim=1)
        qmax = INT8_MAX if prec.weight == "int8" else FP8_MAX
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))

    perm = torch.argsort(diag_h, descending=True) if act_order else torch.arange(in_f, device=device)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    try:
        chol = torch.linalg.cholesky(h)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise CompressorError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); raise gptq_damp") from err

    step = max(block, g) if g else block
    if g:
        step = (step // g) * g
    # Rows of the transposed weight are the columns GPTQ walks: each step reads and updates contiguous memory.
    wt = w.t().contiguous()  # [in (permuted), out]
    codes = torch.zeros(in_f, out_f, device=device, dtype=fp8_dtype() if prec.weight == "fp8" else torch.float32)
    group_of = [int(c) // g for c in perm.tolist()] if g else []
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if g and not act_order and col % g == 0:  # a new group: its scale from the updated columns
                _, s = quantize_weight_int4_groups(w1[j : j + g].t(), g, clip_grid, diag_h[perm[col : col + g]])
                scale[:, col // g] = s[:, 0]
            s_col = scale[:, group_of[col]] if g else scale
            q, dq = _round_column(w1[j], s_col, prec.weight)
            codes[col] = q
            e = (w1[j] - dq).div_(u1[j, j])
            w1[j:].addr_(u1[j, j:], e, alpha=-1.0)
            err1[j] = e
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1.0)
    out = torch.empty_like(codes)
    out[perm] = codes
    out = out.t().contiguous()
    if prec.weight != "fp8":
        out = out.to(torch.int8)
    return out, scale


class HessianAccumulator:
    """``X^T X`` over every row fed to it (float64), for the inputs ``x: [..., in]`` a quantized layer will see."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        self.sum += x2.t() @ x2
        self.rows += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


def effective_input(x: torch.Tensor, setting: dict[str, Any]) -> torch.Tensor:
    """What the quantized module's stored weight multiplies, given the dense layer's input ``x: [..., in]`` and the
    module's plan ``setting``: divided by its smoothing scales, then rotated (online or folded per-head Hadamard)."""
    xf = x.float()
    smooth = setting.get("smooth")
    if smooth:
        xf = xf / torch.tensor(smooth["scales"], dtype=torch.float32, device=xf.device)
    rotate = setting.get("rotate") or {}
    block = int(rotate.get("online") or rotate.get("block") or 0)
    return hadamard_reference(xf, block) if block else xf


def _transform_key(setting: dict[str, Any]) -> tuple:
    """What ``effective_input`` does for ``setting``: equal keys map the same input to the same effective input."""
    smooth = setting.get("smooth")
    rotate = setting.get("rotate") or {}
    return (tuple(smooth["scales"]) if smooth else None, int(rotate.get("online") or rotate.get("block") or 0))


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, first_layer: nn.Module, ids: list[list[int]]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first decoder layer is called with, per calibration sample (the model stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in ids:
            try:
                model(input_ids=torch.tensor([row], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


class _StateBuffer:
    """The hidden states of every calibration sample between two decoder layers. Samples of one shape live in two
    preallocated buffers used in turn (a layer's outputs are copied into the other), so that a pass over 128 windows
    does not leave 128 separately allocated tensors per layer between the forward's temporaries (on the CPU that
    fragmented the heap by GBs); samples of different shapes stay a list."""

    def __init__(self, states: list[torch.Tensor]) -> None:
        same = len({(tuple(x.shape), x.dtype, x.device) for x in states}) == 1
        self.current: torch.Tensor | list[torch.Tensor] = torch.stack(states) if same else list(states)
        self.spare = torch.empty_like(self.current) if same else None

    def __iter__(self):
        return iter(self.current)

    def advance(self, outputs) -> None:
        """Replace the states with ``outputs`` (one per sample, computed while iterating over this buffer)."""
        if self.spare is None:
            self.current = list(outputs)
            return
        for i, out in enumerate(outputs):
            self.spare[i].copy_(out)
        self.current, self.spare = self.spare, self.current


def _hidden_first(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The layer call with the hidden states as the first positional argument."""
    if args:
        return args, kwargs
    kwargs = dict(kwargs)
    return (kwargs.pop("hidden_states"),), kwargs


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def apply_gptq_layers(
    model: nn.Module, layers: list[tuple[str, nn.Module]], plans: list[dict[str, dict[str, Any]] | None],
    options: dict[str, Any],
) -> None:
    """Quantize every decoder layer per its plan in order (in place), GPTQ for the modules marked ``gptq``.

    ``options``: ``plan.linear["gptq"]`` (``ids``, ``damp``, ``block``, ``act_order``). Each layer's Hessians come
    from its dense inputs on the calibration ids, after the layers before it were quantized.
    """
    from compressor.linear_quant.apply import apply_layer_settings

    ids = options.get("ids") or []
    if not ids:
        raise CompressorError("the plan asks for GPTQ rounding but plan.linear['gptq'] has no calibration ids; "
                              "re-plan with rounding: gptq, or use rounding: nearest")
    calls = [_hidden_first(args, kwargs) for args, kwargs in _layer_inputs(model, layers[0][1], ids)]
    states = _StateBuffer([args[0] for args, _ in calls])
    for (lname, layer), settings in zip(layers, plans):
        if settings:
            marked = [n for n, s in settings.items() if s.get("rounding") == "gptq" and precision(s["precision"]).quantized]
            # Modules fed the same tensor with the same transform (q/k/v, gate/up) share one accumulator: ``fed`` holds,
            # for the sample being run, each input already added (the tensor too, so that its id cannot be reused).
            acc: dict[str, HessianAccumulator] = {}
            fed: dict[tuple, tuple[torch.Tensor, HessianAccumulator]] = {}
            transform = {n: _transform_key(settings[n]) for n in marked}

            def hook(name: str):
                def record(module: nn.Module, args: tuple) -> None:
                    key = (id(args[0]), transform[name])
                    if key in fed and acc.setdefault(name, fed[key][1]) is fed[key][1]:
                        return
                    a = acc.setdefault(name, HessianAccumulator(module.in_features, args[0].device))
                    a.add(effective_input(args[0], settings[name]))
                    fed[key] = (args[0], a)
                return record

            handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in marked]
            try:
                for x, (args, kwargs) in zip(states, calls):
                    fed.clear()
                    layer(x, *args[1:], **kwargs)
            finally:
                fed.clear()
                for h in handles:
                    h.remove()
            hessians = {n: a.hessian() for n, a in acc.items()}
            apply_layer_settings(layer, settings, hessians, options)
        states.advance(_first(layer(x, *args[1:], **kwargs)) for x, (args, kwargs) in zip(states, calls))
        release_host_memory()
