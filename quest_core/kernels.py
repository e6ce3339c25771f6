"""Loaders for our CUDA kernels (kernels/quest_kernels.cu at the repository root), built at first use with
torch.utils.cpp_extension for the device's compute capability and cached by torch; `load()` returns None, with a
log line, when CUDA or nvcc is missing or the build fails, and callers fall back to the torch twins in quest_core.
One build serves every GPU of the host (built for the current one's architecture: GPUs of one kind); the kernels'
host code keeps its per-GPU facts per device, and ScoreTopK / SparseDecode their scratch per device."""
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "quest_kernels.cu"


@functools.cache
def load():
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load as build

        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        # no -std flag: torch passes the standard its headers need (torch 2.14's refuse C++17)
        return build(name=f"quest_kernels_sm{major}{minor}", sources=[str(SOURCE)], extra_cuda_cflags=["-O3"],
                     extra_cflags=["-O3"])
    except Exception as error:  # no nvcc, a compiler error: the torch path still works
        log.warning("Quest CUDA kernels unavailable (%s); using the torch path", error)
        return None


@functools.cache
def sm_count(device: torch.device) -> int:
    """A CUDA device's SMs (1 for another device: the host code's tests run it on the CPU and meta devices)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


GROUP_RULES = ("sum", "max", "mass")  # the kernel's rule numbers, as quest_core.selection.page_scores names them


@dataclass
class TopKScratch:
    """`score_topk`'s scratch on one device."""
    scores: torch.Tensor      # float32, at least heads * capacity (heads: Hkv, or R * Hkv for a batch)
    key_ranges: torch.Tensor  # int32 [heads, 2]
    counters: torch.Tensor    # int32 [heads], zeros (the kernel leaves them so)
    group_scores: torch.Tensor | None = None  # rule mass: float32, heads * G * (capacity + 2 * SMs): the page
                                              # bounds per query head, then each scoring block's softmax state


class ScoreTopK:
    """Scratch buffers for `score_topk`, one set per device (a model spread over GPUs scores on each), grown as the
    context or the batch grows; the call writes FlashInfer's one-head page rows (p * Hkv + h, the current page last)
    into `out` [Hkv, k] int32 without a host sync, for the group rule `group_rule`, the first `sink_pages` pages
    always among them (its twin: selection.page_scores, then select_pages).

    With `device_length` (int64 [1] on the GPU: the cache length, the current token included) the kernel reads
    the number of pages there and `num_pages` only bounds it: the call can be captured in a CUDA graph once and
    replayed as the context grows. `batch` scores several requests' caches in one launch."""

    def __init__(self, module):
        self.module = module
        self.scratch = {}  # device -> TopKScratch
        self.generation = 0  # bumped when scratch is (re)allocated: a CUDA graph holding the old one is stale

    def __call__(self, query, page_bounds, num_pages: int, k: int, out: torch.Tensor, device_length=None,
                 page_size: int = 16, group_rule: str = "sum", sink_pages: int = 0) -> torch.Tensor:
        scratch, scores, group_scores = self._scratch(query, query.shape[0], page_bounds.shape[1], group_rule)
        self.module.score_topk(query, page_bounds, num_pages, k, scores, scratch.key_ranges, scratch.counters,
                               out, device_length, page_size, GROUP_RULES.index(group_rule), group_scores,
                               query.shape[-1] ** -0.5, sink_pages)
        return out

    def batch(self, query, bounds: list[torch.Tensor], bounds_table, k: int, out: torch.Tensor, device_length,
              page_size: int = 16, group_rule: str = "sum", sink_pages: int = 0) -> torch.Tensor:
        """R requests at once: query [R, Hkv, G, D], each one's page bounds [Hkv, capacity_r, 2D] (`bounds`, and
        `bounds_table`: int64 [R, 2] on the GPU, their addresses and capacities), device_length int64 [R] -> out
        [R, Hkv, k], each request's own one-head rows."""
        capacity = max(b.shape[1] for b in bounds)
        heads = query.shape[0] * query.shape[1]
        scratch, scores, group_scores = self._scratch(query, heads, capacity, group_rule)
        self.module.score_topk(query.reshape(heads, *query.shape[2:]), bounds[0], capacity, k, scores,
                               scratch.key_ranges, scratch.counters, out, device_length, page_size,
                               GROUP_RULES.index(group_rule), group_scores, query.shape[-1] ** -0.5, sink_pages,
                               bounds_table)
        return out

    def _scratch(self, query, heads: int, capacity: int, group_rule: str):
        """(the device's scratch, grown for `heads` rows of `capacity` scores; its scores as [heads, capacity]; rule
        mass's group scores or None)."""
        device = query.device
        scratch = self.scratch.get(device)
        if scratch is None or scratch.counters.numel() < heads or scratch.scores.numel() < heads * capacity:
            rows = max(heads, 0 if scratch is None else scratch.counters.numel())
            size = max(heads * capacity, 0 if scratch is None else scratch.scores.numel())
            scratch = self.scratch[device] = TopKScratch(
                torch.empty(size, dtype=torch.float32, device=device),
                torch.tensor([-1, 0], dtype=torch.int32, device=device).repeat(rows, 1),
                torch.zeros(rows, dtype=torch.int32, device=device))
            self.generation += 1
        group_scores = None
        if group_rule == "mass":
            size = heads * query.shape[-2] * (capacity + 2 * sm_count(device))  # blocks per head: at most one per SM
            if scratch.group_scores is None or scratch.group_scores.numel() < size:
                scratch.group_scores = torch.empty(size, dtype=torch.float32, device=device)
                self.generation += 1
            group_scores = scratch.group_scores
        return scratch, scratch.scores[:heads * capacity].view(heads, capacity), group_scores


