"""transformers integration: a `Cache` of paged layers and the `quest` attention function.

Nothing of a model is copied: `use_quest(model)` registers the attention under the name "quest" through
transformers' `AttentionInterface` (plus a mask function that builds no mask: the attention knows causality
from the cache) and switches the model to it. A forward call then passes the same `QuestCache` twice, as the
model's cache (transformers appends K/V through `Cache.update`) and as the `quest_cache` keyword, which
transformers hands on to the attention function untouched (5.17 through 5.24 alike).

A decode step over several requests (quest_core/engine.py) passes a `BatchCache` instead: row b of the batch
appends to request b's own QuestCache, and the attention runs per request on its own pages and settings; the
weights, projections and MLP run once for the whole batch. Where the requests' pages share one `PagePool` (an
engine's on a GPU), one call attends for all of them: a batch decode for the dense ones (`decode_batch_dense`), a
sparse decode for each setting's Quest ones (`decode_batch_sparse`).
"""
import functools
import inspect

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from .backend_torch import TorchBackend
from .config import QuestConfig
from .paged_cache import GatherBuffer, PagedLayer, PagePool, PoolRun

ATTN_NAME = "quest"


class QuestCache(Cache):
    """One `PagedLayer` per model layer, the Quest settings, the attention backend and an optional trace."""

    def __init__(self, num_layers: int, config: QuestConfig, backend=None, pool: PagePool | None = None):
        """pool: keep the pages in this PagePool (an engine's, on a GPU; of the config's page size)."""
        self.backend = backend or TorchBackend()
        gather_buffer = GatherBuffer()
        super().__init__(layers=[PagedLayer(config.page_size, gather_buffer=gather_buffer,
                                            kernels=self.backend.append_kernels, kv_layout=self.backend.kv_layout)
                                 for _ in range(num_layers)])
        self._check(config)
        self.config = config
        for layer in self.layers:
            layer.keep_pairs(config.coarse_factor > 0)
        self.run = None
        if pool is not None:
            self.run = PoolRun(pool, self.layers)
            for index, layer in enumerate(self.layers):
                layer.use_pool(self.run, index)
        self.trace = None  # a quest_core.trace.Trace while recording
        self.graph_decoder = None  # a quest_core.cuda_graph.GraphDecoder once decoding has used one

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, num_tokens: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.reserve(num_tokens)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    @torch.compiler.disable  # compiled decoder layers (quest_core/compiled_layers.py) call it as it is
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)

    def set_config(self, config: QuestConfig) -> None:
        """New settings for the next step; a new page size re-lays the stored KV out, nothing is recomputed."""
        self._check(config)
        for layer in self.layers:
            layer.keep_pairs(config.coarse_factor > 0)
            layer.repage(config.page_size)
        if self.run is not None and config.page_size != self.run.pool.page_size:  # the pages left the pool
            self.run.release()
            self.run = None
        self.config = config

    def _check(self, config: QuestConfig) -> None:
        if config.top_p is not None and not self.backend.adaptive_budget:
            raise ValueError(f"top_p (an adaptive budget) does not run on the {self.backend.name} attention backend, "
                             "which reads the same number of pages for every KV head; use the torch backend or "
                             "leave top_p off")


class BatchRows(CacheLayerMixin):
    """One model layer of a `BatchCache`: row b of a decode step's K/V goes to request b's layer."""
    is_compileable = False
    is_sliding = False

    def __init__(self, layers: list[PagedLayer], backend):
        super().__init__()
        self.request_layers, self.backend = layers, backend
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # each request's layer initializes itself

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states [B, Hkv, 1, D]; returns them (the attention reads each request's pages)."""
        self.backend.append_batch(key_states, value_states, self.request_layers)
        return key_states, value_states

    # The requests have lengths of their own (forward_batch passes their positions); transformers reads these
    # only to size the mask, which the quest attention does not build (`_no_mask`).
    def get_seq_length(self, *args) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """A decode step's requests, one QuestCache each (row b of the batch is `caches[b]`)."""

    def __init__(self, caches: list[QuestCache]):
        num_layers = len(caches[0].layers)
        super().__init__(layers=[BatchRows([cache.layers[i] for cache in caches], caches[0].backend)
                                 for i in range(num_layers)])
        self.caches = caches
        pools = {id(cache.run.pool) if cache.run is not None else None for cache in caches}
        self.pool = caches[0].run.pool if len(pools) == 1 and None not in pools else None  # all pages in one

    @torch.compiler.disable
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)


UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "sliding_window": "sliding-window attention",
                      "s_aux": "attention sinks"}


