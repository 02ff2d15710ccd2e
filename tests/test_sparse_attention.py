"""The Triton sparse-attention kernel against the reference, on fresh random inputs and NaN-poisoned outputs.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before any kernel is
built) on small shapes with 16 x 16 tiles; with a GPU the same tests run compiled, plus the `cuda` tests at real sizes.
"""

import importlib.util
import math
import os
import subprocess
import sys
import warnings
import zlib

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first built, i.e. after this line

from compressor.kernels import sparse_attention as sa  # noqa: E402
from compressor.kernels.reference import (  # noqa: E402
    block_list_allowed,
    block_sparse_attention_reference,
    naive_attention,
    sparse_attention_reference,
    visible_mask,
    window_sizes,
)

DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
TOLERANCE = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _pattern(kind: str, q_heads: int, gen: torch.Generator):
    """(sink, alpha, beta) per head: dense, a random mix, windows below one tile, or windows past the sequence."""
    if kind == "dense":
        return None, None, None
    if kind == "mixed":
        sink = torch.randint(0, 6, (q_heads,), generator=gen, dtype=torch.int32)
        alpha = torch.randint(-8, 24, (q_heads,), generator=gen).float()
        beta = torch.randint(0, 9, (q_heads,), generator=gen).float() / 8
        alpha[0] = math.inf  # a dense head
        if q_heads > 2:
            alpha[-1] = -math.inf  # non-finite windows mean the whole row, as in the reference
        return sink, alpha, beta
    if kind == "tiny":  # windows of 1..4 keys, smaller than a 16-key tile; some heads with sinks
        sink = torch.randint(0, 3, (q_heads,), generator=gen, dtype=torch.int32)
        return sink, torch.randint(1, 5, (q_heads,), generator=gen).float(), torch.zeros(q_heads)
    if kind == "long":  # windows longer than the sequence
        return torch.full((q_heads,), 3, dtype=torch.int32), torch.full((q_heads,), 1000.0), torch.zeros(q_heads)
    if kind == "sinks":  # sinks reaching past the window of the first queries
        sink = torch.tensor([40, 0, 25, 1][:q_heads], dtype=torch.int32)
        return sink, torch.tensor([2.0, 3.0, 1.0, 9.0][:q_heads]), torch.zeros(q_heads)
    raise ValueError(kind)


def _rows(kind: str, batch: int, kv_tokens: int):
    """Per-row valid ranges: all keys, left/right padding, or rows whose queries see nothing."""
    if kind == "full":
        return None, None
    if kind == "padded":  # row 0 right-padded, row 1 left-padded
        start = torch.tensor([0, 7] + [3] * (batch - 2))
        end = torch.tensor([kv_tokens - 6, kv_tokens] + [kv_tokens - 1] * (batch - 2))
        return start, end
    if kind == "empty":  # row 1: valid keys only after most queries; row 2: no valid key at all
        return torch.tensor([0, kv_tokens - 3, 10]), torch.tensor([kv_tokens, kv_tokens, 10])
    raise ValueError(kind)


