"""A chat over one document: the object the app and the CLI drive.

`ingest(document)` prefills the document once. `ask(question)` renders the conversation through the chat
template, prefills only the tokens the cache does not already hold (the longest common prefix is reused), then
streams the answer token by token. Mode, budget, page size and dense layers may change between questions
without touching the document's KV. The model work runs on an `Engine` (quest_core/engine.py): the sessions of one
engine (`engine.session()`) answer together, in one batched decode step; a session made alone gets an engine of
its own.
"""
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import Decoding, QuestConfig, default_config
from .engine import PREFILL_CHUNK, Engine, Progress, Request
from .generation import answer_processors
from .hf import QuestCache
from .trace import StepTrace, Trace, mean_pages_read

QUESTION_MARK = "\x00QUESTION\x00"  # stands for the first question while the document alone is prefilled
ANSWER_MARK = "\x00ANSWER\x00"  # stands for an earlier answer, whose generated ids are spliced in
DEFAULT_SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives you."
QUESTION_ROOM = 512  # tokens a document leaves free for the questions and answers (a quarter of shorter contexts)
MIN_ANSWER_TOKENS = 16  # a question is refused when fewer than this are left for its answer beside the document


class ContextFullError(ValueError):
    """The question does not fit in the context beside the document alone."""


@dataclass
class Step:
    """One streamed token."""
    index: int                 # 0 for the first new token
    token_id: int
    text: str                  # the text this token adds to the answer (may be empty mid-character)
    seconds: float             # wall time since the previous token (prefill included for the first)
    context_len: int           # tokens in the cache when it was produced
    trace: StepTrace | None    # selection and bytes, when tracing


@dataclass
class RunStats:
    """What one answer cost."""
    mode: str
    budget: int
    page_size: int
    dense_layers: int
    top_p: float | None = None  # the adaptive budget's share (QuestConfig.top_p); None: a fixed budget
    coarse_factor: int = 0     # QuestConfig.coarse_factor: 0, pages ranked by their own bounds; else two levels
    prompt_tokens: int = 0     # tokens of context the answer was conditioned on
    prefill_tokens: int = 0    # of those, the ones prefilled for this answer
    reused_tokens: int = 0     # of those, the ones whose KV was already cached
    new_tokens: int = 0
    max_new_tokens: int = 0    # the answer's cap: the asked one, or less where the context had less room
    dropped_turns: int = 0     # the oldest question/answer turns left out of the context to make room
    shared_steps: int = 0      # decode steps that also ran another session's prefill chunk (slower than alone)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    attention_s: float | None = None  # mean seconds of attention (all layers) per traced step, where measured
    mean_pages_read: float | None = None  # pages a sparse layer's KV head read per traced step, on average
    stop_reason: str = ""      # "eos", "max_new_tokens" or "cancelled"
    text: str = ""
    steps: list[Step] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "steps"}


@dataclass
class IngestStats:
    document_tokens: int
    prefill_s: float


@dataclass
class ContextUsage:
    max_context: int           # the model's context, in tokens
    document_tokens: int       # the prefix the document's ingest prefilled (system prompt and document)
    conversation_tokens: int   # the questions and answers held in the context after it
    room_tokens: int           # what is left


@dataclass
class DocumentFit:
    tokens: int                # the document's tokens
    max_tokens: int            # the most a document may have, leaving room for questions and answers
    fits: bool


@dataclass
class Turn:
    question: str
    answer: str
    answer_ids: list[int]      # exactly the generated ids (the answer's re-tokenized text may differ)


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


def max_context(model_config) -> int | None:
    return getattr(model_config, "max_position_embeddings", None)


