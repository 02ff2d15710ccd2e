"""Triton quantized-linear kernels vs their PyTorch reference, under TRITON_INTERPRET=1 on the CPU.

bf16 is not tested here: the interpreter computes bf16 wrongly (see verified-facts); it is checked on the GPU by
scripts/bench_quant_linear.py. The interpreter converts fp32 -> fp8 with a different rounding than the GPU (values
that fp8 represents exactly convert right), so fp8 activations are either quantized by the reference or built from
fp8-representable values. Outputs must equal the reference up to fp32 summation order. Odd shapes throughout:
N = 67, K tails, M = 1, 3, 16, 37.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU the other modules' kernels must compile for real: no process-wide switch
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from compressor.kernels import quant_reference as ref  # noqa: E402
from compressor.kernels.quant_activation import hadamard_rotate, quantize_activation  # noqa: E402
from compressor.kernels.quant_linear import triton_gemm, triton_linear_fused  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run the Triton interpreter")

N, K = 67, 256  # N is odd: partial N tiles and odd weight rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def weights(kind: str, n: int = N, k: int = K, group: int = 128, seed: int = 0):
    """``(weight_q, weight_scale, group_size, act_dtype)`` of a random weight quantized as ``kind``."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if kind == "int4":
        q, s = ref.quantize_weight_int4_groups(w, group)
        return ref.pack_int4(q), s, group, "int8"
    q, s = ref.quantize_weight_per_channel(w, kind)
    return q, s, 0, kind