def quest_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, quest_cache=None, **kwargs):
    """query [B, Hq, T, D] -> (out [B, T, Hq, D], None). The K/V are already appended to the cache's pages;
    `quest_cache` is a QuestCache (B = 1) or a BatchCache (T = 1, each row attends to its own request's cache)."""
    if quest_cache is None:
        raise ValueError("the 'quest' attention needs the model called with quest_cache=<QuestCache>")
    for name, feature in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the quest attention does not implement {feature} ({name}={kwargs[name]!r})")
    if isinstance(quest_cache, BatchCache):
        caches = quest_cache.caches
        if quest_cache.pool is not None:
            return _batch_attention(module, query, scaling, caches), None
        rows = [_request_attention(module, query[row:row + 1], scaling, cache) for row, cache in enumerate(caches)]
        return torch.cat(rows), None
    return _request_attention(module, query, scaling, quest_cache), None


def _request_attention(module, query: torch.Tensor, scaling: float | None, quest_cache: QuestCache) -> torch.Tensor:
    """One request's attention: query [1, Hq, T, D] -> out [1, T, Hq, D] over its cache, with its settings."""
    layer_idx = module.layer_idx
    layer = quest_cache.layers[layer_idx]
    config, backend, trace = quest_cache.config, quest_cache.backend, quest_cache.trace
    _, num_heads, num_new, head_dim = query.shape
    scaling = head_dim**-0.5 if scaling is None else scaling
    if num_new > 1:  # prefill is dense
        out = backend.prefill(query[0], layer, scaling)  # [Hq, T, D]
        return out.transpose(0, 1).unsqueeze(0)
    grouped_query = query[0, :, 0].view(layer.num_kv_heads, -1, head_dim)  # [Hkv, G, D]
    started = trace.start_attention(query.device) if trace is not None else None
    selected_pages = page_counts = None
    if config.sparse_at(layer_idx, layer.num_pages):
        out, selected_pages, page_counts = _decode_sparse(config, backend, grouped_query, layer, scaling)
    else:
        out = backend.decode_dense(grouped_query, layer, scaling)
    if trace is not None:
        trace.record_layer(layer_idx, layer, selected_pages, grouped_query, scaling, started, page_counts,
                           config.bounds_read(layer.num_pages), backend.rows_per_page(layer))
    return out.reshape(1, 1, num_heads, head_dim)


def _batch_attention(module, query: torch.Tensor, scaling: float | None, caches: list[QuestCache]) -> torch.Tensor:
    """A decode step of requests whose pages share a PagePool: query [B, Hq, 1, D] -> out [B, 1, Hq, D]. One batch
    decode for the requests that attend densely at this layer, one sparse decode per Quest selection setting (each
    request's pages selected on its own), the baselines and adaptive budgets one request at a time."""
    layer_idx = module.layer_idx
    batch, num_heads, _, head_dim = query.shape
    scaling = head_dim**-0.5 if scaling is None else scaling
    backend = caches[0].backend
    layers = [cache.layers[layer_idx] for cache in caches]
    grouped_query = query[:, :, 0].reshape(batch, layers[0].num_kv_heads, -1, head_dim)  # [B, Hkv, G, D]
    groups, alone = {}, []  # a selection setting (None: dense) -> rows of the batch
    for row, (cache, layer) in enumerate(zip(caches, layers)):
        config = cache.config
        if not config.sparse_at(layer_idx, layer.num_pages):
            groups.setdefault(None, []).append(row)
        elif config.mode == "quest" and config.top_p is None:
            setting = (config.budget_pages, config.group_rule, config.kept_sink_pages, config.coarse_factor)
            groups.setdefault(setting, []).append(row)
        else:
            alone.append(row)
    traced_pages = {}  # row -> its selection [Hkv, k] (for the trace)
    outs = []  # (rows, out [R, Hkv, G, D])
    for setting, rows in groups.items():
        group_query = grouped_query.index_select(0, _row_index(tuple(rows), query.device)) if len(rows) < batch \
            else grouped_query
        group_layers = [layers[row] for row in rows]
        if setting is None:
            outs.append((rows, backend.decode_batch_dense(group_query, group_layers, scaling)))
            continue
        num_selected, group_rule, sink_pages, coarse_factor = setting
        selected = backend.select_batch(group_query, group_layers, num_selected, group_rule, sink_pages,
                                        coarse_factor)  # [R, Hkv, k]
        traced_pages.update((row, rows_selected) for row, rows_selected in zip(rows, selected)
                            if caches[row].trace is not None)
        outs.append((rows, backend.decode_batch_sparse(group_query, group_layers, selected, scaling)))
    for row in alone:
        outs.append(([row], _request_attention(module, query[row:row + 1], scaling, caches[row])
                     .view(1, *grouped_query.shape[1:])))
    if len(outs) == 1 and len(outs[0][0]) == batch:
        out = outs[0][1]
    else:
        out = torch.empty_like(grouped_query)
        for rows, group_out in outs:
            out.index_copy_(0, _row_index(tuple(rows), query.device), group_out)
    for row, cache in enumerate(caches):
        if cache.trace is not None and row not in alone:
            cache.trace.record_layer(layer_idx, layers[row], traced_pages.get(row), grouped_query[row], scaling,
                                     bounds_read=cache.config.bounds_read(layers[row].num_pages),
                                     rows_per_page=backend.rows_per_page(layers[row]))
    return out.view(batch, 1, num_heads, head_dim)


