"""The reference kernel against a materialised masked softmax, on fresh random inputs."""

import math

import pytest
import torch

from compressor.kernels.reference import (
    naive_attention,
    sparse_attention_reference,
    visible_mask,
    window_sizes,
)


def _pattern(q_heads: int, gen: torch.Generator):
    sink = torch.randint(0, 5, (q_heads,), generator=gen, dtype=torch.int32)
    alpha = torch.randint(-8, 24, (q_heads,), generator=gen).float()
    beta = torch.randint(0, 9, (q_heads,), generator=gen).float() / 8
    alpha[0] = math.inf  # one dense head
    return sink, alpha, beta


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("q_tokens,kv_tokens", [(37, 37), (5, 41), (1, 29)])
def test_reference_matches_naive_masked_softmax(causal, q_heads, kv_heads, q_tokens, kv_tokens):
    gen = torch.Generator().manual_seed(q_heads * 1000 + kv_tokens)
    batch, dim = 3, 16
    q = torch.randn(batch, q_heads, q_tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    sink, alpha, beta = _pattern(q_heads, gen)
    kv_start = torch.tensor([0, 3, 0])
    kv_end = torch.tensor([kv_tokens, kv_tokens, kv_tokens - 4])
    got = sparse_attention_reference(
        q, k, v, sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end, causal=causal, q_chunk=7
    )
    window = window_sizes(alpha, beta, kv_end - kv_start)
    q_index = torch.arange(q_tokens) + kv_tokens - q_tokens
    mask = visible_mask(
        q_index, torch.arange(kv_tokens), sink=sink, window=window, kv_start=kv_start, kv_end=kv_end, causal=causal
    )
    want = naive_attention(q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_window_sizes_clamp_to_length_and_at_least_one():
    alpha = torch.tensor([math.inf, -100.0, 3.0, 0.0])
    beta = torch.tensor([0.0, 0.0, 0.0, 0.5])
    got = window_sizes(alpha, beta, torch.tensor([10, 7]))
    assert got.tolist() == [[10, 1, 3, 5], [7, 1, 3, 3]]


def test_dense_reference_equals_sdpa_causal():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 8, generator=gen) for _ in range(3))
    got = sparse_attention_reference(q, k, v, causal=True, q_chunk=10)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_row_with_no_visible_key_is_zero_not_nan():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8)
    out = sparse_attention_reference(q, k, v, kv_start=torch.tensor([3]), kv_end=torch.tensor([4]), causal=True)
    assert torch.equal(out[0, :, :3], torch.zeros(2, 3, 8))
    assert torch.isfinite(out).all()
