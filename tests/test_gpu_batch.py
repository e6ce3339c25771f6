"""A batch of requests on the GPU (the flashinfer backend over an engine's page pool): our sparse decode over the
heads of several requests, each reading its own length; a batched decode step against each request decoded
alone; a batch's CUDA graph against its eager steps; greedy steps run ahead of the host against the host's picks;
two caches' graphs replayed in turn; the engine's answers asked at once against the same answers one after another.
Skipped without CUDA."""
import contextlib

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from oracles import attention, relative_error  # noqa: E402
from test_batch import asked_at_once  # noqa: E402
from test_gpu import filled, module, needs_kernels, selected_mask, tiny_llama  # noqa: E402

from quest_core import cuda_graph, kernels  # noqa: E402
from quest_core.backend_flashinfer import FlashInferBackend  # noqa: E402
from quest_core.config import QuestConfig  # noqa: E402
from quest_core.cuda_graph import BatchGraphDecoder, graph_decoder  # noqa: E402
from quest_core.engine import Engine, Request  # noqa: E402
from quest_core.generation import answer_processors, decode, next_token, prefill  # noqa: E402
from quest_core.hf import QuestCache, cache_argument, forward_batch  # noqa: E402
from quest_core.paged_cache import PagePool  # noqa: E402
from quest_core.trace import Trace  # noqa: E402

PAGE = 16
# dense; two Quest requests of one setting (one sparse decode); rule mass; contexts of different lengths
SETTINGS = [QuestConfig(mode="dense", page_size=PAGE), QuestConfig(budget=256, page_size=PAGE),
            QuestConfig(budget=256, page_size=PAGE), QuestConfig(budget=128, page_size=PAGE, group_rule="mass")]
PROMPTS = [500, 700, 1100, 903]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_over_the_heads_of_a_batch(dtype):
    """Three requests' pages in one pool, each with its own length (its current page part-full by a different
    amount): one call over the 3 * Hkv heads equals float32 attention over each request's selected pages."""
    num_kv_heads, group, head_dim, k = 2, 4, 128, 40
    lengths, starts = [1000, 1601, 2047], [5, 80, 200]
    pool = torch.randn(2, 400, num_kv_heads, PAGE, head_dim, device="cuda").to(dtype)
    query = torch.randn(3, num_kv_heads, group, head_dim, device="cuda").to(dtype)
    generator = torch.Generator().manual_seed(0)
    rows, expected = [], []
    for length, start in zip(lengths, starts):
        num_pages = -(-length // PAGE)
        pages = torch.stack([torch.randperm(num_pages - 1, generator=generator)[:k - 1] for _ in range(num_kv_heads)])
        pages = torch.cat([pages, torch.full((num_kv_heads, 1), num_pages - 1)], 1).cuda()
        rows.append((pages + start) * num_kv_heads + torch.arange(num_kv_heads, device="cuda")[:, None])
        keys, values = (t[start:start + num_pages].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :length]
                        for t in pool)
        expected.append(attention(query[len(expected)], keys, values, head_dim ** -0.5,
                                  selected_mask(pages, PAGE, length), torch.float32))
    got = kernels.SparseDecode(module)(query.view(-1, group, head_dim), pool[0], pool[1],
                                       torch.cat(rows).int(), head_dim ** -0.5,
                                       device_length=torch.tensor(lengths, device="cuda"))
    error = relative_error(got.view_as(query), torch.stack(expected))
    assert error <= {torch.bfloat16: 5e-3, torch.float16: 1e-3}[dtype], error


@needs_kernels
@pytest.mark.parametrize("group_rule", ["sum", "max", "mass"])
def test_the_batched_scorer_equals_each_request_scored_alone(group_rule):
    """Three requests' page bounds (caches of different capacities, lengths and current-page fills) scored in one
    launch over their 3 * Hkv heads, each reading its own length on the GPU: the same rows as each request scored
    alone (test_gpu.py holds those against the float32 twin), the sink pages and the current page in their slots."""
    num_kv_heads, group, head_dim, k, sink_pages = 2, 4, 128, 40, 2
    layers = [filled(length, PAGE, num_kv_heads, head_dim, torch.bfloat16, seed=seed)
              for seed, length in enumerate((1000, 3001, 2047))]
    query = torch.randn(3, num_kv_heads, group, head_dim, device="cuda").to(torch.bfloat16)
    backend = FlashInferBackend("cuda")
    alone = torch.stack([backend.select(row, layer, k, group_rule, sink_pages).clone()
                         for row, layer in zip(query, layers)])
    assert len({layer.page_bounds.shape[1] for layer in layers}) > 1  # different capacities
    got = backend.select_batch(query, layers, k, group_rule, sink_pages)
    assert torch.equal(got.sort(-1).values, alone.sort(-1).values)
    assert torch.equal(got[..., -1 - sink_pages:], alone[..., -1 - sink_pages:])  # the sinks, then the current page