def _inputs(batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, dtype, gen):
    q = torch.randn(batch, q_heads, q_tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    return (x.to(DEVICE, dtype) for x in (q, k, v))


def _on_device(*xs):
    return [None if x is None else x.to(DEVICE) for x in xs]


# name: batch, q_heads, kv_heads, q_tokens, kv_tokens, causal, pattern, rows
CASES = {
    "mha-dense-causal": (1, 2, 2, 45, 45, True, "dense", "full"),
    "gqa2-mixed-padded": (2, 4, 2, 37, 37, True, "mixed", "padded"),
    "gqa3-mixed-bidirectional": (2, 6, 2, 41, 41, False, "mixed", "padded"),
    "gqa4-queries-at-offset": (1, 4, 1, 19, 53, True, "mixed", "full"),
    "gqa8-window-below-a-tile": (1, 8, 1, 33, 33, True, "tiny", "full"),
    "window-past-sequence": (2, 2, 1, 29, 29, False, "long", "padded"),
    "rows-without-keys": (3, 2, 2, 24, 40, True, "mixed", "empty"),
    "sinks-past-window-bidirectional": (1, 4, 2, 70, 70, False, "sinks", "full"),
    "sinks-past-window-padded": (2, 4, 2, 50, 70, True, "sinks", "padded"),
    "decode-one-query": (2, 4, 2, 1, 50, True, "mixed", "padded"),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(case, dtype):
    batch, q_heads, kv_heads, q_tokens, kv_tokens, causal, pattern, rows = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v = _inputs(batch, q_heads, kv_heads, q_tokens, kv_tokens, 64, dtype, gen)
    sink, alpha, beta = _on_device(*_pattern(pattern, q_heads, gen))
    kv_start, kv_end = _on_device(*_rows(rows, batch, kv_tokens))
    kwargs = dict(sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end, causal=causal)
    out = torch.full_like(q, math.nan)

    got = sa.sparse_attention(q, k, v, **kwargs, out=out, block_m=16, block_n=16)

    want = sparse_attention_reference(q, k, v, **kwargs)
    assert not got.isnan().any(), "some outputs were never written"
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@needs_triton
def test_rows_without_visible_keys_are_zero():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(3, 2, 2, 24, 40, 64, torch.float16, gen)
    kv_start, kv_end = _on_device(*_rows("empty", 3, 40))

    got = sa.sparse_attention(q, k, v, kv_start=kv_start, kv_end=kv_end, out=torch.full_like(q, math.nan), block_m=16)

    assert torch.equal(got[2], torch.zeros_like(got[2]))  # row 2 has no valid key
    assert torch.equal(got[1, :, :-3], torch.zeros_like(got[1, :, :-3]))  # its valid keys lie after these queries


def _random_block_lists(batch, q_heads, q_tokens, kv_tokens, block_size, gen):
    """Distinct key blocks per query block, a random number of them, the unused tail filled with junk."""
    n_q, n_kv = -(-q_tokens // block_size), -(-kv_tokens // block_size)
    index = torch.randint(-5, 50, (batch, q_heads, n_q, n_kv), generator=gen, dtype=torch.int32)
    count = torch.randint(0, n_kv + 1, (batch, q_heads, n_q), generator=gen, dtype=torch.int32)
    for row in range(batch * q_heads * n_q):
        b, h, i = row // (q_heads * n_q), row // n_q % q_heads, row % n_q
        index[b, h, i, : count[b, h, i]] = torch.randperm(n_kv, generator=gen)[: count[b, h, i]].int()
    return index, count


# name: q_tokens, kv_tokens, block_size, causal, pattern, rows
LIST_CASES = {
    "causal-dense-heads": (50, 70, 32, True, "dense", "padded"),
    "bidirectional": (45, 45, 16, False, "dense", "full"),
    "with-window-and-sinks": (37, 61, 32, True, "mixed", "padded"),
}


@needs_triton
@pytest.mark.parametrize("case", list(LIST_CASES), ids=list(LIST_CASES))
def test_block_lists_match_reference(case):
    q_tokens, kv_tokens, block_size, causal, pattern, rows = LIST_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    batch, q_heads, kv_heads = 2, 4, 2
    q, k, v = _inputs(batch, q_heads, kv_heads, q_tokens, kv_tokens, 64, torch.float16, gen)
    sink, alpha, beta = _on_device(*_pattern(pattern, q_heads, gen))
    kv_start, kv_end = _on_device(*_rows(rows, batch, kv_tokens))
    index, count = _on_device(*_random_block_lists(batch, q_heads, q_tokens, kv_tokens, block_size, gen))
    kwargs = dict(sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end, causal=causal)
    lists = dict(block_index=index, block_count=count, block_size=block_size)

    got = sa.sparse_attention(q, k, v, **kwargs, **lists, out=torch.full_like(q, math.nan), block_m=16, block_n=16)

    want = block_sparse_attention_reference(q, k, v, **kwargs, **lists)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float16])


@needs_triton
def test_tile_must_divide_list_block_size():
    q, k, v = _inputs(1, 2, 2, 20, 20, 64, torch.float16, torch.Generator().manual_seed(0))
    index = torch.zeros(1, 2, 2, 2, dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, 2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="must divide block_size"):
        sa.sparse_attention(q, k, v, block_index=index, block_count=count, block_size=16, block_m=32)


def test_partial_pattern_is_an_error():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="together"):
        sa.attention(q, q, q, alpha=torch.zeros(2))


# --- block-list reference against a materialised masked softmax ------------------------------------------------


