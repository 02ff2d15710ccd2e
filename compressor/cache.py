"""A KV cache that stores only what the plan lets the model read: per KV head, sink tokens + a ring of recent tokens.

    model = compressor.apply(model, plan)           # generate() now builds a PlanCache by itself
    out = model.generate(ids, max_new_tokens=256)
    cache = make_cache(model, batch_size=8, max_length=4096)   # or build one and pass it as cache=/past_key_values=

Layout per layer: one flat ragged buffer for K and one for V, ``[batch, slots, head_dim]``. KV head ``g`` owns a
region of ``sink_cap + ring_cap`` slots (see ``kernels/decode_attention.py``): dense heads keep every token
(``sink_cap = max_length``), window heads keep the group's widest sink and a ring sized for the widest window at
``max_length`` (elastic windows grow with N). Layers the model defines as sliding keep at most its window, sinks off.

Each layer's ``update`` only records the new K/V; the attention function (which has the padding mask) calls back
``compressor_attend`` to write them per row and then either decodes with the split-K kernel over the buffers (one
query token: the store, the lengths and the windows are one kernel launch, ``kernels/cache_store.py``) or, for a
prefill chunk, hands back keys at their true positions for the runtime's prefill path.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from compressor.errors import CompressorError
from compressor.kernels.cache_store import store_decode_token
from compressor.kernels.decode_attention import decode_attention, slot_tokens
from compressor.kernels.reference import window_sizes
from compressor.attention_layers import LayerRuntime, attention_modules, warn_once

SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass
class LayerLayout:
    """Where each KV head of one layer lives in the layer's flat buffer (plain data)."""

    region_start: list[int]
    sink_cap: list[int]
    ring_cap: list[int]
    sliding: int | None  # the model's own window on this layer, None for full layers

    @property
    def slots(self) -> int:
        return self.region_start[-1] + self.sink_cap[-1] + self.ring_cap[-1]


def layer_sliding_window(module: torch.nn.Module, config: object, layer_idx: int) -> int | None:
    """The model's own sliding window on a layer (as the runtime sees it), or None for a full-attention layer."""
    if hasattr(module, "sliding_window"):
        return getattr(module, "sliding_window") or None
    types_ = getattr(config, "layer_types", None)
    if types_ and types_[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None) or None


def query_head_params(runtime: LayerRuntime, sliding: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sink, alpha, beta) per query head as this layer decodes: sliding layers drop the plan's sinks."""
    sink = torch.zeros_like(runtime.sink) if sliding else runtime.sink
    return sink.to(torch.int32), runtime.alpha.float(), runtime.beta.float()


def head_windows(alpha: torch.Tensor, beta: torch.Tensor, length: torch.Tensor, sliding: int | None) -> torch.Tensor:
    """Window per (row, query head) at the rows' lengths, capped by the model's sliding window. -> [batch, heads]."""
    window = window_sizes(alpha, beta, length)
    return window.clamp(max=sliding) if sliding else window


def layer_layout(runtime: LayerRuntime, kv_heads: int, max_length: int, sliding: int | None) -> LayerLayout:
    """Region sizes per KV head: the widest sink and window (at ``max_length``) among its query heads."""
    sink, alpha, beta = query_head_params(runtime, sliding)
    window = head_windows(alpha, beta, torch.tensor([max_length]), sliding)[0]
    group = len(sink) // kv_heads
    starts, sinks, rings, at = [], [], [], 0
    for g in range(kv_heads):
        heads = slice(g * group, (g + 1) * group)
        s, w = int(sink[heads].max()), int(window[heads].max())
        if s + w >= max_length:  # the region would hold every token anyway: store it plainly
            s, w = max_length, 0
        starts.append(at), sinks.append(s), rings.append(w)
        at += s + w
    return LayerLayout(starts, sinks, rings, sliding)