@needs_kernels
def test_the_batched_append_equals_each_request_appended_alone():
    """Three requests' caches in one pool (current pages part-full, one full so its token begins a page): a
    captured step's append, once over the 3 * Hkv heads at their lengths on the GPU, leaves the pool and every
    request's page bounds as appending each request's token alone does."""
    backend = FlashInferBackend("cuda")
    generator = torch.Generator(device="cuda").manual_seed(6)
    lengths = (100, 160, 37)  # 160: a full last page

    def caches():
        pool = PagePool(1, 256, 2, PAGE, 64, torch.bfloat16, "cuda")
        pool.keys[0].zero_(), pool.values[0].zero_()
        made = [QuestCache(1, QuestConfig(page_size=PAGE), backend, pool) for _ in lengths]
        for cache, length in zip(made, lengths):
            cache.reserve(length + 8)
            cache.layers[0].update(*torch.randn(2, 1, 2, length, 64, device="cuda", generator=generator)
                                   .to(torch.bfloat16))
        return pool, made

    generator.manual_seed(6)
    pool, batched = caches()
    generator.manual_seed(6)
    twin_pool, alone = caches()
    keys, values = torch.randn(2, 3, 2, 1, 64, device="cuda").to(torch.bfloat16)
    layers = [cache.layers[0] for cache in batched]
    for layer, length in zip(layers, lengths):  # as a captured step runs it: the lengths after the append
        layer.device_length = torch.tensor([length + 1], device="cuda")
    backend.append_batch(keys, values, layers)
    backend.append_batch(keys, values, [cache.layers[0] for cache in alone])  # eager: one request after another
    assert torch.equal(pool.keys[0], twin_pool.keys[0]) and torch.equal(pool.values[0], twin_pool.values[0])
    for layer, twin in zip(layers, alone):
        assert torch.equal(layer.page_bounds, twin.layers[0].page_bounds)


def pooled_caches(model, backend, pool_pages=1024):
    config = model.config
    pool = PagePool(config.num_hidden_layers, pool_pages, config.num_key_value_heads, PAGE,
                    config.hidden_size // config.num_attention_heads, model.dtype, "cuda")
    return pool, [QuestCache(config.num_hidden_layers, settings, backend, pool) for settings in SETTINGS]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_batched_step_equals_each_request_alone(dtype, capsys):
    """Teacher-forced on the same 32 tokens: four requests (dense, Quest at two budgets and rules, different
    lengths) decoded as one batch over the pool give the logits each gives decoded alone in its own cache."""
    model = tiny_llama(dtype)
    backend = FlashInferBackend("cuda")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in PROMPTS]
    continuation = torch.randint(0, 256, (32,), generator=generator).tolist()
    alone = []
    for settings, prompt in zip(SETTINGS, prompts):
        cache = QuestCache(4, settings, backend)
        prefill(model, cache, prompt, chunk_size=256)
        alone.append(torch.stack([prefill(model, cache, [token]) for token in continuation]).float())
    pool, caches = pooled_caches(model, backend)
    for cache, prompt in zip(caches, prompts):
        prefill(model, cache, prompt, chunk_size=256)
    with torch.inference_mode():
        batched = torch.stack([forward_batch(model, caches, [token] * len(caches), cache_argument(model))
                               for token in continuation], 1)  # [B, 32, vocab]
    errors = [relative_error(batched[row], alone[row]) for row in range(len(caches))]
    with capsys.disabled():
        print(f"\n{dtype}: batched vs alone, logits rel err per request {[round(e, 5) for e in errors]}")
    assert max(errors) <= {torch.bfloat16: 0.02, torch.float16: 0.005}[dtype]
    assert all(cache.length == prompt_len + 32 for cache, prompt_len in zip(caches, PROMPTS))


