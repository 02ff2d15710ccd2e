"""The plan's sink + window cache against the reference: our runtime on transformers' DynamicCache, which keeps every
token and applies the plan's masks at every step. Same tokens, same logits, a fraction of the memory."""

import importlib.util
import inspect
import os

import pytest
import torch
from transformers import DynamicCache

from compressor import runtime
from compressor.cache import PlanCache, make_cache
from compressor.errors import CompressorError
from compressor.plan import DensePattern, Plan, WindowPattern
from tests.conftest import FAMILIES, tiny_model

# Per layer, per query head (4 heads, 2 KV heads): groups with differing windows, a dense head, elastic windows.
HEADS = [
    [WindowPattern(alpha=6.0, beta=0.1, sink=2), WindowPattern(alpha=3.0, beta=0.2, sink=0),
     WindowPattern(alpha=9.0, beta=0.0, sink=4), WindowPattern(alpha=9.0, beta=0.0, sink=4)],
    [WindowPattern(alpha=5.0, beta=0.05, sink=1), DensePattern(),
     WindowPattern(alpha=2.0, beta=0.125, sink=3), WindowPattern(alpha=2.0, beta=0.125, sink=3)],
]  # fmt: skip


def _plan(model, heads=HEADS) -> Plan:
    plan = Plan.dense(model)
    for layer, patterns in zip(plan.layers, heads):
        layer.attention.heads = list(patterns)
    return plan


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_padded(lengths: list[int], vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


@torch.no_grad()
def _greedy(model, ids, mask, steps: int, cache, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by hand (prefill in ``chunks`` pieces, then one token a step); returns (tokens, logits)."""
    name = _cache_kwarg(model)
    logits_seen, tokens = [], []
    bounds = torch.linspace(0, ids.shape[1], chunks + 1).long().tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        pos = (mask[:, :hi].cumsum(-1) - 1).clamp(min=0)[:, lo:hi]
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=pos, use_cache=True, **{name: cache})
    for _ in range(steps):
        logits = out.logits[:, -1].float()
        nxt = logits.argmax(-1, keepdim=True)
        logits_seen.append(logits), tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache})
    return torch.cat(tokens, 1), torch.stack(logits_seen, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_with_the_plan_cache_equals_the_dense_reference(family):
    model = runtime.apply(tiny_model(family), _plan(tiny_model(family)))
    ids, mask = _left_padded([21, 9, 15])
    steps = 64
    want_tokens, want_logits = _greedy(model, ids, mask, steps, DynamicCache(config=model.config))
    cache = make_cache(model, batch_size=3, max_length=ids.shape[1] + steps)
    assert isinstance(cache, PlanCache)
    got_tokens, got_logits = _greedy(model, ids, mask, steps, cache)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_uses_the_plan_cache_by_default(family):
    model = runtime.apply(tiny_model(family), _plan(tiny_model(family)))
    ids, mask = _left_padded([17, 6, 11], seed=1)
    seen = []
    original = model._prepare_cache_for_generation

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        seen.append(type(args[1].get(_cache_kwarg(model))).__name__)

    model._prepare_cache_for_generation = spy
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    del model._prepare_cache_for_generation
    want = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **{_cache_kwarg(model): DynamicCache(config=model.config)}
    )
    assert seen == ["PlanCache"]
    assert torch.equal(got, want)


def test_sampling_and_beam_search_match_the_reference():
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    ids, mask = _left_padded([14, 8], seed=2)
    name = _cache_kwarg(model)
    for kwargs in (dict(do_sample=True, top_k=5), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(0)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, **kwargs)
        torch.manual_seed(0)
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, **{name: DynamicCache(config=model.config)}, **kwargs)
        assert torch.equal(got, want), kwargs


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_prefill_into_a_filled_cache_keeps_the_window_semantics(family):
    model = runtime.apply(tiny_model(family), _plan(tiny_model(family)))
    ids, mask = _left_padded([40, 31, 36], seed=3)
    want_tokens, want_logits = _greedy(model, ids, mask, 8, DynamicCache(config=model.config), chunks=3)
    cache = make_cache(model, batch_size=3, max_length=ids.shape[1] + 8)
    got_tokens, got_logits = _greedy(model, ids, mask, 8, cache, chunks=3)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)


INTERPRETED_KERNELS = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="runs the Triton kernels on the CPU model through Triton's interpreter (TRITON_INTERPRET=1)",
)


@INTERPRETED_KERNELS
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_steps_through_the_triton_kernels_equal_the_dense_reference(family, monkeypatch):
    # on CPU the cache runs the kernels' references; here the store kernel and the split-K attention kernel (fused
    # merge) run instead, in the interpreter, on left-padded rows and windows that wrap their rings
    from compressor import cache as cache_module
    from compressor.kernels.cache_store import store_decode_token_triton
    from compressor.kernels.decode_attention import decode_attention_triton

    monkeypatch.setattr(cache_module, "store_decode_token", store_decode_token_triton)
    monkeypatch.setattr(cache_module, "decode_attention", lambda *a, **kw: decode_attention_triton(*a, **kw, num_splits=2))
    model = runtime.apply(tiny_model(family), _plan(tiny_model(family)))
    ids, mask = _left_padded([21, 9, 15], seed=6)
    steps = 24
    want_tokens, want_logits = _greedy(model, ids, mask, steps, DynamicCache(config=model.config))
    got_tokens, got_logits = _greedy(model, ids, mask, steps, make_cache(model, batch_size=3, max_length=ids.shape[1] + steps))
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)


@torch.no_grad()
def test_a_decode_step_advances_the_same_tensors():
    # what replaying a captured decode step (CUDA graphs) relies on: no tensor of the cache is replaced
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    ids, mask = _left_padded([9, 6], seed=5)
    cache = make_cache(model, batch_size=2, max_length=ids.shape[1] + 4)
    name = _cache_kwarg(model)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **{name: cache})
    layer = cache.layers[0]
    held, lengths = [t.data_ptr() for t in (layer.lengths, layer.keys, layer.values)], layer.lengths.clone()
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    model(ids[:, -1:], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True, **{name: cache})
    assert [t.data_ptr() for t in (layer.lengths, layer.keys, layer.values)] == held
    assert torch.equal(layer.lengths, lengths + 1)


def test_cache_bytes_are_within_5_percent_of_the_ideal():
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    ids, mask = _left_padded([30, 30, 30], seed=4)
    max_length = 30 + 64
    cache = make_cache(model, batch_size=3, max_length=max_length)
    _greedy(model, ids, mask, 64, cache)
    ideal = cache.ideal_nbytes(max_length, head_dim=16, dtype=torch.float32)
    dense = 2 * 2 * 2 * 3 * max_length * 16 * 4  # K and V, layers, KV heads, batch, tokens, dim, bytes
    assert abs(cache.nbytes() - ideal) <= 0.05 * ideal
    assert cache.nbytes() < 0.75 * dense


def test_batch_larger_than_sized_is_refused():
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    ids, mask = _left_padded([5, 5, 5])
    with pytest.raises(CompressorError, match="sized for 2"):
        _greedy(model, ids, mask, 1, make_cache(model, batch_size=2, max_length=20))


def test_generation_past_the_sized_length_is_refused():
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    ids, mask = _left_padded([5, 5])
    with pytest.raises(CompressorError, match="max_length 8"):
        _greedy(model, ids, mask, 6, make_cache(model, batch_size=2, max_length=8))


def test_a_plan_applied_after_the_cache_was_built_is_refused():
    model = runtime.apply(tiny_model("llama"), _plan(tiny_model("llama")))
    cache = make_cache(model, batch_size=1, max_length=20)
    runtime.apply(model, _plan(model))
    with pytest.raises(CompressorError, match="plan on the model changed"):
        _greedy(model, *_left_padded([5]), 1, cache)


def test_a_model_without_a_plan_gets_a_dynamic_cache_with_a_warning():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="falls back"):
        cache = make_cache(model, batch_size=1, max_length=20)
    assert type(cache) is DynamicCache


@pytest.mark.slow
def test_smollm2_greedy_decode_at_512_with_a_quarter_density_plan(smollm2):
    model, tokenizer = smollm2
    try:
        plan = Plan.dense(model)
        for i, layer in enumerate(plan.layers):  # about 25% of the keys read at N = 576; a dense head every 5th layer
            pattern = WindowPattern(alpha=32.0, beta=0.15, sink=4)
            layer.attention.heads = [DensePattern() if (i % 5 == 0 and h == 0) else pattern for h in range(len(layer.attention.heads))]
        runtime.apply(model, plan)
        text = "The history of the city is long and varied. " * 60
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
        mask = torch.ones_like(ids)
        want_tokens, want_logits = _greedy(model, ids, mask, 64, DynamicCache(config=model.config))
        cache = make_cache(model, batch_size=1, max_length=512 + 64)
        got_tokens, got_logits = _greedy(model, ids, mask, 64, cache)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(got_tokens, want_tokens)
        assert cache.nbytes() < 0.4 * 2 * 30 * 3 * 576 * 64 * 4  # vs a dense float32 cache of the same length
    finally:
        runtime.remove(model)
