"""GPU path: our CUDA kernels against their torch twins, the flashinfer backend against fp32 attention and
against the torch backend, and the engine's greedy decoding against the float32 model. Skipped without CUDA (CI
has none); run on the H200 with the device tool."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from oracles import attention, relative_error  # noqa: E402

from quest_core import backend_flashinfer, kernels  # noqa: E402
from quest_core.backend_flashinfer import FlashInferBackend  # noqa: E402
from quest_core.backend_torch import TorchBackend  # noqa: E402
from quest_core.config import QuestConfig  # noqa: E402
from quest_core.cuda_graph import GraphDecoder, graph_decoder  # noqa: E402
from quest_core.generation import answer_processors, decode, generate_ids, prefill  # noqa: E402
from quest_core.hf import QuestCache, cache_argument  # noqa: E402
from quest_core.paged_cache import PagedLayer  # noqa: E402
from quest_core.selection import page_scores  # noqa: E402
from quest_core.trace import Trace  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
module = kernels.load()
needs_kernels = pytest.mark.skipif(module is None, reason="the CUDA kernels did not build")


def filled(length, page_size, num_kv_heads, head_dim, dtype, chunks=(None,), seed=0, with_kernels=False):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    layer = PagedLayer(page_size, block_pages=7, kernels=module if with_kernels else None)
    done = 0
    for chunk in chunks:
        step = length - done if chunk is None else min(chunk, length - done)
        keys = torch.randn(1, num_kv_heads, step, head_dim, device="cuda", generator=generator).to(dtype)
        values = torch.randn(1, num_kv_heads, step, head_dim, device="cuda", generator=generator).to(dtype)
        layer.update(keys, values)
        done += step
    return layer


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_append_kernel_equals_torch_twin(dtype, head_dim, page_size):
    chunks = (37, 1, 1, 200, 5, 1, 64, 1)  # prefill chunks and decode tokens, ending mid-page
    kernel = filled(310, page_size, 4, head_dim, dtype, chunks, with_kernels=True)
    twin = filled(310, page_size, 4, head_dim, dtype, chunks, with_kernels=False)
    pages = twin.num_pages
    assert torch.equal(kernel.dense()[0], twin.dense()[0]) and torch.equal(kernel.dense()[1], twin.dense()[1])
    assert torch.equal(kernel.page_bounds[:, :pages], twin.page_bounds[:, :pages])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_kernel_reading_the_length_on_the_gpu(dtype):
    """The captured-graph form of the append: the start comes from a device tensor (the length after it)."""
    kernel = filled(300, 16, 4, 64, dtype, with_kernels=True)
    twin = filled(300, 16, 4, 64, dtype)
    for _ in range(20):  # crosses a page boundary
        keys, values = torch.randn(2, 4, 1, 64, device="cuda").to(dtype)
        module.append_kv(keys, values, kernel.keys, kernel.values, kernel.page_bounds, 0,
                         torch.tensor([kernel.length + 1], device="cuda"))
        kernel.length += 1
        twin.append(keys, values)
    assert torch.equal(kernel.dense()[0], twin.dense()[0]) and torch.equal(kernel.dense()[1], twin.dense()[1])
    assert torch.equal(kernel.page_bounds[:, :twin.num_pages], twin.page_bounds[:, :twin.num_pages])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [4, 8, 16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("group_rule", ["sum", "max", "mass"])
def test_score_topk_selects_the_reference_top_pages(dtype, head_dim, page_size, group, group_rule):
    """The fused scorer against its twin, selection.page_scores in float32 (the kernel multiplies in float32)."""
    num_kv_heads, length = 3, 4001 + page_size // 2  # not a multiple of the page size
    layer = filled(length, page_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(dtype)
    reference = page_scores(query.float(), layer.page_bounds[:, : layer.num_pages].float(), group_rule)
    scorer = kernels.ScoreTopK(module)
    for k, on_gpu in ((2, False), (17, False), (64, False), (64, True), (100, True)):
        assert_top_pages(kernel_selection(scorer, query, layer, k, group_rule, on_gpu), reference, k)


def kernel_selection(scorer, query, layer, k, group_rule, on_gpu, sink_pages=0):
    """The fused scorer's rows [Hkv, k] for `layer`, the length from the host or, with on_gpu, as in a captured
    graph: the length on the GPU, the grid sized for the whole capacity."""
    rows = torch.empty(layer.num_kv_heads, k, dtype=torch.int32, device="cuda")
    if on_gpu:
        scorer(query, layer.page_bounds, layer.page_bounds.shape[1], k, rows,
               torch.tensor([layer.length], device="cuda"), layer.page_size, group_rule, sink_pages)
    else:
        scorer(query, layer.page_bounds, layer.num_pages, k, rows, group_rule=group_rule, sink_pages=sink_pages)
    return rows


@needs_kernels
@pytest.mark.parametrize("group_rule", ["sum", "max", "mass"])
def test_score_topk_past_one_round_of_candidates(group_rule):
    """Up to 10,240 full pages each thread of the selecting block keeps its pages' keys in registers; past that,
    each pass over the keys (and rule mass's over the logits) reloads them round by round."""
    num_kv_heads, page_size, head_dim, group = 2, 4, 64, 3
    layer = filled(page_size * 11000 + 2, page_size, num_kv_heads, head_dim, torch.bfloat16)
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(torch.bfloat16)
    reference = page_scores(query.float(), layer.page_bounds[:, : layer.num_pages].float(), group_rule)
    scorer = kernels.ScoreTopK(module)
    for k, on_gpu in ((64, False), (1000, True)):
        assert_top_pages(kernel_selection(scorer, query, layer, k, group_rule, on_gpu), reference, k)


@needs_kernels
def test_score_topk_mass_with_block_logits_past_shared_memory():
    """Rule mass: each scoring block keeps its logits in shared memory for its softmax states where they fit, else
    reads them again from global memory. With more KV heads than SMs each head gets one block, whose 4 x 1,100
    logits do not fit: the second way."""
    num_kv_heads = torch.cuda.get_device_properties(0).multi_processor_count + 8
    page_size, head_dim, group = 4, 64, 4
    layer = filled(page_size * 1100 + 1, page_size, num_kv_heads, head_dim, torch.bfloat16)
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(torch.bfloat16)
    reference = page_scores(query.float(), layer.page_bounds[:, : layer.num_pages].float(), "mass")
    scorer = kernels.ScoreTopK(module)
    for k, on_gpu in ((64, False), (300, True)):
        assert_top_pages(kernel_selection(scorer, query, layer, k, "mass", on_gpu), reference, k)


@needs_kernels
@pytest.mark.parametrize("group_rule", ["sum", "max", "mass"])
@pytest.mark.parametrize("sink_pages", [1, 3])
def test_score_topk_keeps_the_sink_pages(group_rule, sink_pages):
    """With sink pages s: pages 0..s-1 in the slots before the current page, whatever they score; the first k-1-s
    slots the top of the other full pages (the twin: select_pages with sink_pages)."""
    num_kv_heads, page_size, head_dim, group = 3, 4, 64, 3
    layer = filled(2001, page_size, num_kv_heads, head_dim, torch.bfloat16)
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(torch.bfloat16)
    reference = page_scores(query.float(), layer.page_bounds[:, : layer.num_pages].float(), group_rule)
    scorer = kernels.ScoreTopK(module)
    heads = torch.arange(num_kv_heads, device="cuda").unsqueeze(1)
    for k, on_gpu in ((sink_pages + 2, False), (64, False), (64, True), (300, False)):
        rows = kernel_selection(scorer, query, layer, k, group_rule, on_gpu, sink_pages)
        pages = (rows - heads) // num_kv_heads
        assert (pages[:, k - 1 - sink_pages:-1] == torch.arange(sink_pages, device="cuda")).all()
        others = torch.cat([rows[:, :k - 1 - sink_pages], rows[:, -1:]], dim=1) - sink_pages * num_kv_heads
        assert_top_pages(others, reference[:, sink_pages:], k - sink_pages)


def assert_top_pages(rows, reference, k):
    """rows [Hkv, k]: one-head page rows p * Hkv + h of the top k-1 full pages by the reference scores
    [Hkv, pages] (ties within 1e-3 of the largest score may go either way), then the current page."""
    num_kv_heads, num_pages = reference.shape
    heads = torch.arange(num_kv_heads, device="cuda").unsqueeze(1)
    assert ((rows - heads) % num_kv_heads == 0).all()
    pages = (rows - heads) // num_kv_heads
    assert (pages[:, -1] == num_pages - 1).all()
    for h in range(num_kv_heads):
        chosen = pages[h, :-1]
        assert chosen.unique().numel() == k - 1 and (chosen < num_pages - 1).all()
        scores = reference[h, :-1]
        threshold = scores.topk(k - 1).values[-1]
        tolerance = 1e-3 * scores.abs().max()
        assert (scores[chosen] >= threshold - tolerance).all()
        assert set((scores > threshold + tolerance).nonzero().flatten().tolist()) <= set(chosen.tolist())


@needs_kernels
@pytest.mark.parametrize("outlier", [30.0, -30.0])
def test_score_topk_with_an_outlier_page(outlier):
    """One page's bounds far from the rest stretch the head's score range: the kernel's first radix digit then
    spans that range, and the threshold bin holds many pages (its list path, or the sweep when they overflow)."""
    layer = filled(8000, 16, 2, 128, torch.bfloat16)
    with torch.inference_mode():  # the cache's tensors are inference tensors
        layer.page_bounds[:, 3] *= outlier
    query = torch.randn(2, 4, 128, device="cuda").to(torch.bfloat16)
    reference = page_scores(query.float(), layer.page_bounds[:, : layer.num_pages].float())
    for k in (3, 128, 400):
        rows = torch.empty(2, k, dtype=torch.int32, device="cuda")
        kernels.ScoreTopK(module)(query, layer.page_bounds, layer.num_pages, k, rows)
        assert_top_pages(rows, reference, k)


@needs_kernels
@pytest.mark.parametrize("num_pages", [300, 5000])  # 5000: the tied pages overflow the kernel's shared list
def test_score_topk_with_every_score_tied(num_pages):
    layer = PagedLayer(8, block_pages=64, kernels=module)
    ones = torch.ones(1, 2, num_pages * 8 - 3, 64, device="cuda", dtype=torch.bfloat16)
    layer.update(ones, ones)
    query = torch.randn(2, 4, 64, device="cuda").to(torch.bfloat16)
    rows = torch.empty(2, 100, dtype=torch.int32, device="cuda")
    kernels.ScoreTopK(module)(query, layer.page_bounds, layer.num_pages, 100, rows)
    pages = (rows - torch.arange(2, device="cuda")[:, None]) // 2
    assert (pages[:, -1] == num_pages - 1).all()
    for h in range(2):
        assert pages[h, :-1].unique().numel() == 99 and (pages[h, :-1] < num_pages - 1).all()


def selected_rows(num_pages, num_kv_heads, k, generator):
    """k - 1 random full pages per KV head, then the current page: one-head rows p * Hkv + h [Hkv, k] int32, and
    the pages [Hkv, k]."""
    pages = torch.stack([torch.randperm(num_pages - 1, generator=generator)[: k - 1] for _ in range(num_kv_heads)])
    pages = torch.cat([pages, torch.full((num_kv_heads, 1), num_pages - 1)], 1).cuda()
    rows = pages * num_kv_heads + torch.arange(num_kv_heads, device="cuda")[:, None]
    return rows.int(), pages


def selected_mask(pages, page_size, length):
    """[Hkv, 1, length]: the tokens of each KV head's selected pages."""
    mask = torch.zeros(pages.shape[0], 1, length, dtype=torch.bool, device="cuda")
    for h in range(pages.shape[0]):
        for p in pages[h].tolist():
            mask[h, 0, p * page_size:(p + 1) * page_size] = True
    return mask


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [4, 8, 16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_sparse_decode_equals_attention_over_the_selected_pages(dtype, head_dim, page_size, group):
    """Our sparse decode kernel against its twin, attention in float32 over the selected pages' tokens (the
    current page holding fewer than P), for one split (few pages) and many (its splits merged by the last block),
    with the length passed from the host and read on the GPU. It rounds only its output to the dtype."""
    num_kv_heads = 3
    length = 400 * page_size + page_size // 2 + 1  # 401 pages, the current one part-full
    layer = filled(length, page_size, num_kv_heads, head_dim, dtype)
    keys, values = (t.clone() for t in layer.dense())
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(dtype)
    scaling = head_dim ** -0.5
    decode = kernels.SparseDecode(module)
    generator = torch.Generator().manual_seed(0)
    for k in (1, 2, 9, 300, layer.num_pages - 1):
        rows, pages = selected_rows(layer.num_pages, num_kv_heads, k, generator)
        expected = attention(query, keys, values, scaling, selected_mask(pages, page_size, length), torch.float32)
        for on_gpu in (False, True):
            device_length = torch.tensor([length], device="cuda") if on_gpu else None
            got = decode(query, layer.keys, layer.values, rows, scaling, length, device_length)
            assert got.shape == query.shape and got.dtype == dtype
            error = relative_error(got, expected)
            assert error <= {torch.bfloat16: 5e-3, torch.float16: 1e-3}[dtype], (k, on_gpu, error)


@needs_kernels
def test_sparse_decode_replayed_in_a_cuda_graph():
    """Captured once with the length on the GPU and replayed as tokens arrive (crossing page boundaries): each
    replay equals the eager call, so the split counters are left reset and the current page's length is read."""
    num_kv_heads, group, head_dim, page_size = 2, 4, 128, 16
    layer = filled(3000, page_size, num_kv_heads, head_dim, torch.bfloat16)
    layer.reserve(3100)  # no reallocation after the capture
    query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(torch.bfloat16)
    rows = torch.empty(num_kv_heads, 64, dtype=torch.int32, device="cuda")
    device_length = torch.tensor([layer.length], device="cuda")
    decode, scorer = kernels.SparseDecode(module), kernels.ScoreTopK(module)

    def step():
        scorer(query, layer.page_bounds, layer.page_bounds.shape[1], 64, rows, device_length, page_size)
        return decode(query, layer.keys, layer.values, rows, head_dim ** -0.5, device_length=device_length)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(40):
        keys, values = torch.randn(2, 1, num_kv_heads, 1, head_dim, device="cuda").to(torch.bfloat16)
        layer.update(keys, values)
        device_length.fill_(layer.length)
        graph.replay()
        expected = decode(query, layer.keys, layer.values, rows, head_dim ** -0.5, layer.length)
        assert torch.equal(out, expected)


needs_clusters = pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9, reason="thread-block clusters: Hopper")


def one_kernel_decode(query, layer, k, group_rule, sink_pages=0, on_gpu=False):
    """kernels.quest_decode over `layer`: (out, rows [Hkv, k]), the length from the host or, with on_gpu, as in a
    captured graph (on the GPU, the grid sized for the whole capacity)."""
    rows = torch.empty(layer.num_kv_heads, k, dtype=torch.int32, device="cuda")
    scaling = query.shape[-1] ** -0.5
    num_pages = layer.page_bounds.shape[1] if on_gpu else layer.num_pages
    device_length = torch.tensor([layer.length], device="cuda") if on_gpu else None
    out = kernels.quest_decode(module, query, layer.page_bounds, layer.keys, layer.values, num_pages, k, rows, scaling,
                               layer.length, device_length, group_rule, sink_pages)
    return out, rows


@needs_kernels
@needs_clusters
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("group_rule", ["sum", "max", "mass"])
def test_one_kernel_decode_equals_its_twins(dtype, head_dim, page_size, group, group_rule):
    """Quest's decode in one kernel against its twins: its rows are the top pages by selection.page_scores in
    float32 (as the fused scorer's test), in page order with the sink pages first and the current page last, and its
    output is attention in float32 over those pages' tokens. Contexts of 19 to 1,001 pages, a cluster of 1 to 16
    blocks, the length from the host and on the GPU."""
    num_kv_heads = 3
    for length, k, sink_pages, on_gpu in ((4001 + page_size // 2, 17, 0, False), (4001, 100, 0, True),
                                          (2001, 64, 2, True), (300, 2, 0, False)):
        layer = filled(length, page_size, num_kv_heads, head_dim, dtype)
        query = torch.randn(num_kv_heads, group, head_dim, device="cuda").to(dtype)
        out, rows = one_kernel_decode(query, layer, k, group_rule, sink_pages, on_gpu)
        heads = torch.arange(num_kv_heads, device="cuda")[:, None]
        assert ((rows - heads) % num_kv_heads == 0).all()
        pages = (rows - heads) // num_kv_heads
        assert (pages.diff(dim=1) > 0).all() and (pages[:, :sink_pages] == torch.arange(sink_pages).cuda()).all()
        reference = page_scores(query.float(), layer.page_bounds[:, :layer.num_pages].float(), group_rule)
        others = rows[:, sink_pages:] - sink_pages * num_kv_heads  # as pages counted after the sinks
        assert_top_pages(others, reference[:, sink_pages:], k - sink_pages)
        keys, values = (t.clone() for t in layer.dense())
        expected = attention(query, keys, values, head_dim ** -0.5, selected_mask(pages, page_size, length),
                             torch.float32)
        error = relative_error(out, expected)
        assert out.dtype == dtype and error <= {torch.bfloat16: 5e-3, torch.float16: 1e-3}[dtype], (length, k, error)


@needs_kernels
@needs_clusters
def test_one_kernel_decode_over_8192_pages():
    """The most pages a head has at 128K tokens in pages of 16 (Llama-3.1-8B's heads): 16 blocks of 512 pages, the
    keys of all of them in each block's shared memory."""
    layer = filled(131072, 16, 8, 128, torch.bfloat16)
    query = torch.randn(8, 4, 128, device="cuda").to(torch.bfloat16)
    out, rows = one_kernel_decode(query, layer, 128, "sum", on_gpu=True)
    assert_top_pages(rows, page_scores(query.float(), layer.page_bounds[:, :layer.num_pages].float()), 128)
    pages = (rows - torch.arange(8, device="cuda")[:, None]) // 8
    keys, values = layer.dense()
    expected = attention(query, keys, values, 128 ** -0.5, selected_mask(pages, 16, 131072), torch.float32)
    assert relative_error(out, expected) <= 5e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
# FlashInfer's dense decode on its CUDA-core kernels (group 3) and its tensor-core ones (4 and up); 12: more than our
# sparse kernel takes, FlashInfer's sparse decode
@pytest.mark.parametrize("group", [3, 4, 7, 12])
def test_flashinfer_attention_against_fp32(dtype, head_dim, group):
    backend = FlashInferBackend("cuda")
    layer = filled(3001, 16, 4, head_dim, dtype, with_kernels=module is not None)
    keys, values = (t.clone() for t in layer.dense())
    query = torch.randn(4, group, head_dim, device="cuda").to(dtype)
    scaling = head_dim ** -0.5
    dense = backend.decode_dense(query, layer, scaling)
    assert relative_error(dense, attention(query, keys, values, scaling, dtype=torch.float32)) <= 1e-2

    rows = backend.select(query, layer, 32, "mass" if group == 7 else "max")  # our scorer
    pages = rows.div(backend.rows_per_page(layer), rounding_mode="floor")
    sparse = backend.decode_sparse(query, layer, rows, scaling)
    mask = torch.zeros(4, 1, 3001, dtype=torch.bool, device="cuda")
    for h in range(4):
        for p in pages[h].tolist():
            mask[h, 0, p * 16:(p + 1) * 16] = True
    assert relative_error(sparse, attention(query, keys, values, scaling, mask, torch.float32)) <= 1e-2

    prefill_query = torch.randn(4 * group, 50, head_dim, device="cuda").to(dtype)  # the last 50 tokens
    got = backend.prefill(prefill_query, layer, scaling)
    causal = torch.arange(3001, device="cuda") <= torch.arange(2951, 3001, device="cuda")[:, None]
    expected = attention(prefill_query.view(4, group * 50, head_dim), keys, values, scaling,
                         causal.repeat(group, 1), torch.float32).view(4 * group, 50, head_dim)
    assert relative_error(got, expected) <= 1e-2


def tiny_llama(dtype, initializer_range=0.3, query_key_scale=1.0):
    """A random 4-layer GQA Llama (8 q / 2 kv heads, head_dim 64) on the GPU, on the quest attention.
    query_key_scale multiplies the query and key projections, so the attention logits by its square."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quest_core.hf import use_quest

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=initializer_range)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(query_key_scale)
            layer.self_attn.k_proj.weight.mul_(query_key_scale)
    model = model.to("cuda", dtype)
    use_quest(model)
    return model


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_decode_follows_the_fp32_model(dtype, capsys):
    """The engine's greedy decoding on a GPU (the flashinfer backend, each step replayed as a CUDA graph over the
    compiled layers and queued ahead of the host), checked token by token against the torch backend in float32 on
    an upcast copy of the same model, teacher-forced on the tokens it chose (free-running, one near tie would fork
    the two answers). At every step, how far the chosen token's float32 logit falls short of the float32 best is at
    most 3x the dtype's typical rounding: the mean over the answer's steps of how far the torch backend in the same
    dtype is from float32 (logits within e of float32's pick a token at most 2e short of its best). The mean, not
    each step's own rounding: the path under test rounds differently (its compiled, autotuned matrix products), and
    a step where the torch backend happens to round little (0.02 against a mean of 0.07) is no bound on it; three
    GPU runs of the same code gave 0.68x, 1.30x and 3.03x against each step's rounding (the last at such a step).
    The model is tame (transformers' default initializer range, 0.02: at 0.3 bf16 logits are about 15% away from
    float32's and ties are everywhere) with sharp attention (query and key projections x3; else the attention is
    near uniform and it hardly matters what it reads). Measured on CPU with the torch backend standing in, its
    sparse attention in float32 (another rounding), four prompts: a shortfall of 0.44-1.33x; a 1.5x softmax scale
    gave 5.6-7.9x, each selected page's neighbour read instead 4.7-8.3x, the current page left out 0.6-1.9x (not
    caught: the logits test below is the fine check). On the H200: 1.07x in bf16, 0.00x in fp16; with a 1.5x
    softmax scale in the flashinfer backend's Quest decode, 3.12x and 9.20x."""
    model = tiny_llama(dtype, initializer_range=0.02, query_key_scale=3.0)
    upcast = tiny_llama(dtype, initializer_range=0.02, query_key_scale=3.0).float()  # same weights, in float32
    prompt = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    config = QuestConfig(budget=256, page_size=16)  # sparse from the first step
    cache = QuestCache(4, config, FlashInferBackend("cuda"))
    tokens = generate_ids(model, cache, prompt, 64, chunk_size=256, min_new_tokens=64)
    decoder = cache.graph_decoder  # the decode path under test ran: compiled layers in a captured graph
    assert decoder is not None and decoder.compile_layers and not decoder.failed and decoder.graph is not None

    def teacher_forced(model):
        """[64, vocab]: the logits each of `tokens` was chosen from, by the torch backend on `model`."""
        cache = QuestCache(4, config, TorchBackend())
        steps = [prefill(model, cache, prompt, chunk_size=256)]
        steps += [prefill(model, cache, [token]) for token in tokens[:-1]]  # one token: a decode step
        return torch.stack(steps).float()

    float32, rounded = teacher_forced(upcast), teacher_forced(model)
    chosen = torch.tensor(tokens, device="cuda")
    shortfall = float32.amax(-1) - float32.gather(1, chosen[:, None])[:, 0]  # 0 where it is float32's argmax
    rounding = (rounded - float32).abs().amax(-1).mean()
    ratio = (shortfall.max() / rounding).item()
    agrees = (float32.argmax(-1) == chosen).float().mean().item()
    with capsys.disabled():
        print(f"\n{dtype}: greedy tokens are float32's argmax at {agrees:.0%} of 64 steps; worst shortfall "
              f"{ratio:.2f}x the typical rounding {rounding:.4f} (at most 3)")
    assert ratio <= 3, [(step, round(s, 4)) for step, s in enumerate(shortfall.tolist()) if s > 3 * rounding]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size, group_rule", [(16, "sum"), (4, "mass")])
def test_decode_logits_flashinfer_vs_torch_backend(dtype, page_size, group_rule, capsys):
    """Teacher-forced, so that one differing token does not fork the two runs: both backends decode the same 64
    tokens after a 700-token prompt with Quest at budget 256 (sparse from the first step). Their logits differ by
    the dtype's rounding only (this random model amplifies it: in bf16 its logits are 54% away from float32's)."""
    model = tiny_llama(dtype)
    generator = torch.Generator().manual_seed(1)
    prompt, continuation = (torch.randint(0, 256, (n,), generator=generator).tolist() for n in (700, 64))
    logits = {}
    for name, backend in (("torch", TorchBackend()), ("flashinfer", FlashInferBackend("cuda"))):
        cache = QuestCache(4, QuestConfig(budget=256, page_size=page_size, group_rule=group_rule), backend)
        steps = [prefill(model, cache, prompt, chunk_size=256)]
        steps += [prefill(model, cache, [token]) for token in continuation]  # one token: a decode step
        logits[name] = torch.stack(steps).float()
    error = relative_error(logits["flashinfer"], logits["torch"])
    same = (logits["flashinfer"].argmax(-1) == logits["torch"].argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n{dtype}, pages of {page_size}, rule {group_rule}: logits rel err {error:.4f}, "
              f"argmax agrees on {same:.0%} of 65 steps")
    assert error <= {torch.bfloat16: 0.1, torch.float16: 0.05}[dtype] and same >= 0.9


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, page_size, group_rule",
                         [("dense", 16, "sum"), ("quest", 16, "sum"), ("quest", 4, "mass")])
