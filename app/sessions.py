"""One browser session's state (`ChatState`), the set of open ones (`OpenSessions`, at most a limit at once), and
handing memory back when a session leaves or a prefill runs out of memory."""
import ctypes
import gc
import threading
from dataclasses import dataclass, field

import torch

from quest_core.session import Session


@dataclass
class ChatState:
    """A browser session's conversation over its loaded document, and what the views show."""
    session: Session | None = None
    owner: str = ""                                   # the browser session's hash
    document_name: str = ""                           # what is loaded ("" when nothing is)
    needle: str | None = None                         # the needle sentence of a needle-in-a-haystack document
    chat: list = field(default_factory=list)          # the chat as shown: questions, answers and notices
    answer: object = None                             # RunStats of the last chat answer (its steps hold the traces)
    question: str = ""                                # the last question asked
    page_texts: list = field(default_factory=list)    # the cache's page texts when that answer ended
    picked_step: int | None = None                    # the answer token picked in "where the model looked"
    speeds: dict = field(default_factory=dict)        # mode -> views.Speed on the loaded document

    def forget_answers(self):
        """Clear the conversation and what the views show of its last answer (New chat)."""
        self.chat, self.answer, self.question, self.page_texts, self.picked_step = [], None, "", [], None

    def forget_document(self):
        """Clear everything that belongs to the loaded document (before loading another)."""
        self.forget_answers()
        self.document_name, self.needle, self.speeds = "", None, {}

    def close(self):
        """Free the session's KV; an answer still streaming stops after its current token."""
        if self.session is not None:
            self.session.cancel()
            self.session.reset()
            free_memory()
        self.session = None


class OpenSessions:
    """The ChatStates that hold a model session: one per browser session, at most `limit` at once."""

    def __init__(self, limit: int):
        self.limit, self.states, self.lock = limit, {}, threading.Lock()

    def open(self, owner: str, new_session) -> ChatState | None:
        """`owner`'s ChatState, made with `new_session()` if it has none; None when `limit` are open."""
        with self.lock:
            state = self.states.get(owner)
            if state is None:
                if len(self.states) >= self.limit:
                    return None
                state = self.states[owner] = ChatState(session=new_session(), owner=owner)
            return state

    def close(self, state: ChatState | None) -> None:
        if state is None:
            return
        state.close()
        with self.lock:
            if self.states.get(state.owner) is state:
                del self.states[state.owner]

    def close_owner(self, owner: str) -> None:
        self.close(self.states.get(owner))


def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


MALLOC_TRIM = _malloc_trim()


def free_memory() -> None:
    """Hand freed memory back: CUDA's cached blocks, and on glibc the free pages of the arenas that the server's
    threads allocate from (without this, RSS stays at its high-water mark after the sessions are gone)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or isinstance(error, RuntimeError) and "can't allocate memory" in str(error))  # CPU allocator
