"""CUDA-graph decode: the batch-1 decode step (the model's forward, the quest attention inside) captured once and
replayed, so a step costs one launch instead of a few thousand.

What changes from step to step lives on the GPU: the token, its position and the cache length, which the KV
append and the page scorer read there. Each step also leaves the next step's values there: its greedy pick (the
argmax of its logits, after the answer's repetition penalty and with stop ids blocked while an answer must go on)
and the position and length one further. So greedy decoding (`GraphDecoder.greedy`) queues step i + 1 before the
host reads token i, and the GPU does not wait for the host between tokens; a traced step's pages travel to the host
in stream order (`Trace.close_step`). Sampling writes the host's token over the pick (`GraphDecoder.step`).
FlashInfer is planned on the host before each replay (its wrappers keep fixed buffers), and the host advances the
layers' lengths. A graph holds for one shape: the settings, the cache's capacity (reserved for the whole answer up
front, so no tensor moves), whether the step is dense or sparse, whether it is traced, and our kernels' scratch
buffers (another cache's longer context may grow them). The first step of a shape
runs eagerly (it also warms up kernels and plans), the next one captures; if capture fails, decoding goes on
eagerly, with a log line. Both run the decoder layers compiled (quest_core/compiled_layers.py), so the graph holds
Inductor's fused kernels; if compiling fails, the layers run as they are, with a log line.
A model spread over several GPUs (accelerate's device map) decodes eagerly, with a log line: a CUDA graph holds one
GPU's work, and capturing each GPU's stretch of layers as a graph of its own is not done.
"""
import contextlib
import gc
import logging
import weakref

import torch

from .compiled_layers import compiled_layers
from .hf import QuestCache, forward, forward_batch
from .trace import Trace

log = logging.getLogger(__name__)


def record_replay(cache: QuestCache, traced_pages: dict) -> None:
    """Record into the cache's trace what its attention would have recorded in a replayed step: the host's part (its
    lengths and bounds read) and the selections the graph wrote (`traced_pages`: layer index -> [Hkv, k], sparse
    layers)."""
    for index, layer in enumerate(cache.layers):
        cache.trace.record_layer(index, layer, traced_pages.get(index),
                                 bounds_read=cache.config.bounds_read(layer.num_pages),
                                 rows_per_page=cache.backend.rows_per_page(layer))


