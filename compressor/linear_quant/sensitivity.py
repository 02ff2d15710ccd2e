"""Metric-decoupled mixed precision: what quantizing each linear layer alone costs on two metrics (KL of next-token
distributions on natural text, loss on answer tokens of retrieval tasks), and the choice of one precision per layer
under a budget with the exact multiple-choice knapsack of ``compressor.search``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.linear_quant.apply import quantize_modules
from compressor.linear_quant.balance import fold_layer_balancing
from compressor.linear_quant.formats import fitting_precision, precision
from compressor.memory import release_host_memory


@dataclass
class Sensitivity:
    """Per item (``layer``, ``module``) and precision: KL on text and answer-loss increase when quantized alone."""

    items: list[tuple[int, str]]
    params: list[int]
    precisions: list[str]
    kl: np.ndarray  # [items, precisions]
    answer: np.ndarray  # [items, precisions]
    in_features: list[int] | None = None  # per item; decides the int4 group that fits and the per-channel scale cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "precisions": self.precisions,
            "layers": [
                {"layer": i, "module": m, "params": p, "in_features": self._in_features()[k],
                 "kl": [round(float(v), 6) for v in self.kl[k]], "answer_loss": [round(float(v), 6) for v in self.answer[k]]}
                for k, ((i, m), p) in enumerate(zip(self.items, self.params))
            ],
        }

    def _in_features(self) -> list[int]:
        return self.in_features or [0] * len(self.items)


def _settings_alone(settings: dict[str, dict[str, Any]], module: str, prec: str) -> dict[str, dict[str, Any]]:
    """The layer's settings with only ``module`` quantized (at ``prec``); the others keep their (exact) folds."""
    out = {}
    for name, s in settings.items():
        s = dict(s, precision=prec if name == module else "bf16")
        if name != module and "online" in (s.get("rotate") or {}):
            s.pop("rotate")  # an online rotation is exact only with its run-time half: drop it on float layers
        out[name] = s
    return out


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layer_list: nn.ModuleList,
    settings: list[dict[str, dict[str, Any]]],
    precisions: list[str],
    text: torch.Tensor,
    answers: list[Any],
) -> Sensitivity:
    """Quantize each planned linear layer alone at each precision and measure both metrics against the dense model.

    ``text: [samples, tokens]`` ids; ``answers``: retrieval samples (``input_ids``, ``answer_start``).
    """
    device = next(model.parameters()).device

    def text_logprobs() -> torch.Tensor:
        return F.log_softmax(model(input_ids=text.to(device), use_cache=False).logits.float(), dim=-1)

    def answer_loss() -> float:
        total, count = 0.0, 0
        for s in answers:
            ids = s.input_ids.reshape(1, -1).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, s.answer_start - 1 : -1].float()
            total += float(F.cross_entropy(logits, ids[0, s.answer_start :], reduction="sum"))
            count += ids.shape[1] - s.answer_start
        return total / max(count, 1)

    dense_lp = text_logprobs()
    dense_answer = answer_loss() if answers else 0.0
    items = [(i, m) for i, layer_settings in enumerate(settings) for m in layer_settings]
    params, in_features, kl, ans = [], [], np.zeros((len(items), len(precisions))), np.zeros((len(items), len(precisions)))
    for k, (i, m) in enumerate(items):
        original = layer_list[i]
        params.append(original.get_submodule(m).weight.numel())
        in_features.append(original.get_submodule(m).in_features)
        for c, name in enumerate(precisions):
            if not precision(name).quantized:
                continue
            prec = fitting_precision(name, in_features[-1])
            trial = copy.deepcopy(original)
            quantize_modules(trial, fold_layer_balancing(trial, _settings_alone(settings[i], m, prec)))
            layer_list[i] = trial
            try:
                lp = text_logprobs()
                kl[k, c] = float((dense_lp.exp() * (dense_lp - lp)).sum(-1).mean())
                ans[k, c] = max(0.0, answer_loss() - dense_answer) if answers else 0.0
            finally:
                layer_list[i] = original
        release_host_memory()
    return Sensitivity(items, params, precisions, kl, ans, in_features)


