"""A model spread over devices (accelerate's device map), checked on CPU: each layer's pages and scratch live on the
device of the states it receives (`meta` stands in for a second GPU), decoding through accelerate's hooks gives
the plain model's tokens, and a cache over several devices decodes eagerly. The GPU runs: tests/test_multi_gpu.py."""
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quest_core import kernels, models
from quest_core.config import QuestConfig
from quest_core.cuda_graph import GraphDecoder
from quest_core.generation import generate_ids
from quest_core.hf import QuestCache, cache_argument, use_quest

CPU, META = torch.device("cpu"), torch.device("meta")


def states(device, length=20, num_kv_heads=2, head_dim=8):
    """A layer's new keys and values [1, Hkv, T, D] on `device`."""
    shape = (1, num_kv_heads, length, head_dim)
    return torch.randn(shape, device=device), torch.randn(shape, device=device)


def test_each_layer_keeps_its_pages_on_the_device_of_its_states():
    cache = QuestCache(3, QuestConfig(page_size=4))
    for layer, device in zip(cache.layers, (CPU, META, CPU)):
        layer.update(*states(device))
    assert [layer.keys.device for layer in cache.layers] == [CPU, META, CPU]
    assert all(layer.page_bounds.device == layer.keys.device for layer in cache.layers)
    cache.reserve(200)  # grows each layer where it is
    assert [layer.values.device for layer in cache.layers] == [CPU, META, CPU]

    selected = torch.tensor([[0, 4], [1, 4]])
    cpu_keys, _ = cache.layers[0].gather(selected)
    meta_keys, _ = cache.layers[1].gather(selected.to(META))
    assert (cpu_keys.device, meta_keys.device) == (CPU, META)
    cpu_buffer = cache.layers[0].gather_buffer.buffers[CPU][0]
    cache.layers[2].gather(selected)  # the layers of a device share its buffer: no new one for each switch
    assert cache.layers[2].gather_buffer.buffers[CPU][0] is cpu_buffer
    assert {keys.device for keys, _ in cache.layers[0].gather_buffer.buffers.values()} == {CPU, META}


class RecordingModule:
    """Stands in for the CUDA module: records the scratch tensors each call is given."""

    def __init__(self):
        self.calls = []

    def score_topk(self, *args):
        self.calls.append([arg for arg in args if isinstance(arg, torch.Tensor)])

    def sparse_decode(self, *args):
        self.calls.append([arg for arg in args if isinstance(arg, torch.Tensor)])
        return args[0]


@pytest.mark.parametrize("rule", ["sum", "mass"])
def test_score_topk_keeps_scratch_per_device(rule):
    module = RecordingModule()
    score_topk = kernels.ScoreTopK(module)
    for device in (CPU, META, CPU):
        query, bounds = torch.zeros(2, 4, 8, device=device), torch.zeros(2, 50, 16, device=device)
        score_topk(query, bounds, 50, 8, torch.zeros(2, 8, dtype=torch.int32, device=device), group_rule=rule)
    assert all(tensor.device == device for call, device in zip(module.calls, (CPU, META, CPU)) for tensor in call)
    first, _, again = module.calls  # back on the CPU: the CPU's scratch again, untouched by the meta call
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first[2:5], again[2:5]))  # scores, key ranges, counters
    assert set(score_topk.scratch) == {CPU, META}


def test_sparse_decode_keeps_scratch_per_device():
    module = RecordingModule()
    sparse_decode = kernels.SparseDecode(module)
    for device in (CPU, META, CPU):
        query, keys = torch.zeros(2, 4, 64, device=device), torch.zeros(30, 2, 16, 64, device=device)
        sparse_decode(query, keys, keys, torch.zeros(2, 5, dtype=torch.int32, device=device), 0.125, length=100)
    assert all(tensor.device == device for call, device in zip(module.calls, (CPU, META, CPU)) for tensor in call)
    first, _, again = module.calls
    assert all(a is b for a, b in zip(first[-3:], again[-3:]))


def test_device_map_auto_spreads_only_over_several_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.device_map("auto") == "auto"
    assert models.device_map("cuda") is None and models.device_map("cuda:1") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.device_map("auto") is None


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode", ["dense", "quest"])
def test_tokens_through_accelerate_hooks_equal_the_plain_model(mode):
    """accelerate's hooks on every block (as a device map across GPUs puts them) move each layer's inputs to its
    device; the cache and the quest_cache keyword pass through them untouched, and the tokens are the same."""
    from accelerate import dispatch_model

    prompt = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    config = QuestConfig(mode=mode, budget=32, page_size=4, dense_layers=1)  # sparse from the first step
    plain = tiny_llama()
    expected = generate_ids(plain, QuestCache(4, config), prompt, 24, chunk_size=32)
    blocks = ["model.embed_tokens", "model.rotary_emb", *(f"model.layers.{i}" for i in range(4)), "model.norm",
              "lm_head"]
    hooked = dispatch_model(tiny_llama(), {block: "cpu" for block in blocks}, force_hooks=True,
                            skip_keys=plain._skip_keys_device_placement)
    assert hasattr(hooked.model.layers[2], "_hf_hook")
    assert generate_ids(hooked, QuestCache(4, config), prompt, 24, chunk_size=32) == expected


def test_a_cache_over_several_devices_decodes_eagerly(caplog):
    model = tiny_llama()
    use_quest(model)
    cache = QuestCache(4, QuestConfig())
    for layer, device in zip(cache.layers, (CPU, CPU, META, META)):
        layer.update(*states(device))
    with caplog.at_level(logging.WARNING, logger="quest_core.cuda_graph"):
        decoder = GraphDecoder(model, cache, cache_argument(model))
    assert decoder.failed
    assert "cpu, meta: decoding eagerly" in caplog.text
