"""The attention methods compared by the evaluation, each a QuestConfig at a budget."""
from quest_core.config import QuestConfig, default_config

DENSE = ("dense", QuestConfig(mode="dense"))


NAMES = ("quest", "quest-max", "quest-mass", "quest-p8", "quest-p4", "quest-p4-mass", "streaming", "oracle")


def methods(budgets: list[int], names=NAMES, model_config=None, top_p: float | None = None
            ) -> list[tuple[str, int, QuestConfig]]:
    """(name, budget, config), dense first, then for each budget those of `names`: Quest (GQA group rule sum, the
    engine's default, max and mass; pages of 16 tokens, and of 8 and 4, whose key bounds are tighter), StreamingLLM
    and the oracle; "quest-default" is the model's own settings (`default_config` of `model_config`), what the app
    runs, "quest-topp" those settings with the adaptive budget `top_p` (the budget its most, the config's
    min_budget its fewest tokens), "quest-two-level" those settings with the two-level ranking (pages of 2,
    coarse_factor 4), "oracle-default" the oracle on the settings' own pages, and "dense-chunkN" and "dense-bf16"
    dense attention with the document prefilled in chunks of N tokens or in bfloat16 (eval/agreement.py)."""
    configs = {"quest": dict(mode="quest"), "quest-max": dict(mode="quest", group_rule="max"),
               "quest-mass": dict(mode="quest", group_rule="mass"), "quest-p8": dict(mode="quest", page_size=8),
               "quest-p4": dict(mode="quest", page_size=4),
               "quest-p4-mass": dict(mode="quest", page_size=4, group_rule="mass"),
               "streaming": dict(mode="streaming"),
               "oracle": dict(mode="oracle")}
    if "quest-topp" in names and top_p is None:
        raise ValueError("the method quest-topp needs top_p, the adaptive budget's share")

    def config(name: str, budget: int) -> QuestConfig:
        if name == "quest-default":
            return default_config(model_config, budget=budget)
        if name == "quest-topp":
            return default_config(model_config, budget=budget, top_p=top_p)
        if name == "oracle-default":
            return default_config(model_config, budget=budget, mode="oracle")
        if name == "quest-two-level":
            return default_config(model_config, budget=budget, page_size=2, coarse_factor=4)
        if name.startswith("dense-"):
            return DENSE[1]
        return QuestConfig(budget=budget, **configs[name])

    return [("dense", 0, DENSE[1])] + [(name, budget, config(name, budget)) for budget in budgets for name in names]
