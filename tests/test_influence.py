"""Influence profiles: the chunked, linear-memory histograms equal the brute-force N x N computation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from compressor.calibration.data import RetrievalSample
from compressor.calibration.influence import (
    InfluenceProfile,
    copy_attention,
    loss_outside_window,
    merge_profiles,
    profile_influence,
    windowed_attention,
    profile_sample,
    scored_start,
)
from compressor.errors import CompressorError
from compressor.kernels.reference import sparse_attention_reference
from compressor.plan import DensePattern, WindowPattern

TOKENS, SINK = 48, 5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 query heads sharing 2 KV heads (GQA), head_dim 8 (Llama-3-8B: 32 layers, 32/8 heads, 128)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def explicit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Materialised causal softmax attention that keeps A (with its gradient) on the module: the brute force."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    n = query.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    probs.retain_grad()
    module.brute_probs = probs
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_explicit", explicit_attention)


def brute_force_profile(model, sample, sink, text_fraction=0.25, rows=None):
    """Full A and G = dL/dA by autograd, MoA's influence per entry, binned by distance: [layers, heads, N].
    ``rows``: a list that receives, per layer, the row-wise cut table [heads, N + 1] built by explicit loops."""
    model.set_attn_implementation("test_explicit")
    ids = sample.input_ids[None]
    start = scored_start(sample, text_fraction)
    logits = model(ids).logits[0].float()
    loss = torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:])
    loss.backward()
    model.set_attn_implementation("sdpa")
    n = ids.shape[1]
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    hists, sinks = [], []
    for layer in model.model.layers:
        a = layer.self_attn.brute_probs[0].double()
        g = layer.self_attn.brute_probs.grad[0].double()
        s = (a * g).sum(-1, keepdim=True)
        infl = torch.where(a < 1 - 1e-6, -a * (g - s) / (1 - a).clamp_min(1e-6), torch.zeros_like(a))
        infl = infl * (dist >= 0)
        sinks.append(infl[:, :, :sink].abs().sum((1, 2)))
        body = infl.clone()
        body[:, :, :sink] = 0
        hist = torch.zeros(a.shape[0], n, dtype=torch.float64)
        for d in range(n):
            hist[:, d] = torch.diagonal(body, offset=-d, dim1=1, dim2=2).abs().sum(-1)
        hists.append(hist)
        if rows is not None:
            rows.append(explicit_row_table(a, g, sink))
    return torch.stack(hists), torch.stack(sinks)


def explicit_row_table(a: torch.Tensor, g: torch.Tensor, sink: int) -> torch.Tensor:
    """Every row, every cut w: drop the non-sink keys j <= i - w, renormalise, first order. a, g: [heads, N, N]."""
    heads, n, _ = a.shape
    s = (a * g).sum(-1, keepdim=True)
    table = torch.zeros(heads, n + 1, dtype=torch.float64)
    for i in range(n):
        for w in range(1, i - sink + 1):
            keys = slice(sink, i - w + 1)
            change = -(a[:, i, keys] * (g[:, i, keys] - s[:, i])).sum(-1)
            table[:, w] += change.abs() / (1 - a[:, i, keys].sum(-1)).clamp_min(1e-3)
    return table


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Materialised attention under ``module.test_mask`` [heads, N, N]; keeps q, k, v and the output's gradient."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = (torch.matmul(query, k.transpose(-1, -2)) * scaling).masked_fill(~module.test_mask, -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    out.retain_grad()
    module.brute = (query.detach(), k.detach(), v.detach(), out)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_masked", masked_attention)


def plan_mask(patterns: list, n: int) -> torch.Tensor:
    """[heads, N, N] visibility of one layer's patterns (dense heads: causal)."""
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    masks = []
    for p in patterns:
        if isinstance(p, WindowPattern):
            masks.append((d >= 0) & ((d < p.window_for_length(n)) | (torch.arange(n)[None, :] < p.sink)))
        else:
            masks.append(d >= 0)
    return torch.stack(masks)


def retrieval_sample(seed: int, answer_tokens: int = 3) -> RetrievalSample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (TOKENS,), generator=g)
    return RetrievalSample(ids, TOKENS - answer_tokens, "x", "passkey", 0.5, TOKENS)


