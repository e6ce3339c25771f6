"""Do Quest's chat answers match dense's? Natural questions over the app's bundled documents (tuning split) and the
report split's texts, answered through `Session` with the chat decoding defaults (`Decoding`), once per method and
budget from the same ingested document: the share of answers identical to dense's, where the first differs, and
ROUGE-L against dense's answer."""
import copy
import re
from dataclasses import asdict
from pathlib import Path

import torch

from quest_core.engine import PREFILL_CHUNK
from quest_core.session import Session, cut_document, measure_document

HERE = Path(__file__).resolve().parent
DOCUMENTS = {"hamlet_opening": HERE.parent / "assets" / "hamlet_opening.txt",
             "areopagitica": HERE.parent / "assets" / "areopagitica.txt",
             "macbeth": HERE / "texts" / "macbeth.txt",
             "julius_caesar": HERE / "texts" / "julius_caesar.txt",
             "paradise_lost": HERE / "texts" / "paradise_lost.txt"}
QUESTIONS = {
    "hamlet_opening": ["Who is the King of Denmark?", "What have Marcellus and Bernardo seen on the platform?",
                       "Why is Horatio brought to the watch?", "Whom does the ghost look like?",
                       "What does the King say about young Fortinbras?", "Where does Laertes want to go?",
                       "Why is Hamlet still dressed in black?", "What does Hamlet decide to do at the end?"],
    "areopagitica": ["To whom is this speech addressed?", "What does the author want Parliament to do?",
                     "What order is the author arguing against?", "How does the author compare killing a man and "
                     "destroying a good book?", "Where did the licensing of books begin, according to the author?",
                     "What did the Athenians do with the books of Protagoras?", "Which council does the author blame "
                     "for licensing?", "Does the author think reading bad books is harmful?"],
    "macbeth": ["Who are the first characters we meet in the play?", "What do the witches predict for Macbeth?",
                "What do the witches predict for Banquo?", "Who is the Thane of Cawdor at the start?",
                "What does Lady Macbeth think of her husband's nature?", "Who visits Macbeth's castle?",
                "What does Macbeth see before him in the air?", "What is Macbeth's title at the beginning?"],
    "julius_caesar": ["Why are Flavius and Marullus angry with the citizens?", "What does the soothsayer tell "
                      "Caesar?", "What does Cassius want Brutus to do?", "What happened when Caesar was offered "
                      "the crown?", "Why does Cassius say Caesar is weak?", "Who is Casca?",
                      "What strange things happen in the storm?", "Why does Brutus decide that Caesar must die?"],
    "paradise_lost": ["What is the subject of the poem?", "Whom does the poet ask for help?",
                      "Where does Satan find himself at the beginning?", "Who is Satan's companion lying next to "
                      "him?", "Why was Satan cast out of Heaven?", "What does Satan say about the mind?",
                      "What do the fallen angels build?", "What is the name of the palace of the fallen angels?"],
}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) of two texts' lowercased words: from the longest common subsequence, 2PR/(P+R)."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def first_divergence(a: list, b: list) -> int | None:
    """The first position where two token sequences differ (the shorter's length if one begins the other), None
    if they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def document_text(session: Session, name: str) -> str:
    """The document as the app loads it: whole, or its head where it is longer than the context allows."""
    text = DOCUMENTS[name].read_text()
    if not measure_document(session.tokenizer, session.model.config, text).fits:
        text = cut_document(session.tokenizer, session.model.config, text, "head")
    return text


def variant(method: str) -> tuple[int, str | None]:
    """(prefill chunk, dtype) of the session a method answers in: `Session`'s (the app's) and the run's
    model, but chunks of N tokens for "dense-chunkN" (the same sums rounded in another order) and the model cast to
    bfloat16 for "dense-bf16" (the app's dtype on a CPU): how far dense's own answers move when only the arithmetic
    changes."""
    if method.startswith("dense-chunk"):
        return int(method.removeprefix("dense-chunk")), None
    return PREFILL_CHUNK, "bfloat16" if method == "dense-bf16" else None


def run(model, tokenizer, method_rows, max_new_tokens: int = 48, questions=None, log=print,
        on_question=lambda rows: None) -> list[dict]:
    """Rows of (document, question, method, budget, answer, ids): each document ingested once (once more for each
    other `variant` of the methods), each question answered by every method (dense first) with `Session`'s
    decoding defaults, none kept in the conversation. on_question(rows so far) is called after each question (to
    save them as they come)."""
    def new_session(prefill_chunk: int, dtype: str | None) -> Session:
        weights = model if dtype is None else copy.deepcopy(model).to(getattr(torch, dtype))
        return Session(weights, tokenizer, config=method_rows[0][2], prefill_chunk=prefill_chunk)

    sessions = {key: new_session(*key) for key in dict.fromkeys(variant(name) for name, _, _ in method_rows)}
    rows = []
    for document, asked in (questions or QUESTIONS).items():
        for session in sessions.values():
            session.ingest(document_text(session, document))
        for question in asked:
            for name, budget, config in method_rows:
                session = sessions[variant(name)]
                session.configure(**asdict(config))
                answer = session.answer(question, keep=False, max_new_tokens=max_new_tokens)
                rows.append(dict(document=document, question=question, method=name, budget=budget,
                                 answer=answer.text, ids=[step.token_id for step in answer.steps]))
            log(f"agreement {document}: {question} dense={rows[-len(method_rows)]['answer']!r}")
            on_question(rows)
    return rows


def summary(rows: list[dict]) -> dict:
    """Over the rows of one run (one dense answer per question): (method, budget) -> n, identical (count), the
    first divergent positions of the answers that differ, and each answer's ROUGE-L against dense's."""
    dense = {(r["document"], r["question"]): r for r in rows if r["method"] == "dense"}
    table = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        reference = dense[(r["document"], r["question"])]
        cell = table.setdefault((r["method"], r["budget"]), dict(n=0, identical=0, divergences=[], rouge=[]))
        cell["n"] += 1
        position = first_divergence(r["ids"], reference["ids"])
        if position is None:
            cell["identical"] += 1
        else:
            cell["divergences"].append(position)
        cell["rouge"].append(rouge_l(r["answer"], reference["answer"]))
    return dict(sorted(table.items(), key=lambda item: (item[0][1], item[0][0])))


def merge(tables: list[dict]) -> dict:
    """The summaries of several runs as one (each run against its own dense answers)."""
    merged = {}
    for table in tables:
        for key, cell in table.items():
            into = merged.setdefault(key, dict(n=0, identical=0, divergences=[], rouge=[]))
            into["n"] += cell["n"]
            into["identical"] += cell["identical"]
            into["divergences"] += cell["divergences"]
            into["rouge"] += cell["rouge"]
    return dict(sorted(merged.items(), key=lambda item: (item[0][1], item[0][0])))
