"""The ``xattention`` attention method: per input, antidiagonal block scores pick each head's key blocks at prefill.

Pattern: ``XAttentionPattern(tau, stride, block_size)`` per query head. At prefill (more than one query) a layer
holding xattention heads scores its blocks (``compressor.kernels.xattention_score``), keeps per query block the
highest-scoring key blocks (``xattention_select``) until their share of the row's estimated mass reaches the
head's ``tau`` (sink block and diagonal block always), and runs block-sparse attention on those lists. Dense heads
of such a layer get tau = 1 (every causal block); window heads get full lists intersected with their own sink +
window rule. Decode (one query) stays dense.

Threshold search (recorded in the plan's ``search``):

1. Coverage calibration. On each calibration sample, for every layer and head, the exact causal softmax is summed
   per block (chunk by chunk, memory linear in N) and the estimate's block order is ranked once; the smallest
   tau whose kept blocks hold ``coverage`` (default 95%) of the true attention mass is found by binary search.
   A head's threshold is the maximum over samples (as in the public XAttention thresholds): it meets the target
   on every calibration sample.
2. Density budget (optional, ``density``). Each head's coverage and block density are also measured on a tau
   grid. The budget then lowers thresholds, never raises them above step 1's: a Lagrangian relaxation picks for
   each head the candidate tau minimising ``missed mass + lambda * density`` (candidates: grid values below the
   head's calibrated tau, and that tau itself), with lambda found by bisection as the smallest one whose average
   density is within the budget. Thresholds therefore fall first where density buys the least attention mass.
3. A last pass measures the chosen thresholds' coverage and density per head on the same samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from compressor.methods.registry import CompressionContext, MethodResult, register_method
from compressor.plan import ModelSignature, XAttentionPattern

DEFAULT_GRID = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]


@dataclass
class XAttentionConfig:
    """XAttention settings. coverage: share of the true attention mass each head's blocks must keep on the
    calibration samples; density: optional average block-density budget (None: coverage alone sets thresholds);
    tau_grid: candidate thresholds for the budget search; sequences run one at a time."""

    coverage: float = 0.95
    stride: int = 8
    block_size: int = 128
    density: float | None = None
    tau_grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))

    def __post_init__(self) -> None:
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.stride not in (4, 8, 16):
            raise ValueError(f"stride must be 4, 8 or 16, got {self.stride}")
        if self.block_size not in (64, 128):
            raise ValueError(f"block_size must be 64 or 128, got {self.block_size}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1] or null, got {self.density}")
        if not self.tau_grid or any(not 0.0 <= t <= 1.0 for t in self.tau_grid):
            raise ValueError(f"tau_grid must be a non-empty list of values in [0, 1], got {self.tau_grid}")




# ---------------------------------------------------------------------------------------------------------------
# Calibration and search.


@dataclass
class HeadStats:
    """Per (layer, head) accumulators over calibration samples."""

    tau: torch.Tensor  # [layers, heads] max over samples of the smallest tau reaching the coverage target
    grid_coverage: torch.Tensor  # [layers, heads, grid] summed over samples
    grid_density: torch.Tensor  # [layers, heads, grid]
    samples: int = 0


def calibrate(model: torch.nn.Module, input_ids: list[torch.Tensor], config: XAttentionConfig) -> HeadStats:
    """Step 1 of the search, and the grid curves for step 2 (module docstring)."""
    from compressor.calibration.block_mass import layer_ranking, run_probed

    sig = ModelSignature.of(model)
    layers, heads, grid = sig.num_hidden_layers, sig.num_attention_heads, torch.tensor(config.tau_grid)
    stats = HeadStats(torch.zeros(layers, heads), torch.zeros(layers, heads, len(grid)), torch.zeros(layers, heads, len(grid)))

    def probe(idx: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        ranking = layer_ranking(q, k, scale, config.stride, config.block_size)
        stats.tau[idx] = torch.maximum(stats.tau[idx], ranking.smallest_tau(config.coverage).cpu())
        for g, t in enumerate(grid.tolist()):
            cov, dens = ranking.evaluate(torch.full((heads,), t, device=q.device))
            stats.grid_coverage[idx, :, g] += cov.cpu()
            stats.grid_density[idx, :, g] += dens.cpu()

    for ids in input_ids:
        run_probed(model, ids, probe)
        stats.samples += 1
    stats.grid_coverage /= max(stats.samples, 1)
    stats.grid_density /= max(stats.samples, 1)
    return stats


def budget_thresholds(stats: HeadStats, grid: list[float], budget: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 2: per-head tau <= the calibrated one, minimising missed mass + lambda * density at average density
    <= ``budget`` (the calibrated tau's density is taken as its grid ceiling's, an upper bound)."""
    g = torch.tensor(grid)
    order = torch.argsort(g)
    g, cov, dens = g[order], stats.grid_coverage[..., order], stats.grid_density[..., order]
    # candidate c of head h: grid value g[c] if below the calibrated tau; the first value above stands for that tau
    ceiling = torch.searchsorted(g, stats.tau.contiguous(), right=False).clamp(max=len(g) - 1)  # [layers, heads]
    allowed = torch.arange(len(g))[None, None] <= ceiling[..., None]
    missed = 1.0 - cov

    def choose(lam: float) -> torch.Tensor:
        cost = torch.where(allowed, missed + lam * dens, torch.full_like(missed, math.inf))
        return cost.argmin(dim=-1)  # first minimum: the smaller tau on ties

    def mean_density(choice: torch.Tensor) -> float:
        return float(torch.gather(dens, -1, choice[..., None]).mean())

    lo, hi = 0.0, 1.0
    while mean_density(choose(hi)) > budget and hi < 1e6:
        hi *= 2
    choice = choose(0.0)
    if mean_density(choice) > budget:
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if mean_density(choose(mid)) <= budget else (mid, hi)
        choice = choose(hi)
    tau = torch.where(choice == ceiling, stats.tau, g[choice])
    info = {"lambda": hi if mean_density(choose(0.0)) > budget else 0.0, "grid_density": mean_density(choice),
            "feasible": mean_density(choice) <= budget,
            "grid_missed_mass": float(torch.gather(missed, -1, choice[..., None]).mean())}
    return tau, info


