"""Benchmark: XAttention on a Llama-3-8B-shaped layer (32 query heads, 8 KV heads, head dim 128, bf16, batch 1).

First a correctness check at a moderate length (Triton scores against the PyTorch reference: max abs error;
Triton selection against the reference selection: rows that differ). Then rows per length (16k, 64k, 128k):
dense causal SDPA (cuDNN, flash if cuDNN refuses) as the baseline; the Triton scoring kernel (stride 8, blocks
of 128) as a share of it, with the tile the autotuner picked; selection (Triton kernel, and the PyTorch
reference for comparison); and scoring + selection + the block-sparse kernel at fixed densities (10%, 25% of the
causal blocks: the top-scoring blocks of each row, sink and diagonal included).

    python scripts/bench_xattention.py --out scripts/results/xattention_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from compressor.kernels import xattention_score
from compressor.kernels.sparse_attention import sparse_attention
from compressor.kernels.xattention_score import xattention_scores, xattention_scores_reference
from compressor.kernels.xattention_select import rank_blocks, select_blocks, select_blocks_reference, visible_blocks
from provenance import git_commit

Q_HEADS, KV_HEADS, DIM, STRIDE, BLOCK = 32, 8, 128, 8, 128


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=30)


def layer_qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 q: [1, 32, n, 128], k, v: [1, 8, n, 128]."""
    q = torch.randn(1, Q_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def dense_sdpa(q, k, v):
    """cuDNN SDPA (K/V repeated for GQA outside the timed call), flash when cuDNN refuses; returns (fn, backend)."""
    kr, vr = (x.repeat_interleave(Q_HEADS // KV_HEADS, dim=1) for x in (k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        try:
            run()
            return run, backend.name
        except RuntimeError:
            continue
    raise RuntimeError("neither cuDNN nor flash SDPA runs here")


def fixed_density_lists(scores, density: float, tokens: int):
    """Block lists keeping the top ``density`` share of each row's causal blocks (at least sink + diagonal)."""
    b, h, nq, nk = scores.shape
    visible, forced = visible_blocks(b, tokens, tokens, BLOCK, None, None, True, scores.device)
    order, _, n_forced, n_visible = rank_blocks(scores, visible, forced)
    count = torch.maximum(torch.ceil(n_visible * density).long(), n_forced)
    kept = torch.arange(nk, device=scores.device) < count[..., None]
    index = torch.where(kept, order, torch.full_like(order, nk)).sort(-1).values
    return torch.where(index < nk, index, 0).int(), count.int()


def _tile_name(config) -> str:
    kw = config.kwargs
    cap = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_C']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}{cap}"


def tuned_tile() -> tuple[str, str]:
    """The scoring tile the autotuner chose last (BLOCK_M rows x BLOCK_C key tiles x BLOCK_K, warps, stages,
    register cap), and every tile's time (ms) when it was tuned; ("?", "") before any tuning."""
    tuner = xattention_score._kernels().scores_tuned
    config = getattr(tuner, "best_config", None)
    if config is None:
        return "?", ""
    timings = getattr(tuner, "configs_timings", None) or {}
    first = lambda t: t[0] if isinstance(t, (list, tuple)) else t  # noqa: E731
    tried = ", ".join(f"{_tile_name(c)}: {first(t):.3f}" for c, t in sorted(timings.items(), key=lambda x: first(x[1])))
    return _tile_name(config), tried


def check(n: int) -> list[str]:
    """Triton against the references at length n: scores (max abs error) and selection (rows that differ)."""
    q, k, _ = layer_qkv(n)
    got = xattention_scores(q, k, stride=STRIDE, block_size=BLOCK)
    want = xattention_scores_reference(q, k, stride=STRIDE, block_size=BLOCK)
    err = (got - want).abs().max().item()
    tau = torch.linspace(0.5, 1.0, Q_HEADS, device="cuda")
    kw = dict(q_tokens=n, kv_tokens=n, block_size=BLOCK)
    index, count = select_blocks(want, tau, **kw)
    ref_index, ref_count = select_blocks_reference(want, tau, **kw)
    differ = ((index != ref_index).any(-1) | (count != ref_count)).sum().item()
    line = (f"- check at N={n}: scores max abs error {err:.2e} (row sums up to {want.sum(-1).max().item():.0f}); "
            f"selection rows differing from the reference: {differ} of {count.numel()}")
    print(line, flush=True)
    return [line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="scripts/results/xattention_h200.md")
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--check-length", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    notes = check(args.check_length)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        q, k, v = layer_qkv(n)
        dense, backend = dense_sdpa(q, k, v)
        t_dense = ms(dense)
        score = lambda: xattention_scores(q, k, stride=STRIDE, block_size=BLOCK)  # noqa: E731
        scores = score()  # autotunes on the first call of each size class
        t_score = ms(score)
        tau = torch.full((Q_HEADS,), 0.9, device="cuda")
        kw = dict(q_tokens=n, kv_tokens=n, block_size=BLOCK)
        t_select = ms(lambda: select_blocks(scores, tau, **kw))
        t_select_ref = ms(lambda: select_blocks_reference(scores, tau, **kw))
        rows.append(f"| {n} | dense SDPA ({backend}) | {t_dense:.2f} | 1.00x | |")
        tile, tried = tuned_tile()
        notes.append(f"- autotuned scoring tiles at N={n} (ms): {tried}")
        print(notes[-1], flush=True)
        rows.append(f"| {n} | scoring (S={STRIDE}) | {t_score:.3f} | {t_score / t_dense:.1%} of dense | tile {tile} |")
        rows.append(f"| {n} | selection (tau=0.9) | {t_select:.3f} | {t_select / t_dense:.1%} of dense | "
                    f"PyTorch reference {t_select_ref:.3f} ms |")
        print(*rows[-3:], sep="\n", flush=True)
        for density in (0.10, 0.25):
            index, count = fixed_density_lists(scores, density, n)
            n_visible = rank_blocks(scores, *visible_blocks(1, n, n, BLOCK, None, None, True, "cuda"))[3]
            real = float(count.float().sum() / n_visible.float().sum())
            sparse = lambda: sparse_attention(q, k, v, block_index=index, block_count=count, block_size=BLOCK)  # noqa: E731
            t_sparse = ms(sparse)
            total = t_score + t_select + t_sparse
            rows.append(f"| {n} | score+select+sparse @ {density:.0%} | {total:.2f} | {t_dense / total:.2f}x | "
                        f"kernel alone {t_sparse:.2f} ms ({t_dense / t_sparse:.2f}x), real density {real:.1%} |")
            print(rows[-1], flush=True)
        del q, k, v, scores
        torch.cuda.empty_cache()
    commit = git_commit()
    text = "\n".join([
        "# XAttention speed on a Llama-3-8B-shaped layer",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.date.today()}, GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, commit {commit}",
        f"- layer: {Q_HEADS} query heads, {KV_HEADS} KV heads, head dim {DIM}, bf16, batch 1, causal; stride {STRIDE}, "
        f"blocks of {BLOCK}. Times: triton.testing.do_bench means (ms).",
        *notes,
        "",
        "| N | what | ms | vs dense | notes |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
