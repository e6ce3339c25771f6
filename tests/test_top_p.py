"""Top-p, the adaptive budget: against brute force, the pages read are the smallest prefix in share order (after
the current page) that reaches p, clipped to [min, max] pages; the attention over them is plain attention over their
tokens; and a decode through a small random Llama records per-head page counts in [min, max]."""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracles import attention, relative_error
from transformers import LlamaConfig, LlamaForCausalLM

from app import handlers
from app.sessions import ChatState, OpenSessions
from quest_core.backend_torch import TorchBackend
from quest_core.config import QuestConfig
from quest_core.hf import QuestCache
from quest_core.models import load_model
from quest_core.paged_cache import PagedLayer
from quest_core.selection import page_scores, read_slots, select_top_p, two_level_scores
from quest_core.session import Session
from quest_core.trace import mean_pages_read

HAMLET = Path(__file__).resolve().parent.parent / "assets" / "hamlet.txt"
backend = TorchBackend()


def filled_layer(length, page_size, seed=0):
    """A head-major layer of 2 KV heads of 32 dims holding `length` random tokens; its keys, values [2, S, 32]."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 1, 2, length, 32, generator=generator)
    layer = PagedLayer(page_size, kv_layout="head-major")
    layer.update(keys, values)
    return layer, keys[0], values[0]


def brute_force_top_p(shares, top_p, min_pages, max_pages, sink_pages=0):
    """shares [pages] of one KV head -> the set of pages it reads, from the definition, in float64: the current
    page, the sink pages, then pages in decreasing share."""
    current = len(shares) - 1
    others = sorted(range(current), key=lambda page: (page >= sink_pages, -float(shares[page])))
    read, share = [current], float(shares[current])
    while others and (share < top_p or len(read) < max(min_pages, sink_pages + 1)) and len(read) < max_pages:
        page = others.pop(0)
        read.append(page)
        share += float(shares[page])
    return set(read)


def read_pages(selected, page_counts):
    """A select_top_p selection -> the set of pages each head reads."""
    slots = read_slots(page_counts, selected.shape[1])
    return [set(selected[h][slots[h]].tolist()) for h in range(selected.shape[0])]


def near_a_prefix_sum(shares, top_p, tolerance=1e-5, sink_pages=0):
    """float32 and float64 sums may disagree on a prefix that reaches p by less than rounding."""
    for row in shares.double():
        sinks = row[:sink_pages]
        current, others = row[-1], torch.cat([sinks, row[sink_pages:-1].sort(descending=True).values])
        prefix = current + torch.cat([others.new_zeros(1), others.cumsum(0)])
        if (prefix - top_p).abs().min() < tolerance:
            return True
    return False


@settings(max_examples=60, deadline=None)
@given(num_pages=st.integers(3, 60), sharpness=st.floats(0.1, 5.0), top_p=st.floats(0.05, 0.99),
       seed=st.integers(0, 10_000), data=st.data())
def test_the_pages_read_are_the_smallest_prefix_in_share_order_reaching_p(num_pages, sharpness, top_p, seed, data):
    max_pages = data.draw(st.integers(2, num_pages), label="max_pages")
    min_pages = data.draw(st.integers(2, max_pages), label="min_pages")
    generator = torch.Generator().manual_seed(seed)
    shares = torch.softmax(sharpness * torch.randn(3, num_pages, generator=generator), dim=-1)
    assume(not near_a_prefix_sum(shares, top_p))
    selected, page_counts = select_top_p(shares, top_p, min_pages, max_pages)
    assert selected.shape == (3, max_pages) and page_counts.shape == (3,)
    assert (selected[:, -1] == num_pages - 1).all()  # the current page, always last
    assert ((min_pages <= page_counts) & (page_counts <= max_pages)).all()
    for h, pages in enumerate(read_pages(selected, page_counts)):
        assert len(pages) == page_counts[h]
        assert pages == brute_force_top_p(shares[h], top_p, min_pages, max_pages)


@settings(max_examples=60, deadline=None)
@given(num_pages=st.integers(4, 60), sharpness=st.floats(0.1, 5.0), top_p=st.floats(0.05, 0.99),
       sink_pages=st.integers(1, 2), seed=st.integers(0, 10_000), data=st.data())
def test_sink_pages_are_read_first_whatever_their_share(num_pages, sharpness, top_p, sink_pages, seed, data):
    assume(num_pages >= sink_pages + 2)
    max_pages = data.draw(st.integers(sink_pages + 2, num_pages), label="max_pages")
    min_pages = data.draw(st.integers(sink_pages + 2, max_pages), label="min_pages")
    generator = torch.Generator().manual_seed(seed)
    shares = torch.softmax(sharpness * torch.randn(3, num_pages, generator=generator), dim=-1)
    assume(not near_a_prefix_sum(shares, top_p, sink_pages=sink_pages))
    selected, page_counts = select_top_p(shares, top_p, min_pages, max_pages, sink_pages=sink_pages)
    padded = torch.nn.functional.pad(shares, (0, 5))  # the captured-graph form, the count as a tensor
    captured = select_top_p(padded, top_p, min_pages, max_pages, torch.tensor([num_pages]), sink_pages)
    assert read_pages(*captured) == read_pages(selected, page_counts)
    for h, pages in enumerate(read_pages(selected, page_counts)):
        assert set(range(sink_pages)) <= pages
        assert pages == brute_force_top_p(shares[h], top_p, min_pages, max_pages, sink_pages)


@settings(max_examples=30, deadline=None)
@given(num_pages=st.integers(3, 40), spare_pages=st.integers(0, 20), top_p=st.floats(0.05, 1.0),
       seed=st.integers(0, 10_000))
def test_reading_the_page_count_from_a_tensor_equals_slicing(num_pages, spare_pages, top_p, seed):
    """The captured-graph form: shares over the cache's capacity (unused pages hold 0) and the count as a tensor."""
    generator = torch.Generator().manual_seed(seed)
    shares = torch.softmax(torch.randn(2, num_pages, generator=generator), dim=-1)
    max_pages = int(torch.randint(2, num_pages + 1, (1,), generator=generator))
    expected = select_top_p(shares, top_p, 2, max_pages)
    padded = torch.nn.functional.pad(shares, (0, spare_pages))
    got = select_top_p(padded, top_p, 2, max_pages, torch.tensor([num_pages]))
    assert read_pages(*got) == read_pages(*expected)


