"""Attention backends: the contract (`AttentionBackend`) and the choice (`make_backend`). `auto` takes flashinfer
(with our CUDA kernels) on CUDA for half-precision models when FlashInfer imports, else torch; a backend that cannot
run here falls back to torch with a log line and a `fallback_reason`, never silently.

Like FlashInfer's wrappers, a backend plans on the host (`plan_step`, once per shape) and runs many times; the
decode calls of a `graph_capturable` backend can be captured in a CUDA graph and replayed. The quest attention
(quest_core/hf.py) calls it, layer by layer, as transformers calls an `AttentionInterface` function.
"""
import importlib.util
import logging
import os
import shutil
from typing import Protocol

import torch

from .backend_torch import TorchBackend
from .paged_cache import PagedLayer

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "flashinfer")


class AttentionBackend(Protocol):
    name: str
    kv_layout: str                 # the PagedLayer layout it reads: "page-major" or "head-major"
    append_kernels: object | None  # our CUDA module whose append_kv the cache uses, or None (torch appends)
    graph_capturable: bool         # its decode calls can be captured in a CUDA graph (plan_step before a replay)
    adaptive_budget: bool          # it runs QuestConfig.top_p (select_top_p, decode_sparse with page_counts)
    fallback_reason: str | None    # why this backend runs instead of the one asked for

    def describe(self) -> str:
        """What runs, for people: the name, and the fallback or missing kernels if any."""

    def plan_step(self, step_plans: dict) -> None:
        """Before a CUDA-graph replay: re-plan, on the host, what the graph's step needs (`step_plans`, kept from
        its eager step)."""

    def prefill(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hq, T, D] for the last T stored tokens -> out [Hq, T, D], causal over the whole cache."""

    def decode_dense(self, query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
        """query [Hkv, G, D] -> out [Hkv, G, D] over every stored token."""

    def select(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
               sink_pages: int = 0, coarse_factor: int = 0) -> torch.Tensor:
        """query [Hkv, G, D] -> Quest's selection [Hkv, k] (in the backend's own form), current page last; the first
        sink_pages pages always among the others; coarse_factor: QuestConfig's two-level ranking."""

    def decode_quest(self, query: torch.Tensor, layer: PagedLayer, num_selected: int, group_rule: str,
                     sink_pages: int, coarse_factor: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`select`, then `decode_sparse` over its selection: (out [Hkv, G, D], the selection, in a form `page_ids`
        reads; the current page last)."""

    def select_top_p(self, query: torch.Tensor, layer: PagedLayer, top_p: float, min_pages: int,
                     max_pages: int, sink_pages: int = 0, coarse_factor: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Backends with adaptive_budget: query [Hkv, G, D] -> (a selection [Hkv, max_pages], current page last;
        page_counts [Hkv], the pages each head reads: its first page_counts - 1 slots and the last; coarse_factor:
        the shares over QuestConfig's two-level ranking's candidates)."""

    def select_baseline(self, mode: str, query: torch.Tensor, layer: PagedLayer, num_selected: int,
                        scaling: float) -> torch.Tensor:
        """The evaluation's baselines, "streaming" or "oracle", in the form `select` returns."""

    def rows_per_page(self, layer: PagedLayer) -> int:
        """What `select` returns holds page p of KV head h as p * rows_per_page + h (FlashInfer's one-head rows:
        rows_per_page is Hkv) or as p (rows_per_page 1): either way the page id is the floor of row / rows_per_page.
        The trace keeps a step's selections so and takes the page ids on the host: no kernel per layer."""

    def decode_sparse(self, query: torch.Tensor, layer: PagedLayer, selected: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        """query [Hkv, G, D], a selection [Hkv, k] -> out [Hkv, G, D] over the selected pages only. Backends with
        adaptive_budget also take `page_counts` [Hkv] (from select_top_p) after `scaling`."""


def make_backend(name: str, device, dtype: torch.dtype = torch.bfloat16) -> AttentionBackend:
    """The backend `name` for a model of `dtype` on `device`, or torch with its `fallback_reason`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    if device.type != "cuda":
        return _fallback("the flashinfer backend needs CUDA")
    if dtype not in (torch.float16, torch.bfloat16):
        return _fallback(f"FlashInfer runs float16 and bfloat16, not {str(dtype).removeprefix('torch.')}")
    if not flashinfer_kernels_obtainable():
        return _fallback("FlashInfer has no kernels here: neither prebuilt (the flashinfer-jit-cache package) nor a "
                         "CUDA compiler (nvcc) to build them")
    try:
        from .backend_flashinfer import FlashInferBackend

        return FlashInferBackend(device)
    except ImportError as error:
        return _fallback(f"FlashInfer is not importable ({error})")


def flashinfer_kernels_obtainable() -> bool:
    """FlashInfer builds its kernels at first use with nvcc unless they come prebuilt (flashinfer-jit-cache, its
    AOT package); a GPU Space usually has the CUDA runtime but no compiler."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return (importlib.util.find_spec("flashinfer_jit_cache") is not None or shutil.which("nvcc") is not None
            or os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))


def _fallback(reason: str) -> TorchBackend:
    log.warning("%s; using the torch backend", reason)
    return TorchBackend(fallback_reason=reason)
