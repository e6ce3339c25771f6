"""Attention backend `flashinfer` (CUDA): stock FlashInfer wrappers over the engine's paged cache for dense decode
and prefill, and our CUDA kernels (kernels/) for the KV append and for Quest decode: page scoring + top-k (every
group rule) and the sparse attention over the selected pages, two kernels per layer, or for layers of few KV heads
on Hopper GPUs the three in one kernel (`decode_quest`, kernels.quest_decode).

Dense decode and prefill read the cache as it is (HND: [pages, Hkv, P, D]). Quest decode views K and V as one-head
pages [pages * Hkv, P, D], where page p of KV head h is row p * Hkv + h: the scorer writes each KV head's selected
rows, the current page last, and our sparse decode kernel reads them, for the whole query group at once, reading
the last page's length on the GPU when captured. Where our kernels do not take the shape (head dims other than 64
and 128, more than 8 query heads per KV head) or did not build, FlashInfer's decode runs one pseudo-request per KV
head (num_kv_heads=1, num_qo_heads=G) whose page list is the selected pages, then the current page. So `indptr` is
fixed for a budget and only `last_page_len` moves with the context. Plans are made on the host once per shape (every
layer of a step has the same shape) and reused by all layers; the page rows are written in place by the scorer,
which the plan references, so a new selection needs no new plan.
An adaptive budget (QuestConfig.top_p: a page count per KV head, on the GPU) would need FlashInfer's `indptr` from
those counts, planned on the host at every layer of every step (a device sync each), so this backend does not run
it (`adaptive_budget = False`: the cache refuses such settings, naming the backend; the torch backend runs them).
Our sparse decode kernel could read the counts on the GPU instead; it does not yet.

Every decode wrapper runs in FlashInfer's CUDA-graph mode (fixed buffers), so a decode step can be captured in a
CUDA graph (quest_core/cuda_graph.py): the backend records the plan functions of a step (`step_plans`), each graph
keeps those of its eager step, and `plan_step` re-runs them on the host before each replay, for the layers' new
lengths.

A model spread over GPUs (accelerate's device map) has layers on several devices: the backend keeps a workspace,
wrappers and buffers per device (`DeviceState`), made at the first call of a layer there, and runs each call with
its layer's GPU current.
"""
import weakref
from dataclasses import dataclass, field

import torch

from . import kernels
from .backend_torch import TorchBackend
from .paged_cache import PagedLayer

# Quest's decode as one kernel (a thread-block cluster per KV head) for layers of at most this many KV heads: on the
# H200 it beat score_topk + sparse_decode on SmolLM2's 3 (bench/RESULTS.md, gpu_kernels_smollm2: 15.9 against 20.5 us
# at 8K, budget 1024) and lost on Llama-3.1-8B's 8 (28.4 against 18.1 us at 8K, 79.9 against 28.3 at 128K, budget
# 2048) and Llama-2-7B's 32 (66.2 against 32.1 at 32K) in an A/B probe of 2026-12-02 (issue 16's note)
ONE_KERNEL_KV_HEADS = 4


def use_tensor_cores(group: int) -> bool:
    """Whether FlashInfer decodes query groups of `group` heads per KV head on its tensor-core (prefill) kernels
    rather than its CUDA-core decode kernels, which take groups of 1, 2, 3, 4 or 8 only. On the H200 (bf16, one
    layer in a CUDA graph, 2026-12-01) the tensor-core kernels win from a group of 4: d 128, group 4, 128K tokens
    135.7 us against 189.9 (32K: 42.3 / 55.9; 8 requests at 32K: 129.8 / 368.3), group 8 at 32K 28.1 / 57.9; and
    lose below it: group 1 at 32K 129.3 / 126.6, group 2 42.7 / 41.1, SmolLM2's group 3 (d 64) at 8K 12.9 / 10.8.
    Groups of 4 or more were measured at d 128 only (Llama-3.2-1B's group 4 at d 64 was not)."""
    return group >= 4


@dataclass
class DecodeWrapper:
    """A FlashInfer decode wrapper in CUDA-graph mode and the fixed buffers we gave it."""
    wrapper: object
    last_page_len: torch.Tensor  # int32 [requests]: what the kernels read as each request's last page length
    use_tensor_cores: bool


