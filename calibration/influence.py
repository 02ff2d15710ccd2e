"""Attention influence profiles: how much the loss would rise if a head stopped seeing keys at a given distance.

MoA's first-order estimate for masking attention entry (i, j) and renormalising row i is

    influence[i, j] = -A[i, j] * (G[i, j] - sum_k A[i, k] G[i, k]) / (1 - A[i, j]),   G = dL/dA.

Since O = A V, ``G[i, j] = dO[i] . V[j]``: one forward + backward saves q, k, v (after RoPE) and dO per layer, then
A and G are recomputed one chunk of queries at a time and the influence is summed into a per-head histogram over
query-key distance (plus one bucket for sink keys). Nothing of size N x N is ever held: peak memory grows with N.

A sink + window head at length N drops exactly the non-sink entries at distance >= window(N), so the estimated
loss increase of a rule is a suffix sum of the histogram (:func:`loss_outside_window`).

Summing |influence| entry by entry (MoA's choice) counts every small, mutually cancelling contribution of a diffuse
head as loss. The ``row`` kind estimates each query row's change as a whole instead: dropping the set S of a row
(renormalising what is left) changes the output by (m O - sum_S A_j V_j) / (1 - m), m = sum_S A_j, so to first order
the loss changes by  -sum_S A_j (G_j - E) / (1 - m),  E = sum_k A_k G_k.  For every cut-off distance w the pass sums
|that| over rows, S being the row's non-sink keys at distance >= w: a [layers, q_heads, tokens + 1] table indexed by
the window itself, not a histogram to sum.

First-order estimates see little of retrieval: a confidently retrieved answer has a near-zero loss gradient, and
several heads can each fetch it (cutting any one alone costs nothing). The same pass therefore records each head's
*copy score* on samples with an answer: the attention mass its answer rows put on earlier prompt tokens equal to the
token being produced (the retrieval-head score of retrieval-head studies, DuoAttention's motivation). MoA uses it to
keep the top-ranked KV groups dense (``compressor.methods.moa``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from compressor.calibration.data import RetrievalSample
from compressor.calibration.probe import require_plain_causal
from compressor.errors import CompressorError

PROFILE_ATTENTION = "compressor_influence"
RECALL_DISTANCE = 128  # a default for diagnostics: text copies at least this far back count as long-range recall


@dataclass
class InfluenceProfile:
    """Influence at one input length, averaged over samples.

    ``length`` is the samples' nominal length (a model-aligned answer may add or drop a few tokens: the histograms
    span the longest sample). by_distance: [layers, q_heads, tokens] float64, summed over (query, key) entries with key >= sink, indexed by
    distance ``query - key``; sink: [layers, q_heads], entries with key < sink. ``absolute`` sums |influence|
    (MoA's choice), ``signed`` keeps the sign (kept side by side, one pass gives both). row_cut: [layers, q_heads,
    tokens + 1], the row-wise estimate of dropping every non-sink key at distance >= w, indexed by w (the
    ``row`` kind; see the module docstring). copy: [layers, q_heads], the mean copy score of the samples
    (:func:`copy_attention`; 0 for samples without an answer). recall: [layers, q_heads], the mean text-form copy
    score of the plain-text samples (earlier copies at least ``recall_distance`` tokens back; 0 for the others, and
    everywhere unless profiled with a ``recall_distance``: MoA does not use it, scripts/eval_moa_ranking.py does).
    """

    length: int
    sink: int
    samples: int
    absolute: torch.Tensor
    signed: torch.Tensor
    sink_absolute: torch.Tensor
    sink_signed: torch.Tensor
    loss: float  # mean dense loss of the profiled samples
    row_cut: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    copy: torch.Tensor | None = None
    recall: torch.Tensor | None = None

    def by_distance(self, kind: str = "absolute") -> torch.Tensor:
        """[layers, q_heads, length] histogram of the chosen kind ("absolute" or "signed")."""
        if kind not in ("absolute", "signed"):
            raise ValueError(f"influence histogram kind must be 'absolute' or 'signed', got {kind!r}")
        return self.absolute if kind == "absolute" else self.signed

    def __repr__(self) -> str:
        layers, heads, _ = self.absolute.shape
        return (
            f"InfluenceProfile(length={self.length}, sink={self.sink}, samples={self.samples}, "
            f"layers={layers}, heads={heads}, loss={self.loss:.4f})"
        )


INFLUENCE_KINDS = ("absolute", "signed", "row")


def loss_outside_window(profile: InfluenceProfile, windows: torch.Tensor, kind: str = "absolute") -> torch.Tensor:
    """Estimated loss increase per (layer, head) and rule: influence at distances >= window (sink keys are kept).

    windows: [rules] int tokens (1..length) -> [layers, q_heads, rules] float64.
    """
    if kind == "row":
        if profile.row_cut is None:
            raise CompressorError("this influence profile has no row-wise table; profile again to use influence: row")
        return profile.row_cut[..., windows.to(torch.int64).clamp(1, profile.row_cut.shape[-1] - 1)]
    hist = profile.by_distance(kind)
    # suffix[d] = sum of hist[d:], with suffix[length] = 0
    suffix = torch.flip(torch.cumsum(torch.flip(hist, dims=[-1]), dim=-1), dims=[-1])
    suffix = F.pad(suffix, (0, 1))
    index = windows.to(torch.int64).clamp(1, hist.shape[-1])
    return suffix[..., index]


# ---------------------------------------------------------------------------------------------------------------
# Model-aligned calibration targets


@torch.no_grad()
def model_aligned_samples(
    model: torch.nn.Module, samples: Iterable[RetrievalSample], max_new_tokens: int = 16
) -> list[RetrievalSample]:
    """Replace each retrieval sample's answer with the dense model's own greedy answer (MoA's model alignment).

    Plain-text samples (answer_start == 0) are returned unchanged. Generation stops at the model's EOS token.
    """
    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = []
    for sample in samples:
        if sample.answer_start <= 0:
            out.append(sample)
            continue
        prompt = sample.input_ids[: sample.answer_start].to(device)[None]
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=next(iter(eos_ids), 0),
        )[0, prompt.shape[1]:].cpu()
        answer = []
        for token in generated.tolist():  # keep the EOS: ending the answer is part of what the model does
            answer.append(token)
            if token in eos_ids:
                break
        if not answer:
            out.append(sample)
            continue
        ids = torch.cat([sample.input_ids[: sample.answer_start], torch.tensor(answer, dtype=torch.long)])
        out.append(
            # ``length`` stays the nominal one: profiles group samples by it
            RetrievalSample(ids, sample.answer_start, sample.answer, sample.task, sample.depth, sample.length)
        )
    return out


def scored_start(sample: RetrievalSample, text_fraction: float) -> int:
    """First scored token: the answer for retrieval samples, the last ``text_fraction`` of a plain-text sample."""
    tokens = int(sample.input_ids.shape[0])
    if sample.answer_start > 0:
        return sample.answer_start
    return max(1, tokens - max(1, int(round(tokens * text_fraction))))


# ---------------------------------------------------------------------------------------------------------------
# Capture: an attention function that computes attention normally and keeps what the influence pass needs.


def capturing_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention through SDPA that stores (q, k, v, output) on ``module.influence_capture`` and retains the
    output's gradient. query: [batch, q_heads, tokens, dim]; key/value: [batch, kv_heads, tokens, dim] (GQA)."""
    require_plain_causal(module, kwargs, "influence profiling")
    if query.shape[0] != 1 or (attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())):
        raise CompressorError("influence profiling runs one unpadded sequence at a time")
    group = query.shape[1] // key.shape[1]
    # The K/V repeat is only for this SDPA call (linear in length); the stored K/V stay per KV head.
    k_rep = key.repeat_interleave(group, dim=1) if group > 1 else key
    v_rep = value.repeat_interleave(group, dim=1) if group > 1 else value
    store = getattr(module, "influence_capture", None)
    pattern = None if store is None else store.get("pattern")
    if pattern is None:
        out = F.scaled_dot_product_attention(query, k_rep, v_rep, is_causal=True, scale=scaling)
    else:
        out = windowed_attention(query, k_rep, v_rep, *pattern, scale=scaling)
    if store is not None and out.requires_grad:
        out.retain_grad()
        store["q"], store["k"], store["v"], store["out"] = query.detach(), key.detach(), value.detach(), out
        store["scale"] = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROFILE_ATTENTION, capturing_attention)


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sink: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Causal attention with per-head sink + window (the plan's patterns), differentiable, in linear memory.

    query/key/value: [1, heads, tokens, dim] (K/V already one per query head); sink/alpha/beta: [heads] as in
    :func:`compressor.kernels.reference.sparse_attention_reference` (dense heads: alpha = inf). Each chunk of queries
    runs under activation checkpointing, so backward recomputes its scores instead of keeping them: what is saved
    grows with the length, not its square.
    """
    from torch.utils.checkpoint import checkpoint

    from compressor.kernels.reference import visible_mask, window_sizes

    tokens = query.shape[2]
    device = query.device
    length = torch.tensor([tokens], device=device)
    window = window_sizes(alpha.to(device), beta.to(device), length)  # [1, heads]
    sink = sink.to(device, torch.int64)
    if bool((window >= tokens).all()):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    bounds = torch.zeros(1, dtype=torch.int64, device=device), length

    def part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c0: int) -> torch.Tensor:
        rows = torch.arange(c0, c0 + q.shape[2], device=device)
        mask = visible_mask(rows, torch.arange(k.shape[2], device=device), sink=sink, window=window,
                            kv_start=bounds[0], kv_end=bounds[1], causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    outs = []
    for c0 in range(0, tokens, chunk):
        c1 = min(tokens, c0 + chunk)
        args = (query[:, :, c0:c1], key[:, :, :c1], value[:, :, :c1], c0)
        outs.append(checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return torch.cat(outs, dim=2)


def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    from compressor.attention_layers import attention_modules

    modules = attention_modules(model)
    if not modules:
        raise CompressorError(f"{type(model).__name__} has no attention modules with a layer_idx: cannot profile it")
    return modules


# ---------------------------------------------------------------------------------------------------------------
# The influence pass: chunk by chunk of queries, never N x N.


def accumulate_layer_influence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    scale: float,
    sink: int,
    absolute: torch.Tensor,
    signed: torch.Tensor,
    sink_absolute: torch.Tensor,
    sink_signed: torch.Tensor,
    chunk: int = 128,
    row_cut: torch.Tensor | None = None,
) -> None:
    """Add one sequence's causal influence for one layer into the histograms, in place.

    q, d_out: [q_heads, tokens, dim]; k, v: [kv_heads, tokens, dim]; absolute/signed: [q_heads, tokens] float64
    (by distance, keys >= sink); sink_absolute/sink_signed: [q_heads]; row_cut: [q_heads, tokens + 1] float64 (by
    cut-off distance) or None. Work memory: a few q_heads x chunk x tokens tensors.
    """
    q_heads, tokens, dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    qf = q.float().view(kv_heads, group, tokens, dim)
    of = d_out.float().view(kv_heads, group, tokens, v.shape[-1])
    kf, vf = k.float()[:, None], v.float()[:, None]  # [kv_heads, 1, tokens, dim]: broadcast over the group
    keys = torch.arange(tokens, device=q.device)
    for c0 in range(0, tokens, chunk):
        c1 = min(tokens, c0 + chunk)
        rows = torch.arange(c0, c1, device=q.device)
        distance = rows[:, None] - keys[None, :c1]  # [C, c1]
        visible = distance >= 0
        scores = torch.matmul(qf[:, :, c0:c1], kf[:, :, :c1].transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)  # A: [kv, g, C, c1]
        grads = torch.matmul(of[:, :, c0:c1], vf[:, :, :c1].transpose(-1, -2))  # G = dO . V
        expected = (probs * grads).sum(dim=-1, keepdim=True)
        rest = 1.0 - probs
        # A -> 1 only where a row has one visible key (distance 0, always kept); guard the division there.
        influence = torch.where(rest > 1e-6, -probs * (grads - expected) / rest.clamp_min(1e-6), torch.zeros_like(probs))
        influence = influence.reshape(q_heads, c1 - c0, c1)
        in_sink = keys[None, :c1] < sink
        sink_part = influence[:, :, :sink] if sink > 0 else influence[:, :, :0]
        sink_signed += sink_part.sum(dim=(1, 2)).double()
        sink_absolute += sink_part.abs().sum(dim=(1, 2)).double()
        body = influence.masked_fill((in_sink | ~visible)[None], 0.0)
        index = distance.clamp_min(0).reshape(1, -1).expand(q_heads, -1)
        flat = body.reshape(q_heads, -1)
        signed.scatter_add_(1, index, flat.double())
        absolute.scatter_add_(1, index, flat.abs().double())
        if row_cut is not None:
            # Row-wise: key j at distance w = i - j >= 1 is the last dropped key of the cut "distance >= w", so
            # prefix sums over keys (from the first non-sink key) give each cut's change and dropped mass.
            dropped = (in_sink | (distance < 1))[None]
            change = torch.cumsum((-probs * (grads - expected)).reshape(q_heads, c1 - c0, c1).masked_fill(dropped, 0.0), -1)
            mass = torch.cumsum(probs.reshape(q_heads, c1 - c0, c1).masked_fill(dropped, 0.0), -1)
            cut = (change.abs() / (1.0 - mass).clamp_min(1e-3)).masked_fill(dropped, 0.0)
            row_cut.scatter_add_(1, index, cut.reshape(q_heads, -1).double())


def copy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    ids: torch.Tensor,
    start: int,
    sink: int,
    min_distance: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """[q_heads] copy score of one layer: the mean, over the rows ``start - 1 .. N - 2`` (row i predicts token i + 1),
    of the causal attention mass on earlier keys holding the token that row predicts.

    Answer form (``min_distance`` None): the keys are the prompt, ``sink <= j < start``. Text form (an int): every key
    ``sink <= j <= i - min_distance``, i.e. the row's earlier copies of its next token at least that far back, which
    a window of that length no longer shows (induction-style copying, where plain text's long context pays off).
    q: [q_heads, N, dim]; k: [kv_heads, N, dim] (GQA); ids: [N]. Sink keys are left out (every plan keeps them).
    Work memory: q_heads x ``chunk`` rows x N.
    """
    q_heads, tokens, dim = q.shape
    kv_heads = k.shape[0]
    first = max(start - 1, 0)
    total = torch.zeros(q_heads, dtype=torch.float64, device=q.device)
    if first >= tokens - 1 or (min_distance is None and start <= sink):
        return total
    keys = torch.arange(tokens, device=q.device)
    ids = ids.to(q.device)
    kf = k.float()[:, None].transpose(-1, -2)  # [kv, 1, dim, N]
    for r0 in range(first, tokens - 1, chunk):
        rows = torch.arange(r0, min(r0 + chunk, tokens - 1), device=q.device)
        qs = q[:, rows].float().view(kv_heads, q_heads // kv_heads, rows.numel(), dim)
        scores = torch.matmul(qs, kf) * scale  # [kv, g, R, N]
        probs = torch.softmax(scores.masked_fill(keys[None, :] > rows[:, None], -math.inf), dim=-1)
        match = (ids[None, :] == ids[rows + 1][:, None]) & (keys[None, :] >= sink)  # [R, N]
        if min_distance is None:
            match &= keys[None, :] < start
        else:
            match &= keys[None, :] <= rows[:, None] - min_distance
        total += (probs * match).sum(-1).reshape(q_heads, -1).sum(-1).double()
    return total / (tokens - 1 - first)


def profile_sample(
    model: torch.nn.Module,
    sample: RetrievalSample,
    sink: int,
    text_fraction: float = 0.25,
    chunk: int = 128,
    patterns: list[list[object]] | None = None,
    recall_distance: int | None = None,
) -> tuple[InfluenceProfile, float]:
    """Influence histograms of one sequence (one forward + backward, then the chunked pass); returns (profile, loss).

    ``patterns`` (per layer, per query head, e.g. a searched plan's): run the forward and backward with those sink +
    window patterns applied, so that the estimates are taken at that operating point rather than at the dense model.
    The table still prices each cut against the head's dense row, but with the activations and gradients of the
    sparse model: a head whose far keys only matter once other heads have lost theirs (redundant retrieval heads)
    can show it there, not at the dense model.
    """
    modules = _attention_modules(model)
    layers = len(modules)
    device = next(model.parameters()).device
    ids = sample.input_ids.to(device)[None]
    tokens = ids.shape[1]
    start = scored_start(sample, text_fraction)
    previous = model.config._attn_implementation
    grads_were = [p.requires_grad for p in model.parameters()]
    stores: dict[int, dict[str, object]] = {idx: {} for idx in modules}
    try:
        for p in model.parameters():  # gradients w.r.t. activations only
            p.requires_grad_(False)
        if patterns is not None:
            if len(patterns) != len(modules):
                raise CompressorError(f"profiling under a plan: {len(patterns)} layers of patterns for {len(modules)} "
                                      "attention layers")
            from compressor.attention_layers import layer_runtime

            for idx in modules:
                runtime = layer_runtime(idx, list(patterns[idx]), None)
                if not runtime.all_dense:
                    stores[idx]["pattern"] = (runtime.sink, runtime.alpha, runtime.beta)
        for idx, module in modules.items():
            module.influence_capture = stores[idx]
        model.set_attn_implementation(PROFILE_ATTENTION)
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=tokens - start + 1).logits
            logits = logits[0, :-1].float()  # predicts tokens start .. tokens-1
            loss = F.cross_entropy(logits, ids[0, start:])
            loss.backward()
    finally:
        model.set_attn_implementation(previous)
        for module in modules.values():
            if hasattr(module, "influence_capture"):
                del module.influence_capture
        for p, g in zip(model.parameters(), grads_were):
            p.requires_grad_(g)
    del logits, embeds
    q_heads = stores[0]["q"].shape[1]
    shape = (layers, q_heads, tokens)
    absolute = torch.zeros(shape, dtype=torch.float64, device=device)
    signed = torch.zeros(shape, dtype=torch.float64, device=device)
    sink_abs = torch.zeros(layers, q_heads, dtype=torch.float64, device=device)
    sink_sig = torch.zeros(layers, q_heads, dtype=torch.float64, device=device)
    row_cut = torch.zeros(layers, q_heads, tokens + 1, dtype=torch.float64, device=device)
    copy = torch.zeros(layers, q_heads, dtype=torch.float64, device=device)
    recall = torch.zeros(layers, q_heads, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in sorted(stores):
            store = stores[idx]
            store.pop("pattern", None)
            out = store.pop("out")
            if out.grad is None:
                raise CompressorError(f"layer {idx}: no gradient reached the attention output; cannot profile")
            accumulate_layer_influence(
                store["q"][0], store["k"][0], store["v"][0], out.grad[0], store["scale"], sink,
                absolute[idx], signed[idx], sink_abs[idx], sink_sig[idx], chunk=chunk, row_cut=row_cut[idx],
            )
            if sample.answer_start > 0:
                copy[idx] = copy_attention(
                    store["q"][0], store["k"][0], store["scale"], ids[0], sample.answer_start, sink
                )
            elif recall_distance is not None:
                recall[idx] = copy_attention(
                    store["q"][0], store["k"][0], store["scale"], ids[0], start, sink, min_distance=recall_distance
                )
            stores[idx] = {}  # free this layer's tensors as we go
    profile = InfluenceProfile(
        sample.length, sink, 1, absolute.cpu(), signed.cpu(), sink_abs.cpu(), sink_sig.cpu(), float(loss.detach()),
        row_cut=row_cut.cpu(), copy=copy.cpu(), recall=recall.cpu(),
    )
    return profile, float(loss.detach())


def _same_span(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad two distance histograms to the longer one's span."""
    n = max(a.shape[-1], b.shape[-1])
    return F.pad(a, (0, n - a.shape[-1])), F.pad(b, (0, n - b.shape[-1]))


def merge_profiles(parts: list[tuple[InfluenceProfile, float]]) -> InfluenceProfile:
    """Weighted average of profiles of one length: each part counts ``weight x its samples``, so equal weights give
    the average over all their samples (what profiling them together gives). Parts of weight 0 are left out."""
    parts = [(p, w) for p, w in parts if w > 0 and p.samples > 0]
    if not parts:
        raise CompressorError("no calibration samples with a positive task weight; check the recipe's task_weights")
    span = max(p.absolute.shape[-1] for p, _ in parts)
    total = sum(w * p.samples for p, w in parts)

    def mix(get) -> torch.Tensor:
        out = None
        for p, w in parts:
            t = get(p)
            if t.dim() == 3:  # by distance (or cut): zero beyond this part's span
                t = F.pad(t, (0, span - p.absolute.shape[-1]))
            t = t * (w * p.samples / total)
            out = t if out is None else out + t
        return out

    first = parts[0][0]
    rows = [p.row_cut for p, _ in parts]
    copies = [p.copy for p, _ in parts]
    recalls = [p.recall for p, _ in parts]
    return InfluenceProfile(
        first.length, first.sink, sum(p.samples for p, _ in parts),
        mix(lambda p: p.absolute), mix(lambda p: p.signed), mix(lambda p: p.sink_absolute), mix(lambda p: p.sink_signed),
        float(sum(p.loss * w * p.samples for p, w in parts) / total),
        row_cut=None if any(r is None for r in rows) else mix(lambda p: p.row_cut),
        copy=None if any(c is None for c in copies) else mix(lambda p: p.copy),
        recall=None if any(r is None for r in recalls) else mix(lambda p: p.recall),
    )


def profile_influence(
    model: torch.nn.Module,
    samples: list[RetrievalSample],
    sink: int = 64,
    text_fraction: float = 0.25,
    chunk: int = 128,
    progress: bool = False,
    patterns: list[list[object]] | None = None,
    recall_distance: int | None = None,
) -> dict[int, InfluenceProfile]:
    """Per input length, the influence histograms averaged over that length's samples (``patterns``: profile with
    these patterns applied, see :func:`profile_sample`)."""
    if not samples:
        raise CompressorError("no calibration samples to profile; check the recipe's calibration section")
    by_length: dict[int, InfluenceProfile] = {}
    iterator: Iterable[RetrievalSample] = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="influence", unit="sample")
    for sample in iterator:
        one, _ = profile_sample(model, sample, sink, text_fraction, chunk, patterns=patterns,
                                recall_distance=recall_distance)
        have = by_length.get(one.length)
        if have is None:
            by_length[one.length] = one
            continue
        have.absolute, one.absolute = _same_span(have.absolute, one.absolute)
        have.signed, one.signed = _same_span(have.signed, one.signed)
        have.row_cut, one.row_cut = _same_span(have.row_cut, one.row_cut)  # beyond a span nothing is dropped: 0
        have.absolute += one.absolute
        have.signed += one.signed
        have.row_cut += one.row_cut
        have.copy += one.copy
        have.recall += one.recall
        have.sink_absolute += one.sink_absolute
        have.sink_signed += one.sink_signed
        have.loss += one.loss
        have.samples += 1
    for profile in by_length.values():
        n = profile.samples
        profile.absolute /= n
        profile.signed /= n
        profile.row_cut /= n
        profile.copy /= n
        profile.recall /= n
        profile.sink_absolute /= n
        profile.sink_signed /= n
        profile.loss /= n
    return dict(sorted(by_length.items()))
