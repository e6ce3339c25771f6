"""Quest settings: what the attention does at the next decode step."""
from dataclasses import dataclass, replace

MODES = ("dense", "quest", "streaming", "oracle")  # the last two are baselines for the evaluation
GROUP_RULES = ("sum", "max", "mass")


@dataclass(frozen=True)
class QuestConfig:
    mode: str = "quest"        # "dense" reads every page, "quest" the pages its scores select; baselines:
                               # "streaming" the first page (attention sinks) + the most recent pages,
                               # "oracle" the pages holding the most dense attention mass (needs a dense pass)
    budget: int = 1024         # tokens of KV read per KV head and layer (rounded up to whole pages)
    page_size: int = 16        # tokens per page
    dense_layers: int = 2      # the first layers always attend densely
    group_rule: str = "sum"    # how the query heads of one KV group combine their page scores: "sum", "max" or
                               # "mass" (see selection.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule must be one of {GROUP_RULES}, got {self.group_rule!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.budget < self.page_size:
            raise ValueError(f"budget ({self.budget}) must hold at least one page ({self.page_size} tokens)")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")

    @property
    def budget_pages(self) -> int:
        return -(-self.budget // self.page_size)

    def with_changes(self, **changes) -> "QuestConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def default_config(model_config) -> QuestConfig:
    """The settings the app starts a model with (a transformers config). Keys of 64 dims give loose page bounds: on
    the default model Quest needs pages of 4 tokens and the "mass" group rule to find the passkeys dense attention
    finds at small budgets (eval/RESULTS.md). Larger heads keep the paper's pages of 16 and the rule sum, which the
    fused GPU scorer runs."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return QuestConfig(page_size=4, group_rule="mass") if head_dim <= 64 else QuestConfig()
