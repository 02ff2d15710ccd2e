"""The ``moa`` attention method (Mixture of Sparse Attention): a sink + elastic window per head, searched.

Each head gets ``sink`` tokens + ``window(N) = alpha + beta * N``, one (alpha, beta) rule per head (or per KV group)
from a candidate grid, or stays dense. Steps:

1. calibration samples whose answers the dense model regenerated (model alignment);
2. influence histograms per head at each calibration length (``compressor.calibration.influence``);
3. estimated loss increase per head and rule = influence outside the rule's mask;
4. a multiple-choice knapsack (``compressor.search``) per objective weighting: least summed loss with the average
   density <= ``density`` at every calibration length; with ``retrieval_dense``, also with the KV groups of highest
   copy score (retrieval heads, see ``compressor.calibration.influence``) held dense and the rest searched, and
   with ``window_floors``, also with no window below a floor;
5. each resulting plan is applied and scored by the real loss on held-out samples at ``score_length`` (longer than
   any profiled length where the model allows; every task's mean answer loss counts equally), and the best is kept;
6. optionally (``refine_rounds``), steps 2-5 again with the best plan applied while profiling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from compressor.calibration.data import RetrievalSample, calibration_samples
from compressor.calibration.influence import (
    INFLUENCE_KINDS,
    InfluenceProfile,
    loss_outside_window,
    merge_profiles,
    model_aligned_samples,
    profile_influence,
    scored_start,
)
from compressor.errors import CompressorError
from compressor.methods.registry import CompressionContext, MethodResult, register_method
from compressor.plan import AttentionLayerPlan, DensePattern, LayerPlan, ModelSignature, Pattern, Plan, WindowPattern


@dataclass
class MoAConfig:
    """MoA search settings. Rules: alpha in ``alpha_min..alpha_max`` step ``alpha_step`` (tokens), beta in
    ``0..1`` step ``1/beta_steps``, kept where ``1 <= window(N) <= N`` at every calibration length; plus dense.

    density: the average density bound at every calibration length. max_rules_per_layer: cap on distinct rules
    (dense counts as one) per layer; None = no cap. tie_kv_groups: one rule per KV group (None: on for GQA models).
    Candidate plans: one per (p in length_powers, s in density_scales, t in task_weights), minimising the estimated
    loss weighted by (N / longest N)^p per length under the budget s * density, each calibration sample's influence
    weighted by t[its task] (tasks not named: 1; e.g. ``{passkey: 4}`` makes retrieval answers count 4x).
    score_length: held-out length for choosing among plans (None: twice the longest calibration length, capped at the
    model's context; 0: do not score, keep the first plan).
    refine_rounds: after the search from the dense model's profile, profile again with the best plan so far applied
    and search again, this many times. First-order estimates taken at the dense model miss redundancy: when several
    heads can each retrieve the same far token, cutting any one of them alone costs little, so the dense profile
    cuts them all. At the sparse operating point the survivors' far keys carry the loss. refine_mix: the weight of
    the operating point's estimate against the dense one's (1: only the operating point). Every round's plans join
    the held-out scoring, so a round can only replace the plan if it measures better.
    retrieval_dense: fractions of the search items (KV groups when tied, else heads) kept dense, those with the
    highest copy score first; every variant is searched once per fraction. The first-order estimate prices a
    retrieval head's far keys at almost nothing (a confident answer has almost no gradient, and several heads can
    fetch it), so at low densities the search alone cuts every one of them; the held-out scoring decides how many
    to keep. Needs samples with answers (passkey, lines, ...) and ``dense_option``.
    window_floors: fractions of the shortest calibration length; every variant is also searched with only the rules
    whose window is at least that many tokens at every length (dense stays allowed). The estimate prices each head
    alone, so it finds many heads' far keys nearly free and gives them windows of a few dozen tokens; cut together,
    they cost far more (on SmolLM2 at 1k, a floor of 0.15 N with 14 groups held dense: +3.1% perplexity against
    +4.6% without; scripts/results/moa_smollm2_h200.md). The held-out scoring decides.
    """

    density: float = 0.5
    sink: int = 64
    alpha_min: int = -2048
    alpha_max: int = 8192
    alpha_step: int = 1024
    beta_steps: int = 8
    dense_option: bool = True
    max_rules_per_layer: int | None = None
    tie_kv_groups: bool | None = None
    influence: Literal["absolute", "signed", "row"] = "row"
    align_answers: bool = True
    answer_tokens: int = 16
    text_fraction: float = 0.25
    length_powers: list[float] = field(default_factory=lambda: [0.0, 1.0])
    density_scales: list[float] = field(default_factory=lambda: [1.0, 0.9])
    task_weights: list[dict[str, float]] = field(default_factory=lambda: [{}])
    score_length: int | None = None
    score_samples: int = 4
    solver_time_limit: float = 60.0
    solver_gap: float = 1e-3
    chunk: int = 128
    refine_rounds: int = 0
    refine_mix: float = 0.5
    retrieval_dense: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    window_floors: list[float] = field(default_factory=lambda: [0.0])

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0 tokens, got {self.sink}")
        if self.alpha_step < 1 or self.alpha_max < self.alpha_min:
            raise ValueError(
                f"alpha grid needs alpha_step >= 1 and alpha_max >= alpha_min, got {self.alpha_min}..{self.alpha_max} "
                f"step {self.alpha_step}"
            )
        if self.beta_steps < 1:
            raise ValueError(f"beta_steps must be >= 1 (beta grid 0..1 in 1/beta_steps), got {self.beta_steps}")
        if self.max_rules_per_layer is not None and self.max_rules_per_layer < 1:
            raise ValueError(f"max_rules_per_layer must be >= 1 or null, got {self.max_rules_per_layer}")
        if self.influence not in INFLUENCE_KINDS:
            raise ValueError(f"influence must be one of {', '.join(INFLUENCE_KINDS)}, got {self.influence!r}")
        if self.answer_tokens < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if not 0.0 < self.text_fraction <= 1.0:
            raise ValueError(f"text_fraction must be in (0, 1], got {self.text_fraction}")
        if not self.length_powers or not self.density_scales:
            raise ValueError("length_powers and density_scales each need at least one value (e.g. [0.0] and [1.0])")
        if not self.task_weights:
            raise ValueError("task_weights needs at least one weighting ({} weighs every task equally)")
        for weighting in self.task_weights:
            if not isinstance(weighting, dict) or any(
                not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in weighting.values()
            ):
                raise ValueError(f"each task_weights entry maps task names to weights >= 0, got {weighting!r}")
        if any(not 0.0 < s <= 1.0 for s in self.density_scales):
            raise ValueError(f"density_scales must lie in (0, 1] (plans never exceed the budget), got {self.density_scales}")
        if self.score_length is not None and self.score_length < 0:
            raise ValueError(f"score_length must be >= 0 tokens or null, got {self.score_length}")
        if self.score_samples < 1:
            raise ValueError(f"score_samples must be >= 1, got {self.score_samples}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 query, got {self.chunk}")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0, got {self.refine_rounds}")
        if not 0.0 < self.refine_mix <= 1.0:
            raise ValueError(f"refine_mix must be in (0, 1], got {self.refine_mix}")
        if not self.retrieval_dense or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0 for f in self.retrieval_dense
        ):
            raise ValueError(
                f"retrieval_dense must list fractions in [0, 1) (e.g. [0.0, 0.1]), got {self.retrieval_dense}"
            )
        if not self.window_floors or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0 for f in self.window_floors
        ):
            raise ValueError(f"window_floors must list fractions in [0, 1) (e.g. [0.0, 0.15]), got {self.window_floors}")
        if any(self.retrieval_dense) and not self.dense_option:
            raise ValueError(
                "retrieval_dense keeps heads dense, so it needs dense_option: true (or retrieval_dense: [0.0])"
            )


# ---------------------------------------------------------------------------------------------------------------
# Candidates and the knapsack built from profiles


def candidate_rules(config: MoAConfig, lengths: list[int]) -> list[Pattern]:
    """The rule grid kept where 1 <= window(N) <= N at every length, then dense (if allowed)."""
    rules: list[Pattern] = []
    for alpha in range(config.alpha_min, config.alpha_max + 1, config.alpha_step):
        for step in range(config.beta_steps + 1):
            beta = step / config.beta_steps
            if all(1 <= np.floor(alpha + beta * n) <= n for n in lengths):
                rules.append(WindowPattern(alpha=float(alpha), beta=beta, sink=config.sink))
    if config.dense_option:
        rules.append(DensePattern())
    if not rules:
        raise CompressorError(
            f"no window rule alpha in {config.alpha_min}..{config.alpha_max} step {config.alpha_step}, beta in 0..1 "
            f"step 1/{config.beta_steps} fits 1 <= window <= N at lengths {lengths}; widen the grid or set dense_option"
        )
    return rules


def rules_at_least(rules: list[Pattern], lengths: list[int], tokens: int) -> list[int]:
    """Indices of the rules whose window is at least ``tokens`` at every length (non-window rules always)."""
    return [i for i, r in enumerate(rules)
            if not isinstance(r, WindowPattern) or min(r.window_for_length(n) for n in lengths) >= tokens]


def estimated_loss(profiles: dict[int, InfluenceProfile], rules: list[Pattern], kind: str) -> np.ndarray:
    """[layers, q_heads, rules, lengths]: influence outside each rule's mask at each profiled length."""
    out = []
    for n, profile in profiles.items():
        windows = torch.tensor(
            [r.window_for_length(n) if isinstance(r, WindowPattern) else profile.absolute.shape[-1] + 1 for r in rules]
        )
        out.append(loss_outside_window(profile, windows, kind).numpy())
    return np.stack(out, axis=-1)


