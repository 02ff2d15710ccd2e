"""What ``apply`` attaches to each attention module (per-head kernel parameters, plain data), and how to find
those modules. Shared by the runtime and the plan's cache."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from compressor.errors import CompressorError
from compressor.kernels.reference import DENSE_ALPHA
from compressor.plan import DensePattern, Pattern, WindowPattern, XAttentionPattern


@dataclass
class LayerRuntime:
    """What the attention function needs for one layer: per-query-head (sink, alpha, beta), and quant settings."""

    layer_idx: int
    sink: torch.Tensor  # [q_heads] int32
    alpha: torch.Tensor  # [q_heads] float32, inf for dense heads
    beta: torch.Tensor  # [q_heads] float32
    all_dense: bool
    quant: dict[str, Any] | None = None
    xattention: tuple[torch.Tensor, int, int] | None = None  # (tau per query head, stride, block size)
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sink, alpha, beta) on ``device``, moved once."""
        if device not in self._on_device:
            self._on_device[device] = (self.sink.to(device), self.alpha.to(device), self.beta.to(device))
        return self._on_device[device]


def layer_runtime(layer_idx: int, heads: list[Any], quant: dict[str, Any] | None) -> LayerRuntime:
    """Convert one layer's patterns to kernel parameters."""
    sink, alpha, beta = [], [], []
    for head in heads:
        if isinstance(head, WindowPattern):
            sink.append(head.sink), alpha.append(float(head.alpha)), beta.append(float(head.beta))
        else:  # dense; XAttention heads are dense here, their block lists come per input (and decode is dense)
            sink.append(0), alpha.append(DENSE_ALPHA), beta.append(0.0)
    return LayerRuntime(
        layer_idx=layer_idx,
        sink=torch.tensor(sink, dtype=torch.int32),
        alpha=torch.tensor(alpha, dtype=torch.float32),
        beta=torch.tensor(beta, dtype=torch.float32),
        all_dense=all(isinstance(h, DensePattern) for h in heads),
        quant=quant,
        xattention=xattention_thresholds(heads),
    )


def xattention_thresholds(heads: list[Pattern]) -> tuple[torch.Tensor, int, int] | None:
    """(tau per query head, stride, block size) of a layer holding xattention heads, else None. Other heads of
    such a layer get tau = 1 (every block; their own sink + window still applies inside)."""
    xheads = [h for h in heads if isinstance(h, XAttentionPattern)]
    if not xheads:
        return None
    shapes = {(h.stride, h.block_size) for h in xheads}
    if len(shapes) > 1:
        raise CompressorError(f"xattention heads of one layer must share stride and block_size, got {sorted(shapes)}")
    stride, block_size = shapes.pop()
    tau = torch.tensor([float(h.tau) if isinstance(h, XAttentionPattern) else 1.0 for h in heads], dtype=torch.float32)
    return tau, stride, block_size


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The decoder's self-attention modules by layer index (modules with ``layer_idx`` and a q projection)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and any(hasattr(module, p) for p in ("q_proj", "qkv_proj", "query")):
            found.setdefault(idx, module)
    return found


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A warning shown once per process per message."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
