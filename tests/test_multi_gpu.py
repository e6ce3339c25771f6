"""A model under accelerate's device map on GPUs: one GPU named for every layer decodes as the plain model (CUDA
graphs included), and a model split across two GPUs gives the single-GPU run's greedy tokens, dense and Quest,
each layer's pages on its layer's GPU. Skipped without CUDA (the two-GPU test without two GPUs); CPU checks of the
same logic: tests/test_multi_device.py."""
import logging

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from quest_core import kernels  # noqa: E402
from quest_core.backend_flashinfer import FlashInferBackend  # noqa: E402
from quest_core.config import QuestConfig  # noqa: E402
from quest_core.generation import decode, generate_ids, prefill  # noqa: E402
from quest_core.hf import QuestCache  # noqa: E402
from quest_core.trace import Trace  # noqa: E402

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="the CUDA kernels did not build")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
NUM_LAYERS = 4
CONFIGS = {"dense": QuestConfig(mode="dense"), "quest": QuestConfig(budget=256, page_size=16)}  # sparse at once


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A random 4-layer GQA Llama (8 q / 2 kv heads, head_dim 64) in bf16, saved as a folder to load with a map."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def load(folder, device_map):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device_map).eval()


def block_map(layer_devices: list[str]) -> dict:
    """A device map naming every block: the embedding on the first layer's device, the head on the last's."""
    return {"model.embed_tokens": layer_devices[0], "model.rotary_emb": layer_devices[0],
            **{f"model.layers.{i}": device for i, device in enumerate(layer_devices)},
            "model.norm": layer_devices[-1], "lm_head": layer_devices[-1]}


def prompt():
    return torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(1)).tolist()


def greedy(model, mode, cuda_graph=True):
    """(64 greedy tokens after a 700-token prompt, the cache) with the flashinfer backend."""
    cache = QuestCache(NUM_LAYERS, CONFIGS[mode], FlashInferBackend("cuda:0"))
    tokens = generate_ids(model, cache, prompt(), 64, chunk_size=256, min_new_tokens=64, cuda_graph=cuda_graph)
    return tokens, cache


@needs_kernels
@pytest.mark.parametrize("mode", ["dense", "quest"])
def test_a_map_naming_cuda0_for_every_layer_decodes_as_the_plain_model(saved_llama, mode):
    plain_tokens, _ = greedy(load(saved_llama, None).to("cuda:0"), mode)
    tokens, cache = greedy(load(saved_llama, block_map(["cuda:0"] * NUM_LAYERS)), mode)
    assert tokens == plain_tokens
    assert all(layer.keys.device == torch.device("cuda:0") for layer in cache.layers)
    assert cache.graph_decoder is not None and not cache.graph_decoder.failed  # one GPU: the step is a CUDA graph


@needs_kernels
@needs_two_gpus
@pytest.mark.parametrize("mode", ["dense", "quest"])
def test_two_gpus_give_the_single_gpu_tokens(saved_llama, mode, caplog):
    """Layers 0-1 on cuda:0, 2-3 on cuda:1: each layer's pages on its GPU, our kernels and FlashInfer run there,
    and the greedy tokens are the single-GPU model's (both eager: the split model cannot replay a CUDA graph)."""
    expected, _ = greedy(load(saved_llama, None).to("cuda:0"), mode, cuda_graph=False)
    split = load(saved_llama, block_map(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]))
    with caplog.at_level(logging.WARNING, logger="quest_core.cuda_graph"):
        tokens, cache = greedy(split, mode)
    assert tokens == expected
    assert [layer.keys.device.index for layer in cache.layers] == [0, 0, 1, 1]
    assert [layer.page_bounds.device.index for layer in cache.layers] == [0, 0, 1, 1]
    assert set(cache.backend.devices) == {torch.device("cuda:0"), torch.device("cuda:1")}
    assert cache.graph_decoder.failed and "decoding eagerly" in caplog.text


@needs_kernels
@needs_two_gpus
def test_two_gpus_traced_quest_decode(saved_llama):
    """A traced answer on the split model (layer 1 sparse on cuda:0, layers 2-3 on cuda:1): the trace gathers the
    selected pages and the attention times from both GPUs."""
    split = load(saved_llama, block_map(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]))
    cache = QuestCache(NUM_LAYERS, CONFIGS["quest"].with_changes(dense_layers=1), FlashInferBackend("cuda:0"))
    logits = prefill(split, cache, prompt(), chunk_size=256)
    cache.trace = Trace()
    steps = []
    for index, _ in enumerate(decode(split, cache, logits, 16, min_new_tokens=16)):
        if index:  # as the session does: the step that made this token
            steps.append(cache.trace.end_step(cache.length, 0.0, NUM_LAYERS))
    assert len(steps) == 15
    assert all((step.selected_pages[1:] >= 0).all() and (step.selected_pages[0] < 0).all() for step in steps)
    assert all(step.attention_s is not None and step.attention_s > 0 for step in steps)
