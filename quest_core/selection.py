"""Quest page scoring and top-k selection (the torch twin of kernels/score_topk).

score(page) = sum_d max(q_d * kmax_d, q_d * kmin_d) = relu(q) . kmax + min(q, 0) . kmin,
an upper bound on q . k for every key k in the page. So scoring is two matrix-vector products.

GQA: each KV head has one page set, shared by the G query heads of its group. The group's scores combine by
  "sum" (default): the sum of the heads' upper bounds, i.e. a bound on the group's summed logit. It costs one
          GEMV per KV head (sum relu(q) and min(q, 0) over the group first) and favours pages that several heads
          want over a page that one head wants a little more.
  "max": the largest head's bound, so each head's favourite page survives; G GEMVs per KV head.
  "mass": each head's bounds through its softmax over the pages (scaled by 1/sqrt(D), as the attention is), summed
          over the group: an estimate of the share of the group's attention each page holds. A head with a sharp
          query (a retrieval head) then weighs as much as one with a flat query; G GEMVs per KV head.

Top-p (an adaptive budget, `select_top_p`): the "mass" scores divided by G are each page's estimated share of the
group's attention; a KV head reads pages in decreasing share until the pages read hold p of it.
"""
import torch


def page_scores(query: torch.Tensor, page_bounds: torch.Tensor, group_rule: str = "sum",
                num_pages: torch.Tensor | None = None, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """query [Hkv, G, D]; page_bounds [Hkv, pages, 2D] (max then min)  ->  scores [Hkv, pages] in float32.

    The product runs in the bounds' dtype (float32 on CPU; the KV dtype on GPU, as the fused kernel does).
    num_pages, a one-element long tensor: only the first num_pages pages are in use, the others score -inf (a
    captured CUDA graph reads the length on the GPU, so it scores the cache's whole capacity; an unused page's
    +-inf bounds would give NaN). candidates [Hkv, pages] bool: only those pages score (rule mass's softmax over them
    alone), the others -inf."""
    query = query.to(page_bounds.dtype)
    split_query = torch.cat([query.clamp(min=0), query.clamp(max=0)], dim=-1)  # [Hkv, G, 2D]
    if group_rule == "sum":
        split_query = split_query.sum(1, keepdim=True)  # [Hkv, 1, 2D]
    # the bounds times the query, then transposed: on the CPU the product the other way round (a GEMM of G rows
    # against the bounds' transpose) took twice as long per layer
    scores = torch.bmm(page_bounds, split_query.transpose(1, 2)).transpose(1, 2).float()  # [Hkv, G or 1, pages]
    if num_pages is not None:
        scores = scores.masked_fill(_page_index(scores) >= num_pages, -torch.inf)
    if candidates is not None:
        scores = scores.masked_fill(~candidates[:, None], -torch.inf)
    if group_rule == "mass":
        scores = torch.softmax(scores * query.shape[-1] ** -0.5, dim=-1).sum(1)  # [Hkv, pages]
        return scores if candidates is None else scores.masked_fill(~candidates, -torch.inf)
    return scores.amax(dim=1)


def pair_bounds(page_bounds: torch.Tensor) -> torch.Tensor:
    """page_bounds [Hkv, pages, 2D] (max then min) -> the bounds of the pairs of pages (0, 1), (2, 3), ...
    [Hkv, ceil(pages / 2), 2D]: each pair's max and min (an odd last page pairs with itself)."""
    num_kv_heads, pages, width = page_bounds.shape
    if pages % 2:
        page_bounds = torch.cat([page_bounds, page_bounds[:, -1:]], dim=1)
    pairs = page_bounds.view(num_kv_heads, -1, 2, width)
    dim = width // 2
    return torch.cat([pairs[..., :dim].amax(2), pairs[..., dim:].amin(2)], dim=-1)


def two_level_scores(query: torch.Tensor, page_bounds: torch.Tensor, group_rule: str, num_selected: int,
                     coarse_factor: int, num_pages: torch.Tensor | None = None,
                     pairs: torch.Tensor | None = None) -> torch.Tensor:
    """`page_scores` of QuestConfig.coarse_factor's two-level ranking -> scores [Hkv, pages]: the pairs of pages rank
    by their bounds (`pairs`, else `pair_bounds(page_bounds)`); the pages of the best coarse_factor * num_selected / 2
    pairs, and the current page, score by their own bounds (gathered: only theirs are read), every other page -inf.
    num_pages as in `page_scores`."""
    num_kv_heads, pages, width = page_bounds.shape
    candidate_pairs = -(-coarse_factor * num_selected // 2)  # (QuestConfig.bounds_read counts the same)
    if num_pages is None and candidate_pairs >= -(-pages // 2):  # every pair a candidate: every page scores
        return page_scores(query, page_bounds, group_rule)
    pair_count = None if num_pages is None else torch.div(num_pages + 1, 2, rounding_mode="floor")
    pairs = pair_bounds(page_bounds) if pairs is None else pairs
    pair_scores = page_scores(query, pairs, group_rule, pair_count)  # [Hkv, pairs]
    best = pair_scores.topk(min(pair_scores.shape[1], candidate_pairs), dim=1).indices
    used = pages if num_pages is None else num_pages
    current = torch.full_like(best[:, :1], pages - 1) if num_pages is None else (num_pages - 1).expand_as(best[:, :1])
    candidates = torch.cat([(2 * best[..., None] + torch.arange(2, device=best.device)).flatten(1), current], dim=1)
    valid = candidates < used  # [Hkv, 2C + 1]: an odd last pair's second page, unused pages, are not pages
    valid[:, -1:] &= ~(best == current // 2).any(dim=1, keepdim=True)  # the current page once
    candidates = candidates.clamp(max=pages - 1)
    bounds = torch.stack([head.index_select(0, rows) for head, rows in zip(page_bounds, candidates)])  # [Hkv, 2C+1, 2D]
    scores = page_scores(query, bounds, group_rule, candidates=valid)
    return scores.new_full((num_kv_heads, pages), -torch.inf).scatter_reduce_(1, candidates, scores, "amax")


def select_pages(scores: torch.Tensor, num_selected: int, num_pages: torch.Tensor | None = None,
                 sink_pages: int = 0) -> torch.Tensor:
    """scores [Hkv, pages] -> selected page ids [Hkv, k], k = min(num_selected, pages).

    The last page (the current one, which holds the newest token) is always selected and always last;
    the others are the top-(k-1) of the full pages by score, in no particular order, the first sink_pages pages
    (attention sinks) among them whatever they score (k > sink_pages + 1 where pages > num_selected).
    num_pages, a one-element long tensor (see `page_scores`): the pages in use are the first num_pages of
    `scores`, more than num_selected of them.
    """
    num_kv_heads, capacity = scores.shape
    if sink_pages:
        scores = scores.masked_fill(_page_index(scores) < sink_pages, torch.inf)
    if num_pages is not None:  # no host sync: the current page's index stays on the device
        selected = scores.new_empty((num_kv_heads, num_selected), dtype=torch.long)
        full_pages = scores.masked_fill(_page_index(scores) >= num_pages - 1, -torch.inf)
        torch.topk(full_pages, num_selected - 1, dim=1, sorted=False, out=(scores.new_empty(0), selected[:, :-1]))
        selected[:, -1:] = num_pages - 1
        return selected
    if num_selected >= capacity:
        return torch.arange(capacity, device=scores.device).expand(num_kv_heads, -1)
    selected = scores.new_full((num_kv_heads, num_selected), capacity - 1, dtype=torch.long)
    torch.topk(scores[:, :-1], num_selected - 1, dim=1, sorted=False, out=(scores.new_empty(0), selected[:, :-1]))
    return selected


def select_top_p(shares: torch.Tensor, top_p: float, min_pages: int, max_pages: int,
                 num_pages: torch.Tensor | None = None, sink_pages: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """shares [Hkv, pages]: each page's estimated share of its group's attention (rows sum to 1) ->
    (selected [Hkv, max_pages] page ids, page_counts [Hkv] long).

    Each KV head reads the current page, then pages in decreasing share while the share read so far is below
    top_p; page_counts, the pages it reads (current included), is clipped to [min_pages, max_pages], and top_p=1
    reads max_pages (rounding may make a partial sum of the shares reach 1). selected holds the top max_pages - 1
    full pages in decreasing share, then the current page: a head reads its first page_counts - 1 slots and the
    last (`read_slots`). A fixed width with the counts on the device: no host sync.
    num_pages, a one-element long tensor (see `page_scores`): the pages in use are the first num_pages of
    `shares`; at least max_pages of them. sink_pages: the first pages (attention sinks) are read first, whatever
    their share (min_pages > sink_pages).
    """
    num_kv_heads, capacity = shares.shape
    in_use = capacity if num_pages is None else num_pages
    full_pages = shares.masked_fill(_page_index(shares) >= in_use - 1, -torch.inf)
    if sink_pages:
        top_pages = torch.topk(full_pages.masked_fill(_page_index(shares) < sink_pages, torch.inf), max_pages - 1,
                               dim=1).indices  # the sinks first, then decreasing
        top_shares = shares.gather(1, top_pages)
        min_pages = max(min_pages, sink_pages + 1)
    else:
        top_shares, top_pages = torch.topk(full_pages, max_pages - 1, dim=1)  # [Hkv, max_pages - 1], decreasing
    current = (torch.full((num_kv_heads, 1), capacity - 1, device=shares.device) if num_pages is None
               else (num_pages - 1).view(1, 1).expand(num_kv_heads, 1))  # [Hkv, 1]
    selected = torch.cat([top_pages, current], dim=1)
    if top_p >= 1:
        return selected, torch.full((num_kv_heads,), max_pages, device=shares.device)
    read_before = shares.gather(1, current) + top_shares.cumsum(1) - top_shares  # the share read before each slot
    page_counts = 1 + (read_before < top_p).sum(1)
    return selected, page_counts.clamp(min=min_pages)


def read_slots(page_counts: torch.Tensor, width: int) -> torch.Tensor:
    """page_counts [Hkv] -> bool [Hkv, width]: the slots of a `select_top_p` selection that a head reads."""
    slot = torch.arange(width, device=page_counts.device)
    return (slot < page_counts[:, None] - 1) | (slot == width - 1)


def _page_index(scores: torch.Tensor) -> torch.Tensor:
    return torch.arange(scores.shape[-1], device=scores.device)


def streaming_pages(num_pages: int, num_selected: int, num_kv_heads: int, device) -> torch.Tensor:
    """StreamingLLM at page granularity: the first page (it holds the attention sinks) and the most recent pages,
    the current one last: [Hkv, k]."""
    if num_selected == 1:
        return torch.full((num_kv_heads, 1), num_pages - 1, device=device)
    recent = torch.arange(num_pages - num_selected + 1, num_pages, device=device)
    return torch.cat([recent.new_zeros(1), recent]).expand(num_kv_heads, -1)


def page_attention_mass(query: torch.Tensor, keys: torch.Tensor, page_size: int, scaling: float) -> torch.Tensor:
    """Dense attention of query [Hkv, G, D] over keys [Hkv, S, D], summed per page and averaged over the group:
    [Hkv, pages], each row summing to 1. The oracle's page scores, and the measure of a selection's recall."""
    probs = torch.softmax(torch.einsum("hgd,hsd->hgs", query.float(), keys.float()) * scaling, dim=-1)
    num_pages = -(-keys.shape[1] // page_size)
    padded = torch.nn.functional.pad(probs.mean(1), (0, num_pages * page_size - keys.shape[1]))
    return padded.view(keys.shape[0], num_pages, page_size).sum(-1)