def fp8_grid_input(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """x whose per-token fp8 quantization is exact (values on the fp8 grid times 2, amax 896 so the scale is 2): the
    interpreter's fp32 -> fp8 rounding never matters."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 126, (m, k), generator=g, dtype=torch.uint8)  # finite positive e4m3 codes
    sign = torch.randint(0, 2, (m, k), generator=g) * 2 - 1
    x = codes.view(torch.float8_e4m3fn).float() * sign * 2
    x[:, 0] = 896.0
    return x


def assert_matches_reference(out, x, wq, s, bias, act, group, hadamard=0):
    """Equal up to fp32 summation order: the error is measured against the size of the summed terms,
    ``|q| @ |w|^T * a_scale``, since a sum that cancels can lose every digit relative to itself. The bound is the
    classic one for a float sum of K terms, K * eps of the terms (the kernel's integer products are exact; the
    reference sums dequantized floats in whatever order the CPU's matmul picks: 1.2e-6 of the terms was seen at
    K = 256, where K * eps = 3.1e-5; a wrong scale or group is off by far more)."""
    want = ref.quant_linear_reference(x, wq, s, bias, act, group, hadamard, torch.float32)
    q, a_s = ref.quantize_activation_reference(x, act, hadamard_block=hadamard)
    terms = (q.float().abs() @ ref.dequantize_weight(wq, s, group).abs().t()) * a_s[:, None]
    assert out.shape == want.shape and out.dtype == want.dtype
    tol = x.shape[-1] * torch.finfo(torch.float32).eps
    assert ((out - want).abs() <= tol * terms + 1e-6).all(), float(((out - want).abs() / terms).max())


# ---------------------------------------------------------------------------------------------------------------
# activation quantization and the Hadamard rotation


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("norm,hadamard", [(False, 0), (True, 0), (False, 64), (True, 32)])
def test_activation_quant_int8_matches_reference(dtype, norm, hadamard):
    x = (torch.randn(37, 192) * 3).to(dtype)  # odd token count
    w = torch.rand(192) + 0.5 if norm else None
    q, s = quantize_activation(x, "int8", w, 1e-6, hadamard)
    qr, sr = ref.quantize_activation_reference(x, "int8", w, 1e-6, hadamard)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-3


@pytest.mark.parametrize("norm", [False, True])
def test_activation_quant_three_sweeps_match_one_pass(norm):
    x = torch.randn(5, 200) * 2  # 200 is not a multiple of the 64-element chunk
    w = torch.rand(200) + 0.5 if norm else None
    q, s = quantize_activation(x, "int8", w, block_k=64)
    qr, sr = ref.quantize_activation_reference(x, "int8", w)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-3


def test_activation_quant_fp8_grid_values_are_exact():
    x = fp8_grid_input(7, 160)
    q, s = quantize_activation(x, "fp8")
    qr, sr = ref.quantize_activation_reference(x, "fp8")
    assert torch.equal(s, sr) and torch.equal(q.float(), qr.float())


def test_activation_quant_all_zero_row_gets_scale_one():
    x = torch.randn(3, 64)
    x[1] = 0
    q, s = quantize_activation(x, "int8")
    assert s[1] == 1.0 and not q[1].any()


@pytest.mark.parametrize("block", [16, 64, 128])
@pytest.mark.parametrize("m", [1, 37])  # one program per block (decode) / 64 rows x 4 blocks, the last one partial
def test_hadamard_rotate_matches_reference(block, m):
    x = torch.randn(m, 3 * 128) * torch.logspace(-3, 3, 3 * 128)  # full mantissas over six decades
    exact = (x.double().reshape(m, -1, block) @ ref.hadamard_matrix(block, dtype=torch.float64)).reshape(m, -1)
    term_size = (x.abs().double().reshape(m, -1, block).sum(-1, keepdim=True) / block**0.5).expand(-1, -1, block)
    err = (hadamard_rotate(x, block).double() - exact).abs() / term_size.reshape(m, -1)
    assert err.max() < 4e-7  # fp32 summation error of the +-x terms, as the reference's own


def test_hadamard_rotate_rejects_a_block_that_does_not_divide():
    with pytest.raises(ValueError, match="dividing 96"):
        hadamard_rotate(torch.randn(2, 96), 64)


# ---------------------------------------------------------------------------------------------------------------
# the GEMM on pre-quantized codes (M > 16: prefill tiles; M <= 16: decode tiles)

LARGE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


@pytest.mark.parametrize("kind,group", [("int8", 0), ("fp8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 3, 16, 37])
def test_gemm_matches_reference(kind, group, m):
    wq, s, group, act = weights(kind, group=group or 128)
    x, bias = torch.randn(m, K), torch.randn(N)
    aq, a_s = ref.quantize_activation_reference(x, act)
    out = triton_gemm(aq, a_s, wq, s, bias, torch.float32, group, config=None if m <= 16 else LARGE)
    assert_matches_reference(out, x, wq, s, bias, act, group)


@pytest.mark.parametrize("m", [1, 37])
def test_int4_unpack_covers_every_code(m):
    """All sixteen nibble values, -8 included (group quantization without clipping never makes it), in both
    nibble positions of every byte."""
    q = torch.arange(N * K).reshape(N, K).remainder(16).sub(8).to(torch.int8)[:, torch.randperm(K)]
    s = torch.rand(N, K // 32) + 0.1
    wq = ref.pack_int4(q)
    x = torch.randn(m, K)
    aq, a_s = ref.quantize_activation_reference(x)
    out = triton_gemm(aq, a_s, wq, s, None, torch.float32, 32, config=None if m <= 16 else LARGE)
    assert_matches_reference(out, x, wq, s, None, "int8", 32)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m", [3, 37])
def test_gemm_masks_a_k_tail(kind, m):
    k = 200  # not a multiple of BLOCK_K = 32 / 64: EVEN_K is off and the last K step is masked
    wq, s, group, act = weights(kind, k=k)
    x = torch.randn(m, k)
    aq, a_s = ref.quantize_activation_reference(x, act)
    out = triton_gemm(aq, a_s, wq, s, None, torch.float32, group, config=None if m <= 16 else LARGE)
    assert_matches_reference(out, x, wq, s, None, act, group)


def test_gemm_grouped_tile_order_covers_every_tile():
    wq, s, group, act = weights("int8", n=100)
    x = torch.randn(70, K)  # 5 row tiles of 16 in groups of 2, 4 column tiles: a partial group at the end
    aq, a_s = ref.quantize_activation_reference(x, act)
    out = triton_gemm(aq, a_s, wq, s, None, torch.float32, config=LARGE)
    assert_matches_reference(out, x, wq, s, None, act, group)


def test_gemm_writes_half_precision_output():
    wq, s, group, act = weights("int8")
    x = torch.randn(5, K)
    aq, a_s = ref.quantize_activation_reference(x, act)
    out = triton_gemm(aq, a_s, wq, s, None, torch.float16)
    want = ref.quant_linear_reference(x, wq, s, None, act, group, 0, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the fused decode path: one launch quantizes x inside the GEMM


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_decode_matches_reference(kind, group, m, with_bias):
    wq, s, group, act = weights(kind, group=group or 128)
    x = torch.randn(m, K) * 3
    x[:, 5] *= 20  # an outlier channel sets the scale
    bias = torch.randn(N) if with_bias else None
    out = triton_linear_fused(x, wq, s, bias, act, group, torch.float32)
    assert_matches_reference(out, x, wq, s, bias, act, group)


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_fused_decode_after_hadamard_matches_reference(kind, group, m):
    """The rotation differs from the reference's by fp32 rounding (tested above), which can move a code across a
    rounding boundary: the GEMM is checked on the rotated x it was given."""
    wq, s, group, act = weights(kind, group=group or 128)
    rotated = hadamard_rotate(torch.randn(m, K), 128)
    out = triton_linear_fused(rotated, wq, s, None, act, group, torch.float32)
    assert_matches_reference(out, rotated, wq, s, None, act, group)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_fused_decode_fp8_on_the_fp8_grid_matches_reference(m):
    wq, s, group, act = weights("fp8")
    x, bias = fp8_grid_input(m, K, seed=m), torch.randn(N)
    out = triton_linear_fused(x, wq, s, bias, act, group, torch.float32)
    assert_matches_reference(out, x, wq, s, bias, act, group)


def test_fused_decode_handles_an_fp16_input_and_a_k_tail():
    wq, s, group, act = weights("int8", k=200)
    x = (torch.randn(2, 200) * 4).to(torch.float16)
    out = triton_linear_fused(x, wq, s, None, act, group, torch.float32)
    assert_matches_reference(out, x, wq, s, None, act, group)


def test_fused_decode_refuses_prefill_sizes():
    wq, s, group, act = weights("int8")
    with pytest.raises(ValueError, match="at most 16 tokens"):
        triton_linear_fused(torch.randn(17, K), wq, s, None, act, group, torch.float32)


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (autotuner, EVEN_K heuristic, grid from the chosen tiles) with one small config per
    kernel, so that the interpreter has nothing to benchmark."""
    import triton

    from compressor.kernels import quant_linear as ql
    from compressor.kernels import quant_triton as qt

    one = {("large", "w8"): dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2),
           ("large", "w4"): dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2),
           ("small", "w8"): dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=1),
           ("small", "w4"): dict(BLOCK_N=32, GROUP_M=1)}
    for key, tiles in one.items():
        monkeypatch.setattr(qt.GEMM_TUNED[key], "configs", [triton.Config(tiles, num_warps=4, num_stages=2)])
        monkeypatch.setattr(qt.GEMM_TUNED[key], "cache", {})
    monkeypatch.setattr(ql, "interpreting", lambda: False)
    for kind in ("int8", "int4"):
        wq, s, group, act = weights(kind)
        for m in (1, 5, 37):
            x = torch.randn(m, K)
            if m <= ql.FUSED_MAX_M:
                out = triton_linear_fused(x, wq, s, None, act, group, torch.float32)
            else:
                out = triton_gemm(*ref.quantize_activation_reference(x, act), wq, s, None, torch.float32, group)
            assert_matches_reference(out, x, wq, s, None, act, group)


