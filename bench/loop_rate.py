"""How often the default model's answers loop, before and after the chat decoding defaults (quest_core.config.Decoding).

An answer loops when some span of 8 tokens occurs 3 or more times in it. The repetition penalty is chosen on a tuning
split (questions about Hamlet's opening) and reported on a split no one looked at while choosing (questions about
Milton's Areopagitica), 11 questions each, each answer up to 256 tokens, Quest with the app's settings for the model,
greedy.

    python bench/loop_rate.py [--device cuda --dtype fp32]   # writes the loop_rate section of bench/RESULTS.md

Loops are the model's, not the hardware's: on a GPU in float32 it measures what the CPU would, faster.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import write_section  # noqa: E402
from quest_core.models import load_model  # noqa: E402
from quest_core.session import Session  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SPAN, REPEATS = 8, 3
PENALTIES = (1.0, 1.1, 1.2, 1.3)  # 1.0: no penalty (before)
DOCUMENT_TOKENS = 2500  # each document's head: long enough to ask about, short enough to run on 2 cores
TUNING = ("hamlet_opening.txt", [
    "Who is Horatio?", "Who is on guard at the start of the play?", "What do the guards see at night?",
    "Summarize the first scene.", "Why does Marcellus bring Horatio to the platform?",
    "What does the ghost look like?", "What news does Horatio give about young Fortinbras?",
    "How does Horatio react to the ghost?", "What time of night is it when the play begins?",
    "Describe the mood of the opening scene.", "Who speaks first in the play?"])
REPORT = ("areopagitica.txt", [
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
    documents = {name: tokenizer.decode(tokenizer(ASSETS.joinpath(name).read_text())["input_ids"][:DOCUMENT_TOKENS])
                 for name in (TUNING[0], REPORT[0])}
    rates = {}

    def measure(split, name, questions, penalty):
        runs = answers(session, documents[name], questions, penalty)
        rates[split, penalty] = (sum(map(loops, runs)), len(runs), sum(map(len, runs)) / len(runs))
        print(split, penalty, rates[split, penalty], flush=True)

    for penalty in PENALTIES:
        measure("tuning", *TUNING, penalty)
    chosen = min(PENALTIES, key=lambda p: (rates["tuning", p][0], p))  # the smallest with the fewest loops
    for penalty in (1.0, chosen):
        measure("report", *REPORT, penalty)
    rows = [f"| {split} ({name}) | {penalty} | {looped}/{total} ({100 * looped / total:.0f}%) | {mean_len:.0f} |"
            for (split, penalty), (looped, total, mean_len) in rates.items()
            for name in [TUNING[0] if split == "tuning" else REPORT[0]]]
    config = session.config
    body = (f"Answers with a {SPAN}-token span repeated {REPEATS}+ times, default model ({model.dtype}, "
            f"{args.device}), Quest ({config.page_size}-token pages, rule {config.group_rule}, budget "
            f"{config.budget}), greedy, up to 256 tokens, each question asked alone after the document's first "
            f"{DOCUMENT_TOKENS} tokens. "
            f"Penalty chosen on the tuning split: **{chosen}**.\n\n"
            "| split | repetition penalty | answers that loop | mean answer tokens |\n|---|---:|---:|---:|\n"
            + "\n".join(rows))
    write_section("loop_rate", "Loop rate of chat answers (bench/loop_rate.py)", body)
    print(json.dumps({"chosen_penalty": chosen, "report_before": rates["report", 1.0][:2],
                      "report_after": rates["report", chosen][:2]}))


if __name__ == "__main__":
    main()
