"""One attention layer's KV cache in pages of P tokens, with each page's key min/max (Quest's metadata).

Layout, one of two, chosen by the attention backend (`kv_layout`):
    "page-major" (FlashInfer's HND; the GPU path)   keys, values [capacity_pages, Hkv, P, D]
    "head-major" (the torch backend)                keys, values [Hkv, capacity_pages, P, D]
    page_bounds    [Hkv, capacity_pages, 2 * D]   the page's element-wise key max, then its key min
    page_max, page_min are the two halves of page_bounds (views): [Hkv, capacity_pages, D]
    pair_bounds    [Hkv, ceil(capacity_pages / 2), 2 * D]   with `keep_pairs` (QuestConfig.coarse_factor's two-level
                   ranking, torch appends): the bounds of the pairs of pages (0, 1), (2, 3), ..., kept up to date
`key_pages` / `value_pages` view either as [capacity_pages, Hkv, P, D]. Head-major keeps each KV head's tokens in
order in one stretch of memory, so dense attention reads them in place (`dense()` is a view, no copy). Both are
also read as one-head pages [capacity_pages * Hkv, P, D], whose row for (page, KV head) is `one_head_rows`.

Keeping max and min side by side makes a page's score one dot product, [relu(q), min(q, 0)] . page_bounds.
The bounds are exact in any dtype (a max of stored values). On CPU they are kept in float32, so scoring needs no
per-step conversion (they are 1/16 of the KV's size at page 16); on GPU in the KV dtype, halving the bytes the
page scorer reads.
The cache is for inference only: its methods run under `torch.inference_mode()`.
Pages are allocated in blocks; unused pages hold page_max = -inf and page_min = +inf, so appending is a fold
(max/min with the new keys) for a single decode token and for a prefill chunk alike. Batch size is 1.

On a GPU the engine keeps every request's K/V in one `PagePool` (page-major): a cache holds one run of consecutive
pages there (`PoolRun`), at the same place in every layer, so one FlashInfer batch decode reads the pages of every
request of a batch. The page bounds stay the cache's own.
"""
import bisect
import math
import weakref

import torch
from transformers.cache_utils import CacheLayerMixin

from .selection import pair_bounds

KV_LAYOUTS = ("page-major", "head-major")


