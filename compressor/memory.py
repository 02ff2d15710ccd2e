"""Host memory housekeeping for long calibration loops on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_host_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``); True where that ran.

    A loop that keeps small tensors alive across many forward passes leaves them scattered between the passes'
    freed temporaries; glibc cannot shrink its heap past them, so the resident size grows with the number of passes.
    ``malloc_trim`` also releases whole free pages in the middle of the heap. It costs well under a millisecond
    per call at these sizes, so calling it once per calibration batch or layer is cheap.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
