"""SageAttention-style quantized attention: quantization, smoothing, kernels vs reference, accuracy, plan, end to end.

Without a GPU the Triton kernels run in the CPU interpreter on small shapes with 16 x 16 tiles (INT8 QK with
16-bit P V). The FP8 P V kernels are tested on the GPU only: the interpreter converts float32 to float8_e4m3 wrongly
for magnitudes >= 64 (e.g. -127.9 -> -64), and P is scaled to [0, 448] before that conversion.
"""

import math
import os
import zlib

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

from compressor.kernels import sage_attention as sg  # noqa: E402
from compressor.kernels import sage_quant as sq  # noqa: E402
from compressor.kernels.reference import sparse_attention_reference  # noqa: E402
from compressor.methods.sage import SageConfig, attention_errors, choose_variant, variant_errors  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
FP8_ON_GPU_ONLY = "FP8 P V runs on the GPU only: Triton's CPU interpreter converts float32 to float8_e4m3 wrongly"


def _qkv(batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, seed, dtype=torch.float16, k_offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen) + k_offset
    v = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


# --- quantization --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["int8-qk/fp8-pv+qsmooth", "int8-qk/fp16-pv"])
def test_quantize_dequantize_round_trip(variant):
    q, k, v = _qkv(2, 4, 2, 37, 37, 64, seed=1, dtype=torch.float32, k_offset=3.0)
    start, end = torch.tensor([0, 5]), torch.tensor([37, 30])

    quant = sg.quantize_qkv_reference(q, k, v, variant=variant, kv_start=start, kv_end=end, block_m=16, block_n=16)
    qd, kd, vd = quant.dequantize()

    valid = sq._valid_keys(start, end, 2, 37, q.device)
    k_smooth = torch.where(valid, k - quant.k_mean[:, :, None], 0.0)
    half_step = lambda s, n: s.repeat_interleave(16, dim=2)[:, :, :n, None] / 2 + 1e-6  # noqa: E731
    assert ((qd - q).abs() <= half_step(quant.q_scale, 37)).all()  # int8 error: at most half a step
    assert ((kd - k_smooth).abs() <= half_step(quant.k_scale, 37)).all()
    v_want = v if quant.v_scale is None else torch.where(valid, v, 0.0)  # fp8: padding zeroed
    tol = 2e-3 if quant.v_scale is None else 2**-4  # fp16, or e4m3's 3-bit mantissa (relative)
    assert ((vd - v_want).abs() <= tol * v_want.abs() + 1e-3).all()


def test_smoothing_k_leaves_attention_unchanged():
    q, k, v = _qkv(2, 4, 2, 33, 40, 64, seed=2, dtype=torch.float32, k_offset=5.0)
    start, end = torch.tensor([0, 4]), torch.tensor([40, 36])
    sink, alpha, beta = torch.tensor([0, 2, 0, 3]), torch.tensor([math.inf, 6.0, 9.0, 2.0]), torch.zeros(4)
    kw = dict(sink=sink, alpha=alpha, beta=beta, kv_start=start, kv_end=end)
    k_mean, _ = sq.key_stats(k, v, sq._valid_keys(start, end, 2, 40, q.device), pv_fp8=False)

    smoothed = sparse_attention_reference(q, k - k_mean[:, :, None], v, **kw)

    torch.testing.assert_close(smoothed, sparse_attention_reference(q, k, v, **kw), atol=1e-5, rtol=1e-5)


