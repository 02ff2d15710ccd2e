"""``QuantLinear``: an ``nn.Linear`` replacement holding real low-bit weights (int8, fp8 or packed int4).

Buffers carry compressed-tensors' names, so a state dict is a checkpoint: ``weight`` (int8 / fp8 ``[out, in]``) or
``weight_packed`` (int32 ``[out, in / 8]``) and ``weight_shape``, plus ``weight_scale`` (float32 ``[out, 1]`` or
``[out, in / group]``). Activations are quantized per token at run time. On CUDA the Triton / cuBLAS kernels of
``compressor.kernels.quant_linear`` run; elsewhere the PyTorch reference (dequantize, then matmul in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.kernels import quant_reference as ref
from compressor.linear_quant.formats import Precision, precision


# One memo for every QuantLinear: sibling layers called one after the other on the same input tensor (q/k/v,
# gate/up) quantize it once (compressor.kernels.quant_linear.ActivationMemo: CUDA, above 16 tokens; it refers to the
# input weakly, so nothing outlives the forward pass).
_SHARED_CODES = None


def _shared_codes():
    global _SHARED_CODES
    if _SHARED_CODES is None:
        from compressor.kernels.quant_linear import ActivationMemo

        _SHARED_CODES = ActivationMemo()
    return _SHARED_CODES


class QuantLinear(nn.Module):
    """A linear layer with quantized weights and dynamic per-token activation quantization.

    ``hadamard_block`` > 0 rotates the input online (block-diagonal Hadamard; the weight is stored rotated);
    ``input_scale`` (``[in]``, optional) multiplies the input first: a smoothing scale that could not be folded.
    On CUDA, layers reading the same input tensor share its activation codes (``_SHARED_CODES``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision_name: str,
        bias: bool = False,
        hadamard_block: int = 0,
        explicit_scale: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.precision: Precision = precision(precision_name)
        if not self.precision.quantized:
            raise ValueError("QuantLinear needs a quantized precision; keep bf16 layers as nn.Linear")
        self.hadamard_block = int(hadamard_block)
        self.out_dtype = dtype
        p = self.precision
        if p.weight == "int4":
            if in_features % p.group_size:
                raise ValueError(f"w4a8 needs in_features divisible by {p.group_size}, got {in_features}")
            self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, in_features // p.group_size, device=device))
        else:
            wdtype = torch.int8 if p.weight == "int8" else ref.fp8_dtype()
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=wdtype, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.input_scale = (
            nn.Parameter(torch.ones(in_features, dtype=torch.float32, device=device), requires_grad=False)
            if explicit_scale else None
        )

    # -- construction -----------------------------------------------------------------------------------------
    @staticmethod
    def from_linear(
        linear: nn.Linear, precision_name: str, hadamard_block: int = 0, input_scale: torch.Tensor | None = None,
        clip: dict | None = None, codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """Quantize ``linear`` (whose weight is already balanced and rotated) into a new QuantLinear; ``clip``:
        ``{"grid": [ratios], "importance": [in] or None}`` searches int4 group scales (8-bit weights ignore it);
        ``codes``: ``(q, scale)`` already chosen (GPTQ), stored as they are."""
        w = linear.weight.detach()
        module = QuantLinear(
            linear.in_features, linear.out_features, precision_name, linear.bias is not None, hadamard_block,
            input_scale is not None, dtype=w.dtype, device=w.device,
        )
        if codes is not None:
            module.set_codes(*codes)
        else:
            module.set_weight(w, clip)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if input_scale is not None:
            module.input_scale.data.copy_(input_scale)
        return module

    def set_weight(self, weight: torch.Tensor, clip: dict | None = None) -> None:
        """Quantize a float weight ``[out, in]`` into this module's buffers (``clip``: see :meth:`from_linear`)."""
        p = self.precision
        if p.weight == "int4":
            grid = (clip or {}).get("grid")
            imp = (clip or {}).get("importance")
            imp = torch.as_tensor(imp, dtype=torch.float32, device=weight.device) if imp is not None else None
            q, scale = ref.quantize_weight_int4_groups(weight, p.group_size, grid, imp)
            self.weight_packed.copy_(ref.pack_int4(q))
            self.weight_scale.copy_(scale)
        else:
            q, scale = ref.quantize_weight_per_channel(weight, p.weight)
            self.weight.copy_(q)
            self.weight_scale.copy_(scale[:, None])

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store chosen codes ``q: [out, in]`` (int8, int4 values in int8, or fp8) and their scales as they are."""
        p = self.precision
        if p.weight == "int4":
            if int(q.min()) < -8 or int(q.max()) > 7:
                raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
            self.weight_packed.copy_(ref.pack_int4(q.to(torch.int8)))
            self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        else:
            self.weight.copy_(q.to(self.weight.dtype))
            self.weight_scale.copy_(scale.reshape(-1, 1))

    # -- use --------------------------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The stored low-bit weight: int8 / fp8 ``[out, in]`` or packed int4 ``[out, in / 8]``."""
        return self.weight_packed if self.precision.weight == "int4" else self.weight

    def scales(self) -> torch.Tensor:
        """Weight scales: ``[out]`` (per channel) or ``[out, in / group]`` (int4 groups)."""
        return self.weight_scale if self.precision.weight == "int4" else self.weight_scale[:, 0]

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the quantized one stands for (rotated, balanced as stored)."""
        return ref.dequantize_weight(self.quantized_weight(), self.scales(), self.precision.group_size)

    # A DeferredRMSNorm (compressor.linear_quant.norm_fusion) this layer applies itself when its input is one the
    # norm passed on unnormalised; held in a tuple so that it is not a submodule (no second copy in the state dict).
    _input_norm: tuple = ()
    # The decode GEMV's split-K arrival counters on the device of the last CUDA call (see ``_counters``).
    _gemv_counters: torch.Tensor | None = None

    def _counters(self, x: torch.Tensor) -> torch.Tensor | None:
        """Zeroed int32 counters for the decode GEMV on x's device, made once per layer and left zeroed by every call
        (kernels/quant_gemv.py), so a decode step launches no fill. Not a buffer: never in a state dict. None (the
        kernel then zeroes its own) when the first call comes while a CUDA graph is being captured: a tensor made
        then would be filled only when the graph replays."""
        c = self._gemv_counters
        if c is None or c.device != x.device:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            from compressor.kernels.quant_gemv import gemv_counters_needed

            c = self._gemv_counters = torch.zeros(gemv_counters_needed(self.out_features), dtype=torch.int32,
                                                  device=x.device)
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        norm = self._input_norm[0].norm_for(x) if self._input_norm else None
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.dtype)
        p = self.precision
        if x2.is_cuda:
            from compressor.kernels import quant_linear as fast

            shared = self.input_scale is None  # x itself is what gets quantized: siblings may share its codes
            y = fast.quant_linear(
                x if shared else x2, self.quantized_weight(), self.scales(), self.bias, act_dtype=p.act,
                group_size=p.group_size, hadamard_block=self.hadamard_block, memo=_shared_codes() if shared else None,
                norm=norm, counters=self._counters(x2) if x2.shape[0] <= fast.SMALL_M else None,
            )
        else:
            if norm is not None:
                x2 = ref.rms_norm_as_input(x2, *norm)
            y = ref.quant_linear_reference(
                x2, self.quantized_weight(), self.scales(), self.bias, p.act, p.group_size, self.hadamard_block
            )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        extra = f", hadamard={self.hadamard_block}" if self.hadamard_block else ""
        extra += ", explicit_scale" if self.input_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {self.precision.name}, bias={self.bias is not None}{extra}"