@pytest.mark.parametrize("traced, penalty", [(False, 1.0), (True, 1.0), (True, 1.3)])
@pytest.mark.parametrize("one_kernel", [True, False])
def test_cuda_graph_decode_equals_eager_decode(dtype, mode, page_size, group_rule, traced, penalty, one_kernel,
                                               monkeypatch):
    """The same backend, decoding with the step replayed as a CUDA graph (the layers not compiled) and eagerly:
    the same greedy tokens, and, traced, the same pages and bytes at every step. Quest runs as one kernel of ours
    (this model's 2 KV heads) or, with one_kernel off, as our fused scorer then our sparse decode kernel, in the
    graph reading the length on the GPU. The graph's steps run ahead of the host, traced too and with the app's
    repetition penalty, which the graph applies itself (eager decoding: transformers' logits processor)."""
    if mode == "dense" and not one_kernel:
        pytest.skip("dense decoding runs neither")
    if not one_kernel or torch.cuda.get_device_capability()[0] < 9:
        monkeypatch.setattr(backend_flashinfer, "ONE_KERNEL_KV_HEADS", 0)
    model = tiny_llama(dtype)
    prompt = torch.randint(0, 256, (250,), generator=torch.Generator().manual_seed(1)).tolist()
    backend = FlashInferBackend("cuda")
    tokens, traces = {}, {}
    runs = [(False, penalty), (True, penalty)] + ([("unpenalized", 1.0)] if penalty != 1.0 else [])
    for graph, answer_penalty in runs:  # 250 + 80 tokens: Quest (budget 256) turns sparse midway, so two graphs
        config = QuestConfig(mode=mode, budget=256, page_size=page_size, group_rule=group_rule)
        cache = QuestCache(4, config, backend)
        logits = prefill(model, cache, prompt, chunk_size=128)
        cache.graph_decoder = GraphDecoder(model, cache, cache_argument(model), compile_layers=False)
        cache.trace = Trace() if traced else None
        cache.graph_decoder.step = None  # a step paced by the host (not run ahead) fails
        tokens[graph] = []
        for token in decode(model, cache, logits, 80, min_new_tokens=80, cuda_graph=graph is True,
                            processors=answer_processors(answer_penalty)):
            if tokens[graph] and traced:  # as the session does: the step that made this token
                cache.trace.end_step(cache.length, 0.0, 4)
            tokens[graph].append(token)
        traces[graph] = cache.trace.steps if traced else []
        if graph is True:
            assert not cache.graph_decoder.failed and cache.graph_decoder.graph is not None
    assert tokens[True] == tokens[False]
    if penalty != 1.0:
        assert tokens["unpenalized"] != tokens[False]  # the penalty changed the answer
    assert len(traces[True]) == len(traces[False]) == (79 if traced else 0)
    for eager_step, graph_step in zip(traces[False], traces[True]):
        assert (graph_step.context_len, graph_step.dense_bytes, graph_step.read_bytes) == \
            (eager_step.context_len, eager_step.dense_bytes, eager_step.read_bytes)
        if eager_step.selected_pages is None:
            assert graph_step.selected_pages is None
            continue
        eager_pages, graph_pages = eager_step.selected_pages, graph_step.selected_pages
        assert torch.equal(graph_pages[..., -1], eager_pages[..., -1])  # the current page, last
        assert torch.equal(graph_pages[..., :-1].sort(-1).values, eager_pages[..., :-1].sort(-1).values)
    if traced and mode == "quest":
        assert sum(step.selected_pages is not None for step in traces[True]) > 40


