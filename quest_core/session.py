"""A chat over one document: the object the app and the CLI drive.

`ingest(document)` prefills the document once. `ask(question)` renders the conversation through the chat
template, prefills only the tokens the cache does not already hold (the longest common prefix is reused), then
streams the answer token by token. Mode, budget, page size and dense layers may change between questions
without touching the document's KV.
"""
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import QuestConfig
from .generation import decode, prefill
from .hf import QuestCache, use_quest
from .trace import StepTrace, Trace

QUESTION_MARK = "\x00QUESTION\x00"  # stands for the first question while the document alone is prefilled
ANSWER_MARK = "\x00ANSWER\x00"  # stands for an earlier answer, whose generated ids are spliced in
DEFAULT_SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives you."


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
    prompt_tokens: int = 0     # tokens of context the answer was conditioned on
    prefill_tokens: int = 0    # of those, the ones prefilled for this answer
    reused_tokens: int = 0     # of those, the ones whose KV was already cached
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stop_reason: str = ""      # "eos", "max_new_tokens" or "cancelled"
    text: str = ""
    steps: list[Step] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "steps"}


@dataclass
class IngestStats:
    document_tokens: int
    prefill_s: float


class Session:
    def __init__(self, model, tokenizer, config: QuestConfig = QuestConfig(), backend=None,
                 system_prompt: str | None = DEFAULT_SYSTEM, prefill_chunk: int = 512):
        use_quest(model)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.cache = QuestCache(self.num_layers, config, backend)
        self.system_prompt = system_prompt
        self.prefill_chunk = prefill_chunk
        self.stop_ids = self._stop_ids()
        self.document = ""
        self.messages: list[dict] = []
        self.answer_ids: list[list[int]] = []  # the generated ids of each assistant message
        self.token_ids: list[int] = []  # exactly the tokens whose KV is in the cache
        self.last_run: RunStats | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    @property
    def config(self) -> QuestConfig:
        return self.cache.config

    def configure(self, **changes) -> QuestConfig:
        """Change mode, budget, page_size, dense_layers or group_rule for the next answer (None keeps a value)."""
        with self._lock:
            self.cache.set_config(self.config.with_changes(**changes))
        return self.config

    def cancel(self) -> None:
        """Stop the answer being generated (from any thread) after its current token."""
        self._cancel.set()

    # ---- prompt rendering ----

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        return {i for i in ids if i is not None}

    def _user_turn(self, question: str) -> str:
        if self.messages or not self.document:
            return question
        return f"{self.document}\n\n{question}"

    def _render(self, messages: list[dict]) -> str:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation's token ids: the template's text tokenized, with each earlier answer spliced in as the
        exact ids that were generated (its re-tokenized text may differ, which would cost a re-prefill)."""
        marked = [dict(m, content=ANSWER_MARK) if m["role"] == "assistant" else m for m in messages]
        first, *rest = self._render(marked).split(ANSWER_MARK)
        ids = self._tokenize(first)
        for answer_ids, piece in zip(self.answer_ids, rest):
            ids += answer_ids + self._tokenize(piece)
        return ids

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    # ---- the KV cache ----

    def _prefill(self, token_ids: list[int], progress=None) -> tuple[torch.Tensor, int]:
        """Bring the cache to `token_ids`, reusing the longest cached prefix: (last position's logits, reused)."""
        if self.max_context and len(token_ids) >= self.max_context:
            raise ValueError(
                f"the conversation needs {len(token_ids)} tokens but the model's context is {self.max_context}"
            )
        reused = 0
        while reused < min(len(token_ids) - 1, len(self.token_ids)) and token_ids[reused] == self.token_ids[reused]:
            reused += 1
        self.cache.truncate(reused)
        self.token_ids = token_ids[:reused]
        try:
            logits = prefill(self.model, self.cache, token_ids[reused:], self.prefill_chunk, progress)
        except BaseException:
            self.cache.truncate(reused)  # a failed prefill (out of memory, say) leaves the cache as it was
            raise
        self.token_ids = list(token_ids)
        return logits, reused

    @torch.inference_mode()
    def ingest(self, document: str, progress=None) -> IngestStats:
        """Start a new conversation about `document` and prefill it. progress(done, total) is called per chunk."""
        if not document.strip():
            raise ValueError("the document is empty")
        with self._lock:
            self.document, self.messages, self.answer_ids = document, [], []
            text = self._render([{"role": "user", "content": self._user_turn(QUESTION_MARK)}])
            prefix = self._tokenize(text[: text.index(QUESTION_MARK)])
            started = time.perf_counter()
            self._prefill(prefix, progress)
            return IngestStats(len(prefix), time.perf_counter() - started)

    def reset(self) -> None:
        """Forget the conversation and the document, and free the cached KV."""
        with self._lock:
            self.cache = QuestCache(self.num_layers, self.config, self.cache.backend)
            self.document, self.messages, self.answer_ids, self.token_ids = "", [], [], []

    # ---- answering ----

    @torch.inference_mode()
    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, trace: bool = False, inspect: bool = False, progress=None,
            min_new_tokens: int = 0, keep: bool = True):
        """Stream the answer to `question`: yields a `Step` per token; `self.last_run` holds the totals.
        `trace` records the selected pages of every step; `inspect` adds their recall of dense attention mass.
        keep=False leaves the turn out of the conversation (side-by-side comparisons of one question).

        Stops at an end-of-turn token (not before `min_new_tokens`), after `max_new_tokens`, or on `cancel()`.
        """
        if not question.strip():
            raise ValueError("the question is empty")
        with self._lock:
            self._cancel.clear()
            config = self.config
            run = RunStats(config.mode, config.budget, config.page_size, config.dense_layers)
            self.last_run = run
            messages = self.messages + [{"role": "user", "content": self._user_turn(question)}]
            prompt_ids = self._prompt_ids(messages)
            generator = None
            if seed is not None:
                generator = torch.Generator(self.device).manual_seed(seed)
            started = time.perf_counter()
            logits, run.reused_tokens = self._prefill(prompt_ids, progress)
            run.prompt_tokens = len(prompt_ids)
            run.prefill_tokens = run.prompt_tokens - run.reused_tokens
            self.cache.trace = Trace(inspect=inspect) if trace or inspect else None
            new_ids: list[int] = []
            text, last = "", started
            tokens = decode(self.model, self.cache, logits, max_new_tokens, self.stop_ids, min_new_tokens,
                            temperature, top_p, generator, self._cancel.is_set)
            completed = False
            try:
                for token_id in tokens:
                    now = time.perf_counter()
                    step_trace = None
                    if not new_ids:
                        run.ttft_s = now - started
                    elif self.cache.trace is not None:
                        step_trace = self.cache.trace.end_step(self.cache.length, now - last, self.num_layers)
                    new_ids.append(token_id)
                    decoded = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                    piece = "" if decoded.endswith("\ufffd") else decoded[len(text):]
                    text += piece
                    step = Step(len(new_ids) - 1, token_id, piece, now - last, self.cache.length, step_trace)
                    run.steps.append(step)
                    yield step
                    last = now
                completed = True
            finally:
                tokens.close()
                self.token_ids = (prompt_ids + new_ids)[: self.cache.length]  # the last token is never appended
                if not completed or self._cancel.is_set():
                    run.stop_reason = "cancelled"
                elif len(new_ids) == max_new_tokens:
                    run.stop_reason = "max_new_tokens"
                else:
                    run.stop_reason = "eos"
                run.text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                run.new_tokens = len(new_ids)
                run.decode_s = last - started - run.ttft_s
                if len(new_ids) > 1 and run.decode_s > 0:
                    run.decode_tokens_per_s = (len(new_ids) - 1) / run.decode_s
                if keep:
                    self.messages = messages + [{"role": "assistant", "content": run.text}]
                    self.answer_ids.append(new_ids)
                self.cache.trace = None

    def answer(self, question: str, **kwargs) -> RunStats:
        """`ask` without streaming: the whole answer and its stats."""
        for _ in self.ask(question, **kwargs):
            pass
        return self.last_run
