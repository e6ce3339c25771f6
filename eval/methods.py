"""The attention methods compared by the evaluation, each a QuestConfig at a budget."""
from quest_core.config import QuestConfig

DENSE = ("dense", QuestConfig(mode="dense"))


def methods(budgets: list[int], page_size: int = 16) -> list[tuple[str, int, QuestConfig]]:
    """(name, budget, config) for Quest (GQA group rule sum, the default, and max), StreamingLLM and the oracle."""
    rows = [("dense", 0, DENSE[1])]
    for budget in budgets:
        rows += [("quest", budget, QuestConfig(mode="quest", budget=budget, page_size=page_size)),
                 ("quest-max", budget, QuestConfig(mode="quest", budget=budget, page_size=page_size, group_rule="max")),
                 ("streaming", budget, QuestConfig(mode="streaming", budget=budget, page_size=page_size)),
                 ("oracle", budget, QuestConfig(mode="oracle", budget=budget, page_size=page_size))]
    return rows