def quest_decode(module, query, page_bounds, keys, values, num_pages: int, k: int, rows: torch.Tensor, scaling: float,
                 length: int = 0, device_length=None, group_rule: str = "sum", sink_pages: int = 0) -> torch.Tensor:
    """Quest's decode step in one kernel (thread-block clusters: compute capability 9.0): query [Hkv, G, D] scores
    every page of page_bounds [Hkv, capacity, 2D], selects k (its twins: selection.page_scores and select_pages)
    and attends over them in the page-major keys, values -> [Hkv, G, D]; rows [Hkv, k] int32 gets the one-head rows
    p * Hkv + h read, in page order (the sink pages first, the current page last). `length`, or `device_length`
    (int64 [1] on the GPU, `num_pages` then a bound: a captured CUDA graph), as SparseDecode's. Takes float16 and
    bfloat16, head_dim 64 or 128, up to 8 query heads per KV head; no scratch."""
    return module.quest_decode(query.contiguous(), page_bounds, keys, values, num_pages, k, scaling,
                               last_page_len(length, keys.shape[2], device_length), rows, device_length,
                               GROUP_RULES.index(group_rule), query.shape[-1] ** -0.5, sink_pages)


def last_page_len(length: int, page_size: int, device_length) -> int:
    """The current page's tokens for a kernel given the cache length from the host; 0 (unused) when the kernel
    reads the length on the GPU (device_length)."""
    return (length - 1) % page_size + 1 if device_length is None else 0


@dataclass
class DecodeScratch:
    """`sparse_decode`'s scratch on one device: the splits' partial outputs and softmax states."""
    partial_out: torch.Tensor    # float32, at least Hkv * k * G * D
    partial_state: torch.Tensor  # float32, at least Hkv * k * G * 2
    counters: torch.Tensor       # int32 [Hkv], zeros (the kernel leaves them so)


class SparseDecode:
    """Scratch buffers for `sparse_decode`, one set per device: decode attention of query [Hkv, G, D] over the
    selected one-head page rows [Hkv, k] int32 (the current page last) of the page-major cache, -> [Hkv, G, D], in
    one kernel (split over pages, the splits merged by the last block of each KV head) without a host sync. Its
    twin: dense attention over the selected pages (backend_torch.TorchBackend.decode_sparse).

    `length` is the cache length (the current token included); with `device_length` (int64 [1] on the GPU) the
    kernel reads it there instead, so the call can be captured in a CUDA graph and replayed as the context grows.
    Takes float16 and bfloat16, head_dim 64 or 128, up to 8 query heads per KV head (`supports`)."""

    def __init__(self, module):
        self.module = module
        self.scratch = {}  # device -> DecodeScratch
        self.generation = 0  # bumped when scratch is (re)allocated: a CUDA graph holding the old one is stale

    @staticmethod
    def supports(query: torch.Tensor) -> bool:
        return (query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] in (64, 128)
                and 1 <= query.shape[1] <= 8)

    def __call__(self, query, keys, values, rows, scaling: float, length: int = 0, device_length=None):
        num_kv_heads, group, head_dim = query.shape
        size = num_kv_heads * rows.shape[1] * group  # the splits are at most k
        device = query.device
        scratch = self.scratch.get(device)
        if (scratch is None or scratch.partial_state.numel() < 2 * size
                or scratch.partial_out.numel() < size * head_dim or scratch.counters.numel() < num_kv_heads):
            scratch = self.scratch[device] = DecodeScratch(
                torch.empty(size * head_dim, dtype=torch.float32, device=device),
                torch.empty(2 * size, dtype=torch.float32, device=device),
                torch.zeros(num_kv_heads, dtype=torch.int32, device=device))
            self.generation += 1
        return self.module.sparse_decode(query.contiguous(), keys, values, rows, scaling,
                                         last_page_len(length, keys.shape[2], device_length), scratch.partial_out,
                                         scratch.partial_state, scratch.counters, device_length)
