"""Triton's CPU interpreter for kernel tests on a machine without a GPU. Import this before any kernel module.

Triton reads ``TRITON_INTERPRET`` when it is imported; another test module (through transformers) may have imported it
first, in which case the kernel tests of this process are skipped and ``rerun_in_fresh_process`` runs them anew.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
TRITON_LOADED_EARLY = not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or TRITON_LOADED_EARLY,
    reason="triton is not installed, or was imported before TRITON_INTERPRET=1 (then test_kernels_in_a_fresh_process runs them)",
)


def rerun_in_fresh_process(test_file: str):
    """A test that runs ``test_file`` in a new interpreter process, where only this process imported Triton early."""

    @pytest.mark.skipif(not TRITON_LOADED_EARLY, reason="the kernel tests above ran in this process")
    def test_kernels_in_a_fresh_process():
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-4000:]

    return test_kernels_in_a_fresh_process