def _count(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def measure_document(tokenizer, model_config, text: str) -> DocumentFit:
    """How many tokens `text` has, and whether it fits in the model's context beside room for a conversation."""
    tokens = len(_count(tokenizer, text))
    context = max_context(model_config)
    limit = context - min(QUESTION_ROOM, context // 4) if context else tokens
    return DocumentFit(tokens, limit, tokens <= limit)


def cut_document(tokenizer, model_config, text: str, keep: str) -> str:
    """The longest head (keep="head") or tail ("tail") of `text` that fits (see measure_document)."""
    if keep not in ("head", "tail"):
        raise ValueError(f"keep must be 'head' or 'tail', got {keep!r}")
    ids = _count(tokenizer, text)
    limit = measure_document(tokenizer, model_config, "").max_tokens
    return tokenizer.decode(ids[:limit] if keep == "head" else ids[-limit:])


class Session:
    def __init__(self, model, tokenizer, config: QuestConfig | None = None, backend=None,
                 decoding: Decoding | None = None, system_prompt: str | None = DEFAULT_SYSTEM,
                 prefill_chunk: int = PREFILL_CHUNK, engine: Engine | None = None):
        """config None: the model's own settings (`default_config`); decoding None: `Decoding()`. engine None: one
        of its own, on `backend` (an engine's sessions use the engine's backend)."""
        self.engine = engine or Engine(model, tokenizer, backend)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_context = max_context(model.config)
        self.cache = self.engine.new_cache(config or default_config(model.config))
        self.decoding = decoding or Decoding()
        self.system_prompt = system_prompt
        self.prefill_chunk = prefill_chunk
        self.stop_ids = self._stop_ids()
        self.document = ""
        self.document_ids: list[int] = []  # the prefix that ingest prefilled (system prompt and document)
        self.turns: list[Turn] = []
        self.token_ids: list[int] = []  # exactly the tokens whose KV is in the cache
        self.last_run: RunStats | None = None
        self._cancel = threading.Event()  # the current answer's: set, it ends after its current token
        self._request: Request | None = None  # the current answer's, in the engine
        self._lock = threading.RLock()  # held while the cache or the conversation changes, never across a yield
        self._answering = False  # a stream is open (it may be suspended: a consumer that stopped reading)
        self._epoch = 0  # bumped by ingest, reset and new_chat: an older stream no longer writes its turn

    @property
    def config(self) -> QuestConfig:
        return self.cache.config

    @property
    def messages(self) -> list[dict]:
        """The conversation held in the context, as chat messages (the document in the first question)."""
        messages = []
        for turn in self.turns:
            messages += [{"role": "user", "content": self._user_turn(turn.question, first=not messages)},
                         {"role": "assistant", "content": turn.answer}]
        return messages

    def configure(self, **changes) -> QuestConfig:
        """Change mode, budget, page_size, dense_layers, group_rule, top_p, min_budget or coarse_factor for the next
        answer (None keeps a value; top_p=0 turns the adaptive budget off)."""
        with self._lock:
            if self._answering:
                raise RuntimeError("settings cannot change while an answer is being generated")
            self.cache.set_config(self.config.with_changes(**changes))
        return self.config

    def cancel(self) -> None:
        """Stop the answer being generated (from any thread) after its current token."""
        self._cancel.set()

    def _stop_answer(self) -> None:
        """Cancel the answer, if any, and wait until the engine has let go of its cache (at most one step)."""
        self.cancel()
        if self._request is not None:
            self._request.close()

    # ---- prompt rendering ----

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        return {i for i in ids if i is not None}

    def _user_turn(self, question: str, first: bool) -> str:
        return f"{self.document}\n\n{question}" if first and self.document else question

    def _render(self, messages: list[dict]) -> str:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"

    def _prompt_ids(self, turns: list[Turn], question: str) -> list[int]:
        """The token ids of `turns` then `question`: the template's text tokenized, with each earlier answer
        spliced in as the exact ids that were generated (its re-tokenized text may differ: a re-prefill)."""
        messages = []
        for turn in turns:
            messages += [{"role": "user", "content": self._user_turn(turn.question, first=not messages)},
                         {"role": "assistant", "content": ANSWER_MARK}]
        messages.append({"role": "user", "content": self._user_turn(question, first=not messages)})
        first, *rest = self._render(messages).split(ANSWER_MARK)
        ids = self._tokenize(first)
        for turn, piece in zip(turns, rest):
            ids += turn.answer_ids + self._tokenize(piece)
        return ids

    def _fit(self, question: str, answer_tokens: int) -> tuple[list[Turn], list[int], int]:
        """The turns that leave room for `question` and an answer of `answer_tokens` (where some must go, the oldest,
        and more: see below; the document stays), the prompt's ids and the answer's cap. ContextFullError where even
        no turns leave MIN_ANSWER_TOKENS."""
        turns = list(self.turns)
        prompt_ids = self._prompt_ids(turns, question)
        if self.max_context and self.max_context - len(prompt_ids) < answer_tokens:
            # the oldest turns go until a quarter of the conversation's room is free beside this answer: each drop
            # prefills every later turn again, so the next questions should find the cache as this one leaves it
            wanted = answer_tokens + (self.max_context - self.document_tokens) // 4
            while turns and self.max_context - len(prompt_ids) < wanted:
                turns.pop(0)
                prompt_ids = self._prompt_ids(turns, question)
        room = self.max_context - len(prompt_ids) if self.max_context else answer_tokens
        if room < MIN_ANSWER_TOKENS:
            raise ContextFullError(
                f"The question needs {len(prompt_ids) - self.document_tokens:,} tokens beside the document's "
                f"{self.document_tokens:,}, and the model's context holds {self.max_context:,}: ask a shorter "
                "question, or load a shorter document.")
        return turns, prompt_ids, min(room, answer_tokens)

    def _tokenize(self, text: str) -> list[int]:
        return _count(self.tokenizer, text)

    def context_usage(self, length: int | None = None) -> ContextUsage:
        """What the context holds now: the document, the conversation after it, and the room left; with `length`, as
        the cache holds that many tokens (an answer's Step.context_len: its tokens join `token_ids` when it ends)."""
        length = len(self.token_ids) if length is None else length
        total = self.max_context or length
        conversation = max(length - self.document_tokens, 0)
        return ContextUsage(total, self.document_tokens, conversation, total - self.document_tokens - conversation)

    # ---- pages, for the views ----

    def page_texts(self) -> list[str]:
        """The text of each page of the cache, at the current page size (the document's, then the conversation's)."""
        size = self.config.page_size
        return self.tokenizer.batch_decode([self.token_ids[i:i + size] for i in range(0, len(self.token_ids), size)])

    def document_pages(self) -> range:
        return range(-(-self.document_tokens // self.config.page_size))

    def pages_of(self, text: str) -> list[int]:
        """The pages holding the first occurrence of `text` in the cached tokens' text; [] where it is absent."""
        texts = self.page_texts()
        start = "".join(texts).find(text)
        if not text or start < 0:
            return []
        pages, offset = [], 0
        for page, piece in enumerate(texts):
            if offset + len(piece) > start and offset < start + len(text):
                pages.append(page)
            offset += len(piece)
        return pages

    # ---- the KV cache ----

    def _reuse(self, token_ids: list[int]) -> int:
        """Cut the cache back to the longest prefix of `token_ids` it holds (at most all but the last token), for a
        prefill of the rest; returns that prefix's length."""
        if self.max_context and len(token_ids) >= self.max_context:
            raise ContextFullError(
                f"the conversation needs {len(token_ids)} tokens but the model's context is {self.max_context}"
            )
        reused = common_prefix(token_ids[:-1], self.token_ids)
        self.cache.truncate(reused)
        self.token_ids = token_ids[:reused]
        return reused

    def _prefill(self, token_ids: list[int], progress=None) -> None:
        """Bring the cache to `token_ids`, reusing the longest cached prefix. A failed prefill (out of memory, say)
        leaves the cache as it was before it."""
        reused = self._reuse(token_ids)
        request = self.engine.submit(Request(self.cache, token_ids[reused:], chunk_size=self.prefill_chunk))
        for item in request.items():
            if progress:
                progress(item.done, item.total)
        self.token_ids = list(token_ids)

    @torch.inference_mode()
    def ingest(self, document: str, progress=None) -> IngestStats:
        """Start a new conversation about `document` and prefill it. progress(done, total) is called per chunk.
        A document that `measure_document` finds too long is refused (`cut_document` shortens one)."""
        if not document.strip():
            raise ValueError("the document is empty")
        fit = measure_document(self.tokenizer, self.model.config, document)
        if not fit.fits:
            raise ValueError(f"the document has {fit.tokens:,} tokens; with room for a conversation the model's "
                             f"context takes {fit.max_tokens:,}: keep its head or its tail (cut_document)")
        with self._lock:
            self._stop_answer()
            self._epoch += 1
            self._answering = False
            self.document, self.turns = document, []
            text = self._render([{"role": "user", "content": self._user_turn(QUESTION_MARK, first=True)}])
            prefix = self._tokenize(text[: text.index(QUESTION_MARK)])
            started = time.perf_counter()
            self.document_ids = []
            self._prefill(prefix, progress)
            self.document_ids = prefix
            return IngestStats(len(prefix), time.perf_counter() - started)

    def new_chat(self) -> None:
        """Forget the questions and answers; the document and its KV stay, as ingest left them: where the first
        question's tokens merged with the document's last one, that token goes too, so the same question prefills
        the same tokens again and gets the same answer."""
        with self._lock:
            self._stop_answer()
            self._epoch += 1
            self._answering = False
            self.turns = []
            kept = common_prefix(self.document_ids, self.token_ids)
            self.cache.truncate(kept)
            self.token_ids = self.token_ids[:kept]

    @property
    def document_tokens(self) -> int:
        return len(self.document_ids)

    def reset(self) -> None:
        """Forget the conversation and the document, and free the cached KV. Safe while an answer streams (it
        stops after its current token) or while a stream lies suspended."""
        with self._lock:
            self._stop_answer()
            self._epoch += 1
            self._answering = False
            self.cache = self.engine.new_cache(self.config)
            self.document, self.document_ids, self.turns, self.token_ids = "", [], [], []

    @property
    def answer_ids(self) -> list[list[int]]:
        return [turn.answer_ids for turn in self.turns]

    # ---- answering ----

    @torch.inference_mode()
    def ask(self, question: str, decoding: Decoding | None = None, trace: bool = False, inspect: bool = False,
            progress=None, min_new_tokens: int = 0, keep: bool = True, **decoding_changes):
        """Stream the answer to `question`: yields a `Step` per token; `self.last_run` holds the totals.
        `decoding` (default: the session's) with `decoding_changes` on top (max_new_tokens=24, ...) says how.
        `trace` records the selected pages of every step; `inspect` adds their recall of dense attention mass.
        keep=False leaves the turn out of the conversation (side-by-side comparisons of one question).

        The context never overflows: where the conversation, the question and the answer's room do not fit, the
        oldest turns are left out (`RunStats.dropped_turns`; never the document) and the answer is capped to the
        room left; a question that does not fit beside the document alone raises ContextFullError.
        Stops at an end-of-turn token (not before `min_new_tokens`), after `max_new_tokens`, or on `cancel()`.
        """
        if not question.strip():
            raise ValueError("the question is empty")
        decoding = (decoding or self.decoding).with_changes(**decoding_changes)
        with self._lock:
            if self._answering:
                raise RuntimeError("this session is already answering a question")
            cancel = self._cancel = threading.Event()
            config = self.config
            turns, prompt_ids, max_new_tokens = self._fit(question, decoding.max_new_tokens)
            run = RunStats(config.mode, config.budget, config.page_size, config.dense_layers, config.top_p,
                           config.coarse_factor, max_new_tokens=max_new_tokens,
                           dropped_turns=len(self.turns) - len(turns))
            self.last_run = run
            generator = None
            if decoding.seed is not None:
                generator = torch.Generator(self.device).manual_seed(decoding.seed)
            started = time.perf_counter()
            run.reused_tokens = self._reuse(prompt_ids)
            run.prompt_tokens = len(prompt_ids)
            run.prefill_tokens = run.prompt_tokens - run.reused_tokens
            cache, epoch = self.cache, self._epoch
            request = self._request = self.engine.submit(Request(
                cache, prompt_ids[run.reused_tokens:], max_new_tokens, sorted(self.stop_ids), min_new_tokens,
                decoding.temperature, decoding.top_p, generator,
                answer_processors(decoding.repetition_penalty, decoding.no_repeat_ngram_size),
                Trace(inspect=inspect) if trace or inspect else None, cancel, self.prefill_chunk))
            self._answering = True
        new_ids: list[int] = []
        text, last = "", started
        completed = failed = False
        try:
            for item in request.items():
                if isinstance(item, Progress):
                    if progress:
                        progress(item.done, item.total)
                    continue
                if not new_ids:
                    run.ttft_s = item.time - started
                new_ids.append(item.token_id)
                decoded = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                piece = "" if decoded.endswith("\ufffd") else decoded[len(text):]
                text += piece
                step = Step(len(new_ids) - 1, item.token_id, piece, item.time - last, item.context_len, item.trace)
                run.steps.append(step)
                yield step
                last = item.time
            completed = True
        except Exception:
            failed = True
            raise
        finally:
            request.close()
            run.shared_steps = request.shared_steps
            self._finish(run, cache, epoch, completed and not cancel.is_set(), turns, question, prompt_ids,
                         new_ids, keep and not failed, last - started)

    def _finish(self, run: RunStats, cache: QuestCache, epoch: int, completed: bool, turns: list[Turn],
                question: str, prompt_ids: list[int], new_ids: list[int], keep: bool, elapsed_s: float) -> None:
        """An answer's totals, and its turn in the conversation unless the session was reset or re-loaded since.
        completed False: it was cancelled, or its consumer left."""
        if not completed:
            run.stop_reason = "cancelled"
        elif len(new_ids) == run.max_new_tokens:
            run.stop_reason = "max_new_tokens"
        else:
            run.stop_reason = "eos"
        run.text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        run.new_tokens = len(new_ids)
        run.decode_s = elapsed_s - run.ttft_s
        if len(new_ids) > 1 and run.decode_s > 0:
            run.decode_tokens_per_s = (len(new_ids) - 1) / run.decode_s
        timed = [step.trace.attention_s for step in run.steps if step.trace and step.trace.attention_s is not None]
        run.attention_s = sum(timed) / len(timed) if timed else None
        run.mean_pages_read = mean_pages_read(step.trace for step in run.steps)
        cache.trace = None
        with self._lock:
            if epoch != self._epoch:
                return
            self._answering = False
            self.token_ids = (prompt_ids + new_ids)[: cache.length]  # the last token is never appended
            cache.truncate(len(self.token_ids))  # the engine may have run ahead of a consumer that stopped reading
            if keep:
                self.turns = turns + [Turn(question, run.text, new_ids)]

    def answer(self, question: str, **kwargs) -> RunStats:
        """`ask` without streaming: the whole answer and its stats."""
        for _ in self.ask(question, **kwargs):
            pass
        return self.last_run

