"""Selection trace: which pages every layer and KV head read at every decode step, and what that cost.

Recording is off unless a `Trace` is attached to the cache (`cache.trace = Trace()`); then the attention calls
`record_layer` once per layer and the decode loop calls `end_step` once per token.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class StepTrace:
    context_len: int                    # tokens in the cache during this step
    seconds: float                      # wall time of the step (forward + sampling)
    dense_bytes: int                    # KV bytes a dense step reads
    read_bytes: int                     # KV bytes this step read (selected pages + page metadata)
    selected_pages: torch.Tensor | None  # int32 [layers, Hkv, k], current page last; -1 rows for dense layers


@dataclass
class Trace:
    steps: list[StepTrace] = field(default_factory=list)
    _pages: dict = field(default_factory=dict)
    _read_bytes: int = 0
    _dense_bytes: int = 0

    def record_layer(self, layer_idx: int, layer, selected_pages: torch.Tensor | None) -> None:
        per_token = 2 * layer.num_kv_heads * layer.head_dim * layer.keys.element_size()  # K and V
        self._dense_bytes += layer.length * per_token
        if selected_pages is None:
            self._read_bytes += layer.length * per_token
            return
        num_selected = selected_pages.shape[1]
        tokens = (num_selected - 1) * layer.page_size + layer.last_page_len
        self._read_bytes += tokens * per_token + layer.num_pages * per_token  # + page_max/page_min of every page
        self._pages[layer_idx] = selected_pages

    def end_step(self, context_len: int, seconds: float, num_layers: int) -> StepTrace:
        selected = None
        if self._pages:
            some = next(iter(self._pages.values()))
            selected = torch.full((num_layers, *some.shape), -1, dtype=torch.int32)
            for layer_idx, pages in self._pages.items():
                selected[layer_idx] = pages.to("cpu", torch.int32)
        step = StepTrace(context_len, seconds, self._dense_bytes, self._read_bytes, selected)
        self.steps.append(step)
        self._pages, self._read_bytes, self._dense_bytes = {}, 0, 0
        return step
