"""Attention backend `flashinfer` (CUDA): stock FlashInfer wrappers over the engine's paged cache, with our CUDA
kernels (kernels/) for page scoring + top-k and for the KV append.

Dense decode and prefill read the cache as it is (HND: [pages, Hkv, P, D]). Quest decode views K and V as one-head
pages [pages * Hkv, 1, P, D], where page p of KV head h is row p * Hkv + h, and runs one pseudo-request per KV head
(num_kv_heads=1, num_qo_heads=G) whose page list is the selected pages, then the current page. So `indptr` is fixed
for a budget and only `last_page_len` moves with the context. Plans are made on the host once per shape (every layer
of a step has the same shape) and reused by all layers; the page rows are written in place by the scorer, which the
plan references, so a new selection needs no new plan.
"""
import torch

import kernels

from .backend_torch import TorchBackend
from .paged_cache import PagedLayer

FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


class FlashInferBackend:
    name = "flashinfer"

    def __init__(self, device, workspace_bytes: int = 128 << 20):
        import flashinfer

        self.device = torch.device(device)
        self.kernels = kernels.load()
        self.score_topk = kernels.ScoreTopK(self.kernels) if self.kernels is not None else None
        self.reference = TorchBackend()  # for what FlashInfer does not run (float32, the "max" group rule)

        self.flashinfer, self.workspace_bytes = flashinfer, workspace_bytes
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace(), kv_layout="HND")
        self.decode_wrappers = {}
        self.plans = {}
        self.page_range = torch.arange(1 << 16, dtype=torch.int32, device=self.device)
        self.rows = {}  # (Hkv, k) -> the int32 page-row buffer the scorer writes and the sparse plan reads

    # ---- planning ----

    def _workspace(self) -> torch.Tensor:
        return torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self.device)

    def _decode_wrapper(self, name: str, group: int):
        """FlashInfer's decode kernels take query groups of 1, 2, 3, 4 or 8 heads; other groups (7 in Qwen2-7B)
        run on its tensor-core (prefill) kernels."""
        tensor_cores = group not in (1, 2, 3, 4, 8)
        wrapper = self.decode_wrappers.get((name, tensor_cores))
        if wrapper is None:
            wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace(), kv_layout="HND",
                                                                         use_tensor_cores=tensor_cores)
            self.decode_wrappers[(name, tensor_cores)] = wrapper
        return wrapper

    def _plan(self, wrapper, key: tuple, plan) -> None:
        if self.plans.get(id(wrapper)) != key:
            plan()
            self.plans[id(wrapper)] = key

    def _all_pages(self, num_pages: int) -> torch.Tensor:
        if num_pages > self.page_range.numel():
            self.page_range = torch.arange(2 * num_pages, dtype=torch.int32, device=self.device)
        return self.page_range[:num_pages]

    @staticmethod
    def _host(*values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    # ---- the backend interface (see backend_torch.TorchBackend) ----

    def prefill(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hq, T, D] -> [Hq, T, D], causal over the whole cache."""
        if query.dtype not in FLASHINFER_DTYPES:
            return self.reference.prefill(query, layer, scaling)
        num_heads, num_new, head_dim = query.shape
        num_pages, last = layer.num_pages, layer.last_page_len
        key = (num_new, num_pages, last, num_heads, layer.num_kv_heads, head_dim, layer.page_size, query.dtype, scaling)
        self._plan(self.prefill_wrapper, key, lambda: self.prefill_wrapper.plan(
            self._host(0, num_new), self._host(0, num_pages), self._all_pages(num_pages), self._host(last),
            num_heads, layer.num_kv_heads, head_dim, layer.page_size, causal=True, sm_scale=scaling,
            q_data_type=query.dtype, kv_data_type=layer.keys.dtype))
        out = self.prefill_wrapper.run(query.transpose(0, 1).contiguous(), (layer.keys, layer.values))
        return out.transpose(0, 1)

    def decode_dense(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hkv, G, D] -> [Hkv, G, D] over every stored token."""
        if query.dtype not in FLASHINFER_DTYPES:
            return self.reference.decode_dense(query, layer, scaling)
        num_kv_heads, group, head_dim = query.shape
        num_pages, last = layer.num_pages, layer.last_page_len
        key = (num_pages, last, num_kv_heads, group, head_dim, layer.page_size, query.dtype, scaling)
        wrapper = self._decode_wrapper("dense", group)
        self._plan(wrapper, key, lambda: wrapper.plan(
            self._host(0, num_pages), self._all_pages(num_pages), self._host(last), num_kv_heads * group,
            num_kv_heads, head_dim, layer.page_size, sm_scale=scaling, q_data_type=query.dtype,
            kv_data_type=layer.keys.dtype))
        out = wrapper.run(query.reshape(1, num_kv_heads * group, head_dim), (layer.keys, layer.values))
        return out.view(num_kv_heads, group, head_dim)

    def select(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str) -> torch.Tensor:
        """query [Hkv, G, D] -> one-head page rows [Hkv, k] int32 (p * Hkv + h), the current page last."""
        if query.dtype not in FLASHINFER_DTYPES:
            return self.reference.select(query, layer, num_selected, group_rule)
        if self.score_topk is not None and group_rule == "sum":
            rows = self.rows.get((layer.num_kv_heads, num_selected))
            if rows is None:
                rows = torch.empty(layer.num_kv_heads, num_selected, dtype=torch.int32, device=self.device)
                self.rows[(layer.num_kv_heads, num_selected)] = rows
            return self.score_topk(query, layer.page_bounds, layer.num_pages, num_selected, rows)
        return _one_head_rows(self.reference.select(query, layer, num_selected, group_rule), layer)

    def select_baseline(self, mode, query, layer, num_selected, scaling):
        pages = self.reference.select_baseline(mode, query, layer, num_selected, scaling)
        if query.dtype not in FLASHINFER_DTYPES:
            return pages
        return _one_head_rows(pages, layer)

    def page_ids(self, selected: torch.Tensor, layer: PagedLayer) -> torch.Tensor:
        """What `select` returned, as page ids [Hkv, k] (for the trace)."""
        if selected.dtype != torch.int32:
            return selected
        return selected.long().div(layer.num_kv_heads, rounding_mode="floor")

    def decode_sparse(self, query: torch.Tensor, layer: PagedLayer, selected: torch.Tensor, scaling: float):
        """query [Hkv, G, D], selected page rows [Hkv, k] -> [Hkv, G, D] over the selected pages only."""
        if query.dtype not in FLASHINFER_DTYPES:
            return self.reference.decode_sparse(query, layer, selected, scaling)
        num_kv_heads, group, head_dim = query.shape
        num_selected, last = selected.shape[1], layer.last_page_len
        key = (num_selected, last, num_kv_heads, group, head_dim, layer.page_size, query.dtype, scaling,
               selected.data_ptr())
        wrapper = self._decode_wrapper("sparse", group)
        self._plan(wrapper, key, lambda: wrapper.plan(
            torch.arange(0, num_kv_heads * num_selected + 1, num_selected, dtype=torch.int32),
            selected.view(-1), torch.full((num_kv_heads,), last, dtype=torch.int32), group, 1, head_dim,
            layer.page_size, sm_scale=scaling, q_data_type=query.dtype, kv_data_type=layer.keys.dtype))
        one_head_pages = (-1, 1, layer.page_size, head_dim)
        return wrapper.run(query.contiguous(), (layer.keys.view(one_head_pages), layer.values.view(one_head_pages)))


def _one_head_rows(pages: torch.Tensor, layer: PagedLayer) -> torch.Tensor:
    """Page ids [Hkv, k] -> FlashInfer's one-head page rows p * Hkv + h, int32."""
    return (pages * layer.num_kv_heads + layer.head_rows).int()