def measure(model: torch.nn.Module, input_ids: list[torch.Tensor], tau: torch.Tensor, config: XAttentionConfig):
    """Step 3: (coverage, density) per (layer, head) of thresholds ``tau`` [layers, heads], averaged over samples."""
    from compressor.calibration.block_mass import layer_ranking, run_probed

    coverage, density = torch.zeros_like(tau), torch.zeros_like(tau)

    def probe(idx: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        cov, dens = layer_ranking(q, k, scale, config.stride, config.block_size).evaluate(tau[idx].to(q.device))
        coverage[idx] += cov.cpu()
        density[idx] += dens.cpu()

    for ids in input_ids:
        run_probed(model, ids, probe)
    return coverage / max(len(input_ids), 1), density / max(len(input_ids), 1)


@register_method("attention", "xattention", XAttentionConfig)
def xattention_plan(ctx: CompressionContext, config: XAttentionConfig) -> MethodResult:
    """Calibrate per-head XAttention thresholds (coverage target, optional density budget)."""
    started = time.perf_counter()
    samples = [s.input_ids for s in ctx.calibration_samples]
    stats = calibrate(ctx.model, samples, config)
    calibrated_at = time.perf_counter()
    budget_info: dict[str, float] | None = None
    tau = stats.tau.clone()
    if config.density is not None:
        tau, budget_info = budget_thresholds(stats, config.tau_grid, config.density)
    coverage, density = measure(ctx.model, samples, tau, config)
    done = time.perf_counter()
    heads = [
        [XAttentionPattern(tau=round(float(t), 6), stride=config.stride, block_size=config.block_size,
                           expected_density=round(min(1.0, float(d)), 6)) for t, d in zip(tr, dr)]
        for tr, dr in zip(tau, density)
    ]
    search = {
        "coverage_target": config.coverage,
        "density_budget": config.density,
        "budget": budget_info,
        "measured": {"density": round(float(density.mean()), 6), "coverage": round(float(coverage.mean()), 6),
                     "min_head_coverage": round(float(coverage.min()), 6)},
        "calibrated_tau": [[round(float(t), 6) for t in row] for row in stats.tau],
        "coverage_per_head": [[round(float(c), 4) for c in row] for row in coverage],
    }
    calibration = {
        "samples": len(samples),
        "lengths": sorted({int(s.numel()) for s in samples}),
        "seconds": {"calibrate": round(calibrated_at - started, 2), "measure": round(done - calibrated_at, 2)},
    }
    return MethodResult(heads=heads, calibration=calibration, search=search)
