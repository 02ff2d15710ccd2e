"""The Triton decode kernel against its reference, on ragged sink + ring buffers with NaN-poisoned empty slots.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before any kernel is built).
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# Triton reads TRITON_INTERPRET when it is imported; another test module (through transformers) may import it first
TRITON_LOADED_EARLY = not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from compressor.kernels.decode_attention import (  # noqa: E402
    decode_attention_reference,
    decode_attention_triton,
    slot_tokens,
)
from compressor.kernels.reference import naive_attention  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or TRITON_LOADED_EARLY,
    reason="triton is not installed, or was imported before TRITON_INTERPRET=1 (then test_kernels_in_a_fresh_process runs them)",
)
TOLERANCE = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.float32: dict(atol=2e-5, rtol=2e-5),
             torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}  # fmt: skip


def _case(batch, kv_heads, group, dim, lengths, sinks, windows, max_length, dtype, seed=0):
    """Buffers filled the way the cache fills them (token j of row b = history[b, g, j]), empty slots NaN."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    history = torch.randn(2, batch, kv_heads, max_length, dim, generator=gen)
    sink = torch.tensor(sinks, dtype=torch.int32)
    length = torch.tensor(lengths)
    window = torch.tensor(windows)[None, :].expand(batch, -1).clamp(max=length[:, None]).clamp(min=1)
    sink_cap, ring_cap, start, at = [], [], [], 0
    for g in range(kv_heads):
        s, w = int(sink[g * group : (g + 1) * group].max()), int(window[:, g * group : (g + 1) * group].max())
        if s + w >= max_length:
            s, w = max_length, 0
        sink_cap.append(s), ring_cap.append(w), start.append(at)
        at += s + w
    k_buf = torch.full((batch, at, dim), math.nan)
    v_buf = torch.full((batch, at, dim), math.nan)
    for g in range(kv_heads):
        token = slot_tokens(length, sink_cap[g], ring_cap[g])
        region = slice(start[g], start[g] + token.shape[1])
        held = (token >= 0)[..., None]
        rows = torch.arange(batch)[:, None]
        k_buf[:, region] = torch.where(held, history[0, rows, g, token.clamp(min=0)], math.nan)
        v_buf[:, region] = torch.where(held, history[1, rows, g, token.clamp(min=0)], math.nan)
    q = torch.randn(batch, q_heads, dim, generator=gen)
    args = dict(region_start=start, sink_cap=sink_cap, ring_cap=ring_cap, length=length.to(DEVICE), sink=sink.to(DEVICE),
                window=window.to(DEVICE))  # fmt: skip
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k_buf.to(**to), v_buf.to(**to), args, history.to(**to), max(s + r for s, r in zip(sink_cap, ring_cap))


def test_reference_equals_naive_attention_over_the_full_history():
    q, k, v, args, history, _ = _case(2, 2, 3, 16, [23, 7], [2, 0, 3, 1, 0, 0], [5, 9, 2, 4, 30, 30], 30, torch.float32)
    got = decode_attention_reference(q, k, v, **args)
    n = args["length"]
    j = torch.arange(30)
    sink, window = args["sink"].long(), args["window"]
    visible = (j[None, None] < n[:, None, None]) & (
        (j[None, None] < sink[None, :, None]) | (n[:, None, None] - 1 - j[None, None] < window[:, :, None])
    )
    want = naive_attention(q[:, :, None], history[0], history[1], visible[:, :, None])[:, :, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CASES = [  # (kv_heads, group, lengths, sinks per q head, windows per q head, max_length)
    (2, 1, [37, 5, 64], [4, 0], [9, 64], 64),  # MHA; one dense KV head; window longer than a short row
    (1, 2, [31], [0, 0], [7, 3], 40),  # empty sinks, ring wraps
    (2, 4, [53, 1], [2, 2, 0, 1, 0, 0, 0, 0], [5, 13, 6, 1, 3, 3, 3, 3], 60),  # per-head windows in a group
    (1, 8, [29, 70, 11], [3] * 8, [17, 5, 9, 2, 33, 8, 1, 12], 71),  # group of 8, odd lengths
    (1, 3, [19], [0, 0, 0], [100, 100, 100], 25),  # window longer than the context: dense
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kv_heads,group,lengths,sinks,windows,max_length", CASES)
def test_kernel_equals_reference(kv_heads, group, lengths, sinks, windows, max_length, dtype):
    dim = 64 if group % 2 else 128
    q, k, v, args, _, max_tokens = _case(len(lengths), kv_heads, group, dim, lengths, sinks, windows, max_length, dtype)
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, max_tokens=max_tokens, num_splits=3)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@needs_triton
def test_kernel_with_softcap_and_one_split_equals_reference():
    q, k, v, args, _, max_tokens = _case(2, 2, 2, 64, [21, 8], [1, 0, 2, 2], [4, 6, 3, 3], 30, torch.float32)
    want = decode_attention_reference(q * 8, k, v, **args, softcap=5.0)
    got = decode_attention_triton(q * 8, k, v, **args, max_tokens=max_tokens, softcap=5.0, num_splits=1)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="Triton's CPU interpreter computes bf16 wrongly; bf16 is tested on the GPU")
@pytest.mark.parametrize("dim", [64, 128])
def test_kernel_equals_reference_in_bf16_on_the_gpu(dim):
    q, k, v, args, _, max_tokens = _case(4, 8, 4, dim, [2000, 77, 4096, 1], [64] * 16 + [0] * 16,
                                         [2048] * 24 + [4096] * 8, 4096, torch.bfloat16)  # fmt: skip
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, max_tokens=max_tokens)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])


@pytest.mark.skipif(not TRITON_LOADED_EARLY, reason="the kernel tests above ran in this process")
def test_kernels_in_a_fresh_process():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
