"""The decode GEMV (kernels/quant_gemv.py) vs the PyTorch reference, under TRITON_INTERPRET=1 on the CPU.

Odd shapes: N = 67 (a partial N tile), K = 200 (a K tail for int8 / fp8), every M in 1..16, split-K of 1, 2, 3
(3 does not divide the K steps: the last split is short). fp8 inputs are either codes from the reference or built
on the fp8 grid (the interpreter rounds fp32 -> fp8 differently from the GPU). Output buffers come from
``torch.empty``, so a row or column the kernel forgets is garbage; the split-K workspace is poisoned with NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from compressor.kernels import quant_reference as ref  # noqa: E402
from compressor.kernels.quant_gemv import gemv_config, quant_gemv  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run the Triton interpreter")

N = 67


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def weights(kind: str, k: int, group: int = 128):
    """``(weight_q, weight_scale, group_size, act_dtype)`` of a random ``[N, k]`` weight quantized as ``kind``."""
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(1))
    if kind == "int4":
        q, s = ref.quantize_weight_int4_groups(w, group)
        return ref.pack_int4(q), s, group, "int8"
    q, s = ref.quantize_weight_per_channel(w, kind)
    return q, s, 0, kind


def fp8_grid_input(m: int, k: int) -> torch.Tensor:
    """x whose per-token fp8 quantization is exact (fp8 values times 2, amax 896: the scale is 2)."""
    g = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 126, (m, k), generator=g, dtype=torch.uint8)
    x = codes.view(torch.float8_e4m3fn).float() * (torch.randint(0, 2, (m, k), generator=g) * 2 - 1) * 2
    x[:, 0] = 896.0
    return x


def assert_matches_reference(out, x, wq, s, bias, act, group):
    """Equal to the reference up to fp32 summation order, measured against the size of the summed terms."""
    want = ref.quant_linear_reference(x, wq, s, bias, act, group, 0, torch.float32)
    q, a_s = ref.quantize_activation_reference(x, act)
    terms = (q.float().abs() @ ref.dequantize_weight(wq, s, group).abs().t()) * a_s[:, None]
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert ((out - want).abs() <= 1e-6 * terms + 1e-6).all(), float(((out - want).abs() / terms).max())


def tiles(split: int, block_n: int = 32, block_k: int = 64) -> dict:
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=2)


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("split", [1, 3])
def test_gemv_quantizes_float_x_inside(kind, group, m, split):
    k = 384 if group else 200  # int4: three groups of 128 / six of 64; int8: a K tail
    wq, s, group, act = weights(kind, k, group or 128)
    x = torch.randn(m, k) * 3
    x[:, 7] *= 20  # an outlier channel sets the scale
    out = quant_gemv(x, wq, s, None, act, group, torch.float32, config=tiles(split))
    assert_matches_reference(out, x, wq, s, None, act, group)


@pytest.mark.parametrize("kind,group", [("int8", 0), ("fp8", 0), ("int4", 64)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split", [1, 2])
def test_gemv_on_codes_with_bias(kind, group, m, split):
    k = 256
    wq, s, group, act = weights(kind, k, group or 128)
    x, bias = torch.randn(m, k), torch.randn(N)
    a_q, a_s = ref.quantize_activation_reference(x, act)
    out = quant_gemv(a_q, wq, s, bias, act, group, torch.float32, x_scale=a_s, config=tiles(split, block_n=16))
    assert_matches_reference(out, x, wq, s, bias, act, group)


@pytest.mark.parametrize("m", [1, 4])
def test_gemv_fp8_float_x_on_the_fp8_grid(m):
    wq, s, group, act = weights("fp8", 256)
    x, bias = fp8_grid_input(m, 256), torch.randn(N)
    out = quant_gemv(x, wq, s, bias, act, group, torch.float32, config=tiles(2))
    assert_matches_reference(out, x, wq, s, bias, act, group)


@pytest.mark.parametrize("m", range(1, 17))
def test_gemv_every_token_count(m):
    wq, s, group, act = weights("int4", 256, 32)
    x = torch.randn(m, 256)
    out = quant_gemv(x, wq, s, None, act, group, torch.float32, config=tiles(2, block_n=16))
    assert_matches_reference(out, x, wq, s, None, act, group)


def test_gemv_split_k_workspace_is_fully_written_before_it_is_read(monkeypatch):
    """The last split of a tile sums every split's partial: a partial it read before it was written would be the
    NaN this test puts into the workspace."""
    real_empty = torch.empty

    def poisoned_empty(*shape, dtype=None, **kw):
        t = real_empty(*shape, dtype=dtype, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    wq, s, group, act = weights("int4", 256, 64)
    x = torch.randn(3, 256)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    out = quant_gemv(x, wq, s, None, act, group, torch.float32, config=tiles(4))
    monkeypatch.undo()
    assert_matches_reference(out, x, wq, s, None, act, group)


def test_gemv_half_precision_input_and_output():
    wq, s, group, act = weights("int8", 256)
    x = (torch.randn(2, 256) * 4).to(torch.float16)
    out = quant_gemv(x, wq, s, None, act, group, torch.float16, config=tiles(2))
    want = ref.quant_linear_reference(x, wq, s, None, act, group, 0, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_gemv_all_zero_token_gives_bias():
    wq, s, group, act = weights("int8", 256)
    x = torch.randn(3, 256)
    x[1] = 0
    bias = torch.randn(N)
    out = quant_gemv(x, wq, s, bias, act, group, torch.float32, config=tiles(1))
    assert torch.equal(out[1], bias)


def test_gemv_refuses_prefill_sizes():
    wq, s, group, act = weights("int8", 256)
    with pytest.raises(ValueError, match="1..16 tokens"):
        quant_gemv(torch.randn(17, 256), wq, s, None, act, group, torch.float32)


def test_gemv_config_splits_k_only_when_n_gives_too_few_programs():
    wide = gemv_config(1, 28672, 4096, 0, sms=132)
    narrow = gemv_config(16, 4096, 14336, 128, sms=132)
    assert wide["SPLIT_K"] == 1
    assert narrow["SPLIT_K"] > 1 and narrow["BLOCK_K"] == 128
    programs = -(-4096 // narrow["BLOCK_N"]) * narrow["SPLIT_K"]
    assert programs >= 132


def test_quant_linear_routes_measured_decode_shapes_to_the_gemv(monkeypatch):
    """quant_linear's M <= 16 path (taken on CUDA) runs the GEMV where DECODE_ROUTES lists the shape: the scale
    inside up to four tokens, codes from the activation kernel above."""
    from compressor.kernels import quant_gemv as qg
    from compressor.kernels import quant_linear as ql

    calls = []
    real = qg.quant_gemv
    monkeypatch.setattr(qg, "quant_gemv", lambda *a, **kw: calls.append(kw.get("x_scale") is None) or real(*a, **kw))
    monkeypatch.setattr(ql, "DECODE_ROUTES", {("w4a8", 1, 256, N): ql.DecodeRoute("gemv", tiles(2), True),
                                              ("w4a8", 16, 256, N): ql.DecodeRoute("gemv", tiles(1), False)})
    wq, s, group, act = weights("int4", 256, 64)
    for m in (1, 9):
        x = torch.randn(m, 256)
        out = ql._fast_linear(x, wq, s, None, act, group, 0, torch.float32, "auto")
        assert_matches_reference(out, x, wq, s, None, act, group)
    assert calls == [True, False]


def test_unmeasured_8bit_shapes_and_rotated_inputs_keep_the_narrow_tile_gemm(monkeypatch):
    from compressor.kernels import quant_linear as ql

    gemv = ql.DecodeRoute("gemv", scale_inside=True)
    monkeypatch.setattr(ql, "DECODE_ROUTES", {("int8", 1, 4096, 4096): gemv})
    assert ql.decode_route("int8", 1, 4096, 4096) == gemv
    assert ql.decode_route("int8", 3, 4096, 4096) == gemv  # the M bucket of 1..4 tokens
    assert ql.decode_route("int8", 5, 4096, 4096).kernel == "gemm"
    assert ql.decode_route("int8", 1, 4096, 6144).kernel == "gemm"
    assert ql.decode_route("int8", 1, 4096, 4096, hadamard_block=128).kernel == "gemm"
    unmeasured_int4 = ql.decode_route("w4a8", 1, 576, 1536)  # int4 takes the GEMV with gemv_config's tiles
    assert unmeasured_int4.kernel == "gemv" and unmeasured_int4.config is None and unmeasured_int4.scale_inside
    assert not ql.decode_route("w4a8", 9, 576, 1536).scale_inside
    assert ql.decode_route("w4a8", 1, 576, 1536, hadamard_block=64).kernel == "gemm"


def test_decode_route_rejects_an_unknown_kernel():
    from compressor.kernels.quant_linear import DecodeRoute

    with pytest.raises(ValueError, match="'gemm' or 'gemv'"):
        DecodeRoute("cublas")


def test_gemv_leaves_the_layers_counters_zeroed():
    """A layer's own split-K counters: every call resets them, so the next call (no fill in between) is right too."""
    wq, s, group, act = weights("int4", 384, 64)
    counters = torch.zeros(8, dtype=torch.int32)
    for m in (1, 5, 1):
        x = torch.randn(m, 384)
        out = quant_gemv(x, wq, s, None, act, group, torch.float32, config=tiles(3), counters=counters)
        assert_matches_reference(out, x, wq, s, None, act, group)
        assert not counters.any()


def test_gemv_refuses_counters_it_cannot_use():
    wq, s, group, act = weights("int8", 256)
    with pytest.raises(ValueError, match="counters must be int32 with >= 3 elements"):
        quant_gemv(torch.randn(1, 256), wq, s, None, act, group, torch.float32, config=tiles(2),
                   counters=torch.zeros(2, dtype=torch.int32))


def test_quant_linear_module_makes_its_counters_once(monkeypatch):
    from compressor.kernels.quant_gemv import gemv_counters_needed
    from compressor.linear_quant.modules import QuantLinear

    layer = QuantLinear(256, N, "w4a8")
    x = torch.randn(2, 256)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert layer._counters(x) is None  # made during a graph capture, it would be zeroed only when the graph replays
    monkeypatch.undo()
    first = layer._counters(x)
    assert first.dtype == torch.int32 and first.numel() == gemv_counters_needed(N) and not first.any()
    assert layer._counters(x) is first
    assert "_gemv_counters" not in layer.state_dict()
