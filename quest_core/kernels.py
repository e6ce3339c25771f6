"""Loaders for our CUDA kernels (kernels/quest_kernels.cu at the repository root), built at first use with
torch.utils.cpp_extension for the device's compute capability and cached by torch; `load()` returns None, with a
log line, when CUDA or nvcc is missing or the build fails, and callers fall back to the torch twins in quest_core."""
import functools
import logging
import os
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
        return build(name=f"quest_kernels_sm{major}{minor}", sources=[str(SOURCE)],
                     extra_cuda_cflags=["-O3", "-std=c++17"], extra_cflags=["-O3", "-std=c++17"])
    except Exception as error:  # no nvcc, a compiler error: the torch path still works
        log.warning("Quest CUDA kernels unavailable (%s); using the torch path", error)
        return None


class ScoreTopK:
    """Scratch buffers for `score_topk` on one device, grown as the context grows; the call writes FlashInfer's
    one-head page rows (p * Hkv + h, the current page last) into `out` [Hkv, k] int32 without a host sync.

    With `device_length` (int64 [1] on the GPU: the cache length, the current token included) the kernel reads
    the number of pages there and `num_pages` only bounds it: the call can be captured in a CUDA graph once and
    replayed as the context grows."""

    def __init__(self, module):
        self.module = module
        self.scores = self.key_ranges = self.counters = None

    def __call__(self, query, page_bounds, num_pages: int, k: int, out: torch.Tensor, device_length=None,
                 page_size: int = 16) -> torch.Tensor:
        num_kv_heads, capacity = page_bounds.shape[:2]
        if (self.scores is None or self.scores.shape[0] != num_kv_heads or self.scores.shape[1] < capacity
                or self.scores.device != query.device):
            self.scores = torch.empty(num_kv_heads, capacity, dtype=torch.float32, device=query.device)
            self.key_ranges = torch.tensor([-1, 0], dtype=torch.int32, device=query.device).repeat(num_kv_heads, 1)
            self.counters = torch.zeros(num_kv_heads, dtype=torch.int32, device=query.device)
        self.module.score_topk(query, page_bounds, num_pages, k, self.scores, self.key_ranges, self.counters, out,
                               device_length, page_size)
        return out
