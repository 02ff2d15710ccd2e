"""Compression methods, each a config dataclass plus the function that turns a calibrated model into plan parts.

Importing this package registers the built-in methods; a method module registers itself with
:func:`register_method` at import.
"""

from compressor.methods.registry import METHODS, CompressionContext, MethodResult, MethodSpec, method_name, register_method

# Built-in methods (import order is registration order).
from compressor.methods import dense, window  # noqa: E402,F401  isort: skip
from compressor.methods import moa  # noqa: F401
from compressor.linear_quant import method as linear_quant_method  # noqa: E402,F401  isort: skip
from compressor.methods import xattention  # noqa: F401
from compressor.methods import sage  # noqa: F401

__all__ = ["METHODS", "CompressionContext", "MethodResult", "MethodSpec", "method_name", "register_method"]
