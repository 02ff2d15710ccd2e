"""Every Triton kernel compiles for Hopper (sm_90), checked on this GPU-less machine with Triton's bundled ptxas.

The CPU interpreter runs programs the real compiler refuses (seen: a tile variable of two shapes across the arms of
a runtime ``if``; two returns of different dtypes), so interpreter tests alone let such kernels land.
scripts/check_gpu_compile.py launches the wrappers with every launch turned into a compile for sm_90. It runs in a
fresh process: the interpreter switch is read when Triton is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build bundles no ptxas"),
]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90():
    result = _run(["scripts/check_gpu_compile.py", "--quick"])
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    names = {line.split()[1] for line in compiled}
    assert len(compiled) >= 40, tail
    for kernel in ("_sparse_attention_fwd", "_sage_attention_fwd", "_quantize_qkv_kernel", "_scores_fwd",
                   "_decode_chunk", "quant_gemm_kernel"):
        assert kernel in names, f"{kernel} was never launched by the check\n{tail}"


BAD_KERNEL = '''
import sys
sys.path.insert(0, sys.argv[1])
import check_gpu_compile as check  # drops TRITON_INTERPRET before Triton is imported
import torch
import triton
import triton.language as tl


@triton.jit
def bad(x_ptr, n, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n:  # a runtime branch giving one variable tiles of two shapes: the interpreter runs it, Triton refuses
        t = tl.zeros((WIDE, 16), dtype=tl.float32)
    else:
        t = tl.zeros((16, 16), dtype=tl.float32)
    tl.store(x_ptr + tl.arange(0, 16), tl.sum(t, 0))


compiler = check.Compiler(90)
compiler.install()
bad[(2,)](torch.zeros(16), 1, WIDE=32)
print("failures:", len(compiler.failures))
'''


def test_the_check_catches_what_the_interpreter_lets_through(tmp_path):
    script = tmp_path / "bad_kernel.py"  # Triton reads a kernel's source from its file
    script.write_text(BAD_KERNEL)
    result = _run([str(script), str(ROOT / "scripts")], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failures: 1" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
