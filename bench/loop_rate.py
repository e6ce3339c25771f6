"""How often the default model's answers loop, without a repetition penalty and with the chat decoding default
(quest_core.config.Decoding.repetition_penalty, set before this was first measured: nothing here tuned it).

An answer loops when some span of 8 tokens occurs 3 or more times in it. 22 questions over the heads (1,000 tokens)
of the two bundled samples, each asked alone after the document, answers up to 256 tokens, Quest with the app's
settings for the model, greedy.

    python bench/loop_rate.py      # writes the loop_rate section of bench/RESULTS.md
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import write_section  # noqa: E402
from quest_core.config import Decoding  # noqa: E402
from quest_core.models import load_model  # noqa: E402
from quest_core.session import Session  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SPAN, REPEATS = 8, 3
DOCUMENT_TOKENS = 1000  # each document's head: long enough to ask about, short enough to run on 2 cores
HAMLET = ("hamlet_opening.txt", [
    "Who is Horatio?", "Who is on guard at the start of the play?", "What do the guards see at night?",
    "Summarize the first scene.", "Why does Marcellus bring Horatio to the platform?",
    "What does the ghost look like?", "What news does Horatio give about young Fortinbras?",
    "How does Horatio react to the ghost?", "What time of night is it when the play begins?",
    "Describe the mood of the opening scene.", "Who speaks first in the play?"])
MILTON = ("areopagitica.txt", [
    "What is this text about?", "Who is Milton addressing?", "What does Milton say about licensing books?",
    "Summarize the main argument.", "Why does Milton think books should not be censored?",
    "What examples from ancient Greece does Milton give?", "What does Milton say about the Inquisition?",
    "How does Milton describe a good book?", "What is the author's view of truth?",
    "What does Milton ask Parliament to do?", "What is the tone of the text?"])


def loops(token_ids: list[int]) -> bool:
    spans = Counter(tuple(token_ids[i:i + SPAN]) for i in range(len(token_ids) - SPAN + 1))
    return any(count >= REPEATS for count in spans.values())


def answers(session: Session, document: str, questions: list[str], penalty: float) -> list[list[int]]:
    """Each question asked on its own, right after the document, so the answers do not depend on each other."""
    session.ingest(document)
    out = []
    for question in questions:
        session.new_chat()
        run = session.answer(question, repetition_penalty=penalty, max_new_tokens=256)
        out.append([step.token_id for step in run.steps])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    model, tokenizer = load_model(dtype=args.dtype, device=args.device)
    session = Session(model, tokenizer)
    penalties = (1.0, Decoding().repetition_penalty)
    rows, totals = [], {penalty: [0, 0] for penalty in penalties}
    for name, questions in (HAMLET, MILTON):
        document = tokenizer.decode(tokenizer(ASSETS.joinpath(name).read_text())["input_ids"][:DOCUMENT_TOKENS])
        for penalty in penalties:
            runs = answers(session, document, questions, penalty)
            looped = sum(map(loops, runs))
            totals[penalty][0] += looped
            totals[penalty][1] += len(runs)
            rows.append(f"| {name} | {penalty} | {looped}/{len(runs)} ({100 * looped / len(runs):.0f}%) | "
                        f"{sum(map(len, runs)) / len(runs):.0f} |")
            print(rows[-1], flush=True)
    rows += [f"| all | {penalty} | {looped}/{total} ({100 * looped / total:.0f}%) | |"
             for penalty, (looped, total) in totals.items()]
    config = session.config
    body = (f"Answers with a {SPAN}-token span repeated {REPEATS}+ times, default model ({model.dtype}, "
            f"{args.device}), Quest ({config.page_size}-token pages, rule {config.group_rule}, budget "
            f"{config.budget}), greedy, up to 256 tokens, each question asked alone after the document's first "
            f"{DOCUMENT_TOKENS} tokens. The penalty applies to the answer's own tokens.\n\n"
            "| document | repetition penalty | answers that loop | mean answer tokens |\n|---|---:|---:|---:|\n"
            + "\n".join(rows))
    write_section("loop_rate", "Loop rate of chat answers (bench/loop_rate.py)", body)
    print(json.dumps({str(penalty): totals[penalty] for penalty in penalties}))

if __name__ == "__main__":
    main()
