"""The runtime on tiny random models of every supported family: dense plans reproduce the model, window plans
match an explicit mask, padding, chunked prefill and generation work."""

from pathlib import Path

import pytest
import torch

from compressor import runtime
from compressor.errors import CompressorError
from compressor.kernels.reference import visible_mask, window_sizes
from compressor.plan import Plan, WindowPattern
from tests.conftest import FAMILIES, tiny_model

SLIDING = {"mistral", "gemma2", "gemma3"}


def _ids(batch: int, tokens: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _window_plan(model, pattern: WindowPattern) -> Plan:
    plan = Plan.dense(model)
    for layer in plan.layers:
        layer.attention.heads = [pattern] * len(layer.attention.heads)
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_plan_reproduces_the_model(family):
    model = tiny_model(family)
    ids = _ids(2, 29)
    with torch.no_grad():
        want = model(ids).logits
        runtime.apply(model, Plan.dense(model))
        got = model(ids).logits
    if family in SLIDING:  # the model's own sliding window runs through our reference kernel there
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:  # dense layers go through the same SDPA call as the model's own: bit-identical
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_whole_length_matches_dense(family):
    model = tiny_model(family)
    ids = _ids(2, 31)
    with torch.no_grad():
        want = model(ids).logits
        runtime.apply(model, _window_plan(model, WindowPattern(alpha=4096.0, beta=0.0, sink=0)))
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_window_plan_equals_the_model_with_the_same_explicit_mask(family):
    model = tiny_model(family)
    tokens = 40
    ids = _ids(1, tokens)
    pattern = WindowPattern(alpha=3.0, beta=0.125, sink=2)  # window(40) = 8
    idx = torch.arange(tokens)
    window = window_sizes(torch.tensor([pattern.alpha]), torch.tensor([pattern.beta]), torch.tensor([tokens]))
    mask = visible_mask(idx, idx, sink=torch.tensor([pattern.sink]), window=window,
                        kv_start=torch.tensor([0]), kv_end=torch.tensor([tokens]), causal=True)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits  # a 4D boolean mask goes to SDPA as is
        runtime.apply(model, _window_plan(model, pattern))
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got - model.__class__.forward(model, ids).logits).abs().max() == 0  # deterministic


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_padded_batch_rows_equal_unpadded_rows(family, side):
    model = tiny_model(family)
    runtime.apply(model, _window_plan(model, WindowPattern(alpha=2.0, beta=0.25, sink=3)))
    lengths = [30, 19, 24]
    rows = [_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            if side == "left":  # positions come from the mask in generate; here position ids must follow it too
                pos = (mask[i].cumsum(-1) - 1).clamp(min=0)[None]
                batched_i = model(ids[i : i + 1], attention_mask=mask[i : i + 1], position_ids=pos).logits[0, sl]
                torch.testing.assert_close(batched_i, alone, atol=3e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(batched[i, sl], alone, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_prefill_matches_one_pass(family):
    from transformers import DynamicCache

    model = tiny_model(family)
    runtime.apply(model, _window_plan(model, WindowPattern(alpha=5.0, beta=0.0, sink=2)))
    ids = _ids(1, 37)
    with torch.no_grad():
        want = model(ids).logits[:, -7:]
        cache = DynamicCache(config=model.config)
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        got = model(ids[:, 30:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_generate_with_a_dense_plan_equals_the_model():
    model = tiny_model("llama")
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    runtime.apply(model, Plan.dense(model))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_generate_with_a_window_plan_runs_and_differs_from_dense():
    model = tiny_model("llama")
    ids = _ids(1, 60)
    dense = model.generate(ids, max_new_tokens=10, do_sample=False)
    runtime.apply(model, _window_plan(model, WindowPattern(alpha=2.0, beta=0.0, sink=1)))
    with torch.no_grad():
        sparse_logits = model(ids).logits
    runtime.remove(model)
    with torch.no_grad():
        dense_logits = model(ids).logits
    assert not torch.allclose(sparse_logits[:, -1], dense_logits[:, -1], atol=1e-3)
    runtime.apply(model, _window_plan(model, WindowPattern(alpha=2.0, beta=0.0, sink=1)))
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape == dense.shape


def test_remove_restores_the_original_attention():
    model = tiny_model("gemma2")
    assert model.config._attn_implementation == "eager"
    runtime.apply(model, Plan.dense(model))
    runtime.remove(model)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "compressor_layer") for m in model.modules())


def test_mask_with_holes_is_refused():
    model = tiny_model("llama")
    runtime.apply(model, Plan.dense(model))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 4] = 0
    with pytest.raises(CompressorError, match="padding inside a sequence"):
        model(_ids(1, 10), attention_mask=mask)


def test_a_fresh_process_reads_and_applies_every_pattern_type_without_importing_methods(tmp_path):
    """Pattern types live in the plan and the runtime dispatches on them: nothing depends on a method module's import."""
    import subprocess
    import sys

    from compressor.plan import XAttentionPattern

    model = tiny_model("llama")
    plan = Plan.dense(model)
    plan.layers[0].attention.heads = [XAttentionPattern(tau=0.5, stride=4, block_size=64)] * 4
    plan.layers[1].attention.heads = [WindowPattern(alpha=8.0, sink=2)] * 4
    plan.save(tmp_path / "compression_plan.json")
    code = f"""
import sys, torch
from compressor import runtime
from compressor.plan import Plan
from tests.conftest import tiny_model
model = tiny_model("llama")
runtime.apply(model, Plan.load({str(tmp_path)!r}))
layers = runtime.attention_modules(model)
assert layers[0].compressor_layer.xattention is not None and layers[1].compressor_layer.xattention is None
with torch.no_grad():
    model(torch.randint(0, 128, (1, 150)))
assert "compressor.methods" not in sys.modules, "applying a plan imported the methods"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.stdout.strip().endswith("ok"), proc.stderr


def test_padding_rows_are_measured_once_per_forward_not_per_layer(monkeypatch):
    model = tiny_model("llama")  # 2 layers
    runtime.apply(model, _window_plan(model, WindowPattern(alpha=3.0, sink=1)))
    calls = []
    measure = runtime.mask_rows
    monkeypatch.setattr(runtime, "mask_rows", lambda mask: calls.append(1) or measure(mask))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        model(_ids(2, 20), attention_mask=mask)
    assert len(calls) == 1


def test_mask_rows_are_measured_once_and_only_on_request():
    """The mask function leaves the rows unmeasured (their measure syncs with the host, which a decode step through
    the plan cache must not do); the first layer that needs them measures them, the others reuse that."""
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = runtime.padding_mask(2, 1, 4, kv_offset=1, attention_mask=attention_mask)
    assert mask.compressor_rows.rows is None
    bounds = runtime.row_bounds(mask, kv_tokens=5, batch=2, device=torch.device("cpu"))
    assert bounds.start.tolist() == [2, 0] and bounds.end.tolist() == [5, 5] and bounds.padded
    measured = mask.compressor_rows.rows
    assert measured is not None
    runtime.row_bounds(mask, kv_tokens=5, batch=2, device=torch.device("cpu"))
    assert mask.compressor_rows.rows is measured
