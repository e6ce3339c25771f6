"""Unmodified transformers models run on the quest attention and match HF `generate` token for token."""
import contextlib

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from quest_core.compiled_layers import compiled_layers
from quest_core.config import QuestConfig, default_config
from quest_core.generation import generate_ids, prefill
from quest_core.hf import QuestCache, use_quest
from quest_core.trace import Trace

SHAPES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}
PROMPT_LEN, NEW_TOKENS = 150, 32


def tiny_model(name):
    config_class, model_class, extra = MODELS[name]
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPES, **extra)).eval()
    prompt = torch.randint(0, SHAPES["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    return model, prompt.tolist()


def hf_greedy(model, prompt):
    model.set_attn_implementation("sdpa")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def ours(model, prompt, **config):
    use_quest(model)
    cache = QuestCache(model.config.num_hidden_layers, QuestConfig(**config))
    return generate_ids(model, cache, prompt, NEW_TOKENS, chunk_size=64, min_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("name", MODELS)
def test_dense_and_full_budget_quest_equal_hf_generate(name):
    model, prompt = tiny_model(name)
    expected = hf_greedy(model, prompt)
    assert ours(model, prompt, mode="dense") == expected
    assert ours(model, prompt, mode="quest", budget=PROMPT_LEN + NEW_TOKENS) == expected


@pytest.mark.parametrize("name", MODELS)
def test_small_budget_quest_reads_fewer_pages_and_still_generates(name):
    model, prompt = tiny_model(name)
    use_quest(model)
    cache = QuestCache(model.config.num_hidden_layers, QuestConfig(mode="quest", budget=32, page_size=8))
    cache.trace = Trace()
    tokens = generate_ids(model, cache, prompt, 2, min_new_tokens=2)  # one decode forward
    assert len(tokens) == 2
    step = cache.trace.end_step(cache.length, 0.0, model.config.num_hidden_layers)
    assert step.read_bytes < step.dense_bytes
    pages = step.selected_pages  # [layers, Hkv, 4]
    assert (pages[:2] == -1).all()  # the dense layers
    assert pages.shape == (4, 2, 4) and (pages[2:, :, -1] == cache.layers[2].num_pages - 1).all()


def test_default_config_follows_the_head_dim():
    """64-dim heads (the default model's) start with pages of 4 and rule mass; 128-dim heads (explicit or from
    hidden_size / heads) keep the engine's defaults."""
    small = LlamaConfig(hidden_size=576, num_attention_heads=9)  # SmolLM2-135M: head_dim 64
    assert (default_config(small).page_size, default_config(small).group_rule) == (4, "mass")
    assert default_config(LlamaConfig(hidden_size=4096, num_attention_heads=32)) == QuestConfig()
    assert default_config(Qwen3Config(hidden_size=1024, num_attention_heads=16, head_dim=128)) == QuestConfig()


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_compiled_layers_decode_like_the_model_as_it_is(name):
    """The decoder layers under torch.compile (what the CUDA-graph step runs on the GPU), teacher-forced over 8 decode
    steps with Quest sparse: in float32 the logits equal those of the uncompiled layers, and the layers are
    themselves again after the block."""
    model, prompt = tiny_model(name)
    use_quest(model)
    continuation = list(range(8))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    logits = {}
    for compiled in (False, True):
        cache = QuestCache(4, QuestConfig(budget=64, page_size=16))
        prefill(model, cache, prompt)
        with compiled_layers(model) if compiled else contextlib.nullcontext():
            logits[compiled] = torch.stack([prefill(model, cache, [token]) for token in continuation])
    assert ((logits[True] - logits[False]).norm() / logits[False].norm()).item() <= 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it did compile
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    hooked = model.model.layers[0]
    hooked.forward = hooked.forward  # a forward set on the object, as accelerate's hooks do: nothing is compiled
    with compiled_layers(model):
        assert [vars(layer).get("forward") for layer in model.model.layers] == [hooked.forward, None, None, None]


@pytest.mark.slow  # torch.compile
def test_compiled_layers_break_only_at_the_cache_update_and_the_attention():
    """Dynamo resumes inside the attention module after the graph breaks of our two calls in it (compiled_layers.py):
    a decode step's layers compile to two graphs, up to the Quest cache update (the input RMSNorm with the q/k/v
    products) and after the attention (the o product with the MLP), not split at the module's call and return."""
    if not hasattr(torch._dynamo.config, "nested_graph_breaks"):
        pytest.skip("this torch's Dynamo does not resume in nested calls")
    model, prompt = tiny_model("llama")
    use_quest(model)
    cache = QuestCache(4, QuestConfig(budget=64, page_size=16))
    prefill(model, cache, prompt)
    torch._dynamo.reset()  # compiled by an earlier test: compile again
    with compiled_layers(model), torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(prefill, model, cache, [3])
    assert len(code) == 2


def test_compiled_layers_generate_programmatic_dependent_launches_within_the_block():
    """Inductor generates the compiled layers' kernels with programmatic dependent launch (on Hopper and later; a
    GPU test reads the generated code) within the block only."""
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        pytest.skip("this torch's Inductor has no programmatic dependent launch")
    model, _ = tiny_model("llama")
    with compiled_layers(model):
        assert torch._inductor.config.triton.enable_pdl
    assert not torch._inductor.config.triton.enable_pdl


@pytest.mark.parametrize("name, config_class, model_class, extra, feature", [
    ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, "soft-capping"),
    ("mistral-window", "MistralConfig", "MistralForCausalLM", {"sliding_window": 64}, "sliding-window"),
    ("gpt-oss", "GptOssConfig", "GptOssForCausalLM", {"head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 1},
     "sinks"),
])
def test_models_whose_attention_quest_does_not_implement_are_refused(name, config_class, model_class, extra, feature):
    import transformers

    config = getattr(transformers, config_class)(**SHAPES, **extra)
    model = getattr(transformers, model_class)(config).eval()
    with pytest.raises(ValueError, match=feature):
        use_quest(model)


def test_the_attention_refuses_keywords_it_does_not_implement():
    from quest_core.hf import quest_attention

    model, prompt = tiny_model("llama")
    cache = QuestCache(model.config.num_hidden_layers, QuestConfig())
    query = torch.randn(1, 8, 1, 8)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        quest_attention(model.model.layers[0].self_attn, query, query, query, None, quest_cache=cache, softcap=30.0)