# ---------------------------------------------------------------------------------------------------------------
# the public entry point


def test_cpu_input_runs_reference_without_warning(recwarn):
    from compressor.kernels.quant_linear import quant_linear

    w = torch.randn(16, 64)
    q, s = ref.quantize_weight_per_channel(w)
    quant_linear(torch.randn(3, 64), q, s)
    assert not recwarn.list


def test_quant_linear_rejects_an_unknown_backend():
    from compressor.kernels.quant_linear import quant_linear

    q, s = ref.quantize_weight_per_channel(torch.randn(16, 64))
    with pytest.raises(ValueError, match="backend must be"):
        quant_linear(torch.randn(3, 64), q, s, backend="cublas")


@pytest.mark.parametrize("kind,group,hadamard", [("int8", 0, 0), ("int4", 64, 0), ("int8", 0, 64)])
def test_sibling_layers_share_one_activation_pass(monkeypatch, kind, group, hadamard):
    """Layers reading the same input (q/k/v) quantize it once through a shared memo, with each result still the
    reference's; a new tensor or an in-place write to the input quantizes again."""
    from compressor.kernels import quant_linear as ql

    monkeypatch.setattr(ql, "unsupported_reason", lambda *a: None)  # the CUDA gate: run the kernels on CPU tensors
    passes = []
    real = ql.quantize_activation
    monkeypatch.setattr(ql, "quantize_activation", lambda *a, **k: passes.append(1) or real(*a, **k))
    memo = ql.ActivationMemo()
    x = torch.randn(2, 19, K)  # 38 tokens: the prefill path (> 16)
    layers = [weights(kind, n, group=group, seed=i) for i, n in enumerate((67, 32, 32))]
    for wq, s, g, act in layers:
        out = ql.quant_linear(x, wq, s, None, act, g, hadamard, torch.float32, memo=memo)
        assert_matches_reference(out.reshape(-1, wq.shape[0]), x.reshape(-1, K), wq, s, None, act, g, hadamard)
    assert len(passes) == 1
    x.mul_(-0.5)  # in place: the same object, a new version
    wq, s, g, act = layers[0]
    out = ql.quant_linear(x, wq, s, None, act, g, hadamard, torch.float32, memo=memo)
    assert_matches_reference(out.reshape(-1, wq.shape[0]), x.reshape(-1, K), wq, s, None, act, g, hadamard)
    y = x.clone()
    ql.quant_linear(y, wq, s, None, act, g, hadamard, torch.float32, memo=memo)
    assert len(passes) == 3
    del y  # the memo refers to its input weakly: freeing the input frees the codes
    assert memo._codes is None


