"""Plotly figures for the app: the pages read (heatmaps with a legend, the question's and the needle's pages marked),
KV bytes per step in dense mode, and the time per token of dense vs Quest split into attention and the rest.

Heatmaps are binned to at most MAX_COLUMNS page columns and MAX_ROWS step rows, one byte per cell, so a figure stays
under about 50 KB whatever the context length (an 8K-token context has 2,000 pages of 4 tokens)."""
import numpy as np
import plotly.graph_objects as go

MAX_COLUMNS = 240
MAX_ROWS = 128
NOT_READ, READ_LOW, READ_HIGH, CURRENT, DENSE = 0, 10, 60, 80, 100  # cell values (uint8; the scale's 0..1 is 0..100)
WHITE, LIGHT_BLUE, BLUE, ORANGE, DENSE_COLOR = "#eef0f3", "#bfdbfe", "#1d4ed8", "#f97316", "#a78bfa"
COLORSCALE = [[0, WHITE], [0.05, WHITE], [0.05, LIGHT_BLUE], [0.6, BLUE], [0.7, BLUE], [0.7, ORANGE],
              [0.9, ORANGE], [0.9, DENSE_COLOR], [1, DENSE_COLOR]]
MARKS = {"question": ("#dc2626", "triangle-down"), "needle": ("#059669", "star")}  # name -> (color, symbol)
# Plotly's mode bar (its toolbar, shown on hover or touch) covers the figure's top 27 px from the right edge, 272 px
# wide: at a phone's 400 px, the title's row. Titles start below it; a subtitle holds what one 400 px line cannot.
MODE_BAR_PX = 32
TITLE_PX, SUBTITLE_PX = 17, 28  # a title's line; a subtitle's, with the gap Plotly leaves above it


def _layout(figure, title: str, height: int, subtitle: str = ""):
    """The app's look for `figure`: its title and subtitle under Plotly's mode bar, then `height` pixels for the plot,
    its axes and legend."""
    top = MODE_BAR_PX + TITLE_PX + (SUBTITLE_PX if subtitle else 0) + 8
    figure.update_layout(title=dict(text=title, font=dict(size=13), subtitle=dict(text=subtitle, font=dict(size=12)),
                                    yref="container", y=1, yanchor="top", pad=dict(t=MODE_BAR_PX)),
                         height=top + height, margin=dict(l=50, r=10, t=top, b=36),
                         plot_bgcolor="white", uirevision="keep",  # no zoom reset on refresh
                         # the legend under the plot: above it, rows it wraps into ran over the title
                         legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0,
                                     font=dict(size=11)))
    return figure


def _legend(figure, dense_layer: bool):
    """Legend entries for the cell colours (the heatmap itself has none)."""
    entries = [("read", BLUE), ("not read", WHITE), ("current page", ORANGE)]
    if dense_layer:
        entries.append(("dense layer: all read", DENSE_COLOR))
    for name, color in entries:
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                                    marker=dict(symbol="square", size=11, color=color, line=dict(width=1,
                                                                                               color="#9ca3af"))))


def _marks(figure, marks: dict, y: float):
    """Markers at row `y` over the pages in `marks` (name -> page ids), each kind with its legend entry."""
    for name, pages in marks.items():
        if len(pages):
            color, symbol = MARKS[name]
            figure.add_trace(go.Scatter(x=list(pages), y=[y] * len(pages), mode="markers", name=f"{name}'s pages",
                                        marker=dict(symbol=symbol, size=10, color=color),
                                        hovertemplate=f"{name}: page %{{x}}<extra></extra>"))