@pytest.mark.parametrize("answer_start", [TOKENS - 3, 0])
def test_histogram_equals_brute_force(answer_start):
    model = tiny_llama()
    sample = retrieval_sample(1)
    sample.answer_start = answer_start  # 0: plain text, scored on the last quarter

    profile, _ = profile_sample(model, sample, SINK, chunk=7)  # odd chunk: rows split unevenly
    hist, sink = brute_force_profile(model, sample, SINK)

    torch.testing.assert_close(profile.absolute, hist, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(profile.sink_absolute, sink, rtol=1e-4, atol=1e-9)


def test_row_cut_table_equals_explicit_rows():
    model = tiny_llama()
    sample = retrieval_sample(3)
    sample.answer_start = 0

    profile, _ = profile_sample(model, sample, SINK, chunk=5)
    rows: list[torch.Tensor] = []
    brute_force_profile(model, sample, SINK, rows=rows)

    torch.testing.assert_close(profile.row_cut, torch.stack(rows), rtol=1e-4, atol=1e-9)
    windows = torch.tensor([1, 7, TOKENS])
    cut = loss_outside_window(profile, windows, "row")
    assert cut[..., -1].abs().max() == 0  # a window as long as the input drops nothing
    assert cut[..., 0].min() > 0


def test_profile_averages_samples_and_keeps_model_parameters_untouched():
    model = tiny_llama()
    before = [p.requires_grad for p in model.parameters()]
    samples = [retrieval_sample(1), retrieval_sample(2)]

    profiles = profile_influence(model, samples, sink=SINK)
    one, _ = profile_sample(model, samples[0], SINK)
    two, _ = profile_sample(model, samples[1], SINK)

    torch.testing.assert_close(profiles[TOKENS].absolute, (one.absolute + two.absolute) / 2)
    assert [p.requires_grad for p in model.parameters()] == before
    assert model.config._attn_implementation != "compressor_influence"
    assert all(p.grad is None for p in model.parameters())


def test_task_weighted_merge_equals_profiling_the_samples_together():
    model = tiny_llama()
    text = retrieval_sample(4)
    text = RetrievalSample(text.input_ids[:40], 0, "", "corpus", 0.0, TOKENS)  # shorter span: padded in the merge
    keys = [retrieval_sample(5), retrieval_sample(6)]

    joint = profile_influence(model, [text] + keys, sink=SINK)[TOKENS]
    by_task = {"corpus": profile_influence(model, [text], sink=SINK)[TOKENS],
               "passkey": profile_influence(model, keys, sink=SINK)[TOKENS]}
    equal = merge_profiles([(by_task["corpus"], 1.0), (by_task["passkey"], 1.0)])
    heavy = merge_profiles([(by_task["corpus"], 1.0), (by_task["passkey"], 3.0)])
    without = merge_profiles([(by_task["corpus"], 0.0), (by_task["passkey"], 1.0)])

    for field in ("absolute", "signed", "row_cut", "sink_absolute"):
        torch.testing.assert_close(getattr(equal, field), getattr(joint, field))
    assert equal.samples == 3 and equal.loss == pytest.approx(joint.loss)
    # passkey counted 3x: (1 * text + 3 * 2 keys) / 7 samples' worth
    text_cut = torch.nn.functional.pad(by_task["corpus"].row_cut, (0, TOKENS - 40))
    expected = (text_cut + 6 * by_task["passkey"].row_cut) / 7
    torch.testing.assert_close(heavy.row_cut, expected)
    torch.testing.assert_close(without.row_cut, by_task["passkey"].row_cut)
    with pytest.raises(CompressorError, match="positive task weight"):
        merge_profiles([(by_task["corpus"], 0.0)])


def copy_sample(seed: int) -> RetrievalSample:
    """A passkey-like sample whose 4 answer tokens also stand in the prompt: once inside the sink, twice after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 64, (TOKENS,), generator=g)
    answer = torch.tensor([3, 4, 3, 5])
    ids[-4:] = answer
    ids[2], ids[12:15], ids[30] = 3, torch.tensor([3, 4, 5]), 4
    return RetrievalSample(ids, TOKENS - 4, "3435", "passkey", 0.5, TOKENS)


def test_copy_score_is_the_answer_rows_attention_on_earlier_copies_of_their_token():
    model = tiny_llama()
    sample = copy_sample(7)
    start = sample.answer_start

    profile, _ = profile_sample(model, sample, SINK, chunk=9)
    model.set_attn_implementation("test_explicit")
    model(sample.input_ids[None])
    model.set_attn_implementation("sdpa")
    expected = []
    ids = sample.input_ids
    for layer in model.model.layers:
        a = layer.self_attn.brute_probs[0].detach().double()  # [heads, N, N]
        rows = range(start - 1, TOKENS - 1)
        mass = [sum(a[:, i, j] for j in range(SINK, start) if ids[j] == ids[i + 1]) for i in rows]
        expected.append(torch.stack(mass).mean(0))

    torch.testing.assert_close(profile.copy, torch.stack(expected), rtol=1e-5, atol=1e-9)
    assert profile.copy.min() > 0  # every answer token has a copy after the sink
    text = RetrievalSample(sample.input_ids, 0, "", "corpus", 0.0, TOKENS)
    assert profile_sample(model, text, SINK)[0].copy.abs().max() == 0  # no answer, nothing to copy
    # keys inside the sink never count: with the sink over the whole prompt the score is 0
    q, k = torch.randn(4, TOKENS, 8), torch.randn(2, TOKENS, 8)
    assert copy_attention(q, k, 0.3, ids, start, sink=start).abs().max() == 0
    assert copy_attention(q, k, 0.3, ids, start, sink=0).min() > 0


def test_recall_is_plain_text_attention_on_copies_of_the_next_token_far_enough_back():
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 16, (TOKENS,), generator=g)  # six token values: every row has earlier copies
    text = RetrievalSample(ids, 0, "", "corpus", 0.0, TOKENS)
    start, distance = scored_start(text, 0.5), 7

    profile, _ = profile_sample(model, text, SINK, text_fraction=0.5, recall_distance=distance, chunk=9)
    model.set_attn_implementation("test_explicit")
    model(ids[None])
    model.set_attn_implementation("sdpa")
    expected = []
    for layer in model.model.layers:
        a = layer.self_attn.brute_probs[0].detach().double()
        rows = range(start - 1, TOKENS - 1)
        mass = [sum((a[:, i, j] for j in range(SINK, i - distance + 1) if ids[j] == ids[i + 1]), torch.zeros(4).double())
                for i in rows]
        expected.append(torch.stack(mass).mean(0))

    torch.testing.assert_close(profile.recall, torch.stack(expected), rtol=1e-5, atol=1e-9)
    assert profile.recall.min() > 0 and profile.copy.abs().max() == 0  # text has no answer to copy
    # farther back is a subset of the keys: never more mass; a retrieval sample has no recall
    farther = profile_sample(model, text, SINK, text_fraction=0.5, recall_distance=20)[0].recall
    assert (farther <= profile.recall + 1e-12).all() and (farther < profile.recall).any()
    assert profile_sample(model, copy_sample(1), SINK)[0].recall.abs().max() == 0
    # row chunks do not change the score
    q, k = torch.randn(4, TOKENS, 8), torch.randn(2, TOKENS, 8)
    torch.testing.assert_close(copy_attention(q, k, 0.3, ids, start, SINK, min_distance=3, chunk=5),
                               copy_attention(q, k, 0.3, ids, start, SINK, min_distance=3, chunk=64))


def test_copy_scores_average_and_merge_like_the_other_tables():
    model = tiny_llama()
    samples = [copy_sample(1), copy_sample(2)]
    text = RetrievalSample(samples[0].input_ids, 0, "", "corpus", 0.0, TOKENS)

    both = profile_influence(model, samples, sink=SINK)[TOKENS]
    ones = [profile_sample(model, s, SINK)[0] for s in samples]
    merged = merge_profiles([(profile_influence(model, [text], sink=SINK)[TOKENS], 1.0), (both, 1.0)])

    torch.testing.assert_close(both.copy, (ones[0].copy + ones[1].copy) / 2)
    torch.testing.assert_close(merged.copy, both.copy * 2 / 3)  # the text sample copies nothing
    assert merged.recall.abs().max() == 0  # recall is only computed when asked for
    text_only = profile_sample(model, text, SINK, recall_distance=3)[0].recall
    recalled = profile_influence(model, [text], sink=SINK, recall_distance=3)[TOKENS]
    assert text_only.min() > 0
    torch.testing.assert_close(merge_profiles([(recalled, 1.0), (both, 1.0)]).recall, text_only / 3)


def test_loss_outside_window_is_the_histogram_tail():
    hist = torch.arange(1.0, 11.0, dtype=torch.float64).reshape(1, 1, 10)
    profile = InfluenceProfile(10, 0, 1, hist, hist, torch.zeros(1, 1), torch.zeros(1, 1), 0.0)

    out = loss_outside_window(profile, torch.tensor([1, 4, 10]))

    assert out[0, 0].tolist() == [hist[0, 0, 1:].sum().item(), hist[0, 0, 4:].sum().item(), 0.0]


@pytest.mark.parametrize("tokens,chunk", [(37, 8), (64, 64)])
def test_windowed_attention_matches_the_reference_and_its_gradient_the_masked_softmax(tokens, chunk):
    torch.manual_seed(tokens)
    heads, dim = 4, 8
    q, k, v = (torch.randn(1, heads, tokens, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sink = torch.tensor([0, 3, 5, 0])
    alpha = torch.tensor([float("inf"), 4.0, 1.0, 0.0])
    beta = torch.tensor([0.0, 0.25, 0.0, 0.5])

    out = windowed_attention(q, k, v, sink, alpha, beta, scale=0.3, chunk=chunk)
    ref = sparse_attention_reference(q.detach(), k.detach(), v.detach(), sink=sink, alpha=alpha, beta=beta,
                                     scale=0.3, causal=True)
    torch.testing.assert_close(out.detach(), ref.to(out.dtype), rtol=1e-5, atol=1e-6)

    patterns = [DensePattern(), WindowPattern(alpha=4.0, beta=0.25, sink=3), WindowPattern(alpha=1.0, sink=5),
                WindowPattern(alpha=0.0, beta=0.5, sink=0)]
    mask = plan_mask(patterns, tokens)[None]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * 0.3).masked_fill(~mask, -math.inf)
    want = torch.autograd.grad(torch.matmul(torch.softmax(scores, -1), v), (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_row_cut_at_a_plan_equals_explicit_rows_of_the_sparse_model():
    """Profiled under a plan: the forward/backward run sparse, and each cut is priced against the head's dense row
    from the sparse model's q, k, v and output gradient."""
    model = tiny_llama()
    sample = retrieval_sample(4)
    patterns = [[WindowPattern(alpha=6.0, beta=0.0, sink=SINK)] * 2 + [DensePattern()] * 2,
                [WindowPattern(alpha=2.0, beta=0.25, sink=SINK), DensePattern(),
                 WindowPattern(alpha=1.0, sink=SINK), WindowPattern(alpha=0.0, beta=0.5, sink=SINK)]]

    profile, loss = profile_sample(model, sample, SINK, chunk=5, patterns=patterns)
    dense, dense_loss = profile_sample(model, sample, SINK, chunk=5)

    model.set_attn_implementation("test_masked")
    for layer, module in enumerate(model.model.layers):
        module.self_attn.test_mask = plan_mask(patterns[layer], TOKENS)
    ids = sample.input_ids[None]
    logits = model(ids).logits[0].float()
    brute_loss = torch.nn.functional.cross_entropy(logits[sample.answer_start - 1 : -1], ids[0, sample.answer_start:])
    brute_loss.backward()
    model.set_attn_implementation("sdpa")
    tables = []
    causal = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    for module in model.model.layers:
        q, k, v, out = module.self_attn.brute
        a = torch.softmax((torch.matmul(q, k.transpose(-1, -2)) * module.self_attn.scaling).masked_fill(~causal, -math.inf), -1)
        g = torch.matmul(out.grad, v.transpose(-1, -2))
        tables.append(explicit_row_table(a[0].double(), g[0].double(), SINK))

    assert loss == pytest.approx(float(brute_loss.detach()), rel=1e-5) and loss != pytest.approx(dense_loss, rel=1e-3)
    torch.testing.assert_close(profile.row_cut, torch.stack(tables), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(profile.row_cut, dense.row_cut)
    with pytest.raises(CompressorError, match="1 layers of patterns for 2"):
        profile_sample(model, sample, SINK, patterns=patterns[:1])


def test_all_dense_patterns_profile_like_the_dense_model():
    model = tiny_llama()
    sample = retrieval_sample(5)

    plain, _ = profile_sample(model, sample, SINK)
    dense, _ = profile_sample(model, sample, SINK, patterns=[[DensePattern()] * 4] * 2)

    torch.testing.assert_close(dense.row_cut, plain.row_cut)
