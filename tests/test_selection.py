"""Page scores bound q.k from above; selection is the brute-force top-k plus the current page."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from quest_core.backend_torch import TorchBackend
from quest_core.config import QuestConfig
from quest_core.generation import decode, prefill
from quest_core.hf import QuestCache
from quest_core.paged_cache import PagedLayer
from quest_core.selection import page_scores, select_pages, two_level_scores
from quest_core.trace import Trace


def brute_force_scores(query, keys, page_size, group_rule):
    """query [Hkv, G, D], keys [Hkv, S, D] -> Quest scores [Hkv, pages] from the definition, page by page."""
    num_kv_heads, group, _ = query.shape
    if group_rule == "mass":  # each head's bounds as a softmax over the pages, summed over the group
        per_head = torch.stack([brute_force_scores(query[:, g:g + 1], keys, page_size, "sum") for g in range(group)])
        return torch.softmax(per_head * query.shape[-1] ** -0.5, dim=-1).sum(0)
    num_pages = math.ceil(keys.shape[1] / page_size)
    scores = torch.empty(num_kv_heads, num_pages, dtype=torch.float64)
    for h in range(num_kv_heads):
        for p in range(num_pages):
            page = keys[h, p * page_size:(p + 1) * page_size].double()
            kmax, kmin = page.amax(0), page.amin(0)
            per_head = [torch.maximum(q.double() * kmax, q.double() * kmin).sum() for q in query[h]]
            scores[h, p] = sum(per_head) if group_rule == "sum" else max(per_head)
    return scores


@settings(max_examples=40, deadline=None)
@given(page_size=st.sampled_from([1, 8, 16, 32]), length=st.integers(1, 200), group=st.sampled_from([1, 3, 4]),
       group_rule=st.sampled_from(["sum", "max", "mass"]), seed=st.integers(0, 10_000))
def test_scores_match_definition_and_bound_every_key(page_size, length, group, group_rule, seed):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, 16, generator=generator)
    query = torch.randn(2, group, 16, generator=generator)
    layer = PagedLayer(page_size)
    layer.update(keys, keys)
    scores = page_scores(query, layer.page_bounds[:, : layer.num_pages], group_rule)
    expected = brute_force_scores(query, keys[0], page_size, group_rule)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4)
    # the upper bound: every query head's q.k for every key of a page is <= that head's page score
    logits = torch.einsum("hgd,hsd->hgs", query, keys[0])  # [Hkv, G, S]
    for p in range(layer.num_pages):
        page_logits = logits[:, :, p * page_size:(p + 1) * page_size]
        one_head_groups = query.reshape(2 * group, 1, 16)  # rows (h, g)
        per_head_scores = page_scores(one_head_groups, layer.page_bounds[:, p:p + 1].repeat_interleave(group, 0))
        assert (page_logits.amax(-1) <= per_head_scores.view(2, group) + 1e-4).all()


@settings(max_examples=40, deadline=None)
@given(num_pages=st.integers(1, 60), budget_pages=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_selection_is_top_k_plus_current_page(num_pages, budget_pages, seed):
    scores = torch.randn(3, num_pages, generator=torch.Generator().manual_seed(seed))
    selected = select_pages(scores, budget_pages)
    k = min(budget_pages, num_pages)
    assert selected.shape == (3, k)
    assert (selected[:, -1] == num_pages - 1).all()  # the current page, always last
    assert (selected >= 0).all() and (selected < num_pages).all()  # never an unused page
    for h in range(3):
        others = set(selected[h, :-1].tolist())
        assert len(others) == k - 1 and num_pages - 1 not in others
        expected = set(scores[h, :-1].argsort(descending=True)[: k - 1].tolist())
        assert others == expected


def brute_force_selection(scores, num_selected, sink_pages):
    """scores [pages] of one KV head -> the set of pages Quest reads, from the definition: the current page, the
    sink pages, and the best-scored other pages up to num_selected."""
    current = len(scores) - 1
    others = sorted(range(sink_pages, current), key=lambda page: -float(scores[page]))
    return {current, *range(sink_pages), *others[:num_selected - 1 - sink_pages]}


@settings(max_examples=40, deadline=None)
@given(num_pages=st.integers(4, 60), sink_pages=st.integers(1, 3), seed=st.integers(0, 10_000), data=st.data())
def test_sink_pages_are_always_selected_and_the_rest_is_top_k(num_pages, sink_pages, seed, data):
    assume(num_pages > sink_pages + 2)
    budget_pages = data.draw(st.integers(sink_pages + 2, num_pages - 1), label="budget_pages")
    scores = torch.randn(3, num_pages, generator=torch.Generator().manual_seed(seed))
    scores[:, :sink_pages] -= 10  # sinks that would lose on their scores
    selected = select_pages(scores, budget_pages, sink_pages=sink_pages)
    padded = torch.nn.functional.pad(scores, (0, 7), value=-math.inf)  # the captured-graph form
    captured = select_pages(padded, budget_pages, torch.tensor([num_pages]), sink_pages)
    assert selected.shape == captured.shape == (3, budget_pages)
    assert (selected[:, -1] == num_pages - 1).all() and (captured[:, -1] == num_pages - 1).all()
    for h in range(3):
        expected = brute_force_selection(scores[h], budget_pages, sink_pages)
        assert set(selected[h].tolist()) == expected == set(captured[h].tolist())
        assert len(set(selected[h].tolist())) == budget_pages  # no page twice


def test_sink_pages_are_checked():
    assert QuestConfig(budget=8, page_size=4, sink_pages=2).budget_pages == 2  # attention reads fewer: room for 0
    with pytest.raises(ValueError):
        QuestConfig(sink_pages=-1)


@settings(max_examples=40, deadline=None)
@given(page_size=st.sampled_from([1, 4, 16]), length=st.integers(2, 300), spare_pages=st.integers(0, 40),
       group_rule=st.sampled_from(["sum", "max", "mass"]), seed=st.integers(0, 10_000))
def test_selection_reading_the_length_from_a_tensor_equals_slicing(page_size, length, spare_pages, group_rule, seed):
    """The captured-graph form: scores over the cache's whole capacity (unused pages hold +-inf bounds) with the
    page count as a tensor select what scoring the used pages alone selects."""
    assume(-(-length // page_size) >= 3)  # a current page and a budget of 2 or more pages that leaves some out
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, 16, generator=generator)
    query = torch.randn(2, 3, 16, generator=generator)
    layer = PagedLayer(page_size, block_pages=5)
    layer.update(keys, keys)
    layer.reserve(length + spare_pages * page_size)
    num_pages = layer.num_pages
    assert num_pages == -(-length // page_size)
    budget_pages = int(torch.randint(2, num_pages, (1,), generator=generator))
    scores = page_scores(query, layer.page_bounds[:, :num_pages], group_rule)
    expected = select_pages(scores, budget_pages)
    pages_tensor = torch.tensor([num_pages])
    all_scores = page_scores(query, layer.page_bounds, group_rule, pages_tensor)
    selected = select_pages(all_scores, budget_pages, pages_tensor)
    torch.testing.assert_close(all_scores[:, :num_pages], scores)
    assert (all_scores[:, num_pages:] == (0 if group_rule == "mass" else -math.inf)).all()
    assert (selected[:, -1] == num_pages - 1).all()
    for h in range(2):  # the same set, up to ties
        assert set(selected[h, :-1].tolist()) == set(expected[h, :-1].tolist()) \
            or torch.allclose(scores[h, selected[h, :-1]].sort().values, scores[h, expected[h, :-1]].sort().values)


@settings(max_examples=40, deadline=None)
@given(page_size=st.sampled_from([1, 2, 4]), length=st.integers(3, 200), group=st.sampled_from([1, 3]),
       group_rule=st.sampled_from(["sum", "max", "mass"]), coarse_factor=st.sampled_from([1, 2, 4]),
       spare_pages=st.integers(0, 9), seed=st.integers(0, 10_000))
def test_two_level_ranks_pairs_first_then_the_pages_of_the_best_pairs(page_size, length, group, group_rule,
                                                                      coarse_factor, spare_pages, seed):
    """Against the definition: a pair of pages is a page of twice the tokens, so it scores as one at 2 * page_size;
    the candidates are the pages of the best coarse_factor * k / 2 pairs and the current page, and they score as
    pages do (rule mass's softmax over the candidates alone); every other page scores -inf. The captured form
    (the page count as a tensor, over a larger capacity) scores the same."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, 16, generator=generator)
    query = torch.randn(2, group, 16, generator=generator)
    layer = PagedLayer(page_size, block_pages=5)
    layer.update(keys, keys)
    num_pages = layer.num_pages
    assume(num_pages >= 3)
    num_selected = int(torch.randint(2, num_pages, (1,), generator=generator))
    scores = two_level_scores(query, layer.page_bounds[:, :num_pages], group_rule, num_selected, coarse_factor)

    pair_scores = brute_force_scores(query, keys[0], 2 * page_size, group_rule)  # [Hkv, pairs]
    num_candidates = min(pair_scores.shape[1], -(-coarse_factor * num_selected // 2))
    ranked = pair_scores.sort(dim=1, descending=True).values
    if num_candidates < pair_scores.shape[1]:  # no near-tie at the cut (float32 against float64)
        assume(((ranked[:, num_candidates - 1] - ranked[:, num_candidates]).abs() > 1e-4 * ranked.abs().amax(1)).all())
    best = pair_scores.topk(num_candidates, dim=1).indices
    candidates = torch.stack([torch.isin(torch.arange(num_pages) // 2, best[h]) for h in range(2)])
    candidates[:, -1] = True
    if group_rule == "mass":
        logits = torch.stack([brute_force_scores(query[:, g:g + 1], keys[0], page_size, "sum") for g in range(group)])
        logits = logits.masked_fill(~candidates, -math.inf)
        expected = torch.softmax(logits * 16 ** -0.5, dim=-1).sum(0)
    else:
        expected = brute_force_scores(query, keys[0], page_size, group_rule)
    expected = expected.masked_fill(~candidates, -math.inf)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5)

    layer.reserve(length + spare_pages * page_size)
    pages_tensor = torch.tensor([num_pages])
    captured = two_level_scores(query, layer.page_bounds, group_rule, num_selected, coarse_factor, pages_tensor)
    torch.testing.assert_close(captured[:, :num_pages], scores)
    assert (captured[:, num_pages:] == -math.inf).all()


def test_two_level_settings_are_checked():
    with pytest.raises(ValueError, match="coarse_factor"):
        QuestConfig(coarse_factor=-1)
    assert QuestConfig(top_p=0.5, coarse_factor=2).coarse_factor == 2  # the adaptive budget over its candidates


class Recording(TorchBackend):
    """The torch backend, recording the two-level setting each selection gets."""

    def __init__(self):
        super().__init__()
        self.coarse_factors = []

    def select(self, query, layer, num_selected, group_rule, sink_pages=0, coarse_factor=0):
        self.coarse_factors.append(coarse_factor)
        return super().select(query, layer, num_selected, group_rule, sink_pages, coarse_factor)


def test_a_decode_ranks_in_two_levels_with_coarse_factor_and_every_pair_a_candidate_changes_nothing():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)).eval()
    prompt = torch.randint(0, 97, (200,)).tolist()

    def greedy(config, backend):
        cache = QuestCache(model.config.num_hidden_layers, config, backend=backend)
        return list(decode(model, cache, prefill(model, cache, prompt), 8, cuda_graph=False))

    config = QuestConfig(budget=16, page_size=2, dense_layers=1)
    recording = Recording()
    two_level = greedy(config.with_changes(coarse_factor=1), recording)
    assert len(two_level) == 8 and set(recording.coarse_factors) == {1}
    assert len(recording.coarse_factors) == 2 * 7  # 2 sparse layers, 7 decode steps (the first token: prefill)
    assert greedy(config.with_changes(coarse_factor=1000), TorchBackend()) == greedy(config, TorchBackend())


@pytest.mark.parametrize("coarse_factor, budget", [(0, 16), (2, 16), (4, 40)])
def test_the_trace_counts_the_bounds_a_step_reads(coarse_factor, budget):
    """A traced decode step's bytes: the dense layer's KV, then in each sparse layer the bounds the selection read
    (every page's; in two levels the pairs' and the candidates') and the selected pages' KV."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    config = QuestConfig(budget=budget, page_size=2, dense_layers=1, coarse_factor=coarse_factor)
    cache = QuestCache(3, config)
    prefill(model, cache, torch.randint(0, 97, (301,)).tolist())
    cache.trace = Trace()
    prefill(model, cache, [5])  # one token: a decode step, 302 tokens, 151 pages of 2
    step = cache.trace.end_step(cache.length, 0.0, 3)
    head_token_bytes = 2 * 16 * 4  # K and V of one token of one KV head: 16 dims, float32
    pairs, k = 76, budget // 2
    rows = 151 if not coarse_factor else pairs + 2 * min(pairs, -(-coarse_factor * k // 2)) + 1
    bounds_bytes = rows * 2 * 16 * 4 * 2  # [2D] float32 per row, 2 KV heads
    expected = 302 * 2 * head_token_bytes + 2 * (bounds_bytes + k * 2 * 2 * head_token_bytes)
    assert step.read_bytes == expected


@pytest.mark.parametrize("ahead", [False, True])
def test_a_closed_step_gives_page_ids_from_a_backends_one_head_rows(ahead):
    """The flashinfer backend selects FlashInfer's one-head rows p * Hkv + h; the trace keeps them until the step
    closes (no kernel per layer in a traced graph) and then gives page ids, -1 for a dense layer, whether the step
    closes at once or ahead of its consumer (close_step, then end_step)."""
    layer = PagedLayer(4)
    layer.update(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))  # 10 pages of 4, 2 KV heads
    pages = torch.tensor([[0, 3, 9], [2, 5, 9]], dtype=torch.int32)
    trace = Trace()
    trace.record_layer(0, layer, None)
    trace.record_layer(1, layer, pages * 2 + torch.tensor([[0], [1]], dtype=torch.int32), rows_per_page=2)
    if ahead:
        trace.close_step(40, 2)
    step = trace.end_step(40, 0.0, 2)
    assert torch.equal(step.selected_pages, torch.stack([torch.full_like(pages, -1), pages]))