def page_bins(num_pages: int) -> int:
    """Pages per heatmap column."""
    return max(1, -(-num_pages // MAX_COLUMNS))


def _row_cells(selected, num_pages: int, bin_pages: int, dense: bool) -> np.ndarray:
    """One heatmap row: cell values per column of `bin_pages` pages; `selected` holds one KV head's page ids."""
    columns = -(-num_pages // bin_pages)
    if dense:
        cells = np.full(columns, DENSE, dtype=np.uint8)
    else:
        read = np.zeros(columns * bin_pages)
        read[selected[(selected >= 0) & (selected < num_pages)]] = 1
        share = read.reshape(columns, bin_pages).sum(1) / np.minimum(bin_pages, num_pages - np.arange(columns) *
                                                                      bin_pages)
        cells = np.where(share > 0, READ_LOW + (READ_HIGH - READ_LOW) * share, NOT_READ).astype(np.uint8)
    cells[(num_pages - 1) // bin_pages] = CURRENT
    return cells


def _column_centers(num_pages: int, bin_pages: int) -> np.ndarray:
    return np.arange(-(-num_pages // bin_pages)) * bin_pages + (bin_pages - 1) / 2


def _is_dense(step, layer: int) -> bool:
    return step.selected_pages is None or int(step.selected_pages[layer, 0, 0]) < 0


def pages_read(step, layer: int, page_size: int, page_labels: list[str], marks: dict) -> go.Figure:
    """Which pages each KV head of `layer` read at `step` (a StepTrace). page_labels[p]: hover text of page p;
    marks: name -> page ids ("question", "needle")."""
    num_pages = -(-step.context_len // page_size)
    bin_pages = page_bins(num_pages)
    dense = _is_dense(step, layer)
    pages = None if dense else step.selected_pages[layer].numpy()
    # a dense layer of a Quest step keeps a row per KV head: the plot keeps its size from layer to layer
    num_heads = 1 if step.selected_pages is None else step.selected_pages.shape[1]
    z = np.stack([_row_cells(None if dense else pages[h], num_pages, bin_pages, dense) for h in range(num_heads)])
    x = _column_centers(num_pages, bin_pages)
    hover = [_bin_label(page_labels, column * bin_pages, min(num_pages, (column + 1) * bin_pages))
             for column in range(len(x))]
    figure = go.Figure(go.Heatmap(z=z, x=x, y=list(range(num_heads)), text=[hover] * num_heads, showscale=False,
                                  hovertemplate="KV head %{y}<br>%{text}<extra></extra>", colorscale=COLORSCALE,
                                  zmin=0, zmax=DENSE))
    _legend(figure, dense)
    _marks(figure, marks, num_heads - 0.5 + 0.35)
    figure.update_yaxes(title="KV head", tickvals=list(range(num_heads)), range=[-0.5, num_heads + 0.1],
                        fixedrange=True)
    figure.update_xaxes(title=f"page ({page_size} tokens{'' if bin_pages == 1 else f'; {bin_pages} per column'})",
                        range=[-0.5, num_pages - 0.5])
    if step.selected_pages is None:
        kind = "every layer read every page (dense)"
    elif dense:
        kind = "a dense layer: every page read"
    else:
        read = (pages >= 0).sum(1)  # top-p: -1 in the slots a head did not read
        counts = f"{read.min()}" if read.min() == read.max() else f"{read.min()}-{read.max()}"
        kind = f"each head read {counts} of {num_pages} pages"
    # at least three heads' height: a dense step has one row, and on a phone its legend (a column of five entries)
    # took the whole plot, then more (Plotly failed "with axis scaling" and drew nothing)
    height = 110 + 34 * max(num_heads, 3)
    return _layout(figure, f"Pages read · layer {layer}, at {step.context_len:,} tokens", height, kind)


def _bin_label(page_labels: list[str], first: int, end: int) -> str:
    """Hover text of the pages first..end-1: the first page's label (token range and text) when known."""
    if first < len(page_labels):
        return page_labels[first] if end - first == 1 else f"pages {first}-{end - 1}, from {page_labels[first]}…"
    return f"page {first}" if end - first == 1 else f"pages {first}-{end - 1}"


def selection_over_time(steps, layer: int, head: int, page_size: int, marks: dict) -> go.Figure:
    """Pages one layer's KV head read at every decode step of the answer (binned to MAX_ROWS x MAX_COLUMNS)."""
    num_pages = -(-steps[-1].context_len // page_size)
    bin_pages = page_bins(num_pages)
    columns = -(-num_pages // bin_pages)
    rows = np.zeros((len(steps), columns), dtype=np.uint8)
    for row, step in enumerate(steps):
        pages_now = -(-step.context_len // page_size)
        dense = _is_dense(step, layer)
        cells = _row_cells(None if dense else step.selected_pages[layer, head].numpy(), pages_now, bin_pages, dense)
        rows[row, :len(cells)] = cells
    step_bin = max(1, -(-len(steps) // MAX_ROWS))
    if step_bin > 1:  # merge groups of steps: a cell keeps the largest value of its group (current, then read)
        padded = np.zeros((-(-len(steps) // step_bin) * step_bin, columns), dtype=np.uint8)
        padded[:len(steps)] = rows
        rows = padded.reshape(-1, step_bin, columns).max(1)
    y = np.arange(len(rows)) * step_bin
    figure = go.Figure(go.Heatmap(z=rows, x=_column_centers(num_pages, bin_pages), y=y, showscale=False,
                                  colorscale=COLORSCALE, zmin=0, zmax=DENSE,
                                  hovertemplate="step %{y}, page %{x:.0f}<extra></extra>"))
    _legend(figure, any(_is_dense(step, layer) for step in steps))
    _marks(figure, marks, -0.5 - max(1.0, 0.03 * len(steps)))
    figure.update_yaxes(title="decode step", autorange="reversed")
    figure.update_xaxes(title="page", range=[-0.5, num_pages - 0.5])
    return _layout(figure, f"Pages read over the answer · layer {layer}, KV head {head}", 300)


def kv_read_per_step(series: dict) -> go.Figure:
    """KV bytes read per step against the context, per mode: series[mode] = (context lengths, bytes read), as
    measured in the traces (dense mode reads every page, so its line grows with the context)."""
    figure = go.Figure()
    for mode, (contexts, read_bytes) in series.items():
        figure.add_trace(go.Scatter(x=list(contexts), y=[b / 2**20 for b in read_bytes], mode="lines+markers",
                                    marker=dict(size=4), name="Quest" if mode == "quest" else mode,
                                    line=dict(color=BLUE if mode == "quest" else DENSE_COLOR, width=3)))
    figure.update_yaxes(title="KV MiB read per step", rangemode="tozero")
    figure.update_xaxes(title="context, tokens")
    if len(series) == 2:
        dense, quest = series["dense"][1], series["quest"][1]
        return _layout(figure, f"KV read per step: dense {sum(dense) / len(dense) / 2**20:.1f} MiB, Quest "
                       f"{sum(quest) / len(quest) / 2**20:.1f} MiB", 260, "dense reads every page of every layer")
    return _layout(figure, "KV read per step (dense reads every page)", 260,
                   f"answer {'with Quest' if 'dense' in series else 'dense'} (or Compare) to draw its line")


def time_per_token(speeds: dict) -> go.Figure:
    """Stacked bars, one per mode: ms per token spent in attention and in the rest of the step. speeds: mode ->
    (ms per token, attention ms per token or None)."""
    figure = go.Figure()
    modes = [mode for mode in ("dense", "quest") if mode in speeds]
    labels = ["Quest" if mode == "quest" else "dense" for mode in modes]
    attention = [speeds[mode][1] or 0.0 for mode in modes]
    rest = [speeds[mode][0] - a for mode, a in zip(modes, attention)]
    figure.add_trace(go.Bar(y=labels, x=attention, orientation="h", name="attention", marker_color=ORANGE,
                            hovertemplate="%{y}: attention %{x:.1f} ms<extra></extra>"))
    figure.add_trace(go.Bar(y=labels, x=rest, orientation="h", name="rest of the step (MLPs, projections, logits)",
                            marker_color="#9ca3af", hovertemplate="%{y}: the rest %{x:.1f} ms<extra></extra>"))
    figure.update_layout(barmode="stack")
    figure.update_xaxes(title="ms per token", rangemode="tozero")
    figure.update_layout(bargap=0.25)
    return _layout(figure, "Time per token on this document", 60 + 35 * len(modes))
