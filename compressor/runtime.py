"""Apply a plan to a loaded model: one attention function registered with transformers, dispatching per layer.

No model class is patched. ``apply`` stores each layer's patterns on its attention module (plain data) and switches
the model to the ``"compressor"`` attention implementation; the function below reads them through
``module.layer_idx``'s module. A mask function registered under the same name hands the attention function the 2D
padding mask (``[batch, total_tokens]``, linear in length) instead of a quadratic 4D mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from compressor.attention_layers import LayerRuntime, attention_modules, layer_runtime
from compressor.cache import stop_plan_cache, use_plan_cache
from compressor.errors import CompressorError
from compressor.kernels.reference import sparse_attention_reference
from compressor.plan import DensePattern, Plan

ATTENTION_NAME = "compressor"


def apply(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """Apply ``plan`` to ``model`` in place (attention patterns, attention and linear quantization); returns it."""
    plan.check_against(model)
    modules = attention_modules(model)
    if len(modules) != len(plan.layers):
        raise CompressorError(
            f"found {len(modules)} attention modules with a layer_idx in {type(model).__name__}, plan has "
            f"{len(plan.layers)} layers: this model's attention does not go through transformers' attention interface"
        )
    for idx, module in modules.items():
        layer = plan.layers[idx]
        module.compressor_layer = layer_runtime(idx, layer.attention.heads, layer.attention.quant)
    if any(layer.linear for layer in plan.layers):
        from compressor.linear_quant import apply_linear_plan

        apply_linear_plan(model, plan)
        if next(model.parameters()).is_cuda:  # the fused norm pays only where the Triton activation pass runs
            from compressor.linear_quant.norm_fusion import fuse_input_norms

            fuse_input_norms(model)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.compressor_base_attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    model.compression_plan = plan
    use_plan_cache(model)  # generate() builds a sink + window cache for plans with window heads
    return model


def remove(model: torch.nn.Module, attn_implementation: str | None = None) -> torch.nn.Module:
    """Undo the attention part of ``apply``: every layer back to ``attn_implementation`` (default: the one the
    model had before ``apply``)."""
    attn_implementation = attn_implementation or getattr(model, "compressor_base_attention", "sdpa")
    for module in attention_modules(model).values():
        if hasattr(module, "compressor_layer"):
            del module.compressor_layer
    model.set_attn_implementation(attn_implementation)
    if hasattr(model, "compression_plan"):
        del model.compression_plan
    stop_plan_cache(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The mask function: the 2D padding mask over all tokens so far, never a 4D one.


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> torch.Tensor:
    """Bool ``[batch, kv_offset + kv_length]``: which of all tokens so far are real (True) or padding (False)."""
    total = int(kv_offset) + int(kv_length)
    if attention_mask is None:
        mask = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.to(dtype=torch.bool)
        if mask.shape[-1] < total:  # static caches: slots not written yet are padding
            mask = F.pad(mask, (0, total - mask.shape[-1]), value=False)
        mask = mask[:, :total]
    # Every layer of this forward gets this mask: its rows are measured once (with host syncs), by the first layer
    # that needs them (prefill paths); a decode step through the plan cache never does, so it stays sync-free.
    mask.compressor_rows = RowsOnce()
    return mask


class RowsOnce:
    """The :class:`MaskRows` of one forward's mask, measured on first request and kept for the other layers."""

    def __init__(self) -> None:
        self.rows: MaskRows | None = None

    def get(self, mask: torch.Tensor) -> MaskRows:
        if self.rows is None:
            self.rows = mask_rows(mask)
        return self.rows


@dataclass
class MaskRows:
    """Per batch row of a 2D padding mask, in positions over all tokens so far: real tokens ``[first, last)``."""

    first: torch.Tensor  # [batch] int64
    last: torch.Tensor  # [batch] int64
    count: torch.Tensor  # [batch] int64, real tokens of the row (the N of window(N))
    padded: bool


