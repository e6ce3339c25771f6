"""How often the default model's answers loop, before and after the chat decoding defaults (quest_core.config.Decoding).

An answer loops when some span of 8 tokens occurs 3 or more times in it. The repetition penalty is chosen on a tuning
split (questions about Hamlet's opening) and reported on a split no one looked at while choosing (questions about
Milton's Areopagitica), each answer up to 256 tokens, Quest with the app's settings for the model, greedy.

    python bench/loop_rate.py      # ~15 minutes on 2 cores; writes the loop_rate section of bench/RESULTS.md
"""
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import write_section  # noqa: E402
from quest_core.models import load_model  # noqa: E402
from quest_core.session import Session, cut_document  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SPAN, REPEATS = 8, 3
PENALTIES = (1.0, 1.1, 1.2, 1.3)  # 1.0: no penalty (before)
TUNING = ("hamlet_opening.txt", [
    "Who is Horatio?", "Who is on guard at the start of the play?", "What do the guards see at night?",
    "Summarize the first scene.", "Why does Marcellus bring Horatio to the platform?",
    "What does the ghost look like?", "What news does Horatio give about young Fortinbras?",
    "How does Horatio react to the ghost?", "What time of night is it when the play begins?",
    "Describe the mood of the opening scene.", "What do the men decide to do at the end of the scene?",
    "Who speaks first in the play?"])
REPORT = ("areopagitica.txt", [
    "What is this text about?", "Who is Milton addressing?", "What does Milton say about licensing books?",
    "Summarize the main argument.", "Why does Milton think books should not be censored?",
    "What examples from ancient Greece does Milton give?", "What does Milton say about the Inquisition?",
    "How does Milton describe a good book?", "What is the author's view of truth?",
    "What does Milton ask Parliament to do?", "Does Milton think reading bad books is harmful?",
    "What is the tone of the text?"])


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
    model, tokenizer = load_model()
    session = Session(model, tokenizer)
    documents = {name: cut_document(tokenizer, model.config, ASSETS.joinpath(name).read_text(), "head")
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
    body = (f"Answers with a {SPAN}-token span repeated {REPEATS}+ times, default model, Quest "
            f"({session.config.page_size}-token pages, rule {session.config.group_rule}, budget {session.config.budget}), "
            f"greedy, up to 256 tokens, each question asked alone after the document (cut to fit the context). "
            f"Penalty chosen on the tuning split: **{chosen}**.\n\n"
            "| split | repetition penalty | answers that loop | mean answer tokens |\n|---|---:|---:|---:|\n"
            + "\n".join(rows))
    write_section("loop_rate", "Loop rate of chat answers (bench/loop_rate.py)", body)
    print(json.dumps({"chosen_penalty": chosen, "report_before": rates["report", 1.0][:2],
                      "report_after": rates["report", chosen][:2]}))


if __name__ == "__main__":
    main()