def test_q_smoothing_with_its_bias_row_gives_the_same_scores_and_attention():
    q, k, v = _qkv(1, 2, 2, 32, 32, 64, seed=3, dtype=torch.float64)
    q_mean = q.view(1, 2, 2, 16, 64).mean(dim=3)  # per block of 16 queries
    q_smooth = q - q_mean.repeat_interleave(16, dim=2)
    bias = (q_mean @ k.transpose(-1, -2)).repeat_interleave(16, dim=2)  # one row per query block

    scores = q_smooth @ k.transpose(-1, -2) + bias

    torch.testing.assert_close(scores, q @ k.transpose(-1, -2))
    torch.testing.assert_close(torch.softmax(scores, -1) @ v, torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


@needs_triton
@pytest.mark.parametrize("variant", ["int8-qk/fp16-pv", "int8-qk/fp16-pv+qsmooth", "int8-qk/fp8-pv"])
def test_fused_quantization_kernel_matches_reference(variant):
    q, k, v = _qkv(2, 4, 2, 45, 45, 64, seed=4, k_offset=2.0)
    start, end = torch.tensor([0, 3], device=DEVICE), torch.tensor([40, 45], device=DEVICE)
    kw = dict(variant=variant, kv_start=start, kv_end=end, block_m=16, block_n=16)

    got, want = sg.quantize_qkv(q, k, v, **kw), sg.quantize_qkv_reference(q, k, v, **kw)

    for name in ("q", "q_scale", "q_mean", "k", "k_scale", "k_mean", "v_scale"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1 if a.dtype == torch.int8 else 1e-6, rtol=1e-6, msg=name)
    if want.v_scale is not None and ON_GPU:  # see FP8_ON_GPU_ONLY
        torch.testing.assert_close(got.v.float(), want.v.float())


# --- kernels against the reference --------------------------------------------------------------------------

# name: batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, causal, pattern, padded
CASES = {
    "mha-dense-causal": (1, 2, 2, 45, 45, 64, True, "dense", False),
    "gqa2-windows-padded": (2, 4, 2, 37, 37, 64, True, "windows", True),
    "gqa2-windows-bidirectional": (2, 4, 2, 41, 41, 64, False, "windows", True),
    "queries-at-offset": (1, 4, 1, 19, 53, 64, True, "windows", False),
    "head-dim-128": (1, 2, 1, 33, 33, 128, True, "dense", False),
}


def _pattern(kind, q_heads):
    if kind == "dense":
        return {}
    sink = torch.tensor([0, 3, 0, 20][:q_heads], dtype=torch.int32)
    alpha = torch.tensor([math.inf, 5.0, 9.0, 2.0][:q_heads])
    beta = torch.tensor([0.0, 0.25, 0.0, 0.0][:q_heads])
    return dict(sink=sink.to(DEVICE), alpha=alpha.to(DEVICE), beta=beta.to(DEVICE))


def _case(case):
    batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, causal, pattern, padded = CASES[case]
    q, k, v = _qkv(batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, seed=zlib.crc32(case.encode()))
    kw = dict(causal=causal, **_pattern(pattern, q_heads))
    if padded:
        kw.update(kv_start=torch.tensor([0, 6], device=DEVICE), kv_end=torch.tensor([kv_tokens - 5, kv_tokens], device=DEVICE))
    return q, k, v, kw


def _check_kernel(case, variant, **extra):
    q, k, v, kw = _case(case)
    kw.update(extra)
    out = torch.full_like(q, math.nan)

    tile = 32 if ON_GPU else 16  # 8-bit MMAs on the GPU need a reduction dimension (here BLOCK_N for P V) >= 32
    got = sg.sage_attention(q, k, v, variant=variant, **kw, out=out, block_m=tile, block_n=tile)

    want = sg.sage_attention_reference(q, k, v, variant=variant, **kw, block_m=tile, block_n=tile)
    assert not got.isnan().any(), "some outputs were never written"
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)


