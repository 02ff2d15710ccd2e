"""RMSNorm fused into the activation quantization of the layers that read it (q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``).

Unfused, a prefill step reads the hidden states, writes the normalised copy, and the quantizer reads that copy again.
Fused, the norm module hands its input on unnormalised and the quantized layers apply the norm inside their one
activation pass (``compressor.kernels.quant_linear``, ``norm=``); siblings still share that one pass. Decode sizes
(at most ``SMALL_M`` tokens) keep the separate norm: their kernels take none, and three layers each normalising would
cost more than the norm once.

Only where it is safe: a Llama-style RMSNorm (``x * rsqrt(mean(x^2) + eps) * weight``; Gemma's ``1 + weight`` is
left alone), every reader of it a :class:`QuantLinear` quantizing its raw input (no explicit smoothing scale), on a
model family whose decoder layer feeds the norm's output to those readers only.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from compressor.kernels.quant_linear import SMALL_M
from compressor.linear_quant.apply import _set_module, decoder_layers
from compressor.linear_quant.balance import NORM_CONSUMERS, _find, _foldable_norm
from compressor.linear_quant.modules import QuantLinear

# Model types whose decoder layer uses input_layernorm's output only for q/k/v and post_attention_layernorm's only
# for gate/up (checked against transformers' modeling code).
FUSABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def defers(x: torch.Tensor) -> bool:
    """Whether a norm may be left to the readers of ``x``: on CUDA, where their Triton activation pass applies it
    (tests point this at CPU tensors to run the same logic through the reference)."""
    return x.is_cuda


class DeferredRMSNorm(nn.Module):
    """Stands in for an RMSNorm whose readers apply it themselves above ``SMALL_M`` tokens on CUDA.

    ``forward`` returns its input unchanged there, remembering it (weakly, with its version); a reader asks
    :meth:`norm_for` whether the tensor it got is that one. Anything else (few tokens, CPU, inference-mode tensors
    without a version counter, a tensor written in place since) goes through the original norm. ``weight`` is the
    original norm's parameter under the same name, so the state dict is unchanged.
    """

    def __init__(self, norm: nn.Module, eps: float) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(eps)
        self._original = (norm,)  # not a submodule: its weight is already ours
        self._passed: weakref.ref | None = None
        self._version = -1

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._passed = None
        if defers(x) and x.numel() // max(x.shape[-1], 1) > SMALL_M:
            try:
                version = x._version
            except RuntimeError:  # inference-mode tensor: an in-place write could not be seen
                return self.original(x)
            self._passed, self._version = weakref.ref(x), version
            return x
        return self.original(x)

    def norm_for(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``(weight, eps)`` if ``x`` is the input this norm passed on unnormalised (unchanged since), else None."""
        if self._passed is None or self._passed() is not x or x._version != self._version:
            return None
        return self.weight, self.eps

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, applied by its quantized readers above {SMALL_M} tokens"


def rms_norm_eps(norm: nn.Module | None) -> float | None:
    """The epsilon of a Llama-style RMSNorm (weight, no bias), or None for any other module."""
    if norm is None or isinstance(norm, DeferredRMSNorm) or "rmsnorm" not in type(norm).__name__.lower() \
            or not _foldable_norm(norm):
        return None
    if getattr(norm, "bias", None) is not None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def fuse_input_norms(model: nn.Module) -> int:
    """Replace each decoder layer's RMSNorm whose readers are all raw-input QuantLinear layers by a
    :class:`DeferredRMSNorm` those readers apply; returns how many norms were deferred (0 for other model types)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return 0
    count = 0
    for _, layer in decoder_layers(model, config.num_hidden_layers):
        for norm_name, readers in NORM_CONSUMERS.items():
            norm = _find(layer, norm_name)
            eps = rms_norm_eps(norm)
            modules = [_find(layer, r) for r in readers]
            if eps is None or not all(isinstance(m, QuantLinear) and m.input_scale is None for m in modules):
                continue
            deferred = DeferredRMSNorm(norm, eps)
            _set_module(layer, norm_name, deferred)
            for m in modules:
                m._input_norm = (deferred,)
            count += 1
    return count
