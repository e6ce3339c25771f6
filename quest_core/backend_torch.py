"""Attention backend `torch`: gathers pages and calls SDPA. Runs on CPU and CUDA; the reference for the others.

Query heads are grouped by KV head (query head j uses KV head j // G), as in transformers' `repeat_kv`, and the
group is folded into SDPA's query-length axis: `[1, Hkv, G * T, D]` against `[1, Hkv, S, D]`. That keeps K/V
unrepeated and keeps SDPA on its fused 4-D kernels (3-D inputs and `enable_gqa` fall back to slow paths on CPU).
"""
import torch
import torch.nn.functional as F

from .paged_cache import PagedLayer
from .selection import (
    page_attention_mass,
    page_scores,
    read_slots,
    select_pages,
    select_top_p,
    streaming_pages,
    two_level_scores,
)


class TorchBackend:
    """The reference `AttentionBackend` (quest_core/backends.py). Head-major pages: dense attention reads each KV
    head's tokens in place; Quest gathers the selected pages."""
    name = "torch"
    kv_layout = "head-major"
    append_kernels = None
    graph_capturable = False
    adaptive_budget = True

    def __init__(self, fallback_reason: str | None = None):
        self.fallback_reason = fallback_reason

    def describe(self) -> str:
        return f"torch (fallback: {self.fallback_reason})" if self.fallback_reason else "torch"

    def plan_step(self, step_plans: dict) -> None:
        """Nothing to plan: the torch attention reads the lengths as it runs."""

    def prefill(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hq, T, D] for the last T stored tokens -> out [Hq, T, D], causal over the whole cache."""
        keys, values = layer.dense()  # [Hkv, S, D]
        num_heads, num_new, head_dim = query.shape
        length = keys.shape[1]
        position = torch.arange(length - num_new, length, device=query.device)
        mask = torch.arange(length, device=query.device) <= position[:, None]  # [T, S]
        group = num_heads // layer.num_kv_heads
        grouped = query.reshape(layer.num_kv_heads, group * num_new, head_dim)  # rows (g, t)
        out = _attend(grouped, keys, values, scaling, mask.repeat(group, 1))
        return out.reshape(num_heads, num_new, head_dim)  # SDPA may return a transposed layout on CUDA

    def decode_dense(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hkv, G, D] -> out [Hkv, G, D] over every stored token."""
        keys, values = layer.dense()
        return _attend(query, keys, values, scaling)

    def select(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
               sink_pages: int = 0, coarse_factor: int = 0) -> torch.Tensor:
        """query [Hkv, G, D] -> Quest's selected page ids [Hkv, k], current page last (the first sink_pages pages
        among the others; with coarse_factor, ranked in two levels: selection.two_level_scores)."""
        scores, num_pages = _ranked_scores(query, layer, group_rule, num_selected, coarse_factor)
        return select_pages(scores, num_selected, num_pages, sink_pages)

    def decode_quest(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
                     sink_pages: int, coarse_factor: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`select`, then `decode_sparse` over its selection: (out [Hkv, G, D], the selected page ids)."""
        selected = self.select(query, layer, num_selected, group_rule, sink_pages, coarse_factor)
        return self.decode_sparse(query, layer, selected, scaling), selected

    def select_top_p(self, query: torch.Tensor, layer: PagedLayer, top_p: float, min_pages: int,
                     max_pages: int, sink_pages: int = 0, coarse_factor: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """query [Hkv, G, D] -> (page ids [Hkv, max_pages], current page last; page_counts [Hkv]): the adaptive
        budget (selection.select_top_p) on the "mass" rule's estimate of each page's share of the attention (with
        coarse_factor, over the two-level ranking's candidates for max_pages: the others' share is 0)."""
        scores, num_pages = _ranked_scores(query, layer, "mass", max_pages, coarse_factor)
        return select_top_p(scores.clamp(min=0) / query.shape[1], top_p, min_pages, max_pages, num_pages, sink_pages)

    def select_baseline(self, mode: str, query: torch.Tensor, layer: PagedLayer, num_selected: int,
                        scaling: float) -> torch.Tensor:
        """The evaluation's baselines: "streaming" (sinks + recent pages) or "oracle" (top dense attention mass)."""
        if mode == "streaming":
            return streaming_pages(layer.num_pages, num_selected, layer.num_kv_heads, query.device)
        mass = page_attention_mass(query, layer.dense()[0], layer.page_size, scaling)
        return select_pages(mass, num_selected)

    def rows_per_page(self, layer: PagedLayer) -> int:
        """`select` returns page ids."""
        return 1

    def decode_sparse(self, query: torch.Tensor, layer: PagedLayer, selected_pages: torch.Tensor, scaling: float,
                      page_counts: torch.Tensor | None = None):
        """query [Hkv, G, D], selected_pages [Hkv, k] -> out [Hkv, G, D] over the selected pages only.
        page_counts [Hkv] (a `select_top_p` selection): a head reads its first page_counts - 1 pages and the last;
        all k are gathered (a fixed width) and the others masked out."""
        keys, values = layer.gather(selected_pages)
        mask = None
        if page_counts is not None:
            slots = read_slots(page_counts, selected_pages.shape[1])  # [Hkv, k]
            mask = slots.repeat_interleave(layer.page_size, dim=1)[:, None, :keys.shape[1]]  # [Hkv, 1, tokens]
        return _attend(query, keys, values, scaling, mask)


    # A batch of requests whose pages share a PagePool (hf._batch_attention), one request after another: the twins
    # of the flashinfer backend's batch calls.
    def append_batch(self, keys: torch.Tensor, values: torch.Tensor, layers: list[PagedLayer]) -> None:
        """keys, values [R, Hkv, 1, D], one layer per request: each request's token appended to its layer."""
        for row, layer in enumerate(layers):
            layer.update(keys[row:row + 1], values[row:row + 1])

    def decode_batch_dense(self, query: torch.Tensor, layers: list[PagedLayer], scaling: float) -> torch.Tensor:
        """query [R, Hkv, G, D], one layer per request -> [R, Hkv, G, D] over every stored token."""
        return torch.stack([self.decode_dense(row, layer, scaling) for row, layer in zip(query, layers)])

    def select_batch(self, query: torch.Tensor, layers: list[PagedLayer], num_selected: int, group_rule: str,
                     sink_pages: int = 0, coarse_factor: int = 0) -> torch.Tensor:
        """query [R, Hkv, G, D], one layer per request -> each request's `select` [R, Hkv, k]."""
        return torch.stack([self.select(row, layer, num_selected, group_rule, sink_pages, coarse_factor)
                            for row, layer in zip(query, layers)])

    def decode_batch_sparse(self, query: torch.Tensor, layers: list[PagedLayer], selected: torch.Tensor,
                            scaling: float) -> torch.Tensor:
        """query [R, Hkv, G, D], selected [R, Hkv, k] (what `select` returned for each) -> [R, Hkv, G, D]."""
        return torch.stack([self.decode_sparse(row, layer, pages, scaling)
                            for row, layer, pages in zip(query, layers, selected)])


def _scores(query: torch.Tensor, layer: PagedLayer, group_rule: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query [Hkv, G, D] -> (page scores [Hkv, pages], None) over the pages in use; while a CUDA graph is captured
    (the length is on the GPU) the scores over the cache's capacity and the page count as a tensor."""
    bounds, num_pages = _bounds_in_use(layer)
    return page_scores(query, bounds, group_rule, num_pages), num_pages


def _ranked_scores(query: torch.Tensor, layer: PagedLayer, group_rule: str, num_selected: int,
                   coarse_factor: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_scores`, or with coarse_factor the two-level ranking's for num_selected pages (selection.two_level_scores:
    -inf where a page is not a candidate)."""
    if not coarse_factor:
        return _scores(query, layer, group_rule)
    bounds, num_pages = _bounds_in_use(layer)
    pairs = None if layer.pair_bounds is None or num_pages is not None else \
        layer.pair_bounds[:, :-(-layer.num_pages // 2)]  # kept as tokens arrive (PagedLayer.keep_pairs)
    return two_level_scores(query, bounds, group_rule, num_selected, coarse_factor, num_pages, pairs), num_pages


def _bounds_in_use(layer: PagedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(page bounds [Hkv, pages, 2D], None) over the pages in use; while a CUDA graph is captured (the length is on
    the GPU) the bounds over the cache's capacity and the page count as a one-element long tensor."""
    if layer.device_length is None:
        return layer.page_bounds[:, :layer.num_pages], None
    return layer.page_bounds, torch.div(layer.device_length + layer.page_size - 1, layer.page_size,
                                        rounding_mode="floor")


def _attend(query, keys, values, scaling, mask=None):
    """query [Hkv, M, D], keys/values [Hkv, S, D], mask [M, S], [Hkv, M or 1, S] or None -> [Hkv, M, D]."""
    return F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask, scale=scaling)[0]