def twin_batches(model, seed: int) -> list[list[QuestCache]]:
    """Two copies of four prefilled requests in one pool, each with room for 64 more tokens: dense, Quest at budget
    256, Quest at budget 256 over a 240-token prompt (it turns sparse on the way), rule mass at budget 128."""
    backend = FlashInferBackend("cuda")
    settings = [SETTINGS[0], SETTINGS[1], QuestConfig(budget=256, page_size=PAGE), SETTINGS[3]]
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (500, 700, 240, 903)]
    pool = PagePool(4, 2048, 2, PAGE, 64, model.dtype, "cuda")
    twins = [[QuestCache(4, config, backend, pool) for config in settings] for _ in range(2)]
    for caches in twins:
        for cache, prompt in zip(caches, prompts):
            cache.reserve(len(prompt) + 64)
            prefill(model, cache, prompt, chunk_size=256)
    return twins


@needs_kernels
def test_a_batch_replayed_from_a_cuda_graph_equals_eager_batched_steps():
    """The same four requests twice in one pool: one copy steps through the batch graph decoder (an eager step,
    the capture, then replays), the other eagerly, fed the same tokens for 40 steps. The Quest request at budget
    256 over a 240-token prompt turns sparse on the way (a new graph), and pages fill and begin. Two requests are
    traced (the app traces every answer): each step's trace, the selected pages of every layer and KV head and the
    bytes read, equals the eager step's."""
    model = tiny_llama(torch.bfloat16)
    twins = twin_batches(model, seed=3)
    for caches in twins:
        for cache in caches[1::2]:
            cache.trace = Trace()
    decoder = BatchGraphDecoder(model, cache_argument(model), compile_layers=False)  # as the eager steps run them
    assert decoder.takes(twins[0])
    graphed, eager = twins
    tokens = [7, 8, 9, 10]
    captures = []
    capture = decoder._capture
    decoder._capture = lambda *args: captures.append(capture(*args)) or captures[-1]
    with torch.inference_mode():
        for step in range(40):
            got = decoder.step(graphed, tokens).clone()
            torch.cuda.synchronize()  # the eager step's plan below reuses FlashInfer's pinned buffers
            expected = forward_batch(model, eager, tokens, cache_argument(model))
            assert torch.equal(got, expected), (step, relative_error(got, expected))
            for row in (1, 3):
                traced = [cache.trace.end_step(cache.length, 0.0, 4) for cache in (graphed[row], eager[row])]
                assert [t.selected_pages is None for t in traced] == [False, False], (step, row)
                sorted_pages = [t.selected_pages.sort(-1).values for t in traced]  # a selection has no order
                assert torch.equal(*sorted_pages) and torch.equal(traced[0].pages_read, traced[1].pages_read)
                assert traced[0].read_bytes == traced[1].read_bytes, (step, row)
            tokens = expected.argmax(-1).tolist()
    assert not decoder.failed and len(captures) == 2 and decoder.graph is captures[-1]  # dense, then sparse
    assert [cache.length for cache in graphed] == [cache.length for cache in eager]