def rule_densities(rules: list[Pattern], lengths: list[int]) -> np.ndarray:
    """[rules, lengths] density of each rule at each length."""
    return np.array([[r.density(n) for n in lengths] for r in rules], dtype=np.float64)


@dataclass
class SearchOutcome:
    """One plan of the trade-off: its rules per (layer, head), weights and what it was estimated and measured at."""

    name: str
    length_weights: list[float]
    heads: list[list[Pattern]]
    estimated: dict[str, float]
    density: dict[str, float]
    solver: dict[str, object]
    budget: float = 0.0
    measured_loss: float | None = None
    task_weights: dict[str, float] = field(default_factory=dict)
    dense_items: list[int] = field(default_factory=list)
    measured_tasks: dict[str, float] = field(default_factory=dict)
    window_floor: int = 0

    def record(self) -> dict[str, object]:
        return {
            "name": self.name, "budget": self.budget, "length_weights": self.length_weights,
            "task_weights": self.task_weights, "retrieval_dense_items": self.dense_items,
            "window_floor": self.window_floor,
            "estimated_loss": self.estimated, "density": self.density, "measured_loss": self.measured_loss,
            "measured_tasks": self.measured_tasks, "solver": self.solver,
        }


def search_plan(
    loss: np.ndarray,
    rules: list[Pattern],
    lengths: list[int],
    density: float,
    length_weights: list[float],
    group: int,
    max_rules_per_layer: int | None,
    time_limit: float = 60.0,
    gap: float = 1e-3,
    dense_items: list[int] | tuple[int, ...] = (),
) -> tuple[list[list[Pattern]], dict[str, object]]:
    """Solve one MCKP: loss [layers, q_heads, rules, lengths] weighted per length; items are (layer, group of
    ``group`` consecutive query heads), numbered ``layer * (q_heads / group) + group index``. ``dense_items`` may
    only take the dense rule. Returns (patterns [layers][q_heads], solver record)."""
    from compressor.search import InfeasibleBudget, solve_mckp_detailed  # scipy: imported only when searching

    layers, heads, n_rules, n_lengths = loss.shape
    weights = np.asarray(length_weights or [1.0] * n_lengths, dtype=np.float64)
    if weights.shape != (n_lengths,):
        raise CompressorError(f"length_weights {length_weights} must give one weight per calibration length {lengths}")
    per_head = (loss * weights).sum(axis=-1)  # [layers, heads, rules]
    items = per_head.reshape(layers, heads // group, group, n_rules).sum(axis=2).reshape(-1, n_rules)
    dens = rule_densities(rules, lengths)  # [rules, lengths]
    weight = np.broadcast_to(dens[None] * (group / (layers * heads)), (items.shape[0], n_rules, n_lengths))
    groups = np.repeat(np.arange(layers), heads // group)
    allowed = None
    if len(dense_items):
        dense = [i for i, r in enumerate(rules) if isinstance(r, DensePattern)]
        if not dense:
            raise CompressorError("MoA: heads held dense (retrieval_dense) need the dense rule (dense_option: true)")
        allowed = np.ones((items.shape[0], n_rules), dtype=bool)
        allowed[list(dense_items)] = False
        allowed[list(dense_items), dense[0]] = True
    try:
        solution = solve_mckp_detailed(
            items, weight, np.full(n_lengths, density), allowed=allowed, groups=groups,
            max_distinct=max_rules_per_layer, time_limit=time_limit, gap=gap,
        )
    except InfeasibleBudget as err:
        raise CompressorError(f"MoA: density {density} cannot be met with these rules: {err}") from None
    choice = solution.choice.reshape(layers, heads // group)
    patterns = [[rules[int(choice[layer, h // group])] for h in range(heads)] for layer in range(layers)]
    record = {"status": solution.status, "seconds": round(solution.seconds, 3), "objective": solution.cost,
              "bound": solution.bound}
    return patterns, record


# ---------------------------------------------------------------------------------------------------------------
# Scoring plans by the real loss


def plan_from_heads(model: torch.nn.Module, heads: list[list[Pattern]]) -> Plan:
    """A Plan holding only these attention patterns."""
    return Plan(model=ModelSignature.of(model), layers=[LayerPlan(AttentionLayerPlan(list(h))) for h in heads])


def scored_samples(samples: list[RetrievalSample], text_fraction: float) -> list[RetrievalSample]:
    """Samples whose answer_start marks what is scored (plain text: its last ``text_fraction``)."""
    return [
        RetrievalSample(s.input_ids, scored_start(s, text_fraction), s.answer, s.task, s.depth, s.length)
        for s in samples
    ]


def measured_loss(
    model: torch.nn.Module, heads: list[list[Pattern]] | None, samples: list[RetrievalSample]
) -> tuple[float, dict[str, float]]:
    """Held-out loss with the patterns applied (None: the dense model): the mean over tasks of each task's mean
    answer-token loss, and those per-task losses. Per task, not per token: a plain-text sample scores hundreds of
    tokens and a passkey answer a handful, so a token mean would not see retrieval fail."""
    from compressor import runtime
    from compressor.evaluate import answer_loss

    if heads is not None:
        runtime.apply(model, plan_from_heads(model, heads))
    try:
        tasks = dict.fromkeys(s.task for s in samples)
        by_task = {t: answer_loss(model, [s for s in samples if s.task == t]) for t in tasks}
    finally:
        if heads is not None:
            runtime.remove(model)
    return float(np.mean(list(by_task.values()))), {t: round(v, 6) for t, v in by_task.items()}


def _score_length(config: MoAConfig, model: torch.nn.Module, lengths: list[int]) -> int:
    if config.score_length is not None:
        return config.score_length
    from compressor.models import max_context

    limit = max_context(model) or 2 * max(lengths)
    return min(2 * max(lengths), limit)


@register_method("attention", "moa", MoAConfig)
def moa_plan(ctx: CompressionContext, config: MoAConfig) -> MethodResult:
    """Calibrate, profile, search and select a heterogeneous elastic window per head (MoA)."""
    model = ctx.model
    sig = ModelSignature.of(model)
    cal = ctx.recipe.calibration
    lengths = sorted(set(cal.lengths))
    group = sig.num_attention_heads // sig.num_key_value_heads
    tie = group > 1 if config.tie_kv_groups is None else config.tie_kv_groups
    started = time.perf_counter()

    # Profiles depend only on these settings: methods of one run (e.g. several budgets) share them through ctx.cache.
    # They are kept per task, so that task weightings are mixed at search time without profiling again.
    key = ("moa-profiles", config.sink, config.text_fraction, config.align_answers, config.answer_tokens)
    if key not in ctx.cache:
        samples = ctx.calibration_samples
        if config.align_answers:
            samples = model_aligned_samples(model, samples, config.answer_tokens)
        aligned = time.perf_counter() - started
        by_task = {
            task: profile_influence(model, [s for s in samples if s.task == task], sink=config.sink,
                                    text_fraction=config.text_fraction, chunk=config.chunk)
            for task in dict.fromkeys(s.task for s in samples)
        }
        ctx.cache[key] = (samples, by_task, aligned, time.perf_counter() - started - aligned)
    samples, by_task, align_seconds, profile_seconds = ctx.cache[key]
    profiled_at = time.perf_counter()
    unknown = sorted({t for w in config.task_weights for t in w} - set(by_task))
    if unknown:
        raise CompressorError(
            f"MoA task_weights name {', '.join(map(repr, unknown))}, but the calibration samples hold only the tasks "
            f"{', '.join(map(repr, by_task))} (recipe calibration.source)"
        )
    lengths = sorted({n for profiles in by_task.values() for n in profiles})

    Profiles = dict[str, dict[int, InfluenceProfile]]  # per task, per length

    def weighted(profiled: Profiles, weighting: dict[str, float]) -> dict[int, InfluenceProfile]:
        return {
            n: merge_profiles([(by_n[n], float(weighting.get(task, 1.0)))
                               for task, by_n in profiled.items() if n in by_n])
            for n in lengths
        }

    profiles = weighted(by_task, {})  # every sample counted once: the dense loss and the records
    rules = candidate_rules(config, lengths)
    outcomes: list[SearchOutcome] = []
    skipped: list[dict[str, object]] = []
    # Retrieval heads: search items (KV groups when tied) ranked by their copy score, summed over lengths.
    item_size = group if tie else 1
    per_layer = sig.num_attention_heads // item_size
    copy = sum(p.copy for p in profiles.values())  # [layers, q_heads]
    copy_items = copy.reshape(sig.num_hidden_layers, per_layer, item_size).sum(-1).flatten().numpy()
    ranked = [int(i) for i in np.argsort(-copy_items, kind="stable")]
    held_dense = sorted({round(f * len(ranked)) for f in config.retrieval_dense})
    if held_dense != [0] and not (copy_items > 0).any():
        skipped.append({"retrieval_dense": config.retrieval_dense,
                        "reason": "no calibration sample has an answer to copy (add passkey or lines to the source)"})
        held_dense = [0]
    # window floors: the rules each variant may use (dense always), by floor in tokens at the shortest length
    floors = {tokens: rules_at_least(rules, lengths, tokens)
              for tokens in sorted({round(f * min(lengths)) for f in config.window_floors})}
    variants = [(p, s, t, k, f) for f in floors for k in held_dense for t in range(len(config.task_weights))
                for s in config.density_scales for p in config.length_powers]

    def search_round(losses: dict[int, np.ndarray], round_: int) -> None:
        """One search per variant on these loss tables (one per task weighting); appends to outcomes/skipped."""
        tag = f",refined={round_}" if round_ else ""
        for power, scale, t, k, floor in variants:
            weighting = config.task_weights[t]
            loss = losses[t]
            weights = [round((n / max(lengths)) ** power, 6) for n in lengths]
            dense_items = sorted(ranked[:k])
            keep = floors[floor]
            try:
                heads, solver = search_plan(
                    loss[:, :, keep], [rules[i] for i in keep], lengths, scale * config.density, weights, item_size,
                    config.max_rules_per_layer, config.solver_time_limit, config.solver_gap, dense_items=dense_items,
                )
            except CompressorError as err:
                if scale == max(config.density_scales) and not k and not floor:  # the recipe's own budget: say so
                    raise
                # a tighter trade-off point, more dense heads or a higher floor than the rules can reach: skip it
                skipped.append({"power": power, "budget": scale * config.density, "task_weights": dict(weighting),
                                "retrieval_dense": k, "window_floor": floor, "round": round_, "reason": str(err)})
                continue
            estimated = {
                str(n): float(sum(loss[l, h, rules.index(p), li] for l, row in enumerate(heads) for h, p in enumerate(row)))
                for li, n in enumerate(lengths)
            }
            plan = plan_from_heads(model, heads)
            name = f"power={power:g},budget={scale * config.density:.4g}"
            if weighting:
                name += ",tasks=" + "/".join(f"{task}:{v:g}" for task, v in sorted(weighting.items()))
            if k:
                name += f",retrieval={k}"
            if floor:
                name += f",floor={floor}"
            outcomes.append(SearchOutcome(name + tag, weights, heads, estimated,
                                          {str(n): round(plan.density(n), 6) for n in lengths}, solver,
                                          budget=scale * config.density, task_weights=dict(weighting),
                                          dense_items=dense_items, window_floor=floor))

    def task_losses(profiled: Profiles) -> dict[int, np.ndarray]:
        return {t: estimated_loss(weighted(profiled, w), rules, config.influence)
                for t, w in enumerate(config.task_weights)}

    dense_losses = task_losses(by_task)
    search_round(dense_losses, 0)
    if not outcomes:  # every variant held groups dense or floored its windows, and none fit the budget
        raise CompressorError(f"MoA: no plan fits density {config.density}: {skipped[-1]['reason']}; lower "
                              "retrieval_dense or window_floors, or add 0.0 to them")
    seconds = {"search": time.perf_counter() - profiled_at, "score": 0.0, "refine_profile": 0.0}

    score_length = _score_length(config, model, lengths)
    scoring: dict[str, object] = {"length": score_length, "unseen": score_length > max(lengths)}
    held: list[RetrievalSample] | None = None

    def score_all() -> int:
        """Measure every plan not measured yet (identical plans once); the index of the best so far."""
        nonlocal held
        began = time.perf_counter()
        distinct = {repr(o.heads): i for i, o in reversed(list(enumerate(outcomes)))}  # first index of each plan
        if score_length <= 0 or len(distinct) <= 1:
            return 0
        if held is None:
            held_key = ("moa-heldout", score_length, config.score_samples, config.align_answers, config.answer_tokens,
                        config.text_fraction)
            if held_key not in ctx.cache:  # held out from calibration by its seed; the dense loss is shared too
                fresh = calibration_samples(
                    cal.source, ctx.tokenizer, [score_length], config.score_samples, cal.seed + 1, chat=cal.chat
                )
                if config.align_answers:
                    fresh = model_aligned_samples(model, fresh, config.answer_tokens)
                fresh = scored_samples(fresh, config.text_fraction)
                ctx.cache[held_key] = (fresh, measured_loss(model, None, fresh))
            held, (scoring["dense_loss"], scoring["dense_tasks"]) = ctx.cache[held_key]
            scoring["samples"] = len(held)
        for index, o in enumerate(outcomes):
            if o.measured_loss is not None:
                continue
            first = distinct[repr(o.heads)]  # identical plans are measured once
            if first != index:
                o.measured_loss, o.measured_tasks = outcomes[first].measured_loss, outcomes[first].measured_tasks
            else:
                o.measured_loss, o.measured_tasks = measured_loss(model, o.heads, held)
            o.density[str(score_length)] = round(plan_from_heads(model, o.heads).density(score_length), 6)
        seconds["score"] += time.perf_counter() - began
        return min(range(len(outcomes)), key=lambda i: (outcomes[i].measured_loss, i))

    chosen = score_all()
    for round_ in range(1, config.refine_rounds + 1):
        began = time.perf_counter()
        at = outcomes[chosen].heads if score_length > 0 else outcomes[-1].heads
        by_task_at = {
            task: profile_influence(model, [s for s in samples if s.task == task], sink=config.sink,
                                    text_fraction=config.text_fraction, chunk=config.chunk, patterns=at)
            for task in by_task
        }
        at_losses = task_losses(by_task_at)
        seconds["refine_profile"] += time.perf_counter() - began
        began = time.perf_counter()
        mix = config.refine_mix
        search_round({t: (1.0 - mix) * dense_losses[t] + mix * at_losses[t] for t in dense_losses}, round_)
        seconds["search"] += time.perf_counter() - began
        chosen = score_all()

    calibration = {
        "samples": len(samples),
        "lengths": lengths,
        "aligned_answers": config.align_answers,
        "dense_loss": {str(n): round(p.loss, 6) for n, p in profiles.items()},
        "seconds": {"align": round(align_seconds, 2), "profile": round(profile_seconds, 2),
                    **{k: round(v, 2) for k, v in seconds.items()}},
    }
    search = {
        "rules": len(rules),
        "density_budget": config.density,
        "tied_kv_groups": tie,
        "max_rules_per_layer": config.max_rules_per_layer,
        "influence": config.influence,
        "refine_rounds": config.refine_rounds,
        "refine_mix": config.refine_mix,
        "window_floors": sorted(floors),
        "tasks": {task: {str(n): p.samples for n, p in profiles.items()} for task, profiles in by_task.items()},
        "scoring": scoring,
        "retrieval": {
            "dense_fractions": config.retrieval_dense, "dense_counts": held_dense, "item_heads": item_size,
            "ranked": [
                {"item": i, "layer": i // per_layer, "index": i % per_layer, "copy": round(float(copy_items[i]), 6)}
                for i in ranked[: max(held_dense) + 4]
            ],
        },
        "plans": [o.record() for o in outcomes],
        "skipped": skipped,
        "chosen": chosen,
    }
    return MethodResult(heads=outcomes[chosen].heads, calibration=calibration, search=search)
