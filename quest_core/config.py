"""Settings, each in one place: Quest's (what the attention does at the next decode step), a model's starting Quest
settings (`default_config`) and the chat decoding defaults (`Decoding`) that the app, the CLI and `Session` share."""
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
    top_p: float | None = None  # None: every KV head reads `budget` tokens. A share p in (0, 1]: an adaptive budget
                                # (mode "quest"): each KV head reads the current page, then pages in decreasing
                                # estimated share of its group's attention (the "mass" rule's, whatever group_rule
                                # says; with coarse_factor, over the two-level ranking's candidates for `budget`)
                                # until the pages read hold p of it, from `min_budget` up to `budget` tokens
    min_budget: int = 64       # with top_p: the fewest tokens a KV head reads (16 pages of 4, 4 pages of 16)
    sink_pages: int = 0        # mode "quest": the first pages (the first tokens, where many heads park their
                               # attention: attention sinks) are always read, out of the budget (as many as it
                               # holds beside the current page and one chosen page, and with top_p as many as
                               # min_budget holds)
    coarse_factor: int = 0     # mode "quest", 0: pages rank by their own bounds. f >= 1: a two-level ranking:
                               # pairs of pages (0, 1), (2, 3), ... rank first by the pair's bounds, then the pages
                               # of the best f * k / 2 pairs (k: the budget's pages) by their own. With pages of 2 it
                               # ranks as pages of 2 do from the bounds of pairs, pages of 4's bytes (eval/RESULTS.md)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule must be one of {GROUP_RULES}, got {self.group_rule!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.budget_pages < 2:
            raise ValueError(f"budget ({self.budget} tokens) must hold at least two pages of {self.page_size} tokens: "
                             "the current page and one chosen page")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.sink_pages < 0:
            raise ValueError(f"sink_pages must be >= 0, got {self.sink_pages}")
        if self.coarse_factor < 0:
            raise ValueError(f"coarse_factor must be >= 0, got {self.coarse_factor}")
        if self.top_p is not None:
            self._check_top_p()

    def _check_top_p(self):
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.mode not in ("dense", "quest"):
            raise ValueError(f"top_p is an adaptive budget for mode 'quest', not {self.mode!r}")
        if self.min_budget_pages < 2:
            raise ValueError(f"min_budget ({self.min_budget} tokens) must hold at least two pages of {self.page_size} "
                             "tokens: the current page and one chosen page")
        if self.min_budget_pages > self.budget_pages:
            raise ValueError(f"min_budget ({self.min_budget} tokens) must not exceed budget ({self.budget} tokens), "
                             "the most a KV head reads with top_p")

    @property
    def budget_pages(self) -> int:
        return -(-self.budget // self.page_size)

    @property
    def kept_sink_pages(self) -> int:
        """The sink pages a fixed budget reads: as many as it holds beside the current page and one chosen page."""
        return min(self.sink_pages, self.budget_pages - 2)

    def sparse_at(self, layer_idx: int, num_pages: int) -> bool:
        """Whether a decode step of layer `layer_idx` over `num_pages` pages reads a selection of them."""
        return self.mode != "dense" and layer_idx >= self.dense_layers and num_pages > self.budget_pages

    def bounds_read(self, num_pages: int) -> int:
        """Rows of bounds (a page's or a pair's max and min) a sparse step reads over `num_pages` pages: every page's,
        or with coarse_factor the pairs' and then the candidates' (selection.two_level_scores; every page's where
        every pair is a candidate)."""
        if not self.coarse_factor:
            return num_pages
        pairs = -(-num_pages // 2)
        candidates = -(-self.coarse_factor * self.budget_pages // 2)
        return num_pages if candidates >= pairs else pairs + min(num_pages, 2 * candidates + 1)

    @property
    def min_budget_pages(self) -> int:
        return -(-self.min_budget // self.page_size)

    def with_changes(self, **changes) -> "QuestConfig":
        """These settings with `changes` on top: None keeps a value; top_p=0 turns the adaptive budget off."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("top_p") == 0:
            changes["top_p"] = None
        return replace(self, **changes)


TWO_LEVEL_FACTOR = 4  # coarse_factor of the two-level ranking the app and CLI offer: chosen on the tuning split with
                      # pages of 2, then reported on two held-out splits (eval/RESULTS.md)


def default_config(model_config, **changes) -> QuestConfig:
    """A model's Quest settings (from its transformers config), with `changes` (None keeps a value) on top: what
    every entry point (app, CLI, `Session`, warm-up, benches, eval) starts from. Keys of 64 dims give loose page
    bounds: on the default model Quest needs pages of 4 tokens and the "mass" group rule to find the passkeys dense
    attention finds at small budgets (eval/RESULTS.md). Larger heads keep the paper's pages of 16 and the rule sum.
    `sink_pages` stays 0: keeping the first page finds more passkeys at budget 128 on the report split (46/60
    against 37/60) but one fewer at 256 (57/60 against 58/60; eval/RESULTS.md) and the same at the default budget."""
    config = QuestConfig(page_size=4, group_rule="mass") if head_dim(model_config) <= 64 else QuestConfig()
    return config.with_changes(**changes)


def head_dim(model_config) -> int:
    """The attention heads' width of a transformers config (its `head_dim`, else hidden size / heads)."""
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded: the same for dense and Quest, so comparisons stay fair. Greedy by default, so a
    comparison is deterministic. The two penalties look at the answer's own tokens only (not the document, whose
    words an answer should be free to quote) and keep a small model out of loops (bench/RESULTS.md, loop_rate)."""
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 is greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.2   # HF's: logits of tokens already in the answer divided (or, < 0, multiplied)
    no_repeat_ngram_size: int = 0     # HF's: no n-gram of the answer twice; 0 is off
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("repetition_penalty must be > 0 and no_repeat_ngram_size >= 0, got "
                             f"{self.repetition_penalty}, {self.no_repeat_ngram_size}")

    def with_changes(self, **changes) -> "Decoding":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