def ideal_kv_tokens(runtime: LayerRuntime, kv_heads: int, length: int, sliding: int | None) -> int:
    """Tokens a layer must keep per row at ``length``: per KV head, sink + window of its widest query head."""
    sink, alpha, beta = query_head_params(runtime, sliding)
    window = head_windows(alpha, beta, torch.tensor([length]), sliding)[0]
    need = torch.clamp(sink.to(torch.int64) + window, max=length).view(kv_heads, -1)
    return int(need.max(dim=1).values.sum())


class _PendingTokens:
    """What ``update`` returns in place of keys and values: the new tokens, until the attention function (which
    holds the padding mask) asks the layer to store them and attend."""

    def __init__(self, layer: PlanCacheLayer, keys: torch.Tensor, values: torch.Tensor, seen_before: int):
        self.layer, self.keys, self.values, self.seen_before = layer, keys, values, seen_before
        self.shape = keys.shape  # some code reads key_states.shape between the cache update and attention

    def compressor_attend(self, module, query, attention_mask, scaling, softcap):
        return self.layer.attend(self, module, query, attention_mask, scaling, softcap)


class PlanCacheLayer(CacheLayerMixin):
    """One layer of a :class:`PlanCache`: the flat K/V buffers, and per-row valid token counts."""

    is_compileable = False
    is_croppable = False

    def __init__(self, runtime: LayerRuntime, layout: LayerLayout, max_batch: int, max_length: int):
        super().__init__()
        self.runtime, self.layout = runtime, layout
        self.max_batch, self.max_length = max_batch, max_length
        self.is_sliding = layout.sliding is not None
        self.seen = 0  # tokens seen per row, padding included: the coordinates of the padding mask
        self.batch = 0
        self.lengths: torch.Tensor | None = None  # [batch] int64: valid tokens stored per row (the N of window(N))
        self._device_meta: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        kinds = [f"{s}+{r}" if r else ("dense" if s == self.max_length else f"{s}") for s, r in zip(self.layout.sink_cap, self.layout.ring_cap)]
        return f"PlanCacheLayer(layer={self.runtime.layer_idx}, kv_heads=[{', '.join(kinds)}], seen={self.seen})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the flat buffers for the sized batch on the first update's device and dtype."""
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = torch.zeros(self.max_batch, self.layout.slots, key_states.shape[-1], dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(self.max_batch, self.layout.slots, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        self._device_meta = {
            name: torch.tensor(getattr(self.layout, name), dtype=torch.int32, device=self.device)
            for name in ("region_start", "sink_cap", "ring_cap")
        }
        sink, alpha, beta = query_head_params(self.runtime, self.layout.sliding)
        self._heads = (sink.to(self.device), alpha.to(self.device), beta.to(self.device))
        # windows per (row, query head) at the rows' lengths, rewritten in place by each decode step
        self._window = torch.zeros(self.max_batch, len(sink), dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Check the sizes and hand the new tokens (key_states: [batch, kv_heads, tokens, dim]) to the attention
        function, which stores them once it knows the padding."""
        batch, kv_heads, tokens, _ = key_states.shape
        if batch > self.max_batch:
            raise CompressorError(
                f"batch of {batch} rows reached a compressor cache sized for {self.max_batch}: build the cache with "
                f"make_cache(model, batch_size={batch}, ...)"
            )
        if kv_heads != len(self.layout.sink_cap):
            raise CompressorError(f"layer {self.runtime.layer_idx}: {kv_heads} KV heads, cache built for {len(self.layout.sink_cap)}")
        if self.seen + tokens > self.max_length:
            raise CompressorError(
                f"layer {self.runtime.layer_idx}: {self.seen} + {tokens} tokens exceed the cache's max_length "
                f"{self.max_length}: build the cache with a larger max_length (prompt + max_new_tokens)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seen == 0:
            self.batch = batch
            self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)
        elif batch != self.batch:
            raise CompressorError(f"batch changed from {self.batch} to {batch} rows inside one compressor cache: build a new cache")
        pending = _PendingTokens(self, key_states, value_states, self.seen)
        self.seen += tokens
        return pending, pending

    # -- storing --------------------------------------------------------------------------------------------------

    def _chunk_valid(self, attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(self.batch, tokens, dtype=torch.bool, device=self.device)
        return attention_mask[:, -tokens:].to(self.device, torch.bool)

    def _slots(self, token: torch.Tensor) -> torch.Tensor:
        """Flat slot of token index ``token`` ([..., kv_heads] int64) in each KV head's region."""
        start, sink_cap, ring_cap = (self._device_meta[n].to(torch.int64) for n in ("region_start", "sink_cap", "ring_cap"))
        ring = torch.where(ring_cap > 0, ring_cap, torch.ones_like(ring_cap))
        return start + torch.where(token < sink_cap, token, sink_cap + (token - sink_cap) % ring)

    def _store_one(self, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Decode step, free of host syncs and in one launch on CUDA (kernels/cache_store.py): each row's new K/V
        in its slots (rows whose new token is padding keep theirs), lengths advanced, windows at the new lengths."""
        valid = None
        if attention_mask is not None:  # the mask's last column: a view, read by the kernel as it is
            valid = attention_mask[:, -1] if attention_mask.device == self.device else attention_mask[:, -1].to(self.device)
        _, alpha, beta = self._heads
        meta = self._device_meta
        store_decode_token(
            self.keys, self.values, keys, values, region_start=meta["region_start"], sink_cap=meta["sink_cap"],
            ring_cap=meta["ring_cap"], length=self.lengths, valid=valid, alpha=alpha, beta=beta,
            sliding=self.layout.sliding, window_out=self._window,
        )  # fmt: skip

    def _store_chunk(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Prefill chunk: each row's valid tokens, the ones its regions keep (no two tokens share a slot)."""
        kv_heads = keys.shape[1]
        token = self.lengths[:, None] + valid.to(torch.int64).cumsum(-1) - 1  # [batch, tokens]
        new_len = self.lengths + valid.sum(-1)
        sink_cap = self._device_meta["sink_cap"].to(torch.int64)
        ring_cap = self._device_meta["ring_cap"].to(torch.int64)
        t = token[:, :, None]  # [batch, tokens, kv_heads]
        keep = valid[:, :, None] & ((t < sink_cap) | (t >= new_len[:, None, None] - ring_cap))
        slot = self._slots(t.expand(-1, -1, kv_heads))
        rows = torch.arange(self.batch, device=self.device)[:, None, None].expand_as(slot)
        self.keys[rows[keep], slot[keep]] = keys.transpose(1, 2)[keep]
        self.values[rows[keep], slot[keep]] = values.transpose(1, 2)[keep]
        self.lengths = new_len

    def _history_at_positions(self, keys, values, attention_mask, seen_before):
        """Keys/values [batch, kv_heads, seen_before + tokens, dim] with every stored token at its true position
        (zeros where the cache keeps nothing: the runtime's pattern never reads there), then the new chunk."""
        batch, kv_heads, tokens, dim = keys.shape
        total = seen_before + tokens
        old_len = self.lengths
        if attention_mask is None:
            first = torch.zeros(batch, dtype=torch.int64, device=self.device)
        else:
            mask = attention_mask.to(self.device, torch.bool)[:, -total:]
            first = torch.where(mask, torch.arange(total, device=self.device), total).amin(-1)
            chunk_ok = mask[:, seen_before:].all(-1) | (old_len == 0)
            if not bool(chunk_ok.all()):
                raise CompressorError(
                    "a prefill chunk into a filled compressor cache has padding: every row's new tokens must be real "
                    "(left-pad only the first chunk)"
                )
        k_all = keys.new_zeros(batch, kv_heads, total + 1, dim)  # the last column takes the empty slots
        v_all = values.new_zeros(batch, kv_heads, total + 1, values.shape[-1])
        rows = torch.arange(batch, device=self.device)[:, None]
        for g in range(kv_heads):
            lo = self.layout.region_start[g]
            token = slot_tokens(old_len, self.layout.sink_cap[g], self.layout.ring_cap[g])  # [batch, cap]
            pos = torch.where(token >= 0, first[:, None] + token, total)
            k_all[rows, g, pos] = self.keys[:batch, lo : lo + token.shape[1]]
            v_all[rows, g, pos] = self.values[:batch, lo : lo + token.shape[1]]
        k_all, v_all = k_all[:, :, :total], v_all[:, :, :total]
        k_all[:, :, seen_before:] = keys
        v_all[:, :, seen_before:] = values
        return k_all, v_all

    # -- attending ------------------------------------------------------------------------------------------------

    def attend(self, pending: _PendingTokens, module, query, attention_mask, scaling, softcap):
        """Store the pending tokens, then: decode (returns [batch, 1, q_heads, dim]) or, for a prefill chunk,
        return (keys, values, mask) for the runtime's prefill path."""
        if getattr(module, "compressor_layer", None) is not self.runtime:
            raise CompressorError(
                f"layer {self.runtime.layer_idx}: the plan on the model changed after this cache was built "
                "(compressor.apply ran again?): build a new cache with compressor.cache.make_cache(model, ...)"
            )
        keys, values, seen_before = pending.keys, pending.values, pending.seen_before
        tokens = keys.shape[2]
        if tokens == 1 and query.shape[2] == 1:
            self._store_one(keys, values, attention_mask)
            out = decode_attention(
                query[:, :, 0], self.keys[: self.batch], self.values[: self.batch],
                region_start=self.layout.region_start, sink_cap=self.layout.sink_cap, ring_cap=self.layout.ring_cap,
                length=self.lengths, sink=self._heads[0], window=self._window[: self.batch], scale=scaling, softcap=softcap,
            )  # fmt: skip
            return out[:, None]
        valid = self._chunk_valid(attention_mask, tokens)
        if seen_before == 0:
            self._store_chunk(keys, values, valid)
            return keys, values, attention_mask
        k_all, v_all = self._history_at_positions(keys, values, attention_mask, seen_before)
        self._store_chunk(keys, values, valid)
        return k_all, v_all, attention_mask

    # -- the CacheLayerMixin interface ----------------------------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the padding mask covers every token seen, as ``padding_mask`` expects."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen per row (padding included), not tokens stored: position ids derive from it."""
        return self.seen

    def get_max_length(self) -> int:
        return self.max_length

    def reset(self) -> None:
        self.seen, self.batch, self.lengths = 0, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s buffers and length."""
        if self.lengths is None:
            return
        idx = beam_idx.to(self.device)
        self.keys[: self.batch] = self.keys[idx]
        self.values[: self.batch] = self.values[idx]
        self.lengths = self.lengths[idx]

    def crop(self, tokens_to_remove: int) -> None:
        raise CompressorError("a compressor cache cannot be cropped (its rings overwrite old tokens): use a DynamicCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise CompressorError("a compressor cache cannot be expanded after prefill; size it for the full batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise CompressorError("a compressor cache cannot drop rows; build a new cache for the smaller batch")


class PlanCache(Cache):
    """A transformers ``Cache`` of :class:`PlanCacheLayer`: one per decoder layer, sized for a batch and length."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        if batch_size < 1 or max_length < 1:
            raise CompressorError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        reason = unsupported_reason(model)
        if reason is not None:
            raise CompressorError(f"a compressor cache cannot serve this model: {reason}")
        config = model.config.get_text_config(decoder=True)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = []
        for idx, module in sorted(attention_modules(model).items()):
            runtime = module.compressor_layer
            sliding = layer_sliding_window(module, config, idx)
            layers.append(PlanCacheLayer(runtime, layer_layout(runtime, kv_heads, max_length, sliding), batch_size, max_length))
        super().__init__(layers=layers)
        # not `max_batch_size`/`max_cache_len`: transformers 5.17 defines those as read-only properties of Cache
        self.sized_batch, self.sized_length, self.kv_heads = batch_size, max_length, kv_heads

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (allocated on the first forward)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))

    def ideal_nbytes(self, length: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K and V that the plan needs at ``length`` for the sized batch: per KV head, sink + window."""
        tokens = sum(ideal_kv_tokens(layer.runtime, self.kv_heads, length, layer.layout.sliding) for layer in self.layers)
        return 2 * tokens * self.sized_batch * head_dim * torch.empty(0, dtype=dtype).element_size()


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a :class:`PlanCache` cannot serve ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if not hasattr(model, "compression_plan"):
        return "no plan is applied (call compressor.apply(model, plan) first)"
    text = config.get_text_config(decoder=True)
    other = set(getattr(text, "layer_types", None) or []) - SUPPORTED_LAYER_TYPES
    if other:
        return f"layer types {sorted(other)} are not attention layers this cache knows"
    modules = attention_modules(model)
    if len(modules) != text.num_hidden_layers or not all(hasattr(m, "compressor_layer") for m in modules.values()):
        return f"{type(model).__name__}'s attention modules do not all carry a plan layer"
    return None


def make_cache(model: torch.nn.Module, batch_size: int, max_length: int) -> Cache:
    """A cache for ``model.generate(..., cache=...)`` / ``past_key_values=``: a :class:`PlanCache` for rows of up to
    ``max_length`` tokens (prompt + new tokens), or a ``DynamicCache`` (warned once) for models it cannot serve."""
    reason = unsupported_reason(model)
    if reason is not None:
        warn_once(f"compressor cache falls back to transformers' DynamicCache: {reason}")
        return DynamicCache(config=model.config)
    return PlanCache(model, batch_size, max_length)


def has_window_heads(model: torch.nn.Module) -> bool:
    """True when some head of the applied plan reads less than everything (a window pattern)."""
    return any(
        bool(torch.isfinite(m.compressor_layer.alpha).any())
        for m in attention_modules(model).values()
        if hasattr(m, "compressor_layer")
    )


def _prepare_cache_with_plan(self, generation_config, model_kwargs, *args, **kwargs):
    """``generate``'s cache preparation, then a :class:`PlanCache` in place of the default DynamicCache it made."""
    original = type(self)._prepare_cache_for_generation
    original(self, generation_config, model_kwargs, *args, **kwargs)
    key = "cache" if "cache" in model_kwargs else "past_key_values"
    made = model_kwargs.get(key)
    if type(made) is not DynamicCache or getattr(made, "_is_user_defined", False) or made.get_seq_length() > 0:
        return
    if generation_config.cache_implementation not in (None, "dynamic") or unsupported_reason(self) is not None:
        return
    bound = inspect.signature(original).bind(self, generation_config, model_kwargs, *args, **kwargs).arguments
    copies = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    batch = int(bound.get("batch_size", 0)) * copies
    length = max(int(bound.get("max_cache_length", 0)) + 1, int(generation_config.max_length or 0))
    if batch > 0 and length > 0:
        model_kwargs[key] = PlanCache(self, batch, length)


def use_plan_cache(model: torch.nn.Module) -> None:
    """Make ``model.generate`` build a :class:`PlanCache` when it would build a DynamicCache (plans with window
    heads only); an instance attribute, no class is patched. Undone by :func:`stop_plan_cache`."""
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        warn_once(
            f"{type(model).__name__}.generate has no _prepare_cache_for_generation: pass "
            "cache=compressor.cache.make_cache(model, batch_size, max_length) to generate yourself"
        )
        return
    if has_window_heads(model) and unsupported_reason(model) is None:
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_with_plan, model)
    else:
        stop_plan_cache(model)


def stop_plan_cache(model: torch.nn.Module) -> None:
    """Back to transformers' own cache choice in ``generate``."""
    if "_prepare_cache_for_generation" in vars(model):
        del model._prepare_cache_for_generation
