"""The paged cache stores every token where its page says and keeps each page's true key min/max, in both layouts."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quest_core.paged_cache import KV_LAYOUTS, PagedLayer
from quest_core.selection import pair_bounds


def fill(page_size, chunk_lengths, num_kv_heads=2, head_dim=8, dtype=torch.float32, seed=0, kv_layout="page-major"):
    generator = torch.Generator().manual_seed(seed)
    layer = PagedLayer(page_size, block_pages=3, kv_layout=kv_layout)
    all_keys, all_values = [], []
    for length in chunk_lengths:
        keys = torch.randn(1, num_kv_heads, length, head_dim, generator=generator).to(dtype)
        values = torch.randn(1, num_kv_heads, length, head_dim, generator=generator).to(dtype)
        layer.update(keys, values)
        all_keys.append(keys[0])
        all_values.append(values[0])
    return layer, torch.cat(all_keys, dim=1), torch.cat(all_values, dim=1)


def true_bounds(keys, page_size):
    """keys [Hkv, S, D] -> true per-page max and min [Hkv, pages, D] by brute force."""
    pages = [keys[:, p:p + page_size] for p in range(0, keys.shape[1], page_size)]
    return torch.stack([p.amax(1) for p in pages], 1), torch.stack([p.amin(1) for p in pages], 1)


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([1, 8, 16, 32]), chunks=st.lists(st.integers(1, 70), min_size=1, max_size=8),
       kv_layout=st.sampled_from(KV_LAYOUTS))
def test_metadata_equals_true_min_max_after_random_appends(page_size, chunks, kv_layout):
    layer, keys, values = fill(page_size, chunks, kv_layout=kv_layout)
    assert layer.length == keys.shape[1]
    expected_max, expected_min = true_bounds(keys, page_size)
    assert torch.equal(layer.page_max[:, : layer.num_pages], expected_max)
    assert torch.equal(layer.page_min[:, : layer.num_pages], expected_min)
    stored_keys, stored_values = layer.dense()
    assert torch.equal(stored_keys, keys) and torch.equal(stored_values, values)


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
def test_pages_hold_tokens_in_order_and_unused_pages_stay_empty(kv_layout):
    layer, keys, _ = fill(16, [5, 30, 1, 1], kv_layout=kv_layout)  # 37 tokens: 3 pages, the last holds 5
    assert (layer.num_pages, layer.last_page_len) == (3, 5)
    assert torch.equal(layer.key_pages[1, :, 3], keys[:, 19])
    page_axis = 0 if kv_layout == "page-major" else 1
    assert torch.equal(layer.keys.select(page_axis, 1)[:, 3], keys[:, 19])  # the storage is laid out as named
    assert layer.capacity_pages % 3 == 0  # grown by whole blocks
    assert torch.isinf(layer.page_max[:, 3:]).all() and (layer.page_max[:, 3:] < 0).all()
    assert torch.isinf(layer.page_min[:, 3:]).all() and (layer.page_min[:, 3:] > 0).all()


@settings(max_examples=30, deadline=None)
@given(page_size=st.sampled_from([1, 8, 16]), chunks=st.lists(st.integers(1, 50), min_size=1, max_size=5),
       cut=st.floats(0, 1), extra=st.integers(1, 40), kv_layout=st.sampled_from(KV_LAYOUTS),
       seed=st.integers(0, 10_000))
def test_truncate_then_append_equals_appending_the_kept_tokens(page_size, chunks, cut, extra, kv_layout, seed):
    layer, keys, values = fill(page_size, chunks, seed=seed, kv_layout=kv_layout)
    keep = int(cut * keys.shape[1])
    layer.truncate(keep)
    generator = torch.Generator().manual_seed(seed + 1)
    more_keys, more_values = (torch.randn(1, 2, extra, 8, generator=generator) for _ in range(2))
    layer.update(more_keys, more_values)
    expected_keys = torch.cat([keys[:, :keep], more_keys[0]], dim=1)
    expected_max, expected_min = true_bounds(expected_keys, page_size)
    assert torch.equal(layer.dense()[0], expected_keys)
    assert torch.equal(layer.page_max[:, : layer.num_pages], expected_max)
    assert torch.equal(layer.page_min[:, : layer.num_pages], expected_min)
    assert torch.isinf(layer.page_max[:, layer.num_pages:]).all()


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
def test_repage_keeps_tokens_and_rebuilds_metadata(kv_layout):
    layer, keys, values = fill(16, [40, 1, 1, 9], kv_layout=kv_layout)
    layer.repage(8)
    expected_max, expected_min = true_bounds(keys, 8)
    assert layer.page_size == 8 and layer.num_pages == 7
    assert torch.equal(layer.dense()[0], keys) and torch.equal(layer.dense()[1], values)
    assert torch.equal(layer.page_max[:, :7], expected_max) and torch.equal(layer.page_min[:, :7], expected_min)


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
def test_gather_returns_selected_pages_with_the_partial_current_page_last(kv_layout):
    layer, keys, values = fill(8, [29], kv_layout=kv_layout)  # pages 0..3, the last holds 5 tokens
    selected = torch.tensor([[2, 0, 3], [1, 2, 3]])
    got_keys, got_values = layer.gather(selected)
    for head, pages in enumerate(selected.tolist()):
        index = torch.cat([torch.arange(p * 8, min(p * 8 + 8, 29)) for p in pages])
        assert torch.equal(got_keys[head], keys[head, index])
        assert torch.equal(got_values[head], values[head, index])


def test_bf16_metadata_is_exact():
    layer, keys, _ = fill(16, [33, 1, 7], dtype=torch.bfloat16)
    expected_max, expected_min = true_bounds(keys, 16)
    assert torch.equal(layer.page_max[:, :3], expected_max.float())
    assert torch.equal(layer.page_min[:, :3], expected_min.float())


def test_head_major_dense_reads_are_views_of_the_cache():
    """The torch backend's dense decode reads the head-major cache in place: no per-step copy of the KV."""
    layer, keys, values = fill(8, [29, 1], kv_layout="head-major")
    dense_keys, dense_values = layer.dense()
    assert torch.equal(dense_keys, keys) and torch.equal(dense_values, values)
    assert dense_keys.untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()
    assert dense_values.untyped_storage().data_ptr() == layer.values.untyped_storage().data_ptr()


