"""The attention methods compared by the evaluation, each a QuestConfig at a budget."""
from quest_core.config import QuestConfig

DENSE = ("dense", QuestConfig(mode="dense"))


NAMES = ("quest", "quest-max", "quest-p8", "streaming", "oracle")


def methods(budgets: list[int], page_size: int = 16) -> list[tuple[str, int, QuestConfig]]:
    """(name, budget, config) for Quest (GQA group rule sum, the default, and max; and with pages of 8 tokens,
    whose key bounds are tighter), StreamingLLM and the oracle."""
    rows = [("dense", 0, DENSE[1])]
    for budget in budgets:
        rows += [("quest", budget, QuestConfig(mode="quest", budget=budget, page_size=page_size)),
                 ("quest-max", budget, QuestConfig(mode="quest", budget=budget, page_size=page_size, group_rule="max")),
                 ("quest-p8", budget, QuestConfig(mode="quest", budget=budget, page_size=8)),
                 ("streaming", budget, QuestConfig(mode="streaming", budget=budget, page_size=page_size)),
                 ("oracle", budget, QuestConfig(mode="oracle", budget=budget, page_size=page_size))]
    return rows
