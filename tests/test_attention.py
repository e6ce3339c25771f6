"""The torch backend's attention equals plain attention over the same tokens."""
import torch

from quest_core.backend_torch import TorchBackend
from quest_core.paged_cache import PagedLayer
from quest_core.selection import page_attention_mass

backend = TorchBackend()


def reference(query, keys, values, scaling, mask=None):
    """query [Hkv, M, D], keys/values [Hkv, S, D] -> softmax(q k^T) v in float64."""
    logits = torch.einsum("hmd,hsd->hms", query.double(), keys.double()) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, -float("inf"))
    return torch.einsum("hms,hsd->hmd", logits.softmax(-1), values.double())


def randn(*shape, seed):
    """A seeded standard normal tensor: a failure reproduces."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def filled_layer(length, page_size=16, num_kv_heads=2, head_dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, num_kv_heads, length, head_dim, generator=generator)
    values = torch.randn(1, num_kv_heads, length, head_dim, generator=generator)
    layer = PagedLayer(page_size)
    layer.update(keys, values)
    return layer, keys[0], values[0]


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def test_sparse_decode_over_every_page_equals_dense():
    layer, keys, values = filled_layer(203)
    query = randn(2, 4, 32, seed=101)
    all_pages = backend.select(query, layer, num_selected=1000, group_rule="sum")
    sparse = backend.decode_sparse(query, layer, all_pages, 0.2)
    dense = backend.decode_dense(query, layer, 0.2)
    assert relative_error(sparse, reference(query, keys, values, 0.2)) <= 1e-5
    assert relative_error(dense, reference(query, keys, values, 0.2)) <= 1e-5


def test_sparse_decode_equals_attention_restricted_to_the_selected_tokens():
    layer, keys, values = filled_layer(203, page_size=8)
    query = randn(2, 3, 32, seed=102)
    selected = backend.select(query, layer, num_selected=6, group_rule="max")
    mask = torch.zeros(2, 1, 203, dtype=torch.bool)
    for head, pages in enumerate(selected.tolist()):
        for page in pages:
            mask[head, 0, page * 8:(page + 1) * 8] = True
    got = backend.decode_sparse(query, layer, selected, 0.2)
    assert relative_error(got, reference(query, keys, values, 0.2, mask)) <= 1e-5


def test_prefill_is_causal_over_the_whole_cache_with_grouped_heads():
    layer, keys, values = filled_layer(90)  # the last 20 tokens are the new chunk
    query = randn(6, 20, 32, seed=103)  # 6 query heads over 2 KV heads: group 3
    got = backend.prefill(query, layer, 0.2)
    mask = torch.arange(90) <= torch.arange(70, 90)[:, None]  # [20, 90]
    grouped = query.view(2, 3 * 20, 32)
    expected = reference(grouped, keys, values, 0.2, mask.repeat(3, 1)).view(6, 20, 32)
    assert relative_error(got, expected) <= 1e-5


def test_page_attention_mass_is_dense_attention_summed_per_page():
    layer, keys, _ = filled_layer(45, page_size=8)
    query = randn(2, 3, 32, seed=104)
    mass = page_attention_mass(query, keys, 8, 0.2)  # [Hkv, pages]
    probs = torch.softmax(torch.einsum("hgd,hsd->hgs", query.double(), keys.double()) * 0.2, -1).mean(1)
    expected = torch.stack([probs[:, p:p + 8].sum(1) for p in range(0, 45, 8)], dim=1)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.sum(1), torch.ones(2))


def test_baselines_select_sinks_plus_recent_pages_and_the_attention_mass_top_k():
    layer, keys, _ = filled_layer(100, page_size=8)  # 13 pages
    query = randn(2, 3, 32, seed=105)
    streaming = backend.select_baseline("streaming", query, layer, 4, 0.2)
    assert streaming.tolist() == [[0, 10, 11, 12]] * 2
    oracle = backend.select_baseline("oracle", query, layer, 4, 0.2)
    mass = page_attention_mass(query, keys, 8, 0.2)
    for head in range(2):
        assert set(oracle[head, :-1].tolist()) == set(mass[head, :-1].argsort(descending=True)[:3].tolist())
        assert oracle[head, -1] == 12