def mask_rows(mask: torch.Tensor) -> MaskRows:
    """Each row's real-token range; refuses masks with holes (padding that is neither left nor right)."""
    total = mask.shape[-1]
    idx = torch.arange(total, device=mask.device)
    count = mask.sum(dim=-1)
    first = torch.where(mask, idx, total).amin(dim=-1)
    last = torch.where(mask, idx, -1).amax(dim=-1) + 1
    if bool((count > 0).all()) and not bool((last - first == count).all()):
        raise CompressorError(
            "the attention mask has padding inside a sequence (not only at its start or end); compressor's "
            "attention supports left or right padding only"
        )
    return MaskRows(first, last, count, not bool(mask.all()))


@dataclass
class RowBounds:
    """Per batch row, in the coordinates of the key tensor: valid keys ``[start, end)``; ``length`` = tokens so far."""

    start: torch.Tensor  # [batch] int64
    end: torch.Tensor  # [batch] int64
    length: torch.Tensor  # [batch] int64, real tokens of the row (the N of window(N))
    padded: bool


def row_bounds(mask: torch.Tensor | None, kv_tokens: int, batch: int, device: torch.device) -> RowBounds:
    """Valid key range per row, in the key tensor's coordinates, from the 2D padding mask (its rows measured once
    per forward by :func:`padding_mask`; measured here for a mask that comes from elsewhere)."""
    if mask is None:
        full = torch.full((batch,), kv_tokens, dtype=torch.int64, device=device)
        return RowBounds(torch.zeros_like(full), full, full, False)
    once = getattr(mask, "compressor_rows", None)
    rows = once.get(mask) if once is not None else mask_rows(mask)
    offset = mask.shape[-1] - kv_tokens  # keys are the last kv_tokens of all tokens (sliding caches drop older ones)
    start = (rows.first - offset).clamp(min=0)
    end = (rows.last - offset).clamp(min=0)
    return RowBounds(start.to(device), end.to(device), rows.count.to(device), rows.padded)


# ---------------------------------------------------------------------------------------------------------------
# The attention function.


def _dense_sdpa(query, key, value, rows: RowBounds, scaling, causal) -> torch.Tensor:
    """Dense attention through PyTorch SDPA (the model's own path), GQA without repeating K/V."""
    q_tokens, kv_tokens = query.shape[2], key.shape[2]
    mask = None
    is_causal = False
    if rows.padded or (causal and q_tokens not in (1, kv_tokens)):
        k_idx = torch.arange(kv_tokens, device=query.device)
        mask = (k_idx[None, :] >= rows.start[:, None]) & (k_idx[None, :] < rows.end[:, None])
        mask = mask[:, None, None, :]
        if causal:
            q_idx = torch.arange(q_tokens, device=query.device) + kv_tokens - q_tokens
            mask = mask & (k_idx[None, :] <= q_idx[:, None])[None, None]
    elif causal and q_tokens > 1:
        is_causal = True
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
    )
    if mask is not None:  # rows with no visible key give NaN in SDPA; ours give zeros
        out = out.nan_to_num(0.0)
    return out


def _sparse(
    query, key, value, rows: RowBounds, sink, alpha, beta, scaling, causal, softcap, quant=None, blocks=None
) -> torch.Tensor:
    """Per-head sink + window attention (and per-input block lists, ``blocks``): the Triton kernel where it runs, the
    reference elsewhere; ``quant`` (a layer's ``attention.quant``) routes it through the quantized kernels."""
    start, end = (rows.start, rows.end) if rows.padded else (None, None)  # None: every key valid, no masked passes
    kwargs = dict(sink=sink, alpha=alpha, beta=beta, kv_start=start, kv_end=end, causal=causal, scale=scaling)
    if blocks is not None:
        kwargs.update(blocks)
        if quant is None and not query.is_cuda:
            from compressor.kernels.reference import block_sparse_attention_reference

            return block_sparse_attention_reference(query, key, value, **kwargs)
    if quant is not None and softcap is None:
        from compressor.kernels import sage_attention

        return sage_attention.attention(query, key, value, variant=quant["variant"], **kwargs)
    if softcap is None and query.is_cuda:
        from compressor.kernels import sparse_attention as fast

        return fast.attention(query, key, value, **kwargs)
    return sparse_attention_reference(query, key, value, softcap=softcap, **kwargs)


