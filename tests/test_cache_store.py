"""The fused cache-store kernel against its reference: the new token's K/V in each KV head's sink or ring slot,
lengths advanced, windows at the new lengths; padding rows and rows past the batch untouched.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before any kernel is built).
"""

import math

import pytest
import torch

from tests.interpreter import DEVICE, ON_GPU, needs_triton, rerun_in_fresh_process  # first: sets TRITON_INTERPRET
from compressor.kernels.cache_store import store_decode_token_reference, store_decode_token_triton  # noqa: E402
from compressor.kernels.decode_attention import slot_tokens  # noqa: E402


def _case(lengths, sink_cap, ring_cap, max_batch, key_dim=16, value_dim=16, group=2, seed=0):
    """NaN-poisoned buffers (every slot, rows past the batch too), new K/V as a strided view, per-head windows."""
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads = len(lengths), len(sink_cap)
    start = [sum(s + r for s, r in zip(sink_cap[:g], ring_cap[:g])) for g in range(kv_heads)]
    slots = start[-1] + sink_cap[-1] + ring_cap[-1]
    keys = torch.full((max_batch, slots, key_dim), math.nan, device=DEVICE)
    values = torch.full((max_batch, slots, value_dim), math.nan, device=DEVICE)
    # [batch, tokens=1, kv_heads, dim] transposed, as a model's projection hands it over
    k_new = torch.randn(batch, 1, kv_heads, key_dim, generator=gen).to(DEVICE).transpose(1, 2)
    v_new = torch.randn(batch, 1, kv_heads, value_dim, generator=gen).to(DEVICE).transpose(1, 2)
    q_heads = kv_heads * group
    alpha = torch.tensor([3.0, math.inf, 5.5, 1.0, 0.0, 7.0, 2.0, 9.0] * q_heads)[:q_heads]
    beta = torch.tensor([0.1, 0.0, 0.25, 0.0, 0.5, 0.3, 0.0, 0.125] * q_heads)[:q_heads]
    meta = {n: torch.tensor(v, dtype=torch.int32, device=DEVICE) for n, v in
            (("region_start", start), ("sink_cap", sink_cap), ("ring_cap", ring_cap))}  # fmt: skip
    args = dict(**meta, length=torch.tensor(lengths, dtype=torch.int64, device=DEVICE), alpha=alpha.to(DEVICE),
                beta=beta.to(DEVICE))  # fmt: skip
    window = torch.full((max_batch, q_heads), -7, dtype=torch.int32, device=DEVICE)
    return keys, values, k_new, v_new, args, window


def _run_both(case, valid, sliding):
    keys, values, k_new, v_new, args, window = case
    want = [t.clone() for t in (keys, values, args["length"], window)]
    store_decode_token_reference(want[0], want[1], k_new, v_new, **{**args, "length": want[2]}, valid=valid,
                                 sliding=sliding, window_out=want[3])  # fmt: skip
    got = [t.clone() for t in (keys, values, args["length"], window)]
    store_decode_token_triton(got[0], got[1], k_new, v_new, **{**args, "length": got[2]}, valid=valid,
                              sliding=sliding, window_out=got[3])  # fmt: skip
    return got, want


CASES = [  # (lengths per row, sink_cap per KV head, ring_cap per KV head, max_batch)
    ([0, 3, 4, 11, 40], [4, 48], [6, 0], 6),  # first token, sink filling, ring wrapping; a dense head (no ring)
    ([7, 1], [0, 3, 1], [5, 4, 9], 2),  # no sink, three KV heads (not a power of two)
    ([100], [64], [7], 1),  # far past the ring's length
]


@needs_triton
@pytest.mark.parametrize("lengths,sink_cap,ring_cap,max_batch", CASES)
@pytest.mark.parametrize("sliding", [None, 4])
def test_kernel_equals_reference(lengths, sink_cap, ring_cap, max_batch, sliding):
    case = _case(lengths, sink_cap, ring_cap, max_batch)
    got, want = _run_both(case, None, sliding)
    for g, w, name in zip(got, want, ("keys", "values", "length", "window")):
        torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=name)


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool])
def test_padding_rows_keep_their_slots_and_length(mask_dtype):
    case = _case([5, 9, 2, 0], [2, 3], [4, 4], 5, key_dim=32, value_dim=24, group=3, seed=1)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 0]], dtype=mask_dtype, device=DEVICE)
    got, want = _run_both(case, mask[:, -1], None)  # the padding mask's last column, a strided view
    for g, w, name in zip(got, want, ("keys", "values", "length", "window")):
        torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=name)
    assert got[2].tolist() == [6, 9, 3, 0]


@needs_triton
def test_the_token_lands_where_the_decode_kernel_reads_it():
    # the slot written for token N must be the slot slot_tokens (the attention's layout) says holds token N
    lengths, sink_cap, ring_cap = [0, 2, 5, 13], [2, 0], [3, 4]
    keys, values, k_new, v_new, args, window = _case(lengths, sink_cap, ring_cap, 4)
    store_decode_token_triton(keys, values, k_new, v_new, **args, valid=None, sliding=None, window_out=window)
    for g, start in enumerate(args["region_start"].tolist()):
        token = slot_tokens(args["length"], sink_cap[g], ring_cap[g])  # after the store: N + 1 tokens
        for b, n in enumerate(lengths):
            slot = start + int((token[b] == n).nonzero())
            torch.testing.assert_close(keys[b, slot], k_new[b, g, 0], atol=0, rtol=0)
            torch.testing.assert_close(values[b, slot], v_new[b, g, 0], atol=0, rtol=0)
    assert int(keys.isfinite().all(-1).sum()) == len(lengths) * len(sink_cap)  # nothing else written


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_a_captured_store_replays_one_token_per_replay():
    keys, values, k_new, v_new, args, window = _case([0, 3, 9], [2, 64], [4, 0], 3, key_dim=64, value_dim=64, seed=7)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1]], device=DEVICE)
    call = dict(args, valid=mask[:, -1], sliding=None, window_out=window)
    want = [t.clone() for t in (keys, values, args["length"], window)]
    for _ in range(4):  # the warm-up call, then three replays
        store_decode_token_reference(want[0], want[1], k_new, v_new, **{**call, "length": want[2], "window_out": want[3]})
    store_decode_token_triton(keys, values, k_new, v_new, **call)  # compiles: the capture records launches only
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_decode_token_triton(keys, values, k_new, v_new, **call)
    for _ in range(3):
        graph.replay()
    for g, w in zip((keys, values, args["length"], window), want):
        torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True)


test_kernels_in_a_fresh_process = rerun_in_fresh_process(__file__)