@settings(max_examples=50, deadline=None)
@given(page_size=st.sampled_from([1, 2, 4]), steps=st.lists(st.tuples(st.sampled_from(["append", "truncate", "repage"]),
                                                                     st.integers(1, 40)), min_size=1, max_size=10),
       kv_layout=st.sampled_from(KV_LAYOUTS), seed=st.integers(0, 10_000))
def test_kept_pair_bounds_equal_the_pairs_of_the_page_bounds(page_size, steps, kv_layout, seed):
    """With keep_pairs (the two-level ranking), after any appends (one token or a chunk), truncations and re-pagings,
    over a capacity grown in odd blocks: the kept pair bounds are the pairs folded from the page bounds (every pair,
    the empty ones too), exactly."""
    generator = torch.Generator().manual_seed(seed)
    layer = PagedLayer(page_size, block_pages=3, kv_layout=kv_layout)
    layer.keep_pairs(True)
    for action, amount in steps:
        if action == "append":
            keys, values = torch.randn(2, 1, 2, amount if amount % 3 else 1, 8, generator=generator)
            layer.update(keys, values)
        elif action == "truncate":
            layer.truncate(layer.length * amount // 41)
        elif layer.is_initialized:
            layer.repage(1 + amount % 4)
        if layer.is_initialized:
            assert torch.equal(layer.pair_bounds, pair_bounds(layer.page_bounds)), (action, amount)
