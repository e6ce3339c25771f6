"""Selection trace: which pages every layer and KV head read at every decode step, and what that cost.

Recording is off unless a `Trace` is attached to the cache (`cache.trace = Trace()`); then the attention calls
`start_attention` and `record_layer` once per layer and the decode loop calls `end_step` once per token. The
attention's time is the host clock's on CPU and CUDA events' on a GPU; a step replayed from a CUDA graph is not
timed (a graph cannot hold timing events).
"""
import time
from dataclasses import dataclass, field

import torch

from .selection import page_attention_mass


@dataclass
class StepTrace:
    context_len: int                    # tokens in the cache during this step
    seconds: float                      # wall time of the step (forward + sampling)
    dense_bytes: int                    # KV bytes a dense step reads
    read_bytes: int                     # KV bytes this step read (selected pages + page metadata)
    selected_pages: torch.Tensor | None  # int32 [layers, Hkv, k], current page last; -1 rows for dense layers
    recall: torch.Tensor | None = None   # float32 [layers, Hkv]: dense attention mass on the selected pages
                                         # (NaN for dense layers); only when inspecting
    attention_s: float | None = None     # seconds in the attention (selection included), all layers; None: untimed


@dataclass
class Trace:
    """inspect=True also computes, for every sparse layer, dense attention over all pages (an extra dense read)
    to measure the selection's recall: the share of the group's attention mass that falls on selected pages."""
    inspect: bool = False
    steps: list[StepTrace] = field(default_factory=list)
    layer_pages: dict = field(default_factory=dict)  # this step's selected pages by layer index, until end_step
    _recall: dict = field(default_factory=dict)
    _read_bytes: int = 0
    _dense_bytes: int = 0
    _attention_s: float = 0.0
    _timed: list = field(default_factory=list)  # (start, end) CUDA events of this step's layers
    _untimed: bool = False

    @staticmethod
    def start_attention(device: torch.device):
        """A layer's attention starts: the host clock, a recorded CUDA event, or None inside a graph capture."""
        if device.type != "cuda":
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def record_layer(self, layer_idx: int, layer, selected_pages: torch.Tensor | None, query=None, scaling=1.0,
                     started=None):
        """query [Hkv, G, D] is needed only when inspecting; `started` is what `start_attention` returned."""
        if isinstance(started, float):
            self._attention_s += time.perf_counter() - started
        elif started is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._timed.append((started, end))
        else:
            self._untimed = True
        per_token = 2 * layer.num_kv_heads * layer.head_dim * layer.keys.element_size()  # K and V
        self._dense_bytes += layer.length * per_token
        if selected_pages is None:
            self._read_bytes += layer.length * per_token
            return
        num_selected = selected_pages.shape[1]
        tokens = (num_selected - 1) * layer.page_size + layer.last_page_len
        bounds = layer.page_bounds
        bounds_bytes = layer.num_pages * bounds.shape[-1] * layer.num_kv_heads * bounds.element_size()
        self._read_bytes += tokens * per_token + bounds_bytes
        self.layer_pages[layer_idx] = selected_pages
        if self.inspect:
            mass = page_attention_mass(query, layer.dense()[0], layer.page_size, scaling)  # [Hkv, pages]
            self._recall[layer_idx] = mass.gather(1, selected_pages).sum(1)

    def end_step(self, context_len: int, seconds: float, num_layers: int) -> StepTrace:
        selected = recall = None
        if self.layer_pages:
            layer_ids = list(self.layer_pages)
            pages = torch.stack([self.layer_pages[i] for i in layer_ids]).to("cpu", torch.int32)  # one copy
            selected = torch.full((num_layers, *pages.shape[1:]), -1, dtype=torch.int32)
            selected[layer_ids] = pages
        if self._recall:
            recall = torch.full((num_layers, selected.shape[1]), float("nan"))
            for layer_idx, layer_recall in self._recall.items():
                recall[layer_idx] = layer_recall.float().cpu()
        if self._timed:
            self._timed[-1][1].synchronize()
            self._attention_s += sum(start.elapsed_time(end) for start, end in self._timed) / 1000
        attention_s = None if self._untimed else self._attention_s
        step = StepTrace(context_len, seconds, self._dense_bytes, self._read_bytes, selected, recall, attention_s)
        self.steps.append(step)
        self.layer_pages, self._recall, self._read_bytes, self._dense_bytes = {}, {}, 0, 0
        self._attention_s, self._timed, self._untimed = 0.0, [], False
        return step