@needs_kernels
def test_pipelined_greedy_decode_ends_like_eager_decode():
    """Greedy graph decoding queues the next step before it reads a token; where the answer ends (a stop id, a
    stop id blocked by min_new_tokens, should_stop, the consumer closing the stream) the queued step is undone:
    the same tokens as eager decoding, and the same cache after (length, KV, page bounds). Traced, the undone
    step's trace goes too: the trace holds a step per token after the first, and the next step ended is a new one."""
    model = tiny_llama(torch.bfloat16)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    backend = FlashInferBackend("cuda")

    def run(graph, stop_after=None, traced=False, **kwargs):
        cache = QuestCache(4, QuestConfig(budget=256, page_size=16), backend)
        logits = prefill(model, cache, prompt, chunk_size=128)
        cache.graph_decoder = GraphDecoder(model, cache, cache_argument(model), compile_layers=False)
        cache.trace = Trace() if traced else None
        tokens = []
        stream = decode(model, cache, logits, 40, cuda_graph=graph, **kwargs)
        for token in stream:
            if tokens and traced:
                cache.trace.end_step(cache.length, 0.0, 4)
            tokens.append(token)
            if len(tokens) == stop_after:
                stream.close()
        assert (cache.graph_decoder.shape is not None) == graph  # the graph decoder ran the steps
        after = None
        if traced:
            assert len(cache.trace.steps) == len(tokens) - 1
            after = cache.trace.end_step(cache.length, 0.0, 4)  # what was recorded after the last token taken
            after = (after.context_len, after.read_bytes, after.selected_pages is None)
        return tokens, cache, after

    free, _, _ = run(False)
    index = next(i for i in range(5, 40) if free[i] not in free[:i])  # a token first made at step `index`
    cases = [dict(stop_ids=[free[index]]), dict(stop_ids=[free[index]], min_new_tokens=index + 1),
             dict(should_stop=lambda: True), dict(stop_after=7), dict(),
             dict(stop_ids=[free[index]], traced=True), dict(stop_after=7, traced=True)]
    lengths = []
    for case in cases:
        (eager, eager_cache, eager_after), (graphed, graph_cache, graph_after) = run(False, **case), run(True, **case)
        lengths.append(len(eager))
        assert graphed == eager, case
        assert graph_cache.length == eager_cache.length, case
        assert graph_after == eager_after, case  # traced: the stop id's step (eager: recorded, not ended) or none
        for graph_layer, eager_layer in zip(graph_cache.layers, eager_cache.layers):
            pages = eager_layer.num_pages
            assert torch.equal(graph_layer.dense()[0], eager_layer.dense()[0])
            assert torch.equal(graph_layer.page_bounds[:, :pages + 1], eager_layer.page_bounds[:, :pages + 1])
    assert lengths[0] == index and lengths[1] > index  # the stop id ended the answer, then was blocked


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["dense", "quest"])
def test_compiled_graph_decode_logits_match_eager(dtype, mode, capsys):
    """The default graph decoder, whose graph holds the compiled decoder layers, against eager decoding, both
    teacher-forced over the same 64 tokens after 250 (Quest at budget 256 turns sparse midway), and both against the
    float32 model (the torch backend on an upcast copy of the same weights). Inductor fuses element-wise chains in
    float32 where eager rounds each op to the dtype (the RMSNorm into the q/k/v products too: compiled_layers), so
    the two paths round differently; the compiled one is to be no farther from float32 than eager is (x1.25), and
    pick the same tokens. A fixed bound on compiled against eager failed when more of the layer fused (0.106 in
    bf16, where it had been 0.09) without either moving from float32. The model is the tame one of the greedy test
    above (at initializer range 0.3 bf16's logits are about half their norm away from float32's). On the H200: compiled
    0.0170 / 0.0203 from float32 in bf16 (dense / quest), eager 0.0199 / 0.0230; fp16 0.0021 / 0.0105 against 0.0025 /
    0.0106. With one down projection's weights x1.05 in the graph's run it fails in both dtypes (x1.02: within the
    rounding, it passes)."""
    model = tiny_llama(dtype, initializer_range=0.02, query_key_scale=3.0)
    upcast = tiny_llama(dtype, initializer_range=0.02, query_key_scale=3.0).float()  # same weights, in float32
    generator = torch.Generator().manual_seed(1)
    prompt, continuation = (torch.randint(0, 256, (n,), generator=generator).tolist() for n in (250, 64))
    config = QuestConfig(mode=mode, budget=256, page_size=16)

    def teacher_forced(model, backend, graph=False):
        """[64, vocab]: the logits of each step over `continuation`, eagerly or from the graph decoder."""
        cache = QuestCache(4, config, backend)
        prefill(model, cache, prompt)
        cache.reserve(len(prompt) + len(continuation))
        decoder = graph_decoder(model, cache, cache_argument(model)) if graph else None
        with torch.inference_mode():
            steps = [decoder.step(token).clone() if graph else prefill(model, cache, [token])
                     for token in continuation]
        if graph:
            assert decoder.compile_layers and not decoder.failed and decoder.graph is not None
        return torch.stack(steps).float()

    eager, graphed = (teacher_forced(model, FlashInferBackend("cuda"), graph) for graph in (False, True))
    float32 = teacher_forced(upcast, TorchBackend())
    eager_error, graph_error = relative_error(eager, float32), relative_error(graphed, float32)
    same = (graphed.argmax(-1) == eager.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n{dtype}, {mode}: logits rel err against float32: compiled graph {graph_error:.4f}, eager "
              f"{eager_error:.4f}; compiled vs eager {relative_error(graphed, eager):.4f}, argmax agrees on {same:.0%}")
    assert graph_error <= 1.25 * eager_error and same >= 0.9


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9, reason="programmatic dependent launch: Hopper+")
def test_compiled_layers_kernels_launch_as_programmatic_dependents():
    """On Hopper and later the compiled decoder layers' Triton kernels are generated to launch as programmatic
    dependents (quest_core/compiled_layers.py): in Inductor's code for a decode step each kernel is launched so, and
    each that loads waits for the kernel before it (`gdc_wait`) first."""
    from torch._inductor.utils import run_and_get_code

    from quest_core.compiled_layers import compiled_layers

    model = tiny_llama(torch.bfloat16)
    cache = QuestCache(4, QuestConfig(budget=256, page_size=16), FlashInferBackend("cuda"))
    prefill(model, cache, list(range(100)))
    with compiled_layers(model, autotune=False), torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(prefill, model, cache, [7])
    kernels = [part for module in code for part in module.split("async_compile.triton(")[1:]]
    assert kernels and all("'launch_pdl': True" in kernel for kernel in kernels)
    assert all("gdc_wait()" in kernel for kernel in kernels if "tl.load(" in kernel)


def test_the_read_floors_kernels_read_every_byte_once():
    """bench/read_floor.py's kernels (the floor of Quest's reads) read the page bounds in use and the selected pages'
    K and V, each byte once: their XOR equals torch's over the same bytes, for each kernel, called twice (the one
    kernel's head counters left at zero), at pages of 16 and 4 and a k that does not split evenly."""
    from bench import read_floor

    module = read_floor.load_module()
    for name, heads, num_pages, k, blocks, splits, threads in [("llama3-8b", 4, 301, 37, 5, 3, 256),
                                                               ("smollm2", 3, 1000, 129, 7, 9, 128)]:
        bounds, keys, values = read_floor.layer(read_floor.SHAPES[name], num_pages)
        bounds, keys, values = bounds[:heads].contiguous(), keys[:, :heads].contiguous(), values[:, :heads].contiguous()
        bounds = torch.cat([bounds, torch.randn_like(bounds[:, :9])], dim=1)  # capacity past the pages in use
        rows = read_floor.random_rows(num_pages, heads, k)
        read_floor.check_reads(module, bounds, keys, values, rows, num_pages, blocks, splits, threads)
