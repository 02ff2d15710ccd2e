"""What every Triton kernel here asks before it runs: is Triton installed, and is its CPU interpreter on."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (CUDA builds of torch bring it; CPU builds may not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def jit_helpers(namespace: dict, *helpers):
    """Import Triton, bind ``tl`` in a kernel module's ``namespace`` (its ``globals()``) and jit each ``@triton.jit``
    helper under its own name there, so the kernels that call them resolve them when jitted. Returns ``triton``."""
    import triton
    import triton.language

    namespace["tl"] = triton.language
    for fn in helpers:
        namespace[fn.__name__] = triton.jit(fn)
    return triton


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): Triton block shapes are powers of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (read when kernels are first jitted)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pdl_available(t) -> bool:
    """Whether kernels on ``t``'s device can use programmatic dependent launch (sm_90+, not under the interpreter;
    CPU tensors count as capable: that is the offline compile check, which builds for sm_90)."""
    import torch

    return not interpreting() and (not t.is_cuda or torch.cuda.get_device_capability(t.device) >= (9, 0))


def require_launchable(device, interpret: bool) -> None:
    """Raise unless kernels can launch on ``device``: CUDA, or any device under the interpreter. The compile check
    (scripts/check_gpu_compile.py, which intercepts launches and only compiles them) sets COMPRESSOR_COMPILE_ONLY=1."""
    if device.type != "cuda" and not interpret and os.environ.get("COMPRESSOR_COMPILE_ONLY") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 for the CPU interpreter")