@dataclass
class DeviceState:
    """What the backend keeps on one GPU: FlashInfer's workspace (that GPU's wrappers run in turn), the wrappers
    over it, the page list and the page-row buffers."""
    workspace: torch.Tensor
    prefill_wrapper: object
    page_range: torch.Tensor  # int32 0, 1, 2, ...: the dense page list
    decode_wrappers: dict = field(default_factory=dict)  # (name, group, page-list buffer) -> DecodeWrapper
    batch_wrappers: dict = field(default_factory=dict)  # (group, requests, pool pages) -> a batch decode wrapper
    rows: dict = field(default_factory=dict)  # (Hkv, k) or (R, Hkv, k) -> the int32 page rows the scorer writes


class FlashInferBackend:
    """An `AttentionBackend` (quest_core/backends.py) for float16 and bfloat16 on CUDA; `make_backend` picks the
    torch backend for other dtypes."""
    name = "flashinfer"
    kv_layout = "page-major"
    fallback_reason = None
    adaptive_budget = False  # its sparse plan gives every KV head the same number of pages (see the module's text)

    def __init__(self, device, workspace_bytes: int = 128 << 20):
        import flashinfer

        self.append_kernels = kernels.load()
        self.graph_capturable = self.append_kernels is not None  # the captured append reads the length on the GPU
        self.score_topk = kernels.ScoreTopK(self.append_kernels) if self.append_kernels is not None else None
        self.sparse_decode = kernels.SparseDecode(self.append_kernels) if self.append_kernels is not None else None
        self.reference = TorchBackend()  # for the selections our scorer does not take, and the baselines

        self.flashinfer = flashinfer
        self.workspace_bytes = workspace_bytes
        self.devices = {}        # torch.device (with its index) -> DeviceState
        self.plans = {}          # id(wrapper) -> the key of its current plan: wrappers plan only on a change
        self.step_plans = {}     # id(wrapper) -> (plan, key) functions of the last step, for `plan_step`
        self.last_written = {}   # id(wrapper) -> the cache length its last_page_len buffer was written for
        self.capturing = False   # inside a CUDA-graph capture: plans are made beforehand by plan_step
        self.captured_inputs = []  # the cached uploads a capture read: its graph keeps them (`_captured`)
        self.batch_offsets = {}  # (device, the requests' run starts) -> their first pool rows: `_batch_offsets`
        self.batch_lengths = {}  # device -> (lengths, on the GPU): `_batch_lengths`' last eager step
        self.bounds_tables = {}  # the requests' (bounds address, capacity) -> on the GPU: `_bounds_table`
        self._state(torch.device(device))  # the model's first GPU, ready before the first layer

    def _state(self, device: torch.device) -> DeviceState:
        """The backend's state on `device`, made at its first use there."""
        if device.index is None:
            device = torch.device(device.type, torch.cuda.current_device())
        state = self.devices.get(device)
        if state is None:
            workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device)
            prefill_wrapper = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="HND")
            page_range = torch.arange(1 << 16, dtype=torch.int32, device=device)
            state = self.devices[device] = DeviceState(workspace, prefill_wrapper, page_range)
        return state

    @property
    def scratch_generation(self) -> tuple:
        """Changes when our kernels' scratch is reallocated (a longer context, a larger batch): a CUDA graph that
        holds the old buffers' addresses must be captured again (quest_core/cuda_graph.py keys its graphs on it)."""
        return tuple(kernel.generation for kernel in (self.score_topk, self.sparse_decode) if kernel is not None)

    def describe(self) -> str:
        if self.append_kernels is None:
            return "flashinfer, without our CUDA kernels (not built here: their torch twins run)"
        return self.name

    # ---- planning ----

    def _decode_wrapper(self, state: DeviceState, name: str, group: int, indptr, indices,
                        num_requests: int) -> DecodeWrapper:
        """A decode wrapper in CUDA-graph mode over fixed buffers on the state's GPU, made once per (name, group,
        buffers), on the kernels `use_tensor_cores` picks."""
        key = (name, group, indices.data_ptr(), indices.numel())
        decode = state.decode_wrappers.get(key)
        if decode is None:
            last_page_len = self._int32(indices.device, num_requests)
            tensor_cores = use_tensor_cores(group)
            wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                state.workspace, kv_layout="HND", use_cuda_graph=True, use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=indptr(), paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last_page_len)
            decode = state.decode_wrappers[key] = DecodeWrapper(wrapper, last_page_len, tensor_cores)
        return decode

    def _plan(self, decode: DecodeWrapper, layer: PagedLayer, plan, key) -> None:
        """Plan `wrapper` when `key()` changed, and keep its last_page_len buffer current.

        The CUDA-core decode kernels read the last page's length from that buffer, and their split-KV schedule
        depends only on the page counts, so most steps need no new plan (the tensor-core kernels' keys include
        the length). Inside a capture the graph itself writes the buffer, from the length on the GPU."""
        wrapper, buffer = decode.wrapper, decode.last_page_len
        self.step_plans[id(wrapper)] = (plan, key)
        if self.capturing:
            if self.last_written.get(id(wrapper)) != "graph":
                buffer.copy_(torch.remainder(layer.device_length - 1, layer.page_size).add_(1).expand_as(buffer))
                self.last_written[id(wrapper)] = "graph"
            return
        if self.plans.get(id(wrapper)) != key():
            plan()
            self.plans[id(wrapper)] = key()
            self.last_written[id(wrapper)] = layer.length
        if self.last_written.get(id(wrapper)) != layer.length:
            buffer.fill_(layer.last_page_len)
            self.last_written[id(wrapper)] = layer.length

    def plan_step(self, step_plans: dict) -> None:
        """Before a graph replay: plan the decode wrappers of `step_plans` (what `self.step_plans` held after the
        graph's eager step) whose keys changed. A graph keeps its own: the wrappers are shared, and another cache's
        step in between records the plans of its own layers."""
        for wrapper_id, (plan, key) in step_plans.items():
            if self.plans.get(wrapper_id) != key():
                plan()
                self.plans[wrapper_id] = key()
        self.last_written.clear()  # the graph wrote the buffers

    @staticmethod
    def _all_pages(state: DeviceState, num_pages: int) -> torch.Tensor:
        if num_pages > state.page_range.numel():
            state.page_range = torch.arange(2 * num_pages, dtype=torch.int32, device=state.page_range.device)
        return state.page_range[:num_pages]

    @staticmethod
    def _rows(state: DeviceState, *shape: int) -> torch.Tensor:
        """The int32 page-row buffer of `shape` ([Hkv, k], or [R, Hkv, k] for a batch) on the state's GPU."""
        rows = state.rows.get(shape)
        if rows is None:
            rows = state.rows[shape] = torch.empty(shape, dtype=torch.int32, device=state.workspace.device)
        return rows

    @staticmethod
    def _int32(device, *shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int32, device=device)

    @staticmethod
    def _host(*values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    # ---- the backend interface (see backend_torch.TorchBackend) ----

    def prefill(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hq, T, D] -> [Hq, T, D], causal over the whole cache."""
        num_heads, num_new, head_dim = query.shape
        num_pages, last = layer.num_pages, layer.last_page_len
        state = self._state(layer.keys.device)
        wrapper = state.prefill_wrapper
        key = (num_new, num_pages, last, num_heads, layer.num_kv_heads, head_dim, layer.page_size, query.dtype, scaling)
        with torch.cuda.device(layer.keys.device):
            if self.plans.get(id(wrapper)) != key:
                wrapper.plan(self._host(0, num_new), self._host(0, num_pages), self._all_pages(state, num_pages),
                             self._host(last), num_heads, layer.num_kv_heads, head_dim, layer.page_size, causal=True,
                             sm_scale=scaling, q_data_type=query.dtype, kv_data_type=layer.keys.dtype)
                self.plans[id(wrapper)] = key
            out = wrapper.run(query.transpose(0, 1).contiguous(), (layer.keys, layer.values))
        return out.transpose(0, 1)

    def decode_dense(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hkv, G, D] -> [Hkv, G, D] over every stored token."""
        num_kv_heads, group, head_dim = query.shape
        device = layer.keys.device
        state = self._state(device)
        page_range = self._all_pages(state, layer.capacity_pages)  # the page list: every page the cache has room for
        decode = self._decode_wrapper(state, "dense", group, lambda: self._int32(device, 2), state.page_range, 1)
        wrapper = decode.wrapper
        layer = weakref.proxy(layer)  # the plan functions outlive the step; they must not keep the cache alive

        def plan():
            num_pages = layer.num_pages
            with torch.cuda.device(device):
                wrapper.plan(self._host(0, num_pages), page_range[:num_pages], self._host(layer.last_page_len),
                             num_kv_heads * group, num_kv_heads, head_dim, layer.page_size, sm_scale=scaling,
                             q_data_type=query.dtype, kv_data_type=layer.keys.dtype)

        def key():
            last = layer.last_page_len if decode.use_tensor_cores else None
            return layer.num_pages, last, num_kv_heads, group, head_dim, layer.page_size, query.dtype, scaling

        self._plan(decode, layer, plan, key)
        with torch.cuda.device(device):
            out = wrapper.run(query.reshape(1, num_kv_heads * group, head_dim), (layer.keys, layer.values))
        return out.view(num_kv_heads, group, head_dim)

    def select(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
               sink_pages: int = 0, coarse_factor: int = 0) -> torch.Tensor:
        """query [Hkv, G, D] -> one-head page rows [Hkv, k] int32 (`layer.one_head_rows`), the current page last,
        the first sink_pages pages among the others. The two-level ranking (coarse_factor) runs on the torch twin:
        our scorer does not rank pairs first yet."""
        if self._scorer_takes(query, layer, group_rule, coarse_factor):
            rows = self._rows(self._state(layer.keys.device), layer.num_kv_heads, num_selected)
            if layer.device_length is not None:  # captured: the kernel reads the length on the GPU
                return self.score_topk(query, layer.page_bounds, layer.capacity_pages, num_selected, rows,
                                       layer.device_length, layer.page_size, group_rule, sink_pages)
            return self.score_topk(query, layer.page_bounds, layer.num_pages, num_selected, rows,
                                   page_size=layer.page_size, group_rule=group_rule, sink_pages=sink_pages)
        selected = self.reference.select(query, layer, num_selected, group_rule, sink_pages, coarse_factor)
        return layer.one_head_rows(selected).int()

    def decode_quest(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
                     sink_pages: int, coarse_factor: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`select`, then `decode_sparse`: (out [Hkv, G, D], one-head page rows [Hkv, k]). Where `_one_kernel_takes`
        the layer, both in one kernel of ours (kernels.quest_decode: its rows in page order, the current page last)."""
        if not self._one_kernel_takes(query, layer, group_rule, coarse_factor):
            selected = self.select(query, layer, num_selected, group_rule, sink_pages, coarse_factor)
            return self.decode_sparse(query, layer, selected, scaling), selected
        rows = self._rows(self._state(layer.keys.device), layer.num_kv_heads, num_selected)
        if layer.device_length is not None:  # captured: the kernel reads the length on the GPU
            out = kernels.quest_decode(self.append_kernels, query, layer.page_bounds, layer.keys, layer.values,
                                       layer.capacity_pages, num_selected, rows, scaling,
                                       device_length=layer.device_length, group_rule=group_rule,
                                       sink_pages=sink_pages)
        else:
            out = kernels.quest_decode(self.append_kernels, query, layer.page_bounds, layer.keys, layer.values,
                                       layer.num_pages, num_selected, rows, scaling, layer.length,
                                       group_rule=group_rule, sink_pages=sink_pages)
        return out, rows

    def _one_kernel_takes(self, query: torch.Tensor, layer: PagedLayer, group_rule: str, coarse_factor: int) -> bool:
        """Whether Quest's decode runs as one kernel (kernels.quest_decode) rather than score_topk + sparse_decode:
        on Hopper GPUs, for at most ONE_KERNEL_KV_HEADS KV heads (where it was measured faster: bench/RESULTS.md)
        whose pages' keys fit its shared memory."""
        return (self._scorer_takes(query, layer, group_rule, coarse_factor) and self.sparse_decode.supports(query)
                and layer.num_kv_heads <= ONE_KERNEL_KV_HEADS and layer.capacity_pages <= 16384
                and torch.cuda.get_device_capability(query.device)[0] >= 9)

    def _scorer_takes(self, query: torch.Tensor, layer: PagedLayer, group_rule: str, coarse_factor: int) -> bool:
        """Whether our scorer takes the selection (else its torch twin runs)."""
        return (self.score_topk is not None and layer.head_dim % 4 == 0 and not coarse_factor
                and (group_rule != "mass" or query.shape[-2] <= 32))

    def select_baseline(self, mode, query, layer, num_selected, scaling):
        return layer.one_head_rows(self.reference.select_baseline(mode, query, layer, num_selected, scaling)).int()

    # ---- a batch of requests whose pages share a PagePool (hf._batch_attention) ----

    def append_batch(self, keys: torch.Tensor, values: torch.Tensor, layers: list[PagedLayer]) -> None:
        """keys, values [R, Hkv, 1, D], one layer per request: each request's token appended to its layer. In a
        captured step, our append kernel once over the R * Hkv heads (each writing at its request's length on the
        GPU, into its run and bounds); else one request after another."""
        first = layers[0]
        if first.kernels is not None and first.run is not None:
            # made in the eager step before a capture too (`_upload`)
            table = self._bounds_table(keys.device, [layer.page_bounds for layer in layers])
            offsets = self._batch_offsets(keys.device, first.num_kv_heads, layers)
            if first.device_length is not None:
                first.kernels.append_kv(keys.flatten(0, 1), values.flatten(0, 1), first.run.pool.keys[first.pool_index],
                                        first.run.pool.values[first.pool_index], first.page_bounds, 0,
                                        self._batch_lengths(keys.device, layers), table, offsets)
                return
        for row, layer in enumerate(layers):
            layer.update(keys[row:row + 1], values[row:row + 1])

    def decode_batch_dense(self, query: torch.Tensor, layers: list[PagedLayer], scaling: float) -> torch.Tensor:
        """query [R, Hkv, G, D], one layer per request (the same model layer) -> [R, Hkv, G, D] over every stored
        token: one FlashInfer batch decode whose page lists are the requests' runs of the pool, in CUDA-graph mode
        (fixed buffers, so a batched step can be captured). Planned once per step on the host (every layer of a step
        has the same runs and lengths; before a graph replay, by `plan_step`)."""
        num_requests, num_kv_heads, group, head_dim = query.shape
        pool, index, device = layers[0].run.pool, layers[0].pool_index, query.device
        state = self._state(device)
        wrapper = self._batch_wrapper(state, group, num_requests, pool.num_pages)
        layers = [weakref.proxy(layer) for layer in layers]  # the plan functions outlive the step

        def runs():
            return tuple((layer.run.start, layer.num_pages, layer.last_page_len) for layer in layers)

        def key():
            return runs(), num_kv_heads, group, head_dim, pool.page_size, query.dtype, scaling

        def plan():
            page_lists = runs()
            page_counts = self._host(*(pages for _, pages, _ in page_lists))
            all_pages = self._all_pages(state, max(start + pages for start, pages, _ in page_lists))
            with torch.cuda.device(device):
                wrapper.plan(torch.cat([self._host(0), page_counts.cumsum(0, dtype=torch.int32)]),
                             torch.cat([all_pages[start:start + pages] for start, pages, _ in page_lists]),
                             self._host(*(last for _, _, last in page_lists)), num_kv_heads * group, num_kv_heads,
                             head_dim, pool.page_size, sm_scale=scaling, q_data_type=query.dtype,
                             kv_data_type=pool.keys[index].dtype)

        self.step_plans[id(wrapper)] = (plan, key)
        if not self.capturing and self.plans.get(id(wrapper)) != key():
            plan()
            self.plans[id(wrapper)] = key()
        with torch.cuda.device(device):
            out = wrapper.run(query.reshape(num_requests, num_kv_heads * group, head_dim),
                              (pool.keys[index], pool.values[index]))
        return out.view(num_requests, num_kv_heads, group, head_dim)

    def select_batch(self, query: torch.Tensor, layers: list[PagedLayer], num_selected: int, group_rule: str,
                     sink_pages: int = 0, coarse_factor: int = 0) -> torch.Tensor:
        """query [R, Hkv, G, D], one layer per request -> each request's `select` [R, Hkv, k] int32: our scorer in one
        launch over the R * Hkv heads (each reading its request's bounds and length), valid until the next call."""
        num_requests, num_kv_heads = query.shape[:2]
        if not self._scorer_takes(query, layers[0], group_rule, coarse_factor):
            return torch.stack([self.select(row, layer, num_selected, group_rule, sink_pages, coarse_factor).clone()
                                for row, layer in zip(query, layers)])
        rows = self._rows(self._state(query.device), num_requests, num_kv_heads, num_selected)
        bounds = [layer.page_bounds for layer in layers]
        return self.score_topk.batch(query, bounds, self._bounds_table(query.device, bounds), num_selected, rows,
                                     self._batch_lengths(query.device, layers), layers[0].page_size, group_rule,
                                     sink_pages)

    def _bounds_table(self, device, bounds: list[torch.Tensor]) -> torch.Tensor:
        """The requests' page bounds addresses and capacities (int64 [R, 2] on the GPU) for the batched scorer and
        append, uploaded once per batch and layer."""
        key = tuple((b.data_ptr(), b.shape[1]) for b in bounds)
        return self._cached_upload(self.bounds_tables, key, lambda: self._upload(device, key))

    def _batch_wrapper(self, state: DeviceState, group: int, num_requests: int, pool_pages: int):
        """The batch decode wrapper for `num_requests` requests of query groups of `group`, in CUDA-graph mode over
        buffers of its own (its page list as long as the pool), made once."""
        key = (group, num_requests, pool_pages)
        wrapper = state.batch_wrappers.get(key)
        if wrapper is None:
            device = state.workspace.device
            wrapper = state.batch_wrappers[key] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                state.workspace, kv_layout="HND", use_cuda_graph=True, use_tensor_cores=use_tensor_cores(group),
                paged_kv_indptr_buffer=self._int32(device, num_requests + 1),
                paged_kv_indices_buffer=self._int32(device, pool_pages),
                paged_kv_last_page_len_buffer=self._int32(device, num_requests))
        return wrapper

    def decode_batch_sparse(self, query: torch.Tensor, layers: list[PagedLayer], selected: torch.Tensor,
                            scaling: float) -> torch.Tensor:
        """query [R, Hkv, G, D], selected [R, Hkv, k] (each request's one-head rows, as `select` returns them) ->
        [R, Hkv, G, D] over the selected pages: our sparse decode kernel once over the R * Hkv heads, their rows
        moved to the pool's (the run's first page, times Hkv, added) and each head's last page length read from its
        request's length."""
        num_requests, num_kv_heads, group, head_dim = query.shape
        if self.sparse_decode is None or not self.sparse_decode.supports(query[0]):
            return torch.stack([self.decode_sparse(row, layer, rows, scaling)
                                for row, layer, rows in zip(query, layers, selected)])
        pool, index = layers[0].run.pool, layers[0].pool_index
        offsets = self._batch_offsets(query.device, num_kv_heads, layers)
        rows = selected.to(torch.int32) + offsets.view(-1, 1, 1)  # [R, Hkv, k] rows of the pool
        out = self.sparse_decode(query.reshape(num_requests * num_kv_heads, group, head_dim), pool.keys[index],
                                 pool.values[index], rows.view(num_requests * num_kv_heads, -1), scaling,
                                 device_length=self._batch_lengths(query.device, layers))
        return out.view(num_requests, num_kv_heads, group, head_dim)

    def _batch_offsets(self, device, num_kv_heads: int, layers: list[PagedLayer]) -> torch.Tensor:
        """The requests' first pool rows (run start * Hkv, int32 [R]) on the GPU, uploaded once per batch."""
        starts = tuple(layer.run.start for layer in layers)
        return self._cached_upload(self.batch_offsets, (device, starts),
                                   lambda: self._upload(device, [s * num_kv_heads for s in starts]).int())

    def _cached_upload(self, cache: dict, key, upload) -> torch.Tensor:
        """cache[key], made by `upload()` on a miss (never inside a capture: the eager step before it reads the
        same), the least recently used of 1024 entries dropped; what a capture reads goes to `captured_inputs`,
        which its graph keeps, as the cache may drop it while the graph still replays."""
        value = cache.pop(key, None)
        if value is None:
            value = upload()
            if len(cache) >= 1024:
                del cache[next(iter(cache))]
        cache[key] = value  # the most recently used last
        if self.capturing:
            self.captured_inputs.append(value)
        return value

    def _batch_lengths(self, device, layers: list[PagedLayer]) -> torch.Tensor:
        """The requests' lengths (int64 [R]) on the GPU: uploaded once per step, or, in a captured step, gathered
        from the layers' lengths on the GPU."""
        if layers[0].device_length is not None:
            return torch.cat([layer.device_length for layer in layers])
        lengths = tuple(layer.length for layer in layers)
        cached = self.batch_lengths.get(device)
        if cached is None or cached[0] != lengths:
            cached = self.batch_lengths[device] = (lengths, self._upload(device, lengths))
        return cached[1]

    @staticmethod
    def _upload(device, values) -> torch.Tensor:
        """int64 `values` on `device`, copied from pinned memory without the host waiting for the GPU. Never inside
        a CUDA-graph capture: each replay would copy again from the pinned buffer, which the allocator hands out
        again once the copy is done (a capture that tries fails, and the steps run eagerly with a log line)."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("an upload inside a CUDA-graph capture: the eager step before it makes what it needs")
        return torch.tensor(values).pin_memory().to(device, non_blocking=True)

    def rows_per_page(self, layer: PagedLayer) -> int:
        """`select` returns FlashInfer's one-head page rows p * Hkv + h."""
        return layer.num_kv_heads

    def decode_sparse(self, query: torch.Tensor, layer: PagedLayer, selected: torch.Tensor, scaling: float):
        """query [Hkv, G, D], selected page rows [Hkv, k] -> [Hkv, G, D] over the selected pages only."""
        if self.sparse_decode is not None and self.sparse_decode.supports(query):  # our kernel, no plan
            rows = selected.to(torch.int32).contiguous()
            if layer.device_length is not None:  # captured: the kernel reads the length on the GPU
                return self.sparse_decode(query, layer.keys, layer.values, rows, scaling,
                                          device_length=layer.device_length)
            return self.sparse_decode(query, layer.keys, layer.values, rows, scaling, layer.length)
        num_kv_heads, group, head_dim = query.shape
        num_selected = selected.shape[1]
        device = layer.keys.device
        state = self._state(device)
        rows = self._rows(state, num_kv_heads, num_selected)
        if selected.data_ptr() != rows.data_ptr():  # a baseline's or the torch scorer's selection
            rows.copy_(selected)
        indptr = torch.arange(0, num_kv_heads * num_selected + 1, num_selected, dtype=torch.int32)
        decode = self._decode_wrapper(state, "sparse", group, lambda: indptr.to(device), rows.view(-1), num_kv_heads)
        wrapper = decode.wrapper
        layer = weakref.proxy(layer)

        def plan():
            with torch.cuda.device(device):
                wrapper.plan(indptr, rows.view(-1), torch.full((num_kv_heads,), layer.last_page_len, dtype=torch.int32),
                             group, 1, head_dim, layer.page_size, sm_scale=scaling, q_data_type=query.dtype,
                             kv_data_type=layer.keys.dtype)

        def key():
            last = layer.last_page_len if decode.use_tensor_cores else None
            return last, group, head_dim, layer.page_size, query.dtype, scaling

        self._plan(decode, layer, plan, key)
        one_head_pages = (-1, 1, layer.page_size, head_dim)
        with torch.cuda.device(device):
            return wrapper.run(query.contiguous(), (layer.keys.view(one_head_pages),
                                                    layer.values.view(one_head_pages)))
