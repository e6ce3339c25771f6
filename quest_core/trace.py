"""Selection trace: which pages every layer and KV head read at every decode step, and what that cost.

Recording is off unless a `Trace` is attached to the cache (`cache.trace = Trace()`); then the attention calls
`start_attention` and `record_layer` once per layer and the decode loop calls `end_step` once per token. The
attention's time is the host clock's on CPU and CUDA events' on a GPU; a step replayed from a CUDA graph is not
timed (a graph cannot hold timing events).

With an adaptive budget (QuestConfig.top_p) each KV head reads its own number of pages: `pages_read` records them
and `read_bytes` counts those pages' KV. (The torch backend gathers the selection's fixed width and masks the pages
a head does not read: it moves up to `budget` tokens' KV per head; a kernel with per-head page counts reads only
what `read_bytes` counts.)
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .selection import page_attention_mass, read_slots


@dataclass
class StepTrace:
    context_len: int                    # tokens in the cache during this step
    seconds: float                      # wall time of the step (forward + sampling)
    dense_bytes: int                    # KV bytes a dense step reads
    read_bytes: int                     # KV bytes this step read (the pages read + page metadata)
    selected_pages: torch.Tensor | None  # int32 [layers, Hkv, k], current page last; -1 rows for dense layers;
                                         # with top_p, -1 also in the slots a head did not read (before the last)
    recall: torch.Tensor | None = None   # float32 [layers, Hkv]: dense attention mass on the selected pages
                                         # (NaN for dense layers); only when inspecting
    attention_s: float | None = None     # seconds in the attention (selection included), all layers; None: untimed
    pages_read: torch.Tensor | None = None  # int32 [layers, Hkv]: the pages each KV head read, the current one
                                            # included (every page in a dense layer)


@dataclass
class Trace:
    """inspect=True also computes, for every sparse layer, dense attention over all pages (an extra dense read)
    to measure the selection's recall: the share of the group's attention mass that falls on selected pages."""
    inspect: bool = False
    steps: list[StepTrace] = field(default_factory=list)
    layer_pages: dict = field(default_factory=dict)  # this step's selected pages by layer index, until end_step
    _page_counts: dict = field(default_factory=dict)  # layer index -> pages every KV head read (an int)
    _adaptive: dict = field(default_factory=dict)  # top_p layers: index -> (pages each KV head read [Hkv] on the
                                                   # device, page size, last page's tokens, bytes of one token of
                                                   # one KV head): its read bytes wait for its counts
    _num_kv_heads: int = 0
    _rows_per_page: int = 1  # the backend's selections: page ids are their rows // _rows_per_page
    _recall: dict = field(default_factory=dict)
    _read_bytes: int = 0
    _dense_bytes: int = 0
    _attention_s: float = 0.0
    _timed: list = field(default_factory=list)  # (start, end) CUDA events of this step's layers
    _untimed: bool = False
    _queued: deque = field(default_factory=deque)  # steps closed ahead of their consumer (`close_step`)

    @staticmethod
    def start_attention(device: torch.device):
        """A layer's attention starts: the host clock, a recorded CUDA event, or None inside a graph capture."""
        if device.type != "cuda":
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))  # the layer's GPU (a model can span several)
        return start

    def record_layer(self, layer_idx: int, layer, selected_pages: torch.Tensor | None, query=None, scaling=1.0,
                     started=None, page_counts: torch.Tensor | None = None, bounds_read: int | None = None,
                     rows_per_page: int = 1):
        """selected_pages [Hkv, k] or None (dense): the backend's selection, whose page ids are its rows divided by
        rows_per_page (AttentionBackend.rows_per_page), kept so until the step closes, which takes the page ids of
        all layers on the host; page_counts [Hkv] with top_p (selection.read_slots says which slots a head read);
        query [Hkv, G, D] is needed only when inspecting; `started` is what `start_attention` returned;
        bounds_read: the rows of bounds the selection read per KV head (QuestConfig.bounds_read; None: every
        page's)."""
        if isinstance(started, float):
            self._attention_s += time.perf_counter() - started
        elif started is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(layer.keys.device))
            self._timed.append((started, end))
        else:
            self._untimed = True
        head_token_bytes = 2 * layer.head_dim * layer.keys.element_size()  # K and V of one token of one KV head
        self._num_kv_heads = num_kv_heads = layer.num_kv_heads
        self._dense_bytes += layer.length * num_kv_heads * head_token_bytes
        if selected_pages is None:
            self._read_bytes += layer.length * num_kv_heads * head_token_bytes
            self._page_counts[layer_idx] = layer.num_pages
            return
        width = selected_pages.shape[1]
        bounds = layer.page_bounds
        rows = layer.num_pages if bounds_read is None else bounds_read
        self._read_bytes += rows * bounds.shape[-1] * num_kv_heads * bounds.element_size()
        if page_counts is None:
            tokens = (width - 1) * layer.page_size + layer.last_page_len
            self._read_bytes += tokens * num_kv_heads * head_token_bytes
            self._page_counts[layer_idx] = width
        else:
            selected_pages = selected_pages.masked_fill(~read_slots(page_counts, width), -1)
            self._adaptive[layer_idx] = (page_counts, layer.page_size, layer.last_page_len, head_token_bytes)
        self.layer_pages[layer_idx] = selected_pages
        self._rows_per_page = rows_per_page
        if self.inspect:
            mass = page_attention_mass(query, layer.dense()[0], layer.page_size, scaling)  # [Hkv, pages]
            pages = self._page_ids(selected_pages)
            on_pages = mass.gather(1, pages.clamp(min=0)).masked_fill(pages < 0, 0)
            self._recall[layer_idx] = on_pages.sum(1)

    def _page_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """The page ids of a backend's selected rows (-1, a slot not read, stays -1)."""
        return rows.div(self._rows_per_page, rounding_mode="floor")

    def end_step(self, context_len: int, seconds: float, num_layers: int) -> StepTrace:
        """Ends this step (or takes the oldest step closed ahead, see `close_step`) and returns it."""
        if self._queued:
            step = self._queued.popleft()
            step.seconds = seconds
            if step.selected_pages is not None:  # page ids, out of pinned memory
                step.selected_pages = self._page_ids(step.selected_pages)
        else:
            step = self._close(context_len, seconds, num_layers, wait=True)
        self.steps.append(step)
        return step

    def close_step(self, context_len: int, num_layers: int) -> None:
        """Ends a step that runs ahead of its consumer (a graph's greedy steps, queued before the host reads the
        token before them): its pages are copied to pinned host memory in stream order, without waiting. The
        consumer's `end_step`, once it has the step's token (the copy is done by then), takes it with its time."""
        assert not self._adaptive, "an adaptive budget's page counts are read on the host: no step runs ahead"
        self._queued.append(self._close(context_len, 0.0, num_layers, wait=False))

    def drop_closed(self, count: int = 1) -> None:
        """Forget the last `count` steps closed ahead: they were undone (their tokens removed from the cache)."""
        for _ in range(count):
            self._queued.pop()

    def _close(self, context_len: int, seconds: float, num_layers: int, wait: bool) -> StepTrace:
        pages_read = self._pages_read(num_layers)
        selected = recall = None
        if self.layer_pages:
            first = next(iter(self.layer_pages.values()))
            dense = torch.full_like(first, -1)  # the rows of a dense layer (no index tensor: its upload would wait)
            selected = torch.stack([self.layer_pages.get(index, dense).to(first.device)  # layers over GPUs
                                    for index in range(num_layers)]).to(torch.int32)
            if wait:
                selected = self._page_ids(selected.cpu())
            else:  # end_step takes the page ids once the copy is done
                host = torch.empty(selected.shape, dtype=torch.int32, pin_memory=selected.is_cuda)
                selected = host.copy_(selected, non_blocking=True)
        if self._recall:
            recall = torch.full((num_layers, selected.shape[1]), float("nan"))
            for layer_idx, layer_recall in self._recall.items():
                recall[layer_idx] = layer_recall.float().cpu()
        if self._timed:
            for _, end in self._timed:  # the last layer's GPU finishes last; the others' events are done by then
                end.synchronize()
            self._attention_s += sum(start.elapsed_time(end) for start, end in self._timed) / 1000
        attention_s = None if self._untimed else self._attention_s
        step = StepTrace(context_len, seconds, self._dense_bytes, self._read_bytes, selected, recall, attention_s,
                         pages_read)
        self.layer_pages, self._recall, self._read_bytes, self._dense_bytes = {}, {}, 0, 0
        self._page_counts, self._adaptive = {}, {}
        self._attention_s, self._timed, self._untimed = 0.0, [], False
        return step

    def _pages_read(self, num_layers: int) -> torch.Tensor | None:
        """This step's page counts as int32 [layers, Hkv] (-1 for a layer not recorded), the top_p layers' counts
        brought to the host in one copy and their read bytes added."""
        if not self._page_counts and not self._adaptive:
            return None
        per_layer = torch.tensor([self._page_counts.get(i, -1) for i in range(num_layers)], dtype=torch.int32)
        pages_read = per_layer[:, None].repeat(1, self._num_kv_heads)
        if self._adaptive:
            first = next(iter(self._adaptive.values()))[0].device
            counts = torch.stack([page_counts.to(first) for page_counts, *_ in self._adaptive.values()])
            counts = counts.to("cpu", torch.int32)  # [top_p layers, Hkv]
            for layer_counts, (_, page_size, last_page_len, head_token_bytes) in zip(counts, self._adaptive.values()):
                tokens = int(((layer_counts - 1) * page_size + last_page_len).sum())  # over the KV heads
                self._read_bytes += tokens * head_token_bytes
            pages_read[list(self._adaptive)] = counts
        return pages_read


def mean_pages_read(steps) -> float | None:
    """The pages a KV head of a sparse layer read per step, on average over `steps` (StepTraces; None entries are
    skipped); None when no step had a sparse layer."""
    counts = [step.pages_read[step.selected_pages[:, 0, 0] >= 0].flatten() for step in steps
              if step is not None and step.selected_pages is not None and step.pages_read is not None]
    counts = torch.cat(counts) if counts else torch.zeros(0)
    return counts.float().mean().item() if counts.numel() else None
