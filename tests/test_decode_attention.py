"""The Triton decode kernel against its reference, on ragged sink + ring buffers with NaN-poisoned empty slots.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before any kernel is built).
"""

import dataclasses
import math

import pytest
import torch

from tests.interpreter import DEVICE, ON_GPU, needs_triton, rerun_in_fresh_process  # first: sets TRITON_INTERPRET
from compressor.kernels.decode_attention import (  # noqa: E402
    decode_attention_reference,
    decode_attention_triton,
    decode_launch,
    slot_tokens,
)
from compressor.kernels.reference import naive_attention  # noqa: E402

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
    j = torch.arange(30, device=n.device)
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


def _ragged_case(group: int, seed: int):
    """Two KV heads: one with a sink and a ring that wraps, one without sinks whose windows are longer than the
    context; rows of different, odd lengths, one of a single token."""
    sinks = [3] * group + [0] * group
    windows = [5 + 2 * i for i in range(group)] + [200] * group
    return _case(3, 2, group, 16 if group % 2 else 32, [45, 1, 33], sinks, windows, 47, torch.float32, seed=seed)


@needs_triton
@pytest.mark.parametrize("group", range(1, 9))
def test_kernel_equals_reference_for_every_gqa_group_size(group):
    q, k, v, args, _, _ = _ragged_case(group, seed=group)
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, num_splits=2)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@needs_triton
@pytest.mark.parametrize("merge", ["fused", "separate"])
@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_heads_cut_into_one_or_several_chunks_merge_to_the_reference(num_splits, merge):
    # a dense head of 60 slots (4 tiles) next to a 2 + 20 ring (2 tiles): one chunk each (written directly), then
    # the small head direct while the dense one is merged, then both merged
    q, k, v, args, _, _ = _case(2, 2, 2, 32, [60, 17], [0, 0, 2, 2], [60, 60, 20, 9], 60, torch.float32)
    launch = decode_launch(2, (60, 22), q.device, block_n=16, num_splits=num_splits, merge=merge)
    assert launch.chunks_per_head == {1: (1, 1), 2: (2, 1), 4: (4, 2)}[num_splits]
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, launch=launch)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@needs_triton
@pytest.mark.parametrize("merge", ["fused", "separate"])
def test_more_chunks_than_the_merge_weighs_at_once(merge):
    # 263 chunks of one tile: the merge loops over them, a few dozen per round trip
    q, k, v, args, _, _ = _case(1, 1, 2, 64, [4200], [1, 0], [4200, 700], 4200, torch.float32)
    launch = decode_launch(1, (4200,), q.device, block_n=16, num_splits=263, merge=merge)
    assert launch.chunks_per_head[0] > 2 * launch.fused_merge_splits(2, 64)
    assert launch.chunks_per_head[0] > launch.separate_merge_tiles(64)[0] and launch.separate_merge_tiles(64)[1] < 64
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, launch=launch)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def _reversed_chunks(launch):
    """The same launch with each head's chunks in reverse program order: another program of each head is the last to
    arrive (the interpreter runs programs one after another, in order)."""
    programs, table = launch.programs, launch.table.clone()
    for g, first in enumerate(table[2 * programs : 2 * programs + len(launch.chunks_per_head)].tolist()):
        count = launch.chunks_per_head[g]
        table[programs + first : programs + first + count] = table[programs + first : programs + first + count].flip(0)
    return dataclasses.replace(launch, table=table, arrived=torch.zeros_like(launch.arrived))


@needs_triton
@pytest.mark.parametrize("group", [1, 3, 8])
def test_the_fused_merge_does_not_depend_on_which_program_arrives_last(group):
    q, k, v, args, _, _ = _ragged_case(group, seed=20 + group)
    launch = decode_launch(3, (47, 47), q.device, block_n=16, num_splits=3, merge="fused")
    want = decode_attention_reference(q, k, v, **args)
    in_order = decode_attention_triton(q, k, v, **args, launch=launch)
    reversed_ = decode_attention_triton(q, k, v, **args, launch=_reversed_chunks(launch))
    torch.testing.assert_close(in_order, want, **TOLERANCE[torch.float32])
    torch.testing.assert_close(reversed_, want, **TOLERANCE[torch.float32])


