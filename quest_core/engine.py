"""The engine: one model, many sessions, and a scheduler thread that decodes their answers together.

`Engine(model, tokenizer, backend)` owns the model; `engine.session()` gives a `Session` (quest_core/session.py)
whose prefills and answers run here as `Request`s. One thread loops over the requests in flight:

    1. one prefill chunk of a newcomer (the one with the least left to prefill, so a question is not stuck behind
       a long document), so a newcomer delays the others by at most one chunk;
    2. one decode step for every request whose prefill is done: a single forward over the batch, [B, 1] tokens at
       each request's own position (`hf.forward_batch`), the attention per request on its own cache and settings;
    3. each request's token chosen with its own decoding settings (`generation.next_token`) and handed to its
       consumer through a queue.

A request joins the batch at the step after its prefill and leaves when it ends (a stop id, its token cap), when
its session cancels it, or when its consumer closes the stream. The thread starts with the first request and
ends when none is left.

On a GPU (the flashinfer backend) the engine decodes together when it is given a page pool (`pool_tokens`): every
request's K/V pages live in one `PagePool`, so a step's attention is one FlashInfer batch decode for the requests
that attend densely and one sparse decode (our kernel) for the Quest ones. A request whose answer starts with no
other in flight decodes alone, with CUDA graphs (`generation.decode`), until another request arrives; then it joins
the batch at its next token. A batch's steps replay a CUDA graph captured for it (`cuda_graph.BatchGraphDecoder`;
a traced request's pages recorded from the graph's own tensors). While every request in the batch decodes greedily
(with no logits processor but a repetition penalty, which the graph applies) and no prefill waits, the steps run
ahead of the host (`BatchGraphDecoder.greedy`: the graph picks each token, the host queues the next step before it
reads this one's, a traced step's pages follow in stream order). Without a pool (a model spread over GPUs, or
pool_tokens 0) requests run one at a time: the whole prefill, then `generation.decode`.
"""
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from .backend_torch import TorchBackend
from .config import default_config, head_dim
from .cuda_graph import BatchGraphDecoder
from .generation import decode, next_token, repetition_penalty_only
from .hf import QuestCache, cache_argument, forward, forward_batch, use_quest
from .paged_cache import PagePool
from .trace import StepTrace, Trace


def pool_tokens(model, sessions: int = 8, memory_share: float = 0.5) -> int:
    """K/V tokens for an engine's page pool on a GPU: `sessions` full contexts of `model`, within `memory_share` of
    the GPU's free memory; 0 on a CPU (no pool)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 0
    config = model.config
    token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * model.dtype.itemsize
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return min(sessions * (getattr(config, "max_position_embeddings", None) or 8192),
               int(memory_share * free_bytes) // token_bytes)


@dataclass
class Token:
    """One new token, as the engine hands it to the request's consumer."""
    token_id: int
    context_len: int           # tokens in the cache when it was produced
    time: float                # perf_counter when it was produced
    trace: StepTrace | None    # the decode step that produced it (None for the first token: the prefill's)


@dataclass
class Progress:
    done: int                  # prefill tokens done of `total`
    total: int


DONE = object()  # the request's last queue item
PREFILL_CHUNK = 512  # tokens a prefill step takes (a newcomer delays the others by at most one)