def greedy_pick(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor, stop_bias: torch.Tensor,
                out: torch.Tensor) -> None:
    """Each row's greedy pick of logits [B, vocab] into out [B], as `generation.next_token` picks with an answer's
    repetition penalty: transformers' rule on the tokens `seen` (bool [B, vocab]: logits divided by `penalty`, [B, 1]
    or a scalar, or multiplied where negative), then `stop_bias` [B, vocab] (-inf at blocked stop ids). The picks
    are then seen."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    torch.argmax(torch.where(seen, penalized, logits) + stop_bias, dim=-1, out=out)
    seen.scatter_(1, out[:, None], True)


def graph_decoder(model, cache: QuestCache, cache_arg: str):
    """The cache's GraphDecoder, made on first use; None where a step cannot be captured: no CUDA, the torch
    backend or no kernels, float32, a trace that inspects recall (a dense pass per layer), the streaming/oracle
    baselines."""
    backend, config, layer = cache.backend, cache.config, cache.layers[0]
    if not (layer.is_initialized and layer.keys.is_cuda and backend.graph_capturable
            and (cache.trace is None or not cache.trace.inspect) and config.mode in ("dense", "quest")):
        return None
    if cache.graph_decoder is None:
        cache.graph_decoder = GraphDecoder(model, cache, cache_arg)
    return None if cache.graph_decoder.failed else cache.graph_decoder


class GraphDecoder:
    def __init__(self, model, cache: QuestCache, cache_arg: str, compile_layers: bool = True):
        # The cache holds its decoder: a weak reference back keeps them out of a cycle, which Python's collector
        # could free in the middle of a later capture (destroying a graph there invalidates the capture).
        self.model, self.cache, self.cache_arg = model, weakref.proxy(cache), cache_arg
        devices = sorted({str(layer.keys.device) for layer in cache.layers})
        self.failed = len(devices) > 1  # a CUDA graph holds one GPU's work: the decoder is never used
        if self.failed:
            log.warning("the model's layers are on %s: decoding eagerly (a CUDA graph holds one GPU's work)",
                        ", ".join(devices))
            return
        device = cache.layers[0].keys.device
        # the step's token, position and length after its append; the step leaves the next step's there
        self.step_values = torch.zeros(3, dtype=torch.long, device=device)
        self.host_values = torch.zeros(3, dtype=torch.long, pin_memory=True)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        self.stop_bias = torch.zeros(vocab_size, device=device)  # -inf at the stop ids while they are blocked
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # the answer's tokens so far
        self.penalty = torch.ones((), device=device)  # the answer's repetition penalty (1: none)
        self.planned = torch.cuda.Event()  # after a step's plans: FlashInfer's pinned buffers are free again
        self.shape = self.graph = self.logits = None
        self.step_plans = {}  # the plans of the eager step, re-run before each replay (backend.plan_step)
        self.traced_pages = {}  # layer index -> the selection [Hkv, k] the graph writes (sparse layers)
        self.compile_layers = compile_layers

    def _shape(self, length: int) -> tuple:
        config, layer = self.cache.config, self.cache.layers[0]
        sparse = config.sparse_at(config.dense_layers, -(-length // layer.page_size))
        scratch = getattr(self.cache.backend, "scratch_generation", None)  # another cache may have grown it
        return config, layer.capacity_pages, sparse, self.cache.trace is not None, scratch

    def step(self, token_id: int) -> torch.Tensor:
        """Append `token_id` and run the model on it; returns the logits [vocab] float32 (the graph's output
        buffer, valid until the next step)."""
        torch.cuda.current_stream().synchronize()  # the last step may still read what the host rewrites now
        self._write_step_values(token_id, self.cache.length)
        return self._run()

    @torch.inference_mode()
    def greedy(self, logits: torch.Tensor, max_new_tokens: int, stop_ids=(), min_new_tokens: int = 0,
               should_stop=lambda: False, repetition_penalty: float = 1.0):
        """`generation.decode` for greedy decoding, pipelined: yields the argmax of `logits` (the prefill's) and
        of each step's logits, as decode does (stop ids blocked for the first `min_new_tokens`, transformers'
        repetition penalty on the answer's tokens). Step i + 1 is queued before token i is read; when token i ends
        the answer, that step is undone (its token removed from the cache), so the cache ends as decode leaves it.
        A traced step is closed when it is queued (`Trace.close_step`): the consumer's `end_step` after token i
        takes the step that made it, as after decode's."""
        torch.cuda.current_stream().synchronize()
        trace = self.cache.trace
        self.stop_bias.zero_()
        if min_new_tokens > 0 and stop_ids:
            self.stop_bias[list(stop_ids)] = -torch.inf
        self.seen.zero_()
        self.penalty.fill_(repetition_penalty)
        self._write_step_values(0, self.cache.length)
        self._pick(logits)
        tokens = torch.zeros(2, dtype=torch.long, pin_memory=True)  # token i is read from tokens[i % 2]
        ready = [torch.cuda.Event(), torch.cuda.Event()]

        def fetch(index):  # queue token `index` (the pick in step_values) for the host
            tokens[index % 2].copy_(self.step_values[0], non_blocking=True)
            ready[index % 2].record()

        fetch(0)
        undo = False  # a step is queued on a token the answer may not keep
        try:
            for index in range(max_new_tokens):
                queued = index + 1 < max_new_tokens
                if queued:
                    if index + 1 == min_new_tokens:
                        self.stop_bias.zero_()  # in stream order: token min_new_tokens on may stop the answer
                    self._run()
                    if trace is not None:
                        trace.close_step(self.cache.length, len(self.cache.layers))
                    fetch(index + 1)
                    undo = True
                ready[index % 2].synchronize()
                token_id = int(tokens[index % 2])
                if token_id in stop_ids:
                    return
                yield token_id
                if not queued or should_stop():
                    return
                undo = False
        finally:
            if undo:
                self.cache.truncate(self.cache.length - 1)
                if trace is not None:
                    trace.drop_closed()

    def _run(self) -> torch.Tensor:
        """One step on the token, position and length in `step_values`; returns its logits."""
        self.planned.synchronize()
        position = self.cache.length
        shape = self._shape(position + 1)
        if shape != self.shape or self.failed:
            self.shape, self.graph = shape, None
            return self._eager(position)
        if self.graph is None:
            self.graph = self._capture(position)
            if self.graph is None:
                return self._eager(position)
        else:
            self._advance(position)
        self.graph.replay()
        if self.cache.trace is not None:
            record_replay(self.cache, self.traced_pages)
        return self.logits

    def _layers(self):
        return compiled_layers(self.model) if self.compile_layers else contextlib.nullcontext()

    def _forward(self) -> torch.Tensor:
        """The step's forward on the values in `step_values`, which it then advances to the next step's: the
        eager step and the capture pass the same tensors, so the compiled layers' guards that hold for one hold
        for the other."""
        logits = forward(self.model, self.cache, self.step_values[0:1].view(1, 1), self.cache_arg,
                         position_ids=self.step_values[1:2].view(1, 1))
        self._pick(logits)
        self.step_values[1:].add_(1)
        return logits

    def _pick(self, logits: torch.Tensor) -> None:
        greedy_pick(logits[None], self.seen[None], self.penalty, self.stop_bias[None], out=self.step_values[0:1])

    def _write_step_values(self, token_id: int, position: int) -> None:
        self.host_values[0], self.host_values[1], self.host_values[2] = token_id, position, position + 1
        self.step_values.copy_(self.host_values, non_blocking=True)

    def _eager(self, position: int) -> torch.Tensor:
        self.cache.backend.step_plans.clear()  # this step records the plans that the next replays re-run
        try:
            with self._layers():
                logits = self._forward()
        except Exception as error:  # compiling: Inductor or Triton missing, a model Dynamo cannot trace
            if not self.compile_layers:
                raise
            log.warning("compiling the decoder layers failed (%s); running them as they are", error)
            self.compile_layers = False
            self.cache.truncate(position)  # the layers before the failure appended the token
            self.cache.backend.step_plans.clear()
            logits = self._forward()
        self.step_plans = dict(self.cache.backend.step_plans)
        self.planned.record()
        return logits

    def _advance(self, position: int) -> None:
        """The host's part of a step: the layers' lengths, FlashInfer's plans."""
        for layer in self.cache.layers:
            layer.length = position + 1
        self.cache.backend.plan_step(self.step_plans)
        self.planned.record()

    def _capture(self, position: int):
        backend, layers = self.cache.backend, self.cache.layers
        self._advance(position)
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


class BatchGraphDecoder:
    """The engine's batched decode step (hf.forward_batch over caches whose pages share a PagePool) captured as a
    CUDA graph, for one batch at a time: the same requests with the same settings, runs and capacities. Each
    request's token, position and length live on the GPU (`step_values` [3, B]), which the KV append, the scorer and
    the sparse decode read there; each step leaves the next step's there (each row's greedy pick, the position and
    length one further), so greedy requests' steps run ahead of the host (`greedy`), as the batch-1 graph's do. Before
    each replay the host advances the layers' lengths and re-plans FlashInfer's batch decode. A new batch (a request
    joins or leaves, turns sparse, moves its run) runs its first step eagerly and captures the next; if capture
    fails, batched steps stay eager, with a log line. Both run the decoder layers compiled, without autotuning
    (compiled_layers.py; Dynamo compiles a layer for the first batch size and once more with the batch dimension
    dynamic for the others); if compiling fails, the layers run as they are, with a log line. A traced request's
    selected pages are tensors the graph writes, recorded into its trace after each replay (as the batch-1 graph
    does). The decoder holds the batch's caches while its graph lives (the graph holds their tensors' addresses);
    `reset` lets them go."""

    def __init__(self, model, cache_arg: str, compile_layers: bool = True):
        self.model, self.cache_arg, self.compile_layers = model, cache_arg, compile_layers
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.caches = self.shape = self.graph = self.logits = None
        self.step_values = self.host_values = None  # [3, B] on the GPU and pinned
        self.stop_bias = self.seen = self.penalty = None  # [B, vocab], [B, vocab] bool, [B, 1]: greedy picks'
        self.inputs = []  # the backend's cached uploads the graph reads (bounds tables, pool rows): kept with it
        self.traced_pages = {}  # row -> {layer index: the selected pages [Hkv, k] the graph writes}: traced requests
        self.step_plans = {}  # the plans of the eager step, re-run before each replay
        self.planned = torch.cuda.Event()  # after a step's plans: FlashInfer's pinned buffers are free again
        self.failed = False

    @staticmethod
    def takes(caches: list[QuestCache]) -> bool:
        """Whether a step of `caches` can be captured: dense or fixed-budget Quest requests whose pages share one
        pool, on a backend whose calls capture, none traced with `inspect` (a dense pass per layer)."""
        first = caches[0]
        return first.backend.graph_capturable and first.run is not None and all(
            cache.run is not None and cache.run.pool is first.run.pool
            and (cache.trace is None or not cache.trace.inspect)
            and cache.config.mode in ("dense", "quest") and cache.config.top_p is None for cache in caches)

    @staticmethod
    def _shape(caches: list[QuestCache]) -> tuple:
        """What a graph holds: our kernels' scratch; each request's cache, settings, run and capacity, whether its
        step is sparse and whether it is traced."""
        shape = [caches[0].backend.scratch_generation]  # our kernels' scratch, which another step may have grown
        for cache in caches:
            config, pages = cache.config, -(-(cache.length + 1) // cache.config.page_size)  # after the step's token
            shape.append((id(cache), config, cache.run.start, cache.layers[0].capacity_pages,
                          config.sparse_at(config.dense_layers, pages), cache.trace is not None))
        return tuple(shape)

    @torch.inference_mode()
    def step(self, caches: list[QuestCache], token_ids: list[int]) -> torch.Tensor:
        """Append token_ids[b] to caches[b] and run the model on them; returns the logits [B, vocab] in float32 (a
        replay's are the graph's output buffer, valid until the next step)."""
        torch.cuda.current_stream().synchronize()  # the last step may still read what the host rewrites now
        self._begin(caches, token_ids)
        return self._run(caches)

    @torch.inference_mode()
    def greedy(self, caches: list[QuestCache], token_ids: list[int], stop_ids: list[list[int]],
               blocked_steps: list[int], penalties: list[float] | None = None,
               answers: list[list[int]] | None = None):
        """Greedy batched steps that run ahead of the host: the first appends token_ids[b] to caches[b], each next
        one the picks of the step before (each row's argmax after transformers' repetition penalty penalties[b] on
        its answer's tokens, answers[b] and the picks since (None: no penalty); its stop_ids[b] blocked for its
        first blocked_steps[b] picks), which the graph feeds itself. Yields each step's picks [B] as a list; step i + 1
        is queued before the host reads step i's, so when they come each cache holds one token more than step i
        left. A traced cache's step is closed when it is queued (`Trace.close_step`), for its consumer's
        `end_step`. Closing the generator undoes that queued step (its token removed from every cache, its trace
        dropped): the caches end as `step` leaves them, the last picks not in them."""
        torch.cuda.current_stream().synchronize()
        self._begin(caches, token_ids)
        self.stop_bias.zero_()
        for row, (ids, steps) in enumerate(zip(stop_ids, blocked_steps)):
            if steps > 0 and ids:
                self.stop_bias[row, ids] = -torch.inf
        self.seen.zero_()
        for row, answer in enumerate(answers or []):
            if answer:
                self.seen[row, answer] = True
        self.penalty.copy_(torch.tensor(penalties or [1.0] * len(caches))[:, None])
        traces = [cache.trace for cache in caches]
        num_layers = len(caches[0].layers)
        picks = torch.zeros(2, len(caches), dtype=torch.long, pin_memory=True)  # step i's in picks[i % 2]
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        queued = read = 0

        def queue_step():  # step `queued` and the copy of its picks for the host
            nonlocal queued
            for row, steps in enumerate(blocked_steps):
                if queued == steps > 0:
                    self.stop_bias[row].zero_()  # in stream order: from this step's pick on, the row may stop
            self._run(caches)
            for cache, trace in zip(caches, traces):
                if trace is not None:
                    trace.close_step(cache.length, num_layers)
            picks[queued % 2].copy_(self.step_values[0], non_blocking=True)
            ready[queued % 2].record()
            queued += 1

        try:
            queue_step()
            while True:
                queue_step()
                ready[read % 2].synchronize()
                tokens = picks[read % 2].tolist()
                read += 1
                yield tokens
        finally:
            for cache, trace in zip(caches, traces):  # the steps queued on picks the host has not taken
                cache.truncate(cache.length - (queued - read))
                if trace is not None:
                    trace.drop_closed(queued - read)

    def reset(self) -> None:
        """Drop the graph and let the batch's caches go."""
        self.caches = self.shape = self.graph = self.logits = None
        self.inputs = []
        self.traced_pages = {}

    def _begin(self, caches: list[QuestCache], token_ids: list[int]) -> None:
        """The step values of the first step: `token_ids` at each cache's length (new buffers for another batch)."""
        if self.caches is None or len(self.caches) != len(caches) or any(
                a is not b for a, b in zip(self.caches, caches)):
            self.reset()
            self.caches, batch, device = caches, len(caches), caches[0].layers[0].keys.device
            self.step_values = torch.zeros(3, batch, dtype=torch.long, device=device)
            self.host_values = torch.zeros(3, batch, dtype=torch.long, pin_memory=True)
            self.stop_bias = torch.zeros(batch, self.vocab_size, device=device)  # -inf at blocked stop ids
            self.seen = torch.zeros(batch, self.vocab_size, dtype=torch.bool, device=device)  # answers' tokens
            self.penalty = torch.ones(batch, 1, device=device)  # repetition penalties (1: none)
        self.host_values[0] = torch.tensor(token_ids)
        self.host_values[1] = torch.tensor([cache.length for cache in caches])
        self.host_values[2] = self.host_values[1] + 1
        self.step_values.copy_(self.host_values, non_blocking=True)

    def _run(self, caches: list[QuestCache]) -> torch.Tensor:
        """One step on the values in `step_values`, which it advances to the next step's; returns the logits."""
        self.planned.synchronize()
        positions = [cache.length for cache in caches]
        shape = self._shape(caches)
        if shape != self.shape or self.failed:
            self.shape, self.graph, self.inputs, self.traced_pages = shape, None, [], {}
            return self._eager(caches, positions)
        if self.graph is None:
            self.graph = self._capture(caches, positions)
            if self.graph is None:
                return self._eager(caches, positions)
        else:
            self._advance(caches, positions)
        self.graph.replay()
        for row, pages in self.traced_pages.items():
            record_replay(caches[row], pages)
        return self.logits

    def _layers(self):
        return compiled_layers(self.model, autotune=False) if self.compile_layers else contextlib.nullcontext()

    def _forward(self, caches: list[QuestCache]) -> torch.Tensor:
        """The step's forward on the values in `step_values`, then each row's pick and the next step's values there."""
        batch = len(caches)
        logits = forward_batch(self.model, caches, self.step_values[0].view(batch, 1), self.cache_arg,
                               position_ids=self.step_values[1].view(batch, 1))
        greedy_pick(logits, self.seen, self.penalty, self.stop_bias, out=self.step_values[0])
        self.step_values[1:].add_(1)
        return logits

    def _eager(self, caches: list[QuestCache], positions: list[int]) -> torch.Tensor:
        backend = caches[0].backend
        backend.step_plans.clear()  # this step records the plans that the replays re-run
        try:
            with self._layers():
                logits = self._forward(caches)
        except Exception as error:  # compiling: Inductor or Triton missing, a model Dynamo cannot trace
            if not self.compile_layers:
                raise
            log.warning("compiling the decoder layers of a batched step failed (%s); running them as they are", error)
            self.compile_layers = False
            for cache, position in zip(caches, positions):
                cache.truncate(position)  # the layers before the failure appended the token
            backend.step_plans.clear()
            logits = self._forward(caches)
        self.step_plans = dict(backend.step_plans)
        self.planned.record()
        return logits

    def _advance(self, caches: list[QuestCache], positions: list[int]) -> None:
        """The host's part of a step: the layers' lengths, FlashInfer's plans."""
        for cache, position in zip(caches, positions):
            for layer in cache.layers:
                layer.length = position + 1
        caches[0].backend.plan_step(self.step_plans)
        self.planned.record()

    def _capture(self, caches: list[QuestCache], positions: list[int]):
        backend = caches[0].backend
        self._advance(caches, positions)
        graph = torch.cuda.CUDAGraph()
        backend.capturing, backend.captured_inputs = True, []
        for index, cache in enumerate(caches):
            for layer in cache.layers:
                layer.device_length = self.step_values[2, index:index + 1]
        traces = [cache.trace for cache in caches]
        for cache, trace in zip(caches, traces):  # the capture's traces keep the graph's page tensors
            if trace is not None:
                cache.trace = Trace()
        collecting = gc.isenabled()
        gc.disable()  # no destructor of unrelated CUDA objects may run inside the capture
        try:
            # nothing compiles inside the capture: a layer whose guards fail runs as it is
            with self._layers(), torch.compiler.set_stance("eager_on_recompile"), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self._forward(caches)
            self.inputs = backend.captured_inputs
            self.traced_pages = {row: cache.trace.layer_pages for row, cache in enumerate(caches)
                                 if cache.trace is not None}
            return graph
        except Exception as error:  # an op that cannot be captured: batched steps run eagerly from here on
            log.warning("CUDA-graph capture of a batched step failed (%s); batched steps run eagerly", error)
            self.failed = True
            for cache, position in zip(caches, positions):
                for layer in cache.layers:
                    layer.length = position
            return None
        finally:
            if collecting:
                gc.enable()
            backend.capturing = False
            for cache, trace in zip(caches, traces):
                cache.trace = trace
                for layer in cache.layers:
                    layer.device_length = None
