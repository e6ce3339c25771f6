"""CUDA-graph decode: the batch-1 decode step (the model's forward, the quest attention inside) captured once and
replayed, so a step costs one launch instead of a few thousand.

What changes from step to step lives on the GPU: the token, its position and the cache length, which the KV
append and the page scorer read there. FlashInfer is planned on the host before each replay (its wrappers keep
fixed buffers), and the host advances the layers' lengths. A graph holds for one shape: the settings, the cache's
capacity (reserved for the whole answer up front, so no tensor moves) and whether the step is dense or sparse.
The first step of a shape runs eagerly (it also warms up kernels and plans), the next one captures; if capture
fails, decoding goes on eagerly, with a log line. Both run the decoder layers compiled (quest_core/compiled_layers.py),
so the graph holds Inductor's fused kernels; if compiling fails, the layers run as they are, with a log line.
"""
import contextlib
import gc
import logging
import weakref

import torch

from .compiled_layers import compiled_layers
from .hf import QuestCache, forward
from .trace import Trace

log = logging.getLogger(__name__)


def graph_decoder(model, cache: QuestCache, cache_arg: str):
    """The cache's GraphDecoder, made on first use; None where a step cannot be captured: no CUDA, the torch
    backend or no kernels, float32, a trace that inspects recall (a dense pass per layer), the streaming/oracle
    baselines."""
    backend, config, layer = cache.backend, cache.config, cache.layers[0]
    if not (layer.is_initialized and layer.keys.is_cuda and hasattr(backend, "plan_step")
            and getattr(backend, "kernels", None) is not None and layer.keys.dtype in (torch.float16, torch.bfloat16)
            and (cache.trace is None or not cache.trace.inspect) and config.mode in ("dense", "quest")):
        return None
    if getattr(cache, "graph_decoder", None) is None:
        cache.graph_decoder = GraphDecoder(model, cache, cache_arg)
    return None if cache.graph_decoder.failed else cache.graph_decoder


class GraphDecoder:
    def __init__(self, model, cache: QuestCache, cache_arg: str, compile_layers: bool = True):
        # The cache holds its decoder: a weak reference back keeps them out of a cycle, which Python's collector
        # could free in the middle of a later capture (destroying a graph there invalidates the capture).
        self.model, self.cache, self.cache_arg = model, weakref.proxy(cache), cache_arg
        device = cache.layers[0].keys.device
        self.step_values = torch.zeros(3, dtype=torch.long, device=device)  # token, position, length after append
        self.host_values = torch.zeros(3, dtype=torch.long, pin_memory=True)
        self.shape = self.graph = self.logits = None
        self.traced_pages = {}  # layer index -> the selected pages [Hkv, k] the graph writes (sparse layers)
        self.failed = False
        self.compile_layers = compile_layers

    def _shape(self, length: int) -> tuple:
        config, layer = self.cache.config, self.cache.layers[0]
        sparse = config.mode == "quest" and -(-length // layer.page_size) > config.budget_pages
        return config, layer.keys.shape[0], sparse, self.cache.trace is not None

    def step(self, token_id: int) -> torch.Tensor:
        """Append `token_id` and run the model on it; returns the logits [vocab] float32 (the graph's output
        buffer, valid until the next step)."""
        torch.cuda.current_stream().synchronize()  # the last replay may still read what the host rewrites now
        position = self.cache.length
        shape = self._shape(position + 1)
        if shape != self.shape or self.failed:
            self.shape, self.graph = shape, None
            return self._eager(token_id, position)
        if self.graph is None:
            self.graph = self._capture(token_id, position)
            if self.graph is None:
                return self._eager(token_id, position)
        else:
            self._advance(token_id, position)
        self.graph.replay()
        if self.cache.trace is not None:  # what the attention would have recorded: the host's part, the graph's pages
            for index, layer in enumerate(self.cache.layers):
                self.cache.trace.record_layer(index, layer, self.traced_pages.get(index))
        return self.logits

    def _layers(self):
        return compiled_layers(self.model) if self.compile_layers else contextlib.nullcontext()

    def _forward(self) -> torch.Tensor:
        """The step's forward on the token and position in `step_values`: the eager step and the capture pass
        the same tensors, so the compiled layers' guards that hold for one hold for the other."""
        return forward(self.model, self.cache, self.step_values[0:1].view(1, 1), self.cache_arg,
                       position_ids=self.step_values[1:2].view(1, 1))

    def _write_step_values(self, token_id: int, position: int) -> None:
        self.host_values[0], self.host_values[1], self.host_values[2] = token_id, position, position + 1
        self.step_values.copy_(self.host_values, non_blocking=True)

    def _eager(self, token_id: int, position: int) -> torch.Tensor:
        self._write_step_values(token_id, position)
        self.cache.backend.step_plans.clear()  # this step records the plans that the next replays re-run
        try:
            with self._layers():
                return self._forward()
        except Exception as error:  # compiling: Inductor or Triton missing, a model Dynamo cannot trace
            if not self.compile_layers:
                raise
            log.warning("compiling the decoder layers failed (%s); running them as they are", error)
            self.compile_layers = False
            self.cache.truncate(position)  # the layers before the failure appended the token
            self.cache.backend.step_plans.clear()
            return self._forward()

    def _advance(self, token_id: int, position: int) -> None:
        """The host's part of a step: the step's values to the GPU, the layers' lengths, FlashInfer's plans."""
        self._write_step_values(token_id, position)
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
        trace = self.cache.trace
        if trace is not None:  # the capture's trace keeps the graph's page tensors; each replay rewrites them
            self.cache.trace = Trace()
        collecting = gc.isenabled()
        gc.disable()  # no destructor of unrelated CUDA objects may run inside the capture
        try:
            # nothing compiles inside the capture: a layer whose guards fail runs as it is
            with self._layers(), torch.compiler.set_stance("eager_on_recompile"), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._forward()
            self.logits = logits
            self.traced_pages = self.cache.trace.layer_pages if trace is not None else {}
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
            self.cache.trace = trace
            for layer in layers:
                layer.device_length = None