@needs_triton
def test_the_arrival_counters_reset_themselves_between_calls():
    # what a CUDA graph replay relies on: a second call with the same launch (and its counters) merges again
    q, k, v, args, _, _ = _ragged_case(4, seed=31)
    launch = decode_launch(3, (47, 47), q.device, block_n=16, num_splits=3, merge="fused")
    first = decode_attention_triton(q, k, v, **args, launch=launch)
    assert launch.needs_merge and launch.fused_merge and not launch.arrived.any()
    second = decode_attention_triton(q, k, v, **args, launch=launch)
    assert not launch.arrived.any()
    torch.testing.assert_close(second, first, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("merge", ["fused", "separate"])
def test_no_output_or_partial_is_read_before_it_is_written(merge, monkeypatch):
    # outputs and the partials' scratch come from torch.empty: poison it, so that a read of an unwritten value
    # (a merge reading a partial no program wrote, a row left unwritten) turns into NaN
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(math.nan))
    q, k, v, args, _, _ = _case(2, 2, 4, 32, [60, 1], [2, 2, 0, 0, 1, 1, 1, 1], [7, 60, 60, 60, 5, 5, 5, 5], 60,
                                torch.float32)  # fmt: skip
    launch = decode_launch(2, (60, 7), q.device, block_n=16, num_splits=4, merge=merge)
    got = decode_attention_triton(q, k, v, **args, launch=launch)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, **args), **TOLERANCE[torch.float32])


@needs_triton
def test_layout_as_device_tensors_with_max_tokens_equals_the_lists():
    q, k, v, args, _, max_tokens = _ragged_case(4, seed=9)
    as_tensors = {**args, **{n: torch.tensor(args[n], dtype=torch.int32, device=DEVICE) for n in ("region_start", "sink_cap", "ring_cap")}}
    want = decode_attention_triton(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **as_tensors, max_tokens=max_tokens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_launch_gives_each_head_programs_in_proportion_to_its_capacity():
    # MoA-like Llama-3-8B layer at 64k, batch 8, 132 SMs: one dense head, two elastic, five local windows
    capacity = (65600, 16960, 16960, 320, 576, 1088, 2112, 1088)
    launch = decode_launch(8, capacity, torch.device("cpu"), block_n=64, programs=4 * 132)
    assert launch.chunks_per_head[0] == max(launch.chunks_per_head) > 3 * launch.chunks_per_head[1] > 3 * launch.chunks_per_head[3]
    assert 0.5 * 528 <= 8 * launch.programs <= 1.5 * 528
    assert launch.chunk_tokens % 64 == 0 and launch.programs == sum(launch.chunks_per_head)
    assert decode_launch(8, capacity, torch.device("cpu"), block_n=64, programs=4 * 132) is launch  # cached


def test_a_large_batch_needs_no_merge():
    launch = decode_launch(128, (2112,) * 8, torch.device("cpu"), block_n=64, programs=4 * 132)
    assert launch.chunks_per_head == (1,) * 8 and not launch.needs_merge


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_uniform_heads_fit_in_one_wave_of_programs(batch):
    # sink 64 + window 2048 on Llama-3-8B's 8 KV heads, 132 SMs x 4 programs: a program left for a second wave
    # would run alone on its SM after the others finished (576 programs of 256 tokens read 62% of copy bandwidth)
    launch = decode_launch(batch, (2112,) * 8, torch.device("cpu"), block_n=64, programs=4 * 132)
    assert batch * launch.programs <= 4 * 132
    assert batch * launch.programs * launch.chunk_tokens >= batch * 8 * 2112  # every token has a program
    assert not launch.fused_merge  # the merge launch is the default: measured faster on the H200


def test_a_launch_for_another_batch_is_refused():
    q, k, v, args, _, _ = _ragged_case(2, seed=3)
    launch = decode_launch(2, (47, 47), q.device, block_n=16, num_splits=2)
    with pytest.raises(ValueError, match="batch 3"):
        decode_attention_triton(q, k, v, **args, launch=launch)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="Triton's CPU interpreter computes bf16 wrongly; bf16 is tested on the GPU")
@pytest.mark.parametrize("dim", [64, 128])
def test_kernel_equals_reference_in_bf16_on_the_gpu(dim):
    q, k, v, args, _, max_tokens = _case(4, 8, 4, dim, [2000, 77, 4096, 1], [64] * 16 + [0] * 16,
                                         [2048] * 24 + [4096] * 8, 4096, torch.bfloat16)  # fmt: skip
    want = decode_attention_reference(q, k, v, **args)
    got = decode_attention_triton(q, k, v, **args, max_tokens=max_tokens)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_a_captured_call_replays_with_new_lengths_and_windows():
    q, k, v, args, _, _ = _case(2, 8, 4, 128, [3000, 900], [64] * 16 + [0] * 16, [2048] * 24 + [4096] * 8, 4096,
                                torch.bfloat16)  # fmt: skip
    length, window = args["length"].clone().fill_(7), args["window"].clone().fill_(3)  # the values at capture
    call = dict(args, length=length, window=window)
    decode_attention_triton(q, k, v, **call)  # compiles and builds the launch plan: capture launches only
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, **call)
    length.copy_(args["length"])
    window.copy_(args["window"])
    graph.replay()
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, **args), **TOLERANCE[torch.bfloat16])


test_kernels_in_a_fresh_process = rerun_in_fresh_process(__file__)