def test_top_p_one_reads_max_pages_even_where_fewer_hold_all_the_share():
    shares = torch.softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(1)), dim=-1)
    shares[1] = torch.cat([torch.tensor([0.75, 0.25]), torch.zeros(28)])  # a sharp softmax underflows to 0
    _, page_counts = select_top_p(shares, 1.0, 2, 17)
    assert (page_counts == 17).all()


def test_attention_over_a_top_p_selection_equals_attention_restricted_to_the_pages_read():
    layer, keys, values = filled_layer(203, page_size=4)  # 51 pages
    query = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(105))
    selected, page_counts = backend.select_top_p(query, layer, 0.6, 3, 40)
    shares = page_scores(query, layer.page_bounds[:, :layer.num_pages], "mass") / 3  # [Hkv, pages]
    torch.testing.assert_close(shares.sum(1), torch.ones(2))
    expected = [brute_force_top_p(shares[h], 0.6, 3, 40) for h in range(2)]
    assert read_pages(selected, page_counts) == expected
    assert (page_counts < 40).any()  # some pages are left out: the mask matters
    mask = torch.zeros(2, 1, 203, dtype=torch.bool)
    for head, pages in enumerate(read_pages(selected, page_counts)):
        for page in pages:
            mask[head, 0, page * 4:(page + 1) * 4] = True
    got = backend.decode_sparse(query, layer, selected, 0.2, page_counts)
    assert relative_error(got, attention(query, keys, values, 0.2, mask)) <= 1e-5


@settings(max_examples=30, deadline=None)
@given(length=st.integers(40, 300), top_p=st.floats(0.3, 0.99), coarse_factor=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 10_000))
def test_top_p_over_a_two_level_ranking_reads_a_prefix_of_its_candidates_shares(length, top_p, coarse_factor, seed):
    """With coarse_factor, a head's shares are the two-level ranking's mass (selection.two_level_scores, tested
    against its definition in test_selection.py) over its candidates for max_pages, 0 elsewhere: the pages read are
    the brute-force prefix of those shares, all of them candidates."""
    layer, _, _ = filled_layer(length, page_size=2, seed=seed)
    query = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(seed))
    max_pages = min(12, layer.num_pages - 1)
    selected, page_counts = backend.select_top_p(query, layer, top_p, 3, max_pages, coarse_factor=coarse_factor)
    scores = two_level_scores(query, layer.page_bounds[:, :layer.num_pages], "mass", max_pages, coarse_factor)
    shares = scores.clamp(min=0) / 3
    assume(not near_a_prefix_sum(shares, top_p))
    for h, pages in enumerate(read_pages(selected, page_counts)):
        assert pages == brute_force_top_p(shares[h], top_p, 3, max_pages)
        assert all(scores[h, page] > -math.inf for page in pages)


def test_top_p_one_with_every_page_as_the_maximum_equals_dense():
    layer, keys, values = filled_layer(203, page_size=8)  # 26 pages
    query = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(106))
    selected, page_counts = backend.select_top_p(query, layer, 1.0, 2, layer.num_pages)
    assert (page_counts == layer.num_pages).all()
    got = backend.decode_sparse(query, layer, selected, 0.2, page_counts)
    assert relative_error(got, backend.decode_dense(query, layer, 0.2)) <= 1e-5
    assert relative_error(got, attention(query, keys, values, 0.2)) <= 1e-5


