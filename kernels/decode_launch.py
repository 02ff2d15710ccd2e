"""How a decode shape is cut into programs for ``kernels/decode_attention.py``, decided once per shape and cached
(no host work per call beyond a lookup): chunk length, programs per KV head, how partials are merged.

The cost model: programs run in waves of as many as the GPU holds at once; a program left for a second wave runs
nearly alone on its SM after the others finished (576 programs of 256 tokens on 528 slots read at 62% of copy
bandwidth), so one wave of a few longer chunks beats many short ones, until the merge of many partials costs more.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from compressor.kernels.triton_support import interpreting, next_pow2

# Cost model of a launch (see _launch_cost), in key tokens a program streams at full speed; rough guesses from the
# H200 runs (scripts/results/decode_kernel_h200.md), to be refit from bench_decode.py --sweep-only
PROGRAM_OVERHEAD_TOKENS = 32  # a program's fixed cost: its first loads' latency, writing a partial, the counter
PROGRAMS_PER_SM_FOR_FULL_SPEED = 2  # fewer programs on an SM keep too few loads in flight to stream at full speed
MERGE_OVERHEAD_TOKENS = 32  # the merging program's round trip to its partials
MERGE_TOKENS_PER_CHUNK = 2  # and its reading of each partial (a round trip per 8 to 64, see fused_merge_splits)
SEPARATE_MERGE_TOKENS = 160  # a second launch that merges (its launch and its own round trips)
FUSED_MERGE_MAX_CHUNKS = 64  # beyond this, one program merging a head's partials is slower than a second launch


@dataclass(frozen=True)
class DecodeLaunch:
    """How one decode shape is cut into programs: per row, ``chunks_per_head[g]`` programs for KV head ``g``, each
    over up to ``chunk_tokens`` of its stored tokens (sized on the regions' capacity, so the grid never depends on
    the lengths and a CUDA graph can replay it). Heads cut into several chunks are merged by the last of their
    programs to finish (``fused_merge``) or by a second launch."""

    block_n: int
    chunk_tokens: int
    chunks_per_head: tuple[int, ...]
    num_warps: int
    num_stages: int
    fused_merge: bool
    table: torch.Tensor = field(repr=False)  # int32 [2 * programs + 2 * kv_heads], see _launch_table
    # int32 [batch * kv_heads], zero between launches: each merging program resets its own. Launches of one plan
    # must not overlap in time (one stream, as a model's layers run), or they would count each other's programs.
    arrived: torch.Tensor = field(repr=False)

    @property
    def programs(self) -> int:
        """Programs per row (the grid is ``(programs, batch)``)."""
        return sum(self.chunks_per_head)

    @property
    def needs_merge(self) -> bool:
        return max(self.chunks_per_head) > 1

    def fused_merge_splits(self, group: int, head_dim: int) -> int:
        """Partials the merging program weighs per round trip: a power of two, its [splits, group, head_dim] tile
        at most 4096 values (32 per thread; 8192 took 155 registers a thread at group 4, head dim 128, and four
        programs no longer fit an SM)."""
        room = max(1, 4096 // (next_pow2(group) * head_dim))
        return max(1, min(next_pow2(max(self.chunks_per_head)), 1 << (room.bit_length() - 1)))

    def separate_merge_tiles(self, head_dim: int) -> tuple[int, int]:
        """(partials per round trip, head-dim slice) of the merge launch's programs: one query head each, the
        [splits, slice] tile at 8192 values, up to 256 partials at once."""
        splits = min(256, max(2, next_pow2(max(self.chunks_per_head))))
        return splits, max(16, min(head_dim, 8192 // splits))


def _launch_table(chunks_per_head: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Per program: its KV head, then its chunk index; per KV head: its first program, then its program count."""
    head = [g for g, c in enumerate(chunks_per_head) for _ in range(c)]
    index = [i for c in chunks_per_head for i in range(c)]
    first = [sum(chunks_per_head[:g]) for g in range(len(chunks_per_head))]
    return torch.tensor(head + index + first + list(chunks_per_head), dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_cost(batch: int, tiles: list[int], chunk_tiles: int, block_n: int, resident: int, sms: int) -> float:
    """Modelled time of cutting heads into chunks of ``chunk_tiles`` tiles: programs run in waves of ``resident``
    (a program waiting for a slot doubles the time of its SM), slower when each SM holds too few of them, then the
    slowest merge."""
    chunks = [-(-t // chunk_tiles) for t in tiles]
    programs = batch * sum(chunks)
    waves = -(-programs // resident)
    speed = min(1.0, min(programs, resident) / (sms * PROGRAMS_PER_SM_FOR_FULL_SPEED))
    cost = waves * (chunk_tiles * block_n + PROGRAM_OVERHEAD_TOKENS) / speed
    if max(chunks) > FUSED_MERGE_MAX_CHUNKS:
        cost += SEPARATE_MERGE_TOKENS
    elif max(chunks) > 1:
        cost += MERGE_OVERHEAD_TOKENS + MERGE_TOKENS_PER_CHUNK * max(chunks)
    return cost


@functools.lru_cache(maxsize=256)
def decode_launch(
    batch: int,
    capacity: tuple[int, ...],
    device: torch.device,
    block_n: int | None = None,
    num_splits: int | None = None,
    programs: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    merge: str | None = None,
    chunk_tokens: int | None = None,
) -> DecodeLaunch:
    """The launch plan for ``batch`` rows over KV heads holding up to ``capacity[g]`` tokens, cached per shape.

    ``programs``: how many programs the GPU holds at once (default four per SM: at 4 warps, about 112 registers a
    thread and 39 KB of shared memory with 2 stages, four fit an H100/H200 SM). Chunks are whole ``block_n`` tiles,
    the same length for every head, chosen by :func:`_launch_cost`: one wave of programs when it can, since a
    program left for a second wave runs alone on its SM. Instead, ``num_splits`` cuts the largest head into that
    many chunks, ``chunk_tokens`` every head into chunks of that many tokens (whole tiles). ``merge``: "fused" (the
    last program of a head merges) or "separate"/None (a second launch; on the H200 the fused merge measured slower,
    18 vs 8 µs at batch 1 and 27.5 vs 24.5 µs at batch 8: scripts/results/decode_kernel_h200.md). Build it before capturing a CUDA graph (it copies its table to the device and zeroes its counters).
    """
    if merge not in (None, "fused", "separate"):
        raise ValueError(f"merge must be 'fused', 'separate' or None, got {merge!r}")
    interpret = interpreting()  # small tiles and few programs keep the CPU interpreter quick
    block_n = block_n or (16 if interpret else 64)
    tiles = [max(1, -(-cap // block_n)) for cap in capacity]
    if chunk_tokens is not None:
        chunk_tiles = max(1, -(-chunk_tokens // block_n))
    elif num_splits is not None:
        chunk_tiles = -(-max(tiles) // max(1, num_splits))
    else:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 132  # 132: an H100/H200, for compile checks
        resident = programs or (4 if interpret else 4 * sms)
        cost = functools.partial(_launch_cost, batch, tiles, block_n=block_n, resident=resident, sms=4 if interpret else sms)
        chunk_tiles = min(range(1, max(tiles) + 1), key=lambda c: (cost(chunk_tiles=c), -c))
    chunks = tuple(-(-t // chunk_tiles) for t in tiles)
    fused = merge == "fused" and max(chunks) > 1
    arrived = torch.zeros(batch * len(capacity), dtype=torch.int32, device=device)
    return DecodeLaunch(block_n, chunk_tiles * block_n, chunks, num_warps, num_stages, fused, _launch_table(chunks, device), arrived)
