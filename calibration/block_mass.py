"""True attention mass per block, and how much of it XAttention's block selection keeps (for threshold calibration).

The shared probe (``compressor.calibration.probe``) runs the model's attention normally and hands each layer's
q/k to the probe computes the exact softmax chunk by chunk (one query block at a time: memory linear in N),
sums it per (query block, key block), and compares it with the antidiagonal estimate's selection at given
thresholds. Nothing N x N is kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from compressor.calibration import probe as probes
from compressor.kernels.xattention_score import block_scores
from compressor.kernels.xattention_select import kept_counts, rank_blocks, visible_blocks

Probe = Callable[[int, torch.Tensor, torch.Tensor, float], None]  # (layer_idx, q, k, scale)


def true_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Exact causal softmax summed per block: float32 [q_heads, n_blocks, n_blocks] (each query contributes 1).

    q: [q_heads, tokens, dim]; k: [kv_heads, tokens, dim]. One query block at a time: memory q_heads x bs x N.
    """
    q_heads, tokens, dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    n = -(-tokens // block_size)
    qf = q.float().view(kv_heads, group, tokens, dim)
    kf = k.float()[:, None]
    out = torch.zeros(q_heads, n, n, dtype=torch.float32, device=q.device)
    keys = torch.arange(tokens, device=q.device)
    for i in range(n):
        r0, r1 = i * block_size, min(tokens, (i + 1) * block_size)
        s = torch.matmul(qf[:, :, r0:r1], kf[..., :r1, :].transpose(-1, -2)) * scale
        s = s.masked_fill(keys[None, :r1] > torch.arange(r0, r1, device=q.device)[:, None], -math.inf)
        p = torch.softmax(s, dim=-1).sum(dim=-2).reshape(q_heads, r1)  # [q_heads, keys]
        p = F.pad(p, (0, (i + 1) * block_size - r1))
        out[:, i, : i + 1] = p.view(q_heads, i + 1, block_size).sum(-1)
    return out


class BlockRanking:
    """One layer of one sequence: the selection order of the estimate and the true mass in that order.

    Built once; :meth:`evaluate` then gives coverage and density for any per-head thresholds cheaply."""

    def __init__(self, scores: torch.Tensor, mass: torch.Tensor, block_size: int) -> None:
        # scores: [1, heads, n_qb, n_kb] estimated; mass: [heads, n_qb, n_kb] true
        tokens = scores.shape[2] * block_size  # only the block grid matters for visibility at q_tokens == kv_tokens
        visible, forced = visible_blocks(1, tokens, tokens, block_size, None, None, True, scores.device)
        self.order, self.exclusive, self.n_forced, self.n_visible = rank_blocks(scores, visible, forced)
        sorted_mass = torch.gather(mass[None], -1, self.order)
        self.mass_cum = torch.cumsum(sorted_mass, dim=-1)  # [1, heads, n_qb, n_kb]
        self.total = mass.sum(dim=(-1, -2)).clamp_min(1e-12)  # [heads]
        self.visible_total = self.n_visible.sum(dim=(0, 2)).float()  # [heads]

    def evaluate(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coverage, density), each [heads]: true mass kept / total, and blocks kept / causal blocks. tau: [heads]."""
        count = kept_counts(self.exclusive, self.n_forced, self.n_visible, tau)
        kept = torch.gather(self.mass_cum, -1, (count - 1).clamp_min(0)[..., None])[..., 0] * (count > 0)
        coverage = kept.sum(dim=(0, 2)) / self.total
        density = count.sum(dim=(0, 2)).float() / self.visible_total
        return coverage, density

    def smallest_tau(self, target: float, steps: int = 24) -> torch.Tensor:
        """Per head, the smallest tau (to 2**-steps) whose selection keeps >= ``target`` of the true mass."""
        heads = self.total.shape[0]
        lo = torch.zeros(heads, device=self.total.device)
        hi = torch.ones(heads, device=self.total.device)  # tau = 1 keeps every causal block: coverage 1
        for _ in range(steps):
            mid = (lo + hi) / 2
            ok = self.evaluate(mid)[0] >= target
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        return hi


def layer_ranking(q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, block_size: int) -> BlockRanking:
    """Estimate and exact mass of one captured layer (q: [1, q_heads, N, d]; k: [1, kv_heads, N, d])."""
    scores = block_scores(q, k, stride=stride, block_size=block_size, causal=True, scale=scale)
    mass = true_block_mass(q[0], k[0], block_size, scale)
    return BlockRanking(scores, mass, block_size)


def run_probed(model: torch.nn.Module, input_ids: torch.Tensor, probe: Probe) -> None:
    """One forward of ``input_ids`` ([tokens]) with ``probe`` called on every layer's q/k and softmax scale."""

    def qk_probe(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> None:
        probe(idx, q, k, q.shape[-1] ** -0.5 if scaling is None else float(scaling))

    probes.run_probed(model, [input_ids], qk_probe, "XAttention calibration")