@needs_kernels
def test_greedy_batch_steps_run_ahead_as_the_host_would_pick():
    """`BatchGraphDecoder.greedy` (the graph picks each row's token and the host queues the next step before it
    reads) against `step` with the host's `next_token`, on twin copies of four requests in one pool: the same picks
    for 30 steps while one request turns sparse (a new graph, its eager step inside the run) and pages fill; one
    row's stop ids (half the vocabulary) are blocked for its first 6 picks; two rows have transformers' repetition
    penalty on their answers (one with tokens already in it), and two are traced as the app traces, with the same
    pages and bytes at every step as the host's steps. Closing the generator undoes the step queued ahead, so the
    caches end as the host's steps leave them (the next step's logits are equal) and no trace keeps its step."""
    model = tiny_llama(torch.bfloat16)
    ahead, host = twin_batches(model, seed=6)
    stop_ids, blocked_steps = [[], list(range(128)), [], []], [0, 6, 0, 0]
    penalties, answers = [1.0, 1.3, 1.0, 2.0], [[7], [8, 3, 40], [], [10]]
    first = [7, 8, 9, 10]
    for caches in (ahead, host):
        for cache in caches[2:]:
            cache.trace = Trace()
    with torch.inference_mode():
        ahead_decoder = BatchGraphDecoder(model, cache_argument(model), compile_layers=False)
        steps = ahead_decoder.greedy(ahead, first, stop_ids, blocked_steps, penalties, answers)
        got, ahead_steps = [], []
        for _ in range(30):
            got.append(next(steps))
            ahead_steps.append([cache.trace.end_step(cache.length - 1, 0.0, 4) for cache in ahead[2:]])
        steps.close()
        host_decoder = BatchGraphDecoder(model, cache_argument(model), compile_layers=False)
        expected, host_steps, unblocked, tokens = [], [], [], first
        answer_ids = [torch.tensor([answer], dtype=torch.long, device="cuda") for answer in answers]
        processors = [answer_processors(penalty) for penalty in penalties]
        for index in range(30):
            logits = host_decoder.step(host, tokens).clone()
            host_steps.append([cache.trace.end_step(cache.length, 0.0, 4) for cache in host[2:]])
            unblocked.append(logits[1].argmax().item())
            tokens = [next_token(row, ids_so_far, index, ids, steps, processors=rules)
                      for row, ids_so_far, ids, steps, rules in zip(logits, answer_ids, stop_ids, blocked_steps,
                                                                    processors)]
            answer_ids = [torch.cat([ids, ids.new_full((1, 1), token)], 1) for ids, token in zip(answer_ids, tokens)]
            expected.append(tokens)
        assert any(token < 128 for token in unblocked[:6])  # the blocking changed a pick
        assert got == expected, [sum(a == b for a, b in zip(g, e)) for g, e in zip(got, expected)]
        for step, (ahead_traced, host_traced) in enumerate(zip(ahead_steps, host_steps)):
            for traced in zip(ahead_traced, host_traced):
                assert traced[0].context_len == traced[1].context_len, step
                assert traced[0].read_bytes == traced[1].read_bytes, step
                pages = [t.selected_pages for t in traced]
                assert (pages[0] is None) == (pages[1] is None), step  # a dense step has none
                assert pages[0] is None or torch.equal(*[p.sort(-1).values for p in pages]), step
        assert {step[0].selected_pages is None for step in ahead_steps} == {True, False}  # row 2 turned sparse
        assert [cache.length for cache in ahead] == [cache.length for cache in host]
        assert all(cache.trace.end_step(cache.length, 0.0, 4).selected_pages is None for cache in ahead[2:])
        assert torch.equal(ahead_decoder.step(ahead, tokens), host_decoder.step(host, tokens))
    assert not ahead_decoder.failed and ahead_decoder.graph is not None


@needs_kernels
def test_a_batch_graph_of_compiled_layers_follows_eager_batched_steps(capsys):
    """The engine's batch graph decoder (the layers compiled) against eager batched steps, teacher-forced over 24
    tokens, for a batch of 4 and then of 2 (Dynamo's second batch size: the batch dimension turns dynamic).
    Inductor fuses element-wise chains in float32 where eager rounds each op, so the logits differ by rounding."""
    model = tiny_llama(torch.float16)
    backend = FlashInferBackend("cuda")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in PROMPTS]
    continuation = torch.randint(0, 256, (24, 4), generator=generator).tolist()
    decoder = BatchGraphDecoder(model, cache_argument(model))
    for batch in (4, 2):
        logits = {}
        for graph in (False, True):
            pool, caches = pooled_caches(model, backend)
            caches = caches[:batch]
            for cache, prompt in zip(caches, prompts):
                cache.reserve(len(prompt) + 64)
                prefill(model, cache, prompt, chunk_size=256)
            with torch.inference_mode():
                logits[graph] = torch.stack([
                    decoder.step(caches, tokens[:batch]).clone() if graph
                    else forward_batch(model, caches, tokens[:batch], cache_argument(model))
                    for tokens in continuation])
            assert decoder.graph is not None or not graph
            decoder.reset()
        assert decoder.compile_layers and not decoder.failed
        error = relative_error(logits[True], logits[False])
        same = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
        with capsys.disabled():
            print(f"\nbatch of {batch}: compiled batch graph vs eager logits rel err {error:.4f}, "
                  f"argmax agrees on {same:.0%}")
        assert error <= 0.05 and same >= 0.9  # as test_gpu.py's batch-1 graph in float16