@needs_triton
@pytest.mark.parametrize("variant", ["int8-qk/fp16-pv", "int8-qk/fp16-pv+qsmooth"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_int8_kernel_matches_reference(case, variant):
    _check_kernel(case, variant)


@needs_triton
def test_int8_kernel_with_block_lists_matches_reference():
    q, k, v, kw = _case("gqa2-windows-padded")
    n_blocks = -(-37 // 16)
    index = torch.arange(n_blocks, dtype=torch.int32).flip(0).expand(2, 4, n_blocks, n_blocks).contiguous()
    count = torch.tensor([1, 2, 3], dtype=torch.int32).expand(2, 4, n_blocks).contiguous()
    lists = dict(block_index=index.to(DEVICE), block_count=count.to(DEVICE), block_size=16)

    # One listed block per query block visited in descending order: the same P rounding grid as the reference's.
    got = sg.sage_attention(q, k, v, variant="int8-qk/fp16-pv+qsmooth", **kw, **lists, block_m=16, block_n=16)

    want = sg.sage_attention_reference(q, k, v, variant="int8-qk/fp16-pv+qsmooth", **kw, **lists, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason=FP8_ON_GPU_ONLY)
@pytest.mark.parametrize("variant", ["int8-qk/fp8-pv", "int8-qk/fp8-pv+qsmooth"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp8_kernel_matches_reference(case, variant):
    _check_kernel(case, variant)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 and real tile sizes)")
@pytest.mark.parametrize("variant", ["int8-qk/fp8-pv", "int8-qk/fp16-pv+qsmooth"])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_tiles_bf16_accuracy(variant, dim):
    q, k, v = _qkv(2, 8, 2, 1000, 1000, dim, seed=5, dtype=torch.bfloat16, k_offset=2.0)
    start, end = torch.tensor([0, 100], device=DEVICE), torch.tensor([1000, 1000], device=DEVICE)

    got = sg.attention(q, k, v, variant=variant, kv_start=start, kv_end=end)

    block_m, block_n, _ = sg.GPU_TILES[sg.parse_variant(variant).pv]  # the kernel's quantization blocks
    want = sg.sage_attention_reference(q, k, v, variant=variant, kv_start=start, kv_end=end, block_m=block_m,
                                       block_n=block_n)
    exact = sparse_attention_reference(q.float(), k.float(), v.float(), kv_start=start, kv_end=end)
    assert attention_errors(got, want, False)["cos"] > 0.9999
    assert attention_errors(got, exact, False)["cos"] > 0.999


# --- accuracy against float32 --------------------------------------------------------------------------------


def _errors(variant, k_offset, smooth_k=True):
    q, k, v = _qkv(1, 2, 2, 512, 512, 64, seed=6, dtype=torch.float32, k_offset=0.0)
    if k_offset:  # outlier channels: a per-channel mean offset of k_offset x the std
        k = k + k_offset * torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out = sg.sage_attention_reference(q, k, v, variant=variant, smooth_k=smooth_k)
    return attention_errors(out, sparse_attention_reference(q, k, v), per_head=False)


def test_int8_qk_is_accurate_on_random_inputs():
    errors = _errors("int8-qk/fp16-pv", 0.0)
    assert errors["cos"] > 0.9999 and errors["rel_l1"] < 0.02


def test_fp8_pv_stays_close_on_random_inputs():
    errors = _errors("int8-qk/fp8-pv+qsmooth", 0.0)  # flat attention: P's 3-bit mantissa shows (rel. L1 ~3.5%)
    assert errors["cos"] > 0.999 and errors["rel_l1"] < 0.05


def test_outlier_channels_in_k_fail_without_smoothing_and_pass_with_it():
    bounds = SageConfig()
    raw = _errors("int8-qk/fp16-pv", 10.0, smooth_k=False)
    smoothed = _errors("int8-qk/fp16-pv", 10.0)
    assert raw["cos"] < bounds.cos_min and raw["rel_l1"] > bounds.rel_l1_max, raw
    assert smoothed["cos"] >= bounds.cos_min and smoothed["rel_l1"] <= bounds.rel_l1_max, smoothed


# --- plan selection and end to end --------------------------------------------------------------------------


def test_selection_takes_the_fastest_variant_within_bounds_else_bf16():
    q, k, v = _qkv(1, 4, 2, 96, 96, 64, seed=8, dtype=torch.float32)
    config = SageConfig(variants=["int8-qk/fp16-pv"])
    errors = variant_errors(q, k, v, config.variants)

    assert choose_variant(errors, config) == "int8-qk/fp16-pv"
    assert choose_variant(errors, SageConfig(variants=["int8-qk/fp16-pv"], rel_l1_max=1e-6)) == "bf16"


def test_unknown_variant_is_refused_with_the_list():
    with pytest.raises(ValueError, match="int8-qk/fp8-pv"):
        SageConfig(variants=["int4-qk"])


def test_compress_load_and_forward(tiny_model_dir, tmp_path):
    import compressor

    recipe = tmp_path / "sage.yaml"
    recipe.write_text(
        "name: sage-test\ncalibration: {source: corpus, samples: 1, lengths: [64]}\n"
        "attention_quant: {method: sage, variants: [int8-qk/fp16-pv], rel_l1_max: 1.0, cos_min: 0.0}\n"
    )
    out = tmp_path / "out"
    plan, _ = compressor.compress(str(tiny_model_dir), str(recipe), str(out), report=False, log=lambda m: None)
    assert [layer.attention.quant["variant"] for layer in plan.layers] == ["int8-qk/fp16-pv"] * len(plan.layers)
    assert "int8-qk/fp16-pv" in plan.layers[0].attention.quant["errors"]

    model, _ = compressor.load(str(out))[:2]
    ids = torch.randint(0, 100, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pattern", ["dense", "window", "xattention"])
def test_runtime_routes_quantized_prefill_through_sage(pattern, monkeypatch):
    from conftest import tiny_model

    from compressor import runtime
    from compressor.methods.xattention import XAttentionPattern
    from compressor.plan import Plan, WindowPattern

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0  # left padding
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    plan = Plan.dense(model)
    head = {"dense": None, "window": WindowPattern(alpha=16.0, sink=4), "xattention": XAttentionPattern(tau=1.0, block_size=64)}[pattern]
    for layer in plan.layers:
        layer.attention.heads = layer.attention.heads if head is None else [head] * len(layer.attention.heads)
        layer.attention.quant = {"variant": "int8-qk/fp16-pv+qsmooth"}
    calls = []
    real = sg.attention
    monkeypatch.setattr(sg, "attention", lambda *a, **kw: calls.append(kw["variant"]) or real(*a, **kw))

    with torch.no_grad():
        runtime.apply(model, plan)
        got = model(ids, attention_mask=mask).logits

    assert calls == ["int8-qk/fp16-pv+qsmooth"] * len(plan.layers)  # prefill of each layer, quantized
    if pattern != "window":  # same attention as the dense model, up to quantization
        real = lambda x: torch.cat([x[0], x[1, 9:]])[None, None]  # noqa: E731  padded positions left out
        assert attention_errors(real(got), real(want), per_head=False)["cos"] > 0.999
