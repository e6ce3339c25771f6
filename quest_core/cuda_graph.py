"""CUDA-graph decode: the batch-1 decode step (the model's forward, the quest attention inside) captured once and
replayed, so a step costs one launch instead of a few thousand.

What changes from step to step lives on the GPU: the token, its position and the cache length, which the KV
append and the page scorer read there. FlashInfer is planned on the host before each replay (its wrappers keep
fixed buffers), and the host advances the layers' lengths. A graph holds for one shape: the settings, the cache's
capacity (reserved for the whole answer up front, so no tensor moves) and whether the step is dense or sparse.
The first step of a shape runs eagerly (it also warms up kernels and plans), the next one captures; if capture
fails, decoding goes on eagerly, with a log line.
"""
import gc
import logging
import weakref

import torch

from .hf import QuestCache, forward

log = logging.getLogger(__name__)


def graph_decoder(model, cache: QuestCache, cache_arg: str):
    """The cache's GraphDecoder, made on first use; None where a step cannot be captured: no CUDA, the torch
    backend or no kernels, float32, a trace being recorded, the streaming/oracle baselines, the "max" group rule."""
    backend, config, layer = cache.backend, cache.config, cache.layers[0]
    if not (layer.is_initialized and layer.keys.is_cuda and hasattr(backend, "plan_step")
            and getattr(backend, "kernels", None) is not None and layer.keys.dtype in (torch.float16, torch.bfloat16)
            and cache.trace is None and config.mode in ("dense", "quest") and config.group_rule == "sum"
            and layer.head_dim % 4 == 0):
        return None
    if getattr(cache, "graph_decoder", None) is None:
        cache.graph_decoder = GraphDecoder(model, cache, cache_arg)
    return None if cache.graph_decoder.failed else cache.graph_decoder


class GraphDecoder:
    def __init__(self, model, cache: QuestCache, cache_arg: str):
        # The cache holds its decoder: a weak reference back keeps them out of a cycle, which Python's collector
        # could free in the middle of a later capture (destroying a graph there invalidates the capture).
        self.model, self.cache, self.cache_arg = model, weakref.proxy(cache), cache_arg
        device = cache.layers[0].keys.device
        self.step_values = torch.zeros(3, dtype=torch.long, device=device)  # token, position, length after append
        self.host_values = torch.zeros(3, dtype=torch.long, pin_memory=True)
        self.shape = self.graph = self.logits = None
        self.failed = False

    def _shape(self, length: int) -> tuple:
        config, layer = self.cache.config, self.cache.layers[0]
        sparse = config.mode == "quest" and -(-length // layer.page_size) > config.budget_pages
        return config, layer.keys.shape[0], sparse

    def step(self, token_id: int) -> torch.Tensor:
        """Append `token_id` and run the model on it; returns the logits [vocab] float32 (the graph's output
        buffer, valid until the next step)."""
        position = self.cache.length
        shape = self._shape(position + 1)
        if shape != self.shape:
            self.shape, self.graph = shape, None
            return self._eager(token_id)
        if self.graph is None:
            self.graph = self._capture(token_id, position)
            if self.graph is None:
                return self._eager(token_id)
        else:
            self._advance(token_id, position)
        self.graph.replay()
        return self.logits

    def _eager(self, token_id: int) -> torch.Tensor:
        self.cache.backend.step_plans.clear()  # this step records the plans that the next replays re-run
        device = self.step_values.device
        return forward(self.model, self.cache, torch.tensor([[token_id]], device=device), self.cache_arg)

    def _advance(self, token_id: int, position: int) -> None:
        """The host's part of a step: the step's values to the GPU, the layers' lengths, FlashInfer's plans."""
        self.host_values[0], self.host_values[1], self.host_values[2] = token_id, position, position + 1
        self.step_values.copy_(self.host_values, non_blocking=True)
        for layer in self.cache.layers:
            layer.length = position + 1
        self.cache.backend.plan_step()

    def _capture(self, token_id: int, position: int):
        backend, layers = self.cache.backend, self.cache.layers
        self._advance(token_id, position)
        graph = torch.cuda.CUDAGraph()
        backend.capturing = True
        for layer in layers:
            layer.device_length = self.step_values[2:3]
        collecting = gc.isenabled()
        gc.disable()  # no destructor of unrelated CUDA objects may run inside the capture
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = forward(self.model, self.cache, self.step_values[0:1].view(1, 1), self.cache_arg,
                                 position_ids=self.step_values[1:2].view(1, 1))
            self.logits = logits
            return graph
        except Exception as error:  # an op that cannot be captured: decode eagerly from here on
            log.warning("CUDA-graph capture failed (%s); decoding eagerly", error)
            self.failed = True
            for layer in layers:
                layer.length = position
            return None
        finally:
            if collecting:
                gc.enable()
            backend.capturing = False
            for layer in layers:
                layer.device_length = None