def test_settings_are_checked():
    assert QuestConfig(top_p=0.9, budget=256, min_budget=32).min_budget_pages == 2
    for wrong in (dict(top_p=0.0), dict(top_p=1.5), dict(top_p=0.9, min_budget=512, budget=256),
                  dict(top_p=0.9, min_budget=16), dict(top_p=0.9, mode="streaming")):
        with pytest.raises(ValueError):
            QuestConfig(**wrong)
    assert QuestConfig(page_size=64).top_p is None  # min_budget matters only with top_p
    config = QuestConfig(top_p=0.9)
    assert config.with_changes(top_p=None).top_p == 0.9 and config.with_changes(top_p=0).top_p is None


def test_a_backend_without_adaptive_budget_refuses_top_p_by_name():
    class FixedWidth(TorchBackend):
        name, adaptive_budget = "flashinfer", False

    cache = QuestCache(2, QuestConfig(), FixedWidth())
    with pytest.raises(ValueError, match="flashinfer"):
        cache.set_config(QuestConfig(top_p=0.9))
    with pytest.raises(ValueError, match="flashinfer"):
        QuestCache(2, QuestConfig(top_p=0.9), FixedWidth())


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(dtype="fp32", device="cpu")[1]


def small_session(tokenizer, config: QuestConfig) -> Session:
    """A random 3-layer Llama (2 KV heads of 16 dims, fp32) with 300 tokens of Hamlet ingested."""
    torch.manual_seed(0)
    model_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               initializer_range=0.2)  # sharper attention than the default 0.02's, nearly uniform
    session = Session(LlamaForCausalLM(model_config).eval(), tokenizer, config)
    hamlet = tokenizer(HAMLET.read_text(), add_special_tokens=False)["input_ids"]
    session.ingest(tokenizer.decode(hamlet[:300]))
    return session


@pytest.mark.parametrize("coarse_factor", [0, 1])
def test_a_decode_with_top_p_reads_between_min_and_max_pages_per_head(tokenizer, coarse_factor):
    config = QuestConfig(budget=128, page_size=4, dense_layers=1, top_p=0.5, min_budget=16,  # 4 to 32 pages
                         coarse_factor=coarse_factor)
    session = small_session(tokenizer, config)
    run = session.answer("Who is there?", max_new_tokens=6, min_new_tokens=6, inspect=True)
    traced = [step.trace for step in run.steps if step.trace is not None]
    assert len(traced) == 5 and run.top_p == 0.5
    for trace in traced:
        num_pages = -(-trace.context_len // 4)
        sparse = trace.pages_read[1:]  # [2 layers, Hkv]
        assert ((4 <= sparse) & (sparse <= 32)).all()
        assert (trace.pages_read[0] == num_pages).all()  # the dense layer reads every page
        read = trace.selected_pages[1:]
        assert ((read >= 0).sum(-1) == sparse).all()  # the trace's pages are the pages read, -1 elsewhere
        assert (read[..., -1] == num_pages - 1).all()
        assert ((0 < trace.recall[1:]) & (trace.recall[1:] <= 1 + 1e-6)).all()  # dense mass on the pages read
        last_page_len = trace.context_len - (num_pages - 1) * 4
        head_token_bytes = 2 * 16 * 4  # K and V, 16 dims, float32
        page_bytes = ((sparse - 1) * 4 + last_page_len).sum().item() * head_token_bytes
        bounds_bytes = 2 * config.bounds_read(num_pages) * 2 * 16 * 2 * 4  # 2 sparse layers, [Hkv, rows, 2D] fp32
        assert trace.read_bytes == trace.context_len * 2 * head_token_bytes + page_bytes + bounds_bytes
    counts = torch.stack([trace.pages_read[1:] for trace in traced])
    assert len(counts.unique()) > 1  # the budget adapts, per head and step
    assert run.mean_pages_read == pytest.approx(counts.float().mean().item())
    assert run.mean_pages_read == pytest.approx(mean_pages_read(traced))


def test_the_apps_top_p_slider_sets_the_adaptive_budget_and_0_clears_it(tokenizer):
    state = ChatState(session=small_session(tokenizer, QuestConfig(page_size=4, dense_layers=1)), document_name="doc")
    server = handlers.Server(state.session.model, tokenizer, None, OpenSessions(1))

    def ask(top_p) -> str:
        *_, last = handlers.ask(server, "Who is there?", "quest", 128, 4, 1, False, 4, 0.0, 1.2, 0, 1, 0, top_p, False,
                                state)
        return last["metrics"]

    metrics = ask(0.5)
    assert state.session.config.top_p == 0.5 and state.answer.top_p == 0.5
    assert f"top-p 0.5, up to 32 pages of 4: {state.answer.mean_pages_read:.1f} pages per head" in metrics
    metrics = ask(0)
    assert state.session.config.top_p is None and state.answer.top_p is None and "top-p" not in metrics
