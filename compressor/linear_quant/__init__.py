"""Linear-layer quantization (ViDiT-Q style): W8A8 int8 / fp8 and W4A8 with channel balancing, searched mixed
precision, and compressed-tensors checkpoints that plain transformers reloads."""

from compressor.linear_quant.apply import DEFAULT_EXCLUDE, apply_linear_plan, quantize_modules, select_linears
from compressor.linear_quant.checkpoint import load_quantized, save_quantized
from compressor.linear_quant.formats import PRECISIONS, Precision, precision
from compressor.linear_quant.modules import QuantLinear

__all__ = [
    "DEFAULT_EXCLUDE", "PRECISIONS", "Precision", "QuantLinear", "apply_linear_plan", "load_quantized", "precision",
    "quantize_modules", "save_quantized", "select_linears",
]