def test_block_list_allowed_counts_only_the_listed_prefix():
    index = torch.tensor([[[[2, 0, 1], [7, -1, 1]]]])  # 1 x 1 x 2 query blocks x 3 entries
    count = torch.tensor([[[2, 3]]])
    got = block_list_allowed(index, count, n_kv_blocks=3)
    assert got.tolist() == [[[[True, False, True], [False, True, False]]]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_tokens,kv_tokens,block_size", [(37, 37, 8), (10, 45, 4), (1, 29, 16)])
def test_block_reference_matches_naive_masked_softmax(causal, q_tokens, kv_tokens, block_size):
    gen = torch.Generator().manual_seed(q_tokens * 100 + kv_tokens)
    batch, q_heads, kv_heads, dim = 2, 4, 2, 16
    q = torch.randn(batch, q_heads, q_tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_tokens, dim, generator=gen)
    sink, alpha, beta = _pattern("mixed", q_heads, gen)
    kv_start, kv_end = torch.tensor([0, 3]), torch.tensor([kv_tokens - 2, kv_tokens])
    index, count = _random_block_lists(batch, q_heads, q_tokens, kv_tokens, block_size, gen)

    got = block_sparse_attention_reference(
        q, k, v, block_index=index, block_count=count, block_size=block_size, sink=sink, alpha=alpha, beta=beta,
        kv_start=kv_start, kv_end=kv_end, causal=causal, q_chunk=block_size,
    )  # fmt: skip

    n_kv = -(-kv_tokens // block_size)
    listed = block_list_allowed(index, count, n_kv).repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
    window = window_sizes(alpha, beta, kv_end - kv_start)
    q_index = torch.arange(q_tokens) + kv_tokens - q_tokens
    mask = visible_mask(
        q_index, torch.arange(kv_tokens), sink=sink, window=window, kv_start=kv_start, kv_end=kv_end, causal=causal
    )
    want = naive_attention(q, k, v, mask & listed[:, :, :q_tokens, :kv_tokens])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_reference_with_every_block_listed_equals_sparse_reference():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen) for _ in range(3))
    sink, alpha, beta = _pattern("mixed", 4, gen)
    index = torch.arange(5, dtype=torch.int32).expand(2, 4, 5, 5)
    count = torch.full((2, 4, 5), 5, dtype=torch.int32)
    got = block_sparse_attention_reference(
        q, k, v, block_index=index, block_count=count, block_size=8, sink=sink, alpha=alpha, beta=beta
    )
    want = sparse_attention_reference(q, k, v, sink=sink, alpha=alpha, beta=beta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- dispatch ------------------------------------------------------------------------------------------------------


def test_attention_falls_back_to_reference_on_cpu_and_warns_once():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 64, generator=gen) for _ in range(3))
    sa._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sa.attention(q, k, v)
        sa.attention(q, k, v)
    reasons = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(reasons) == 1 and ("cpu" in reasons[0] or "triton" in reasons[0])
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v))


def test_import_needs_neither_triton_nor_cuda():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, warnings\n"
        "import compressor.kernels.sparse_attention as sa\n"
        "assert not torch.cuda.is_initialized()\n"
        "q = torch.randn(1, 2, 5, 64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    sa.attention(q, q, q)\n"
        "assert 'triton is not installed' in str(w[0].message), w\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# --- GPU only ------------------------------------------------------------------------------------------------------


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autotuned_kernel_at_real_sizes(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    batch, q_heads, kv_heads, q_tokens, kv_tokens = 2, 16, 4, 3001, 4099
    q, k, v = _inputs(batch, q_heads, kv_heads, q_tokens, kv_tokens, dim, dtype, gen)
    sink = torch.randint(0, 100, (q_heads,), generator=gen, dtype=torch.int32)
    alpha = torch.randint(-1024, 2048, (q_heads,), generator=gen).float()
    beta = torch.randint(0, 9, (q_heads,), generator=gen).float() / 8
    alpha[:2] = math.inf
    kwargs = dict(
        sink=sink.cuda(), alpha=alpha.cuda(), beta=beta.cuda(), kv_start=torch.tensor([0, 517]).cuda(),
        kv_end=torch.tensor([4000, 4099]).cuda(), causal=True,
    )  # fmt: skip

    got = sa.sparse_attention(q, k, v, **kwargs, out=torch.full_like(q, math.nan))

    want = sparse_attention_reference(q, k, v, **kwargs)
    assert not got.isnan().any()
    assert _relative_error(got, want) < 1e-2


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("block_size", [64, 128])
def test_autotuned_block_lists_at_real_sizes(block_size):
    gen = torch.Generator().manual_seed(block_size)
    batch, q_heads, kv_heads, tokens = 1, 8, 2, 2050
    q, k, v = _inputs(batch, q_heads, kv_heads, tokens, tokens, 128, torch.bfloat16, gen)
    index, count = _on_device(*_random_block_lists(batch, q_heads, tokens, tokens, block_size, gen))
    lists = dict(block_index=index, block_count=count, block_size=block_size)

    got = sa.sparse_attention(q, k, v, **lists, out=torch.full_like(q, math.nan))

    want = block_sparse_attention_reference(q, k, v, **lists)
    assert not got.isnan().any()
    assert _relative_error(got, want) < 1e-2


@cuda
@pytest.mark.skipif(not ON_GPU, reason="Triton's CPU interpreter computes bf16 wrongly; bf16 is tested on the GPU")
@needs_triton
def test_bf16_small_shapes_match_reference():
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(2, 6, 2, 41, 41, 64, torch.bfloat16, gen)
    sink, alpha, beta = _on_device(*_pattern("mixed", 6, gen))
    kv_start, kv_end = _on_device(*_rows("padded", 2, 41))
    kwargs = dict(sink=sink, alpha=alpha, beta=beta, kv_start=kv_start, kv_end=kv_end)
    got = sa.sparse_attention(q, k, v, **kwargs, out=torch.full_like(q, math.nan), block_m=16, block_n=16)
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, **kwargs), atol=2e-2, rtol=2e-2)


@cuda
@needs_cuda
def test_attention_falls_back_for_unsupported_head_dim():
    q = torch.randn(1, 2, 9, 96, device="cuda", dtype=torch.float16)
    assert "head dim 96" in sa.unsupported_reason(q, q, q)
    torch.testing.assert_close(sa.attention(q, q, q), sparse_attention_reference(q, q, q))