class GatherBuffer:
    """Scratch memory that layers gather K/V pages into before attention, one per device. The layers of a model run
    one at a time, so those on a device share its buffer; reusing it spares a fresh allocation (and its page faults)
    per layer and step. A model spread over GPUs keeps a buffer on each."""

    def __init__(self):
        self.buffers = {}  # device -> (keys, values), flat

    def get(self, shape: tuple, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel = math.prod(shape)
        keys, values = self.buffers.get(like.device, (None, None))
        if keys is None or keys.numel() < numel or keys.dtype != like.dtype:
            keys = like.new_empty(numel + numel // 4)  # some headroom: the context grows
            values = like.new_empty(numel + numel // 4)
            self.buffers[like.device] = keys, values
        return keys[:numel].view(shape), values[:numel].view(shape)


class PagePool:
    """The K/V pages of many caches on one GPU, a tensor pair per model layer: keys, values [num_pages, Hkv, P, D].
    Runs of consecutive pages are taken first fit and given back when their cache is freed or moves to a larger run."""

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int, dtype,
                 device):
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty_like(keys) for keys in self.keys]
        self.num_pages, self.page_size = num_pages, page_size
        self.free_runs = [(0, num_pages)]  # (start, pages), by start

    @property
    def free_pages(self) -> int:
        return sum(pages for _, pages in self.free_runs)

    def take(self, num_pages: int) -> int:
        """The first page of a free run of `num_pages` pages, now taken."""
        for index, (start, pages) in enumerate(self.free_runs):
            if pages >= num_pages:
                if pages == num_pages:
                    del self.free_runs[index]
                else:
                    self.free_runs[index] = (start + num_pages, pages - num_pages)
                return start
        raise MemoryError(f"the KV cache pool has no {num_pages} consecutive free pages ({self.free_pages} of "
                          f"{self.num_pages} are free): fewer or shorter conversations at once, or a larger pool")

    def give(self, start: int, num_pages: int) -> None:
        index = bisect.bisect(self.free_runs, (start, num_pages))
        self.free_runs.insert(index, (start, num_pages))
        if index + 1 < len(self.free_runs) and start + num_pages == self.free_runs[index + 1][0]:  # join the next
            self.free_runs[index] = (start, num_pages + self.free_runs.pop(index + 1)[1])
        if index and sum(self.free_runs[index - 1]) == start:  # join the previous
            previous_start, previous_pages = self.free_runs[index - 1]
            self.free_runs[index - 1] = (previous_start, previous_pages + self.free_runs.pop(index)[1])


class PoolRun:
    """One cache's pages in a PagePool: pages start .. start + num_pages - 1 of every layer. Growing takes a larger
    run and moves every layer there; the run goes back to the pool when the cache is freed."""

    def __init__(self, pool: PagePool, layers: list["PagedLayer"]):
        self.pool = pool
        self.layers = [weakref.proxy(layer) for layer in layers]  # the layers hold the run, not the other way
        self.start = self.num_pages = 0
        self._give_back = None

    def reserve(self, num_pages: int) -> None:
        """Room for `num_pages` pages in every layer."""
        if num_pages <= self.num_pages:
            return
        start = self.pool.take(num_pages)
        for index, layer in enumerate(self.layers):
            layer.move(self.pool.keys[index][start:start + num_pages], self.pool.values[index][start:start + num_pages])
        self.release()
        self.start, self.num_pages = start, num_pages
        self._give_back = weakref.finalize(self, self.pool.give, start, num_pages)

    def release(self) -> None:
        if self._give_back is not None:
            self._give_back()
        self.start = self.num_pages = 0


class PagedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, page_size: int = 16, block_pages: int = 64, gather_buffer: GatherBuffer | None = None,
                 kernels=None, kv_layout: str = "page-major"):
        """kernels: the compiled CUDA module (quest_core.kernels.load()), whose append_kv replaces the torch path on
        CUDA (page-major layout only)."""
        super().__init__()
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        if kernels is not None and kv_layout != "page-major":
            raise ValueError("our CUDA kernels write the page-major layout")
        self.page_dim = KV_LAYOUTS.index(kv_layout)  # the storage's page axis: 0 page-major, 1 head-major
        self.page_size = page_size
        self.block_pages = block_pages
        self.gather_buffer = gather_buffer or GatherBuffer()
        self.kernels = kernels
        self.length = 0
        self.page_bounds = None
        self.device_length = None  # while a CUDA graph is captured: the length after this step's append, on the GPU
        self.run = None  # the cache's PoolRun, where its pages live in an engine's PagePool (`use_pool`)
        self.pair_bounds = None  # with keep_pairs
        self.keeps_pairs = False

    def keep_pairs(self, keep: bool) -> None:
        """Keep `pair_bounds` up to date from now on (or drop them): the two-level ranking reads them instead of
        folding every page's bounds at each step. Only where the torch code appends (our append kernel and a
        captured step do not update them)."""
        self.keeps_pairs = keep and self.kernels is None
        self.pair_bounds = None
        if self.keeps_pairs and self.page_bounds is not None:
            self.pair_bounds = self.page_bounds.new_empty(self.num_kv_heads, -(-self.capacity_pages // 2),
                                                          self.page_bounds.shape[2])
            self._refresh_pairs(0)

    def use_pool(self, run: PoolRun, layer_index: int) -> None:
        """Keep the pages in `run` (empty layer, page-major): layer `layer_index` of its pool."""
        pool = run.pool
        keys = pool.keys[layer_index]
        if self.page_dim or pool.page_size != self.page_size:
            raise ValueError("a page pool holds page-major pages of its own page size")
        self.dtype, self.device = keys.dtype, keys.device
        self._allocate_empty(keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        self.is_initialized = True
        self.run, self.pool_index = run, layer_index

    # ---- transformers' CacheLayerMixin interface ----

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The pages live where the layer's first states arrive: its decoder layer's device (accelerate's device
        map can put each layer on another GPU)."""
        _, num_kv_heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._allocate_empty(num_kv_heads, head_dim, self.dtype, self.device)
        self.is_initialized = True

    def _allocate_empty(self, num_kv_heads, head_dim, dtype, device):
        shape = [num_kv_heads, self.page_size, head_dim]
        shape.insert(self.page_dim, 0)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        bounds_dtype = torch.float32 if device.type == "cpu" else dtype
        self.page_bounds = torch.empty(num_kv_heads, 0, 2 * head_dim, dtype=bounds_dtype, device=device)
        self.head_rows = torch.arange(num_kv_heads, device=device).unsqueeze(1)  # [Hkv, 1]
        self.length = 0
        self.keep_pairs(self.keeps_pairs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `key_states`, `value_states` [1, Hkv, T, D]; returns the page tensors [pages, Hkv, P, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"the paged cache holds one sequence, got batch size {key_states.shape[0]}")
        self.append(key_states[0], value_states[0])
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.truncate(0)

    # ---- paging ----

    @property
    def key_pages(self) -> torch.Tensor:
        """The keys as [capacity_pages, Hkv, P, D], whichever the layout (a view)."""
        return self.keys.transpose(0, 1) if self.page_dim else self.keys

    @property
    def value_pages(self) -> torch.Tensor:
        return self.values.transpose(0, 1) if self.page_dim else self.values

    @property
    def capacity_pages(self) -> int:
        return self.keys.shape[self.page_dim]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1 - self.page_dim]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    def one_head_rows(self, pages: torch.Tensor) -> torch.Tensor:
        """Page ids [Hkv, k] -> their rows in the one-head view [capacity_pages * Hkv, P, D] (same shape)."""
        if self.page_dim:
            return pages + self.head_rows * self.capacity_pages
        return pages * self.num_kv_heads + self.head_rows

    @property
    def page_max(self) -> torch.Tensor:
        return self.page_bounds[..., : self.head_dim]

    @property
    def page_min(self) -> torch.Tensor:
        return self.page_bounds[..., self.head_dim:]

    @property
    def num_pages(self) -> int:
        """Pages holding at least one token; the last one is the current page."""
        return -(-self.length // self.page_size)

    @property
    def last_page_len(self) -> int:
        return self.length - (self.num_pages - 1) * self.page_size

    @torch.inference_mode()
    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total, growing by whole blocks of pages."""
        have = self.capacity_pages
        need = -(-num_tokens // self.page_size)
        if need <= have:
            return
        grow = math.ceil((need - have) / self.block_pages) * self.block_pages
        if self.run is not None:  # every layer of the cache moves to a larger run of the pool (`move`)
            self.run.reserve(have + grow)
            return
        more = list(self.keys.shape)
        more[self.page_dim] = grow
        self.keys = torch.cat([self.keys, self.keys.new_empty(more)], dim=self.page_dim)
        self.values = torch.cat([self.values, self.values.new_empty(more)], dim=self.page_dim)
        self._grow_bounds(grow)

    def move(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the pages in `keys`, `values` [capacity_pages, Hkv, P, D] (a larger run of the pool) from now on."""
        used = self.num_pages
        keys[:used].copy_(self.keys[:used])
        values[:used].copy_(self.values[:used])
        grow = keys.shape[0] - self.capacity_pages
        self.keys, self.values = keys, values
        self._grow_bounds(grow)

    def _grow_bounds(self, grow: int) -> None:
        empty_bounds = self.page_bounds.new_full((self.num_kv_heads, grow, 2, self.head_dim), math.inf)
        empty_bounds[:, :, 0] = -math.inf
        old_capacity = self.page_bounds.shape[1]
        self.page_bounds = torch.cat([self.page_bounds, empty_bounds.flatten(2)], dim=1)
        if self.pair_bounds is not None:  # new pairs hold no token; an odd last pair gains an empty page
            new_pairs = -(-self.page_bounds.shape[1] // 2) - -(-old_capacity // 2)
            self.pair_bounds = torch.cat([self.pair_bounds, empty_bounds[:, :new_pairs].flatten(2)], dim=1)

    def _refresh_pairs(self, first_page: int) -> None:
        """Fold the page bounds into `pair_bounds` again from the pair of `first_page` to the last pair in use."""
        first_pair, end_pair = first_page // 2, -(-self.num_pages // 2)
        if self.pair_bounds is not None and end_pair > first_pair:
            self.pair_bounds[:, first_pair:end_pair] = pair_bounds(
                self.page_bounds[:, 2 * first_pair:min(2 * end_pair, self.capacity_pages)])

    @torch.inference_mode()
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write `keys`, `values` [Hkv, T, D] after the stored tokens and fold them into the page min/max."""
        if self.device_length is not None:  # captured (quest_core/cuda_graph.py): the host keeps `length` itself
            self.kernels.append_kv(keys, values, self.keys, self.values, self.page_bounds, 0, self.device_length)
            return
        start, num_new = self.length, keys.shape[1]
        self.reserve(start + num_new)
        if self.kernels is not None and keys.is_cuda:  # one fused launch; the torch code below is its twin
            self.kernels.append_kv(keys, values, self.keys, self.values, self.page_bounds, start)
        elif num_new == 1:  # decode: plain indexing, no index tensors
            page, slot = divmod(start, self.page_size)
            self.key_pages[page, :, slot] = keys[:, 0]
            self.value_pages[page, :, slot] = values[:, 0]
            new_keys = keys[:, 0].to(self.page_bounds.dtype)
            torch.maximum(self.page_max[:, page], new_keys, out=self.page_max[:, page])
            torch.minimum(self.page_min[:, page], new_keys, out=self.page_min[:, page])
        else:
            position = torch.arange(start, start + num_new, device=keys.device)
            page, slot = position // self.page_size, position % self.page_size
            self.key_pages[page, :, slot] = keys.transpose(0, 1)
            self.value_pages[page, :, slot] = values.transpose(0, 1)
            index = page.view(1, -1, 1).expand_as(keys)
            new_keys = keys.to(self.page_bounds.dtype)
            self.page_max.scatter_reduce_(1, index, new_keys, "amax")
            self.page_min.scatter_reduce_(1, index, new_keys, "amin")
        self.length = start + num_new
        self._refresh_pairs(start // self.page_size)

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on; the metadata of the new last page is rebuilt."""
        if not self.is_initialized or length >= self.length:
            return
        first_dropped_page = length // self.page_size
        self.page_max[:, first_dropped_page:self.num_pages] = -math.inf
        self.page_min[:, first_dropped_page:self.num_pages] = math.inf
        kept = length - first_dropped_page * self.page_size
        if kept:
            page_keys = self.key_pages[first_dropped_page, :, :kept]  # [Hkv, kept, D]
            self.page_max[:, first_dropped_page] = page_keys.amax(dim=1)
            self.page_min[:, first_dropped_page] = page_keys.amin(dim=1)
        self._refresh_pairs(first_dropped_page)  # over the old pages in use: the dropped pairs empty again
        self.length = length

    @torch.inference_mode()
    def repage(self, page_size: int) -> None:
        """Lay the same tokens out in pages of `page_size` and rebuild the metadata (no model call)."""
        if page_size == self.page_size:
            return
        if not self.is_initialized:
            self.page_size = page_size
            return
        keys, values = self.dense()
        self.page_size = page_size
        self.run = None  # pages of another size leave the pool (QuestCache.set_config gives the run back)
        self._allocate_empty(self.num_kv_heads, self.head_dim, keys.dtype, keys.device)
        if keys.shape[1]:
            self.append(keys, values)

    # ---- reads ----

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens in order: keys, values [Hkv, length, D]; head-major: views of the cache, page-major:
        copies in the gather buffer."""
        if not self.page_dim:
            return self.gather(None)
        flat = (self.num_kv_heads, self.num_pages * self.page_size, self.head_dim)
        return (self.keys[:, :self.num_pages].view(flat)[:, :self.length],
                self.values[:, :self.num_pages].view(flat)[:, :self.length])

    @torch.inference_mode()
    def gather(self, selected_pages: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [Hkv, tokens, D] of `selected_pages` [Hkv, k] (page ids, the current page last), or of
        all pages. They live in the shared gather buffer: valid until the next gather."""
        num_pages = self.num_pages if selected_pages is None else selected_pages.shape[1]
        shape = (self.num_kv_heads, num_pages, self.page_size, self.head_dim)
        keys, values = self.gather_buffer.get(shape, self.keys)
        if selected_pages is None:
            keys.copy_(self.key_pages[:num_pages].transpose(0, 1))
            values.copy_(self.value_pages[:num_pages].transpose(0, 1))
        else:
            rows = self.one_head_rows(selected_pages).view(-1)
            one_head_pages = (-1, self.page_size, self.head_dim)
            torch.index_select(self.keys.view(one_head_pages), 0, rows, out=keys.view(one_head_pages))
            torch.index_select(self.values.view(one_head_pages), 0, rows, out=values.view(one_head_pages))
        num_tokens = (num_pages - 1) * self.page_size + self.last_page_len
        flat = (self.num_kv_heads, num_pages * self.page_size, self.head_dim)
        return keys.view(flat)[:, :num_tokens], values.view(flat)[:, :num_tokens]