@pytest.mark.parametrize("kind,group,hadamard", [("int8", 0, 0), ("int4", 64, 0), ("int8", 0, 64)])
@pytest.mark.parametrize("tokens", [38, 3])
def test_rmsnorm_inside_the_activation_pass(monkeypatch, kind, group, hadamard, tokens):
    """``norm=``: the layer normalises its raw input itself (fused into the activation pass above 16 tokens, in
    PyTorch before the decode kernels): the reference of the normalised input; siblings with the same norm share
    one pass, and another norm is another pass."""
    from compressor.kernels import quant_linear as ql

    monkeypatch.setattr(ql, "unsupported_reason", lambda *a: None)
    passes = []
    real = ql.quantize_activation
    monkeypatch.setattr(ql, "quantize_activation", lambda *a, **k: passes.append(k.get("norm_weight")) or real(*a, **k))
    memo = ql.ActivationMemo()
    x = torch.randn(tokens, K) * 3 + 1
    norm = (torch.rand(K) + 0.5, 1e-5)
    normed = ref.rms_norm_reference(x, *norm)
    layers = [weights(kind, n, group=group, seed=i) for i, n in enumerate((67, 32))]
    for wq, s, g, act in layers:
        out = ql.quant_linear(x, wq, s, None, act, g, hadamard, torch.float32, memo=memo, norm=norm)
        assert_matches_reference(out, normed, wq, s, None, act, g, hadamard)
    if tokens > ql.SMALL_M:
        assert len(passes) == 1 and passes[0] is norm[0]  # one fused pass for both layers
        other = (norm[0] * 2, 1e-5)
        out = ql.quant_linear(x, *layers[0][:2], None, layers[0][3], layers[0][2], hadamard, torch.float32, memo=memo,
                              norm=other)
        assert len(passes) == 2
        assert_matches_reference(out, ref.rms_norm_reference(x, *other), *layers[0][:2], None, layers[0][3], layers[0][2],
                                 hadamard)


def test_activation_memo_is_skipped_at_decode_sizes_and_for_inference_tensors(monkeypatch):
    from compressor.kernels import quant_linear as ql

    monkeypatch.setattr(ql, "unsupported_reason", lambda *a: None)
    memo = ql.ActivationMemo()
    wq, s, g, act = weights("int8")
    ql.quant_linear(torch.randn(3, K), wq, s, None, act, g, 0, torch.float32, memo=memo)  # decode: no memo
    assert memo._codes is None
    with torch.inference_mode():
        x = torch.randn(40, K)
        out = ql.quant_linear(x, wq, s, None, act, g, 0, torch.float32, memo=memo)
    assert memo._codes is None
    assert_matches_reference(out, x, wq, s, None, act, g)