@dataclass(eq=False)
class Request:
    """A prefill of `prefill_ids` after the cache's tokens, then (max_new_tokens > 0) an answer decoded from it."""
    cache: QuestCache
    prefill_ids: list[int]
    max_new_tokens: int = 0
    stop_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    processors: LogitsProcessorList | None = None
    trace: Trace | None = None         # attached to the cache once the prefill is done
    cancel: threading.Event = field(default_factory=threading.Event)  # set: end after the current token
    chunk_size: int = PREFILL_CHUNK
    # the engine's bookkeeping
    outbox: queue.Queue = field(default_factory=queue.Queue)  # Token, Progress, an exception, then DONE
    finished: threading.Event = field(default_factory=threading.Event)  # the engine has let go of the request
    closed: bool = False               # the consumer left
    start_length: int = 0              # the cache's length before the prefill (restored if it fails)
    prefilled: int = 0
    logits: torch.Tensor | None = None  # [vocab], for the next token
    answer: list[int] = field(default_factory=list)  # the answer's tokens so far
    last_token: int | None = None
    last_time: float = 0.0
    shared_steps: int = 0              # decode steps that waited for another request's prefill chunk

    @property
    def left_to_prefill(self) -> int:
        return len(self.prefill_ids) - self.prefilled

    @property
    def stopped(self) -> bool:
        return self.closed or self.cancel.is_set()

    def items(self):
        """The consumer's side: Token and Progress items until the request ends; an engine error is raised here."""
        while (item := self.outbox.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """The consumer leaves: the engine drops the request at its next step; returns once it has."""
        self.closed = True
        self.finished.wait()


class Engine:
    def __init__(self, model, tokenizer, backend=None, pool_tokens: int = 0):
        """backend None: the torch backend. pool_tokens: on a GPU with a backend that batches (flashinfer), the
        tokens of K/V that all requests share (a PagePool in the model's page size); 0 runs requests one at a time."""
        use_quest(model)
        self.model, self.tokenizer = model, tokenizer
        self.backend = backend or TorchBackend()
        self.cache_arg = cache_argument(model)
        self.num_layers = model.config.num_hidden_layers
        self.device = next(model.parameters()).device
        self.pool = self._pool(pool_tokens) if pool_tokens else None
        self.batches = self.backend.name == "torch" or self.pool is not None
        self.batch_graph = BatchGraphDecoder(model, self.cache_arg) if self.pool is not None else None
        self._lock = threading.Lock()
        self._arrived: list[Request] = []  # submitted, not yet seen by the loop
        self._thread: threading.Thread | None = None

    def session(self, config=None, **kwargs):
        """A new `Session` on this engine (config None: the model's `default_config`)."""
        from .session import Session

        return Session(self.model, self.tokenizer, config, engine=self, **kwargs)

    def new_cache(self, config) -> QuestCache:
        pool = self.pool if self.pool is not None and config.page_size == self.pool.page_size else None
        return QuestCache(self.num_layers, config, self.backend, pool)

    def _pool(self, pool_tokens: int) -> PagePool | None:
        """The K/V page pool of `pool_tokens` tokens, or None where the engine cannot batch on a GPU (the torch
        backend, a model over several GPUs)."""
        devices = {parameter.device for parameter in self.model.parameters()}
        if self.backend.name == "torch" or len(devices) > 1:
            return None
        config = self.model.config
        page_size = default_config(config).page_size
        return PagePool(self.num_layers, -(-pool_tokens // page_size), config.num_key_value_heads, page_size,
                        head_dim(config), self.model.dtype, self.device)

    def submit(self, request: Request) -> Request:
        """Queue `request`; it joins at the next step. Read its results with `request.items()`."""
        request.start_length = request.cache.length
        request.cache.trace = None  # a one-token prefill would otherwise be traced as a decode step
        with self._lock:
            self._arrived.append(request)
            if self._thread is None:
                # not a daemon: the interpreter waits for it at exit (it ends once no request is left) instead of
                # tearing it down inside torch, which aborts the process
                self._thread = threading.Thread(target=self._loop, name="quest-engine")
                self._thread.start()
        return request

    # ---- the scheduler thread ----

    @torch.inference_mode()
    def _loop(self) -> None:
        requests: list[Request] = []  # in flight, in arrival order
        while True:
            with self._lock:
                requests += self._arrived
                self._arrived = []
                if not requests:
                    self._thread = None
                    if self.batch_graph is not None:
                        self.batch_graph.reset()  # the last batch's caches go
                    return
            try:
                requests = self._iterate(requests)
            except Exception as error:  # a bug: every request in flight gets the error, none waits forever
                for request in requests:
                    self._finish(request, error)
                requests = []

    def _iterate(self, requests: list[Request]) -> list[Request]:
        """One turn of the loop: a prefill chunk and a decode step (or, unbatched, one whole request); returns the
        requests still in flight."""
        if not self.batches:
            self._run_alone(requests[0])
            return requests[1:]
        for request in requests:
            if request.stopped:
                self._finish(request)
        newcomers = [r for r in requests if r.left_to_prefill and not r.finished.is_set()]
        newcomer = None
        if newcomers:
            newcomer = min(newcomers, key=lambda r: r.left_to_prefill)
            if self._prefill_chunk(newcomer):
                if self.pool is not None and len(requests) == 1 and newcomer.max_new_tokens:
                    self._answer_alone(newcomer, hand_over=True)  # CUDA graphs until another request arrives
                else:
                    self._start_answer(newcomer)
        decoding = [r for r in requests if r.last_token is not None and not r.finished.is_set()]
        prefilling = any(r.left_to_prefill and not r.finished.is_set() for r in requests)
        if decoding and not prefilling and self._runs_ahead(decoding):
            self._decode_ahead(decoding)
        elif decoding:
            for request in decoding:  # this step's time includes the newcomer's chunk (not its own first token's)
                if newcomer is not None and request is not newcomer:
                    request.shared_steps += 1
            self._decode_step(decoding)
        return [r for r in requests if not r.finished.is_set()]

    def _prefill_chunk(self, request: Request) -> bool:
        """The next chunk of `request`'s prefill; True when that was the last (`request.logits` then hold the last
        position's logits)."""
        cache, start = request.cache, request.prefilled
        chunk = request.prefill_ids[start:start + request.chunk_size]
        try:
            if start == 0:
                cache.reserve(cache.length + len(request.prefill_ids) + request.max_new_tokens)
            request.logits = forward(self.model, cache, torch.tensor([chunk], device=self.device), self.cache_arg)
        except Exception as error:
            cache.truncate(request.start_length)  # a failed prefill (out of memory, say) leaves the cache as it was
            self._finish(request, error)
            return False
        request.prefilled += len(chunk)
        request.outbox.put(Progress(request.prefilled, len(request.prefill_ids)))
        return not request.left_to_prefill

    def _start_answer(self, request: Request) -> None:
        """The prefill is done: the first token, from its logits (or the end, for a prefill alone)."""
        if request.max_new_tokens == 0:
            self._finish(request)
            return
        request.cache.trace = request.trace
        self._take(request, request.logits, None)

    def _decode_step(self, requests: list[Request]) -> None:
        """One forward for all of `requests` (each after its last token), then each one's next token."""
        caches, tokens = [r.cache for r in requests], [r.last_token for r in requests]
        try:
            if self.batch_graph is not None and BatchGraphDecoder.takes(caches):
                logits = self.batch_graph.step(caches, tokens)  # [B, vocab]
            else:
                logits = forward_batch(self.model, caches, tokens, self.cache_arg)
        except Exception as error:
            for request in requests:
                self._finish(request, error)
            return
        now = time.perf_counter()
        for request, row in zip(requests, logits):
            trace = request.cache.trace
            step = trace.end_step(request.cache.length, now - request.last_time, self.num_layers) if trace else None
            self._take(request, row, step)

    def _runs_ahead(self, requests: list[Request]) -> bool:
        """Whether the batch's steps can run ahead of the host (`BatchGraphDecoder.greedy`): every request decodes
        greedily with no processor but a repetition penalty (its token is the graph's pick)."""
        return self.batch_graph is not None and all(
            r.temperature <= 0 and repetition_penalty_only(r.processors) is not None for r in requests) \
            and BatchGraphDecoder.takes([r.cache for r in requests])

    def _decode_ahead(self, requests: list[Request]) -> None:
        """Greedy batched steps queued ahead of the host until a request ends or is stopped, or another arrives;
        then the step queued on the last tokens is undone, and each request goes on from its `last_token` as after
        `_decode_step`."""
        steps = self.batch_graph.greedy(
            [r.cache for r in requests], [r.last_token for r in requests], [r.stop_ids for r in requests],
            [max(0, r.min_new_tokens - len(r.answer)) for r in requests],
            [repetition_penalty_only(r.processors) for r in requests], [r.answer for r in requests])
        try:
            for tokens in steps:
                now = time.perf_counter()
                for request, token_id in zip(requests, tokens):
                    length = request.cache.length - 1  # the queued step's token is in
                    trace = request.cache.trace
                    step = trace.end_step(length, now - request.last_time, self.num_layers) if trace else None
                    self._hand(request, token_id, length, step)
                if self._arrived or any(r.finished.is_set() for r in requests):
                    break
        except Exception as error:
            for request in requests:
                self._finish(request, error)
        finally:
            steps.close()

    def _take(self, request: Request, logits: torch.Tensor, step: StepTrace | None) -> None:
        """Choose `request`'s next token from its logits [vocab]; hand it over, or end the request."""
        answer_ids = torch.tensor([request.answer], device=self.device) if request.processors else None
        token_id = next_token(logits, answer_ids, len(request.answer), request.stop_ids, request.min_new_tokens,
                              request.temperature, request.top_p, request.generator, request.processors)
        self._hand(request, token_id, request.cache.length, step)

    def _hand(self, request: Request, token_id: int, context_len: int, step: StepTrace | None) -> None:
        """Hand `request`'s next token to its consumer, or end the request at a stop id, its cap or its stop."""
        if token_id in request.stop_ids:
            self._finish(request)
            return
        request.last_time = time.perf_counter()
        request.outbox.put(Token(token_id, context_len, request.last_time, step))
        request.answer.append(token_id)
        request.last_token = token_id
        if len(request.answer) == request.max_new_tokens or request.stopped:
            self._finish(request)

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        """The engine lets go of `request`: its consumer gets `error` (if any), then the end."""
        if request.finished.is_set():
            return
        if error is not None:
            request.outbox.put(error)
        request.outbox.put(DONE)
        request.cache.trace = None
        request.logits = request.generator = None
        request.finished.set()

    def _run_alone(self, request: Request) -> None:
        """A backend that does not batch: the whole prefill, then `generation.decode` (CUDA graphs where it can)."""
        while request.left_to_prefill and not request.finished.is_set():
            if request.stopped:
                self._finish(request)
            else:
                self._prefill_chunk(request)
        if request.finished.is_set():
            return
        if request.max_new_tokens == 0:
            self._finish(request)
            return
        self._answer_alone(request, hand_over=False)

    def _answer_alone(self, request: Request, hand_over: bool) -> None:
        """`request`'s answer from its prefill's logits by `generation.decode` (CUDA graphs where it can). With
        `hand_over`, it stops after a token once another request has arrived, and goes on in the batch: that token
        is its `last_token` (not yet in the cache, as decode leaves it)."""
        cache = request.cache
        arrived = False

        def should_stop():
            nonlocal arrived
            arrived = hand_over and bool(self._arrived)
            return request.stopped or arrived

        answer, start_length = [], cache.length  # token i comes from a cache of start_length + i (graphs run ahead)
        try:
            cache.trace = request.trace
            tokens = decode(self.model, cache, request.logits, request.max_new_tokens, request.stop_ids,
                            request.min_new_tokens, request.temperature, request.top_p, request.generator,
                            should_stop, processors=request.processors)
            for index, token_id in enumerate(tokens):
                now = time.perf_counter()
                trace = cache.trace
                step = trace.end_step(start_length + index, now - request.last_time, self.num_layers) \
                    if trace is not None and index else None
                request.last_time = now
                request.outbox.put(Token(token_id, start_length + index, now, step))
                answer.append(token_id)
        except Exception as error:
            self._finish(request, error)
            return
        if arrived and not request.stopped and len(answer) < request.max_new_tokens:
            request.answer, request.last_token = answer, answer[-1]
            return
        self._finish(request)