@needs_kernels
def test_two_caches_graphs_replay_their_own_plans(monkeypatch):
    """Two caches decode in turn on CUDA graphs, and the FlashInfer wrappers are shared: A's second answer replays
    A's graph right after B's answer, so its replays must re-plan A's pages, not B's (the last eager step's). It
    equals A's answers decoded eagerly (the graphs hold the layers uncompiled, as the eager steps run them)."""
    monkeypatch.setattr(cuda_graph, "compiled_layers", lambda model, autotune=True: contextlib.nullcontext())
    model = tiny_llama(torch.bfloat16)
    backend = FlashInferBackend("cuda")
    generator = torch.Generator().manual_seed(4)
    first, second = (torch.randint(0, 256, (n,), generator=generator).tolist() for n in (600, 1500))
    caches = [QuestCache(4, QuestConfig(mode="dense", page_size=PAGE), backend) for _ in range(3)]
    for cache, prompt in zip(caches, (first, second, first)):
        prefill(model, cache, prompt, chunk_size=256)
        cache.reserve(4096)  # one shape for both of A's answers

    def answer(cache, cuda_graph):
        return list(decode(model, cache, torch.zeros(256, device="cuda"), 16, min_new_tokens=16,
                           cuda_graph=cuda_graph))

    a, b, a_eagerly = caches
    a_answers = [answer(a, True)]
    answer(b, True)
    assert graph_decoder(model, a, cache_argument(model)).graph is not None
    a_answers.append(answer(a, True))
    assert a_answers == [answer(a_eagerly, False), answer(a_eagerly, False)]


@needs_kernels
def test_engine_answers_asked_at_once_equal_one_after_another(monkeypatch):
    """The engine with a page pool: four greedy answers submitted at once (the first starts alone, on CUDA graphs,
    and hands over to the batch when the others arrive; once no prefill waits, the batch's steps run ahead of the
    host, `BatchGraphDecoder.greedy`) equal, token for token, the answers of an engine without a pool, which runs
    them one at a time on CUDA graphs. One answer ends at a stop id, one has its stop id blocked for its first 8
    tokens, and one is cancelled by its consumer after 16 tokens: a prefix of its whole answer, while the others go
    on. The graphs hold the layers as they are here, not compiled: the batch runs them eagerly, and a batched step
    rounds as a lone one does (the test above: 0 error), while compiled layers round differently (0.01 relative
    error in fp16, test_gpu.py), which forked 1 and then 28 of the 192 tokens in two H200 runs, as the hand-over fell
    at different steps."""
    monkeypatch.setattr(cuda_graph, "compiled_layers", lambda model, autotune=True: contextlib.nullcontext())
    model = tiny_llama(torch.float16, initializer_range=0.02, query_key_scale=3.0)
    backend = FlashInferBackend("cuda")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in PROMPTS]
    pages_of_4 = [settings.with_changes(page_size=4) for settings in SETTINGS]  # the pool's: the model's default

    def answers(engine, stop_ids=((),) * 4, min_new_tokens=(0,) * 4, cancelled=None):
        lengths = [[] for _ in prompts]  # the cache's length at each token, as the engine reports it
        requests = [engine.submit(Request(engine.new_cache(settings), prompt, max_new_tokens=48, stop_ids=list(stop),
                                          min_new_tokens=least, chunk_size=256))
                    for settings, prompt, stop, least in zip(pages_of_4, prompts, stop_ids, min_new_tokens)]

        def tokens(request, index):
            for count, item in enumerate(item for item in request.items() if hasattr(item, "token_id")):
                if index == cancelled and count == 15:
                    request.cancel.set()
                lengths[index].append(item.context_len)
                yield item

        got = asked_at_once(requests, tokens, timeout=300)
        for prompt, answer, reported in zip(prompts, got, lengths):  # alone and batched, run ahead or not
            assert reported == list(range(len(prompt), len(prompt) + len(answer))), (len(prompt), reported)
        return got

    alone = Engine(model, None, backend)
    free = answers(alone)
    stop_ids, min_new_tokens = [(), (), (free[2][4],), (free[3][20],)], [0, 0, 8, 0]
    expected = answers(alone, stop_ids, min_new_tokens)
    assert expected[2][4] != free[2][4] and len(expected[3]) <= 20  # the blocked stop id changed a pick; a stop
    engine = Engine(model, None, backend, pool_tokens=1024 * PAGE)
    assert engine.pool.page_size == 4 and engine.batches
    sizes = {"step": [], "ahead": []}
    for name in sizes:
        original = getattr(engine, f"_decode_{name}")
        setattr(engine, f"_decode_{name}", lambda requests, name=name, original=original: (
            sizes[name].append(len(requests)), original(requests)))
    got = answers(engine, stop_ids, min_new_tokens, cancelled=0)
    assert max(sizes["ahead"]) >= 3, sizes
    assert 16 <= len(got[0]) < 48 and got[0] == expected[0][:len(got[0])], (len(got[0]), got[0], expected[0])
    assert got[1:] == expected[1:], [sum(a == b for a, b in zip(g, e)) for g, e in zip(got, expected)]
    del engine