def precision_costs(sens: Sensitivity) -> tuple[np.ndarray, np.ndarray]:
    """(cost [items, precisions], sensitive [items, precisions]): each metric normalised by its mean over the
    quantized choices, summed; ``sensitive`` marks choices far above the typical cost on either metric."""
    quantized = np.array([precision(p).quantized for p in sens.precisions])
    norm = []
    for metric in (sens.kl, sens.answer):
        scale = float(metric[:, quantized].mean()) if quantized.any() else 0.0
        norm.append(metric / scale if scale > 0 else np.zeros_like(metric))
    return norm[0] + norm[1], np.maximum(norm[0], norm[1])


def budget_weights(sens: Sensitivity, budget: str) -> tuple[np.ndarray, float]:
    """Per item and precision the budget load (``bits``: stored weight bits, scales included; ``memory``: bytes;
    ``latency``: predicted relative time), and the load of the all-bf16 model (the unit of ``budget_value`` for memory
    and latency). Each item is costed at the precision it will really get (:func:`fitting_precision`), so the bits
    the solver sums are the bits :func:`compressor.linear_quant.apply.average_weight_bits` reports."""
    p = np.array(sens.params, dtype=np.float64)[:, None]
    fit = [[fitting_precision(n, f) if f else n for n in sens.precisions] for f in sens._in_features()]
    if budget in ("bits", "memory"):
        per = np.array([[precision(n).weight_bits(f or None) for n in row] for row, f in zip(fit, sens._in_features())])
        return (p * per / p.sum(), 16.0) if budget == "bits" else (p * per / 16.0 / p.sum(), 1.0)
    per = np.array([[precision(n).relative_latency for n in row] for row in fit])
    return p * per / p.sum(), 1.0


def choose_precisions(
    sens: Sensitivity, budget: str, budget_value: float, sensitive_factor: float, pareto_points: int = 6
) -> tuple[list[str], dict[str, Any]]:
    """One precision per item minimising the summed cost under the budget; sensitive choices are not allowed.

    Returns (precision per item, search record with the chosen point and the Pareto set over budgets).
    """
    from compressor.search import solve_mckp

    cost, worst = precision_costs(sens)
    allowed = worst <= sensitive_factor
    bf16 = [c for c, p in enumerate(sens.precisions) if not precision(p).quantized]
    allowed[:, bf16] = True
    load, _ = budget_weights(sens, budget)

    def solve(value: float) -> np.ndarray:
        return np.asarray(solve_mckp(cost, load[:, :, None], np.array([value]), allowed))

    def point(choice: np.ndarray, value: float) -> dict[str, Any]:
        rows = np.arange(len(choice))
        bits, _ = budget_weights(sens, "bits")
        return {
            "budget": round(float(value), 4), "cost": round(float(cost[rows, choice].sum()), 6),
            "avg_bits": round(float(bits[rows, choice].sum()), 4),
            "kl": round(float(sens.kl[rows, choice].sum()), 6), "answer_loss": round(float(sens.answer[rows, choice].sum()), 6),
            "counts": {p: int((choice == c).sum()) for c, p in enumerate(sens.precisions)},
        }

    choice = solve(budget_value)
    lo = float(np.where(allowed, load, np.inf).min(axis=1).sum())
    hi = float(load.max(axis=1).sum())
    pareto = []
    for value in np.linspace(lo, hi, max(2, pareto_points)):
        pt = point(solve(value * (1 + 1e-9)), value)
        if not pareto or pt["cost"] < pareto[-1]["cost"] - 1e-12:
            pareto.append(pt)
    names = [sens.precisions[c] for c in choice]
    record = {"budget": budget, "budget_value": budget_value, "sensitive_factor": sensitive_factor,
              "chosen": point(choice, budget_value), "pareto": pareto, "disallowed": int((~allowed).sum())}
    return names, record