def compressor_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query: [batch, q_heads, q_tokens, dim]; key/value: [batch, kv_heads,
    kv_tokens, dim]. Returns ([batch, q_tokens, q_heads, dim], None)."""
    layer: LayerRuntime | None = getattr(module, "compressor_layer", None)
    causal = bool(getattr(module, "is_causal", True))
    softcap = kwargs.get("softcap")
    attend = getattr(key, "compressor_attend", None)
    if attend is not None:  # new tokens from a compressor.cache layer: it stores them, then decodes or hands back keys
        result = attend(module, query, attention_mask, scaling, softcap)
        if isinstance(result, torch.Tensor):
            return result, None
        key, value, attention_mask = result
    sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    batch, q_heads, q_tokens, _ = query.shape
    kv_tokens = key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        raise CompressorError(
            "a prepared 4D attention mask reached compressor's attention; pass a 2D padding mask (batch, tokens)"
        )
    rows = row_bounds(attention_mask, kv_tokens, batch, query.device)
    if layer is None:  # a layer the plan does not cover: dense
        layer = layer_runtime(getattr(module, "layer_idx", -1), [DensePattern()] * q_heads, None)

    # Quantized attention at prefill only: decode (one query) stays unquantized.
    quant = layer.quant if layer.quant and layer.quant.get("variant", "bf16") != "bf16" and q_tokens > 1 else None
    if layer.all_dense and not sliding and softcap is None and quant is None:
        out = _dense_sdpa(query, key, value, rows, scaling, causal)
    else:
        sink, alpha, beta = layer.params(query.device)
        if sliding:  # the model's own sliding window caps every head: never wider than it
            out = _capped_by_sliding_window(query, key, value, rows, sink, alpha, beta, int(sliding), scaling, causal, softcap)
        else:
            blocks = None
            if layer.xattention is not None and q_tokens > 1 and softcap is None:  # decode stays dense
                blocks = xattention_blocks(query, key, rows, layer, scaling, causal)
            out = _sparse(query, key, value, rows, sink, alpha, beta, scaling, causal, softcap, quant, blocks)
    return out.transpose(1, 2).contiguous(), None


def xattention_blocks(query, key, rows: RowBounds, layer: LayerRuntime, scaling, causal) -> dict[str, Any]:
    """Per-input block lists of an XAttention layer: antidiagonal block scores, then per query-block row the best
    blocks until each head's tau (on the device, no host round trip)."""
    from compressor.kernels.xattention_score import block_scores
    from compressor.kernels.xattention_select import select_blocks

    tau, stride, block_size = layer.xattention
    bounds = dict(kv_start=rows.start, kv_end=rows.end, causal=causal)
    scores = block_scores(query, key, stride=stride, block_size=block_size, scale=scaling, **bounds)
    index, count = select_blocks(scores, tau.to(query.device), q_tokens=query.shape[2], kv_tokens=key.shape[2],
                                 block_size=block_size, **bounds)
    return {"block_index": index, "block_count": count, "block_size": block_size}


def _capped_by_sliding_window(query, key, value, rows, sink, alpha, beta, sliding, scaling, causal, softcap):
    """Windows min(plan window at N, model window) as fixed windows, per group of rows sharing a length.

    The model's own window rules these layers: plan sinks are dropped (the model's cache no longer holds them), so
    a plan can only narrow such a layer, never widen it."""
    outs = torch.empty(query.shape[:3] + (value.shape[-1],), dtype=query.dtype, device=query.device)
    for n in rows.length.unique().tolist():
        sel = (rows.length == n).nonzero().flatten()
        n = max(int(n), 1)
        window = torch.clamp(torch.floor(alpha + beta * n), min=1.0).nan_to_num(posinf=float(n))
        window = torch.minimum(window, torch.full_like(window, float(sliding)))
        part_rows = RowBounds(rows.start[sel], rows.end[sel], rows.length[sel], rows.padded)
        outs[sel] = _sparse(
            query[sel], key[sel], value[sel], part_rows, torch.zeros_like(sink), window, torch.zeros_like(beta),
            scaling, causal, softcap,
        )
    return outs


AttentionInterface.register(ATTENTION_NAME, compressor_attention)
AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