@functools.lru_cache(maxsize=256)
def _row_index(rows: tuple[int, ...], device) -> torch.Tensor:
    """Rows of a batch as an index on the device, made once per batch's grouping: a captured step finds the ones
    its eager step made (an upload inside a capture would fail)."""
    return torch.tensor(rows, device=device)


def _decode_sparse(config: QuestConfig, backend, query: torch.Tensor, layer: PagedLayer, scaling: float):
    """query [Hkv, G, D] -> (out [Hkv, G, D], the selection [Hkv, k], page_counts [Hkv] with top_p, else None)."""
    num_selected = config.budget_pages
    if config.top_p is not None:  # mode "quest" (QuestConfig refuses top_p with the baselines)
        sink_pages = min(config.sink_pages, config.min_budget_pages - 2)  # room for the current and a chosen page
        selected, page_counts = backend.select_top_p(query, layer, config.top_p, config.min_budget_pages,
                                                     num_selected, sink_pages, config.coarse_factor)
        return backend.decode_sparse(query, layer, selected, scaling, page_counts), selected, page_counts
    if config.mode == "quest":
        out, selected = backend.decode_quest(query, layer, num_selected, config.group_rule, config.kept_sink_pages,
                                             config.coarse_factor, scaling)
        return out, selected, None
    selected = backend.select_baseline(config.mode, query, layer, num_selected, scaling)
    return backend.decode_sparse(query, layer, selected, scaling), selected, None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    # compiled decoder layers (quest_core/compiled_layers.py) call the attention as it is
    AttentionInterface.register(ATTN_NAME, torch.compiler.disable(quest_attention))
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)


def unsupported_feature(model) -> str | None:
    """What of `model`'s attention the quest attention does not implement (it would attend wrongly), or None."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return UNSUPPORTED_KWARGS["softcap"]
    if any(name.endswith(".sinks") for name, _ in model.named_parameters()):
        return UNSUPPORTED_KWARGS["s_aux"]
    layer_types = getattr(config, "layer_types", None)
    sliding = ("sliding_attention" in layer_types if layer_types else
               getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True))
    if sliding:
        return UNSUPPORTED_KWARGS["sliding_window"]
    return None


def use_quest(model) -> None:
    """Switch `model` (any transformers decoder built on the attention registry) to the quest attention; a model
    whose attention uses what it does not implement (soft-capping, a sliding window, sinks) is refused."""
    if feature := unsupported_feature(model):
        raise ValueError(f"{type(model).__name__} uses {feature}, which the quest attention does not implement: "
                         "its answers would be wrong. Llama, Qwen2/3 and Mistral without a sliding window work.")
    register()
    model.set_attn_implementation(ATTN_NAME)


def cache_argument(model) -> str:
    """The name the model's forward takes its cache under: `cache` from transformers 5.24, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward(model, cache: QuestCache, input_ids: torch.Tensor, cache_arg: str, position_ids=None) -> torch.Tensor:
    """Run `input_ids` [1, T] after the cached tokens; returns the last position's logits [vocab] in float32.
    A model not yet on the quest attention is switched to it (a QuestCache works with no other)."""
    if model.config._attn_implementation != ATTN_NAME:
        use_quest(model)
    if position_ids is None:
        start = cache.length
        position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        quest_cache=cache,
        **{cache_arg: cache},
    )
    return output.logits[0, -1].float()


def forward_batch(model, caches: list[QuestCache], token_ids, cache_arg: str, position_ids=None) -> torch.Tensor:
    """One decode step for several requests: token_ids[b] after caches[b]'s tokens, at its own position; returns
    the logits [B, vocab] in float32. token_ids: a list, or [B, 1] on the device, then with position_ids [B, 1]
    there too (a step captured in a CUDA graph: quest_core/cuda_graph.py)."""
    device = next(model.parameters()).device
    if position_ids is None:
        position_ids = torch.tensor([[cache.length] for cache in caches], device=device)  # [B, 1]
    input_ids = token_ids if torch.is_tensor(token_ids) else torch.tensor(token_ids, device=device)[:, None]
    batch = BatchCache(caches)
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        quest_cache=batch,
        **{cache_arg: batch},
    )
    return output.logits[:, -1].float()
